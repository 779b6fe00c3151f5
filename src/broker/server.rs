//! The embedded broker's ntex-mqtt server: one v3 and one v5 service (handshake, publish,
//! SUBSCRIBE/UNSUBSCRIBE, connection control) over the shared `State`, and the accept loop
//! that feeds TCP connections to them on the broker's ntex thread.
//!
//! Two ntex-mqtt 8.2 behaviours are worked around in the `Acks` middleware, which sees every
//! decoded packet before ntex-mqtt's dispatcher: acks of our deliveries (PUBACK, PUBREC,
//! PUBCOMP) go to the session state instead of ntex-mqtt's in-order sink (see `wire`), and
//! incoming QoS 2 is run here (PUBREC, PUBREL, PUBCOMP, duplicate detection across
//! reconnects) because the v5 dispatcher never frees a QoS 2 packet id after PUBREL, so a
//! long QoS 2 stream would soon exceed its own Receive Maximum check and be disconnected.

use std::{
    cell::RefCell,
    collections::HashSet,
    future::pending,
    num::{NonZeroU16, NonZeroU32},
    rc::Rc,
    time::{Duration, Instant},
};

use ntex_bytes::{ByteString, Bytes};
use ntex_io::IoBoxed;
use ntex_mqtt::{Control, MqttServiceConfig, QoS, v3, v5};
use ntex_service::{
    Middleware, Pipeline, Service, ServiceCtx, ServiceFactory, cfg::SharedCfg,
    fn_factory_with_config, fn_service,
};
use ntex_util::time::Seconds;
use tokio::{io::AsyncReadExt, net::TcpStream, sync::oneshot};
use tracing::{debug, warn};

use super::{
    message::Message,
    mqtt31::{self, Sniff},
    quotas::{ByteClock, PublishCounter},
    script::AckPlan,
    state::{ConnectRequest, RetainHandling, State, SubRefused},
    stats::ConnectInfo,
    subscriptions::SubOptions,
    wire::Wire,
};
use crate::config::Protocol;

pub(crate) type Shared = Rc<RefCell<State>>;

/// What the broker advertises to MQTT 5 clients unless the script says otherwise.
#[derive(Debug, Clone)]
pub(crate) struct Advertised {
    pub receive_maximum: u16,
    pub maximum_packet_size: Option<u32>,
}

/// The error type of the services. They never fail on their own: a refused or faulty client
/// is answered with a reason code or disconnected, so this only satisfies ntex-mqtt's types.
#[derive(Debug)]
pub(crate) struct BrokerError;

impl From<()> for BrokerError {
    fn from((): ()) -> Self {
        BrokerError
    }
}

impl TryFrom<BrokerError> for v5::PublishAck {
    type Error = BrokerError;

    fn try_from(e: BrokerError) -> Result<Self, Self::Error> {
        Err(e)
    }
}

/// One client connection: the state ntex-mqtt keeps per connection (`Session<Conn>`).
/// Dropped when the connection is gone, which tells the state.
pub(crate) struct Conn {
    state: Shared,
    client: Rc<str>,
    id: u64,
    /// The client's Receive Maximum (65535 on 3.x, where none is sent).
    window: u16,
    /// The Maximum QoS this connection may publish (CONNACK, MQTT 5).
    max_qos: QoS,
    /// Packet ids of QoS 2 publishes handed to ntex-mqtt as QoS 1 (see the module docs),
    /// so the publish handler knows their real QoS.
    qos2_in_progress: RefCell<HashSet<NonZeroU16>>,
    /// The connection's quotas (see `quotas`): PUBLISH/s, inbound bytes/s, filters per
    /// SUBSCRIBE.
    publishes: RefCell<Option<PublishCounter>>,
    inbound: RefCell<Option<ByteClock>>,
    max_filters: Option<usize>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The state is never borrowed across an await, and ntex drops a connection's
        // services from its own task, so this borrow cannot clash.
        if let Ok(mut state) = self.state.try_borrow_mut() {
            state.disconnected(&self.client, self.id);
        } else {
            warn!(client = %self.client, "broker state busy while a connection closed");
        }
    }
}

/// What the publish handlers do after the synchronous part.
enum Received {
    /// Acknowledge (QoS 1/2) after the plan's delay/withholding, with `reason` (MQTT 5).
    Ack { plan: Option<AckPlan>, reason: u8 },
    /// The script cut the connection: never acknowledge.
    Cut,
}

