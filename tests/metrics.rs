//! The `metrics` feature end to end: the example auth server with a Prometheus recorder, driven over a real
//! loopback socket, its `/metrics` scraped over HTTP. One test: a process has one global recorder.
#![cfg(all(feature = "sqlite", feature = "postgres", feature = "metrics"))]

#[path = "../examples/auth_server/app/mod.rs"]
mod app;

use std::collections::BTreeMap;
use std::time::Duration;

use app::{AuditMode, AuditSinkKind, Config, Server};
use metrics_exporter_prometheus::PrometheusBuilder;
use reqwest::StatusCode;
use serde_json::json;
use tokio::time::Instant;

/// One scrape: `(name, sorted labels) -> value`, from the text exposition format.
type Scrape = BTreeMap<(String, Vec<(String, String)>), f64>;

/// A series of the pipeline: its name and the labels besides `audit_instance`.
type Series<'a> = (&'a str, &'a [(&'a str, &'a str)]);

fn parse(text: &str) -> Scrape {
    let mut out = Scrape::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let rest = rest.strip_suffix('}').unwrap();
                let mut labels: Vec<(String, String)> = rest
                    .split("\",")
                    .map(|pair| {
                        let (k, v) = pair.split_once("=\"").unwrap();
                        (k.to_owned(), v.trim_end_matches('"').to_owned())
                    })
                    .collect();
                labels.sort();
                (name, labels)
            }
            None => (series, Vec::new()),
        };
        out.insert((name.to_owned(), labels), value.parse().unwrap());
    }
    out
}

struct Scraper {
    client: reqwest::Client,
    url: String,
    instance: String,
}

