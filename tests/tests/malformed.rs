//! Malformed and random input on the real programs (BPF_PROG_TEST_RUN).
//!
//! Every frame must get a defined verdict, no frame may be forwarded with a
//! tenant source (or translated back anywhere but to a tenant host), the
//! conntrack table must never hold half a flow, and every packet must be
//! counted under exactly one verdict. Needs root.

use std::net::{Ipv4Addr, SocketAddrV4};

use egress_common::counters::Counter;
use egress_tests::{
    frames::{self, ETH_LEN, Tcp, View},
    harness::{self, Harness, Outcome, XDP_DROP, XDP_PASS, XDP_REDIRECT},
    require_root,
};
use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};

const HOST_A: Ipv4Addr = Ipv4Addr::new(172, 20, 10, 10);
const HOST_B: Ipv4Addr = Ipv4Addr::new(172, 20, 20, 10);
const EGRESS_A: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 101);
const EGRESS_B: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 150);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn is_egress(ip: Ipv4Addr) -> bool {
    ip == EGRESS_A || ip == EGRESS_B
}

fn is_tenant(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    (a, b) == (172, 20) && (c == 10 || c == 20)
}

fn header_checksum_ok(frame: &[u8]) -> bool {
    let header_len = usize::from(frame[ETH_LEN] & 0x0f) * 4;
    frame.len() >= ETH_LEN + header_len
        && frames::internet_checksum(&frame[ETH_LEN..ETH_LEN + header_len]) == 0
}

/// The invariants every outbound verdict must keep.
#[track_caller]
fn check_outbound(input: &[u8], out: &Outcome, context: &str) {
    assert!(
        matches!(out.action, XDP_DROP | XDP_PASS | XDP_REDIRECT),
        "{context}: undefined verdict {}",
        out.action
    );
    let changed = out.frame != input;
    if out.action == XDP_REDIRECT || changed {
        let view = View::new(&out.frame);
        assert!(
            is_egress(view.src()),
            "{context}: left with source {} ({out:?})",
            view.src()
        );
        assert!(
            header_checksum_ok(&out.frame),
            "{context}: forwarded a bad IPv4 header"
        );
    }
}

#[track_caller]
fn check_reply(input: &[u8], out: &Outcome, context: &str) {
    assert!(
        matches!(out.action, XDP_DROP | XDP_PASS | XDP_REDIRECT),
        "{context}: undefined verdict {}",
        out.action
    );
    if out.action == XDP_REDIRECT || out.frame != input {
        let view = View::new(&out.frame);
        assert!(
            is_tenant(view.dst()),
            "{context}: translated back to {}",
            view.dst()
        );
        assert!(
            header_checksum_ok(&out.frame),
            "{context}: forwarded a bad IPv4 header"
        );
    }
}

/// Sum of one direction's verdict counters (`out_new_flow` is extra).
fn verdicts(h: &Harness, prefix: &str) -> u64 {
    h.maps
        .counters()
        .expect("counters")
        .into_iter()
        .filter(|(c, _)| c.name().starts_with(prefix) && *c != Counter::OutNewFlow)
        .map(|(_, v)| v)
        .sum()
}

fn set_ip_byte(frame: &[u8], offset: usize, value: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[ETH_LEN + offset] = value;
    f
}

/// Sets an IPv4 header byte and repairs the header checksum, so the frame
/// is refused for the inconsistency itself.
fn set_ip_byte_valid(frame: &[u8], offset: usize, value: u8) -> Vec<u8> {
    let mut f = set_ip_byte(frame, offset, value);
    let header_len = (usize::from(f[ETH_LEN] & 0x0f) * 4).clamp(20, f.len() - ETH_LEN);
    f[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&[0, 0]);
    let check = frames::internet_checksum(&f[ETH_LEN..ETH_LEN + header_len]);
    f[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&check.to_be_bytes());
    f
}

fn set_total_len(frame: &[u8], len: u16) -> Vec<u8> {
    let f = set_ip_byte_valid(frame, 2, (len >> 8) as u8);
    set_ip_byte_valid(&f, 3, len as u8)
}

