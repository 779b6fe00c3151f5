//! Many unacknowledged QoS 1 (and, for reference, QoS 2) publishes from one MQTT 3.1.1 client,
//! against mosquitto, NATS and RabbitMQ (issue #17 item 2): is anything lost, and does anything
//! limit them?
//!
//! Each broker is started here with its defaults on free ports of 127.0.0.1, the way
//! `tests/support/{mosquitto,nats,rabbitmq}.rs` start them (RabbitMQ: a node of our own, never the
//! machine's service). Per case, a subscriber (clean session, the case's QoS) on `probe/#` reads
//! as fast as it can and acknowledges at once; then one publisher writes N numbered 64 B messages
//! keeping at most W unacknowledged (a new one per PUBACK, or per PUBCOMP at QoS 2), or all N
//! without waiting for any ack. Prints a Markdown row per case (acks, distinct deliveries, lost,
//! duplicates, time, what the broker logged or closed) and each case's broker log on stderr.
//!
//! `cargo run --release --example inflight_probe [mosquitto] [nats] [rabbitmq]` (default: all).
//! `INFLIGHT_PROBE_KEEP=1` keeps the brokers' directories (under the system temp directory).

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use rumqttc::mqttbytes::{Error as MqttError, QoS, v4};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, mpsc};
use v4::Packet;

const MAX_PACKET: usize = 1 << 20;
const PAYLOAD: usize = 64;
/// N for the "all without waiting" case (below 65,535, so every packet id is used once).
const ALL_N: usize = 50_000;
/// The publisher gives up when no ack arrives for this long.
const PUB_IDLE: Duration = Duration::from_secs(15);
/// After the publisher is done, the subscriber stops when nothing arrives for this long.
const SUB_QUIET: Duration = Duration::from_secs(5);
/// The whole case at most (a stalled broker).
const CASE_MAX: Duration = Duration::from_secs(300);

#[tokio::main]
async fn main() {
    let mut wanted: Vec<String> = std::env::args().skip(1).collect();
    if wanted.is_empty() {
        wanted = vec!["mosquitto".into(), "nats".into(), "rabbitmq".into()];
    }
    let cases: Vec<(QoS, Option<usize>)> = vec![
        (QoS::AtLeastOnce, Some(20)),
        (QoS::AtLeastOnce, Some(100)),
        (QoS::AtLeastOnce, Some(1_000)),
        (QoS::AtLeastOnce, Some(10_000)),
        (QoS::AtLeastOnce, None),
        (QoS::ExactlyOnce, Some(20)),
        (QoS::ExactlyOnce, Some(100)),
    ];
    let mut rows = Vec::new();
    let mut versions = Vec::new();
    let mut case_no = 0u32;
    for name in &wanted {
        let broker = match Broker::start(name).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("== {name}: skipped: {e}");
                versions.push(format!("{name}: not available ({e})"));
                continue;
            }
        };
        eprintln!(
            "== {} ({}) on 127.0.0.1:{}",
            broker.name, broker.version, broker.port
        );
        versions.push(format!("{}: {}", broker.name, broker.version));
        for &(qos, window) in &cases {
            case_no += 1;
            let row = run_case(&broker, case_no, qos, window).await;
            println!("{row}");
            rows.push(row);
        }
        broker.stop().await;
    }
    let _ = std::fs::remove_dir(base_dir()); // empty unless INFLIGHT_PROBE_KEEP
    println!();
    for v in &versions {
        println!("{v}");
    }
    println!();
    println!("{}", header());
    for r in &rows {
        println!("{r}");
    }
}

/// Each broker's directory is made under this one.
fn base_dir() -> PathBuf {
    std::env::temp_dir().join(format!("inflight-probe-{}", std::process::id()))
}

fn header() -> String {
    "| broker | QoS | window | N | peak unacked | acks | delivered | lost | dup | all acked (s) | all delivered (s) | msg/s | broker logged / closed |\n\
     | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
        .into()
}

