//! `egress-bench`: the same traffic through iptables, nftables, an nftables
//! flowtable and the egress dataplane at XDP and at TC, one after the other,
//! on one topology, from one sender, next to the ceiling of that topology.
//! Run it with `cargo xtask bench` (or `--short` for the CI smoke run).

use std::{path::PathBuf, time::Instant};

use anyhow::Context as _;
use clap::Parser;
use egress_bench::{
    gateways::{self, Kind},
    measure, profile, progcost,
    programs::Programs,
    report::{self, Machine, Results},
    topology::{Topology, cpus},
};

#[derive(Debug, Parser)]
#[command(
    name = "egress-bench",
    about = "Benchmark egress against iptables and nftables SNAT"
)]
struct Args {
    /// The CI smoke run: 1 and 40 tenants, 1000 flows, short bursts (under two minutes).
    #[arg(long)]
    short: bool,
    /// Where latest.json, latest.md and pps.svg go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Tenant counts (SNAT rules / prefixes); default 1,40,1000,10000 (short: 1,40).
    #[arg(long, value_delimiter = ',')]
    tenants: Vec<u32>,
    /// Concurrent flow counts; default 1000,100000,1000000 (short: 1000).
    #[arg(long, value_delimiter = ',')]
    flows: Vec<u32>,
    /// Only these gateways (ceiling, iptables, nftables, nft-flowtable, xdp, tc);
    /// default all. Ratios need the ceiling and iptables in the same run.
    #[arg(long, value_delimiter = ',', value_parser = parse_kind)]
    gateways: Vec<Kind>,
    /// The command line to record in the results.
    #[arg(long, default_value = "cargo xtask bench")]
    command: String,
    /// Only time the dataplane programs with BPF_PROG_TEST_RUN (seconds, no topology).
    #[arg(long)]
    prog_cost_only: bool,
    /// Measure nothing: rewrite latest.md and pps.svg from latest.json.
    #[arg(long)]
    render: bool,
}

struct Plan {
    tenants: Vec<u32>,
    flows: Vec<u32>,
    /// Packets per established burst.
    burst: u32,
    /// Packets of the new-flow run.
    new_flows: u32,
    probes: u32,
    prog_cost_singles: u16,
    /// Timed calls (of 250 runs each) in the profile of the hit path.
    profile_hit_calls: u32,
    /// New flows in the profile of the new-flow path.
    profile_new_flows: u32,
}

impl Plan {
    fn from(args: &Args) -> Self {
        let (tenants, flows, burst, new_flows, probes, singles) = if args.short {
            (vec![1, 40], vec![1000], 1_000_000, 200_000, 200, 2000)
        } else {
            (
                vec![1, 40, 1000, 10_000],
                vec![1000, 100_000, 1_000_000],
                5_000_000,
                500_000,
                2000,
                20_000,
            )
        };
        Self {
            tenants: if args.tenants.is_empty() {
                tenants
            } else {
                args.tenants.clone()
            },
            flows: if args.flows.is_empty() {
                flows
            } else {
                args.flows.clone()
            },
            burst,
            new_flows,
            probes,
            prog_cost_singles: singles,
            profile_hit_calls: if args.short { 400 } else { 6_400 },
            profile_new_flows: if args.short { 5_000 } else { 120_000 },
        }
    }
}

/// Global conntrack limits set for the run and restored afterwards.
struct ConntrackLimits {
    saved: Vec<(PathBuf, String)>,
}

impl ConntrackLimits {
    fn raise(entries: u64) -> Self {
        let mut saved = Vec::new();
        for (path, value) in [
            ("/proc/sys/net/netfilter/nf_conntrack_max", entries),
            (
                "/sys/module/nf_conntrack/parameters/hashsize",
                (entries / 4).max(16_384),
            ),
        ] {
            let path = PathBuf::from(path);
            if let Ok(old) = std::fs::read_to_string(&path)
                && std::fs::write(&path, value.to_string()).is_ok()
            {
                saved.push((path, old.trim().to_owned()));
            }
        }
        Self { saved }
    }
}

