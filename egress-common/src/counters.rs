//! What the dataplane did with each packet, counted per CPU by reason.
//!
//! Every verdict a program returns is counted under exactly one of these, so
//! the sum over a program's counters is the number of packets it saw.

/// Index into the per-CPU `COUNTERS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Outbound: translated and redirected to the external interface.
    OutTranslated = 0,
    /// Outbound: a new flow was created (also counted as translated or fallback).
    OutNewFlow,
    /// Outbound: an ICMP error from a tenant host about a reply, translated (inner header included) and forwarded.
    OutIcmpErrorTranslated,
    /// Outbound: a later fragment translated by its first fragment's memory.
    OutFragmentTranslated,
    /// Outbound: neither IPv4 nor IPv6 (ARP, LLDP, VLAN-tagged...), left
    /// to the kernel.
    OutPassNotIp,
    /// Outbound: not routed out of the external interface (to the gateway
    /// itself or another internal network), left to the kernel untranslated.
    OutPassNotEgress,
    /// Outbound: TTL (IPv6: hop limit) would expire here; the kernel
    /// answers time-exceeded.
    OutPassTtlExceeded,
    /// Outbound: too big for the external MTU with DF set (IPv6: always);
    /// the kernel answers fragmentation-needed (IPv6: packet too big).
    OutPassFragNeeded,
    /// Outbound: translated, but the next hop's MAC is unknown; handed to the
    /// TC fallback, which resolves it through the kernel.
    OutPassNeighFallback,
    /// Outbound: the source belongs to no tenant and the packet would leave
    /// through the external interface.
    OutDropUnclassified,
    /// Outbound: every port of the chosen egress address is in use towards
    /// this destination.
    OutDropPortsExhausted,
    /// Outbound: the tenant has no egress address.
    OutDropNoEgressAddr,
    /// Outbound: truncated or inconsistent headers.
    OutDropMalformed,
    /// Outbound: a protocol or packet kind the NAT cannot translate
    /// (fragments, IP options, ICMP other than echo, ...).
    OutDropUnsupported,
    /// Outbound: too big for the external MTU without DF (would need
    /// fragmenting).
    OutDropTooBig,
    /// Outbound: the conntrack map refused an entry.
    OutDropConntrackFull,
    /// Outbound: a packet that cannot start a flow (TCP RST without one).
    OutDropInvalid,
    /// Outbound: a later fragment whose first fragment was never seen.
    OutDropFragmentUnknown,
    /// Reply: translated back and redirected to the tenant host.
    InTranslated,
    /// Reply: an ICMP error about a translated packet, translated back (inner header included).
    InIcmpErrorTranslated,
    /// Reply: a later fragment translated by its first fragment's memory.
    InFragmentTranslated,
    /// Reply: neither IPv4 nor IPv6 (ARP, LLDP, VLAN-tagged...), left to
    /// the kernel.
    InPassNotIp,
    /// Reply: not addressed to an egress address, left to the kernel.
    InPassNotEgress,
    /// Reply: translated back, next hop MAC unknown; the kernel forwards it.
    InPassNeighFallback,
    /// Reply: addressed to an egress address but matching no flow.
    InDropNoFlow,
    /// Reply: truncated or inconsistent headers.
    InDropMalformed,
    /// Reply: a packet kind the NAT cannot translate back.
    InDropUnsupported,
    /// Reply: TTL would expire here (answering would reveal the tenant host).
    InDropTtlExceeded,
    /// Reply: too big for the internal MTU.
    InDropTooBig,
    /// Reply: no usable route to the tenant host, or one leading outside.
    InDropNoRoute,
    /// Reply: a later fragment whose first fragment was never seen.
    InDropFragmentUnknown,
    /// TC: a translated packet was handed to the kernel's neighbour resolution.
    TcNeighRedirected,
    /// TC: a translated packet could not be routed out of the external interface.
    TcNeighDropped,
    /// TC: a forwarded packet tried to leave with a source that is not an
    /// egress address, and was dropped.
    TcLeakBlocked,
    /// Outbound (TC): translated, next hop's MAC unknown; sent through the
    /// kernel's neighbour resolution (`bpf_redirect_neigh`).
    OutNeighRedirected,
    /// Reply (TC): translated back, next hop's MAC unknown; sent through the
    /// kernel's neighbour resolution.
    InNeighRedirected,
    /// Outbound: the tenant holds as many flows as its quota allows; its
    /// new flow is refused (established flows of every tenant go on).
    OutDropTenantQuota,
    /// Outbound: the tenant opens new flows faster than its configured rate.
    OutDropTenantRate,
    /// Reply: from outside, addressed to an internal network (a tenant host,
    /// not an egress address): the gateway is not a way in.
    InDropToInternal,
    /// A new flow's creation event found the ring buffer full; the flow
    /// was created, its record is missing from the translation log.
    EventsLost,
    /// Reply: a port forward or floating IP opened a flow from outside
    /// (also counted as translated).
    InNewFlow,
    /// Reply: a port forward's new flow found the conntrack table full.
    InDropConntrackFull,
    /// Reply: a port forward's host already has a flow with that tuple.
    InDropForwardBusy,
    /// Reply: a port forward's new flow was refused by its tenant's quota
    /// or rate.
    InDropTenantLimit,
    /// A packet of a routed source (`routedSources`, never translated)
    /// passed: out through the leak guard, or in towards it.
    RoutedPassed,
    /// Outbound: IPv6 traffic of the link itself (Neighbor Discovery, MLD,
    /// link-local or multicast addresses), left to the kernel.
    OutPassLinkControl,
    /// Reply: IPv6 traffic of the link itself, left to the kernel.
    InPassLinkControl,
    /// Outbound: an IPv6 extension-header chain longer than the dataplane
    /// walks (`MAX_EXT_HEADERS`).
    OutDropExtHeaders,
    /// Reply: an IPv6 extension-header chain longer than the dataplane walks.
    InDropExtHeaders,
    /// Outbound: an IPv6 frame, and the IPv6 program was not loaded (the
    /// tail call failed); left to the kernel, whose forwarding the leak
    /// guard keeps from letting tenant sources out.
    OutPassIpv6Unserved,
    /// Reply: an IPv6 frame, and the IPv6 program was not loaded.
    InPassIpv6Unserved,
    /// Outbound: an IPv6 tenant packet opening a flow, and the new-flow
    /// program was not loaded: dropped (a tenant source never leaves
    /// untranslated).
    OutDropIpv6Unserved,
}

