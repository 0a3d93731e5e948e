//! What configuration the running agent applied last, for whoever changes
//! the file and must know when the change serves (the Kube-OVN NAT
//! gateway's verbs, which the controller counts as done when they exit).
//!
//! After its start and after every SIGHUP the agent writes
//! `/run/<instance>/applied.json`: a digest of the file it read and
//! whether that reading now serves or was refused, and why. A caller
//! writes the file, sends SIGHUP and waits for a record carrying its
//! file's digest.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::instance::Instance;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// [`digest`] of the configuration file as the agent read it.
    pub digest: String,
    /// Why it does not serve; `None` when it does.
    pub error: Option<String>,
}

pub fn path(instance: &Instance) -> PathBuf {
    instance.run_dir.join("applied.json")
}

/// FNV-1a over the file's bytes: not a security boundary, only "is this
/// the file I wrote", between processes running the same binary.
pub fn digest(bytes: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// The digest of the file at `config` now (empty when unreadable: no
/// caller waits for that).
pub fn digest_of(config: &Path) -> String {
    std::fs::read(config).map_or_else(|_| String::new(), |bytes| digest(&bytes))
}

/// Records the outcome of reading the file whose digest is `digest`.
pub fn record(instance: &Instance, digest: String, error: Option<String>) {
    let written = (|| {
        let record = serde_json::to_vec(&Applied { digest, error })?;
        let path = path(instance);
        let partial = path.with_extension("json.partial");
        std::fs::write(&partial, record)
            .with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, &path).with_context(|| format!("renaming to {}", path.display()))
    })();
    if let Err(err) = written {
        tracing::warn!(error = %format!("{err:#}"), "recording the applied configuration");
    }
}

/// The last record, if any.
pub fn read(instance: &Instance) -> Option<Applied> {
    let bytes = std::fs::read(path(instance)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_tell_files_apart_and_agree_on_the_same_bytes() {
        assert_eq!(digest(b"tenants: []\n"), digest(b"tenants: []\n"));
        assert_ne!(digest(b"tenants: []\n"), digest(b"tenants: [] \n"));
        assert_eq!(digest(b"").len(), 16);
    }
}
