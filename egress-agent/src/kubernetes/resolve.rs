//! From a [`Snapshot`] of the cluster to what this node's agent serves.
//!
//! Pure: the same snapshot gives the same [`Resolved`] on every node, which
//! is what lets agents agree without talking to each other. Each
//! `EgressGateway` (and, with Kube-OVN compatibility, each
//! `VpcEgressGateway`) becomes one tenant of the configuration file's own
//! type, so the agent validates it exactly as it validates YAML.
//!
//! Rules, in the order they are applied:
//! - objects are taken oldest first (creation time, then namespace, name);
//! - one node serves an object: outside the cluster (a gateway VM) the agent
//!   serves what its labels select; inside, the first Ready node (by name)
//!   that the selector matches and that runs a Ready agent, staying with the
//!   node the status already names while it qualifies, so a restart elsewhere
//!   does not move the egress IP;
//! - an object that is malformed, or whose node selection fails, claims
//!   nothing; otherwise it claims its egress IPs and sources cluster-wide,
//!   and a later object claiming any of them again is refused with a reason
//!   (two nodes announcing one address, or one pod leaving with two, would
//!   be worse than either object alone);
//! - what the dataplane cannot honour is reported as a condition, never
//!   silently dropped.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use egress_common::tenant::{MAX_EGRESS_ADDRS, TENANT_NAME_LEN};
use ipnet::IpNet;
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::LabelSelector, jiff::Timestamp};
use kube::api::ObjectMeta;

use super::{
    crd::{CONDITION_READY, EgressGateway},
    kubeovn::{NodeSelectorTerm, VpcEgressGateway},
    selector::{self, Labels},
    snapshot::{PodView, Snapshot},
};
use crate::config::{self, Config, PortRange, Tenant};

/// BFD timers when a gateway names none (Kube-OVN's defaults too).
pub const DEFAULT_BFD_INTERVAL_MS: u32 = 1000;
pub const DEFAULT_BFD_MULTIPLIER: u8 = 3;

/// What this node serves, and what to tell each object.
#[derive(Debug, Default)]
pub struct Resolved {
    /// This node's tenants, oldest object first.
    pub tenants: Vec<Tenant>,
    /// The external interface the served gateways ask for, if any does.
    pub external_interface: Option<String>,
    /// Pod CIDRs of the other nodes and the node address that reaches each.
    /// A gateway outside the cluster needs them to send replies back to pod
    /// addresses; on a cluster node the CNI already routes pod CIDRs, so the
    /// agent should install them only when [`Resolved::outside_cluster`].
    pub return_routes: Vec<ReturnRoute>,
    /// This agent's node is not a Node of the cluster (a gateway VM).
    pub outside_cluster: bool,
    /// BFD sessions the served gateways ask for.
    pub bfd_peers: Vec<BfdPeer>,
    /// One report per gateway object, in the order they were considered.
    pub reports: Vec<Report>,
    /// Oddities of the cluster that belong to no object (two nodes with one
    /// pod CIDR).
    pub warnings: Vec<String>,
}

impl Resolved {
    /// Whether two results give the dataplane the same configuration.
    pub fn dataplane_eq(&self, other: &Resolved) -> bool {
        fn tenant_eq(a: &Tenant, b: &Tenant) -> bool {
            a.name == b.name
                && a.sources == b.sources
                && a.egress_ips == b.egress_ips
                && a.ingress == b.ingress
                && a.ports == b.ports
                && a.max_flows == b.max_flows
                && a.new_flows_per_second == b.new_flows_per_second
                && a.new_flow_burst == b.new_flow_burst
        }
        self.tenants.len() == other.tenants.len()
            && self
                .tenants
                .iter()
                .zip(&other.tenants)
                .all(|(a, b)| tenant_eq(a, b))
            && self.external_interface == other.external_interface
            && self.return_routes == other.return_routes
            && self.bfd_peers == other.bfd_peers
    }

