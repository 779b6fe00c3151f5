//! The load: one publisher and one subscriber connection, each a single task on raw sockets in a
//! thread of its own (a current-thread runtime: no work stealing, no cross-thread wake-ups).
//!
//! The publisher keeps at most `window` QoS 1/2 messages unacknowledged by the first broker (a
//! QoS 2 message counts until its PUBCOMP), exactly what the brokers' `max_inflight_messages`
//! allow. QoS 0 has no acks, so there the window is end to end: at most `window` messages sent and
//! not yet received by the subscriber, which measures the rate the path sustains without loss
//! instead of how fast the brokers can discard.
//!
//! Coalescing: mosquitto writes one packet per syscall, so a reader that is faster than the broker
//! wakes up once per packet and answers with one tiny write per ack, spending as much CPU as the
//! broker. After a read that brought little, each side naps `nap` (default 500 µs, far below what
//! the windows allow at these rates) so that packets accumulate and acks go out in batches.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::Notify,
};

use super::wire::{
    self, MEASURE_TOPIC, PROBE_TOPIC, PUBACK, PUBCOMP, PUBREC, PUBREL, Packet, Session,
};

/// What publisher, subscriber and the orchestrator share: the clock, the subscriber's progress
/// (the QoS 0 credit), the probe flag and the stop signal.
pub struct Shared {
    base: Instant,
    received: AtomicU64,
    progress: Notify,
    probe_seen: AtomicBool,
    measuring: AtomicBool,
    stop: AtomicBool,
    /// When the publisher began (ns since `base`), 0 before.
    publish_start_ns: AtomicU64,
}

impl Shared {
    pub fn new() -> Arc<Shared> {
        Arc::new(Shared {
            base: Instant::now(),
            received: AtomicU64::new(0),
            progress: Notify::new(),
            probe_seen: AtomicBool::new(false),
            measuring: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            publish_start_ns: AtomicU64::new(0),
        })
    }

    pub fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    pub fn probe_seen(&self) -> bool {
        self.probe_seen.load(Relaxed)
    }

    /// Starts the subscriber's idle clock: from now on a pause without progress ends the run.
    pub fn start_measuring(&self) {
        self.measuring.store(true, Relaxed);
    }

    /// Tells the publisher to close (and to give up if it has not finished).
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
    }

    pub fn publish_start_ns(&self) -> u64 {
        self.publish_start_ns.load(Relaxed)
    }
}

#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub qos: u8,
    pub count: u64,
    pub payload: usize,
    pub window: u64,
    /// The subscriber gives up after this long without a new message.
    pub idle_timeout: Duration,
    /// Pause after a read that brought less than `NAP_BELOW` bytes (zero: never).
    pub nap: Duration,
    /// Publish at most this many messages per second (`None`: as fast as the window allows).
    pub rate: Option<u64>,
    /// With `rate`: rise to it linearly over this long (traffic that grows, not a step).
    pub ramp: Option<Duration>,
}

/// The publisher's side of a run.
pub struct Published {
    /// When the last message was written (QoS 0) or acknowledged (QoS 1/2); `None` if the run
    /// was stopped before.
    pub done_ns: Option<u64>,
}

/// The subscriber's side of a run.
pub struct Received {
    pub distinct: u64,
    pub duplicates: u64,
    pub last_ns: u64,
    /// End-to-end latency of each first delivery, in µs.
    pub latencies_us: Vec<u32>,
}

/// Free packet ids, handed out in turn (acks come back in order; a slow one is skipped).
struct PacketIds {
    in_use: Vec<bool>,
    next: u16,
}

impl PacketIds {
    fn new() -> Self {
        PacketIds {
            in_use: vec![false; 65536],
            next: 1,
        }
    }

    fn take(&mut self) -> u16 {
        loop {
            let id = self.next;
            self.next = if id == u16::MAX { 1 } else { id + 1 };
            if !self.in_use[id as usize] {
                self.in_use[id as usize] = true;
                return id;
            }
        }
    }

    /// True if `id` was in use.
    fn free(&mut self, id: u16) -> bool {
        std::mem::replace(&mut self.in_use[id as usize], false)
    }
}

/// Bytes of PUBLISH packets prepared ahead of the socket (timestamps are taken when prepared).
const WRITE_BATCH: usize = 64 * 1024;
/// A read of fewer bytes than this is followed by a nap (see the module's comment).
const NAP_BELOW: usize = 4 * 1024;
/// A QoS 0 run whose subscriber makes no progress for this long writes its credit off as lost.
const QOS0_STALL: Duration = Duration::from_secs(1);
/// How often a waiting publisher looks at the stop signal.
const TICK: Duration = Duration::from_millis(50);

