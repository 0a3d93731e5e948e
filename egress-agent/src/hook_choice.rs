//! Whether an interface's packet path may run as XDP or must run as TC.
//!
//! The same dataplane runs at either hook, but native XDP silently loses
//! packets in two situations no error reports: a redirect to a device
//! without `ndo_xdp_xmit` is dropped, and a software ingress (veth, macvlan,
//! ...) hands over CHECKSUM_PARTIAL packets from co-located senders whose
//! checksums XDP can neither see as pending nor finish. So the choice is
//! made from what the kernel says about the devices, by [`choose`], a pure
//! function the tests can feed by hand; [`read_facts`] and [`xdp_features`]
//! gather those facts, and [`still_safe`] re-judges a running XDP choice,
//! because a veth's redirect support changes with its peer's settings.
//!
//! The kernel's answers describe the present, not the device's ability:
//! a veth accepts redirects only while its peer has GRO or an XDP program
//! and both ends are up, and many NIC drivers only while an XDP program is
//! attached to the NIC itself. Facts are read when that state is in place.
//!
//! [`choose`] judges native XDP. Generic (skb) XDP redirects through the
//! normal transmit path and needs no `ndo_xdp_xmit`; the caller decides
//! whether that mode applies before asking.

use std::{fmt, io};

use anyhow::Context as _;
use futures::TryStreamExt as _;
use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload, NlasIterator,
    ParseableParametrized, parse_u16, parse_u64,
};
use netlink_packet_generic::{
    GenlFamily, GenlHeader, GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_GENERIC};
use rtnetlink::packet_route::link::{LinkAttribute, LinkInfo};
use serde::{Deserialize, Serialize};

// The kernel's `enum netdev_xdp_act` (include/uapi/linux/netdev.h), as
// reported in NETDEV_A_DEV_XDP_FEATURES.
/// Native XDP: the driver runs programs (DROP, PASS, TX).
pub const XDP_ACT_BASIC: u64 = 1;
/// The driver honours XDP_REDIRECT from its own programs.
pub const XDP_ACT_REDIRECT: u64 = 1 << 1;
/// The device has `ndo_xdp_xmit`: other devices' programs may redirect to it.
pub const XDP_ACT_NDO_XMIT: u64 = 1 << 2;
pub const XDP_ACT_XSK_ZEROCOPY: u64 = 1 << 3;
pub const XDP_ACT_HW_OFFLOAD: u64 = 1 << 4;
pub const XDP_ACT_RX_SG: u64 = 1 << 5;
pub const XDP_ACT_NDO_XMIT_SG: u64 = 1 << 6;

const NETDEV_FAMILY_NAME: &str = "netdev";
const NETDEV_FAMILY_VERSION: u8 = 1;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;

/// The XDP feature bits (`XDP_ACT_*`) the kernel reports for a device, or
/// `None` when the kernel predates the `netdev` generic-netlink family
/// (Linux 6.3).
///
/// Asks in the calling thread's network namespace, so it works under
/// `ip netns exec` and on a thread that entered a namespace with setns.
/// The socket is blocking, but the kernel answers a do-request while
/// handling the send, so the receive never waits.
pub fn xdp_features(ifindex: u32) -> io::Result<Option<u64>> {
    let mut socket = Socket::new(NETLINK_GENERIC)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;

    let family = request(
        &socket,
        GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(NETDEV_FAMILY_NAME.to_owned())],
        }),
    );
    let family_id = match family {
        Ok(FamilyReply { id: Some(id) }) => id,
        // The controller answers ENOENT for a family this kernel lacks.
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Ok(FamilyReply { id: None }) => {
            return Err(io::Error::other(
                "the netdev family came back without an id",
            ));
        }
        Err(err) => return Err(err),
    };

    let mut get = GenlMessage::from_payload(DevGet { ifindex });
    get.set_resolved_family_id(family_id);
    let reply: DevReply = request(&socket, get)?;
    Ok(reply.xdp_features)
}

