#!/usr/bin/env bash
# Installs everything the build, the tests, the demo and the benchmark need on a
# fresh Debian 12 machine. Idempotent: each step checks before it acts, so a second
# run costs a few seconds. Needs root (apt, bpffs).
set -euo pipefail

log() { printf '[install-deps] %s\n' "$*" >&2; }

APT_PACKAGES=(
  # Rust with library sources (build-std=core for the BPF target) and LLVM 22 for bpf-linker.
  rustc-web cargo-web rust-web-src rust-web-clippy
  llvm-22-dev libclang-22-dev libpolly-22-dev libzstd-dev zlib1g-dev
  # Network plumbing used by the agent's tests, the demo and the benchmark.
  iproute2 iputils-ping iputils-arping iptables nftables conntrack ethtool tcpdump iperf3 curl
  # Independent BFD peers for the HA tests; bpftool detaches links in tests;
  # perf profiles the programs in the benchmark.
  frr bird2 bpftool linux-perf
  # Independent IPFIX collector (nfcapd, nfdump) for the audit exporter's tests.
  nfdump
  # promtool checks the agent's /metrics the way Prometheus parses it.
  prometheus
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The packaged daemons must not run on their own: tests start their own instances.
  for svc in frr bird nfdump prometheus prometheus-node-exporter; do
    systemctl disable --now "$svc" >/dev/null 2>&1 || true
  done
else
  log "Debian packages present"
fi

export PATH="$HOME/.cargo/bin:$PATH"

# The BPF crate is compiled by Debian's rustc (it ships rust-src); rustup only needs to know its name.
if ! rustup toolchain list | grep -q '^debian-web'; then
  log "registering Debian's rustc as rustup toolchain 'debian-web'"
  rustup toolchain link debian-web /usr
fi

# bpf-linker must use an LLVM at least as new as the compiler's (rustc 1.96 -> LLVM 22).
linker_libs=$(command -v bpf-linker >/dev/null 2>&1 && ldd "$(command -v bpf-linker)" 2>/dev/null || true)
if [[ "$linker_libs" != *libLLVM.so.22* ]]; then
  log "building bpf-linker against LLVM 22 (about 4 minutes, once)"
  PATH=/usr/lib/llvm-22/bin:$PATH LLVM_PREFIX=/usr/lib/llvm-22 \
    cargo install --locked bpf-linker --version 0.13.0 --no-default-features --features llvm-22
else
  log "bpf-linker present: $(bpf-linker --version | head -1), linked against LLVM 22"
fi

if ! mountpoint -q /sys/fs/bpf; then
  log "mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi
log "done"
