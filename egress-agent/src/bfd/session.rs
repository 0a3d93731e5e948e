//! The BFD state machine of RFC 5880 (asynchronous mode, no echo, no
//! authentication), free of I/O: time is passed in, packets come in as
//! bytes and go out as values, so every transition can be tested exactly.
//!
//! `Session` is one peer's state (§6.8.1 variables, §6.8.6 reception,
//! §6.8.7 transmission, §6.8.3 timer changes by Poll sequence). `Sessions`
//! is the table behind the shared receive socket: it applies the TTL rule
//! of RFC 5881, decodes, demultiplexes by discriminator or source, and
//! counts every dropped datagram by reason.

use std::{
    net::IpAddr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

use super::{
    Health, PeerConfig, PeerStatus,
    packet::{ControlPacket, Diag, DropCounts, DropReason, State},
};

/// The fastest a session may advertise before it is Up (RFC 5880 §6.8.3),
/// so that sessions which never come up cost little.
pub const SLOW_TX_INTERVAL: Duration = Duration::from_secs(1);
/// Single-hop packets must arrive with the TTL they were sent with
/// (RFC 5881 §5), which proves they were not forwarded.
pub const REQUIRED_TTL: u8 = 255;

/// Timer parameters of one session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timers {
    pub desired_min_tx: Duration,
    pub required_min_rx: Duration,
    pub detect_mult: u8,
}

/// One BFD session (RFC 5880 §6.8.1 state variables plus its timers).
#[derive(Debug)]
pub struct Session {
    timers: Timers,
    state: State,
    remote_state: State,
    local_discriminator: u32,
    remote_discriminator: u32,
    local_diag: Diag,
    remote_diag: Diag,
    remote_detect_mult: u8,
    remote_desired_min_tx: Duration,
    remote_required_min_rx: Duration,
    remote_demand: bool,
    /// §6.1 passive role: silent while bfd.RemoteDiscr is zero.
    passive: bool,
    /// bfd.DesiredMinTxInterval: what we advertise.
    desired_min_tx: Duration,
    /// What our transmit interval is based on: lags `desired_min_tx` while
    /// an increase waits for its Poll sequence to finish (§6.8.3).
    tx_basis: Duration,
    polling: bool,
    final_due: bool,
    send_now: bool,
    next_tx: Instant,
    detection_deadline: Option<Instant>,
    transitions: u64,
    last_transition: Option<Instant>,
    packets_in: u64,
    packets_out: u64,
    dropped: DropCounts,
    rng: StdRng,
}

fn micros(duration: Duration) -> u32 {
    u32::try_from(duration.as_micros()).unwrap_or(u32::MAX)
}

