"""A long-lived official Python device (azure-iot-device 2.14.0) through its lifecycle: SAS token
renewals, a hub restart and a hub crash (kill -9), with the SDK's own reconnect doing the rest.

The SDK renews its token DEFAULT_TOKEN_UPDATE_MARGIN = 120 s before expiry
(common/pipeline/pipeline_stages_base.py, SasTokenStage) by disconnecting and connecting again
with CleanSession=0, and it never subscribes again: its methods and desired-property patches work
after a renewal or a reconnect only if the hub kept the MQTT session. sastoken_ttl=135 gives a
renewal 15 s after the client is made, then every 15 s (a ttl under 120 would renew at once, in a
loop). The tests share one device session and run in file order, each step inside the 15 s between
two renewals: connect; renewal 1; hub restart (SIGTERM); renewal 2; hub kill -9. After each step
the device answers a direct method and receives a desired patch sent with azure-iot-hub.

Run by tests/conformance/run, after the other files (it restarts the hub through HUB_CTL).
"""

import queue
import time

import pytest
from azure.iot.device import IoTHubDeviceClient, MethodResponse
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import Twin, TwinProperties

from iothub_mqtt import CA_FILE, SERVICE_CS, hub_connects, hubctl, invoke_method, new_device, wait_for

TTL = 135
RENEWAL_MARGIN = 120  # SasTokenStage.DEFAULT_TOKEN_UPDATE_MARGIN in azure-iot-device 2.14.0


@pytest.fixture(scope="module")
def registry():
    return IoTHubRegistryManager.from_connection_string(SERVICE_CS)


class Device:
    def __init__(self, registry):
        self.registry = registry
        self.device_id, key = new_device(registry, "py-life")
        self.client = IoTHubDeviceClient.create_from_connection_string(
            f"HostName=localhost;DeviceId={self.device_id};SharedAccessKey={key}",
            server_verification_cert=open(CA_FILE).read(),
            sastoken_ttl=TTL,
            connection_retry_interval=1,
        )
        self.made = time.monotonic()
        self.patches = queue.Queue()
        self.client.on_method_request_received = self._on_method
        self.client.on_twin_desired_properties_patch_received = self.patches.put

    def _on_method(self, request):
        self.client.send_method_response(
            MethodResponse.create_from_method_request(request, 200, {"answered": request.name})
        )

    def wait_new_connection(self, since, timeout, what):
        """Waits until the hub has accepted a CONNECT from the device after `since` of them."""
        wait_for(lambda: hub_connects(self.device_id) > since, timeout, what)
        wait_for(lambda: self.client.connected, 10, f"the SDK connected again after {what}")

    def check(self, step):
        """A direct method answered and a desired patch received; both reported if both fail."""
        problems = []
        status, payload = invoke_method(self.registry, self.device_id, step, connect_timeout=3)
        if (status, payload) != (200, {"answered": step}):
            problems.append(f"direct method {step}: {status} {payload}")
        while not self.patches.empty():
            self.patches.get_nowait()
        self.registry.update_twin(self.device_id, Twin(properties=TwinProperties(desired={"step": step})), "*")
        try:
            patch = self.patches.get(timeout=5)
            if patch.get("step") != step:
                problems.append(f"desired patch after {step}: got {patch}")
        except queue.Empty:
            problems.append(f"desired patch after {step}: none within 5 s")
        assert not problems, f"after {step}: " + "; ".join(problems)


@pytest.fixture(scope="module")
def device(registry):
    dev = Device(registry)
    dev.client.connect()
    yield dev
    dev.client.shutdown()
    registry.delete_device(dev.device_id)


def _wait_renewal(device, number):
    since = hub_connects(device.device_id)
    due = device.made + number * (TTL - RENEWAL_MARGIN)
    device.wait_new_connection(since, max(0, due - time.monotonic()) + 15, f"SAS renewal {number}")


def test_python_device_works_after_connect(device):
    assert hub_connects(device.device_id) == 1
    device.check("connected")


def test_python_device_works_after_first_sas_renewal(device):
    _wait_renewal(device, 1)
    device.check("renewal-1")


def test_python_device_works_after_hub_restart(device):
    since = hub_connects(device.device_id)
    hubctl("restart")
    device.wait_new_connection(since, 20, "the hub's restart")
    device.check("restart")


def test_python_device_works_after_second_sas_renewal(device):
    _wait_renewal(device, 2)
    device.check("renewal-2")


def test_python_device_works_after_hub_kill_9(device):
    since = hub_connects(device.device_id)
    hubctl("kill-restart")
    device.wait_new_connection(since, 20, "the hub's kill -9 and restart")
    device.check("kill-9")
