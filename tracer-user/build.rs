//! Builds the eBPF programs (crate `tracer-ebpf`) for the BPF target with the nightly toolchain
//! and bpf-linker, via aya-build, and leaves the object in OUT_DIR for `include_bytes!`.
//! `cargo xtask setup` installs what this needs. With AYA_BUILD_SKIP=1 (for quick checks of the
//! pure modules) an empty object is left instead, and the agent refuses to start.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .ok_or_else(|| anyhow::anyhow!("tracer-user has no parent directory"))?
        .join("tracer-ebpf");
    let ebpf_dir = ebpf_dir.to_string_lossy().into_owned();
    let package = aya_build::Package {
        name: "tracer-ebpf",
        root_dir: &ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())?;
    let object = PathBuf::from(env::var("OUT_DIR")?).join("tracer-ebpf");
    if !object.exists() {
        fs::write(&object, [])?;
    }
    Ok(())
}
