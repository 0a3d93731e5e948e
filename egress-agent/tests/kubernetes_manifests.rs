//! The manifests under `deploy/` are what operators apply: the checked-in
//! CRD must be what the code generates now, every document must be a valid
//! object of its kind (read with the same types the API server's clients
//! use, and written back unchanged, so a misspelt field cannot hide), and
//! the DaemonSet, RBAC and systemd unit must say what the agent needs.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use egress_agent::{
    config::Config,
    kubernetes::{
        crd::{self, EgressGateway},
        kubeovn::{Subnet, VpcEgressGateway},
        watch::AGENT_POD_LABEL,
    },
};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Namespace, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use serde::{Serialize, de::DeserializeOwned};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// The YAML documents of a file, as JSON values.
fn documents(path: &Path) -> Vec<serde_json::Value> {
    serde_saphyr::from_multiple(&read(path))
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// Reads a document as `T` and checks that writing it back gives the same
/// document: a field the type does not know would be lost, and show.
fn typed<T: DeserializeOwned + Serialize>(document: &serde_json::Value, origin: &str) -> T {
    let value: T =
        serde_json::from_value(document.clone()).unwrap_or_else(|err| panic!("{origin}: {err}"));
    let back = serde_json::to_value(&value).expect("serializes");
    if let Some(path) = first_difference(document, &back, String::new()) {
        panic!(
            "{origin}: {path} does not survive reading and writing back (misspelt or unknown field?)"
        );
    }
    value
}

/// Where two documents first differ, as a JSON path.
fn first_difference(
    written: &serde_json::Value,
    read: &serde_json::Value,
    path: String,
) -> Option<String> {
    use serde_json::Value;
    match (written, read) {
        (Value::Object(a), Value::Object(b)) => {
            a.keys()
                .chain(b.keys())
                .find_map(|key| match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => first_difference(x, y, format!("{path}.{key}")),
                    _ => Some(format!("{path}.{key}")),
                })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(x, y, format!("{path}[{i}]"))),
        _ => (written != read).then_some(if path.is_empty() {
            ".".to_owned()
        } else {
            path
        }),
    }
}

#[derive(Default)]
struct Manifests {
    crds: Vec<CustomResourceDefinition>,
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    egress_gateways: Vec<EgressGateway>,
    vpc_egress_gateways: Vec<VpcEgressGateway>,
    subnets: Vec<Subnet>,
}

impl Manifests {
    fn add(&mut self, path: &Path) {
        for (index, document) in documents(path).iter().enumerate() {
            let origin = format!("{} document {index}", path.display());
            let api_version = document["apiVersion"].as_str().unwrap_or_default();
            match (api_version, document["kind"].as_str().unwrap_or_default()) {
                ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                    // Floating-point bounds are written as the API server
                    // writes them; compare typed values instead.
                    let crd: CustomResourceDefinition = serde_json::from_value(document.clone())
                        .unwrap_or_else(|err| panic!("{origin}: {err}"));
                    self.crds.push(crd);
                }
                ("v1", "Namespace") => self.namespaces.push(typed(document, &origin)),
                ("v1", "ServiceAccount") => self.service_accounts.push(typed(document, &origin)),
                ("v1", "ConfigMap") => self.config_maps.push(typed(document, &origin)),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    self.cluster_roles.push(typed(document, &origin))
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    self.bindings.push(typed(document, &origin))
                }
                ("apps/v1", "DaemonSet") => self.daemon_sets.push(typed(document, &origin)),
                ("egress-gateway.io/v1alpha1", "EgressGateway") => {
                    self.egress_gateways.push(typed(document, &origin))
                }
                ("kubeovn.io/v1", "VpcEgressGateway") => {
                    self.vpc_egress_gateways.push(typed(document, &origin))
                }
                ("kubeovn.io/v1", "Subnet") => self.subnets.push(typed(document, &origin)),
                (version, kind) => panic!("{origin}: no check for {version} {kind}"),
            }
        }
    }
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

fn deploy() -> Manifests {
    let mut manifests = Manifests::default();
    for path in yaml_files(&deploy_dir()) {
        manifests.add(&path);
    }
    manifests
}

fn examples() -> Manifests {
    let mut manifests = Manifests::default();
    for path in yaml_files(&deploy_dir().join("examples")) {
        manifests.add(&path);
    }
    manifests
}

