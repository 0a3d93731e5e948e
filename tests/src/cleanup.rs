//! Cleanup when a long-running program (the demo, the benchmark) is
//! interrupted: destructors do not run on SIGINT, so a thread waits for the
//! signal and undoes what the registries list: agents first (each removes
//! its own pins and addresses on SIGTERM), then namespaces.

use std::time::{Duration, Instant};

use crate::{agent, netns};

/// Blocks SIGINT and SIGTERM in every thread and handles them on one.
/// Call first thing in `main`, before any thread exists.
pub fn on_signal() {
    // SAFETY: signal-mask manipulation with a locally built set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
        std::thread::spawn(move || {
            let mut signal = 0;
            libc::sigwait(&raw const set, &raw mut signal);
            eprintln!("\ninterrupted: stopping agents and removing namespaces");
            undo_everything();
            std::process::exit(130);
        });
    }
}

fn undo_everything() {
    let pids: Vec<u32> = agent::LIVE.lock().map(|l| l.clone()).unwrap_or_default();
    for pid in &pids {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(*pid as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for pid in &pids {
        while Instant::now() < deadline {
            // SAFETY: reaping our own child without blocking.
            let done = unsafe { libc::waitpid(*pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
            if done != 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let names: Vec<String> = netns::LIVE.lock().map(|l| l.clone()).unwrap_or_default();
    for name in names {
        netns::delete(&name);
    }
}

/// Lets a child receive the signals `on_signal` blocked (a blocked mask is
/// inherited across exec, and a child that cannot see SIGINT never stops).
pub fn signals_unblocked(command: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: sigprocmask(2) is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&raw mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &raw const none, std::ptr::null_mut());
            Ok(())
        })
    }
}
