//! The embedded broker's shared state on its ntex thread: sessions by client id, the
//! subscription table and retained messages. Connections call in with what they received
//! (CONNECT, PUBLISH, acks, SUBSCRIBE); routing decisions are made here and the resulting
//! writes go out through each connected session's `Wire`.

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    num::NonZeroU16,
    rc::{Rc, Weak},
    time::{Duration, Instant},
};

use ntex_mqtt::QoS;
use tracing::debug;

use super::{
    message::{Delivery, Message},
    quotas::{ByteClock, Quotas},
    retained::Retained,
    script::Script,
    session::{Session, Transmit},
    stats::{BrokerStats, ConnectInfo},
    subscriptions::{Filter, SubOptions, Subscriptions},
    wire::{Wire, WireError},
};

/// Broker-wide settings the connections need.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// The most QoS 1/2 messages out to one client unacknowledged (the broker's own window;
    /// an MQTT 5 client's Receive Maximum may lower it).
    pub outgoing_window: u16,
    /// Bound on one session's queue (online or offline).
    pub max_queued: usize,
    pub quotas: Quotas,
    /// When the broker started: its quota seconds count from here.
    pub started: Instant,
}

/// A CONNECT as the state needs it.
#[derive(Debug)]
pub(crate) struct ConnectRequest {
    pub client_id: Rc<str>,
    pub info: ConnectInfo,
    /// Whether the session outlives this connection.
    pub persistent: bool,
    /// MQTT 5 Session Expiry (`None`: never, as for 3.x persistent sessions).
    pub expiry: Option<Duration>,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubRefused {
    /// Not a valid filter.
    Invalid,
    /// Its shared group has as many members as the quota allows.
    GroupFull,
}

/// Retain handling of one new subscription (MQTT 5; 3.x always sends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetainHandling {
    Send,
    SendIfNew,
    DontSend,
}

struct Connected {
    id: u64,
    wire: Wire,
    /// Set once CONNACK is out: nothing is written before it.
    active: bool,
    /// The outbound byte quota, if any, and whether a flush is already set for when it allows.
    outbound: Option<ByteClock>,
    flush_pending: bool,
}

struct Entry {
    session: Session,
    conn: Option<Connected>,
    expiry: Option<Duration>,
    left_at: Option<Instant>,
}

pub(crate) struct State {
    limits: Limits,
    pub script: Script,
    pub stats: BrokerStats,
    sessions: HashMap<Rc<str>, Entry>,
    subscriptions: Subscriptions,
    retained: Retained,
    next_conn: u64,
    next_client: u64,
    /// ntex io ids of connections that spoke MQTT 3.1 (their CONNECT was rewritten).
    v31: HashSet<ntex_io::Id>,
    /// This state, for flushes set for later (outbound quota).
    me: Weak<RefCell<State>>,
}

impl State {
    pub fn new(
        limits: Limits,
        script: Script,
        stats: BrokerStats,
        me: Weak<RefCell<State>>,
    ) -> State {
        State {
            me,
            limits,
            script,
            stats,
            sessions: HashMap::new(),
            subscriptions: Subscriptions::default(),
            retained: Retained::default(),
            next_conn: 0,
            next_client: 0,
            v31: HashSet::new(),
        }
    }

    /// The per-connection quotas and when the broker started (their seconds count from it).
    pub fn quotas(&self) -> (Quotas, Instant) {
        (self.limits.quotas, self.limits.started)
    }

    pub fn mark_v31(&mut self, io: ntex_io::Id) {
        self.v31.insert(io);
    }

    /// Whether the connection with this io id spoke MQTT 3.1 (asked once, at its CONNECT).
    pub fn take_v31(&mut self, io: ntex_io::Id) -> bool {
        self.v31.remove(&io)
    }

    /// A client id for a client that sent an empty one.
    pub fn assign_client_id(&mut self) -> String {
        self.next_client += 1;
        format!("mqb-auto-{}", self.next_client)
    }