impl Session {
    /// A session in Down, or in AdminDown (diag 6) when not serving. Its
    /// first packet is due at once.
    pub fn new(
        timers: Timers,
        local_discriminator: u32,
        health: Health,
        seed: u64,
        now: Instant,
    ) -> Self {
        let slow = timers.desired_min_tx.max(SLOW_TX_INTERVAL);
        let (state, local_diag) = match health {
            Health::Serving => (State::Down, Diag::None),
            Health::NotServing => (State::AdminDown, Diag::ConcatenatedPathDown),
        };
        Self {
            timers,
            state,
            remote_state: State::Down,
            local_discriminator,
            remote_discriminator: 0,
            local_diag,
            remote_diag: Diag::None,
            remote_detect_mult: 0,
            remote_desired_min_tx: Duration::ZERO,
            // §6.8.1: 1 µs until the peer says otherwise.
            remote_required_min_rx: Duration::from_micros(1),
            remote_demand: false,
            passive: false,
            desired_min_tx: slow,
            tx_basis: slow,
            polling: false,
            final_due: false,
            send_now: true,
            next_tx: now,
            detection_deadline: None,
            transitions: 0,
            last_transition: None,
            packets_in: 0,
            packets_out: 0,
            dropped: DropCounts::default(),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Takes the passive role (RFC 5880 §6.1): no packet goes out until
    /// the peer's first one has arrived.
    pub fn into_passive(mut self) -> Self {
        self.passive = true;
        self
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn remote_state(&self) -> State {
        self.remote_state
    }

    pub fn local_diag(&self) -> Diag {
        self.local_diag
    }

    pub fn local_discriminator(&self) -> u32 {
        self.local_discriminator
    }

    pub fn remote_discriminator(&self) -> u32 {
        self.remote_discriminator
    }

    pub fn is_polling(&self) -> bool {
        self.polling
    }

    pub fn transitions(&self) -> u64 {
        self.transitions
    }

    /// bfd.DesiredMinTxInterval as currently advertised.
    pub fn advertised_min_tx(&self) -> Duration {
        self.desired_min_tx
    }

    /// The periodic transmit interval before jitter (§6.8.7), or None
    /// while the peer asked for no periodic packets (RequiredMinRx 0 or
    /// Demand mode).
    pub fn tx_interval(&self) -> Option<Duration> {
        let remote_demand_active =
            self.remote_demand && self.state == State::Up && self.remote_state == State::Up;
        if self.remote_required_min_rx.is_zero() || remote_demand_active {
            return None;
        }
        Some(self.tx_basis.max(self.remote_required_min_rx))
    }

    /// How long the peer may stay silent (§6.8.4), known once it was heard.
    pub fn detection_time(&self) -> Option<Duration> {
        if self.remote_detect_mult == 0 {
            return None;
        }
        let interval = self.timers.required_min_rx.max(self.remote_desired_min_tx);
        Some(interval * u32::from(self.remote_detect_mult))
    }

    /// The earliest instant at which `on_timer` or `transmit` has work,
    /// apart from a packet already due at once.
    pub fn next_deadline(&self) -> Option<Instant> {
        let tx = if self.silent() || self.send_now || self.final_due {
            // Already due; the caller sends at once.
            None
        } else {
            self.tx_interval().map(|_| self.next_tx)
        };
        match (tx, self.detection_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Handles the detection timer (§6.8.4): a peer silent for a detection
    /// time is forgotten, and takes an Init or Up session down (diag 1).
    pub fn on_timer(&mut self, now: Instant) {
        let Some(deadline) = self.detection_deadline else {
            return;
        };
        if now < deadline {
            return;
        }
        self.detection_deadline = None;
        self.remote_discriminator = 0;
        self.remote_state = State::Down;
        self.remote_detect_mult = 0;
        self.remote_desired_min_tx = Duration::ZERO;
        self.remote_required_min_rx = Duration::from_micros(1);
        self.remote_demand = false;
        if matches!(self.state, State::Init | State::Up) {
            self.transition(State::Down, Some(Diag::ControlDetectionTimeExpired), now);
        }
    }

    /// Reception of a packet that passed validation and was demultiplexed
    /// to this session (RFC 5880 §6.8.6 from "If the A bit is clear" on).
    pub fn receive(&mut self, packet: &ControlPacket, now: Instant) {
        self.packets_in += 1;
        // A restarted peer has a new discriminator and normally says Down,
        // which the table below handles. One claiming Init or Up under a new
        // discriminator cannot have heard our Down, so its old session is
        // gone and ours must not stay up on the strength of this packet.
        let restarted =
            self.remote_discriminator != 0 && packet.my_discriminator != self.remote_discriminator;
        let stale_up = restarted
            && matches!(self.state, State::Init | State::Up)
            && matches!(packet.state, State::Init | State::Up);
        if stale_up {
            self.transition(State::Down, Some(Diag::NeighborSignaledSessionDown), now);
        }
        let interval_before = self.tx_interval();
        self.remote_discriminator = packet.my_discriminator;
        self.remote_state = packet.state;
        self.remote_diag = packet.diag;
        self.remote_demand = packet.demand;
        self.remote_detect_mult = packet.detect_mult;
        self.remote_desired_min_tx = Duration::from_micros(u64::from(packet.desired_min_tx_us));
        self.remote_required_min_rx = Duration::from_micros(u64::from(packet.required_min_rx_us));
        if packet.final_ && self.polling {
            self.polling = false;
            self.tx_basis = self.desired_min_tx;
        }
        self.detection_deadline = self.detection_time().map(|time| now + time);
        if self.state == State::AdminDown || stale_up {
            return;
        }
        match (self.state, packet.state) {
            (State::Init | State::Up, State::AdminDown) | (State::Up, State::Down) => {
                self.transition(State::Down, Some(Diag::NeighborSignaledSessionDown), now);
            }
            (State::Down, State::Down) => self.transition(State::Init, None, now),
            (State::Down, State::Init) | (State::Init, State::Init | State::Up) => {
                self.transition(State::Up, None, now);
            }
            _ => {}
        }
        if packet.poll {
            self.final_due = true;
        }
        // A peer that now accepts packets faster should get them without
        // waiting out the slower interval already scheduled.
        if let Some(interval) = self.tx_interval()
            && interval_before.is_none_or(|before| interval < before)
        {
            let sooner = now + self.jittered(interval);
            self.next_tx = self.next_tx.min(sooner);
        }
    }

    /// Local administrative control: AdminDown with the given diag (7 for
    /// a shutdown, 6 while the dataplane does not serve).
    pub fn admin_down(&mut self, diag: Diag, now: Instant) {
        if self.state == State::AdminDown {
            if self.local_diag != diag {
                self.local_diag = diag;
                self.send_now = true;
            }
            return;
        }
        self.transition(State::AdminDown, Some(diag), now);
    }

    /// Leaves AdminDown for Down, from where the session can come up.
    pub fn admin_up(&mut self, now: Instant) {
        if self.state == State::AdminDown {
            self.transition(State::Down, None, now);
        }
    }

    /// Makes the next `transmit` send regardless of the interval (for the
    /// repeated AdminDown of a shutdown).
    pub fn send_soon(&mut self) {
        self.send_now = true;
    }

    /// The packet due at `now`, if any (§6.8.7). Packets answering a Poll
    /// and packets announcing a state change go at once; the rest follow
    /// the jittered periodic interval.
    pub fn transmit(&mut self, now: Instant) -> Option<ControlPacket> {
        // A pending state change waits in send_now and goes with the
        // answer to the peer's first packet.
        if self.silent() {
            return None;
        }
        let periodic_due = self.tx_interval().is_some() && now >= self.next_tx;
        if !(self.send_now || self.final_due || periodic_due) {
            return None;
        }
        let packet = ControlPacket {
            diag: self.local_diag,
            state: self.state,
            // §6.8.7: never P and F together; the Poll goes in the next one.
            poll: self.polling && !self.final_due,
            final_: self.final_due,
            control_plane_independent: false,
            demand: false,
            detect_mult: self.timers.detect_mult,
            my_discriminator: self.local_discriminator,
            your_discriminator: self.remote_discriminator,
            desired_min_tx_us: micros(self.desired_min_tx),
            required_min_rx_us: micros(self.timers.required_min_rx),
            required_min_echo_rx_us: 0,
        };
        self.send_now = false;
        self.final_due = false;
        self.packets_out += 1;
        if let Some(interval) = self.tx_interval() {
            self.next_tx = now + self.jittered(interval);
        }
        Some(packet)
    }

    /// §6.8.7: a passive system must not transmit while bfd.RemoteDiscr is
    /// zero (the peer not heard yet, or forgotten after its silence).
    fn silent(&self) -> bool {
        self.passive && self.remote_discriminator == 0
    }

    fn jittered(&mut self, interval: Duration) -> Duration {
        // §6.8.7: 0-25% less, and at least 10% less with a multiplier of 1
        // so that a single late packet does not expire the peer's timer.
        let most = if self.timers.detect_mult == 1 {
            0.9
        } else {
            1.0
        };
        interval.mul_f64(self.rng.random_range(0.75..=most))
    }

    fn transition(&mut self, to: State, diag: Option<Diag>, now: Instant) {
        if to == self.state {
            return;
        }
        let was_up = self.state == State::Up;
        self.state = to;
        self.transitions += 1;
        self.last_transition = Some(now);
        self.send_now = true;
        if let Some(diag) = diag {
            self.local_diag = diag;
        }
        let slow = self.timers.desired_min_tx.max(SLOW_TX_INTERVAL);
        if to == State::Up {
            self.local_diag = Diag::None;
            self.change_desired_min_tx(self.timers.desired_min_tx);
        } else if was_up {
            // Not Up any more: back to the slow rate. The peer is told by
            // the state change itself, so no Poll sequence is needed.
            self.polling = false;
            self.desired_min_tx = slow;
            self.tx_basis = slow;
        }
    }

    /// §6.8.3: a new DesiredMinTxInterval is announced by a Poll sequence;
    /// a faster rate applies at once, a slower one only after the Final.
    fn change_desired_min_tx(&mut self, desired: Duration) {
        if desired == self.desired_min_tx {
            return;
        }
        if desired < self.tx_basis {
            self.tx_basis = desired;
        }
        self.desired_min_tx = desired;
        self.polling = true;
    }

    fn status(&self, peer: &PeerKey, now: Instant, wall_now: SystemTime) -> PeerStatus {
        let as_ms = |duration: Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        let last_transition_unix_ms = self.last_transition.and_then(|at| {
            let wall = wall_now.checked_sub(now.saturating_duration_since(at))?;
            wall.duration_since(UNIX_EPOCH).ok().map(as_ms)
        });
        PeerStatus {
            address: peer.address,
            interface: peer.interface.clone(),
            local_state: self.state,
            remote_state: self.remote_state,
            local_discriminator: self.local_discriminator,
            remote_discriminator: self.remote_discriminator,
            local_diag: self.local_diag,
            remote_diag: self.remote_diag,
            tx_interval_ms: self.tx_interval().map(as_ms),
            detection_time_ms: self.detection_time().map(as_ms),
            remote_multiplier: self.remote_detect_mult,
            transitions: self.transitions,
            last_transition_unix_ms,
            packets_in: self.packets_in,
            packets_out: self.packets_out,
            dropped: self.dropped,
        }
    }
}

/// Where a datagram came from, as the receive socket saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub source: IpAddr,
    /// The IPv4 TTL or IPv6 hop limit, None when the kernel did not report it.
    pub ttl: Option<u8>,
    /// The interface it arrived on, None when unknown.
    pub ifindex: Option<u32>,
}

/// Which peer a session is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerKey {
    pub address: IpAddr,
    pub interface: Option<String>,
    /// Index of `interface`, resolved when the sockets were made.
    pub ifindex: Option<u32>,
}

impl PeerKey {
    fn matches(&self, arrival: &Arrival) -> bool {
        self.address == arrival.source
            && self
                .ifindex
                .is_none_or(|index| arrival.ifindex == Some(index))
    }
}

/// All sessions behind one receive socket.
#[derive(Debug)]
pub struct Sessions {
    entries: Vec<(PeerKey, Session)>,
    /// Drops that no configured peer's address explains.
    unmatched: DropCounts,
}

impl Sessions {
    /// One session per peer, with distinct random nonzero discriminators.
    pub fn new(peers: Vec<(PeerKey, PeerConfig)>, health: Health, seed: u64, now: Instant) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut entries: Vec<(PeerKey, Session)> = Vec::with_capacity(peers.len());
        for (key, config) in peers {
            let discriminator = loop {
                let candidate: u32 = rng.random();
                let taken = entries
                    .iter()
                    .any(|(_, session)| session.local_discriminator == candidate);
                if candidate != 0 && !taken {
                    break candidate;
                }
            };
            let timers = Timers {
                desired_min_tx: config.min_tx,
                required_min_rx: config.min_rx,
                detect_mult: config.multiplier,
            };
            let session = Session::new(timers, discriminator, health, rng.random(), now);
            let session = if config.passive {
                session.into_passive()
            } else {
                session
            };
            entries.push((key, session));
        }
        Self {
            entries,
            unmatched: DropCounts::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn peer(&self, index: usize) -> Option<&PeerKey> {
        self.entries.get(index).map(|(key, _)| key)
    }

    pub fn session(&self, index: usize) -> Option<&Session> {
        self.entries.get(index).map(|(_, session)| session)
    }

    pub fn unmatched_drops(&self) -> DropCounts {
        self.unmatched
    }

    /// Takes one datagram received on the control port; on success, the
    /// index of the session it was for. Drops are counted on the peer whose
    /// address sent them, or as unmatched.
    pub fn receive(
        &mut self,
        payload: &[u8],
        arrival: Arrival,
        now: Instant,
    ) -> Result<usize, DropReason> {
        let outcome = self.demultiplex(payload, &arrival);
        match outcome {
            Ok((index, packet)) => {
                if let Some((_, session)) = self.entries.get_mut(index) {
                    session.receive(&packet, now);
                }
                Ok(index)
            }
            Err(reason) => {
                let sender = self
                    .entries
                    .iter_mut()
                    .find(|(key, _)| key.matches(&arrival));
                match sender {
                    Some((_, session)) => session.dropped.count(reason),
                    None => self.unmatched.count(reason),
                }
                Err(reason)
            }
        }
    }

    fn demultiplex(
        &self,
        payload: &[u8],
        arrival: &Arrival,
    ) -> Result<(usize, ControlPacket), DropReason> {
        if arrival.ttl != Some(REQUIRED_TTL) {
            return Err(DropReason::BadTtl);
        }
        let packet = ControlPacket::decode(payload)?;
        let index = if packet.your_discriminator != 0 {
            let index = self
                .entries
                .iter()
                .position(|(_, session)| session.local_discriminator == packet.your_discriminator)
                .ok_or(DropReason::UnknownDiscriminator)?;
            if !self.entries[index].0.matches(arrival) {
                return Err(DropReason::WrongSource);
            }
            index
        } else {
            self.entries
                .iter()
                .position(|(key, _)| key.matches(arrival))
                .ok_or(DropReason::UnknownPeer)?
        };
        Ok((index, packet))
    }

    pub fn set_health(&mut self, health: Health, now: Instant) {
        for (_, session) in &mut self.entries {
            match health {
                Health::Serving => session.admin_up(now),
                Health::NotServing => session.admin_down(Diag::ConcatenatedPathDown, now),
            }
        }
    }

    /// AdminDown with diag 7 everywhere, and a packet due at once.
    pub fn begin_shutdown(&mut self, now: Instant) {
        for (_, session) in &mut self.entries {
            session.admin_down(Diag::AdministrativelyDown, now);
            session.send_soon();
        }
    }

    /// Asks every session to send once more, whatever its interval.
    pub fn send_all_soon(&mut self) {
        for (_, session) in &mut self.entries {
            session.send_soon();
        }
    }

    /// Runs the detection timers, then hands every due packet to `send`
    /// with the index of its session. Call it after every `receive` or
    /// health change too: their replies are due at once.
    pub fn tick(&mut self, now: Instant, mut send: impl FnMut(usize, &ControlPacket)) {
        for (index, (_, session)) in self.entries.iter_mut().enumerate() {
            session.on_timer(now);
            if let Some(packet) = session.transmit(now) {
                send(index, &packet);
            }
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries
            .iter()
            .filter_map(|(_, session)| session.next_deadline())
            .min()
    }

    pub fn snapshot(&self, now: Instant, wall_now: SystemTime) -> Vec<PeerStatus> {
        self.entries
            .iter()
            .map(|(key, session)| session.status(key, now, wall_now))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const MS: Duration = Duration::from_millis(1);
    const LOCAL: u32 = 0x1111;
    const REMOTE: u32 = 0x2222;
    const PEER: Ipv4Addr = Ipv4Addr::new(10, 255, 255, 1);

    fn timers() -> Timers {
        Timers {
            desired_min_tx: 100 * MS,
            required_min_rx: 100 * MS,
            detect_mult: 3,
        }
    }

    fn session(now: Instant) -> Session {
        Session::new(timers(), LOCAL, Health::Serving, 7, now)
    }

    fn from_peer(state: State) -> ControlPacket {
        ControlPacket {
            diag: Diag::None,
            state,
            poll: false,
            final_: false,
            control_plane_independent: false,
            demand: false,
            detect_mult: 3,
            my_discriminator: REMOTE,
            your_discriminator: if state == State::Down { 0 } else { LOCAL },
            desired_min_tx_us: 100_000,
            required_min_rx_us: 100_000,
            required_min_echo_rx_us: 0,
        }
    }

    fn with_diag(mut packet: ControlPacket, diag: Diag) -> ControlPacket {
        packet.diag = diag;
        packet
    }

    /// Drives a fresh session to Up through Down -> Init -> Up.
    fn up_session(now: Instant) -> Session {
        let mut s = session(now);
        s.receive(&from_peer(State::Down), now);
        assert_eq!(s.state(), State::Init);
        s.receive(&from_peer(State::Up), now);
        assert_eq!(s.state(), State::Up);
        s
    }

    /// Every packet the session wants to send at `now`.
    fn drain(s: &mut Session, now: Instant) -> Vec<ControlPacket> {
        std::iter::from_fn(|| s.transmit(now)).collect()
    }

    #[test]
    fn starts_down_with_slow_tx_and_sends_at_once() {
        let t0 = Instant::now();
        let mut s = session(t0);
        assert_eq!(s.state(), State::Down);
        assert_eq!(s.advertised_min_tx(), SLOW_TX_INTERVAL);
        let sent = drain(&mut s, t0);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].state, State::Down);
        assert_eq!(sent[0].your_discriminator, 0);
        assert_eq!(sent[0].my_discriminator, LOCAL);
        assert_eq!(sent[0].desired_min_tx_us, 1_000_000);
        assert_eq!(sent[0].required_min_rx_us, 100_000);
        assert!(!sent[0].poll);
    }

    #[test]
    fn down_goes_init_on_remote_down() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.receive(&from_peer(State::Down), t0);
        assert_eq!(s.state(), State::Init);
        assert_eq!(s.remote_discriminator(), REMOTE);
        assert_eq!(drain(&mut s, t0)[0].your_discriminator, REMOTE);
    }

    #[test]
    fn down_goes_up_on_remote_init() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.receive(&from_peer(State::Init), t0);
        assert_eq!(s.state(), State::Up);
    }

    #[test]
    fn down_stays_down_on_remote_up() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.receive(&from_peer(State::Up), t0);
        assert_eq!(s.state(), State::Down);
        assert_eq!(s.transitions(), 0);
    }

    #[test]
    fn init_goes_up_on_remote_init_or_up() {
        for remote in [State::Init, State::Up] {
            let t0 = Instant::now();
            let mut s = session(t0);
            s.receive(&from_peer(State::Down), t0);
            s.receive(&from_peer(remote), t0);
            assert_eq!(s.state(), State::Up, "remote {remote}");
            assert_eq!(s.local_diag(), Diag::None);
        }
    }

    #[test]
    fn init_stays_init_on_remote_down() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.receive(&from_peer(State::Down), t0);
        s.receive(&from_peer(State::Down), t0 + 10 * MS);
        assert_eq!(s.state(), State::Init);
    }

