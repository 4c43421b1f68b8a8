"""The hub emulator's dashboard in a real headless Chromium, driven over WebDriver.

Each test runs against one hub started here on ephemeral ports (in memory), with our sim-device
as the tutorial's device and fleet and a raw paho-mqtt device for telemetry. Screenshots of each
step go to $SCREENSHOT_DIR (tests/browser/run keeps them under target/browser/screenshots).
"""

import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import paho.mqtt.client as mqtt
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN_DIR = os.environ.get("BIN_DIR", os.path.join(ROOT, "target", "debug"))
SCREENSHOTS = os.environ.get("SCREENSHOT_DIR", os.path.join(ROOT, "target", "browser", "screenshots"))
WAIT = 20.0


def wait_for(predicate, timeout=WAIT, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (StaleElementReferenceException, WebDriverException) as error:
            last = error
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last})")


class Hub:
    """A hub-emulator process and what its banner printed."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="dashboard-test-")
        self.proc = subprocess.Popen(
            [os.path.join(BIN_DIR, "hub-emulator"), "--data-dir", self.dir, "--in-memory",
             "--mqtt-port", "0", "--https-port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.banner = {}
        for line in self.proc.stdout:
            if line.startswith("# dashboard: "):
                self.banner["dashboard"] = line.split(": ", 1)[1].strip()
            elif "=" in line and not line.startswith("#"):
                key, value = line.strip().split("=", 1)
                self.banner[key] = value
            if line.strip() == "hub-emulator ready":
                break
        assert "dashboard" in self.banner, f"the banner names no dashboard link: {self.banner}"
        self.url = self.banner["dashboard"]
        self.base = self.url.split("/?token=")[0]
        self.https_port = int(urllib.parse.urlparse(self.base).port)
        self.mqtt_port = int(re.search(r"HostName=localhost:(\d+)", self.banner["IOTHUB_DEVICE_CONNECTION_STRING"]).group(1))
        self.ca_file = self.banner["IOTHUB_CA_FILE"]
        parts = dict(p.split("=", 1) for p in self.banner["IOTHUB_CONNECTION_STRING"].split(";"))
        self.policy, self.policy_key = parts["SharedAccessKeyName"], parts["SharedAccessKey"]
        self.children = []

    def sas(self, key, key_name=None, resource="localhost"):
        expiry = int(time.time()) + 3600
        sr = urllib.parse.quote(resource, safe="")
        sig = base64.b64encode(hmac.new(base64.b64decode(key), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest())
        token = f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={expiry}"
        return token + (f"&skn={key_name}" if key_name else "")

    def rest(self, method, path, body=None):
        request = urllib.request.Request(
            f"{self.base}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": self.sas(self.policy_key, self.policy), "Content-Type": "application/json"})
        context = ssl.create_default_context(cafile=self.ca_file)
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            text = response.read()
            return json.loads(text) if text else None

    def sim_device(self, *args):
        child = subprocess.Popen(
            [os.path.join(BIN_DIR, "sim-device"), "--hub-env", os.path.join(self.dir, "hub.env"), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.children.append(child)
        return child

    def stop(self):
        for child in self.children:
            child.terminate()
        for child in self.children:
            child.wait(timeout=10)
        self.proc.terminate()
        self.proc.wait(timeout=15)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def hub():
    hub = Hub()
    yield hub
    hub.stop()


def new_browser():
    """A headless Chromium under chromedriver (also used by scripts/dashboard-bench)."""
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                 "--ignore-certificate-errors"):
        options.add_argument(flag)
    options.accept_insecure_certs = True
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        options.binary_location = binary
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    return driver


@pytest.fixture(scope="module")
def browser():
    driver = new_browser()
    os.makedirs(SCREENSHOTS, exist_ok=True)
    yield driver
    driver.quit()


def shot(driver, name):
    driver.save_screenshot(os.path.join(SCREENSHOTS, f"{name}.png"))


def text_of(driver, css):
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""


def click(driver, css, index=0):
    """Clicks the index-th match of css, again if a live update replaced it meanwhile."""
    def attempt():
        driver.find_elements(By.CSS_SELECTOR, css)[index].click()
        return True
    wait_for(attempt, what=f"{css} to click")


def signed_in(driver, hub):
    driver.get(hub.url)
    wait_for(lambda: "live" == text_of(driver, "#live"), what="the live feed to connect")


def test_the_page_is_refused_without_the_token(hub, browser):
    browser.delete_all_cookies()
    browser.get(hub.base + "/")
    assert "Not signed in" in browser.find_element(By.TAG_NAME, "h1").text
    browser.get(hub.base + "/?token=not-this-hubs-token")
    assert "not from this start" in text_of(browser, "#refused")
    shot(browser, "01-refused-without-token")
    # The REST API takes the page's cookie only with the page's CSRF header (checked in
    # test_the_cookie_is_no_credential_without_the_csrf_header once signed in).
    context = ssl.create_default_context(cafile=hub.ca_file)
    request = urllib.request.Request(f"{hub.base}/devices/myDeviceId")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, context=context, timeout=10)
    assert refused.value.code == 401


def test_the_cookie_is_no_credential_without_the_csrf_header(hub, browser):
    signed_in(browser, hub)
    cookie = next(c for c in browser.get_cookies() if c["name"].startswith("hub_dashboard_"))
    context = ssl.create_default_context(cafile=hub.ca_file)
    hub.rest("PUT", "/devices/csrf-target", {"deviceId": "csrf-target"})
    for method, path, csrf in (("GET", "/devices/myDeviceId", None),
                               ("DELETE", "/devices/csrf-target", None),
                               ("DELETE", "/devices/csrf-target", "forged")):
        headers = {"Cookie": f"{cookie['name']}={cookie['value']}", "If-Match": "*"}
        if csrf:
            headers["x-dashboard-csrf"] = csrf
        request = urllib.request.Request(f"{hub.base}{path}", method=method, headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, context=context, timeout=10)
        assert refused.value.code == 401, (method, path, csrf)
    assert hub.rest("GET", "/devices/csrf-target")["deviceId"] == "csrf-target", "nothing deleted"


def test_the_token_is_exchanged_for_a_cookie_and_keys_never_reach_the_page(hub, browser):
    signed_in(browser, hub)
    assert "token" not in browser.current_url, "the token leaves the address bar"
    cookie = [c for c in browser.get_cookies() if c["name"].startswith("hub_dashboard_")]
    assert cookie and cookie[0]["httpOnly"] and cookie[0]["secure"], cookie
    assert browser.execute_script("return document.cookie") == "", "the page's script cannot read the cookie"
    # The page's own fetch of an identity comes back without keys.
    device = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const csrf = document.querySelector('meta[name="csrf"]').content;
        fetch('/devices/myDeviceId', {headers: {'x-dashboard-csrf': csrf}}).then(r => r.json()).then(done);
    """)
    assert device["authentication"]["symmetricKey"] == {"primaryKey": None, "secondaryKey": None}
    assert hub.policy_key not in browser.page_source