    /// Attaches a new connection to its session (taking over any existing connection, and
    /// starting afresh on clean start or an expired session). Returns the connection id and
    /// whether a session was present. Nothing is written until `activate`.
    pub fn connect(&mut self, req: ConnectRequest, wire: Wire) -> (u64, bool) {
        self.next_conn += 1;
        let conn_id = self.next_conn;
        let now = Instant::now();
        let client = req.client_id.clone();
        let mut present = false;
        if let Some(mut old) = self.sessions.remove(&client) {
            if let Some(c) = old.conn.take() {
                debug!(client = %client, "session taken over by a new connection");
                c.wire.close(true);
                old.session.detach();
                old.left_at = Some(now);
            }
            let expired = match (old.expiry, old.left_at) {
                (Some(limit), Some(left)) => now.saturating_duration_since(left) > limit,
                _ => false,
            };
            if req.info.clean_start || expired || !old.session.persistent {
                self.subscriptions.remove_client(&client);
            } else {
                present = true;
                self.sessions.insert(client.clone(), old);
            }
        }
        let max_queued = self.limits.max_queued;
        let entry = self
            .sessions
            .entry(client.clone())
            .or_insert_with(|| Entry {
                session: Session::new(req.persistent, max_queued),
                conn: None,
                expiry: req.expiry,
                left_at: None,
            });
        entry.session.persistent = req.persistent;
        entry.expiry = req.expiry;
        entry.left_at = None;
        entry.conn = Some(Connected {
            id: conn_id,
            wire,
            active: false,
            outbound: self
                .limits
                .quotas
                .outbound_bytes
                .map(|rate| ByteClock::new(rate, now)),
            flush_pending: false,
        });
        let open = entry.session.inbound_qos2.len();
        self.stats.update(&client, |c| {
            c.connects += 1;
            c.connected = true;
            c.connect = Some(req.info.clone());
            c.qos2_open = open;
        });
        self.publish_subscriptions();
        (conn_id, present)
    }

    /// CONNACK is written: resend what was in flight, then what queued meanwhile.
    pub fn activate(&mut self, client: &Rc<str>, conn_id: u64, window: u16) {
        let window = usize::from(window.min(self.limits.outgoing_window).max(1));
        let Some(entry) = self.entry_for(client, conn_id) else {
            return;
        };
        let resend = entry.session.attach(window);
        let Some(conn) = entry.conn.as_mut() else {
            return;
        };
        conn.active = true;
        let now = Instant::now();
        let mut sent = 0;
        for t in &resend {
            if conn.wire.send(t, now).is_ok() && matches!(t, Transmit::Publish { .. }) {
                sent += 1;
            }
        }
        self.stats.update(client, |c| c.publishes_sent += sent);
        self.flush(client);
    }

    /// The connection ended. A persistent session stays (queueing QoS 1/2), a clean one goes.
    pub fn disconnected(&mut self, client: &Rc<str>, conn_id: u64) {
        let Some(entry) = self.entry_for(client, conn_id) else {
            return;
        };
        entry.conn = None;
        entry.session.detach();
        entry.left_at = Some(Instant::now());
        let persistent = entry.session.persistent;
        if !persistent {
            self.sessions.remove(client);
            self.subscriptions.remove_client(client);
            self.publish_subscriptions();
        }
        self.stats.update(client, |c| c.connected = false);
    }

    /// Cuts `client`'s connection without a DISCONNECT (scripted fault).
    pub fn cut(&mut self, client: &Rc<str>, conn_id: u64) {
        if let Some(conn) = self
            .entry_for(client, conn_id)
            .and_then(|e| e.conn.as_ref())
        {
            conn.wire.cut();
        }
    }

    /// Cuts the connections the script names, without a DISCONNECT; sessions stay.
    pub fn scripted_cuts(&mut self) {
        for client in self.script.take_cuts() {
            if let Some(c) = self
                .sessions
                .get(client.as_str())
                .and_then(|e| e.conn.as_ref())
            {
                debug!(%client, "script: cutting the connection");
                c.wire.cut();
            }
        }
    }

    /// Routes a received message: retained store, then one delivery per receiving session.
    /// Returns how many sessions it went to.
    pub fn publish(&mut self, message: Message) -> usize {
        let message = Rc::new(message);
        if message.retain {
            self.retained.store(&message);
            self.stats.set_retained(self.retained.len());
        }
        let sessions = &self.sessions;
        let online = |c: &str| sessions.get(c).is_some_and(|e| e.session.is_online());
        let routes = self
            .subscriptions
            .route(&message.topic, &message.publisher, online);
        let n = routes.len();
        for r in routes {
            let delivery = Delivery {
                message: message.clone(),
                qos: message.qos.min(r.qos),
                retain: r.retain_as_published && message.retain,
                subscription_ids: r.subscription_ids,
            };
            self.deliver(&r.client, delivery);
        }
        n
    }