/// Sends one do-request and reads its single answer: the reply, or the
/// error the kernel sent instead.
fn request<Req, Reply>(socket: &Socket, message: GenlMessage<Req>) -> io::Result<Reply>
where
    Req: GenlFamily + Emitable + fmt::Debug,
    Reply: ParseableParametrized<[u8], GenlHeader> + fmt::Debug,
{
    let mut message = NetlinkMessage::from(message);
    message.header.flags = NLM_F_REQUEST;
    message.finalize();
    let mut buffer = vec![0; message.buffer_len()];
    message.serialize(&mut buffer);
    socket.send(&buffer, 0)?;

    let (answer, _) = socket.recv_from_full()?;
    let answer = NetlinkMessage::<GenlMessage<Reply>>::deserialize(&answer)
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err.to_string()))?;
    match answer.payload {
        NetlinkPayload::InnerMessage(reply) => Ok(reply.payload),
        NetlinkPayload::Error(err) if err.code.is_some() => Err(err.to_io()),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected generic netlink answer: {other:?}"),
        )),
    }
}

/// The `netdev` family's DEV_GET request. netlink-packet-generic has no
/// type for this family; its `GenlFamily` trait is how one adds it.
#[derive(Debug)]
struct DevGet {
    ifindex: u32,
}

impl DevGet {
    fn attributes(&self) -> [DefaultNla; 1] {
        [DefaultNla::new(
            NETDEV_A_DEV_IFINDEX,
            self.ifindex.to_ne_bytes().to_vec(),
        )]
    }
}

impl GenlFamily for DevGet {
    fn family_name() -> &'static str {
        NETDEV_FAMILY_NAME
    }
    fn command(&self) -> u8 {
        NETDEV_CMD_DEV_GET
    }
    fn version(&self) -> u8 {
        NETDEV_FAMILY_VERSION
    }
}

impl Emitable for DevGet {
    fn buffer_len(&self) -> usize {
        self.attributes().as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attributes().as_slice().emit(buffer)
    }
}

/// DEV_GET's answer. Attributes other than the feature bits are skipped:
/// the kernel keeps adding some (zero-copy segments, RX metadata, XSK
/// features), and none of them should make the answer unreadable.
#[derive(Debug)]
struct DevReply {
    xdp_features: Option<u64>,
}

impl ParseableParametrized<[u8], GenlHeader> for DevReply {
    fn parse_with_param(buf: &[u8], _: GenlHeader) -> Result<Self, DecodeError> {
        let mut xdp_features = None;
        for attribute in NlasIterator::new(buf) {
            let attribute = attribute?;
            if attribute.kind() == NETDEV_A_DEV_XDP_FEATURES {
                xdp_features = Some(parse_u64(attribute.value())?);
            }
        }
        Ok(Self { xdp_features })
    }
}

/// CTRL_CMD_GETFAMILY's answer, reduced to the family id. The crate's own
/// `GenlCtrl` parser rejects any controller attribute it does not know, so
/// a newer kernel could make it fail; only the id matters here.
#[derive(Debug)]
struct FamilyReply {
    id: Option<u16>,
}

impl ParseableParametrized<[u8], GenlHeader> for FamilyReply {
    fn parse_with_param(buf: &[u8], _: GenlHeader) -> Result<Self, DecodeError> {
        let mut id = None;
        for attribute in NlasIterator::new(buf) {
            let attribute = attribute?;
            if attribute.kind() == CTRL_ATTR_FAMILY_ID {
                id = Some(parse_u16(attribute.value())?);
            }
        }
        Ok(Self { id })
    }
}

/// What the choice needs to know about one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceFacts {
    pub name: String,
    pub ifindex: u32,
    /// rtnetlink's IFLA_INFO_KIND: "veth", "macvlan", ...; `None` for a
    /// physical or virtio NIC, whose drivers register no link kind.
    pub kind: Option<String>,
    /// `XDP_ACT_*` bits; `None` when the kernel does not report them.
    pub xdp_features: Option<u64>,
}

