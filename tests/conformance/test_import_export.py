"""Import and export jobs through the official Python service SDK (azure-iot-hub's
IoTHubJobManager, with IoTHubConfigurationManager for includeConfigurations), against a real Azure Storage emulator (Azurite, from npm), with the blobs read
and written by the official azure-storage-blob SDK.

This file starts its own Azurite (target/conformance/node_modules, or AZURITE_BLOB) and its own
in-memory hubs on ephemeral ports (HUB_BIN, else target/debug/hub-emulator), so it runs alone too:
target/conformance/venv/bin/python -m pytest tests/conformance/test_import_export.py
"""

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from azure.iot.hub import IoTHubConfigurationManager, IoTHubJobManager, IoTHubRegistryManager
from azure.iot.hub.models import (Configuration, ConfigurationContent, ConfigurationMetrics, JobProperties,
                                  Twin)
from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas
from msrest.exceptions import HttpOperationError

ROOT = pathlib.Path(__file__).resolve().parents[2]
HUB_BIN = os.environ.get("HUB_BIN", str(ROOT / "target" / "debug" / "hub-emulator"))
AZURITE_BLOB = os.environ.get(
    "AZURITE_BLOB", str(ROOT / "target" / "conformance" / "node_modules" / ".bin" / "azurite-blob"))
