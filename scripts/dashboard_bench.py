"""The dashboard's cost: a hub with a fleet runs the same method job with and without the page
open on it (real headless Chromium, following the job live), pair by pair; then the time from a
twin change to the page showing it, on an idle hub and during a twin job over the fleet.

Prints the hub's CPU per job both ways, the overhead, and the update latency. Run through
scripts/dashboard-bench, which builds release binaries and sets up the venv.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "browser"))
from test_dashboard import Hub, new_browser, signed_in, text_of, wait_for  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_job(hub, job_id, kind, browser=None):
    body = {"jobId": job_id, "type": kind, "queryCondition": "STARTSWITH(deviceId, 'bench-')",
            "startTime": "2020-01-01T00:00:00Z", "maxExecutionTimeInSeconds": 600}
    if kind == "scheduleDeviceMethod":
        body["cloudToDeviceMethod"] = {"methodName": "lockDoor", "payload": {}, "responseTimeoutInSeconds": 30}
    else:
        body["updateTwin"] = {"etag": "*", "tags": {"bench": job_id}}
    if browser is not None:
        # The page waits on the job's own page: the feed names the job once it is created, and
        # the page reads it from then on, as it would for a job someone else schedules.
        browser.execute_script("location.hash = arguments[0];", f"#/job/{job_id}")
        wait_for(lambda: text_of(browser, "#job-title") == job_id, what="the job page")
    before = cpu_seconds(hub.proc.pid)
    started = time.monotonic()
    hub.rest("PUT", f"/jobs/v2/{job_id}", body)
    while hub.rest("GET", f"/jobs/v2/{job_id}")["status"] not in ("completed", "failed", "cancelled"):
        time.sleep(0.1)
    took = time.monotonic() - started
    cpu = cpu_seconds(hub.proc.pid) - before
    seen = None
    if browser is not None:
        # The page's own view of the end: 100% on the job page.
        wait_for(lambda: text_of(browser, "#job-percent") == "100%", timeout=30, what="the page at 100%")
        seen = time.monotonic() - started - took
    return took, cpu, seen


def latency_probes(hub, browser, device, count, during=None):
    """Seconds from a twin PATCH's answer to the page showing the change, `count` times."""
    browser.execute_script("location.hash = arguments[0];", f"#/device/{device}")
    wait_for(lambda: text_of(browser, "#device-state"), what="the device page")
    browser.execute_script("""
        window.__seen = {};
        new MutationObserver(() => {
          const m = (document.getElementById('twin-tags') || {}).textContent || '';
          const found = m.match(/"probe": (\\d+)/);
          if (found && !(found[1] in window.__seen)) window.__seen[found[1]] = Date.now();
        }).observe(document.getElementById('view'), {subtree: true, childList: true, characterData: true});
    """)
    if during:
        during()
    delays = []
    for n in range(count):
        hub.rest("PATCH", f"/twins/{device}", {"tags": {"probe": n}})
        answered = time.time() * 1000
        seen = wait_for(lambda: browser.execute_script("return window.__seen[arguments[0]];", str(n)),
                        timeout=30, what=f"probe {n} shown")
        delays.append(max(0.0, seen - answered) / 1000)
        time.sleep(0.2)
    return delays


def main():
    devices = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    hub = Hub()
    browser = None
    try:
        hub.sim_device("--count", str(devices), "--id-prefix", "bench-", "--register",
                       "--summary-interval", "60s")
        wait_for(lambda: hub.rest("GET", "/statistics/service")["connectedDeviceCount"] >= devices,
                 timeout=600, what=f"{devices} devices connected")
        print(f"hub: {devices} devices connected, hub resident {rss_mib(hub.proc.pid):.0f} MiB")
        browser = new_browser()
        signed_in(browser, hub)
        run_job(hub, "warm-up", "scheduleDeviceMethod")
        without, with_page, seen_after = [], [], []
        for n in range(rounds):
            took, cpu, _ = run_job(hub, f"plain-{n}", "scheduleDeviceMethod")
            without.append((took, cpu))
            took, cpu, seen = run_job(hub, f"watched-{n}", "scheduleDeviceMethod", browser)
            with_page.append((took, cpu))
            seen_after.append(seen)
            print(f"round {n + 1}: method job over {devices} devices: without the page {without[-1][0]:.2f} s, "
                  f"hub CPU {without[-1][1]:.2f} s; with the page {took:.2f} s, hub CPU {cpu:.2f} s; "
                  f"the page showed 100% {seen * 1000:.0f} ms after the poll saw the end")
        cpu_without = statistics.median(c for _, c in without)
        cpu_with = statistics.median(c for _, c in with_page)
        print(f"median hub CPU per job: {cpu_without:.2f} s without the page, {cpu_with:.2f} s with it "
              f"(overhead {cpu_with - cpu_without:+.2f} s, {100 * (cpu_with - cpu_without) / cpu_without:+.1f}%)")
        print(f"hub resident after {2 * rounds + 1} jobs over the fleet (their rows are kept): {rss_mib(hub.proc.pid):.0f} MiB")

        idle = latency_probes(hub, browser, "bench-1", 20)
        busy = latency_probes(hub, browser, "bench-1", 20, during=lambda: hub.rest("PUT", "/jobs/v2/busy-twins", {
            "jobId": "busy-twins", "type": "scheduleUpdateTwin",
            "queryCondition": "STARTSWITH(deviceId, 'bench-')", "startTime": "2020-01-01T00:00:00Z",
            "maxExecutionTimeInSeconds": 600, "updateTwin": {"etag": "*", "tags": {"busy": True}}}))
        for name, delays in (("idle hub", idle), ("during a twin job over the fleet", busy)):
            delays.sort()
            print(f"update latency, twin change to the page ({name}, {len(delays)} probes): "
                  f"median {statistics.median(delays) * 1000:.0f} ms, "
                  f"p95 {delays[int(0.95 * (len(delays) - 1))] * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms")
    finally:
        if browser is not None:
            browser.quit()
        hub.stop()


if __name__ == "__main__":
    main()
