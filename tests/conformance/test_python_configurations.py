"""Automatic device configurations through the official Python SDKs (azure-iot-hub 2.7.0
IoTHubConfigurationManager and IoTHubRegistryManager, azure-iot-device 2.14.0 IoTHubDeviceClient)
against hub-emulator.

Run by tests/conformance/run, with the same environment as test_python_sdk.py. Each test fails
when the emulator answers a configuration call differently from what the SDK expects of IoT Hub
(the SDK accepts 200/201 for PUT, 204 for DELETE, and sends its etag unquoted in If-Match).
Every configuration here targets a tag unique to the test, so the shared hub's other devices are
never touched.
"""

import os
import queue
import time
import uuid

import pytest
from azure.iot.device import IoTHubDeviceClient
from azure.iot.hub import IoTHubConfigurationManager, IoTHubRegistryManager
from azure.iot.hub.models import (
    Configuration,
    ConfigurationContent,
    ConfigurationMetrics,
    ConfigurationQueriesTestInput,
    Twin,
)
from msrest.exceptions import HttpOperationError

SERVICE_CS = os.environ["IOTHUB_CONNECTION_STRING"]
DEVICE_CS = os.environ["IOTHUB_DEVICE_CONNECTION_STRING"]
CA_PEM = open(os.environ["IOTHUB_CA_FILE"]).read()
HOST = dict(part.split("=", 1) for part in DEVICE_CS.split(";"))["HostName"]


@pytest.fixture(scope="module")
def configurations():
    return IoTHubConfigurationManager.from_connection_string(SERVICE_CS)


@pytest.fixture(scope="module")
def registry():
    return IoTHubRegistryManager.from_connection_string(SERVICE_CS)


@pytest.fixture
def fleet_tag():
    return f"cfg{uuid.uuid4().hex[:8]}"


def configuration(config_id, fleet_tag, settings, priority=10):
    return Configuration(
        id=config_id,
        schema_version="1.0",
        labels={"purpose": "conformance"},
        content=ConfigurationContent(device_content={"properties.desired.settings": settings}),
        target_condition=f"tags.fleet='{fleet_tag}'",
        priority=priority,
        metrics=ConfigurationMetrics(
            queries={
                "reportedOk": "SELECT deviceId FROM devices "
                f"WHERE tags.fleet='{fleet_tag}' AND properties.reported.settingsApplied = true"
            }
        ),
    )


def wait_for(what, probe, timeout=15):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def twin_configurations(registry, device_id):
    """The twin's `configurations` section, which the SDK's Twin model does not carry: read
    from the wire through the SDK's own protocol layer."""
    raw = registry.protocol.devices.get_twin(device_id, raw=True)
    return raw.response.json().get("configurations", {})


def tagged_device(registry, fleet_tag):
    device_id = f"cfg-dev-{uuid.uuid4().hex[:8]}"
    device = registry.create_device_with_sas(device_id, None, None, "enabled")
    registry.update_twin(device_id, Twin(tags={"fleet": fleet_tag}), "*")
    return device_id, device.authentication.symmetric_key.primary_key


def test_create_get_list_update_delete_with_etags(configurations, fleet_tag):
    config_id = f"conf-{uuid.uuid4().hex[:8]}"
    created = configurations.create_configuration(configuration(config_id, fleet_tag, {"rate": 1}))
    try:
        assert created.id == config_id
        assert created.etag
        assert created.priority == 10
        assert created.content.device_content == {"properties.desired.settings": {"rate": 1}}
        assert created.created_time_utc is not None

        fetched = configurations.get_configuration(config_id)
        assert fetched.etag == created.etag
        assert fetched.labels == {"purpose": "conformance"}
        assert config_id in [c.id for c in configurations.get_configurations(100)]

        # A second create of the same id is 409.
        with pytest.raises(HttpOperationError) as err:
            configurations.create_configuration(configuration(config_id, fleet_tag, {"rate": 1}))
        assert err.value.response.status_code == 409

        # The SDK sends the etag as given (unquoted); the hub takes it and changes the etag.
        fetched.priority = 20
        updated = configurations.update_configuration(fetched, fetched.etag)
        assert updated.priority == 20
        assert updated.etag != created.etag
        # The stale etag is now 412, both for an update and a delete.
        fetched.priority = 30
        with pytest.raises(HttpOperationError) as err:
            configurations.update_configuration(fetched, created.etag)
        assert err.value.response.status_code == 412
        with pytest.raises(HttpOperationError) as err:
            configurations.delete_configuration(config_id, created.etag)
        assert err.value.response.status_code == 412

        # Content is immutable after creation: IoT Hub answers 400.
        changed = configurations.get_configuration(config_id)
        changed.content = ConfigurationContent(device_content={"properties.desired.settings": {"rate": 2}})
        with pytest.raises(HttpOperationError) as err:
            configurations.update_configuration(changed, "*")
        assert err.value.response.status_code == 400
    finally:
        configurations.delete_configuration(config_id)
    with pytest.raises(HttpOperationError) as err:
        configurations.get_configuration(config_id)
    assert err.value.response.status_code == 404