def test_the_tutorial_device_connects_answers_lock_door_and_acknowledges_desired(hub, browser):
    signed_in(browser, hub)
    row = '#device-rows tr[data-device="myDeviceId"] [data-field="connectionState"]'
    wait_for(lambda: text_of(browser, row) == "Disconnected", what="myDeviceId listed")
    hub.sim_device()
    wait_for(lambda: text_of(browser, row) == "Connected", what="myDeviceId shown connected, live")
    wait_for(lambda: text_of(browser, "#count-connected") == "1", what="the header's connected count")
    shot(browser, "02-device-connected")

    browser.find_element(By.LINK_TEXT, "myDeviceId").click()
    wait_for(lambda: text_of(browser, "#device-state") == "Connected", what="the device page")
    browser.find_element(By.CSS_SELECTOR, "#method-form button[type=submit]").click()
    result = wait_for(lambda: text_of(browser, "#method-result"), what="lockDoor's answer")
    assert result.startswith("status 200"), result
    shot(browser, "03-lock-door-answered")

    patch = browser.find_element(By.ID, "twin-patch")
    patch.clear()
    patch.send_keys(json.dumps({"properties": {"desired": {"building": "43", "floor": "3"}}}))
    browser.find_element(By.CSS_SELECTOR, "#twin-form button[type=submit]").click()
    wait_for(lambda: "Applied" in text_of(browser, "#twin-patch-result"), what="the patch applied")
    # sim-device reports what it applied; the page shows it without a reload.
    wait_for(lambda: '"floor": "3"' in text_of(browser, "#twin-reported"), what="the device's acknowledgement")
    shot(browser, "04-desired-acknowledged")

    # A module identity created elsewhere is listed live, without its keys reaching the page.
    hub.rest("PUT", "/devices/myDeviceId/modules/doorSensor", {"moduleId": "doorSensor", "deviceId": "myDeviceId"})
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, '#module-rows tr[data-module="doorSensor"]'),
             what="the module listed")
    module_key = hub.rest("GET", "/devices/myDeviceId/modules/doorSensor")["authentication"]["symmetricKey"]["primaryKey"]
    assert module_key not in browser.page_source

    # A change made elsewhere shows without a reload.
    hub.rest("PATCH", "/twins/myDeviceId", {"tags": {"touched": True}})
    wait_for(lambda: '"touched": true' in text_of(browser, "#twin-tags"), what="the tag change shown live")


