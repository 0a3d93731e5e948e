//! Egress addresses on the external interface.
//!
//! Each egress address is added as a /32, so the kernel answers ARP for it
//! without gaining a subnet route, and announced with a gratuitous ARP so
//! neighbours update caches at once. The agent only takes away what it
//! added. It knows which those are from two records: the kernel's, since
//! every address it adds carries the address protocol [`PROTO_EGRESS`]
//! (IFA_PROTO, Linux 6.1+; iproute2 6.2+ shows `proto 234`), which survives
//! a SIGKILL at any moment, even halfway through adding ten thousand; and
//! its own, the instance's state file, for kernels that ignore the
//! attribute. Any other address of the external interface is the
//! gateway's own, which the validator refuses as an egress IP.
//!
//! Ten thousand tenants mean ten thousand addresses, so nothing here costs
//! a round trip or a sleep per address: requests are pipelined on the one
//! rtnetlink connection ([`IN_FLIGHT`] awaiting their acknowledgement),
//! the announcements go out afterwards through one packet socket (closing
//! a packet socket waits for an RCU grace period, 10-15 ms: one socket per
//! address made a 10,000-tenant start take 140 s), and each batch ends in
//! one log line, whatever its size.

use std::{
    collections::HashSet,
    fmt::Write as _,
    io,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use futures::StreamExt as _;
use rtnetlink::{
    AddressMessageBuilder, Handle,
    packet_route::address::{AddressAttribute, AddressProtocol},
};

use crate::{config::LinkRef, stop::Stop, system::SystemView};

/// IFA_PROTO of the addresses this agent adds (the number its return
/// routes carry as their routing protocol).
pub const PROTO_EGRESS: u8 = crate::routes::RTPROT_EGRESS;

/// Requests awaiting their acknowledgement at once. The kernel handles a
/// request inside the `sendmsg` that carries it and queues the answer on
/// the socket; more than the receive buffer holds (about 200 KiB, some 300
/// answers) would be dropped and their requests never answered.
const IN_FLIGHT: usize = 64;

/// Between two looks at the stop flag.
const BATCH: usize = 256;

/// Addresses listed in full in a log line; more are counted.
const LISTED: usize = 8;

/// Adds the addresses of `wanted` that `system` does not show on `link`,
/// recording each in `owned` (this agent's addresses) once the kernel
/// confirmed it, and announces them. `owned` addresses already there are
/// this agent's and pass silently; others already there are someone
/// else's and are left to them. On an error the addresses this call
/// added are removed again (and no longer in `owned`); on a stop they
/// stay recorded, for the caller's undo.
pub async fn add_missing(
    handle: &Handle,
    link: &LinkRef,
    mac: Option<[u8; 6]>,
    wanted: &[Ipv4Addr],
    owned: &mut Vec<Ipv4Addr>,
    system: &SystemView,
    stop: &Stop,
) -> anyhow::Result<()> {
    let present: HashSet<Ipv4Addr> = system
        .addresses
        .iter()
        .filter(|a| a.index == link.index)
        .filter_map(|a| match a.addr {
            IpAddr::V4(addr) => Some(addr),
            IpAddr::V6(_) => None,
        })
        .collect();
    let ours: HashSet<Ipv4Addr> = owned.iter().copied().collect();
    let mut theirs: Vec<Ipv4Addr> = wanted
        .iter()
        .copied()
        .filter(|a| present.contains(a) && !ours.contains(a))
        .collect();
    let missing: Vec<Ipv4Addr> = wanted
        .iter()
        .copied()
        .filter(|a| !present.contains(a))
        .collect();

    let before = owned.len();
    let mut failure = None;
    for batch in missing.chunks(BATCH) {
        if let Err(interrupted) = stop.check() {
            failure = Some(anyhow::Error::from(interrupted));
            break;
        }
        let results: Vec<(Ipv4Addr, Result<(), rtnetlink::Error>)> =
            futures::stream::iter(batch.iter().copied())
                .map(|addr| async move { (addr, add_one(handle, link.index, addr).await) })
                .buffer_unordered(IN_FLIGHT)
                .collect()
                .await;
        for (addr, result) in results {
            match result {
                Ok(()) => owned.push(addr),
                // Someone added it since the snapshot.
                Err(err) if errno(&err) == Some(libc::EEXIST) => theirs.push(addr),
                Err(err) => {
                    failure.get_or_insert_with(|| {
                        anyhow::Error::from(err)
                            .context(format!("adding {addr}/32 to {}", link.name))
                    });
                }
            }
        }
        if failure.is_some() {
            break;
        }
    }
    let added = owned[before..].to_vec();
    if let Some(err) = failure {
        if !crate::stop::is_interrupted(&err) {
            tracing::error!(
                "adding egress addresses on {} failed after {}; removing those",
                link.name,
                added.len()
            );
            remove(handle, link, &added).await;
            owned.truncate(before);
        } else if !added.is_empty() {
            tracing::info!(
                "added {} on {} before the stop",
                counted(&added, "egress address"),
                link.name
            );
        }
        return Err(err);
    }
    if !added.is_empty() {
        tracing::info!(
            "added {} on {}",
            counted(&added, "egress address"),
            link.name
        );
    }
    if !theirs.is_empty() {
        theirs.sort_unstable();
        tracing::warn!(
            "{} already configured on {} by someone else: used, never removed",
            counted(&theirs, "egress address"),
            link.name
        );
    }
    if let Some(mac) = mac
        && !added.is_empty()
    {
        let ifindex = link.index;
        // Off the runtime: a busy NIC may make the socket wait for room.
        let announced =
            tokio::task::spawn_blocking(move || announce_all(ifindex, mac, &added)).await;
        match announced {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(
                error = %err,
                "gratuitous ARP failed; neighbours learn the addresses on their next ARP"
            ),
            Err(err) => tracing::warn!(error = %err, "gratuitous ARP task failed"),
        }
    }
    Ok(())
}

async fn add_one(handle: &Handle, ifindex: u32, addr: Ipv4Addr) -> Result<(), rtnetlink::Error> {
    let mut request = handle.address().add(ifindex, IpAddr::V4(addr), 32);
    // Ignored by kernels before 6.1, which keep no protocol.
    request
        .message_mut()
        .attributes
        .push(AddressAttribute::Protocol(AddressProtocol::Other(
            PROTO_EGRESS,
        )));
    request.execute().await
}

fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(message) => Some(-message.raw_code()),
        _ => None,
    }
}

