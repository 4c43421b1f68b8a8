"""The official Python SDKs' side of scripts/sdk-side-by-side (run by it, with the conformance venv).

  fanout  IDS_FILE THREADS   invoke lockDoor on every device with azure-iot-hub's
                             invoke_device_method from a thread pool (the tutorial's call, scaled);
                             prints one JSON line: devices, seconds, devicesPerSecond, failed
  job     CONDITION          create a scheduleDeviceMethod job with IoTHubJobManager, poll it every
                             POLL_MS until it ends; prints seconds to seen-completed and the lag
                             behind the hub's endTime
  ours-job SCHEDULE_JOB CONDITION
                             the same job created and followed by `schedule-job method --wait`;
                             the lag is from the hub's endTime to schedule-job's `done` line
  register PREFIX N          registers N devices; prints "id key" lines (for the Node side)
  memory  CLIENTS            connect CLIENTS azure-iot-device clients in this process; prints the
                             resident memory they added, per client

The hub is given by IOTHUB_CONNECTION_STRING (service) and REQUESTS_CA_BUNDLE / IOTHUB_CA_FILE.
"""

import concurrent.futures
import datetime
import json
import os
import subprocess
import sys
import threading
import time
import uuid

from azure.iot.hub import IoTHubJobManager, IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, JobRequest

SERVICE_CS = os.environ["IOTHUB_CONNECTION_STRING"]
POLL_MS = int(os.environ.get("POLL_MS", "100"))


def rss_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def parse_time(text):
    if isinstance(text, datetime.datetime):
        return text
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def fanout(ids_file, threads):
    ids = [line.strip() for line in open(ids_file) if line.strip()]
    local = threading.local()

    def call(device_id):
        # One registry manager per thread: the fairest setup for the SDK (no shared session).
        if not hasattr(local, "registry"):
            local.registry = IoTHubRegistryManager.from_connection_string(SERVICE_CS)
        result = local.registry.invoke_device_method(
            device_id,
            CloudToDeviceMethod(
                method_name="lockDoor", payload={"lockTime": "10m"}, response_timeout_in_seconds=30
            ),
        )
        return result.status == 200

    # Both sides' clocks include opening their connections (schedule-job's starts when it begins
    # invoking, after its device query).
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        started = time.monotonic()
        outcomes = list(pool.map(call, ids))
        seconds = time.monotonic() - started
    failed = outcomes.count(False)
    print(json.dumps({
        "devices": len(ids), "seconds": seconds, "devicesPerSecond": len(ids) / seconds,
        "failed": failed,
    }))


def job(condition):
    jobs = IoTHubJobManager.from_connection_string(SERVICE_CS)
    job_id = f"py-bench-{uuid.uuid4().hex[:8]}"
    request = JobRequest(
        job_id=job_id,
        type="scheduleDeviceMethod",
        cloud_to_device_method=CloudToDeviceMethod(
            method_name="lockDoor", payload={"lockTime": "10m"}, response_timeout_in_seconds=30
        ),
        start_time=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        max_execution_time_in_seconds=3600,
        query_condition=condition,
    )
    started = time.monotonic()
    jobs.create_scheduled_job(job_id, request)
    while True:
        got = jobs.get_scheduled_job(job_id)
        if got.status in ("completed", "failed", "cancelled"):
            seen = datetime.datetime.now(datetime.timezone.utc)
            seconds = time.monotonic() - started
            break
        time.sleep(POLL_MS / 1000)
    end = parse_time(got.end_time)
    print(json.dumps({
        "jobId": job_id, "status": got.status, "seconds": seconds,
        "lagBehindEndMs": (seen - end).total_seconds() * 1000,
        "engineSeconds": (end - parse_time(got.start_time)).total_seconds(),
    }))


def ours_job(schedule_job, condition):
    started = time.monotonic()
    child = subprocess.Popen(
        [schedule_job, "method", "lockDoor", "--payload", '{"lockTime":"10m"}', "--query",
         condition, "--wait", "--output", "json"],
        stdout=subprocess.PIPE, text=True,
    )
    done = None
    for line in child.stdout:
        event = json.loads(line)
        if event.get("event") == "done":
            seen = datetime.datetime.now(datetime.timezone.utc)
            seconds = time.monotonic() - started
            done = event["job"]
    child.wait()
    assert done is not None, "schedule-job printed no done event"
    end = parse_time(done["endTime"])
    print(json.dumps({
        "jobId": done["jobId"], "status": done["status"], "seconds": seconds,
        "lagBehindEndMs": (seen - end).total_seconds() * 1000,
        "engineSeconds": (end - parse_time(done["startTime"])).total_seconds(),
    }))


def register(prefix, n):
    registry = IoTHubRegistryManager.from_connection_string(SERVICE_CS)
    for i in range(n):
        created = registry.create_device_with_sas(f"{prefix}{i}", None, None, "enabled")
        print(f"{prefix}{i} {created.authentication.symmetric_key.primary_key}")


def memory(clients):
    from azure.iot.device import IoTHubDeviceClient

    registry = IoTHubRegistryManager.from_connection_string(SERVICE_CS)
    ca = open(os.environ["IOTHUB_CA_FILE"]).read()
    prefix = f"pymem-{uuid.uuid4().hex[:6]}-"
    devices = []
    for i in range(clients):
        device_id = f"{prefix}{i}"
        created = registry.create_device_with_sas(device_id, None, None, "enabled")
        devices.append((device_id, created.authentication.symmetric_key.primary_key))
    before = rss_kib()
    connected = []
    for device_id, key in devices:
        client = IoTHubDeviceClient.create_from_connection_string(
            f"HostName=localhost;DeviceId={device_id};SharedAccessKey={key}",
            server_verification_cert=ca,
        )
        client.connect()
        client.on_method_request_received = lambda request: None
        connected.append(client)
    time.sleep(2)
    after = rss_kib()
    print(json.dumps({
        "clients": clients, "rssBeforeKiB": before, "rssAfterKiB": after,
        "kibPerClient": (after - before) / clients,
    }))
    for client in connected:
        client.shutdown()
    for device_id, _ in devices:
        registry.delete_device(device_id)


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "fanout":
        fanout(rest[0], int(rest[1]))
    elif command == "job":
        job(rest[0])
    elif command == "ours-job":
        ours_job(rest[0], rest[1])
    elif command == "register":
        register(rest[0], int(rest[1]))
    elif command == "memory":
        memory(int(rest[0]))
    else:
        sys.exit(f"unknown command {command}; see the docstring")
