#!/usr/bin/env bash
# Kube-OVN's liveness probe for the bfdd container (v1.15.20-22), as its
# own script: fails while no peer has opened a session.

set -euo pipefail

output="$(bfdd-control status)"

# bfdd-control exits successfully when the daemon is reachable even if the
# local BFD session table is empty, so inspect its output explicitly.
if grep -q '^There are 0 sessions:' <<< "${output}"; then
  printf '%s\n' "${output}" >&2
  exit 1
fi
