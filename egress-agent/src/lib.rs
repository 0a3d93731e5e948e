//! egress-agent: loads the egress dataplane, keeps its maps and egress
//! addresses in sync with the configuration, and reports what it is doing.
//!
//! One module per concern: `config` (the file and its validation), `system`
//! (what the machine has), `hook_choice` (XDP or TC per interface, from
//! what the kernel reports), `dataplane` (programs and maps), `addresses`
//! (egress IPs on the external interface), `macvlans` (next hops it
//! creates), `sysctl` (forwarding, ARP isolation), `bpffs` (mounting it
//! where it is missing), `instance` (pins, lock and state file), `agent` (the run loop),
//! `stop` (SIGTERM and SIGINT as long operations see them), `conntrack`
//! (flows and their state), `audit` (the translation log), `status` (reading an instance back),
//! `kube_ovn_pod` (commands inside Kube-OVN's gateway pods), `cli`.

pub mod addresses;
pub mod agent;
pub mod applied;
pub mod audit;
pub mod bfd;
pub mod bpffs;
pub mod cli;
pub mod config;
pub mod conntrack;
pub mod dataplane;
pub mod health;
pub mod hook_choice;
pub mod instance;
pub mod kube_ovn_pod;
pub mod kubernetes;
pub mod live;
pub mod macvlans;
pub mod metrics;
pub mod redirects;
pub mod routes;
pub mod status;
pub mod stop;
pub mod sysctl;
pub mod system;
