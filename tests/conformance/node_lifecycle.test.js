// A long-lived official Node device (azure-iot-device 1.18.4 + azure-iot-device-mqtt 1.16.4)
// through its lifecycle: SAS token renewals, a hub restart and a hub crash (kill -9), with the
// SDK's own reconnect doing the rest.
//
// The device's SharedAccessKeyAuthenticationProvider makes 3600 s tokens and renews them 900 s
// before expiry. `client.setOptions({ tokenRenewal: { tokenValidTimeInSeconds,
// tokenRenewalMarginInSeconds } })` shortens that: the Mqtt transport passes it to the
// provider's setTokenRenewalValues, which renews every (valid - margin) s; on each new token
// the transport disconnects and connects again with CleanSession=0 (mqtt_base `reconnecting`)
// and does not subscribe again, so methods and desired patches keep working only if the hub kept
// the MQTT session. Here: a 40 s token renewed every 15 s. The steps share one device session,
// each inside the 15 s between two renewals: connect; renewal 1; hub restart (SIGTERM);
// renewal 2; hub kill -9. After each, the device answers a direct method and receives a desired
// patch sent with azure-iothub.
//
// Run by tests/conformance/run, which exports HUB_CTL (restarts the hub) and HUB_LOG (its log,
// whose `device connected` lines witness each new connection).
'use strict';

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const crypto = require('node:crypto');
const { execFileSync } = require('node:child_process');
const { Client: DeviceClient } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { Registry, Client: ServiceClient } = require('azure-iothub');

const serviceCs = process.env.IOTHUB_CONNECTION_STRING;
const caPem = fs.readFileSync(process.env.IOTHUB_CA_FILE, 'utf8');
const registry = Registry.fromConnectionString(serviceCs);
const service = ServiceClient.fromConnectionString(serviceCs);

const VALID_S = 40;
const MARGIN_S = 25;
const PERIOD_MS = (VALID_S - MARGIN_S) * 1000;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function waitFor(predicate, what, timeoutMs = 15000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const value = await predicate();
    if (value) return value;
    await sleep(50);
  }
  throw new Error(`timed out after ${timeoutMs / 1000} s waiting for ${what}`);
}

function hubctl(action) {
  assert.ok(process.env.HUB_CTL, 'HUB_CTL is not set: run the suite through tests/conformance/run');
  execFileSync(process.env.HUB_CTL, [action], { stdio: 'inherit', timeout: 60000 });
}

// How many CONNECTs the hub has accepted from the device (its `device connected` log lines).
function hubConnects(deviceId) {
  assert.ok(process.env.HUB_LOG, 'HUB_LOG is not set: run the suite through tests/conformance/run');
  // eslint-disable-next-line no-control-regex
  const log = fs.readFileSync(process.env.HUB_LOG, 'utf8').replace(/\x1b\[[0-9;]*m/g, '');
  const needle = `device_id="${deviceId}"`;
  return log.split('\n').filter((line) => line.includes(needle) && line.includes('device connected')).length;
}

describe('a Node device through SAS renewals, a hub restart and kill -9', () => {
  const deviceId = `node-life-${crypto.randomUUID().slice(0, 8)}`;
  const desired = [];
  let client;
  let opened;

  before(async () => {
    const { responseBody } = await registry.create({ deviceId });
    const key = responseBody.authentication.symmetricKey.primaryKey;
    client = DeviceClient.fromConnectionString(`HostName=localhost;DeviceId=${deviceId};SharedAccessKey=${key}`, Mqtt);
    await client.setOptions({
      ca: caPem,
      tokenRenewal: { tokenValidTimeInSeconds: VALID_S, tokenRenewalMarginInSeconds: MARGIN_S },
    });
    client.on('error', () => {});
    client.onDeviceMethod('lifecycle', (request, response) => {
      response.send(200, { answered: request.payload.step }, () => {});
    });
    await client.open();
    opened = Date.now();
    const twin = await client.getTwin();
    twin.on('properties.desired', (patch) => desired.push(patch));
  });

  after(async () => {
    if (client) await client.close();
    await registry.delete(deviceId);
  });

  // A direct method answered and a desired patch received; both reported when both fail.
  const check = async (step) => {
    const problems = [];
    try {
      const { result } = await service.invokeDeviceMethod(deviceId, {
        methodName: 'lifecycle',
        payload: { step },
        responseTimeoutInSeconds: 10,
        connectTimeoutInSeconds: 3,
      });
      if (result.status !== 200 || result.payload?.answered !== step) {
        problems.push(`direct method: ${JSON.stringify(result)}`);
      }
    } catch (err) {
      problems.push(`direct method: ${err.name} ${err.responseBody ?? err.message}`);
    }
    await registry.updateTwin(deviceId, { properties: { desired: { step } } }, '*');
    try {
      await waitFor(() => desired.some((p) => p.step === step), 'the desired patch', 5000);
    } catch {
      problems.push('desired patch: none within 5 s');
    }
    assert.deepEqual(problems, [], `after ${step}: ${problems.join('; ')}`);
  };
  const newConnection = (since, timeoutMs, what) => waitFor(() => hubConnects(deviceId) > since, what, timeoutMs);
  const renewal = async (number) => {
    const since = hubConnects(deviceId);
    const due = opened + number * PERIOD_MS;
    await newConnection(since, Math.max(0, due - Date.now()) + 15000, `SAS renewal ${number}`);
  };

  it('works after connect', async () => {
    assert.equal(hubConnects(deviceId), 1);
    await check('connected');
  });
  it('works after the first SAS renewal', async () => {
    await renewal(1);
    await check('renewal-1');
  });
  it('works after a hub restart (SIGTERM)', async () => {
    const since = hubConnects(deviceId);
    hubctl('restart');
    await newConnection(since, 30000, "the hub's restart");
    await check('restart');
  });
  it('works after the second SAS renewal', async () => {
    await renewal(2);
    await check('renewal-2');
  });
  it('works after a hub kill -9', async () => {
    const since = hubConnects(deviceId);
    hubctl('kill-restart');
    await newConnection(since, 30000, "the hub's kill -9 and restart");
    await check('kill-9');
  });
});
