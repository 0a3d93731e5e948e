//! Results: `latest.json` (every figure), and from it `latest.md` (tables,
//! the targets met or missed) and `pps.svg` (throughput against tenants,
//! one line per gateway).

use std::{collections::BTreeSet, fmt::Write as _, path::Path};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::{gateways::Kind, profile::Profile, progcost::Cost};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: u64,
    pub date: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub gateway: String,
    pub tenants: u32,
    pub flows: u32,
    pub metric: String,
    pub value: f64,
    /// Latency records: `low` or `high` load.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub load: Option<String>,
}

/// One gateway measured in a run, and how it was set up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gateway {
    pub name: String,
    pub setup: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub machine: Machine,
    pub command: String,
    pub mode: String,
    /// The gateways measured (empty in runs from before it was recorded).
    #[serde(default)]
    pub gateways: Vec<Gateway>,
    pub records: Vec<Record>,
    pub prog_cost: Vec<ProgCostRecord>,
    /// Where the programs' time goes, from `perf record`.
    #[serde(default)]
    pub profiles: Vec<Profile>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgCostRecord {
    /// `xdp` (snat_outbound, snat_reply) or `tc` (tc_outbound, tc_reply);
    /// runs from before TC was timed only have XDP figures.
    #[serde(default = "xdp_hook")]
    pub hook: String,
    pub path: String,
    pub ns_per_packet: f64,
    pub method: String,
}

fn xdp_hook() -> String {
    "xdp".into()
}

impl From<Cost> for ProgCostRecord {
    fn from(cost: Cost) -> Self {
        Self {
            hook: cost.hook.into(),
            path: cost.path,
            ns_per_packet: cost.ns_per_packet,
            method: cost.method,
        }
    }
}

/// "what: 4.5x (1 tenants), 3.2x (40 tenants), met" (or where it missed).
fn judge(what: &str, figures: &[(u32, f64)], goal: f64, unit: &str) -> String {
    let shown: Vec<String> = figures
        .iter()
        .map(|(t, v)| format!("{v:.1}{unit} ({t} tenants)"))
        .collect();
    let missed: Vec<String> = figures
        .iter()
        .filter(|(_, v)| *v < goal)
        .map(|(t, _)| t.to_string())
        .collect();
    let verdict = if missed.is_empty() {
        "met".to_owned()
    } else {
        format!("MISSED at {} tenants", missed.join(", "))
    };
    format!("{what}: {}, {verdict}", shown.join(", "))
}

impl Results {
    pub fn push(&mut self, gateway: Kind, tenants: u32, flows: u32, metric: &str, value: f64) {
        self.records.push(Record {
            gateway: gateway.name().into(),
            tenants,
            flows,
            metric: metric.into(),
            value,
            load: None,
        });
    }

    pub fn push_latency(
        &mut self,
        gateway: Kind,
        tenants: u32,
        flows: u32,
        load: &str,
        p50: f64,
        p99: f64,
    ) {
        for (metric, value) in [("latency_p50_us", p50), ("latency_p99_us", p99)] {
            self.records.push(Record {
                gateway: gateway.name().into(),
                tenants,
                flows,
                metric: metric.into(),
                value,
                load: Some(load.into()),
            });
        }
    }

    /// The value of `metric` for `gateway` at `tenants`, at `flows` if given
    /// (any flow count if not), at exactly `load` (`None`: not a latency).
    pub fn value(
        &self,
        gateway: &str,
        tenants: u32,
        flows: Option<u32>,
        metric: &str,
        load: Option<&str>,
    ) -> Option<f64> {
        self.records
            .iter()
            .find(|r| {
                r.gateway == gateway
                    && r.tenants == tenants
                    && flows.is_none_or(|f| r.flows == f)
                    && r.metric == metric
                    && r.load.as_deref() == load
            })
            .map(|r| r.value)
    }

    fn axis(&self, pick: impl Fn(&Record) -> u32) -> Vec<u32> {
        self.records
            .iter()
            .map(pick)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(
            dir.join("latest.json"),
            serde_json::to_string_pretty(self)? + "\n",
        )?;
        std::fs::write(dir.join("latest.md"), self.markdown())?;
        std::fs::write(dir.join("pps.svg"), self.svg())?;
        Ok(())
    }

