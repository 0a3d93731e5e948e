//! Macvlan next hops the agent creates (`ingress[].create`): what the
//! seeds' gateway-VM script did with `ip link add ... type macvlan mode
//! bridge`, a fixed MAC and a /32.
//!
//! Each one is made in two steps so it never answers ARP unisolated:
//! [`create`] adds it down (mode bridge, its MAC), the agent then sets its
//! ARP sysctls (they exist only once the link does), and [`activate`]
//! brings it up with its /32 and a gratuitous ARP. The agent records what
//! it created (name and ifindex) in the instance's state file: only those
//! it ever recreates or removes; a macvlan someone else made is used as it
//! is and left behind.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::Context as _;
use futures::TryStreamExt as _;
use rtnetlink::{Handle, LinkMacVlan, LinkUnspec, packet_route::link::MacVlanMode};
use serde::{Deserialize, Serialize};

use crate::{
    addresses,
    config::{MacvlanSpec, format_mac},
    system::SystemView,
};

/// A macvlan this agent created, as recorded in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    pub name: String,
    pub ifindex: u32,
    pub parent: u32,
    pub address: Ipv4Addr,
    pub mac: [u8; 6],
}

impl Created {
    /// Whether the link is still this one, made as `spec` asks: the same
    /// parent, MAC and address, in the snapshot too.
    pub fn is(&self, spec: &MacvlanSpec, system: &SystemView) -> bool {
        let as_asked = self.name == spec.name
            && self.parent == spec.parent.index
            && self.mac == spec.mac
            && self.address == spec.address;
        let link = system.link_by_index(self.ifindex);
        as_asked
            && link.is_some_and(|l| {
                l.name == self.name
                    && l.kind.as_deref() == Some("macvlan")
                    && l.parent == Some(self.parent)
                    && l.mac == Some(self.mac)
            })
            && system
                .addresses
                .iter()
                .any(|a| a.index == self.ifindex && a.addr == IpAddr::V4(self.address))
    }

    /// Whether the snapshot still has this link (by ifindex and name).
    pub fn exists(&self, system: &SystemView) -> bool {
        system
            .link_by_index(self.ifindex)
            .is_some_and(|l| l.name == self.name && l.kind.as_deref() == Some("macvlan"))
    }
}

/// Adds the macvlan down, in mode bridge, with its MAC; returns it with
/// its new ifindex. Fails if a link of that name appeared meanwhile.
pub async fn create(handle: &Handle, spec: &MacvlanSpec) -> anyhow::Result<Created> {
    let message = LinkMacVlan::new(&spec.name, spec.parent.index, MacVlanMode::Bridge)
        .address(spec.mac.to_vec())
        .down()
        .build();
    handle
        .link()
        .add(message)
        .execute()
        .await
        .with_context(|| {
            format!(
                "creating macvlan {} on {} with MAC {}",
                spec.name,
                spec.parent.name,
                format_mac(spec.mac)
            )
        })?;
    let ifindex = ifindex_of(handle, &spec.name).await?;
    tracing::info!(
        macvlan = %spec.name,
        parent = %spec.parent.name,
        mac = %format_mac(spec.mac),
        ifindex,
        "macvlan created"
    );
    Ok(Created {
        name: spec.name.clone(),
        ifindex,
        parent: spec.parent.index,
        address: spec.address,
        mac: spec.mac,
    })
}

async fn ifindex_of(handle: &Handle, name: &str) -> anyhow::Result<u32> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    let link = links
        .try_next()
        .await
        .with_context(|| format!("reading back {name}"))?
        .with_context(|| format!("{name} vanished once created"))?;
    Ok(link.header.index)
}

/// Brings a created macvlan up with its /32, and announces the address
/// with a gratuitous ARP, as the agent does for egress IPs.
pub async fn activate(handle: &Handle, created: &Created) -> anyhow::Result<()> {
    set_up(handle, created).await?;
    handle
        .address()
        .add(created.ifindex, IpAddr::V4(created.address), 32)
        .execute()
        .await
        .with_context(|| format!("adding {}/32 to {}", created.address, created.name))?;
    tracing::info!(macvlan = %created.name, address = %created.address, "next hop up");
    if let Err(err) = addresses::announce(created.ifindex, created.mac, created.address) {
        tracing::warn!(
            macvlan = %created.name,
            address = %created.address,
            error = %err,
            "gratuitous ARP failed; the router learns the next hop on its next ARP"
        );
    }
    Ok(())
}

/// Sets a created macvlan up (again: someone may have set it down).
pub async fn set_up(handle: &Handle, created: &Created) -> anyhow::Result<()> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(created.ifindex).up().build())
        .execute()
        .await
        .with_context(|| format!("setting {} up", created.name))
}

/// Removes macvlans this agent created. Failures are logged: at shutdown
/// there is nothing better to do than to carry on removing the rest. A
/// link whose ifindex now holds something else is left alone.
pub async fn remove(handle: &Handle, created: &[Created]) {
    for macvlan in created {
        let current = handle
            .link()
            .get()
            .match_index(macvlan.ifindex)
            .execute()
            .try_next()
            .await;
        let still_ours = match current {
            Ok(Some(link)) => link.attributes.iter().any(|a| {
                matches!(a, rtnetlink::packet_route::link::LinkAttribute::IfName(name)
                    if *name == macvlan.name)
            }),
            // ENODEV: gone already, with everything on it.
            _ => false,
        };
        if !still_ours {
            tracing::info!(macvlan = %macvlan.name, "created macvlan already gone");
            continue;
        }
        match handle.link().del(macvlan.ifindex).execute().await {
            Ok(()) => tracing::info!(macvlan = %macvlan.name, "macvlan removed"),
            Err(err) => {
                tracing::warn!(macvlan = %macvlan.name, error = %err, "could not remove macvlan");
            }
        }
    }
}