#[test]
fn malformed_frames_get_a_defined_verdict_and_leave_nothing_behind() {
    if !require_root() {
        return;
    }
    let h = Harness::new();
    let udp = frames::udp(sock(HOST_A, 1000), sock(REMOTE, 53), b"payload");
    let tcp = frames::tcp(sock(HOST_A, 1001), sock(REMOTE, 80), Tcp::Syn, b"");
    let ip_len = udp.len() - ETH_LEN;
    let sent = frames::ip_packet(
        &h.outbound(&frames::udp(sock(HOST_A, 1002), sock(REMOTE, 53), b"x"))
            .frame,
    )
    .to_vec();

    let cases: Vec<(&str, Vec<u8>, u32, Counter)> = vec![
        (
            "Ethernet header only",
            udp[..ETH_LEN].to_vec(),
            XDP_DROP,
            Counter::OutDropMalformed,
        ),
        (
            "IPv4 header cut short",
            udp[..ETH_LEN + 12].to_vec(),
            XDP_DROP,
            Counter::OutDropMalformed,
        ),
        (
            "IHL below 5",
            set_ip_byte_valid(&udp, 0, 0x44),
            XDP_DROP,
            Counter::OutDropMalformed,
        ),
        (
            "IHL beyond the frame",
            set_ip_byte(&udp, 0, 0x4f),
            XDP_DROP,
            Counter::OutDropMalformed,
        ),
        (
            "version 6 in an IPv4 frame",
            set_ip_byte_valid(&udp, 0, 0x65),
            XDP_DROP,
            Counter::OutDropMalformed,
        ),
        (
            "total length beyond the frame",
            set_total_len(&udp, ip_len as u16 + 40),
            XDP_DROP,
            Counter::OutDropMalformed,
        ),
        (
            "total length below the header",
            set_total_len(&udp, 12),
            XDP_DROP,
            Counter::OutDropMalformed,
        ),
        (
            "bad IPv4 header checksum",
            set_ip_byte(&udp, 10, udp[ETH_LEN + 10] ^ 0xff),
            XDP_DROP,
            Counter::OutDropMalformed,
        ),
        (
            "TCP header cut short",
            set_total_len(&tcp[..ETH_LEN + 30], 30)[..ETH_LEN + 30].to_vec(),
            XDP_DROP,
            Counter::OutDropMalformed,
        ),
        (
            "TCP data offset below 5",
            {
                let mut f = tcp.clone();
                f[ETH_LEN + 20 + 12] = 0x40;
                f
            },
            XDP_DROP,
            Counter::OutDropMalformed,
        ),
        (
            "TCP data offset beyond the packet",
            {
                let mut f = tcp.clone();
                f[ETH_LEN + 20 + 12] = 0xf0;
                f
            },
            XDP_DROP,
            Counter::OutDropMalformed,
        ),
        (
            "UDP header cut short",
            set_total_len(&udp, 24),
            XDP_DROP,
            Counter::OutDropMalformed,
        ),
        (
            "UDP length beyond the packet",
            {
                let mut f = udp.clone();
                f[ETH_LEN + 24..ETH_LEN + 26].copy_from_slice(&200u16.to_be_bytes());
                f
            },
            XDP_DROP,
            Counter::OutDropMalformed,
        ),
        (
            "UDP length below its header",
            {
                let mut f = udp.clone();
                f[ETH_LEN + 24..ETH_LEN + 26].copy_from_slice(&4u16.to_be_bytes());
                f
            },
            XDP_DROP,
            Counter::OutDropMalformed,
        ),
        (
            "ICMP header cut short",
            set_total_len(&frames::echo_request(HOST_A, REMOTE, 1, 1), 24),
            XDP_DROP,
            Counter::OutDropMalformed,
        ),
        (
            "ICMP error whose quote stops inside the IP header",
            frames::icmp_error(HOST_A, REMOTE, frames::PORT_UNREACHABLE, [0; 4], &sent, 12),
            XDP_DROP,
            Counter::OutDropMalformed,
        ),
        (
            "ICMP error whose quote stops inside the ports",
            frames::icmp_error(HOST_A, REMOTE, frames::PORT_UNREACHABLE, [0; 4], &sent, 22),
            XDP_DROP,
            Counter::OutDropMalformed,
        ),
        (
            "TCP RST without a flow",
            frames::tcp(sock(HOST_A, 1003), sock(REMOTE, 80), Tcp::Rst, b""),
            XDP_DROP,
            Counter::OutDropInvalid,
        ),
        (
            "GRE",
            set_ip_byte_valid(&udp, 9, 47),
            XDP_DROP,
            Counter::OutDropUnsupported,
        ),
        (
            "Ethernet padding after the packet",
            {
                let mut f = udp.clone();
                f.extend_from_slice(&[0; 18]);
                f
            },
            XDP_REDIRECT,
            Counter::OutTranslated,
        ),
        (
            "UDP without payload",
            frames::udp(sock(HOST_A, 1004), sock(REMOTE, 53), b""),
            XDP_REDIRECT,
            Counter::OutTranslated,
        ),
    ];
    for (what, frame, verdict, counter) in cases {
        let before = h.counter(counter);
        let Some(out) = h.try_outbound(&frame) else {
            continue;
        };
        check_outbound(&frame, &out, what);
        assert_eq!(out.action, verdict, "{what}");
        assert_eq!(
            h.counter(counter),
            before + 1,
            "{what}: counted as {counter:?}"
        );
        h.assert_no_half_entries();
    }

    // The same kinds of damage on the external side, to an egress address.
    let reply = frames::udp(sock(REMOTE, 53), sock(EGRESS_A, 20000), b"answer");
    let quote =
        frames::ip_packet(&frames::udp(sock(EGRESS_A, 20000), sock(REMOTE, 53), b"q")).to_vec();
    let cases: Vec<(&str, Vec<u8>, Counter)> = vec![
        (
            "IHL below 5",
            set_ip_byte_valid(&reply, 0, 0x44),
            Counter::InDropMalformed,
        ),
        (
            "total length beyond the frame",
            set_total_len(&reply, 300),
            Counter::InDropMalformed,
        ),
        (
            "bad IPv4 header checksum",
            set_ip_byte(&reply, 10, reply[ETH_LEN + 10] ^ 0xff),
            Counter::InDropMalformed,
        ),
        (
            "UDP header cut short",
            set_total_len(&reply, 24),
            Counter::InDropMalformed,
        ),
        (
            "ICMP error quoting a cut IP header",
            frames::icmp_error(
                REMOTE,
                EGRESS_A,
                frames::PORT_UNREACHABLE,
                [0; 4],
                &quote,
                10,
            ),
            Counter::InDropMalformed,
        ),
        (
            "ICMP error quoting IHL below 5",
            {
                let mut q = quote.clone();
                q[0] = 0x44;
                frames::icmp_error(REMOTE, EGRESS_A, frames::PORT_UNREACHABLE, [0; 4], &q, 28)
            },
            Counter::InDropMalformed,
        ),
        (
            "ICMP error about no flow",
            frames::icmp_error(
                REMOTE,
                EGRESS_A,
                frames::PORT_UNREACHABLE,
                [0; 4],
                &quote,
                28,
            ),
            Counter::InDropNoFlow,
        ),
    ];
    for (what, frame, counter) in cases {
        let before = h.counter(counter);
        let Some(out) = h.try_reply(&frame) else {
            continue;
        };
        check_reply(&frame, &out, what);
        assert_eq!(out.action, XDP_DROP, "{what}");
        assert_eq!(
            h.counter(counter),
            before + 1,
            "{what}: counted as {counter:?}"
        );
    }
    h.assert_no_half_entries();
}

