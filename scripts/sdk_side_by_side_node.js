// The official Node device SDK's side of scripts/sdk-side-by-side: connects CLIENTS
// azure-iot-device + azure-iot-device-mqtt clients in this process and prints, as one JSON line,
// the resident memory they added per client. Devices come as "id key" lines on stdin (registered
// by the driver); IOTHUB_CA_FILE is the CA to trust; MQTT_HOST is `localhost:PORT`.
'use strict';

const fs = require('node:fs');
const { Client } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');

async function main() {
  const ca = fs.readFileSync(process.env.IOTHUB_CA_FILE, 'utf8');
  const devices = fs.readFileSync(0, 'utf8').trim().split('\n').map((l) => l.split(' '));
  global.gc?.();
  const before = process.memoryUsage().rss;
  const clients = [];
  for (const [id, key] of devices) {
    const client = Client.fromConnectionString(
      `HostName=${process.env.MQTT_HOST};DeviceId=${id};SharedAccessKey=${key}`,
      Mqtt,
    );
    await client.setOptions({ ca });
    client.onDeviceMethod('lockDoor', (request, response) => response.send(200, {}, () => {}));
    await client.open();
    clients.push(client);
  }
  await new Promise((resolve) => setTimeout(resolve, 2000));
  global.gc?.();
  const after = process.memoryUsage().rss;
  console.log(JSON.stringify({
    clients: clients.length,
    rssBeforeKiB: Math.round(before / 1024),
    rssAfterKiB: Math.round(after / 1024),
    kibPerClient: (after - before) / 1024 / clients.length,
  }));
  await Promise.all(clients.map((c) => c.close()));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
