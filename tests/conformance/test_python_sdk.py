"""The official Azure IoT Python SDKs (azure-iot-device 2.14.0, azure-iot-hub 2.7.0) against hub-emulator.

Run by tests/conformance/run, which starts the hub on the SDKs' fixed ports and exports
IOTHUB_CONNECTION_STRING, IOTHUB_DEVICE_CONNECTION_STRING, IOTHUB_CA_FILE and REQUESTS_CA_BUNDLE.
Each test fails when the emulator answers differently from what the SDK expects of IoT Hub.
"""

import os
import queue
import time
import uuid

import pytest
from azure.iot.device import IoTHubDeviceClient, MethodResponse
from azure.iot.hub import IoTHubJobManager, IoTHubRegistryManager
from azure.iot.hub.models import (
    CloudToDeviceMethod,
    ExportImportDevice,
    JobRequest,
    QuerySpecification,
    Twin,
    TwinProperties,
)
from iothub_mqtt import wait_for
from msrest.exceptions import HttpOperationError

SERVICE_CS = os.environ["IOTHUB_CONNECTION_STRING"]
DEVICE_CS = os.environ["IOTHUB_DEVICE_CONNECTION_STRING"]
CA_PEM = open(os.environ["IOTHUB_CA_FILE"]).read()
DEVICE_ID = "myDeviceId"




@pytest.fixture(scope="module")
def registry():
    return IoTHubRegistryManager.from_connection_string(SERVICE_CS)


@pytest.fixture(scope="module")
def device():
    """The tutorial device, connected, answering every method with its name and payload."""
    client = IoTHubDeviceClient.create_from_connection_string(DEVICE_CS, server_verification_cert=CA_PEM)
    patches = queue.Queue()
    methods = queue.Queue()

    def on_method(request):
        methods.put((request.name, request.payload))
        status = 200 if request.name != "fail" else 500
        client.send_method_response(
            MethodResponse.create_from_method_request(request, status, {"name": request.name, "got": request.payload})
        )

    client.on_method_request_received = on_method
    client.on_twin_desired_properties_patch_received = patches.put
    client.connect()
    client.patches = patches
    client.methods = methods
    yield client
    client.shutdown()


def test_device_connects_and_registry_shows_it_connected(device, registry):
    assert device.connected
    twin = wait_for(
        lambda: (t := registry.get_twin(DEVICE_ID)) and t.connection_state == "Connected" and t,
        what="connectionState Connected",
    )
    assert twin.device_id == DEVICE_ID


def test_device_gets_twin_with_versions(device):
    twin = device.get_twin()
    assert isinstance(twin["desired"]["$version"], int)
    assert isinstance(twin["reported"]["$version"], int)


def test_reported_patch_reaches_service_twin(device, registry):
    before = device.get_twin()["reported"]["$version"]
    device.patch_twin_reported_properties({"fw": "1.1", "nested": {"a": 1}})
    twin = registry.get_twin(DEVICE_ID)
    assert twin.properties.reported["fw"] == "1.1"
    assert twin.properties.reported["nested"] == {"a": 1}
    assert twin.properties.reported["$version"] == before + 1


def test_desired_patch_from_service_reaches_device(device, registry):
    while not device.patches.empty():
        device.patches.get_nowait()
    twin = registry.get_twin(DEVICE_ID)
    updated = registry.update_twin(
        DEVICE_ID, Twin(properties=TwinProperties(desired={"building": 43, "floor": 3})), twin.etag
    )
    assert updated.properties.desired["building"] == 43
    patch = device.patches.get(timeout=10)
    assert patch["building"] == 43 and patch["floor"] == 3
    assert patch["$version"] == updated.properties.desired["$version"]


def test_stale_etag_is_412(registry):
    with pytest.raises(HttpOperationError) as err:
        registry.update_twin(DEVICE_ID, Twin(tags={"a": 1}), "AAAAAAAAAAA=")
    assert err.value.response.status_code == 412
    assert err.value.response.headers["iothub-errorcode"] == "PreconditionFailed"


def test_method_round_trip_on_connected_device(device, registry):
    result = registry.invoke_device_method(
        DEVICE_ID,
        CloudToDeviceMethod(method_name="lockDoor", payload={"lockTime": "10m"}, response_timeout_in_seconds=30),
    )
    assert result.status == 200
    assert result.payload == {"name": "lockDoor", "got": {"lockTime": "10m"}}
    assert device.methods.get(timeout=5) == ("lockDoor", {"lockTime": "10m"})


def test_method_without_payload_sends_empty_string(device, registry):
    result = registry.invoke_device_method(DEVICE_ID, CloudToDeviceMethod(method_name="ping"))
    assert result.status == 200
    assert result.payload["got"] == ""