/// A flow the fuzzer opened, as the outside sees it.
#[derive(Clone, Copy)]
struct Opened {
    proto: u8,
    remote: SocketAddrV4,
    egress: SocketAddrV4,
}

impl Opened {
    /// A reply (or an ICMP error about the translated packet), then maybe
    /// mutated by the caller.
    fn reply(&self, rng: &mut StdRng) -> Vec<u8> {
        match (self.proto, rng.random_range(0..3)) {
            (_, 0) => {
                let quoted = match self.proto {
                    6 => frames::tcp(self.egress, self.remote, Tcp::Syn, b""),
                    17 => frames::udp(self.egress, self.remote, b"q"),
                    _ => frames::echo_request(
                        *self.egress.ip(),
                        *self.remote.ip(),
                        self.egress.port(),
                        1,
                    ),
                };
                frames::icmp_error(
                    *self.remote.ip(),
                    *self.egress.ip(),
                    frames::FRAG_NEEDED,
                    [0, 0, 5, 0xdc],
                    frames::ip_packet(&quoted),
                    28,
                )
            }
            (6, _) => frames::tcp(self.remote, self.egress, Tcp::SynAck, b"data"),
            (17, _) => frames::udp(self.remote, self.egress, b"answer"),
            _ => frames::echo_reply(*self.remote.ip(), *self.egress.ip(), self.egress.port(), 1),
        }
    }
}

