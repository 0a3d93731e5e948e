//! Dataplane: the BPF object, its pinned maps, and where its programs attach.
//!
//! Maps are pinned under the instance's directory in bpffs so that
//! `egress-agent status` can read them, and so a restarted agent finds its
//! conntrack table again. Programs attach through bpf links that are pinned
//! too (`links/<program>@<ifindex>`): the kernel keeps forwarding while no
//! agent runs, and the next agent adopts each link by swapping its own
//! freshly verified program in atomically (BPF_LINK_UPDATE), so a restart
//! or an upgrade drops no packet and no flow. Detaching is explicit
//! (BPF_LINK_DETACH, then the pin goes), so it is done when the agent says so.

pub mod batch;
pub mod maps;
mod redirect_errors;
mod sys;

use std::{
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink},
        xdp::XdpLink,
    },
};
use egress_common::{
    flow::{FlowEntryV4, FlowEntryV6, FlowKeyV4, FlowKeyV6},
    names,
};
use serde::{Deserialize, Serialize};

use crate::{
    config::{LinkRef, Resolved, XdpModeSetting},
    hook_choice::Hook,
};

/// The BPF object built from egress-ebpf by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress"));

/// Where one program is attached, for status output and the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub interface: String,
    pub ifindex: u32,
    pub program: String,
    /// `xdp/native`, `xdp/generic`, `tc/ingress` or `tc/egress`.
    pub hook: String,
    /// Taken over from a previous agent instead of attached anew.
    #[serde(default)]
    pub adopted: bool,
    /// The kernel's id of the program, to tell ours from another one.
    #[serde(default)]
    pub program_id: u32,
    /// Why the interface runs this hook (see `hook_choice`).
    #[serde(default)]
    pub reason: String,
}

/// Puts the IPv6 programs where the IPv4 ones tail-call them. Until this
/// runs, IPv6 frames pass to the kernel (`*_ipv6_unserved`), which the
/// leak guard keeps from forwarding tenant sources out.
fn fill_v6_programs(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    use egress_common::config::{
        V6_SLOT_ICMP_ERR, V6_SLOT_NEW_FLOW, V6_SLOT_OUTBOUND, V6_SLOT_REPLY,
    };
    for (array, programs) in [
        (
            names::V6_PROGRAMS_XDP,
            [
                (V6_SLOT_OUTBOUND, names::PROG_SNAT_OUTBOUND6),
                (V6_SLOT_REPLY, names::PROG_SNAT_REPLY6),
                (V6_SLOT_NEW_FLOW, names::PROG_SNAT_NEW_FLOW6),
                (V6_SLOT_ICMP_ERR, names::PROG_SNAT_ICMP6_ERR),
            ],
        ),
        (
            names::V6_PROGRAMS_TC,
            [
                (V6_SLOT_OUTBOUND, names::PROG_TC_OUTBOUND6),
                (V6_SLOT_REPLY, names::PROG_TC_REPLY6),
                (V6_SLOT_NEW_FLOW, names::PROG_TC_NEW_FLOW6),
                (V6_SLOT_ICMP_ERR, names::PROG_TC_ICMP6_ERR),
            ],
        ),
    ] {
        let mut fds = Vec::new();
        for (slot, name) in programs {
            let fd = ebpf
                .program(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .fd()
                .with_context(|| format!("{name} is not loaded"))?
                .try_clone()
                .with_context(|| format!("duplicating the descriptor of {name}"))?;
            fds.push((slot, name, fd));
        }
        let map = ebpf
            .map_mut(array)
            .with_context(|| format!("map {array} missing from the object"))?;
        let mut slots = aya::maps::ProgramArray::try_from(map)?;
        for (slot, name, fd) in fds {
            slots
                .set(slot, &fd, 0)
                .with_context(|| format!("placing {name} in {array}"))?;
        }
    }
    Ok(())
}

/// Where a program's link to one interface is pinned.
pub fn link_pin(pin_dir: &Path, program: &str, ifindex: u32) -> PathBuf {
    pin_dir.join(LINKS_DIR).join(format!("{program}@{ifindex}"))
}

const LINKS_DIR: &str = "links";

pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    attachments: Vec<Attachment>,
}