#[test]
fn checked_in_crd_is_what_the_code_generates() {
    let generated = crd::crd_yaml().expect("generates");
    let checked_in = read(&deploy_dir().join("crd.yaml"));
    assert!(
        checked_in == generated,
        "deploy/crd.yaml is stale: regenerate it with `cargo run -p egress-agent -- crd > deploy/crd.yaml`"
    );
    let manifests = deploy();
    assert_eq!(manifests.crds, [crd::crd()]);
}

#[test]
fn every_manifest_parses_as_its_kind() {
    let manifests = deploy();
    assert_eq!(manifests.namespaces.len(), 1);
    assert_eq!(manifests.service_accounts.len(), 1);
    assert_eq!(manifests.cluster_roles.len(), 1);
    assert_eq!(manifests.bindings.len(), 1);
    assert_eq!(manifests.config_maps.len(), 1);
    assert_eq!(manifests.daemon_sets.len(), 1);
    let examples = examples();
    assert!(examples.egress_gateways.len() >= 4);
    assert!(examples.vpc_egress_gateways.len() >= 3);
    assert!(
        examples
            .subnets
            .iter()
            .any(|s| s.metadata.name.as_deref() == Some("ovn-default")
                && s.spec.cidr_block.as_deref() == Some("10.16.0.0/16"))
    );
}

#[test]
fn every_subnet_a_kube_ovn_example_names_exists() {
    let examples = examples();
    let subnets: BTreeSet<&str> = examples
        .subnets
        .iter()
        .filter_map(|s| s.metadata.name.as_deref())
        .collect();
    for gateway in &examples.vpc_egress_gateways {
        let named = gateway
            .spec
            .policies
            .iter()
            .flat_map(|p| p.subnets.iter())
            .chain(gateway.spec.internal_subnet.iter())
            .chain(gateway.spec.external_subnet.iter());
        for name in named {
            assert!(
                subnets.contains(name.as_str()),
                "{name} is not among the example subnets"
            );
        }
    }
}

#[test]
fn the_config_map_is_a_valid_agent_configuration() {
    let manifests = deploy();
    let map = &manifests.config_maps[0];
    let text = map
        .data
        .as_ref()
        .and_then(|d| d.get("agent.yaml"))
        .expect("agent.yaml in the ConfigMap");
    let config = Config::parse(text).expect("parses as the agent's configuration");
    assert!(config.tenants.is_empty(), "tenants come from the cluster");
    config.plan().expect("valid on its own");
}

#[test]
fn the_daemon_set_runs_the_agent_as_documented() {
    let manifests = deploy();
    let daemon_set = &manifests.daemon_sets[0];
    let spec = &daemon_set.spec;
    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .expect("labels");
    for (key, value) in spec.selector.match_labels.iter().flatten() {
        assert_eq!(
            template_labels.get(key),
            Some(value),
            "the selector matches the pods"
        );
    }
    assert_eq!(
        template_labels.get(AGENT_POD_LABEL.0).map(String::as_str),
        Some(AGENT_POD_LABEL.1)
    );

    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    let account = &manifests.service_accounts[0];
    assert_eq!(pod.service_account_name, account.metadata.name);
    assert_eq!(daemon_set.metadata.namespace, account.metadata.namespace);

    let container = &pod.containers[0];
    assert_eq!(
        container.args.as_deref(),
        Some(&["run", "--config", "/etc/egress/agent.yaml", "--kubernetes"].map(String::from)[..])
    );
    let security = container
        .security_context
        .as_ref()
        .expect("securityContext");
    assert_eq!(security.privileged, Some(false));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    assert_eq!(
        added,
        BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON", "NET_RAW"])
    );

    let env: BTreeMap<&str, &k8s_openapi::api::core::v1::EnvVar> = container
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e))
        .collect();
    let field = |name: &str| {
        env[name]
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str())
    };
    assert_eq!(field("NODE_NAME"), Some("spec.nodeName"));
    assert_eq!(field("POD_NAMESPACE"), Some("metadata.namespace"));
    assert_eq!(
        env["EGRESS_LISTEN"].value.as_deref(),
        Some("$(HOST_IP):9477")
    );

    let health_port = container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("health"))
        .expect("health port");
    assert_eq!(health_port.container_port, 9477);
    for (probe, path) in [
        (&container.readiness_probe, "/readyz"),
        (&container.liveness_probe, "/healthz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("httpGet probe");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("health".into())
        );
    }

    let mounts: BTreeMap<&str, &k8s_openapi::api::core::v1::VolumeMount> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.mount_path.as_str(), m))
        .collect();
    // Bidirectional propagation is refused for unprivileged containers.
    assert_eq!(
        mounts["/sys/fs/bpf"].mount_propagation.as_deref(),
        Some("HostToContainer")
    );
    assert!(mounts.contains_key("/run/egress"));
    assert_eq!(mounts["/etc/egress"].read_only, Some(true));
    let volumes: BTreeMap<&str, &k8s_openapi::api::core::v1::Volume> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v))
        .collect();
    let host_path = |mount: &str| {
        volumes[mounts[mount].name.as_str()]
            .host_path
            .as_ref()
            .map(|h| h.path.as_str())
    };
    assert_eq!(host_path("/sys/fs/bpf"), Some("/sys/fs/bpf"));
    assert_eq!(host_path("/run/egress"), Some("/run/egress"));
    let config_volume = volumes[mounts["/etc/egress"].name.as_str()]
        .config_map
        .as_ref()
        .expect("the config is a ConfigMap");
    assert_eq!(
        Some(config_volume.name.clone()),
        manifests.config_maps[0].metadata.name
    );
}

