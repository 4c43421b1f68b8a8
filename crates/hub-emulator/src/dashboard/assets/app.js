// The hub emulator's dashboard. Every read and action is an IoT Hub REST call to this hub,
// authorized by the page's cookie plus its CSRF header (see src/dashboard/mod.rs); the live
// view follows /$dashboard/events, which only names what changed.
"use strict";

const CSRF = document.querySelector('meta[name="csrf"]').content;
const view = document.getElementById("view");

// ---- small helpers -------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function pretty(value) {
  return JSON.stringify(value, null, 2);
}

function encodeId(id) {
  return encodeURIComponent(id);
}

// A REST failure as the page shows it: status, IoT Hub's error code and message.
class ApiFailure extends Error {
  constructor(status, code, message) {
    super(`${status}${code ? " " + code : ""}: ${message}`);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body, headers) {
  const init = {
    method,
    headers: Object.assign({ "x-dashboard-csrf": CSRF }, headers || {}),
    credentials: "same-origin",
  };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  if (!response.ok) {
    let message = text || response.statusText;
    if (json && typeof json.Message === "string") {
      message = json.Message;
      // Newer IoT Hub errors carry a JSON document inside Message.
      try {
        const inner = JSON.parse(json.Message);
        if (inner && inner.message) message = inner.message;
      } catch (_) { /* a plain message */ }
    }
    throw new ApiFailure(response.status, response.headers.get("iothub-errorcode"), message);
  }
  return { json, headers: response.headers, status: response.status };
}

// A query page: {items, continuation}.
async function queryPage(sql, continuation, pageSize) {
  const headers = { "x-ms-max-item-count": String(pageSize || 50) };
  if (continuation) headers["x-ms-continuation"] = continuation;
  const answer = await api("POST", "/devices/query", { query: sql }, headers);
  return { items: answer.json || [], continuation: answer.headers.get("x-ms-continuation") };
}

function errorBox() {
  return el("div", { class: "error", role: "alert" });
}

function showError(box, error) {
  box.textContent = error instanceof Error ? error.message : String(error);
}

// Runs `fn` at most once per `ms`, the last call winning (live updates come in bursts).
function debounce(fn, ms) {
  let timer = null;
  let again = false;
  const arm = () => {
    timer = setTimeout(() => {
      timer = null;
      if (again) {
        again = false;
        fn();
        arm();
      }
    }, ms);
  };
  return () => {
    if (timer) { again = true; return; }
    fn();
    arm();
  };
}

function parseJson(text, what) {
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new Error(`${what} is not valid JSON: ${error.message}`);
  }
}

// ---- the header's counts and the live feed --------------------------------------------------

async function refreshCounts() {
  try {
    const [service, devices] = await Promise.all([
      api("GET", "/statistics/service"),
      api("GET", "/statistics/devices"),
    ]);
    document.getElementById("count-connected").textContent = service.json.connectedDeviceCount;
    document.getElementById("count-devices").textContent = devices.json.totalDeviceCount;
  } catch (_) { /* shown by the views */ }
}
const countsSoon = debounce(refreshCounts, 500);

// The current view's reaction to a batch of changes ({devices, telemetry, jobs, resync}).
let onChanges = () => {};

function connectFeed() {
  const live = document.getElementById("live");
  const source = new EventSource("/$dashboard/events");
  source.addEventListener("ready", () => {
    live.textContent = "live";
    live.className = "live on";
    onChanges({ devices: [], telemetry: [], jobs: [], resync: true });
    countsSoon();
  });
  source.addEventListener("changes", (event) => {
    const batch = JSON.parse(event.data);
    if (batch.resync || batch.devices.length) countsSoon();
    onChanges(batch);
  });
  source.onerror = () => {
    live.textContent = "offline";
    live.className = "live off";
  };
}

// ---- devices --------------------------------------------------------------------------------

