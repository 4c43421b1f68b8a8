// Automatic device configurations through the official Node service SDK (azure-iothub 1.16.6
// Registry) against hub-emulator.
//
// Run by tests/conformance/run with the environment of node_sdk.test.js. Fails when the emulator
// answers a configuration call differently from what the SDK expects of IoT Hub: the SDK quotes
// the etag in If-Match (or sends `*` with forceUpdate), and removeConfiguration sends no If-Match
// at all. Each configuration targets a tag unique to the test, so the shared hub's other devices
// are never touched.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { Registry } = require('azure-iothub');

const registry = Registry.fromConnectionString(process.env.IOTHUB_CONNECTION_STRING);

function configuration(id, fleet, settings, priority) {
  return {
    id,
    content: { deviceContent: { 'properties.desired.settings': settings } },
    targetCondition: `tags.fleet='${fleet}'`,
    priority,
    labels: { purpose: 'conformance' },
  };
}

async function waitFor(what, probe) {
  const deadline = Date.now() + 15000;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

test('configuration add, get, list, update with etag or force, and removal', async () => {
  const id = `node-conf-${crypto.randomUUID().slice(0, 8)}`;
  const fleet = `nf${crypto.randomUUID().slice(0, 8)}`;
  const { responseBody: created } = await registry.addConfiguration(configuration(id, fleet, { rate: 1 }, 5));
  try {
    assert.equal(created.id, id);
    assert.equal(created.schemaVersion, '1.0', 'the SDK fills it in and the hub keeps it');
    assert.ok(created.etag);
    await assert.rejects(
      registry.addConfiguration(configuration(id, fleet, { rate: 1 }, 5)),
      (err) => err.name === 'DeviceAlreadyExistsError',
      'a second add is 409',
    );

    const { responseBody: fetched } = await registry.getConfiguration(id);
    assert.equal(fetched.etag, created.etag);
    const { responseBody: all } = await registry.getConfigurations();
    assert.ok(all.some((c) => c.id === id));

    // The SDK sends the etag quoted; the hub takes it and gives a new one.
    const { responseBody: updated } = await registry.updateConfiguration({ ...fetched, priority: 6 });
    assert.equal(updated.priority, 6);
    assert.notEqual(updated.etag, created.etag);
    // The stale etag is 412; forceUpdate (If-Match: *) goes through.
    await assert.rejects(
      registry.updateConfiguration({ ...fetched, priority: 7 }),
      (err) => err.name === 'InvalidEtagError',
    );
    const { responseBody: forced } = await registry.updateConfiguration({ ...fetched, priority: 8 }, true);
    assert.equal(forced.priority, 8);
  } finally {
    await registry.removeConfiguration(id);
  }
  await assert.rejects(registry.getConfiguration(id), /Not found/);
});

test('a configuration reaches a device tagged later, and leaves it when untagged', async () => {
  const id = `node-conf-${crypto.randomUUID().slice(0, 8)}`;
  const fleet = `nf${crypto.randomUUID().slice(0, 8)}`;
  const deviceId = `node-cfg-${crypto.randomUUID().slice(0, 8)}`;
  await registry.addConfiguration(configuration(id, fleet, { rate: 4 }, 1));
  await registry.create({ deviceId });
  try {
    await registry.updateTwin(deviceId, { tags: { fleet } }, '*');
    const twin = await waitFor('the content to reach the twin', async () => {
      const { responseBody } = await registry.getTwin(deviceId);
      return responseBody.properties.desired.settings?.rate === 4 && responseBody;
    });
    assert.equal(twin.configurations[id].status, 'Applied');
    const { responseBody: counted } = await registry.getConfiguration(id);
    assert.equal(counted.systemMetrics.results.targetedCount, 1);
    assert.equal(counted.systemMetrics.results.appliedCount, 1);

    await registry.updateTwin(deviceId, { tags: { fleet: null } }, '*');
    await waitFor('the content to leave the twin', async () => {
      const { responseBody } = await registry.getTwin(deviceId);
      return !('settings' in responseBody.properties.desired);
    });
  } finally {
    await registry.removeConfiguration(id);
    await registry.delete(deviceId);
  }
});