impl Conn {
    fn new(state: &Shared, client: Rc<str>, id: u64, window: u16, max_qos: QoS) -> Conn {
        let (quotas, started) = state.borrow().quotas();
        let now = Instant::now();
        Conn {
            state: state.clone(),
            client,
            id,
            window,
            max_qos,
            qos2_in_progress: RefCell::default(),
            publishes: RefCell::new(quotas.publish_rate.map(|r| PublishCounter::new(r, started))),
            inbound: RefCell::new(quotas.inbound_bytes.map(|r| ByteClock::new(r, now))),
            max_filters: quotas.max_filters_per_subscribe,
        }
    }

    /// Counts a PUBLISH of `size` bytes against the quotas; false if it is over the
    /// PUBLISH/s quota (discard it).
    fn count_quota(&self, size: usize) -> bool {
        let (mut inbound, mut publishes) = (self.inbound.borrow_mut(), self.publishes.borrow_mut());
        if inbound.is_none() && publishes.is_none() {
            // No quotas (every broker but the BifroMQ profile): no clock read per publish.
            return true;
        }
        let now = Instant::now();
        if let Some(clock) = inbound.as_mut() {
            clock.spend(now, size);
        }
        let passed = publishes.as_mut().is_none_or(|c| c.pass(now));
        drop((inbound, publishes));
        if !passed {
            self.state
                .borrow()
                .stats
                .update(&self.client, |c| c.over_rate += 1);
        }
        passed
    }

    /// How long reading waits for the inbound byte quota.
    fn inbound_wait(&self) -> Option<Duration> {
        self.inbound
            .borrow()
            .as_ref()
            .and_then(|c| c.wait(Instant::now()))
    }

    fn activate(&self) {
        self.state
            .borrow_mut()
            .activate(&self.client, self.id, self.window);
    }

    fn flush(&self) {
        self.state.borrow_mut().flush(&self.client);
    }

    fn real_qos(&self, qos: QoS, id: Option<NonZeroU16>) -> QoS {
        match id {
            Some(id) if self.qos2_in_progress.borrow().contains(&id) => QoS::ExactlyOnce,
            _ => qos,
        }
    }

    /// Counts, applies the script, routes. Synchronous: the state is not held across awaits.
    /// A routed QoS 2 message opens its exchange in the session at once, before its PUBREC
    /// (which the script may hold back): a resend after a cut is then known, not routed twice.
    fn received(
        &self,
        id: Option<NonZeroU16>,
        topic: ByteString,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: Option<v5::codec::PublishProperties>,
    ) -> Received {
        self.count_publish();
        let mut state = self.state.borrow_mut();
        if state.script.cut_now() {
            debug!(client = %self.client, "script: cutting the connection");
            state.cut(&self.client, self.id);
            return Received::Cut;
        }
        let plan = (qos != QoS::AtMostOnce).then(|| state.script.ack_plan(&topic));
        let scripted = plan.as_ref().and_then(|p| p.reason);
        if let Some(code) = scripted.filter(|&c| c >= 0x80) {
            state.stats.update(&self.client, |c| c.refused += 1);
            return Received::Ack { plan, reason: code };
        }
        if let Some(id) = id.filter(|_| qos == QoS::ExactlyOnce) {
            state.qos2_received(&self.client, id);
        }
        let routed = state.publish(Message {
            topic,
            payload,
            qos,
            retain,
            properties,
            publisher: self.client.clone(),
            received_at: Instant::now(),
        });
        // 0x10 No Matching Subscribers, as mosquitto says; the scripted code if any.
        let reason = scripted.unwrap_or(if routed == 0 { 0x10 } else { 0 });
        Received::Ack { plan, reason }
    }

    /// Waits as the script says and returns the reason code; never returns for a cut
    /// connection (ntex drops the pending ack with the connection).
    async fn settle(received: Received) -> u8 {
        match received {
            Received::Cut => pending().await,
            Received::Ack { plan, reason } => {
                if let Some(mut plan) = plan {
                    plan.wait().await;
                }
                reason
            }
        }
    }

    fn puback(&self, id: NonZeroU16, refused: bool) {
        self.state
            .borrow_mut()
            .on_puback(&self.client, self.id, id, refused);
    }

    fn pubrec(&self, id: NonZeroU16, refused: bool) {
        self.state
            .borrow_mut()
            .on_pubrec(&self.client, self.id, id, refused);
    }

    fn pubcomp(&self, id: NonZeroU16) {
        self.state
            .borrow_mut()
            .on_pubcomp(&self.client, self.id, id);
    }

    fn subscribe(
        &self,
        requests: Vec<(String, SubOptions, RetainHandling)>,
    ) -> Vec<Result<QoS, SubRefused>> {
        self.state.borrow_mut().subscribe(&self.client, requests)
    }