function deviceRow(d, reload, errors) {
  const toggle = d.status === "enabled" ? "disabled" : "enabled";
  return el("tr", { "data-device": d.deviceId },
    el("td", {}, el("a", { href: `#/device/${encodeId(d.deviceId)}`, text: d.deviceId })),
    el("td", { class: `state-${d.connectionState}`, "data-field": "connectionState", text: d.connectionState }),
    el("td", { class: "muted", text: d.lastActivityTime || "" }),
    el("td", { text: d.authenticationType || "" }),
    el("td", { class: `status-${d.status}`, text: d.status }),
    el("td", {},
      el("button", {
        type: "button",
        text: toggle === "disabled" ? "Disable" : "Enable",
        onclick: () => setStatus(d.deviceId, toggle).then(reload, (e) => showError(errors, e)),
      }), " ",
      el("button", {
        type: "button",
        text: "Delete",
        onclick: () => {
          if (!confirm(`Delete device ${d.deviceId}?`)) return;
          api("DELETE", `/devices/${encodeId(d.deviceId)}`, undefined, { "if-match": "*" })
            .then(reload, (e) => showError(errors, e));
        },
      })));
}

// Disabling and enabling are a registry update: read the identity (its keys come blanked, and
// an update without keys keeps them), change the status, write it back under its etag.
async function setStatus(id, status) {
  const current = await api("GET", `/devices/${encodeId(id)}`);
  const device = current.json;
  device.status = status;
  await api("PUT", `/devices/${encodeId(id)}`, device, { "if-match": `"${device.etag}"` });
}