async fn run_case(broker: &Broker, case: u32, qos: QoS, window: Option<usize>) -> String {
    let n = window.map_or(ALL_N, |w| (w * 5).max(5_000));
    let w_text = window.map_or("all".to_string(), |w| w.to_string());
    let q = qos as u8;
    let log_from = broker.log_len();
    let row = |fields: String| format!("| {} | {q} | {w_text} | {n} | {fields} |", broker.name);

    let (srd, sbuf, swr, granted) =
        match subscribe(broker.port, &format!("probe-sub-{case}"), qos).await {
            Ok(s) => s,
            Err(e) => return row(format!("– | – | – | – | – | – | – | – | subscriber: {e}")),
        };
    let (prd, pbuf, pwr) = match connect(broker.port, &format!("probe-pub-{case}")).await {
        Ok(c) => c,
        Err(e) => return row(format!("– | – | – | – | – | – | – | – | publisher: {e}")),
    };
    let pub_done = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let sub = tokio::spawn(run_subscriber(srd, sbuf, swr, case, n, pub_done.clone()));
    let p = run_publisher(prd, pbuf, pwr, qos, case, n, window).await;
    pub_done.store(true, Ordering::SeqCst);
    let s = sub.await.expect("subscriber task");
    tokio::time::sleep(Duration::from_millis(500)).await; // the broker's log lines
    let log = broker.log_since(log_from);

    let since = |t: Option<Instant>| {
        t.map_or("–".to_string(), |t| {
            format!("{:.2}", (t - start).as_secs_f64())
        })
    };
    let end = [p.last_ack, s.last_new].into_iter().flatten().max();
    let secs = end.map_or(0.0, |e| (e - start).as_secs_f64());
    let rate = if secs > 0.0 {
        s.distinct as f64 / secs
    } else {
        0.0
    };
    let mut notes = Vec::new();
    if granted != q {
        notes.push(format!("subscription granted QoS {granted}"));
    }
    if p.written < n {
        notes.push(format!("publisher wrote {} of {n}", p.written));
    }
    if q == 2 {
        notes.push(format!("{} PUBREC", p.pubrecs));
    }
    if p.dup_acks > 0 {
        notes.push(format!("{} repeated acks", p.dup_acks));
    }
    notes.extend(p.odd.iter().cloned());
    notes.extend(s.odd.iter().cloned());
    if let Some(c) = &p.closed {
        notes.push(format!("publisher: {c}"));
    }
    if let Some(c) = &s.closed {
        notes.push(format!("subscriber: {c}"));
    }
    if s.stray > 0 {
        notes.push(format!("{} stray messages", s.stray));
    }
    let unusual = broker.unusual(&log);
    eprintln!(
        "-- case {case}: {} QoS {q} window {w_text}: {} new log lines, {} unusual",
        broker.name,
        log.lines().count(),
        unusual.len()
    );
    for line in log.lines().take(40) {
        eprintln!("   {line}");
    }
    if let Some(first) = unusual.first() {
        let mut first: String = first.chars().take(140).collect();
        first = first.replace('|', "/");
        notes.push(format!("log ({} unusual): `{first}`", unusual.len()));
    }
    if notes.is_empty() {
        notes.push("–".into());
    }
    row(format!(
        "{} | {} | {} | {} | {} | {} | {} | {rate:.0} | {}",
        p.peak_unacked,
        p.acks,
        s.distinct,
        n - s.distinct,
        s.dups,
        since(p.last_ack),
        since(s.last_new),
        notes.join("; ")
    ))
}

// ---------------------------------------------------------------------------------------------
// The two clients.

type Conn = (OwnedReadHalf, BytesMut, OwnedWriteHalf);

async fn connect(port: u16, client_id: &str) -> Result<Conn, String> {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut rd, mut wr) = stream.into_split();
    let mut connect = v4::Connect::new(client_id);
    connect.keep_alive = 600;
    connect.clean_session = true;
    send(&mut wr, &Packet::Connect(connect)).await?;
    let mut buf = BytesMut::with_capacity(256 * 1024);
    match next_packet(&mut rd, &mut buf).await? {
        Packet::ConnAck(a) if a.code == v4::ConnectReturnCode::Success => Ok((rd, buf, wr)),
        other => Err(format!("CONNACK expected, got {other:?}")),
    }
}