    fn unsubscribe(&self, filters: Vec<String>) -> Vec<bool> {
        self.state.borrow_mut().unsubscribe(&self.client, filters)
    }

    fn count_publish(&self) {
        self.state
            .borrow()
            .stats
            .update(&self.client, |c| c.publishes_received += 1);
    }

    fn qos2_seen(&self, id: NonZeroU16) -> bool {
        self.state.borrow().qos2_seen(&self.client, id)
    }

    fn qos2_received(&self, id: NonZeroU16) {
        self.state.borrow_mut().qos2_received(&self.client, id);
    }

    fn qos2_released(&self, id: NonZeroU16) -> bool {
        self.state.borrow_mut().qos2_released(&self.client, id)
    }
}

fn qos_of(level: u8) -> QoS {
    QoS::try_from(level.min(2)).unwrap_or(QoS::ExactlyOnce)
}

// ---- MQTT 3.1 / 3.1.1 ----

fn handshake_v3(state: &Shared, h: v3::Handshake) -> v3::HandshakeAck<Conn> {
    let io = h.io().get_ref();
    let pkt = h.packet();
    let clean = pkt.clean_session;
    let keep_alive = pkt.keep_alive;
    let requested_id = pkt.client_id.to_string();
    let mut st = state.borrow_mut();
    let protocol = if st.take_v31(io.id()) {
        Protocol::V31
    } else {
        Protocol::V311
    };
    let client: Rc<str> = if requested_id.is_empty() {
        if !clean {
            // MQTT 3.1.1 3.1.3-8: an empty id needs a clean session.
            drop(st);
            return h.identifier_rejected();
        }
        st.assign_client_id().into()
    } else {
        requested_id.into()
    };
    let request = ConnectRequest {
        client_id: client.clone(),
        info: ConnectInfo {
            protocol,
            clean_start: clean,
            keep_alive,
            session_expiry: if clean { 0 } else { u32::MAX },
            receive_maximum: None,
            maximum_packet_size: None,
        },
        persistent: !clean,
        expiry: None,
    };
    let (id, present) = st.connect(request, Wire::v3(io, h.sink()));
    drop(st);
    let conn = Conn::new(state, client, id, u16::MAX, QoS::ExactlyOnce);
    h.ack(conn, present)
}

async fn publish_v3(session: v3::Session<Conn>, publish: v3::Publish) -> Result<(), BrokerError> {
    let payload = publish.read_all().await.map_err(|_| BrokerError)?;
    let qos = session.real_qos(publish.qos(), publish.id());
    let received = session.received(
        publish.id(),
        publish.packet().topic.clone(),
        payload,
        qos,
        publish.retain(),
        None,
    );
    // 3.x cannot refuse in an ack: a refused message was dropped above and is acked anyway.
    Conn::settle(received).await;
    Ok(())
}

async fn protocol_v3(
    session: v3::Session<Conn>,
    msg: v3::ProtocolMessage,
) -> Result<v3::ProtocolMessageAck, BrokerError> {
    Ok(match msg {
        v3::ProtocolMessage::Subscribe(mut sub) => {
            let requests = sub
                .iter_mut()
                .map(|s| {
                    let options = SubOptions {
                        qos: s.qos(),
                        no_local: false,
                        retain_as_published: false,
                        id: None,
                    };
                    (s.topic().to_string(), options, RetainHandling::Send)
                })
                .collect();
            let granted = session.subscribe(requests);
            for (mut s, g) in sub.iter_mut().zip(granted) {
                match g {
                    Ok(qos) => s.confirm(qos),
                    Err(_) => s.fail(),
                }
            }
            sub.ack()
        }
        v3::ProtocolMessage::Unsubscribe(unsub) => {
            session.unsubscribe(unsub.iter().map(|t| t.to_string()).collect());
            unsub.ack()
        }
        other => other.ack(),
    })
}

// ---- MQTT 5 ----