impl Drop for ConntrackLimits {
    fn drop(&mut self) {
        for (path, old) in &self.saved {
            let _ = std::fs::write(path, old);
        }
    }
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split(':').nth(1))
        })
        .map_or_else(|| "unknown CPU".to_owned(), |m| m.trim().to_owned());
    let memory_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    Machine {
        kernel,
        cpu,
        cores: cpus(),
        memory_gib: memory_kib.div_ceil(1 << 20),
        date,
    }
}

fn main() -> anyhow::Result<()> {
    egress_tests::cleanup::on_signal();
    let args = Args::parse();
    if args.render {
        return Results::read(&args.out)?.write(&args.out);
    }
    anyhow::ensure!(
        egress_tests::require_root(),
        "the benchmark needs root (namespaces, BPF, netfilter)"
    );
    let plan = Plan::from(&args);
    if args.prog_cost_only {
        let costs = prog_costs(&plan, |cost| {
            println!(
                "{} {}: {:.0} ns ({})",
                cost.hook, cost.path, cost.ns_per_packet, cost.method
            );
        });
        let mut notes = Vec::new();
        for profile in profiles(&plan, &costs, &mut notes) {
            println!("{}", report::profile_table(&profile));
        }
        for note in notes {
            println!("{note}");
        }
        return Ok(());
    }
    let started = Instant::now();
    let max_flows = plan.flows.iter().copied().max().unwrap_or(1000);
    // Room for every established flow plus every try of the new-flow runs
    // (the plain one and the one beside an aggressor), with margin: the
    // agent's table evicts nothing, and each tenant's default quota is an
    // equal share of it, so a table sized for one run would measure quota
    // refusals in the later tries instead of flow creation.
    // The IPv6 rows add one more new-flow run and the first flow count's
    // established flows.
    let new_flow_total =
        u64::from(plan.new_flows) * (4 * measure::TRIES as u64 + 2) + u64::from(plan.flows[0]);
    let capacity = ((u64::from(max_flows) + new_flow_total) * 5 / 4).max(65_536);
    let _limits = ConntrackLimits::raise(capacity * 2);

    let mut results = Results {
        machine: machine(),
        command: args.command.clone(),
        mode: if args.short {
            "short".into()
        } else {
            "full".into()
        },
        gateways: Vec::new(),
        records: Vec::new(),
        prog_cost: Vec::new(),
        profiles: Vec::new(),
        notes: Vec::new(),
    };
    if cpus() < 2 {
        results.notes.push(
            "one CPU only: sender and gateway share it, figures are not per gateway core".into(),
        );
    }
    eprintln!(
        "egress-bench ({}): tenants {:?}, flows {:?}, {} gateways; results in {}",
        results.mode,
        plan.tenants,
        plan.flows,
        Kind::ALL.len(),
        args.out.display()
    );

    let topology = Topology::build()?;
    let mut programs = Programs::load(&topology)?;
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|kind| args.gateways.is_empty() || args.gateways.contains(kind))
        .filter(|&kind| match gateways::unavailable(kind, &topology.gw) {
            Some(reason) => {
                eprintln!("{reason}");
                results.notes.push(reason);
                false
            }
            None => true,
        })
        .collect();
    results.gateways = kinds
        .iter()
        .map(|kind| report::Gateway {
            name: kind.name().into(),
            setup: kind.setup().into(),
        })
        .collect();

    let steps = plan.tenants.len() * kinds.len();
    let mut step = 0;
    let mut new_flow_start: u32 = 50_000_000;
    for &tenants in &plan.tenants {
        for &kind in &kinds {
            step += 1;
            let label = format!(
                "[{step}/{steps}] {} with {tenants} tenant{}",
                kind.name(),
                if tenants == 1 { "" } else { "s" }
            );
            eprintln!(
                "{label}: setting up ({:.0}s elapsed)",
                started.elapsed().as_secs_f64()
            );
            // A gateway that cannot be set up (10,000 egress addresses take
            // a while to add) costs its row, not the whole run.
            let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                gateways::start(kind, &topology, &mut programs, tenants, capacity as u32)
            }));
            let active = match started {
                Ok(Ok(active)) => active,
                Ok(Err(err)) => {
                    eprintln!("{label}: could not be set up: {err:#}");
                    results
                        .notes
                        .push(format!("{label}: could not be set up: {err:#}"));
                    continue;
                }
                Err(_) => {
                    results
                        .notes
                        .push(format!("{label}: could not be set up (see the run's log)"));
                    continue;
                }
            };
            for &flows in &plan.flows {
                // A million flows once (with the fewest tenants) is enough
                // to show the table holds them; repeating it per tenant
                // count would double the run.
                if flows >= 1_000_000 && tenants != plan.tenants[0] {
                    continue;
                }
                let t = measure::established(&topology, &mut programs, tenants, flows, plan.burst)?;
                eprintln!(
                    "{label}, {flows} flows: {:.2} Mpps, loss {:.1}%, {:.0} ns/packet on the gateway core",
                    t.pps / 1e6,
                    t.loss * 100.0,
                    t.cpu_ns_per_packet
                );
                record_established(&mut results, (kind, tenants, flows), Family::V4, &label, &t);
                if flows == max_flows && tenants == plan.tenants[0] {
                    record_memory(
                        &mut results,
                        kind,
                        &topology,
                        &active,
                        (tenants, flows),
                        capacity,
                    );
                }
            }
            let first_flows = plan.flows[0];
            let n = measure::new_flows(
                &topology,
                &mut programs,
                tenants,
                new_flow_start,
                plan.new_flows,
            )?;
            new_flow_start += plan.new_flows;
            eprintln!(
                "{label}: {:.0} new flows/s (loss {:.1}%)",
                n.pps,
                n.loss * 100.0
            );
            results.push(kind, tenants, first_flows, "new_flows_per_s", n.pps);
            new_flow_start = measure_ipv6(
                (&topology, &mut programs),
                (kind, tenants, first_flows),
                (&plan, new_flow_start),
                &label,
                &mut results,
            )?;
            if kind.has_quotas() && tenants >= 2 {
                // The first tenant's equal share of the table.
                let quota = (capacity / u64::from(tenants)) as u32;
                let (beside, alone) = measure::new_flows_beside_aggressor(
                    &topology,
                    &mut programs,
                    tenants,
                    new_flow_start,
                    plan.new_flows,
                    quota,
                )?;
                new_flow_start = new_flow_start
                    .wrapping_add(plan.new_flows.saturating_mul(2 * measure::TRIES as u32))
                    .wrapping_add(quota.saturating_mul(2));
                let others = alone.pps;
                eprintln!(
                    "{label}: {:.0} new flows/s of the other tenants while one sits at its quota \
                     of {quota} ({:.0}/s of theirs alone, bursts alternating)",
                    beside.pps, others
                );
                results.push(
                    kind,
                    tenants,
                    first_flows,
                    "new_flows_beside_aggressor_per_s",
                    beside.pps,
                );
                results.push(kind, tenants, first_flows, "new_flows_others_per_s", others);
            }
            if kind.translates() {
                let low = measure::latency(&topology, &mut programs, plan.probes, None)?;
                let high = measure::latency(
                    &topology,
                    &mut programs,
                    plan.probes,
                    Some((tenants, first_flows)),
                )?;
                eprintln!(
                    "{label}: latency p50/p99 {:.0}/{:.0} us idle, {:.0}/{:.0} us under load ({} + {} probes lost)",
                    low.p50_us, low.p99_us, high.p50_us, high.p99_us, low.lost, high.lost
                );
                results.push_latency(kind, tenants, first_flows, "low", low.p50_us, low.p99_us);
                results.push_latency(kind, tenants, first_flows, "high", high.p50_us, high.p99_us);
            }
            // Last, since it restarts the gateway: new flows with every one
            // of them logged.
            let log_dir = egress_tests::peers::TempDir::new("benchlog");
            let mut active = active;
            if gateways::log_translations(&mut active, tenants, capacity as u32, log_dir.path())? {
                let n = measure::new_flows(
                    &topology,
                    &mut programs,
                    tenants,
                    new_flow_start,
                    plan.new_flows,
                )?;
                new_flow_start += plan.new_flows * measure::TRIES as u32;
                // The pipeline drains the ring every 50 ms: give it that.
                std::thread::sleep(std::time::Duration::from_millis(500));
                let lost = gateways::translation_events_lost(&active);
                eprintln!(
                    "{label}: {:.0} new flows/s with the translation log on ({lost} events lost)",
                    n.pps
                );
                results.push(kind, tenants, first_flows, "new_flows_logged_per_s", n.pps);
                results.push(
                    kind,
                    tenants,
                    first_flows,
                    "translation_events_lost",
                    lost as f64,
                );
            }
            gateways::stop(active, &topology, &mut programs).with_context(|| label.clone())?;
        }
        if kinds.contains(&Kind::Ceiling) && kinds.len() > 1 {
            check_drift(
                &topology,
                &mut programs,
                &plan,
                tenants,
                capacity,
                &mut results,
            )?;
        }
    }
    drop(programs);
    drop(topology);

    eprintln!(
        "program cost with BPF_PROG_TEST_RUN ({:.0}s elapsed)",
        started.elapsed().as_secs_f64()
    );
    let costs = prog_costs(&plan, |cost| {
        eprintln!(
            "  {} {}: {:.0} ns ({})",
            cost.hook, cost.path, cost.ns_per_packet, cost.method
        );
    });
    results
        .prog_cost
        .extend(costs.iter().cloned().map(Into::into));
    eprintln!(
        "profiling the programs with perf ({:.0}s elapsed)",
        started.elapsed().as_secs_f64()
    );
    results.profiles = profiles(&plan, &costs, &mut results.notes);
    results.write(&args.out)?;
    eprintln!(
        "done in {:.0}s: {}",
        started.elapsed().as_secs_f64(),
        args.out.join("latest.md").display()
    );
    for line in results.targets() {
        eprintln!("  {line}");
    }
    Ok(())
}

