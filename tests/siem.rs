//! The OCSF and ECS encodings, validated against the published schemas vendored under `tests/data/`.
//!
//! OCSF: every required attribute of the class and of each object is present, every attribute is one the class
//! or object defines, with the dictionary's type, every `*_id` enum value is allowed, `at_least_one`
//! constraints hold, and `class_uid`, `category_uid` and `type_uid` agree with the class and category files.
//! ECS: every field is an ECS field of the right type (bar the custom `tower_audit.*` and `labels.*`), and the
//! categorisation fields use only allowed values, each `event.type` expected for its `event.category`.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};
use tower_audit::{
    AuditEvent, AuditSink, ECS_VERSION, Encoding, JsonLinesSink, OCSF_VERSION, Outcome, encode_ecs, encode_ocsf, kind,
};
use uuid::Uuid;

fn data(rel: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------------------------
// OCSF

struct Ocsf {
    dictionary: Value,
    categories: Value,
}

/// A class or object with its `extends` chain and `$include`s resolved (profiles left out).
struct Resolved {
    caption: String,
    category: Option<String>,
    uid: Option<u64>,
    attributes: Map<String, Value>,
    constraints: Vec<(String, Vec<String>)>,
}

fn merge_attribute(into: &mut Map<String, Value>, name: &str, new: &Value) {
    let entry = into.entry(name.to_owned()).or_insert_with(|| Value::Object(Map::new()));
    for (key, value) in new.as_object().unwrap() {
        match (key.as_str(), entry.get_mut(key)) {
            ("enum", Some(Value::Object(old))) => old.extend(value.as_object().unwrap().clone()),
            _ => {
                entry.as_object_mut().unwrap().insert(key.clone(), value.clone());
            }
        }
    }
}

impl Ocsf {
    fn load() -> Self {
        assert_eq!(data("ocsf/version.json")["version"], OCSF_VERSION, "the vendored schema is the targeted version");
        Ocsf { dictionary: data("ocsf/dictionary.json"), categories: data("ocsf/categories.json") }
    }

    fn resolve(&self, file: &str) -> Resolved {
        let json = data(&format!("ocsf/{file}"));
        let mut resolved = match json.get("extends").and_then(Value::as_str) {
            Some(parent) => self.resolve(&parent_file(file, parent)),
            None => Resolved {
                caption: String::new(),
                category: None,
                uid: None,
                attributes: Map::new(),
                constraints: Vec::new(),
            },
        };
        resolved.caption = json["caption"].as_str().unwrap().to_owned();
        if let Some(category) = json.get("category").and_then(Value::as_str) {
            resolved.category = Some(category.to_owned());
        }
        resolved.uid = json.get("uid").and_then(Value::as_u64);
        let attributes = json["attributes"].as_object().unwrap();
        for include in attributes.get("$include").and_then(Value::as_array).into_iter().flatten() {
            let include = include.as_str().unwrap();
            if include.starts_with("profiles/") {
                continue;
            }
            for (name, attribute) in data(&format!("ocsf/{include}"))["attributes"].as_object().unwrap() {
                merge_attribute(&mut resolved.attributes, name, attribute);
            }
        }
        for (name, attribute) in attributes.iter().filter(|(name, _)| *name != "$include") {
            merge_attribute(&mut resolved.attributes, name, attribute);
        }
        if let Some(constraints) = json.get("constraints").and_then(Value::as_object) {
            resolved.constraints = constraints
                .iter()
                .map(|(kind, names)| {
                    (kind.clone(), names.as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_owned()).collect())
                })
                .collect();
        }
        resolved
    }

    /// Checks `value` against a resolved class or object; `at` names it in messages.
    fn check(&self, resolved: &Resolved, value: &Value, at: &str) {
        let object = value.as_object().unwrap_or_else(|| panic!("{at}: not an object: {value}"));
        for (name, attribute) in &resolved.attributes {
            if attribute.get("requirement").and_then(Value::as_str) == Some("required") {
                assert!(object.contains_key(name), "{at}: required attribute {name} missing in {value}");
            }
        }
        for (kind, names) in &resolved.constraints {
            let present = names.iter().filter(|n| object.contains_key(n.as_str())).count();
            match kind.as_str() {
                "at_least_one" => assert!(present >= 1, "{at}: needs at least one of {names:?}: {value}"),
                "just_one" => assert_eq!(present, 1, "{at}: needs just one of {names:?}: {value}"),
                other => panic!("{at}: unknown constraint {other}"),
            }
        }
        for (name, field) in object {
            let attribute = resolved
                .attributes
                .get(name)
                .unwrap_or_else(|| panic!("{at}: {name} is not an attribute of {}", resolved.caption));
            self.check_attribute(name, attribute, field, &format!("{at}.{name}"));
        }
    }

    fn check_attribute(&self, name: &str, attribute: &Value, field: &Value, at: &str) {
        let dictionary = &self.dictionary["attributes"][name];
        assert!(dictionary.is_object(), "{at}: {name} is not in the dictionary");
        let ty = attribute.get("type").or(dictionary.get("type")).and_then(Value::as_str).unwrap();
        let is_array = dictionary.get("is_array").and_then(Value::as_bool).unwrap_or(false);
        let items: Vec<&Value> = if is_array {
            field.as_array().unwrap_or_else(|| panic!("{at}: expected an array: {field}")).iter().collect()
        } else {
            assert!(!field.is_array(), "{at}: unexpected array");
            vec![field]
        };
        for item in items {
            if ty.ends_with("_t") {
                self.check_scalar(ty, item, at);
            } else if ty == "object" {
                assert!(item.is_object(), "{at}: expected an object: {item}");
            } else {
                let object = self.resolve(&format!("objects/{ty}.json"));
                self.check(&object, item, at);
            }
        }
        if name.ends_with("_id") && !matches!(name, "category_uid" | "class_uid") {
            let mut allowed = BTreeSet::new();
            for source in [dictionary.get("enum"), attribute.get("enum")].into_iter().flatten() {
                allowed.extend(source.as_object().unwrap().keys().cloned());
            }
            if !allowed.is_empty() {
                assert!(allowed.contains(&field.to_string()), "{at}: {field} is not one of {allowed:?}");
            }
        }
    }

    fn check_scalar(&self, ty: &str, value: &Value, at: &str) {
        let mut base = ty;
        while let Some(parent) = self.dictionary["types"]["attributes"][base].get("type").and_then(Value::as_str) {
            base = parent;
        }
        let ok = match base {
            "string_t" => value.is_string(),
            "integer_t" | "long_t" => value.is_i64() || value.is_u64(),
            "float_t" => value.is_number(),
            "boolean_t" => value.is_boolean(),
            "json_t" => true,
            other => panic!("{at}: unknown base type {other}"),
        };
        assert!(ok, "{at}: {value} is not a {ty} ({base})");
        if ty == "ip_t" {
            value.as_str().unwrap().parse::<IpAddr>().unwrap_or_else(|e| panic!("{at}: {value}: {e}"));
        }
    }

    /// Validates one encoded event; returns (class_uid, activity_id, status_id).
    fn validate(&self, value: &Value) -> (u64, u64, u64) {
        let class_uid = value["class_uid"].as_u64().unwrap();
        let file = match class_uid {
            6002 => "events/application/application_lifecycle.json",
            6003 => "events/application/api_activity.json",
            3002 => "events/iam/authentication.json",
            other => panic!("no vendored class {other}"),
        };
        let class = self.resolve(file);
        self.check(&class, value, &class.caption);
        let category = &self.categories["attributes"][class.category.as_deref().unwrap()];
        assert_eq!(value["category_uid"], category["uid"]);
        assert_eq!(value["category_name"], category["caption"]);
        assert_eq!(class_uid, category["uid"].as_u64().unwrap() * 1000 + class.uid.unwrap());
        assert_eq!(value["class_name"], class.caption.as_str());
        let activity_id = value["activity_id"].as_u64().unwrap();
        assert_eq!(value["type_uid"].as_u64().unwrap(), class_uid * 100 + activity_id, "type_uid");
        if activity_id != 99 {
            let caption = &class.attributes["activity_id"]["enum"][activity_id.to_string()]["caption"];
            assert_eq!(&value["activity_name"], caption, "activity_name of {activity_id}");
        }
        assert_eq!(value["metadata"]["version"], OCSF_VERSION);
        assert_eq!(value["metadata"]["product"]["name"], "tower-audit");
        assert_eq!(value["metadata"]["product"]["vendor_name"], "tower-audit");
        assert_eq!(value["metadata"]["product"]["version"], env!("CARGO_PKG_VERSION"));
        (class_uid, activity_id, value["status_id"].as_u64().unwrap())
    }
}