fn handshake_v5(
    state: &Shared,
    advertised: &Advertised,
    h: v5::Handshake,
) -> v5::HandshakeAck<Conn> {
    let io = h.io().get_ref();
    let pkt = h.packet();
    let clean = pkt.clean_start;
    let expiry_secs = pkt.session_expiry_interval_secs;
    let receive_maximum = pkt.receive_max.map(NonZeroU16::get);
    let maximum_packet_size = pkt.max_packet_size.map(NonZeroU32::get);
    let keep_alive = pkt.keep_alive;
    let requested_id = pkt.client_id.to_string();
    let mut st = state.borrow_mut();
    let (client, assigned): (Rc<str>, bool) = if requested_id.is_empty() {
        (st.assign_client_id().into(), true)
    } else {
        (requested_id.into(), false)
    };
    let script = st.script.clone();
    let receive_max = script
        .receive_maximum()
        .unwrap_or(advertised.receive_maximum);
    let max_packet = script
        .maximum_packet_size()
        .or(advertised.maximum_packet_size);
    let max_qos = qos_of(script.maximum_qos().unwrap_or(2));
    let request = ConnectRequest {
        client_id: client.clone(),
        info: ConnectInfo {
            protocol: Protocol::V5,
            clean_start: clean,
            keep_alive,
            session_expiry: expiry_secs,
            receive_maximum,
            maximum_packet_size,
        },
        persistent: expiry_secs > 0,
        expiry: (expiry_secs != u32::MAX).then(|| Duration::from_secs(u64::from(expiry_secs))),
    };
    let wire = Wire::v5(io, h.sink(), maximum_packet_size);
    let (id, present) = st.connect(request, wire);
    drop(st);
    let window = receive_maximum.unwrap_or(u16::MAX);
    let conn = Conn::new(state, client.clone(), id, window, max_qos);
    h.ack(conn).with(|ack| {
        ack.session_present = present;
        ack.receive_max = NonZeroU16::new(receive_max).unwrap_or(NonZeroU16::MAX);
        ack.max_qos = max_qos;
        ack.max_packet_size = max_packet;
        if assigned {
            ack.assigned_client_id = Some(ByteString::from(&*client));
        }
    })
}

async fn publish_v5(
    session: v5::Session<Conn>,
    publish: v5::Publish,
) -> Result<v5::PublishAck, BrokerError> {
    let payload = publish.read_all().await.map_err(|_| BrokerError)?;
    let qos = session.real_qos(publish.qos(), publish.id());
    let pkt = publish.packet();
    let mut properties = pkt.properties.clone();
    // Per hop: the alias was resolved by ntex-mqtt, subscription ids are set per delivery.
    properties.topic_alias = None;
    properties.subscription_ids.clear();
    let received = session.received(
        publish.id(),
        pkt.topic.clone(),
        payload,
        qos,
        pkt.retain,
        Some(properties),
    );
    let reason = Conn::settle(received).await;
    let code = v5::codec::PublishAckReason::try_from(reason)
        .unwrap_or(v5::codec::PublishAckReason::UnspecifiedError);
    Ok(v5::PublishAck::new(code))
}

async fn protocol_v5(
    session: v5::Session<Conn>,
    msg: v5::ProtocolMessage,
) -> Result<v5::ProtocolMessageAck, BrokerError> {
    Ok(match msg {
        v5::ProtocolMessage::Subscribe(mut sub) => {
            let id = sub.packet().id;
            let requests = sub
                .iter_mut()
                .map(|s| {
                    let o = s.options();
                    let options = SubOptions {
                        qos: o.qos,
                        no_local: o.no_local,
                        retain_as_published: o.retain_as_published,
                        id,
                    };
                    let handling = match o.retain_handling {
                        v5::codec::RetainHandling::AtSubscribe => RetainHandling::Send,
                        v5::codec::RetainHandling::AtSubscribeNew => RetainHandling::SendIfNew,
                        v5::codec::RetainHandling::NoAtSubscribe => RetainHandling::DontSend,
                    };
                    (s.topic().to_string(), options, handling)
                })
                .collect();
            let granted = session.subscribe(requests);
            for (mut s, g) in sub.iter_mut().zip(granted) {
                match g {
                    Ok(qos) => s.confirm(qos),
                    Err(SubRefused::Invalid) => {
                        s.fail(v5::codec::SubscribeAckReason::TopicFilterInvalid);
                    }
                    Err(SubRefused::GroupFull) => {
                        s.fail(v5::codec::SubscribeAckReason::QuotaExceeded);
                    }
                }
            }
            sub.ack()
        }
        v5::ProtocolMessage::Unsubscribe(mut unsub) => {
            let found = session.unsubscribe(unsub.iter().map(|t| t.to_string()).collect());
            for (mut u, existed) in unsub.iter_mut().zip(found) {
                if existed {
                    u.success();
                } else {
                    u.fail(v5::codec::UnsubscribeAckReason::NoSubscriptionExisted);
                }
            }
            unsub.ack()
        }
        other => other.ack(),
    })
}

// ---- the ack middleware, for either version ----

