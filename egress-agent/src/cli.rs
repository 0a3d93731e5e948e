//! The command line: one subcommand per thing an operator does.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{
    agent::{self, RunError},
    config::format_mac,
    instance::{DEFAULT_INSTANCE, Instance},
    kubernetes::sync::KubeOptions,
    status,
};

#[derive(Debug, Parser)]
#[command(
    name = "egress-agent",
    version,
    about = "Per-tenant egress IPs on an XDP SNAT dataplane",
    long_about = "Loads the egress dataplane (XDP and TC programs) on a gateway, keeps its maps \
                  and egress addresses in sync with the configuration, and reports what it does. \
                  `run`, `cleanup` need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN for bpffs); \
                  `status` and `flows` need read access to /sys/fs/bpf."
)]
pub struct Cli {
    /// Name of the dataplane instance: maps are pinned under /sys/fs/bpf/NAME,
    /// the running agent's state lives in /run/NAME.
    #[arg(long, global = true, env = "EGRESS_INSTANCE", default_value = DEFAULT_INSTANCE)]
    pub instance: String,

    /// Log filter (error, warn, info, debug, trace or a tracing directive).
    #[arg(long, global = true, env = "EGRESS_LOG", default_value = "info")]
    pub log: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load and attach the dataplane (adopting one a previous agent left
    /// serving), serve until SIGTERM/SIGINT, then undo everything.
    Run {
        /// The YAML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// On SIGTERM/SIGINT leave the dataplane serving (programs attached,
        /// maps, flows and egress addresses in place) for the next agent to
        /// adopt: restarts and upgrades then drop no connection. `cleanup`
        /// removes it for good. A killed agent always leaves it serving.
        #[arg(long)]
        keep_dataplane: bool,
        /// Serve /healthz, /readyz and /metrics on this address (e.g. 0.0.0.0:9477).
        #[arg(long, env = "EGRESS_LISTEN")]
        listen: Option<std::net::SocketAddr>,
        /// Also take tenants from the cluster's EgressGateways (the file then
        /// describes the machine: interfaces, conntrack, static tenants).
        #[arg(long)]
        kubernetes: bool,
        /// Read the API server from this kubeconfig (a gateway VM) instead of
        /// the in-cluster service account.
        #[arg(long, env = "KUBECONFIG", requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
        /// This node's name in the cluster (the host name by default).
        #[arg(long, env = "NODE_NAME", requires = "kubernetes")]
        node_name: Option<String>,
        /// Also serve Kube-OVN VpcEgressGateways (needs Kube-OVN's CRDs).
        #[arg(long, requires = "kubernetes")]
        kube_ovn: bool,
        /// Namespace of the agent DaemonSet: gateways go only to nodes
        /// where an agent pod runs.
        #[arg(long, env = "POD_NAMESPACE", requires = "kubernetes")]
        agent_namespace: Option<String>,
    },
    /// Validate a configuration against this machine and show what `run` would do.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show the instance: programs, tenants, flow count, packet verdicts.
    Status {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// List tracked flows: original and translated tuple, state, age.
    Flows {
        #[arg(long)]
        json: bool,
        /// Only this tenant's flows.
        #[arg(long)]
        tenant: Option<String>,
        /// Stream flows as they are created and ended (from the running
        /// agent), until interrupted or the agent stops.
        #[arg(long)]
        follow: bool,
    },
    /// Remove what an agent that did not shut down left behind: pinned maps,
    /// egress addresses and macvlans it added, sysctls it changed.
    Cleanup,
    /// Print the EgressGateway CustomResourceDefinition (deploy/crd.yaml) as YAML.
    Crd,
    /// Read the translation log (audit.log).
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// What the scripts in Kube-OVN's gateway pods run (deploy/kube-ovn/image).
    KubeOvn {
        #[command(subcommand)]
        command: KubeOvnCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum KubeOvnCommand {
    /// A VpcNatGateway's `nat-gateway.sh <verb> <rule>...`: exit 0 and
    /// nothing on stderr when done, 1 and the reason on stderr otherwise.
    NatGateway {
        /// init, subnet-route-add|del, eip-add|del, snat-add|del,
        /// dnat-add|del, floating-ip-add|del, get-iptables-version.
        verb: String,
        /// Rules, fields separated by commas.
        #[arg(allow_hyphen_values = true)]
        rules: Vec<String>,
    },
    /// A VpcEgressGateway's init container (`init-vpc-egress-gateway.sh`):
    /// load the dataplane with the pod's translation, attach it through
    /// netlink filters that stay without any process, and exit.
    AttachEgressGateway(crate::kube_ovn_pod::egress_gateway::AttachArgs),
    /// Kube-OVN's `kube-ovn-bfdd-supervisor`: `run` answers the VPC's BFD
    /// sessions (from POD_IPS, BFD_PEER_IPS, BFD_MIN_TX, BFD_MIN_RX,
    /// BFD_MULTI), AdminDown while the dataplane is not on the internal
    /// interface; `live`, `ready`, `status` ask it over its control socket.
    BfddSupervisor {
        #[arg(value_enum)]
        command: SupervisorCommand,
    },
    /// OpenBFDD's `bfdd-control`, the subset Kube-OVN's scripts use:
    /// `status`, `allow IP`, `session new set mintx|minrx N ms`,
    /// `session new set multi N`, `log type TYPE yes|no`.
    BfddControl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SupervisorCommand {
    Run,
    Live,
    Ready,
    Status,
}

impl Cli {
    /// Commands whose callers read stderr as failure log nothing there.
    pub fn quiet(&self) -> bool {
        matches!(
            self.command,
            Command::KubeOvn {
                command: KubeOvnCommand::NatGateway { .. }
            }
        )
    }
}

#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Which tenant and inside endpoint held an egress address (and port)
    /// at a moment. Exit 0 when some flow did, 1 when none did, 2 when the
    /// log cannot be read.
    Lookup(crate::audit::lookup::LookupArgs),
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_default()
}

/// Runs a command; returns the process exit code.
pub async fn execute(cli: Cli) -> i32 {
    let instance = match Instance::new(&cli.instance) {
        Ok(instance) => instance,
        Err(err) => {
            eprintln!("egress-agent: {err:#}");
            return 2;
        }
    };
    let result: Result<(), RunError> = match cli.command {
        Command::Run {
            config,
            keep_dataplane,
            listen,
            kubernetes,
            kubeconfig,
            node_name,
            kube_ovn,
            agent_namespace,
        } => {
            let kubernetes = kubernetes.then(|| KubeOptions {
                kubeconfig,
                node_name: node_name.unwrap_or_else(host_name),
                kube_ovn,
                agent_namespace,
            });
            let options = agent::RunOptions {
                config,
                keep_dataplane,
                listen,
                kubernetes,
            };
            agent::run(&instance, &options).await
        }
        Command::Check { config } => check(&instance, &config).await,
        Command::Status { json } => print_status(&instance, json).map_err(Into::into),
        Command::Flows {
            json,
            tenant,
            follow: true,
        } => crate::audit::follow::follow(&instance.run_dir, json, tenant.as_deref())
            .map_err(Into::into),
        Command::Flows {
            json,
            tenant,
            follow: false,
        } => print_flows(&instance, json, tenant.as_deref()).map_err(Into::into),
        Command::Cleanup => agent::cleanup(&instance).await.map_err(Into::into),
        Command::Crd => crate::kubernetes::crd::print_crd().map_err(Into::into),
        Command::Log { command } => return log(&command),
        Command::KubeOvn { command } => return kube_ovn(&instance, command).await,
    };
    match result {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("egress-agent: {err}");
            err.exit_code()
        }
    }
}

/// The pod commands keep Kube-OVN's exit codes and messages, which its
/// probes and scripts read.
async fn kube_ovn(instance: &Instance, command: KubeOvnCommand) -> i32 {
    use crate::kube_ovn_pod::bfdd::{self, control::Request};
    match command {
        KubeOvnCommand::NatGateway { verb, rules } => {
            crate::kube_ovn_pod::nat_gateway::run(instance, &verb, &rules).await
        }
        KubeOvnCommand::BfddSupervisor {
            command: SupervisorCommand::Run,
        } => match bfdd::run().await {
            Ok(()) => 0,
            Err(err) => {
                eprintln!("BFD supervisor failed: {err:#}");
                1
            }
        },
        KubeOvnCommand::BfddSupervisor { command } => {
            let request = match command {
                SupervisorCommand::Live | SupervisorCommand::Run => Request::Live,
                SupervisorCommand::Ready => Request::Ready,
                SupervisorCommand::Status => Request::Status,
            };
            bfdd::probe(request).await
        }
        KubeOvnCommand::BfddControl { args } => bfdd::bfdd_control_client(args).await,
        KubeOvnCommand::AttachEgressGateway(args) => {
            match crate::kube_ovn_pod::egress_gateway::attach(instance, &args).await {
                Ok(()) => 0,
                Err(err) => {
                    eprintln!("egress-agent: {err:#}");
                    1
                }
            }
        }
    }
}

/// `log` reads files only: its exit codes are its own (1 is "not found").
fn log(command: &LogCommand) -> i32 {
    match command {
        LogCommand::Lookup(args) => crate::audit::lookup::run(args),
    }
}

async fn check(instance: &Instance, config: &std::path::Path) -> Result<(), RunError> {
    let (resolved, _, _) = agent::validate(instance, config).await?;
    println!("{}: valid", config.display());
    let internal: Vec<_> = resolved.internal.iter().map(|l| l.name.as_str()).collect();
    println!("  internal: {}", internal.join(", "));
    println!("  external: {}", resolved.external.name);
    println!("  conntrack: up to {} flows", resolved.max_flows);
    let over = resolved.overcommitted_flows();
    if over > 0 {
        println!(
            "  warning: the tenants' maxFlows exceed conntrack.maxFlows by {over}: together \
             they can fill the table, and then every tenant's new flows are refused"
        );
    }
    for tenant in &resolved.tenants {
        let sources: Vec<_> = (tenant.sources.iter().map(ToString::to_string))
            .chain(tenant.sources_v6.iter().map(ToString::to_string))
            .collect();
        let egress: Vec<_> = (tenant.egress.iter().map(ToString::to_string))
            .chain(tenant.egress_v6.iter().map(ToString::to_string))
            .collect();
        print!(
            "  tenant {}: {} -> {} (ports {}-{})",
            tenant.name,
            sources.join(","),
            egress.join(","),
            tenant.ports.min,
            tenant.ports.max
        );
        print!(", up to {} flows", tenant.limits.max_flows);
        if tenant.limits.new_flows_per_second > 0 {
            print!(
                ", {} new/s (burst {})",
                tenant.limits.new_flows_per_second, tenant.limits.new_flow_burst
            );
        }
        for port in &tenant.ingress {
            match port.mac {
                Some(mac) => print!(" via ifindex {} mac {}", port.ifindex, format_mac(mac)),
                None => print!(" via ifindex {}", port.ifindex),
            }
        }
        println!();
    }
    for macvlan in &resolved.macvlans {
        println!(
            "  next hop {} on {}: {}/32, MAC {}",
            macvlan.name,
            macvlan.parent.name,
            macvlan.address,
            format_mac(macvlan.mac)
        );
    }
    Ok(())
}

fn print_status(instance: &Instance, json: bool) -> anyhow::Result<()> {
    let status = status::collect(instance)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status::render_status(&status));
    }
    Ok(())
}

fn print_flows(instance: &Instance, json: bool, tenant: Option<&str>) -> anyhow::Result<()> {
    let rows = status::flow_rows(instance, tenant)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", status::render_flows(&rows));
    }
    Ok(())
}
