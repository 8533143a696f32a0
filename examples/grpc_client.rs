//! A client for the `grpc_server` example, to check it is working without `grpcurl`: a `Put` with the token, a
//! `Put` without it (refused), a `Get` of a missing key and one of the key put. Each call becomes one
//! `grpc.call` event in the server's `data/grpc_audit.jsonl`, with its real gRPC status.
//!
//! ```text
//! cargo run --example grpc_server --features tonic      # in one terminal
//! cargo run --example grpc_client --features tonic      # in another
//! ```

#[allow(unreachable_pub, missing_docs, clippy::all)]
mod pb {
    include!("grpc_server/proto/kv.v1.rs");
}

use clap::Parser;
use pb::key_value_client::KeyValueClient;
use pb::{GetRequest, PutRequest};
use tonic::Request;

/// Calls the `grpc_server` example.
#[derive(Debug, Parser)]
struct Cli {
    /// The server's address.
    #[arg(long, env = "ADDR", default_value = "127.0.0.1:50051")]
    addr: String,
    /// The token `Put` needs (the server's `--kv-token`).
    #[arg(long, env = "KV_TOKEN", default_value = "dev-token", hide_env_values = true)]
    kv_token: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    let mut client = KeyValueClient::connect(format!("http://{}", cli.addr)).await.map_err(|e| {
        format!("cannot connect to {} (is `cargo run --example grpc_server --features tonic` running?): {e}", cli.addr)
    })?;

    let put = |authorized: bool| {
        let mut request = Request::new(PutRequest { key: "greeting".into(), value: "hello".into() });
        if authorized {
            request.metadata_mut().insert("authorization", format!("Bearer {}", cli.kv_token).parse().unwrap());
        }
        request
    };
    match client.put(put(true)).await {
        Ok(reply) => println!("Put greeting (with the token): OK, created = {}", reply.into_inner().created),
        Err(status) => println!("Put greeting (with the token): {:?} {}", status.code(), status.message()),
    }
    match client.put(put(false)).await {
        Ok(_) => println!("Put greeting (without a token): OK (unexpected)"),
        Err(status) => println!("Put greeting (without a token): {:?} (expected: Unauthenticated)", status.code()),
    }
    for key in ["missing", "greeting"] {
        match client.get(GetRequest { key: key.into() }).await {
            Ok(reply) => println!("Get {key}: OK, value = {:?}", reply.into_inner().value),
            Err(status) => println!("Get {key}: {:?}", status.code()),
        }
    }
    println!("each call is one grpc.call event in the server's data/grpc_audit.jsonl");
    Ok(())
}
