//! Where the programs' time goes: `perf record` samples the kernel, with
//! call chains, while this thread runs a program through
//! BPF_PROG_TEST_RUN. Samples taken inside the program (the JITed program
//! on the stack) are split by the function that was running (the program
//! itself, map lookups and updates, helpers), and the program's time per
//! packet, measured without perf, is shared out in those proportions. The syscall and
//! test-run scaffolding around the program is left out: it is not part of
//! forwarding.
//!
//! Virtual machines often expose no hardware counters, so the clock is the
//! software `cpu-clock` event, kernel side only, at a rate low enough that
//! its own interrupts do not skew the picture: it says where the time goes,
//! not why a cache line was cold.

use std::{
    os::unix::process::ExitStatusExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// One kernel function's share of a profiled path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Function {
    pub function: String,
    pub ns_per_packet: f64,
    pub share: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Profile {
    pub path: String,
    pub packets: u64,
    /// The program's own time per packet, from BPF_PROG_TEST_RUN without
    /// perf running.
    pub ns_per_packet: f64,
    /// Samples taken inside the program.
    pub samples: u64,
    pub functions: Vec<Function>,
}

const SAMPLE_HZ: &str = "2000";
/// Functions below this share are folded into "other".
const MIN_SHARE: f64 = 0.01;

/// Whether `perf` can sample here; `None` if it can, else why not.
pub fn unavailable() -> Option<String> {
    match Command::new("perf")
        .args([
            "record",
            "-q",
            "-e",
            "cpu-clock:k",
            "-o",
            "/dev/null",
            "--",
            "true",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "perf cannot sample: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(err) => Some(format!("perf is not installed ({err})")),
    }
}

struct Recorder {
    child: Child,
    data: PathBuf,
}

impl Recorder {
    /// Starts sampling the calling thread.
    fn start() -> anyhow::Result<Self> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let data = std::env::temp_dir().join(format!("egress-bench-{tid}.perf"));
        let mut child = egress_tests::cleanup::signals_unblocked(&mut Command::new("perf"))
            .args(["record", "-q", "-g", "-e", "cpu-clock:k", "-F", SAMPLE_HZ])
            .args(["-t", &tid.to_string(), "-o"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting perf record")?;
        // perf opens its events a few milliseconds after it starts; the
        // thread is idle meanwhile, so an early start costs nothing.
        std::thread::sleep(Duration::from_millis(500));
        if let Some(status) = child.try_wait()? {
            let mut stderr = String::new();
            use std::io::Read as _;
            if let Some(mut err) = child.stderr.take() {
                let _ = err.read_to_string(&mut stderr);
            }
            bail!("perf record exited at once ({status}): {}", stderr.trim());
        }
        Ok(Self { child, data })
    }

    /// Stops sampling; per function running inside the program, its samples.
    fn finish(mut self) -> anyhow::Result<Vec<(String, u64)>> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait()?;
        // perf writes its data, then dies of the signal it was stopped by.
        anyhow::ensure!(
            status.success() || status.signal() == Some(libc::SIGINT),
            "perf record failed: {status}"
        );
        let out = Command::new("perf")
            .args(["script", "-F", "ip,sym", "-i"])
            .arg(&self.data)
            .output()
            .context("running perf script")?;
        let _ = std::fs::remove_file(&self.data);
        anyhow::ensure!(
            out.status.success(),
            "perf script failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(inside_program(&String::from_utf8_lossy(&out.stdout)))
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `perf script -F ip,sym` call chains (one block per sample, the
/// running function first, blank lines between) and counts, per running
/// function, the samples whose chain passes through a JITed program.
fn inside_program(text: &str) -> Vec<(String, u64)> {
    let mut counts = std::collections::BTreeMap::<String, u64>::new();
    for sample in text.split("\n\n") {
        let frames: Vec<&str> = sample
            .lines()
            .filter_map(|line| line.split_whitespace().nth(1))
            .collect();
        let Some(running) = frames.first() else {
            continue;
        };
        if frames.iter().any(|f| jited_program(f).is_some()) {
            *counts.entry(readable(running)).or_default() += 1;
        }
    }
    counts.into_iter().collect()
}

/// JITed programs appear as `bpf_prog_<16 hex digit tag>_<name>` (the tag
/// changes with every build); the name, for such a symbol.
fn jited_program(symbol: &str) -> Option<&str> {
    let rest = symbol.strip_prefix("bpf_prog_")?;
    let (tag, name) = (rest.get(..16)?, rest.get(16..)?.strip_prefix('_')?);
    tag.bytes().all(|b| b.is_ascii_hexdigit()).then_some(name)
}

fn readable(symbol: &str) -> String {
    jited_program(symbol).map_or_else(|| symbol.to_owned(), |name| format!("BPF program {name}"))
}

/// Profiles `run` (called `calls` times, each running `packets_per_call`
/// packets through a program) as the path named `path`, whose cost per
/// packet measured without perf is `ns_per_packet`. Sampling slows the
/// program down (each sample is an interrupt, costly in a virtual machine),
/// so the profile gives the proportions and the unprofiled figure the scale.
pub fn record(
    path: &str,
    ns_per_packet: f64,
    calls: u64,
    packets_per_call: u64,
    mut run: impl FnMut(u64),
) -> anyhow::Result<Profile> {
    let recorder = Recorder::start()?;
    for call in 0..calls {
        run(call);
    }
    let sampled = recorder.finish()?;
    let packets = calls * packets_per_call;
    let samples: u64 = sampled.iter().map(|(_, n)| n).sum();
    anyhow::ensure!(
        samples > 0,
        "perf took no samples inside the program for {path}"
    );
    let mut functions = Vec::new();
    let mut other = 0;
    for (function, n) in sampled {
        let share = n as f64 / samples as f64;
        if share >= MIN_SHARE {
            functions.push(Function {
                function,
                ns_per_packet: share * ns_per_packet,
                share,
            });
        } else {
            other += n;
        }
    }
    functions.sort_by(|a, b| b.share.total_cmp(&a.share));
    if other > 0 {
        let share = other as f64 / samples as f64;
        functions.push(Function {
            function: "other".into(),
            ns_per_packet: share * ns_per_packet,
            share,
        });
    }
    Ok(Profile {
        path: path.into(),
        packets,
        ns_per_packet,
        samples,
        functions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_samples_inside_a_program() {
        let text = "\
\tffffffff8158c3ff bpf_prog_test_run_xdp

\tffffffff8158c3ff htab_lru_map_update_elem
\tffffffffc0001234 bpf_prog_0123456789abcdef_snat_outbound
\tffffffff81000000 bpf_test_run

\tffffffffc0001240 bpf_prog_0123456789abcdef_snat_outbound
\tffffffff81000000 bpf_test_run

\tffffffff81001000 _copy_from_user
\tffffffff81002000 __sys_bpf

\tffffffff8158c3ff htab_lru_map_update_elem
\tffffffffc0001234 bpf_prog_0123456789abcdef_snat_outbound
";
        assert_eq!(
            inside_program(text),
            vec![
                ("BPF program snat_outbound".to_owned(), 1),
                ("htab_lru_map_update_elem".to_owned(), 2),
            ]
        );
    }
}
