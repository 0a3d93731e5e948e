//! Sockets and timers for the sessions of `session::Sessions`.
//!
//! One socket per address family receives on 3784 (of the unspecified
//! address, or of one local address) for every peer of that family:
//! tokio's UdpSocket cannot return control messages, and the TTL or hop
//! limit (RFC 5881 §5) and the arrival interface are control messages, so
//! it is a nonblocking libc socket read with recvmsg under `AsyncFd`. Each
//! peer sends from its own socket, with TTL or hop limit 255, from a port
//! in 49152..=65535 (RFC 5881 §4), and bound to the peer's interface when
//! one is configured (an IPv6 link-local peer needs one). One task runs
//! all sessions; the table sits behind a mutex so that `snapshot` is a
//! short lock.

use std::{
    ffi::CString,
    io,
    mem::{size_of, size_of_val},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use rand::Rng as _;
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::UdpSocket,
    sync::{oneshot, watch},
    task::JoinHandle,
};

use super::{
    Health, PeerConfig, PeerStatus,
    packet::{CONTROL_PORT, ControlPacket, DropCounts, State},
    session::{Arrival, PeerKey, REQUIRED_TTL, Sessions},
};

/// RFC 5881 §4: the source port range of control packets.
const SOURCE_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;
/// AdminDown packets sent on shutdown, so one lost packet does not leave
/// the peer waiting out its detection time.
const GOODBYE_PACKETS: u32 = 3;
const GOODBYE_SPACING: Duration = Duration::from_millis(50);
/// Network control precedence (CS6), as routers send BFD.
const TOS_NETWORK_CONTROL: libc::c_int = 0xc0;
/// Larger than any control packet, authenticated ones included.
const RECEIVE_BUFFER: usize = 512;