function devicesView() {
  const errors = errorBox();
  const search = el("input", { type: "search", id: "device-search", placeholder: "device id starts with..." });
  const body = el("tbody", { id: "device-rows" });
  const more = el("button", { type: "button", id: "device-more", text: "More", hidden: true });
  let continuation = null;
  let shown = 50;

  const sql = () => {
    const prefix = search.value.trim().replace(/'/g, "");
    const where = prefix ? ` WHERE STARTSWITH(deviceId, '${prefix}')` : "";
    return `SELECT deviceId, connectionState, lastActivityTime, authenticationType, status FROM devices${where}`;
  };
  // Reads the first `shown` rows again (live updates keep what is on screen current).
  let generation = 0;
  const reload = async () => {
    // An answer to an older search (or view) must not overwrite a newer one.
    const mine = ++generation;
    try {
      const page = await queryPage(sql(), null, Math.min(shown, 100));
      const rows = page.items;
      let next = page.continuation;
      while (next && rows.length < shown) {
        const further = await queryPage(sql(), next, 100);
        rows.push(...further.items);
        next = further.continuation;
      }
      if (mine !== generation) return;
      continuation = next;
      body.replaceChildren(...rows.map((d) => deviceRow(d, reload, errors)));
      more.hidden = !continuation;
      errors.textContent = "";
    } catch (error) {
      showError(errors, error);
    }
  };
  more.addEventListener("click", async () => {
    try {
      const page = await queryPage(sql(), continuation, 50);
      body.append(...page.items.map((d) => deviceRow(d, reload, errors)));
      shown = body.children.length;
      continuation = page.continuation;
      more.hidden = !continuation;
    } catch (error) { showError(errors, error); }
  });
  search.addEventListener("input", debounce(() => { shown = 50; reload(); }, 300));

  const newId = el("input", { id: "new-device-id", placeholder: "new device id", required: true });
  const create = el("form", {
    class: "inline",
    id: "create-device",
    onsubmit: async (event) => {
      event.preventDefault();
      try {
        await api("PUT", `/devices/${encodeId(newId.value.trim())}`, { deviceId: newId.value.trim() });
        newId.value = "";
        reload();
      } catch (error) { showError(errors, error); }
    },
  }, newId, el("button", { type: "submit", text: "Create device" }));

  view.replaceChildren(
    el("h2", { text: "Devices" }),
    el("div", { class: "row" }, search, create),
    errors,
    el("table", {},
      el("thead", {}, el("tr", {}, ["Device", "Connection", "Last activity", "Auth", "Status", ""].map((h) => el("th", { text: h })))),
      body),
    more);
  const reloadSoon = debounce(reload, 1000);
  onChanges = (batch) => {
    const visible = new Set([...body.children].map((row) => row.dataset.device));
    // A created device may belong on screen too: any change outside the rows shown reloads
    // when the list is not full.
    const touched = batch.devices.concat(batch.telemetry);
    if (batch.resync || touched.some((id) => visible.has(id) || body.children.length < shown)) reloadSoon();
  };
  reload();
}

// ---- one device -----------------------------------------------------------------------------

function deviceView(id) {
  const errors = errorBox();
  const summary = el("div", { class: "stats", id: "device-summary" });
  const twinBox = el("div", { class: "grid", id: "twin" });
  const etagText = el("code", { id: "twin-etag" });
  let etag = null;

  const patch = el("textarea", { id: "twin-patch", rows: 6 });
  patch.value = pretty({ tags: {}, properties: { desired: {} } });
  const patchResult = el("div", { id: "twin-patch-result" });
  const force = el("input", { type: "checkbox", id: "twin-force" });
  const patchForm = el("form", {
    id: "twin-form",
    onsubmit: async (event) => {
      event.preventDefault();
      patchResult.className = "";
      try {
        const body = parseJson(patch.value, "The patch");
        const answer = await api("PATCH", `/twins/${encodeId(id)}`, body, { "if-match": force.checked ? "*" : `"${etag}"` });
        patchResult.className = "ok";
        patchResult.textContent = `Applied: desired version ${answer.json.properties.desired.$version}`;
        renderTwin(answer.json);
      } catch (error) {
        patchResult.className = "error";
        showError(patchResult, error);
      }
    },
  },
  el("h2", { text: "Update tags and desired properties" }),
  patch,
  el("div", { class: "row" },
    el("button", { type: "submit", text: "Apply patch" }),
    el("label", {}, force, " ignore the etag (If-Match: *)"),
    el("span", { class: "muted" }, "etag ", etagText)),
  patchResult);

  const methodName = el("input", { id: "method-name", value: "lockDoor", required: true });
  const methodPayload = el("textarea", { id: "method-payload", rows: 3 });
  methodPayload.value = "{}";
  const methodTimeout = el("input", { id: "method-timeout", type: "number", min: 5, max: 300, value: 30 });
  const methodResult = el("pre", { id: "method-result", hidden: true });
  const methodError = errorBox();
  const methodForm = el("form", {
    id: "method-form",
    onsubmit: async (event) => {
      event.preventDefault();
      methodError.textContent = "";
      methodResult.hidden = true;
      try {
        const call = {
          methodName: methodName.value.trim(),
          payload: parseJson(methodPayload.value, "The payload"),
          responseTimeoutInSeconds: Number(methodTimeout.value),
        };
        const answer = await api("POST", `/twins/${encodeId(id)}/methods`, call);
        methodResult.textContent = `status ${answer.json.status}\n${pretty(answer.json.payload)}`;
        methodResult.hidden = false;
      } catch (error) { showError(methodError, error); }
    },
  },
  el("h2", { text: "Invoke a direct method" }),
  el("div", { class: "row" }, el("label", {}, "Method ", methodName), el("label", {}, "timeout (s) ", methodTimeout)),
  el("label", {}, "Payload (JSON)"), methodPayload,
  el("button", { type: "submit", text: "Invoke" }),
  methodError, methodResult);

  const messages = el("tbody", { id: "telemetry-rows" });
  const messagesNote = el("p", { class: "muted", id: "telemetry-note" });

  const showMetadata = el("input", { type: "checkbox", id: "twin-metadata", onchange: () => lastTwin && renderTwin(lastTwin) });
  let lastTwin = null;
  // $metadata doubles a twin's size on screen; it is one click away.
  const shown = (props) => {
    if (showMetadata.checked) return props;
    const copy = Object.assign({}, props);
    delete copy.$metadata;
    return copy;
  };

  function renderTwin(twin) {
    lastTwin = twin;
    etag = twin.etag;
    etagText.textContent = twin.etag;
    summary.replaceChildren(
      el("span", { class: `state-${twin.connectionState}`, id: "device-state", text: twin.connectionState }),
      el("span", { text: `status ${twin.status}` }),
      el("span", { text: `auth ${twin.authenticationType}` }),
      el("span", { class: "muted", text: `last activity ${twin.lastActivityTime}` }),
      el("span", { class: "muted", text: `twin version ${twin.version}` }));
    const desired = twin.properties.desired;
    const reported = twin.properties.reported;
    twinBox.replaceChildren(
      el("div", { class: "card" }, el("h2", { text: "Tags" }), el("pre", { id: "twin-tags", text: pretty(twin.tags || {}) })),
      el("div", { class: "card" }, el("h2", { text: `Desired (version ${desired.$version})` }), el("pre", { id: "twin-desired", text: pretty(shown(desired)) })),
      el("div", { class: "card" }, el("h2", { text: `Reported (version ${reported.$version})` }), el("pre", { id: "twin-reported", text: pretty(shown(reported)) })));
  }
  async function loadTwin() {
    try {
      renderTwin((await api("GET", `/twins/${encodeId(id)}`)).json);
      errors.textContent = "";
    } catch (error) { showError(errors, error); }
  }
  async function loadMessages() {
    try {
      const read = (await api("GET", `/$emulator/devices/${encodeId(id)}/messages`)).json;
      messagesNote.textContent = `${read.total} messages since the hub started; the last ${read.messages.length} kept.`;
      messages.replaceChildren(...read.messages.slice().reverse().map((m) => el("tr", {},
        el("td", { text: m.sequenceNumber }),
        el("td", { class: "muted", text: m.enqueuedTimeUtc }),
        el("td", {}, el("code", { text: m.body + (m.truncated ? " ..." : "") }), m.bodyEncoding === "base64" ? el("span", { class: "muted", text: " (base64)" }) : null),
        el("td", { class: "muted", text: m.properties.map(([k, v]) => `${k}=${v}`).join(" ") }))));
    } catch (error) { showError(errors, error); }
  }

  // The device's module identities (their keys come blanked, as the device's do).
  const modules = el("tbody", { id: "module-rows" });
  async function loadModules() {
    try {
      const list = (await api("GET", `/devices/${encodeId(id)}/modules`)).json || [];
      modules.replaceChildren(...list.map((m) => el("tr", { "data-module": m.moduleId },
        el("td", { text: m.moduleId }),
        el("td", { class: `state-${m.connectionState}`, text: m.connectionState }),
        el("td", { class: "muted", text: m.lastActivityTime || "" }),
        el("td", { class: "muted", text: m.managedBy || "" }))));
    } catch (error) { showError(errors, error); }
  }

  view.replaceChildren(
    el("p", {}, el("a", { href: "#/devices", text: "Devices" }), " / ", el("strong", { id: "device-id", text: id })),
    summary, errors,
    el("label", { class: "muted" }, showMetadata, " show $metadata"),
    twinBox,
    el("div", { class: "grid" }, el("div", { class: "card" }, patchForm), el("div", { class: "card" }, methodForm)),
    el("h2", { text: "Recent telemetry" }), messagesNote,
    el("table", {}, el("thead", {}, el("tr", {}, ["#", "Enqueued", "Body", "Properties"].map((h) => el("th", { text: h })))), messages),
    el("h2", { text: "Module identities" }),
    el("table", {}, el("thead", {}, el("tr", {}, ["Module", "Connection", "Last activity", "Managed by"].map((h) => el("th", { text: h })))), modules));
  const twinSoon = debounce(() => { loadTwin(); loadModules(); }, 300);
  const messagesSoon = debounce(loadMessages, 500);
  onChanges = (batch) => {
    // A module's changes are its device's record's, so they arrive as the device's.
    if (batch.resync || batch.devices.includes(id)) twinSoon();
    if (batch.resync || batch.telemetry.includes(id)) messagesSoon();
  };
  loadTwin();
  loadMessages();
  loadModules();
}

// ---- query console --------------------------------------------------------------------------

function queryView() {
  const text = el("textarea", { id: "query-text", rows: 4 });
  text.value = sessionStorage.getItem("query") || "SELECT * FROM devices";
  const errors = errorBox();
  errors.id = "query-error";
  const output = el("div", { id: "query-results" });
  const more = el("button", { type: "button", id: "query-more", text: "Next page", hidden: true });
  let continuation = null;
  let pageNumber = 0;

  function render(items) {
    pageNumber += 1;
    const flat = items.every((row) => row && typeof row === "object" && !Array.isArray(row) &&
      Object.values(row).every((v) => v === null || typeof v !== "object"));
    let body;
    if (flat && items.length) {
      const columns = [...new Set(items.flatMap((row) => Object.keys(row)))];
      body = el("table", {},
        el("thead", {}, el("tr", {}, columns.map((c) => el("th", { text: c })))),
        el("tbody", {}, items.map((row) => el("tr", {}, columns.map((c) => el("td", { text: row[c] === undefined ? "" : String(row[c]) }))))));
    } else {
      body = el("pre", { text: pretty(items) });
    }
    output.append(el("h2", { text: `Page ${pageNumber}: ${items.length} rows` }), body);
  }
  async function run(fresh) {
    errors.textContent = "";
    if (fresh) { output.replaceChildren(); continuation = null; pageNumber = 0; }
    try {
      sessionStorage.setItem("query", text.value);
      const page = await queryPage(text.value, continuation, 100);
      continuation = page.continuation;
      render(page.items);
      more.hidden = !continuation;
    } catch (error) {
      showError(errors, error);
      more.hidden = true;
    }
  }
  more.addEventListener("click", () => run(false));
  view.replaceChildren(
    el("h2", { text: "Query (IoT Hub query language)" }),
    el("form", { id: "query-form", onsubmit: (event) => { event.preventDefault(); run(true); } },
      text, el("div", { class: "row" }, el("button", { type: "submit", text: "Run" }),
        el("span", { class: "muted", text: "FROM devices or devices.jobs; pages of 100 rows" }))),
    errors, output, more);
  onChanges = () => {};
}

// ---- jobs -----------------------------------------------------------------------------------

function jobProgress(stats) {
  const total = stats ? stats.deviceCount : 0;
  const done = stats ? stats.succeededCount + stats.failedCount : 0;
  return total ? Math.round((100 * done) / total) : 0;
}

function progressBar(percent, id) {
  const fill = el("div", {});
  fill.style.width = `${percent}%`;
  return el("div", { class: "progress", id, role: "progressbar", "aria-valuenow": percent, "aria-valuemin": 0, "aria-valuemax": 100 }, fill);
}

function jobsView() {
  const errors = errorBox();
  const type = el("select", { id: "jobs-type" },
    el("option", { value: "", text: "all types" }),
    el("option", { value: "scheduleDeviceMethod", text: "direct method" }),
    el("option", { value: "scheduleUpdateTwin", text: "twin update" }));
  const status = el("select", { id: "jobs-status" },
    ["", "scheduled", "queued", "running", "completed", "failed", "cancelled"].map((s) => el("option", { value: s, text: s || "any status" })));
  const rows = el("tbody", { id: "job-rows" });

  async function reload() {
    try {
      const params = new URLSearchParams();
      if (type.value) params.set("jobType", type.value);
      if (status.value) params.set("jobStatus", status.value);
      // The hub pages jobs by id; read up to 1,000 so the newest are among them.
      const jobs = [];
      let continuation = null;
      do {
        const headers = { "x-ms-max-item-count": "100" };
        if (continuation) headers["x-ms-continuation"] = continuation;
        const answer = await api("GET", `/jobs/v2/query?${params}`, undefined, headers);
        jobs.push(...(answer.json || []));
        continuation = answer.headers.get("x-ms-continuation");
      } while (continuation && jobs.length < 1000);
      jobs.sort((a, b) => (b.createdTime || "").localeCompare(a.createdTime || ""));
      rows.replaceChildren(...jobs.map((job) => {
        const percent = jobProgress(job.deviceJobStatistics);
        return el("tr", { "data-job": job.jobId },
          el("td", {}, el("a", { href: `#/job/${encodeId(job.jobId)}`, text: job.jobId })),
          el("td", { text: job.type }),
          el("td", { text: job.status }),
          el("td", {}, progressBar(percent), el("span", { class: "muted", text: `${percent}%` })),
          el("td", { class: "muted", text: job.createdTime || "" }));
      }));
      errors.textContent = "";
    } catch (error) { showError(errors, error); }
  }
  type.addEventListener("change", reload);
  status.addEventListener("change", reload);

  view.replaceChildren(
    el("h2", { text: "Jobs" }),
    el("div", { class: "row" }, type, status),
    errors,
    el("table", {}, el("thead", {}, el("tr", {}, ["Job", "Type", "Status", "Progress", "Created"].map((h) => el("th", { text: h })))), rows),
    scheduleForm());
  const reloadSoon = debounce(reload, 1000);
  onChanges = (batch) => { if (batch.resync || batch.jobs.length) reloadSoon(); };
  reload();
}

function scheduleForm() {
  const errors = errorBox();
  const jobId = el("input", { id: "job-id", value: `job-${Date.now()}`, required: true });
  const kind = el("select", { id: "job-kind" },
    el("option", { value: "scheduleDeviceMethod", text: "direct method" }),
    el("option", { value: "scheduleUpdateTwin", text: "twin update" }));
  const condition = el("input", { id: "job-condition", size: 50, value: "deviceId IN ['myDeviceId']", required: true });
  const start = el("input", { id: "job-start", type: "datetime-local", step: 1 });
  const maxSecs = el("input", { id: "job-max-secs", type: "number", min: 1, value: 3600 });
  const methodName = el("input", { id: "job-method", value: "lockDoor" });
  const payload = el("textarea", { id: "job-payload", rows: 3 });
  payload.value = "{}";
  const timeout = el("input", { id: "job-timeout", type: "number", min: 5, max: 300, value: 30 });
  const twinPatch = el("textarea", { id: "job-twin", rows: 4 });
  twinPatch.value = pretty({ etag: "*", properties: { desired: { building: "43", floor: "3" } } });
  const methodPart = el("div", { id: "job-method-part" },
    el("div", { class: "row" }, el("label", {}, "Method ", methodName), el("label", {}, "response timeout (s) ", timeout)),
    el("label", {}, "Payload (JSON)"), payload);
  const twinPart = el("div", { id: "job-twin-part", hidden: true }, el("label", {}, "Twin patch (JSON: tags and desired properties)"), twinPatch);
  kind.addEventListener("change", () => {
    methodPart.hidden = kind.value !== "scheduleDeviceMethod";
    twinPart.hidden = kind.value === "scheduleDeviceMethod";
  });
  return el("form", {
    id: "job-form",
    class: "card",
    onsubmit: async (event) => {
      event.preventDefault();
      errors.textContent = "";
      try {
        const body = {
          jobId: jobId.value.trim(),
          type: kind.value,
          queryCondition: condition.value.trim(),
          startTime: start.value ? new Date(start.value).toISOString() : new Date().toISOString(),
          maxExecutionTimeInSeconds: Number(maxSecs.value),
        };
        if (kind.value === "scheduleDeviceMethod") {
          body.cloudToDeviceMethod = {
            methodName: methodName.value.trim(),
            payload: parseJson(payload.value, "The payload"),
            responseTimeoutInSeconds: Number(timeout.value),
          };
        } else {
          body.updateTwin = parseJson(twinPatch.value, "The twin patch");
        }
        await api("PUT", `/jobs/v2/${encodeId(body.jobId)}`, body);
        location.hash = `#/job/${encodeId(body.jobId)}`;
      } catch (error) { showError(errors, error); }
    },
  },
  el("h2", { text: "Schedule a job" }),
  el("div", { class: "row" }, el("label", {}, "Job id ", jobId), el("label", {}, "Type ", kind)),
  el("div", { class: "row" }, el("label", {}, "Devices where ", condition)),
  el("div", { class: "row" }, el("label", {}, "Start (local time; empty: now) ", start), el("label", {}, "max execution (s) ", maxSecs)),
  methodPart, twinPart,
  el("button", { type: "submit", text: "Schedule" }),
  errors);
}

function jobView(id) {
  const errors = errorBox();
  const head = el("div", { id: "job-head" });
  const outcomes = el("tbody", { id: "job-devices" });
  const more = el("button", { type: "button", text: "More devices", hidden: true });
  let continuation = null;
  let shownRows = 100;
  const sql = `SELECT * FROM devices.jobs WHERE devices.jobs.jobId = '${id.replace(/'/g, "")}'`;

  function outcomeRow(row) {
    const result = row.outcome && row.outcome.deviceMethodResponse
      ? `status ${row.outcome.deviceMethodResponse.status} ${JSON.stringify(row.outcome.deviceMethodResponse.payload)}`
      : row.error ? `${row.error.code}: ${row.error.description}` : "";
    return el("tr", {},
      el("td", {}, el("a", { href: `#/device/${encodeId(row.deviceId)}`, text: row.deviceId })),
      el("td", { text: row.status }),
      el("td", { class: "muted", text: row.lastUpdatedDateTimeUtc || "" }),
      el("td", {}, el("code", { text: result })));
  }
  async function load() {
    try {
      const job = (await api("GET", `/jobs/v2/${encodeId(id)}`)).json;
      const stats = job.deviceJobStatistics || { deviceCount: 0, succeededCount: 0, failedCount: 0, runningCount: 0, pendingCount: 0 };
      const percent = jobProgress(stats);
      const active = ["scheduled", "queued", "running"].includes(job.status);
      head.replaceChildren(...[
        el("div", { class: "stats" },
          el("span", { id: "job-status", text: `status ${job.status}` }),
          el("span", { text: job.type }),
          el("span", { class: "muted", text: `start ${job.startTime || ""}` }),
          el("span", { class: "muted", text: `end ${job.endTime || "-"}` })),
        progressBar(percent, "job-progress"),
        el("div", { class: "stats" },
          el("strong", { id: "job-percent", text: `${percent}%` }), " ",
          el("span", { text: `${stats.deviceCount} devices` }),
          el("span", { class: "ok", text: `${stats.succeededCount} succeeded` }),
          el("span", { class: "error", text: `${stats.failedCount} failed` }),
          el("span", { text: `${stats.runningCount} running` }),
          el("span", { text: `${stats.pendingCount} pending` })),
        job.statusMessage ? el("p", { class: "muted", text: job.statusMessage }) : null,
        job.failureReason ? el("p", { class: "error", text: job.failureReason }) : null,
        active ? el("button", {
          type: "button",
          id: "job-cancel",
          text: "Cancel job",
          onclick: () => api("POST", `/jobs/v2/${encodeId(id)}/cancel`).then(load, (e) => showError(errors, e)),
        }) : null].filter(Boolean));
      // Live reloads keep as many rows as "More devices" has shown.
      const rows = [];
      let next = null;
      do {
        const page = await queryPage(sql, next, 100);
        rows.push(...page.items);
        next = page.continuation;
      } while (next && rows.length < shownRows);
      continuation = next;
      outcomes.replaceChildren(...rows.map(outcomeRow));
      more.hidden = !continuation;
      errors.textContent = "";
    } catch (error) { showError(errors, error); }
  }
  more.addEventListener("click", async () => {
    try {
      const page = await queryPage(sql, continuation, 100);
      outcomes.append(...page.items.map(outcomeRow));
      shownRows = outcomes.children.length;
      continuation = page.continuation;
      more.hidden = !continuation;
    } catch (error) { showError(errors, error); }
  });
  view.replaceChildren(
    el("p", {}, el("a", { href: "#/jobs", text: "Jobs" }), " / ", el("strong", { id: "job-title", text: id })),
    head, errors,
    el("h2", { text: "Devices" }),
    el("table", {}, el("thead", {}, el("tr", {}, ["Device", "Status", "Updated", "Outcome"].map((h) => el("th", { text: h })))), outcomes),
    more);
  const loadSoon = debounce(load, 500);
  onChanges = (batch) => { if (batch.resync || batch.jobs.includes(id)) loadSoon(); };
  load();
}

// ---- routing --------------------------------------------------------------------------------

function route() {
  const hash = location.hash || "#/devices";
  const [, name, arg] = hash.match(/^#\/([a-z]+)(?:\/(.*))?$/) || [];
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.getAttribute("href") === `#/${name === "device" ? "devices" : name === "job" ? "jobs" : name}`);
  }
  const id = arg ? decodeURIComponent(arg) : "";
  if (name === "device" && id) deviceView(id);
  else if (name === "query") queryView();
  else if (name === "jobs") jobsView();
  else if (name === "job" && id) jobView(id);
  else devicesView();
}

window.addEventListener("hashchange", route);
route();
refreshCounts();
connectFeed();
