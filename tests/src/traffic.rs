//! Real traffic for the tests and the demo: servers that record who talked
//! to them, clients, and a capture of everything an interface receives.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::Netns;

/// A server thread inside a namespace that records the peer of every
/// request. It stops when dropped.
pub struct Server {
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers").clone()
    }

    /// The IPv6 peers, for the servers of dual-stack tests.
    pub fn peer_ips_v6(&self) -> Vec<Ipv6Addr> {
        self.peers()
            .into_iter()
            .filter_map(|p| match p.ip() {
                IpAddr::V6(ip) => Some(ip),
                IpAddr::V4(_) => None,
            })
            .collect()
    }

    pub fn peer_ips(&self) -> Vec<Ipv4Addr> {
        self.peers()
            .into_iter()
            .filter_map(|p| match p.ip() {
                std::net::IpAddr::V4(ip) => Some(ip),
                std::net::IpAddr::V6(_) => None,
            })
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An HTTP/1.1 server that answers every GET with the address it saw:
/// the "log" of the partner's web server.
pub fn http_server(ns: &Netns, addr: impl Into<SocketAddr>) -> Server {
    let addr: SocketAddr = addr.into();
    let peers = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = {
        let (peers, stop) = (peers.clone(), stop.clone());
        ns.enter(move || {
            let listener = TcpListener::bind(addr).expect("binding the HTTP server");
            listener.set_nonblocking(true).expect("nonblocking");
            ready_tx.send(()).expect("ready");
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        stream.set_nonblocking(false).expect("blocking");
                        stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
                        let mut request = [0u8; 1024];
                        let n = stream.read(&mut request).unwrap_or(0);
                        if request[..n].starts_with(b"GET ") {
                            peers.lock().expect("peers").push(peer);
                            let body = format!("you are {}\n", peer.ip());
                            let _ = write!(
                                stream,
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            );
                        }
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(err) => panic!("accept: {err}"),
                }
            }
        })
    };
    ready_rx.recv().expect("HTTP server ready");
    Server {
        peers,
        stop,
        thread: Some(thread),
    }
}

/// `curl` from inside a namespace; the body on success.
pub fn curl(ns: &Netns, url: &str) -> Result<String, String> {
    let out = ns.try_run("curl", &["-sS", "--max-time", "5", url]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A UDP server that echoes every datagram back and records its sender.
pub fn udp_echo_server(ns: &Netns, addr: impl Into<SocketAddr>) -> Server {
    let addr: SocketAddr = addr.into();
    let peers = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = {
        let (peers, stop) = (peers.clone(), stop.clone());
        ns.enter(move || {
            let socket = UdpSocket::bind(addr).expect("binding the UDP server");
            socket
                .set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            ready_tx.send(()).expect("ready");
            // Room for the largest datagram: fragments' tests send 4000 bytes.
            let mut buf = vec![0u8; 65_536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                    peers.lock().expect("peers").push(peer);
                    let _ = socket.send_to(&buf[..n], peer);
                }
            }
        })
    };
    ready_rx.recv().expect("UDP server ready");
    Server {
        peers,
        stop,
        thread: Some(thread),
    }
}

/// Sends one datagram from `ns` (from `local_port` if given) and waits for
/// the answer.
pub fn udp_request(
    ns: &Netns,
    local_port: u16,
    to: impl Into<SocketAddr>,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let payload = payload.to_vec();
    let to: SocketAddr = to.into();
    ns.within(move || {
        let unspecified = if to.is_ipv6() {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        let socket = UdpSocket::bind(SocketAddr::new(unspecified, local_port)).expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        socket.send_to(&payload, to).expect("send");
        let mut buf = vec![0u8; 65_536];
        socket.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
    })
}

/// Sends one UDP datagram of `len` bytes from `ns` with DF set
/// (`IP_PMTUDISC_DO`), as path-MTU discovery sends. `Err` is what the
/// kernel said, e.g. EMSGSIZE once it knows a smaller path MTU.
pub fn udp_send_df(ns: &Netns, to: SocketAddrV4, len: usize) -> std::io::Result<usize> {
    ns.within(move || {
        use std::os::fd::AsRawFd as _;
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        let mode: libc::c_int = libc::IP_PMTUDISC_DO;
        // SAFETY: setsockopt with a correctly sized int option.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                (&raw const mode).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        socket.send_to(&vec![0x5a; len], to)
    })
}

/// `ping -c count` from inside a namespace; true if every echo came back.
pub fn ping(ns: &Netns, dst: impl Into<IpAddr>, count: u32) -> bool {
    let dst: IpAddr = dst.into();
    ns.try_run(
        "ping",
        &[
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "2",
            "-n",
            &dst.to_string(),
        ],
    )
    .status
    .success()
}

/// An IPv4 packet seen by a capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    /// The IPv4 total length: above the MTU for a GSO super-packet, which
    /// the capture sees whole, as the kernel hands it over.
    pub len: u16,
    /// Sent by this host rather than received.
    pub outgoing: bool,
}

/// Every IPv4 packet an interface receives or sends, from an AF_PACKET
/// socket: what a tcpdump on the partner's side would show.
pub struct Capture {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Capture {
    pub fn start(ns: &Netns, interface: &str) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let interface = interface.to_owned();
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            ns.enter(move || {
                let socket = PacketSocket::bind(&interface);
                ready_tx.send(()).expect("ready");
                // Room for a whole GSO super-packet: a truncated one would
                // fail to parse and go unseen.
                let mut buf = vec![0u8; CAPTURE_BUFFER];
                while !stop.load(Ordering::Relaxed) {
                    if let Some((n, outgoing)) = socket.recv(&mut buf)
                        && let Some(packet) = parse_ipv4(&buf[..n], outgoing)
                    {
                        seen.lock().expect("seen").push(packet);
                    }
                }
            })
        };
        ready_rx.recv().expect("capture ready");
        Self {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops capturing and returns what was seen.
    pub fn finish(mut self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.seen.lock().expect("seen").clone()
    }

    pub fn snapshot(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An Ethernet header and the largest IPv4 packet (a GSO super-packet
/// reaches 64 KiB), with room to spare.
const CAPTURE_BUFFER: usize = 1 << 17;

fn parse_ipv4(frame: &[u8], outgoing: bool) -> Option<Seen> {
    let ip = etherparse::SlicedPacket::from_ethernet(frame).ok()?;
    match ip.net? {
        etherparse::NetSlice::Ipv4(v4) => {
            let header = v4.header();
            Some(Seen {
                src: header.source_addr(),
                dst: header.destination_addr(),
                proto: header.protocol().0,
                len: header.total_len(),
                outgoing,
            })
        }
        _ => None,
    }
}

struct PacketSocket {
    fd: std::os::fd::OwnedFd,
}

impl PacketSocket {
    fn bind(interface: &str) -> Self {
        use std::os::fd::{AsRawFd as _, FromRawFd as _};
        const ETH_P_ALL: u16 = 0x0003;
        // SAFETY: plain socket/bind/setsockopt calls with checked results.
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from(ETH_P_ALL.to_be()),
            );
            assert!(
                fd >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
            let name = std::ffi::CString::new(interface).expect("name");
            let ifindex = libc::if_nametoindex(name.as_ptr());
            assert!(ifindex != 0, "no interface {interface}");
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = ETH_P_ALL.to_be();
            addr.sll_ifindex = ifindex as i32;
            let rc = libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            );
            assert!(rc == 0, "bind: {}", std::io::Error::last_os_error());
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as u32,
            );
            Self { fd }
        }
    }

    /// One frame and whether this host sent it.
    fn recv(&self, buf: &mut [u8]) -> Option<(usize, bool)> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: buffer and address are valid for the lengths given.
        unsafe {
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            let mut len = size_of::<libc::sockaddr_ll>() as u32;
            let n = libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut addr).cast(),
                &raw mut len,
            );
            (n > 0).then_some((n as usize, addr.sll_pkttype == libc::PACKET_OUTGOING))
        }
    }
}

