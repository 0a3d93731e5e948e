//! Dataplane: the BPF object, its pinned maps, and where its programs attach.
//!
//! Maps are pinned under the instance's directory in bpffs so that
//! `egress-agent status` can read them, and so a restarted agent finds its
//! conntrack table again. Programs attach through bpf links the process
//! owns: dropping a [`Dataplane`] detaches everything it attached, which is
//! what makes a failed start leave nothing behind.

pub mod maps;

use std::{
    io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode, tc},
};
use egress_common::{flow::FlowKeyV4, names};
use serde::{Deserialize, Serialize};

use crate::config::{LinkRef, Resolved, XdpModeSetting};

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
}

pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    attachments: Vec<Attachment>,
}

impl Dataplane {
    /// Loads the object with its maps pinned under `pin_dir` (reusing pins a
    /// previous run left) and verifies every program, attaching nothing.
    pub fn load(pin_dir: &Path, max_flows: u32) -> anyhow::Result<Self> {
        std::fs::create_dir_all(pin_dir).with_context(|| {
            format!(
                "creating {} (is bpffs mounted at /sys/fs/bpf?)",
                pin_dir.display()
            )
        })?;
        let conntrack_entries = max_flows.saturating_mul(2);
        check_pinned_conntrack(pin_dir, conntrack_entries)?;
        let mut loader = EbpfLoader::new();
        for name in names::ALL_MAPS {
            loader.map_pin_path(name, pin_dir.join(name));
        }
        loader.map_max_entries(names::CONNTRACK_V4, conntrack_entries);
        let mut ebpf = loader.load(OBJECT).context("loading the BPF object")?;
        for name in [names::PROG_SNAT_OUTBOUND, names::PROG_SNAT_REPLY] {
            let program: &mut Xdp = program_mut(&mut ebpf, name)?.try_into()?;
            program
                .load()
                .with_context(|| format!("verifying {name}"))?;
        }
        for name in [names::PROG_NEIGH_FALLBACK, names::PROG_LEAK_GUARD] {
            let program: &mut SchedClassifier = program_mut(&mut ebpf, name)?.try_into()?;
            program
                .load()
                .with_context(|| format!("verifying {name}"))?;
        }
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

    /// Attaches every program where the plan says. On error, what was
    /// attached stays owned by `self` and is detached when it is dropped.
    pub fn attach(&mut self, resolved: &Resolved) -> anyhow::Result<()> {
        for link in &resolved.internal {
            let hook = self.attach_xdp(names::PROG_SNAT_OUTBOUND, link, resolved.xdp_mode)?;
            self.record(link, names::PROG_SNAT_OUTBOUND, hook);
            self.attach_tc(names::PROG_NEIGH_FALLBACK, link, TcAttachType::Ingress)?;
            self.record(link, names::PROG_NEIGH_FALLBACK, "tc/ingress");
        }
        let external = &resolved.external;
        let hook = self.attach_xdp(names::PROG_SNAT_REPLY, external, resolved.xdp_mode)?;
        self.record(external, names::PROG_SNAT_REPLY, hook);
        self.attach_tc(names::PROG_LEAK_GUARD, external, TcAttachType::Egress)?;
        self.record(external, names::PROG_LEAK_GUARD, "tc/egress");
        Ok(())
    }

    fn record(&mut self, link: &LinkRef, program: &str, hook: &str) {
        tracing::info!(interface = %link.name, program, hook, "attached");
        self.attachments.push(Attachment {
            interface: link.name.clone(),
            ifindex: link.index,
            program: program.to_owned(),
            hook: hook.to_owned(),
        });
    }

    fn attach_xdp(
        &mut self,
        name: &str,
        link: &LinkRef,
        setting: XdpModeSetting,
    ) -> anyhow::Result<&'static str> {
        let program: &mut Xdp = program_mut(&mut self.ebpf, name)?.try_into()?;
        let native = || format!("attaching {name} to {} in native XDP mode", link.name);
        let generic = || format!("attaching {name} to {} in generic XDP mode", link.name);
        match setting {
            XdpModeSetting::Native => {
                program
                    .attach_to_if_index(link.index, XdpMode::Driver)
                    .with_context(native)?;
                Ok("xdp/native")
            }
            XdpModeSetting::Generic => {
                program
                    .attach_to_if_index(link.index, XdpMode::Skb)
                    .with_context(generic)?;
                Ok("xdp/generic")
            }
            XdpModeSetting::Auto => match program.attach_to_if_index(link.index, XdpMode::Driver) {
                Ok(_) => Ok("xdp/native"),
                Err(err) => {
                    tracing::warn!(
                        interface = %link.name,
                        error = %err,
                        "the driver does not take native XDP; falling back to generic mode, \
                         which works everywhere but costs a socket buffer per packet"
                    );
                    program
                        .attach_to_if_index(link.index, XdpMode::Skb)
                        .with_context(generic)?;
                    Ok("xdp/generic")
                }
            },
        }
    }

    fn attach_tc(&mut self, name: &str, link: &LinkRef, hook: TcAttachType) -> anyhow::Result<()> {
        let program: &mut SchedClassifier = program_mut(&mut self.ebpf, name)?.try_into()?;
        // Kernels from 6.6 attach through tcx links; older ones need the
        // clsact qdisc for the netlink path.
        if program.attach(&link.name, hook).is_ok() {
            return Ok(());
        }
        if let Err(err) = tc::qdisc_add_clsact(&link.name)
            && !matches!(&err, tc::TcError::IoError(e) if e.kind() == io::ErrorKind::AlreadyExists)
        {
            tracing::debug!(interface = %link.name, error = %err, "adding clsact");
        }
        program
            .attach(&link.name, hook)
            .with_context(|| format!("attaching {name} to {} ({hook:?})", link.name))?;
        Ok(())
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

/// A conntrack map pinned by an earlier run with another size cannot be
/// reused silently: aya would adopt it with the old size.
fn check_pinned_conntrack(pin_dir: &Path, entries: u32) -> anyhow::Result<()> {
    let path = pin_dir.join(names::CONNTRACK_V4);
    let info = match aya::maps::MapInfo::from_pin(&path) {
        Ok(info) => info,
        Err(_) if !path.exists() => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("inspecting {}", path.display())),
    };
    if info.max_entries() != entries || info.key_size() as usize != size_of::<FlowKeyV4>() {
        bail!(
            "{} holds {} entries of {} bytes, but this configuration needs {entries} of {}; \
             run `egress-agent cleanup` to start with a new table (tracked flows are lost)",
            path.display(),
            info.max_entries(),
            info.key_size(),
            size_of::<FlowKeyV4>()
        );
    }
    Ok(())
}

/// Removes every pin of an instance. Missing pins are fine.
pub fn remove_pins(pin_dir: &Path) -> anyhow::Result<()> {
    for name in names::ALL_MAPS {
        let path = pin_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).with_context(|| format!("removing {}", path.display())),
        }
    }
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", pin_dir.display())),
    }
}
