//! The `EgressGateway` custom resource: one tenant of the dataplane, written
//! as a Kubernetes object.
//!
//! The schema is generated from these types (`egress-agent crd` prints it,
//! `deploy/crd.yaml` is that output checked in), so the types are the single
//! source of truth. The API server checks shapes and address formats; what
//! only the agent can judge (conflicts with other objects, the dataplane's
//! limits) is reported in the status instead of being refused at admission.

use std::collections::BTreeMap;

use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector},
};
use kube::{CustomResource, CustomResourceExt as _};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// API group of the agent's own resources.
pub const GROUP: &str = "egress-gateway.io";
/// The one served (and stored) version.
pub const VERSION: &str = "v1alpha1";
/// Name of the field manager the agent patches status with.
pub const FIELD_MANAGER: &str = "egress-agent";

/// Condition types and reasons share Kubernetes' conventions: CamelCase,
/// `Ready` as the summary.
pub const CONDITION_READY: &str = "Ready";

/// Traffic from the selected pods and address blocks leaves the cluster with
/// one of `egressIPs` as its source, through the node this object selects.
// Each `printcolumn(...)` is a column of its own; clippy takes their
// repeated `type_ = ...` for one attribute given twice.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "egress-gateway.io",
    version = "v1alpha1",
    kind = "EgressGateway",
    namespaced,
    status = "EgressGatewayStatus",
    derive = "PartialEq",
    derive = "Default",
    shortname = "egw",
    category = "egress",
    doc = "Per-tenant egress IPs: the selected pods and address blocks leave the cluster with one \
           of egressIPs as their source address, translated by the egress-agent on the node this \
           gateway selects.",
    printcolumn(
        name = "Ready",
        type_ = "boolean",
        json_path = ".status.ready",
        description = "Whether the serving node's dataplane carries this gateway's tenant"
    ),
    printcolumn(
        name = "Egress IPs",
        type_ = "string",
        json_path = ".status.egressIPs",
        description = "Addresses the tenant's traffic leaves with"
    ),
    printcolumn(
        name = "Node",
        type_ = "string",
        json_path = ".status.node",
        description = "The node whose agent serves this gateway"
    ),
    printcolumn(
        name = "Pods",
        type_ = "integer",
        json_path = ".status.matchedPods",
        description = "Running pods selected as sources"
    ),
    printcolumn(
        name = "Flows",
        type_ = "integer",
        json_path = ".status.activeFlows",
        description = "Flows in the serving node's connection table"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EgressGatewaySpec {
    /// Interface translated traffic leaves through, instead of the one in
    /// the node's agent configuration. All gateways served by one node must
    /// agree on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_interface: Option<String>,

    /// Addresses the tenant's traffic leaves with, IPv4 and IPv6 (at least
    /// one, at most 8 of each family); each family's sources leave with
    /// that family's, and a flow picks one by hashing its source and
    /// destination.
    #[serde(rename = "egressIPs")]
    #[schemars(schema_with = "egress_ips_schema")]
    pub egress_ips: Vec<String>,

    /// Source CIDRs (or bare addresses) of either family that belong to
    /// the tenant, in addition to the selected pods (whose addresses count
    /// for the families the tenant has egress IPs of).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "ip_blocks_schema")]
    pub ip_blocks: Vec<String>,

    /// Namespaces whose pods are sources. Without it, `podSelector` selects
    /// in this object's namespace; `{}` selects every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// Pods (in the selected namespaces) whose addresses are sources. Without
    /// it, every pod of the selected namespaces is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,

    /// Labels a node must carry to serve this gateway. Of the Ready nodes
    /// that match and run the agent, one serves it at a time.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Source ports (and ICMP echo ids) handed out on the egress IPs;
    /// 1024-65535 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRangeSpec>,

    /// Flows this tenant may hold at once; default an equal share of the
    /// node's conntrack table (see the agent's `tenants[].maxFlows`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_flows: Option<u32>,

    /// New flows per second this tenant may open; no limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_flows_per_second: Option<u32>,

    /// New flows at once above `newFlowsPerSecond`; one second's worth when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_flow_burst: Option<u32>,

    /// Bidirectional Forwarding Detection towards the routers that send this
    /// tenant's traffic to the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<BfdSpec>,

    /// Ports of the egress IPs forwarded to hosts of this tenant (inbound
    /// NAT, as the agent's `tenants[].portForwards`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_forwards: Vec<PortForwardSpec>,

    /// Addresses that map one host of this tenant 1:1, every port, both
    /// ways (the agent's `tenants[].floatingIPs`).
    #[serde(rename = "floatingIPs", default, skip_serializing_if = "Vec::is_empty")]
    pub floating_ips: Vec<FloatingIpSpec>,
}

/// One port forward: `egressIP:port` (`protocol`) goes to `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortForwardSpec {
    /// One of `egressIPs`.
    #[serde(rename = "egressIP")]
    pub egress_ip: String,
    /// `tcp` or `udp`.
    #[schemars(schema_with = "forward_protocol_schema")]
    pub protocol: String,
    /// The port outside.
    #[schemars(schema_with = "port_schema")]
    pub port: u16,
    /// The host and port inside, of the egress IP's family: `10.16.0.5:80`
    /// or `[fd00:10::5]:80`.
    pub to: String,
}

/// One floating IP: `address` maps `host`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FloatingIpSpec {
    /// The address outside (not one of the egress IPs), either family.
    pub address: String,
    /// The host inside, of the address's family.
    pub host: String,
}

