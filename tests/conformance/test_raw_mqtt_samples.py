"""Microsoft's raw-MQTT samples (Azure-Samples/IoTMQTTSample) replayed against hub-emulator.

Each test does what one sample does on the wire, with paho-mqtt: client id = device id, username
`{host}/{device_id}/?api-version=...` (the version that sample sends), a SAS token as the
password, TLS with the hub's CA; the same clean-session flag, keep-alive, topics, QoS and RETAIN
flags. Where mosquitto-clients is installed, the two CLI samples also run as the exact commands of
the samples' readme (with -h localhost: the samples' `{hub}.azure-devices.net` does not resolve
here; the hub's certificate names both).

Run by tests/conformance/run (see iothub_mqtt.py for the environment).
"""

import json
import re
import shutil
import ssl
import subprocess
import time

import pytest
from azure.iot.hub import IoTHubRegistryManager

from iothub_mqtt import CA_FILE, RawDevice, SERVICE_CS, invoke_method, new_device, sas_token, username


@pytest.fixture(scope="module")
def registry():
    return IoTHubRegistryManager.from_connection_string(SERVICE_CS)


@pytest.fixture
def device(registry, request):
    """A new device for one test: (device_id, key); deleted afterwards."""
    device_id, key = new_device(registry, "raw-" + request.node.name[5:17].replace("_", "-"))
    yield device_id, key
    registry.delete_device(device_id)


def test_mosquitto_pub_sample_sends_telemetry_at_qos_1(device):
    """mosquitto_pub/readme.md, `Send a message`: clean session, keep-alive 60, api-version
    2018-06-30, "hello world" at QoS 1 on devices/{id}/messages/events/ → PUBACK."""
    device_id, key = device
    client = RawDevice(device_id, key, clean_session=True, keep_alive=60, api_version="2018-06-30").connect()
    try:
        assert client.session_present == 0
        client.publish(f"devices/{device_id}/messages/events/", b"hello world", qos=1)
        assert not client.drops
    finally:
        client.disconnect()


def test_libmosquitto_telemetry_sample_publishes_with_retain(device):
    """mosquitto/src/mosquitto_telemetry.cpp: mosquitto_new(DEVICEID, clean_session=false),
    keep-alive 10, api-version 2020-09-30, one QoS 1 message with RETAIN=1 (IoT Hub ignores the
    flag) → PUBACK, then the sample disconnects."""
    device_id, key = device
    client = RawDevice(device_id, key, clean_session=False, keep_alive=10, api_version="2020-09-30").connect()
    try:
        client.publish(f"devices/{device_id}/messages/events/", b"Bonjour MQTT from Mosquitto", qos=1, retain=True)
        assert not client.drops
    finally:
        client.disconnect()


def test_libmosquitto_subscribe_sample_subscribes_to_everything(device):
    """mosquitto/src/mosquitto_subscribe.cpp: clean_session=false, keep-alive 10, SUBSCRIBE `#`
    at QoS 0 (IoT Hub grants it as the device's cloud-to-device subscription) → SUBACK granting
    QoS 0 or 1 (not 0x80), and the connection stays up: a later QoS 1 publish is still acked."""
    device_id, key = device
    client = RawDevice(device_id, key, clean_session=False, keep_alive=10, api_version="2020-09-30").connect()
    try:
        granted = client.subscribe("#", qos=0)
        assert granted in ((0,), (1,)), f"SUBSCRIBE # was refused: granted {granted}"
        time.sleep(1.5)
        assert not client.drops, f"the hub dropped the device after SUBSCRIBE # (rc {client.drops})"
        client.publish(f"devices/{device_id}/messages/events/", b"still here", qos=1)
    finally:
        client.disconnect()


def test_libmosquitto_device_twin_sample_patches_and_gets_the_twin(device):
    """mosquitto/src/mosquitto_device_twin.cpp: clean_session=false, keep-alive 10, SUBSCRIBE
    `$iothub/twin/res/#` QoS 0; PATCH reported `{"temperature": 32}` as $rid=0 at QoS 1 with
    RETAIN=1 → `res/204/?$rid=0&$version=N`, empty body; then GET `{}` as $rid=1 at QoS 1 with
    RETAIN=1 → `res/200/?$rid=1` with the desired and the reported properties, temperature 32."""
    device_id, key = device
    client = RawDevice(device_id, key, clean_session=False, keep_alive=10, api_version="2020-09-30").connect()
    try:
        assert client.subscribe("$iothub/twin/res/#", qos=0) == (0,)
        client.publish(
            "$iothub/twin/PATCH/properties/reported/?$rid=0", b'{"temperature": 32}', qos=1, retain=True
        )
        topic, body = client.wait_message(r"\$iothub/twin/res/204/\?\$rid=0&\$version=\d+")
        assert body == b""
        version = int(re.search(r"\$version=(\d+)", topic).group(1))

        client.publish("$iothub/twin/GET/?$rid=1", b"{}", qos=1, retain=True)
        _, body = client.wait_message(r"\$iothub/twin/res/200/\?\$rid=1")
        twin = json.loads(body)
        assert "desired" in twin and "$version" in twin["desired"]
        assert twin["reported"]["temperature"] == 32
        assert twin["reported"]["$version"] == version
        assert not client.drops
    finally:
        client.disconnect()