    pub fn report(&self, object: &ObjectKey) -> Option<&Report> {
        self.reports.iter().find(|r| &r.object == object)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReturnRoute {
    pub destination: IpNet,
    /// The node's InternalIP of the destination's family.
    pub via: IpAddr,
}

impl ReturnRoute {
    /// As the configuration file writes it (through the first internal
    /// interface).
    pub fn to_config(&self) -> config::ReturnRouteConfig {
        config::ReturnRouteConfig {
            destination: self.destination.to_string(),
            via: self.via.to_string(),
            interface: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BfdPeer {
    pub address: IpAddr,
    pub min_rx_ms: u32,
    pub min_tx_ms: u32,
    pub multiplier: u8,
    /// Tenants whose gateways asked for this session.
    pub tenants: Vec<String>,
}

impl BfdPeer {
    /// As the configuration file writes it (on the first internal interface).
    pub fn to_config(&self) -> config::BfdPeerConfig {
        config::BfdPeerConfig {
            address: self.address.to_string(),
            interface: None,
            min_tx_ms: self.min_tx_ms,
            min_rx_ms: self.min_rx_ms,
            multiplier: self.multiplier,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    EgressGateway,
    VpcEgressGateway,
}

/// Which object a report is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// A condition as resolution sees it; the status publisher adds times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportCondition {
    pub type_: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

/// What happened to one gateway object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub object: ObjectKey,
    pub generation: Option<i64>,
    /// The tenant name it is (or would be) configured under.
    pub tenant: String,
    /// The node that serves it; `None` when no node does.
    pub node: Option<String>,
    /// This agent is the one that serves it (and publishes its status).
    pub served_here: bool,
    pub ready: bool,
    /// CamelCase reason of the Ready condition.
    pub reason: String,
    pub message: String,
    /// Parts of the spec that are not honoured, one condition each.
    pub notes: Vec<ReportCondition>,
    pub egress_ips: Vec<IpAddr>,
    pub sources: Vec<IpNet>,
    pub matched_pods: usize,
}

impl Report {
    /// `Ready` first, then the notes.
    pub fn conditions(&self) -> Vec<ReportCondition> {
        let ready = ReportCondition {
            type_: CONDITION_READY.to_owned(),
            status: self.ready,
            reason: self.reason.clone(),
            message: self.message.clone(),
        };
        std::iter::once(ready)
            .chain(self.notes.iter().cloned())
            .collect()
    }

    /// Marks the object not ready after the fact: the dataplane refused what
    /// resolution accepted (an egress IP held by another interface).
    pub fn set_not_ready(&mut self, reason: &str, message: impl Into<String>) {
        self.ready = false;
        self.reason = reason.to_owned();
        self.message = message.into();
    }

    fn fail(&mut self, failure: Failure) {
        self.set_not_ready(failure.reason, failure.message);
    }
}

/// Reasons of the Ready condition.
pub mod reason {
    pub const SERVING: &str = "Serving";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const INVALID_SELECTOR: &str = "InvalidSelector";
    pub const NODE_NOT_SELECTED: &str = "NodeNotSelected";
    pub const NO_GATEWAY_NODE: &str = "NoGatewayNode";
    pub const NO_EGRESS_IPS: &str = "NoEgressIPs";
    pub const NO_SOURCES: &str = "NoSources";
    pub const SCALED_TO_ZERO: &str = "ScaledToZero";
    pub const UNRESOLVED_SUBNET: &str = "UnresolvedSubnet";
    pub const EGRESS_IP_CONFLICT: &str = "EgressIPConflict";
    pub const SOURCE_CONFLICT: &str = "SourceConflict";
    pub const EXTERNAL_INTERFACE_CONFLICT: &str = "ExternalInterfaceConflict";
}

/// Types (and reasons) of the conditions for parts of a spec that are not
/// honoured; each is True while it applies.
pub mod note {
    pub const REPLICAS_IGNORED: (&str, &str) = ("ReplicasIgnored", "SingleInstance");
    pub const TRAFFIC_POLICY_IGNORED: (&str, &str) = ("TrafficPolicyIgnored", "LocalNotSupported");
    pub const POLICIES_IGNORED: (&str, &str) = ("PoliciesIgnored", "SnatDisabled");
    pub const INTERNAL_IPS_IGNORED: (&str, &str) = ("InternalIPsIgnored", "NoGatewayPod");
    pub const BFD_IGNORED: (&str, &str) = ("BfdIgnored", "NoPeers");
    pub const BFD_TIMERS_IGNORED: (&str, &str) = ("BfdTimersIgnored", "PeerSharedWithOlderGateway");
    /// Sources of a family the object has no egress IP of (a dual-stack
    /// subnet or pod behind IPv4 externalIPs only): not translated.
    pub const SOURCES_IGNORED: (&str, &str) = ("SourcesIgnored", "NoEgressIPOfTheirFamily");
}

/// Resolves a snapshot into this node's configuration and a report per object.
pub fn resolve(snapshot: &Snapshot) -> Resolved {
    let mut candidates: Vec<Candidate> = snapshot
        .egress_gateways
        .iter()
        .map(|object| Candidate::from_egress_gateway(object, snapshot))
        .chain(
            snapshot
                .vpc_egress_gateways
                .iter()
                .map(|object| Candidate::from_vpc_egress_gateway(object, snapshot)),
        )
        .collect();
    candidates.sort_by(|a, b| a.order.cmp(&b.order));

    let local = snapshot.local.name.as_str();
    let outside_cluster = snapshot.node(local).is_none();
    let mut claims = Claims::default();
    let mut interfaces: BTreeMap<String, (String, usize)> = BTreeMap::new();
    let mut resolved = Resolved {
        outside_cluster,
        ..Default::default()
    };
    // Accepted candidates served here, with their report's index.
    let mut served: Vec<(Admitted, usize)> = Vec::new();

    for candidate in candidates {
        let index = resolved.reports.len();
        let mut report = Report {
            object: candidate.key.clone(),
            generation: candidate.generation,
            tenant: candidate.tenant.clone(),
            node: None,
            served_here: false,
            ready: false,
            reason: String::new(),
            message: String::new(),
            notes: candidate.notes.clone(),
            egress_ips: Vec::new(),
            sources: Vec::new(),
            matched_pods: candidate.matched_pods,
        };
        let mut ledger = Ledger {
            snapshot,
            claims: &mut claims,
            interfaces: &mut interfaces,
            earlier: &resolved.reports,
        };
        match ledger.accept(candidate, &mut report, index) {
            Ok(admitted) => {
                report.ready = true;
                report.reason = reason::SERVING.to_owned();
                report.message = format!(
                    "node {} translates {} to {}",
                    report.node.as_deref().unwrap_or_default(),
                    count(admitted.sources.len(), "source prefix", "source prefixes"),
                    join(&admitted.egress)
                );
                if report.served_here {
                    served.push((admitted, index));
                }
            }
            Err(failure) => report.fail(failure),
        }
        resolved.reports.push(report);
    }

    check_against_config(&mut served, &mut resolved.reports);
    for (admitted, index) in &served {
        let report = &mut resolved.reports[*index];
        resolved.tenants.push(admitted.tenant(&report.tenant));
        if resolved.external_interface.is_none() {
            resolved
                .external_interface
                .clone_from(&admitted.external_interface);
        }
        if let Some(bfd) = &admitted.bfd {
            add_bfd_peers(&mut resolved.bfd_peers, bfd, report);
        }
    }
    resolved.bfd_peers.sort_by_key(|peer| peer.address);
    resolved.return_routes = return_routes(snapshot, &mut resolved.warnings);
    resolved
}

/// What earlier objects hold, against which the next one is judged.
struct Ledger<'l> {
    snapshot: &'l Snapshot,
    claims: &'l mut Claims,
    /// External interface per serving node, with the report that set it.
    interfaces: &'l mut BTreeMap<String, (String, usize)>,
    earlier: &'l [Report],
}

impl Ledger<'_> {
    /// Places one object and records its claims; fills in the report's node.
    fn accept(
        &mut self,
        candidate: Candidate<'_>,
        report: &mut Report,
        index: usize,
    ) -> Result<Admitted, Failure> {
        let admitted = candidate.admitted?;
        report.egress_ips.clone_from(&admitted.egress);
        report.sources.clone_from(&admitted.sources);
        let node = serving_node(
            self.snapshot,
            &candidate.placement,
            candidate.sticky_node.as_deref(),
        )
        .map_err(|message| {
            Failure::new(reason::INVALID_SELECTOR, format!("nodeSelector: {message}"))
        })?
        .ok_or_else(|| no_node(self.snapshot))?;
        report.served_here = node == self.snapshot.local.name;
        report.node = Some(node.clone());
        let earlier = self.earlier;
        if let Some(conflict) = self
            .claims
            .conflict(&admitted, |owner| earlier[owner].object.to_string())
        {
            return Err(conflict);
        }
        if let Some(wanted) = &admitted.external_interface
            && let Some((taken, owner)) = self.interfaces.get(&node)
            && taken != wanted
        {
            return Err(Failure::new(
                reason::EXTERNAL_INTERFACE_CONFLICT,
                format!(
                    "externalInterface {wanted}: node {node} already sends {} out of {taken}",
                    earlier[*owner].object
                ),
            ));
        }
        self.claims.claim(&admitted, index);
        if let Some(wanted) = &admitted.external_interface {
            self.interfaces
                .entry(node)
                .or_insert((wanted.clone(), index));
        }
        if admitted.sources.is_empty() {
            return Err(Failure::new(
                reason::NO_SOURCES,
                "no running pod is selected and no address block is given; \
                 the egress IPs stay reserved for this gateway",
            ));
        }
        Ok(admitted)
    }
}

/// Why an object is not served.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    reason: &'static str,
    message: String,
}

impl Failure {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

fn no_node(snapshot: &Snapshot) -> Failure {
    if snapshot.node(&snapshot.local.name).is_none() {
        Failure::new(
            reason::NODE_NOT_SELECTED,
            format!(
                "nodeSelector does not match this gateway ({})",
                snapshot.local.name
            ),
        )
    } else {
        Failure::new(
            reason::NO_GATEWAY_NODE,
            "no Ready node running egress-agent matches nodeSelector",
        )
    }
}

/// How an object says which nodes may serve it.
enum Placement<'a> {
    Labels(&'a BTreeMap<String, String>),
    Terms(&'a [NodeSelectorTerm]),
}

impl Placement<'_> {
    fn selects(&self, name: &str, labels: &Labels) -> Result<bool, String> {
        match self {
            Placement::Labels(wanted) => Ok(wanted.iter().all(|(k, v)| labels.get(k) == Some(v))),
            Placement::Terms(terms) => selector::node_terms_match(terms, name, labels),
        }
    }
}

/// The node that serves an object, see the module's rules.
fn serving_node(
    snapshot: &Snapshot,
    placement: &Placement<'_>,
    sticky: Option<&str>,
) -> Result<Option<String>, String> {
    let local = &snapshot.local;
    if snapshot.node(&local.name).is_none() {
        return Ok(placement
            .selects(&local.name, &local.labels)?
            .then(|| local.name.clone()));
    }
    let mut eligible = Vec::new();
    for node in &snapshot.nodes {
        let runs_agent = snapshot
            .agent_nodes
            .as_ref()
            .is_none_or(|agents| agents.contains(&node.name));
        if node.ready && runs_agent && placement.selects(&node.name, &node.labels)? {
            eligible.push(node.name.as_str());
        }
    }
    let chosen = sticky
        .filter(|name| eligible.contains(name))
        .or_else(|| eligible.first().copied());
    Ok(chosen.map(str::to_owned))
}

/// What an accepted object asks of the dataplane.
#[derive(Debug, Clone, Default)]
struct Admitted {
    egress: Vec<IpAddr>,
    sources: Vec<IpNet>,
    ports: Option<PortRange>,
    /// `maxFlows`, `newFlowsPerSecond`, `newFlowBurst`, as written.
    limits: (Option<u32>, Option<u32>, Option<u32>),
    external_interface: Option<String>,
    bfd: Option<BfdWanted>,
    /// `portForwards` and `floatingIPs`, as written (the configuration
    /// checks them with the rest of the tenant).
    forwards: Vec<crate::config::inbound::PortForward>,
    floating: Vec<crate::config::inbound::FloatingIp>,
}

impl Admitted {
    fn tenant(&self, name: &str) -> Tenant {
        Tenant {
            name: name.to_owned(),
            sources: self.sources.iter().map(ToString::to_string).collect(),
            egress_ips: self.egress.iter().map(ToString::to_string).collect(),
            ingress: Vec::new(),
            ports: self.ports,
            max_flows: self.limits.0,
            new_flows_per_second: self.limits.1,
            new_flow_burst: self.limits.2,
            port_forwards: self.forwards.clone(),
            floating_ips: self.floating.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct BfdWanted {
    peers: Vec<IpAddr>,
    min_rx_ms: u32,
    min_tx_ms: u32,
    multiplier: u8,
}

/// Sort key: oldest first; objects without a creation time (not from an
/// API server) after the rest.
type Order = (bool, Option<Timestamp>, String, String, ObjectKind);

struct Candidate<'a> {
    key: ObjectKey,
    order: Order,
    generation: Option<i64>,
    tenant: String,
    placement: Placement<'a>,
    sticky_node: Option<String>,
    notes: Vec<ReportCondition>,
    matched_pods: usize,
    admitted: Result<Admitted, Failure>,
}

impl<'a> Candidate<'a> {
    fn new(kind: ObjectKind, meta: &ObjectMeta, placement: Placement<'a>) -> Self {
        let namespace = meta.namespace.clone().unwrap_or_default();
        let name = meta.name.clone().unwrap_or_default();
        let created = meta.creation_timestamp.as_ref().map(|t| t.0);
        Self {
            tenant: tenant_name(kind, &namespace, &name),
            order: (
                created.is_none(),
                created,
                namespace.clone(),
                name.clone(),
                kind,
            ),
            key: ObjectKey {
                kind,
                namespace,
                name,
            },
            generation: meta.generation,
            placement,
            sticky_node: None,
            notes: Vec::new(),
            matched_pods: 0,
            admitted: Err(Failure::new(reason::INVALID_SPEC, "not resolved")),
        }
    }

    fn note(&mut self, (type_, reason): (&str, &str), message: impl Into<String>) {
        self.notes.push(ReportCondition {
            type_: type_.to_owned(),
            status: true,
            reason: reason.to_owned(),
            message: message.into(),
        });
    }

    /// The sources of a family `egress` has an address of; the others are
    /// left out with a note (`what` names them: pod addresses, sources).
    fn translatable(
        &mut self,
        sources: impl Iterator<Item = IpNet>,
        egress: &[IpAddr],
        what: &str,
    ) -> Vec<IpNet> {
        let has = |v4: bool| egress.iter().any(|a| a.is_ipv4() == v4);
        let (kept, left): (Vec<IpNet>, Vec<IpNet>) =
            sources.partition(|net| has(net.addr().is_ipv4()));
        if !left.is_empty() {
            let family = |v4: bool| if v4 { "IPv4" } else { "IPv6" };
            let families: Vec<&str> = [true, false]
                .into_iter()
                .filter(|v4| left.iter().any(|n| n.addr().is_ipv4() == *v4))
                .map(family)
                .collect();
            let shown: Vec<String> = left.iter().take(4).map(ToString::to_string).collect();
            self.note(
                note::SOURCES_IGNORED,
                format!(
                    "{} {what} {} ({}{}) not translated: no {} egress IP",
                    left.len(),
                    if left.len() == 1 {
                        "prefix is"
                    } else {
                        "prefixes are"
                    },
                    shown.join(", "),
                    if left.len() > 4 { ", ..." } else { "" },
                    families.join(" or ")
                ),
            );
        }
        kept
    }

    fn from_egress_gateway(object: &'a EgressGateway, snapshot: &Snapshot) -> Self {
        let spec = &object.spec;
        let mut candidate = Candidate::new(
            ObjectKind::EgressGateway,
            &object.metadata,
            Placement::Labels(&spec.node_selector),
        );
        candidate.sticky_node = object.status.as_ref().and_then(|s| s.node.clone());
        candidate.admitted = candidate.admit_egress_gateway(object, snapshot);
        candidate
    }

    fn admit_egress_gateway(
        &mut self,
        object: &EgressGateway,
        snapshot: &Snapshot,
    ) -> Result<Admitted, Failure> {
        let spec = &object.spec;
        let mut problems = Vec::new();
        let mut sources = Vec::new();
        for (i, text) in spec.ip_blocks.iter().enumerate() {
            match config::parse_source(text) {
                Ok(net) => sources.push(net),
                Err(message) => problems.push(format!("spec.ipBlocks[{i}]: {message}")),
            }
        }
        let mut egress = Vec::new();
        for (i, text) in spec.egress_ips.iter().enumerate() {
            match parse_ip(text) {
                Ok(addr) => egress.push(addr),
                Err(message) => problems.push(format!("spec.egressIPs[{i}]: {message}")),
            }
        }
        if let Some(name) = &spec.external_interface
            && (name.is_empty() || name.len() > 15 || name.contains(['/', ' ']))
        {
            problems.push(format!(
                "spec.externalInterface: {name:?} is not an interface name"
            ));
        }
        let ports = spec.ports.map(|p| PortRange {
            min: p.min,
            max: p.max,
        });
        let bfd = spec.bfd.as_ref().filter(|b| b.enabled).and_then(|bfd| {
            let mut peers = Vec::new();
            for text in &bfd.peers {
                match parse_ip(text) {
                    Ok(IpAddr::V6(addr)) if addr.is_unicast_link_local() => problems.push(format!(
                        "spec.bfd.peers: {addr} is link-local, which needs an interface; \
                         name the router by a global address"
                    )),
                    Ok(addr) => peers.push(addr),
                    Err(message) => problems.push(format!("spec.bfd.peers: {message}")),
                }
            }
            if bfd.peers.is_empty() {
                self.note(
                    note::BFD_IGNORED,
                    "bfd.enabled is set but bfd.peers names no neighbour",
                );
                return None;
            }
            Some(BfdWanted {
                peers,
                min_rx_ms: bfd.min_rx.unwrap_or(DEFAULT_BFD_INTERVAL_MS),
                min_tx_ms: bfd.min_tx.unwrap_or(DEFAULT_BFD_INTERVAL_MS),
                multiplier: bfd.multiplier.unwrap_or(DEFAULT_BFD_MULTIPLIER),
            })
        });
        if !problems.is_empty() {
            return Err(Failure::new(reason::INVALID_SPEC, problems.join("; ")));
        }
        if spec.namespace_selector.is_some() || spec.pod_selector.is_some() {
            let own_namespace = [self.key.namespace.clone()];
            let namespaces = match &spec.namespace_selector {
                Some(selector) => NamespaceScope::Selected(selector),
                None => NamespaceScope::Only(&own_namespace),
            };
            let pods = select_pods(snapshot, &namespaces, spec.pod_selector.as_ref())
                .map_err(|m| Failure::new(reason::INVALID_SELECTOR, m))?;
            self.matched_pods = pods.len();
            let pod_sources = pods.iter().flat_map(|p| p.addresses.iter().copied());
            sources.extend(self.translatable(pod_sources.map(IpNet::from), &egress, "pod"));
        }
        let admitted = Admitted {
            egress,
            sources: normalize_sources(sources),
            ports,
            limits: (
                spec.max_flows,
                spec.new_flows_per_second,
                spec.new_flow_burst,
            ),
            external_interface: spec.external_interface.clone(),
            bfd,
            forwards: spec
                .port_forwards
                .iter()
                .map(|f| crate::config::inbound::PortForward {
                    egress_ip: f.egress_ip.clone(),
                    protocol: f.protocol.clone(),
                    port: f.port,
                    to: f.to.clone(),
                })
                .collect(),
            floating: spec
                .floating_ips
                .iter()
                .map(|f| crate::config::inbound::FloatingIp {
                    address: f.address.clone(),
                    host: f.host.clone(),
                })
                .collect(),
        };
        check_tenant_alone(&self.tenant, &admitted, "spec.egressIPs")?;
        Ok(admitted)
    }

    fn from_vpc_egress_gateway(object: &'a VpcEgressGateway, snapshot: &Snapshot) -> Self {
        let mut candidate = Candidate::new(
            ObjectKind::VpcEgressGateway,
            &object.metadata,
            Placement::Terms(&object.spec.node_selector),
        );
        candidate.admitted = candidate.admit_vpc_egress_gateway(object, snapshot);
        candidate
    }

    fn admit_vpc_egress_gateway(
        &mut self,
        object: &VpcEgressGateway,
        snapshot: &Snapshot,
    ) -> Result<Admitted, Failure> {
        let spec = &object.spec;
        let replicas = spec.replicas.unwrap_or(1);
        if replicas <= 0 {
            return Err(Failure::new(
                reason::SCALED_TO_ZERO,
                format!("replicas is {replicas}: the gateway is switched off"),
            ));
        }
        let mut problems = Vec::new();

        // Dual-stack entries are "IPv4,IPv6" pairs, as Kube-OVN writes them.
        let mut external = Vec::new();
        for entry in &spec.external_ips {
            for part in entry.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                match part.parse::<IpAddr>() {
                    Ok(addr) => external.push(addr),
                    Err(_) => {
                        problems.push(format!("spec.externalIPs: {part:?} is not an IP address"))
                    }
                }
            }
        }
        // One external IP of each family per replica, as Kube-OVN gives
        // each gateway pod one; the rest are spares for pods being replaced.
        let wanted = usize::try_from(replicas).unwrap_or(1).min(MAX_EGRESS_ADDRS);
        let egress: Vec<IpAddr> = [true, false]
            .into_iter()
            .flat_map(|v4| {
                external
                    .iter()
                    .copied()
                    .filter(move |a| a.is_ipv4() == v4)
                    .take(wanted)
            })
            .collect();
        if replicas > 1 {
            self.note(
                note::REPLICAS_IGNORED,
                format!(
                    "replicas {replicas}: one node serves this gateway, spreading flows over {} \
                     instead of running {replicas} instances",
                    count(egress.len(), "egress IP", "egress IPs")
                ),
            );
        }
        if !spec.internal_ips.is_empty() {
            self.note(
                note::INTERNAL_IPS_IGNORED,
                format!(
                    "internalIPs {}: there is no gateway pod; traffic reaches the serving node as routed",
                    spec.internal_ips.join(", ")
                ),
            );
        }
        if spec
            .traffic_policy
            .as_deref()
            .is_some_and(|p| p != "Cluster")
        {
            self.note(
                note::TRAFFIC_POLICY_IGNORED,
                format!(
                    "trafficPolicy {}: one node serves the gateway, as with Cluster",
                    spec.traffic_policy.as_deref().unwrap_or_default()
                ),
            );
        }
        if spec.bfd.as_ref().is_some_and(|b| b.enabled) {
            self.note(
                (note::BFD_IGNORED.0, "VpcBfdPortNotRead"),
                "bfd.enabled: the peer is the VPC's BFD port, which this agent does not read; \
                 name peers in an EgressGateway instead",
            );
        }

        let mut sources = Vec::new();
        let mut unresolved = Vec::new();
        let mut unsnatted = Vec::new();
        for (i, policy) in spec.policies.iter().enumerate() {
            if !policy.snat {
                unsnatted.push(format!("policies[{i}]"));
                continue;
            }
            for block in &policy.ip_blocks {
                match parse_lenient_cidr(block) {
                    Ok(net) => sources.push(net),
                    Err(message) => {
                        problems.push(format!("spec.policies[{i}].ipBlocks: {message}"))
                    }
                }
            }
            for name in &policy.subnets {
                let subnet = snapshot
                    .subnets
                    .iter()
                    .find(|s| s.metadata.name.as_deref() == Some(name.as_str()));
                let Some(cidr) = subnet.and_then(|s| s.spec.cidr_block.as_deref()) else {
                    unresolved.push(match subnet {
                        None => format!("subnet {name} does not exist"),
                        Some(_) => format!("subnet {name} has no cidrBlock"),
                    });
                    continue;
                };
                // A dual-stack subnet's cidrBlock is "IPv4,IPv6".
                let before = sources.len();
                for part in cidr.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    match parse_lenient_cidr(part) {
                        Ok(net) => sources.push(net),
                        Err(message) => unresolved.push(format!("subnet {name}: {message}")),
                    }
                }
                if sources.len() == before {
                    unresolved.push(format!("subnet {name} ({cidr}) has no range"));
                }
            }
        }
        if !unsnatted.is_empty() {
            self.note(
                note::POLICIES_IGNORED,
                format!(
                    "{} without snat: the dataplane only translates, so their sources are not served",
                    unsnatted.join(", ")
                ),
            );
        }
        if !problems.is_empty() {
            return Err(Failure::new(reason::INVALID_SPEC, problems.join("; ")));
        }
        if !unresolved.is_empty() {
            return Err(Failure::new(
                reason::UNRESOLVED_SUBNET,
                unresolved.join("; "),
            ));
        }
        if !spec.selectors.is_empty() {
            let mut selected: BTreeMap<(&str, &str), &PodView> = BTreeMap::new();
            for (i, rule) in spec.selectors.iter().enumerate() {
                let everything = LabelSelector::default();
                let namespaces = NamespaceScope::Selected(
                    rule.namespace_selector.as_ref().unwrap_or(&everything),
                );
                let pods = select_pods(snapshot, &namespaces, rule.pod_selector.as_ref()).map_err(
                    |m| Failure::new(reason::INVALID_SELECTOR, format!("selectors[{i}]: {m}")),
                )?;
                for pod in pods {
                    selected.insert((pod.namespace.as_str(), pod.name.as_str()), pod);
                }
            }
            self.matched_pods = selected.len();
            sources.extend(
                selected
                    .values()
                    .flat_map(|p| p.addresses.iter().copied().map(IpNet::from)),
            );
        }
        if egress.is_empty() {
            return Err(Failure::new(
                reason::NO_EGRESS_IPS,
                "externalIPs names no address; Kube-OVN would allocate one from the external \
                 subnet, this agent needs it written in externalIPs",
            ));
        }
        let sources = self.translatable(sources.into_iter(), &egress, "source");
        let admitted = Admitted {
            egress,
            sources: normalize_sources(sources),
            ports: None,
            limits: (None, None, None),
            external_interface: None,
            bfd: None,
            forwards: Vec::new(),
            floating: Vec::new(),
        };
        check_tenant_alone(&self.tenant, &admitted, "spec.externalIPs")?;
        Ok(admitted)
    }
}

enum NamespaceScope<'s> {
    Only(&'s [String]),
    Selected(&'s LabelSelector),
}

/// Pods of the namespaces in scope that `pods` selects (all without one).
fn select_pods<'s>(
    snapshot: &'s Snapshot,
    namespaces: &NamespaceScope<'_>,
    pods: Option<&LabelSelector>,
) -> Result<Vec<&'s PodView>, String> {
    // Selectors are checked even when there is nothing to match them with.
    if let NamespaceScope::Selected(selector) = namespaces {
        selector::validate(selector).map_err(|m| format!("namespaceSelector: {m}"))?;
    }
    if let Some(selector) = pods {
        selector::validate(selector).map_err(|m| format!("podSelector: {m}"))?;
    }
    let mut in_scope: BTreeSet<&str> = BTreeSet::new();
    match namespaces {
        NamespaceScope::Only(names) => in_scope.extend(names.iter().map(String::as_str)),
        NamespaceScope::Selected(selector) => {
            for namespace in &snapshot.namespaces {
                if selector::matches(selector, &namespace.labels)? {
                    in_scope.insert(&namespace.name);
                }
            }
        }
    }
    let mut selected = Vec::new();
    for pod in &snapshot.pods {
        if !in_scope.contains(pod.namespace.as_str()) {
            continue;
        }
        let chosen = match pods {
            Some(selector) => selector::matches(selector, &pod.labels)?,
            None => true,
        };
        if chosen {
            selected.push(pod);
        }
    }
    Ok(selected)
}

/// A Kube-OVN block of either family: an address or a CIDR, host bits
/// masked as OVN and iptables mask them.
fn parse_lenient_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    match text.parse::<IpAddr>() {
        Ok(addr) => Ok(IpNet::from(addr)),
        Err(_) => Err(format!("{text:?} is not an address or CIDR")),
    }
}

/// An egress IP or BFD peer of an EgressGateway, either family.
fn parse_ip(text: &str) -> Result<IpAddr, String> {
    text.trim()
        .parse::<IpAddr>()
        .map_err(|_| format!("{text:?} is not an IPv4 or IPv6 address"))
}

/// Sorted (IPv4 first), without duplicates or prefixes inside a wider one
/// of the same object: the configuration refuses a tenant overlapping
/// itself, and a pod inside the object's own block is simply covered twice.
fn normalize_sources(mut sources: Vec<IpNet>) -> Vec<IpNet> {
    sources.sort_by_key(|net| (span(net).0, net.prefix_len()));
    let mut kept: Vec<IpNet> = Vec::with_capacity(sources.len());
    for net in sources {
        match kept.last() {
            Some(last) if last.contains(&net) => {}
            _ => kept.push(net),
        }
    }
    kept
}

/// The tenant name of an object: `<namespace>.<name>`, and `veg:` before
/// Kube-OVN's (a colon is in no Kubernetes name, so the two never meet).
/// Names too long for the dataplane keep their start and end in a hash.
pub fn tenant_name(kind: ObjectKind, namespace: &str, name: &str) -> String {
    let full = match kind {
        ObjectKind::EgressGateway => format!("{namespace}.{name}"),
        ObjectKind::VpcEgressGateway => format!("veg:{namespace}.{name}"),
    };
    if full.len() < TENANT_NAME_LEN {
        return full;
    }
    let hash = fnv1a(full.as_bytes());
    let mut cut = TENANT_NAME_LEN - 1 - 9;
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{hash:08x}", &full[..cut])
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
    })
}

