"""Module identities through the official Python SDKs (azure-iot-hub 2.7.0 IoTHubRegistryManager,
azure-iot-device 2.14.0 IoTHubModuleClient) against hub-emulator.

Run by tests/conformance/run, with the same environment as test_python_sdk.py. Each test fails
when the emulator answers a module call differently from what the SDK expects of IoT Hub.
"""

import os
import queue
import uuid

import pytest
from azure.iot.device import IoTHubModuleClient, MethodResponse
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, QuerySpecification, Twin, TwinProperties
from msrest.exceptions import HttpOperationError

SERVICE_CS = os.environ["IOTHUB_CONNECTION_STRING"]
DEVICE_CS = os.environ["IOTHUB_DEVICE_CONNECTION_STRING"]
CA_PEM = open(os.environ["IOTHUB_CA_FILE"]).read()
# The device clients' HostName (the service one may carry a port; MQTT's is fixed at 8883).
HOST = dict(part.split("=", 1) for part in DEVICE_CS.split(";"))["HostName"]


@pytest.fixture(scope="module")
def registry():
    return IoTHubRegistryManager.from_connection_string(SERVICE_CS)


@pytest.fixture
def device_id(registry):
    """A fresh device, deleted (with its modules) afterwards."""
    device_id = f"mod-dev-{uuid.uuid4().hex[:8]}"
    registry.create_device_with_sas(device_id, None, None, "enabled")
    yield device_id
    registry.delete_device(device_id)


def module_cs(device_id, module_id, key):
    return f"HostName={HOST};DeviceId={device_id};ModuleId={module_id};SharedAccessKey={key}"


def test_module_create_get_update_delete_with_etags(registry, device_id):
    created = registry.create_module_with_sas(device_id, "mod1", None, None, None)
    assert created.module_id == "mod1"
    assert created.device_id == device_id
    assert created.connection_state == "Disconnected"
    assert created.authentication.type == "sas"
    assert created.authentication.symmetric_key.primary_key
    assert created.generation_id and created.etag

    fetched = registry.get_module(device_id, "mod1")
    assert fetched.etag == created.etag
    assert [m.module_id for m in registry.get_modules(device_id)] == ["mod1"]

    # A second create is 409 ModuleAlreadyExistsOnDevice.
    with pytest.raises(HttpOperationError) as err:
        registry.create_module_with_sas(device_id, "mod1", None, None, None)
    assert err.value.response.status_code == 409
    assert err.value.response.headers["iothub-errorcode"] == "ModuleAlreadyExistsOnDevice"

    # Update with the current etag keeps the keys; a stale one is 412.
    updated = registry.update_module_with_sas(
        device_id, "mod1", "IotEdge", created.etag, None, None
    )
    assert updated.managed_by == "IotEdge"
    assert updated.authentication.symmetric_key.primary_key == created.authentication.symmetric_key.primary_key
    with pytest.raises(HttpOperationError) as err:
        registry.update_module_with_sas(device_id, "mod1", None, created.etag, None, None)
    assert err.value.response.status_code == 412

    # Delete answers 204 (the SDK accepts nothing else), then the module is 404 ModuleNotFound.
    registry.delete_module(device_id, "mod1")
    with pytest.raises(HttpOperationError) as err:
        registry.get_module(device_id, "mod1")
    assert err.value.response.status_code == 404
    assert err.value.response.headers["iothub-errorcode"] == "ModuleNotFound"


def test_module_twin_get_and_update(registry, device_id):
    registry.create_module_with_sas(device_id, "mod1", None, None, None)
    twin = registry.get_module_twin(device_id, "mod1")
    assert twin.device_id == device_id
    assert twin.module_id == "mod1"
    assert twin.properties.desired["$version"] == 1
    updated = registry.update_module_twin(
        device_id,
        "mod1",
        Twin(tags={"site": "a"}, properties=TwinProperties(desired={"rate": 5})),
        twin.etag,
    )
    assert updated.tags == {"site": "a"}
    assert updated.properties.desired["rate"] == 5
    assert updated.properties.desired["$version"] == 2
    with pytest.raises(HttpOperationError) as err:
        registry.update_module_twin(device_id, "mod1", Twin(tags={"site": "b"}), twin.etag)
    assert err.value.response.status_code == 412

    rows = registry.query_iot_hub(
        QuerySpecification(query=f"SELECT * FROM devices.modules WHERE deviceId = '{device_id}'")
    )
    assert [(r.device_id, r.module_id) for r in rows.items] == [(device_id, "mod1")]


def test_module_client_answers_a_module_method_and_gets_its_desired_patches(registry, device_id):
    module = registry.create_module_with_sas(device_id, "filter", None, None, None)
    client = IoTHubModuleClient.create_from_connection_string(
        module_cs(device_id, "filter", module.authentication.symmetric_key.primary_key),
        server_verification_cert=CA_PEM,
    )
    patches = queue.Queue()

    def on_method(request):
        client.send_method_response(
            MethodResponse.create_from_method_request(request, 200, {"module": "filter", "got": request.payload})
        )

    client.on_method_request_received = on_method
    client.on_twin_desired_properties_patch_received = patches.put
    client.connect()
    try:
        result = registry.invoke_device_module_method(
            device_id,
            "filter",
            CloudToDeviceMethod(method_name="flush", payload={"n": 3}, response_timeout_in_seconds=30),
        )
        assert result.status == 200
        assert result.payload == {"module": "filter", "got": {"n": 3}}

        assert registry.get_module(device_id, "filter").connection_state == "Connected"

        registry.update_module_twin(device_id, "filter", Twin(properties=TwinProperties(desired={"rate": 9})))
        patch = patches.get(timeout=10)
        assert patch["rate"] == 9 and patch["$version"] == 2

        twin = client.get_twin()
        assert twin["desired"]["rate"] == 9
        client.patch_twin_reported_properties({"applied": 9})
        assert registry.get_module_twin(device_id, "filter").properties.reported["applied"] == 9
    finally:
        client.shutdown()
