//! `audit:`: where translation events go. The section as written, and the
//! checked plan the agent runs with.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use egress_common::events::DEFAULT_EVENT_RING_BYTES;
use serde::Deserialize;

use super::{Problems, duration, number_and_unit};

/// A rotated log is cut at this size when the file does not say.
pub const DEFAULT_MAX_LOG_SIZE: u64 = 100 << 20;
/// Rotated files kept when the file does not say.
pub const DEFAULT_KEEP: u32 = 10;
/// The IANA port of IPFIX (RFC 7011), when `ipfix` names a host only.
pub const IPFIX_PORT: u16 = 4739;
const MIN_LOG_SIZE: u64 = 4 << 10;
const MAX_KEEP: u32 = 1000;
const MIN_RING_BYTES: u64 = 64 << 10;
const MAX_RING_BYTES: u64 = 1 << 30;

/// The section as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Audit {
    /// JSON lines file (absolute path), or `-` for standard output.
    pub log: Option<String>,
    /// Size at which the log is rotated: bytes, or a number with KiB, MiB, GiB.
    pub max_log_size: Option<Size>,
    /// Rotated files kept beside the current one.
    pub keep: Option<u32>,
    /// IPFIX collector, `address:port` (UDP).
    pub ipfix: Option<String>,
    /// Record each flow's remote end (RFC 6888 advises leaving it out where
    /// it is not needed).
    pub record_destinations: Option<bool>,
    /// IPFIX observation domain id of this gateway.
    pub ipfix_observation_domain: Option<u32>,
    /// How often the IPFIX templates are sent again (UDP collectors that
    /// restart learn them from the next one).
    #[serde(default, deserialize_with = "optional_duration")]
    pub ipfix_template_interval: Option<Duration>,
    /// Bytes of the dataplane's event ring (a power of two).
    pub event_ring_size: Option<Size>,
}

/// Bytes written as a number or with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Bytes(u64),
            Text(String),
        }
        match Written::deserialize(deserializer)? {
            Written::Bytes(bytes) => Ok(Size(bytes)),
            Written::Text(text) => parse_size(&text)
                .map(Size)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// `4096`, `512KiB`, `100MiB`, `2GiB` (also KB/MB/GB, read as powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (value, unit) = number_and_unit(text, "a size like 4096, 512KiB, 100MiB or 1GiB")?;
    let scale: u64 = match unit {
        "" | "B" => 1,
        "K" | "KB" | "KiB" => 1 << 10,
        "M" | "MB" | "MiB" => 1 << 20,
        "G" | "GB" | "GiB" => 1 << 30,
        _ => return Err(format!("{text:?}: unknown unit (use KiB, MiB or GiB)")),
    };
    value
        .checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn optional_duration<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    duration(deserializer).map(Some)
}

/// Where the JSON lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    File {
        path: PathBuf,
        max_size: u64,
        keep: u32,
    },
    Stdout,
}

/// The section, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPlan {
    pub log: Option<LogTarget>,
    pub ipfix: Option<IpfixPlan>,
    pub record_destinations: bool,
    pub ring_bytes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpfixPlan {
    pub collector: SocketAddr,
    pub observation_domain: u32,
    pub template_interval: Duration,
}

impl Default for AuditPlan {
    fn default() -> Self {
        Self {
            log: None,
            ipfix: None,
            record_destinations: true,
            ring_bytes: DEFAULT_EVENT_RING_BYTES,
        }
    }
}

impl AuditPlan {
    /// Whether any sink wants events, so the dataplane must report them.
    pub fn enabled(&self) -> bool {
        self.log.is_some() || self.ipfix.is_some()
    }
}

