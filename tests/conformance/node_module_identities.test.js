// Module identities through the official Azure IoT Node SDKs (azure-iothub 1.16.6 Registry and
// Client, azure-iot-device 1.18.4 ModuleClient over azure-iot-device-mqtt 1.16.4) against
// hub-emulator.
//
// Run by tests/conformance/run with the environment of node_sdk.test.js. Fails when the emulator
// answers a module call differently from what the SDK expects of IoT Hub.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const crypto = require('node:crypto');
const { ModuleClient } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { Registry, Client: ServiceClient } = require('azure-iothub');

const serviceCs = process.env.IOTHUB_CONNECTION_STRING;
const caPem = fs.readFileSync(process.env.IOTHUB_CA_FILE, 'utf8');
const registry = Registry.fromConnectionString(serviceCs);
const service = ServiceClient.fromConnectionString(serviceCs);

test('module create, read, twin update and removal through the registry', async () => {
  const deviceId = `node-mod-${crypto.randomUUID().slice(0, 8)}`;
  await registry.create({ deviceId });
  try {
    const { responseBody: created } = await registry.addModule({ deviceId, moduleId: 'mod1' });
    assert.equal(created.moduleId, 'mod1');
    assert.equal(created.deviceId, deviceId);
    assert.ok(created.authentication.symmetricKey.primaryKey, 'keys are generated');
    // A second create is a 409, which the SDK maps by status.
    await assert.rejects(
      registry.addModule({ deviceId, moduleId: 'mod1' }),
      (err) => err.name === 'DeviceAlreadyExistsError',
    );
    const { responseBody: modules } = await registry.getModulesOnDevice(deviceId);
    assert.deepEqual(modules.map((m) => m.moduleId), ['mod1']);

    const { responseBody: twin } = await registry.getModuleTwin(deviceId, 'mod1');
    assert.equal(twin.moduleId, 'mod1');
    const { responseBody: updated } = await registry.updateModuleTwin(
      deviceId,
      'mod1',
      { tags: { site: 'a' }, properties: { desired: { rate: 5 } } },
      twin.etag,
    );
    assert.deepEqual(updated.tags, { site: 'a' });
    assert.equal(updated.properties.desired.rate, 5);

    await registry.removeModule(deviceId, 'mod1');
    await assert.rejects(registry.getModule(deviceId, 'mod1'));
  } finally {
    await registry.delete(deviceId);
  }
});

test('a ModuleClient answers a module method invoked through the service client', async () => {
  const deviceId = `node-mod-${crypto.randomUUID().slice(0, 8)}`;
  await registry.create({ deviceId });
  const { responseBody: module } = await registry.addModule({ deviceId, moduleId: 'filter' });
  const key = module.authentication.symmetricKey.primaryKey;
  const cs = `HostName=localhost;DeviceId=${deviceId};ModuleId=filter;SharedAccessKey=${key}`;
  const client = ModuleClient.fromConnectionString(cs, Mqtt);
  client.setOptions({ ca: caPem });
  const calls = [];
  client.onMethod('flush', (request, response) => {
    calls.push(request.payload);
    response.send(200, { flushed: true }, () => {});
  });
  await client.open();
  try {
    const { result } = await service.invokeDeviceMethod(deviceId, 'filter', {
      methodName: 'flush',
      payload: { n: 3 },
      responseTimeoutInSeconds: 30,
    });
    assert.equal(result.status, 200);
    assert.deepEqual(result.payload, { flushed: true });
    assert.deepEqual(calls, [{ n: 3 }]);
  } finally {
    await client.close();
    await registry.delete(deviceId);
  }
});
