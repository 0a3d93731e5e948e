//! An independent IPFIX collector: Debian's nfcapd listening on a free UDP
//! port of 127.0.0.1, writing into a private temporary directory, and
//! nfdump reading back what it stored. Dropping one kills nfcapd and
//! removes the directory, also when a test fails.
//!
//! nfcapd 1.7.1 keeps records in `nfcapd.current.<pid>` and writes them out
//! when it rotates the file or terminates (SIGTERM renames it to
//! `nfcapd.<YYYYMMDDhhmm>`). With `-E` it also prints every record it
//! decodes, which tells when the records sent have all been processed, so
//! it can be stopped without losing the ones still in its socket buffer.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{netns::unique_name, peers::require_program};

pub const NFCAPD: &str = "nfcapd";
pub const NFDUMP: &str = "nfdump";
pub const STDBUF: &str = "stdbuf";

/// One NAT event record as nfdump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatRecord {
    /// natEvent: 4 NAT44 session create, 5 NAT44 session delete.
    pub nat_event: u8,
    /// nfdump's name for it ("NAT44 session create").
    pub nat_event_name: String,
    pub protocol: u8,
    /// Pre-NAT source address and port. For ICMP, nfdump shows no ports:
    /// the port here is rebuilt from its ICMP type and code (see
    /// `icmp_source_port`).
    pub inside: SocketAddrV4,
    /// Post-NAT source address and port.
    pub outside: SocketAddrV4,
    /// Destination address and port; `None` when the record carried none
    /// (nfdump shows 0.0.0.0).
    pub destination: Option<SocketAddrV4>,
    /// ingressVRFID.
    pub vrf: u32,
    /// flowEndReason, 0 when absent.
    pub end_reason: u8,
    /// The whole record, for assertion messages.
    pub json: Value,
}

/// nfcapd run as our child in the foreground.
pub struct Nfcapd {
    child: Option<Child>,
    bind: Ipv4Addr,
    port: u16,
    dir: PathBuf,
    log: PathBuf,
    command_line: String,
}

impl Nfcapd {
    /// Starts nfcapd on a free port of 127.0.0.1 and waits until it listens.
    pub fn start() -> Self {
        Self::start_at(None, Ipv4Addr::LOCALHOST)
    }

