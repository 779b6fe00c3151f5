//! A fake MQTT broker on raw TCP, written for hostile-broker tests: it speaks just enough MQTT
//! 3.1.1 and 5 (CONNECT/CONNACK, SUBSCRIBE/SUBACK, QoS 1 PUBLISH and acks, PINGREQ) to play a
//! bridge's source or target, and on chosen connections sends what no broker should (a `Step`:
//! raw bytes at a chosen moment, then carry on, fall silent, close, or lie with wrong acks).
//!
//! It keeps a persistent session of its own: a source sends what was not acknowledged on one
//! connection again on the next, with DUP and the same packet id; a target records what it took.

use super::{IdCount, Received, count_ids, numbered_payload};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

// ---- packets ----------------------------------------------------------------------------------

/// A packet with this first byte and body (the remaining length is encoded here).
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

pub fn string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

pub fn connack(v5: bool, session_present: bool) -> Vec<u8> {
    let mut body = vec![u8::from(session_present), 0];
    if v5 {
        body.push(0); // no properties
    }
    packet(0x20, &body)
}

pub fn publish(v5: bool, qos: u8, dup: bool, pkid: u16, topic: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = string(topic);
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    packet(0x30 | (u8::from(dup) << 3) | (qos << 1), &body)
}

pub fn ack(kind: u8, pkid: u16) -> Vec<u8> {
    let first = if kind == 6 { 0x62 } else { kind << 4 };
    packet(first, &pkid.to_be_bytes())
}

pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;

/// A SUBACK granting QoS 1 to each filter of the SUBSCRIBE `body`.
pub fn suback(v5: bool, subscribe: &[u8]) -> Vec<u8> {
    let pkid = [subscribe[0], subscribe[1]];
    let mut at = 2;
    if v5 {
        let (len, n) = varint(&subscribe[at..]);
        at += n + len;
    }
    let mut codes = Vec::new();
    while at + 2 <= subscribe.len() {
        let len = usize::from(u16::from_be_bytes([subscribe[at], subscribe[at + 1]]));
        at += 2 + len + 1;
        codes.push(1);
    }
    let mut body = pkid.to_vec();
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(&codes);
    packet(0x90, &body)
}

pub fn varint(bytes: &[u8]) -> (usize, usize) {
    let (mut value, mut shift) = (0usize, 0);
    for (i, b) in bytes.iter().enumerate().take(4) {
        value |= usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return (value, i + 1);
        }
    }
    (value, 4)
}

/// QoS, packet id and payload of a PUBLISH.
pub fn parse_publish(v5: bool, first: u8, body: &[u8]) -> (u8, u16, Vec<u8>) {
    let qos = (first >> 1) & 3;
    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let mut at = 2 + topic_len;
    let mut pkid = 0;
    if qos > 0 {
        pkid = u16::from_be_bytes([body[at], body[at + 1]]);
        at += 2;
    }
    if v5 {
        let (len, n) = varint(&body[at..]);
        at += n + len;
    }
    (qos, pkid, body[at..].to_vec())
}

/// Reads whole packets off `stream` into `tx` until EOF or an error.
pub fn spawn_reader(mut stream: tokio::net::tcp::OwnedReadHalf) -> mpsc::Receiver<(u8, Vec<u8>)> {
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while buf.len() >= 2 {
                let (len, n) = varint(&buf[1..]);
                if buf.len() < 1 + n + len {
                    break;
                }
                let first = buf[0];
                let body = buf[1 + n..1 + n + len].to_vec();
                buf.drain(..1 + n + len);
                if tx.send((first, body)).await.is_err() {
                    return;
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    });
    rx
}

// ---- misbehaviour --------------------------------------------------------------------------------

/// When a step's bytes go out.
#[derive(Clone, Copy, Debug)]
pub enum When {
    /// Right after CONNACK (before the SUBACK, on a source).
    Connack,
    /// After this many PUBLISH packets on the connection (sent by a source, received by a
    /// target).
    Publishes(usize),
}

