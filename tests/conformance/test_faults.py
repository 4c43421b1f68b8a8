"""The official Python device SDK (azure-iot-device 2.14.0) behind a fault-injecting TCP proxy: the
link is delayed, cut (reset), black-holed and stalled, and after each fault the device still
answers a direct method and gets a reported patch acknowledged (checked with azure-iot-hub).

The SDK always dials port 8883 (mqtt_transport.py: `connect(host=..., port=8883, ...)`), but it
supports proxies (`ProxyOptions`, paho-mqtt's `proxy_set` over PySocks), so the fault proxy here
is an HTTP CONNECT proxy on an ephemeral port that ignores the requested port and forwards to
the hub's. This file starts its own in-memory hub on ephemeral ports (HUB_BIN, else
target/debug/hub-emulator), so it binds neither 8883 nor 443 and runs on its own:

    target/conformance/venv/bin/python -m pytest -q tests/conformance/test_faults.py

Tests share one device and run in file order.
"""

import asyncio
import os
import pathlib
import re
import subprocess
import tempfile
import threading
import time
import uuid

import pytest
from azure.iot.device import IoTHubDeviceClient, MethodResponse, ProxyOptions
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod
from msrest.exceptions import HttpOperationError

ROOT = pathlib.Path(__file__).resolve().parents[2]
HUB_BIN = os.environ.get("HUB_BIN", str(ROOT / "target" / "debug" / "hub-emulator"))
KEEP_ALIVE = 4  # seconds: paho declares a silent link dead after 1.5 x this
RECOVERY = 40  # seconds a device may take to come back after a fault ends