/// What one protocol version's packets mean to the ack middleware.
pub(crate) enum Sorted {
    /// An incoming QoS 2 PUBLISH with this id, run here (ntex-mqtt sees it as QoS 1).
    Qos2Publish(NonZeroU16),
    Release(NonZeroU16),
    /// Acks of our deliveries: PUBACK, PUBREC (whether refused), PUBCOMP.
    Ack(NonZeroU16, bool),
    Rec(NonZeroU16, bool),
    Comp(NonZeroU16),
    /// Anything else: ntex-mqtt's.
    Other,
}

/// A protocol version's codec types as the ack middleware needs them.
pub(crate) trait AckPackets: 'static {
    type Session: std::ops::Deref<Target = Conn>;
    type Decoded;
    type Encoded;
    fn activate(session: &Self::Session);
    fn sort(conn: &Conn, req: &Self::Decoded) -> Sorted;
    /// Makes a QoS 2 PUBLISH a QoS 1 one, for ntex-mqtt.
    fn downgrade(req: &mut Self::Decoded);
    /// The PUBREC answering a duplicate of a QoS 2 PUBLISH already taken.
    fn pubrec(id: NonZeroU16) -> Self::Encoded;
    /// ntex-mqtt's PUBACK for a downgraded QoS 2 PUBLISH, as our PUBREC: its id and whether it
    /// accepted; anything else is handed back.
    fn as_pubrec(resp: Self::Encoded) -> Result<(NonZeroU16, bool, Self::Encoded), Self::Encoded>;
    fn pubcomp(id: NonZeroU16, known: bool) -> Self::Encoded;
    /// A PUBLISH's size in bytes, or `None` for any other packet.
    fn publish_size(req: &Self::Decoded) -> Option<usize>;
    /// How many filters a SUBSCRIBE carries, or `None` for any other packet.
    fn subscribe_filters(req: &Self::Decoded) -> Option<usize>;
    /// A PUBLISH over the PUBLISH/s quota was discarded: BifroMQ says nothing on MQTT 3.x
    /// and disconnects an MQTT 5 client with 0x96 Message Rate Too High.
    fn over_rate(session: &Self::Session);
    /// A SUBSCRIBE with more filters than the quota: the connection is closed (MQTT 5:
    /// DISCONNECT 0x98 Administrative Action).
    fn too_many_filters(session: &Self::Session);
}

pub(crate) struct V3;
pub(crate) struct V5;

impl AckPackets for V3 {
    type Session = v3::Session<Conn>;
    type Decoded = v3::codec::Decoded;
    type Encoded = v3::codec::Encoded;

    fn activate(session: &Self::Session) {
        session.activate();
    }

    fn sort(_: &Conn, req: &Self::Decoded) -> Sorted {
        use v3::codec::{Decoded, Packet};
        match req {
            Decoded::Publish(p, ..) if p.qos == QoS::ExactlyOnce => match p.packet_id {
                Some(id) => Sorted::Qos2Publish(id),
                None => Sorted::Other,
            },
            Decoded::Packet(Packet::PublishRelease { packet_id }, _) => Sorted::Release(*packet_id),
            Decoded::Packet(Packet::PublishAck { packet_id }, _) => Sorted::Ack(*packet_id, false),
            Decoded::Packet(Packet::PublishReceived { packet_id }, _) => {
                Sorted::Rec(*packet_id, false)
            }
            Decoded::Packet(Packet::PublishComplete { packet_id }, _) => Sorted::Comp(*packet_id),
            _ => Sorted::Other,
        }
    }

    fn downgrade(req: &mut Self::Decoded) {
        if let v3::codec::Decoded::Publish(p, ..) = req {
            p.qos = QoS::AtLeastOnce;
        }
    }

    fn pubrec(packet_id: NonZeroU16) -> Self::Encoded {
        v3::codec::Encoded::Packet(v3::codec::Packet::PublishReceived { packet_id })
    }

    fn as_pubrec(resp: Self::Encoded) -> Result<(NonZeroU16, bool, Self::Encoded), Self::Encoded> {
        use v3::codec::{Encoded, Packet};
        match resp {
            Encoded::Packet(Packet::PublishAck { packet_id }) => {
                Ok((packet_id, true, Self::pubrec(packet_id)))
            }
            other => Err(other),
        }
    }

    fn pubcomp(packet_id: NonZeroU16, _known: bool) -> Self::Encoded {
        v3::codec::Encoded::Packet(v3::codec::Packet::PublishComplete { packet_id })
    }

    fn publish_size(req: &Self::Decoded) -> Option<usize> {
        match req {
            v3::codec::Decoded::Publish(_, _, size) => Some(*size as usize),
            _ => None,
        }
    }

