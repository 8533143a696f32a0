//! SIEM encodings of an [`AuditEvent`]: OCSF and Elastic Common Schema.
//!
//! [`encode_ocsf`] and [`encode_ecs`] turn one event into a JSON object in the shape a security team's SIEM
//! ingests; any sink can call them. [`JsonLinesSink::encoding`](crate::JsonLinesSink::encoding) writes one of
//! them per line. The mapping (which kind becomes which OCSF class and activity, which ECS categorisation) is
//! documented on each function and in the README.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use crate::event::{AuditEvent, Outcome, kind};

/// The OCSF schema version [`encode_ocsf`] targets (written as `metadata.version`).
pub const OCSF_VERSION: &str = "1.8.0";

/// The ECS version [`encode_ecs`] targets (written as `ecs.version`).
pub const ECS_VERSION: &str = "9.4.0";

const PRODUCT: &str = "tower-audit";

/// The shape an event is written in.
///
/// ```
/// use tower_audit::{AuditEvent, Encoding};
///
/// let event = AuditEvent::new("auth.logout").actor("alice");
/// assert_eq!(Encoding::Native.encode(&event)["kind"], "auth.logout");
/// assert_eq!(Encoding::Ocsf.encode(&event)["class_uid"], 3002);
/// assert_eq!(Encoding::Ecs.encode(&event)["event"]["action"], "auth.logout");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Encoding {
    /// The library's own [`AuditEvent`] serialisation (the default).
    #[default]
    Native,
    /// OCSF 1.8.0 ([`encode_ocsf`]).
    Ocsf,
    /// Elastic Common Schema 9.4.0 ([`encode_ecs`]).
    Ecs,
}

impl Encoding {
    /// The event as a JSON object in this encoding.
    ///
    /// ```
    /// use tower_audit::{AuditEvent, Encoding};
    /// let value = Encoding::Ecs.encode(&AuditEvent::new("auth.login_succeeded").actor("alice"));
    /// assert_eq!(value["user"]["id"], "alice");
    /// ```
    pub fn encode(self, event: &AuditEvent) -> Value {
        match self {
            // Cannot fail: every map key is a string and every field serialises.
            Encoding::Native => serde_json::to_value(event).unwrap_or(Value::Null),
            Encoding::Ocsf => encode_ocsf(event),
            Encoding::Ecs => encode_ecs(event),
        }
    }
}

/// How an event is classified in OCSF: class, activity and its caption.
struct OcsfClass {
    category_uid: u32,
    category_name: &'static str,
    class_uid: u32,
    class_name: &'static str,
    activity_id: u32,
    activity_name: String,
}

/// Logon or logoff, from a kind whose last dot-separated segment begins with a login or logout word.
fn authentication_activity(kind: &str) -> Option<(u32, &'static str)> {
    let last = kind.rsplit('.').next().unwrap_or(kind).to_ascii_lowercase();
    let starts = |words: &[&str]| words.iter().any(|w| last.starts_with(w));
    if starts(&["login", "logon", "signin", "sign_in"]) {
        Some((1, "Logon"))
    } else if starts(&["logout", "logoff", "signout", "sign_out"]) {
        Some((2, "Logoff"))
    } else {
        None
    }
}

