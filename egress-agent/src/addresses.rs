//! Egress addresses on the external interface.
//!
//! Each egress address is added as a /32, so the kernel answers ARP for it
//! without gaining a subnet route, and announced with a gratuitous ARP so
//! neighbours update caches at once. Addresses that were already there (a
//! Kube-OVN gateway pod's own external IP) are used but never removed: the
//! agent only takes away what it added.

use std::{
    io,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::Context as _;
use rtnetlink::{AddressMessageBuilder, Handle};

use crate::system::SystemView;

/// Adds the addresses `wanted` that `system` does not show on `ifindex`;
/// returns those it added. On error, the ones added so far are removed.
pub async fn add_missing(
    handle: &Handle,
    ifindex: u32,
    mac: Option<[u8; 6]>,
    wanted: &[Ipv4Addr],
    system: &SystemView,
) -> anyhow::Result<Vec<Ipv4Addr>> {
    let mut added = Vec::new();
    for addr in wanted {
        if system
            .addresses
            .iter()
            .any(|a| a.index == ifindex && a.addr == IpAddr::V4(*addr))
        {
            tracing::info!(%addr, "egress address already configured; leaving it to its owner");
            continue;
        }
        let result = handle
            .address()
            .add(ifindex, IpAddr::V4(*addr), 32)
            .execute()
            .await
            .with_context(|| format!("adding {addr}/32 to interface {ifindex}"));
        if let Err(err) = result {
            remove(handle, ifindex, &added).await;
            return Err(err);
        }
        tracing::info!(%addr, "egress address added");
        added.push(*addr);
        if let Some(mac) = mac
            && let Err(err) = announce(ifindex, mac, *addr)
        {
            tracing::warn!(%addr, error = %err, "gratuitous ARP failed; neighbours learn the address on their next ARP");
        }
    }
    Ok(added)
}

/// Removes addresses this agent added. Failures are logged: at shutdown
/// there is nothing better to do than to carry on removing the rest.
pub async fn remove(handle: &Handle, ifindex: u32, addrs: &[Ipv4Addr]) {
    for addr in addrs {
        let message = AddressMessageBuilder::<Ipv4Addr>::new()
            .index(ifindex)
            .address(*addr, 32)
            .build();
        match handle.address().del(message).execute().await {
            Ok(()) => tracing::info!(%addr, "egress address removed"),
            Err(err) => tracing::warn!(%addr, error = %err, "could not remove egress address"),
        }
    }
}

/// Sends a gratuitous ARP request (RFC 5227 "ARP announcement") for `addr`.
pub fn announce(ifindex: u32, mac: [u8; 6], addr: Ipv4Addr) -> io::Result<()> {
    const ETH_P_ARP: u16 = 0x0806;
    let mut frame = [0u8; 42];
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    // Hardware Ethernet, protocol IPv4, sizes 6 and 4, operation request.
    frame[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame[22..28].copy_from_slice(&mac);
    frame[28..32].copy_from_slice(&addr.octets());
    frame[38..42].copy_from_slice(&addr.octets());

    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
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
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