/// Which family a row measures: IPv6's metrics carry their own names so
/// the report puts them in their own table.
#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

/// Records one established-flow measurement, and a note when a gateway
/// that should translate let packets through untranslated.
fn record_established(
    results: &mut Results,
    (kind, tenants, flows): (Kind, u32, u32),
    family: Family,
    label: &str,
    t: &measure::Throughput,
) {
    let (context, pps, loss, cpu) = match family {
        Family::V4 => (
            format!("{label}, {flows} flows"),
            "established_pps",
            "established_loss",
            "cpu_ns_per_packet",
        ),
        Family::V6 => (
            format!("{label}, IPv6, {flows} flows"),
            "established_v6_pps",
            "established_v6_loss",
            "cpu_ns_per_packet_v6",
        ),
    };
    if kind.translates() && t.translated < t.received {
        results.notes.push(format!(
            "{context}: {} of {} packets arrived untranslated",
            t.received - t.translated,
            t.received
        ));
    }
    results.push(kind, tenants, flows, pps, t.pps);
    results.push(kind, tenants, flows, loss, t.loss);
    results.push(kind, tenants, flows, cpu, t.cpu_ns_per_packet);
}

/// The IPv6 rows beside IPv4's, on the same gateway in the same run:
/// established flows at the first flow count and new flows, from the
/// tenants' IPv6 prefixes to their IPv6 egress IPs. Returns the next
/// new-flow number.
fn measure_ipv6(
    (topology, programs): (&Topology, &mut Programs),
    (kind, tenants, flows): (Kind, u32, u32),
    (plan, new_flow_start): (&Plan, u32),
    label: &str,
    results: &mut Results,
) -> anyhow::Result<u32> {
    programs.set_ipv6(true);
    let measured = (|| -> anyhow::Result<(measure::Throughput, measure::Throughput)> {
        let t = measure::established(topology, programs, tenants, flows, plan.burst)?;
        let n = measure::new_flows(topology, programs, tenants, new_flow_start, plan.new_flows)?;
        Ok((t, n))
    })();
    programs.set_ipv6(false);
    let (t, n) = measured?;
    eprintln!(
        "{label}, IPv6, {flows} flows: {:.2} Mpps, loss {:.1}%, {:.0} ns/packet; {:.0} new flows/s",
        t.pps / 1e6,
        t.loss * 100.0,
        t.cpu_ns_per_packet,
        n.pps
    );
    record_established(results, (kind, tenants, flows), Family::V6, label, &t);
    results.push(kind, tenants, flows, "new_flows_v6_per_s", n.pps);
    Ok(new_flow_start.wrapping_add(plan.new_flows))
}