fn parent_file(child: &str, parent: &str) -> String {
    match parent {
        "base_event" => "events/base_event.json".into(),
        "application" => "events/application/application.json".into(),
        "iam" => "events/iam/iam.json".into(),
        object if child.starts_with("objects/") => format!("objects/{object}.json"),
        other => panic!("{child} extends {other}, which is not vendored"),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// ECS

struct Ecs {
    fields: Map<String, Value>,
}

impl Ecs {
    fn load() -> Self {
        let json = data("ecs/ecs_fields.json");
        assert_eq!(json["ecs_version"], ECS_VERSION, "the vendored schema is the targeted version");
        Ecs { fields: json["fields"].as_object().unwrap().clone() }
    }

    fn validate(&self, value: &Value) {
        assert_eq!(value["ecs"]["version"], ECS_VERSION);
        self.walk("", value);
        let allowed = |field: &str| -> Vec<Value> { self.fields[field]["allowed_values"].as_array().unwrap().clone() };
        let names = |field: &str| -> Vec<String> {
            allowed(field).iter().map(|a| a["name"].as_str().unwrap().to_owned()).collect()
        };
        let event = &value["event"];
        assert!(names("event.kind").contains(&event["kind"].as_str().unwrap().to_owned()), "{event}");
        assert!(names("event.outcome").contains(&event["outcome"].as_str().unwrap().to_owned()), "{event}");
        let types: Vec<&str> = event["type"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        for ty in &types {
            assert!(names("event.type").contains(&(*ty).to_owned()), "event.type {ty}");
        }
        for category in event["category"].as_array().unwrap() {
            let entry = allowed("event.category")
                .into_iter()
                .find(|a| a["name"] == *category)
                .unwrap_or_else(|| panic!("event.category {category} is not allowed"));
            let expected: Vec<&str> =
                entry["expected_event_types"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
            for ty in &types {
                assert!(expected.contains(ty), "event.type {ty} is not expected for event.category {category}");
            }
        }
    }

    fn walk(&self, prefix: &str, value: &Value) {
        for (key, field) in value.as_object().unwrap() {
            let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
            if path == "tower_audit" {
                continue; // custom fields, outside ECS's names
            }
            match self.fields.get(&path) {
                Some(definition) => self.check_field(&path, definition, field),
                None if field.is_object() => self.walk(&path, field),
                None => panic!("{path} is not an ECS field"),
            }
        }
    }

    fn check_field(&self, path: &str, definition: &Value, value: &Value) {
        let ty = definition["type"].as_str().unwrap();
        let is_array =
            definition.get("normalize").and_then(Value::as_array).is_some_and(|n| n.iter().any(|x| x == "array"));
        let items: Vec<&Value> = if is_array {
            value.as_array().unwrap_or_else(|| panic!("{path}: expected an array")).iter().collect()
        } else {
            vec![value]
        };
        for item in items {
            let ok = match ty {
                "keyword" | "constant_keyword" | "wildcard" | "match_only_text" | "text" => item.is_string(),
                "ip" => item.as_str().is_some_and(|s| s.parse::<IpAddr>().is_ok()),
                "date" => item.as_str().is_some_and(|s| humantime::parse_rfc3339(s).is_ok()),
                "long" | "integer" | "short" | "byte" => item.is_i64() || item.is_u64(),
                "object" => item.as_object().is_some_and(|m| m.values().all(Value::is_string)),
                other => panic!("{path}: unhandled ECS type {other}"),
            };
            assert!(ok, "{path}: {item} is not a valid {ty}");
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Events

fn stamped(mut event: AuditEvent, seq: u64) -> AuditEvent {
    event.id = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 + u128::from(seq));
    event.instance = Some("web-1-5f3a9c1e".into());
    event.boot = Some(Uuid::from_u128(7));
    event.seq = seq;
    event.time = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
    event
}

fn request(method: Option<&'static str>, status: u16) -> AuditEvent {
    let mut event = AuditEvent::new(kind::HTTP_REQUEST)
        .actor("alice@example.com")
        .outcome(Outcome::from_http_status(http::StatusCode::from_u16(status).unwrap()));
    event.method = method.map(Into::into);
    event.route = Some("/users/{id}".into());
    event.path = Some("/users/42?token=REDACTED&x=1".into());
    event.status = Some(status);
    event.latency_us = Some(1234);
    event.request_id = Some("req-1".into());
    event.client_addr = Some("203.0.113.9".parse().unwrap());
    event.user_agent = Some("curl/8.5".into());
    event
}

/// (event, expected OCSF class, activity, status, ECS category, ECS types, ECS outcome)
type Case = (AuditEvent, u64, u64, u64, &'static str, &'static [&'static str], &'static str);

fn cases() -> Vec<Case> {
    let mut cases: Vec<Case> = Vec::new();
    for (method, activity) in [
        (Some("POST"), 1),
        (Some("GET"), 2),
        (Some("HEAD"), 2),
        (Some("PUT"), 3),
        (Some("PATCH"), 3),
        (Some("DELETE"), 4),
        (Some("OPTIONS"), 99),
        (None, 0),
    ] {
        cases.push((request(method, 200), 6003, activity, 1, "web", &["access"], "success"));
    }
    cases.push((request(Some("GET"), 403), 6003, 2, 2, "web", &["access"], "failure"));
    cases.push((request(Some("GET"), 503), 6003, 2, 2, "web", &["access", "error"], "failure"));
    let mut cancelled = request(Some("GET"), 200).outcome(Outcome::Cancelled);
    cancelled.status = None;
    cases.push((cancelled, 6003, 2, 99, "web", &["access"], "unknown"));

    let mut grpc = AuditEvent::new(kind::GRPC_CALL).outcome(Outcome::Denied);
    grpc.method = Some("POST".into());
    grpc.route = Some("/kv.Kv/Put".into());
    grpc.path = Some("/kv.Kv/Put".into());
    grpc.status = Some(200);
    grpc.grpc_status = Some(7);
    grpc.client_addr = Some("2001:db8::1".parse().unwrap());
    cases.push((grpc, 6003, 99, 2, "api", &["access", "denied"], "failure"));

    // Custom events, completed from the request as `AuditContext::record` does.
    let from_login = |event: AuditEvent| {
        let mut event = event;
        event.method = Some("POST".into());
        event.route = Some("/auth/login".into());
        event.path = Some("/auth/login".into());
        event.client_addr = Some("198.51.100.4".parse().unwrap());
        event.user_agent = Some("Mozilla/5.0".into());
        event.request_id = Some("req-2".into());
        event
    };
    let ok = from_login(AuditEvent::new("auth.login_succeeded").actor("alice@example.com").attribute("user_id", "u1"));
    cases.push((ok, 3002, 1, 1, "authentication", &["start"], "success"));
    let failed = from_login(
        AuditEvent::new("auth.login_failed")
            .actor("mallory@example.com")
            .outcome(Outcome::Denied)
            .attribute("reason", "bad_password"),
    );
    cases.push((failed, 3002, 1, 2, "authentication", &["start"], "failure"));
    let mut unknown_user = AuditEvent::new("auth.login_failed").outcome(Outcome::Denied);
    unknown_user.status = Some(401); // has no `http_response` in Authentication: must land in `status_code`
    cases.push((unknown_user, 3002, 1, 2, "authentication", &["start"], "failure"));
    cases.push((AuditEvent::new("auth.logout").actor("alice"), 3002, 2, 1, "authentication", &["end"], "success"));
    cases.push((AuditEvent::new("user.SignOut"), 3002, 2, 1, "authentication", &["end"], "success"));
    let refreshed = from_login(AuditEvent::new("auth.token_refreshed").actor("alice"));
    cases.push((refreshed, 6003, 1, 1, "api", &["info"], "success"));
    let conflict = AuditEvent::new("auth.register_conflict").outcome(Outcome::ClientError);
    cases.push((conflict, 6003, 0, 2, "api", &["info"], "failure"));
    let denied = AuditEvent::new("kv.write_denied").outcome(Outcome::Denied);
    cases.push((denied, 6003, 0, 2, "api", &["info", "denied"], "failure"));

    // Pipeline events.
    let boot = AuditEvent::new(kind::AUDIT_BOOT).attribute("crate_version", "0.1.0");
    cases.push((boot, 6002, 3, 1, "process", &["start"], "success"));
    let shutdown = AuditEvent::new(kind::AUDIT_SHUTDOWN).outcome(Outcome::Error).attribute("dropped", "2");
    cases.push((shutdown, 6002, 4, 2, "process", &["end"], "failure"));
    let gap = AuditEvent::new(kind::AUDIT_GAP).outcome(Outcome::Error).attribute("lost", "12");
    cases.push((gap, 6002, 99, 2, "process", &["info"], "failure"));

    // Hostile strings everywhere, and an event with nothing but a kind.
    let mut hostile = request(Some("GET"), 200)
        .actor("eve\"},\"class_uid\":1,\"x\":{\"")
        .attribute("a.b", "\u{fffd}\"\\")
        .attribute("class_uid", "1");
    hostile.path = Some("/\u{fffd}\"><script>?q=\"\\".into());
    hostile.route = Some("/\"{id}\"".into());
    hostile.user_agent = Some("() { :; }; /bin/sh".into());
    hostile.request_id = Some("\"".into());
    cases.push((hostile, 6003, 2, 1, "web", &["access"], "success"));
    let mut hostile_method = request(Some("G\"ET"), 200);
    hostile_method.actor = None;
    hostile_method.client_addr = None;
    cases.push((hostile_method, 6003, 99, 1, "web", &["access"], "success"));
    cases.push((AuditEvent::new("x"), 6003, 0, 1, "api", &["info"], "success"));
    cases.push((AuditEvent::new(kind::HTTP_REQUEST), 6003, 0, 1, "web", &["access"], "success"));

    let stamp = |(i, (event, class, activity, status, category, types, outcome)): (usize, Case)| {
        (stamped(event, i as u64 + 1), class, activity, status, category, types, outcome)
    };
    cases.into_iter().enumerate().map(stamp).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Tests

#[test]
fn ocsf_events_satisfy_the_schema() {
    let ocsf = Ocsf::load();
    for (event, class, activity, status, ..) in cases() {
        let value = encode_ocsf(&event);
        let got = ocsf.validate(&value);
        assert_eq!(got, (class, activity, status), "{} {:?}: {value:#}", event.kind, event.method);
        assert_eq!(value["metadata"]["uid"], event.id.to_string());
        assert_eq!(value["metadata"]["sequence"], event.seq);
        assert_eq!(value["unmapped"]["kind"], event.kind.as_ref());
        if let Some(ip) = event.client_addr {
            assert_eq!(value["src_endpoint"]["ip"], ip.to_string());
        }
        if class != 6002 && event.actor.is_some() {
            assert_eq!(value["actor"]["user"]["uid"], event.actor.as_deref().unwrap());
        }
        if class == 6003 {
            assert_eq!(value["http_response"]["code"].as_u64(), event.status.map(u64::from));
            assert_eq!(value["http_request"]["http_method"].as_str(), event.method.as_deref());
        }
        if class == 3002 {
            assert_eq!(value["user"]["uid"].as_str(), event.actor.as_deref());
        }
    }
}

#[test]
fn ocsf_time_is_epoch_milliseconds_and_hostile_text_stays_inside_its_field() {
    let cases = cases();
    let (hostile, ..) = cases.iter().find(|c| c.0.actor.as_deref().is_some_and(|a| a.starts_with("eve"))).unwrap();
    let value = encode_ocsf(hostile);
    assert_eq!(value["time"], 1_700_000_000_123_i64);
    assert_eq!(value["class_uid"], 6003);
    assert_eq!(value["actor"]["user"]["uid"], hostile.actor.as_deref().unwrap());
    assert_eq!(value["unmapped"]["attributes"]["class_uid"], "1");
    assert_eq!(value["http_request"]["url"]["path"], "/\u{fffd}\"><script>");
    assert_eq!(value["http_request"]["url"]["query_string"], "q=\"\\");
    let line = serde_json::to_string(&value).unwrap();
    assert!(!line.contains('\n'));
}

#[test]
fn ecs_events_satisfy_the_schema() {
    let ecs = Ecs::load();
    for (event, .., category, types, outcome) in cases() {
        let value = encode_ecs(&event);
        ecs.validate(&value);
        let at = format!("{} {:?}: {value:#}", event.kind, event.method);
        assert_eq!(value["event"]["category"], serde_json::json!([category]), "{at}");
        assert_eq!(value["event"]["type"], serde_json::json!(types), "{at}");
        assert_eq!(value["event"]["outcome"], outcome, "{at}");
        assert_eq!(value["event"]["kind"], "event", "{at}");
        assert_eq!(value["event"]["sequence"], event.seq, "{at}");
        assert_eq!(value["event"]["action"], event.kind.as_ref(), "{at}");
        assert_eq!(value["user"]["id"].as_str(), event.actor.as_deref(), "{at}");
        assert_eq!(value["source"]["ip"].as_str(), event.client_addr.map(|ip| ip.to_string()).as_deref(), "{at}");
        assert_eq!(value["http"]["request"]["method"].as_str(), event.method.as_deref(), "{at}");
        assert_eq!(value["http"]["response"]["status_code"].as_u64(), event.status.map(u64::from), "{at}");
        assert_eq!(value["user_agent"]["original"].as_str(), event.user_agent.as_deref(), "{at}");
        assert_eq!(value["@timestamp"], humantime::format_rfc3339_micros(event.time).to_string(), "{at}");
        if let Some(path) = &event.path {
            assert_eq!(value["url"]["path"].as_str(), path.split('?').next(), "{at}");
        }
        for key in event.attributes.keys() {
            assert!(value["labels"].get(key.replace('.', "_")).is_some(), "{at}");
        }
    }
}

async fn round_trip(encoding: Encoding, dir: &Path) -> (PathBuf, Vec<AuditEvent>) {
    let path = dir.join(format!("{encoding:?}.jsonl"));
    let sink = JsonLinesSink::open(&path).unwrap().encoding(encoding);
    assert_eq!(sink.encoding_used(), encoding);
    let events: Vec<AuditEvent> = cases().into_iter().map(|c| c.0).collect();
    let (first, rest) = events.split_at(5);
    sink.write_batch(first).await.unwrap();
    sink.write_batch(rest).await.unwrap();
    sink.flush().await.unwrap();
    (path, events)
}

#[tokio::test]
async fn json_lines_sink_writes_one_object_per_line_in_each_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let (ocsf, ecs) = (Ocsf::load(), Ecs::load());
    for encoding in [Encoding::Native, Encoding::Ocsf, Encoding::Ecs] {
        let (path, events) = round_trip(encoding, dir.path()).await;
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), events.len(), "{encoding:?}");
        for (line, event) in lines.iter().zip(&events) {
            let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{encoding:?}: {e}: {line}"));
            assert!(value.is_object());
            assert_eq!(value, encoding.encode(event), "{encoding:?}");
            match encoding {
                Encoding::Native => assert_eq!(&serde_json::from_value::<AuditEvent>(value).unwrap(), event),
                Encoding::Ocsf => drop(ocsf.validate(&value)),
                Encoding::Ecs => ecs.validate(&value),
                _ => unreachable!(),
            }
        }
    }
}

#[test]
fn the_default_encoding_is_native() {
    assert_eq!(Encoding::default(), Encoding::Native);
    let sink = JsonLinesSink::open(tempfile::tempdir().unwrap().path().join("a.jsonl")).unwrap();
    assert_eq!(sink.encoding_used(), Encoding::Native);
}
