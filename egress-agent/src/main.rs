//! The `egress-agent` binary: parse the command line, set up logging, run.

use clap::Parser as _;
use egress_agent::cli::{Cli, execute};

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let level = if cli.quiet() { "off" } else { cli.log.as_str() };
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    std::process::exit(execute(cli).await);
}
