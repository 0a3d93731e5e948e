//! The dataplane's maps seen from userspace, through their pins.
//!
//! [`Maps::open`] works the same for the agent that just loaded the object
//! and for `egress-agent status` reading what a running (or crashed) agent
//! left pinned. [`Maps::sync`] writes a [`DesiredState`] so that a packet in
//! flight never sees a half-configured tenant: new entries are added before
//! the classifier points at them and removed only after it stops doing so.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use anyhow::{Context as _, bail};
use aya::maps::{
    Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key,
};
use egress_common::{
    config::{
        CONFIG_F_FLOW_EVENTS, CONFIG_F_INGRESS_PORTS, DataplaneConfig, InterfaceInfo,
        ROLE_EXTERNAL, ROLE_INTERNAL,
    },
    counters::Counter,
    flow::{
        FlowEntryV4, FlowEntryV6, FlowKeyV4, FlowKeyV6, FragEntryV4, FragEntryV6, FragKeyV4,
        FragKeyV6,
    },
    inbound::{FloatingKeyV4, FloatingKeyV6, ForwardKeyV4, ForwardKeyV6, ForwardV4, ForwardV6},
    names,
    sweep::SelfSweep,
    tenant::{
        ANY_PORT, IngressPortKey, MAX_EGRESS_ADDRS, MAX_TENANT_ID, MAX_TENANTS, PORT_PREFIX_BITS,
        SourceKeyV4, SourceKeyV6, TENANT_F_ACTIVE, TENANT_F_FLOATING, TENANT_F_FORWARDS,
        TENANT_NAME_LEN, TenantEgressV6, TenantInfo, TenantName, TenantUsage,
    },
};

use super::batch;
use crate::config::{IngressPort, Resolved};

/// Typed handles on every pinned map.
pub struct Maps {
    pub sources: LpmTrie<MapData, SourceKeyV4, u32>,
    pub ingress_ports: HashMap<MapData, IngressPortKey, u32>,
    pub tenants: Array<MapData, TenantInfo>,
    pub tenant_names: Array<MapData, TenantName>,
    pub egress: HashMap<MapData, [u8; 4], u32>,
    pub conntrack: HashMap<MapData, FlowKeyV4, FlowEntryV4>,
    pub frags: HashMap<MapData, FragKeyV4, FragEntryV4>,
    /// IPv6 sources -> tenant id, as `sources`.
    pub sources_v6: LpmTrie<MapData, SourceKeyV6, u32>,
    /// Tenant id -> its IPv6 egress addresses (their count: `TenantInfo`).
    pub tenant_egress_v6: Array<MapData, TenantEgressV6>,
    /// IPv6 egress address -> tenant id, as `egress`.
    pub egress_v6: HashMap<MapData, [u8; 16], u32>,
    /// Both halves of every IPv6 flow, as `conntrack`.
    pub conntrack_v6: HashMap<MapData, FlowKeyV6, FlowEntryV6>,
    /// IPv6 first fragments' translations, as `frags`.
    pub frags_v6: HashMap<MapData, FragKeyV6, FragEntryV6>,
    pub interfaces: HashMap<MapData, u32, InterfaceInfo>,
    pub config: Array<MapData, DataplaneConfig>,
    pub counters: PerCpuArray<MapData, u64>,
    /// Per tenant: flows created, new flows refused (the programs write it).
    pub usage: Array<MapData, TenantUsage>,
    /// Per tenant: flows ended (only the agent writes it).
    pub ended: Array<MapData, u64>,
    /// Port forwards and floating IPs.
    pub forwards: HashMap<MapData, ForwardKeyV4, ForwardV4>,
    /// Hosts with a floating IP -> that address.
    pub floating: HashMap<MapData, FloatingKeyV4, [u8; 4]>,
    /// The same for IPv6.
    pub forwards_v6: HashMap<MapData, ForwardKeyV6, ForwardV6>,
    pub floating_v6: HashMap<MapData, FloatingKeyV6, [u8; 16]>,
    /// Sources the leak guard lets out untranslated.
    pub routed: LpmTrie<MapData, [u8; 4], u32>,
    /// The same for IPv6.
    pub routed_v6: LpmTrie<MapData, [u8; 16], u32>,
    /// Flow expiry by the programs (idle while an agent sweeps).
    pub self_sweep: Array<MapData, SelfSweep>,
    /// Entries each family's conntrack map can hold (two per flow; both
    /// tables are sized from the one `conntrack.maxFlows`).
    pub conntrack_capacity: u32,
}

fn open_pinned(dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("pinned map {}", path.display()))
}

