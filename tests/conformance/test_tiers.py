"""The official Python SDKs (azure-iot-hub 2.7.0, azure-iot-device 2.14.0) against the suite's hub
restarted as an IoT Hub tier (hubctl with HUB_ARGS): what the SDKs make of its throttling and of a
basic tier's refusals, and that devices reconnect on their own after throttled connects.

The tier runs with `--throttle-burst 10ms --throttle-backlog 0s`, so that a second call in a row
is over the tier's rate and refused at once instead of after IoT Hub's minute of burst.

What the service SDK does with a 429: msrest 0.7.1's ClientRetryPolicy retries only statuses
outside its `safe_codes` (every status under 500 except 408), so a 429 is raised at once as
HttpOperationError, with no retry; a `Retry-After` header would change that (urllib3's Retry
retries a 429 carrying one, for idempotent methods, after sleeping that long), which is one more
reason the hub sends none, as IoT Hub sends none.

Devices are registered before the restart (the registry throttle is 100 a minute on S1) and the
data directory is durable, so they are still there. Run by tests/conformance/run after the
lifecycle tests; the hub is restarted without a tier at the end.
"""

import os
import re
import subprocess
import time

import pytest
from azure.iot.device import IoTHubDeviceClient, Message, MethodResponse
from azure.iot.device.exceptions import ConnectionFailedError
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod
from msrest.exceptions import HttpOperationError

from iothub_mqtt import CA_FILE, HUB_CTL, HUB_LOG, SERVICE_CS, invoke_method, new_device, wait_for

SHAPING = ["--throttle-burst", "10ms", "--throttle-backlog", "0s"]
FLEET = 8
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def restart_as(*flags):
    assert HUB_CTL, "HUB_CTL is not set: run the suite through tests/conformance/run"
    env = dict(os.environ, HUB_ARGS=" ".join(flags))
    subprocess.run([HUB_CTL, "restart"], check=True, timeout=60, env=env)


def log_size():
    return os.path.getsize(HUB_LOG)


def throttled_connects_since(offset):
    """CONNACK 3 refusals for the tier's new-connection rate logged after `offset`."""
    with open(HUB_LOG, "rb") as log:
        log.seek(offset)
        text = _ANSI.sub("", log.read().decode(errors="replace"))
    return sum(
        1
        for line in text.splitlines()
        if "connection refused" in line and "new device connections throttle" in line
    )


class Device:
    def __init__(self, registry):
        self.device_id, key = new_device(registry, "py-tier")
        self.client = IoTHubDeviceClient.create_from_connection_string(
            f"HostName=localhost;DeviceId={self.device_id};SharedAccessKey={key}",
            server_verification_cert=open(CA_FILE).read(),
            connection_retry_interval=1,
        )
        self.client.on_method_request_received = self._on_method

    def _on_method(self, request):
        self.client.send_method_response(
            MethodResponse.create_from_method_request(request, 200, {"tier": "ok"})
        )

    def connect(self, within=20):
        """connect(), again after each throttled attempt (ConnectionFailedError for CONNACK 3)."""
        deadline = time.monotonic() + within
        refused = 0
        while True:
            try:
                self.client.connect()
                return refused
            except ConnectionFailedError:
                refused += 1
                assert time.monotonic() < deadline, f"{self.device_id} never connected"
                time.sleep(0.05)


@pytest.fixture(scope="module")
def registry():
    return IoTHubRegistryManager.from_connection_string(SERVICE_CS)


@pytest.fixture(scope="module")
def fleet(registry):
    devices = [Device(registry) for _ in range(FLEET)]
    restart_as("--tier", "S1", *SHAPING)
    yield devices
    for device in devices:
        device.client.shutdown()
    restart_as()
    for device in devices:
        registry.delete_device(device.device_id)


def test_a_throttled_registry_call_is_an_http_operation_error_429_at_once(registry, fleet):
    device_id = fleet[0].device_id
    time.sleep(0.7)  # one registry call's worth of S1's rate (100 a minute)
    registry.get_device(device_id)
    started = time.monotonic()
    with pytest.raises(HttpOperationError) as refused:
        registry.get_device(device_id)
    took = time.monotonic() - started
    response = refused.value.response
    assert response.status_code == 429
    assert response.headers.get("iothub-errorcode") == "ThrottlingException"
    assert "Retry-After" not in response.headers
    assert response.json()["Message"].startswith("ErrorCode:ThrottlingException;")
    assert took < 1.0, f"msrest retried the 429 ({took:.2f} s)"
    time.sleep(0.7)
    assert registry.get_device(device_id).device_id == device_id, "the rate came back"


def test_devices_connect_then_reconnect_on_their_own_after_throttled_connects(registry, fleet):
    for device in fleet:
        device.connect()
    offset = log_size()
    # The whole fleet reconnects at once after a restart: S1 lets one connect through per 10 ms
    # and answers the others CONNACK 3; the SDKs retry every connection_retry_interval.
    restart_as("--tier", "S1", *SHAPING)
    for device in fleet:
        wait_for(lambda: device.client.connected, 60, f"{device.device_id} reconnected")
    assert throttled_connects_since(offset) > 0, "no connect was throttled"
    for device in fleet:
        # Direct methods are 40 a second on S1: one call per 25 ms at most.
        time.sleep(0.05)
        status, payload = invoke_method(registry, device.device_id, connect_timeout=10)
        assert (status, payload) == (200, {"tier": "ok"}), device.device_id


def test_a_basic_tier_refuses_twins_and_methods_with_403010_and_takes_telemetry(registry, fleet):
    restart_as("--tier", "B1")
    device = fleet[0]
    wait_for(lambda: device.client.connected, 60, "the device reconnected to the basic hub")
    device.client.send_message(Message("door locked"))
    assert registry.get_device(device.device_id).device_id == device.device_id
    for call in (
        lambda: registry.get_twin(device.device_id),
        lambda: registry.invoke_device_method(
            device.device_id, CloudToDeviceMethod(method_name="lockDoor")
        ),
    ):
        with pytest.raises(HttpOperationError) as refused:
            call()
        response = refused.value.response
        assert response.status_code == 403
        assert response.headers.get("iothub-errorcode") == "OperationNotValidForTier"
        assert "not valid for the current IoT Hub tier (B1)" in response.json()["Message"]