impl Dataplane {
    /// Loads the object with its maps pinned under `pin_dir` (reusing pins a
    /// previous run left) and verifies every program, attaching nothing.
    pub fn load(pin_dir: &Path, max_flows: u32, event_ring_bytes: u32) -> anyhow::Result<Self> {
        std::fs::create_dir_all(pin_dir).with_context(|| {
            format!(
                "creating {} (is bpffs mounted at /sys/fs/bpf?)",
                pin_dir.display()
            )
        })?;
        // One setting sizes both families' tables: each holds
        // `conntrack.maxFlows` flows of its own family.
        let conntrack_entries = max_flows.saturating_mul(2);
        check_pinned_conntrack::<FlowKeyV4, FlowEntryV4>(
            pin_dir,
            names::CONNTRACK_V4,
            conntrack_entries,
        )?;
        check_pinned_conntrack::<FlowKeyV6, FlowEntryV6>(
            pin_dir,
            names::CONNTRACK_V6,
            conntrack_entries,
        )?;
        replace_resized_ring(pin_dir, event_ring_bytes)?;
        replace_resized_program_arrays(pin_dir)?;
        let mut loader = EbpfLoader::new();
        for name in names::ALL_MAPS {
            loader.map_pin_path(name, pin_dir.join(name));
        }
        loader.map_max_entries(names::CONNTRACK_V4, conntrack_entries);
        loader.map_max_entries(names::CONNTRACK_V6, conntrack_entries);
        loader.map_max_entries(names::FLOW_EVENTS, event_ring_bytes);
        let mut ebpf = loader.load(OBJECT).context("loading the BPF object")?;
        for name in [
            names::PROG_SNAT_OUTBOUND,
            names::PROG_SNAT_REPLY,
            names::PROG_SNAT_OUTBOUND6,
            names::PROG_SNAT_REPLY6,
            names::PROG_SNAT_NEW_FLOW6,
            names::PROG_SNAT_ICMP6_ERR,
        ] {
            let program: &mut Xdp = program_mut(&mut ebpf, name)?.try_into()?;
            program
                .load()
                .with_context(|| format!("verifying {name}"))?;
        }
        for name in [
            names::PROG_TC_OUTBOUND,
            names::PROG_TC_REPLY,
            names::PROG_NEIGH_FALLBACK,
            names::PROG_LEAK_GUARD,
            names::PROG_CONNTRACK_SWEEP,
            names::PROG_TC_OUTBOUND6,
            names::PROG_TC_REPLY6,
            names::PROG_TC_NEW_FLOW6,
            names::PROG_TC_ICMP6_ERR,
        ] {
            let program: &mut SchedClassifier = program_mut(&mut ebpf, name)?.try_into()?;
            program
                .load()
                .with_context(|| format!("verifying {name}"))?;
        }
        fill_v6_programs(&mut ebpf)?;
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            attachments: Vec::new(),
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// A loaded program, for test runs.
    pub fn program(&self, name: &str) -> Option<&aya::programs::Program> {
        self.ebpf.program(name)
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Attaches every program where the plan says, adopting the links a
    /// previous agent pinned (the new program replaces the old one in
    /// place) and detaching pinned links the plan no longer names. On
    /// error, what was attached stays owned by `self`; [`Self::shutdown`]
    /// removes it.
    pub fn attach(&mut self, resolved: &Resolved) -> anyhow::Result<()> {
        let links_dir = self.pin_dir.join(LINKS_DIR);
        std::fs::create_dir_all(&links_dir)
            .with_context(|| format!("creating {}", links_dir.display()))?;
        for choice in &resolved.hooks {
            let link = &choice.link;
            let internal = link.index != resolved.external.index;
            tracing::info!(interface = %link.name, hook = %choice.hook, reason = %choice.reason, "hook chosen");
            match (choice.hook, internal) {
                (Hook::Xdp, true) => {
                    self.attach_xdp(names::PROG_SNAT_OUTBOUND, link, resolved.xdp_mode)?;
                    // XDP cannot resolve a neighbour; this sends on what it
                    // translated but had to pass up.
                    self.attach_tc(names::PROG_NEIGH_FALLBACK, link, TcAttachType::Ingress)?;
                }
                (Hook::Tc, true) => {
                    self.attach_tc(names::PROG_TC_OUTBOUND, link, TcAttachType::Ingress)?;
                }
                (Hook::Xdp, false) => {
                    self.attach_xdp(names::PROG_SNAT_REPLY, link, resolved.xdp_mode)?;
                }
                (Hook::Tc, false) => {
                    self.attach_tc(names::PROG_TC_REPLY, link, TcAttachType::Ingress)?;
                }
            }
            for attachment in self
                .attachments
                .iter_mut()
                .filter(|a| a.ifindex == link.index)
            {
                attachment.reason.clone_from(&choice.reason);
            }
        }
        let external = &resolved.external;
        self.attach_tc(names::PROG_LEAK_GUARD, external, TcAttachType::Egress)?;
        let wanted: Vec<PathBuf> = self
            .attachments
            .iter()
            .map(|a| link_pin(&self.pin_dir, &a.program, a.ifindex))
            .collect();
        for entry in std::fs::read_dir(&links_dir)
            .with_context(|| format!("reading {}", links_dir.display()))?
        {
            let path = entry?.path();
            if !wanted.contains(&path) {
                tracing::info!(link = %path.display(), "detaching a link the configuration no longer names");
                remove_link_pin(&path)?;
            }
        }
        // Not pinned, attached anew by every agent: see redirect_errors.
        self.watch_redirect_errors();
        Ok(())
    }

    fn record(&mut self, link: &LinkRef, program: &str, hook: &str, adopted: bool) {
        tracing::info!(interface = %link.name, program, hook, adopted, "attached");
        let program_id = self
            .ebpf
            .program(program)
            .and_then(|p| p.info().ok())
            .map_or(0, |info| info.id());
        self.attachments.push(Attachment {
            program_id,
            interface: link.name.clone(),
            ifindex: link.index,
            program: program.to_owned(),
            hook: hook.to_owned(),
            adopted,
            reason: String::new(),
        });
    }

    /// Opens a link a previous agent pinned for this program and interface.
    fn pinned_link(&self, program: &str, link: &LinkRef) -> anyhow::Result<Option<FdLink>> {
        let path = link_pin(&self.pin_dir, program, link.index);
        match PinnedLink::from_pin(&path) {
            Ok(pinned) => Ok(Some(pinned.into())),
            Err(_) if !path.exists() => Ok(None),
            Err(err) => Err(err).with_context(|| format!("opening {}", path.display())),
        }
    }

    /// Pins a link just created, so it outlives this process. Links the
    /// kernel made through netlink (kernels without bpf links for the hook)
    /// cannot be pinned: they work, but a restart detaches them.
    fn pin_link(
        &self,
        program: &str,
        link: &LinkRef,
        fd_link: Result<FdLink, impl std::fmt::Display>,
    ) -> anyhow::Result<()> {
        let path = link_pin(&self.pin_dir, program, link.index);
        match fd_link {
            Ok(fd_link) => {
                let pinned = fd_link
                    .pin(&path)
                    .with_context(|| format!("pinning {}", path.display()))?;
                // The pin holds the link; this process's descriptor can go.
                drop(FdLink::from(pinned));
                Ok(())
            }
            Err(err) => {
                tracing::warn!(
                    interface = %link.name,
                    program,
                    error = %err,
                    "attached without a bpf link: works, but an agent restart will detach it"
                );
                Ok(())
            }
        }
    }

    fn attach_xdp(
        &mut self,
        name: &str,
        link: &LinkRef,
        setting: XdpModeSetting,
    ) -> anyhow::Result<()> {
        if let Some(fd_link) = self.pinned_link(name, link)? {
            let program: &mut Xdp = program_mut(&mut self.ebpf, name)?.try_into()?;
            let old = XdpLink::try_from(fd_link).with_context(|| {
                format!("{name}'s pinned link on {} is not an XDP link", link.name)
            })?;
            // The program keeps our descriptor; closing it later leaves the
            // pinned link attached.
            program
                .attach_to_link(old)
                .with_context(|| format!("replacing {name} on {} in place", link.name))?;
            self.record(link, name, "xdp", true);
            return Ok(());
        }
        let program: &mut Xdp = program_mut(&mut self.ebpf, name)?.try_into()?;
        let native = || format!("attaching {name} to {} in native XDP mode", link.name);
        let generic = || format!("attaching {name} to {} in generic XDP mode", link.name);
        let (id, hook) = match setting {
            XdpModeSetting::Native => (
                program
                    .attach_to_if_index(link.index, XdpMode::Driver)
                    .with_context(native)?,
                "xdp/native",
            ),
            XdpModeSetting::Generic => (
                program
                    .attach_to_if_index(link.index, XdpMode::Skb)
                    .with_context(generic)?,
                "xdp/generic",
            ),
            XdpModeSetting::Auto => match program.attach_to_if_index(link.index, XdpMode::Driver) {
                Ok(id) => (id, "xdp/native"),
                Err(err) => {
                    tracing::warn!(
                        interface = %link.name,
                        error = %err,
                        "the driver does not take native XDP; falling back to generic mode, \
                         which works everywhere but costs a socket buffer per packet"
                    );
                    (
                        program
                            .attach_to_if_index(link.index, XdpMode::Skb)
                            .with_context(generic)?,
                        "xdp/generic",
                    )
                }
            },
        };
        let owned = program.take_link(id)?;
        self.pin_link(name, link, FdLink::try_from(owned))?;
        self.record(link, name, hook, false);
        Ok(())
    }

    fn attach_tc(&mut self, name: &str, link: &LinkRef, hook: TcAttachType) -> anyhow::Result<()> {
        let hook_name = match hook {
            TcAttachType::Ingress => "tc/ingress",
            _ => "tc/egress",
        };
        if let Some(fd_link) = self.pinned_link(name, link)? {
            let program: &mut SchedClassifier = program_mut(&mut self.ebpf, name)?.try_into()?;
            let old = SchedClassifierLink::try_from(fd_link).with_context(|| {
                format!("{name}'s pinned link on {} is not a tcx link", link.name)
            })?;
            program
                .attach_to_link(old)
                .with_context(|| format!("replacing {name} on {} in place", link.name))?;
            self.record(link, name, hook_name, true);
            return Ok(());
        }
        let program: &mut SchedClassifier = program_mut(&mut self.ebpf, name)?.try_into()?;
        // Kernels from 6.6 attach through tcx links; older ones need the
        // clsact qdisc for the netlink path.
        let id = match program.attach(&link.name, hook) {
            Ok(id) => id,
            Err(_) => {
                if let Err(err) = tc::qdisc_add_clsact(&link.name)
                    && !matches!(&err, tc::TcError::IoError(e) if e.kind() == io::ErrorKind::AlreadyExists)
                {
                    tracing::debug!(interface = %link.name, error = %err, "adding clsact");
                }
                program
                    .attach(&link.name, hook)
                    .with_context(|| format!("attaching {name} to {} ({hook:?})", link.name))?
            }
        };
        let owned = program.take_link(id)?;
        self.pin_link(name, link, FdLink::try_from(owned))?;
        self.record(link, name, hook_name, false);
        Ok(())
    }

    /// Attaches through netlink filters (cls_bpf, direct action), which
    /// stay attached when this process exits and need no pin: for Kube-OVN's
    /// egress gateway pod, whose init container attaches and exits. TC on
    /// every interface, `conntrack_sweep` before the outbound program.
    /// Filters an earlier run left are detached first; returns whether
    /// there were any.
    pub fn attach_through_netlink(&mut self, resolved: &Resolved) -> anyhow::Result<bool> {
        let mut plan: Vec<(&str, &LinkRef, TcAttachType, u16)> = Vec::new();
        for link in &resolved.internal {
            plan.push((names::PROG_CONNTRACK_SWEEP, link, TcAttachType::Ingress, 1));
            plan.push((names::PROG_TC_OUTBOUND, link, TcAttachType::Ingress, 2));
        }
        plan.push((
            names::PROG_TC_REPLY,
            &resolved.external,
            TcAttachType::Ingress,
            1,
        ));
        plan.push((
            names::PROG_LEAK_GUARD,
            &resolved.external,
            TcAttachType::Egress,
            1,
        ));
        let mut replaced = false;
        for (name, link, hook, _) in &plan {
            match tc::qdisc_detach_program(&link.name, *hook, name) {
                Ok(()) => replaced = true,
                Err(tc::TcError::IoError(err)) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => {
                    return Err(err).with_context(|| {
                        format!("detaching an earlier {name} from {}", link.name)
                    });
                }
            }
        }
        for (name, link, hook, priority) in plan {
            if let Err(err) = tc::qdisc_add_clsact(&link.name)
                && !matches!(&err, tc::TcError::IoError(e) if e.kind() == io::ErrorKind::AlreadyExists)
            {
                tracing::debug!(interface = %link.name, error = %err, "adding clsact");
            }
            let program: &mut SchedClassifier = program_mut(&mut self.ebpf, name)?.try_into()?;
            let options = tc::TcAttachOptions::Netlink(tc::NlOptions {
                priority,
                ..tc::NlOptions::default()
            });
            let id = program
                .attach_with_options(&link.name, hook, options)
                .with_context(|| format!("attaching {name} to {} ({hook:?})", link.name))?;
            // Dropping the link would delete the filter: it is meant to
            // outlive this process.
            std::mem::forget(program.take_link(id)?);
            let hook_name = match hook {
                TcAttachType::Ingress => "tc/ingress (netlink)",
                _ => "tc/egress (netlink)",
            };
            self.record(link, name, hook_name, false);
        }
        Ok(replaced)
    }

    /// Detaches every program and removes the pins: nothing of this
    /// instance remains in the kernel.
    pub fn shutdown(self) -> anyhow::Result<()> {
        let Self { ebpf, pin_dir, .. } = self;
        drop(ebpf);
        remove_pins(&pin_dir)
    }
}

fn program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> anyhow::Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("the BPF object has no program {name}"))
}