/// Most a machine's speed may drift within one tenant group before the
/// results say so.
const DRIFT: f64 = 0.15;

/// Measures the ceiling again after a tenant group's gateways: the group's
/// ratios compare gateways measured minutes apart, which only holds if the
/// machine kept its speed meanwhile (virtual machines do not always).
fn check_drift(
    topology: &Topology,
    programs: &mut Programs,
    plan: &Plan,
    tenants: u32,
    capacity: u64,
    results: &mut Results,
) -> anyhow::Result<()> {
    let flows = plan.flows[0];
    let Some(before) = results.value(
        Kind::Ceiling.name(),
        tenants,
        Some(flows),
        "established_pps",
        None,
    ) else {
        return Ok(());
    };
    let active = gateways::start(Kind::Ceiling, topology, programs, tenants, capacity as u32)?;
    let after = measure::established(topology, programs, tenants, flows, plan.burst)?;
    gateways::stop(active, topology, programs)?;
    let change = after.pps / before - 1.0;
    let line = format!(
        "{tenants} tenants: the ceiling read {:.2} Mpps before this group's gateways and {:.2} Mpps after ({:+.0}%)",
        before / 1e6,
        after.pps / 1e6,
        change * 100.0
    );
    eprintln!("{line}");
    if change.abs() > DRIFT {
        results.notes.push(format!(
            "{line}: the machine changed speed during the group, so its ratios are less exact than the others"
        ));
    }
    results.push(
        Kind::Ceiling,
        tenants,
        flows,
        "ceiling_after_pps",
        after.pps,
    );
    Ok(())
}