fn ocsf_class(event: &AuditEvent) -> OcsfClass {
    let lifecycle = |activity_id, name: &str| OcsfClass {
        category_uid: 6,
        category_name: "Application Activity",
        class_uid: 6002,
        class_name: "Application Lifecycle",
        activity_id,
        activity_name: name.to_owned(),
    };
    match &*event.kind {
        kind::AUDIT_BOOT => return lifecycle(3, "Start"),
        kind::AUDIT_SHUTDOWN => return lifecycle(4, "Stop"),
        kind::AUDIT_GAP => return lifecycle(99, "Audit Gap"),
        _ => {}
    }
    if let Some((activity_id, name)) = authentication_activity(&event.kind) {
        return OcsfClass {
            category_uid: 3,
            category_name: "Identity & Access Management",
            class_uid: 3002,
            class_name: "Authentication",
            activity_id,
            activity_name: name.to_owned(),
        };
    }
    let (activity_id, activity_name) = match event.method.as_deref() {
        _ if event.kind == kind::GRPC_CALL => (99, "gRPC Call".to_owned()),
        Some("POST") => (1, "Create".to_owned()),
        Some("GET" | "HEAD") => (2, "Read".to_owned()),
        Some("PUT" | "PATCH") => (3, "Update".to_owned()),
        Some("DELETE") => (4, "Delete".to_owned()),
        Some(other) => (99, other.to_owned()),
        None => (0, "Unknown".to_owned()),
    };
    OcsfClass {
        category_uid: 6,
        category_name: "Application Activity",
        class_uid: 6003,
        class_name: "API Activity",
        activity_id,
        activity_name,
    }
}

fn epoch_millis(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

fn product() -> Value {
    json!({ "name": PRODUCT, "vendor_name": PRODUCT, "version": env!("CARGO_PKG_VERSION") })
}

/// The path without its query, and the query (already redacted by the layer).
fn split_path(path: &str) -> (&str, Option<&str>) {
    match path.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path, None),
    }
}

/// Inserts `value` under `key` when it is `Some`.
fn put(map: &mut Map<String, Value>, key: &str, value: Option<impl Into<Value>>) {
    if let Some(value) = value {
        map.insert(key.to_owned(), value.into());
    }
}

