#!/usr/bin/env bash
# Kube-OVN's VpcNatGateway script, served by egress-agent instead of
# iptables. The controller runs `bash /kube-ovn/nat-gateway.sh <verb> <rule>...`
# in the gateway pod and counts a non-zero exit or any output on stderr as
# failure; egress-agent writes to stderr only when a verb failed, and why.
# Verbs: init, subnet-route-add|del, eip-add|del, snat-add|del, dnat-add|del,
# floating-ip-add|del, get-iptables-version (QoS verbs are refused).
# State: /etc/egress/nat-gateway (EGRESS_NAT_GATEWAY_DIR): the rule set, the
# agent's configuration, its log and pid.
exec egress-agent kube-ovn nat-gateway "$@"