    /// Adds subscriptions; returns the granted QoS per filter or why it was refused.
    /// Retained messages for new plain subscriptions are queued right away (MQTT allows them
    /// before the SUBACK).
    pub fn subscribe(
        &mut self,
        client: &Rc<str>,
        requests: Vec<(String, SubOptions, RetainHandling)>,
    ) -> Vec<Result<QoS, SubRefused>> {
        let max_qos = self.max_qos();
        let max_members = self.limits.quotas.max_shared_group_members;
        let mut granted = Vec::with_capacity(requests.len());
        let mut retained_for: Vec<(Filter, SubOptions)> = Vec::new();
        for (raw, mut options, handling) in requests {
            let Ok(filter) = Filter::parse(&raw) else {
                granted.push(Err(SubRefused::Invalid));
                continue;
            };
            options.qos = options.qos.min(max_qos);
            let Some(new) =
                self.subscriptions
                    .subscribe(client, &filter, options.clone(), max_members)
            else {
                debug!(client = %client, filter = %raw, "shared group full: subscription refused");
                granted.push(Err(SubRefused::GroupFull));
                continue;
            };
            // Retained messages are not sent to shared subscriptions (MQTT 5 4.8.2).
            let send = !filter.is_shared()
                && match handling {
                    RetainHandling::Send => true,
                    RetainHandling::SendIfNew => new,
                    RetainHandling::DontSend => false,
                };
            if send {
                retained_for.push((filter, options.clone()));
            }
            granted.push(Ok(options.qos));
        }
        let now = Instant::now();
        for (filter, options) in retained_for {
            let Filter::Plain(f) = filter else { continue };
            for message in self.retained.matching(&f, now) {
                let delivery = Delivery {
                    qos: message.qos.min(options.qos),
                    message,
                    retain: true,
                    subscription_ids: options.id.into_iter().collect(),
                };
                self.deliver(client, delivery);
            }
        }
        self.publish_subscriptions();
        granted
    }

    /// Removes subscriptions; returns per filter whether it existed.
    pub fn unsubscribe(&mut self, client: &Rc<str>, filters: Vec<String>) -> Vec<bool> {
        let found = filters
            .iter()
            .map(|raw| Filter::parse(raw).is_ok_and(|f| self.subscriptions.unsubscribe(client, &f)))
            .collect();
        self.publish_subscriptions();
        found
    }

    pub fn on_puback(&mut self, client: &Rc<str>, conn_id: u64, id: NonZeroU16, refused: bool) {
        let Some(entry) = self.entry_for(client, conn_id) else {
            return;
        };
        let acked = entry.session.on_puback(id);
        let out_of_order = entry.session.acks_out_of_order;
        self.stats
            .update(client, |c| c.acks_out_of_order = out_of_order);
        if acked {
            self.after_ack(client, refused);
        }
    }

    pub fn on_pubrec(&mut self, client: &Rc<str>, conn_id: u64, id: NonZeroU16, refused: bool) {
        let Some(entry) = self.entry_for(client, conn_id) else {
            return;
        };
        if let Some(release) = entry.session.on_pubrec(id, refused)
            && let Some(conn) = entry.conn.as_ref()
        {
            let _ = conn.wire.send(&release, Instant::now());
        }
        let out_of_order = entry.session.acks_out_of_order;
        self.stats
            .update(client, |c| c.acks_out_of_order = out_of_order);
        if refused {
            self.after_ack(client, true);
        }
    }

    pub fn on_pubcomp(&mut self, client: &Rc<str>, conn_id: u64, id: NonZeroU16) {
        if let Some(entry) = self.entry_for(client, conn_id)
            && entry.session.on_pubcomp(id)
        {
            self.after_ack(client, false);
        }
    }

    /// Whether a QoS 2 PUBLISH with this packet id was already received and PUBREC'd (a
    /// resend: acknowledge it again, do not route it twice).
    pub fn qos2_seen(&self, client: &Rc<str>, id: NonZeroU16) -> bool {
        self.sessions
            .get(client)
            .is_some_and(|e| e.session.inbound_qos2.contains(&id))
    }

    pub fn qos2_received(&mut self, client: &Rc<str>, id: NonZeroU16) {
        if let Some(e) = self.sessions.get_mut(client) {
            e.session.inbound_qos2.insert(id);
            let open = e.session.inbound_qos2.len();
            self.stats.update(client, |c| c.qos2_open = open);
        }
    }

