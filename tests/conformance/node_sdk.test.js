// The official Azure IoT Node SDKs (azure-iot-device 1.18.4 + azure-iot-device-mqtt 1.16.4,
// azure-iothub 1.16.6) against hub-emulator.
//
// Run by tests/conformance/run, which starts the hub on 8883 (MQTT) and 443 (HTTPS: the Node
// service SDK cannot take a port) and sets NODE_EXTRA_CA_CERTS. Fails when the emulator
// answers differently from what the SDK expects of IoT Hub.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const crypto = require('node:crypto');
const { Client: DeviceClient } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { Registry, Client: ServiceClient, JobClient } = require('azure-iothub');

const serviceCs = process.env.IOTHUB_CONNECTION_STRING;
const caPem = fs.readFileSync(process.env.IOTHUB_CA_FILE, 'utf8');
const registry = Registry.fromConnectionString(serviceCs);
const service = ServiceClient.fromConnectionString(serviceCs);
const jobs = JobClient.fromConnectionString(serviceCs);

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function waitFor(predicate, what, timeoutMs = 15000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const value = await predicate();
    if (value) return value;
    await sleep(100);
  }
  throw new Error(`timed out waiting for ${what}`);
}

async function connectedDevice(deviceId) {
  const { responseBody } = await registry.create({ deviceId });
  const key = responseBody.authentication.symmetricKey.primaryKey;
  const cs = `HostName=localhost;DeviceId=${deviceId};SharedAccessKey=${key}`;
  const client = DeviceClient.fromConnectionString(cs, Mqtt);
  client.setOptions({ ca: caPem });
  const calls = [];
  client.onDeviceMethod('lockDoor', (request, response) => {
    calls.push(request.payload);
    response.send(200, { Response: 'lockDoor called successfully' }, () => {});
  });
  await client.open();
  return { client, calls };
}

test('device method round trip through the service client', async () => {
  const deviceId = `node-${crypto.randomUUID().slice(0, 8)}`;
  const { client, calls } = await connectedDevice(deviceId);
  try {
    const { result } = await service.invokeDeviceMethod(deviceId, {
      methodName: 'lockDoor',
      payload: { lockTime: '10m' },
      responseTimeoutInSeconds: 30,
    });
    assert.equal(result.status, 200);
    assert.deepEqual(result.payload, { Response: 'lockDoor called successfully' });
    assert.deepEqual(calls, [{ lockTime: '10m' }]);
  } finally {
    await client.close();
    await registry.delete(deviceId);
  }
});

test('twin update reaches the device and reported properties reach the service', async () => {
  const deviceId = `node-${crypto.randomUUID().slice(0, 8)}`;
  const { client } = await connectedDevice(deviceId);
  try {
    const twin = await client.getTwin();
    const desired = [];
    twin.on('properties.desired', (patch) => desired.push(patch));
    await waitFor(() => desired.length >= 1, 'the initial desired event');
    await new Promise((resolve, reject) =>
      twin.properties.reported.update({ door: 'locked' }, (err) => (err ? reject(err) : resolve())));
    const { responseBody: serviceTwin } = await registry.getTwin(deviceId);
    assert.equal(serviceTwin.properties.reported.door, 'locked');

    await registry.updateTwin(deviceId, { properties: { desired: { building: 43, floor: 3 } } }, '*');
    const patch = await waitFor(() => desired.find((p) => p.building === 43), 'the desired patch');
    assert.equal(patch.floor, 3);
    assert.equal(typeof patch.$version, 'number');
  } finally {
    await client.close();
    await registry.delete(deviceId);
  }
});

test('registry errors map to the SDK error classes', async () => {
  await assert.rejects(registry.get('no-such-device'), (err) => err.name === 'DeviceNotFoundError');
  const deviceId = `node-${crypto.randomUUID().slice(0, 8)}`;
  await registry.create({ deviceId });
  await assert.rejects(registry.create({ deviceId }), (err) => err.name === 'DeviceAlreadyExistsError');
  await registry.delete(deviceId);
});

test('query pages through more rows than one page with nextAsTwin', async () => {
  const prefix = `nq-${crypto.randomUUID().slice(0, 6)}`;
  const ids = Array.from({ length: 7 }, (_, i) => `${prefix}-${i}`);
  for (const deviceId of ids) await registry.create({ deviceId });
  try {
    const query = registry.createQuery(`SELECT * FROM devices WHERE STARTSWITH(deviceId, '${prefix}')`, 3);
    const seen = [];
    let pages = 0;
    while (query.hasMoreResults) {
      const { result } = await query.nextAsTwin();
      pages += 1;
      for (const twin of result) seen.push(twin.deviceId);
      assert.ok(pages < 10, 'paging must end');
    }
    assert.equal(pages, 3);
    assert.deepEqual(seen.sort(), ids);
  } finally {
    for (const deviceId of ids) await registry.delete(deviceId);
  }
});