def test_a_stale_etag_is_refused_and_shown(hub, browser):
    signed_in(browser, hub)
    browser.get(hub.base + "/#/device/myDeviceId")
    wait_for(lambda: text_of(browser, "#twin-etag"), what="the twin's etag")
    # Someone else changes the twin between the page's read and its write: the page's write
    # with the etag it read is refused with IoT Hub's 412, and the form shows the refusal.
    old = text_of(browser, "#twin-etag")
    hub.rest("PATCH", "/twins/myDeviceId", {"tags": {"race": 1}})
    outcome = browser.execute_async_script("""
        const [old, done] = [arguments[0], arguments[arguments.length - 1]];
        const csrf = document.querySelector('meta[name="csrf"]').content;
        fetch('/twins/myDeviceId', {method: 'PATCH', headers: {'x-dashboard-csrf': csrf,
          'content-type': 'application/json', 'if-match': '"' + old + '"'},
          body: JSON.stringify({tags: {race: 2}})}).then(r => done(r.status));
    """, old)
    assert outcome == 412
    # The form shows the hub's refusals: a service cannot write reported properties.
    patch = browser.find_element(By.ID, "twin-patch")
    patch.clear()
    patch.send_keys(json.dumps({"properties": {"reported": {"x": 1}}}))
    browser.find_element(By.CSS_SELECTOR, "#twin-form button[type=submit]").click()
    refused = wait_for(lambda: text_of(browser, "#twin-patch-result.error"), what="the refusal shown")
    assert refused.startswith("400"), refused
    patch.clear()
    patch.send_keys("{not json")
    browser.find_element(By.CSS_SELECTOR, "#twin-form button[type=submit]").click()
    wait_for(lambda: "not valid JSON" in text_of(browser, "#twin-patch-result.error"), what="the JSON error")


def test_telemetry_is_shown_on_the_device_page(hub, browser):
    key = base64.b64encode(b"telemetry-device-key-0123456789!").decode()
    hub.rest("PUT", "/devices/thermostat1", {
        "deviceId": "thermostat1",
        "authentication": {"type": "sas", "symmetricKey": {"primaryKey": key, "secondaryKey": key}}})
    signed_in(browser, hub)
    browser.get(hub.base + "/#/device/thermostat1")
    wait_for(lambda: "0 messages" in text_of(browser, "#telemetry-note"), what="an empty telemetry list")

    client = mqtt.Client(client_id="thermostat1", protocol=mqtt.MQTTv311)
    client.username_pw_set(f"localhost/thermostat1/?api-version=2021-04-12",
                           hub.sas(key, resource="localhost/devices/thermostat1"))
    client.tls_set(ca_certs=hub.ca_file)
    client.connect("localhost", hub.mqtt_port)
    client.loop_start()
    try:
        wait_for(lambda: text_of(browser, "#device-state") == "Connected", what="thermostat1 connected")
        for n in range(3):
            client.publish("devices/thermostat1/messages/events/%24.ct=application%2Fjson",
                           json.dumps({"temperature": 20 + n}), qos=1).wait_for_publish()
        wait_for(lambda: '{"temperature": 22}' in text_of(browser, "#telemetry-rows"), what="the telemetry shown")
        assert "3 messages" in text_of(browser, "#telemetry-note")
        shot(browser, "05-telemetry")
    finally:
        client.loop_stop()
        client.disconnect()
    read = hub.rest("GET", "/$emulator/devices/thermostat1/messages")
    assert [json.loads(m["body"])["temperature"] for m in read["messages"]] == [20, 21, 22]


def test_a_job_over_a_fleet_is_scheduled_from_the_form_and_reaches_100_percent(hub, browser):
    hub.sim_device("--count", "50", "--id-prefix", "door-", "--register")
    def fleet_connected():
        rows = hub.rest("POST", "/devices/query", {
            "query": "SELECT COUNT() AS n FROM devices WHERE STARTSWITH(deviceId, 'door-') AND connectionState = 'Connected'"})
        return rows and rows[0]["n"] == 50
    wait_for(fleet_connected, timeout=60, what="the 50-device fleet connected")
    signed_in(browser, hub)
    browser.get(hub.base + "/#/jobs")
    condition = wait_for(lambda: browser.find_element(By.ID, "job-condition"), what="the job form")
    condition.clear()
    condition.send_keys("STARTSWITH(deviceId, 'door-')")
    job_id = browser.find_element(By.ID, "job-id")
    job_id.clear()
    job_id.send_keys("lock-the-fleet")
    browser.find_element(By.CSS_SELECTOR, "#job-form button[type=submit]").click()
    wait_for(lambda: text_of(browser, "#job-title") == "lock-the-fleet", what="the job page")
    wait_for(lambda: text_of(browser, "#job-percent") == "100%", timeout=60, what="the progress at 100%")
    # Every device's outcome can be in (100%) a refresh before the job itself is marked
    # completed: the job closes after its last device operation, as IoT Hub's does.
    wait_for(lambda: "completed" in text_of(browser, "#job-status"), timeout=30, what="the job completed")
    assert browser.find_element(By.ID, "job-progress").get_attribute("aria-valuenow") == "100"
    assert "null" not in text_of(browser, "#job-head"), text_of(browser, "#job-head")
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#job-devices tr")) == 50, what="50 outcomes")
    assert "status 200" in text_of(browser, "#job-devices")
    shot(browser, "06-job-complete")

    browser.get(hub.base + "/#/jobs")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, '#job-rows tr[data-job="lock-the-fleet"]'), what="the job listed")
    Select(browser.find_element(By.ID, "jobs-status")).select_by_value("running")
    wait_for(lambda: not browser.find_elements(By.CSS_SELECTOR, '#job-rows tr[data-job="lock-the-fleet"]'),
             what="the status filter applied")


