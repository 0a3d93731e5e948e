//! The tracepoint programs that count XDP redirects the kernel dropped
//! (`redirect_xmit` on `xdp:xdp_devmap_xmit`, `redirect_err` on
//! `xdp:xdp_redirect_err`; see egress-ebpf's `redirect_errors`).
//!
//! Unlike the XDP and TC links, these attachments are not pinned: each
//! agent attaches them anew and they go when it exits, also with
//! `--keep-dataplane`. Nothing is lost by that: they only feed the agent's
//! own health check, and the counts they made live on in the pinned
//! `REDIRECT_DROPS` map, which the next agent reads from where it stands.
//!
//! Watching is best effort. Where it cannot start (no tracefs, a kernel
//! whose records are laid out otherwise, a verifier that refuses the
//! programs) the agent serves without it and says so in its log and on
//! /metrics (`egress_redirect_drops_watched 0`).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use aya::programs::TracePoint;
use egress_common::{
    names,
    redirect::{TraceField, devmap_xmit, redirect_err},
};

use super::{Dataplane, program_mut};

/// Where the kernel's tracefs is mounted by default; the agent mounts it
/// there when nothing is mounted at either usual place (systemd does the
/// same at boot; a bare system or a fresh container may not have it).
const TRACEFS: &str = "/sys/kernel/tracing";
const TRACEFS_IN_DEBUGFS: &str = "/sys/kernel/debug/tracing";

/// Each program, with its tracepoint and the record fields it reads.
const WATCHES: [(&str, &str, &str, &[TraceField]); 2] = [
    (
        names::PROG_REDIRECT_XMIT,
        devmap_xmit::CATEGORY,
        devmap_xmit::NAME,
        &devmap_xmit::FIELDS,
    ),
    (
        names::PROG_REDIRECT_ERR,
        redirect_err::CATEGORY,
        redirect_err::NAME,
        &redirect_err::FIELDS,
    ),
];

impl Dataplane {
    /// Loads and attaches the redirect-failure tracepoints. Never fails:
    /// what cannot be watched is logged and left unloaded.
    pub(super) fn watch_redirect_errors(&mut self) {
        let tracefs = match tracefs() {
            Ok(path) => path,
            Err(err) => {
                tracing::warn!(
                    error = %format!("{err:#}"),
                    "XDP redirects the kernel drops will go unnoticed: tracefs is unavailable"
                );
                return;
            }
        };
        for (program, category, event, fields) in WATCHES {
            if let Err(err) = self.watch(&tracefs, program, category, event, fields) {
                tracing::warn!(
                    program,
                    tracepoint = %format!("{category}:{event}"),
                    error = %format!("{err:#}"),
                    "XDP redirects the kernel drops there will go unnoticed"
                );
                if let Ok(tp) = program_mut(&mut self.ebpf, program)
                    .and_then(|p| <&mut TracePoint>::try_from(p).map_err(Into::into))
                {
                    let _ = tp.unload();
                }
            }
        }
    }

    fn watch(
        &mut self,
        tracefs: &Path,
        program: &str,
        category: &str,
        event: &str,
        fields: &[TraceField],
    ) -> anyhow::Result<()> {
        let format_path = tracefs
            .join("events")
            .join(category)
            .join(event)
            .join("format");
        let format = std::fs::read_to_string(&format_path)
            .with_context(|| format!("reading {}", format_path.display()))?;
        check_layout(&format, fields)
            .with_context(|| format!("{} does not match the program", format_path.display()))?;
        let tp: &mut TracePoint = program_mut(&mut self.ebpf, program)?.try_into()?;
        tp.load().with_context(|| format!("verifying {program}"))?;
        // The link stays with the program (not pinned): see the module comment.
        tp.attach(category, event)
            .with_context(|| format!("attaching {program} to {category}:{event}"))?;
        tracing::info!(program, tracepoint = %format!("{category}:{event}"), "watching for dropped XDP redirects");
        Ok(())
    }

    /// Whether both redirect-failure tracepoints are attached (a program
    /// that could not be attached was unloaded).
    pub fn redirect_errors_watched(&self) -> bool {
        WATCHES.iter().all(|(program, ..)| {
            self.ebpf
                .program(program)
                .and_then(|p| p.fd().ok())
                .is_some()
        })
    }
}