    fn subscribe_filters(req: &Self::Decoded) -> Option<usize> {
        match req {
            v3::codec::Decoded::Packet(v3::codec::Packet::Subscribe { topic_filters, .. }, _) => {
                Some(topic_filters.len())
            }
            _ => None,
        }
    }

    fn over_rate(_: &Self::Session) {}

    fn too_many_filters(session: &Self::Session) {
        session.sink().close();
    }
}

impl AckPackets for V5 {
    type Session = v5::Session<Conn>;
    type Decoded = v5::codec::Decoded;
    type Encoded = v5::codec::Encoded;

    fn activate(session: &Self::Session) {
        session.activate();
    }

    fn sort(conn: &Conn, req: &Self::Decoded) -> Sorted {
        use v5::codec::{Decoded, Packet};
        match req {
            // Above the advertised Maximum QoS it is left to ntex-mqtt, which disconnects.
            Decoded::Publish(p, ..)
                if p.qos == QoS::ExactlyOnce && conn.max_qos == QoS::ExactlyOnce =>
            {
                match p.packet_id {
                    Some(id) => Sorted::Qos2Publish(id),
                    None => Sorted::Other,
                }
            }
            Decoded::Packet(Packet::PublishRelease(rel), _) => Sorted::Release(rel.packet_id),
            Decoded::Packet(Packet::PublishAck(ack), _) => {
                Sorted::Ack(ack.packet_id, u8::from(ack.reason_code) >= 0x80)
            }
            Decoded::Packet(Packet::PublishReceived(ack), _) => {
                Sorted::Rec(ack.packet_id, u8::from(ack.reason_code) >= 0x80)
            }
            Decoded::Packet(Packet::PublishComplete(comp), _) => Sorted::Comp(comp.packet_id),
            _ => Sorted::Other,
        }
    }

    fn downgrade(req: &mut Self::Decoded) {
        if let v5::codec::Decoded::Publish(p, ..) = req {
            p.qos = QoS::AtLeastOnce;
        }
    }

    fn pubrec(packet_id: NonZeroU16) -> Self::Encoded {
        v5::codec::Encoded::Packet(v5::codec::Packet::PublishReceived(v5::codec::PublishAck {
            packet_id,
            ..Default::default()
        }))
    }

    fn as_pubrec(resp: Self::Encoded) -> Result<(NonZeroU16, bool, Self::Encoded), Self::Encoded> {
        use v5::codec::{Encoded, Packet};
        match resp {
            // A refusing PUBREC ends the exchange: no PUBREL will come.
            Encoded::Packet(Packet::PublishAck(ack)) => Ok((
                ack.packet_id,
                u8::from(ack.reason_code) < 0x80,
                Encoded::Packet(Packet::PublishReceived(ack)),
            )),
            other => Err(other),
        }
    }

    fn pubcomp(packet_id: NonZeroU16, known: bool) -> Self::Encoded {
        use v5::codec::{Encoded, Packet, PublishAck2, PublishAck2Reason};
        Encoded::Packet(Packet::PublishComplete(PublishAck2 {
            packet_id,
            reason_code: if known {
                PublishAck2Reason::Success
            } else {
                PublishAck2Reason::PacketIdNotFound
            },
            properties: Vec::new(),
            reason_string: None,
        }))
    }

    fn publish_size(req: &Self::Decoded) -> Option<usize> {
        match req {
            v5::codec::Decoded::Publish(_, _, size) => Some(*size as usize),
            _ => None,
        }
    }

    fn subscribe_filters(req: &Self::Decoded) -> Option<usize> {
        match req {
            v5::codec::Decoded::Packet(v5::codec::Packet::Subscribe(sub), _) => {
                Some(sub.topic_filters.len())
            }
            _ => None,
        }
    }

    fn over_rate(session: &Self::Session) {
        session.sink().close_with_reason(v5::codec::Disconnect::new(
            v5::codec::DisconnectReasonCode::MessageRateTooHigh,
        ));
    }

    fn too_many_filters(session: &Self::Session) {
        session.sink().close_with_reason(v5::codec::Disconnect::new(
            v5::codec::DisconnectReasonCode::AdministrativeAction,
        ));
    }
}

/// See the module docs: acks of our deliveries and incoming QoS 2, before ntex-mqtt; one
/// middleware for both versions (`V3`, `V5`).
pub(crate) struct Acks<V>(std::marker::PhantomData<V>);

impl<V> Acks<V> {
    pub(crate) fn new() -> Self {
        Acks(std::marker::PhantomData)
    }
}

pub(crate) struct AcksService<S, V: AckPackets> {
    service: S,
    session: V::Session,
}