impl Audit {
    pub(super) fn plan(&self, problems: &mut Problems) -> AuditPlan {
        let mut plan = AuditPlan {
            record_destinations: self.record_destinations.unwrap_or(true),
            ..AuditPlan::default()
        };
        let max_size = self.max_log_size.map_or(DEFAULT_MAX_LOG_SIZE, |s| s.0);
        if max_size < MIN_LOG_SIZE {
            problems.add(
                "audit.maxLogSize",
                format!("{max_size} bytes is below the smallest useful size, 4KiB"),
            );
        }
        let keep = self.keep.unwrap_or(DEFAULT_KEEP);
        if !(1..=MAX_KEEP).contains(&keep) {
            problems.add("audit.keep", format!("{keep} is outside 1..={MAX_KEEP}"));
        }
        match self.log.as_deref() {
            None => {
                if self.max_log_size.is_some() || self.keep.is_some() {
                    problems.add("audit.log", "maxLogSize and keep need a log file");
                }
            }
            Some("-") => plan.log = Some(LogTarget::Stdout),
            Some(path) if path.starts_with('/') && !path.ends_with('/') => {
                plan.log = Some(LogTarget::File {
                    path: PathBuf::from(path),
                    max_size,
                    keep,
                });
            }
            Some(path) => problems.add(
                "audit.log",
                format!("{path:?} must be an absolute file path, or - for standard output"),
            ),
        }
        if let Some(collector) = self.ipfix.as_deref() {
            match parse_collector(collector) {
                Ok(collector) => {
                    plan.ipfix = Some(IpfixPlan {
                        collector,
                        observation_domain: self.ipfix_observation_domain.unwrap_or(0),
                        template_interval: self
                            .ipfix_template_interval
                            .unwrap_or(Duration::from_secs(60)),
                    });
                }
                Err(message) => problems.add("audit.ipfix", message),
            }
        } else if self.ipfix_observation_domain.is_some() || self.ipfix_template_interval.is_some()
        {
            problems.add(
                "audit.ipfix",
                "ipfixObservationDomain and ipfixTemplateInterval need a collector",
            );
        }
        if self.ipfix_template_interval.is_some_and(|d| d.is_zero()) {
            problems.add("audit.ipfixTemplateInterval", "must be at least 1s");
        }
        if let Some(Size(bytes)) = self.event_ring_size {
            if !bytes.is_power_of_two() || !(MIN_RING_BYTES..=MAX_RING_BYTES).contains(&bytes) {
                problems.add(
                    "audit.eventRingSize",
                    format!("{bytes} bytes must be a power of two from 64KiB to 1GiB"),
                );
            } else {
                plan.ring_bytes = bytes as u32;
            }
        }
        plan
    }
}

/// `192.0.2.10:4739`, `[2001:db8::10]:4739`, or an address alone (port 4739).
fn parse_collector(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!("{text:?}: port 0 cannot receive"));
        }
        return Ok(addr);
    }
    text.parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, IPFIX_PORT))
        .map_err(|_| format!("{text:?} is not an address:port like 192.0.2.10:4739"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> (AuditPlan, Vec<String>) {
        let audit: Audit = serde_saphyr::from_str(text).expect("valid YAML");
        let mut problems = Problems::default();
        let plan = audit.plan(&mut problems);
        (plan, problems.0.into_iter().map(|p| p.field).collect())
    }

    #[test]
    fn the_issue_example_plans_a_rotated_log_and_a_collector() {
        let (plan, problems) = plan(
            "log: /var/log/egress/translations.jsonl\nmaxLogSize: 100MiB\nkeep: 10\n\
             ipfix: 192.0.2.10:4739\nrecordDestinations: true\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            plan.log,
            Some(LogTarget::File {
                path: "/var/log/egress/translations.jsonl".into(),
                max_size: 100 << 20,
                keep: 10
            })
        );
        let ipfix = plan.ipfix.as_ref().expect("collector");
        assert_eq!(ipfix.collector, "192.0.2.10:4739".parse().expect("addr"));
        assert!(plan.record_destinations && plan.enabled());
    }

    #[test]
    fn defaults_and_a_bare_collector_address() {
        let (plan, problems) = plan("ipfix: 2001:db8::10\nrecordDestinations: false\n");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            plan.ipfix.expect("collector").collector,
            "[2001:db8::10]:4739".parse().expect("addr")
        );
        assert!(plan.log.is_none() && !plan.record_destinations);
        assert_eq!(plan.ring_bytes, DEFAULT_EVENT_RING_BYTES);
        assert!(!AuditPlan::default().enabled());
    }

    #[test]
    fn bad_values_are_named_by_field() {
        let (_, problems) = plan(
            "log: relative.jsonl\nmaxLogSize: 10\nkeep: 0\nipfix: collector\n\
             eventRingSize: 100000\n",
        );
        assert_eq!(
            problems,
            [
                "audit.maxLogSize",
                "audit.keep",
                "audit.log",
                "audit.ipfix",
                "audit.eventRingSize"
            ]
        );
        let (_, problems) = plan("keep: 3\n");
        assert_eq!(problems, ["audit.log"]);
    }

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("100MiB"), Ok(100 << 20));
        assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
        assert!(parse_size("ten MiB").is_err());
        assert!(parse_size("1PiB").is_err());
    }
}
