//! Compiles `examples/grpc_server/proto/kv.proto` with `protox` (pure Rust) and writes the Tonic code next to it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/grpc_server/proto");
    let descriptors = protox::compile([format!("{root}/kv.proto")], [root])?;
    tonic_prost_build::configure().build_client(true).build_server(true).out_dir(root).compile_fds(descriptors)?;
    println!("wrote {root}/kv.v1.rs");
    Ok(())
}