class FaultProxy:
    """An HTTP CONNECT proxy on 127.0.0.1:0, run by an asyncio loop in its own thread. Each direction
    ("up": device to hub, "down": hub to device) forwards, delays, black-holes (reads and drops) or
    stalls (stops reading, keeps the socket open); cut() resets every connection."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.modes = {"up": ("forward", 0.0), "down": ("forward", 0.0)}
        self.accepted = 0
        self.connections = set()
        self.loop = asyncio.new_event_loop()
        self.changed = None
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        assert started.wait(10), "the proxy did not start"

    def _run(self, started):
        asyncio.set_event_loop(self.loop)
        self.changed = asyncio.Condition()
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()

    def set(self, direction, mode, delay=0.0):
        async def change():
            self.modes[direction] = (mode, delay)
            async with self.changed:
                self.changed.notify_all()

        asyncio.run_coroutine_threadsafe(change(), self.loop).result(5)

    def resume(self):
        self.set("up", "forward")
        self.set("down", "forward")

    def cut(self):
        def abort_all():
            for writer in list(self.connections):
                writer.transport.abort()  # close with RST, not FIN

        self.loop.call_soon_threadsafe(abort_all)

    async def _serve(self, client_reader, client_writer):
        # The CONNECT request (PySocks sends "CONNECT host:8883 HTTP/1.1", headers, blank line).
        try:
            head = await asyncio.wait_for(client_reader.readuntil(b"\r\n\r\n"), 10)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
            client_writer.close()
            return
        if not head.startswith(b"CONNECT "):
            client_writer.close()
            return
        self.accepted += 1
        hub_reader, hub_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        client_writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.connections.update((client_writer, hub_writer))
        try:
            await asyncio.gather(
                self._pump(client_reader, hub_writer, "up"),
                self._pump(hub_reader, client_writer, "down"),
            )
        finally:
            for writer in (client_writer, hub_writer):
                self.connections.discard(writer)
                writer.transport.abort()

    async def _pump(self, reader, writer, direction):
        while True:
            async with self.changed:
                await self.changed.wait_for(lambda: self.modes[direction][0] != "stall")
            try:
                chunk = await reader.read(16384)
            except (ConnectionError, OSError):
                chunk = b""
            if not chunk:
                writer.transport.abort()
                return
            mode, delay = self.modes[direction]
            if mode == "blackhole":
                continue
            if mode == "delay":
                # Latency, not a throughput cap: later chunks are delayed from their own read.
                self.loop.call_later(delay, self._write, writer, chunk)
            else:
                self._write(writer, chunk)

    @staticmethod
    def _write(writer, chunk):
        if not writer.transport.is_closing():
            writer.write(chunk)


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def hub():
    """A throwaway hub on ephemeral ports: (service connection string, CA file, MQTT port)."""
    data_dir = tempfile.mkdtemp(prefix="faults-hub-")
    proc = subprocess.Popen(
        [HUB_BIN, "--in-memory", "--data-dir", data_dir, "--mqtt-port", "0", "--https-port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=open(os.path.join(data_dir, "hub.log"), "w"),
        text=True,
    )
    found = {}
    for line in proc.stdout:
        line = line.strip()
        if "=" in line and line.startswith("IOTHUB_"):
            key, value = line.split("=", 1)
            found[key] = value
        ports = re.search(r"MQTT/TLS on [^:]+:(\d+), HTTPS on", line)
        if ports:
            found["mqtt_port"] = int(ports.group(1))
        if line == "hub-emulator ready":
            break
    assert "mqtt_port" in found, f"the hub did not start: {found}"
    # azure-iot-hub (msrest on requests) trusts REQUESTS_CA_BUNDLE; restored for the other files.
    saved = os.environ.get("REQUESTS_CA_BUNDLE")
    os.environ["REQUESTS_CA_BUNDLE"] = found["IOTHUB_CA_FILE"]
    yield found["IOTHUB_CONNECTION_STRING"], found["IOTHUB_CA_FILE"], found["mqtt_port"]
    if saved is None:
        os.environ.pop("REQUESTS_CA_BUNDLE", None)
    else:
        os.environ["REQUESTS_CA_BUNDLE"] = saved
    proc.terminate()
    proc.wait(20)


class Device:
    """An SDK device connected through the proxy, answering every method with its payload."""

    def __init__(self, hub):
        service_cs, ca_file, mqtt_port = hub
        self.registry = IoTHubRegistryManager.from_connection_string(service_cs)
        self.device_id = f"py-faults-{uuid.uuid4().hex[:8]}"
        created = self.registry.create_device_with_sas(self.device_id, None, None, "enabled")
        key = created.authentication.symmetric_key.primary_key
        self.proxy = FaultProxy(mqtt_port)
        self.client = IoTHubDeviceClient.create_from_connection_string(
            f"HostName=localhost;DeviceId={self.device_id};SharedAccessKey={key}",
            server_verification_cert=open(ca_file).read(),
            proxy_options=ProxyOptions("HTTP", "127.0.0.1", self.proxy.port),
            keep_alive=KEEP_ALIVE,
            connection_retry_interval=1,
        )
        self.client.on_method_request_received = self._on_method

    def _on_method(self, request):
        self.client.send_method_response(
            MethodResponse.create_from_method_request(request, 200, {"echo": request.payload})
        )

    def invoke(self, n, response_timeout=5):
        """(status, payload) of a direct method, or (http status, body) when the hub refuses it."""
        try:
            result = self.registry.invoke_device_method(
                self.device_id,
                CloudToDeviceMethod(
                    method_name="ping",
                    payload={"n": n},
                    response_timeout_in_seconds=response_timeout,
                    connect_timeout_in_seconds=0,
                ),
            )
            return result.status, result.payload
        except HttpOperationError as err:
            return err.response.status_code, err.response.text

    def round(self, n):
        """A method answered with its payload, a reported patch acknowledged and visible."""
        status, payload = self.invoke(n)
        assert (status, payload) == (200, {"echo": {"n": n}}), f"method {n}: {status} {payload}"
        self.client.patch_twin_reported_properties({"n": n})
        reported = self.registry.get_twin(self.device_id).properties.reported
        assert reported.get("n") == n, f"reported after {n}: {reported}"

    def recovers(self, n, what):
        """Repeats round(n) until it passes; fails after RECOVERY seconds."""
        deadline = time.monotonic() + RECOVERY
        while True:
            try:
                _wait_for(lambda: self.client.connected, max(1, deadline - time.monotonic()), what)
                self.round(n)
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


@pytest.fixture(scope="module")
def device(hub):
    dev = Device(hub)
    dev.client.connect()
    yield dev
    dev.client.shutdown()
    dev.registry.delete_device(dev.device_id)


def test_python_device_works_through_the_proxy(device):
    device.round(1)
    assert device.proxy.accepted == 1


def test_python_device_works_through_a_delayed_link(device):
    device.proxy.set("up", "delay", 0.3)
    device.proxy.set("down", "delay", 0.3)
    started = time.monotonic()
    device.round(2)
    took = time.monotonic() - started
    device.proxy.resume()
    # A method crosses the link down and back up; the reported patch does the same again.
    assert took >= 1.2, f"a round through a 0.3 s link took {took:.2f} s"
    assert device.proxy.accepted == 1, "latency alone must not cost a reconnect"


def test_python_device_reconnects_after_a_reset(device):
    device.proxy.cut()
    _wait_for(lambda: device.proxy.accepted >= 2, RECOVERY, "the SDK's reconnect after a reset")
    device.recovers(3, "after a reset")


def test_python_device_recovers_after_a_black_hole(device):
    accepted = device.proxy.accepted
    device.proxy.set("down", "blackhole")
    status, _ = device.invoke(4)
    assert status in (404, 504), f"a method through a black hole: {status}"
    # paho declares the link dead (no PINGRESP within 1.5 x keep-alive) and the SDK reconnects.
    _wait_for(lambda: not device.client.connected, 3 * KEEP_ALIVE, "the SDK noticing a dead link")
    device.proxy.resume()
    device.recovers(5, "after a black hole")
    assert device.proxy.accepted > accepted


def test_python_device_rides_out_a_short_stall(device):
    accepted = device.proxy.accepted
    device.proxy.set("up", "stall")
    timer = threading.Timer(1.5, device.proxy.resume)
    timer.start()
    started = time.monotonic()
    status, payload = device.invoke(6, response_timeout=10)
    took = time.monotonic() - started
    timer.join()
    assert (status, payload) == (200, {"echo": {"n": 6}}), f"{status} {payload}"
    assert took >= 1.5, f"answered in {took:.2f} s through a stalled link"
    device.round(7)
    assert device.proxy.accepted == accepted, "a stall shorter than the keep-alive must not reconnect"