test('scheduled method and twin jobs complete and report per-device results', async () => {
  const deviceId = `node-${crypto.randomUUID().slice(0, 8)}`;
  const { client, calls } = await connectedDevice(deviceId);
  try {
    const methodJob = `node-job-${crypto.randomUUID().slice(0, 8)}`;
    await jobs.scheduleDeviceMethod(methodJob, `deviceId IN ['${deviceId}']`,
      { methodName: 'lockDoor', payload: { lockTime: '10m' }, responseTimeoutInSeconds: 30 }, new Date(), 60);
    const done = await waitFor(async () => {
      const { jobStatus } = await jobs.getJob(methodJob);
      return jobStatus.status === 'completed' ? jobStatus : null;
    }, 'method job completed');
    assert.equal(done.deviceJobStatistics.succeededCount, 1);
    assert.deepEqual(calls, [{ lockTime: '10m' }]);

    const twinJob = `node-job-${crypto.randomUUID().slice(0, 8)}`;
    await jobs.scheduleTwinUpdate(twinJob, `deviceId = '${deviceId}'`,
      { etag: '*', properties: { desired: { building: 43, floor: 3 } } }, new Date(), 60);
    await waitFor(async () => (await jobs.getJob(twinJob)).jobStatus.status === 'completed', 'twin job completed');
    const { responseBody: twin } = await registry.getTwin(deviceId);
    assert.equal(twin.properties.desired.building, 43);

    const query = registry.createQuery(`SELECT * FROM devices.jobs WHERE devices.jobs.jobId = '${methodJob}'`);
    const { result: rows } = await query.next();
    assert.equal(rows.length, 1);
    assert.equal(rows[0].status, 'completed');
    assert.equal(rows[0].outcome.deviceMethodResponse.status, 200);
  } finally {
    await client.close();
    await registry.delete(deviceId);
  }
});

// The body of a rejected call, as azure-iothub's rest client keeps it (text or already parsed).
function errorBody(err) {
  const body = Buffer.isBuffer(err.responseBody) ? err.responseBody.toString() : err.responseBody;
  return typeof body === 'string' ? JSON.parse(body) : body;
}

test('bulk add, update and remove devices (Registry.addDevices/updateDevices/removeDevices)', async () => {
  const ids = [0, 1, 2].map(() => `node-bulk-${crypto.randomUUID().slice(0, 8)}`);
  const { responseBody: added } = await registry.addDevices(ids.map((deviceId) => ({ deviceId, status: 'disabled' })));
  assert.equal(added.isSuccessful, true);
  assert.deepEqual(added.errors, []);
  const keys = {};
  for (const deviceId of ids) {
    const { responseBody: device } = await registry.get(deviceId);
    assert.equal(device.status, 'disabled');
    assert.ok(device.authentication.symmetricKey.primaryKey, 'the hub generated a key');
    keys[deviceId] = device.authentication.symmetricKey.primaryKey;
  }
  // updateDevices sends importMode `Update` (capitalised) and empty keys: the keys are kept.
  const { responseBody: updated } = await registry.updateDevices(
    ids.map((deviceId) => ({ deviceId, status: 'enabled' })), true);
  assert.equal(updated.isSuccessful, true);
  for (const deviceId of ids) {
    const { responseBody: device } = await registry.get(deviceId);
    assert.equal(device.status, 'enabled');
    assert.equal(device.authentication.symmetricKey.primaryKey, keys[deviceId]);
  }
  // A create of an existing device: the hub answers 400 with the per-device error, which the SDK
  // turns into an ArgumentError carrying that body.
  await assert.rejects(registry.addDevices([{ deviceId: ids[0] }]), (err) => {
    assert.equal(err.name, 'ArgumentError');
    const body = errorBody(err);
    assert.equal(body.isSuccessful, false);
    assert.deepEqual(body.errors.map((e) => [e.deviceId, e.errorCode]), [[ids[0], 'DeviceAlreadyExists']]);
    return true;
  });
  // removeDevices sends importMode `Delete` (capitalised).
  const { responseBody: removed } = await registry.removeDevices(ids.map((deviceId) => ({ deviceId })), true);
  assert.equal(removed.isSuccessful, true);
  for (const deviceId of ids) {
    await assert.rejects(registry.get(deviceId), (err) => err.name === 'DeviceNotFoundError');
  }
});
