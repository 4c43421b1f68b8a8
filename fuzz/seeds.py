#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (fuzz/corpus/<target>/) from the captured exchanges in
the protocol reference (default /work/shared/reference/iothub-protocol.md; the seeds are
committed, so this runs only when the reference changes).

    python3 fuzz/seeds.py [REFERENCE.md]

Seeds are what real clients sent: the Python SDK's CONNECT and session (§7.3), the topics,
connection strings, SAS tokens, REST bodies and queries quoted in the reference. Where a seed
must authenticate (a CONNECT the fuzzer can mutate past), its token is signed here with the
capture's device key and an expiry in 2100, as fuzz/src/lib.rs registers that device.
"""

import base64
import hashlib
import hmac
import json
import re
import struct
import sys
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
REFERENCE = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/reference/iothub-protocol.md")
# Must match fuzz/src/lib.rs.
DEVICE_ID = "dev1"
DEVICE_KEY = "ZGV2aWNlLWtleS0wMTIzNDU2Nzg5YWJjZGVmMDEyMw=="
SERVICE_KEY = "c2VydmljZS1rZXktMDEyMzQ1Njc4OWFiY2RlZjAxMjM="
SEED_EXPIRY = 4102444800

text = REFERENCE.read_text(encoding="utf-8")
corpora: dict[str, dict[str, bytes]] = {}


def seed(target: str, data, name: str | None = None) -> None:
    if isinstance(data, str):
        data = data.encode()
    entries = corpora.setdefault(target, {})
    if data in entries.values():
        return
    entries[name or f"{len(entries):03}"] = data


def backticked() -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


# --- MQTT encoding (MQTT 3.1.1, just what the seeds need) -------------------------------------

def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(header: int, body: bytes) -> bytes:
    return bytes([header]) + remaining_length(len(body)) + body


def string(s) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">H", len(b)) + b


def connect(client_id: str, username: str | None, password: str | None, keep_alive=60,
            clean=False, level=4, will: tuple[str, bytes] | None = None) -> bytes:
    flags = (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    flags |= 0x02 if clean else 0
    if will:
        flags |= 0x04 | 0x08  # will, QoS 1
    body = string("MQTT") + bytes([level, flags]) + struct.pack(">H", keep_alive) + string(client_id)
    if will:
        body += string(will[0]) + string(will[1])
    if username is not None:
        body += string(username)
    if password is not None:
        body += string(password)
    return packet(0x10, body)


def publish(topic: str, payload: bytes, qos=1, pkid=1, retain=False) -> bytes:
    body = string(topic) + (struct.pack(">H", pkid) if qos else b"") + payload
    return packet(0x30 | (qos << 1) | (1 if retain else 0), body)


def subscribe(filters, pkid=1) -> bytes:
    body = struct.pack(">H", pkid) + b"".join(string(f) + bytes([q]) for f, q in filters)
    return packet(0x82, body)


def unsubscribe(filters, pkid=1) -> bytes:
    return packet(0xA2, struct.pack(">H", pkid) + b"".join(string(f) for f in filters))


PINGREQ = packet(0xC0, b"")
DISCONNECT = packet(0xE0, b"")


def puback(pkid: int) -> bytes:
    return packet(0x40, struct.pack(">H", pkid))


# --- SAS tokens (reference §2.2; the house style of hub-core `sas::generate`) ------------------

def sas(resource: str, key_b64: str, expiry: int, skn: str | None = None) -> str:
    sr = urllib.parse.quote(resource, safe="")
    digest = hmac.new(base64.b64decode(key_b64), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    sig = urllib.parse.quote(base64.b64encode(digest).decode(), safe="")
    token = f"SharedAccessSignature sr={sr}&sig={sig}&se={expiry}"
    return token + (f"&skn={skn}" if skn else "")


# --- MQTT: CONNECT (§3.2, §7.3) and the session after it (§7.3) -------------------------------

hex_connect = re.search(r"CONNECT \(raw, hex\):\s*```\s*([0-9a-f]+)\s*```", text)
if not hex_connect:
    sys.exit("the reference has no captured CONNECT (§7.3)")
captured_connect = bytes.fromhex(hex_connect.group(1))
seed("mqtt_connect", captured_connect, "python-connect-captured")

session_block = re.search(r"Session \(device → hub.*?```(.*?)```", text, re.S)
if not session_block:
    sys.exit("the reference has no captured session (§7.3)")
device_packets = []
pkid = 0
for line in session_block.group(1).strip().splitlines():
    if line.startswith("«hub»"):
        continue
    words = line.split(None, 2)
    if not words:
        continue
    pkid += 1
    if words[0] == "PUBLISH":
        topic = words[1]
        rest = words[2].strip() if len(words) > 2 else ""
        payload = rest.strip('"') if rest.startswith('"') else rest
        if payload.startswith("(empty)") or payload.startswith("(one space)"):
            payload = ""
        if topic.startswith("$iothub/twin/GET"):
            payload = " "  # the SDKs send one space (§3.7)
        device_packets.append(publish(topic, payload.encode(), pkid=pkid))
    elif words[0] == "SUBSCRIBE":
        device_packets.append(subscribe([(words[1], 1)], pkid=pkid))
    elif words[0] == "DISCONNECT":
        device_packets.append(DISCONNECT)
# Node's QoS 0 variants (§7.6) and the other packets a device sends.
device_packets += [
    subscribe([("$iothub/methods/POST/#", 0), ("$iothub/twin/res/#", 0)], pkid=40),
    publish("$iothub/twin/GET/?$rid=1", b" ", qos=0),
    publish("$iothub/twin/PATCH/properties/reported/?$rid=2", b'{"fw":"1.2"}', qos=0),
    publish("$iothub/methods/res/400/?$rid=2", b'"Invalid request format: Unexpected end of JSON input"', qos=0),
    publish(f"devices/{DEVICE_ID}/messages/events/", b"retained", retain=True, pkid=41),
    unsubscribe(["$iothub/methods/POST/#", "#"], pkid=42),
    subscribe([("#", 1)], pkid=43),
    puback(1),
    PINGREQ,
]
twin_first = [subscribe([("$iothub/twin/res/#", 1)], pkid=50)]
for i, p in enumerate(device_packets):
    seed("mqtt_session", p, f"packet-{i:02}")
    # Twin requests are answered only with the response subscription in place.
    seed("mqtt_session", b"".join(twin_first) + p, f"subscribed-packet-{i:02}")
whole_session = b"".join(device_packets)
seed("mqtt_session", whole_session, "python-session")

username = f"localhost/{DEVICE_ID}/?api-version=2021-04-12"
valid_password = sas(f"localhost/devices/{DEVICE_ID}", DEVICE_KEY, SEED_EXPIRY)
captured_username = re.search(r"username `(localhost/dev1/\?api-version=[^`]+)`", text).group(1)
node_username = re.search(r"username\s+`(localhost/dev1/\?api-version=2021-04-12&DeviceClientType=[^`]+)`", text).group(1)
seed("mqtt_connect", connect(DEVICE_ID, captured_username, valid_password), "python-connect-valid")
seed("mqtt_connect", connect(DEVICE_ID, node_username, valid_password, keep_alive=180), "node-connect-valid")
seed("mqtt_connect", connect(DEVICE_ID, username, valid_password, clean=True) + whole_session, "connect-then-session")
seed("mqtt_connect", connect(DEVICE_ID, username, valid_password, keep_alive=0) + PINGREQ + DISCONNECT, "keepalive-0")
seed("mqtt_connect", connect(f"{DEVICE_ID}/mod1", f"localhost/{DEVICE_ID}/mod1/?api-version=2019-10-01",
                             sas(f"localhost/devices/{DEVICE_ID}/modules/mod1", DEVICE_KEY, SEED_EXPIRY)), "module-connect")
seed("mqtt_connect", connect(DEVICE_ID, username, valid_password, level=5), "mqtt5-connect")
seed("mqtt_connect", connect(DEVICE_ID, username, valid_password,
                             will=(f"devices/{DEVICE_ID}/messages/events/", b"gone")), "will-connect")
seed("mqtt_connect", connect(DEVICE_ID, username, None), "no-password")
seed("mqtt_connect", connect("myDeviceId", "localhost/myDeviceId/?api-version=2021-04-12",
                             sas("localhost/devices/dev1", DEVICE_KEY, SEED_EXPIRY)), "other-device-token")
seed("mqtt_connect", connect(DEVICE_ID, username, sas(f"localhost/devices/{DEVICE_ID}", SERVICE_KEY, SEED_EXPIRY, "iothubowner")), "policy-token")
seed("mqtt_connect", PINGREQ, "not-connect")

# --- Topics and filters (§3.4-§3.7, §7.3, §7.6) ----------------------------------------------

topics = set()
for quoted in backticked() + session_block.group(1).split():
    for t in re.findall(r"(\$iothub/[^\s`]*|devices/[^\s`]+)", quoted):
        topics.add(t.rstrip(".,;)"))
topics |= {"devices/dev1/modules/mod1/inputs/input1/%24.mid=1", "devices/dev1/modules/mod1/messages/events/a=b",
           "devices/dev1/modules/mod1/inputs/#", "#"}
for t in sorted(topics):
    seed("iothub_topic", t)

# --- Connection strings (§1.1, §7.1) and hub.env --------------------------------------------

strings = {s for s in backticked() if s.startswith("HostName=")}
strings |= {
    f"HostName=localhost;DeviceId={DEVICE_ID};SharedAccessKey={DEVICE_KEY}",
    f"HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey={SERVICE_KEY}",
    f"HostName=myhub.azure-devices.net;DeviceId={DEVICE_ID};ModuleId=mod1;SharedAccessKey={DEVICE_KEY};GatewayHostName=localhost",
    f"HostName=localhost;DeviceId={DEVICE_ID};x509=true",
    f"HostName=localhost;DeviceId={DEVICE_ID};SharedAccessSignature={valid_password}",
    f"HostName=[::1]:8883;DeviceId={DEVICE_ID};SharedAccessKey={DEVICE_KEY}",
}
for s in sorted(strings):
    seed("connection_string", s)
service = f"HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey={SERVICE_KEY}"
device = f"HostName=localhost;DeviceId=myDeviceId;SharedAccessKey={DEVICE_KEY}"
seed("hub_env", f"IOTHUB_CONNECTION_STRING={service}\nIOTHUB_DEVICE_CONNECTION_STRING={device}\nIOTHUB_CA_FILE=/data/ca.pem\n", "written-by-the-hub")
seed("hub_env", f"# local hub\nexport IOTHUB_CONNECTION_STRING=\"{service}\"\n\nIOTHUB_DEVICE_CONNECTION_STRING='{device}'\nIOTHUB_CA_FILE=ca.pem\nOTHER=1\n", "edited-by-hand")

# --- SAS tokens (§2, §7.3, §7.5, §7.6) -------------------------------------------------------

for s in backticked():
    for token in re.findall(r"SharedAccessSignature sr=[^`\s]+", s):
        seed("sas_token", token)
for line in text.splitlines():
    m = re.search(r"(SharedAccessSignature sr=[^`\s]+)", line)
    if m and "{" not in m.group(1) and ".." not in m.group(1):
        seed("sas_token", m.group(1))
seed("sas_token", valid_password, "device-valid")
seed("sas_token", sas("localhost:8443", SERVICE_KEY, SEED_EXPIRY, "iothubowner"), "service-valid")
# Node's field order (§2.1).
node = sas("localhost", SERVICE_KEY, SEED_EXPIRY, None)
seed("sas_token", node.replace("&se=", "&skn=iothubowner&se="), "node-order")

# --- REST bodies (§4.2-§4.6, §7.5, §7.6): one selector byte, then the JSON ------------------

SELECTORS = {"device": 0, "device-update": 1, "twin-patch": 2, "twin-replace": 3, "method": 4, "job": 5}
bodies = []
for candidate in re.findall(r"`(\{[^`]*\})`", text) + re.findall(r"```json\s*(.*?)```", text, re.S):
    try:
        bodies.append(json.loads(candidate))
    except ValueError:
        pass
queries = set()
for body in bodies:
    if not isinstance(body, dict):
        continue
    if "methodName" in body:
        kinds = ["method"]
    elif "type" in body and "queryCondition" in body:
        kinds = ["job"]
        queries.add(body["queryCondition"])
    elif "query" in body:
        queries.add(body["query"])
        continue
    elif "authentication" in body or ("deviceId" in body and "status" in body and "properties" not in body):
        kinds = ["device", "device-update"]
    elif "tags" in body or "properties" in body:
        kinds = ["twin-patch", "twin-replace"]
    else:
        continue
    for kind in kinds:
        seed("rest_bodies", bytes([SELECTORS[kind]]) + json.dumps(body).encode(), None)
seed("rest_bodies", bytes([SELECTORS["method"]]) + b'{"methodName": "ping", "payload": null}', "method-null")
seed("rest_bodies", bytes([SELECTORS["device"]]) + b'{"deviceId": "fuzzNew"}', "device-node-minimal")

# --- Queries (§4.5, §4.7, §5, README) -------------------------------------------------------

for s in backticked():
    if re.match(r"(?i)select\b", s):
        queries.add(s)
queries |= {
    "SELECT * FROM devices WHERE tags.location.region = 'US'",
    "SELECT deviceId, properties.reported.temp AS t FROM devices WHERE properties.reported.temp > 1.5 AND NOT (status = 'disabled')",
    "SELECT COUNT() AS n, AVG(properties.reported.temp) FROM devices GROUP BY tags.building",
    "SELECT TOP 3 * FROM devices WHERE IS_DEFINED(tags.floor) OR tags.floor IN [1, 2, 0x3]",
    "SELECT * FROM devices.jobs WHERE devices.jobs.jobId = 'job-m'",
    "SELECT * FROM devices.modules",
    "STARTSWITH(deviceId, 'simDevice-')",
    "deviceId IN ['dev1', 'dev2']",
    "tags.building = '43'",
    "properties.desired.telemetryInterval % 20 = 0 AND tags.[[group]] != \"a\\u0041\"",
    "*",
}
for q in sorted(queries):
    seed("query", q)

for target, entries in sorted(corpora.items()):
    out = HERE / "corpus" / target
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("seed-*"):  # regression-* inputs (crashes found) are kept
        old.unlink()
    for name, data in entries.items():
        (out / f"seed-{name}").write_bytes(data)
    print(f"{target}: {len(entries)} seeds")
