//! Compiles `proto/cim.proto` with protox (pure Rust), so no installed `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/cim.proto"];
    println!("cargo:rerun-if-changed=proto/cim.proto");
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
