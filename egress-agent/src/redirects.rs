//! XDP redirects the kernel dropped, seen from the agent: the health check's
//! watch, the `/metrics` series and the rows of `status`.
//!
//! The programs return `XDP_REDIRECT` and count the packet as translated
//! before the kernel transmits it, so a target that refuses every frame (a
//! veth whose peer has neither GRO nor an XDP program, a macvlan) would
//! leave the verdicts saying `out_translated` and the gateway saying
//! `serving` while every packet is lost. The tracepoint programs of
//! `dataplane::redirect_errors` count those losses in `REDIRECT_DROPS`, by
//! (from, to) interface; this module turns them into a reason not to serve.
//!
//! **When it trips**: any frame lost to an outright failure since the last
//! check (four times a second). Frames a target left out of a batch it
//! otherwise took (`partial`: its queue was full) are reported but do not
//! trip it, since congestion under load looks exactly like that, and a
//! gateway that withdrew itself whenever it is busiest would make things
//! worse.
//!
//! **When it recovers**: after [`QUIET`] (10 s) without a new failed frame.
//! A failure seldom fixes itself, but once routers withdraw the gateway no
//! traffic arrives to show whether it is fixed; 10 s is long enough that a
//! target failing steadily (every packet, or every new flow's first packet)
//! keeps the gateway withdrawn between its packets, and short enough that
//! a fixed target (GRO turned on at the peer) serves again soon. If the
//! target is still broken, the first packets after the routers return are
//! lost again and the gateway goes back to not serving within a check;
//! each such retry costs about a BFD detection time of traffic.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{Map, MapData, PerCpuHashMap};
use egress_common::{
    names,
    redirect::{RedirectDrops, RedirectPair},
};
use serde::Serialize;

use crate::metrics::Exporter;

/// How long without a new failed frame before the dataplane serves again.
pub const QUIET: Duration = Duration::from_secs(10);

/// One pair's counts, summed over the CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub failed: u64,
    pub partial: u64,
    /// The latest error one of the CPUs saw (a negative errno), 0 if none.
    pub last_err: i32,
}

/// The pinned `REDIRECT_DROPS` map.
pub struct Drops {
    map: PerCpuHashMap<MapData, RedirectPair, RedirectDrops>,
}

impl Drops {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        let path = pin_dir.join(names::REDIRECT_DROPS);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let map = Map::from_map_data(data)
            .with_context(|| format!("pinned map {}", path.display()))?
            .try_into()
            .with_context(|| format!("pinned map {} has an unexpected layout", path.display()))?;
        Ok(Self { map })
    }

    /// Every pair's counts.
    pub fn read(&self) -> anyhow::Result<BTreeMap<RedirectPair, Totals>> {
        let mut totals = BTreeMap::new();
        for entry in self.map.iter() {
            let (pair, per_cpu) = entry.context("reading REDIRECT_DROPS")?;
            let mut sum = Totals::default();
            for value in per_cpu.iter() {
                sum.failed += value.failed;
                sum.partial += value.partial;
                if value.last_err != 0 {
                    sum.last_err = value.last_err;
                }
            }
            totals.insert(pair, sum);
        }
        Ok(totals)
    }
}

/// Frames one pair lost since the current run of failures began.
#[derive(Clone, Copy, Debug)]
struct Episode {
    frames: u64,
    last_err: i32,
}

/// The health check's memory: the counts at the last check, and the
/// failures of the current run, which end after [`QUIET`].
pub struct Watch {
    pin_dir: PathBuf,
    drops: Option<Drops>,
    /// Failed frames per pair at the last read; `None` before the first,
    /// which only sets the baseline (counts a predecessor left are history).
    seen: Option<BTreeMap<RedirectPair, u64>>,
    episode: BTreeMap<RedirectPair, Episode>,
    last_failure: Option<Instant>,
}

impl Watch {
    pub fn new(pin_dir: &Path) -> Self {
        Self {
            pin_dir: pin_dir.to_owned(),
            drops: None,
            seen: None,
            episode: BTreeMap::new(),
            last_failure: None,
        }
    }

    /// Reads the counts; the reason not to serve while frames are being lost.
    pub fn observe(&mut self, now: Instant) -> Option<String> {
        if self.drops.is_none() {
            self.drops = Drops::open(&self.pin_dir).ok();
        }
        // An unreadable map is the general health check's to report.
        if let Some(totals) = self.drops.as_ref().and_then(|d| d.read().ok()) {
            self.update(&totals, now);
        }
        self.reason(now, &interface_name, &driver_of)
    }