/// A conntrack map (`name`, keyed by `K`, holding `V`) pinned by an
/// earlier run with another size or kind cannot be reused silently: aya
/// would adopt it as it is (an LRU table from before per-tenant quotas
/// would go on evicting other tenants' flows).
fn check_pinned_conntrack<K, V>(pin_dir: &Path, name: &str, entries: u32) -> anyhow::Result<()> {
    let path = pin_dir.join(name);
    let info = match aya::maps::MapInfo::from_pin(&path) {
        Ok(info) => info,
        Err(_) if !path.exists() => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("inspecting {}", path.display())),
    };
    let (key_size, value_size) = (size_of::<K>(), size_of::<V>());
    let kind = info.map_type().ok();
    if kind != Some(aya::maps::MapType::Hash) {
        bail!(
            "{} is a {kind:?} table from an earlier version, not the hash table this agent \
             needs (flows must never be evicted); run `egress-agent cleanup` to start with a \
             new table (tracked flows are lost)",
            path.display(),
        );
    }
    if info.max_entries() != entries
        || info.key_size() as usize != key_size
        || info.value_size() as usize != value_size
    {
        bail!(
            "{} holds {} entries of {}+{} bytes, but this agent needs {entries} of {key_size}+{value_size} \
             (a changed conntrack.maxFlows, or an agent with another flow layout); \
             run `egress-agent cleanup` to start with a new table (tracked flows are lost)",
            path.display(),
            info.max_entries(),
            info.key_size(),
            info.value_size(),
        );
    }
    Ok(())
}