/// Connects and subscribes to `probe/#`; returns the granted QoS (128: refused).
async fn subscribe(
    port: u16,
    client_id: &str,
    qos: QoS,
) -> Result<(OwnedReadHalf, BytesMut, OwnedWriteHalf, u8), String> {
    let (mut rd, mut buf, mut wr) = connect(port, client_id).await?;
    let mut sub = v4::Subscribe::new("probe/#", qos);
    sub.pkid = 1;
    send(&mut wr, &Packet::Subscribe(sub)).await?;
    match next_packet(&mut rd, &mut buf).await? {
        Packet::SubAck(a) => {
            let granted = match a.return_codes.first() {
                Some(v4::SubscribeReasonCode::Success(q)) => *q as u8,
                _ => 128,
            };
            if granted == 128 {
                return Err("SUBSCRIBE refused".into());
            }
            Ok((rd, buf, wr, granted))
        }
        other => Err(format!("SUBACK expected, got {other:?}")),
    }
}

async fn send(wr: &mut OwnedWriteHalf, p: &Packet) -> Result<(), String> {
    let mut b = BytesMut::new();
    p.write(&mut b, MAX_PACKET).map_err(|e| e.to_string())?;
    wr.write_all(&b).await.map_err(|e| format!("write: {e}"))
}

async fn next_packet(rd: &mut OwnedReadHalf, buf: &mut BytesMut) -> Result<Packet, String> {
    loop {
        match Packet::read(buf, MAX_PACKET) {
            Ok(p) => return Ok(p),
            Err(MqttError::InsufficientBytes(_)) => {}
            Err(e) => return Err(format!("bad packet: {e}")),
        }
        match tokio::time::timeout(Duration::from_secs(20), rd.read_buf(buf)).await {
            Err(_) => return Err("no answer for 20 s".into()),
            Ok(Ok(0)) => return Err("closed by the broker".into()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("read: {e}")),
        }
    }
}

#[derive(Default)]
struct SubResult {
    distinct: usize,
    dups: usize,
    stray: usize,
    last_new: Option<Instant>,
    closed: Option<String>,
    odd: Vec<String>,
}

/// Reads everything, acknowledging each batch of packets in one write.
async fn run_subscriber(
    mut rd: OwnedReadHalf,
    mut buf: BytesMut,
    mut wr: OwnedWriteHalf,
    case: u32,
    n: usize,
    pub_done: Arc<AtomicBool>,
) -> SubResult {
    let started = Instant::now();
    let mut r = SubResult::default();
    let mut seen = vec![false; n];
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut complete_at: Option<Instant> = None;
    'outer: loop {
        loop {
            match Packet::read(&mut buf, MAX_PACKET) {
                Ok(Packet::Publish(p)) => {
                    match p.qos {
                        QoS::AtLeastOnce => v4::PubAck::new(p.pkid).write(&mut out),
                        QoS::ExactlyOnce => v4::PubRec::new(p.pkid).write(&mut out),
                        QoS::AtMostOnce => Ok(0),
                    }
                    .expect("encode");
                    match number(&p.payload, case) {
                        Some(i) if i < n => {
                            if seen[i] {
                                r.dups += 1;
                            } else {
                                seen[i] = true;
                                r.distinct += 1;
                                r.last_new = Some(Instant::now());
                            }
                        }
                        _ => r.stray += 1,
                    }
                    if p.qos as u8 == 0 && !r.odd.iter().any(|o| o.contains("QoS 0")) {
                        r.odd.push("subscriber got QoS 0 deliveries".into());
                    }
                }
                Ok(Packet::PubRel(p)) => {
                    v4::PubComp::new(p.pkid).write(&mut out).expect("encode");
                }
                Ok(Packet::PingResp) => {}
                Ok(other) => r.odd.push(format!("subscriber got {other:?}")),
                Err(MqttError::InsufficientBytes(_)) => break,
                Err(e) => {
                    r.closed = Some(format!("bad packet: {e}"));
                    break 'outer;
                }
            }
        }
        if !out.is_empty() {
            if let Err(e) = wr.write_all(&out).await {
                r.closed = Some(format!("write: {e}"));
                break;
            }
            out.clear();
        }
        if r.distinct == n && complete_at.is_none() {
            complete_at = Some(Instant::now());
        }
        // Once complete, one more second for duplicates; else wait for the publisher's end.
        let wait = match complete_at {
            Some(t) => Duration::from_secs(1).saturating_sub(t.elapsed()),
            None => SUB_QUIET,
        };
        if started.elapsed() > CASE_MAX {
            r.closed = Some(format!("gave up after {CASE_MAX:?}"));
            break;
        }
        match tokio::time::timeout(wait, rd.read_buf(&mut buf)).await {
            Ok(Ok(0)) => {
                r.closed = Some("closed by the broker".into());
                break;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                r.closed = Some(format!("read: {e}"));
                break;
            }
            Err(_) => {
                if complete_at.is_some() || pub_done.load(Ordering::SeqCst) {
                    break;
                }
            }
        }
    }
    if r.closed.is_none() {
        let _ = send(&mut wr, &Packet::Disconnect).await;
    }
    r
}