impl<S, V: AckPackets> Middleware<S, (SharedCfg, V::Session)> for Acks<V> {
    type Service = AcksService<S, V>;

    fn create(&self, service: S, (_, session): (SharedCfg, V::Session)) -> AcksService<S, V> {
        // Called once CONNACK is written: now resends and queued messages may go out.
        V::activate(&session);
        AcksService { service, session }
    }
}

impl<S, V> Service<V::Decoded> for AcksService<S, V>
where
    V: AckPackets,
    S: Service<V::Decoded, Response = Option<V::Encoded>>,
{
    type Response = Option<V::Encoded>;
    type Error = S::Error;

    ntex_service::forward_poll!(service);
    ntex_service::forward_shutdown!(service);

    /// Reading waits while the connection is ahead of its inbound byte quota: TCP pushes
    /// back on the client, as BifroMQ's traffic shaping does.
    async fn ready(&self, ctx: ServiceCtx<'_, Self>) -> Result<(), Self::Error> {
        if let Some(wait) = self.session.inbound_wait() {
            tokio::time::sleep(wait).await;
        }
        ctx.ready(&self.service).await
    }

    async fn call(
        &self,
        mut req: V::Decoded,
        ctx: ServiceCtx<'_, Self>,
    ) -> Result<Self::Response, Self::Error> {
        let conn = &*self.session;
        if let Some(size) = V::publish_size(&req)
            && !conn.count_quota(size)
        {
            debug!(client = %conn.client, "over the PUBLISH/s quota: discarded");
            V::over_rate(&self.session);
            return Ok(None);
        }
        if let Some(n) = V::subscribe_filters(&req)
            && conn.max_filters.is_some_and(|max| n > max)
        {
            debug!(client = %conn.client, filters = n, "SUBSCRIBE over the filters quota: closing");
            V::too_many_filters(&self.session);
            return Ok(None);
        }
        match V::sort(conn, &req) {
            Sorted::Qos2Publish(id) => {
                if conn.qos2_seen(id) {
                    conn.count_publish();
                    return Ok(Some(V::pubrec(id)));
                }
                conn.qos2_in_progress.borrow_mut().insert(id);
                V::downgrade(&mut req);
                let result = ctx.call(&self.service, req).await;
                conn.qos2_in_progress.borrow_mut().remove(&id);
                match result {
                    Ok(Some(resp)) => match V::as_pubrec(resp) {
                        Ok((packet_id, accepted, rec)) => {
                            if accepted {
                                conn.qos2_received(packet_id);
                            }
                            Ok(Some(rec))
                        }
                        Err(other) => Ok(Some(other)),
                    },
                    other => other,
                }
            }
            Sorted::Release(id) => {
                let known = conn.qos2_released(id);
                Ok(Some(V::pubcomp(id, known)))
            }
            Sorted::Ack(id, refused) => {
                conn.puback(id, refused);
                Ok(None)
            }
            Sorted::Rec(id, refused) => {
                conn.pubrec(id, refused);
                Ok(None)
            }
            Sorted::Comp(id) => {
                conn.pubcomp(id);
                Ok(None)
            }
            Sorted::Other => ctx.call(&self.service, req).await,
        }
    }
}

// ---- connection control and the accept loop ----

async fn control_v3(
    session: v3::Session<Conn>,
    control: Control<BrokerError>,
) -> Result<Option<v3::codec::Encoded>, BrokerError> {
    if let Control::WrBackpressure(w) = &control
        && !w.enabled()
    {
        session.flush();
    }
    Ok(None)
}

async fn control_v5(
    session: v5::Session<Conn>,
    control: Control<BrokerError>,
) -> Result<Option<v5::codec::Encoded>, BrokerError> {
    if let Control::WrBackpressure(w) = &control
        && !w.enabled()
    {
        session.flush();
    }
    Ok(None)
}

/// ntex-mqtt's settings: QoS 2 accepted, generous inbound limits (withheld acks must not
/// stall reading), and connections that never send CONNECT dropped.
fn mqtt_config(advertised: &Advertised) -> SharedCfg {
    let config = MqttServiceConfig::new()
        .set_max_qos(QoS::ExactlyOnce)
        .set_max_receive(advertised.receive_maximum)
        .set_max_receive_size(64 * 1024 * 1024)
        .set_max_size(advertised.maximum_packet_size.unwrap_or(0))
        .set_connect_timeout(Seconds(10));
    SharedCfg::new("mqbridge-broker").add(config).into()
}

