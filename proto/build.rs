//! Generates the `pn.v1` types with prost. `protox` parses the `.proto` files in pure Rust, so
//! no `protoc` binary is needed on any machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["pn/v1/pn.proto"], ["proto"])?;
    let mut config = prost_build::Config::new();
    config.type_attribute(".", "#[derive(serde::Serialize)]");
    config.type_attribute(".", "#[serde(rename_all = \"camelCase\")]");
    config.compile_fds(fds)?;
    Ok(())
}