fn forward_protocol_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "enum": ["tcp", "udp"]})
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PortRangeSpec {
    #[schemars(schema_with = "port_schema")]
    pub min: u16,
    #[schemars(schema_with = "port_schema")]
    pub max: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BfdSpec {
    #[serde(default)]
    pub enabled: bool,
    /// Slowest rate, in milliseconds, at which this side wants to receive
    /// control packets (10 to 60000, default 1000).
    #[serde(default, rename = "minRX", skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "bfd_interval_schema")]
    pub min_rx: Option<u32>,
    /// Fastest rate, in milliseconds, at which this side sends (10 to
    /// 60000, default 1000).
    #[serde(default, rename = "minTX", skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "bfd_interval_schema")]
    pub min_tx: Option<u32>,
    /// Missed packets before a session is declared down (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "bfd_multiplier_schema")]
    pub multiplier: Option<u8>,
    /// Addresses (IPv4 or IPv6, not link-local) of the BFD neighbours.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "ip_list_schema")]
    pub peers: Vec<String>,
}

/// What the serving node reports. Optional fields are written as `null` so a
/// merge patch clears what no longer applies.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressGatewayStatus {
    /// The serving node's dataplane carries this gateway's tenant.
    #[serde(default)]
    pub ready: bool,
    /// `Ready`, and one condition per part of the spec that is not honoured.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Egress IPs in use.
    #[serde(rename = "egressIPs", default)]
    pub egress_ips: Vec<String>,
    /// The node whose agent serves this gateway.
    #[serde(default)]
    pub node: Option<String>,
    /// Running pods selected as sources.
    #[serde(default)]
    pub matched_pods: i64,
    /// Flows in the serving node's connection table.
    #[serde(default)]
    pub active_flows: Option<i64>,
    /// The `metadata.generation` this status describes.
    #[serde(default)]
    pub observed_generation: Option<i64>,
}

/// The CustomResourceDefinition of [`EgressGateway`].
pub fn crd() -> CustomResourceDefinition {
    EgressGateway::crd()
}

/// Header of the printed definition: it is generated, not written.
const YAML_HEADER: &str =
    "# Generated by `egress-agent crd` from egress-agent/src/kubernetes/crd.rs; do not edit.\n";

/// The definition as YAML, as `egress-agent crd` prints it and
/// `deploy/crd.yaml` holds it.
pub fn crd_yaml() -> anyhow::Result<String> {
    let body = serde_saphyr::to_string(&crd())?;
    Ok(format!("{YAML_HEADER}{body}"))
}

/// `egress-agent crd`.
pub fn print_crd() -> anyhow::Result<()> {
    print!("{}", crd_yaml()?);
    Ok(())
}

fn egress_ips_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": 2 * egress_common::tenant::MAX_EGRESS_ADDRS,
        "items": { "type": "string", "anyOf": [{ "format": "ipv4" }, { "format": "ipv6" }] },
        "x-kubernetes-list-type": "set",
    })
}

// Plain integer schemas: Kubernetes knows int32/int64 formats only, and
// schemars would write uint16/uint32/uint8.
fn port_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "integer", "minimum": 1, "maximum": 65535 })
}

/// The agent's BFD keeps time in userspace: not below 10 ms, and above a
/// minute a failure is noticed too late to matter.
fn bfd_interval_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "integer", "minimum": 10, "maximum": 60_000, "nullable": true })
}

fn bfd_multiplier_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "integer", "minimum": 1, "maximum": 255, "nullable": true })
}

fn ip_list_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": { "type": "string", "anyOf": [{ "format": "ipv4" }, { "format": "ipv6" }] },
        "x-kubernetes-list-type": "set",
    })
}

fn ip_blocks_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {
            "type": "string",
            "anyOf": [{ "format": "ipv4" }, { "format": "ipv6" }, { "format": "cidr" }],
        },
        "x-kubernetes-list-type": "set",
    })
}

/// Conditions are keyed by type, as in every built-in resource.
fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_scope() {
        let crd = crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("egressgateways.egress-gateway.io")
        );
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["egw".to_owned()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, VERSION);
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
    }

    #[test]
    fn printer_columns() {
        let crd = crd();
        let columns: Vec<(&str, &str, &str)> = crd.spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| (c.name.as_str(), c.type_.as_str(), c.json_path.as_str()))
            .collect();
        assert_eq!(
            columns,
            [
                ("Ready", "boolean", ".status.ready"),
                ("Egress IPs", "string", ".status.egressIPs"),
                ("Node", "string", ".status.node"),
                ("Pods", "integer", ".status.matchedPods"),
                ("Flows", "integer", ".status.activeFlows"),
                ("Age", "date", ".metadata.creationTimestamp"),
            ]
        );
    }

    #[test]
    fn schema_validates_addresses_and_keys_conditions() {
        let crd = crd();
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema");
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["required"], serde_json::json!(["egressIPs"]));
        let egress = &spec["properties"]["egressIPs"];
        assert_eq!(
            egress["items"]["anyOf"],
            serde_json::json!([{"format": "ipv4"}, {"format": "ipv6"}])
        );
        assert_eq!(egress["maxItems"], 16, "8 of each family");
        let conditions =
            &schema["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        assert_eq!(
            conditions["items"]["required"],
            serde_json::json!(["lastTransitionTime", "message", "reason", "status", "type"])
        );
    }

    #[test]
    fn printed_yaml_round_trips() {
        let text = crd_yaml().expect("yaml");
        assert!(text.starts_with("# Generated"));
        let parsed: CustomResourceDefinition = serde_saphyr::from_str(&text).expect("parses");
        assert_eq!(parsed, crd());
    }

    #[test]
    fn optional_status_fields_are_written_as_null() {
        let status = EgressGatewayStatus::default();
        let value = serde_json::to_value(&status).expect("serializes");
        assert_eq!(value["node"], serde_json::Value::Null);
        assert!(
            value
                .as_object()
                .is_some_and(|o| o.contains_key("activeFlows"))
        );
    }
}
