//! Builds the BPF programs (egress-ebpf) for the BPF target and leaves the
//! object in OUT_DIR, where `dataplane::object` embeds it.
//!
//! The BPF crate needs `-Z build-std=core`, so it is compiled by the
//! `debian-web` toolchain (Debian's rustc-web, which ships the library
//! sources) with RUSTC_BOOTSTRAP=1; scripts/install-deps.sh sets that up. The
//! rest of the workspace builds with the ordinary stable toolchain.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|package| package.name.as_str() == "egress-ebpf")
        .ok_or_else(|| anyhow!("egress-ebpf is not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("egress-ebpf manifest has no parent directory"))?;
    // SAFETY: build scripts are single-threaded; aya-build reads this to
    // enable -Z build-std on the stable Debian compiler.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let package = aya_build::Package {
        name: "egress-ebpf",
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom("debian-web"))
}
