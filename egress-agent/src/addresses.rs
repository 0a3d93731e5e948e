//! Egress addresses on the external interface.
//!
//! Each egress address is added as a /32 (IPv6: a /128), so the kernel
//! answers ARP (neighbour solicitations) for it without gaining a subnet
//! route, and announced with a gratuitous ARP (an unsolicited Neighbor
//! Advertisement) so neighbours update caches at once. IPv6 addresses skip
//! duplicate address detection (`IFA_F_NODAD`): it would hold an address
//! tentative, unusable, for a second or more, and the validator already
//! refused addresses configured elsewhere on this machine. The agent only takes away what it
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
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use futures::StreamExt as _;
use rtnetlink::{
    AddressMessageBuilder, Handle,
    packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressProtocol},
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
    wanted: &[IpAddr],
    owned: &mut Vec<IpAddr>,
    system: &SystemView,
    stop: &Stop,
) -> anyhow::Result<()> {
    let present: HashSet<IpAddr> = system
        .addresses
        .iter()
        .filter(|a| a.index == link.index)
        .map(|a| a.addr)
        .collect();
    let ours: HashSet<IpAddr> = owned.iter().copied().collect();
    let mut theirs: Vec<IpAddr> = wanted
        .iter()
        .copied()
        .filter(|a| present.contains(a) && !ours.contains(a))
        .collect();
    let missing: Vec<IpAddr> = wanted
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
        let results: Vec<(IpAddr, Result<(), rtnetlink::Error>)> =
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
                        anyhow::Error::from(err).context(format!(
                            "adding {addr}/{} to {}",
                            host_prefix(addr),
                            link.name
                        ))
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
        let (v4, v6) = by_family(&added);
        let announced = tokio::task::spawn_blocking(move || {
            (
                announce_all(ifindex, mac, &v4),
                advertise_all(ifindex, mac, &v6),
            )
        })
        .await;
        match announced {
            Ok((arp, na)) => {
                if let Err(err) = arp {
                    tracing::warn!(
                        error = %err,
                        "gratuitous ARP failed; neighbours learn the addresses on their next ARP"
                    );
                }
                if let Err(err) = na {
                    tracing::warn!(
                        error = %err,
                        "unsolicited Neighbor Advertisement failed; neighbours learn the \
                         addresses on their next solicitation"
                    );
                }
            }
            Err(err) => tracing::warn!(error = %err, "address announcement task failed"),
        }
    }
    Ok(())
}

/// The prefix length of one address alone: 32 or 128.
fn host_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

/// The IPv4 and the IPv6 ones of `addrs`.
fn by_family(addrs: &[IpAddr]) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for addr in addrs {
        match addr {
            IpAddr::V4(addr) => v4.push(*addr),
            IpAddr::V6(addr) => v6.push(*addr),
        }
    }
    (v4, v6)
}

