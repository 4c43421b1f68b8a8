//! Table tests (query, documents, expected rows or error) and property tests (no panics on any
//! input; `parse(print(ast)) == ast`).

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

fn twins() -> Vec<Value> {
    let twins = json!([
        {
            "deviceId": "dev1", "etag": "AAAAAAAAAAE=", "status": "enabled",
            "connectionState": "Connected", "lastActivityTime": "2024-01-02T03:04:05.000Z",
            "cloudToDeviceMessageCount": 0, "version": 5,
            "tags": {"location": {"region": "US", "plant": "Redmond43"}, "building": "43",
                     "group": "g1", "floor": 3},
            "properties": {
                "desired": {
                    "telemetryInterval": 10,
                    "$metadata": {"$lastUpdated": "2024-01-01T00:00:00.000Z", "$lastUpdatedVersion": 2,
                                  "telemetryInterval": {"$lastUpdated": "2024-01-01T00:00:00.000Z",
                                                        "$lastUpdatedVersion": 2}},
                    "$version": 2
                },
                "reported": {"telemetryConfig": {"status": "Success"}, "connectivity": "wired",
                             "temperature": 21.5, "firmware": "1.2.0", "online": true, "$version": 3}
            }
        },
        {
            "deviceId": "dev2", "status": "enabled", "connectionState": "Disconnected",
            "lastActivityTime": "2024-01-01T00:00:00.000Z",
            "tags": {"location": {"region": "US"}, "building": 43, "group": "g2", "floor": 1,
                     "note": "it's \"quoted\" \\ back"},
            "properties": {
                "desired": {"telemetryInterval": 30, "$version": 4},
                "reported": {"telemetryConfig": {"status": "Pending"}, "connectivity": "wifi",
                             "temperature": 19, "firmware": "1.1.9", "$version": 1}
            }
        },
        {
            "deviceId": "dev3", "status": "disabled", "connectionState": "Disconnected",
            "lastActivityTime": "2023-12-31T23:59:59.000Z",
            "tags": {"location": {"region": "EU"}, "group": "g1", "floor": 2.5},
            "properties": {
                "desired": {"$version": 1},
                "reported": {"telemetryConfig": {"status": "Success"}, "connectivity": "cellular",
                             "temperature": null, "$version": 7}
            }
        },
        {
            "deviceId": "dev4", "status": "enabled", "connectionState": "Connected",
            "lastActivityTime": "0001-01-01T00:00:00Z",
            "properties": {"desired": {"$version": 1}, "reported": {"$version": 1}}
        },
        {
            "deviceId": "dev5", "status": "enabled", "connectionState": "Connected",
            "lastActivityTime": "0001-01-01T00:00:00Z",
            "tags": {"x": null, "location": {"region": "US"}, "group": "g2", "[weird] key": "w",
                     "city": "Zürich"},
            "properties": {
                "desired": {"$version": 1},
                "reported": {"telemetryConfig": {"status": "Success"}, "connectivity": "wifi",
                             "temperature": 25.5, "$version": 2}
            }
        }
    ]);
    match twins {
        Value::Array(items) => items,
        _ => unreachable!(),
    }
}

fn job_rows() -> Vec<Value> {
    let rows = json!([
        {"deviceId": "dev1", "jobId": "myJobId", "jobType": "scheduleDeviceMethod",
         "status": "completed", "outcome": {"deviceMethodResponse": {"status": 200, "payload": null}}},
        {"deviceId": "dev2", "jobId": "myJobId", "jobType": "scheduleDeviceMethod",
         "status": "failed", "error": {"code": "Timeout", "description": "no response"}},
        {"deviceId": "dev1", "jobId": "otherJob", "jobType": "scheduleUpdateTwin",
         "status": "running", "outcome": {"deviceMethodResponse": null}}
    ]);
    match rows {
        Value::Array(items) => items,
        _ => unreachable!(),
    }
}