impl InterfaceFacts {
    fn has(&self, bit: u64) -> Option<bool> {
        self.xdp_features.map(|features| features & bit != 0)
    }

    /// The software kind that makes the device's checksums untrustworthy
    /// for XDP. "virtio" is the driver of a real (virtual) NIC that receives
    /// complete checksums, so it counts as hardware should a caller fill
    /// the kind from somewhere other than IFLA_INFO_KIND.
    pub fn software_kind(&self) -> Option<&str> {
        self.kind.as_deref().filter(|kind| *kind != "virtio")
    }

    fn described(&self) -> String {
        match &self.kind {
            Some(kind) => format!("{} ({kind})", self.name),
            None => self.name.clone(),
        }
    }
}

/// A NIC (physical or virtio), not a software device.
pub fn is_hardware(facts: &InterfaceFacts) -> bool {
    facts.software_kind().is_none()
}

/// Reads an interface's name, kind and XDP features.
///
/// The link comes from `handle`'s namespace, the features from the calling
/// thread's: both must be the one the interface lives in.
pub async fn read_facts(
    handle: &rtnetlink::Handle,
    ifindex: u32,
) -> anyhow::Result<InterfaceFacts> {
    let mut links = handle.link().get().match_index(ifindex).execute();
    let message = links
        .try_next()
        .await
        .with_context(|| format!("reading link {ifindex}"))?
        .with_context(|| format!("link {ifindex} does not exist"))?;
    let mut name = None;
    let mut kind = None;
    for attribute in message.attributes {
        match attribute {
            LinkAttribute::IfName(ifname) => name = Some(ifname),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(info_kind) = info {
                        kind = Some(info_kind.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    let name = name.unwrap_or_else(|| format!("ifindex {ifindex}"));
    let xdp_features = xdp_features(ifindex)
        .with_context(|| format!("asking the kernel for the XDP features of {name}"))?;
    Ok(InterfaceFacts {
        name,
        ifindex,
        kind,
        xdp_features,
    })
}

/// Where an interface's packet path runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    Xdp,
    Tc,
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        })
    }
}

/// The configured hook.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookSetting {
    /// XDP where it is known to be safe, TC everywhere else.
    #[default]
    Auto,
    /// XDP, refusing the interfaces where it would lose packets.
    Xdp,
    Tc,
}

/// The hook picked and why, for the logs and the status output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub hook: Hook,
    pub reason: String,
}

/// One reason XDP may be wrong here.
struct Concern {
    /// Forcing XDP still loses packets: refuse rather than warn.
    refuses_forced_xdp: bool,
    text: String,
    /// How to get XDP anyway, appended to the text in a refusal.
    fix: &'static str,
}