def test_device_status_is_passed_through(device, registry):
    result = registry.invoke_device_method(DEVICE_ID, CloudToDeviceMethod(method_name="fail"))
    assert result.status == 500


def test_create_get_delete_device(registry):
    device_id = f"py-{uuid.uuid4().hex[:8]}"
    created = registry.create_device_with_sas(device_id, None, None, "enabled")
    assert created.device_id == device_id
    assert created.authentication.symmetric_key.primary_key
    fetched = registry.get_device(device_id)
    assert fetched.etag == created.etag
    updated = registry.update_device_with_sas(device_id, fetched.etag, None, None, "disabled")
    assert updated.status == "disabled"
    registry.delete_device(device_id)
    with pytest.raises(HttpOperationError) as err:
        registry.get_device(device_id)
    assert err.value.response.status_code == 404
    assert "DeviceNotFound" in err.value.response.text


def test_bulk_create_update_delete_devices(registry):
    """IoTHubRegistryManager.bulk_create_or_update_devices: POST /devices, 100 devices at most."""
    ids = [f"py-bulk-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    created = registry.bulk_create_or_update_devices(
        [ExportImportDevice(id=device_id, import_mode="create", status="disabled") for device_id in ids]
    )
    assert created.is_successful is True
    assert not created.errors
    keys = {}
    for device_id in ids:
        device = registry.get_device(device_id)
        assert device.status == "disabled"
        assert device.authentication.symmetric_key.primary_key
        keys[device_id] = device.authentication.symmetric_key.primary_key
    # Per-device failures are an answer (the SDK accepts the hub's 400 here), not an exception;
    # the other devices of the call still apply.
    missing = f"py-bulk-{uuid.uuid4().hex[:8]}"
    mixed = registry.bulk_create_or_update_devices(
        [
            ExportImportDevice(id=ids[0], import_mode="create"),
            ExportImportDevice(id=missing, import_mode="delete"),
            ExportImportDevice(id=ids[1], import_mode="update", status="enabled"),
        ]
    )
    assert mixed.is_successful is False
    assert sorted((e.device_id, e.error_code) for e in mixed.errors) == sorted(
        [(ids[0], "DeviceAlreadyExists"), (missing, "DeviceNotFound")]
    )
    assert registry.get_device(ids[1]).status == "enabled"
    updated = registry.bulk_create_or_update_devices(
        [ExportImportDevice(id=device_id, import_mode="update", status="enabled") for device_id in ids]
    )
    assert updated.is_successful is True
    for device_id in ids:
        device = registry.get_device(device_id)
        assert device.status == "enabled"
        assert device.authentication.symmetric_key.primary_key == keys[device_id], "keys are kept"
    removed = registry.bulk_create_or_update_devices(
        [ExportImportDevice(id=device_id, import_mode="delete") for device_id in ids]
    )
    assert removed.is_successful is True
    for device_id in ids:
        with pytest.raises(HttpOperationError) as err:
            registry.get_device(device_id)
        assert err.value.response.status_code == 404


def test_bulk_of_more_than_100_devices_is_refused_whole(registry):
    prefix = f"py-many-{uuid.uuid4().hex[:6]}"
    devices = [ExportImportDevice(id=f"{prefix}-{i}", import_mode="create") for i in range(101)]
    # The SDK reads any 400 of this call as a BulkRegistryOperationResult; a refusal of the
    # whole call is IoT Hub's classic error body, so the result holds neither success nor errors.
    result = registry.bulk_create_or_update_devices(devices)
    assert not result.is_successful
    assert not result.errors
    with pytest.raises(HttpOperationError) as err:
        registry.get_device(f"{prefix}-0")
    assert err.value.response.status_code == 404


def test_method_on_disconnected_device_is_404103(registry):
    device_id = f"py-off-{uuid.uuid4().hex[:8]}"
    registry.create_device_with_sas(device_id, None, None, "enabled")
    try:
        started = time.monotonic()
        with pytest.raises(HttpOperationError) as err:
            registry.invoke_device_method(
                device_id, CloudToDeviceMethod(method_name="lockDoor", connect_timeout_in_seconds=1)
            )
        assert err.value.response.status_code == 404
        assert "404103" in err.value.response.text
        assert time.monotonic() - started >= 0.9, "the hub must wait for the connect timeout"
    finally:
        registry.delete_device(device_id)


