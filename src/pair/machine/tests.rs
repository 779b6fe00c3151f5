//! The machine without sockets: a fake clock, bytes in and out, and a model of both brokers.

use std::collections::{BTreeMap, HashSet, VecDeque};

use proptest::prelude::*;
use rumqttc::mqttbytes::{QoS, v4};

use super::*;
use crate::{
    config::{Plan, load::load_plan_with_env},
    pair::{LoopGuard, stats::PairStats},
};

const MAX: usize = 1 << 20;

/// Brokers `a` (source) and `b` (target), 3.1.1 unless `source` / `target` say otherwise, and
/// route `r` from `a` to `b` with `route`'s extra keys.
fn plan_with_route(source: &str, target: &str, route: &str) -> Plan {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let v311 = |extra: &str| {
        if extra.contains("protocol") {
            extra.to_string()
        } else {
            format!("protocol = \"3.1.1\"\n{extra}")
        }
    };
    let (source, target) = (v311(source), v311(target));
    let text = format!(
        r#"
[bridge]
name = "b"
instance = "i"

[brokers.a]
url = "mqtt://127.0.0.1:1"
share_probe = false
{source}

[brokers.b]
url = "mqtt://127.0.0.1:2"
{target}

[[routes]]
name = "r"
from = "a"
to = "b"
topics = ["t/#"]
{route}
"#
    );
    let path = std::env::temp_dir().join(format!(
        "mqbridge-machine-{}-{}.toml",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, text).unwrap();
    let plan = load_plan_with_env(&path, [("HOSTNAME", "host")]);
    let _ = std::fs::remove_file(&path);
    plan.unwrap()
}

/// A machine on a fake clock, with what it asked the I/O layer for.
struct H {
    m: Machine,
    now: Instant,
    stats: Arc<PairStats>,
    /// Connections asked for and not yet answered.
    connects: Vec<(Role, ConnectParams)>,
    /// Connections the machine closed (or abandoned) itself.
    closed: Vec<Role>,
    protocols: (Protocol, Protocol),
    /// With `spool = true`: the spool the machine talks to, in memory.
    spool: FakeSpool,
}

/// The spool thread as the machine sees it: appends wait for `H::sync` to become durable;
/// reads and acks are answered at once.
#[derive(Default)]
struct FakeSpool {
    records: BTreeMap<u64, Message>,
    next: u64,
    /// Appended, not yet durable.
    unsynced: usize,
    /// Records the machine read back (rather than took from memory).
    reads_served: usize,
    acked: Vec<u64>,
    reads: VecDeque<(u64, usize)>,
    /// How long every record read back has been in the spool (a previous run's backlog).
    age: Duration,
}

impl H {
    fn new(source: &str, target: &str) -> H {
        Self::with_route(source, target, "")
    }

    fn with_route(source: &str, target: &str, route: &str) -> H {
        let spooled = route.contains("spool = true");
        let plan = plan_with_route(source, target, route);
        let route = Arc::new(plan.routes[0].clone());
        let stats = Arc::new(PairStats::default());
        let now = Instant::now();
        let spec = PairSpec {
            route: route.clone(),
            index: 0,
            source_client_id: "s".into(),
            target_client_id: "t".into(),
            stats: stats.clone(),
            drain_timeout: Duration::from_secs(5),
            ack_silence: ACK_SILENCE,
            epoch: now,
            loops: LoopGuard {
                bridge_name: "b".into(),
                source_id: "a".into(),
                target_id: "b".into(),
                markers: crate::loops::analysis::writes_markers(&plan, &plan.routes[0]),
                digest: None,
                record_echoes: false,
                check_echoes: false,
            },
            spool: spooled.then(|| crate::pair::spec::SpoolLink {
                spool: crate::spool::Spool::unconnected(),
                gauges: Arc::default(),
            }),
        };
        H {
            m: Machine::new(spec, Mode::Serve, false, now, 7),
            now,
            stats,
            connects: Vec::new(),
            closed: Vec::new(),
            protocols: (route.from.protocol, route.to.protocol),
            spool: FakeSpool {
                next: 1,
                ..FakeSpool::default()
            },
        }
    }

    fn pass(&mut self) {
        assert_eq!(self.m.handle_input(self.now), None);
        self.events();
    }

    fn events(&mut self) {
        while let Some(e) = self.m.poll_event() {
            match e {
                Event::Connect(role, params) => self.connects.push((role, params)),
                Event::Close(role) => self.closed.push(role),
                Event::Wake(..) => {}
                Event::Spool(op) => match op {
                    SpoolOp::Append(messages) => {
                        for (seq, m) in messages {
                            assert!(seq >= self.spool.next, "sequence numbers increase");
                            self.spool.records.insert(seq, m);
                            self.spool.next = seq + 1;
                            self.spool.unsynced += 1;
                        }
                    }
                    SpoolOp::Ack(seqs) => {
                        for seq in seqs {
                            assert!(
                                self.spool.records.remove(&seq).is_some(),
                                "acked {seq} twice"
                            );
                            self.spool.acked.push(seq);
                        }
                    }
                    SpoolOp::Read { from, max } => self.spool.reads.push_back((from, max)),
                },
            }
        }
        // Reads are answered with what is durable (after the events: an answer makes more).
        while let Some((from, n)) = self.spool.reads.pop_front() {
            let durable_below = self.spool.next - self.spool.unsynced as u64;
            let batch: Vec<(u64, Message, Duration)> = self
                .spool
                .records
                .range(from..durable_below.max(from))
                .take(n)
                .map(|(s, m)| (*s, m.clone(), self.spool.age))
                .collect();
            self.spool.reads_served += batch.len();
            self.m.spool_records(self.now, batch);
            self.events();
        }
    }

    /// The spool makes every append so far durable.
    fn sync(&mut self) {
        let n = std::mem::take(&mut self.spool.unsynced);
        self.m.spool_durable(self.now, n);
        self.pass();
    }

    fn asked(&mut self, role: Role) -> Option<ConnectParams> {
        let i = self.connects.iter().position(|(r, _)| *r == role)?;
        Some(self.connects.remove(i).1)
    }

    /// Answers the pending connect of `role` with a CONNACK.
    fn up(&mut self, role: Role, session_present: bool) {
        let connack = ConnAckInfo {
            session_present,
            ..ConnAckInfo::default()
        };
        self.up_with(role, connack)
    }

    fn up_with(&mut self, role: Role, connack: ConnAckInfo) {
        self.asked(role)
            .expect("the machine asked for this connection");
        let protocol = match role {
            Role::Source => self.protocols.0,
            Role::Target => self.protocols.1,
        };
        let codec = Codec::new(protocol, link::DEFAULT_MAX_INCOMING);
        self.m
            .connected(self.now, role, connack, codec, BytesMut::new());
        self.pass();
    }

    fn lose(&mut self, role: Role) {
        self.m.lost(self.now, role, &"test");
        self.pass();
    }

    /// Both sides connected, subscribed, ready.
    fn ready(source: &str, target: &str) -> H {
        Self::ready_route(source, target, "")
    }

    /// As `ready`, with `route` added to the route's table.
    fn ready_route(source: &str, target: &str, route: &str) -> H {
        let mut h = H::with_route(source, target, route);
        h.pass();
        h.up(Role::Target, false);
        h.up(Role::Source, false);
        let subscribe = h.out(Role::Source);
        let pkid = match subscribe.as_slice() {
            [v4::Packet::Subscribe(s)] => s.pkid,
            other => panic!("expected SUBSCRIBE, got {other:?}"),
        };
        h.feed(
            Role::Source,
            v4::Packet::SubAck(v4::SubAck::new(
                pkid,
                vec![v4::SubscribeReasonCode::Success(QoS::ExactlyOnce)],
            )),
        );
        assert!(h.stats.subscribed.load(Relaxed));
        h
    }

    /// The broker on `role` sends `packet`.
    fn feed(&mut self, role: Role, packet: v4::Packet) {
        let mut bytes = BytesMut::new();
        packet.write(&mut bytes, MAX).unwrap();
        let n = bytes.len();
        self.m.recv_buf(role).extend_from_slice(&bytes);
        self.m.handle_read(self.now, role, n, n + 1);
        self.pass();
    }

    /// What the machine wrote to `role`, decoded; all of it is taken as written.
    fn out(&mut self, role: Role) -> Vec<v4::Packet> {
        let mut bytes = BytesMut::from(self.m.transmit(role));
        let n = bytes.len();
        self.m.written(self.now, role, n);
        self.pass();
        let mut packets = Vec::new();
        while !bytes.is_empty() {
            packets.push(v4::Packet::read(&mut bytes, MAX).unwrap());
        }
        packets
    }

    /// Sleeps as the driver does, until the machine's next deadline, and acts on it.
    fn sleep(&mut self) -> Duration {
        let until = self.m.poll_timeout(self.now);
        assert!(
            until > self.now,
            "a deadline in the past makes the driver spin"
        );
        let slept = until - self.now;
        self.now = until;
        self.m.handle_timeout(self.now);
        self.pass();
        slept
    }

    /// The pool lets the pair go: it UNSUBSCRIBEs, and the source confirms.
    fn park(&mut self) {
        self.m.park();
        let unsubscribe = self
            .out(Role::Source)
            .into_iter()
            .find_map(|p| match p {
                v4::Packet::Unsubscribe(u) => Some(u.pkid),
                _ => None,
            })
            .expect("an UNSUBSCRIBE");
        self.feed(
            Role::Source,
            v4::Packet::UnsubAck(v4::UnsubAck::new(unsubscribe)),
        );
    }

    fn publish(&mut self, pkid: u16, qos: QoS, payload: &str) {
        let mut p = v4::Publish::new("t/x", qos, payload.as_bytes().to_vec());
        p.pkid = pkid;
        self.feed(Role::Source, v4::Packet::Publish(p));
    }
}

#[test]
fn connects_the_target_first_and_mirrors_its_window_to_a_v5_source() {
    let mut h = H::new("protocol = \"5\"", "max_inflight = 7");
    h.pass();
    assert!(
        h.asked(Role::Source).is_none(),
        "the source waits for the target"
    );
    h.up(Role::Target, false);
    let params = h
        .asked(Role::Source)
        .expect("source connect after the target's");
    assert_eq!(params.receive_maximum, Some(7));
}

#[test]
fn acknowledges_the_source_only_after_the_target_did() {
    let mut h = H::ready("", "");
    h.publish(5, QoS::AtLeastOnce, "m1");
    let sent = h.out(Role::Target);
    let pkid = match sent.as_slice() {
        [v4::Packet::Publish(p)] if p.topic == "t/x" && !p.dup => p.pkid,
        other => panic!("expected one PUBLISH, got {other:?}"),
    };
    assert!(
        h.out(Role::Source).is_empty(),
        "no PUBACK before the target's"
    );
    h.feed(Role::Target, v4::Packet::PubAck(v4::PubAck::new(pkid)));
    assert_eq!(
        h.out(Role::Source),
        vec![v4::Packet::PubAck(v4::PubAck::new(5))]
    );
}

#[test]
fn a_full_window_stops_reading_the_source_and_an_ack_resumes_it() {
    let mut h = H::ready("", "max_inflight = 2");
    assert!(h.m.read_room(h.now, Role::Source).is_some());
    h.publish(1, QoS::AtLeastOnce, "a");
    h.publish(2, QoS::AtLeastOnce, "b");
    assert_eq!(h.m.read_room(h.now, Role::Source), None);
    let ids: Vec<u16> = h
        .out(Role::Target)
        .into_iter()
        .filter_map(|p| match p {
            v4::Packet::Publish(p) => Some(p.pkid),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 2);
    h.feed(Role::Target, v4::Packet::PubAck(v4::PubAck::new(ids[0])));
    assert!(h.m.read_room(h.now, Role::Source).is_some());
}

#[test]
fn a_target_that_refuses_connections_is_retried_with_doubling_backoff_and_no_busy_wait() {
    let mut h = H::new("", "");
    h.pass();
    let mut backoff = BACKOFF_MIN;
    for _ in 0..12 {
        h.asked(Role::Target).expect("a connection attempt");
        h.m.lost(h.now, Role::Target, &"connection refused");
        h.pass();
        // Nothing more until the backoff's time, and the machine sleeps until exactly then.
        let mut waited = Duration::ZERO;
        while h.connects.is_empty() {
            waited += h.sleep();
        }
        assert!(
            waited >= backoff / 2 && waited <= backoff,
            "waited {waited:?} for a backoff of {backoff:?}"
        );
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    assert_eq!(backoff, BACKOFF_MAX);
    assert!(h.asked(Role::Source).is_none(), "no source before a target");
}

#[test]
fn keep_alive_pings_an_idle_target_and_drops_one_that_never_answers() {
    let mut h = H::ready("keep_alive = \"60s\"", "keep_alive = \"10s\"");
    let start = h.now;
    // Idle: the machine wakes once a second at most, and pings at 3/4 of the keep-alive.
    let ping_at = loop {
        let slept = h.sleep();
        assert!(slept <= IDLE_TICK);
        if h.out(Role::Target).contains(&v4::Packet::PingReq) {
            break h.now - start;
        }
    };
    assert_eq!(ping_at, Duration::from_millis(7500));
    // Answered: the connection lives on.
    h.feed(Role::Target, v4::Packet::PingResp);
    while h.now - start < Duration::from_secs(30) {
        h.sleep();
        if h.out(Role::Target).contains(&v4::Packet::PingReq) {
            h.feed(Role::Target, v4::Packet::PingResp);
        }
    }
    assert!(h.closed.is_empty());
    // Unanswered: dead after the keep-alive.
    let silent_from = loop {
        h.sleep();
        if h.out(Role::Target).contains(&v4::Packet::PingReq) {
            break h.now;
        }
    };
    while h.closed.is_empty() {
        h.sleep();
    }
    assert_eq!(h.closed, vec![Role::Target]);
    let dead_after = h.now - silent_from;
    assert!(
        dead_after > Duration::from_secs(10) && dead_after <= Duration::from_millis(10_002),
        "{dead_after:?}"
    );
}

#[test]
fn a_suback_that_never_comes_reconnects_the_source() {
    let mut h = H::new("", "");
    h.pass();
    h.up(Role::Target, false);
    h.up(Role::Source, false);
    assert!(matches!(
        h.out(Role::Source).as_slice(),
        [v4::Packet::Subscribe(_)]
    ));
    let asked = h.now;
    while h.closed.is_empty() {
        h.sleep();
    }
    assert_eq!(h.closed, vec![Role::Source]);
    assert_eq!(h.now - asked, SUBACK_TIMEOUT);
}

#[test]
fn a_resumed_target_session_gets_what_it_held_again_with_dup() {
    let mut h = H::ready("", "");
    h.publish(9, QoS::AtLeastOnce, "held");
    let first = match h.out(Role::Target).as_slice() {
        [v4::Packet::Publish(p)] => p.clone(),
        other => panic!("{other:?}"),
    };
    h.lose(Role::Target);
    while h.connects.is_empty() {
        h.sleep();
    }
    h.up(Role::Target, true);
    match h.out(Role::Target).as_slice() {
        [v4::Packet::Publish(p)] => {
            assert!(p.dup);
            assert_eq!((p.pkid, &p.payload), (first.pkid, &first.payload));
        }
        other => panic!("expected the resend, got {other:?}"),
    }
    assert!(h.out(Role::Source).is_empty(), "still not acknowledged");
}

#[test]
fn bytes_forwarded_counts_what_the_target_acknowledged_once() {
    let mut h = H::ready("", "");
    h.publish(9, QoS::AtLeastOnce, "0123456789");
    let pkid = match h.out(Role::Target).as_slice() {
        [v4::Packet::Publish(p)] => p.pkid,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        PairStats::get(&h.stats.bytes_forwarded),
        0,
        "written is not forwarded"
    );
    // Lost before its ack and resent twice: still counted once, when the target acknowledges.
    for _ in 0..2 {
        h.lose(Role::Target);
        while h.connects.is_empty() {
            h.sleep();
        }
        h.up(Role::Target, true);
        assert_eq!(h.out(Role::Target).len(), 1, "the resend");
    }
    h.feed(Role::Target, v4::Packet::PubAck(v4::PubAck::new(pkid)));
    h.feed(Role::Target, v4::Packet::PubAck(v4::PubAck::new(pkid))); // a repeated ack
    assert_eq!(PairStats::get(&h.stats.bytes_forwarded), 10);
}

#[test]
fn an_idle_pair_sleeps() {
    let mut h = H::ready("keep_alive = \"60s\"", "keep_alive = \"60s\"");
    for _ in 0..100 {
        assert_eq!(h.sleep(), IDLE_TICK);
    }
}

// ---- A model of both brokers --------------------------------------------------------------

/// What the test does next; everything the brokers do is one of these.
#[derive(Debug, Clone)]
enum Step {
    /// The source broker delivers up to n messages (within its own in-flight limit).
    Deliver(usize),
    /// The target broker reads what the machine wrote to it.
    TargetReads,
    /// The target broker acknowledges up to n of what it took.
    TargetAcks(usize),
    /// The source broker reads what the machine wrote to it (acks, SUBSCRIBE, pings).
    SourceReads,
    /// A connection breaks; what was on its way in either direction is lost. With `true` the
    /// broker also lost the session (restarted without persistence); a target comes back with
    /// the given window (Receive Maximum), larger or smaller.
    Drop(Role, bool, u16),
    /// Time passes until the machine's next deadline.
    Sleep,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1usize..6).prop_map(Step::Deliver),
        3 => Just(Step::TargetReads),
        3 => (1usize..6).prop_map(Step::TargetAcks),
        3 => Just(Step::SourceReads),
        2 => (prop::bool::weighted(0.3), 1u16..8).prop_map(|(s, w)| Step::Drop(Role::Source, s, w)),
        2 => (prop::bool::weighted(0.3), 1u16..8).prop_map(|(s, w)| Step::Drop(Role::Target, s, w)),
        1 => Just(Step::Sleep),
    ]
}

/// A 3.1.1 source broker with a persistent session and an in-flight limit, and a target broker
/// that records what it took; both sides QoS 1.
struct Model {
    h: H,
    /// Messages published to the source and not yet delivered to the bridge.
    queue: VecDeque<u32>,
    /// Delivered to the bridge, not acknowledged (the session keeps them).
    source_inflight: BTreeMap<u16, u32>,
    source_window: usize,
    next_pkid: u16,
    source_up: bool,
    source_session: bool,
    /// What the target broker took, and the acks it owes on the current connection.
    received: HashSet<u32>,
    target_owes: VecDeque<u16>,
    target_up: bool,
    target_session: bool,
    /// The window the target grants on its next connection.
    target_window: u16,
    acked: HashSet<u32>,
    /// Messages the source broker lost with its session (not the bridge's to deliver).
    lost_by_source: HashSet<u32>,
    /// Messages the bridge gave up on, counted: the target closed the connection right after
    /// they were written `POISON_AFTER` times in a row (which is what `Drop` looks like to it).
    given_up: HashSet<u32>,
    total: u32,
}

impl Model {
    fn new(messages: u32) -> Model {
        let mut h = H::new("max_inflight = 20", "max_inflight = 4");
        h.pass();
        let mut m = Model {
            h,
            queue: (0..messages).collect(),
            source_inflight: BTreeMap::new(),
            source_window: 5,
            next_pkid: 1,
            source_up: false,
            source_session: false,
            received: HashSet::new(),
            target_owes: VecDeque::new(),
            target_up: false,
            target_session: false,
            target_window: 4,
            acked: HashSet::new(),
            lost_by_source: HashSet::new(),
            given_up: HashSet::new(),
            total: messages,
        };
        m.settle_events();
        m
    }

    /// Answers connects (the brokers are up) and notes closes the machine made.
    fn settle_events(&mut self) {
        loop {
            for role in std::mem::take(&mut self.h.closed) {
                self.broken(role);
            }
            let Some((role, _)) = self.h.connects.first().cloned() else {
                break;
            };
            match role {
                Role::Target => {
                    let connack = ConnAckInfo {
                        session_present: self.target_session,
                        receive_maximum: Some(self.target_window),
                        ..ConnAckInfo::default()
                    };
                    self.h.up_with(Role::Target, connack);
                    self.target_up = true;
                    self.target_session = true;
                }
                Role::Source => {
                    self.h.up(Role::Source, self.source_session);
                    self.source_up = true;
                    let resent = self.source_session;
                    self.source_session = true;
                    if resent {
                        // The session's unacknowledged messages again, DUP, in order.
                        let again: Vec<_> = self.source_inflight.clone().into_iter().collect();
                        for (pkid, id) in again {
                            self.send_publish(pkid, id, true);
                        }
                    }
                }
            }
        }
    }

    fn broken(&mut self, role: Role) {
        match role {
            Role::Source => self.source_up = false,
            Role::Target => {
                self.target_up = false;
                self.target_owes.clear();
            }
        }
    }

    fn send_publish(&mut self, pkid: u16, id: u32, dup: bool) {
        let mut p = v4::Publish::new("t/x", QoS::AtLeastOnce, id.to_string().into_bytes());
        p.pkid = pkid;
        p.dup = dup;
        self.h.feed(Role::Source, v4::Packet::Publish(p));
    }

    fn apply(&mut self, step: Step) {
        match step {
            Step::Deliver(n) => {
                for _ in 0..n {
                    if !self.source_up || self.source_inflight.len() >= self.source_window {
                        break;
                    }
                    let Some(id) = self.queue.pop_front() else {
                        break;
                    };
                    let pkid = self.next_pkid;
                    self.next_pkid = self.next_pkid % 1000 + 1;
                    self.source_inflight.insert(pkid, id);
                    self.send_publish(pkid, id, false);
                }
            }
            Step::TargetReads if self.target_up => {
                for p in self.h.out(Role::Target) {
                    match p {
                        v4::Packet::Publish(p) => {
                            let id: u32 = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
                            self.received.insert(id);
                            self.target_owes.push_back(p.pkid);
                        }
                        v4::Packet::PingReq => self.h.feed(Role::Target, v4::Packet::PingResp),
                        other => panic!("the target got {other:?}"),
                    }
                }
            }
            Step::TargetAcks(n) if self.target_up => {
                for _ in 0..n {
                    let Some(pkid) = self.target_owes.pop_front() else {
                        break;
                    };
                    self.h
                        .feed(Role::Target, v4::Packet::PubAck(v4::PubAck::new(pkid)));
                }
            }
            Step::SourceReads if self.source_up => {
                for p in self.h.out(Role::Source) {
                    match p {
                        v4::Packet::Subscribe(s) => self.h.feed(
                            Role::Source,
                            v4::Packet::SubAck(v4::SubAck::new(
                                s.pkid,
                                vec![v4::SubscribeReasonCode::Success(QoS::AtLeastOnce)],
                            )),
                        ),
                        v4::Packet::PubAck(a) => {
                            let id = self
                                .source_inflight
                                .remove(&a.pkid)
                                .expect("an ack for a packet id the session holds");
                            if !self.received.contains(&id) {
                                let counted =
                                    PairStats::get(&self.h.stats.dropped_target_disconnects);
                                assert!(
                                    counted > self.given_up.len() as u64,
                                    "message {id} acknowledged to the source before the target took it"
                                );
                                self.given_up.insert(id);
                            }
                            self.acked.insert(id);
                        }
                        v4::Packet::PingReq => self.h.feed(Role::Source, v4::Packet::PingResp),
                        other => panic!("the source got {other:?}"),
                    }
                }
            }
            Step::Drop(role, lose_session, window) => {
                let up = match role {
                    Role::Source => self.source_up,
                    Role::Target => self.target_up,
                };
                if up {
                    // Bytes in flight towards the broker are lost with the connection.
                    self.h.lose(role);
                    self.broken(role);
                }
                match role {
                    Role::Source if lose_session => {
                        self.source_session = false;
                        let gone = std::mem::take(&mut self.source_inflight);
                        self.lost_by_source.extend(gone.into_values());
                    }
                    Role::Source => {}
                    Role::Target => {
                        self.target_session &= !lose_session;
                        self.target_window = window;
                    }
                }
            }
            Step::Sleep => {
                self.h.sleep();
            }
            _ => {}
        }
        self.settle_events();
    }

    /// Healthy links from here on: everything must arrive, and be acknowledged.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let done = (0..self.total).all(|id| {
                self.acked.contains(&id)
                    || self.lost_by_source.contains(&id)
                    || self.given_up.contains(&id)
            });
            if done {
                return;
            }
            for s in [
                Step::Deliver(5),
                Step::TargetReads,
                Step::TargetAcks(5),
                Step::SourceReads,
            ] {
                self.apply(s);
            }
            if !self.source_up || !self.target_up || self.h.m.in_flight() == 0 {
                self.apply(Step::Sleep);
            }
        }
        panic!(
            "did not settle: {} of {} acknowledged, {} received, queue {}, source in flight {:?}",
            self.acked.len(),
            self.total,
            self.received.len(),
            self.queue.len(),
            self.source_inflight
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Through any interleaving of deliveries, acks and broken connections on either side, with
    /// sessions kept or lost and the target's window growing or shrinking on each reconnect:
    /// every message the source broker still holds reaches the target, and none is acknowledged
    /// to the source before the target took it (nor under a packet id the session no longer has).
    #[test]
    fn no_message_is_lost_through_any_interleaving_of_both_brokers(
        steps in prop::collection::vec(step(), 0..200),
    ) {
        let mut model = Model::new(30);
        for s in steps {
            model.apply(s);
        }
        model.settle();
        for id in 0..30 {
            prop_assert!(
                model.received.contains(&id)
                    || model.lost_by_source.contains(&id)
                    || model.given_up.contains(&id),
                "message {} lost by the bridge", id
            );
        }
    }
}