/// The payload is `CCCC NNNNNNNNNN ` padded to 64 bytes: the case, then the message's number.
fn payload(case: u32, i: usize) -> Vec<u8> {
    let mut p = format!("{case:04} {i:010} ").into_bytes();
    p.resize(PAYLOAD, b'x');
    p
}

fn number(payload: &[u8], case: u32) -> Option<usize> {
    let text = std::str::from_utf8(payload.get(..15)?).ok()?;
    let (c, i) = text.trim_end().split_once(' ')?;
    (c.parse::<u32>().ok()? == case).then_some(())?;
    i.parse().ok()
}

#[derive(Default)]
struct PubResult {
    written: usize,
    acks: usize,
    pubrecs: usize,
    dup_acks: usize,
    /// The most publishes written and not yet acknowledged (PUBACK / PUBCOMP) at any read.
    peak_unacked: usize,
    last_ack: Option<Instant>,
    closed: Option<String>,
    odd: Vec<String>,
}

/// Writes N publishes with at most `window` unacknowledged (None: no limit), packet ids 1..=N.
async fn run_publisher(
    mut rd: OwnedReadHalf,
    mut buf: BytesMut,
    wr: OwnedWriteHalf,
    qos: QoS,
    case: u32,
    n: usize,
    window: Option<usize>,
) -> PubResult {
    let permits = Arc::new(Semaphore::new(window.unwrap_or(n)));
    let (ctrl, ctrl_rx) = mpsc::unbounded_channel();
    let written = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn(write_publishes(
        wr,
        qos,
        case,
        n,
        permits.clone(),
        ctrl_rx,
        written.clone(),
    ));
    let mut r = PubResult::default();
    // 0: written or not yet, 1: PUBREC seen, 2: done (PUBACK or PUBCOMP)
    let mut state = vec![0u8; n];
    let acked = |r: &mut PubResult, state: &mut Vec<u8>, pkid: u16| {
        let i = (pkid as usize).wrapping_sub(1);
        if i >= n {
            r.odd.push(format!("ack for unknown id {pkid}"));
        } else if state[i] == 2 {
            r.dup_acks += 1;
        } else {
            state[i] = 2;
            r.acks += 1;
            r.last_ack = Some(Instant::now());
            permits.add_permits(1);
        }
    };
    'outer: loop {
        loop {
            match Packet::read(&mut buf, MAX_PACKET) {
                Ok(Packet::PubAck(a)) => {
                    if qos == QoS::ExactlyOnce && !r.odd.iter().any(|o| o.contains("PUBACK")) {
                        r.odd.push("PUBACK answers QoS 2".into());
                    }
                    acked(&mut r, &mut state, a.pkid);
                }
                Ok(Packet::PubRec(a)) => {
                    r.pubrecs += 1;
                    if let Some(s) = state.get_mut((a.pkid as usize).wrapping_sub(1))
                        && *s == 0
                    {
                        *s = 1;
                    }
                    let _ = ctrl.send(Packet::PubRel(v4::PubRel::new(a.pkid)));
                }
                Ok(Packet::PubComp(a)) => acked(&mut r, &mut state, a.pkid),
                Ok(Packet::PingResp) => {}
                Ok(other) => r.odd.push(format!("publisher got {other:?}")),
                Err(MqttError::InsufficientBytes(_)) => break,
                Err(e) => {
                    r.closed = Some(format!("bad packet: {e}"));
                    break 'outer;
                }
            }
        }
        let outstanding = written.load(Ordering::SeqCst).saturating_sub(r.acks);
        r.peak_unacked = r.peak_unacked.max(outstanding);
        if r.acks == n {
            break;
        }
        match tokio::time::timeout(PUB_IDLE, rd.read_buf(&mut buf)).await {
            Ok(Ok(0)) => {
                r.closed = Some(format!("closed by the broker after {} acks", r.acks));
                break;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                r.closed = Some(format!("read after {} acks: {e}", r.acks));
                break;
            }
            Err(_) => {
                r.closed = Some(format!("no ack for {PUB_IDLE:?} after {} acks", r.acks));
                break;
            }
        }
    }
    if r.closed.is_none() || r.closed.as_deref().is_some_and(|c| c.starts_with("no ack")) {
        let _ = ctrl.send(Packet::Disconnect);
    }
    drop(ctrl);
    permits.close();
    if let Ok(Some(e)) = writer.await {
        r.odd.push(format!("publisher write failed: {e}"));
    }
    r.written = written.load(Ordering::SeqCst);
    r
}

