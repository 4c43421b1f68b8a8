"""MQTT persistent sessions, on paho-mqtt directly (MQTT 3.1.1, as IoT Hub has them): a device that
connects with CleanSession=0 keeps its subscriptions across connections and hub restarts, and
CONNACK's session-present says so; CleanSession=1 discards the session.

The official SDKs depend on this: they reconnect with CleanSession=0 and do not subscribe again.
Run by tests/conformance/run (see iothub_mqtt.py for the environment); some tests restart the hub.
"""

import pytest
from azure.iot.hub import IoTHubRegistryManager

from iothub_mqtt import RawDevice, SERVICE_CS, hubctl, invoke_method, new_device

METHODS = "$iothub/methods/POST/#"


@pytest.fixture(scope="module")
def registry():
    return IoTHubRegistryManager.from_connection_string(SERVICE_CS)


@pytest.fixture
def device(registry):
    device_id, key = new_device(registry, "session")
    yield device_id, key
    registry.delete_device(device_id)


def _session_with_methods(device_id, key):
    """A first CleanSession=0 connection (no session yet: session-present 0) that subscribes to
    methods, answers one, and disconnects."""
    client = RawDevice(device_id, key, clean_session=False).connect()
    try:
        assert client.session_present == 0, "a device that never connected has no session"
        assert client.subscribe(METHODS, qos=0) == (0,)
    finally:
        client.disconnect()


def _assert_method_answered(registry, client, name):
    status, payload = invoke_method(registry, client.device_id, name, connect_timeout=2)
    assert status == 200, f"{name}: the session's method subscription is gone: {status} {payload}"
    assert payload == {"answered": name}


def test_clean_session_1_discards_the_subscriptions(device, registry):
    """CleanSession=0 + SUBSCRIBE methods, then a CleanSession=1 connection: session-present 0 and
    a method call is 404103 (the device is not subscribed); the session stays discarded for a
    later CleanSession=0 connection too."""
    device_id, key = device
    _session_with_methods(device_id, key)
    client = RawDevice(device_id, key, clean_session=True).connect()
    try:
        assert client.session_present == 0, "CleanSession=1 must never resume a session"
        status, body = invoke_method(registry, device_id, "afterClean")
        assert status == 404 and "404103" in body, f"expected 404103, got {status} {body}"
        assert client.methods == []
    finally:
        client.disconnect()
    client = RawDevice(device_id, key, clean_session=False).connect()
    try:
        assert client.session_present == 0, "CleanSession=1 discarded the session; none is left to resume"
    finally:
        client.disconnect()


def test_clean_session_0_resumes_the_subscriptions(device, registry):
    """CleanSession=0 + SUBSCRIBE methods, disconnect, CleanSession=0 again: session-present 1 and
    the method is delivered without a new SUBSCRIBE."""
    device_id, key = device
    _session_with_methods(device_id, key)
    client = RawDevice(device_id, key, clean_session=False).connect()
    try:
        assert client.session_present == 1, "the CleanSession=0 session was not resumed"
        _assert_method_answered(registry, client, "resumed")
        assert client.subacks == {}, "this connection sent no SUBSCRIBE"
    finally:
        client.disconnect()


@pytest.mark.parametrize("how", ["restart", "kill-restart"])
def test_clean_session_0_survives_a_hub_restart(device, registry, how):
    """The session is durable: after the hub stops (SIGTERM) or is killed (-9) and starts again on
    the same data directory, a CleanSession=0 reconnect gets session-present 1 and methods."""
    device_id, key = device
    _session_with_methods(device_id, key)
    hubctl(how)
    client = RawDevice(device_id, key, clean_session=False).connect()
    try:
        assert client.session_present == 1, f"the session did not survive `hubctl {how}`"
        _assert_method_answered(registry, client, f"after-{how}")
    finally:
        client.disconnect()