# Azurite's well-known development account (Microsoft Learn, "Use the Azurite emulator").
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def blob_service():
    assert os.path.exists(AZURITE_BLOB), (
        f"{AZURITE_BLOB} is missing: tests/conformance/run installs Azurite (npm ci in target/conformance)")
    location = tempfile.mkdtemp(prefix="azurite-")
    port = free_port()
    proc = subprocess.Popen(
        [AZURITE_BLOB, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", location,
         "--silent", "--skipApiVersionCheck", "--disableTelemetry"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_for(up, what="Azurite to listen")
    endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
    yield BlobServiceClient(account_url=endpoint, credential={"account_name": ACCOUNT, "account_key": ACCOUNT_KEY})
    proc.terminate()
    proc.wait(20)
    shutil.rmtree(location, ignore_errors=True)


def container_sas_uri(service, name):
    """A new container and its SAS URI, as a user gives IoT Hub one (read, write, delete, list)."""
    service.create_container(name)
    sas = generate_container_sas(
        account_name=ACCOUNT, container_name=name, account_key=ACCOUNT_KEY,
        permission=ContainerSasPermissions(read=True, write=True, delete=True, list=True),
        expiry=datetime.now(timezone.utc) + timedelta(hours=1))
    return f"{service.url.rstrip('/')}/{name}?{sas}"


def start_hub(ca_from=None):
    data_dir = tempfile.mkdtemp(prefix="import-export-hub-")
    if ca_from:
        # The same CA as the first hub (two CAs of one name would confuse OpenSSL's chain
        # building), so one REQUESTS_CA_BUNDLE trusts both.
        for name in ("ca.pem", "ca-key.pem"):
            shutil.copy(os.path.join(ca_from, name), data_dir)
    proc = subprocess.Popen(
        [HUB_BIN, "--in-memory", "--data-dir", data_dir, "--mqtt-port", "0", "--https-port", "0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=open(os.path.join(data_dir, "hub.log"), "w"), text=True)
    found = {}
    for line in proc.stdout:
        line = line.strip()
        if "=" in line and line.startswith("IOTHUB_"):
            key, value = line.split("=", 1)
            found[key] = value
        if line == "hub-emulator ready":
            break
    assert "IOTHUB_CONNECTION_STRING" in found, f"the hub did not start: {found}"
    found["data_dir"] = data_dir
    return proc, found


@pytest.fixture(scope="module")
def hubs():
    """Two fresh hubs with one CA (the source and an empty target)."""
    source, source_env = start_hub()
    target, target_env = start_hub(ca_from=source_env["data_dir"])
    saved = os.environ.get("REQUESTS_CA_BUNDLE")
    os.environ["REQUESTS_CA_BUNDLE"] = source_env["IOTHUB_CA_FILE"]
    yield source_env["IOTHUB_CONNECTION_STRING"], target_env["IOTHUB_CONNECTION_STRING"]
    if saved is None:
        os.environ.pop("REQUESTS_CA_BUNDLE", None)
    else:
        os.environ["REQUESTS_CA_BUNDLE"] = saved
    for proc in (source, target):
        proc.terminate()
        proc.wait(20)
    for env in (source_env, target_env):
        shutil.rmtree(env["data_dir"], ignore_errors=True)


def run_job(manager, properties, timeout=60):
    job = manager.create_import_export_job(properties)
    assert job.status in ("enqueued", "running", "completed"), job.status
    done = wait_for(lambda: (lambda j: j if j.status in ("completed", "failed", "cancelled") else None)(
        manager.get_import_export_job(job.job_id)), timeout=timeout, what=f"job {job.job_id} to end")
    return done


def blob_lines(service, container, name):
    text = service.get_blob_client(container, name).download_blob().readall().decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_export_then_import_into_a_fresh_hub_reproduces_the_registry(hubs, blob_service):
    source_cs, target_cs = hubs
    source = IoTHubRegistryManager.from_connection_string(source_cs)
    ids = [f"exported-{n}-{uuid.uuid4().hex[:6]}" for n in range(5)]
    for n, device_id in enumerate(ids):
        source.create_device_with_sas(device_id, None, None, "enabled" if n else "disabled")
        twin = source.get_twin(device_id)
        source.update_twin(device_id, Twin(tags={"floor": n}, properties={"desired": {"setpoint": 20 + n}}), twin.etag)
    # A module identity travels with its device, on its own line.
    source.create_module_with_sas(ids[1], "thermostat", None, None, None)
    module_twin = source.get_module_twin(ids[1], "thermostat")
    source.update_module_twin(ids[1], "thermostat", Twin(tags={"kind": "module"}), module_twin.etag)
    container = f"registry-{uuid.uuid4().hex[:8]}"
    uri = container_sas_uri(blob_service, container)

    export = run_job(IoTHubJobManager.from_connection_string(source_cs),
                     JobProperties(type="export", output_blob_container_uri=uri, exclude_keys_in_export=False))
    assert export.status == "completed", export.failure_reason
    assert export.progress == 100
    exported = blob_lines(blob_service, container, "devices.txt")
    lines = {line["id"]: line for line in exported if "moduleId" not in line}
    module_lines = [line for line in exported if line.get("moduleId") == "thermostat"]
    assert len(module_lines) == 1 and module_lines[0]["id"] == ids[1], module_lines
    assert module_lines[0]["tags"] == {"kind": "module"}
    assert set(ids) <= set(lines), "every device is exported, one JSON per line"
    first = lines[ids[0]]
    assert first["status"] == "disabled"
    assert first["authentication"]["symmetricKey"]["primaryKey"] == source.get_device(ids[0]).authentication.symmetric_key.primary_key
    assert lines[ids[3]]["tags"] == {"floor": 3}
    assert lines[ids[3]]["properties"]["desired"]["setpoint"] == 23

    imported = run_job(IoTHubJobManager.from_connection_string(target_cs),
                       JobProperties(type="import", input_blob_container_uri=uri, output_blob_container_uri=uri))
    assert imported.status == "completed", imported.failure_reason
    target = IoTHubRegistryManager.from_connection_string(target_cs)
    for n, device_id in enumerate(ids):
        before, after = source.get_device(device_id), target.get_device(device_id)
        assert after.status == before.status
        assert after.authentication.symmetric_key.primary_key == before.authentication.symmetric_key.primary_key
        assert after.authentication.symmetric_key.secondary_key == before.authentication.symmetric_key.secondary_key
        twin = target.get_twin(device_id)
        assert twin.tags == {"floor": n}
        assert twin.properties.desired["setpoint"] == 20 + n
    module_before = source.get_module(ids[1], "thermostat")
    module_after = target.get_module(ids[1], "thermostat")
    assert module_after.authentication.symmetric_key.primary_key == module_before.authentication.symmetric_key.primary_key
    assert target.get_module_twin(ids[1], "thermostat").tags == {"kind": "module"}
    assert blob_lines(blob_service, container, "importErrors.log") == []


def test_configurations_travel_with_include_configurations(hubs, blob_service):
    source_cs, target_cs = hubs
    source = IoTHubRegistryManager.from_connection_string(source_cs)
    device_id = f"configured-{uuid.uuid4().hex[:6]}"
    source.create_device_with_sas(device_id, None, None, "enabled")
    source.update_twin(device_id, Twin(tags={"ring": "canary"}), "*")
    configuration_id = f"fw-{uuid.uuid4().hex[:6]}"
    created = IoTHubConfigurationManager.from_connection_string(source_cs).create_configuration(Configuration(
        id=configuration_id, target_condition="tags.ring='canary'", priority=7, labels={"team": "fw"},
        content=ConfigurationContent(device_content={"properties.desired.firmware": {"version": "2.1"}}),
        metrics=ConfigurationMetrics(queries={"updated": "SELECT deviceId FROM devices WHERE properties.reported.firmware.version = '2.1'"})))
    container = f"with-configurations-{uuid.uuid4().hex[:8]}"
    uri = container_sas_uri(blob_service, container)

    export = run_job(IoTHubJobManager.from_connection_string(source_cs),
                     JobProperties(type="export", output_blob_container_uri=uri, include_configurations=True))
    assert export.status == "completed", export.failure_reason
    assert export.configurations_blob_name == "configurations.txt"
    exported = {line["id"]: line for line in blob_lines(blob_service, container, "configurations.txt")}
    assert exported[configuration_id]["targetCondition"] == "tags.ring='canary'"
    assert exported[configuration_id]["etag"] == created.etag

    # Into the empty hub: the devices first, then the configuration, which reaches the twin.
    imported = run_job(IoTHubJobManager.from_connection_string(target_cs),
                       JobProperties(type="import", input_blob_container_uri=uri, output_blob_container_uri=uri,
                                     include_configurations=True))
    assert imported.status == "completed", imported.failure_reason
    assert blob_lines(blob_service, container, "importErrors.log") == []
    target_configurations = IoTHubConfigurationManager.from_connection_string(target_cs)
    copy = target_configurations.get_configuration(configuration_id)
    assert copy.priority == 7 and copy.labels == {"team": "fw"}
    assert copy.content.device_content == {"properties.desired.firmware": {"version": "2.1"}}
    assert copy.metrics.queries["updated"].startswith("SELECT deviceId")
    target = IoTHubRegistryManager.from_connection_string(target_cs)
    twin = wait_for(lambda: (lambda t: t if t.properties.desired.get("firmware") == {"version": "2.1"} else None)(
        target.get_twin(device_id)), what="the imported configuration to reach the twin")
    assert twin.tags == {"ring": "canary"}

    # A line with the one mode and the target's etag updates the configuration; the exported
    # line after it carries an etag that no longer matches, so createOrUpdateIfMatchETag leaves
    # the configuration alone and logs why; any other mode is refused for its line.
    lines = [
        json.dumps({"id": configuration_id, "importMode": "createOrUpdateIfMatchETag",
                    "etag": target_configurations.get_configuration(configuration_id).etag,
                    "targetCondition": "tags.ring='canary'", "priority": 9,
                    "content": exported[configuration_id]["content"]}),
        json.dumps({**exported[configuration_id], "priority": 8}),
        json.dumps({"id": "other", "importMode": "delete"}),
    ]
    again = f"configurations-again-{uuid.uuid4().hex[:8]}"
    again_uri = container_sas_uri(blob_service, again)
    blob_service.get_blob_client(again, "devices.txt").upload_blob("")
    blob_service.get_blob_client(again, "fleet.jsonl").upload_blob("\n".join(lines))
    job = run_job(IoTHubJobManager.from_connection_string(target_cs),
                  JobProperties(type="import", input_blob_container_uri=again_uri, output_blob_container_uri=again_uri,
                                include_configurations=True, configurations_blob_name="fleet.jsonl"))
    assert job.status == "completed", job.failure_reason
    errors = blob_lines(blob_service, again, "importErrors.log")
    assert len(errors) == 2, errors
    assert errors[0]["errorCode"] == "PreconditionFailed" and "line 2 of fleet.jsonl" in errors[0]["errorStatus"], errors
    assert "line 3" in errors[1]["errorStatus"] and "createOrUpdateIfMatchETag" in errors[1]["errorStatus"], errors
    assert target_configurations.get_configuration(configuration_id).priority == 9
    with pytest.raises(HttpOperationError):
        target_configurations.get_configuration("other")


def test_an_export_can_leave_the_keys_out(hubs, blob_service):
    source_cs, _ = hubs
    container = f"nokeys-{uuid.uuid4().hex[:8]}"
    uri = container_sas_uri(blob_service, container)
    job = run_job(IoTHubJobManager.from_connection_string(source_cs),
                  JobProperties(type="export", output_blob_container_uri=uri, exclude_keys_in_export=True,
                                output_blob_name="without-keys.txt"))
    assert job.status == "completed", job.failure_reason
    lines = blob_lines(blob_service, container, "without-keys.txt")
    assert lines and all(line["authentication"]["symmetricKey"]["primaryKey"] is None for line in lines)


def test_lines_the_hub_cannot_apply_go_to_the_error_log_and_the_rest_is_imported(hubs, blob_service):
    _, target_cs = hubs
    container = f"bad-lines-{uuid.uuid4().hex[:8]}"
    uri = container_sas_uri(blob_service, container)
    good = f"good-{uuid.uuid4().hex[:6]}"
    body = "\n".join([
        json.dumps({"id": good, "importMode": "create", "tags": {"from": "file"}}),
        "{this is not json",
        json.dumps({"id": "never-existed", "importMode": "delete"}),
        json.dumps({"id": good, "importMode": "create"}),
    ])
    blob_service.get_blob_client(container, "devices.txt").upload_blob(body)
    job = run_job(IoTHubJobManager.from_connection_string(target_cs),
                  JobProperties(type="import", input_blob_container_uri=uri, output_blob_container_uri=uri))
    assert job.status == "completed", job.failure_reason
    registry = IoTHubRegistryManager.from_connection_string(target_cs)
    assert registry.get_twin(good).tags == {"from": "file"}
    errors = blob_lines(blob_service, container, "importErrors.log")
    codes = sorted(e["errorCode"] for e in errors)
    assert codes == ["ArgumentInvalid", "DeviceAlreadyExists", "DeviceNotFound"], errors
    assert any("line 2" in e["errorStatus"] for e in errors), errors


class Blackhole:
    """A storage endpoint that accepts connections and never answers: a job writing to it stays
    running until it is cancelled."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self):
        for conn in self.held:
            conn.close()
        self.sock.close()


def test_one_job_at_a_time_and_cancel(hubs):
    source_cs, _ = hubs
    manager = IoTHubJobManager.from_connection_string(source_cs)
    hole = Blackhole()
    try:
        stuck = manager.create_import_export_job(JobProperties(
            type="export", output_blob_container_uri=f"http://127.0.0.1:{hole.port}/{ACCOUNT}/c?sig=secret"))
        wait_for(lambda: manager.get_import_export_job(stuck.job_id).status == "running", what="the job running")
        with pytest.raises(HttpOperationError) as refused:
            manager.create_import_export_job(JobProperties(
                type="export", output_blob_container_uri=f"http://127.0.0.1:{hole.port}/{ACCOUNT}/c?sig=x"))
        assert refused.value.response.status_code == 403
        assert "JobQuotaExceeded" in refused.value.response.text
        assert stuck.job_id in refused.value.response.text
        manager.cancel_import_export_job(stuck.job_id)
        assert manager.get_import_export_job(stuck.job_id).status == "cancelled"
        listed = [job.job_id for job in manager.get_import_export_jobs()]
        assert stuck.job_id in listed
    finally:
        hole.close()


def test_an_unreachable_container_fails_the_job_without_quoting_its_sas(hubs):
    source_cs, _ = hubs
    port = free_port()  # nothing listens there
    job = run_job(IoTHubJobManager.from_connection_string(source_cs), JobProperties(
        type="export", output_blob_container_uri=f"http://127.0.0.1:{port}/{ACCOUNT}/c?sig=topsecret"))
    assert job.status == "failed"
    assert "127.0.0.1" in job.failure_reason and "topsecret" not in job.failure_reason, job.failure_reason


def test_a_job_without_a_container_is_refused_with_400(hubs):
    source_cs, _ = hubs
    with pytest.raises(HttpOperationError) as refused:
        IoTHubJobManager.from_connection_string(source_cs).create_import_export_job(JobProperties(type="import"))
    assert refused.value.response.status_code == 400
    assert "inputBlobContainerUri" in refused.value.response.text