// ---- Message Expiry while held (#14 holes 7 and 20) ------------------------------------------

impl H {
    /// The v5 source broker publishes `qos` with a Message Expiry Interval of `expiry` seconds.
    fn publish_v5(&mut self, pkid: u16, qos: Qos, expiry: u32) {
        let m = Message {
            topic: "t/x".into(),
            payload: bytes::Bytes::from_static(b"m"),
            qos,
            retain: false,
            properties: Some(Box::new(crate::message::Properties {
                message_expiry_interval: Some(expiry),
                ..Default::default()
            })),
            expires_at: None,
            source_topic: None,
        };
        let mut bytes = BytesMut::new();
        Codec::new(Protocol::V5, link::DEFAULT_MAX_INCOMING)
            .publish(pkid, false, &m, None, &mut bytes);
        let n = bytes.len();
        self.m.recv_buf(Role::Source).extend_from_slice(&bytes);
        self.m.handle_read(self.now, Role::Source, n, n + 1);
        self.pass();
    }

    /// The PUBLISHes the machine wrote to a v5 target: (packet id, dup, expiry left).
    fn target_publishes_v5(&mut self) -> Vec<(u16, bool, Option<u32>)> {
        self.target_publishes()
            .into_iter()
            .map(|p| {
                let expiry = p.properties.and_then(|pp| pp.message_expiry_interval);
                (p.pkid, p.dup, expiry)
            })
            .collect()
    }

