#!/bin/bash
# Kube-OVN up to v1.15.22 runs `bash /kube-ovn/start-bfdd.sh` as the bfdd
# container (OpenBFDD's bfdd-beacon listening on each of POD_IPS). The
# responder reads POD_IPS, BFD_PEER_IPS, BFD_MIN_TX, BFD_MIN_RX and BFD_MULTI
# itself; bfdd-prestart.sh then sets the same values through bfdd-control.

set -ex

if [ -z "${BFDD_SUPERVISOR_SOCKET:-}" ]; then
  # Older pods have no emptyDir for the control socket, and the container
  # runs as nobody: use /tmp when the usual directory cannot be made.
  dir=/var/run/kube-ovn/bfdd-supervisor
  if ! { mkdir -p "${dir}" 2>/dev/null && [ -w "${dir}" ]; }; then
    dir=/tmp/kube-ovn-bfdd-supervisor
  fi
  export BFDD_SUPERVISOR_SOCKET="${dir}/control.sock"
fi

exec egress-agent kube-ovn bfdd-supervisor run
