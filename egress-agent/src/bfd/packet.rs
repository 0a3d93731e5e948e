//! BFD control packets (RFC 5880 §4.1): encoding, decoding, and the
//! reception checks of §6.8.6 that need nothing but the packet itself.
//! Authentication is not supported, so packets that ask for it are dropped.

use serde::Serialize;

/// UDP destination port of single-hop control packets (RFC 5881 §4).
pub const CONTROL_PORT: u16 = 3784;
/// Length of a control packet without an authentication section.
pub const CONTROL_PACKET_LEN: usize = 24;
/// The smallest packet that can carry an authentication section.
const MIN_LEN_WITH_AUTH: usize = 26;
const VERSION: u8 = 1;

const FLAG_POLL: u8 = 0x20;
const FLAG_FINAL: u8 = 0x10;
const FLAG_CONTROL_PLANE_INDEPENDENT: u8 = 0x08;
const FLAG_AUTH_PRESENT: u8 = 0x04;
const FLAG_DEMAND: u8 = 0x02;
const FLAG_MULTIPOINT: u8 = 0x01;

/// Session state, as carried in the Sta field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    AdminDown,
    Down,
    Init,
    Up,
}

impl State {
    fn from_bits(bits: u8) -> Self {
        match bits & 0x3 {
            0 => Self::AdminDown,
            1 => Self::Down,
            2 => Self::Init,
            _ => Self::Up,
        }
    }

    fn bits(self) -> u8 {
        match self {
            Self::AdminDown => 0,
            Self::Down => 1,
            Self::Init => 2,
            Self::Up => 3,
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::AdminDown => "AdminDown",
            Self::Down => "Down",
            Self::Init => "Init",
            Self::Up => "Up",
        })
    }
}

/// Why a session last left Up (or did not come up), RFC 5880 §4.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Diag {
    None,
    ControlDetectionTimeExpired,
    EchoFunctionFailed,
    NeighborSignaledSessionDown,
    ForwardingPlaneReset,
    PathDown,
    ConcatenatedPathDown,
    AdministrativelyDown,
    ReverseConcatenatedPathDown,
    /// A value the RFC reserves; kept so a peer's diag is shown as sent.
    Reserved(u8),
}

impl Diag {
    fn from_bits(bits: u8) -> Self {
        match bits & 0x1f {
            0 => Self::None,
            1 => Self::ControlDetectionTimeExpired,
            2 => Self::EchoFunctionFailed,
            3 => Self::NeighborSignaledSessionDown,
            4 => Self::ForwardingPlaneReset,
            5 => Self::PathDown,
            6 => Self::ConcatenatedPathDown,
            7 => Self::AdministrativelyDown,
            8 => Self::ReverseConcatenatedPathDown,
            other => Self::Reserved(other),
        }
    }

    fn bits(self) -> u8 {
        match self {
            Self::None => 0,
            Self::ControlDetectionTimeExpired => 1,
            Self::EchoFunctionFailed => 2,
            Self::NeighborSignaledSessionDown => 3,
            Self::ForwardingPlaneReset => 4,
            Self::PathDown => 5,
            Self::ConcatenatedPathDown => 6,
            Self::AdministrativelyDown => 7,
            Self::ReverseConcatenatedPathDown => 8,
            Self::Reserved(bits) => bits & 0x1f,
        }
    }
}

/// A control packet without authentication section. Intervals are in
/// microseconds, as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlPacket {
    pub diag: Diag,
    pub state: State,
    pub poll: bool,
    pub final_: bool,
    pub control_plane_independent: bool,
    pub demand: bool,
    pub detect_mult: u8,
    pub my_discriminator: u32,
    pub your_discriminator: u32,
    pub desired_min_tx_us: u32,
    pub required_min_rx_us: u32,
    pub required_min_echo_rx_us: u32,
}

