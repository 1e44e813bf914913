//! Compiles the Isthmus protos with `protox`, a protobuf compiler written in
//! Rust, so that building Isthmus needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["sync.proto", "ca.proto"], ["proto"])?;
    tonic_prost_build::configure()
        // What `compile_protos` adds by itself and `compile_fds` does not.
        .type_attribute(".", "#[allow(clippy::all)]")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