macro_rules! typed {
    ($dir:expr, $name:expr) => {
        open_pinned($dir, $name)?
            .try_into()
            .with_context(|| format!("pinned map {} has an unexpected type or layout", $name))?
    };
}

impl Maps {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            sources: typed!(pin_dir, names::TENANT_SOURCES_V4),
            ingress_ports: typed!(pin_dir, names::INGRESS_PORTS),
            tenants: typed!(pin_dir, names::TENANTS),
            tenant_names: typed!(pin_dir, names::TENANT_NAMES),
            egress: typed!(pin_dir, names::EGRESS_ADDRS_V4),
            conntrack: typed!(pin_dir, names::CONNTRACK_V4),
            frags: typed!(pin_dir, names::FRAGS_V4),
            sources_v6: typed!(pin_dir, names::TENANT_SOURCES_V6),
            tenant_egress_v6: typed!(pin_dir, names::TENANT_ADDRS_V6),
            egress_v6: typed!(pin_dir, names::EGRESS_ADDRS_V6),
            conntrack_v6: typed!(pin_dir, names::CONNTRACK_V6),
            frags_v6: typed!(pin_dir, names::FRAGS_V6),
            interfaces: typed!(pin_dir, names::INTERFACES),
            config: typed!(pin_dir, names::CONFIG),
            counters: typed!(pin_dir, names::COUNTERS),
            usage: typed!(pin_dir, names::TENANT_USAGE),
            ended: typed!(pin_dir, names::TENANT_ENDED),
            forwards: typed!(pin_dir, names::PORT_FORWARDS_V4),
            floating: typed!(pin_dir, names::FLOATING_V4),
            forwards_v6: typed!(pin_dir, names::PORT_FORWARDS_V6),
            floating_v6: typed!(pin_dir, names::FLOATING_V6),
            routed: typed!(pin_dir, names::ROUTED_SOURCES_V4),
            routed_v6: typed!(pin_dir, names::ROUTED_SOURCES_V6),
            self_sweep: typed!(pin_dir, names::SELF_SWEEP),
            conntrack_capacity: aya::maps::MapInfo::from_pin(pin_dir.join(names::CONNTRACK_V4))
                .context("inspecting the conntrack map")?
                .max_entries(),
        })
    }

    /// A tenant's egress addresses as the maps hold them, IPv4 then IPv6
    /// (`info` is its `TENANTS` value, already read).
    pub fn egress_addresses(&self, id: u32, info: &TenantInfo) -> Vec<std::net::IpAddr> {
        let v4 = (info.egress_v4_count as usize).min(info.egress_v4.len());
        let mut addrs: Vec<std::net::IpAddr> = info.egress_v4[..v4]
            .iter()
            .map(|a| std::net::Ipv4Addr::from(*a).into())
            .collect();
        if info.egress_v6_count > 0
            && let Ok(v6) = self.tenant_egress_v6.get(&id, 0)
        {
            let count = (info.egress_v6_count as usize).min(v6.addrs.len());
            addrs.extend(
                v6.addrs[..count]
                    .iter()
                    .map(|a| std::net::IpAddr::from(std::net::Ipv6Addr::from(*a))),
            );
        }
        addrs
    }

    /// Tenant ids in use, by name, as the maps record them.
    pub fn tenant_ids(&self) -> anyhow::Result<BTreeMap<String, u16>> {
        let mut ids = BTreeMap::new();
        for id in 1..=MAX_TENANT_ID {
            let info = self.tenants.get(&id, 0).context("reading TENANTS")?;
            if info.flags & TENANT_F_ACTIVE == 0 {
                continue;
            }
            let name = self
                .tenant_names
                .get(&id, 0)
                .context("reading TENANT_NAMES")?;
            ids.insert(decode_name(&name), id as u16);
        }
        Ok(ids)
    }

    /// Every tenant id's usage and ended count, index = tenant id.
    pub fn tenant_usage(&self) -> anyhow::Result<Vec<(TenantUsage, u64)>> {
        let usage: Vec<(u32, TenantUsage)> =
            batch::array_elements(self.usage.map()).context("reading TENANT_USAGE")?;
        let ended: Vec<(u32, u64)> =
            batch::array_elements(self.ended.map()).context("reading TENANT_ENDED")?;
        let mut all = vec![(TenantUsage::default(), 0); MAX_TENANTS as usize];
        for (id, value) in usage {
            if let Some(slot) = all.get_mut(id as usize) {
                slot.0 = value;
            }
        }
        for (id, value) in ended {
            if let Some(slot) = all.get_mut(id as usize) {
                slot.1 = value;
            }
        }
        Ok(all)
    }

    /// Records that the agent ended `count` flows of each tenant, so the
    /// dataplane's quota sees their room again.
    pub fn add_ended(&mut self, ended: &BTreeMap<u16, u64>) -> anyhow::Result<()> {
        for (&tenant, &count) in ended {
            let id = u32::from(tenant);
            let before = self.ended.get(&id, 0).context("reading TENANT_ENDED")?;
            self.ended
                .set(id, before + count, 0)
                .context("writing TENANT_ENDED")?;
        }
        Ok(())
    }

    /// Sets every tenant's ended count so that created minus ended is the
    /// number of flows it holds in `flows` (outbound halves by tenant, taken
    /// after `usage` was read). Used when the agent adopts maps it did not
    /// keep itself (a restart after a crash): flows created between the two
    /// reads count as held until the next adoption, erring towards the
    /// quota, never beyond it.
    pub fn reconcile_ended(
        &mut self,
        usage: &[(TenantUsage, u64)],
        held: &BTreeMap<u16, u64>,
    ) -> anyhow::Result<()> {
        for (id, (usage, ended)) in usage.iter().enumerate() {
            let held = held.get(&(id as u16)).copied().unwrap_or(0);
            let want = usage.created.saturating_sub(held);
            if want != *ended {
                self.ended
                    .set(id as u32, want, 0)
                    .context("writing TENANT_ENDED")?;
            }
        }
        Ok(())
    }

    /// Sums each counter over all CPUs.
    pub fn counters(&self) -> anyhow::Result<Vec<(Counter, u64)>> {
        Counter::ALL
            .iter()
            .map(|&counter| {
                let per_cpu = self
                    .counters
                    .get(&(counter as u32), 0)
                    .context("reading COUNTERS")?;
                Ok((counter, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Writes `desired`, adding before removing so traffic of tenants that
    /// did not change is never disturbed.
    pub fn sync(&mut self, desired: &DesiredState) -> anyhow::Result<()> {
        // 1. Everything a classified packet will look up, before the
        //    classifier can return it. A tenant's IPv6 addresses before the
        //    count in TENANTS that says how many of them to use; emptied
        //    only once the count is 0 (below).
        let no_v6 = TenantEgressV6::default();
        for (id, addrs) in desired.tenant_egress_v6.iter().filter(|(_, a)| *a != no_v6) {
            self.tenant_egress_v6
                .set(u32::from(*id), addrs, 0)
                .context("writing TENANT_ADDR_V6")?;
        }
        for (id, info, name) in &desired.tenants {
            let id = u32::from(*id);
            self.tenant_names
                .set(id, name, 0)
                .context("writing TENANT_NAMES")?;
            self.tenants.set(id, info, 0).context("writing TENANTS")?;
        }
        for (ifindex, info) in &desired.interfaces {
            self.interfaces
                .insert(ifindex, info, 0)
                .context("writing INTERFACES")?;
        }
        for (addr, tenant) in &desired.egress {
            self.egress
                .insert(addr, tenant, 0)
                .context("writing EGRESS_ADDR_V4")?;
        }
        for (addr, tenant) in &desired.egress_v6 {
            self.egress_v6
                .insert(addr, tenant, 0)
                .context("writing EGRESS_ADDR_V6")?;
        }
        for (key, port) in &desired.ingress_ports {
            self.ingress_ports
                .insert(key, port, 0)
                .context("writing INGRESS_PORTS")?;
        }
        for (key, forward) in &desired.forwards {
            self.forwards
                .insert(key, forward, 0)
                .context("writing PORT_FWD_V4")?;
        }
        for (key, addr) in &desired.floating {
            self.floating
                .insert(key, addr, 0)
                .context("writing FLOATING_V4")?;
        }
        for (key, forward) in &desired.forwards_v6 {
            self.forwards_v6
                .insert(key, forward, 0)
                .context("writing PORT_FWD_V6")?;
        }
        for (key, addr) in &desired.floating_v6 {
            self.floating_v6
                .insert(key, addr, 0)
                .context("writing FLOATING_V6")?;
        }
        // The flow-events bit belongs to the translation log's pipeline,
        // which sets it while anyone wants records.
        let events = self
            .config
            .get(&0, 0)
            .map_or(0, |c| c.flags & CONFIG_F_FLOW_EVENTS);
        let mut config = desired.config;
        config.flags = (config.flags & !CONFIG_F_FLOW_EVENTS) | events;
        self.config.set(0, config, 0).context("writing DP_CONFIG")?;
        // 2. Point the classifier at them.
        for (key, tenant) in &desired.sources {
            self.sources
                .insert(key, tenant, 0)
                .context("writing TENANT_SRC_V4")?;
        }
        for (key, tenant) in &desired.sources_v6 {
            self.sources_v6
                .insert(key, tenant, 0)
                .context("writing TENANT_SRC_V6")?;
        }
        for net in &desired.routed {
            self.routed
                .insert(
                    &Key::new(u32::from(net.prefix_len()), net.addr().octets()),
                    1,
                    0,
                )
                .context("writing ROUTED_SRC_V4")?;
        }
        for net in &desired.routed_v6 {
            self.routed_v6
                .insert(
                    &Key::new(u32::from(net.prefix_len()), net.addr().octets()),
                    1,
                    0,
                )
                .context("writing ROUTED_SRC_V6")?;
        }
        // 3. Remove what is no longer wanted, classifier first.
        prune_trie(
            &mut self.sources,
            desired.sources.iter().map(|(k, _)| lpm_key_bytes(k)),
            "TENANT_SRC_V4",
        )?;
        prune_trie(
            &mut self.sources_v6,
            desired.sources_v6.iter().map(|(k, _)| lpm_key_bytes(k)),
            "TENANT_SRC_V6",
        )?;
        prune_trie(
            &mut self.routed,
            desired
                .routed
                .iter()
                .map(|net| (u32::from(net.prefix_len()), net.addr().octets())),
            "ROUTED_SRC_V4",
        )?;
        prune_trie(
            &mut self.routed_v6,
            desired
                .routed_v6
                .iter()
                .map(|net| (u32::from(net.prefix_len()), net.addr().octets())),
            "ROUTED_SRC_V6",
        )?;
        prune(
            &mut self.ingress_ports,
            desired.ingress_ports.iter().map(|(k, _)| *k),
            "INGRESS_PORTS",
        )?;
        // Rules before the addresses they are on: a packet to a withdrawn
        // address opens nothing meanwhile.
        prune(
            &mut self.forwards,
            desired.forwards.iter().map(|(k, _)| *k),
            "PORT_FWD_V4",
        )?;
        prune(
            &mut self.floating,
            desired.floating.iter().map(|(k, _)| *k),
            "FLOATING_V4",
        )?;
        prune(
            &mut self.forwards_v6,
            desired.forwards_v6.iter().map(|(k, _)| *k),
            "PORT_FWD_V6",
        )?;
        prune(
            &mut self.floating_v6,
            desired.floating_v6.iter().map(|(k, _)| *k),
            "FLOATING_V6",
        )?;
        prune(
            &mut self.egress,
            desired.egress.iter().map(|(k, _)| *k),
            "EGRESS_ADDR_V4",
        )?;
        prune(
            &mut self.egress_v6,
            desired.egress_v6.iter().map(|(k, _)| *k),
            "EGRESS_ADDR_V6",
        )?;
        for (id, _) in desired.tenant_egress_v6.iter().filter(|(_, a)| *a == no_v6) {
            self.tenant_egress_v6
                .set(u32::from(*id), no_v6, 0)
                .context("clearing TENANT_ADDR_V6")?;
        }
        prune(
            &mut self.interfaces,
            desired.interfaces.iter().map(|(k, _)| *k),
            "INTERFACES",
        )?;
        let active: BTreeSet<u16> = desired.tenants.iter().map(|(id, _, _)| *id).collect();
        for (name, id) in self.tenant_ids()? {
            if !active.contains(&id) {
                tracing::info!(tenant = %name, id, "tenant removed");
                self.tenants
                    .set(u32::from(id), TenantInfo::default(), 0)
                    .context("clearing TENANTS")?;
                self.tenant_names
                    .set(u32::from(id), encode_name(""), 0)
                    .context("clearing TENANT_NAMES")?;
                self.tenant_egress_v6
                    .set(u32::from(id), TenantEgressV6::default(), 0)
                    .context("clearing TENANT_ADDR_V6")?;
            }
        }
        Ok(())
    }
}

/// A trie key as something to compare: its prefix length and data.
fn lpm_key_bytes<K: aya::Pod>(key: &Key<K>) -> (u32, K) {
    (key.prefix_len(), key.data())
}

/// Removes the keys of a trie that `keep` does not list.
fn prune_trie<K, V>(
    trie: &mut LpmTrie<MapData, K, V>,
    keep: impl Iterator<Item = (u32, K)>,
    name: &str,
) -> anyhow::Result<()>
where
    K: aya::Pod + Ord,
    V: aya::Pod,
{
    let keep: BTreeSet<(u32, K)> = keep.collect();
    let stale: Vec<Key<K>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !keep.contains(&lpm_key_bytes(k)))
        .collect();
    for key in stale {
        trie.remove(&key)
            .with_context(|| format!("pruning {name}"))?;
    }
    Ok(())
}

fn prune<K, V>(
    map: &mut HashMap<MapData, K, V>,
    keep: impl Iterator<Item = K>,
    name: &str,
) -> anyhow::Result<()>
where
    K: aya::Pod + Ord,
    V: aya::Pod,
{
    let keep: BTreeSet<K> = keep.collect();
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !keep.contains(k))
        .collect();
    for key in stale {
        map.remove(&key)
            .with_context(|| format!("pruning {name}"))?;
    }
    Ok(())
}

pub fn encode_name(name: &str) -> TenantName {
    let mut bytes = [0u8; TENANT_NAME_LEN];
    let len = name.len().min(TENANT_NAME_LEN - 1);
    bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
    TenantName { bytes }
}

pub fn decode_name(name: &TenantName) -> String {
    let len = name
        .bytes
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(TENANT_NAME_LEN);
    String::from_utf8_lossy(&name.bytes[..len]).into_owned()
}

/// Everything the maps should hold for one resolved configuration.
#[derive(Default)]
pub struct DesiredState {
    pub config: DataplaneConfig,
    pub interfaces: Vec<(u32, InterfaceInfo)>,
    pub tenants: Vec<(u16, TenantInfo, TenantName)>,
    pub sources: Vec<(Key<SourceKeyV4>, u32)>,
    pub sources_v6: Vec<(Key<SourceKeyV6>, u32)>,
    pub ingress_ports: Vec<(IngressPortKey, u32)>,
    pub egress: Vec<([u8; 4], u32)>,
    pub egress_v6: Vec<([u8; 16], u32)>,
    /// Every tenant's IPv6 egress addresses (`TenantInfo::egress_v6_count`
    /// says how many are its own; see `egress_v6_slots`).
    pub tenant_egress_v6: Vec<(u16, TenantEgressV6)>,
    pub forwards: Vec<(ForwardKeyV4, ForwardV4)>,
    pub floating: Vec<(FloatingKeyV4, [u8; 4])>,
    pub forwards_v6: Vec<(ForwardKeyV6, ForwardV6)>,
    pub floating_v6: Vec<(FloatingKeyV6, [u8; 16])>,
    /// Sources routed out untranslated.
    pub routed: Vec<ipnet::Ipv4Net>,
    pub routed_v6: Vec<ipnet::Ipv6Net>,
    /// Tenant id of each tenant of the plan, in plan order.
    pub ids: Vec<u16>,
    /// Conntrack zones (ingress port ids) of each tenant, in plan order.
    pub zones: Vec<Vec<u16>>,
}

impl DesiredState {
    /// `previous_ids` keeps a tenant's id (its conntrack zone) across
    /// restarts and reloads, so its established flows stay valid;
    /// `previous_ports` does the same for ingress port ids.
    pub fn build(
        resolved: &Resolved,
        previous_ids: &BTreeMap<String, u16>,
        previous_ports: &BTreeMap<IngressPortKey, u32>,
    ) -> anyhow::Result<Self> {
        let names: Vec<&str> = resolved.tenants.iter().map(|t| t.name.as_str()).collect();
        let ids = assign_ids(&names, previous_ids)?;
        let port_ids = assign_port_ids(resolved, previous_ports);

        let mut state = Self::default();
        let mut interfaces: Vec<(u32, InterfaceInfo)> = resolved
            .internal
            .iter()
            .map(|l| {
                (
                    l.index,
                    InterfaceInfo {
                        role: ROLE_INTERNAL,
                        _reserved: 0,
                    },
                )
            })
            .collect();
        interfaces.push((
            resolved.external.index,
            InterfaceInfo {
                role: ROLE_EXTERNAL,
                _reserved: 0,
            },
        ));
        state.interfaces = interfaces;
        for net in &resolved.routed_sources {
            match net {
                ipnet::IpNet::V4(net) => state.routed.push(*net),
                ipnet::IpNet::V6(net) => state.routed_v6.push(*net),
            }
        }
        state.ingress_ports = port_ids.iter().map(|(k, v)| (*k, *v)).collect();
        if !state.ingress_ports.is_empty() {
            state.config.flags |= CONFIG_F_INGRESS_PORTS;
        }

        for (tenant, &id) in resolved.tenants.iter().zip(&ids) {
            let mut info = TenantInfo {
                egress_v4_count: tenant.egress.len() as u32,
                port_min: tenant.ports.min,
                port_max: tenant.ports.max,
                flags: TENANT_F_ACTIVE,
                max_flows: tenant.limits.max_flows,
                new_flow_rate: tenant.limits.new_flows_per_second,
                new_flow_burst: tenant.limits.new_flow_burst,
                ..TenantInfo::default()
            };
            if tenant.egress.len() > MAX_EGRESS_ADDRS || tenant.egress_v6.len() > MAX_EGRESS_ADDRS {
                bail!(
                    "tenant {} has more than {MAX_EGRESS_ADDRS} egress addresses of a family",
                    tenant.name
                );
            }
            for (slot, addr) in info.egress_v4.iter_mut().zip(&tenant.egress) {
                *slot = addr.octets();
                state.egress.push((addr.octets(), u32::from(id)));
            }
            info.egress_v6_count = tenant.egress_v6.len() as u32;
            state
                .tenant_egress_v6
                .push((id, egress_v6_slots(&tenant.egress_v6)));
            for addr in &tenant.egress_v6 {
                state.egress_v6.push((addr.octets(), u32::from(id)));
            }

            let ports: Vec<u32> = if tenant.ingress.is_empty() {
                vec![ANY_PORT]
            } else {
                tenant
                    .ingress
                    .iter()
                    .map(|p| port_ids[&port_key(p)])
                    .collect()
            };
            let zones = ports
                .iter()
                .map(|&port| u16::try_from(port).context("more than 65535 ingress ports"))
                .collect::<anyhow::Result<Vec<u16>>>()?;
            // The configuration allows rules only to tenants with one zone.
            let zone = zones.first().copied().unwrap_or(ANY_PORT as u16);
            state.add_inbound(tenant, id, zone, &mut info);
            state.tenants.push((id, info, encode_name(&tenant.name)));
            state.zones.push(zones);
            for port in ports {
                for net in &tenant.sources {
                    let key = Key::new(
                        PORT_PREFIX_BITS + u32::from(net.prefix_len()),
                        SourceKeyV4 {
                            port_be: port.to_be(),
                            addr: net.network().octets(),
                        },
                    );
                    state.sources.push((key, u32::from(id)));
                }
                for net in &tenant.sources_v6 {
                    let key = Key::new(
                        PORT_PREFIX_BITS + u32::from(net.prefix_len()),
                        SourceKeyV6 {
                            port_be: port.to_be(),
                            addr: net.network().octets(),
                        },
                    );
                    state.sources_v6.push((key, u32::from(id)));
                }
            }
        }
        state.ids = ids;
        Ok(state)
    }
}

impl DesiredState {
    /// A tenant's port forwards and floating IPs, and the flags that make
    /// its new flows look at them.
    fn add_inbound(
        &mut self,
        tenant: &crate::config::ResolvedTenant,
        id: u16,
        zone: u16,
        info: &mut TenantInfo,
    ) {
        for forward in &tenant.forwards {
            self.add_forward(
                (forward.egress, forward.port, forward.proto),
                (forward.host, forward.host_port),
                id,
                zone,
            );
            info.flags |= TENANT_F_FORWARDS;
        }
        for float in &tenant.floating {
            // A floating IP is a forward of every port, under port and
            // protocol 0.
            self.add_forward((float.address, 0, 0), (float.host, 0), id, zone);
            match (float.address, float.host) {
                (IpAddr::V4(address), IpAddr::V4(host)) => {
                    let host = FloatingKeyV4 {
                        host: host.octets(),
                        zone,
                        _pad: 0,
                    };
                    self.floating.push((host, address.octets()));
                    self.egress.push((address.octets(), u32::from(id)));
                }
                (IpAddr::V6(address), IpAddr::V6(host)) => {
                    let host = FloatingKeyV6 {
                        host: host.octets(),
                        zone,
                        _pad: 0,
                    };
                    self.floating_v6.push((host, address.octets()));
                    self.egress_v6.push((address.octets(), u32::from(id)));
                }
                // The configuration keeps a rule within one family.
                _ => continue,
            }
            info.flags |= TENANT_F_FLOATING;
        }
    }

    /// One rule: `(address, port, protocol)` outside to `(host, port)`
    /// inside, ports in host order (0: every port, kept as it is).
    fn add_forward(
        &mut self,
        (addr, port, proto): (IpAddr, u16, u8),
        (host, host_port): (IpAddr, u16),
        tenant: u16,
        zone: u16,
    ) {
        match (addr, host) {
            (IpAddr::V4(addr), IpAddr::V4(host)) => self.forwards.push((
                ForwardKeyV4 {
                    addr: addr.octets(),
                    port: port.to_be(),
                    proto,
                    _pad: 0,
                },
                ForwardV4 {
                    host: host.octets(),
                    host_port: host_port.to_be(),
                    tenant,
                    zone,
                    _pad: 0,
                },
            )),
            (IpAddr::V6(addr), IpAddr::V6(host)) => self.forwards_v6.push((
                ForwardKeyV6 {
                    addr: addr.octets(),
                    port: port.to_be(),
                    proto,
                    _pad: 0,
                },
                ForwardV6 {
                    host: host.octets(),
                    host_port: host_port.to_be(),
                    tenant,
                    zone,
                    _pad: 0,
                },
            )),
            _ => {}
        }
    }
}

/// A tenant's `TENANT_ADDR_V6` value. The slots past its own addresses
/// repeat them: the address array and the count live in two maps, written
/// one after the other, so a packet may read a new array with the old,
/// larger count; every slot it can pick is then still one of the tenant's
/// current addresses, never a zero or a withdrawn one.
pub fn egress_v6_slots(addrs: &[std::net::Ipv6Addr]) -> TenantEgressV6 {
    let mut value = TenantEgressV6::default();
    if !addrs.is_empty() {
        for (i, slot) in value.addrs.iter_mut().enumerate() {
            *slot = addrs[i % addrs.len()].octets();
        }
    }
    value
}

fn port_key(port: &IngressPort) -> IngressPortKey {
    IngressPortKey {
        ifindex: port.ifindex,
        mac: port.mac.unwrap_or([0; 6]),
        _pad: [0; 2],
    }
}

/// Keeps the ids of names seen before; new names take the lowest free id.
pub fn assign_ids(names: &[&str], previous: &BTreeMap<String, u16>) -> anyhow::Result<Vec<u16>> {
    let kept: BTreeMap<&str, u16> = names
        .iter()
        .filter_map(|name| previous.get(*name).map(|id| (*name, *id)))
        .collect();
    let mut used: BTreeSet<u16> = kept.values().copied().collect();
    let mut next = 1u16;
    let mut ids = Vec::with_capacity(names.len());
    for name in names {
        if let Some(id) = kept.get(name) {
            ids.push(*id);
            continue;
        }
        while used.contains(&next) {
            next += 1;
        }
        if u32::from(next) > MAX_TENANT_ID {
            bail!("more than {MAX_TENANT_ID} tenants");
        }
        used.insert(next);
        ids.push(next);
    }
    Ok(ids)
}

fn assign_port_ids(
    resolved: &Resolved,
    previous: &BTreeMap<IngressPortKey, u32>,
) -> BTreeMap<IngressPortKey, u32> {
    let wanted: BTreeSet<IngressPortKey> = resolved
        .tenants
        .iter()
        .flat_map(|t| t.ingress.iter().map(port_key))
        .collect();
    let mut ids: BTreeMap<IngressPortKey, u32> = wanted
        .iter()
        .filter_map(|k| previous.get(k).map(|id| (*k, *id)))
        .collect();
    let mut used: BTreeSet<u32> = ids.values().copied().collect();
    let mut next = 1u32;
    for key in wanted {
        if ids.contains_key(&key) {
            continue;
        }
        while used.contains(&next) {
            next += 1;
        }
        used.insert(next);
        ids.insert(key, next);
    }
    ids
}

impl Maps {
    /// Ingress port ids in use, for `DesiredState::build`.
    pub fn port_ids(&self) -> BTreeMap<IngressPortKey, u32> {
        self.ingress_ports.iter().filter_map(Result::ok).collect()
    }

    /// Every conntrack entry, read in batches (a few system calls for a
    /// table that one-key-at-a-time iteration takes seconds to read). A
    /// kernel without batch reads for this map type gets the slow walk.
    pub fn flows(&self) -> Vec<(FlowKeyV4, FlowEntryV4)> {
        batch::entries(&self.conntrack, batch::DEFAULT_CHUNK)
            .unwrap_or_else(|_| self.conntrack.iter().filter_map(Result::ok).collect())
    }

    /// Every entry of the IPv6 conntrack table, as [`Self::flows`].
    pub fn flows_v6(&self) -> Vec<(FlowKeyV6, FlowEntryV6)> {
        batch::entries(&self.conntrack_v6, batch::DEFAULT_CHUNK)
            .unwrap_or_else(|_| self.conntrack_v6.iter().filter_map(Result::ok).collect())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr};

    use super::*;
    use crate::{
        config::Config,
        system::{AddressFacts, LinkFacts, SystemView},
    };

    fn resolved(yaml: &str) -> Resolved {
        let link = |index: u32, name: &str| LinkFacts {
            index,
            name: name.to_owned(),
            mac: Some([2, 0, 0, 0, 0, index as u8]),
            kind: Some("veth".to_owned()),
            parent: None,
            xdp_features: None,
        };
        let system = SystemView {
            links: vec![link(2, "eth0"), link(3, "eth1")],
            addresses: vec![AddressFacts {
                index: 3,
                addr: IpAddr::V4([192, 168, 31, 2].into()),
                prefix_len: 24,
                egress_owned: false,
            }],
            next_hops: Vec::new(),
        };
        Config::parse(yaml)
            .expect("YAML")
            .plan()
            .expect("valid")
            .resolve(&system)
            .expect("resolves")
    }

    const DUAL_STACK: &str = "\
interfaces: {internal: [eth0], external: eth1}
tenants:
  - name: v4-only
    sources: [172.20.10.0/24]
    egressIPs: [192.168.31.101]
  - name: dual
    sources: [172.20.20.0/24, 'fd00:20::/64', 'fd00:21::5']
    egressIPs: [192.168.31.150, '2001:db8:31::150', '2001:db8:31::151', '2001:db8:31::152']
";

    #[test]
    fn ipv6_sources_and_egress_ips_fill_their_own_maps() {
        let state = DesiredState::build(&resolved(DUAL_STACK), &BTreeMap::new(), &BTreeMap::new())
            .expect("builds");
        let (dual, info) = (state.tenants[1].0, state.tenants[1].1);
        assert_eq!((info.egress_v4_count, info.egress_v6_count), (1, 3));
        assert_eq!(state.tenants[0].1.egress_v6_count, 0);
        let sources: Vec<(u32, SourceKeyV6, u32)> = state
            .sources_v6
            .iter()
            .map(|(k, id)| (k.prefix_len(), k.data(), *id))
            .collect();
        let key = |addr: &str| SourceKeyV6 {
            port_be: ANY_PORT.to_be(),
            addr: addr.parse::<Ipv6Addr>().unwrap().octets(),
        };
        assert_eq!(
            sources,
            [
                (PORT_PREFIX_BITS + 64, key("fd00:20::"), u32::from(dual)),
                (PORT_PREFIX_BITS + 128, key("fd00:21::5"), u32::from(dual)),
            ]
        );
        assert_eq!(state.sources.len(), 2, "the IPv4 trie keeps IPv4 only");
        let egress: Vec<(Ipv6Addr, u32)> = state
            .egress_v6
            .iter()
            .map(|(a, id)| (Ipv6Addr::from(*a), *id))
            .collect();
        assert_eq!(egress.len(), 3);
        assert!(egress.iter().all(|(_, id)| *id == u32::from(dual)));
        let slots = &state.tenant_egress_v6;
        assert_eq!(slots.len(), 2, "every tenant's slot is written");
        assert_eq!(slots[0].1, TenantEgressV6::default());
        assert_eq!(slots[1].0, dual);
    }

    #[test]
    fn slots_past_a_tenants_ipv6_addresses_repeat_them() {
        let addrs: Vec<Ipv6Addr> = ["2001:db8::1", "2001:db8::2", "2001:db8::3"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let value = egress_v6_slots(&addrs);
        for (i, slot) in value.addrs.iter().enumerate() {
            assert_eq!(Ipv6Addr::from(*slot), addrs[i % 3], "slot {i}");
        }
        assert_eq!(egress_v6_slots(&[]), TenantEgressV6::default());
    }

    #[test]
    fn ipv6_sources_behind_an_ingress_port_are_keyed_by_it() {
        let yaml = "\
interfaces: {internal: [eth0], external: eth1}
tenants:
  - name: behind-mac
    sources: ['fd00:20::/64']
    egressIPs: ['2001:db8:31::150']
    ingress: [{interface: eth0, mac: '02:00:00:00:00:aa'}]
";
        let state = DesiredState::build(&resolved(yaml), &BTreeMap::new(), &BTreeMap::new())
            .expect("builds");
        let port = state.ingress_ports[0].1;
        assert_ne!(port, ANY_PORT);
        assert_eq!(state.sources_v6[0].0.data().port_be, port.to_be());
    }
}