/// Runs `work` on a current-thread runtime in a thread of its own.
fn on_own_thread<T, F>(
    name: &str,
    work: impl FnOnce() -> F + Send + 'static,
) -> io::Result<JoinHandle<io::Result<T>>>
where
    T: Send + 'static,
    F: std::future::Future<Output = io::Result<T>>,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(work())
        })
}

/// Joins a load thread.
pub fn join<T>(handle: JoinHandle<io::Result<T>>) -> io::Result<T> {
    handle
        .join()
        .map_err(|_| io::Error::other("a load thread panicked"))?
}

/// Starts the publisher; it connects at once and publishes `spec.count` messages.
pub fn spawn_publisher(
    addr: SocketAddr,
    spec: LoadSpec,
    shared: Arc<Shared>,
) -> io::Result<JoinHandle<io::Result<Published>>> {
    on_own_thread("bench-pub", move || publish(addr, spec, shared))
}

enum Step {
    Wrote(usize),
    Read(usize),
    Waited,
}

async fn publish(addr: SocketAddr, spec: LoadSpec, shared: Arc<Shared>) -> io::Result<Published> {
    let session = Session::connect(addr, "bench-pub").await?;
    let (mut rd, mut wr) = session.stream.into_split();
    let mut rbuf = session.rbuf;
    let mut wbuf = BytesMut::with_capacity(WRITE_BATCH + spec.payload + 64);
    let mut ids = PacketIds::new();
    let mut next = 0u64;
    let mut inflight = 0u64;
    // QoS 0: credit written off after a stall (the subscriber's count will show the loss).
    let mut written_off = 0u64;
    let mut last_received = (0u64, Instant::now());
    shared.publish_start_ns.store(shared.now_ns(), Relaxed);
    let mut done_ns = None;
    let started = Instant::now();
    while !shared.stop.load(Relaxed) {
        let now_ns = shared.now_ns();
        // `--rate`: what the clock allows so far (a steady stream, not a burst).
        let allowed = spec.rate.map_or(u64::MAX, |r| {
            let t = started.elapsed().as_secs_f64();
            let r = r as f64;
            // The area under the rate: a triangle while ramping, then the steady part.
            let sent = match spec.ramp.map(|d| d.as_secs_f64()).filter(|d| *d > 0.0) {
                Some(ramp) if t < ramp => r * t * t / (2.0 * ramp),
                Some(ramp) => r * (t - ramp / 2.0),
                None => r * t,
            };
            sent as u64 + 1
        });
        while next < spec.count && next < allowed && wbuf.len() < WRITE_BATCH {
            let pkid = if spec.qos == 0 {
                let outstanding = next - shared.received.load(Relaxed) - written_off;
                if outstanding >= spec.window {
                    break;
                }
                0
            } else {
                if inflight >= spec.window {
                    break;
                }
                inflight += 1;
                ids.take()
            };
            wire::put_publish(
                &mut wbuf,
                MEASURE_TOPIC,
                spec.qos,
                pkid,
                next,
                now_ns,
                spec.payload,
            );
            next += 1;
        }
        if next == spec.count && inflight == 0 && wbuf.is_empty() {
            wr.flush().await?;
            done_ns = Some(shared.now_ns());
            break;
        }
        let step = if !wbuf.is_empty() {
            tokio::select! {
                n = rd.read_buf(&mut rbuf), if spec.qos > 0 => Step::Read(n?),
                n = wr.write(&wbuf) => Step::Wrote(n?),
                _ = tokio::time::sleep(TICK) => Step::Waited,
            }
        } else if spec.qos > 0 {
            match tokio::time::timeout(TICK, rd.read_buf(&mut rbuf)).await {
                Ok(n) => Step::Read(n?),
                Err(_) => Step::Waited,
            }
        } else {
            let _ = tokio::time::timeout(TICK, shared.progress.notified()).await;
            let received = shared.received.load(Relaxed);
            if received != last_received.0 {
                last_received = (received, Instant::now());
            } else if last_received.1.elapsed() > QOS0_STALL {
                written_off = next - received;
            }
            Step::Waited
        };
        match step {
            Step::Wrote(n) => wbuf.advance(n),
            Step::Read(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Step::Read(n) => {
                let mut at = 0;
                while let Some((packet, len)) = wire::scan(&rbuf[at..])? {
                    at += len;
                    match packet {
                        Packet::Ack { kind: PUBACK, pkid } if spec.qos == 1 && ids.free(pkid) => {
                            inflight -= 1;
                        }
                        Packet::Ack { kind: PUBREC, pkid } if spec.qos == 2 => {
                            wire::put_ack(&mut wbuf, PUBREL, pkid);
                        }
                        Packet::Ack {
                            kind: PUBCOMP,
                            pkid,
                        } if spec.qos == 2 && ids.free(pkid) => {
                            inflight -= 1;
                        }
                        _ => {}
                    }
                }
                rbuf.advance(at);
                if n < NAP_BELOW && !spec.nap.is_zero() {
                    std::thread::sleep(spec.nap);
                }
            }
            Step::Waited => {}
        }
    }
    // The socket stays open until the subscriber is done: closing it early could reset
    // publishes still in the broker's receive buffer.
    while !shared.stop.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(Published { done_ns })
}

/// Starts the subscriber and returns once it is subscribed to `FILTER` at `spec.qos`; the thread
/// then counts (and acknowledges) until every message arrived or `idle_timeout` passed without one.
pub fn spawn_subscriber(
    addr: SocketAddr,
    spec: LoadSpec,
    shared: Arc<Shared>,
) -> io::Result<JoinHandle<io::Result<Received>>> {
    let (subscribed_tx, subscribed) = mpsc::channel();
    let handle = on_own_thread("bench-sub", move || async move {
        let setup = async {
            let mut session = Session::connect(addr, "bench-sub").await?;
            session.subscribe(wire::FILTER, spec.qos).await?;
            io::Result::Ok(session)
        };
        match setup.await {
            Ok(session) => {
                let _ = subscribed_tx.send(Ok(()));
                count_deliveries(session, spec, shared).await
            }
            Err(e) => {
                let _ = subscribed_tx.send(Err(e));
                Err(io::Error::other("not subscribed"))
            }
        }
    })?;
    match subscribed.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(join(handle)
            .err()
            .unwrap_or_else(|| io::Error::other("subscriber gone"))),
    }
}