/// A pinned event ring of another size than `bytes` is unpinned, so this
/// load creates one of the size asked for (the programs swapped in use the
/// new one; events the old one still holds are not read).
fn replace_resized_ring(pin_dir: &Path, bytes: u32) -> anyhow::Result<()> {
    let path = pin_dir.join(names::FLOW_EVENTS);
    match aya::maps::MapInfo::from_pin(&path) {
        Ok(info) if info.max_entries() != bytes => {
            tracing::warn!(
                from = info.max_entries(),
                to = bytes,
                "the event ring changes size; events still in the old ring are not read"
            );
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Program arrays pinned by an agent with fewer (or more) IPv6 slots are
/// unpinned, so this load creates them with `V6_SLOTS`: the programs
/// attached before keep the old array until they are swapped out.
fn replace_resized_program_arrays(pin_dir: &Path) -> anyhow::Result<()> {
    let slots = egress_common::config::V6_SLOTS;
    for name in [names::V6_PROGRAMS_XDP, names::V6_PROGRAMS_TC] {
        let path = pin_dir.join(name);
        if let Ok(info) = aya::maps::MapInfo::from_pin(&path)
            && info.max_entries() != slots
        {
            tracing::info!(
                map = name,
                from = info.max_entries(),
                to = slots,
                "the IPv6 program array changes size"
            );
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Removes every pin of an instance, links first (which detaches the
/// programs). Missing pins are fine.
pub fn remove_pins(pin_dir: &Path) -> anyhow::Result<()> {
    let links_dir = pin_dir.join(LINKS_DIR);
    if let Ok(entries) = std::fs::read_dir(&links_dir) {
        for entry in entries {
            remove_link_pin(&entry?.path())?;
        }
    }
    remove_dir(&links_dir)?;
    for name in names::ALL_MAPS {
        remove_file(&pin_dir.join(name))?;
    }
    remove_dir(pin_dir)
}

/// Detaches a pinned link, then removes its pin. Removing the pin alone
/// lets the kernel drop the link only after an RCU grace period, from a
/// workqueue: the program would still be attached for a moment after the
/// agent reported it gone and exited. A kernel that cannot detach this link
/// type early still detaches it that way.
fn remove_link_pin(path: &Path) -> anyhow::Result<()> {
    match sys::obj_get(path) {
        Ok(link) => {
            if let Err(err) = sys::link_detach(link.as_fd()) {
                tracing::debug!(link = %path.display(), error = %err, "BPF_LINK_DETACH");
            }
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => tracing::debug!(link = %path.display(), error = %err, "opening a link pin"),
    }
    remove_file(path)
}

fn remove_file(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", path.display())),
    }
}

fn remove_dir(pin_dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", pin_dir.display())),
    }
}