/// Removes addresses this agent added. Failures are logged: at shutdown
/// there is nothing better to do than to carry on removing the rest.
pub async fn remove(handle: &Handle, link: &LinkRef, addrs: &[Ipv4Addr]) {
    if addrs.is_empty() {
        return;
    }
    let results: Vec<(Ipv4Addr, Result<(), rtnetlink::Error>)> =
        futures::stream::iter(addrs.iter().copied())
            .map(|addr| async move {
                let message = AddressMessageBuilder::<Ipv4Addr>::new()
                    .index(link.index)
                    .address(addr, 32)
                    .build();
                (addr, handle.address().del(message).execute().await)
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
    let mut removed = Vec::new();
    let mut gone = Vec::new();
    let mut failed = Vec::new();
    for (addr, result) in results {
        match result {
            Ok(()) => removed.push(addr),
            Err(err) if errno(&err) == Some(libc::EADDRNOTAVAIL) => gone.push(addr),
            Err(err) => failed.push((addr, err)),
        }
    }
    if !removed.is_empty() {
        removed.sort_unstable();
        tracing::info!(
            "removed {} from {}",
            counted(&removed, "egress address"),
            link.name
        );
    }
    if !gone.is_empty() {
        gone.sort_unstable();
        tracing::info!(
            "{} no longer on {} (someone removed them)",
            counted(&gone, "egress address"),
            link.name
        );
    }
    if let Some((_, first)) = failed.first() {
        let addrs: Vec<Ipv4Addr> = failed.iter().map(|(addr, _)| *addr).collect();
        tracing::warn!(
            error = %first,
            "could not remove {} from {}",
            counted(&addrs, "egress address"),
            link.name
        );
    }
}

/// "1 egress address (a)", "3 egress addresses (a, b, c)", "9998 egress
/// addresses (a, b, ... and 9990 more)": one line whatever the count.
pub fn counted(addrs: &[Ipv4Addr], noun: &str) -> String {
    let mut text = format!(
        "{} {noun}{}",
        addrs.len(),
        if addrs.len() == 1 { "" } else { "es" }
    );
    let listed: Vec<String> = addrs.iter().take(LISTED).map(ToString::to_string).collect();
    let _ = write!(text, " ({}", listed.join(", "));
    if addrs.len() > LISTED {
        let _ = write!(text, ", ... and {} more", addrs.len() - LISTED);
    }
    text.push(')');
    text
}

/// Sends a gratuitous ARP request (RFC 5227 "ARP announcement") for `addr`.
pub fn announce(ifindex: u32, mac: [u8; 6], addr: Ipv4Addr) -> io::Result<()> {
    announce_all(ifindex, mac, &[addr])
}

/// Announces each of `addrs` through one packet socket. The socket is
/// opened with protocol 0, so it receives nothing (no tap on every frame
/// of the machine while it is open); the frames name their protocol.
pub fn announce_all(ifindex: u32, mac: [u8; 6], addrs: &[Ipv4Addr]) -> io::Result<()> {
    const ETH_P_ARP: u16 = 0x0806;
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid sockaddr_ll; the fields that matter are set below.
    let mut target: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    target.sll_family = libc::AF_PACKET as u16;
    target.sll_protocol = ETH_P_ARP.to_be();
    target.sll_ifindex = ifindex as i32;
    target.sll_halen = 6;
    target.sll_addr[..6].copy_from_slice(&[0xff; 6]);

    let mut frame = [0u8; 42];
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    // Hardware Ethernet, protocol IPv4, sizes 6 and 4, operation request.
    frame[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame[22..28].copy_from_slice(&mac);
    let mut first_error = None;
    for addr in addrs {
        frame[28..32].copy_from_slice(&addr.octets());
        frame[38..42].copy_from_slice(&addr.octets());
        // SAFETY: buffer and address are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const target).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent < 0 {
            first_error.get_or_insert_with(io::Error::last_os_error);
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u32) -> Vec<Ipv4Addr> {
        (1..=n).map(|i| Ipv4Addr::from(0x0a00_0000 + i)).collect()
    }

    #[test]
    fn few_addresses_are_listed_and_many_are_counted() {
        assert_eq!(
            counted(&addrs(1), "egress address"),
            "1 egress address (10.0.0.1)"
        );
        assert_eq!(
            counted(&addrs(2), "egress address"),
            "2 egress addresses (10.0.0.1, 10.0.0.2)"
        );
        let many = counted(&addrs(9998), "egress address");
        assert!(
            many.starts_with("9998 egress addresses (10.0.0.1, 10.0.0.2,"),
            "{many}"
        );
        assert!(many.ends_with("10.0.0.8, ... and 9990 more)"), "{many}");
    }
}