/// Running BFD sessions with a set of peers.
///
/// Dropping it without `shutdown` stops it like `abort`.
#[derive(Debug)]
pub struct Bfd {
    sessions: Arc<Mutex<Sessions>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Bfd {
    /// Opens every socket in the network namespace of the calling thread
    /// (before the first await, so `block_on` from a thread inside a
    /// namespace is enough), then runs the sessions on a tokio task.
    /// Sessions start AdminDown while `health` says NotServing.
    pub async fn start(
        peers: Vec<PeerConfig>,
        health: watch::Receiver<Health>,
    ) -> anyhow::Result<Bfd> {
        Self::start_on(&[], peers, health).await
    }

    /// [`Bfd::start`], receiving only what is addressed to `listen` (a
    /// gateway pod answers on its own addresses, as Kube-OVN's bfdd does
    /// with `--listen`): per family its first address there, or every
    /// address of the family when it has none. Binding port 3784 needs
    /// CAP_NET_BIND_SERVICE and nothing else.
    pub async fn start_on(
        listen: &[IpAddr],
        peers: Vec<PeerConfig>,
        mut health: watch::Receiver<Health>,
    ) -> anyhow::Result<Bfd> {
        let mut keys = Vec::with_capacity(peers.len());
        let mut senders = Vec::with_capacity(peers.len());
        for peer in &peers {
            peer.validate()?;
            let duplicate = keys.iter().any(|(key, _): &(PeerKey, PeerConfig)| {
                key.address == peer.address && key.interface == peer.interface
            });
            if duplicate {
                bail!("BFD peer {} is configured twice", peer.address);
            }
            let ifindex = peer.interface.as_deref().map(interface_index).transpose()?;
            let local = local_of(listen, peer.address);
            let sender = sender_socket(local, peer.interface.as_deref())
                .with_context(|| format!("opening the BFD socket towards {}", peer.address))?;
            senders.push((
                UdpSocket::from_std(sender)?,
                destination(peer.address, ifindex)?,
            ));
            let key = PeerKey {
                address: peer.address,
                interface: peer.interface.clone(),
                ifindex,
            };
            keys.push((key, peer.clone()));
        }
        // IPv4 alone without peers, as before there were two families.
        let mut families: Vec<IpAddr> = Vec::new();
        for probe in [Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into()] {
            let wanted = peers
                .iter()
                .any(|p| p.address.is_ipv4() == IpAddr::is_ipv4(&probe));
            if wanted || (peers.is_empty() && IpAddr::is_ipv4(&probe)) {
                families.push(local_of(listen, probe));
            }
        }
        let mut receivers = Vec::with_capacity(families.len());
        for local in families {
            let socket = receive_socket(local).with_context(|| {
                format!(
                    "opening the BFD control port {}",
                    SocketAddr::new(local, CONTROL_PORT)
                )
            })?;
            receivers.push(register(socket)?);
        }
        let initial = *health.borrow_and_update();
        let sessions = Arc::new(Mutex::new(Sessions::new(
            keys,
            initial,
            rand::rng().random(),
            Instant::now(),
        )));
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(
            Arc::clone(&sessions),
            receivers,
            senders,
            health,
            stopped,
        ));
        Ok(Bfd {
            sessions,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Every session's state and counters, in the order of the peers.
    pub fn snapshot(&self) -> Vec<PeerStatus> {
        lock(&self.sessions).snapshot(Instant::now(), SystemTime::now())
    }

    /// Drops of datagrams that came from no configured peer.
    pub fn unmatched_drops(&self) -> DropCounts {
        lock(&self.sessions).unmatched_drops()
    }

    /// Tells every peer AdminDown (diag 7, `GOODBYE_PACKETS` times), then
    /// stops and closes the sockets.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take()
            && let Err(err) = task.await
        {
            tracing::warn!("BFD task ended abnormally: {err}");
        }
    }

    /// Stops at once, without telling the peers: they find out by their
    /// detection timers, as after a crash.
    pub fn abort(mut self) {
        self.abort_task();
    }

    fn abort_task(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for Bfd {
    fn drop(&mut self) {
        self.abort_task();
    }
}

fn lock(sessions: &Mutex<Sessions>) -> MutexGuard<'_, Sessions> {
    // The table stays consistent between calls, so a panic elsewhere does
    // not make it unusable.
    sessions.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn run(
    sessions: Arc<Mutex<Sessions>>,
    receivers: Vec<AsyncFd<OwnedFd>>,
    senders: Vec<(UdpSocket, SocketAddr)>,
    mut health: watch::Receiver<Health>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut logged: Vec<State> = Vec::new();
    let mut buffer = [0u8; RECEIVE_BUFFER];
    let mut health_open = true;
    loop {
        let deadline = {
            let mut table = lock(&sessions);
            table.tick(Instant::now(), |index, packet| {
                send(&senders, index, packet)
            });
            log_transitions(&table, &mut logged);
            table.next_deadline()
        };
        let wake = match deadline {
            Some(at) => tokio::time::Instant::from_std(at),
            None => tokio::time::Instant::now() + Duration::from_secs(3600),
        };
        tokio::select! {
            _ = &mut stop => break,
            readable = any_readable(&receivers) => {
                let mut guard = match readable {
                    Ok(guard) => guard,
                    Err(err) => {
                        tracing::error!("BFD receive socket failed: {err}");
                        break;
                    }
                };
                loop {
                    match guard.try_io(|fd| receive(fd.get_ref(), &mut buffer)) {
                        Ok(Ok((length, arrival))) => {
                            let payload = buffer.get(..length).unwrap_or(&[]);
                            if let Err(reason) = lock(&sessions).receive(payload, arrival, Instant::now()) {
                                tracing::debug!("BFD packet from {} dropped: {reason:?}", arrival.source);
                            }
                        }
                        Ok(Err(err)) => {
                            tracing::debug!("BFD receive: {err}");
                            break;
                        }
                        Err(_would_block) => break,
                    }
                }
            }
            changed = health.changed(), if health_open => match changed {
                Ok(()) => {
                    let now_serving = *health.borrow_and_update();
                    lock(&sessions).set_health(now_serving, Instant::now());
                }
                // The sender is gone: the last value stands.
                Err(_) => health_open = false,
            },
            () = tokio::time::sleep_until(wake) => {}
        }
    }
    for round in 0..GOODBYE_PACKETS {
        {
            let mut table = lock(&sessions);
            if round == 0 {
                table.begin_shutdown(Instant::now());
            } else {
                table.send_all_soon();
            }
            table.tick(Instant::now(), |index, packet| {
                send(&senders, index, packet)
            });
            log_transitions(&table, &mut logged);
        }
        if round + 1 < GOODBYE_PACKETS {
            tokio::time::sleep(GOODBYE_SPACING).await;
        }
    }
}

/// Waits until one of the receive sockets is readable.
async fn any_readable(
    receivers: &[AsyncFd<OwnedFd>],
) -> io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>> {
    let waits = receivers.iter().map(|r| Box::pin(r.readable()));
    match waits.len() {
        0 => std::future::pending().await,
        _ => futures::future::select_all(waits).await.0,
    }
}

/// Where a peer listens; a link-local IPv6 peer is reached through its
/// interface (configuration makes sure it has one).
fn destination(address: IpAddr, ifindex: Option<u32>) -> anyhow::Result<SocketAddr> {
    match address {
        IpAddr::V4(_) => Ok(SocketAddr::new(address, CONTROL_PORT)),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => {
            let Some(scope) = ifindex else {
                bail!("BFD peer {v6} is link-local: name the interface it is on");
            };
            Ok(SocketAddrV6::new(v6, CONTROL_PORT, 0, scope).into())
        }
        IpAddr::V6(v6) => Ok(SocketAddrV6::new(v6, CONTROL_PORT, 0, 0).into()),
    }
}

/// The address of `peer`'s family in `listen`, else that family's
/// unspecified address.
fn local_of(listen: &[IpAddr], peer: IpAddr) -> IpAddr {
    let unspecified = match peer {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    listen
        .iter()
        .copied()
        .find(|l| l.is_ipv4() == peer.is_ipv4())
        .unwrap_or(unspecified)
}

fn send(senders: &[(UdpSocket, SocketAddr)], index: usize, packet: &ControlPacket) {
    let Some((socket, peer)) = senders.get(index) else {
        return;
    };
    // A full socket buffer or a missing route loses this packet only; BFD
    // tolerates lost packets up to the detection multiplier.
    if let Err(err) = socket.try_send_to(&packet.encode(), *peer) {
        tracing::debug!("BFD send to {peer}: {err}");
    }
}

fn log_transitions(table: &Sessions, logged: &mut Vec<State>) {
    logged.resize(table.len(), State::Down);
    for (index, last) in logged.iter_mut().enumerate() {
        let (Some(peer), Some(session)) = (table.peer(index), table.session(index)) else {
            continue;
        };
        if session.state() != *last {
            tracing::info!(
                "BFD peer {}{}: {} -> {} (diag {:?})",
                peer.address,
                peer.interface
                    .as_deref()
                    .map(|i| format!(" on {i}"))
                    .unwrap_or_default(),
                last,
                session.state(),
                session.local_diag()
            );
            *last = session.state();
        }
    }
}

fn interface_index(name: &str) -> anyhow::Result<u32> {
    let c_name = CString::new(name).with_context(|| format!("interface name {name:?}"))?;
    // SAFETY: a valid NUL-terminated string that the call only reads.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        bail!("BFD interface {name}: {}", io::Error::last_os_error());
    }
    Ok(index)
}

fn udp_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn family_of(local: IpAddr) -> libc::c_int {
    match local {
        IpAddr::V4(_) => libc::AF_INET,
        IpAddr::V6(_) => libc::AF_INET6,
    }
}

fn set_option(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &[u8]) -> io::Result<()> {
    let length = libc::socklen_t::try_from(value.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: value is a live buffer of the given length.
    let rc =
        unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, value.as_ptr().cast(), length) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_int_option(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    set_option(fd, level, name, &value.to_ne_bytes())
}

fn bind(fd: &OwnedFd, local: IpAddr, port: u16) -> io::Result<()> {
    // SAFETY: all-zero is a valid sockaddr_storage, large enough for both
    // families; the family's fields are written below.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let length = match local {
        IpAddr::V4(v4) => {
            let address = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(v4).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage has room and alignment for it.
            unsafe {
                (&raw mut storage)
                    .cast::<libc::sockaddr_in>()
                    .write(address)
            };
            size_of::<libc::sockaddr_in>()
        }
        IpAddr::V6(v6) => {
            let address = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: port.to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage has room and alignment for it.
            unsafe {
                (&raw mut storage)
                    .cast::<libc::sockaddr_in6>()
                    .write(address)
            };
            size_of::<libc::sockaddr_in6>()
        }
    };
    // SAFETY: a fully initialised socket address and its exact size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const storage).cast(),
            length as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The shared receive socket on `local`:3784, reporting each datagram's
/// TTL and arrival interface. SO_REUSEADDR lets a restarted agent bind
/// while its predecessor's socket is still being torn down.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the descriptor, which stays open and the
    // same for as long as the AsyncFd lives.
    Ok(unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?)
}

fn receive_socket(local: IpAddr) -> io::Result<OwnedFd> {
    let fd = udp_socket(family_of(local))?;
    set_int_option(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if local.is_ipv4() {
        set_int_option(&fd, libc::IPPROTO_IP, libc::IP_RECVTTL, 1)?;
        set_int_option(&fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
    } else {
        // IPv4 has its own socket: no mapped addresses here.
        set_int_option(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
        set_int_option(&fd, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, 1)?;
        set_int_option(&fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
    }
    bind(&fd, local, CONTROL_PORT)?;
    Ok(fd)
}

/// A socket towards one peer: TTL or hop limit 255, from `local` (the peer
/// expects answers from the address it calls), a random port of the RFC
/// 5881 range, and bound to the peer's interface if it has one.
fn sender_socket(local: IpAddr, interface: Option<&str>) -> io::Result<std::net::UdpSocket> {
    let fd = udp_socket(family_of(local))?;
    let hops = libc::c_int::from(REQUIRED_TTL);
    if local.is_ipv4() {
        set_int_option(&fd, libc::IPPROTO_IP, libc::IP_TTL, hops)?;
        set_int_option(&fd, libc::IPPROTO_IP, libc::IP_TOS, TOS_NETWORK_CONTROL)?;
    } else {
        set_int_option(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
        set_int_option(&fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, hops)?;
        set_int_option(
            &fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_TCLASS,
            TOS_NETWORK_CONTROL,
        )?;
    }
    if let Some(interface) = interface {
        set_option(
            &fd,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            interface.as_bytes(),
        )?;
    }
    let mut rng = rand::rng();
    let mut last_error = io::Error::from(io::ErrorKind::AddrInUse);
    for _ in 0..64 {
        match bind(&fd, local, rng.random_range(SOURCE_PORTS)) {
            Ok(()) => return Ok(std::net::UdpSocket::from(fd)),
            Err(err) if err.kind() == io::ErrorKind::AddrInUse => last_error = err,
            Err(err) => return Err(err),
        }
    }
    Err(last_error)
}

/// One datagram from a receive socket, with where it came from.
fn receive(fd: &OwnedFd, buffer: &mut [u8]) -> io::Result<(usize, Arrival)> {
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 16];
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut source: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // SAFETY: all-zero is a valid msghdr; the pointers are set below.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_name = (&raw mut source).cast();
    header.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    header.msg_iov = &raw mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = size_of_val(&control) as _;
    // SAFETY: every pointer in header refers to a live local of the stated size.
    let received = unsafe { libc::recvmsg(fd.as_raw_fd(), &raw mut header, 0) };
    let length = usize::try_from(received).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: the kernel wrote a socket address of the family it names,
    // which the storage has room and alignment for.
    let source = unsafe {
        match i32::from(source.ss_family) {
            libc::AF_INET6 => {
                let v6 = (&raw const source).cast::<libc::sockaddr_in6>().read();
                IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr))
            }
            _ => {
                let v4 = (&raw const source).cast::<libc::sockaddr_in>().read();
                IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)))
            }
        }
    };
    let mut arrival = Arrival {
        source,
        ttl: None,
        ifindex: None,
    };
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of
    // well-formed cmsgs; CMSG_* walk within them, and the payloads are read
    // unaligned at the types the kernel documents for IP_TTL, IP_PKTINFO,
    // IPV6_HOPLIMIT and IPV6_PKTINFO.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const header);
        while !cmsg.is_null() {
            let data = libc::CMSG_DATA(cmsg);
            match ((*cmsg).cmsg_level, (*cmsg).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_TTL) | (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT) => {
                    let ttl = data.cast::<libc::c_int>().read_unaligned();
                    arrival.ttl = u8::try_from(ttl).ok();
                }
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info = data.cast::<libc::in_pktinfo>().read_unaligned();
                    arrival.ifindex = u32::try_from(info.ipi_ifindex).ok();
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info = data.cast::<libc::in6_pktinfo>().read_unaligned();
                    arrival.ifindex = Some(info.ipi6_ifindex);
                }
                _ => {}
            }
            cmsg = libc::CMSG_NXTHDR(&raw const header, cmsg);
        }
    }
    Ok((length.min(buffer.len()), arrival))
}