/// Every reason native XDP on `ingress`, redirecting to `targets`, could
/// mishandle packets, the ingress's first.
fn concerns(ingress: &InterfaceFacts, targets: &[InterfaceFacts]) -> Vec<Concern> {
    let mut found = Vec::new();
    if let Some(kind) = ingress.software_kind() {
        found.push(Concern {
            refuses_forced_xdp: false,
            text: format!(
                "{} is a {kind}: co-located senders hand over partial checksums XDP cannot finish",
                ingress.name
            ),
            fix: "",
        });
    }
    match (ingress.has(XDP_ACT_BASIC), ingress.has(XDP_ACT_REDIRECT)) {
        (None, _) => found.push(Concern {
            // Without the family nothing can be checked; forcing XDP is
            // then the operator's word against no evidence.
            refuses_forced_xdp: false,
            text: format!(
                "the kernel does not report XDP features (of {}; needs Linux 6.3)",
                ingress.name
            ),
            fix: "",
        }),
        (Some(false), _) => found.push(Concern {
            refuses_forced_xdp: true,
            text: format!("{}: driver has no native XDP", ingress.described()),
            fix: "; use xdp.mode: generic or hook: tc",
        }),
        // The programs forward with bpf_redirect, which such a driver drops.
        (Some(true), Some(false)) => found.push(Concern {
            refuses_forced_xdp: true,
            text: format!(
                "{}: driver runs XDP but cannot redirect from it",
                ingress.described()
            ),
            fix: "; use hook: tc",
        }),
        (Some(true), _) => {}
    }
    for target in targets {
        match target.has(XDP_ACT_NDO_XMIT) {
            Some(true) => {}
            None => found.push(Concern {
                refuses_forced_xdp: false,
                text: format!(
                    "the kernel does not report XDP features (of {}; needs Linux 6.3)",
                    target.name
                ),
                fix: "",
            }),
            Some(false) if target.kind.as_deref() == Some("veth") => found.push(Concern {
                refuses_forced_xdp: true,
                text: format!(
                    "{} cannot receive XDP redirects: its veth peer has neither GRO nor an XDP program",
                    target.name
                ),
                fix: " (ethtool -K <peer> gro on), or use hook: tc",
            }),
            Some(false) if target.software_kind().is_none() => found.push(Concern {
                refuses_forced_xdp: true,
                text: format!(
                    "{} cannot receive XDP redirects: its driver offers ndo_xdp_xmit only \
                     while an XDP program runs on it, if at all",
                    target.name
                ),
                fix: "; use hook: tc",
            }),
            Some(false) => found.push(Concern {
                refuses_forced_xdp: true,
                text: format!(
                    "{} cannot receive XDP redirects (no ndo_xdp_xmit)",
                    target.described()
                ),
                fix: "; use hook: tc",
            }),
        }
    }
    found
}

/// Picks the hook for one ingress interface.
///
/// `targets` are every interface its programs may redirect to, the ingress
/// itself included when traffic can leave where it came in. `Err` only when
/// XDP is forced onto interfaces where it would drop packets.
///
/// Read the targets' facts after the XDP program is attached to those that
/// get one: many NIC drivers (virtio_net, bnxt, igb, ice) report
/// `ndo_xdp_xmit` only while an XDP program runs on the device itself, so
/// facts read before make every such target look unable to take redirects.
pub fn choose(
    setting: HookSetting,
    ingress: &InterfaceFacts,
    targets: &[InterfaceFacts],
) -> Result<Choice, String> {
    match setting {
        HookSetting::Tc => Ok(Choice {
            hook: Hook::Tc,
            reason: "set by configuration".to_owned(),
        }),
        HookSetting::Auto => {
            let found = concerns(ingress, targets);
            if found.is_empty() {
                Ok(Choice {
                    hook: Hook::Xdp,
                    reason: format!(
                        "{} runs native XDP and every redirect target accepts XDP frames",
                        ingress.name
                    ),
                })
            } else {
                Ok(Choice {
                    hook: Hook::Tc,
                    reason: joined(found.iter().map(|concern| concern.text.clone())),
                })
            }
        }
        HookSetting::Xdp => {
            let (refusals, warnings): (Vec<_>, Vec<_>) = concerns(ingress, targets)
                .into_iter()
                .partition(|concern| concern.refuses_forced_xdp);
            if !refusals.is_empty() {
                return Err(refusals
                    .iter()
                    .map(|concern| format!("{}{}", concern.text, concern.fix))
                    .collect::<Vec<_>>()
                    .join("; also "));
            }
            let mut reason = "set by configuration".to_owned();
            if !warnings.is_empty() {
                reason.push_str("; warning: ");
                reason.push_str(&joined(warnings.into_iter().map(|concern| concern.text)));
            }
            Ok(Choice {
                hook: Hook::Xdp,
                reason,
            })
        }
    }
}

fn joined(parts: impl Iterator<Item = String>) -> String {
    parts.collect::<Vec<_>>().join("; ")
}