/// A transfer making no progress this long has failed (a black hole).
const STALL: Duration = Duration::from_secs(30);

/// The byte at `offset` of a bulk transfer: a pattern that a dropped,
/// duplicated or reordered segment would break.
fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(31) % 251) as u8
}

/// What the receiving end of a bulk transfer saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub bytes: u64,
    /// Every byte matched the pattern at its offset.
    pub intact: bool,
}

fn receive_all(stream: &mut std::net::TcpStream) -> std::io::Result<Received> {
    let mut buf = vec![0u8; 1 << 16];
    let mut offset = 0u64;
    let mut intact = true;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(Received {
                bytes: offset,
                intact,
            });
        }
        for (i, byte) in buf[..n].iter().enumerate() {
            intact &= *byte == pattern(offset + i as u64);
        }
        offset += n as u64;
    }
}

fn send_all(stream: &mut std::net::TcpStream, bytes: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    let mut offset = 0u64;
    while offset < bytes {
        let n = (bytes - offset).min(buf.len() as u64) as usize;
        for (i, byte) in buf[..n].iter_mut().enumerate() {
            *byte = pattern(offset + i as u64);
        }
        stream.write_all(&buf[..n])?;
        offset += n as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)
}

/// Sends `bytes` over one TCP connection from `client` to `server_addr`
/// (a listener in `server`), or the other way when `download`. The receiver
/// checks every byte, and the sender hears back what arrived: an error or
/// reset anywhere fails the transfer.
pub fn bulk_transfer(
    client: &Netns,
    server: &Netns,
    server_addr: impl Into<SocketAddr>,
    bytes: u64,
    download: bool,
) -> Result<Received, String> {
    let server_addr: SocketAddr = server_addr.into();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let serving = server.enter(move || -> std::io::Result<Option<Received>> {
        let listener = TcpListener::bind(server_addr)?;
        ready_tx.send(()).expect("ready");
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(STALL))?;
        stream.set_write_timeout(Some(STALL))?;
        if download {
            send_all(&mut stream, bytes)?;
            Ok(None)
        } else {
            let received = receive_all(&mut stream)?;
            stream.write_all(&received.bytes.to_be_bytes())?;
            stream.write_all(&[u8::from(received.intact)])?;
            Ok(Some(received))
        }
    });
    ready_rx
        .recv()
        .map_err(|_| "server did not start".to_owned())?;
    let client_side = client.within(move || -> std::io::Result<Received> {
        let mut stream =
            std::net::TcpStream::connect_timeout(&server_addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(STALL))?;
        stream.set_write_timeout(Some(STALL))?;
        if download {
            receive_all(&mut stream)
        } else {
            send_all(&mut stream, bytes)?;
            let mut answer = [0u8; 9];
            stream.read_exact(&mut answer)?;
            let count = u64::from_be_bytes(answer[..8].try_into().expect("8 bytes"));
            Ok(Received {
                bytes: count,
                intact: answer[8] == 1,
            })
        }
    });
    let server_side = serving
        .join()
        .map_err(|_| "server thread panicked".to_owned())?;
    let received = client_side.map_err(|e| format!("client: {e}"))?;
    server_side.map_err(|e| format!("server: {e}"))?;
    Ok(received)
}