/// What the fake broker does after sending a step's bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Then {
    /// Goes on as if nothing happened (the bytes themselves end the connection).
    Continue,
    /// Goes on for this many more publishes, then closes the connection (for misbehaviour a
    /// client may shrug off, so the next one gets a connection of its own).
    CloseAfter(usize),
    /// Writes nothing more on this connection, but keeps it open (and reads).
    Silence,
    /// Target only: the next `n` publishes are not taken, but answered with PUBREC and PUBCOMP
    /// (wrong kinds of ack for QoS 1); then the connection is closed.
    LieWithWrongAcks(usize),
}

/// One connection's misbehaviour.
#[derive(Clone, Debug)]
pub struct Step {
    pub name: &'static str,
    pub when: When,
    pub bytes: Vec<u8>,
    pub then: Then,
}

pub fn step(name: &'static str, when: When, bytes: Vec<u8>, then: Then) -> Step {
    Step {
        name,
        when,
        bytes,
        then,
    }
}

/// Every way a broker can be wrong towards a client, one per connection, as `v5` or 3.1.1.
/// A PUBLISH body for the (invalid) QoS 3 header.
pub fn qos3_body(v5: bool) -> Vec<u8> {
    let mut body = string(b"in/q3");
    body.extend_from_slice(&[0, 9]);
    if v5 {
        body.push(0);
    }
    body.push(b'x');
    body
}

// ---- the fake source ---------------------------------------------------------------------------

/// A source broker with `count` numbered QoS 1 messages (`"h-{id}"` on `in/{id % 5}`) for the
/// bridge's subscription, misbehaving on its first connections as `steps` say.
pub struct FakeSource {
    pub port: u16,
    state: Arc<Mutex<SourceState>>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct SourceState {
    /// Per id: `None` never sent, `Some(false)` sent and unacknowledged, `Some(true)` acked.
    sent: BTreeMap<u32, Option<bool>>,
    /// Ids acknowledged, in order.
    acked: Vec<u32>,
    connections: usize,
    log: Vec<String>,
    /// Topics other than `in/{id % 5}` for some ids (names no broker should send).
    topics: BTreeMap<u32, Vec<u8>>,
}

impl FakeSource {
    pub async fn start(v5: bool, count: u32, steps: Vec<Step>) -> FakeSource {
        FakeSource::start_with_topics(v5, count, steps, BTreeMap::new()).await
    }

    pub async fn start_with_topics(
        v5: bool,
        count: u32,
        steps: Vec<Step>,
        topics: BTreeMap<u32, Vec<u8>>,
    ) -> FakeSource {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(SourceState {
            sent: (0..count).map(|id| (id, None)).collect(),
            topics,
            ..Default::default()
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let Some((rx, write)) = pair_zero(stream, v5).await else {
                    continue;
                };
                let n = {
                    let mut s = shared.lock().unwrap();
                    s.connections += 1;
                    s.connections - 1
                };
                let step = steps.get(n).cloned();
                tokio::spawn(serve_source(rx, write, v5, n, step, shared.clone()));
            }
        });
        FakeSource { port, state, task }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn acked(&self) -> Vec<u32> {
        self.state.lock().unwrap().acked.clone()
    }

    pub fn all_acked(&self) -> bool {
        self.state
            .lock()
            .unwrap()
            .sent
            .values()
            .all(|s| *s == Some(true))
    }

