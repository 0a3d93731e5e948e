//! Whether the dataplane is serving: every XDP program still attached where
//! the agent put it, and the pinned maps readable. BFD and `/readyz` follow
//! this verdict, so a router withdraws the gateway as soon as packets would
//! no longer be translated, not when a timeout notices.
//! [`check_with_redirects`] adds what only the kernel sees: frames it
//! dropped after the programs returned `XDP_REDIRECT`.

use futures::TryStreamExt as _;
use rtnetlink::packet_route::link::{LinkAttribute, LinkXdp};

use crate::dataplane::{Attachment, maps::Maps};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum Health {
    /// Starting up, or reconfiguring from scratch.
    Starting,
    Serving,
    NotServing(String),
    ShuttingDown,
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
    Health::Serving
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
    match check(handle, attachments, maps).await {
        Health::Serving => dropped.map_or(Health::Serving, Health::NotServing),
        other => other,
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
