"""What the raw-MQTT and lifecycle tests share: the hub's environment, SAS tokens, a paho-mqtt device
that records what the hub does to it, the hub's restarts (hubctl) and its log.

The environment comes from tests/conformance/run: IOTHUB_CONNECTION_STRING, IOTHUB_CA_FILE,
IOTHUB_HOST_NAME (the hub's name, myhub.azure-devices.net; devices still connect to localhost, which
its certificate also names), HUB_CTL (restarts the hub) and HUB_LOG (the hub's log).
"""

import base64
import hashlib
import hmac
import os
import re
import ssl
import subprocess
import threading
import time
import urllib.parse
import uuid

import paho.mqtt.client as mqtt
from azure.iot.hub.models import CloudToDeviceMethod
from msrest.exceptions import HttpOperationError

SERVICE_CS = os.environ["IOTHUB_CONNECTION_STRING"]
CA_FILE = os.environ["IOTHUB_CA_FILE"]
HOST_NAME = os.environ.get("IOTHUB_HOST_NAME", "myhub.azure-devices.net")
HUB_CTL = os.environ.get("HUB_CTL")
HUB_LOG = os.environ.get("HUB_LOG")


def wait_for(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def new_device(registry, prefix):
    """A new enabled device with a SAS key: (device_id, primary_key)."""
    device_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    created = registry.create_device_with_sas(device_id, None, None, "enabled")
    return device_id, created.authentication.symmetric_key.primary_key


def sas_token(device_id, key, ttl=3600, host=HOST_NAME):
    """A device SAS token as `az iot hub generate-sas-token` makes it: sr, sig, se; no skn."""
    resource = urllib.parse.quote(f"{host}/devices/{device_id}", safe="")
    expiry = int(time.time() + ttl)
    digest = hmac.new(base64.b64decode(key), f"{resource}\n{expiry}".encode(), hashlib.sha256).digest()
    signature = urllib.parse.quote(base64.b64encode(digest).decode(), safe="")
    return f"SharedAccessSignature sr={resource}&sig={signature}&se={expiry}"


def username(device_id, api_version, host=HOST_NAME):
    return f"{host}/{device_id}/?api-version={api_version}"


class RawDevice:
    """A device on paho-mqtt (MQTT 3.1.1 over TLS with the hub's CA), client id = device id.

    Records the CONNACK, every SUBACK, every message and every disconnect; answers each direct
    method on `$iothub/methods/POST/{name}/?$rid={rid}` with `$iothub/methods/res/200/?$rid={rid}`
    (when `answer_methods`). paho's own reconnect is off: a connection the hub drops stays dropped,
    so a test sees it in `drops`.
    """

    def __init__(self, device_id, key, *, clean_session, keep_alive=60, api_version="2021-04-12",
                 answer_methods=True, tls_context=None):
        self.device_id = device_id
        self.answer_methods = answer_methods
        self.client = mqtt.Client(
            client_id=device_id, clean_session=clean_session, protocol=mqtt.MQTTv311, reconnect_on_failure=False
        )
        self.client.username_pw_set(username(device_id, api_version), sas_token(device_id, key))
        if tls_context is not None:
            self.client.tls_set_context(tls_context)
        else:
            self.client.tls_set(ca_certs=CA_FILE, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.keep_alive = keep_alive
        self.lock = threading.Lock()
        self.connack = None  # (flags, rc)
        self.connected = threading.Event()
        self.subacks = {}  # mid -> granted QoS tuple
        self.messages = []  # (topic, payload bytes)
        self.drops = []  # rc of every disconnect the device did not ask for
        self.methods = []  # (name, payload bytes)
        self._closing = False
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, client, userdata, flags, rc):
        self.connack = (flags, rc)
        self.connected.set()

    def _on_disconnect(self, client, userdata, rc):
        self.connected.clear()
        if not self._closing:
            self.drops.append(rc)

    def _on_subscribe(self, client, userdata, mid, granted):
        with self.lock:
            self.subacks[mid] = tuple(granted)

    def _on_message(self, client, userdata, message):
        with self.lock:
            self.messages.append((message.topic, message.payload))
        if self.answer_methods and message.topic.startswith("$iothub/methods/POST/"):
            name, query = message.topic[len("$iothub/methods/POST/"):].split("/?", 1)
            rid = urllib.parse.parse_qs(query)["$rid"][0]
            self.methods.append((name, message.payload))
            answer = b'{"answered":"%s"}' % name.encode()
            client.publish(f"$iothub/methods/res/200/?$rid={rid}", answer, qos=0)

    def connect(self):
        self.client.connect("localhost", 8883, self.keep_alive)
        self.client.loop_start()
        wait_for(lambda: self.connected.is_set() or self.drops, 10, "CONNACK")
        assert self.connack is not None, f"no CONNACK; disconnected with rc {self.drops}"
        assert self.connack[1] == 0, f"CONNACK refused: rc {self.connack[1]}"
        return self

    @property
    def session_present(self):
        return self.connack[0]["session present"]

    def subscribe(self, topic, qos=0):
        rc, mid = self.client.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"SUBSCRIBE {topic} not sent: {rc}"
        wait_for(lambda: mid in self.subacks or self.drops, 10, f"SUBACK for {topic}")
        assert not self.drops, f"the hub disconnected the device after SUBSCRIBE {topic} (rc {self.drops})"
        return self.subacks[mid]

    def publish(self, topic, payload, qos=1, retain=False):
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            wait_for(lambda: info.is_published() or self.drops, 10, f"PUBACK for {topic}")
            assert not self.drops, f"the hub disconnected the device after PUBLISH {topic} (rc {self.drops})"
        return info

    def wait_message(self, pattern, timeout=10):
        regex = re.compile(pattern)

        def find():
            with self.lock:
                return next(((t, p) for t, p in self.messages if regex.fullmatch(t)), None)

        found = wait_for(lambda: find() or self.drops, timeout, f"a message on {pattern}")
        assert not self.drops, f"the hub disconnected the device (rc {self.drops}) before {pattern}"
        return found

    def disconnect(self):
        self._closing = True
        self.client.disconnect()
        self.client.loop_stop()


def invoke_method(registry, device_id, name="ping", connect_timeout=0):
    """(status, payload) of a direct method, or (http status, body text) when the hub refuses it."""
    try:
        result = registry.invoke_device_method(
            device_id,
            CloudToDeviceMethod(
                method_name=name,
                payload={"from": "test"},
                response_timeout_in_seconds=10,
                connect_timeout_in_seconds=connect_timeout,
            ),
        )
        return result.status, result.payload
    except HttpOperationError as err:
        return err.response.status_code, err.response.text


def hubctl(action):
    """Stops, kills (-9) or restarts the hub that tests/conformance/run started."""
    assert HUB_CTL, "HUB_CTL is not set: run the suite through tests/conformance/run"
    subprocess.run([HUB_CTL, action], check=True, timeout=60)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def hub_connects(device_id):
    """How many times the hub has accepted a CONNECT from `device_id` (its `device connected` log
    lines): the witness that an SDK's SAS renewal or reconnect did open a new connection."""
    assert HUB_LOG, "HUB_LOG is not set: run the suite through tests/conformance/run"
    needle = f'device_id="{device_id}"'
    count = 0
    with open(HUB_LOG, errors="replace") as log:
        for line in log:
            line = _ANSI.sub("", line)
            if needle in line and "device connected" in line:
                count += 1
    return count
