//! A snapshot of the machine's links and addresses, read over rtnetlink.
//!
//! The resolver checks a plan against this snapshot instead of asking the
//! kernel piecemeal, so validation is a pure function tests can feed by hand.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::Context as _;
use futures::TryStreamExt as _;
use rtnetlink::{
    Handle,
    packet_route::{
        address::{AddressAttribute, AddressProtocol},
        link::{LinkAttribute, LinkInfo},
        route::{RouteAddress, RouteAttribute},
    },
};

use crate::addresses::PROTO_EGRESS;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkFacts {
    pub index: u32,
    pub name: String,
    /// Ethernet address, for links that have one.
    pub mac: Option<[u8; 6]>,
    /// `ip -d link` kind: "veth", "macvlan", ...; `None` for physical NICs.
    pub kind: Option<String>,
    /// The lower link of stacked devices (macvlan, vlan).
    pub parent: Option<u32>,
    /// `XDP_ACT_*` bits the kernel reports (Linux 6.3+); `None` otherwise.
    pub xdp_features: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressFacts {
    pub index: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
    /// Added by this agent (or the predecessor it adopts): marked with
    /// [`PROTO_EGRESS`] by the kernel (IFA_PROTO, Linux 6.1+), or listed in
    /// the instance's state file ([`SystemView::claim`]).
    pub egress_owned: bool,
}

/// A next hop the gateway itself routes through: the gateway of a route
/// (any table, multipath included) out of interface `index`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHopFacts {
    pub index: u32,
    pub via: Ipv4Addr,
    /// The route's destination, for messages (`default`, `10.0.0.0/8`).
    pub destination: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemView {
    pub links: Vec<LinkFacts>,
    pub addresses: Vec<AddressFacts>,
    pub next_hops: Vec<NextHopFacts>,
}

impl SystemView {
    pub async fn read(handle: &Handle) -> anyhow::Result<Self> {
        let mut links = Vec::new();
        let mut stream = handle.link().get().execute();
        while let Some(message) = stream.try_next().await.context("listing links")? {
            let mut facts = LinkFacts {
                index: message.header.index,
                name: String::new(),
                mac: None,
                kind: None,
                parent: None,
                xdp_features: None,
            };
            for attribute in message.attributes {
                match attribute {
                    LinkAttribute::IfName(name) => facts.name = name,
                    LinkAttribute::Address(bytes) => facts.mac = bytes.try_into().ok(),
                    LinkAttribute::Link(parent) => facts.parent = Some(parent),
                    LinkAttribute::LinkInfo(infos) => {
                        for info in infos {
                            if let LinkInfo::Kind(kind) = info {
                                facts.kind = Some(kind.to_string());
                            }
                        }
                    }
                    _ => {}
                }
            }
            // A kernel without the netdev family, or a refused query,
            // leaves the features unknown, which `auto` reads as "not XDP".
            facts.xdp_features = crate::hook_choice::xdp_features(facts.index).ok().flatten();
            links.push(facts);
        }
        let mut addresses = Vec::new();
        let mut stream = handle.address().get().execute();
        while let Some(message) = stream.try_next().await.context("listing addresses")? {
            let addr = message
                .attributes
                .iter()
                .find_map(|attribute| match attribute {
                    AddressAttribute::Local(addr) | AddressAttribute::Address(addr) => Some(*addr),
                    _ => None,
                });
            let marked = message.attributes.iter().any(|attribute| {
                matches!(attribute, AddressAttribute::Protocol(AddressProtocol::Other(p)) if *p == PROTO_EGRESS)
            });
            if let Some(addr) = addr {
                addresses.push(AddressFacts {
                    index: message.header.index,
                    addr,
                    prefix_len: message.header.prefix_len,
                    egress_owned: marked,
                });
            }
        }
        let next_hops = read_next_hops(handle).await?;
        Ok(Self {
            links,
            addresses,
            next_hops,
        })
    }

    /// Takes `addrs` on `ifindex` for the agent's own, as its state file
    /// says (kernels before 6.1 keep no IFA_PROTO mark).
    pub fn claim<A: Copy + Into<IpAddr>>(&mut self, ifindex: u32, addrs: &[A]) {
        let addrs: std::collections::HashSet<IpAddr> = addrs.iter().map(|a| (*a).into()).collect();
        for facts in &mut self.addresses {
            if facts.index == ifindex && addrs.contains(&facts.addr) {
                facts.egress_owned = true;
            }
        }
    }

    /// The addresses (both families) on `ifindex` that this agent added.
    pub fn owned_on(&self, ifindex: u32) -> Vec<IpAddr> {
        self.addresses
            .iter()
            .filter(|a| a.index == ifindex && a.egress_owned)
            .map(|a| a.addr)
            .collect()
    }

    pub fn link_by_name(&self, name: &str) -> Option<&LinkFacts> {
        self.links.iter().find(|link| link.name == name)
    }

    pub fn link_by_index(&self, index: u32) -> Option<&LinkFacts> {
        self.links.iter().find(|link| link.index == index)
    }
}

/// The gateways of every IPv4 route, in every table, with the interface
/// they are reached through.
async fn read_next_hops(handle: &Handle) -> anyhow::Result<Vec<NextHopFacts>> {
    let mut next_hops = Vec::new();
    let mut stream = handle
        .route()
        .get(rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(message) = stream.try_next().await.context("listing routes")? {
        let mut destination = None;
        let mut oif = None;
        let mut gateways = Vec::new();
        for attribute in &message.attributes {
            match attribute {
                RouteAttribute::Destination(RouteAddress::Inet(addr)) => destination = Some(*addr),
                RouteAttribute::Oif(index) => oif = Some(*index),
                RouteAttribute::Gateway(RouteAddress::Inet(via)) => gateways.push((None, *via)),
                RouteAttribute::MultiPath(hops) => {
                    for hop in hops {
                        for attribute in &hop.attributes {
                            if let RouteAttribute::Gateway(RouteAddress::Inet(via)) = attribute {
                                gateways.push((Some(hop.interface_index), *via));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        let destination = match destination {
            Some(addr) => format!("{addr}/{}", message.header.destination_prefix_length),
            None => "default".to_owned(),
        };
        for (index, via) in gateways {
            if let Some(index) = index.or(oif) {
                next_hops.push(NextHopFacts {
                    index,
                    via,
                    destination: destination.clone(),
                });
            }
        }
    }
    Ok(next_hops)
}
