//! Whether the dataplane is attached, as an unprivileged process can tell:
//! a cls_bpf filter on the internal interface's TC ingress whose program
//! name (TCA_BPF_NAME) starts with the dataplane's outbound program name.
//! The filter dump is what `tc filter show dev IF ingress` reads; it needs
//! no capability, unlike anything that goes through bpf().

use std::net::IpAddr;

use futures::TryStreamExt as _;
use rtnetlink::packet_route::{
    address::AddressAttribute,
    link::LinkAttribute,
    tc::{TcAttribute, TcFilterBpfOption, TcOption},
};

use egress_common::names;

use super::control::DataplaneStatus;

/// The kernel names a program by its first 15 characters and tc shows
/// `<object>:[<section>]` or the program's name depending on how it was
/// attached; both start with the function's name.
pub const PROGRAM_PREFIX: &str = names::PROG_TC_OUTBOUND;

/// Where to look: a named interface, or the one holding an address.
#[derive(Clone, Debug)]
pub enum Internal {
    Named(String),
    Holding(IpAddr),
}

/// Checks once. Never fails: what cannot be read counts as not attached,
/// with the reason in `detail`.
pub async fn check(handle: &rtnetlink::Handle, internal: &Internal) -> DataplaneStatus {
    let (ifindex, name) = match resolve(handle, internal).await {
        Ok(found) => found,
        Err(err) => {
            return DataplaneStatus {
                interface: None,
                attached: false,
                detail: format!("{err:#}"),
            };
        }
    };
    match ingress_program_names(handle, ifindex).await {
        Ok(names) => {
            let ours = names.iter().find(|n| n.starts_with(PROGRAM_PREFIX));
            DataplaneStatus {
                interface: Some(name),
                attached: ours.is_some(),
                detail: match ours {
                    Some(program) => program.clone(),
                    None if names.is_empty() => "no BPF classifier on TC ingress".to_owned(),
                    None => format!(
                        "TC ingress runs {}, none of them {PROGRAM_PREFIX}",
                        names.join(", ")
                    ),
                },
            }
        }
        Err(err) => DataplaneStatus {
            interface: Some(name),
            attached: false,
            detail: format!("reading TC ingress filters: {err:#}"),
        },
    }
}

async fn resolve(handle: &rtnetlink::Handle, internal: &Internal) -> anyhow::Result<(u32, String)> {
    let ifindex = match internal {
        Internal::Named(name) => {
            let mut links = handle.link().get().match_name(name.clone()).execute();
            match links.try_next().await? {
                Some(link) => return Ok((link.header.index, name.clone())),
                None => anyhow::bail!("no interface {name}"),
            }
        }
        Internal::Holding(address) => {
            let mut addresses = handle.address().get().execute();
            let mut found = None;
            while let Some(message) = addresses.try_next().await? {
                let holds = message.attributes.iter().any(|attribute| {
                    matches!(attribute, AddressAttribute::Address(a) | AddressAttribute::Local(a) if a == address)
                });
                if holds {
                    found = Some(message.header.index);
                }
            }
            found.ok_or_else(|| anyhow::anyhow!("no interface holds {address}"))?
        }
    };
    let mut links = handle.link().get().match_index(ifindex).execute();
    let name = links
        .try_next()
        .await?
        .and_then(|link| {
            link.attributes
                .into_iter()
                .find_map(|attribute| match attribute {
                    LinkAttribute::IfName(name) => Some(name),
                    _ => None,
                })
        })
        .unwrap_or_else(|| format!("ifindex {ifindex}"));
    Ok((ifindex, name))
}

/// The names of the BPF programs of every cls_bpf filter on TC ingress.
async fn ingress_program_names(
    handle: &rtnetlink::Handle,
    ifindex: u32,
) -> anyhow::Result<Vec<String>> {
    let ifindex = i32::try_from(ifindex)?;
    let mut filters = handle.traffic_filter(ifindex).get().ingress().execute();
    let mut names = Vec::new();
    loop {
        let message = match filters.try_next().await {
            Ok(Some(message)) => message,
            Ok(None) => break,
            // No ingress or clsact qdisc: nothing is attached.
            Err(rtnetlink::Error::NetlinkError(err))
                if err.raw_code() == -libc::EINVAL || err.raw_code() == -libc::ENOENT =>
            {
                break;
            }
            Err(err) => return Err(err.into()),
        };
        let is_bpf = message
            .attributes
            .iter()
            .any(|attribute| matches!(attribute, TcAttribute::Kind(kind) if kind == "bpf"));
        if !is_bpf {
            continue;
        }
        for attribute in message.attributes {
            if let TcAttribute::Options(options) = attribute {
                names.extend(options.into_iter().filter_map(|option| match option {
                    TcOption::Bpf(TcFilterBpfOption::ProgName(name)) => Some(name),
                    _ => None,
                }));
            }
        }
    }
    Ok(names)
}