def test_query_pages_through_more_rows_than_one_page(registry):
    prefix = f"pyq-{uuid.uuid4().hex[:6]}"
    ids = [f"{prefix}-{i:03}" for i in range(105)]
    for device_id in ids:
        registry.create_device_with_sas(device_id, None, None, "enabled")
    try:
        query = QuerySpecification(query=f"SELECT * FROM devices WHERE STARTSWITH(deviceId, '{prefix}')")
        seen, token, pages = [], None, 0
        while True:
            page = registry.query_iot_hub(query, token, 100)
            pages += 1
            assert page.type == "Twin"
            seen.extend(twin.device_id for twin in page.items)
            token = page.continuation_token
            if not token:
                break
        assert pages == 2
        assert sorted(seen) == ids
        count = registry.query_iot_hub(
            QuerySpecification(query=f"SELECT COUNT() AS n FROM devices WHERE STARTSWITH(deviceId, '{prefix}')")
        )
        assert count.type == "Raw"
        # The SDK deserializes every row as a Twin; an aggregate's columns land in additional_properties.
        assert [row.additional_properties for row in count.items] == [{"n": 105}]
    finally:
        for device_id in ids:
            registry.delete_device(device_id)


def test_scheduled_jobs_run_and_cancel(device):
    jobs = IoTHubJobManager.from_connection_string(SERVICE_CS)
    job_id = f"py-job-{uuid.uuid4().hex[:8]}"
    request = JobRequest(
        job_id=job_id,
        type="scheduleDeviceMethod",
        cloud_to_device_method=CloudToDeviceMethod(
            method_name="lockDoor", payload={"lockTime": "10m"}, response_timeout_in_seconds=30
        ),
        query_condition=f"deviceId IN ['{DEVICE_ID}']",
        start_time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        max_execution_time_in_seconds=60,
    )
    created = jobs.create_scheduled_job(job_id, request)
    assert created.job_id == job_id
    job = wait_for(
        lambda: (j := jobs.get_scheduled_job(job_id)) and j.status == "completed" and j, what="job completed"
    )
    assert job.device_job_statistics.succeeded_count == 1
    assert job.end_time is not None

    future_id = f"py-job-{uuid.uuid4().hex[:8]}"
    future = JobRequest(
        job_id=future_id,
        type="scheduleUpdateTwin",
        update_twin=Twin(etag="*", properties=TwinProperties(desired={"later": True})),
        query_condition="*",
        start_time="2099-01-01T00:00:00.000Z",
        max_execution_time_in_seconds=60,
    )
    assert jobs.create_scheduled_job(future_id, future).status == "scheduled"
    cancelled = jobs.cancel_scheduled_job(future_id)
    assert cancelled.status == "cancelled"
    assert jobs.get_scheduled_job(future_id).status == "cancelled"


def _device_with_key(registry, prefix):
    device_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    created = registry.create_device_with_sas(device_id, None, None, "enabled")
    return device_id, created.authentication.symmetric_key.primary_key


def _answer_one_method(client):
    def on_method(request):
        client.send_method_response(MethodResponse.create_from_method_request(request, 200, {"via": request.name}))

    client.on_method_request_received = on_method


@pytest.mark.parametrize(
    "how",
    ["websockets", "gateway_host_name"],
)
def test_other_ways_to_connect(registry, how):
    """MQTT over WebSocket (port 443), and a real-looking HostName redirected with GatewayHostName."""
    device_id, key = _device_with_key(registry, f"py-{how[:2]}")
    if how == "websockets":
        cs = f"HostName=localhost;DeviceId={device_id};SharedAccessKey={key}"
        client = IoTHubDeviceClient.create_from_connection_string(cs, server_verification_cert=CA_PEM, websockets=True)
    else:
        cs = f"HostName=myhub.azure-devices.net;DeviceId={device_id};SharedAccessKey={key};GatewayHostName=localhost"
        client = IoTHubDeviceClient.create_from_connection_string(cs, server_verification_cert=CA_PEM)
    try:
        _answer_one_method(client)
        client.connect()
        result = registry.invoke_device_method(device_id, CloudToDeviceMethod(method_name="hello"))
        assert result.status == 200 and result.payload == {"via": "hello"}
    finally:
        client.shutdown()
        registry.delete_device(device_id)


def test_wrong_key_is_refused(registry):
    from azure.iot.device.exceptions import CredentialError

    device_id, _ = _device_with_key(registry, "py-bad")
    cs = f"HostName=localhost;DeviceId={device_id};SharedAccessKey=d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk="
    client = IoTHubDeviceClient.create_from_connection_string(cs, server_verification_cert=CA_PEM)
    try:
        with pytest.raises(CredentialError):
            client.connect()
    finally:
        client.shutdown()
        registry.delete_device(device_id)
