//! Classify: which tenant does an outbound packet belong to?
//!
//! When some tenant is selected by ingress port, the frame's (ifindex,
//! destination MAC) — or its ifindex alone — names a port, and only tenants
//! behind that port are considered: a router that sent the frame to tenant
//! A's next hop has decided it is tenant A's, whatever its source. Frames on
//! no port are classified by source prefix alone.

use core::mem::MaybeUninit;

use aya_ebpf::btf_maps::lpm_trie::Key;
use egress_common::{
    config::CONFIG_F_INGRESS_PORTS,
    tenant::{ANY_PORT, IngressPortKey, PORT_PREFIX_BITS, SourceKeyV4, SourceKeyV6},
};

use crate::{
    maps::{DP_CONFIG, INGRESS_PORTS, TENANT_SRC_V4, TENANT_SRC_V6},
    parse::Ipv4Frame,
    parse6::Ipv6Frame,
    zero,
};

/// The tenant of a packet that arrived on ingress port `port`.
#[inline(always)]
pub fn tenant_v4(frame: &Ipv4Frame, port: u32) -> Option<u16> {
    let key = Key::new(
        PORT_PREFIX_BITS + 32,
        SourceKeyV4 {
            port_be: port.to_be(),
            addr: frame.ip().src_addr,
        },
    );
    // Tenant ids are checked against MAX_TENANT_ID by the agent, so they fit.
    TENANT_SRC_V4.get(&key).map(|tenant| *tenant as u16)
}

/// `tenant_v4` for an IPv6 source.
#[inline(always)]
pub fn tenant_v6(frame: &Ipv6Frame, port: u32) -> Option<u16> {
    let key = Key::new(
        PORT_PREFIX_BITS + 128,
        SourceKeyV6 {
            port_be: port.to_be(),
            addr: frame.ip().src_addr,
        },
    );
    TENANT_SRC_V6.get(&key).map(|tenant| *tenant as u16)
}

/// The ingress port a frame sent to `dst_mac` arrived on: its (interface,
/// destination MAC), its interface, or `ANY_PORT`. Also the conntrack zone
/// of its flows.
#[inline(always)]
pub fn ingress_port(dst_mac: [u8; 6], ifindex: u32) -> u32 {
    let by_port = DP_CONFIG
        .get(0)
        .is_some_and(|config| config.flags & CONFIG_F_INGRESS_PORTS != 0);
    if !by_port {
        return ANY_PORT;
    }
    let by_mac = IngressPortKey {
        ifindex,
        mac: dst_mac,
        _pad: [0; 2],
    };
    if let Some(port) = INGRESS_PORTS.get_ptr(by_mac) {
        // SAFETY: map value pointer returned by the kernel.
        return unsafe { *port };
    }
    let mut slot = MaybeUninit::uninit();
    // SAFETY: a plain C struct; all-zero is a valid key (any MAC).
    let any_mac: &mut IngressPortKey = unsafe { zero::zeroed(&mut slot) };
    any_mac.ifindex = ifindex;
    INGRESS_PORTS
        .get_ptr(any_mac)
        // SAFETY: map value pointer returned by the kernel.
        .map_or(ANY_PORT, |port| unsafe { *port })
}