/// Why a running XDP choice is no longer safe, if it is not: a redirect
/// target stopped reporting `ndo_xdp_xmit` (a veth whose peer turned GRO
/// off or lost its XDP program). Targets whose features the kernel does
/// not report say nothing new and pass.
pub fn still_safe(choice: Hook, targets: &[InterfaceFacts]) -> Option<String> {
    if choice == Hook::Tc {
        return None;
    }
    let lost: Vec<_> = targets
        .iter()
        .filter(|target| target.has(XDP_ACT_NDO_XMIT) == Some(false))
        .map(|target| {
            format!(
                "{} no longer accepts XDP redirects (no ndo_xdp_xmit)",
                target.described()
            )
        })
        .collect();
    (!lost.is_empty()).then(|| lost.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a veth reports while its peer has GRO on.
    const VETH_PEER_GRO: u64 =
        XDP_ACT_BASIC | XDP_ACT_REDIRECT | XDP_ACT_NDO_XMIT | XDP_ACT_RX_SG | XDP_ACT_NDO_XMIT_SG;
    /// What a veth reports at the kernel's defaults.
    const VETH_DEFAULT: u64 = XDP_ACT_BASIC | XDP_ACT_REDIRECT | XDP_ACT_RX_SG;
    const NIC: u64 = XDP_ACT_BASIC | XDP_ACT_REDIRECT | XDP_ACT_NDO_XMIT;

    fn facts(name: &str, kind: Option<&str>, xdp_features: Option<u64>) -> InterfaceFacts {
        InterfaceFacts {
            name: name.to_owned(),
            ifindex: 7,
            kind: kind.map(str::to_owned),
            xdp_features,
        }
    }

    fn nic(name: &str) -> InterfaceFacts {
        facts(name, None, Some(NIC))
    }

    #[test]
    fn auto_picks_xdp_for_a_nic_whose_targets_accept_redirects() {
        let choice = choose(HookSetting::Auto, &nic("eth0"), &[nic("eth0"), nic("eth1")])
            .expect("auto never fails");
        assert_eq!(choice.hook, Hook::Xdp, "{}", choice.reason);
        assert!(choice.reason.contains("eth0"), "{}", choice.reason);
    }

    #[test]
    fn auto_counts_virtio_as_hardware() {
        let ingress = facts("ens3", Some("virtio"), Some(NIC));
        let choice = choose(HookSetting::Auto, &ingress, &[nic("ens4")]).expect("auto");
        assert_eq!(choice.hook, Hook::Xdp, "{}", choice.reason);
    }

    #[test]
    fn auto_picks_tc_for_a_software_ingress_even_if_it_runs_xdp() {
        let ingress = facts("eth0", Some("veth"), Some(VETH_PEER_GRO));
        let choice = choose(HookSetting::Auto, &ingress, &[nic("eth1")]).expect("auto");
        assert_eq!(choice.hook, Hook::Tc);
        assert_eq!(
            choice.reason,
            "eth0 is a veth: co-located senders hand over partial checksums XDP cannot finish"
        );
    }

    #[test]
    fn auto_picks_tc_when_the_kernel_reports_no_features() {
        let choice = choose(
            HookSetting::Auto,
            &facts("eth0", None, None),
            &[facts("eth1", None, None)],
        )
        .expect("auto");
        assert_eq!(choice.hook, Hook::Tc);
        assert!(
            choice
                .reason
                .starts_with("the kernel does not report XDP features (of eth0"),
            "{}",
            choice.reason
        );
    }

    #[test]
    fn auto_picks_tc_when_the_ingress_driver_has_no_native_xdp() {
        let choice = choose(
            HookSetting::Auto,
            &facts("eth0", None, Some(0)),
            &[nic("eth1")],
        )
        .expect("auto");
        assert_eq!(choice.hook, Hook::Tc);
        assert_eq!(choice.reason, "eth0: driver has no native XDP");
    }

    #[test]
    fn auto_picks_tc_when_the_ingress_driver_cannot_redirect() {
        let ingress = facts("eth0", None, Some(XDP_ACT_BASIC));
        let choice = choose(HookSetting::Auto, &ingress, &[nic("eth1")]).expect("auto");
        assert_eq!(choice.hook, Hook::Tc);
        assert_eq!(
            choice.reason,
            "eth0: driver runs XDP but cannot redirect from it"
        );
    }

    #[test]
    fn auto_picks_tc_when_a_target_cannot_take_redirects() {
        let macvlan = facts("net1", Some("macvlan"), Some(0));
        let choice =
            choose(HookSetting::Auto, &nic("eth0"), &[nic("eth1"), macvlan]).expect("auto");
        assert_eq!(choice.hook, Hook::Tc);
        assert_eq!(
            choice.reason,
            "net1 (macvlan) cannot receive XDP redirects (no ndo_xdp_xmit)"
        );
    }

    #[test]
    fn auto_explains_a_nic_target_without_ndo_xmit() {
        // What virtio_net reports while no XDP program runs on it.
        let idle_virtio = facts("eth1", None, Some(XDP_ACT_BASIC | XDP_ACT_REDIRECT));
        let choice = choose(HookSetting::Auto, &nic("eth0"), &[idle_virtio]).expect("auto");
        assert_eq!(choice.hook, Hook::Tc);
        assert_eq!(
            choice.reason,
            "eth1 cannot receive XDP redirects: its driver offers ndo_xdp_xmit only while an \
             XDP program runs on it, if at all"
        );
    }

    #[test]
    fn auto_picks_tc_when_a_target_reports_no_features() {
        let choice = choose(
            HookSetting::Auto,
            &nic("eth0"),
            &[facts("eth1", None, None)],
        )
        .expect("auto");
        assert_eq!(choice.hook, Hook::Tc);
        assert!(choice.reason.contains("(of eth1"), "{}", choice.reason);
    }

    #[test]
    fn auto_names_every_problem() {
        let ingress = facts("eth0", Some("veth"), Some(VETH_DEFAULT));
        let target = facts("eth1", Some("veth"), Some(VETH_DEFAULT));
        let choice = choose(HookSetting::Auto, &ingress, &[target]).expect("auto");
        assert_eq!(choice.hook, Hook::Tc);
        assert!(
            choice.reason.contains("eth0 is a veth"),
            "{}",
            choice.reason
        );
        assert!(
            choice.reason.contains("eth1 cannot receive XDP redirects"),
            "{}",
            choice.reason
        );
    }

    #[test]
    fn forced_xdp_refuses_a_veth_target_and_says_how_to_fix_it() {
        let target = facts("eth1", Some("veth"), Some(VETH_DEFAULT));
        let err = choose(HookSetting::Xdp, &nic("eth0"), &[target]).expect_err("must refuse");
        assert_eq!(
            err,
            "eth1 cannot receive XDP redirects: its veth peer has neither GRO nor an XDP program \
             (ethtool -K <peer> gro on), or use hook: tc"
        );
    }

    #[test]
    fn forced_xdp_refuses_a_macvlan_target() {
        let target = facts("net1", Some("macvlan"), Some(0));
        let err = choose(HookSetting::Xdp, &nic("eth0"), &[target]).expect_err("must refuse");
        assert_eq!(
            err,
            "net1 (macvlan) cannot receive XDP redirects (no ndo_xdp_xmit); use hook: tc"
        );
    }

    #[test]
    fn forced_xdp_refuses_an_ingress_without_native_xdp() {
        let err = choose(
            HookSetting::Xdp,
            &facts("eth0", None, Some(0)),
            &[nic("eth1")],
        )
        .expect_err("must refuse");
        assert_eq!(
            err,
            "eth0: driver has no native XDP; use xdp.mode: generic or hook: tc"
        );
    }

    #[test]
    fn forced_xdp_refuses_an_ingress_that_cannot_redirect() {
        let ingress = facts("eth0", None, Some(XDP_ACT_BASIC));
        let err = choose(HookSetting::Xdp, &ingress, &[nic("eth1")]).expect_err("must refuse");
        assert!(err.contains("cannot redirect"), "{err}");
    }

    #[test]
    fn forced_xdp_names_every_refusal() {
        let err = choose(
            HookSetting::Xdp,
            &facts("eth0", None, Some(0)),
            &[facts("net1", Some("macvlan"), Some(0))],
        )
        .expect_err("must refuse");
        assert_eq!(
            err,
            "eth0: driver has no native XDP; use xdp.mode: generic or hook: tc; also \
             net1 (macvlan) cannot receive XDP redirects (no ndo_xdp_xmit); use hook: tc"
        );
    }

    #[test]
    fn forced_xdp_on_a_software_ingress_warns() {
        let ingress = facts("eth0", Some("veth"), Some(VETH_PEER_GRO));
        let choice = choose(HookSetting::Xdp, &ingress, &[nic("eth1")]).expect("allowed");
        assert_eq!(choice.hook, Hook::Xdp);
        assert_eq!(
            choice.reason,
            "set by configuration; warning: eth0 is a veth: co-located senders hand over \
             partial checksums XDP cannot finish"
        );
    }

    #[test]
    fn forced_xdp_on_a_kernel_without_features_trusts_the_configuration() {
        let choice = choose(
            HookSetting::Xdp,
            &facts("eth0", None, None),
            &[facts("eth1", None, None)],
        )
        .expect("allowed");
        assert_eq!(choice.hook, Hook::Xdp);
        assert!(
            choice
                .reason
                .contains("warning: the kernel does not report XDP features"),
            "{}",
            choice.reason
        );
    }

    #[test]
    fn forced_xdp_where_it_is_safe_has_no_warning() {
        let choice = choose(HookSetting::Xdp, &nic("eth0"), &[nic("eth1")]).expect("allowed");
        assert_eq!(
            choice,
            Choice {
                hook: Hook::Xdp,
                reason: "set by configuration".to_owned()
            }
        );
    }

    #[test]
    fn forced_tc_needs_no_facts() {
        let choice = choose(
            HookSetting::Tc,
            &facts("eth0", None, None),
            &[facts("net1", Some("macvlan"), Some(0))],
        )
        .expect("tc is always possible");
        assert_eq!(
            choice,
            Choice {
                hook: Hook::Tc,
                reason: "set by configuration".to_owned()
            }
        );
    }

    #[test]
    fn still_safe_flags_a_target_that_lost_ndo_xmit() {
        let healthy = facts("eth1", Some("veth"), Some(VETH_PEER_GRO));
        let lost = facts("eth2", Some("veth"), Some(VETH_DEFAULT));
        assert_eq!(still_safe(Hook::Xdp, std::slice::from_ref(&healthy)), None);
        assert_eq!(
            still_safe(Hook::Xdp, &[healthy, lost.clone()]).as_deref(),
            Some("eth2 (veth) no longer accepts XDP redirects (no ndo_xdp_xmit)")
        );
        assert_eq!(still_safe(Hook::Tc, &[lost]), None);
        assert_eq!(still_safe(Hook::Xdp, &[facts("eth3", None, None)]), None);
    }

    #[test]
    fn settings_read_in_lowercase_and_default_to_auto() {
        assert_eq!(HookSetting::default(), HookSetting::Auto);
        for (text, setting) in [
            ("\"auto\"", HookSetting::Auto),
            ("\"xdp\"", HookSetting::Xdp),
            ("\"tc\"", HookSetting::Tc),
        ] {
            assert_eq!(
                serde_json::from_str::<HookSetting>(text).expect("known setting"),
                setting
            );
        }
        assert!(serde_json::from_str::<HookSetting>("\"XDP\"").is_err());
        assert_eq!(
            serde_json::to_string(&Hook::Xdp).expect("serializes"),
            "\"xdp\""
        );
        assert_eq!(Hook::Tc.to_string(), "tc");
    }
}