/// A configuration holding only `tenants`, for the configuration's own
/// checks. Read from text so that settings added to the file later take
/// their defaults here too.
fn placeholder_config(tenants: Vec<Tenant>) -> Option<Config> {
    let mut config =
        Config::parse("interfaces: {internal: [internal0], external: external0}").ok()?;
    config.tenants = tenants;
    Some(config)
}

/// Problems the configuration finds with its tenants (the placeholder
/// interfaces are not this module's business).
fn tenant_problems(tenants: Vec<Tenant>) -> Vec<config::Problem> {
    placeholder_config(tenants)
        .and_then(|config| config.plan().err())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| !p.field.starts_with("interfaces"))
        .collect()
}

/// The configuration's own checks of one tenant alone (addresses usable as
/// sources, at most eight, ports), so an object is refused for what is
/// wrong with it before it can claim anything.
fn check_tenant_alone(name: &str, admitted: &Admitted, egress_field: &str) -> Result<(), Failure> {
    let problems = tenant_problems(vec![admitted.tenant(name)]);
    let prefix = format!("tenants[0] ({name})");
    let messages: Vec<String> = problems
        .iter()
        .filter_map(|problem| {
            let field = problem.field.strip_prefix(&prefix)?.trim_start_matches('.');
            // An object without sources yet is reported as such later.
            if field == "sources" && admitted.sources.is_empty() {
                return None;
            }
            let field = if let Some(index) = field.strip_prefix("egressIPs") {
                // Kube-OVN entries may hold two addresses, so an index into
                // the IPv4 ones would point at the wrong entry.
                if egress_field == "spec.egressIPs" {
                    format!("{egress_field}{index}")
                } else {
                    egress_field.to_owned()
                }
            } else if field.starts_with("ports")
                || ["maxFlows", "newFlowsPerSecond", "newFlowBurst"].contains(&field)
            {
                format!("spec.{field}")
            } else {
                field.to_owned()
            };
            Some(format!("{field}: {}", problem.message))
        })
        .collect();
    if messages.is_empty() {
        return Ok(());
    }
    Err(Failure::new(reason::INVALID_SPEC, messages.join("; ")))
}