def test_python_paho_sample_sends_telemetry_with_hostname_checked(device):
    """python/main.py: paho, MQTT 3.1.1, api-version 2021-04-12, an SSLContext with
    CERT_REQUIRED and check_hostname, keep-alive 120, five QoS 1 messages on
    devices/{id}/messages/events/ (the sample sleeps 1 s between them; 0.2 s here)."""
    device_id, key = device
    context = ssl.SSLContext(protocol=ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=CA_FILE)
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    client = RawDevice(
        device_id, key, clean_session=True, keep_alive=120, api_version="2021-04-12", tls_context=context
    ).connect()
    try:
        for spell in ["Accio", "Aguamenti", "Alarte Ascendare", "Expecto Patronum", "Homenum Revelio"]:
            client.publish(f"devices/{device_id}/messages/events/", spell.encode(), qos=1)
            time.sleep(0.2)
        assert not client.drops
    finally:
        client.disconnect()


def test_raw_device_answers_a_direct_method(device, registry):
    """The samples' method flow (IoT Hub's MQTT doc): SUBSCRIBE `$iothub/methods/POST/#`, get
    `$iothub/methods/POST/{name}/?$rid={rid}` with the payload, answer on
    `$iothub/methods/res/200/?$rid={rid}`; the service (azure-iot-hub) gets the status and payload."""
    device_id, key = device
    client = RawDevice(device_id, key, clean_session=True, keep_alive=60, api_version="2021-04-12").connect()
    try:
        assert client.subscribe("$iothub/methods/POST/#", qos=0) == (0,)
        status, payload = invoke_method(registry, device_id, "reboot")
        assert (status, payload) == (200, {"answered": "reboot"})
        assert client.methods == [("reboot", b'{"from":"test"}')]
    finally:
        client.disconnect()


needs_mosquitto_clients = pytest.mark.skipif(
    not (shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")),
    reason="mosquitto-clients is not installed (apt-get install mosquitto-clients; .ci/run does)",
)


def _cli_auth(device_id, key):
    return [
        "-h", "localhost", "-p", "8883", "-i", device_id,
        "-u", username(device_id, "2018-06-30"), "-P", sas_token(device_id, key),
    ]  # fmt: skip


@needs_mosquitto_clients
def test_mosquitto_pub_cli_sample(device):
    """mosquitto_pub/readme.md's command, as is (with -d, -V mqttv311): exit 0 after a PUBACK."""
    device_id, key = device
    run = subprocess.run(
        ["mosquitto_pub", "-d", *_cli_auth(device_id, key), "-t", f"devices/{device_id}/messages/events/",
         "-m", "hello world", "--cafile", CA_FILE, "-q", "1", "-V", "mqttv311"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "received CONNACK (0)" in output and "received PUBACK" in output, output


@needs_mosquitto_clients
def test_mosquitto_sub_cli_sample_stays_subscribed_to_everything(device):
    """mosquitto_pub/readme.md's `Subscribe to events` command (-t "#" -q 1), with -C 1 -W 5:
    one CONNECT, a SUBACK that grants the subscription, and the connection stays up until
    mosquitto_sub's own 5 s timeout (exit 27, "Timed out"): no disconnect, no reconnect."""
    device_id, key = device
    started = time.monotonic()
    run = subprocess.run(
        ["mosquitto_sub", "-d", *_cli_auth(device_id, key), "-t", "#", "--cafile", CA_FILE, "-q", "1",
         "-V", "mqttv311", "-C", "1", "-W", "5"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert output.count("sending CONNECT") == 1, f"mosquitto_sub reconnected: the hub dropped it\n{output}"
    assert "received SUBACK" in output, f"no SUBACK for #\n{output}"
    granted = re.search(r"Subscribed \(mid: \d+\): (\d+)", output)
    assert granted and granted.group(1) in ("0", "1"), f"SUBSCRIBE # refused\n{output}"
    assert run.returncode == 27 and "Timed out" in output, output
    assert time.monotonic() - started >= 4.5