/// Why a received datagram was dropped. Every reason has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Version field is not 1.
    BadVersion,
    /// Length field below 24 bytes (26 with the A bit).
    LengthTooShort,
    /// Length field beyond the UDP payload, or a payload too short for a header.
    LengthExceedsPayload,
    ZeroDetectMult,
    /// The M bit, reserved for point-to-multipoint extensions.
    Multipoint,
    ZeroMyDiscriminator,
    /// Your Discriminator 0 in a packet whose state is Init or Up.
    ZeroYourDiscriminator,
    /// The A bit: no authentication is configured, so none is accepted.
    Authentication,
    /// Your Discriminator names no session of ours.
    UnknownDiscriminator,
    /// IP TTL other than 255: the packet may come from beyond the link (RFC 5881 §5).
    BadTtl,
    /// The discriminator names a session for another address or interface.
    WrongSource,
    /// Your Discriminator 0 from an address (or interface) with no session.
    UnknownPeer,
}

/// Dropped datagrams by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DropCounts {
    pub bad_version: u64,
    pub length_too_short: u64,
    pub length_exceeds_payload: u64,
    pub zero_detect_mult: u64,
    pub multipoint: u64,
    pub zero_my_discriminator: u64,
    pub zero_your_discriminator: u64,
    pub authentication: u64,
    pub unknown_discriminator: u64,
    pub bad_ttl: u64,
    pub wrong_source: u64,
    pub unknown_peer: u64,
}

impl DropCounts {
    pub fn count(&mut self, reason: DropReason) {
        let counter = match reason {
            DropReason::BadVersion => &mut self.bad_version,
            DropReason::LengthTooShort => &mut self.length_too_short,
            DropReason::LengthExceedsPayload => &mut self.length_exceeds_payload,
            DropReason::ZeroDetectMult => &mut self.zero_detect_mult,
            DropReason::Multipoint => &mut self.multipoint,
            DropReason::ZeroMyDiscriminator => &mut self.zero_my_discriminator,
            DropReason::ZeroYourDiscriminator => &mut self.zero_your_discriminator,
            DropReason::Authentication => &mut self.authentication,
            DropReason::UnknownDiscriminator => &mut self.unknown_discriminator,
            DropReason::BadTtl => &mut self.bad_ttl,
            DropReason::WrongSource => &mut self.wrong_source,
            DropReason::UnknownPeer => &mut self.unknown_peer,
        };
        *counter += 1;
    }

    pub fn total(&self) -> u64 {
        self.bad_version
            + self.length_too_short
            + self.length_exceeds_payload
            + self.zero_detect_mult
            + self.multipoint
            + self.zero_my_discriminator
            + self.zero_your_discriminator
            + self.authentication
            + self.unknown_discriminator
            + self.bad_ttl
            + self.wrong_source
            + self.unknown_peer
    }
}

impl ControlPacket {
    pub fn encode(&self) -> [u8; CONTROL_PACKET_LEN] {
        let mut flags = self.state.bits() << 6;
        for (set, bit) in [
            (self.poll, FLAG_POLL),
            (self.final_, FLAG_FINAL),
            (
                self.control_plane_independent,
                FLAG_CONTROL_PLANE_INDEPENDENT,
            ),
            (self.demand, FLAG_DEMAND),
        ] {
            if set {
                flags |= bit;
            }
        }
        let mut bytes = [0u8; CONTROL_PACKET_LEN];
        bytes[0] = (VERSION << 5) | self.diag.bits();
        bytes[1] = flags;
        bytes[2] = self.detect_mult;
        bytes[3] = CONTROL_PACKET_LEN as u8;
        bytes[4..8].copy_from_slice(&self.my_discriminator.to_be_bytes());
        bytes[8..12].copy_from_slice(&self.your_discriminator.to_be_bytes());
        bytes[12..16].copy_from_slice(&self.desired_min_tx_us.to_be_bytes());
        bytes[16..20].copy_from_slice(&self.required_min_rx_us.to_be_bytes());
        bytes[20..24].copy_from_slice(&self.required_min_echo_rx_us.to_be_bytes());
        bytes
    }

