//! Kubernetes: the agent's tenants written as cluster objects.
//!
//! With `--kubernetes` the agent takes its tenants from the cluster instead
//! of the configuration file, which then only describes the machine (its
//! interfaces). The pieces, each usable on its own:
//! - [`crd`]: the `EgressGateway` custom resource this project defines;
//! - [`kubeovn`]: Kube-OVN's `VpcEgressGateway` and `Subnet`, read as they
//!   are, so clusters described with them move over unchanged;
//! - [`snapshot`]: what the agent knows of the cluster at one moment;
//! - [`resolve`]: a pure function from a snapshot to this node's tenants
//!   (the configuration's own [`Tenant`](crate::config::Tenant) type, so
//!   they pass the same validation), return routes, BFD peers, and a report
//!   per object;
//! - [`watch`]: watchers that keep a snapshot current and say whether the
//!   API server is reachable (the last snapshot stays in force when not);
//! - [`status`]: writes each report into its object's status subresource;
//! - [`sync`]: the agent's loop around all of them.

pub mod crd;
pub mod kubeovn;
pub mod resolve;
pub mod selector;
pub mod snapshot;
pub mod status;
pub mod sync;
pub mod watch;