fn parse_kind(name: &str) -> Result<Kind, String> {
    Kind::ALL
        .into_iter()
        .find(|kind| kind.name() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown gateway {name:?}; one of {}", names.join(", "))
        })
}

/// The programs' costs with one tenant and with the most tenants.
fn prog_costs(plan: &Plan, mut each: impl FnMut(&progcost::Cost)) -> Vec<progcost::Cost> {
    let most = plan.tenants.iter().copied().max().unwrap_or(1);
    let mut costs = Vec::new();
    for tenants in if most == 1 { vec![1] } else { vec![1, most] } {
        for cost in progcost::measure(tenants, plan.prog_cost_singles) {
            each(&cost);
            costs.push(cost);
        }
    }
    for cost in progcost::measure_v6(plan.prog_cost_singles) {
        each(&cost);
        costs.push(cost);
    }
    for cost in progcost::measure_sweep() {
        each(&cost);
        costs.push(cost);
    }
    costs
}

/// Profiles of the programs with the most tenants, or a note saying why
/// there are none.
fn profiles(
    plan: &Plan,
    costs: &[progcost::Cost],
    notes: &mut Vec<String>,
) -> Vec<profile::Profile> {
    if let Some(why) = profile::unavailable() {
        notes.push(format!("no profile: {why}"));
        return Vec::new();
    }
    let tenants = plan.tenants.iter().copied().max().unwrap_or(1);
    match progcost::profile(
        tenants,
        plan.profile_hit_calls,
        plan.profile_new_flows,
        costs,
    ) {
        Ok(profiles) => profiles,
        Err(err) => {
            notes.push(format!("no profile: {err:#}"));
            Vec::new()
        }
    }
}

fn record_memory(
    results: &mut Results,
    kind: Kind,
    topology: &Topology,
    active: &gateways::Active,
    (tenants, flows): (u32, u32),
    capacity: u64,
) {
    let bytes = match (kind, active) {
        (Kind::Xdp | Kind::Tc, gateways::Active::Agent(_, agent)) => {
            // The table is preallocated for the run's capacity: its share
            // for the flows held is what holding them costs.
            let path = PathBuf::from(format!("/sys/fs/bpf/{}/CONNTRACK_V4", agent.instance));
            measure::map_memory(&path)
                .ok()
                .map(|b| b as f64 * f64::from(flows) / capacity as f64)
        }
        (Kind::Iptables, _) => gateways::conntrack_memory(&topology.gw)
            .ok()
            .map(|(_, b)| b as f64),
        _ => None,
    };
    if let Some(bytes) = bytes {
        results.push(kind, tenants, flows, "memory_bytes", bytes);
    }
}