    /// Reads the figures of an earlier run back.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("latest.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Whether any gateway has a figure for this cell (the largest flow
    /// count is only measured with the first tenant count).
    fn measured(&self, gateways: &[&str], tenants: u32, flows: u32, metric: &str) -> bool {
        gateways
            .iter()
            .any(|g| self.value(g, tenants, Some(flows), metric, None).is_some())
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(md, "# egress benchmark, {}\n", m.date);
        let _ = writeln!(
            md,
            "Machine: Linux {}, {} ({} cores), {} GiB. Mode: {}.\n",
            m.kernel, m.cpu, m.cores, m.memory_gib, self.mode
        );
        let _ = writeln!(md, "Command: `{}`\n", self.command);
        let _ = writeln!(
            md,
            "Every figure is what the sink received, in one run, on one topology, from one sender: a BPF_PROG_RUN \
             live-frames generator on one core, the gateway's receive processing as a threaded NAPI kthread on the \
             other. Throughput figures (established and new flows) are the best of {} bursts per gateway (interference on a small \
             machine only ever slows a gateway down). Percentages are of the ceiling (plain XDP forwarding, no \
             NAT) measured the same way.\n",
            crate::measure::TRIES
        );
        if !self.gateways.is_empty() {
            let _ = writeln!(md, "## Gateways\n");
            for g in &self.gateways {
                let _ = writeln!(md, "- **{}**: {}", g.name, g.setup);
            }
            let _ = writeln!(md);
        }
        let gateways: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
        let tenants = self.axis(|r| r.tenants);
        let flows = self.axis(|r| r.flows);
        let ratio_header = RATIOS.map(|g| format!("{g} / iptables")).join(" | ");

        let _ = writeln!(
            md,
            "## Established flows: packets per second forwarded by one gateway core (64-byte UDP)\n"
        );
        let _ = writeln!(
            md,
            "| tenants | flows | {} | {ratio_header} |",
            gateways.join(" | ")
        );
        let _ = writeln!(
            md,
            "|---|---|{}",
            "---|".repeat(gateways.len() + RATIOS.len())
        );
        for &t in &tenants {
            for &f in &flows {
                if !self.measured(&gateways, t, f, "established_pps") {
                    continue;
                }
                let ceiling = self.value("ceiling", t, Some(f), "established_pps", None);
                let mut row = format!("| {t} | {f} |");
                for g in &gateways {
                    match (self.value(g, t, Some(f), "established_pps", None), ceiling) {
                        (Some(v), Some(c)) if *g != "ceiling" => {
                            let _ = write!(row, " {} ({:.0}%) |", mpps(v), 100.0 * v / c);
                        }
                        (Some(v), _) => {
                            let _ = write!(row, " {} |", mpps(v));
                        }
                        _ => row.push_str(" - |"),
                    }
                }
                for g in RATIOS {
                    row.push_str(&ratio_cell(
                        self.value(g, t, Some(f), "established_pps", None),
                        self.value("iptables", t, Some(f), "established_pps", None),
                    ));
                }
                let _ = writeln!(md, "{row}");
            }
        }
        self.simple_table(
            &mut md,
            "Loss at saturation (share of offered packets not forwarded)",
            "established_loss",
            &gateways,
            &tenants,
            &flows,
            |v| format!("{:.1}%", v * 100.0),
        );
        self.simple_table(
            &mut md,
            "Gateway core busy time per forwarded packet (ns)",
            "cpu_ns_per_packet",
            &gateways,
            &tenants,
            &flows,
            |v| format!("{v:.0}"),
        );

        let _ = writeln!(
            md,
            "\n## New flows per second (every packet a new 5-tuple)\n"
        );
        let _ = writeln!(
            md,
            "| tenants | {} | {ratio_header} |",
            gateways.join(" | ")
        );
        let _ = writeln!(md, "|---|{}", "---|".repeat(gateways.len() + RATIOS.len()));
        for &t in &tenants {
            let mut row = format!("| {t} |");
            for g in &gateways {
                match self.value(g, t, None, "new_flows_per_s", None) {
                    Some(v) => {
                        let _ = write!(row, " {} |", mpps(v).replace("pps", "/s"));
                    }
                    None => row.push_str(" - |"),
                }
            }
            for g in RATIOS {
                row.push_str(&ratio_cell(
                    self.value(g, t, None, "new_flows_per_s", None),
                    self.value("iptables", t, None, "new_flows_per_s", None),
                ));
            }
            let _ = writeln!(md, "{row}");
        }

        self.ipv6_table(&mut md, &gateways, &tenants, &flows);

        let logged_rows: Vec<(u32, &str, f64, f64, f64)> = tenants
            .iter()
            .flat_map(|&t| ["xdp", "tc"].map(move |g| (t, g)))
            .filter_map(|(t, g)| {
                Some((
                    t,
                    g,
                    self.value(g, t, None, "new_flows_per_s", None)?,
                    self.value(g, t, None, "new_flows_logged_per_s", None)?,
                    self.value(g, t, None, "translation_events_lost", None)?,
                ))
            })
            .collect();
        if !logged_rows.is_empty() {
            let _ = writeln!(
                md,
                "\n## New flows per second with the translation log on\n\n\
                 The same gateway restarted with `audit.log` (JSON lines, rotated): every \
                 new flow reports itself through the dataplane's ring buffer and the agent \
                 writes one line for it. Events lost: what the ring or the sinks' queue \
                 could not take during the run (counted, never silent).\n"
            );
            let _ = writeln!(
                md,
                "| tenants | gateway | log off | log on | ratio | events lost |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|");
            for (t, g, off, on, lost) in logged_rows {
                let _ = writeln!(
                    md,
                    "| {t} | {g} | {} | {} | {:.2} | {lost:.0} |",
                    mpps(off).replace("pps", "/s"),
                    mpps(on).replace("pps", "/s"),
                    on / off
                );
            }
        }

        let quota_rows: Vec<(u32, &str, f64, f64)> = tenants
            .iter()
            .flat_map(|&t| ["xdp", "tc"].map(move |g| (t, g)))
            .filter_map(|(t, g)| {
                Some((
                    t,
                    g,
                    self.value(g, t, None, "new_flows_others_per_s", None)?,
                    self.value(g, t, None, "new_flows_beside_aggressor_per_s", None)?,
                ))
            })
            .collect();
        if !quota_rows.is_empty() {
            let _ = writeln!(
                md,
                "\n## New flows of the other tenants while one tenant sits at its quota\n\n\
                 The first tenant first takes its whole share of the table; then bursts in \
                 which every tenant sends new flows, the first one's refused \
                 (`out_drop_tenant_quota`), alternate with bursts of the other tenants \
                 alone (\"without\"), best of each.\n"
            );
            let _ = writeln!(
                md,
                "| tenants | gateway | without | beside the aggressor | ratio |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|");
            for (t, g, without, beside) in quota_rows {
                let _ = writeln!(
                    md,
                    "| {t} | {g} | {} | {} | {:.2} |",
                    mpps(without).replace("pps", "/s"),
                    mpps(beside).replace("pps", "/s"),
                    beside / without
                );
            }
        }

        let _ = writeln!(
            md,
            "\n## Round-trip latency through the gateway, µs (p50 / p99)\n"
        );
        let translating: Vec<&str> = gateways
            .iter()
            .copied()
            .filter(|g| *g != "ceiling")
            .collect();
        let _ = writeln!(md, "| tenants | load | {} |", translating.join(" | "));
        let _ = writeln!(md, "|---|---|{}", "---|".repeat(translating.len()));
        for &t in &tenants {
            for load in ["low", "high"] {
                let mut row = format!("| {t} | {load} |");
                for g in &translating {
                    match (
                        self.value(g, t, None, "latency_p50_us", Some(load)),
                        self.value(g, t, None, "latency_p99_us", Some(load)),
                    ) {
                        (Some(p50), Some(p99)) => {
                            let _ = write!(row, " {p50:.0} / {p99:.0} |");
                        }
                        _ => row.push_str(" - |"),
                    }
                }
                let _ = writeln!(md, "{row}");
            }
        }

        let memory: Vec<&Record> = self
            .records
            .iter()
            .filter(|r| r.metric == "memory_bytes")
            .collect();
        if !memory.is_empty() {
            let _ = writeln!(
                md,
                "\n## Memory for the tracked flows\n\n| gateway | tenants | flows | memory |\n|---|---|---|---|"
            );
            for r in memory {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {:.1} MiB |",
                    r.gateway,
                    r.tenants,
                    r.flows,
                    r.value / f64::from(1 << 20)
                );
            }
        }

