//! The shipped sinks: JSON lines and tracing (the memory sink is used by every other test).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower_audit::{AuditEvent, AuditLayer, AuditSink, JsonLinesSink, Outcome, SinkError, TracingSink, kind};

const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn json_lines_sink_appends_one_object_per_line_even_for_hostile_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (_layer, handle) = AuditLayer::builder(JsonLinesSink::open(&path).unwrap().fsync(true))
        .batch_size(2)
        .flush_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    handle.record(AuditEvent::new("auth.login").actor("alice"));
    handle.record(AuditEvent::new("auth.login").actor("eve\n{\"kind\":\"forged\"}\r\n").outcome(Outcome::Denied));
    handle.record(AuditEvent::new("auth.logout").attribute("note", "quotes \" and \\ and ünïcödé"));
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained);

    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    let events: Vec<AuditEvent> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_ref()).collect();
    assert_eq!(kinds, [kind::AUDIT_BOOT, "auth.login", "auth.login", "auth.logout", kind::AUDIT_SHUTDOWN]);
    for line in &lines {
        let object: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(object["version"], tower_audit::SCHEMA_VERSION, "{line}");
        assert_eq!(object["instance"], handle.instance(), "{line}");
        assert_eq!(object["boot"], handle.boot().to_string(), "{line}");
    }
    assert_eq!(events[2].actor.as_deref(), Some("eve\u{fffd}{\"kind\":\"forged\"}\u{fffd}\u{fffd}"));
    assert_eq!(events[3].attributes["note"], "quotes \" and \\ and ünïcödé");

    // Reopening appends rather than truncating.
    let again = JsonLinesSink::open(&path).unwrap();
    again.write_batch(&events[1..2]).await.unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 6);
}

/// A file written before schema version 2 keeps reading: its lines have no `instance` or `boot`.
#[tokio::test]
async fn json_lines_written_before_version_2_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let v1 = r#"{"version":1,"id":"018f3a5c-0000-7000-8000-000000000001","seq":1,"time":"2025-05-01T10:00:00.000001Z","kind":"auth.login","outcome":"success","method":null,"route":null,"path":null,"status":null,"grpc_status":null,"latency_us":null,"request_id":null,"actor":"alice","client_addr":null,"user_agent":null,"attributes":{}}"#;
    std::fs::write(&path, format!("{v1}\n")).unwrap();
    let (_layer, handle) = AuditLayer::builder(JsonLinesSink::open(&path).unwrap()).build().unwrap();
    handle.record(AuditEvent::new("auth.logout").actor("alice"));
    assert!(handle.shutdown(LIMIT).await.drained);

    let text = std::fs::read_to_string(&path).unwrap();
    let events: Vec<AuditEvent> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let identity: Vec<_> =
        events.iter().map(|e| (e.kind.as_ref(), e.version, e.instance.as_deref(), e.boot, e.seq)).collect();
    let new = |kind, seq| (kind, tower_audit::SCHEMA_VERSION, Some(handle.instance()), Some(handle.boot()), seq);
    assert_eq!(
        identity,
        [
            ("auth.login", 1, None, None, 1),
            new(kind::AUDIT_BOOT, 1),
            new("auth.logout", 2),
            new(kind::AUDIT_SHUTDOWN, 3)
        ]
    );
    assert_eq!(events[0].actor.as_deref(), Some("alice"));
}

#[test]
fn json_lines_sink_says_which_file_it_cannot_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing-dir").join("audit.jsonl");
    let err = JsonLinesSink::open(&path).unwrap_err();
    assert!(matches!(err, SinkError::Open { .. }));
    let message = err.to_string();
    assert!(message.starts_with(&format!("cannot open audit file {}: ", path.display())), "{message}");
    let err = JsonLinesSink::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains(&dir.path().display().to_string()));
}

/// Collects the fields of every event with the audit target.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<Fields>>>);

type Fields = Vec<(String, String)>;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Captured {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        struct Visitor(Fields);
        impl tracing::field::Visit for Visitor {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push((field.name().to_owned(), format!("{value:?}")));
            }
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                self.0.push((field.name().to_owned(), value.to_owned()));
            }
        }
        if event.metadata().target() == TracingSink::TARGET {
            let mut fields = Visitor(Vec::new());
            event.record(&mut fields);
            self.0.lock().unwrap().push(fields.0);
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn tracing_sink_emits_one_event_per_audit_event_with_its_fields() {
    use tracing_subscriber::layer::SubscriberExt;
    let captured = Captured::default();
    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(captured.clone()));

    let (_layer, handle) = AuditLayer::builder(TracingSink::new()).build().unwrap();
    handle.record(AuditEvent::new("token.revoked").actor("admin").attribute("token_id", "t-9"));
    handle.record(AuditEvent::new("auth.login_failed").outcome(Outcome::Denied));
    assert!(handle.shutdown(LIMIT).await.drained);

    let events = captured.0.lock().unwrap().clone();
    // The boot event, the two, the shutdown event.
    assert_eq!(events.len(), 4, "{events:?}");
    let field = |i: usize, name: &str| events[i].iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let kinds: Vec<_> = (0..4).map(|i| field(i, "kind").unwrap()).collect();
    assert_eq!(kinds, [kind::AUDIT_BOOT, "token.revoked", "auth.login_failed", kind::AUDIT_SHUTDOWN]);
    assert_eq!(field(1, "actor").as_deref(), Some("admin"));
    assert_eq!(field(1, "seq").as_deref(), Some("2"));
    assert_eq!(field(1, "instance").as_deref(), Some(handle.instance()));
    assert_eq!(field(1, "boot"), Some(handle.boot().to_string()));
    assert_eq!(field(1, "attributes").as_deref(), Some(r#"{"token_id":"t-9"}"#));
    assert_eq!(field(2, "outcome").as_deref(), Some("denied"));
    assert_eq!(field(2, "actor"), None, "unset fields are not recorded");
    assert_eq!(field(2, "message").as_deref(), Some("audit event"));
}