impl Scraper {
    async fn text(&self) -> String {
        let res = self.client.get(&self.url).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["content-type"], "text/plain; version=0.0.4; charset=utf-8");
        res.text().await.unwrap()
    }

    /// The value of `name` for this pipeline with the extra `labels`, if published.
    fn get(&self, scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut all: Vec<(String, String)> = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        all.push(("audit_instance".to_owned(), self.instance.clone()));
        all.sort();
        scrape.get(&(name.to_owned(), all)).copied()
    }

    /// Scrapes until `done` holds (the pipeline publishes every flush interval), for at most 10 s.
    async fn until(&self, what: &str, done: impl Fn(&Self, &Scrape) -> bool) -> Scrape {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut poll = tokio::time::interval(Duration::from_millis(20));
        loop {
            poll.tick().await;
            let scrape = parse(&self.text().await);
            if done(self, &scrape) {
                return scrape;
            }
            assert!(Instant::now() < deadline, "{what}: not published within 10 s:\n{}", self.text().await);
        }
    }

    /// Every series of the pipeline, with the exact values given (the others published as 0).
    fn assert_values(&self, scrape: &Scrape, nonzero: &[(Series<'_>, f64)]) {
        let every: &[Series<'_>] = &[
            ("tower_audit_events_accepted_total", &[]),
            ("tower_audit_events_dropped_total", &[("reason", "queue_full")]),
            ("tower_audit_events_dropped_total", &[("reason", "queue_bytes")]),
            ("tower_audit_events_dropped_total", &[("reason", "wait_timeout")]),
            ("tower_audit_events_dropped_total", &[("reason", "closed")]),
            ("tower_audit_requests_refused_total", &[]),
            ("tower_audit_events_written_total", &[("trail", "primary")]),
            ("tower_audit_events_written_total", &[("trail", "fallback")]),
            ("tower_audit_events_lost_total", &[("reason", "sink_failed")]),
            ("tower_audit_events_lost_total", &[("reason", "abandoned")]),
            ("tower_audit_events_lost_total", &[("reason", "spill_full")]),
            ("tower_audit_events_lost_total", &[("reason", "corrupt")]),
            ("tower_audit_events_recovered_total", &[]),
            ("tower_audit_events_spilled_total", &[]),
            ("tower_audit_events_left_in_spill_total", &[]),
            ("tower_audit_sink_batches_total", &[]),
            ("tower_audit_sink_retries_total", &[]),
            ("tower_audit_sink_panics_total", &[]),
            ("tower_audit_sink_timeouts_total", &[]),
            ("tower_audit_gap_events_total", &[]),
            ("tower_audit_requests_unrecorded_total", &[("reason", "skipped")]),
            ("tower_audit_requests_unrecorded_total", &[("reason", "sampled_out")]),
            ("tower_audit_durable_responses_total", &[("result", "confirmed")]),
            ("tower_audit_durable_responses_total", &[("result", "withheld")]),
            ("tower_audit_checkpoints_total", &[("result", "signed")]),
            ("tower_audit_checkpoints_total", &[("result", "anchor_failed")]),
            ("tower_audit_queued_events", &[]),
            ("tower_audit_queued_bytes", &[]),
        ];
        for (name, labels) in every {
            let want = nonzero.iter().find(|((n, l), _)| n == name && l == labels).map_or(0.0, |(_, v)| *v);
            assert_eq!(self.get(scrape, name, labels), Some(want), "{name}{labels:?}");
        }
        let ours = scrape.keys().filter(|(name, _)| name.starts_with("tower_audit_")).count();
        assert_eq!(ours, every.len(), "{scrape:#?}");
    }
}

#[tokio::test]
async fn the_auth_server_serves_the_audit_pipelines_counters_at_metrics() {
    let prometheus = PrometheusBuilder::new().install_recorder().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audit_url = format!("sqlite://{}", dir.path().join("audit.db").display());
    let config = Config {
        database_url: format!("sqlite://{}?mode=rwc", dir.path().join("users.db").display()),
        audit: AuditMode::Layer,
        audit_sink: AuditSinkKind::Sqlite(audit_url),
        jwt_secret: Some("test-secret-of-reasonable-length".to_owned()),
        argon2: argon2::Params::new(1024, 1, 1, None).unwrap(),
        metrics: Some(prometheus),
        ..Config::default()
    };
    let server = Server::start(config).await.unwrap();
    let audit = server.audit.clone().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(app::serve(listener, server.router, std::future::pending()));
    let client = reqwest::Client::new();
    let scraper =
        Scraper { client: client.clone(), url: format!("{base}/metrics"), instance: audit.instance().to_owned() };

    // Published from the start, every series at zero but the batch of the pipeline's `audit.boot` event (not
    // counted as an event); the descriptions and types are there.
    let booted = |s: &Scraper, scrape: &Scrape| s.get(scrape, "tower_audit_sink_batches_total", &[]) == Some(1.0);
    let scrape = scraper.until("the boot event's batch", booted).await;
    scraper.assert_values(&scrape, &[(("tower_audit_sink_batches_total", &[]), 1.0)]);
    let text = scraper.text().await;
    assert!(text.contains("# TYPE tower_audit_events_dropped_total counter\n"), "{text}");
    assert!(text.contains("# TYPE tower_audit_queued_events gauge\n"), "{text}");
    assert!(
        text.contains("# HELP tower_audit_events_accepted_total Audit events admitted into the queue.\n"),
        "{text}"
    );

    // A denied login (its request and `auth.login_failed`) and a registration (its request and
    // `auth.register_succeeded`): 4 events, in one batch or two.
    let denied = client
        .post(format!("{base}/api/auth/login"))
        .json(&json!({"email": "nobody@example.com", "password": "whatever1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), StatusCode::UNAUTHORIZED);
    let registered = client
        .post(format!("{base}/api/auth/register"))
        .json(&json!({"email": "alice@example.com", "password": "correct horse battery", "country": "fr",
                      "annual_income": 52000.5, "timezone": "Europe/Paris"}))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), StatusCode::CREATED);

    let written = |s: &Scraper, scrape: &Scrape| {
        s.get(scrape, "tower_audit_events_written_total", &[("trail", "primary")]) == Some(4.0)
    };
    let scrape = scraper.until("4 events written", written).await;
    // Scrapes are not audited: accepted stays at 4 however often `/metrics` was polled.
    let batches = scraper.get(&scrape, "tower_audit_sink_batches_total", &[]).unwrap();
    assert!((2.0..=3.0).contains(&batches), "{batches}"); // the boot event's batch, then one or two
    scraper.assert_values(
        &scrape,
        &[
            (("tower_audit_events_accepted_total", &[]), 4.0),
            (("tower_audit_events_written_total", &[("trail", "primary")]), 4.0),
            (("tower_audit_sink_batches_total", &[]), batches),
            // Login and register are durable in the auth server: both responses waited for their events.
            (("tower_audit_durable_responses_total", &[("result", "confirmed")]), 2.0),
        ],
    );
    assert_eq!(audit.stats().accepted, 4);

    // Shutdown publishes the final counters (the report's), after which the series stay as they are.
    let report = audit.shutdown(Duration::from_secs(10)).await;
    assert!(report.drained, "{report}");
    let last = report.stats.batches as f64;
    let scrape = scraper
        .until("the final counters", |s, scrape| s.get(scrape, "tower_audit_sink_batches_total", &[]) == Some(last))
        .await;
    scraper.assert_values(
        &scrape,
        &[
            (("tower_audit_events_accepted_total", &[]), 4.0),
            (("tower_audit_events_written_total", &[("trail", "primary")]), 4.0),
            (("tower_audit_sink_batches_total", &[]), last),
            (("tower_audit_durable_responses_total", &[("result", "confirmed")]), 2.0),
        ],
    );
}