    /// PUBREL from the client: the QoS 2 exchange is over. Returns whether the id was known.
    pub fn qos2_released(&mut self, client: &Rc<str>, id: NonZeroU16) -> bool {
        let Some(e) = self.sessions.get_mut(client) else {
            return false;
        };
        let known = e.session.inbound_qos2.remove(&id);
        let open = e.session.inbound_qos2.len();
        self.stats.update(client, |c| c.qos2_open = open);
        known
    }

    /// Writes whatever `client`'s session has ready, within its window and its outbound byte
    /// quota, until the connection's write buffer pushes back. Held back by the quota, it
    /// sets itself to run again when the quota allows.
    pub fn flush(&mut self, client: &Rc<str>) {
        let Some(entry) = self.sessions.get_mut(client) else {
            return;
        };
        let Some(conn) = entry.conn.as_mut().filter(|c| c.active) else {
            return;
        };
        let now = Instant::now();
        let (mut sent, mut dropped) = (0u64, 0u64);
        while !conn.wire.is_backpressured() {
            if let Some(wait) = conn.outbound.as_ref().and_then(|c| c.wait(now)) {
                if !conn.flush_pending {
                    conn.flush_pending = true;
                    let (me, client, id) = (self.me.clone(), client.clone(), conn.id);
                    ntex_rt::spawn(async move {
                        tokio::time::sleep(wait).await;
                        if let Some(state) = me.upgrade() {
                            state.borrow_mut().flush_later(&client, id);
                        }
                    });
                }
                break;
            }
            let Some(t) = entry.session.next_transmit(now, &mut dropped) else {
                break;
            };
            if let (Some(clock), Transmit::Publish { delivery, .. }) = (conn.outbound.as_mut(), &t)
            {
                let m = &delivery.message;
                // Fixed header, topic, packet id: near enough for a rate.
                clock.spend(now, m.payload.len() + m.topic.len() + 6);
            }
            match conn.wire.send(&t, now) {
                Ok(()) => sent += 1,
                Err(e) => {
                    if let Transmit::Publish {
                        packet_id: Some(id),
                        ..
                    } = t
                    {
                        entry.session.forget(id);
                    }
                    dropped += 1;
                    if e == WireError::TooLarge {
                        debug!(client = %client, "message larger than the client's Maximum Packet Size: dropped");
                    }
                }
            }
        }
        let unacked = entry.session.unacked();
        if sent > 0 || dropped > 0 {
            self.stats.update(client, |c| {
                c.publishes_sent += sent;
                c.dropped += dropped;
            });
        }
        self.stats.set_unacked(client, unacked);
    }

    /// The flush `flush` set for when the outbound quota allows (if the connection is still
    /// the same).
    fn flush_later(&mut self, client: &Rc<str>, conn_id: u64) {
        let Some(conn) = self
            .entry_for(client, conn_id)
            .and_then(|e| e.conn.as_mut())
        else {
            return;
        };
        conn.flush_pending = false;
        self.flush(client);
    }

    /// Closes every connection (the broker is stopping).
    pub fn close_all(&mut self) {
        for e in self.sessions.values_mut() {
            if let Some(c) = e.conn.take() {
                c.wire.close(false);
            }
        }
    }

    /// Highest QoS granted to subscriptions (scripted Maximum QoS applies to them too).
    fn max_qos(&self) -> QoS {
        match self.script.maximum_qos() {
            Some(0) => QoS::AtMostOnce,
            Some(1) => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        }
    }

    fn deliver(&mut self, client: &Rc<str>, delivery: Delivery) {
        let Some(entry) = self.sessions.get_mut(client) else {
            return;
        };
        if entry.session.enqueue(delivery).is_err() {
            self.stats.update(client, |c| c.dropped += 1);
            return;
        }
        self.flush(client);
    }

    fn after_ack(&mut self, client: &Rc<str>, refused: bool) {
        if refused {
            self.stats.update(client, |c| c.refusals_received += 1);
        }
        self.flush(client);
    }

    /// `client`'s entry if `conn_id` is its current connection: events from a connection
    /// that was taken over must not touch the session (or a newer one under the same id).
    fn entry_for(&mut self, client: &Rc<str>, conn_id: u64) -> Option<&mut Entry> {
        self.sessions
            .get_mut(client)
            .filter(|e| e.conn.as_ref().is_some_and(|c| c.id == conn_id))
    }

    fn publish_subscriptions(&self) {
        self.stats.set_subscriptions(self.subscriptions.list());
    }
}