def test_test_configuration_queries_names_the_broken_query(configurations):
    ok = configurations.test_configuration_queries(
        ConfigurationQueriesTestInput(
            target_condition="tags.fleet='x'",
            custom_metric_queries={"good": "SELECT deviceId FROM devices WHERE tags.fleet='x'"},
        )
    )
    assert not ok.target_condition_error
    assert not ok.custom_metric_query_errors

    bad = configurations.test_configuration_queries(
        ConfigurationQueriesTestInput(
            target_condition="tags.fleet=",
            custom_metric_queries={"broken": "SELECT FROM"},
        )
    )
    assert bad.target_condition_error
    assert "broken" in bad.custom_metric_query_errors


def test_a_device_that_comes_to_match_gets_the_content_and_is_counted(configurations, registry, fleet_tag):
    config_id = f"conf-{uuid.uuid4().hex[:8]}"
    configurations.create_configuration(configuration(config_id, fleet_tag, {"rate": 7}))
    device_id = None
    client = None
    try:
        # The device is created after the configuration, and connected before it is tagged:
        # it sees the configuration's content arrive as a desired-property patch.
        device_id = f"cfg-dev-{uuid.uuid4().hex[:8]}"
        device = registry.create_device_with_sas(device_id, None, None, "enabled")
        key = device.authentication.symmetric_key.primary_key
        client = IoTHubDeviceClient.create_from_connection_string(
            f"HostName={HOST};DeviceId={device_id};SharedAccessKey={key}",
            server_verification_cert=CA_PEM,
        )
        patches = queue.Queue()
        client.on_twin_desired_properties_patch_received = patches.put
        client.connect()
        registry.update_twin(device_id, Twin(tags={"fleet": fleet_tag}), "*")

        patch = patches.get(timeout=15)
        assert patch["settings"] == {"rate": 7}
        twin = registry.get_twin(device_id)
        assert twin.properties.desired["settings"] == {"rate": 7}
        assert twin_configurations(registry, device_id)[config_id]["status"] == "Applied"

        counted = wait_for(
            "the system metrics to count the device",
            lambda: (c := configurations.get_configuration(config_id)).system_metrics.results.get("appliedCount") == 1
            and c,
        )
        assert counted.system_metrics.results["targetedCount"] == 1
        assert counted.metrics.results["reportedOk"] == 0

        # The device reports back; the custom metric counts it at the next read.
        client.patch_twin_reported_properties({"settingsApplied": True})
        wait_for(
            "the custom metric to count the device",
            lambda: configurations.get_configuration(config_id).metrics.results["reportedOk"] == 1,
        )

        # Untagged, the device no longer matches: the configuration's settings leave its twin.
        registry.update_twin(device_id, Twin(tags={"fleet": None}), "*")
        removed = patches.get(timeout=15)
        assert removed["settings"] is None
        wait_for(
            "the settings to leave the twin",
            lambda: "settings" not in registry.get_twin(device_id).properties.desired,
        )
        assert configurations.get_configuration(config_id).system_metrics.results["targetedCount"] == 0
    finally:
        if client is not None:
            client.shutdown()
        configurations.delete_configuration(config_id)
        if device_id is not None:
            registry.delete_device(device_id)


def test_the_higher_priority_wins_and_deleting_it_hands_over(configurations, registry, fleet_tag):
    low, high = f"conf-low-{uuid.uuid4().hex[:6]}", f"conf-high-{uuid.uuid4().hex[:6]}"
    device_id, _ = tagged_device(registry, fleet_tag)
    configurations.create_configuration(configuration(low, fleet_tag, {"rate": 1}, priority=1))
    configurations.create_configuration(configuration(high, fleet_tag, {"rate": 9}, priority=50))
    try:
        wait_for(
            "the high-priority configuration to win",
            lambda: registry.get_twin(device_id).properties.desired.get("settings") == {"rate": 9},
        )
        applied = twin_configurations(registry, device_id)
        assert applied[high]["status"] == "Applied"
        assert applied[low]["status"] == "Targeted"

        configurations.delete_configuration(high)
        wait_for(
            "the low-priority configuration to take over",
            lambda: registry.get_twin(device_id).properties.desired.get("settings") == {"rate": 1},
        )
    finally:
        for config_id in (low, high):
            try:
                configurations.delete_configuration(config_id)
            except HttpOperationError as err:
                assert err.response.status_code == 404
        registry.delete_device(device_id)