/// The mounted tracefs, mounting it at its usual place if none is.
fn tracefs() -> anyhow::Result<PathBuf> {
    let mounted = |path: &str| Path::new(path).join("events").is_dir();
    for path in [TRACEFS, TRACEFS_IN_DEBUGFS] {
        if mounted(path) {
            return Ok(PathBuf::from(path));
        }
    }
    let target = std::ffi::CString::new(TRACEFS)?;
    // SAFETY: mount(2) with valid C strings and no data.
    let rc = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting tracefs at {TRACEFS}"));
    }
    tracing::info!(path = TRACEFS, "mounted tracefs");
    if !mounted(TRACEFS) {
        bail!("{TRACEFS} has no events after mounting tracefs");
    }
    Ok(PathBuf::from(TRACEFS))
}

/// Checks that every field the program reads is a 4-byte field at the
/// offset it reads it from, as the running kernel's format file says.
pub fn check_layout(format: &str, fields: &[TraceField]) -> anyhow::Result<()> {
    for wanted in fields {
        let Some((offset, size)) = field_layout(format, wanted.name) else {
            bail!("the record has no field {}", wanted.name);
        };
        if offset != wanted.offset || size != 4 {
            bail!(
                "field {} is at offset {offset} (size {size}), the program reads offset {} (size 4)",
                wanted.name,
                wanted.offset
            );
        }
    }
    Ok(())
}

/// (offset, size) of a field in a tracepoint format file, from a line such as
/// `field:int from_ifindex;<TAB>offset:8;<TAB>size:4;<TAB>signed:1;`.
fn field_layout(format: &str, name: &str) -> Option<(usize, usize)> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';').map(str::trim);
        let declaration = parts.next()?.strip_prefix("field:")?;
        if declaration.split_whitespace().last()? != name {
            return None;
        }
        let mut offset = None;
        let mut size = None;
        for part in parts {
            if let Some(value) = part.strip_prefix("offset:") {
                offset = value.parse().ok();
            } else if let Some(value) = part.strip_prefix("size:") {
                size = value.parse().ok();
            }
        }
        Some((offset?, size?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As Linux 6.18 prints it.
    const DEVMAP_XMIT: &str = "name: xdp_devmap_xmit
ID: 578
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int from_ifindex;\toffset:8;\tsize:4;\tsigned:1;
\tfield:u32 act;\toffset:12;\tsize:4;\tsigned:0;
\tfield:int to_ifindex;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int drops;\toffset:20;\tsize:4;\tsigned:1;
\tfield:int sent;\toffset:24;\tsize:4;\tsigned:1;
\tfield:int err;\toffset:28;\tsize:4;\tsigned:1;
";

    const REDIRECT_ERR: &str = "name: xdp_redirect_err
ID: 581
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int prog_id;\toffset:8;\tsize:4;\tsigned:1;
\tfield:u32 act;\toffset:12;\tsize:4;\tsigned:0;
\tfield:int ifindex;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int err;\toffset:20;\tsize:4;\tsigned:1;
\tfield:int to_ifindex;\toffset:24;\tsize:4;\tsigned:1;
\tfield:u32 map_id;\toffset:28;\tsize:4;\tsigned:0;
\tfield:int map_index;\toffset:32;\tsize:4;\tsigned:1;
";

    #[test]
    fn the_programs_read_the_fields_where_linux_6_18_puts_them() {
        check_layout(DEVMAP_XMIT, &devmap_xmit::FIELDS).expect("devmap_xmit");
        check_layout(REDIRECT_ERR, &redirect_err::FIELDS).expect("redirect_err");
    }

    #[test]
    fn a_moved_or_missing_field_is_refused() {
        let moved = DEVMAP_XMIT.replace("drops;\toffset:20", "drops;\toffset:24");
        let err = check_layout(&moved, &devmap_xmit::FIELDS).expect_err("moved");
        assert!(err.to_string().contains("drops is at offset 24"), "{err}");
        let missing = REDIRECT_ERR.replace("to_ifindex", "target");
        let err = check_layout(&missing, &redirect_err::FIELDS).expect_err("missing");
        assert!(err.to_string().contains("no field to_ifindex"), "{err}");
        // `ifindex` must not be matched by `from_ifindex` or `to_ifindex`.
        assert_eq!(field_layout(DEVMAP_XMIT, "ifindex"), None);
        assert_eq!(field_layout(REDIRECT_ERR, "ifindex"), Some((16, 4)));
    }
}