    pub fn report(&self) -> String {
        let s = self.state.lock().unwrap();
        format!(
            "{} connections, {} acked of {}:\n{}",
            s.connections,
            s.acked.len(),
            s.sent.len(),
            s.log.join("\n")
        )
    }
}

impl Drop for FakeSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const SOURCE_WINDOW: usize = 10;

/// Reads a connection's CONNECT. Pair 0's (every test here runs one pair) is returned, to be
/// served with the next scripted step; any other is the start's clean-up of pool indexes past
/// the pool, which gets a CONNACK without a session, nothing else, and no step.
async fn pair_zero(
    stream: TcpStream,
    v5: bool,
) -> Option<(mpsc::Receiver<(u8, Vec<u8>)>, OwnedWriteHalf)> {
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut rx = spawn_reader(read);
    match rx.recv().await {
        Some((first, body)) if first >> 4 == 1 => {
            if body.windows(4).any(|w| w == b"-r-0") {
                return Some((rx, write));
            }
            let _ = write.write_all(&connack(v5, false)).await;
            tokio::spawn(async move {
                let _keep = write;
                while rx.recv().await.is_some() {}
            });
            None
        }
        // Not a CONNECT: not a client of ours; dropped.
        _ => None,
    }
}

async fn serve_source(
    mut rx: mpsc::Receiver<(u8, Vec<u8>)>,
    mut write: OwnedWriteHalf,
    v5: bool,
    n: usize,
    step: Option<Step>,
    state: Arc<Mutex<SourceState>>,
) {
    let log = |line: String| state.lock().unwrap().log.push(format!("conn {n}: {line}"));
    if write.write_all(&connack(v5, n > 0)).await.is_err() {
        return;
    }
    let mut silent = false;
    let mut step = step;
    if let Some(s) = step.take_if(|s| matches!(s.when, When::Connack)) {
        log(format!("sends {}", s.name));
        let _ = write.write_all(&s.bytes).await;
        silent = s.then == Then::Silence;
    }
    let mut in_flight: BTreeSet<u32> = BTreeSet::new();
    let mut published = 0usize;
    let mut close_at = None;
    let mut subscribed = false;
    loop {
        // Send what the window allows: unacknowledged ids first (DUP), then new ones.
        while subscribed && !silent && in_flight.len() < SOURCE_WINDOW {
            let next = {
                let s = state.lock().unwrap();
                s.sent
                    .iter()
                    .find(|(id, st)| **st == Some(false) && !in_flight.contains(id))
                    .map(|(id, _)| (*id, true))
                    .or_else(|| {
                        s.sent
                            .iter()
                            .find(|(_, st)| st.is_none())
                            .map(|(id, _)| (*id, false))
                    })
            };
            let Some((id, dup)) = next else { break };
            let topic = state.lock().unwrap().topics.get(&id).cloned();
            let topic = topic.unwrap_or_else(|| format!("in/{}", id % 5).into_bytes());
            let payload = numbered_payload("h", id);
            let pkid = id as u16 + 1;
            let bytes = publish(v5, 1, dup, pkid, &topic, payload.as_bytes());
            if write.write_all(&bytes).await.is_err() {
                return;
            }
            state.lock().unwrap().sent.insert(id, Some(false));
            in_flight.insert(id);
            published += 1;
            if let Some(s) =
                step.take_if(|s| matches!(s.when, When::Publishes(k) if k == published))
            {
                log(format!("sends {} after {published} publishes", s.name));
                let _ = write.write_all(&s.bytes).await;
                silent = s.then == Then::Silence;
                if let Then::CloseAfter(k) = s.then {
                    close_at = Some(published + k);
                }
            }
            if close_at == Some(published) {
                return log(format!("closes after {published} publishes"));
            }
        }
        let Some((first, body)) = rx.recv().await else {
            return log(format!("closed after {published} publishes"));
        };
        match first >> 4 {
            8 => {
                subscribed = true;
                if !silent {
                    let _ = write.write_all(&suback(v5, &body)).await;
                }
            }
            4 => {
                let id = u32::from(u16::from_be_bytes([body[0], body[1]])) - 1;
                in_flight.remove(&id);
                let mut s = state.lock().unwrap();
                if s.sent.get(&id) == Some(&Some(false)) {
                    s.sent.insert(id, Some(true));
                    s.acked.push(id);
                }
            }
            12 if !silent => {
                let _ = write.write_all(&packet(0xd0, &[])).await;
            }
            14 => return log("DISCONNECT".into()),
            _ => {}
        }
    }
}

// ---- the fake target ---------------------------------------------------------------------------

/// A target broker that records the numbered payloads it took, misbehaving on its first
/// connections as `steps` say.
pub struct FakeTarget {
    pub port: u16,
    state: Arc<Mutex<TargetState>>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct TargetState {
    /// Payloads taken (acknowledged with PUBACK), in order.
    taken: Vec<Vec<u8>>,
    connections: usize,
    log: Vec<String>,
}

impl FakeTarget {
    pub async fn start(v5: bool, steps: Vec<Step>) -> FakeTarget {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(TargetState::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let Some((rx, write)) = pair_zero(stream, v5).await else {
                    continue;
                };
                let n = {
                    let mut s = shared.lock().unwrap();
                    s.connections += 1;
                    s.connections - 1
                };
                let step = steps.get(n).cloned();
                tokio::spawn(serve_target(rx, write, v5, n, step, shared.clone()));
            }
        });
        FakeTarget { port, state, task }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn count(&self, prefix: &str, expected: std::ops::Range<u32>) -> IdCount {
        let s = self.state.lock().unwrap();
        let received: Vec<Received> = s
            .taken
            .iter()
            .map(|p| Received {
                topic: String::new(),
                payload: p.clone().into(),
                qos: 1,
                retain: false,
                dup: false,
                user_properties: Vec::new(),
                properties: None,
                at: tokio::time::Instant::now(),
            })
            .collect();
        count_ids(&received, prefix, expected)
    }