/// The event as an [OCSF 1.8.0](https://schema.ocsf.io/1.8.0/) event object.
///
/// | event | class | activity |
/// |---|---|---|
/// | kind whose last segment starts with `login`, `logon`, `signin`, `sign_in` (`auth.login_failed`) | Authentication (3002) | Logon (1) |
/// | kind whose last segment starts with `logout`, `logoff`, `signout`, `sign_out` (`auth.logout`) | Authentication (3002) | Logoff (2) |
/// | `audit.boot` / `audit.shutdown` | Application Lifecycle (6002), `app` = tower-audit | Start (3) / Stop (4) |
/// | `audit.gap` | Application Lifecycle (6002), severity Medium | Other (99), "Audit Gap" |
/// | `grpc.call` | API Activity (6003) | Other (99), "gRPC Call" (every call is a POST) |
/// | anything else (`http.request`, custom kinds) | API Activity (6003) | from the method: POST Create (1), GET/HEAD Read (2), PUT/PATCH Update (3), DELETE Delete (4), another Other (99), none Unknown (0) |
///
/// `status_id` is Success (1) for [`Outcome::Success`], Other (99, `status` "Cancelled") for
/// [`Outcome::Cancelled`] and Failure (2) otherwise, with `status_detail` the `reason` attribute or the outcome.
/// `type_uid` = `class_uid` × 100 + `activity_id`; `metadata.uid` is the event id, `metadata.sequence` its
/// sequence number, `metadata.correlation_uid` the request id. The actor is `actor.user.uid` (and, for
/// Authentication, `user.uid`); API Activity requires an actor, so an anonymous request has
/// `actor.user.name` "anonymous", and requires a source, so one without a client address has
/// `src_endpoint.name` "unknown". `dst_endpoint.name` is the instance (Authentication, which needs a service or
/// a destination, has `dst_endpoint.name` "unknown" without one); `http_response.code` is the HTTP status (API
/// Activity only; Authentication has it as `status_code`). What has no OCSF attribute (kind,
/// outcome, route, boot, instance, gRPC status, custom attributes) is under `unmapped`.
///
/// ```
/// use tower_audit::{AuditEvent, Outcome, encode_ocsf};
///
/// let event = AuditEvent::new("auth.login_failed").actor("alice").outcome(Outcome::Denied);
/// let ocsf = encode_ocsf(&event);
/// assert_eq!((ocsf["class_uid"].as_u64(), ocsf["activity_id"].as_u64()), (Some(3002), Some(1)));
/// assert_eq!(ocsf["type_uid"], 300201);
/// assert_eq!(ocsf["status_id"], 2);
/// assert_eq!(ocsf["user"]["uid"], "alice");
/// assert_eq!(ocsf["metadata"]["product"]["name"], "tower-audit");
/// ```
pub fn encode_ocsf(event: &AuditEvent) -> Value {
    let class = ocsf_class(event);
    let mut out = Map::new();
    out.insert("category_uid".into(), class.category_uid.into());
    out.insert("category_name".into(), class.category_name.into());
    out.insert("class_uid".into(), class.class_uid.into());
    out.insert("class_name".into(), class.class_name.into());
    out.insert("activity_id".into(), class.activity_id.into());
    out.insert("type_uid".into(), (u64::from(class.class_uid) * 100 + u64::from(class.activity_id)).into());
    out.insert("type_name".into(), format!("{}: {}", class.class_name, class.activity_name).into());
    out.insert("activity_name".into(), class.activity_name.into());
    out.insert("time".into(), epoch_millis(event.time).into());
    out.insert("timezone_offset".into(), 0.into());
    let (severity_id, severity) = if event.kind == kind::AUDIT_GAP { (3, "Medium") } else { (1, "Informational") };
    out.insert("severity_id".into(), severity_id.into());
    out.insert("severity".into(), severity.into());
    let (status_id, status) = match event.outcome {
        Outcome::Success => (1, "Success"),
        Outcome::Cancelled => (99, "Cancelled"),
        _ => (2, "Failure"),
    };
    out.insert("status_id".into(), status_id.into());
    out.insert("status".into(), status.into());
    if event.outcome != Outcome::Success {
        let detail = event.attributes.get("reason").map_or(event.outcome.as_str(), String::as_str);
        out.insert("status_detail".into(), detail.into());
    }
    let status_code = event.grpc_status.map(i64::from).or(event.status.map(i64::from));
    put(&mut out, "status_code", status_code.map(|code| code.to_string()));
    put(&mut out, "duration", event.latency_us.map(|us| us / 1000));
    out.insert("message".into(), event.kind.as_ref().into());

    let mut metadata = Map::new();
    metadata.insert("product".into(), product());
    metadata.insert("version".into(), OCSF_VERSION.into());
    metadata.insert("uid".into(), event.id.to_string().into());
    metadata.insert("sequence".into(), event.seq.into());
    put(&mut metadata, "correlation_uid", event.request_id.clone());
    out.insert("metadata".into(), metadata.into());

    let user = event.actor.as_ref().map(|actor| json!({ "uid": actor }));
    match class.class_uid {
        6002 => {
            out.insert("app".into(), product());
        }
        3002 => {
            out.insert("user".into(), user.clone().unwrap_or_else(|| json!({ "name": "unknown" })));
            put(&mut out, "actor", user.map(|user| json!({ "user": user })));
        }
        _ => {
            let user = user.unwrap_or_else(|| json!({ "name": "anonymous" }));
            out.insert("actor".into(), json!({ "user": user }));
            let operation = match (&*event.kind, event.method.as_deref(), event.route.as_deref()) {
                (kind::GRPC_CALL, _, Some(route)) => route.to_owned(),
                (kind::HTTP_REQUEST, Some(method), Some(route)) => format!("{method} {route}"),
                (kind::HTTP_REQUEST, Some(method), None) => method.to_owned(),
                (kind, _, _) => kind.to_owned(),
            };
            out.insert("api".into(), json!({ "operation": operation }));
        }
    }
    // Application Lifecycle has neither endpoints nor HTTP attributes (pipeline events carry none anyway).
    if class.class_uid == 6002 {
        out.insert("unmapped".into(), unmapped(event));
        return Value::Object(out);
    }
    let src = event.client_addr.map(|ip| json!({ "ip": ip.to_string() }));
    match (src, class.class_uid) {
        (Some(src), _) => {
            out.insert("src_endpoint".into(), src);
        }
        (None, 6003) => {
            out.insert("src_endpoint".into(), json!({ "name": "unknown" }));
        }
        (None, _) => {}
    }
    match (&event.instance, class.class_uid) {
        (Some(instance), _) => {
            out.insert("dst_endpoint".into(), json!({ "name": instance.as_ref() }));
        }
        // Authentication needs a service or a destination.
        (None, 3002) => {
            out.insert("dst_endpoint".into(), json!({ "name": "unknown" }));
        }
        (None, _) => {}
    }

    let mut request = Map::new();
    put(&mut request, "http_method", event.method.as_deref());
    if let Some(path) = &event.path {
        let (path, query) = split_path(path);
        let mut url = Map::new();
        url.insert("path".into(), path.into());
        put(&mut url, "query_string", query);
        request.insert("url".into(), url.into());
    }
    put(&mut request, "user_agent", event.user_agent.clone());
    put(&mut request, "uid", event.request_id.clone());
    if !request.is_empty() {
        out.insert("http_request".into(), request.into());
    }
    // Authentication has no `http_response` attribute: its status is in `status_code`.
    if class.class_uid == 6003 {
        put(&mut out, "http_response", event.status.map(|code| json!({ "code": code })));
    }
    out.insert("unmapped".into(), unmapped(event));
    Value::Object(out)
}