async fn count_deliveries(
    session: Session,
    spec: LoadSpec,
    shared: Arc<Shared>,
) -> io::Result<Received> {
    let Session {
        mut stream,
        mut rbuf,
    } = session;
    let mut seen = vec![false; spec.count as usize];
    let mut got = Received {
        distinct: 0,
        duplicates: 0,
        last_ns: 0,
        latencies_us: Vec::with_capacity(spec.count as usize),
    };
    let mut acks = BytesMut::with_capacity(64 * 1024);
    let mut idle_since = Instant::now();
    let tick = Duration::from_millis(100).min(spec.idle_timeout);
    while got.distinct < spec.count {
        let n = match tokio::time::timeout(tick, stream.read_buf(&mut rbuf)).await {
            Ok(n) => n?,
            Err(_) => {
                if shared.stop.load(Relaxed) {
                    break;
                }
                if !shared.measuring.load(Relaxed) {
                    idle_since = Instant::now();
                } else if idle_since.elapsed() >= spec.idle_timeout {
                    break;
                }
                continue;
            }
        };
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let now_ns = shared.now_ns();
        let before = got.distinct;
        let mut at = 0;
        while let Some((packet, len)) = wire::scan(&rbuf[at..])? {
            at += len;
            match packet {
                Packet::Publish {
                    qos,
                    pkid,
                    topic,
                    payload,
                } => {
                    match qos {
                        1 => wire::put_ack(&mut acks, PUBACK, pkid),
                        2 => wire::put_ack(&mut acks, PUBREC, pkid),
                        _ => {}
                    }
                    if topic == PROBE_TOPIC {
                        shared.probe_seen.store(true, Relaxed);
                    } else if topic == MEASURE_TOPIC
                        && let Some((id, sent_ns)) = wire::read_header(payload)
                        && let Some(slot) = seen.get_mut(id as usize)
                    {
                        if std::mem::replace(slot, true) {
                            got.duplicates += 1;
                        } else {
                            got.distinct += 1;
                            got.last_ns = now_ns;
                            let us = now_ns.saturating_sub(sent_ns) / 1000;
                            got.latencies_us.push(us.min(u32::MAX as u64) as u32);
                        }
                    }
                }
                Packet::Ack { kind: PUBREL, pkid } => wire::put_ack(&mut acks, PUBCOMP, pkid),
                _ => {}
            }
        }
        rbuf.advance(at);
        if !acks.is_empty() {
            stream.write_all(&acks).await?;
            acks.clear();
        }
        if got.distinct != before {
            idle_since = Instant::now();
            shared.received.store(got.distinct, Relaxed);
            shared.progress.notify_one();
        }
        if n < NAP_BELOW && !spec.nap.is_zero() {
            std::thread::sleep(spec.nap);
        }
    }
    Ok(got)
}

/// Publishes QoS 0 probes on `addr` until the subscriber saw one or `timeout` passed.
pub async fn probe(addr: SocketAddr, shared: &Shared, timeout: Duration) -> io::Result<()> {
    let mut session = Session::connect(addr, "bench-probe").await?;
    let deadline = Instant::now() + timeout;
    let mut buf = BytesMut::new();
    while !shared.probe_seen() {
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no probe crossed the path within {timeout:?}"),
            ));
        }
        buf.clear();
        wire::put_publish(&mut buf, PROBE_TOPIC, 0, 0, u64::MAX, 0, wire::HEADER_LEN);
        session.stream.write_all(&buf).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