    /// Takes what the machine wrote to `role` as written, unread.
    fn discard_out(&mut self, role: Role) {
        let n = self.m.transmit(role).len();
        self.m.written(self.now, role, n);
        self.pass();
    }

    /// The v5 SUBACK for the route's SUBSCRIBE (packet id 1).
    fn suback_v5(&mut self) {
        let bytes = [0x90, 4, 0, 1, 0, 2];
        self.m.recv_buf(Role::Source).extend_from_slice(&bytes);
        self.m
            .handle_read(self.now, Role::Source, bytes.len(), bytes.len() + 1);
        self.pass();
        assert!(self.stats.subscribed.load(Relaxed));
    }

    /// The target breaks, `held` passes, and it comes back with its session.
    fn target_away_for(&mut self, held: Duration) {
        self.lose(Role::Target);
        let back = self.now + held;
        while self.now < back || self.connects.is_empty() {
            self.now = (self.now + Duration::from_millis(500)).min(back.max(self.now));
            self.m.handle_timeout(self.now);
            self.pass();
            if self.now >= back && self.connects.is_empty() {
                self.sleep();
            }
        }
        self.up(Role::Target, true);
    }
}

fn ready_v5() -> H {
    let mut h = H::new("protocol = \"5\"", "protocol = \"5\"");
    h.pass();
    h.up(Role::Target, false);
    h.up(Role::Source, false);
    h.discard_out(Role::Source);
    h.suback_v5();
    h
}