/// A random frame: valid templates from a pool of addresses, then mutated.
fn random_frame(rng: &mut StdRng, known_ports: &[u16], opened: &[Opened]) -> (bool, Vec<u8>) {
    let hosts = [
        HOST_A,
        HOST_B,
        Ipv4Addr::new(172, 20, 30, 10),
        REMOTE,
        EGRESS_A,
        EGRESS_B,
        Ipv4Addr::new(203, 0, 113, 5),
        Ipv4Addr::new(198, 18, 0, 9),
    ];
    let pick = |rng: &mut StdRng| hosts[rng.random_range(0..hosts.len())];
    let port = |rng: &mut StdRng| {
        if !known_ports.is_empty() && rng.random_bool(0.5) {
            known_ports[rng.random_range(0..known_ports.len())]
        } else {
            rng.random_range(1..65535)
        }
    };
    let outbound = rng.random_bool(0.5);
    let (src, dst) = if outbound {
        ([HOST_A, HOST_B][rng.random_range(0..2)], pick(rng))
    } else {
        (pick(rng), [EGRESS_A, EGRESS_B][rng.random_range(0..2)])
    };
    let payload: Vec<u8> = (0..rng.random_range(0..700))
        .map(|_| rng.random())
        .collect();
    let (s, d) = (sock(src, port(rng)), sock(dst, port(rng)));
    let mut frame = match rng.random_range(0..7) {
        _ if !outbound && !opened.is_empty() && rng.random_bool(0.5) => {
            opened[rng.random_range(0..opened.len())].reply(rng)
        }
        0 => frames::tcp(
            s,
            d,
            [Tcp::Syn, Tcp::SynAck, Tcp::Ack, Tcp::FinAck, Tcp::Rst][rng.random_range(0..5)],
            &payload,
        ),
        1 | 2 => frames::udp(s, d, &payload),
        3 => frames::echo_request(src, dst, port(rng), 1),
        4 => frames::echo_reply(src, dst, port(rng), 1),
        5 => {
            let quoted = frames::udp(d, s, &payload[..payload.len().min(40)]);
            let kind = [
                frames::PORT_UNREACHABLE,
                frames::FRAG_NEEDED,
                frames::TTL_EXCEEDED,
            ][rng.random_range(0..3)];
            frames::icmp_error(
                src,
                dst,
                kind,
                [0, 0, 5, 0xdc],
                frames::ip_packet(&quoted),
                rng.random_range(0..80),
            )
        }
        _ => {
            let whole = frames::udp(s, d, &[7; 300]);
            let (first, second) = frames::fragment(&whole, 160);
            if rng.random_bool(0.5) { first } else { second }
        }
    };
    let mutations = if rng.random_bool(0.3) {
        0
    } else {
        rng.random_range(1..5)
    };
    for _ in 0..mutations {
        let len = frame.len();
        match rng.random_range(0..7) {
            0 => {
                let at = rng.random_range(0..len);
                frame[at] ^= 1 << rng.random_range(0..8);
            }
            1 => {
                let at = rng.random_range(ETH_LEN.min(len - 1)..len);
                frame[at] = rng.random();
            }
            2 => frame.truncate(rng.random_range(ETH_LEN..=len)),
            3 => frame.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>())),
            4 if len > ETH_LEN + 20 => {
                frame = set_ip_byte_valid(&frame, rng.random_range(0..20), rng.random())
            }
            5 if len > ETH_LEN + 20 => {
                frame = set_ip_byte_valid(&frame, 0, 0x40 | rng.random_range(0..16))
            }
            _ if len > ETH_LEN + 20 => {
                frame = set_ip_byte_valid(&frame, 6, rng.random::<u8>() & 0x3f)
            }
            _ => {}
        }
    }
    (outbound, frame)
}