/// The configuration's checks of everything this node serves together; only
/// a safety net, since claims already keep objects apart. An object the
/// whole set fails with is refused, oldest objects kept.
fn check_against_config(served: &mut Vec<(Admitted, usize)>, reports: &mut [Report]) {
    let names: Vec<String> = reports.iter().map(|r| r.tenant.clone()).collect();
    let tenants = |set: &[(Admitted, usize)]| -> Vec<Tenant> {
        set.iter()
            .map(|(admitted, index)| admitted.tenant(&names[*index]))
            .collect()
    };
    if tenant_problems(tenants(served)).is_empty() {
        return;
    }
    let mut kept: Vec<(Admitted, usize)> = Vec::with_capacity(served.len());
    for entry in served.drain(..) {
        let mut trial = tenants(&kept);
        trial.push(entry.0.tenant(&names[entry.1]));
        let problems = tenant_problems(trial);
        if problems.is_empty() {
            kept.push(entry);
        } else {
            let text: Vec<String> = problems
                .iter()
                .map(|p| format!("{}: {}", p.field, p.message))
                .collect();
            reports[entry.1].set_not_ready(reason::INVALID_SPEC, text.join("; "));
        }
    }
    *served = kept;
}

/// Egress IPs and sources held by accepted objects, cluster-wide.
#[derive(Default)]
struct Claims {
    egress: BTreeMap<Point, (IpAddr, usize)>,
    /// Disjoint ranges (first, last address) by first address.
    sources: BTreeMap<Point, (Point, IpNet, usize)>,
}