    #[test]
    fn up_goes_down_with_diag_3_on_remote_down() {
        let t0 = Instant::now();
        let mut s = up_session(t0);
        let mut down = from_peer(State::Down);
        down.your_discriminator = LOCAL;
        s.receive(&with_diag(down, Diag::ControlDetectionTimeExpired), t0 + MS);
        assert_eq!(s.state(), State::Down);
        assert_eq!(s.local_diag(), Diag::NeighborSignaledSessionDown);
        let sent = drain(&mut s, t0 + MS);
        assert_eq!(sent[0].state, State::Down);
        assert_eq!(sent[0].diag, Diag::NeighborSignaledSessionDown);
        assert_eq!(s.advertised_min_tx(), SLOW_TX_INTERVAL);
    }

    #[test]
    fn up_and_init_go_down_on_remote_admin_down() {
        let t0 = Instant::now();
        let mut up = up_session(t0);
        let admin_down = with_diag(from_peer(State::AdminDown), Diag::AdministrativelyDown);
        up.receive(&admin_down, t0 + MS);
        assert_eq!(up.state(), State::Down);
        assert_eq!(up.local_diag(), Diag::NeighborSignaledSessionDown);

        let mut init = session(t0);
        init.receive(&from_peer(State::Down), t0);
        init.receive(&admin_down, t0 + MS);
        assert_eq!(init.state(), State::Down);
        assert_eq!(init.local_diag(), Diag::NeighborSignaledSessionDown);

        let mut down = session(t0);
        down.receive(&admin_down, t0 + MS);
        assert_eq!(down.state(), State::Down);
        assert_eq!(
            down.transitions(),
            0,
            "Down stays Down without a transition"
        );
    }

