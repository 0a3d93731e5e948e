//! The VpcEgressGateway contract: `init-vpc-egress-gateway.sh` run with
//! exactly the environment Kube-OVN's controller gives the init container,
//! in a pod shaped like Kube-OVN's (`eth0` a veth on the VPC's switch,
//! `net1` a macvlan, default interface settings). The script exits and
//! leaves no process; the dataplane it attached goes on translating
//! everything from the internal interface to the pod's external address,
//! except the no-SNAT sources, which leave (and come back) as they are; the
//! gateway is no way in; a second run (a restarted init container)
//! replaces the programs and traffic goes on; a dual-stack gateway serves
//! both families in one attach. Needs root.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use egress_tests::{
    agent::Finished,
    kube_ovn::PodScripts,
    require_root,
    shapes::KubeOvnPod,
    traffic::{curl, http_server},
};

const SCRIPT: &str = "init-vpc-egress-gateway.sh";
/// The internal subnet's gateway (OVN's router, here the node's switch).
const INTERNAL_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 16, 0, 1);
const NO_SNAT: &str = "10.16.2.0/24";

fn pod_with_router() -> KubeOvnPod {
    let pod = KubeOvnPod::new();
    // OVN's router between the VPC's subnets, where the gateway pod's
    // table 1000 sends replies.
    pod.node.ip(&["addr", "add", "10.16.0.1/16", "dev", "br0"]);
    pod.node
        .run("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"]);
    // The outside reaches the no-SNAT subnet through the gateway, as BGP
    // would announce it.
    pod.server.ip(&[
        "route",
        "add",
        NO_SNAT,
        "via",
        &KubeOvnPod::GATEWAY_EXTERNAL.to_string(),
    ]);
    pod
}

fn scripts(pod: &KubeOvnPod) -> PodScripts {
    let internal = INTERNAL_GATEWAY.to_string();
    let external = KubeOvnPod::SERVER.to_string();
    PodScripts::new(
        &pod.gateway,
        &[
            ("INTERNAL_GATEWAY_IPV4", internal.as_str()),
            ("EXTERNAL_GATEWAY_IPV4", external.as_str()),
            ("NO_SNAT_SOURCES_IPV4", NO_SNAT),
        ],
    )
}

