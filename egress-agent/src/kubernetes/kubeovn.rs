//! Kube-OVN's `VpcEgressGateway` and `Subnet` (kubeovn.io/v1), read so that
//! clusters already described with them can move to this dataplane unchanged.
//!
//! Kube-OVN installs and owns these definitions; the agent only reads them.
//! Every field is optional and `null` reads as absent, and fields this model
//! does not name are kept in `other`, so objects from any Kube-OVN release
//! parse. The types carry no schema of their own (`schema = "disabled"`).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::CustomResource;
use serde::{Deserialize, Deserializer, Serialize};

pub const GROUP: &str = "kubeovn.io";

/// A Kube-OVN VPC egress gateway: SNAT for the pods and blocks its policies
/// and selectors name, through `externalIPs`.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "kubeovn.io",
    version = "v1",
    kind = "VpcEgressGateway",
    plural = "vpc-egress-gateways",
    singular = "vpc-egress-gateway",
    shortname = "veg",
    namespaced,
    schema = "disabled",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct VpcEgressGatewaySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpc: Option<String>,
    /// Kube-OVN's default is 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_subnet: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_subnet: Option<String>,
    /// Each entry is an address or an `IPv4,IPv6` pair.
    #[serde(
        default,
        rename = "internalIPs",
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub internal_ips: Vec<String>,
    /// Each entry is an address or an `IPv4,IPv6` pair.
    #[serde(
        default,
        rename = "externalIPs",
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub external_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<VegBfd>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub policies: Vec<VegPolicy>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub selectors: Vec<VegSelector>,
    /// Terms are ORed, as in a node affinity.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub node_selector: Vec<NodeSelectorTerm>,
    /// `Cluster` (the default) or `Local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VegBfd {
    #[serde(default, deserialize_with = "null_as_default")]
    pub enabled: bool,
    #[serde(default, rename = "minRX", skip_serializing_if = "Option::is_none")]
    pub min_rx: Option<i32>,
    #[serde(default, rename = "minTX", skip_serializing_if = "Option::is_none")]
    pub min_tx: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<i32>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VegPolicy {
    /// Kube-OVN's default is false: route through the gateway untranslated.
    #[serde(default, deserialize_with = "null_as_default")]
    pub snat: bool,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ip_blocks: Vec<String>,
    /// Names of Kube-OVN subnets.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub subnets: Vec<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VegSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// One node affinity term: labels and fields, all ANDed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSelectorTerm {
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub match_labels: BTreeMap<String, String>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub match_expressions: Vec<LabelSelectorRequirement>,
    /// Field requirements; nodes have one field to match, `metadata.name`.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub match_fields: Vec<LabelSelectorRequirement>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// A Kube-OVN subnet; the agent needs its `cidrBlock`.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "kubeovn.io",
    version = "v1",
    kind = "Subnet",
    schema = "disabled",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct SubnetSpec {
    /// `10.16.0.0/16`, or `IPv4,IPv6` for a dual-stack subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr_block: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// Kube-OVN writes `null` for empty lists in places; read it as empty.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use kube::Resource as _;

    use super::*;

    #[test]
    fn resource_names_match_kube_ovn() {
        assert_eq!(VpcEgressGateway::plural(&()), "vpc-egress-gateways");
        assert_eq!(VpcEgressGateway::api_version(&()), "kubeovn.io/v1");
        assert_eq!(Subnet::plural(&()), "subnets");
        assert_eq!(Subnet::kind(&()), "Subnet");
    }

    #[test]
    fn parses_a_real_object_with_status_and_unknown_fields() {
        let text = r#"
apiVersion: kubeovn.io/v1
kind: VpcEgressGateway
metadata:
  name: gateway1
  namespace: default
spec:
  vpc: ovn-cluster
  replicas: 1
  externalSubnet: macvlan1
  internalIPs: null
  bfd:
    enabled: false
    minRX: 1000
    minTX: 1000
    multiplier: 3
  policies:
    - snat: true
      subnets: [ovn-default]
      ipBlocks: null
  futureField: {nested: [1, 2]}
status:
  phase: Completed
  ready: true
"#;
        let veg: VpcEgressGateway = serde_saphyr::from_str(text).expect("parses");
        assert_eq!(veg.spec.vpc.as_deref(), Some("ovn-cluster"));
        assert!(veg.spec.internal_ips.is_empty());
        assert_eq!(veg.spec.policies[0].subnets, ["ovn-default"]);
        assert!(veg.spec.other.contains_key("futureField"));
        let back = serde_json::to_value(&veg.spec).expect("serializes");
        assert_eq!(back["futureField"]["nested"], serde_json::json!([1, 2]));
    }

    #[test]
    fn parses_a_dual_stack_subnet() {
        let text = r#"
apiVersion: kubeovn.io/v1
kind: Subnet
metadata: {name: ovn-default}
spec:
  cidrBlock: 10.16.0.0/16,fd00:10:16::/112
  gateway: 10.16.0.1,fd00:10:16::1
  excludeIps: [10.16.0.1]
  natOutgoing: true
status:
  v4availableIPs: 65533
"#;
        let subnet: Subnet = serde_saphyr::from_str(text).expect("parses");
        assert_eq!(
            subnet.spec.cidr_block.as_deref(),
            Some("10.16.0.0/16,fd00:10:16::/112")
        );
        assert_eq!(subnet.spec.other["natOutgoing"], serde_json::json!(true));
    }
}