#[test]
fn message_expiry_counts_down_while_held_including_resends() {
    let mut h = ready_v5();
    h.publish_v5(7, Qos::AtLeastOnce, 60);
    let first = h.target_publishes_v5();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].2, Some(60));
    h.target_away_for(Duration::from_secs(16));
    let resent = h.target_publishes_v5();
    assert_eq!(resent.len(), 1, "{resent:?}");
    let (_, dup, expiry) = resent[0];
    assert!(dup);
    // 16 s and the reconnect's backoff (at most a second here) have passed.
    let left = expiry.unwrap();
    assert!(
        (43..=44).contains(&left),
        "60 s held 16 s arrived with {left} s left"
    );
}

#[test]
fn a_qos2_publish_the_resumed_target_holds_is_resent_even_once_expired() {
    let mut h = ready_v5();
    h.publish_v5(7, Qos::ExactlyOnce, 5);
    let first = h.target_publishes_v5();
    assert_eq!(first.len(), 1);
    // Away for longer than the message had left: the target's session holds the exchange
    // (MQTT-4.4.0-1), so the resend must go, not be dropped as expired.
    h.target_away_for(Duration::from_secs(20));
    let resent = h.target_publishes_v5();
    assert_eq!(
        resent.len(),
        1,
        "the held QoS 2 exchange was dropped on resend"
    );
    assert_eq!((resent[0].0, resent[0].1), (first[0].0, true));
    assert_eq!(PairStats::get(&h.stats.dropped_expired), 0);
}

// ---- The poison heuristic (#14 hole 6) --------------------------------------------------------

impl H {
    /// Waits for the machine's reconnect of the target and answers it with the session kept.
    fn target_back(&mut self) {
        while self.connects.is_empty() {
            self.sleep();
        }
        self.up(Role::Target, true);
    }
}

#[test]
fn a_stalled_target_cut_by_keep_alive_is_no_evidence_against_the_message() {
    let mut h = H::ready("keep_alive = \"60s\"", "keep_alive = \"10s\"");
    h.publish(1, QoS::AtLeastOnce, "innocent");
    for _ in 0..(POISON_AFTER + 2) {
        let resent = h.out(Role::Target);
        assert!(
            resent.iter().any(|p| matches!(p, v4::Packet::Publish(_))),
            "the message was given up on (dropped: {})",
            PairStats::get(&h.stats.dropped_target_disconnects)
        );
        // The target stalls: no PUBACK, no PINGRESP, until our keep-alive gives up on it.
        h.closed.clear();
        while h.closed.is_empty() {
            h.sleep();
            h.out(Role::Target);
        }
        h.target_back();
    }
    assert_eq!(PairStats::get(&h.stats.dropped_target_disconnects), 0);
    assert_eq!(h.m.in_flight(), 1, "still held, still resent");
}

#[test]
fn a_dead_letter_names_the_topic_as_received_not_as_rewritten() {
    let route = "dead_letter = \"dl\"\n[[routes.rewrite]]\nmatch = \"t/#\"\nto = \"out/{1}\"";
    let mut h = H::ready_route("", "", route);
    h.publish(1, QoS::AtLeastOnce, "poison");
    // The source goes away (its dead letter then waits in the queue, headers and all), and the
    // target closes the connection on the message until it is given up on.
    h.lose(Role::Source);
    for _ in 0..POISON_AFTER {
        let out = h.out(Role::Target);
        assert!(
            out.iter()
                .any(|p| matches!(p, v4::Packet::Publish(p) if p.topic == "out/x")),
            "{out:?}"
        );
        h.now += Duration::from_millis(20);
        h.lose(Role::Target);
        // (The source's reconnect is asked for too and left unanswered.)
        while !h.connects.iter().any(|(r, _)| *r == Role::Target) {
            h.sleep();
        }
        h.up(Role::Target, true);
    }
    assert_eq!(PairStats::get(&h.stats.dropped_target_disconnects), 1);
    let letter =
        h.m.dead_letters
            .queued_letters()
            .next()
            .expect("a dead letter");
    let headers = &letter.properties.as_ref().unwrap().user_properties;
    assert!(
        headers.contains(&("mqbridge-original-topic".into(), "t/x".into())),
        "{headers:?}"
    );
}

#[test]
fn a_target_that_closes_right_after_the_message_is_written_makes_it_poison() {
    let mut h = H::ready("", "");
    h.publish(1, QoS::AtLeastOnce, "poison");
    for _ in 0..POISON_AFTER {
        assert!(
            h.out(Role::Target)
                .iter()
                .any(|p| matches!(p, v4::Packet::Publish(_)))
        );
        h.now += Duration::from_millis(20);
        h.lose(Role::Target); // the broker closed the connection on it
        h.target_back();
    }
    assert_eq!(PairStats::get(&h.stats.dropped_target_disconnects), 1);
    assert_eq!(
        h.out(Role::Source),
        vec![v4::Packet::PubAck(v4::PubAck::new(1))],
        "given up on, and acknowledged"
    );
}

/// A 3.x target without QoS 2 (NATS) closes the connection at every QoS 2 PUBLISH: that is no
/// evidence against the message, which is kept (it was dropped as poison before `max_qos`).
#[test]
fn a_3x_target_closing_at_every_qos2_publish_drops_nothing() {
    let mut h = H::ready_route("", "", "qos = 2");
    h.publish(1, QoS::ExactlyOnce, "fine");
    for _ in 0..(2 * POISON_AFTER) {
        assert!(
            h.out(Role::Target)
                .iter()
                .any(|p| matches!(p, v4::Packet::Publish(p) if p.qos == QoS::ExactlyOnce)),
            "resent at QoS 2"
        );
        h.now += Duration::from_millis(20);
        h.lose(Role::Target);
        h.target_back();
    }
    assert_eq!(PairStats::get(&h.stats.dropped_target_disconnects), 0);
    assert_eq!(h.m.in_flight(), 1, "still held");
    let to_source = h.out(Role::Source);
    assert!(
        !to_source
            .iter()
            .any(|p| matches!(p, v4::Packet::PubRec(_) | v4::Packet::PubAck(_))),
        "not acknowledged to the source: {to_source:?}"
    );
}

/// `max_qos = 1` on the target: a QoS 2 message goes at QoS 1 (counted), and its PUBACK
/// completes the source's QoS 2 exchange with PUBREC.
#[test]
fn max_qos_1_forwards_qos2_at_qos1() {
    let mut h = H::ready_route("", "max_qos = 1", "qos = 2");
    h.publish(1, QoS::ExactlyOnce, "m");
    let out = h.out(Role::Target);
    let Some(v4::Packet::Publish(p)) = out.first() else {
        panic!("{out:?}")
    };
    assert_eq!(p.qos, QoS::AtLeastOnce);
    assert_eq!(PairStats::get(&h.stats.qos_downgraded), 1);
}

#[test]
fn a_target_that_closes_long_after_the_write_is_no_evidence() {
    let mut h = H::ready("keep_alive = \"600s\"", "keep_alive = \"600s\"");
    h.publish(1, QoS::AtLeastOnce, "innocent");
    for _ in 0..(POISON_AFTER + 2) {
        let resent = h.out(Role::Target);
        assert!(
            resent.iter().any(|p| matches!(p, v4::Packet::Publish(_))),
            "the message was given up on (dropped: {})",
            PairStats::get(&h.stats.dropped_target_disconnects)
        );
        h.now += Duration::from_secs(60); // e.g. a proxy's idle timeout
        h.lose(Role::Target);
        h.target_back();
    }
    assert_eq!(PairStats::get(&h.stats.dropped_target_disconnects), 0);
}

// ---- What the target's CONNACK allows, applied to held messages (#14 hole 10) ----------------

impl H {
    /// The PUBLISHes the machine wrote to a v5 target, decoded.
    fn target_publishes(&mut self) -> Vec<InboundPublish> {
        let mut bytes = BytesMut::from(self.m.transmit(Role::Target));
        let n = bytes.len();
        self.m.written(self.now, Role::Target, n);
        self.pass();
        let codec = Codec::new(Protocol::V5, link::DEFAULT_MAX_INCOMING);
        let mut out = Vec::new();
        while let Some(p) = codec.decode(&mut bytes).unwrap() {
            if let Inbound::Publish(p) = p {
                out.push(p);
            }
        }
        out
    }

    /// The v5 target comes back (new session) with `connack`'s limits.
    fn target_back_with(&mut self, connack: ConnAckInfo) {
        self.lose(Role::Target);
        while self.connects.is_empty() {
            self.sleep();
        }
        self.up_with(Role::Target, connack);
    }
}

#[test]
fn a_target_without_retained_messages_gets_the_message_without_retain() {
    let mut h = H::new("", "protocol = \"5\"");
    h.pass();
    let connack = ConnAckInfo {
        retain_available: Some(0),
        ..ConnAckInfo::default()
    };
    h.up_with(Role::Target, connack);
    h.up(Role::Source, false);
    let pkid = match h.out(Role::Source).as_slice() {
        [v4::Packet::Subscribe(s)] => s.pkid,
        other => panic!("{other:?}"),
    };
    h.feed(
        Role::Source,
        v4::Packet::SubAck(v4::SubAck::new(
            pkid,
            vec![v4::SubscribeReasonCode::Success(QoS::AtLeastOnce)],
        )),
    );
    let mut p = v4::Publish::new("t/x", QoS::AtLeastOnce, b"state".to_vec());
    p.pkid = 3;
    p.retain = true; // pair 0's first subscription: the retained copy it forwards
    h.feed(Role::Source, v4::Packet::Publish(p));
    let sent = h.target_publishes();
    assert_eq!(sent.len(), 1);
    assert!(
        !sent[0].retain,
        "RETAIN 1 to a broker without retained messages"
    );
    assert_eq!(PairStats::get(&h.stats.retain_cleared), 1);
}