/// The publisher's writing half: publishes as the window allows, PUBRELs and the final
/// DISCONNECT as the reader asks; batches whatever is ready into one write.
async fn write_publishes(
    mut wr: OwnedWriteHalf,
    qos: QoS,
    case: u32,
    n: usize,
    permits: Arc<Semaphore>,
    mut ctrl: mpsc::UnboundedReceiver<Packet>,
    written: Arc<AtomicUsize>,
) -> Option<String> {
    let topic = format!("probe/c{case}");
    let mut out = BytesMut::with_capacity(128 * 1024);
    let mut next = 0usize;
    let encode = |out: &mut BytesMut, i: usize| {
        let mut p = v4::Publish::new(topic.clone(), qos, payload(case, i));
        p.pkid = (i + 1) as u16;
        p.write(out).expect("encode");
    };
    loop {
        let mut closed = false;
        loop {
            match ctrl.try_recv() {
                Ok(p) => {
                    p.write(&mut out, MAX_PACKET).expect("encode");
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        while !closed && next < n && out.len() < 64 * 1024 {
            match permits.try_acquire() {
                Ok(p) => {
                    p.forget();
                    encode(&mut out, next);
                    next += 1;
                }
                Err(_) => break,
            }
        }
        if !out.is_empty() {
            if let Err(e) = wr.write_all(&out).await {
                return Some(e.to_string());
            }
            out.clear();
            written.store(next, Ordering::SeqCst);
            continue;
        }
        if closed {
            return None;
        }
        tokio::select! {
            p = ctrl.recv() => match p {
                Some(p) => { p.write(&mut out, MAX_PACKET).expect("encode"); }
                None => return None,
            },
            Ok(p) = permits.acquire(), if next < n => {
                p.forget();
                encode(&mut out, next);
                next += 1;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The brokers, started as tests/support starts them.

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Mosquitto,
    Nats,
    RabbitMq,
}

struct Broker {
    kind: Kind,
    name: &'static str,
    version: String,
    port: u16,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// RabbitMQ: the node's name, found in the environment of all its processes.
    node: Option<String>,
}

impl Broker {
    async fn start(name: &str) -> Result<Broker, String> {
        let base = base_dir();
        match name {
            "mosquitto" => start_mosquitto(base.join("mosquitto")).await,
            "nats" => start_nats(base.join("nats")).await,
            "rabbitmq" => start_rabbitmq(base.join("rabbitmq")).await,
            other => Err(format!(
                "unknown broker {other:?} (mosquitto, nats, rabbitmq)"
            )),
        }
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    fn log_since(&self, from: u64) -> String {
        let all = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(all.get(from as usize..).unwrap_or_default()).into_owned()
    }

    /// Log lines other than the usual connect / subscribe / disconnect chatter.
    fn unusual(&self, log: &str) -> Vec<String> {
        let usual: &[&str] = match self.kind {
            Kind::Mosquitto => &[
                "New connection from",
                "New client connected",
                "disconnected.",
                // The readiness probe's bare TCP connect.
                "Client <unknown> closed its connection.",
            ],
            Kind::Nats => &["Creating MQTT streams/consumers"],
            Kind::RabbitMq => &[
                "accepting MQTT connection",
                "MQTT vhost picked",
                "MQTT connection with client id",
                "closing MQTT connection",
                "connection_closed",
                "[debug]",
                "AMQP 0-9-1 client call timeout was",
            ],
        };
        log.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !usual.iter().any(|u| l.contains(u)))
            .map(String::from)
            .collect()
    }

    async fn stop(mut self) {
        if let Some(child) = self.child.as_mut() {
            signal(child.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if let Some(node) = &self.node {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !node_processes(node).is_empty() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Drop kills whatever is left.
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.kind == Kind::RabbitMq {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", child.id())])
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(node) = &self.node {
            for _ in 0..100 {
                let left = node_processes(node);
                if left.is_empty() {
                    break;
                }
                for pid in left {
                    signal(pid, "KILL");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if std::env::var_os("INFLIGHT_PROBE_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("kept {}", self.dir.display());
        }
    }
}

async fn start_mosquitto(dir: PathBuf) -> Result<Broker, String> {
    let bin = "/usr/sbin/mosquitto";
    if !Path::new(bin).exists() {
        return Err(format!("{bin} is not installed"));
    }
    let version = command_line(bin, &["-h"]);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let port = free_port();
    let log = dir.join("mosquitto.log");
    // Defaults but for where it logs (and as whom, when run as root).
    let mut conf = format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\nlog_dest file {}\n\
         log_type error\nlog_type warning\nlog_type notice\nlog_type information\n",
        log.display()
    );
    if running_as_root() {
        conf.push_str("user root\n");
    }
    let conf_path = dir.join("mosquitto.conf");
    std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
    let out = std::fs::File::create(dir.join("mosquitto.out")).map_err(|e| e.to_string())?;
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(out)
        .spawn()
        .map_err(|e| format!("cannot run {bin}: {e}"))?;
    let mut b = Broker {
        kind: Kind::Mosquitto,
        name: "mosquitto",
        version,
        port,
        dir,
        log,
        child: Some(child),
        node: None,
    };
    wait_listening(&mut b, Duration::from_secs(10), |_| true).await?;
    Ok(b)
}

async fn start_nats(dir: PathBuf) -> Result<Broker, String> {
    let bin = "/usr/sbin/nats-server";
    if !Path::new(bin).exists() {
        return Err(format!("{bin} is not installed"));
    }
    let version = command_line(bin, &["--version"]);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (client, mqtt) = (free_port(), free_port());
    let conf = format!(
        "listen: 127.0.0.1:{client}\nserver_name: p{client}\n\
         jetstream {{ store_dir: \"{}\" }}\n\
         mqtt {{ listen: 127.0.0.1:{mqtt} }}\n",
        dir.join("js").display()
    );
    let conf_path = dir.join("nats.conf");
    std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
    let log = dir.join("nats.out");
    let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(out)
        .spawn()
        .map_err(|e| format!("cannot run {bin}: {e}"))?;
    let mut b = Broker {
        kind: Kind::Nats,
        name: "NATS",
        version,
        port: mqtt,
        dir,
        log,
        child: Some(child),
        node: None,
    };
    wait_listening(&mut b, Duration::from_secs(20), |_| true).await?;
    Ok(b)
}

/// As tests/support/rabbitmq.rs: a node of our own (unique name, free loopback ports, all files in
/// our directory, `RABBITMQ_CONF_ENV_FILE` empty so the system node's env file does not apply);
/// only the `rabbitmq_mqtt` plugin, since no WebSocket is needed here.
async fn start_rabbitmq(dir: PathBuf) -> Result<Broker, String> {
    let script = PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server");
    let server = std::fs::canonicalize(&script)
        .map_err(|e| format!("{} is not installed: {e}", script.display()))?;
    // <home>/sbin/rabbitmq-server: <home> is rabbitmq_server-<version>.
    let version = server
        .parent()
        .and_then(Path::parent)
        .and_then(|h| h.file_name())
        .map(|h| h.to_string_lossy().replace("rabbitmq_server-", "RabbitMQ "))
        .unwrap_or_else(|| "RabbitMQ (version unknown)".into());
    for sub in ["mnesia", "log", "home"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| e.to_string())?;
    }
    let node = format!("inflightprobe-{}@localhost", std::process::id());
    let (amqp, dist, mqtt) = (free_port(), free_port(), free_port());
    let d = |sub: &str| dir.join(sub);
    std::fs::write(d("enabled_plugins"), "[rabbitmq_mqtt].\n").map_err(|e| e.to_string())?;
    std::fs::write(d("rabbitmq-env.conf"), "").map_err(|e| e.to_string())?;
    std::fs::write(
        d("rabbitmq.conf"),
        format!(
            "listeners.tcp.default = 127.0.0.1:{amqp}\n\
             mqtt.listeners.tcp.default = 127.0.0.1:{mqtt}\n\
             mqtt.allow_anonymous = true\n\
             mqtt.default_user = guest\n\
             mqtt.default_pass = guest\n\
             mqtt.vhost = /\n\
             mqtt.exchange = amq.topic\n\
             log.file.level = info\n\
             log.console = false\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let out = std::fs::File::create(d("rabbitmq.out")).map_err(|e| e.to_string())?;
    let child = Command::new(&server)
        .current_dir(&dir)
        .env("HOME", d("home"))
        .env("RABBITMQ_NODENAME", &node)
        .env("RABBITMQ_USE_LONGNAME", "false")
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", amqp.to_string())
        .env("RABBITMQ_DIST_PORT", dist.to_string())
        .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
        .env("RABBITMQ_LOG_BASE", d("log"))
        .env("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf"))
        .env("RABBITMQ_ADVANCED_CONFIG_FILE", d("advanced.config"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
        .env("RABBITMQ_CONF_ENV_FILE", d("rabbitmq-env.conf"))
        .env("RABBITMQ_PID_FILE", d("rabbitmq.pid"))
        .env(
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
            "-kernel inet_dist_use_interface {127,0,0,1}",
        )
        .env("ERL_EPMD_ADDRESS", "127.0.0.1")
        .env("ERL_CRASH_DUMP", d("erl_crash.dump"))
        .env_remove("ERL_FLAGS")
        .env_remove("RABBITMQ_ENV_LOADED")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(out)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", server.display()))?;
    let log = dir.join("log").join(format!("{node}.log"));
    let mut b = Broker {
        kind: Kind::RabbitMq,
        name: "RabbitMQ",
        version,
        port: mqtt,
        dir,
        log,
        child: Some(child),
        node: Some(node),
    };
    wait_listening(&mut b, Duration::from_secs(180), |b| {
        std::fs::read_to_string(&b.log).is_ok_and(|l| l.contains("Server startup complete"))
    })
    .await?;
    Ok(b)
}

async fn wait_listening(
    b: &mut Broker,
    timeout: Duration,
    ready: impl Fn(&Broker) -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(Ok(Some(status))) = b.child.as_mut().map(Child::try_wait) {
            b.child = None;
            let out = std::fs::read_dir(&b.dir)
                .map(|_| b.log_since(0))
                .unwrap_or_default();
            return Err(format!("{} exited: {status}\n{out}", b.name));
        }
        if TcpStream::connect(("127.0.0.1", b.port)).await.is_ok() && ready(b) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("{} not ready after {timeout:?}", b.name));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn command_line(bin: &str, args: &[&str]) -> String {
    Command::new(bin)
        .args(args)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// A port of 127.0.0.1 that was free a moment ago, below Linux's ephemeral range.
fn free_port() -> u16 {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().wrapping_mul(7919);
    for k in 0..12_000u32 {
        let port = (20_000 + seed.wrapping_add(k.wrapping_mul(7)) % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000");
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The pids whose environment names `node` (`ps e`), except epmd, which nodes share.
fn node_processes(node: &str) -> Vec<u32> {
    let Ok(out) = Command::new("ps")
        .args(["-e", "e", "-ww", "-o", "pid=", "-o", "args="])
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    let needle = format!("RABBITMQ_NODENAME={node}");
    let me = std::process::id();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let (pid, args) = line.trim_start().split_once(' ')?;
            let pid: u32 = pid.parse().ok()?;
            let named = args.split(' ').any(|w| w == needle);
            let epmd = args
                .split(' ')
                .next()
                .is_some_and(|c| c.ends_with("/epmd") || c == "epmd");
            (named && !epmd && pid != me).then_some(pid)
        })
        .collect()
}