/// An address as a point of one line holding both families, IPv4 first,
/// so that ranges of the two never meet.
type Point = (bool, u128);

fn point(addr: IpAddr) -> Point {
    match addr {
        IpAddr::V4(v4) => (false, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => (true, u128::from(v6)),
    }
}

/// A prefix's first and last address.
fn span(net: &IpNet) -> (Point, Point) {
    (point(net.network()), point(net.broadcast()))
}

impl Claims {
    fn source_holding(&self, first: Point, last: Point) -> Option<(IpNet, usize)> {
        // Claimed ranges are disjoint, so the one starting last at or
        // before `last` is the only one that can reach into [first, last].
        let (_, (end, net, owner)) = self.sources.range(..=last).next_back()?;
        (*end >= first).then_some((*net, *owner))
    }

    fn conflict(&self, admitted: &Admitted, owner_of: impl Fn(usize) -> String) -> Option<Failure> {
        for addr in &admitted.egress {
            if let Some((_, owner)) = self.egress.get(&point(*addr)) {
                return Some(Failure::new(
                    reason::EGRESS_IP_CONFLICT,
                    format!("{addr} is already an egress IP of {}", owner_of(*owner)),
                ));
            }
            let value = point(*addr);
            if let Some((net, owner)) = self.source_holding(value, value) {
                return Some(Failure::new(
                    reason::EGRESS_IP_CONFLICT,
                    format!("{addr} lies inside {net}, a source of {}", owner_of(owner)),
                ));
            }
        }
        for net in &admitted.sources {
            let (first, last) = span(net);
            if let Some((theirs, owner)) = self.source_holding(first, last) {
                return Some(Failure::new(
                    reason::SOURCE_CONFLICT,
                    format!("{net} overlaps {theirs}, a source of {}", owner_of(owner)),
                ));
            }
            if let Some((_, (addr, owner))) = self.egress.range(first..=last).next() {
                return Some(Failure::new(
                    reason::SOURCE_CONFLICT,
                    format!(
                        "{net} contains {addr}, an egress IP of {}",
                        owner_of(*owner)
                    ),
                ));
            }
        }
        None
    }

    fn claim(&mut self, admitted: &Admitted, owner: usize) {
        for addr in &admitted.egress {
            self.egress.insert(point(*addr), (*addr, owner));
        }
        for net in &admitted.sources {
            let (first, last) = span(net);
            self.sources.insert(first, (last, *net, owner));
        }
    }
}

fn add_bfd_peers(peers: &mut Vec<BfdPeer>, wanted: &BfdWanted, report: &mut Report) {
    let mut overridden = Vec::new();
    for address in &wanted.peers {
        match peers.iter_mut().find(|p| p.address == *address) {
            Some(peer) => {
                if (peer.min_rx_ms, peer.min_tx_ms, peer.multiplier)
                    != (wanted.min_rx_ms, wanted.min_tx_ms, wanted.multiplier)
                {
                    overridden.push(format!(
                        "{address} keeps minRX {} minTX {} multiplier {} of {}",
                        peer.min_rx_ms,
                        peer.min_tx_ms,
                        peer.multiplier,
                        peer.tenants.join(", ")
                    ));
                }
                peer.tenants.push(report.tenant.clone());
            }
            None => peers.push(BfdPeer {
                address: *address,
                min_rx_ms: wanted.min_rx_ms,
                min_tx_ms: wanted.min_tx_ms,
                multiplier: wanted.multiplier,
                tenants: vec![report.tenant.clone()],
            }),
        }
    }
    if !overridden.is_empty() {
        report.notes.push(ReportCondition {
            type_: note::BFD_TIMERS_IGNORED.0.to_owned(),
            status: true,
            reason: note::BFD_TIMERS_IGNORED.1.to_owned(),
            message: overridden.join("; "),
        });
    }
}

fn return_routes(snapshot: &Snapshot, warnings: &mut Vec<String>) -> Vec<ReturnRoute> {
    let mut by_destination: BTreeMap<IpNet, (IpAddr, &str)> = BTreeMap::new();
    for node in &snapshot.nodes {
        if node.name == snapshot.local.name {
            continue;
        }
        for cidr in &node.pod_cidrs {
            let family = if cidr.addr().is_ipv4() {
                "IPv4"
            } else {
                "IPv6"
            };
            let Some(via) = node
                .internal_ips
                .iter()
                .find(|ip| ip.is_ipv4() == cidr.addr().is_ipv4())
            else {
                warnings.push(format!(
                    "node {} has the {family} pod CIDR {cidr} but no {family} InternalIP",
                    node.name
                ));
                continue;
            };
            match by_destination.get(cidr) {
                Some((_, first)) => warnings.push(format!(
                    "pod CIDR {cidr} is claimed by nodes {first} and {}; routing it to {first}",
                    node.name
                )),
                None => {
                    by_destination.insert(*cidr, (*via, &node.name));
                }
            }
        }
    }
    by_destination
        .into_iter()
        .map(|(destination, (via, _))| ReturnRoute { destination, via })
        .collect()
}

fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn join(addresses: &[IpAddr]) -> String {
    addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;