    #[test]
    fn up_stays_up_on_remote_init_and_up() {
        let t0 = Instant::now();
        let mut s = up_session(t0);
        s.receive(&from_peer(State::Init), t0 + MS);
        s.receive(&from_peer(State::Up), t0 + 2 * MS);
        assert_eq!(s.state(), State::Up);
        assert_eq!(s.transitions(), 2);
    }

    #[test]
    fn detection_timeout_takes_up_down_with_diag_1() {
        let t0 = Instant::now();
        let mut s = up_session(t0);
        // 3 x max(our 100 ms min rx, their 100 ms desired tx).
        assert_eq!(s.detection_time(), Some(300 * MS));
        s.on_timer(t0 + 299 * MS);
        assert_eq!(s.state(), State::Up);
        s.on_timer(t0 + 300 * MS);
        assert_eq!(s.state(), State::Down);
        assert_eq!(s.local_diag(), Diag::ControlDetectionTimeExpired);
        assert_eq!(
            s.remote_discriminator(),
            0,
            "§6.8.1: forgotten after a detection time"
        );
        let sent = drain(&mut s, t0 + 300 * MS);
        assert_eq!(sent[0].diag, Diag::ControlDetectionTimeExpired);
        assert_eq!(sent[0].your_discriminator, 0);
    }