#[test]
fn random_and_mutated_frames_keep_every_invariant() {
    if !require_root() {
        return;
    }
    let seed: u64 = std::env::var("EGRESS_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_e9e5);
    let count: usize = std::env::var("EGRESS_FUZZ_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    eprintln!(
        "fuzzing {count} frames with seed {seed} (EGRESS_FUZZ_SEED / EGRESS_FUZZ_FRAMES to change)"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    // A table the run cannot fill: under pressure the LRU evicts single
    // halves by design (the sweeper cleans those up, tested apart), and
    // this test is about what the programs themselves write.
    let h = Harness::with_config(&harness::CONFIG.replace("maxFlows: 4096", "maxFlows: 262144"));
    let (mut outbound_runs, mut reply_runs) = (0u64, 0u64);
    let mut nat_ports: Vec<u16> = Vec::new();
    let mut opened: Vec<Opened> = Vec::new();
    for i in 0..count {
        let (outbound, frame) = random_frame(&mut rng, &nat_ports, &opened);
        let context = format!("frame {i} of seed {seed}: {frame:02x?}");
        if outbound {
            let Some(out) = h.try_outbound(&frame) else {
                continue;
            };
            outbound_runs += 1;
            check_outbound(&frame, &out, &context);
            if out.action == XDP_REDIRECT {
                let view = View::new(&out.frame);
                let whole_l4 = view.fragment_offset() == 0 && view.payload().len() >= 8;
                let flow = match view.proto() {
                    6 | 17 if whole_l4 => Some((view.src_port(), view.dst_port())),
                    1 if whole_l4 && view.icmp_type() == 8 => Some((view.echo_id(), 0)),
                    _ => None,
                };
                if let Some((nat_port, remote_port)) = flow {
                    nat_ports.push(nat_port);
                    opened.push(Opened {
                        proto: view.proto(),
                        remote: sock(view.dst(), remote_port),
                        egress: sock(view.src(), nat_port),
                    });
                }
            }
        } else {
            let Some(out) = h.try_reply(&frame) else {
                continue;
            };
            reply_runs += 1;
            check_reply(&frame, &out, &context);
        }
        // Run the TC programs on the same frame: defined verdicts only, and
        // the guard lets a forwarded frame out only with an egress source.
        let Ok(guard) = h.try_tc("leak_guard", &frame, h.internal) else {
            continue;
        };
        assert!(
            guard == 0 || guard == 2,
            "{context}: leak_guard returned {guard}"
        );
        if guard == 0 {
            assert!(
                frame.len() >= ETH_LEN + 20 && is_egress(View::new(&frame).src()),
                "{context}: guard let it out"
            );
        }
        if i % 1000 == 0 {
            h.assert_no_half_entries();
        }
    }
    h.assert_no_half_entries();
    assert_eq!(
        verdicts(&h, "out_"),
        outbound_runs,
        "every outbound frame counted exactly once"
    );
    assert_eq!(
        verdicts(&h, "in_"),
        reply_runs,
        "every reply frame counted exactly once"
    );
    assert!(
        h.counter(Counter::OutTranslated) > 100,
        "the fuzzer should also hit the translation path"
    );
    assert!(
        h.counter(Counter::InTranslated) > 10,
        "the fuzzer should also hit the reply path"
    );
    eprintln!(
        "{outbound_runs} outbound, {reply_runs} reply frames; {} flows; translated {} out, {} back",
        h.flow_count(),
        h.counter(Counter::OutTranslated),
        h.counter(Counter::InTranslated)
    );
}

#[test]
fn random_bytes_get_defined_verdicts() {
    if !require_root() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(7);
    let h = Harness::new();
    for i in 0..5000 {
        let mut frame = vec![0u8; rng.random_range(ETH_LEN..200)];
        rng.fill_bytes(&mut frame);
        if i % 2 == 0 {
            frame[12..14].copy_from_slice(&[0x08, 0x00]);
        }
        let context = format!("random frame {i}: {frame:02x?}");
        if let Some(out) = h.try_outbound(&frame) {
            check_outbound(&frame, &out, &context);
        }
        if let Some(out) = h.try_reply(&frame) {
            check_reply(&frame, &out, &context);
        }
    }
    h.assert_no_half_entries();
}
