//! Return routes: replies translated back to a tenant address must reach the
//! node that hosts it, so the gateway keeps one route per node pod CIDR via
//! that node's address (what the seeds' Python daemon did with `ip route`).
//! Both families: a dual-stack node has an IPv4 and an IPv6 pod CIDR, each
//! routed via the node's address of the same family.
//!
//! Routes the agent creates carry their own routing protocol number
//! ([`RTPROT_EGRESS`], shown as `proto 234` by `ip route`): that is how the
//! agent knows them for its own, so it never changes or removes a route it
//! did not create, even one to the same prefix.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Context as _;
use futures::TryStreamExt as _;
use ipnet::IpNet;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol},
    },
};

/// Marks routes this agent owns.
pub const RTPROT_EGRESS: u8 = 234;
const MAIN_TABLE: u8 = 254;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct ReturnRoute {
    pub destination: IpNet,
    /// Of the same family as `destination` (the configuration checks it).
    pub via: IpAddr,
    pub ifindex: u32,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RouteReport {
    pub added: Vec<ReturnRoute>,
    pub removed: Vec<ReturnRoute>,
    /// Wanted routes whose prefix another owner already routes: left alone.
    pub conflicts: Vec<ReturnRoute>,
}

/// One route of the main table, as far as this module cares.
#[derive(Debug, Clone)]
struct Existing {
    destination: IpNet,
    via: Option<IpAddr>,
    ifindex: Option<u32>,
    ours: bool,
    message: RouteMessage,
}

async fn main_table(handle: &Handle) -> anyhow::Result<Vec<Existing>> {
    let mut routes = Vec::new();
    for query in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut stream = handle.route().get(query).execute();
        while let Some(message) = stream.try_next().await.context("listing routes")? {
            if message.header.table != MAIN_TABLE {
                continue;
            }
            if let Some(existing) = existing(message) {
                routes.push(existing);
            }
        }
    }
    Ok(routes)
}

/// The parts of a route this module compares; `None` for a route without a
/// destination of its own family (multicast, MPLS and the like).
fn existing(message: RouteMessage) -> Option<Existing> {
    let mut destination = match message.header.address_family {
        AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    let (mut via, mut ifindex) = (None, None);
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(address) => destination = ip_of(address)?,
            RouteAttribute::Gateway(address) => via = ip_of(address),
            RouteAttribute::Oif(index) => ifindex = Some(*index),
            _ => {}
        }
    }
    let destination = IpNet::new(destination, message.header.destination_prefix_length).ok()?;
    Some(Existing {
        destination,
        via,
        ifindex,
        ours: message.header.protocol == RouteProtocol::Other(RTPROT_EGRESS),
        message,
    })
}

fn ip_of(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(addr) => Some(IpAddr::V4(*addr)),
        RouteAddress::Inet6(addr) => Some(IpAddr::V6(*addr)),
        _ => None,
    }
}

/// Makes the agent's routes exactly `wanted`: adds what is missing, moves
/// routes whose node changed address, removes what is no longer wanted.
pub async fn sync(handle: &Handle, wanted: &[ReturnRoute]) -> anyhow::Result<RouteReport> {
    let existing = main_table(handle).await?;
    let mut report = RouteReport::default();
    for route in wanted {
        let same_prefix: Vec<&Existing> = existing
            .iter()
            .filter(|e| e.destination == route.destination)
            .collect();
        if same_prefix.iter().any(|e| !e.ours) {
            report.conflicts.push(*route);
            continue;
        }
        let current = same_prefix
            .iter()
            .any(|e| e.via == Some(route.via) && e.ifindex == Some(route.ifindex));
        if current {
            continue;
        }
        let message = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(route.destination.addr(), route.destination.prefix_len())
            .and_then(|builder| builder.gateway(route.via))
            .with_context(|| format!("a route to {} via {}", route.destination, route.via))?
            .output_interface(route.ifindex)
            .protocol(RouteProtocol::Other(RTPROT_EGRESS))
            .build();
        handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .with_context(|| {
                format!("adding a route to {} via {}", route.destination, route.via)
            })?;
        report.added.push(*route);
    }
    for stale in existing
        .iter()
        .filter(|e| e.ours && !wanted.iter().any(|w| w.destination == e.destination))
    {
        delete(handle, stale).await?;
        report.removed.push(ReturnRoute {
            destination: stale.destination,
            via: stale.via.unwrap_or(match stale.destination {
                IpNet::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpNet::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            }),
            ifindex: stale.ifindex.unwrap_or(0),
        });
    }
    for route in &report.added {
        tracing::info!(destination = %route.destination, via = %route.via, "return route added");
    }
    for route in &report.removed {
        tracing::info!(destination = %route.destination, via = %route.via, "return route removed");
    }
    for route in &report.conflicts {
        tracing::warn!(
            destination = %route.destination,
            via = %route.via,
            "another route to this prefix exists and is not ours; left alone"
        );
    }
    Ok(report)
}

/// Removes every route this agent created.
pub async fn remove_all(handle: &Handle) -> anyhow::Result<usize> {
    Ok(sync(handle, &[]).await?.removed.len())
}

async fn delete(handle: &Handle, route: &Existing) -> anyhow::Result<()> {
    match handle.route().del(route.message.clone()).execute().await {
        Ok(()) => Ok(()),
        // Gone with its interface, or removed by hand: either way gone.
        Err(rtnetlink::Error::NetlinkError(err))
            if err.raw_code() == -libc::ESRCH || err.raw_code() == -libc::ENOENT =>
        {
            Ok(())
        }
        Err(err) => {
            Err(err).with_context(|| format!("removing the route to {}", route.destination))
        }
    }
}