async fn add_one(handle: &Handle, ifindex: u32, addr: IpAddr) -> Result<(), rtnetlink::Error> {
    let mut request = handle.address().add(ifindex, addr, host_prefix(addr));
    let message = request.message_mut();
    // Ignored by kernels before 6.1, which keep no protocol.
    message
        .attributes
        .push(AddressAttribute::Protocol(AddressProtocol::Other(
            PROTO_EGRESS,
        )));
    if addr.is_ipv6() {
        // Usable at once, not tentative while DAD runs. The header has the
        // flag's low byte; IFA_FLAGS, where present, is what the kernel reads.
        message.header.flags |= AddressHeaderFlags::Nodad;
        message
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
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
pub async fn remove(handle: &Handle, link: &LinkRef, addrs: &[IpAddr]) {
    if addrs.is_empty() {
        return;
    }
    let results: Vec<(IpAddr, Result<(), rtnetlink::Error>)> =
        futures::stream::iter(addrs.iter().copied())
            .map(|addr| async move {
                let message = match addr {
                    IpAddr::V4(addr) => AddressMessageBuilder::<Ipv4Addr>::new()
                        .index(link.index)
                        .address(addr, 32)
                        .build(),
                    IpAddr::V6(addr) => AddressMessageBuilder::<Ipv6Addr>::new()
                        .index(link.index)
                        .address(addr, 128)
                        .build(),
                };
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
        let addrs: Vec<IpAddr> = failed.iter().map(|(addr, _)| *addr).collect();
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
pub fn counted<A: ToString>(addrs: &[A], noun: &str) -> String {
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

/// The ICMPv6 message of an unsolicited Neighbor Advertisement for
/// `target` at `mac` (RFC 4861 4.4, 7.2.6): override set so neighbours
/// replace what they cached, solicited and router clear, and the target
/// link-layer address option. The checksum is left 0: the kernel fills it
/// in for raw ICMPv6 sockets.
pub fn neighbor_advertisement(target: Ipv6Addr, mac: [u8; 6]) -> [u8; 32] {
    const TYPE_NEIGHBOR_ADVERTISEMENT: u8 = 136;
    const FLAG_OVERRIDE: u8 = 0x20;
    const OPTION_TARGET_LINK_LAYER: u8 = 2;
    let mut message = [0u8; 32];
    message[0] = TYPE_NEIGHBOR_ADVERTISEMENT;
    message[4] = FLAG_OVERRIDE;
    message[8..24].copy_from_slice(&target.octets());
    // Option length counts 8-byte units.
    message[24..26].copy_from_slice(&[OPTION_TARGET_LINK_LAYER, 1]);
    message[26..32].copy_from_slice(&mac);
    message
}

/// Advertises each of `addrs` to all nodes (ff02::1) on `ifindex`, from
/// the address itself, through one raw ICMPv6 socket: the IPv6 gratuitous
/// ARP. Hop limit 255, or receivers discard it (RFC 4861 7.1.2). Raw
/// ICMPv6 rather than a packet socket like ARP: the kernel routes, fills
/// in the checksum and the IPv6 header, and `IPV6_PKTINFO` picks interface
/// and source per message. The addresses were added without DAD, so they
/// are usable as a source at once.
pub fn advertise_all(ifindex: u32, mac: [u8; 6], addrs: &[Ipv6Addr]) -> io::Result<()> {
    if addrs.is_empty() {
        return Ok(());
    }
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let hops: libc::c_int = 255;
    // SAFETY: the option value is a valid c_int of the length given.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_MULTICAST_HOPS,
            (&raw const hops).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    if set < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: all-zero is a valid sockaddr_in6; family and address are set below.
    let mut all_nodes: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    all_nodes.sin6_family = libc::AF_INET6 as u16;
    all_nodes.sin6_addr.s6_addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets();
    all_nodes.sin6_scope_id = ifindex;
    let mut first_error = None;
    for addr in addrs {
        let mut message = neighbor_advertisement(*addr, mac);
        if let Err(err) = send_from(&socket, &mut message, &all_nodes, *addr, ifindex) {
            first_error.get_or_insert(err);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Sends `message` to `to`, from `source` on `ifindex` (`IPV6_PKTINFO`).
fn send_from(
    socket: &OwnedFd,
    message: &mut [u8],
    to: &libc::sockaddr_in6,
    source: Ipv6Addr,
    ifindex: u32,
) -> io::Result<()> {
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 8];
    let info = libc::in6_pktinfo {
        ipi6_addr: libc::in6_addr {
            s6_addr: source.octets(),
        },
        ipi6_ifindex: ifindex,
    };
    let mut iov = libc::iovec {
        iov_base: message.as_mut_ptr().cast(),
        iov_len: message.len(),
    };
    // SAFETY: all-zero is a valid msghdr; every pointer set below outlives the call.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_name = (to as *const libc::sockaddr_in6).cast_mut().cast();
    header.msg_namelen = size_of::<libc::sockaddr_in6>() as u32;
    header.msg_iov = &raw mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as u32) } as usize;
    assert!(space <= size_of_val(&control), "control buffer too small");
    header.msg_controllen = space;
    // SAFETY: the control buffer holds one cmsghdr with an in6_pktinfo
    // (checked above); CMSG_FIRSTHDR and CMSG_DATA stay inside it.
    let sent = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&raw const header);
        (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
        (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::in6_pktinfo>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
        libc::sendmsg(socket.as_raw_fd(), &raw const header, 0)
    };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
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

    #[test]
    fn a_neighbor_advertisement_overrides_and_names_the_mac() {
        let target: Ipv6Addr = "2001:db8:31::101".parse().unwrap();
        let mac = [2, 0, 0, 0, 0, 0x31];
        let message = neighbor_advertisement(target, mac);
        assert_eq!(message[0], 136, "type: Neighbor Advertisement");
        assert_eq!(message[1], 0, "code");
        assert_eq!(&message[2..4], &[0, 0], "checksum: the kernel's");
        assert_eq!(message[4], 0x20, "override only: not solicited, no router");
        assert_eq!(&message[5..8], &[0, 0, 0]);
        assert_eq!(&message[8..24], &target.octets());
        assert_eq!(
            &message[24..26],
            &[2, 1],
            "target link-layer option, 8 bytes"
        );
        assert_eq!(&message[26..32], &mac);
    }

    #[test]
    fn addresses_split_by_family_and_count_in_either() {
        let addrs: Vec<IpAddr> = vec![
            "192.168.31.101".parse().unwrap(),
            "2001:db8:31::101".parse().unwrap(),
        ];
        let (v4, v6) = by_family(&addrs);
        assert_eq!(v4, [Ipv4Addr::new(192, 168, 31, 101)]);
        assert_eq!(v6, ["2001:db8:31::101".parse::<Ipv6Addr>().unwrap()]);
        assert_eq!(host_prefix(addrs[0]), 32);
        assert_eq!(host_prefix(addrs[1]), 128);
        assert_eq!(
            counted(&addrs, "egress address"),
            "2 egress addresses (192.168.31.101, 2001:db8:31::101)"
        );
    }
}
