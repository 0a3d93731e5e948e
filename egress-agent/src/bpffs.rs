//! bpffs at /sys/fs/bpf, where the dataplane's maps and links are pinned.
//!
//! Operators start the agent where /sys/fs/bpf is not a bpffs mount:
//! `ip netns exec` remounts /sys (a fresh sysfs, whose /sys/fs/bpf is an
//! empty directory), and a pod may have no bpffs mounted. As Cilium does,
//! the agent then mounts one itself. Each bpffs mount is a new, empty
//! instance that lives as long as the mount namespace it is mounted in:
//! in a private one (`ip netns exec`, a pod) the pins, and with them the
//! dataplane, do not outlive the processes of that namespace.

use std::{ffi::CString, io, os::unix::ffi::OsStrExt as _, path::Path};

use anyhow::{Context as _, bail};

/// Where bpffs is expected.
pub const ROOT: &str = "/sys/fs/bpf";

/// `statfs(2)`'s `f_type` of bpffs (linux/magic.h).
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

/// Whether `path` lies on a bpffs mount.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
    // SAFETY: statfs(2) on a NUL-terminated path into a zeroed struct it fills.
    let mut stats: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    if unsafe { libc::statfs(path.as_ptr(), &raw mut stats) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // f_type's width and signedness differ between architectures; the
    // magic fits in 32 bits on all of them.
    Ok(stats.f_type as u32 == BPF_FS_MAGIC)
}

/// Mounts bpffs at [`ROOT`] unless it is already a bpffs mount; returns
/// whether it mounted one.
pub fn ensure_mounted() -> anyhow::Result<bool> {
    let root = Path::new(ROOT);
    match is_bpffs(root) {
        Ok(true) => return Ok(false),
        Ok(false) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            bail!("there is no {ROOT} to mount bpffs on (is sysfs mounted at /sys?)")
        }
        Err(err) => return Err(err).with_context(|| format!("statfs {ROOT}")),
    }
    let source = c"bpffs";
    let target = c"/sys/fs/bpf";
    let fstype = c"bpf";
    let options = c"mode=0700";
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| {
            format!(
                "{ROOT} is not a bpffs mount, and mounting one there failed (needs CAP_SYS_ADMIN)"
            )
        });
    }
    tracing::warn!(
        path = ROOT,
        "mounted bpffs: none was mounted in this mount namespace (`ip netns exec` remounts \
         /sys; a pod may lack it). Its pins, and the dataplane with them, last only as long \
         as this mount namespace; mount the host's bpffs at {ROOT} for a dataplane that \
         outlives the agent (hitless restarts)"
    );
    Ok(true)
}