#[test]
fn a_target_back_with_a_lower_maximum_qos_gets_held_messages_at_that_qos() {
    let mut h = ready_v5();
    h.publish_v5(4, Qos::ExactlyOnce, 600);
    assert_eq!(h.target_publishes()[0].qos, Qos::ExactlyOnce);
    h.target_back_with(ConnAckInfo {
        maximum_qos: Some(1),
        ..ConnAckInfo::default()
    });
    let resent = h.target_publishes();
    assert_eq!(resent.len(), 1);
    assert_eq!((resent[0].qos, resent[0].dup), (Qos::AtLeastOnce, false));
    // Its PUBACK completes it: the QoS 2 source gets its PUBREC.
    let ack = [0x40, 2, 0, resent[0].pkid as u8];
    h.m.recv_buf(Role::Target).extend_from_slice(&ack);
    h.m.handle_read(h.now, Role::Target, 4, 5);
    h.pass();
    let mut out = BytesMut::from(h.m.transmit(Role::Source));
    let codec = Codec::new(Protocol::V5, link::DEFAULT_MAX_INCOMING);
    assert_eq!(
        codec.decode(&mut out).unwrap(),
        Some(Inbound::PubRec { pkid: 4, reason: 0 })
    );
}

#[test]
fn a_target_back_with_a_smaller_maximum_packet_size_refuses_a_held_message_that_no_longer_fits() {
    let mut h = ready_v5();
    h.publish_v5(4, Qos::AtLeastOnce, 600);
    assert_eq!(h.target_publishes().len(), 1);
    h.target_back_with(ConnAckInfo {
        maximum_packet_size: Some(20),
        ..ConnAckInfo::default()
    });
    assert!(h.target_publishes().is_empty());
    assert_eq!(PairStats::get(&h.stats.dropped_too_large), 1);
    assert_eq!(h.m.in_flight(), 0, "settled and acknowledged to the source");
}

// ---- Dead letters' own window (#14 hole 15) ---------------------------------------------------

#[test]
fn dead_letters_keep_to_the_sources_receive_maximum_and_each_goes_before_its_originals_ack() {
    let mut h = H::with_route("protocol = \"5\"", "", "dead_letter = \"dlq\"");
    h.pass();
    h.up(Role::Target, false);
    let connack = ConnAckInfo {
        receive_maximum: Some(2),
        ..ConnAckInfo::default()
    };
    h.up_with(Role::Source, connack);
    h.discard_out(Role::Source);
    h.suback_v5();
    // Four messages whose topic no broker takes (a broken source sent a wildcard).
    let codec = Codec::new(Protocol::V5, link::DEFAULT_MAX_INCOMING);
    for pkid in 1..=4u16 {
        let m = Message {
            topic: "t/+".into(),
            payload: bytes::Bytes::from_static(b"bad"),
            qos: Qos::AtLeastOnce,
            retain: false,
            properties: None,
            expires_at: None,
            source_topic: None,
        };
        let mut bytes = BytesMut::new();
        codec.publish(pkid, false, &m, None, &mut bytes);
        let n = bytes.len();
        h.m.recv_buf(Role::Source).extend_from_slice(&bytes);
        h.m.handle_read(h.now, Role::Source, n, n + 1);
        h.pass();
    }
    let source_out = |h: &mut H| {
        let mut bytes = BytesMut::from(h.m.transmit(Role::Source));
        let n = bytes.len();
        h.m.written(h.now, Role::Source, n);
        h.pass();
        let mut out = Vec::new();
        while let Some(p) = codec.decode(&mut bytes).unwrap() {
            out.push(match p {
                Inbound::Publish(p) => format!("DL {}", p.pkid),
                Inbound::PubAck { pkid, .. } => format!("ack {pkid}"),
                other => format!("{other:?}"),
            });
        }
        out
    };
    let first = source_out(&mut h);
    assert_eq!(
        first,
        ["DL 1000", "ack 1", "DL 1001", "ack 2"],
        "two dead letters (Receive Maximum 2), each before its original's ack; 3 and 4 wait"
    );
    assert_eq!(PairStats::get(&h.stats.dead_lettered), 2);
    // The broker acknowledges the first dead letter: the third goes, then its original's ack.
    let ack = [0x40, 2, 0x03, 0xE8]; // PUBACK 1000
    h.m.recv_buf(Role::Source).extend_from_slice(&ack);
    h.m.handle_read(h.now, Role::Source, 4, 5);
    h.pass();
    assert_eq!(source_out(&mut h), ["DL 1002", "ack 3"]);
    // A reconnect sends again what was not acknowledged, with DUP, before anything new.
    h.lose(Role::Source);
    while h.connects.is_empty() {
        h.sleep();
    }
    h.up_with(
        Role::Source,
        ConnAckInfo {
            session_present: true,
            receive_maximum: Some(2),
            ..ConnAckInfo::default()
        },
    );
    let again = source_out(&mut h);
    assert_eq!(&again[..2], ["DL 1001", "DL 1002"], "{again:?}");
}

// ---- With a spool (#15, SPEC 4.9) -------------------------------------------------------------

impl H {
    /// A spooled pair: the source connects on its own and subscribes; the target is down.
    fn spooled(target_up: bool) -> H {
        Self::spooled_with(target_up, "spool = true\n[spool]\ndir = \"/nonexistent\"")
    }

    /// `route`: the route's spool key and the `[spool]` table, last (it ends the route's
    /// table; the machine never touches the directory).
    fn spooled_with(target_up: bool, route: &str) -> H {
        let mut h = H::with_route("", "max_inflight = 20", route);
        h.m.spool_opened(h.now, 1, 1);
        h.pass();
        assert!(
            h.connects.iter().any(|(r, _)| *r == Role::Source),
            "with a spool the source does not wait for the target"
        );
        h.up(Role::Source, false);
        let pkid = match h.out(Role::Source).as_slice() {
            [v4::Packet::Subscribe(s)] => s.pkid,
            other => panic!("expected SUBSCRIBE, got {other:?}"),
        };
        h.feed(
            Role::Source,
            v4::Packet::SubAck(v4::SubAck::new(
                pkid,
                vec![v4::SubscribeReasonCode::Success(QoS::ExactlyOnce)],
            )),
        );
        if target_up {
            h.up(Role::Target, false);
        }
        h
    }

    fn publish_n(&mut self, n: u16, qos: QoS) {
        for i in 1..=n {
            let mut p = v4::Publish::new("t/x", qos, format!("m{i}").into_bytes());
            p.pkid = i;
            self.feed(Role::Source, v4::Packet::Publish(p));
        }
    }

    /// The PUBACKs the machine wrote to the source, by packet id (anything else fails).
    fn source_pubacks(&mut self) -> Vec<u16> {
        self.out(Role::Source)
            .into_iter()
            .map(|p| match p {
                v4::Packet::PubAck(a) => a.pkid,
                other => panic!("expected PUBACK, got {other:?}"),
            })
            .collect()
    }

    /// The target acknowledges every PUBLISH in `packets`.
    fn target_acks(&mut self, packets: &[v4::Packet]) {
        for p in packets {
            if let v4::Packet::Publish(p) = p {
                self.feed(Role::Target, v4::Packet::PubAck(v4::PubAck::new(p.pkid)));
            }
        }
    }