        let _ = writeln!(
            md,
            "\n## The dataplane programs' own cost (BPF_PROG_TEST_RUN)\n\n| path | hook | ns per packet | how |\n|---|---|---|---|"
        );
        for c in &self.prog_cost {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {} |",
                c.path, c.hook, c.ns_per_packet, c.method
            );
        }
        if !self.profiles.is_empty() {
            let _ = writeln!(
                md,
                "\n## Where the programs' time goes (perf, kernel samples of the runs above)\n"
            );
            for profile in &self.profiles {
                let _ = writeln!(md, "{}", profile_table(profile));
            }
        }
        let _ = writeln!(md, "\n## Targets\n");
        for line in self.targets() {
            let _ = writeln!(md, "- {line}");
        }
        if !self.notes.is_empty() {
            let _ = writeln!(md, "\n## Notes\n");
            for note in &self.notes {
                let _ = writeln!(md, "- {note}");
            }
        }
        md
    }

    /// The profile's three heaviest functions for a path, as a clause.
    fn heaviest(&self, path: &str) -> String {
        let Some(profile) = self.profiles.iter().find(|p| p.path.starts_with(path)) else {
            return String::new();
        };
        let top: Vec<String> = profile
            .functions
            .iter()
            .filter(|f| f.function != "other")
            .take(3)
            .map(|f| format!("{} {:.0} ns", f.function, f.ns_per_packet))
            .collect();
        format!("; profiled ({}): {}", profile.path, top.join(", "))
    }

    /// IPv6 (NAT66) beside IPv4 (NAT44): each gateway's established and
    /// new-flow figures for both families from the same run, with the
    /// IPv6/IPv4 ratio.
    fn ipv6_table(&self, md: &mut String, gateways: &[&str], tenants: &[u32], flows: &[u32]) {
        let rows = [
            ("established", "established_pps", "established_v6_pps", true),
            (
                "new flows/s",
                "new_flows_per_s",
                "new_flows_v6_per_s",
                false,
            ),
        ];
        let mut lines = Vec::new();
        for &t in tenants {
            for &f in flows {
                for (what, v4_metric, v6_metric, per_flows) in rows {
                    let at = |g: &str, metric: &str| {
                        self.value(g, t, if per_flows { Some(f) } else { None }, metric, None)
                    };
                    if !gateways
                        .iter()
                        .any(|g| self.value(g, t, Some(f), v6_metric, None).is_some())
                    {
                        continue;
                    }
                    let mut row = format!("| {t} | {f} | {what} |");
                    for g in gateways {
                        match (at(g, v4_metric), at(g, v6_metric)) {
                            (Some(v4), Some(v6)) => {
                                let _ = write!(
                                    row,
                                    " {:.2} / {:.2} ({:.2}) |",
                                    v4 / 1e6,
                                    v6 / 1e6,
                                    v6 / v4
                                );
                            }
                            _ => row.push_str(" - |"),
                        }
                    }
                    lines.push(row);
                }
            }
        }
        if lines.is_empty() {
            return;
        }
        let _ = writeln!(
            md,
            "\n## IPv6 (NAT66) beside IPv4 (NAT44)\n\n\
             The same gateways in the same run, each tenant dual-stack: its IPv4 prefix \
             leaves from its IPv4 egress IP, its IPv6 /48 from its IPv6 one (iptables and \
             ip6tables, nft `ip` and `ip6` tables, one agent tenant with both). 70-byte IPv6 \
             UDP frames (with FCS) against 64-byte IPv4 ones. Cells: IPv4 / IPv6 in millions per second, \
             and IPv6/IPv4.\n"
        );
        let _ = writeln!(
            md,
            "| tenants | flows | measure | {} |",
            gateways.join(" | ")
        );
        let _ = writeln!(md, "|---|---|---|{}", "---|".repeat(gateways.len()));
        for line in lines {
            let _ = writeln!(md, "{line}");
        }
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one table layout, several metrics"
    )]
    fn simple_table(
        &self,
        md: &mut String,
        title: &str,
        metric: &str,
        gateways: &[&str],
        tenants: &[u32],
        flows: &[u32],
        show: impl Fn(f64) -> String,
    ) {
        let _ = writeln!(md, "\n## {title}\n");
        let _ = writeln!(md, "| tenants | flows | {} |", gateways.join(" | "));
        let _ = writeln!(md, "|---|---|{}", "---|".repeat(gateways.len()));
        for &t in tenants {
            for &f in flows {
                if !self.measured(gateways, t, f, metric) {
                    continue;
                }
                let mut row = format!("| {t} | {f} |");
                for g in gateways {
                    match self.value(g, t, Some(f), metric, None) {
                        Some(v) => {
                            let _ = write!(row, " {} |", show(v));
                        }
                        None => row.push_str(" - |"),
                    }
                }
                let _ = writeln!(md, "{row}");
            }
        }
    }

    /// The targets, each met or missed by how much, from this run.
    pub fn targets(&self) -> Vec<String> {
        let mut out = Vec::new();
        let tenants = self.axis(|r| r.tenants);
        let flows = self.axis(|r| r.flows);
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        let mut tc_judged = false;
        // The established targets hold for every tenant count: judged at
        // each flow count, every tenant count measured at it.
        for &f in &flows {
            let pps = |g: &str, t: u32| self.value(g, t, Some(f), "established_pps", None);
            // (tenants, gateway / base) for every tenant count measured at `f`.
            let over = |g: &str, base: &str, scale: f64| -> Vec<(u32, f64)> {
                tenants
                    .iter()
                    .filter_map(|&t| Some((t, scale * pps(g, t)? / pps(base, t)?)))
                    .collect()
            };
            let xdp_over_iptables = over("xdp", "iptables", 1.0);
            if !xdp_over_iptables.is_empty() {
                out.push(judge(
                    &format!("established forwarding at least 3x iptables ({f} flows)"),
                    &xdp_over_iptables,
                    3.0,
                    "x",
                ));
                out.push(judge(
                    &format!("XDP at or above 70% of the ceiling ({f} flows)"),
                    &over("xdp", "ceiling", 100.0),
                    70.0,
                    "%",
                ));
            }
            let tc_over_iptables = over("tc", "iptables", 1.0);
            if !tc_over_iptables.is_empty() {
                tc_judged = true;
                out.push(judge(
                    &format!("TC established forwarding at least 2x iptables ({f} flows)"),
                    &tc_over_iptables,
                    2.0,
                    "x",
                ));
            }
        }
        if !tc_judged {
            out.push(
                "TC established forwarding at least 2x iptables: not measured in this run".into(),
            );
        }
        let new_at = |g: &str, t: u32| self.value(g, t, None, "new_flows_per_s", None);
        match (new_at("xdp", 1000), new_at("iptables", 1000)) {
            (Some(x), Some(i)) => out.push(format!(
                "new-flow rate with 1000 tenants at least 10x iptables: {:.1}x, {}",
                x / i,
                verdict(x >= 10.0 * i)
            )),
            _ => out.push("new-flow rate with 1000 tenants: not measured in this mode".into()),
        }
        {
            // Every tenant count's ratio, the target judged at 1000 tenants.
            let ratios: Vec<String> = tenants
                .iter()
                .filter_map(|&t| {
                    let ratio = new_at("tc", t)? / new_at("iptables", t)?;
                    Some(format!("{ratio:.1}x ({t} tenants)"))
                })
                .collect();
            let line = match (new_at("tc", 1000), new_at("iptables", 1000)) {
                (Some(x), Some(i)) => format!(
                    "TC new-flow rate with 1000 tenants at least 10x iptables: {:.1}x ({:.0} k/s against {:.0} k/s), {}",
                    x / i,
                    x / 1e3,
                    i / 1e3,
                    verdict(x >= 10.0 * i)
                ),
                _ => "TC new-flow rate with 1000 tenants at least 10x iptables: not measured (no tc and iptables figures with 1000 tenants in this run)"
                    .into(),
            };
            out.push(if ratios.is_empty() {
                line
            } else {
                format!("{line}; tc / iptables: {}", ratios.join(", "))
            });
        }
        let xdp_new: Vec<(u32, f64)> = tenants
            .iter()
            .filter_map(|&t| new_at("xdp", t).map(|v| (t, v)))
            .collect();
        if let (Some(lo), Some(hi)) = (xdp_new.first(), xdp_new.last())
            && lo.0 != hi.0
        {
            let spread = (hi.1 - lo.1).abs() / lo.1;
            out.push(format!(
                "XDP new-flow rate within 10% from {} to {} tenants: {:.1}% apart, {}",
                lo.0,
                hi.0,
                spread * 100.0,
                verdict(spread <= 0.10)
            ));
        }
        for &f in &flows {
            let per_gateway: Vec<String> = Kind::ALL
                .iter()
                .filter_map(|k| {
                    let values: Vec<f64> = tenants
                        .iter()
                        .filter_map(|&t| {
                            self.value(k.name(), t, Some(f), "cpu_ns_per_packet", None)
                        })
                        .collect();
                    let lo = values.iter().copied().reduce(f64::min)?;
                    let hi = values.iter().copied().reduce(f64::max)?;
                    Some(if (hi - lo).round() == 0.0 {
                        format!("{} {lo:.0} ns", k.name())
                    } else {
                        format!("{} {lo:.0}-{hi:.0} ns", k.name())
                    })
                })
                .collect();
            if !per_gateway.is_empty() {
                out.push(format!(
                    "gateway CPU per forwarded packet ({f} flows, over the tenant counts): {}",
                    per_gateway.join(", ")
                ));
            }
        }
        // The cost targets are the XDP programs'; the TC ones are in the table.
        let xdp_cost = |path: &str, method: &str| {
            self.prog_cost
                .iter()
                .find(|c| {
                    c.hook == "xdp" && c.path.starts_with(path) && c.method.starts_with(method)
                })
                .map(|c| c.ns_per_packet)
        };
        if let Some(hit) = xdp_cost("outbound, conntrack hit", "mean") {
            out.push(format!(
                "conntrack hit under 150 ns in BPF_PROG_TEST_RUN: {hit:.0} ns ({:.1}x the target), {}{}",
                hit / 150.0,
                verdict(hit < 150.0),
                self.heaviest("outbound, conntrack hit")
            ));
        }
        if let Some(new) = xdp_cost("outbound, new flow", "") {
            out.push(format!(
                "new flow under 600 ns: {new:.0} ns ({:.1}x the target), {}{}",
                new / 600.0,
                verdict(new < 600.0),
                self.heaviest("outbound, new flow")
            ));
        }
        if let Some(max) = flows.last()
            && *max >= 1_000_000
        {
            let held = self
                .value("xdp", tenants[0], Some(*max), "established_pps", None)
                .is_some();
            out.push(format!(
                "1M concurrent flows held by the XDP dataplane: {}",
                verdict(held)
            ));
        }
        out
    }

    pub fn svg(&self) -> String {
        const W: f64 = 720.0;
        const H: f64 = 420.0;
        const LEFT: f64 = 70.0;
        const BOTTOM: f64 = 50.0;
        const TOP: f64 = 40.0;
        const RIGHT: f64 = 170.0;
        let flows = self.axis(|r| r.flows);
        let tenants = self.axis(|r| r.tenants);
        let f = flows.first().copied().unwrap_or(0);
        let series: Vec<(&str, Vec<(u32, f64)>)> = Kind::ALL
            .iter()
            .map(|k| {
                let points = tenants
                    .iter()
                    .filter_map(|&t| {
                        self.value(k.name(), t, Some(f), "established_pps", None)
                            .map(|v| (t, v))
                    })
                    .collect();
                (k.name(), points)
            })
            .collect();
        let max = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(_, v)| *v))
            .fold(0.0_f64, f64::max)
            .max(1.0)
            * 1.1;
        let x_of = |t: u32| {
            let span = (tenants.len().max(2) - 1) as f64;
            let i = tenants.iter().position(|&x| x == t).unwrap_or(0) as f64;
            LEFT + (W - LEFT - RIGHT) * i / span
        };
        let y_of = |v: f64| TOP + (H - TOP - BOTTOM) * (1.0 - v / max);
        let colors = [
            "#888888", "#d62728", "#ff7f0e", "#9467bd", "#2ca02c", "#1f77b4",
        ];
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{LEFT}\" y=\"22\" font-size=\"14\">Established UDP forwarding, {f} flows, one gateway core ({})</text>\n",
            self.machine.date
        );
        let _ = writeln!(
            svg,
            "<line x1=\"{LEFT}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>",
            H - BOTTOM,
            W - RIGHT,
            H - BOTTOM
        );
        let _ = writeln!(
            svg,
            "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{}\" stroke=\"black\"/>",
            H - BOTTOM
        );
        for step in 0..=4 {
            let v = max * f64::from(step) / 4.0;
            let y = y_of(v);
            let _ = writeln!(
                svg,
                "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#eeeeee\"/>",
                W - RIGHT
            );
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.1} Mpps</text>",
                LEFT - 6.0,
                y + 4.0,
                v / 1e6
            );
        }
        for &t in &tenants {
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{t}</text>",
                x_of(t),
                H - BOTTOM + 18.0
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">tenants (SNAT rules / prefixes)</text>",
            (LEFT + W - RIGHT) / 2.0,
            H - 12.0
        );
        for (i, (name, points)) in series.iter().enumerate() {
            let color = colors[i % colors.len()];
            let path: Vec<String> = points
                .iter()
                .map(|(t, v)| format!("{:.1},{:.1}", x_of(*t), y_of(*v)))
                .collect();
            if !path.is_empty() {
                let _ = writeln!(
                    svg,
                    "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2.5\" points=\"{}\"/>",
                    path.join(" ")
                );
                for (t, v) in points {
                    let _ = writeln!(
                        svg,
                        "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{color}\"/>",
                        x_of(*t),
                        y_of(*v)
                    );
                }
            }
            let ly = TOP + 20.0 * i as f64;
            let _ = writeln!(
                svg,
                "<rect x=\"{}\" y=\"{:.1}\" width=\"14\" height=\"4\" fill=\"{color}\"/>",
                W - RIGHT + 15.0,
                ly
            );
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{:.1}\">{name}</text>",
                W - RIGHT + 35.0,
                ly + 6.0
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// The dataplane's gateways, each with a ratio to iptables in the tables.
const RATIOS: [&str; 2] = ["xdp", "tc"];

/// " 3.2x |", or " - |" when either figure is missing.
fn ratio_cell(gateway: Option<f64>, iptables: Option<f64>) -> String {
    match (gateway, iptables) {
        (Some(g), Some(i)) if i > 0.0 => format!(" {:.1}x |", g / i),
        _ => " - |".into(),
    }
}

fn mpps(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.2} Mpps", value / 1e6)
    } else {
        format!("{:.0} kpps", value / 1e3)
    }
}

/// One profile as a markdown table, heaviest function first.
pub fn profile_table(profile: &Profile) -> String {
    let mut md = format!(
        "**{}**: {:.0} ns per packet (measured without perf), split by {} samples over {} packets\n\n| function | ns per packet | share |\n|---|---|---|\n",
        profile.path, profile.ns_per_packet, profile.samples, profile.packets
    );
    for f in &profile.functions {
        let _ = writeln!(
            md,
            "| `{}` | {:.0} | {:.0}% |",
            f.function,
            f.ns_per_packet,
            100.0 * f.share
        );
    }
    md
}