    /// Starts nfcapd in `ns` (the caller's namespace when `None`) on a
    /// free port of `bind`, and waits until it listens.
    pub fn start_at(ns: Option<&crate::netns::Netns>, bind: Ipv4Addr) -> Self {
        require_program(NFCAPD, "nfdump");
        require_program(NFDUMP, "nfdump");
        require_program(STDBUF, "coreutils");
        let dir = std::env::temp_dir().join(unique_name("nfcapd"));
        std::fs::create_dir(&dir).expect("creating nfcapd's directory");
        let flows = dir.join("flows");
        std::fs::create_dir(&flows).expect("creating nfcapd's flow directory");
        let log = dir.join("nfcapd.log");
        // A port the kernel just handed out and we let go: nothing else
        // here binds ports at random on 127.0.0.1 in between.
        let port = UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("finding a free UDP port")
            .port();
        // Line-buffered: nfcapd prints with stdio, which would hold a few
        // records' worth back in its buffer until it exits.
        let mut command = match ns {
            Some(ns) => crate::netns::command_in(&ns.path(), STDBUF),
            None => Command::new(STDBUF),
        };
        command
            .arg("-oL")
            .arg(NFCAPD)
            .arg("-b")
            .arg(bind.to_string())
            .arg("-p")
            .arg(port.to_string())
            .arg("-w")
            .arg(&flows)
            // Rotation only when stopped (the interval is longer than any test).
            .arg("-t")
            .arg("3600")
            // Print each decoded record: how `records` knows they all arrived.
            .arg("-E")
            // No site configuration: only the options above.
            .arg("-C")
            .arg("none");
        let (child, command_line) = crate::peers::spawn_tied(command, &log);
        let pid = child.id();
        let mut nfcapd = Self {
            child: Some(child),
            bind,
            port,
            dir,
            log,
            command_line,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !udp_listening(pid, bind, port) {
            if let Some(status) = nfcapd.exited() {
                panic!(
                    "{} exited ({status}) before listening:\n{}",
                    nfcapd.command_line,
                    nfcapd.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} is not listening on {bind}:{port} after 10 s:\n{}",
                nfcapd.command_line,
                nfcapd.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nfcapd
    }

    /// Where to send IPFIX to.
    pub fn address(&self) -> SocketAddr {
        (self.bind, self.port).into()
    }

    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// What nfcapd printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Records nfcapd printed as it decoded them (`-E`).
    fn decoded(&self) -> usize {
        // 1.7.1 prints each record as a block opening with "Flow Record:".
        self.log().matches("Flow Record:").count()
    }

    /// Waits until nfcapd has decoded `expected` records (failing after
    /// 10 s), stops it so it writes its file, and returns every record
    /// nfdump reads from it.
    pub fn records(&mut self, expected: usize) -> Vec<NatRecord> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.decoded() < expected {
            assert!(
                Instant::now() < deadline,
                "nfcapd decoded {} of {expected} records in 10 s:\n{}",
                self.decoded(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        let file = self.flow_file();
        let stdout = nfdump(&file, "json");
        // 1.7.1's JSON leaves flowEndReason out; its `%end` format field
        // shows it, one line per record in the same order.
        let reasons: Vec<u8> = nfdump(&file, "fmt:%end")
            .lines()
            .map(|line| {
                line.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("nfdump's %end is not a number: {line:?}"))
            })
            .collect();
        // With -q, 1.7.1 leaves out the array's brackets but keeps the
        // commas between records.
        let trimmed = stdout.trim();
        let array = if trimmed.starts_with('[') {
            trimmed.to_owned()
        } else {
            format!("[{trimmed}]")
        };
        let all: Value = serde_json::from_str(&array)
            .unwrap_or_else(|err| panic!("nfdump's JSON does not parse ({err}):\n{stdout}"));
        let all = all
            .as_array()
            .unwrap_or_else(|| panic!("nfdump's JSON is not an array:\n{stdout}"));
        assert_eq!(
            reasons.len(),
            all.len(),
            "nfdump's %end lines:\n{reasons:?}"
        );
        all.iter()
            .zip(reasons)
            .map(|(json, end_reason)| NatRecord::from_json(json, end_reason))
            .collect()
    }

    /// The file nfcapd wrote when it stopped.
    fn flow_file(&self) -> PathBuf {
        let flows = self.dir.join("flows");
        let names: Vec<PathBuf> = std::fs::read_dir(&flows)
            .expect("reading nfcapd's flow directory")
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .collect();
        let written: Vec<&PathBuf> = names
            .iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("nfcapd.") && !n.contains("current"))
            })
            .collect();
        assert_eq!(
            written.len(),
            1,
            "expected one file written by nfcapd in {}, found {names:?}:\n{}",
            flows.display(),
            self.log()
        );
        written[0].clone()
    }

    /// SIGTERM, then SIGKILL after 5 s.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Nfcapd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `nfdump -q -r file -o format`'s standard output.
fn nfdump(file: &Path, format: &str) -> String {
    let output = Command::new(NFDUMP)
        .arg("-q")
        .arg("-r")
        .arg(file)
        .arg("-o")
        .arg(format)
        .output()
        .expect("running nfdump");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "nfdump -r {} -o {format} failed: {}\n{stdout}",
        file.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Whether a UDP socket is bound to `bind:port` in the namespace of
/// process `pid` (from its /proc/PID/net/udp, where the address is
/// hexadecimal in host byte order).
fn udp_listening(pid: u32, bind: Ipv4Addr, port: u16) -> bool {
    let wanted = format!("{:08X}:{port:04X}", u32::from_le_bytes(bind.octets()));
    std::fs::read_to_string(Path::new(&format!("/proc/{pid}/net/udp")))
        .map(|table| {
            table
                .lines()
                .skip(1)
                .any(|line| line.split_whitespace().nth(1) == Some(wanted.as_str()))
        })
        .unwrap_or(false)
}

impl NatRecord {
    fn from_json(json: &Value, end_reason: u8) -> Self {
        let text = |key: &str| -> String {
            match json.get(key) {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => panic!("nfdump's record has no {key}: {json:#}"),
            }
        };
        let number = |key: &str| -> u64 {
            text(key)
                .parse()
                .unwrap_or_else(|_| panic!("{key} is not a number in {json:#}"))
        };
        let address = |key: &str| -> Ipv4Addr {
            text(key)
                .parse()
                .unwrap_or_else(|_| panic!("{key} is not an IPv4 address in {json:#}"))
        };
        let protocol = number("proto") as u8;
        let icmp = protocol == 1;
        let source_port = if icmp {
            icmp_source_port(number("icmp_type") as u8, number("icmp_code") as u8)
        } else {
            number("src_port") as u16
        };
        let destination_port = if icmp { 0 } else { number("dst_port") as u16 };
        let destination = address("dst4_addr");
        Self {
            nat_event: number("nat_event_id") as u8,
            nat_event_name: text("nat_event"),
            protocol,
            inside: SocketAddrV4::new(address("src4_addr"), source_port),
            outside: SocketAddrV4::new(address("src4_xlt_ip"), number("src_xlt_port") as u16),
            destination: (!destination.is_unspecified())
                .then(|| SocketAddrV4::new(destination, destination_port)),
            vrf: number("ingress_vrf") as u32,
            end_reason,
            json: json.clone(),
        }
    }
}

/// nfdump (1.7.1 `ipfix.c`, a fix for Cisco exporters) moves a non-zero
/// ICMP source port into the destination port with its bytes swapped and
/// shows that as ICMP type (high byte) and code (low byte); the source
/// port, the ICMP identifier, is the two read the other way round.
pub fn icmp_source_port(icmp_type: u8, icmp_code: u8) -> u16 {
    u16::from_be_bytes([icmp_code, icmp_type])
}
