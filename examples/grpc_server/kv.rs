//! The key-value service of the gRPC example. `main.rs` serves it; the tests (`tests/grpc.rs`) drive exactly this
//! code with a real Tonic client.

// Shared by `main.rs` and the tests (`#[path]`-included).
#![allow(unreachable_pub, dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};
use tower_audit::{AuditContext, AuditEvent, AuditLayer, Outcome};

/// Code generated from `proto/kv.proto` (checked in, so building needs no `protoc`; regenerate with
/// `cargo run --manifest-path tools/protogen/Cargo.toml`).
#[allow(clippy::all, missing_docs, unreachable_pub)]
pub mod pb {
    include!("proto/kv.v1.rs");
}

use pb::key_value_server::{KeyValue, KeyValueServer};
use pb::{GetReply, GetRequest, PutReply, PutRequest, WatchEvent, WatchRequest};

#[derive(Debug, Clone)]
pub struct Kv {
    store: Arc<Mutex<HashMap<String, String>>>,
    /// The bearer token `Put` requires.
    token: Arc<str>,
}

impl Kv {
    pub fn new(token: &str) -> Self {
        Self { store: Arc::default(), token: Arc::from(token) }
    }
}

#[tonic::async_trait]
impl KeyValue for Kv {
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetReply>, Status> {
        let key = &req.get_ref().key;
        let value = self.store.lock().unwrap().get(key).cloned();
        match value {
            Some(value) => Ok(Response::new(GetReply { value })),
            None => Err(Status::not_found(format!("no key `{key}`"))),
        }
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutReply>, Status> {
        let audit = AuditContext::current();
        let presented = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        if presented.and_then(|v| v.strip_prefix("Bearer ")) != Some(&*self.token) {
            if let Some(audit) = &audit {
                audit.record(AuditEvent::new("kv.write_denied").outcome(Outcome::Denied));
            }
            return Err(Status::unauthenticated("a valid bearer token is required to write"));
        }
        let PutRequest { key, value } = req.into_inner();
        if key.is_empty() {
            return Err(Status::invalid_argument("key must not be empty"));
        }
        if let Some(audit) = &audit {
            audit.set_actor("admin");
            audit.set_attribute("key", &key);
        }
        let created = self.store.lock().unwrap().insert(key, value).is_none();
        Ok(Response::new(PutReply { created }))
    }

    type WatchStream = ReceiverStream<Result<WatchEvent, Status>>;

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let WatchRequest { key, count, interval_ms } = req.into_inner();
        let value = self.store.lock().unwrap().get(&key).cloned().unwrap_or_default();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_millis(u64::from(interval_ms.max(1))));
            for n in 1.. {
                if count != 0 && n > u64::from(count) {
                    break;
                }
                ticks.tick().await;
                // The client went away: stop producing.
                if tx.send(Ok(WatchEvent { n, value: value.clone() })).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves the service behind the audit layer on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    kv: Kv,
    audit: AuditLayer,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .layer(audit)
        .add_service(KeyValueServer::new(kv))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}

pub fn local(addr: SocketAddr) -> String {
    format!("http://{addr}")
}
