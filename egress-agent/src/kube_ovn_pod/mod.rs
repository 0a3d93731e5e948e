//! Inside Kube-OVN's own gateway pods: the commands behind the scripts the
//! controller runs there (`deploy/kube-ovn/image/`), under the names and
//! with the exit codes and output Kube-OVN's own image has.
//!
//! `nat_gateway` serves a VpcNatGateway's `nat-gateway.sh` verbs;
//! `egress_gateway` attaches a VpcEgressGateway pod's dataplane from its
//! init container, to serve without any process; `bfdd` is the BFD
//! responder of gateway pods with BFD enabled, with the command surface of
//! Kube-OVN's bfdd supervisor and OpenBFDD's `bfdd-control`.

pub mod bfdd;
pub mod egress_gateway;
pub mod nat_gateway;