#[test]
fn rbac_grants_exactly_what_the_agent_uses() {
    let manifests = deploy();
    let role = &manifests.cluster_roles[0];
    let mut granted: BTreeSet<(String, String, String)> = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let mut wanted: BTreeSet<(String, String, String)> = BTreeSet::new();
    let mut want = |group: &str, resource: &str, verbs: &[&str]| {
        for verb in verbs {
            wanted.insert((group.into(), resource.into(), (*verb).into()));
        }
    };
    want("egress-gateway.io", "egressgateways", &["list", "watch"]);
    want("egress-gateway.io", "egressgateways/status", &["patch"]);
    for core in ["pods", "namespaces", "nodes"] {
        want("", core, &["list", "watch"]);
    }
    want("kubeovn.io", "vpc-egress-gateways", &["list", "watch"]);
    want("kubeovn.io", "subnets", &["list", "watch"]);
    assert_eq!(granted, wanted);

    let binding = &manifests.bindings[0];
    assert_eq!(Some(binding.role_ref.name.clone()), role.metadata.name);
    let subject = &binding.subjects.as_ref().expect("subjects")[0];
    let account = &manifests.service_accounts[0];
    assert_eq!(Some(subject.name.clone()), account.metadata.name);
    assert_eq!(subject.namespace, account.metadata.namespace);
}

#[test]
fn the_systemd_unit_runs_the_agent_against_the_cluster() {
    let unit = read(&deploy_dir().join("egress-agent.service"));
    let line = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= line"))
            .to_owned()
    };
    assert_eq!(
        line("ExecStart"),
        "/usr/local/bin/egress-agent run --config /etc/egress/agent.yaml --kubernetes --kubeconfig /etc/egress/kubeconfig"
    );
    assert_eq!(line("Restart"), "always");
    let ambient: BTreeSet<String> = line("AmbientCapabilities")
        .split_whitespace()
        .map(String::from)
        .collect();
    let bounding: BTreeSet<String> = line("CapabilityBoundingSet")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(ambient, bounding);
    assert!(ambient.contains("CAP_BPF") && ambient.contains("CAP_NET_ADMIN"));
}

#[test]
fn the_readme_shows_the_printer_columns_and_the_files() {
    let readme = read(&deploy_dir().join("README.md"));
    let crd = crd::crd();
    let header: Vec<String> = std::iter::once("NAMESPACE".to_owned())
        .chain(std::iter::once("NAME".to_owned()))
        .chain(
            crd.spec.versions[0]
                .additional_printer_columns
                .iter()
                .flatten()
                .map(|c| c.name.to_uppercase()),
        )
        .collect();
    let shown = readme.lines().any(|l| {
        l.split("  ")
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .eq(header.iter().map(String::as_str))
    });
    assert!(
        shown,
        "README.md should show `kubectl get egressgateways -A` with {header:?}"
    );
    for path in yaml_files(&deploy_dir())
        .iter()
        .chain(&yaml_files(&deploy_dir().join("examples")))
    {
        let name = path.file_name().and_then(|n| n.to_str()).expect("name");
        assert!(readme.contains(name), "README.md does not mention {name}");
    }
}
