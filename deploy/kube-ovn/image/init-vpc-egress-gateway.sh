#!/bin/bash
# Kube-OVN's VpcEgressGateway init script, with the NAT served by the egress
# eBPF dataplane instead of iptables. The controller runs it in the gateway
# pod's privileged init container:
#   bash -exc "chmod +t /usr/local/sbin && bash /kube-ovn/init-vpc-egress-gateway.sh"
# with INTERNAL_GATEWAY_IPV4/6, EXTERNAL_GATEWAY_IPV4/6 and
# NO_SNAT_SOURCES_IPV4/6 in its environment. Forwarding, rp_filter, the
# policy routing (table 1000, rules 1001-1004) and EVPN are Kube-OVN's, kept
# as its script does them. Where Kube-OVN adds one MASQUERADE --random-fully
# for everything entering from the internal interface except the no-SNAT
# sources, this attaches the dataplane with that translation: it keeps
# serving after this container exits, with no process (netlink TC filters;
# flows expire in the dataplane). IPv4, IPv6 and dual-stack gateways are
# served; a dual-stack one is one attach with an egress address per family.

set -ex

INTERNAL_GATEWAY_IPV4=${INTERNAL_GATEWAY_IPV4:-}
INTERNAL_GATEWAY_IPV6=${INTERNAL_GATEWAY_IPV6:-}
EXTERNAL_GATEWAY_IPV4=${EXTERNAL_GATEWAY_IPV4:-}
EXTERNAL_GATEWAY_IPV6=${EXTERNAL_GATEWAY_IPV6:-}
NO_SNAT_SOURCES_IPV4=${NO_SNAT_SOURCES_IPV4:-}
NO_SNAT_SOURCES_IPV6=($(echo "${NO_SNAT_SOURCES_IPV6:-}" | tr ',' ' '))
ENABLE_BGP=${ENABLE_BGP:-}
ENABLE_EVPN=${ENABLE_EVPN:-}
VNI=${VNI:-}

sysctl -w net.ipv4.ip_forward=1
sysctl -w net.ipv6.conf.all.forwarding=1

egress-agent --version

internal_iface="eth0"
external_iface="net1"

attach_args=()

# Kube-OVN's policy routing for one family (-4 or -6): replies to the
# internal side through table 1000, the pod's own traffic by its source.
# Sets internal_iface/external_iface and adds the family's egress address
# and no-SNAT sources to attach_args.
policy_routing() {
  local family=$1 internal_gateway=$2 external_gateway=$3 no_snat=$4
  local internal_ip external_ip
  internal_ip=`ip -o route get "${internal_gateway}" | grep -o 'src [^ ]*' | awk '{print $2}'`
  external_ip=`ip -o route get "${external_gateway}" | grep -o 'src [^ ]*' | awk '{print $2}'`
  internal_iface=`ip -o route get "${internal_gateway}" | grep -o 'dev [^ ]*' | awk '{print $2}'`
  external_iface=`ip -o route get "${external_gateway}" | grep -o 'dev [^ ]*' | awk '{print $2}'`
  ip "${family}" route replace default via "${internal_gateway}" table 1000
  for priority in 1001 1002 1003 1004; do
    if [ -n "`ip "${family}" rule show priority ${priority}`" ]; then
      ip "${family}" rule del priority "${priority}"
    fi
  done
  ip "${family}" rule add priority 1001 iif "${internal_iface}" lookup default
  ip "${family}" rule add priority 1002 iif "${external_iface}" lookup 1000
  ip "${family}" rule add priority 1003 iif lo from "${internal_ip}" lookup 1000
  ip "${family}" rule add priority 1004 iif lo from "${external_ip}" lookup default
  attach_args+=(--egress-ip "${external_ip}" --no-snat "${no_snat}")
}

if [ "${ENABLE_BGP}" != "true" ]; then
  if [ -n "${INTERNAL_GATEWAY_IPV4}" ] && [ -n "${EXTERNAL_GATEWAY_IPV4}" ]; then
    policy_routing -4 "${INTERNAL_GATEWAY_IPV4}" "${EXTERNAL_GATEWAY_IPV4}" "${NO_SNAT_SOURCES_IPV4}"
  fi
  if [ -n "${INTERNAL_GATEWAY_IPV6}" ] && [ -n "${EXTERNAL_GATEWAY_IPV6}" ]; then
    policy_routing -6 "${INTERNAL_GATEWAY_IPV6}" "${EXTERNAL_GATEWAY_IPV6}" \
      "$(echo ${NO_SNAT_SOURCES_IPV6[*]} | tr ' ' ',')"
  fi

  # Kube-OVN: MASQUERADE --random-fully (ip6tables' too) of everything
  # from the internal interface, RETURN for the no-SNAT sources. Here: the
  # dataplane, both families in one attach.
  if [ ${#attach_args[@]} -gt 0 ]; then
    egress-agent kube-ovn attach-egress-gateway \
      --internal "${internal_iface}" \
      --external "${external_iface}" \
      "${attach_args[@]}"
  fi
fi

sysctl net/ipv4/conf/${internal_iface}/rp_filter=0

if [ "${ENABLE_EVPN}" = "true" ] && [ -n "${VNI}" ]; then
  vrf_name="vrf-vpn"
  bridge_name="br-vpn"
  vxlan_name="vxlan-vpn"
  vrf_table=2000

  if ! ip link show "${vrf_name}" &>/dev/null; then
    ip link add "${vrf_name}" type vrf table "${vrf_table}"
    ip link set "${vrf_name}" up
  fi

  if ! ip link show "${bridge_name}" &>/dev/null; then
    ip link add "${bridge_name}" type bridge
    ip link set "${bridge_name}" master "${vrf_name}"
    ip link set "${bridge_name}" up
  fi

  if ! ip link show "${vxlan_name}" &>/dev/null; then
    vxlan_local_ip=$(ip -4 -o addr show dev "${external_iface}" 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -1)
    if [ -z "${vxlan_local_ip}" ]; then
      vxlan_local_ip=$(ip -6 -o addr show dev "${external_iface}" 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -1)
    fi
    if [ -n "${vxlan_local_ip}" ]; then
      ip link add "${vxlan_name}" type vxlan id "${VNI}" dstport 4789 local "${vxlan_local_ip}"
      ip link set "${vxlan_name}" master "${bridge_name}"
      ip link set "${vxlan_name}" up
    fi
  fi

  if [ "$(ip link show dev eth0 | grep -c 'master vrf-vpn')" -eq 0 ]; then
    ip link set eth0 master "${vrf_name}"
  fi

  for src in $(echo "${NO_SNAT_SOURCES_IPV4}" | tr ',' ' '); do
    if [ -z "$(ip route show "${src}" table "${vrf_table}" 2>/dev/null)" ]; then
      ip route add "${src}" via "${INTERNAL_GATEWAY_IPV4}" dev eth0 table "${vrf_table}"
    fi
  done
  for src in ${NO_SNAT_SOURCES_IPV6[*]}; do
    if [ -z "$(ip -6 route show "${src}" table "${vrf_table}" 2>/dev/null)" ]; then
      ip -6 route add "${src}" via "${INTERNAL_GATEWAY_IPV6}" dev eth0 table "${vrf_table}"
    fi
  done
fi
