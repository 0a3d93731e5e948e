//! Whether the dataplane is serving: every program still attached where
//! the agent put it (XDP and TC alike), and the pinned maps readable. BFD and `/readyz` follow
//! this verdict, so a router withdraws the gateway as soon as packets would
//! no longer be translated, not when a timeout notices.
//! [`check_with_redirects`] adds what only the kernel sees: frames it
//! dropped after the programs returned `XDP_REDIRECT`.

use aya::programs::{SchedClassifier, TcAttachType};
use futures::TryStreamExt as _;
use rtnetlink::packet_route::link::{LinkAttribute, LinkXdp};

use egress_common::names;

use crate::{
    dataplane::{Attachment, maps::Maps},
    hook_choice::{self, Hook, InterfaceFacts},
};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum Health {
    /// Starting up, or reconfiguring from scratch.
    Starting,
    Serving,
    NotServing(String),
    ShuttingDown,
    /// The agent stopped and left the dataplane as it was, unattended
    /// (`--keep-dataplane`, or a start that failed over a serving one):
    /// nothing checks or reconfigures it until the next agent adopts it.
    AgentStopped(String),
}

impl Health {
    pub fn is_serving(&self) -> bool {
        matches!(self, Health::Serving)
    }
}

/// Checks the dataplane once.
pub async fn check(handle: &rtnetlink::Handle, attachments: &[Attachment], maps: &Maps) -> Health {
    if let Err(err) = maps.counters() {
        return Health::NotServing(format!("the pinned maps are unreadable: {err:#}"));
    }
    for attachment in attachments.iter().filter(|a| a.hook.starts_with("xdp")) {
        match xdp_program_on(handle, attachment.ifindex).await {
            Ok(Some(id)) if id == attachment.program_id || attachment.program_id == 0 => {}
            Ok(Some(id)) => {
                return Health::NotServing(format!(
                    "{} runs XDP program {id}, not {} ({})",
                    attachment.interface, attachment.program_id, attachment.program
                ));
            }
            Ok(None) => {
                return Health::NotServing(format!(
                    "{} was detached from {}",
                    attachment.program, attachment.interface
                ));
            }
            Err(err) => {
                return Health::NotServing(format!(
                    "cannot inspect {}: {err:#}",
                    attachment.interface
                ));
            }
        }
    }
    if let Some(problem) = xdp_targets_problem(attachments) {
        return Health::NotServing(problem);
    }
    for attachment in attachments.iter().filter(|a| a.hook.starts_with("tc/")) {
        if let Some(problem) = tc_problem(attachment) {
            return Health::NotServing(problem);
        }
    }
    Health::Serving
}

/// Why an XDP program's redirects would now be dropped, if they would: a
/// target lost `ndo_xdp_xmit` since the choice was made (a veth whose peer
/// switched GRO off, an XDP program removed from a NIC).
fn xdp_targets_problem(attachments: &[Attachment]) -> Option<String> {
    let outbound = [names::PROG_SNAT_REPLY, names::PROG_TC_REPLY];
    let reply = [names::PROG_SNAT_OUTBOUND, names::PROG_TC_OUTBOUND];
    for attachment in attachments
        .iter()
        .filter(|a| a.hook.starts_with("xdp/native"))
    {
        let target_programs: &[&str] = if attachment.program == names::PROG_SNAT_OUTBOUND {
            &outbound
        } else {
            &reply
        };
        let targets: Vec<InterfaceFacts> = attachments
            .iter()
            .filter(|a| target_programs.contains(&a.program.as_str()))
            .map(|a| InterfaceFacts {
                name: a.interface.clone(),
                ifindex: a.ifindex,
                kind: None,
                xdp_features: hook_choice::xdp_features(a.ifindex).ok().flatten(),
            })
            .collect();
        if let Some(reason) = hook_choice::still_safe(Hook::Xdp, &targets) {
            return Some(format!(
                "{} on {} redirects where the kernel would drop: {reason}",
                attachment.program, attachment.interface
            ));
        }
    }
    None
}

/// Why a TC attachment no longer runs, if it does not. Kernels before 6.6
/// attach through netlink, whose filters tcx cannot list: those are taken
/// on trust.
fn tc_problem(attachment: &Attachment) -> Option<String> {
    let direction = if attachment.hook == "tc/egress" {
        TcAttachType::Egress
    } else {
        TcAttachType::Ingress
    };
    let programs = match SchedClassifier::query_tcx(&attachment.interface, direction) {
        Ok((_, programs)) => programs,
        Err(err) => {
            tracing::debug!(interface = %attachment.interface, error = %err, "querying tcx");
            return None;
        }
    };
    let ours = |id: u32| attachment.program_id == 0 || id == attachment.program_id;
    if programs.iter().any(|program| ours(program.id())) {
        return None;
    }
    Some(format!(
        "{} was detached from {} ({})",
        attachment.program, attachment.interface, attachment.hook
    ))
}

/// [`check`], then whether the kernel drops what the programs redirect: a
/// dataplane whose frames are lost after `XDP_REDIRECT` is not serving
/// (see `redirects` for when that starts and ends).
pub async fn check_with_redirects(
    handle: &rtnetlink::Handle,
    attachments: &[Attachment],
    maps: &Maps,
    redirects: &mut crate::redirects::Watch,
) -> Health {
    let dropped = redirects.observe(std::time::Instant::now());
    // Frames actually lost come first: they are what the operator sees.
    match (check(handle, attachments, maps).await, dropped) {
        (Health::Serving, dropped) => dropped.map_or(Health::Serving, Health::NotServing),
        (Health::NotServing(reason), Some(dropped)) => {
            Health::NotServing(format!("{dropped}; {reason}"))
        }
        (other, _) => other,
    }
}

/// The id of the XDP program attached to a link, if any.
async fn xdp_program_on(handle: &rtnetlink::Handle, ifindex: u32) -> anyhow::Result<Option<u32>> {
    let mut links = handle.link().get().match_index(ifindex).execute();
    let Some(message) = links.try_next().await? else {
        anyhow::bail!("link {ifindex} is gone");
    };
    for attribute in message.attributes {
        if let LinkAttribute::Xdp(xdp) = attribute {
            return Ok(xdp.into_iter().find_map(|nla| match nla {
                LinkXdp::ProgId(id) if id != 0 => Some(id),
                _ => None,
            }));
        }
    }
    Ok(None)
}