/// Processes left in the gateway pod's network namespace (the tests run
/// side by side: a machine-wide look would see the other's init script).
fn pod_processes(pod: &KubeOvnPod) -> usize {
    let out = std::process::Command::new("ip")
        .args(["netns", "pids", pod.gateway.name()])
        .output()
        .expect("ip netns pids");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// The script succeeded, attached the dataplane, left no process behind,
/// and set Kube-OVN's policy routing for each of `families` (`-4`, `-6`).
#[track_caller]
fn assert_attached(pod: &KubeOvnPod, said: &Finished, families: &[&str]) {
    assert!(
        said.status.success(),
        "{SCRIPT}: {:?}\n{}{}",
        said.status,
        said.stdout,
        said.stderr
    );
    assert!(
        said.stdout.contains("egress dataplane attached"),
        "{}",
        said.stdout
    );
    assert_eq!(pod_processes(pod), 0, "nothing of the init container stays");
    for family in families {
        let rules =
            String::from_utf8_lossy(&pod.gateway.ip(&[family, "rule", "show"]).stdout).into_owned();
        for priority in ["1001:", "1002:", "1003:", "1004:"] {
            assert!(
                rules.contains(priority),
                "Kube-OVN's policy routing ({family}): {rules}"
            );
        }
    }
}

#[test]
fn the_init_script_leaves_a_dataplane_that_serves_without_any_process() {
    if !require_root() {
        return;
    }
    let pod = pod_with_router();
    let scripts = scripts(&pod);
    let said = scripts.run(SCRIPT, &[]);
    assert_attached(&pod, &said, &["-4"]);

    let outside = http_server(&pod.server, SocketAddrV4::new(KubeOvnPod::SERVER, 8080));
    let url = format!("http://{}:8080/", KubeOvnPod::SERVER);
    let masqueraded = format!("you are {}\n", KubeOvnPod::GATEWAY_EXTERNAL);
    for pod_addr in [KubeOvnPod::POD_A, KubeOvnPod::STRANGER] {
        let body =
            curl(&pod.pod(pod_addr).ns, &url).unwrap_or_else(|err| panic!("{pod_addr} out: {err}"));
        assert_eq!(
            body, masqueraded,
            "{pod_addr} leaves with the pod's address"
        );
    }
    let body = curl(&pod.pod(KubeOvnPod::POD_B).ns, &url).expect("no-SNAT source out");
    assert_eq!(
        body,
        format!("you are {}\n", KubeOvnPod::POD_B),
        "a no-SNAT source leaves as it is"
    );

    // The gateway is no way in: the outside, routing to a translated pod
    // through the gateway, reaches nothing.
    let inside = http_server(
        &pod.pod(KubeOvnPod::POD_A).ns,
        SocketAddrV4::new(KubeOvnPod::POD_A, 80),
    );
    pod.server.ip(&[
        "route",
        "add",
        "10.16.1.0/24",
        "via",
        &KubeOvnPod::GATEWAY_EXTERNAL.to_string(),
    ]);
    assert!(curl(&pod.server, &format!("http://{}/", KubeOvnPod::POD_A)).is_err());
    assert!(inside.peer_ips().is_empty());

    let status = scripts.status();
    let counters = &status["counters"];
    assert!(
        counters["out_new_flow"].as_u64().unwrap_or(0) >= 2,
        "{status}"
    );
    assert!(
        counters["routed_passed"].as_u64().unwrap_or(0) >= 2,
        "{status}"
    );
    assert!(
        counters["in_drop_to_internal"].as_u64().unwrap_or(0) >= 1,
        "{status}"
    );

    // A restarted init container runs the script again: the programs are
    // replaced and traffic goes on.
    let again = scripts.run(SCRIPT, &[]);
    assert!(again.status.success(), "{}{}", again.stdout, again.stderr);
    assert!(again.stdout.contains("replacing"), "{}", again.stdout);
    let body = curl(&pod.pod(KubeOvnPod::POD_A).ns, &url).expect("out after a second run");
    assert_eq!(body, masqueraded);
    assert_eq!(
        outside.peer_ips(),
        [
            KubeOvnPod::GATEWAY_EXTERNAL,
            KubeOvnPod::GATEWAY_EXTERNAL,
            KubeOvnPod::POD_B,
            KubeOvnPod::GATEWAY_EXTERNAL
        ]
    );
}

/// A dual-stack VpcEgressGateway (Kube-OVN sets both families' gateways
/// and no-SNAT sources): one attach serves both, each family leaving with
/// the pod's own external address of that family, the no-SNAT IPv6 pods
/// as they are, and the outside reaching no translated pod over IPv6.
#[test]
fn a_dual_stack_gateway_translates_each_family_to_the_pods_address() {
    if !require_root() {
        return;
    }
    let pod = pod_with_router();
    pod.add_ipv6();
    let no_snat_v6 = "fd00:10:16:2::/64";
    pod.server.ip(&[
        "-6",
        "route",
        "add",
        no_snat_v6,
        "via",
        &KubeOvnPod::GATEWAY_EXTERNAL_V6.to_string(),
    ]);
    let internal = INTERNAL_GATEWAY.to_string();
    let external = KubeOvnPod::SERVER.to_string();
    let internal_v6 = KubeOvnPod::OVN_ROUTER_V6.to_string();
    let external_v6 = KubeOvnPod::SERVER_V6.to_string();
    let scripts = PodScripts::new(
        &pod.gateway,
        &[
            ("INTERNAL_GATEWAY_IPV4", internal.as_str()),
            ("EXTERNAL_GATEWAY_IPV4", external.as_str()),
            ("NO_SNAT_SOURCES_IPV4", NO_SNAT),
            ("INTERNAL_GATEWAY_IPV6", internal_v6.as_str()),
            ("EXTERNAL_GATEWAY_IPV6", external_v6.as_str()),
            ("NO_SNAT_SOURCES_IPV6", no_snat_v6),
        ],
    );
    let said = scripts.run(SCRIPT, &[]);
    assert_attached(&pod, &said, &["-4", "-6"]);
    assert!(
        said.stdout
            .contains(&KubeOvnPod::GATEWAY_EXTERNAL_V6.to_string()),
        "the attach names both egress addresses: {}",
        said.stdout
    );

    let server6 = SocketAddr::new(KubeOvnPod::SERVER_V6.into(), 8080);
    let outside6 = http_server(&pod.server, server6);
    let outside4 = http_server(&pod.server, SocketAddrV4::new(KubeOvnPod::SERVER, 8080));
    let url6 = format!("http://[{}]:8080/", KubeOvnPod::SERVER_V6);
    let url4 = format!("http://{}:8080/", KubeOvnPod::SERVER);
    let pod_a = &pod.pod(KubeOvnPod::POD_A).ns;
    let status = || scripts.status().to_string();
    let body = curl(pod_a, &url6).unwrap_or_else(|err| panic!("IPv6 out: {err}\n{}", status()));
    assert_eq!(
        body,
        format!("you are {}\n", KubeOvnPod::GATEWAY_EXTERNAL_V6)
    );
    let body = curl(pod_a, &url4).expect("IPv4 out of a dual-stack gateway");
    assert_eq!(body, format!("you are {}\n", KubeOvnPod::GATEWAY_EXTERNAL));
    let pod_b_v6 = KubeOvnPod::ipv6_of(KubeOvnPod::POD_B);
    let body = curl(&pod.pod(KubeOvnPod::POD_B).ns, &url6).expect("no-SNAT IPv6 source out");
    assert_eq!(
        body,
        format!("you are {pod_b_v6}\n"),
        "a no-SNAT source leaves as it is"
    );
    assert_eq!(
        outside6.peer_ips_v6(),
        [KubeOvnPod::GATEWAY_EXTERNAL_V6, pod_b_v6]
    );
    assert_eq!(outside4.peer_ips(), [KubeOvnPod::GATEWAY_EXTERNAL]);

    // No way in over IPv6: the outside, routing to a translated pod
    // through the gateway, reaches nothing.
    let pod_a_v6 = KubeOvnPod::ipv6_of(KubeOvnPod::POD_A);
    let inside = http_server(pod_a, SocketAddr::new(pod_a_v6.into(), 80));
    pod.server.ip(&[
        "-6",
        "route",
        "add",
        "fd00:10:16:1::/64",
        "via",
        &KubeOvnPod::GATEWAY_EXTERNAL_V6.to_string(),
    ]);
    assert!(curl(&pod.server, &format!("http://[{pod_a_v6}]/")).is_err());
    assert!(inside.peer_ips_v6().is_empty());
    let status = scripts.status();
    let counters = &status["counters"];
    assert!(
        counters["routed_passed"].as_u64().unwrap_or(0) >= 2,
        "{status}"
    );
    assert!(
        counters["in_drop_to_internal"].as_u64().unwrap_or(0) >= 1,
        "{status}"
    );
}