    pub fn report(&self) -> String {
        let s = self.state.lock().unwrap();
        format!("{} connections:\n{}", s.connections, s.log.join("\n"))
    }
}

impl Drop for FakeTarget {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_target(
    mut rx: mpsc::Receiver<(u8, Vec<u8>)>,
    mut write: OwnedWriteHalf,
    v5: bool,
    n: usize,
    step: Option<Step>,
    state: Arc<Mutex<TargetState>>,
) {
    let log = |line: String| state.lock().unwrap().log.push(format!("conn {n}: {line}"));
    if write.write_all(&connack(v5, n > 0)).await.is_err() {
        return;
    }
    let mut silent = false;
    let mut lying = 0;
    let mut step = step;
    let mut close_at = None;
    let apply = |s: &Step,
                 published: usize,
                 silent: &mut bool,
                 lying: &mut usize,
                 close_at: &mut Option<usize>| {
        log(format!("sends {} after {published} publishes", s.name));
        *silent = s.then == Then::Silence;
        match s.then {
            Then::LieWithWrongAcks(k) => *lying = k,
            Then::CloseAfter(k) => *close_at = Some(published + k),
            _ => {}
        }
    };
    if let Some(s) = step.take_if(|s| matches!(s.when, When::Connack)) {
        apply(&s, 0, &mut silent, &mut lying, &mut close_at);
        let _ = write.write_all(&s.bytes).await;
    }
    let mut published = 0usize;
    while let Some((first, body)) = rx.recv().await {
        match first >> 4 {
            3 => {
                if let Some(s) =
                    step.take_if(|s| matches!(s.when, When::Publishes(k) if k == published))
                {
                    apply(&s, published, &mut silent, &mut lying, &mut close_at);
                    let _ = write.write_all(&s.bytes).await;
                }
                if close_at == Some(published) {
                    return log(format!("closes after {published} publishes"));
                }
                published += 1;
                let (qos, pkid, payload) = parse_publish(v5, first, &body);
                if silent {
                    continue;
                }
                if lying > 0 {
                    // Not taken; answered with acks of the wrong kinds for its packet id.
                    let _ = write
                        .write_all(&[ack(PUBREC, pkid), ack(PUBCOMP, pkid)].concat())
                        .await;
                    lying -= 1;
                    if lying == 0 {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        return log("closes after lying".into());
                    }
                    continue;
                }
                state.lock().unwrap().taken.push(payload);
                let reply = match qos {
                    1 => ack(PUBACK, pkid),
                    2 => ack(PUBREC, pkid),
                    _ => continue,
                };
                if write.write_all(&reply).await.is_err() {
                    return;
                }
            }
            6 if !silent => {
                let pkid = u16::from_be_bytes([body[0], body[1]]);
                let _ = write.write_all(&ack(PUBCOMP, pkid)).await;
            }
            12 if !silent => {
                let _ = write.write_all(&packet(0xd0, &[])).await;
            }
            _ => {}
        }
    }
    log(format!("closed after {published} publishes"));
}