    fn payloads(packets: &[v4::Packet]) -> Vec<String> {
        packets
            .iter()
            .filter_map(|p| match p {
                v4::Packet::Publish(p) => Some(String::from_utf8(p.payload.to_vec()).unwrap()),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn with_a_spool_the_source_is_acknowledged_once_durable_while_the_target_is_down() {
    let mut h = H::spooled(false);
    h.publish_n(50, QoS::AtLeastOnce); // more than the target's window of 20
    assert!(
        h.out(Role::Source).is_empty(),
        "nothing acknowledged before it is durable"
    );
    assert_eq!(h.spool.records.len(), 50);
    h.sync();
    let acks: Vec<u16> = h.source_pubacks();
    assert_eq!(
        acks,
        (1..=50).collect::<Vec<_>>(),
        "every one, in arrival order"
    );
    // The target comes: the backlog goes out in order, a window at a time, each record
    // deleted once the target acknowledged it.
    h.up(Role::Target, false);
    let mut sent = Vec::new();
    while sent.len() < 50 {
        let out = h.out(Role::Target);
        assert!(!out.is_empty(), "stalled after {} of 50", sent.len());
        assert!(out.len() <= 20, "over the target's window: {}", out.len());
        sent.extend(H::payloads(&out));
        h.target_acks(&out);
    }
    let expected: Vec<String> = (1..=50).map(|i| format!("m{i}")).collect();
    assert_eq!(sent, expected);
    assert!(
        h.spool.records.is_empty(),
        "every record acknowledged by the target went"
    );
    assert_eq!(h.spool.acked.len(), 50);
}

#[test]
fn with_a_spool_qos2_is_received_and_released_on_both_sides() {
    let mut h = H::spooled(true);
    h.publish_n(1, QoS::ExactlyOnce);
    h.sync();
    assert_eq!(
        h.out(Role::Source),
        vec![v4::Packet::PubRec(v4::PubRec::new(1))]
    );
    // A redelivery before the PUBREL is not taken twice.
    let mut dup = v4::Publish::new("t/x", QoS::ExactlyOnce, b"m1".to_vec());
    dup.pkid = 1;
    dup.dup = true;
    h.feed(Role::Source, v4::Packet::Publish(dup));
    assert_eq!(h.spool.records.len(), 1);
    h.feed(Role::Source, v4::Packet::PubRel(v4::PubRel::new(1)));
    let to_source = h.out(Role::Source);
    assert!(
        to_source.contains(&v4::Packet::PubComp(v4::PubComp::new(1))),
        "{to_source:?}"
    );
    let out = h.out(Role::Target);
    let pkid = match out.as_slice() {
        [v4::Packet::Publish(p)] if p.qos == QoS::ExactlyOnce => p.pkid,
        other => panic!("{other:?}"),
    };
    assert_eq!(h.spool.records.len(), 1, "kept until the target has it");
    // The target's PUBREC says it has the message (as it releases the source's PUBREC without
    // a spool): the record goes; the exchange is finished with PUBREL (and, after a restart,
    // by the PUBREL every resumed target session gets).
    h.feed(Role::Target, v4::Packet::PubRec(v4::PubRec::new(pkid)));
    assert!(h.spool.records.is_empty());
    assert_eq!(
        h.out(Role::Target),
        vec![v4::Packet::PubRel(v4::PubRel::new(pkid))]
    );
    h.feed(Role::Target, v4::Packet::PubComp(v4::PubComp::new(pkid)));
    assert_eq!(h.m.in_flight(), 0);
}

#[test]
fn a_full_spool_stops_reading_the_source() {
    let mut h = H::spooled(false);
    assert!(h.m.read_room(h.now, Role::Source).is_some());
    h.m.spool_full(true);
    assert_eq!(h.m.read_room(h.now, Role::Source), None);
    h.m.spool_full(false);
    assert!(h.m.read_room(h.now, Role::Source).is_some());
}

#[test]
fn a_failed_sync_acknowledges_nothing_and_appends_again_after_a_pause() {
    let mut h = H::spooled(false);
    h.publish_n(3, QoS::AtLeastOnce);
    let n = std::mem::take(&mut h.spool.unsynced);
    h.spool.records.clear();
    h.m.spool_failed(h.now, n);
    h.pass();
    assert!(h.out(Role::Source).is_empty(), "nothing acknowledged");
    assert_eq!(
        h.m.read_room(h.now, Role::Source),
        None,
        "no reading meanwhile"
    );
    let slept = h.sleep();
    assert!(slept <= Duration::from_secs(1), "{slept:?}");
    assert_eq!(h.spool.records.len(), 3, "appended again");
    h.sync();
    assert_eq!(h.out(Role::Source).len(), 3);
}

#[test]
fn a_backlog_larger_than_memory_is_read_back_from_the_spool_in_order() {
    let mut h = H::spooled(false);
    // Published in rounds (the intake window is 1024): 3,000 while the target is away, more
    // than the 1,024 kept in memory.
    for round in 0..6u16 {
        for i in 1..=500u16 {
            let mut p = v4::Publish::new(
                "t/x",
                QoS::AtLeastOnce,
                format!("m{}", round * 500 + i).into_bytes(),
            );
            p.pkid = i;
            h.feed(Role::Source, v4::Packet::Publish(p));
        }
        h.sync();
        assert_eq!(h.out(Role::Source).len(), 500);
    }
    assert_eq!(
        h.spool.reads_served, 0,
        "nothing read back while the target is away"
    );
    h.up(Role::Target, false);
    let mut sent = Vec::new();
    while sent.len() < 3000 {
        let out = h.out(Role::Target);
        assert!(!out.is_empty(), "stalled after {} of 3000", sent.len());
        sent.extend(H::payloads(&out));
        h.target_acks(&out);
    }
    let expected: Vec<String> = (1..=3000).map(|i| format!("m{i}")).collect();
    assert_eq!(sent, expected, "in the order taken");
    assert!(
        h.spool.reads_served >= 3000 - 1024,
        "the backlog past memory came from disk: {}",
        h.spool.reads_served
    );
    assert!(h.spool.records.is_empty());
}

#[test]
fn a_target_that_keeps_up_is_fed_from_memory_without_reading_back() {
    let mut h = H::spooled(true);
    for round in 0..5 {
        h.publish_n(10, QoS::AtLeastOnce);
        h.sync();
        h.out(Role::Source);
        let out = h.out(Role::Target);
        h.target_acks(&out);
        assert_eq!(h.spool.acked.len(), 10 * (round + 1));
    }
    assert_eq!(h.spool.reads_served, 0);
}

#[test]
fn a_failed_group_with_another_in_flight_is_appended_again_and_each_acked_once() {
    let mut h = H::spooled(false);
    h.publish_n(3, QoS::AtLeastOnce); // group 1: will fail
    let first = std::mem::take(&mut h.spool.unsynced);
    let failed: Vec<u64> = h.spool.records.keys().copied().collect();
    for i in 4..=5u16 {
        let mut p = v4::Publish::new("t/x", QoS::AtLeastOnce, format!("m{i}").into_bytes());
        p.pkid = i;
        h.feed(Role::Source, v4::Packet::Publish(p)); // group 2: in flight, will succeed
    }
    for seq in &failed {
        h.spool.records.remove(seq);
    }
    h.m.spool_failed(h.now, first);
    h.pass();
    h.sync(); // group 2 durable
    let acked: Vec<u16> = h.source_pubacks();
    assert!(
        acked.is_empty(),
        "acks wait their turn behind the failed group: {acked:?}"
    );
    h.sleep(); // the pause: the failed group goes again
    assert_eq!(h.spool.records.len(), 5);
    h.sync();
    let acked: Vec<u16> = h.source_pubacks();
    assert_eq!(acked, [1, 2, 3, 4, 5], "each once, in arrival order");
}

#[test]
fn a_healthy_target_acknowledges_the_source_before_the_spool_is_durable() {
    let mut h = H::spooled(true);
    h.publish_n(10, QoS::AtLeastOnce);
    assert!(h.out(Role::Source).is_empty(), "nothing taken yet");
    let out = h.out(Role::Target);
    assert_eq!(out.len(), 10);
    // The first half acknowledged by the target, before any sync: their sources are answered.
    h.target_acks(&out[..5]);
    assert_eq!(h.source_pubacks(), [1, 2, 3, 4, 5]);
    // The spool says the group is durable: the rest is answered, the first half not again.
    h.sync();
    assert_eq!(h.source_pubacks(), [6, 7, 8, 9, 10]);
    h.target_acks(&out[5..]);
    assert!(h.out(Role::Source).is_empty(), "each acknowledged once");
    assert!(h.spool.records.is_empty(), "every record went");
    assert_eq!(h.spool.acked.len(), 10);
    // The source reuses the packet ids: a new message under id 1 waits for its own sync or ack.
    h.publish_n(1, QoS::AtLeastOnce);
    assert!(h.out(Role::Source).is_empty());
    h.sync();
    assert_eq!(h.source_pubacks(), [1]);
}

#[test]
fn with_a_spool_a_qos2_pubrec_from_the_target_releases_the_source_before_the_sync() {
    let mut h = H::spooled(true);
    h.publish_n(1, QoS::ExactlyOnce);
    let out = h.out(Role::Target);
    let pkid = match out.as_slice() {
        [v4::Packet::Publish(p)] if p.qos == QoS::ExactlyOnce => p.pkid,
        other => panic!("{other:?}"),
    };
    h.feed(Role::Target, v4::Packet::PubRec(v4::PubRec::new(pkid)));
    assert_eq!(
        h.out(Role::Source),
        vec![v4::Packet::PubRec(v4::PubRec::new(1))]
    );
    h.sync();
    assert!(h.out(Role::Source).is_empty(), "not answered twice");
    h.feed(Role::Source, v4::Packet::PubRel(v4::PubRel::new(1)));
    assert_eq!(
        h.out(Role::Source),
        vec![v4::Packet::PubComp(v4::PubComp::new(1))]
    );
}

#[test]
fn a_pair_leaving_the_pool_forwards_its_spool_before_it_parks() {
    let mut h = H::spooled(false);
    h.publish_n(30, QoS::AtLeastOnce);
    h.sync();
    assert_eq!(h.source_pubacks().len(), 30);
    // The pool shrinks while the target is away: unsubscribed, and quiet for long after.
    h.park();
    h.now += PARK_QUIET * 20;
    h.m.handle_timeout(h.now);
    assert_eq!(
        h.m.handle_input(h.now),
        None,
        "30 messages in its spool: it does not end"
    );
    h.events();
    // The target is back: the backlog goes out, and the pair ends once the target has all.
    h.up(Role::Target, false);
    let mut sent = Vec::new();
    let ended = loop {
        let out = h.out(Role::Target);
        assert!(!out.is_empty(), "stalled after {} of 30", sent.len());
        sent.extend(H::payloads(&out));
        let mut ended = None;
        for p in &out {
            if let v4::Packet::Publish(p) = p {
                let mut bytes = BytesMut::new();
                v4::Packet::PubAck(v4::PubAck::new(p.pkid))
                    .write(&mut bytes, MAX)
                    .unwrap();
                let n = bytes.len();
                h.m.recv_buf(Role::Target).extend_from_slice(&bytes);
                h.m.handle_read(h.now, Role::Target, n, n + 1);
                ended = h.m.handle_input(h.now);
                h.events();
            }
        }
        if let Some(e) = ended {
            break e;
        }
    };
    assert_eq!(ended, Ended::Parked);
    assert_eq!(sent.len(), 30, "every spooled message, then parked");
    assert!(h.spool.records.is_empty());
}

#[test]
fn spooled_messages_older_than_max_age_are_dead_lettered_not_forwarded() {
    let route = "dead_letter = \"dl\"\nspool = true\n[spool]\ndir = \"/x\"\nmax_age = \"1h\"";
    let mut h = H::spooled_with(false, route);
    // Held in memory while the target is away for longer than max_age.
    h.publish_n(5, QoS::AtLeastOnce);
    h.sync();
    assert_eq!(h.source_pubacks().len(), 5);
    h.now += Duration::from_secs(3601);
    h.up(Role::Target, false);
    assert!(
        H::payloads(&h.out(Role::Target)).is_empty(),
        "nothing past max_age is forwarded"
    );
    assert_eq!(PairStats::get(&h.stats.dropped_max_age), 5);
    let letters: Vec<String> = h
        .out(Role::Source)
        .into_iter()
        .filter_map(|p| match p {
            v4::Packet::Publish(p) if p.topic == "dl" => {
                Some(String::from_utf8(p.payload.to_vec()).unwrap())
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        letters,
        ["m1", "m2", "m3", "m4", "m5"],
        "dead-lettered in order"
    );
    assert!(h.spool.records.is_empty(), "their records went");
    // A fresh message goes through.
    h.publish_n(1, QoS::AtLeastOnce);
    assert_eq!(H::payloads(&h.out(Role::Target)), ["m1"]);

    // A previous run's backlog read back from disk counts the time it spent there.
    let mut h = H::spooled_with(false, route);
    for seq in 1..=3u64 {
        let m = Message {
            topic: "t/x".into(),
            payload: bytes::Bytes::from(format!("old{seq}")),
            qos: Qos::AtLeastOnce,
            retain: false,
            properties: None,
            expires_at: None,
            source_topic: None,
        };
        h.spool.records.insert(seq, m);
    }
    h.spool.next = 4;
    h.spool.age = Duration::from_secs(2 * 3600);
    h.m.spool_opened(h.now, 4, 1);
    h.pass();
    h.up(Role::Target, false);
    assert!(H::payloads(&h.out(Role::Target)).is_empty());
    assert_eq!(PairStats::get(&h.stats.dropped_max_age), 3);
    assert!(h.spool.records.is_empty());
}

/// A pair leaving the pool whose target is slow to ack: its source holds the window for our
/// acks and sends nothing meanwhile, so that quiet is no sign the session is empty. It parks only
/// `PARK_QUIET` after its acks went out (before: at once, and a retiring index ended its session
/// with 130 messages still queued for it — `pool_shrink.rs`, seen once in CI).
#[test]
fn a_parking_pair_waits_for_quiet_after_its_acks_not_after_its_last_read() {
    let mut h = H::ready("", "");
    h.publish(1, QoS::AtLeastOnce, "held");
    let pkid = match h.out(Role::Target).as_slice() {
        [v4::Packet::Publish(p)] => p.pkid,
        other => panic!("{other:?}"),
    };
    h.park();
    // The target takes its time: nothing read from the source for long.
    h.now += PARK_QUIET * 4;
    h.m.handle_timeout(h.now);
    assert_eq!(h.m.handle_input(h.now), None, "a message is held");
    // The ack comes: the source gets its PUBACK and is free to send what its session holds.
    h.feed(Role::Target, v4::Packet::PubAck(v4::PubAck::new(pkid)));
    assert_eq!(
        h.out(Role::Source),
        vec![v4::Packet::PubAck(v4::PubAck::new(1))]
    );
    assert_eq!(
        h.m.handle_input(h.now),
        None,
        "the source has not had a chance to send more"
    );
    h.now += PARK_QUIET;
    h.m.handle_timeout(h.now);
    assert_eq!(h.m.handle_input(h.now), Some(Ended::Parked));
}

impl H {
    /// Sleeps until `done` or `limit` passed, answering both brokers' pings (other output to
    /// the source, its PUBACKs, is kept for `out`).
    fn sleep_until(&mut self, limit: Duration, done: impl Fn(&H) -> bool) {
        let start = self.now;
        while !done(self) && self.now - start < limit {
            self.sleep();
            if self.m.is_up(Role::Target) && self.out(Role::Target).contains(&v4::Packet::PingReq) {
                self.feed(Role::Target, v4::Packet::PingResp);
            }
            if self.m.is_up(Role::Source) && self.m.transmit(Role::Source) == [0xc0, 0] {
                self.out(Role::Source);
                self.feed(Role::Source, v4::Packet::PingResp);
            }
        }
    }

    /// Two QoS 1 publishes from the source, 5 ms apart; their target packet ids.
    fn two_publishes(&mut self) -> [u16; 2] {
        self.publish(1, QoS::AtLeastOnce, "first");
        self.now += Duration::from_millis(5);
        self.publish(2, QoS::AtLeastOnce, "second");
        let ids: Vec<u16> = self
            .out(Role::Target)
            .into_iter()
            .map(|p| match p {
                v4::Packet::Publish(p) => p.pkid,
                other => panic!("{other:?}"),
            })
            .collect();
        [ids[0], ids[1]]
    }
}

/// BifroMQ over its PUBLISH/s quota on MQTT 3.x drops a publish without an ack and acknowledges
/// the next ones: brokers ack in order, so the pair takes the first for dropped, says so and
/// reconnects, and the resumed session gets it again. Before, the pair (and the source) held it
/// for ever.
#[test]
fn a_publish_the_target_passes_over_is_sent_again_after_a_reconnect() {
    let mut h = H::ready("", "keep_alive = \"5s\"");
    let [dropped, taken] = h.two_publishes();
    h.feed(Role::Target, v4::Packet::PubAck(v4::PubAck::new(taken)));
    let acked_at = h.now;
    h.sleep_until(Duration::from_secs(30), |h| !h.closed.is_empty());
    let waited = h.now - acked_at;
    assert!(
        waited >= SKIPPED_ACK_GRACE && waited <= SKIPPED_ACK_GRACE + Duration::from_millis(2),
        "closed after {waited:?}"
    );
    assert_eq!(h.closed, vec![Role::Target]);
    h.sleep_until(Duration::from_secs(5), |h| !h.connects.is_empty());
    assert_eq!(PairStats::get(&h.stats.skipped_acks), 1);
    h.up(Role::Target, true);
    match h.out(Role::Target).as_slice() {
        [v4::Packet::Publish(p)] => {
            assert!(p.dup);
            assert_eq!((p.pkid, &p.payload[..]), (dropped, &b"first"[..]));
        }
        other => panic!("expected the resend, got {other:?}"),
    }
    h.feed(Role::Target, v4::Packet::PubAck(v4::PubAck::new(dropped)));
    // The source hears of both now, in the order it sent them (MQTT 4.6).
    let acks: Vec<v4::Packet> = h
        .out(Role::Source)
        .into_iter()
        .filter(|p| matches!(p, v4::Packet::PubAck(_)))
        .collect();
    assert_eq!(
        acks,
        vec![
            v4::Packet::PubAck(v4::PubAck::new(1)),
            v4::Packet::PubAck(v4::PubAck::new(2))
        ]
    );
    // Nothing more: no second reconnect.
    h.sleep_until(Duration::from_secs(30), |h| !h.connects.is_empty());
    assert!(h.connects.is_empty());
}

/// Acks in order, however slow, and a first ack that comes late but within the grace, are no
/// reason to reconnect.
#[test]
fn slow_acks_in_order_or_late_within_the_grace_do_not_reconnect() {
    let mut h = H::ready("", "keep_alive = \"5s\"");
    let [first, second] = h.two_publishes();
    h.sleep_until(SKIPPED_ACK_GRACE * 2, |_| false);
    h.feed(Role::Target, v4::Packet::PubAck(v4::PubAck::new(first)));
    h.feed(Role::Target, v4::Packet::PubAck(v4::PubAck::new(second)));
    let [first, second] = h.two_publishes();
    h.feed(Role::Target, v4::Packet::PubAck(v4::PubAck::new(second)));
    h.sleep_until(SKIPPED_ACK_GRACE - Duration::from_secs(1), |_| false);
    h.feed(Role::Target, v4::Packet::PubAck(v4::PubAck::new(first)));
    h.sleep_until(SKIPPED_ACK_GRACE * 2, |_| false);
    assert!(h.closed.is_empty() && h.connects.is_empty());
    assert_eq!(PairStats::get(&h.stats.skipped_acks), 0);
    let acks = h
        .out(Role::Source)
        .into_iter()
        .filter(|p| matches!(p, v4::Packet::PubAck(_)))
        .count();
    assert_eq!(acks, 4, "each acknowledged to the source");
}

/// The tail of a burst over BifroMQ's quota: dropped, and no later publish acknowledged (the
/// source's window holds the dropped ones). A target that answers pings and acknowledges nothing
/// for `ACK_SILENCE` gets them again on a new connection.
#[test]
fn a_target_that_answers_pings_but_acknowledges_nothing_gets_the_publishes_again() {
    let mut h = H::ready("", "keep_alive = \"5s\"");
    // Silence counts from the target's last word, its CONNACK here.
    let connected = h.now;
    let [first, second] = h.two_publishes();
    h.sleep_until(ACK_SILENCE * 2, |h| !h.closed.is_empty());
    let waited = h.now - connected;
    assert!(
        waited >= ACK_SILENCE && waited <= ACK_SILENCE + Duration::from_millis(2),
        "closed after {waited:?}"
    );
    assert_eq!(PairStats::get(&h.stats.skipped_acks), 1);
    h.sleep_until(Duration::from_secs(5), |h| !h.connects.is_empty());
    h.up(Role::Target, true);
    let resent: Vec<(u16, bool)> = h
        .out(Role::Target)
        .into_iter()
        .map(|p| match p {
            v4::Packet::Publish(p) => (p.pkid, p.dup),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(resent, vec![(first, true), (second, true)]);
    // An idle pair with nothing waiting is left alone.
    h.feed(Role::Target, v4::Packet::PubAck(v4::PubAck::new(first)));
    h.feed(Role::Target, v4::Packet::PubAck(v4::PubAck::new(second)));
    h.out(Role::Source);
    h.sleep_until(ACK_SILENCE * 3, |h| h.closed.len() > 1);
    assert_eq!(h.closed, vec![Role::Target]);
}

/// An idle target's keep-alive PINGREQ measures the path's round trip, exported per pair.
#[test]
fn an_idle_targets_ping_measures_its_round_trip() {
    let mut h = H::ready("keep_alive = \"60s\"", "keep_alive = \"10s\"");
    assert_eq!(PairStats::get(&h.stats.target_round_trip_us), 0);
    while !h.out(Role::Target).contains(&v4::Packet::PingReq) {
        h.sleep();
    }
    h.now += Duration::from_millis(37);
    h.feed(Role::Target, v4::Packet::PingResp);
    assert_eq!(PairStats::get(&h.stats.target_round_trip_us), 37_000);
    // A PINGRESP nobody asked for measures nothing.
    h.now += Duration::from_millis(500);
    h.feed(Role::Target, v4::Packet::PingResp);
    assert_eq!(PairStats::get(&h.stats.target_round_trip_us), 37_000);
}

/// An operator who raised `bridge.stall_timeout` for a slow target gets a longer silence before
/// the pair sends again; the default (30 s) keeps `ACK_SILENCE`.
#[test]
fn the_ack_silence_follows_a_raised_stall_timeout() {
    assert_eq!(ack_silence(Duration::from_secs(30)), ACK_SILENCE);
    assert_eq!(ack_silence(Duration::from_secs(5)), ACK_SILENCE);
    assert_eq!(
        ack_silence(Duration::from_secs(300)),
        Duration::from_secs(600)
    );
}

impl H {
    /// One message forwarded and acknowledged by the target: its ack to the source exists.
    fn forward_and_ack(&mut self, pkid: u16) {
        self.publish(pkid, QoS::AtLeastOnce, "m");
        let id = self.forwarded_pkid();
        self.feed(Role::Target, v4::Packet::PubAck(v4::PubAck::new(id)));
    }

    /// The packet id of the one PUBLISH just written to the (3.x) target.
    fn forwarded_pkid(&mut self) -> u16 {
        match self.out(Role::Target).as_slice() {
            [v4::Packet::Publish(p)] => p.pkid,
            other => panic!("expected the PUBLISH forwarded at once, got {other:?}"),
        }
    }

    /// What the driver would write to the source now (held acks are not), decoded.
    fn source_now(&mut self) -> Vec<v4::Packet> {
        let mut bytes = BytesMut::from(self.m.transmit_now(self.now, Role::Source));
        let n = bytes.len();
        self.m.written(self.now, Role::Source, n);
        self.pass();
        let mut packets = Vec::new();
        while !bytes.is_empty() {
            packets.push(v4::Packet::read(&mut bytes, MAX).unwrap());
        }
        packets
    }
}

fn pubacks(ids: &[u16]) -> Vec<v4::Packet> {
    ids.iter()
        .map(|&i| v4::Packet::PubAck(v4::PubAck::new(i)))
        .collect()
}

#[test]
fn without_ack_delay_an_ack_leaves_as_soon_as_the_target_acknowledged() {
    let mut h = H::ready("", "");
    h.forward_and_ack(1);
    assert_eq!(h.source_now(), pubacks(&[1]));
}

#[test]
fn with_ack_delay_acks_wait_for_each_other_and_leave_together_when_it_ends() {
    let mut h = H::ready("ack_delay = \"10ms\"", "");
    let t0 = h.now;
    h.forward_and_ack(1);
    assert!(h.source_now().is_empty(), "the first ack waits");
    h.now += Duration::from_millis(4);
    h.forward_and_ack(2);
    assert!(h.source_now().is_empty(), "the second joins it");
    // The driver sleeps until the first ack's deadline, not longer.
    assert_eq!(h.sleep(), Duration::from_millis(6));
    assert_eq!(h.now, t0 + Duration::from_millis(10));
    assert_eq!(h.source_now(), pubacks(&[1, 2]));
    // The next ack starts its own wait.
    h.forward_and_ack(3);
    assert!(h.source_now().is_empty());
    assert_eq!(h.sleep(), Duration::from_millis(10));
    assert_eq!(h.source_now(), pubacks(&[3]));
}

#[test]
fn held_acks_never_exceed_a_quarter_of_a_3x_sources_window() {
    // A 3.x source cannot say its window: mosquitto's default of 20 is assumed, so 5 acks.
    let mut h = H::ready("ack_delay = \"1s\"", "");
    for id in 1..=4 {
        h.forward_and_ack(id);
        assert!(h.source_now().is_empty(), "ack {id} waits");
    }
    h.forward_and_ack(5);
    assert_eq!(h.source_now(), pubacks(&[1, 2, 3, 4, 5]));
}

#[test]
fn acks_leave_at_once_while_the_source_has_half_its_window_in_flight() {
    let mut h = H::ready("ack_delay = \"1s\"", "");
    // Ten messages forwarded, the first acknowledged by the target: with its ack held the
    // source would have 10 of its 20 in flight to us (nine at the target, one held).
    for id in 1..=10 {
        h.publish(id, QoS::AtLeastOnce, "m");
    }
    let sent = h.out(Role::Target);
    assert_eq!(sent.len(), 10);
    let first = match &sent[0] {
        v4::Packet::Publish(p) => p.pkid,
        other => panic!("{other:?}"),
    };
    h.feed(Role::Target, v4::Packet::PubAck(v4::PubAck::new(first)));
    assert_eq!(h.m.transmit(Role::Source).len(), 4, "one PUBACK written");
    assert_eq!(h.source_now(), pubacks(&[1]), "and not held");
}

#[test]
fn a_draining_pair_holds_no_ack() {
    let mut h = H::ready("ack_delay = \"1s\"", "");
    h.forward_and_ack(1);
    assert!(h.source_now().is_empty());
    h.m.shutdown(h.now);
    h.pass();
    assert_eq!(
        h.m.transmit_now(h.now, Role::Source),
        [0x40, 2, 0, 1],
        "the PUBACK leaves now"
    );
}

#[test]
fn a_v5_source_holds_up_to_a_quarter_of_the_window_it_was_told() {
    // Told Receive Maximum 8 (the target's window): 2 acks at most wait.
    let mut h = H::new(
        "protocol = \"5\"\nack_delay = \"1s\"",
        "protocol = \"5\"\nmax_inflight = 8",
    );
    h.pass();
    h.up(Role::Target, false);
    h.up(Role::Source, false);
    h.discard_out(Role::Source);
    h.suback_v5();
    h.forward_and_ack_v5(1);
    assert_eq!(h.m.transmit_now(h.now, Role::Source), &[] as &[u8]);
    h.forward_and_ack_v5(2);
    assert!(!h.m.transmit_now(h.now, Role::Source).is_empty());
}

impl H {
    fn forward_and_ack_v5(&mut self, pkid: u16) {
        self.publish_v5(pkid, Qos::AtLeastOnce, 60);
        let ids = self.target_publishes();
        let id = ids.last().expect("forwarded at once").pkid;
        self.feed(Role::Target, v4::Packet::PubAck(v4::PubAck::new(id)));
    }
}

#[test]
fn with_ack_delay_a_qos2_pubrec_leaves_at_once() {
    let mut h = H::ready("ack_delay = \"1s\"", "");
    h.publish(4, QoS::ExactlyOnce, "m");
    let id = h.forwarded_pkid();
    h.feed(Role::Target, v4::Packet::PubRec(v4::PubRec::new(id)));
    assert_eq!(
        h.source_now(),
        vec![v4::Packet::PubRec(v4::PubRec::new(4))],
        "the source's PUBREL waits on it"
    );
}

impl H {
    /// `n` publishes at `qos` arrive from the source in one read.
    fn publish_batch(&mut self, first: u16, n: u16, qos: QoS) {
        let mut bytes = BytesMut::new();
        for pkid in first..first + n {
            let mut p = v4::Publish::new("t/x", qos, b"m".to_vec());
            p.pkid = pkid;
            v4::Packet::Publish(p).write(&mut bytes, MAX).unwrap();
        }
        let len = bytes.len();
        self.m.recv_buf(Role::Source).extend_from_slice(&bytes);
        self.m.handle_read(self.now, Role::Source, len, len + 1);
        self.pass();
    }
}

#[test]
fn a_batch_lingers_on_a_large_qos1_window_but_not_on_a_3x_targets_qos2_window_of_20() {
    // QoS 1 towards a 3.x target: window 16384, so a pass of 8 lingers (the source is not
    // read for a millisecond).
    let mut h = H::ready("", "");
    h.publish_batch(1, 8, QoS::AtLeastOnce);
    assert_eq!(h.m.read_room(h.now, Role::Source), None, "lingering");
    // QoS 2 towards it: 20 exchanges at most, each two round trips; lingering held every batch
    // back (p50 54 ms against mosquitto's bridge's 2.4 at QoS 2 with default windows).
    let mut h = H::ready("", "");
    h.publish_batch(1, 8, QoS::ExactlyOnce);
    assert!(
        h.m.read_room(h.now, Role::Source).is_some(),
        "not lingering while QoS 2 is on the wire"
    );
}