/// Number of counters; the size of the `COUNTERS` array.
pub const COUNTER_COUNT: u32 = Counter::OutDropIpv6Unserved as u32 + 1;

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::OutTranslated,
        Counter::OutNewFlow,
        Counter::OutIcmpErrorTranslated,
        Counter::OutFragmentTranslated,
        Counter::OutPassNotIp,
        Counter::OutPassNotEgress,
        Counter::OutPassTtlExceeded,
        Counter::OutPassFragNeeded,
        Counter::OutPassNeighFallback,
        Counter::OutDropUnclassified,
        Counter::OutDropPortsExhausted,
        Counter::OutDropNoEgressAddr,
        Counter::OutDropMalformed,
        Counter::OutDropUnsupported,
        Counter::OutDropTooBig,
        Counter::OutDropConntrackFull,
        Counter::OutDropInvalid,
        Counter::OutDropFragmentUnknown,
        Counter::InTranslated,
        Counter::InIcmpErrorTranslated,
        Counter::InFragmentTranslated,
        Counter::InPassNotIp,
        Counter::InPassNotEgress,
        Counter::InPassNeighFallback,
        Counter::InDropNoFlow,
        Counter::InDropMalformed,
        Counter::InDropUnsupported,
        Counter::InDropTtlExceeded,
        Counter::InDropTooBig,
        Counter::InDropNoRoute,
        Counter::InDropFragmentUnknown,
        Counter::TcNeighRedirected,
        Counter::TcNeighDropped,
        Counter::TcLeakBlocked,
        Counter::OutNeighRedirected,
        Counter::InNeighRedirected,
        Counter::OutDropTenantQuota,
        Counter::OutDropTenantRate,
        Counter::InDropToInternal,
        Counter::EventsLost,
        Counter::InNewFlow,
        Counter::InDropConntrackFull,
        Counter::InDropForwardBusy,
        Counter::InDropTenantLimit,
        Counter::RoutedPassed,
        Counter::OutPassLinkControl,
        Counter::InPassLinkControl,
        Counter::OutDropExtHeaders,
        Counter::InDropExtHeaders,
        Counter::OutPassIpv6Unserved,
        Counter::InPassIpv6Unserved,
        Counter::OutDropIpv6Unserved,
    ];

    /// Stable snake_case name, used in metrics and the CLI.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Counter::OutTranslated => "out_translated",
            Counter::OutFragmentTranslated => "out_fragment_translated",
            Counter::OutIcmpErrorTranslated => "out_icmp_error_translated",
            Counter::OutNewFlow => "out_new_flow",
            Counter::OutPassNotIp => "out_pass_not_ip",
            Counter::OutPassNotEgress => "out_pass_not_egress",
            Counter::OutPassTtlExceeded => "out_pass_ttl_exceeded",
            Counter::OutPassFragNeeded => "out_pass_frag_needed",
            Counter::OutPassNeighFallback => "out_pass_neigh_fallback",
            Counter::OutDropUnclassified => "out_drop_unclassified",
            Counter::OutDropPortsExhausted => "out_drop_ports_exhausted",
            Counter::OutDropNoEgressAddr => "out_drop_no_egress_addr",
            Counter::OutDropMalformed => "out_drop_malformed",
            Counter::OutDropUnsupported => "out_drop_unsupported",
            Counter::OutDropTooBig => "out_drop_too_big",
            Counter::OutDropConntrackFull => "out_drop_conntrack_full",
            Counter::OutDropFragmentUnknown => "out_drop_fragment_unknown",
            Counter::OutDropInvalid => "out_drop_invalid",
            Counter::InFragmentTranslated => "in_fragment_translated",
            Counter::InIcmpErrorTranslated => "in_icmp_error_translated",
            Counter::InTranslated => "in_translated",
            Counter::InPassNotIp => "in_pass_not_ip",
            Counter::InPassNotEgress => "in_pass_not_egress",
            Counter::InPassNeighFallback => "in_pass_neigh_fallback",
            Counter::InDropNoFlow => "in_drop_no_flow",
            Counter::InDropMalformed => "in_drop_malformed",
            Counter::InDropUnsupported => "in_drop_unsupported",
            Counter::InDropTtlExceeded => "in_drop_ttl_exceeded",
            Counter::InDropTooBig => "in_drop_too_big",
            Counter::InDropFragmentUnknown => "in_drop_fragment_unknown",
            Counter::InDropNoRoute => "in_drop_no_route",
            Counter::TcNeighRedirected => "tc_neigh_redirected",
            Counter::TcNeighDropped => "tc_neigh_dropped",
            Counter::TcLeakBlocked => "tc_leak_blocked",
            Counter::OutNeighRedirected => "out_neigh_redirected",
            Counter::InNeighRedirected => "in_neigh_redirected",
            Counter::OutDropTenantQuota => "out_drop_tenant_quota",
            Counter::OutDropTenantRate => "out_drop_tenant_rate",
            Counter::InDropToInternal => "in_drop_to_internal",
            Counter::EventsLost => "events_lost",
            Counter::InNewFlow => "in_new_flow",
            Counter::InDropConntrackFull => "in_drop_conntrack_full",
            Counter::InDropForwardBusy => "in_drop_forward_busy",
            Counter::InDropTenantLimit => "in_drop_tenant_limit",
            Counter::RoutedPassed => "routed_passed",
            Counter::OutPassLinkControl => "out_pass_link_control",
            Counter::InPassLinkControl => "in_pass_link_control",
            Counter::OutDropExtHeaders => "out_drop_ext_headers",
            Counter::InDropExtHeaders => "in_drop_ext_headers",
            Counter::OutPassIpv6Unserved => "out_pass_ipv6_unserved",
            Counter::InPassIpv6Unserved => "in_pass_ipv6_unserved",
            Counter::OutDropIpv6Unserved => "out_drop_ipv6_unserved",
        }
    }
}