/// What OCSF has no attribute for.
fn unmapped(event: &AuditEvent) -> Value {
    let mut unmapped = Map::new();
    unmapped.insert("kind".into(), event.kind.as_ref().into());
    unmapped.insert("outcome".into(), event.outcome.as_str().into());
    unmapped.insert("schema_version".into(), event.version.into());
    put(&mut unmapped, "route", event.route.clone());
    put(&mut unmapped, "grpc_status", event.grpc_status);
    put(&mut unmapped, "boot", event.boot.map(|boot| boot.to_string()));
    put(&mut unmapped, "instance", event.instance.as_deref());
    if !event.attributes.is_empty() {
        let attributes: Map<String, Value> =
            event.attributes.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect();
        unmapped.insert("attributes".into(), attributes.into());
    }
    unmapped.into()
}

/// The event as an [Elastic Common Schema 9.4](https://www.elastic.co/guide/en/ecs/current/index.html) document.
///
/// | event | `event.category` | `event.type` |
/// |---|---|---|
/// | login kinds (as for [`encode_ocsf`]) | `authentication` | `start` |
/// | logout kinds | `authentication` | `end` |
/// | `audit.boot` / `audit.shutdown` | `process` | `start` / `end` |
/// | `audit.gap` | `process` | `info` |
/// | `http.request` | `web` | `access`, and `error` for a server error or an error |
/// | `grpc.call` | `api` | `access`, and `denied` when denied |
/// | other kinds | `api` | `info`, and `denied` when denied |
///
/// `event.kind` is always `event`; `event.outcome` is `success`, `unknown` for [`Outcome::Cancelled`], and
/// `failure` otherwise. `event.action` is the kind, `event.id` the id, `event.sequence` the sequence number,
/// `event.duration` the latency in nanoseconds; `user.id` the actor, `source.ip` the client address,
/// `url.path`/`url.query` the (redacted) path, `http.request.method`, `http.request.id`,
/// `http.response.status_code`, `user_agent.original`, `service.node.name` the instance. Custom attributes are
/// `labels` (a `.` in a key becomes `_`, so Elasticsearch does not read it as an object path); what ECS has no
/// field for (route, boot, gRPC status) is under `tower_audit`.
///
/// ```
/// use tower_audit::{AuditEvent, encode_ecs};
///
/// let ecs = encode_ecs(&AuditEvent::new("auth.logout").actor("alice"));
/// assert_eq!(ecs["event"]["category"][0], "authentication");
/// assert_eq!(ecs["event"]["type"][0], "end");
/// assert_eq!(ecs["event"]["outcome"], "success");
/// assert_eq!(ecs["user"]["id"], "alice");
/// ```
pub fn encode_ecs(event: &AuditEvent) -> Value {
    let denied = event.outcome == Outcome::Denied;
    let (category, mut types) = match &*event.kind {
        kind::AUDIT_BOOT => ("process", vec!["start"]),
        kind::AUDIT_SHUTDOWN => ("process", vec!["end"]),
        kind::AUDIT_GAP => ("process", vec!["info"]),
        kind::HTTP_REQUEST => ("web", vec!["access"]),
        kind::GRPC_CALL => ("api", vec!["access"]),
        other => match authentication_activity(other) {
            Some((1, _)) => ("authentication", vec!["start"]),
            Some(_) => ("authentication", vec!["end"]),
            None => ("api", vec!["info"]),
        },
    };
    match category {
        "web" if matches!(event.outcome, Outcome::ServerError | Outcome::Error) => types.push("error"),
        "api" if denied => types.push("denied"),
        _ => {}
    }
    let outcome = match event.outcome {
        Outcome::Success => "success",
        Outcome::Cancelled => "unknown",
        _ => "failure",
    };

    let mut ev = Map::new();
    ev.insert("kind".into(), "event".into());
    ev.insert("category".into(), json!([category]));
    ev.insert("type".into(), json!(types));
    ev.insert("outcome".into(), outcome.into());
    ev.insert("action".into(), event.kind.as_ref().into());
    ev.insert("id".into(), event.id.to_string().into());
    ev.insert("sequence".into(), event.seq.into());
    ev.insert("provider".into(), PRODUCT.into());
    put(&mut ev, "duration", event.latency_us.map(|us| us.saturating_mul(1000)));
    put(&mut ev, "reason", event.attributes.get("reason").cloned());

    let mut out = Map::new();
    out.insert("@timestamp".into(), humantime::format_rfc3339_micros(event.time).to_string().into());
    out.insert("ecs".into(), json!({ "version": ECS_VERSION }));
    out.insert("event".into(), ev.into());
    put(&mut out, "user", event.actor.as_ref().map(|actor| json!({ "id": actor })));
    put(&mut out, "source", event.client_addr.map(|ip| json!({ "ip": ip.to_string() })));
    if let Some(path) = &event.path {
        let (path, query) = split_path(path);
        let mut url = Map::new();
        url.insert("path".into(), path.into());
        put(&mut url, "query", query);
        out.insert("url".into(), url.into());
    }
    let mut request = Map::new();
    put(&mut request, "method", event.method.as_deref());
    put(&mut request, "id", event.request_id.clone());
    let mut http = Map::new();
    if !request.is_empty() {
        http.insert("request".into(), request.into());
    }
    put(&mut http, "response", event.status.map(|code| json!({ "status_code": code })));
    if !http.is_empty() {
        out.insert("http".into(), http.into());
    }
    put(&mut out, "user_agent", event.user_agent.as_ref().map(|ua| json!({ "original": ua })));
    put(&mut out, "service", event.instance.as_deref().map(|instance| json!({ "node": { "name": instance } })));
    if !event.attributes.is_empty() {
        let labels: Map<String, Value> =
            event.attributes.iter().map(|(k, v)| (k.replace('.', "_"), Value::from(v.as_str()))).collect();
        out.insert("labels".into(), labels.into());
    }
    let mut custom = Map::new();
    custom.insert("schema_version".into(), event.version.into());
    put(&mut custom, "route", event.route.clone());
    put(&mut custom, "grpc_status", event.grpc_status);
    put(&mut custom, "boot", event.boot.map(|boot| boot.to_string()));
    out.insert("tower_audit".into(), custom.into());
    Value::Object(out)
}