/// Serves MQTT on `listener` until `stop` fires, then closes every connection. Reports to
/// `ready` once accepting (or why it cannot).
pub(crate) async fn serve(
    listener: std::net::TcpListener,
    state: Shared,
    advertised: Advertised,
    ready: std::sync::mpsc::Sender<std::io::Result<()>>,
    mut stop: oneshot::Receiver<()>,
) {
    let cfg = mqtt_config(&advertised);
    let (hs3, hs5) = (state.clone(), state.clone());
    let factory = ntex_mqtt::MqttServer::new()
        .v3(
            v3::MqttServer::new(fn_service(async move |h: v3::Handshake| {
                Ok::<_, BrokerError>(handshake_v3(&hs3, h))
            }))
            .control(fn_factory_with_config(async |s: v3::Session<Conn>| {
                Ok::<_, BrokerError>(fn_service(move |c| control_v3(s.clone(), c)))
            }))
            .protocol(fn_factory_with_config(async |s: v3::Session<Conn>| {
                Ok::<_, BrokerError>(fn_service(move |m| protocol_v3(s.clone(), m)))
            }))
            .middleware(Acks::<V3>::new())
            .publish(fn_factory_with_config(async |s: v3::Session<Conn>| {
                Ok::<_, BrokerError>(fn_service(move |p| publish_v3(s.clone(), p)))
            })),
        )
        .v5({
            let advertised = advertised.clone();
            v5::MqttServer::new(fn_service(async move |h: v5::Handshake| {
                Ok::<_, BrokerError>(handshake_v5(&hs5, &advertised, h))
            }))
            .control(fn_factory_with_config(async |s: v5::Session<Conn>| {
                Ok::<_, BrokerError>(fn_service(move |c| control_v5(s.clone(), c)))
            }))
            .protocol(fn_factory_with_config(async |s: v5::Session<Conn>| {
                Ok::<_, BrokerError>(fn_service(move |m| protocol_v5(s.clone(), m)))
            }))
            .middleware(Acks::<V5>::new())
            .publish(fn_factory_with_config(async |s: v5::Session<Conn>| {
                Ok::<_, BrokerError>(fn_service(move |p| publish_v5(s.clone(), p)))
            }))
        });
    let service = match ServiceFactory::<IoBoxed, SharedCfg>::create(&factory, cfg.clone()).await {
        Ok(service) => Pipeline::new(service),
        Err(e) => {
            let _ = ready.send(Err(std::io::Error::other(format!(
                "cannot build the MQTT service: {e:?}"
            ))));
            return;
        }
    };
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut cuts = state.borrow().script.watch_cuts();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Ok(()) = cuts.changed() => state.borrow_mut().scripted_cuts(),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let service = service.clone();
                    let state = state.clone();
                    let cfg = cfg.clone();
                    ntex_rt::spawn(async move {
                        match accept(stream, &state, cfg).await {
                            Ok(io) => {
                                if let Err(e) = service.call(IoBoxed::from(io)).await {
                                    debug!(%peer, error = ?e, "connection ended with an error");
                                }
                            }
                            Err(e) => debug!(%peer, error = %e, "connection dropped before CONNECT"),
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    state.borrow_mut().close_all();
    // Let the DISCONNECTs and FINs reach the wire before the runtime goes away.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Turns an accepted socket into an ntex `Io`, rewriting an MQTT 3.1 CONNECT on the way.
async fn accept(
    mut stream: TcpStream,
    state: &Shared,
    cfg: SharedCfg,
) -> std::io::Result<ntex_io::Io> {
    stream.set_nodelay(true)?;
    let rewritten = match sniff_connect(&stream).await? {
        Sniff::Mqtt31 { len } if len <= 64 * 1024 => {
            let mut packet = vec![0; len];
            stream.read_exact(&mut packet).await?;
            mqtt31::rewrite_connect(&packet)
        }
        _ => None,
    };
    let io = ntex_net::from_tcp_stream(stream.into_std()?, cfg)?;
    if let Some(connect) = rewritten {
        let io_ref = io.get_ref();
        state.borrow_mut().mark_v31(io_ref.id());
        // Before ntex's read task runs: the CONNECT comes first, then whatever follows.
        io_ref.with_read_buf(|buf| buf.extend_from_slice(&connect));
    }
    Ok(io)
}

/// Peeks at the first bytes (without consuming them) until the protocol is known.
async fn sniff_connect(stream: &TcpStream) -> std::io::Result<Sniff> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 16];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no CONNECT"))??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        match mqtt31::sniff(&buf[..n]) {
            Sniff::NeedMore if n < buf.len() => {
                // Peek returns at once while any byte is there: wait a little for the rest.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Sniff::NeedMore => return Ok(Sniff::Other),
            known => return Ok(known),
        }
    }
}