#[derive(Debug, Clone, Copy)]
enum Docs {
    Twins,
    Jobs,
}

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Row query: the ids of the rows (`deviceId`, or `deviceId@jobId` for job rows).
    Ids(&'static [&'static str]),
    /// Projection/aggregate: the rows as JSON text.
    Rows(&'static str),
    /// Error kind, position and a substring of the message.
    Err(QueryErrorKind, Option<usize>, &'static str),
}

use Docs::{Jobs, Twins};
use Expect::{Err as Fails, Ids, Rows};
use QueryErrorKind::{Syntax, Unsupported};

const ALL: &[&str] = &["dev1", "dev2", "dev3", "dev4", "dev5"];
const NONE: &[&str] = &[];

#[rustfmt::skip]
const CASES: &[(&str, Docs, Expect)] = &[
    // Examples from the IoT Hub docs.
    ("SELECT * FROM devices WHERE tags.location.region = 'US'", Twins, Ids(&["dev1", "dev2", "dev5"])),
    ("SELECT * FROM devices WHERE tags.location.region = 'US' AND properties.reported.telemetryConfig.status = 'Success'",
     Twins, Ids(&["dev1", "dev5"])),
    ("SELECT COUNT() AS numberOfDevices FROM devices", Twins, Rows(r#"[{"numberOfDevices": 5}]"#)),
    ("SELECT properties.reported.telemetryConfig.status AS status, COUNT() AS numberOfDevices FROM devices GROUP BY properties.reported.telemetryConfig.status",
     Twins, Rows(r#"[{"numberOfDevices": 1}, {"status": "Pending", "numberOfDevices": 1},
                    {"status": "Success", "numberOfDevices": 3}]"#)),
    ("SELECT * FROM devices WHERE deviceId IN ['dev1', 'dev2']", Twins, Ids(&["dev1", "dev2"])),
    ("SELECT * FROM devices.jobs WHERE devices.jobs.jobId = 'myJobId'", Jobs, Ids(&["dev1@myJobId", "dev2@myJobId"])),
    ("SELECT DeviceId, LastActivityTime FROM devices WHERE status = 'enabled'", Twins,
     Rows(r#"[{"deviceId": "dev1", "lastActivityTime": "2024-01-02T03:04:05.000Z"},
              {"deviceId": "dev2", "lastActivityTime": "2024-01-01T00:00:00.000Z"},
              {"deviceId": "dev4", "lastActivityTime": "0001-01-01T00:00:00Z"},
              {"deviceId": "dev5", "lastActivityTime": "0001-01-01T00:00:00Z"}]"#)),
    ("SELECT * FROM devices WHERE properties.reported.connectivity IN ['wired', 'wifi']", Twins,
     Ids(&["dev1", "dev2", "dev5"])),
    ("select * from devices where IS_DEFINED(tags.x)", Twins, Ids(&["dev5"])),

    // SELECT *, TOP, sources.
    ("SELECT * FROM devices", Twins, Ids(ALL)),
    ("SELECT TOP 2 * FROM devices", Twins, Ids(&["dev1", "dev2"])),
    ("SELECT TOP 0 * FROM devices", Twins, Ids(NONE)),
    ("SELECT TOP 0x2 * FROM devices WHERE status = 'enabled'", Twins, Ids(&["dev1", "dev2"])),
    ("SELECT * FROM devices.modules WHERE moduleId = 'm1'", Twins, Ids(NONE)),
    ("SELECT * FROM devices.jobs", Jobs, Ids(&["dev1@myJobId", "dev2@myJobId", "dev1@otherJob"])),
    ("SELECT * FROM devices.jobs WHERE jobId = 'myJobId' AND status = 'completed'", Jobs, Ids(&["dev1@myJobId"])),
    ("SELECT * FROM devices.jobs WHERE devices.jobs.jobType = 'scheduleUpdateTwin'", Jobs, Ids(&["dev1@otherJob"])),
    ("SELECT * FROM devices.jobs WHERE Devices.Jobs.JobId = 'otherJob'", Jobs, Ids(&["dev1@otherJob"])),
    ("SELECT * FROM devices.jobs WHERE devices.jobs.outcome.deviceMethodResponse.status = 200", Jobs,
     Ids(&["dev1@myJobId"])),

    // Comparisons.
    ("SELECT * FROM devices WHERE status != 'enabled'", Twins, Ids(&["dev3"])),
    ("SELECT * FROM devices WHERE status <> 'enabled'", Twins, Ids(&["dev3"])),
    ("SELECT * FROM devices WHERE tags.floor < 3", Twins, Ids(&["dev2", "dev3"])),
    ("SELECT * FROM devices WHERE tags.floor <= 3", Twins, Ids(&["dev1", "dev2", "dev3"])),
    ("SELECT * FROM devices WHERE tags.floor > 1", Twins, Ids(&["dev1", "dev3"])),
    ("SELECT * FROM devices WHERE tags.floor >= 2.5", Twins, Ids(&["dev1", "dev3"])),
    ("SELECT * FROM devices WHERE lastActivityTime > '2024-01-01T12:00:00.000Z'", Twins, Ids(&["dev1"])),
    ("SELECT * FROM devices WHERE deviceId >= 'dev4'", Twins, Ids(&["dev4", "dev5"])),
    ("SELECT * FROM devices WHERE properties.desired.telemetryInterval = 10.0", Twins, Ids(&["dev1"])),
    ("SELECT * FROM devices WHERE properties.desired.telemetryInterval = 0xA", Twins, Ids(&["dev1"])),
    ("SELECT * FROM devices WHERE tags.floor > -1e1 AND tags.floor < 25E-1", Twins, Ids(&["dev2"])),
    ("SELECT * FROM devices WHERE properties.reported.temperature >= 2.15E1", Twins, Ids(&["dev1", "dev5"])),
    ("SELECT * FROM devices WHERE properties.reported.online = true", Twins, Ids(&["dev1"])),
    ("SELECT * FROM devices WHERE properties.reported.online != false", Twins, Ids(&["dev1"])),
    ("SELECT * FROM devices WHERE tags.x = null", Twins, Ids(&["dev5"])),
    ("SELECT * FROM devices WHERE properties.reported.temperature = null", Twins, Ids(&["dev3"])),
    // Cross-type and undefined comparisons are false, never errors.
    ("SELECT * FROM devices WHERE tags.building = '43'", Twins, Ids(&["dev1"])),
    ("SELECT * FROM devices WHERE tags.building = 43", Twins, Ids(&["dev2"])),
    ("SELECT * FROM devices WHERE tags.building > '40'", Twins, Ids(&["dev1"])),
    ("SELECT * FROM devices WHERE tags.building != '43'", Twins, Ids(NONE)),
    ("SELECT * FROM devices WHERE tags.missing != 'x'", Twins, Ids(NONE)),
    ("SELECT * FROM devices WHERE NOT (tags.building = '43')", Twins, Ids(NONE)),
    ("SELECT * FROM devices WHERE tags.location = 'US'", Twins, Ids(NONE)),
    ("SELECT * FROM devices WHERE tags.x != 'a'", Twins, Ids(NONE)),
    ("SELECT * FROM devices WHERE properties.reported.online < true", Twins, Ids(NONE)),
    ("SELECT * FROM devices WHERE undefined = undefined", Twins, Ids(NONE)),
    // Truthiness: only boolean true satisfies a condition.
    ("SELECT * FROM devices WHERE true", Twins, Ids(ALL)),
    ("SELECT * FROM devices WHERE false", Twins, Ids(NONE)),
    ("SELECT * FROM devices WHERE 'abc'", Twins, Ids(NONE)),
    ("SELECT * FROM devices WHERE tags.location", Twins, Ids(NONE)),
    ("SELECT * FROM devices WHERE properties.reported.online", Twins, Ids(&["dev1"])),

    // Logic and precedence.
    ("SELECT * FROM devices WHERE NOT status = 'enabled'", Twins, Ids(&["dev3"])),
    ("SELECT * FROM devices WHERE connectionState = 'Connected' OR tags.location.region = 'EU'", Twins,
     Ids(&["dev1", "dev3", "dev4", "dev5"])),
    ("SELECT * FROM devices WHERE status = 'disabled' OR tags.[[group]] = 'g2' AND connectionState = 'Connected'",
     Twins, Ids(&["dev3", "dev5"])),
    ("SELECT * FROM devices WHERE (status = 'disabled' OR tags.[[group]] = 'g2') AND connectionState = 'Connected'",
     Twins, Ids(&["dev5"])),
    ("SELECT * FROM devices WHERE NOT NOT (status = 'disabled')", Twins, Ids(&["dev3"])),
    ("SELECT * FROM devices WHERE properties.desired.telemetryInterval * 2 = 60", Twins, Ids(&["dev2"])),
    ("SELECT * FROM devices WHERE -properties.desired.telemetryInterval < -20", Twins, Ids(&["dev2"])),
    ("SELECT * FROM devices WHERE properties.desired.telemetryInterval / 4 = 2.5", Twins, Ids(&["dev1"])),
    ("SELECT * FROM devices WHERE properties.desired.telemetryInterval % 7 = 2 - 0", Twins, Ids(&["dev2"])),
    ("SELECT * FROM devices WHERE tags.floor + 0.5 = 3", Twins, Ids(&["dev3"])),

    // Paths: escapes, $-names, case rules.
    ("SELECT * FROM devices WHERE tags.[[group]] = 'g1'", Twins, Ids(&["dev1", "dev3"])),
    ("SELECT * FROM devices WHERE tags.[[[weird] key]] = 'w'", Twins, Ids(&["dev5"])),
    ("SELECT * FROM devices WHERE [[tags]].[[location]].region = 'EU'", Twins, Ids(&["dev3"])),
    ("SELECT * FROM devices WHERE properties.desired.$version > 1", Twins, Ids(&["dev1", "dev2"])),
    ("SELECT * FROM devices WHERE properties.reported.$version >= 3", Twins, Ids(&["dev1", "dev3"])),
    ("SELECT * FROM devices WHERE $version = 5", Twins, Ids(NONE)),
    ("SELECT * FROM devices WHERE version = 5", Twins, Ids(&["dev1"])),
    ("SELECT * FROM devices WHERE properties.desired.$metadata.$lastUpdatedVersion = 2", Twins, Ids(&["dev1"])),
    ("SELECT * FROM devices WHERE properties.desired.$metadata.telemetryInterval.$lastUpdated > '2023'", Twins,
     Ids(&["dev1"])),
    ("select * FROM Devices wHeRe STATUS = 'disabled'", Twins, Ids(&["dev3"])),
    ("SELECT * FROM devices WHERE DeviceId = 'dev4'", Twins, Ids(&["dev4"])),
    ("SELECT * FROM devices WHERE CONNECTIONSTATE = 'Disconnected'", Twins, Ids(&["dev2", "dev3"])),
    ("SELECT * FROM devices WHERE tags.Location.region = 'US'", Twins, Ids(NONE)),
    ("SELECT * FROM devices WHERE tags.location.Region = 'US'", Twins, Ids(NONE)),

    // Strings.
    (r#"SELECT * FROM devices WHERE deviceId = "dev\u0031""#, Twins, Ids(&["dev1"])),
    (r#"SELECT * FROM devices WHERE tags.note = 'it\'s "quoted" \\ back'"#, Twins, Ids(&["dev2"])),
    (r#"SELECT * FROM devices WHERE tags.note = "it's \"quoted\" \\ back""#, Twins, Ids(&["dev2"])),
    ("SELECT * FROM devices WHERE tags.city = 'Zürich'", Twins, Ids(&["dev5"])),
    (r"SELECT * FROM devices WHERE tags.city = 'Z\u00FCrich'", Twins, Ids(&["dev5"])),

    // IN / NIN.
    ("SELECT * FROM devices WHERE properties.reported.connectivity NIN ['wired', 'wifi']", Twins, Ids(&["dev3"])),
    ("SELECT * FROM devices WHERE properties.reported.connectivity NOT IN ['wired', 'wifi']", Twins, Ids(&["dev3"])),
    ("SELECT * FROM devices WHERE tags.floor IN [1, 2.5]", Twins, Ids(&["dev2", "dev3"])),
    ("SELECT * FROM devices WHERE tags.floor IN [-1, 3.0]", Twins, Ids(&["dev1"])),
    ("SELECT * FROM devices WHERE tags.x IN [null]", Twins, Ids(&["dev5"])),
    ("SELECT * FROM devices WHERE deviceId IN []", Twins, Ids(NONE)),
    ("SELECT * FROM devices WHERE deviceId NIN []", Twins, Ids(ALL)),
    ("SELECT * FROM devices WHERE tags.location IN ['US']", Twins, Ids(NONE)),

    // Functions.
    ("SELECT * FROM devices WHERE IS_NULL(properties.reported.temperature)", Twins, Ids(&["dev3"])),
    ("SELECT * FROM devices WHERE IS_NUMBER(properties.reported.temperature)", Twins, Ids(&["dev1", "dev2", "dev5"])),
    ("SELECT * FROM devices WHERE IS_STRING(tags.building)", Twins, Ids(&["dev1"])),
    ("SELECT * FROM devices WHERE is_bool(properties.reported.online)", Twins, Ids(&["dev1"])),
    ("SELECT * FROM devices WHERE IS_OBJECT(tags.location)", Twins, Ids(&["dev1", "dev2", "dev3", "dev5"])),
    ("SELECT * FROM devices WHERE IS_PRIMITIVE(tags.location)", Twins, Ids(NONE)),
    ("SELECT * FROM devices WHERE IS_PRIMITIVE(tags.x)", Twins, Ids(&["dev5"])),
    ("SELECT * FROM devices WHERE NOT IS_DEFINED(tags)", Twins, Ids(&["dev4"])),
    ("SELECT * FROM devices WHERE IS_DEFINED(properties.reported.temperature)", Twins, Ids(&["dev1", "dev2", "dev3", "dev5"])),
    ("SELECT * FROM devices WHERE STARTSWITH(properties.reported.firmware, '1.2')", Twins, Ids(&["dev1"])),
    ("SELECT * FROM devices WHERE ENDSWITH(deviceId, '3')", Twins, Ids(&["dev3"])),
    ("SELECT * FROM devices WHERE STARTSWITH(tags.building, '4')", Twins, Ids(&["dev1"])),
    ("SELECT * FROM devices WHERE CONTAINS(tags.location.plant, 'mond')", Twins, Ids(&["dev1"])),
    ("SELECT * FROM devices WHERE IS_DEFINED(tags.x) = true", Twins, Ids(&["dev5"])),

    // Projections and aggregates.
    ("SELECT deviceId, tags.location.region AS region FROM devices WHERE status = 'enabled'", Twins,
     Rows(r#"[{"deviceId": "dev1", "region": "US"}, {"deviceId": "dev2", "region": "US"},
              {"deviceId": "dev4"}, {"deviceId": "dev5", "region": "US"}]"#)),
    ("SELECT TOP 1 deviceId FROM devices", Twins, Rows(r#"[{"deviceId": "dev1"}]"#)),
    ("SELECT tags.[[group]], tags.location FROM devices WHERE deviceId = 'dev1'", Twins,
     Rows(r#"[{"group": "g1", "location": {"region": "US", "plant": "Redmond43"}}]"#)),
    ("SELECT deviceId AS [[from]] FROM devices WHERE deviceId = 'dev2'", Twins, Rows(r#"[{"from": "dev2"}]"#)),
    ("SELECT COUNT() AS n FROM devices WHERE tags.location.region = 'US'", Twins, Rows(r#"[{"n": 3}]"#)),
    ("SELECT COUNT() AS n FROM devices WHERE status = 'nope'", Twins, Rows(r#"[{"n": 0}]"#)),
    ("SELECT COUNT() FROM devices", Twins, Rows(r#"[{"$1": 5}]"#)),
    ("SELECT count() as n FROM devices.modules", Twins, Rows(r#"[{"n": 5}]"#)),
    ("SELECT tags.[[group]] AS grp, COUNT() AS n FROM devices GROUP BY tags.[[group]]", Twins,
     Rows(r#"[{"n": 1}, {"grp": "g1", "n": 2}, {"grp": "g2", "n": 2}]"#)),
    ("SELECT COUNT() AS n FROM devices GROUP BY tags.location.region", Twins,
     Rows(r#"[{"n": 1}, {"region": "EU", "n": 1}, {"region": "US", "n": 3}]"#)),
    ("SELECT TOP 1 COUNT() AS n FROM devices GROUP BY status", Twins, Rows(r#"[{"status": "disabled", "n": 1}]"#)),
    ("SELECT COUNT() AS n FROM devices WHERE IS_DEFINED(tags.floor) GROUP BY tags.floor", Twins,
     Rows(r#"[{"floor": 1, "n": 1}, {"floor": 2.5, "n": 1}, {"floor": 3, "n": 1}]"#)),
    ("SELECT status FROM devices GROUP BY status", Twins, Rows(r#"[{"status": "disabled"}, {"status": "enabled"}]"#)),
    ("SELECT COUNT() AS n FROM devices WHERE status = 'nope' GROUP BY status", Twins, Rows("[]")),
    ("SELECT AVG(properties.reported.temperature) AS avg, SUM(properties.reported.temperature) AS sum, MIN(properties.reported.temperature) AS min, MAX(properties.reported.temperature) AS max FROM devices WHERE IS_NUMBER(properties.reported.temperature)",
     Twins, Rows(r#"[{"avg": 22.0, "sum": 66.0, "min": 19, "max": 25.5}]"#)),
    ("SELECT SUM(tags.floor) AS s FROM devices WHERE tags.floor IN [1, 3]", Twins, Rows(r#"[{"s": 4}]"#)),
    ("SELECT SUM(tags.building) AS s, COUNT() AS n FROM devices", Twins, Rows(r#"[{"n": 5}]"#)),
    ("SELECT MIN(deviceId) AS first, MAX(deviceId) AS last FROM devices", Twins,
     Rows(r#"[{"first": "dev1", "last": "dev5"}]"#)),
    ("SELECT AVG(tags.nothing) AS a, SUM(tags.nothing) AS s FROM devices", Twins, Rows(r#"[{"s": 0}]"#)),
    ("SELECT status, MAX(properties.desired.$version) AS v FROM devices GROUP BY status", Twins,
     Rows(r#"[{"status": "disabled", "v": 1}, {"status": "enabled", "v": 4}]"#)),

    // Syntax errors, with positions (0-based character offsets).
    ("SELECT * WHERE status = 'x'", Twins,
     Fails(Syntax, Some(9), "expected `FROM` after the projection at position 9, found `WHERE`")),
    ("", Twins, Fails(Syntax, Some(0), "expected `SELECT` at the start of the query at position 0, found end of input")),
    ("SELECT * FROM devices WHERE", Twins, Fails(Syntax, Some(27), "found end of input")),
    ("SELECT * FROM devices WHERE status = 'x", Twins, Fails(Syntax, Some(37), "expected closing '")),
    ("SELECT * FROM things", Twins,
     Fails(Syntax, Some(14), "expected `devices`, `devices.modules` or `devices.jobs` after `FROM` at position 14, found `things`")),
    ("SELECT * FROM devices.twins", Twins, Fails(Syntax, Some(22), "expected `modules` or `jobs`")),
    ("SELECT * FROM devices WHERE a = b = c", Twins, Fails(Syntax, Some(34), "found `=`")),
    ("SELECT * FROM devices WHERE tags.group = 'g1'", Twins,
     Fails(Syntax, Some(33), "found the reserved word `group`; escape it as `[[group]]`")),
    ("SELECT * FROM devices WHERE FOO(tags.x)", Twins, Fails(Syntax, Some(28), "unknown function `FOO`")),
    ("SELECT * FROM devices WHERE IS_DEFINED(tags.x, tags.y)", Twins,
     Fails(Syntax, Some(28), "`IS_DEFINED` at position 28 takes 1 argument, found 2")),
    ("SELECT * FROM devices WHERE STARTSWITH(deviceId)", Twins, Fails(Syntax, Some(28), "takes 2 arguments")),
    ("SELECT * FROM devices WHERE COUNT() > 1", Twins, Fails(Syntax, Some(28), "only allowed in the SELECT list")),
    ("SELECT IS_DEFINED(tags.x) FROM devices", Twins, Fails(Syntax, Some(7), "can only be used in WHERE")),
    ("SELECT COUNT(deviceId) FROM devices", Twins, Fails(Syntax, Some(13), "COUNT takes no argument")),
    ("SELECT TOP -1 * FROM devices", Twins, Fails(Syntax, Some(11), "expected a non-negative integer after `TOP`")),
    ("SELECT * FROM devices WHERE deviceId IN 'dev1'", Twins, Fails(Syntax, Some(40), "expected `[` after `IN`")),
    ("SELECT * FROM devices WHERE deviceId IN ['a', tags.x]", Twins,
     Fails(Syntax, Some(46), "expected a constant in the `IN` list at position 46, found `tags`")),
    ("SELECT * FROM devices WHERE deviceId IN ['a' 'b']", Twins, Fails(Syntax, Some(45), "expected `,` or `]`")),
    ("SELECT * FROM devices WHERE deviceId = 'x' extra", Twins,
     Fails(Syntax, Some(43), "expected an operator, `GROUP BY` or the end of the query at position 43, found `extra`")),
    ("SELECT * FROM devices WHERE status = 'a\\q'", Twins, Fails(Syntax, Some(39), "escapes")),
    ("SELECT * FROM devices WHERE x ! 1", Twins, Fails(Syntax, Some(30), "expected `=` after `!`")),
    ("SELECT * FROM devices WHERE ((x = 1)", Twins, Fails(Syntax, Some(36), "expected `)` to close the `(` at position 28")),
    ("SELECT * FROM devices WHERE tags.[[]] = 1", Twins, Fails(Syntax, Some(33), "empty escaped name")),
    ("SELECT * FROM devices WHERE tags.[[x = 1", Twins, Fails(Syntax, Some(33), "expected `]]`")),
    ("SELECT * FROM devices WHERE x = 0x", Twins, Fails(Syntax, Some(32), "hex digits")),
    ("SELECT * FROM devices WHERE x = 1e999", Twins, Fails(Syntax, Some(32), "number out of range")),
    ("SELECT * FROM devices WHERE x = 'a\\uD800'", Twins, Fails(Syntax, Some(34), "unpaired surrogate")),
    ("SELECT * FROM devices WHERE x = 'a\\u12'", Twins, Fails(Syntax, Some(34), "four hex digits")),
    ("SELECT * FROM devices WHERE x = #", Twins, Fails(Syntax, Some(32), "unexpected character `#`")),
    ("SELECT * FROM devices WHERE x = [1]", Twins, Fails(Syntax, Some(32), "arrays are only allowed after")),
    ("SELECT * FROM devices WHERE x = - 'a'", Twins, Ids(NONE)),
    ("SELECT * FROM devices WHERE x = -", Twins, Fails(Syntax, Some(33), "expected a value")),
    ("SELECT *, deviceId FROM devices", Twins, Fails(Syntax, Some(8), "expected `FROM` after the projection")),
    ("SELECT deviceId AS FROM devices", Twins, Fails(Syntax, Some(19), "found the reserved word `FROM`")),
    ("SELECT * FROM devices GROUP status", Twins, Fails(Syntax, Some(28), "expected `BY` after `GROUP`")),

    // Parsed but unsupported.
    ("SELECT COUNT() AS n FROM devices.jobs", Jobs, Fails(Unsupported, Some(7), "only `SELECT *` is supported with `FROM devices.jobs`")),
    ("SELECT deviceId FROM devices.jobs", Jobs, Fails(Unsupported, Some(7), "only `SELECT *`")),
    ("SELECT * FROM devices.jobs GROUP BY devices.jobs.status", Jobs, Fails(Unsupported, Some(27), "GROUP BY is not supported")),
    ("SELECT * FROM devices.jobs WHERE tags.x = 1", Jobs, Fails(Unsupported, Some(33), "twin and job fields cannot be mixed")),
    ("SELECT * FROM devices.jobs WHERE devices.tags.x = 1", Jobs, Fails(Unsupported, Some(33), "use `devices.jobs.<field>`")),
    ("SELECT * FROM devices WHERE devices.jobs.jobId = 'x'", Twins, Fails(Unsupported, Some(28), "needs `FROM devices.jobs`")),
    ("SELECT devices.jobs.jobId FROM devices", Twins, Fails(Unsupported, Some(7), "needs `FROM devices.jobs`")),
    ("SELECT * FROM devices WHERE status = 'a' GROUP BY status", Twins, Fails(Unsupported, Some(41), "`SELECT *` cannot be combined with GROUP BY")),
    ("SELECT deviceId, COUNT() AS n FROM devices", Twins, Fails(Unsupported, Some(7), "mixed only with GROUP BY")),
    ("SELECT status, COUNT() AS n FROM devices GROUP BY tags.x", Twins, Fails(Unsupported, Some(7), "must be an aggregate or the GROUP BY path `tags.x`")),
    ("SELECT tags.a, properties.desired.a FROM devices", Twins, Fails(Unsupported, Some(7), "duplicate column name `a`")),
    ("SELECT COUNT() AS x FROM devices GROUP BY tags.x", Twins, Fails(Unsupported, Some(7), "duplicate column name `x`")),
];

fn ids(rows: &[Value], docs: Docs) -> Vec<String> {
    rows.iter()
        .map(|row| {
            let device = row["deviceId"].as_str().unwrap_or("?");
            match docs {
                Twins => device.to_owned(),
                Jobs => format!("{device}@{}", row["jobId"].as_str().unwrap_or("?")),
            }
        })
        .collect()
}

#[test]
fn table() {
    let twins = twins();
    let jobs = job_rows();
    let mut failures = Vec::new();
    for &(text, docs, expect) in CASES {
        let documents = match docs {
            Twins => &twins,
            Jobs => &jobs,
        };
        let outcome = parse(text).and_then(|query| {
            // Every parsed query prints to text that parses back to the same AST.
            let printed = query.to_string();
            assert_eq!(
                parse(&printed).as_ref(),
                Ok(&query),
                "round trip of {text:?} via {printed:?}"
            );
            execute(&query, documents.iter()).map(|rows| (query, rows))
        });
        let ok = match (expect, &outcome) {
            (Ids(expected), Ok((query, rows))) => {
                assert!(query.is_row_query(), "{text}: expected a row query");
                ids(rows, docs) == expected
            }
            (Rows(expected), Ok((query, rows))) => {
                assert!(!query.is_row_query(), "{text}: expected a projection");
                let expected: Value = serde_json::from_str(expected).expect("valid expected JSON");
                Value::Array(rows.clone()) == expected
            }
            (Fails(kind, position, needle), Err(e)) => {
                e.kind() == kind && e.position() == position && e.message().contains(needle)
            }
            _ => false,
        };
        if !ok {
            let got = outcome.map(|(_, rows)| Value::Array(rows).to_string());
            failures.push(format!(
                "{text}\n    expected {expect:?}\n    got      {got:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing cases:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn row_queries_match_like_execute() {
    let twins = twins();
    let query = parse("SELECT TOP 10 * FROM devices WHERE tags.location.region = 'US'").unwrap();
    let matched: Vec<&Value> = twins.iter().filter(|t| query.matches(t)).collect();
    assert_eq!(matched.len(), 3);
    assert_eq!(execute(&query, &twins).unwrap().len(), 3);
}

#[test]
fn job_query_conditions() {
    let twins = twins();
    let cases: &[(&str, &[&str])] = &[
        ("*", ALL),
        (" * ", ALL),
        ("deviceId IN ['dev1', 'dev2']", &["dev1", "dev2"]),
        ("deviceId = 'dev3'", &["dev3"]),
        ("tags.building = '43'", &["dev1"]),
        (
            "tags.location.region = 'US' AND NOT connectionState = 'Connected'",
            &["dev2"],
        ),
    ];
    for &(text, expected) in cases {
        let condition = parse_condition(text).unwrap();
        let matched: Vec<&str> = twins
            .iter()
            .filter(|t| condition.matches(t))
            .filter_map(|t| t["deviceId"].as_str())
            .collect();
        assert_eq!(matched, expected, "{text}");
        assert_eq!(
            parse_condition(&condition.to_string()),
            Ok(condition),
            "{text}"
        );
    }
    assert_eq!(parse_condition("*").unwrap().to_string(), "true");

    let errors: &[(&str, QueryErrorKind, usize, &str)] = &[
        ("", Syntax, 0, "found end of input"),
        ("SELECT * FROM devices", Syntax, 0, "found `SELECT`"),
        (
            "devices.jobs.jobId = 'x'",
            Unsupported,
            0,
            "needs `FROM devices.jobs`",
        ),
        (
            "deviceId = 'd1' GROUP BY x",
            Syntax,
            16,
            "expected `AND`, `OR` or the end of the condition at position 16, found `GROUP`",
        ),
        ("* AND x = 1", Syntax, 0, "found `*`"),
    ];
    for &(text, kind, position, needle) in errors {
        let e = parse_condition(text).unwrap_err();
        assert_eq!(
            (e.kind(), e.position()),
            (kind, Some(position)),
            "{text}: {e}"
        );
        assert!(e.message().contains(needle), "{text}: {e}");
    }
}

#[test]
fn too_long() {
    let mut text = String::from("SELECT * FROM devices WHERE deviceId = 'x'");
    while text.chars().count() <= MAX_QUERY_LENGTH {
        text.push_str(" OR deviceId = 'x'");
    }
    let e = parse(&text).unwrap_err();
    assert_eq!(e.kind(), QueryErrorKind::TooLong);
    assert!(e.message().contains("maximum is 8192"), "{e}");
    assert_eq!(
        parse_condition(&"x".repeat(8193)).unwrap_err().kind(),
        QueryErrorKind::TooLong
    );
    // 8192 characters (multi-byte ones count once) is still accepted.
    let prefix = "SELECT * FROM devices WHERE tags.city = '";
    let exact = format!(
        "{prefix}{}'",
        "ü".repeat(MAX_QUERY_LENGTH - 1 - prefix.len())
    );
    assert_eq!(exact.chars().count(), 8192);
    parse(&exact).unwrap();
}

/// Runs `f` on a thread with a stack of `bytes`, so recursion deeper than it allows shows up as a
/// crash of this test.
fn on_stack(bytes: usize, f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(bytes)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn long_chains_are_refused_not_a_stack_overflow() {
    // An eighth of the 2 MiB the hub's threads have: refusing must not recurse through a chain.
    on_stack(256 * 1024, || {
        for (term, op) in [
            ("a = 1", " AND "),
            ("a = 1", " OR "),
            ("1", " + "),
            ("2", "*"),
        ] {
            let text = vec![term; 200_000].join(op);
            // The length limit refuses it first...
            assert_eq!(
                parse_condition(&text).unwrap_err().kind(),
                QueryErrorKind::TooLong
            );
            // ...and the parser alone refuses it too, before building a tree that every walk
            // (print, evaluate, drop) would recurse through 200,000 levels deep.
            let e = super::parser::parse_condition(&text).unwrap_err();
            assert_eq!(e.kind(), QueryErrorKind::Syntax, "{op}");
            assert!(e.message().contains("more than 1024 operators"), "{e}");
        }
        // The densest chain that fits in the length limit is refused the same way.
        let text = format!(
            "SELECT * FROM devices WHERE {} = 2",
            vec!["1"; 4000].join("+")
        );
        assert!(text.chars().count() <= MAX_QUERY_LENGTH);
        let e = parse(&text).unwrap_err();
        assert!(e.message().contains("more than 1024 operators"), "{e}");
    });
}

#[test]
fn full_length_chains_parse_print_and_run() {
    // The 2 MiB the hub's threads (tokio workers, the blocking pool) have: the deepest tree the
    // parser allows is printed, evaluated and dropped within it, even in a debug build.
    on_stack(2 * 1024 * 1024, || {
        let twins = twins();
        for op in [" AND ", " OR "] {
            let prefix = "SELECT * FROM devices WHERE ";
            let mut terms = vec!["tags.floor = 3"];
            while prefix.len() + (terms.len() + 1) * (terms[0].len() + op.len()) - op.len()
                <= MAX_QUERY_LENGTH
            {
                terms.push("tags.floor = 3");
            }
            let text = format!("{prefix}{}", terms.join(op));
            assert!(
                MAX_QUERY_LENGTH - text.len() < terms[0].len() + op.len(),
                "{op}"
            );
            let query = parse(&text).unwrap();
            let printed = query.to_string();
            assert_eq!(parse(&printed).unwrap(), query.clone());
            let rows = execute(&query, twins.iter()).unwrap();
            assert_eq!(rows.len(), 1, "{op}");
            let condition = parse_condition(&text[prefix.len()..]).unwrap();
            assert_eq!(filter_parallel(&condition, &twins).len(), 1);
        }
        // The deepest chain allowed: 1,024 terms, 1,023 `AND`s, within the length limit.
        let text = vec!["a=1"; 1024].join(" AND ");
        assert!(text.len() <= MAX_QUERY_LENGTH);
        let condition = parse_condition(&text).unwrap();
        // Printed with its parentheses it outgrows the length limit: reparse it past that check.
        assert_eq!(
            super::parser::parse_condition(&condition.to_string()).unwrap(),
            condition
        );
        assert!(filter_parallel(&condition, &twins).is_empty());
    });
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    for text in [
        format!(
            "SELECT * FROM devices WHERE {}x = 1{}",
            "(".repeat(3000),
            ")".repeat(3000)
        ),
        format!("SELECT * FROM devices WHERE {}x", "NOT ".repeat(1500)),
        format!("SELECT * FROM devices WHERE {}x = 1", "-".repeat(7000)),
        format!(
            "SELECT * FROM devices WHERE {}x{}",
            "IS_NULL(".repeat(800),
            ")".repeat(800)
        ),
    ] {
        let e = parse(&text).unwrap_err();
        assert!(e.message().contains("nested more than 64 levels"), "{e}");
    }
    // Long flat chains are fine: they do not nest.
    let mut text = String::from("SELECT * FROM devices WHERE deviceId = 'dev2'");
    for _ in 0..400 {
        text.push_str(" OR x = 1");
    }
    let query = parse(&text).unwrap();
    assert_eq!(execute(&query, &twins()).unwrap().len(), 1);
    assert_eq!(parse(&query.to_string()), Ok(query));
}

#[test]
fn printed_minus_chains_reparse() {
    // Fuzzing regression (fuzz/ query): 57 minus signs parse, but were printed as 57 nested
    // `-(...)`, 114 levels, which the parser refused.
    for (chain, operand) in [
        (57, "x"),
        (64, "x"),
        (63, "-5"),
        (3, "-1.5"),
        (2, "(5)"),
        (2, "IS_NULL(x)"),
    ] {
        let text = format!(
            "SELECT * FROM devices WHERE {}{operand} > 1",
            "-".repeat(chain)
        );
        let query = parse(&text).unwrap();
        assert_eq!(parse(&query.to_string()), Ok(query), "{text}");
    }
}

#[test]
fn display_is_canonical_text() {
    let cases = [
        (
            "select top 3 DeviceId as Id, tags.[[group]] from DEVICES where not (a = 1 or b <> 2) and c in [1, -2.5, 'x', null]",
            Some(
                "SELECT TOP 3 deviceId AS Id, tags.[[group]] FROM devices WHERE NOT (a = 1 OR b != 2) AND c IN [1, -2.5, 'x', null]",
            ),
        ),
        ("SELECT * FROM devices WHERE (a + b) * -c > -(d - 1)", None),
        ("SELECT * FROM devices WHERE a - -1 = 2 AND NOT NOT x", None),
        (
            "SELECT * FROM devices.jobs WHERE devices.jobs.jobId = 'j' AND devices.jobs.status = 'completed'",
            Some("SELECT * FROM devices.jobs WHERE jobId = 'j' AND status = 'completed'"),
        ),
        (
            "SELECT * FROM devices WHERE tags.[[a b]].[[select]] = 'it\\'s\\n'",
            Some("SELECT * FROM devices WHERE tags.[[a b]].[[select]] = 'it\\'s\\u000A'"),
        ),
        (
            "SELECT * FROM devices WHERE x = 1.5e3 AND y = 0x10 AND z = 1e20",
            Some("SELECT * FROM devices WHERE x = 1500.0 AND y = 16 AND z = 1e20"),
        ),
    ];
    for (text, expected) in cases {
        let query = parse(text).unwrap();
        let printed = query.to_string();
        if let Some(expected) = expected {
            assert_eq!(printed, expected);
        }
        assert_eq!(parse(&printed), Ok(query), "{printed}");
    }
    let e =
        parse("SELECT DeviceId, COUNT() AS n FROM devices GROUP BY tags.[[group]]").unwrap_err();
    assert_eq!(
        e.to_string(),
        "`deviceId` must be an aggregate or the GROUP BY path `tags.[[group]]` (at position 7)"
    );
}

#[test]
fn case_insensitive_system_properties_are_canonical() {
    let query = parse("SELECT DEVICEID, Tags.location FROM devices").unwrap();
    assert_eq!(
        query.to_string(),
        "SELECT deviceId, tags.location FROM devices"
    );
}

// ---------- property tests ----------

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z_$][a-zA-Z0-9_$]{0,6}",
        1 => prop::sample::select(vec!["group", "SELECT", "In", "nin", "undefined", "$metadata"])
            .prop_map(str::to_owned),
        // Needs `[[escaping]]`: anything without `]` (so `]]` cannot end it early).
        1 => "[^\\]]{1,4}",
    ]
}

fn path(jobs: bool) -> impl Strategy<Value = Path> {
    let first = prop_oneof![
        Just("tags".to_owned()),
        Just("properties".to_owned()),
        Just("DeviceId".to_owned()),
        Just("jobId".to_owned()),
        segment(),
    ];
    (first, prop::collection::vec(segment(), 0..3))
        .prop_filter("source rules for the first segment", move |(first, _)| {
            let banned: &[&str] = if jobs {
                &["devices", "tags", "properties"]
            } else {
                &["devices"]
            };
            !banned.iter().any(|b| b.eq_ignore_ascii_case(first))
        })
        .prop_filter_map("non-empty", |(first, rest)| {
            Path::new(std::iter::once(first).chain(rest))
        })
}

fn literal() -> impl Strategy<Value = Literal> {
    prop_oneof![
        Just(Literal::Undefined),
        Just(Literal::Null),
        any::<bool>().prop_map(Literal::Bool),
        any::<i64>().prop_map(|i| Literal::Number(Number::Int(i))),
        any::<f64>()
            .prop_filter("finite", |x| x.is_finite())
            .prop_map(|x| Literal::Number(Number::Float(x))),
        any::<String>().prop_map(Literal::String),
    ]
}

fn function() -> impl Strategy<Value = Function> {
    prop::sample::select(vec![
        Function::IsDefined,
        Function::IsNull,
        Function::IsBool,
        Function::IsNumber,
        Function::IsString,
        Function::IsObject,
        Function::IsArray,
        Function::IsPrimitive,
        Function::StartsWith,
        Function::EndsWith,
        Function::Contains,
    ])
}

fn binary_op() -> impl Strategy<Value = BinaryOp> {
    prop::sample::select(vec![
        BinaryOp::Or,
        BinaryOp::And,
        BinaryOp::Eq,
        BinaryOp::Ne,
        BinaryOp::Lt,
        BinaryOp::Le,
        BinaryOp::Gt,
        BinaryOp::Ge,
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Mod,
    ])
}

fn expr(jobs: bool) -> impl Strategy<Value = Expr> {
    let leaf = prop_oneof![
        literal().prop_map(Expr::Literal),
        path(jobs).prop_map(Expr::Path)
    ];
    leaf.prop_recursive(6, 48, 3, |inner| {
        prop_oneof![
            inner.clone().prop_map(|e| Expr::Not(Box::new(e))),
            inner.clone().prop_map(|e| Expr::Neg(Box::new(e))),
            (binary_op(), inner.clone(), inner.clone()).prop_map(|(op, l, r)| Expr::Binary {
                op,
                left: Box::new(l),
                right: Box::new(r),
            }),
            (
                inner.clone(),
                prop::collection::vec(literal(), 0..4),
                any::<bool>()
            )
                .prop_map(|(e, list, negated)| Expr::In {
                    expr: Box::new(e),
                    list,
                    negated,
                }),
            (function(), prop::collection::vec(inner, 2)).prop_map(|(function, mut args)| {
                args.truncate(function.arity());
                Expr::Call { function, args }
            }),
        ]
    })
}

fn aggregate() -> impl Strategy<Value = Aggregate> {
    prop_oneof![
        Just(Aggregate::Count),
        path(false).prop_map(Aggregate::Avg),
        path(false).prop_map(Aggregate::Sum),
        path(false).prop_map(Aggregate::Min),
        path(false).prop_map(Aggregate::Max),
    ]
}

fn aliased(exprs: Vec<ProjectionExpr>) -> Projection {
    Projection::Items(
        exprs
            .into_iter()
            .enumerate()
            .map(|(i, expr)| ProjectionItem {
                expr,
                alias: Some(format!("c{i}")),
            })
            .collect(),
    )
}

fn twin_query() -> impl Strategy<Value = Query> {
    let shape = prop_oneof![
        Just((Projection::All, None)),
        prop::collection::vec(path(false).prop_map(ProjectionExpr::Path), 1..4)
            .prop_map(|items| (aliased(items), None)),
        prop::collection::vec(aggregate().prop_map(ProjectionExpr::Aggregate), 1..4)
            .prop_map(|items| (aliased(items), None)),
        (path(false), prop::collection::vec(aggregate(), 0..3)).prop_map(|(group, aggs)| {
            let mut items = vec![ProjectionExpr::Path(group.clone())];
            items.extend(aggs.into_iter().map(ProjectionExpr::Aggregate));
            (aliased(items), Some(group))
        }),
    ];
    let source = prop::sample::select(vec![Source::Devices, Source::DevicesModules]);
    (
        any::<Option<u64>>(),
        shape,
        source,
        prop::option::of(expr(false)),
    )
        .prop_map(|(top, (projection, group_by), source, condition)| Query {
            top,
            projection,
            source,
            condition: condition.map(|expr| Condition { expr }),
            group_by,
        })
}

fn job_query() -> impl Strategy<Value = Query> {
    (any::<Option<u64>>(), prop::option::of(expr(true))).prop_map(|(top, condition)| Query {
        top,
        projection: Projection::All,
        source: Source::DevicesJobs,
        condition: condition.map(|expr| Condition { expr }),
        group_by: None,
    })
}

const TOKENS: &[&str] = &[
    "SELECT",
    "select",
    "TOP",
    "5",
    "*",
    "FROM",
    "devices",
    "devices.jobs",
    "devices.modules",
    "WHERE",
    "GROUP",
    "BY",
    "AS",
    "AND",
    "OR",
    "NOT",
    "IN",
    "NIN",
    "COUNT()",
    "COUNT",
    "(",
    ")",
    "[",
    "]",
    "[[",
    "]]",
    ",",
    ".",
    "=",
    "!=",
    "<>",
    "<",
    "<=",
    ">",
    ">=",
    "+",
    "-",
    "/",
    "%",
    "'a'",
    "\"b\"",
    "'",
    "\"",
    "\\",
    "\\u",
    "0x",
    "0x1F",
    "1.5",
    "1e",
    "-2",
    "null",
    "true",
    "undefined",
    "tags",
    "tags.[[group]]",
    "deviceId",
    "IS_DEFINED",
    "STARTSWITH",
    "$version",
    "properties.reported.x",
    "\u{0}",
    "é",
    "\n",
];

proptest! {
    #[test]
    fn parser_never_panics_on_arbitrary_text(text in any::<String>()) {
        let _ = parse(&text);
        let _ = parse_condition(&text);
    }

    #[test]
    fn parser_never_panics_on_token_soup(
        tokens in prop::collection::vec(prop::sample::select(TOKENS), 0..40),
        glue in prop::sample::select(vec!["", " "]),
    ) {
        let text = tokens.join(glue);
        if let Ok(query) = parse(&text) {
            prop_assert_eq!(parse(&query.to_string()), Ok(query.clone()));
            let _ = execute(&query, &twins());
        }
        if let Ok(condition) = parse_condition(&text) {
            prop_assert_eq!(parse_condition(&condition.to_string()), Ok(condition.clone()));
        }
    }

    #[test]
    fn printed_twin_queries_reparse_to_the_same_ast(query in twin_query()) {
        let text = query.to_string();
        prop_assert_eq!(parse(&text), Ok(query.clone()), "printed as {}", text);
        // And they run (results are not checked here).
        prop_assert!(execute(&query, &twins()).is_ok());
    }

    #[test]
    fn printed_job_queries_reparse_to_the_same_ast(query in job_query()) {
        let text = query.to_string();
        prop_assert_eq!(parse(&text), Ok(query.clone()), "printed as {}", text);
        prop_assert!(execute(&query, &job_rows()).is_ok());
    }

    #[test]
    fn printed_conditions_reparse_to_the_same_ast(expr in expr(false)) {
        let condition = Condition { expr };
        let text = condition.to_string();
        prop_assert_eq!(parse_condition(&text), Ok(condition.clone()), "printed as {}", text);
        let _ = twins().iter().filter(|t| condition.matches(t)).count();
    }
}

/// Twins whose group values mix kinds (undefined, null, booleans, numbers, strings, arrays).
fn mixed_groups(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let g = match i % 7 {
                0 => json!(null),
                1 => json!(i % 3 == 0),
                2 => json!(i % 11),
                3 => json!((i % 5) as f64 / 2.0),
                4 => json!(format!("s{}", i % 13)),
                5 => json!([i % 2]),
                _ => return json!({"deviceId": format!("d{i}"), "tags": {}}),
            };
            json!({"deviceId": format!("d{i}"), "tags": {"g": g, "x": i}})
        })
        .collect()
}

proptest! {
    /// Paging an aggregate by group, with any page size and `TOP`, gives exactly the rows of
    /// one unpaged run, in order: nothing twice, nothing missing.
    #[test]
    fn aggregate_pages_add_up_to_one_run(n in 0usize..200, limit in 1usize..12, top in proptest::option::of(0u64..40)) {
        let docs = mixed_groups(n);
        let top_text = top.map(|t| format!("TOP {t} ")).unwrap_or_default();
        let query = parse(&format!(
            "SELECT {top_text}tags.g AS g, COUNT() AS n, MAX(tags.x) AS m FROM devices GROUP BY tags.g"
        )).unwrap();
        let whole = execute(&query, docs.iter()).unwrap();
        let mut paged = Vec::new();
        let mut after = None;
        loop {
            let left = top.map_or(usize::MAX, |t| t as usize - paged.len().min(t as usize));
            let page = aggregate_page(&query, docs.iter(), after.as_ref(), limit.min(left)).unwrap();
            prop_assert!(page.rows.len() <= limit);
            paged.extend(page.rows);
            if !page.more || paged.len() as u64 >= top.unwrap_or(u64::MAX) {
                break;
            }
            // A position survives its trip through a token.
            after = page.last.as_ref().and_then(|p| GroupPosition::decode(&p.encode()));
            prop_assert!(after.is_some());
        }
        prop_assert_eq!(paged, whole);
    }
}

#[test]
fn aggregate_page_refuses_row_queries() {
    let query = parse("SELECT deviceId FROM devices").unwrap();
    assert!(!query.is_aggregate());
    let error = aggregate_page(&query, twins().iter(), None, 10).unwrap_err();
    assert_eq!(error.kind(), Unsupported);
    assert!(parse("SELECT COUNT() FROM devices").unwrap().is_aggregate());
    assert!(
        parse("SELECT status FROM devices GROUP BY status")
            .unwrap()
            .is_aggregate()
    );
}

#[test]
fn a_condition_pins_a_field_only_through_and_ed_equalities() {
    let pinned = |text: &str| {
        let query = parse(text).expect("parses");
        query
            .condition
            .as_ref()
            .and_then(|c| c.pinned_string("jobId"))
            .map(str::to_owned)
    };
    let jobs = "SELECT * FROM devices.jobs WHERE ";
    assert_eq!(
        pinned(&format!("{jobs}devices.jobs.jobId = 'j1'")),
        Some("j1".into())
    );
    assert_eq!(
        pinned(&format!("{jobs}status = 'completed' AND 'j2' = jobId")),
        Some("j2".into())
    );
    assert_eq!(pinned(&format!("{jobs}jobId = 'j1' OR jobId = 'j2'")), None);
    assert_eq!(pinned(&format!("{jobs}NOT (jobId = 'j1')")), None);
    assert_eq!(pinned(&format!("{jobs}jobId != 'j1'")), None);
    assert_eq!(pinned(&format!("{jobs}jobId = 7")), None);
    assert_eq!(pinned(&format!("{jobs}outcome.jobId = 'j1'")), None);
}