    fn update(&mut self, totals: &BTreeMap<RedirectPair, Totals>, now: Instant) {
        let current: BTreeMap<RedirectPair, u64> =
            totals.iter().map(|(pair, t)| (*pair, t.failed)).collect();
        if let Some(seen) = &self.seen {
            for (pair, total) in totals {
                let before = seen.get(pair).copied().unwrap_or(0);
                // Smaller than before: the map was made anew; all is new.
                let new = if total.failed >= before {
                    total.failed - before
                } else {
                    total.failed
                };
                if new == 0 {
                    continue;
                }
                let episode = self.episode.entry(*pair).or_insert(Episode {
                    frames: 0,
                    last_err: 0,
                });
                episode.frames += new;
                episode.last_err = total.last_err;
                self.last_failure = Some(now);
            }
        }
        self.seen = Some(current);
    }

    fn reason(
        &mut self,
        now: Instant,
        name: &dyn Fn(u32) -> String,
        driver: &dyn Fn(&str) -> Option<String>,
    ) -> Option<String> {
        match self.last_failure {
            Some(at) if now.duration_since(at) < QUIET => Some(
                self.episode
                    .iter()
                    .map(|(pair, episode)| {
                        let (from, to) = (name(pair.from_ifindex), name(pair.to_ifindex));
                        format!(
                            "XDP redirects from {from} to {to} are being dropped by the kernel \
                             ({} frame{}): {}",
                            episode.frames,
                            if episode.frames == 1 { "" } else { "s" },
                            explain(&to, driver(&to).as_deref(), episode.last_err)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            _ => {
                self.episode.clear();
                self.last_failure = None;
                None
            }
        }
    }
}

/// What an error of a failed redirect means, and what fixes it. `driver`
/// is the target's (`veth`, `macvlan`...), when known.
///
/// A veth takes XDP frames only while its peer has NAPI (GRO on, or an XDP
/// program attached). Since Linux 6.3 a veth without it does not advertise
/// `NETDEV_XDP_ACT_NDO_XMIT`, and the redirect is refused at once with
/// `-EOPNOTSUPP` (`xdp:xdp_redirect_err`); older kernels queue the frames
/// and `veth_xdp_xmit()` drops the batch with `-ENXIO`
/// (`xdp:xdp_devmap_xmit`), as a newer one still does if the peer loses
/// NAPI while frames are queued.
pub fn explain(to: &str, driver: Option<&str>, err: i32) -> String {
    let errno = -err;
    let name = errno_name(err);
    match (errno, driver) {
        (libc::EOPNOTSUPP | libc::ENXIO, Some("veth")) => format!(
            "{to} is a veth whose peer has neither GRO nor an XDP program, so it takes no \
             XDP frames ({name}): turn GRO on at the peer (`ethtool -K <peer> gro on`) or \
             attach an XDP program there"
        ),
        (libc::EOPNOTSUPP, Some("macvlan")) => format!(
            "{to} is a macvlan, which cannot transmit XDP frames ({name}); generic XDP \
             (`xdp.mode: generic`) does not need it"
        ),
        (libc::EOPNOTSUPP, Some("virtio_net")) => format!(
            "{to} (virtio_net) transmits XDP frames only while an XDP program is attached \
             to it ({name})"
        ),
        (libc::EOPNOTSUPP, driver) => format!(
            "{to}{} cannot transmit XDP frames now ({name}): a veth whose peer has neither \
             GRO nor an XDP program, a macvlan, or a driver without XDP transmit",
            driver.map(|d| format!(" ({d})")).unwrap_or_default()
        ),
        (libc::ENXIO, _) => format!(
            "{to} took no XDP frames ({name}): a veth whose peer has neither GRO nor an XDP \
             program, or whose peer is gone"
        ),
        (libc::ENETDOWN, _) => format!("{to} is down ({name})"),
        (libc::EMSGSIZE, _) => format!("the frames are longer than {to} takes ({name})"),
        (libc::EINVAL, _) => format!("{to} does not exist or refused the frames ({name})"),
        (0, _) => "no error code was reported".to_owned(),
        (errno, _) => format!(
            "error {errno} ({})",
            std::io::Error::from_raw_os_error(errno)
        ),
    }
}

/// The driver behind an interface of this network namespace (`veth`,
/// `macvlan`, `virtio_net`...), as `ethtool -i` reports it.
pub fn driver_of(interface: &str) -> Option<String> {
    /// `struct ethtool_drvinfo` of linux/ethtool.h.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    const ETHTOOL_GDRVINFO: u32 = 3;
    if interface.len() >= libc::IF_NAMESIZE {
        return None;
    }
    // SAFETY: an all-zero DrvInfo and ifreq are valid; the socket is
    // closed on every path; the ioctl writes at most size_of::<DrvInfo>()
    // bytes into `info`, which outlives the call.
    unsafe {
        let mut info: DrvInfo = std::mem::zeroed();
        info.cmd = ETHTOOL_GDRVINFO;
        let mut request: libc::ifreq = std::mem::zeroed();
        for (dst, src) in request.ifr_name.iter_mut().zip(interface.bytes()) {
            *dst = src as libc::c_char;
        }
        request.ifr_ifru.ifru_data = (&raw mut info).cast();
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let rc = libc::ioctl(fd, libc::SIOCETHTOOL, &raw mut request);
        libc::close(fd);
        if rc != 0 {
            return None;
        }
        let len = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
        Some(String::from_utf8_lossy(&info.driver[..len]).into_owned()).filter(|d| !d.is_empty())
    }
}

/// The short name of an error for tables: `ENXIO`, or the number.
pub fn errno_name(err: i32) -> String {
    match -err {
        0 => "-".to_owned(),
        libc::ENXIO => "ENXIO".to_owned(),
        libc::EOPNOTSUPP => "EOPNOTSUPP".to_owned(),
        libc::ENETDOWN => "ENETDOWN".to_owned(),
        libc::EMSGSIZE => "EMSGSIZE".to_owned(),
        libc::EINVAL => "EINVAL".to_owned(),
        libc::ENOSPC => "ENOSPC".to_owned(),
        errno => errno.to_string(),
    }
}

/// An interface's name in this network namespace, or `ifindex N` when it
/// has none here (gone, or the counts were made from another namespace).
pub fn interface_name(ifindex: u32) -> String {
    let mut buffer = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(ifindex, buffer.as_mut_ptr()) };
    if name.is_null() {
        return format!("ifindex {ifindex}");
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(buffer.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// One pair, for `status`.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub from: String,
    pub to: String,
    pub from_ifindex: u32,
    pub to_ifindex: u32,
    /// Frames lost to outright failures (what makes the dataplane not serving).
    pub failed: u64,
    /// Frames a target left out of a batch (its queue was full).
    pub partial: u64,
    /// The latest error, e.g. `ENXIO`; `-` if none.
    pub last_error: String,
}

/// Every pair with losses; empty when the map is missing (pins of an agent
/// that predates it).
pub fn rows(pin_dir: &Path) -> Vec<Row> {
    let Ok(totals) = Drops::open(pin_dir).and_then(|drops| drops.read()) else {
        return Vec::new();
    };
    totals
        .into_iter()
        .filter(|(_, t)| t.failed + t.partial > 0)
        .map(|(pair, t)| Row {
            from: interface_name(pair.from_ifindex),
            to: interface_name(pair.to_ifindex),
            from_ifindex: pair.from_ifindex,
            to_ifindex: pair.to_ifindex,
            failed: t.failed,
            partial: t.partial,
            last_error: errno_name(t.last_err),
        })
        .collect()
}

/// Adds `egress_redirect_drops_total{from,to,cause}` and
/// `egress_redirect_drops_watched` to every scrape.
pub fn export(exporter: &Exporter, pin_dir: &Path, watched: bool) {
    let drops = Mutex::new(None::<Drops>);
    let pin_dir = pin_dir.to_owned();
    exporter.register(move |out| {
        let _ = writeln!(
            out,
            "# HELP egress_redirect_drops_watched 1 while the tracepoints that see XDP redirects \
             the kernel drops are attached.\n\
             # TYPE egress_redirect_drops_watched gauge\n\
             egress_redirect_drops_watched {}",
            u8::from(watched)
        );
        let mut drops = drops.lock().unwrap_or_else(PoisonError::into_inner);
        if drops.is_none() {
            *drops = Drops::open(&pin_dir).ok();
        }
        let Some(totals) = drops.as_ref().and_then(|d| d.read().ok()) else {
            return;
        };
        let _ = writeln!(
            out,
            "# HELP egress_redirect_drops_total Frames the XDP programs redirected that the kernel \
             dropped, by interface pair; cause=\"error\": the target refused them (the dataplane \
             is not serving while these grow), cause=\"partial\": the target left them out of a batch \
             (its queue was full, or they were longer than it takes).\n\
             # TYPE egress_redirect_drops_total counter"
        );
        for (pair, t) in totals {
            let (from, to) = (
                interface_name(pair.from_ifindex),
                interface_name(pair.to_ifindex),
            );
            let _ = writeln!(
                out,
                "egress_redirect_drops_total{{from=\"{from}\",to=\"{to}\",cause=\"error\"}} {}\n\
                 egress_redirect_drops_total{{from=\"{from}\",to=\"{to}\",cause=\"partial\"}} {}",
                t.failed, t.partial
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const ETH0_TO_ETH1: RedirectPair = RedirectPair {
        from_ifindex: 2,
        to_ifindex: 3,
    };
    const ETH1_TO_ETH0: RedirectPair = RedirectPair {
        from_ifindex: 3,
        to_ifindex: 2,
    };

    fn name(ifindex: u32) -> String {
        format!("eth{}", ifindex - 2)
    }

    fn veth(_: &str) -> Option<String> {
        Some("veth".to_owned())
    }

    fn totals(entries: &[(RedirectPair, u64, i32)]) -> BTreeMap<RedirectPair, Totals> {
        entries
            .iter()
            .map(|&(pair, failed, last_err)| {
                (
                    pair,
                    Totals {
                        failed,
                        partial: 0,
                        last_err,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn history_is_not_a_failure_new_losses_are_until_a_quiet_period() {
        let mut watch = Watch::new(Path::new("/nonexistent"));
        let start = Instant::now();
        let eopnotsupp = -libc::EOPNOTSUPP;
        // What a predecessor left counts as history.
        watch.update(&totals(&[(ETH0_TO_ETH1, 40, eopnotsupp)]), start);
        assert_eq!(watch.reason(start, &name, &veth), None);

        let t1 = start + Duration::from_millis(250);
        watch.update(&totals(&[(ETH0_TO_ETH1, 45, eopnotsupp)]), t1);
        let reason = watch.reason(t1, &name, &veth).expect("failing");
        assert!(
            reason.starts_with(
                "XDP redirects from eth0 to eth1 are being dropped by the kernel (5 frames): \
                 eth1 is a veth whose peer has neither GRO nor an XDP program, so it takes no \
                 XDP frames (EOPNOTSUPP)"
            ),
            "{reason}"
        );

        // Quiet, but not for long enough; then another pair fails too.
        let t2 = t1 + QUIET - Duration::from_millis(1);
        watch.update(
            &totals(&[
                (ETH0_TO_ETH1, 45, eopnotsupp),
                (ETH1_TO_ETH0, 1, -libc::ENXIO),
            ]),
            t2,
        );
        let reason = watch.reason(t2, &name, &veth).expect("still failing");
        assert!(reason.contains("from eth0 to eth1"), "{reason}");
        assert!(reason.contains("(5 frames)"), "{reason}");
        assert!(
            reason.contains(
                "from eth1 to eth0 are being dropped by the kernel (1 frame): eth0 is a veth"
            ),
            "{reason}"
        );

        // Quiet since the last new loss: serving again, and the next run of
        // failures counts from zero.
        let t3 = t2 + QUIET;
        watch.update(
            &totals(&[
                (ETH0_TO_ETH1, 45, eopnotsupp),
                (ETH1_TO_ETH0, 1, -libc::ENXIO),
            ]),
            t3,
        );
        assert_eq!(watch.reason(t3, &name, &veth), None);
        watch.update(&totals(&[(ETH0_TO_ETH1, 47, eopnotsupp)]), t3);
        let reason = watch.reason(t3, &name, &veth).expect("failing again");
        assert!(reason.contains("(2 frames)"), "{reason}");
        assert!(!reason.contains("eth1 to eth0"), "{reason}");
    }

    #[test]
    fn partial_batches_are_not_failures() {
        let mut watch = Watch::new(Path::new("/nonexistent"));
        let now = Instant::now();
        watch.update(&BTreeMap::new(), now);
        let congested = BTreeMap::from([(
            ETH0_TO_ETH1,
            Totals {
                failed: 0,
                partial: 1000,
                last_err: 0,
            },
        )]);
        watch.update(&congested, now);
        assert_eq!(watch.reason(now, &name, &veth), None);
    }

    #[test]
    fn a_map_made_anew_counts_from_zero() {
        let mut watch = Watch::new(Path::new("/nonexistent"));
        let now = Instant::now();
        watch.update(&totals(&[(ETH0_TO_ETH1, 100, -libc::ENXIO)]), now);
        watch.update(&totals(&[(ETH0_TO_ETH1, 3, -libc::ENXIO)]), now);
        let reason = watch.reason(now, &name, &veth).expect("failing");
        assert!(reason.contains("(3 frames)"), "{reason}");
    }

    #[test]
    fn errors_are_named() {
        assert_eq!(errno_name(-libc::ENXIO), "ENXIO");
        assert_eq!(errno_name(0), "-");
        assert!(explain("eth1", None, -libc::ENETDOWN).contains("eth1 is down"));
        assert!(explain("eth1", None, -libc::ENOMEM).starts_with("error 12"));
        assert!(
            explain("mv0", Some("macvlan"), -libc::EOPNOTSUPP)
                .starts_with("mv0 is a macvlan, which cannot transmit XDP frames (EOPNOTSUPP)")
        );
        assert!(explain("eth1", None, -libc::EOPNOTSUPP).contains("a veth whose peer"));
        assert_eq!(driver_of("no-such-if0"), None);
    }
}
