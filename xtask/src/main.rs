//! `cargo xtask`: the project's commands, each installing what it needs
//! first (scripts/install-deps.sh is idempotent and takes a second when
//! everything is there).
//!
//! - `setup`: install the toolchain and test peers.
//! - `demo`: build, then show two tenants leaving with their egress IPs.
//! - `test`: unit tests and the privileged integration tests.
//! - `lint`: rustfmt and clippy, the BPF crate included.
//! - `bench`: egress against iptables and nftables, results in bench/results.
//! - `ci`: what `.ci/run` runs.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain (Debian rustc-web, LLVM 22, bpf-linker) and test peers.
    Setup,
    /// Build in release mode and run the two-tenant demo in network namespaces.
    Demo,
    /// Run every test: unit tests, BPF_PROG_TEST_RUN packet tests and the
    /// namespace integration tests (needs root).
    Test {
        /// Extra arguments for `cargo test` (a test name filter, `--nocapture`...).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// rustfmt --check and clippy -D warnings on every crate.
    Lint,
    /// Measure egress against iptables and nftables SNAT (needs root, a
    /// quiet machine, and about half an hour; `--short` is a two-minute
    /// smoke run that writes under target/ instead of bench/results).
    Bench {
        #[arg(long)]
        short: bool,
        /// Extra arguments for egress-bench (see `egress-bench --help`).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Everything CI checks: lint, then test.
    Ci,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Task::Setup => setup(&root),
        Task::Demo => {
            setup(&root)?;
            cargo(
                &root,
                &[
                    "build",
                    "--release",
                    "-p",
                    "egress-agent",
                    "-p",
                    "egress-tests",
                    "--bin",
                    "egress-agent",
                    "--bin",
                    "demo",
                ],
            )?;
            run(Command::new(root.join("target/release/demo"))
                .env("EGRESS_AGENT_BIN", root.join("target/release/egress-agent")))
        }
        Task::Test { args } => {
            setup(&root)?;
            test(&root, &args)
        }
        Task::Lint => {
            setup(&root)?;
            lint(&root)
        }
        Task::Bench { short, args } => {
            setup(&root)?;
            bench(&root, short, &args)
        }
        Task::Ci => {
            setup(&root)?;
            lint(&root)?;
            test(&root, &[])?;
            bench(&root, true, &[])
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn setup(root: &Path) -> anyhow::Result<()> {
    require_root()?;
    run(Command::new("bash").arg(root.join("scripts/install-deps.sh")))
}

fn test(root: &Path, args: &[String]) -> anyhow::Result<()> {
    require_root()?;
    // The integration tests drive the agent binary; build it first.
    cargo(root, &["build", "-p", "egress-agent"])?;
    let mut command = cargo_command(root);
    command.arg("test");
    if !args.is_empty() {
        command.arg("--").args(args);
    }
    run(&mut command)?;
    // The packet tests once more on the TC compilation of the packet path:
    // the same frames and expected bytes prove both hooks.
    let mut command = cargo_command(root);
    command
        .args(["test", "-p", "egress-tests"])
        .args(PACKET_TESTS.iter().flat_map(|name| ["--test", name]))
        .env("EGRESS_TEST_HOOK", "tc");
    if !args.is_empty() {
        command.arg("--").args(args);
    }
    eprintln!("packet tests again, on the TC hook (EGRESS_TEST_HOOK=tc)");
    run(&mut command)
}

/// The test files that run the programs through BPF_PROG_TEST_RUN.
const PACKET_TESTS: [&str; 9] = [
    "packets",
    "packets6",
    "malformed6",
    "conntrack",
    "malformed",
    "isolation",
    "audit_events",
    "inbound",
    "sweep",
];

fn bench(root: &Path, short: bool, args: &[String]) -> anyhow::Result<()> {
    require_root()?;
    cargo(
        root,
        &[
            "build",
            "--release",
            "-p",
            "egress-agent",
            "-p",
            "egress-bench",
        ],
    )?;
    let mut recorded = String::from("cargo xtask bench");
    let mut command = Command::new(root.join("target/release/egress-bench"));
    command.current_dir(root);
    if short {
        recorded.push_str(" --short");
        command.args(["--short", "--out", "target/bench-short"]);
    }
    for arg in args {
        recorded.push(' ');
        recorded.push_str(arg);
    }
    run(command
        .args(args)
        .args(["--command", &recorded])
        .env("EGRESS_AGENT_BIN", root.join("target/release/egress-agent")))
}

fn lint(root: &Path) -> anyhow::Result<()> {
    cargo(root, &["fmt", "--all", "--", "--check"])?;
    cargo(root, &["clippy", "--all-targets", "--", "-D", "warnings"])?;
    // The BPF crates only build for the BPF target, with Debian's compiler
    // (the one that has the library sources), as the agent and bench builds do.
    run(Command::new("rustup")
        .current_dir(root)
        .args([
            "run",
            "debian-web",
            "cargo",
            "clippy",
            "-p",
            "egress-ebpf",
            "-p",
            "bench-ebpf",
        ])
        .args([
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
        ])
        .args(["--target-dir", "target/bpf-clippy", "--", "-D", "warnings"])
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"",
        ))
}

fn cargo_command(root: &Path) -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root);
    command
}

fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    run(cargo_command(root).args(args))
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {command:?}");
    let status = command
        .status()
        .with_context(|| format!("spawning {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

fn require_root() -> anyhow::Result<()> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!(
            "run this as root: it installs packages, loads BPF programs and creates network namespaces"
        );
    }
    Ok(())
}
