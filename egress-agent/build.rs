//! Builds the BPF programs (egress-ebpf) for the BPF target and leaves the
//! object in OUT_DIR, where `dataplane::OBJECT` embeds it.
//!
//! The BPF crate needs `-Z build-std=core`, so it is compiled by the
//! `debian-web` toolchain (Debian's rustc-web, which ships the library
//! sources) with RUSTC_BOOTSTRAP=1; scripts/install-deps.sh sets that up. The
//! rest of the workspace builds with the ordinary stable toolchain.

fn main() -> anyhow::Result<()> {
    // SAFETY: build scripts are single-threaded; aya-build reads this to
    // enable -Z build-std on Debian's stable compiler.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../egress-ebpf");
    let package = aya_build::Package {
        name: "egress-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom("debian-web"))
}
