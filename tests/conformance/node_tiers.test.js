// The official Node SDKs (azure-iothub 1.16.6, azure-iot-device 1.18.4 + azure-iot-device-mqtt
// 1.16.4) against the suite's hub restarted as an IoT Hub tier (hubctl with HUB_ARGS), with
// `--throttle-burst 10ms --throttle-backlog 0s` so that the second call in a row is over the
// tier's rate and refused at once.
//
// What the SDKs make of it: azure-iothub's RestApiClient.translateError maps a 429 to
// ThrottlingError and any 403 to TooManyDevicesError (so a basic tier's 403010 arrives as that
// class; the response keeps IoT Hub's error code header); its Registry does not retry. The device
// SDK's open() retries a CONNACK 3 ("server unavailable") under its retry policy, so a fleet that
// connects at once rides out the tier's new-connection throttle by itself.
//
// Run by tests/conformance/run after the lifecycle tests; the hub is restarted without a tier at
// the end. Devices are registered before the restart (S1 allows 100 registry calls a minute).
'use strict';

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const crypto = require('node:crypto');
const { execFileSync } = require('node:child_process');
const { Client: DeviceClient } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { Registry } = require('azure-iothub');

const serviceCs = process.env.IOTHUB_CONNECTION_STRING;
const caPem = fs.readFileSync(process.env.IOTHUB_CA_FILE, 'utf8');
const registry = Registry.fromConnectionString(serviceCs);
const SHAPING = '--throttle-burst 10ms --throttle-backlog 0s';
const FLEET = 6;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// execFileSync blocks the event loop, so the agent's pooled HTTPS sockets closed by the restart are
// only seen closed after it: the sleep lets Node process those closes before the next request.
async function restartAs(flags) {
  assert.ok(process.env.HUB_CTL, 'HUB_CTL is not set: run the suite through tests/conformance/run');
  execFileSync(process.env.HUB_CTL, ['restart'], {
    stdio: 'inherit',
    timeout: 60000,
    env: { ...process.env, HUB_ARGS: flags },
  });
  await sleep(300);
}

function logSize() {
  return fs.statSync(process.env.HUB_LOG).size;
}

// CONNACK 3 refusals for the tier's new-connection rate logged after `offset` bytes.
function throttledConnectsSince(offset) {
  const fd = fs.openSync(process.env.HUB_LOG, 'r');
  try {
    const length = fs.fstatSync(fd).size - offset;
    const buffer = Buffer.alloc(Math.max(length, 0));
    fs.readSync(fd, buffer, 0, buffer.length, offset);
    // eslint-disable-next-line no-control-regex
    const text = buffer.toString('utf8').replace(/\x1b\[[0-9;]*m/g, '');
    return text
      .split('\n')
      .filter((l) => l.includes('connection refused') && l.includes('new device connections throttle'))
      .length;
  } finally {
    fs.closeSync(fd);
  }
}

async function refusal(promise) {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  throw new Error('the call was not refused');
}

describe('a hub run as a tier', () => {
  const devices = [];

  before(async () => {
    for (let i = 0; i < FLEET; i++) {
      const deviceId = `node-tier-${crypto.randomUUID().slice(0, 8)}`;
      const { responseBody } = await registry.create({ deviceId });
      const key = responseBody.authentication.symmetricKey.primaryKey;
      const client = DeviceClient.fromConnectionString(
        `HostName=localhost;DeviceId=${deviceId};SharedAccessKey=${key}`,
        Mqtt,
      );
      client.setOptions({ ca: caPem });
      devices.push({ deviceId, client });
    }
    await restartAs(`--tier S1 ${SHAPING}`);
  });

  after(async () => {
    await Promise.all(devices.map(({ client }) => client.close().catch(() => {})));
    await restartAs('');
    for (const { deviceId } of devices) await registry.delete(deviceId);
  });

  it('a throttled registry call is a ThrottlingError carrying IoT Hub\'s error code', async () => {
    await sleep(700); // one registry call's worth of S1's rate (100 a minute)
    await registry.get(devices[0].deviceId);
    const err = await refusal(registry.get(devices[0].deviceId));
    assert.equal(err.constructor.name, 'ThrottlingError', `${err}`);
    assert.equal(err.response.statusCode, 429);
    assert.equal(err.response.headers['iothub-errorcode'], 'ThrottlingException');
    assert.equal(err.response.headers['retry-after'], undefined);
    await sleep(700);
    const { responseBody } = await registry.get(devices[0].deviceId);
    assert.equal(responseBody.deviceId, devices[0].deviceId, 'the rate came back');
  });

  it('a fleet opening at once rides out throttled connects with the SDK\'s own retries', async () => {
    const offset = logSize();
    await Promise.all(devices.map(({ client }) => client.open()));
    assert.ok(throttledConnectsSince(offset) > 0, 'no connect was throttled');
  });

  it('a basic tier refuses twins with 403010 (TooManyDevicesError in this SDK)', async () => {
    await Promise.all(devices.map(({ client }) => client.close()));
    await restartAs('--tier B1');
    const { responseBody } = await registry.get(devices[0].deviceId);
    assert.equal(responseBody.deviceId, devices[0].deviceId, 'the registry still serves');
    const err = await refusal(registry.getTwin(devices[0].deviceId));
    assert.equal(err.constructor.name, 'TooManyDevicesError', `${err}`);
    assert.equal(err.response.statusCode, 403);
    assert.equal(err.response.headers['iothub-errorcode'], 'OperationNotValidForTier');
    assert.match(err.responseBody, /not valid for the current IoT Hub tier \(B1\)/);
  });
});