    /// Decodes a UDP payload and applies the checks of RFC 5880 §6.8.6 that
    /// precede the session lookup, in the RFC's order, then the A bit
    /// (which the RFC checks after the lookup; the outcome is the same drop).
    pub fn decode(payload: &[u8]) -> Result<Self, DropReason> {
        let Some(&first) = payload.first() else {
            return Err(DropReason::LengthExceedsPayload);
        };
        if first >> 5 != VERSION {
            return Err(DropReason::BadVersion);
        }
        if payload.len() < 4 {
            return Err(DropReason::LengthExceedsPayload);
        }
        let flags = payload[1];
        let auth_present = flags & FLAG_AUTH_PRESENT != 0;
        let length = usize::from(payload[3]);
        let min_length = if auth_present {
            MIN_LEN_WITH_AUTH
        } else {
            CONTROL_PACKET_LEN
        };
        if length < min_length {
            return Err(DropReason::LengthTooShort);
        }
        if length > payload.len() {
            return Err(DropReason::LengthExceedsPayload);
        }
        let word = |at: usize| {
            u32::from_be_bytes([
                payload[at],
                payload[at + 1],
                payload[at + 2],
                payload[at + 3],
            ])
        };
        let packet = Self {
            diag: Diag::from_bits(first),
            state: State::from_bits(flags >> 6),
            poll: flags & FLAG_POLL != 0,
            final_: flags & FLAG_FINAL != 0,
            control_plane_independent: flags & FLAG_CONTROL_PLANE_INDEPENDENT != 0,
            demand: flags & FLAG_DEMAND != 0,
            detect_mult: payload[2],
            my_discriminator: word(4),
            your_discriminator: word(8),
            desired_min_tx_us: word(12),
            required_min_rx_us: word(16),
            required_min_echo_rx_us: word(20),
        };
        if packet.detect_mult == 0 {
            return Err(DropReason::ZeroDetectMult);
        }
        if flags & FLAG_MULTIPOINT != 0 {
            return Err(DropReason::Multipoint);
        }
        if packet.my_discriminator == 0 {
            return Err(DropReason::ZeroMyDiscriminator);
        }
        if packet.your_discriminator == 0 && !matches!(packet.state, State::Down | State::AdminDown)
        {
            return Err(DropReason::ZeroYourDiscriminator);
        }
        if auth_present {
            return Err(DropReason::Authentication);
        }
        Ok(packet)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn sample() -> ControlPacket {
        ControlPacket {
            diag: Diag::NeighborSignaledSessionDown,
            state: State::Init,
            poll: true,
            final_: false,
            control_plane_independent: false,
            demand: false,
            detect_mult: 3,
            my_discriminator: 0x0102_0304,
            your_discriminator: 0xa0b0_c0d0,
            desired_min_tx_us: 100_000,
            required_min_rx_us: 300_000,
            required_min_echo_rx_us: 0,
        }
    }

    #[test]
    fn encodes_the_rfc_layout() {
        let bytes = sample().encode();
        assert_eq!(bytes[0], 0x23, "version 1, diag 3");
        assert_eq!(bytes[1], 0xa0, "state Init (2) in the top bits, then P");
        assert_eq!(bytes[2], 3);
        assert_eq!(bytes[3], 24);
        assert_eq!(&bytes[4..8], &[1, 2, 3, 4]);
        assert_eq!(&bytes[8..12], &[0xa0, 0xb0, 0xc0, 0xd0]);
        assert_eq!(&bytes[12..16], &100_000u32.to_be_bytes());
        assert_eq!(&bytes[16..20], &300_000u32.to_be_bytes());
        assert_eq!(&bytes[20..24], &[0; 4]);
    }

    #[test]
    fn round_trips_every_state_diag_and_flag() {
        for state in [State::AdminDown, State::Down, State::Init, State::Up] {
            for diag in (0..32).map(Diag::from_bits) {
                for flags in 0..16u8 {
                    let packet = ControlPacket {
                        diag,
                        state,
                        poll: flags & 1 != 0,
                        final_: flags & 2 != 0,
                        control_plane_independent: flags & 4 != 0,
                        demand: flags & 8 != 0,
                        ..sample()
                    };
                    assert_eq!(ControlPacket::decode(&packet.encode()), Ok(packet));
                }
            }
        }
    }

    #[test]
    fn accepts_trailing_bytes_beyond_the_length_field() {
        let mut bytes = sample().encode().to_vec();
        bytes.extend_from_slice(&[0xff; 8]);
        assert_eq!(ControlPacket::decode(&bytes), Ok(sample()));
    }

    #[test]
    fn accepts_zero_your_discriminator_in_down_and_admin_down() {
        for state in [State::Down, State::AdminDown] {
            let packet = ControlPacket {
                state,
                your_discriminator: 0,
                ..sample()
            };
            assert_eq!(ControlPacket::decode(&packet.encode()), Ok(packet));
        }
    }

    /// Each malformed class of §6.8.6, made from a valid packet by one change.
    pub(crate) fn malformed() -> Vec<(&'static str, Vec<u8>, DropReason)> {
        let valid = || sample().encode().to_vec();
        let with = |change: &dyn Fn(&mut Vec<u8>)| {
            let mut bytes = valid();
            change(&mut bytes);
            bytes
        };
        vec![
            ("version 0", with(&|b| b[0] &= 0x1f), DropReason::BadVersion),
            (
                "version 2",
                with(&|b| b[0] = (b[0] & 0x1f) | 0x40),
                DropReason::BadVersion,
            ),
            (
                "length 23",
                with(&|b| b[3] = 23),
                DropReason::LengthTooShort,
            ),
            (
                "length 24 with the A bit",
                with(&|b| b[1] |= FLAG_AUTH_PRESENT),
                DropReason::LengthTooShort,
            ),
            (
                "length 25 > payload 24",
                with(&|b| b[3] = 25),
                DropReason::LengthExceedsPayload,
            ),
            (
                "payload of 20 bytes",
                with(&|b| b.truncate(20)),
                DropReason::LengthExceedsPayload,
            ),
            (
                "payload of 2 bytes",
                with(&|b| b.truncate(2)),
                DropReason::LengthExceedsPayload,
            ),
            (
                "empty payload",
                Vec::new(),
                DropReason::LengthExceedsPayload,
            ),
            (
                "detect mult 0",
                with(&|b| b[2] = 0),
                DropReason::ZeroDetectMult,
            ),
            (
                "multipoint",
                with(&|b| b[1] |= FLAG_MULTIPOINT),
                DropReason::Multipoint,
            ),
            (
                "my discriminator 0",
                with(&|b| b[4..8].fill(0)),
                DropReason::ZeroMyDiscriminator,
            ),
            (
                "your discriminator 0 in Init",
                with(&|b| b[8..12].fill(0)),
                DropReason::ZeroYourDiscriminator,
            ),
            (
                "your discriminator 0 in Up",
                with(&|b| {
                    b[8..12].fill(0);
                    b[1] |= 0xc0;
                }),
                DropReason::ZeroYourDiscriminator,
            ),
            (
                "authentication section",
                with(&|b| {
                    b[1] |= FLAG_AUTH_PRESENT;
                    b[3] = 33;
                    b.extend_from_slice(&[1, 9, 1, 0, 0x41, 0x42, 0x43, 0x44, 0x45]);
                }),
                DropReason::Authentication,
            ),
        ]
    }

    #[test]
    fn rejects_each_malformed_class_with_its_reason() {
        for (name, bytes, reason) in malformed() {
            assert_eq!(ControlPacket::decode(&bytes), Err(reason), "{name}");
        }
    }

    #[test]
    fn counts_each_reason_in_its_own_counter() {
        let mut counts = DropCounts::default();
        for (_, _, reason) in malformed() {
            counts.count(reason);
        }
        assert_eq!(counts.bad_version, 2);
        assert_eq!(counts.length_too_short, 2);
        assert_eq!(counts.length_exceeds_payload, 4);
        assert_eq!(counts.authentication, 1);
        assert_eq!(counts.total(), malformed().len() as u64);
    }
}
