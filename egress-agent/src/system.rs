//! A snapshot of the machine's links and addresses, read over rtnetlink.
//!
//! The resolver checks a plan against this snapshot instead of asking the
//! kernel piecemeal, so validation is a pure function tests can feed by hand.

use std::net::IpAddr;

use anyhow::Context as _;
use futures::TryStreamExt as _;
use rtnetlink::{
    Handle,
    packet_route::{
        address::AddressAttribute,
        link::{LinkAttribute, LinkInfo},
    },
};

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
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemView {
    pub links: Vec<LinkFacts>,
    pub addresses: Vec<AddressFacts>,
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
            if let Some(addr) = addr {
                addresses.push(AddressFacts {
                    index: message.header.index,
                    addr,
                    prefix_len: message.header.prefix_len,
                });
            }
        }
        Ok(Self { links, addresses })
    }

    pub fn link_by_name(&self, name: &str) -> Option<&LinkFacts> {
        self.links.iter().find(|link| link.name == name)
    }

    pub fn link_by_index(&self, index: u32) -> Option<&LinkFacts> {
        self.links.iter().find(|link| link.index == index)
    }

    /// The link an address is configured on, if any.
    pub fn holder_of(&self, addr: IpAddr) -> Option<&LinkFacts> {
        self.addresses
            .iter()
            .find(|a| a.addr == addr)
            .and_then(|a| self.link_by_index(a.index))
    }
}
