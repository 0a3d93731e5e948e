//! Layouts of the benchmark's own BPF programs (bench-ebpf): the packet
//! generator, the counting sink and the plain forwarder that measures the
//! ceiling. Not part of the dataplane.

use crate::shared_layout;

/// `PktgenConfig::mode`: cycle through `flows` flows (established traffic).
pub const PKTGEN_CYCLE: u32 = 0;
/// `PktgenConfig::mode`: every packet a new flow, numbered from `start`.
pub const PKTGEN_UNIQUE: u32 = 1;
/// Destination ports the sender spreads flows over.
pub const PKTGEN_DST_PORTS: u32 = 64;

shared_layout! {
    /// How the generator turns one template frame into many flows: flow
    /// number f uses tenant prefix `f % tenants`, host and source port from
    /// the rest. It writes every header field a hop may change (MACs, TTL,
    /// addresses, ports), because live-frames mode hands back pages the
    /// gateway rewrote without restoring the template.
    pub struct PktgenConfig {
        pub mode: u32,
        /// Distinct flows in `PKTGEN_CYCLE` mode.
        pub flows: u32,
        /// Tenant prefixes the sources are spread over.
        pub tenants: u32,
        /// Hosts used in each prefix (at most 254).
        pub hosts: u32,
        /// First flow number in `PKTGEN_UNIQUE` mode.
        pub start: u32,
        /// Addresses from one tenant prefix to the next (host order).
        pub tenant_stride: u32,
        /// First tenant prefix, host order.
        pub src_base: u32,
        /// Lowest source port.
        pub port_base: u16,
        /// First UDP destination port, host order: flows spread over
        /// `PKTGEN_DST_PORTS` ports from here, so that a million flows of one
        /// tenant stay distinct after translation (one egress address has
        /// 64k source ports towards each destination port).
        pub dst_port: u16,
        /// Destination address, host order.
        pub dst_addr: u32,
        /// Ethernet addresses of every frame.
        pub eth_src: [u8; 6],
        pub eth_dst: [u8; 6],
        /// Nonzero: IPv6 frames. Tenant t's hosts are then
        /// `src_base_v6` with t added to bytes 4..6 (a /48 each) and the
        /// host number in the last bytes; the destination `dst_addr_v6`.
        pub ipv6: u32,
        pub src_base_v6: [u8; 16],
        pub dst_addr_v6: [u8; 16],
    }
}

/// `COUNTERS` of bench-ebpf: per-CPU.
pub const SINK_RECEIVED: u32 = 0;
/// Received with a source inside the egress range: translated.
pub const SINK_TRANSLATED: u32 = 1;
/// Frames the generator sent.
pub const PKTGEN_SENT: u32 = 2;
pub const BENCH_COUNTERS: u32 = 3;

shared_layout! {
    /// What the sink counts and what it lets through to its stack.
    pub struct SinkConfig {
        /// Egress range, host order: a received source inside it was translated.
        pub egress_net: u32,
        pub egress_mask: u32,
        /// UDP destination port of latency probes, passed to the stack.
        pub probe_port: u16,
        pub _pad: u16,
        /// IPv6 egress range: a /64, the first eight bytes of its addresses.
        pub egress_v6_prefix: [u8; 8],
    }
}

shared_layout! {
    /// The plain forwarder: every frame out of one interface, MACs set,
    /// no NAT. The ceiling of a veth topology.
    pub struct ForwardConfig {
        pub ifindex: u32,
        pub smac: [u8; 6],
        pub dmac: [u8; 6],
    }
}