    #[test]
    fn detection_time_uses_the_slower_of_our_rx_and_their_tx() {
        let t0 = Instant::now();
        let mut s = session(t0);
        let mut slow_peer = from_peer(State::Down);
        slow_peer.desired_min_tx_us = 1_000_000;
        slow_peer.detect_mult = 5;
        s.receive(&slow_peer, t0);
        assert_eq!(s.detection_time(), Some(5 * SLOW_TX_INTERVAL));
        s.on_timer(t0 + 4999 * MS);
        assert_eq!(s.state(), State::Init);
        s.on_timer(t0 + 5000 * MS);
        assert_eq!(s.state(), State::Down);
        assert_eq!(s.local_diag(), Diag::ControlDetectionTimeExpired);
    }

    #[test]
    fn each_packet_restarts_the_detection_timer() {
        let t0 = Instant::now();
        let mut s = up_session(t0);
        for step in 1..=10 {
            let at = t0 + step * 250 * MS;
            s.on_timer(at);
            s.receive(&from_peer(State::Up), at);
        }
        assert_eq!(s.state(), State::Up);
    }

    #[test]
    fn admin_down_local_sends_diag_and_ignores_the_peer() {
        let t0 = Instant::now();
        let mut s = up_session(t0);
        s.admin_down(Diag::ConcatenatedPathDown, t0 + MS);
        assert_eq!(s.state(), State::AdminDown);
        let sent = drain(&mut s, t0 + MS);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].state, State::AdminDown);
        assert_eq!(sent[0].diag, Diag::ConcatenatedPathDown);
        assert_eq!(sent[0].desired_min_tx_us, 1_000_000);

        // Whatever the peer says, and however long it is silent.
        for state in [State::Down, State::Init, State::Up] {
            s.receive(&from_peer(state), t0 + 2 * MS);
        }
        s.on_timer(t0 + 10 * SLOW_TX_INTERVAL);
        assert_eq!(s.state(), State::AdminDown);

        // A shutdown while not serving changes the reason only.
        s.admin_down(Diag::AdministrativelyDown, t0 + 3 * MS);
        assert_eq!(
            drain(&mut s, t0 + 3 * MS)[0].diag,
            Diag::AdministrativelyDown
        );

        s.admin_up(t0 + 4 * MS);
        assert_eq!(s.state(), State::Down);
        s.receive(&from_peer(State::Init), t0 + 5 * MS);
        assert_eq!(s.state(), State::Up);
        assert_eq!(s.local_diag(), Diag::None);
    }

    #[test]
    fn starting_not_serving_starts_in_admin_down() {
        let t0 = Instant::now();
        let mut s = Session::new(timers(), LOCAL, Health::NotServing, 1, t0);
        assert_eq!(s.state(), State::AdminDown);
        let sent = drain(&mut s, t0);
        assert_eq!(sent[0].state, State::AdminDown);
        assert_eq!(sent[0].diag, Diag::ConcatenatedPathDown);
        s.receive(&from_peer(State::Init), t0);
        assert_eq!(s.state(), State::AdminDown);
    }

    #[test]
    fn coming_up_polls_for_the_fast_rate_until_final() {
        let t0 = Instant::now();
        let mut s = up_session(t0);
        assert!(s.is_polling());
        assert_eq!(s.advertised_min_tx(), 100 * MS);
        // A faster rate applies at once (§6.8.3 restricts only increases).
        assert_eq!(s.tx_interval(), Some(100 * MS));
        let sent = drain(&mut s, t0);
        assert_eq!(sent.len(), 1);
        assert!(sent[0].poll && !sent[0].final_);
        assert_eq!(sent[0].desired_min_tx_us, 100_000);
        // Periodic packets keep the P bit until the Final.
        let again = drain(&mut s, t0 + 100 * MS);
        assert!(again[0].poll);
        let mut fin = from_peer(State::Up);
        fin.final_ = true;
        s.receive(&fin, t0 + 101 * MS);
        assert!(!s.is_polling());
        let after = drain(&mut s, t0 + 201 * MS);
        assert!(!after[0].poll);
    }

    #[test]
    fn a_slower_rate_waits_for_the_final() {
        let t0 = Instant::now();
        let mut s = up_session(t0);
        let mut fin = from_peer(State::Up);
        fin.final_ = true;
        s.receive(&fin, t0);
        s.change_desired_min_tx(500 * MS);
        assert!(s.is_polling());
        assert_eq!(s.advertised_min_tx(), 500 * MS);
        assert_eq!(s.tx_interval(), Some(100 * MS), "old rate until the Final");
        s.receive(&fin, t0 + MS);
        assert_eq!(s.tx_interval(), Some(500 * MS));
    }

    #[test]
    fn a_configured_rate_slower_than_a_second_needs_no_poll() {
        let t0 = Instant::now();
        let slow = Timers {
            desired_min_tx: 2 * SLOW_TX_INTERVAL,
            ..timers()
        };
        let mut s = Session::new(slow, LOCAL, Health::Serving, 3, t0);
        s.receive(&from_peer(State::Init), t0);
        assert_eq!(s.state(), State::Up);
        assert!(
            !s.is_polling(),
            "the rate before Up was already the configured one"
        );
        assert_eq!(s.tx_interval(), Some(2 * SLOW_TX_INTERVAL));
    }

    #[test]
    fn answers_a_poll_at_once_with_final_and_never_both_bits() {
        let t0 = Instant::now();
        let mut s = up_session(t0);
        drain(&mut s, t0);
        let mut poll = from_peer(State::Up);
        poll.poll = true;
        poll.desired_min_tx_us = 50_000;
        poll.required_min_rx_us = 50_000;
        s.receive(&poll, t0 + 10 * MS);
        let sent = drain(&mut s, t0 + 10 * MS);
        assert_eq!(sent.len(), 1, "the Final goes before the periodic timer");
        assert!(
            sent[0].final_ && !sent[0].poll,
            "our own Poll waits for the next packet"
        );
        // Their new rates count from now: they accept packets every 50 ms,
        // ours stays at our own 100 ms; detection follows their 50 ms.
        assert_eq!(s.tx_interval(), Some(100 * MS));
        assert_eq!(s.detection_time(), Some(300 * MS));
        let next = drain(&mut s, t0 + 110 * MS);
        assert!(next[0].poll && !next[0].final_);
    }

    #[test]
    fn periodic_packets_are_jittered_within_75_to_100_percent() {
        let t0 = Instant::now();
        let mut s = up_session(t0);
        let mut fin = from_peer(State::Up);
        fin.final_ = true;
        s.receive(&fin, t0);
        let mut now = t0;
        drain(&mut s, now);
        let mut gaps = Vec::new();
        for _ in 0..200 {
            let due = s.next_tx;
            gaps.push(due - now);
            now = due;
            s.receive(&from_peer(State::Up), now);
            assert_eq!(drain(&mut s, now).len(), 1);
        }
        assert!(
            gaps.iter().all(|gap| *gap >= 75 * MS && *gap <= 100 * MS),
            "{gaps:?}"
        );
        assert!(
            gaps.iter().any(|gap| *gap < 85 * MS),
            "jitter actually varies"
        );
    }

    #[test]
    fn multiplier_one_sends_at_most_every_90_percent() {
        let t0 = Instant::now();
        let single = Timers {
            detect_mult: 1,
            ..timers()
        };
        let mut s = Session::new(single, LOCAL, Health::Serving, 11, t0);
        s.receive(&from_peer(State::Init), t0);
        let mut now = t0;
        drain(&mut s, now);
        for _ in 0..200 {
            let gap = s.next_tx - now;
            assert!(gap >= 75 * MS && gap <= 90 * MS, "{gap:?}");
            now = s.next_tx;
            drain(&mut s, now);
        }
    }

    #[test]
    fn tx_interval_follows_the_peers_required_min_rx() {
        let t0 = Instant::now();
        let mut s = up_session(t0);
        let mut slow_rx = from_peer(State::Up);
        slow_rx.required_min_rx_us = 500_000;
        s.receive(&slow_rx, t0);
        assert_eq!(s.tx_interval(), Some(500 * MS));
        let mut silent = from_peer(State::Up);
        silent.required_min_rx_us = 0;
        s.receive(&silent, t0);
        assert_eq!(
            s.tx_interval(),
            None,
            "a peer with RequiredMinRx 0 gets no periodic packets"
        );
    }

    #[test]
    fn a_peer_restarting_with_a_new_discriminator_is_relearned() {
        let t0 = Instant::now();
        let mut s = up_session(t0);
        // The restarted peer knows nothing of us yet.
        let mut reborn = from_peer(State::Down);
        reborn.my_discriminator = 0x3333;
        s.receive(&reborn, t0 + MS);
        assert_eq!(s.state(), State::Down);
        assert_eq!(s.local_diag(), Diag::NeighborSignaledSessionDown);
        assert_eq!(s.remote_discriminator(), 0x3333);
        // Then Down + Down: Init, and Up with the new peer.
        s.receive(&reborn, t0 + 2 * MS);
        assert_eq!(s.state(), State::Init);
        let sent = drain(&mut s, t0 + 2 * MS);
        assert_eq!(sent.last().map(|p| p.your_discriminator), Some(0x3333));
        let mut init = from_peer(State::Init);
        init.my_discriminator = 0x3333;
        s.receive(&init, t0 + 3 * MS);
        assert_eq!(s.state(), State::Up);
    }

    #[test]
    fn a_new_discriminator_in_up_takes_the_session_down_first() {
        let t0 = Instant::now();
        let mut s = up_session(t0);
        let mut other = from_peer(State::Up);
        other.my_discriminator = 0x4444;
        s.receive(&other, t0 + MS);
        assert_eq!(
            s.state(),
            State::Down,
            "not believed under a new discriminator"
        );
        assert_eq!(s.local_diag(), Diag::NeighborSignaledSessionDown);
        assert_eq!(s.remote_discriminator(), 0x4444);
        // From here on the new peer counts: Down + Up stays Down.
        s.receive(&other, t0 + 2 * MS);
        assert_eq!(s.state(), State::Down);
        let mut down = from_peer(State::Down);
        down.my_discriminator = 0x4444;
        s.receive(&down, t0 + 3 * MS);
        assert_eq!(s.state(), State::Init);
    }

    #[test]
    fn a_peer_restarting_after_our_timeout_is_learned_afresh() {
        let t0 = Instant::now();
        let mut s = up_session(t0);
        s.on_timer(t0 + SLOW_TX_INTERVAL);
        assert_eq!(s.state(), State::Down);
        let transitions = s.transitions();
        let mut reborn = from_peer(State::Down);
        reborn.my_discriminator = 0x5555;
        s.receive(&reborn, t0 + 2 * SLOW_TX_INTERVAL);
        assert_eq!(s.state(), State::Init);
        assert_eq!(s.transitions(), transitions + 1);
    }

    #[test]
    fn a_passive_session_is_silent_until_the_peer_is_heard() {
        let t0 = Instant::now();
        let mut s = session(t0).into_passive();
        assert!(drain(&mut s, t0).is_empty());
        assert!(drain(&mut s, t0 + 10 * SLOW_TX_INTERVAL).is_empty());
        // Nothing to wake up for: a silent session must not make the
        // runtime spin on a transmit time already past.
        assert_eq!(s.next_deadline(), None);
        s.receive(&from_peer(State::Down), t0 + 100 * MS);
        let sent = drain(&mut s, t0 + 100 * MS);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].state, State::Init);
        assert_eq!(sent[0].your_discriminator, REMOTE);
        s.receive(&from_peer(State::Up), t0 + 200 * MS);
        assert_eq!(s.state(), State::Up);
    }

    #[test]
    fn a_passive_session_falls_silent_again_when_the_peer_does() {
        let t0 = Instant::now();
        let mut s = up_session(t0).into_passive();
        drain(&mut s, t0);
        let expired = t0 + 300 * MS;
        s.on_timer(expired);
        assert_eq!(s.state(), State::Down);
        assert!(drain(&mut s, expired).is_empty());
        assert!(drain(&mut s, expired + 10 * SLOW_TX_INTERVAL).is_empty());
    }

    #[test]
    fn a_passive_session_not_serving_answers_admin_down_with_diag_6() {
        let t0 = Instant::now();
        let mut s = Session::new(timers(), LOCAL, Health::NotServing, 7, t0).into_passive();
        assert!(drain(&mut s, t0).is_empty());
        s.receive(&from_peer(State::Down), t0);
        assert_eq!(s.state(), State::AdminDown);
        let sent = drain(&mut s, t0);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].state, State::AdminDown);
        assert_eq!(sent[0].diag, Diag::ConcatenatedPathDown);
        assert_eq!(sent[0].your_discriminator, REMOTE);
    }

    // The table behind the socket.

    fn table(now: Instant) -> Sessions {
        let config = PeerConfig {
            address: PEER.into(),
            interface: Some("veth0".into()),
            min_tx: 100 * MS,
            min_rx: 100 * MS,
            multiplier: 3,
            passive: false,
        };
        let key = PeerKey {
            address: PEER.into(),
            interface: Some("veth0".into()),
            ifindex: Some(7),
        };
        Sessions::new(vec![(key, config)], Health::Serving, 42, now)
    }

    fn arrival() -> Arrival {
        Arrival {
            source: PEER.into(),
            ttl: Some(255),
            ifindex: Some(7),
        }
    }

    fn ours(sessions: &Sessions) -> u32 {
        sessions
            .session(0)
            .expect("one session")
            .local_discriminator()
    }

    /// A table whose session is Up with the peer.
    fn up_table(now: Instant) -> Sessions {
        let mut sessions = table(now);
        let local = ours(&sessions);
        let mut init = from_peer(State::Init);
        init.your_discriminator = local;
        assert_eq!(sessions.receive(&init.encode(), arrival(), now), Ok(0));
        assert_eq!(sessions.session(0).map(Session::state), Some(State::Up));
        sessions
    }

    #[test]
    fn demultiplexes_by_source_when_your_discriminator_is_zero() {
        let t0 = Instant::now();
        let mut sessions = table(t0);
        assert_eq!(
            sessions.receive(&from_peer(State::Down).encode(), arrival(), t0),
            Ok(0)
        );
        assert_eq!(sessions.session(0).map(Session::state), Some(State::Init));
    }

    #[test]
    fn each_malformed_class_is_dropped_and_counted_without_changing_state() {
        let t0 = Instant::now();
        let mut sessions = up_table(t0);
        let before = sessions
            .session(0)
            .map(|s| (s.state(), s.remote_discriminator(), s.packets_in));
        let mut expected = DropCounts::default();
        for (name, bytes, reason) in crate::bfd::packet::tests::malformed() {
            assert_eq!(
                sessions.receive(&bytes, arrival(), t0),
                Err(reason),
                "{name}"
            );
            expected.count(reason);
        }
        let local = ours(&sessions);
        let up = {
            let mut p = from_peer(State::Up);
            p.your_discriminator = local;
            p
        };
        let forwarded = Arrival {
            ttl: Some(254),
            ..arrival()
        };
        assert_eq!(
            sessions.receive(&up.encode(), forwarded, t0),
            Err(DropReason::BadTtl)
        );
        expected.count(DropReason::BadTtl);
        let no_ttl = Arrival {
            ttl: None,
            ..arrival()
        };
        assert_eq!(
            sessions.receive(&up.encode(), no_ttl, t0),
            Err(DropReason::BadTtl)
        );
        expected.count(DropReason::BadTtl);
        let mut stranger_disc = up;
        stranger_disc.your_discriminator = local.wrapping_add(1).max(1);
        assert_eq!(
            sessions.receive(&stranger_disc.encode(), arrival(), t0),
            Err(DropReason::UnknownDiscriminator)
        );
        expected.count(DropReason::UnknownDiscriminator);
        let wrong_interface = Arrival {
            ifindex: Some(8),
            ..arrival()
        };
        assert_eq!(
            sessions.receive(&up.encode(), wrong_interface, t0),
            Err(DropReason::WrongSource)
        );
        let elsewhere = Arrival {
            source: Ipv4Addr::new(10, 9, 9, 9).into(),
            ..arrival()
        };
        assert_eq!(
            sessions.receive(&up.encode(), elsewhere, t0),
            Err(DropReason::WrongSource)
        );
        assert_eq!(
            sessions.receive(&from_peer(State::Down).encode(), elsewhere, t0),
            Err(DropReason::UnknownPeer)
        );

        let session = sessions.session(0).expect("one session");
        assert_eq!(
            Some((
                session.state(),
                session.remote_discriminator(),
                session.packets_in
            )),
            before
        );
        assert_eq!(session.dropped, expected);
        let unmatched = sessions.unmatched_drops();
        assert_eq!(
            unmatched.wrong_source, 2,
            "from another interface or address"
        );
        assert_eq!(unmatched.unknown_peer, 1);
        assert_eq!(unmatched.total(), 3);
    }

    #[test]
    fn health_not_serving_takes_every_session_admin_down_with_diag_6() {
        let t0 = Instant::now();
        let mut sessions = up_table(t0);
        sessions.set_health(Health::NotServing, t0 + MS);
        let mut sent = Vec::new();
        sessions.tick(t0 + MS, |index, packet| sent.push((index, *packet)));
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].1.state, State::AdminDown);
        assert_eq!(sent[0].1.diag, Diag::ConcatenatedPathDown);
        sessions.set_health(Health::Serving, t0 + 2 * MS);
        assert_eq!(sessions.session(0).map(Session::state), Some(State::Down));
    }

    #[test]
    fn shutdown_sends_admin_down_with_diag_7() {
        let t0 = Instant::now();
        let mut sessions = up_table(t0);
        sessions.begin_shutdown(t0);
        let mut sent = Vec::new();
        for step in 0..3 {
            sessions.send_all_soon();
            sessions.tick(t0 + step * MS, |_, packet| sent.push(*packet));
        }
        assert_eq!(sent.len(), 3);
        assert!(
            sent.iter()
                .all(|p| p.state == State::AdminDown && p.diag == Diag::AdministrativelyDown)
        );
    }

    #[test]
    fn snapshot_reports_what_the_session_knows() {
        let t0 = Instant::now();
        let sessions = up_table(t0);
        let wall = UNIX_EPOCH + Duration::from_secs(1_000);
        let status = sessions.snapshot(t0 + SLOW_TX_INTERVAL, wall);
        assert_eq!(status.len(), 1);
        let peer = &status[0];
        assert_eq!(peer.address, PEER);
        assert_eq!(peer.interface.as_deref(), Some("veth0"));
        assert_eq!(peer.local_state, State::Up);
        assert_eq!(peer.remote_state, State::Init);
        assert_eq!(peer.remote_discriminator, REMOTE);
        assert_eq!(peer.tx_interval_ms, Some(100));
        assert_eq!(peer.detection_time_ms, Some(300));
        assert_eq!(peer.remote_multiplier, 3);
        assert_eq!(peer.transitions, 1);
        assert_eq!(peer.last_transition_unix_ms, Some(999_000));
        assert_eq!(peer.packets_in, 1);
    }
}
