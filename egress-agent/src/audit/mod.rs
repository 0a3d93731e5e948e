//! The translation log: which tenant host held which egress address and
//! port, from when to when, for the audits, abuse reports and partner
//! firewalls that key on egress addresses.
//!
//! `event` is the record every part agrees on (one JSON line each);
//! `ring` turns the dataplane's creation events into records; `jsonlog`
//! writes them to a rotated file or stdout; `ipfix` exports them to a
//! collector as RFC 8158 NAT44 session events (IPv6 flows are left out
//! there, counted); `pipeline` fans events out
//! to the sinks and live followers and counts every one it could not
//! deliver; `lookup` answers "who was this address and port at that
//! moment" from the log files.

pub mod event;
pub mod follow;
pub mod ipfix;
pub mod jsonlog;
pub mod lookup;
pub mod pipeline;
pub mod ring;

use std::fmt::Write as _;

use anyhow::Context as _;

pub use pipeline::{Audit, AuditHandle, Sink};

use crate::{config::audit::AuditPlan, metrics::Exporter};

/// The sinks `plan` asks for, opened (a log file that cannot be written
/// refuses the start, with its path).
pub fn open_sinks(plan: &AuditPlan) -> anyhow::Result<Vec<Box<dyn Sink>>> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(target) = &plan.log {
        sinks.push(Box::new(jsonlog::JsonLog::open(target)?));
    }
    if let Some(ipfix) = &plan.ipfix {
        let exporter = ipfix::IpfixExporter::new(ipfix, plan.record_destinations)
            .with_context(|| format!("opening a UDP socket towards {}", ipfix.collector))?;
        sinks.push(Box::new(exporter));
    }
    Ok(sinks)
}

/// The pipeline's counts on `/metrics`.
pub fn export(exporter: &Exporter, audit: &AuditHandle) {
    let audit = audit.clone();
    exporter.register(move |out| {
        let view = audit.view();
        let _ = writeln!(
            out,
            "# HELP egress_audit_events_total Translation events the agent recorded, by kind.\n\
             # TYPE egress_audit_events_total counter\n\
             egress_audit_events_total{{kind=\"create\"}} {}\n\
             egress_audit_events_total{{kind=\"end\"}} {}",
            view.created, view.ended
        );
        let _ = writeln!(
            out,
            "# HELP egress_audit_events_lost_total Translation events that reached no sink, by where they were lost: the dataplane's ring, the sinks' queue, a follower too slow.\n\
             # TYPE egress_audit_events_lost_total counter\n\
             egress_audit_events_lost_total{{stage=\"ring\"}} {}\n\
             egress_audit_events_lost_total{{stage=\"sink_queue\"}} {}\n\
             egress_audit_events_lost_total{{stage=\"follower\"}} {}",
            view.ring_lost, view.sink_lost, view.follower_lost
        );
        let _ = writeln!(
            out,
            "# HELP egress_audit_sink_errors_total Writes a translation log sink failed.\n\
             # TYPE egress_audit_sink_errors_total counter\n\
             egress_audit_sink_errors_total{{sink=\"log\"}} {}\n\
             egress_audit_sink_errors_total{{sink=\"ipfix\"}} {}",
            view.log_errors, view.ipfix_errors
        );
        let _ = writeln!(
            out,
            "# HELP egress_audit_events_skipped_total Translation events a sink cannot express and left out: IPv6 flows over IPFIX, which has no NAT66 session event.\n\
             # TYPE egress_audit_events_skipped_total counter\n\
             egress_audit_events_skipped_total{{sink=\"ipfix\",reason=\"ipv6\"}} {}",
            view.ipfix_skipped
        );
    });
}