def test_a_scheduled_job_is_cancelled_from_its_page(hub, browser):
    signed_in(browser, hub)
    browser.get(hub.base + "/#/jobs")
    job_id = wait_for(lambda: browser.find_element(By.ID, "job-id"), what="the job form")
    job_id.clear()
    job_id.send_keys("later-twin-job")
    Select(browser.find_element(By.ID, "job-kind")).select_by_value("scheduleUpdateTwin")
    # An hour from now, in the page's local time (datetime-local takes yyyy-mm-ddThh:mm:ss).
    later = browser.execute_script("""
        const d = new Date(Date.now() + 3600 * 1000);
        const p = (n) => String(n).padStart(2, '0');
        return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
    """)
    browser.execute_script("document.getElementById('job-start').value = arguments[0];", later)
    browser.find_element(By.CSS_SELECTOR, "#job-form button[type=submit]").click()
    wait_for(lambda: "scheduled" in text_of(browser, "#job-status"), what="the job scheduled")
    click(browser, "#job-cancel")
    wait_for(lambda: "cancelled" in text_of(browser, "#job-status"), what="the job cancelled")
    assert hub.rest("GET", "/jobs/v2/later-twin-job")["status"] == "cancelled"
    assert not browser.find_elements(By.ID, "job-cancel"), "no cancel button on an ended job"


def test_the_query_console_pages_and_shows_errors(hub, browser):
    for n in range(1, 106):
        hub.rest("PUT", f"/devices/q-{n}", {"deviceId": f"q-{n}"})
    signed_in(browser, hub)
    browser.get(hub.base + "/#/query")
    text = wait_for(lambda: browser.find_element(By.ID, "query-text"), what="the console")
    text.clear()
    text.send_keys("SELECT deviceId FROM devices WHERE STARTSWITH(deviceId, 'q-')")
    browser.find_element(By.CSS_SELECTOR, "#query-form button[type=submit]").click()
    wait_for(lambda: "Page 1: 100 rows" in text_of(browser, "#query-results"), what="a first page of 100")
    click(browser, "#query-more")
    wait_for(lambda: "Page 2: 5 rows" in text_of(browser, "#query-results"), what="the second page of 5")
    assert not browser.find_element(By.ID, "query-more").is_displayed(), "no third page"
    text.clear()
    text.send_keys("SELECT * FROM devices WHERE")
    browser.find_element(By.CSS_SELECTOR, "#query-form button[type=submit]").click()
    error = wait_for(lambda: text_of(browser, "#query-error"), what="the syntax error")
    assert error.startswith("400") and "position" in error, error
    shot(browser, "07-query-error")


def test_devices_are_created_disabled_and_deleted_from_the_list(hub, browser):
    signed_in(browser, hub)
    browser.get(hub.base + "/#/devices")
    box = wait_for(lambda: browser.find_element(By.ID, "new-device-id"), what="the create form")
    box.send_keys("made-in-the-page")
    browser.find_element(By.CSS_SELECTOR, "#create-device button").click()
    search = browser.find_element(By.ID, "device-search")
    search.send_keys("made-in")
    row = '#device-rows tr[data-device="made-in-the-page"]'
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, row), what="the new device listed")
    key_before = hub.rest("GET", "/devices/made-in-the-page")["authentication"]["symmetricKey"]["primaryKey"]
    click(browser, f"{row} button")  # Disable
    wait_for(lambda: "disabled" in text_of(browser, row), what="the device disabled")
    device = hub.rest("GET", "/devices/made-in-the-page")
    assert device["status"] == "disabled"
    assert device["authentication"]["symmetricKey"]["primaryKey"] == key_before, "keys kept"
    shot(browser, "08-device-disabled")
    browser.execute_script("window.confirm = () => true;")
    click(browser, f"{row} button", 1)  # Delete
    wait_for(lambda: not browser.find_elements(By.CSS_SELECTOR, row), what="the device gone")
