//! A fault-injecting TCP proxy for chaos tests: listens on a free port of 127.0.0.1 and forwards
//! every connection to a target port, until told to misbehave. It can cut every current
//! connection (an abrupt reset, as a network fault), stall (nothing forwarded either way, the
//! sockets stay open) for a while, slow every chunk down, cap each connection's byte rate (a slow
//! link), refuse new connections, and cut at random moments driven by a seeded RNG, so a failing
//! run can be replayed with its seed.
//!
//! Point a bridge at it with `RouteConfig::src_url`/`dst_url` = `Some(proxy.url())`.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const CHUNK: usize = 16 * 1024;

/// The benchmark's long link: the same delayed copy (`Proxy::latency`).
#[allow(dead_code)] // its `Link` is the benchmark's
#[path = "../../examples/bench/harness/delay.rs"]
mod link;
use link::delayed;

/// State shared by the handle, the accept loop and every forwarded connection.
struct Shared {
    target_port: u16,
    /// Forwarding waits while `Some(t)` with `t` in the future: both ways, and one way only.
    stalled_until: watch::Sender<Option<Instant>>,
    up_stalled_until: watch::Sender<Option<Instant>>,
    down_stalled_until: watch::Sender<Option<Instant>>,
    /// Delay before each chunk is forwarded.
    delay: Mutex<Duration>,
    /// One-way latency of connections opened from now on: each chunk is forwarded this long
    /// after it was read, in order, without holding back the chunks behind it (a long link,
    /// unlike `delay`, which serialises).
    latency: Mutex<Duration>,
    /// Bytes per second each connection may forward client → target and target → client; 0 for
    /// no limit (see [`Proxy::throttle`]).
    up_rate: AtomicU64,
    down_rate: AtomicU64,
    /// New connections are accepted and closed at once (a broker that is "down").
    refusing: AtomicBool,
    /// Live connections, by number: dropping the sender cuts the connection.
    live: Mutex<HashMap<u64, watch::Sender<()>>>,
    next_id: AtomicU64,
    accepted: AtomicU64,
    cuts: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    /// When recording, every MQTT packet seen, both ways (see [`Proxy::record`]).
    recording: AtomicBool,
    tape: Mutex<Vec<Tapped>>,
}

/// One MQTT packet that crossed the proxy while recording.
#[derive(Clone, Debug)]
pub struct Tapped {
    /// Connection number (in accept order).
    pub conn: u64,
    /// True from the client (the bridge) to the target (the broker).
    pub up: bool,
    /// The packet type: 3 PUBLISH, 4 PUBACK, 5 PUBREC, 6 PUBREL, 7 PUBCOMP, …
    pub kind: u8,
    /// The first byte's flags (PUBLISH: DUP 8, QoS 2/4, RETAIN 1).
    pub flags: u8,
    /// Packet id of acks and QoS 1/2 publishes (0 if none).
    pub pkid: u16,
    /// The last bytes of the packet (a PUBLISH's payload, when short).
    pub tail: Vec<u8>,
    pub at: Instant,
}

/// A running proxy. Dropping it stops accepting and cuts every connection.
pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `127.0.0.1:target_port`.
    pub async fn start(target_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the chaos proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            target_port,
            stalled_until: watch::channel(None).0,
            up_stalled_until: watch::channel(None).0,
            down_stalled_until: watch::channel(None).0,
            delay: Mutex::new(Duration::ZERO),
            latency: Mutex::new(Duration::ZERO),
            up_rate: AtomicU64::new(0),
            down_rate: AtomicU64::new(0),
            refusing: AtomicBool::new(false),
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            recording: AtomicBool::new(false),
            tape: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Proxy { port, shared, task }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:PORT`, for a bridge config's `url`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Resets every current connection (both ends see a connection reset); new connections are
    /// forwarded as before. Returns how many were cut.
    pub fn cut(&self) -> usize {
        let cut: Vec<_> = self.shared.live.lock().unwrap().drain().collect();
        self.shared
            .cuts
            .fetch_add(cut.len() as u64, Ordering::Relaxed);
        // Dropping each sender wakes its connection, which resets both sockets.
        cut.len()
    }

    /// Stops forwarding in both directions on every connection (current and new) for `d`,
    /// starting now; the sockets stay open, so the peers see silence, not a close. Returns at
    /// once: see [`Proxy::stall_for`] to wait it out.
    pub fn stall(&self, d: Duration) {
        self.shared
            .stalled_until
            .send_replace(Some(Instant::now() + d));
    }

    /// [`Proxy::stall`], then waits until the stall is over.
    pub async fn stall_for(&self, d: Duration) {
        self.stall(d);
        tokio::time::sleep(d).await;
    }

    /// Ends every stall early.
    pub fn unstall(&self) {
        self.shared.stalled_until.send_replace(None);
        self.shared.up_stalled_until.send_replace(None);
        self.shared.down_stalled_until.send_replace(None);
    }

    /// As [`Proxy::stall`], in one direction only: `up` is client → target (e.g. the bridge's
    /// publishes), down is target → client (e.g. the broker's acks).
    pub fn stall_one_way(&self, up: bool, d: Duration) {
        let until = Some(Instant::now() + d);
        if up {
            self.shared.up_stalled_until.send_replace(until);
        } else {
            self.shared.down_stalled_until.send_replace(until);
        }
    }

    /// A long link: every byte of connections opened from now on arrives `one_way` after it
    /// was sent, in each direction, bytes behind it not held back (round trip 2 × `one_way`).
    pub fn latency(&self, one_way: Duration) {
        *self.shared.latency.lock().unwrap() = one_way;
    }

    /// Delays each forwarded chunk (in either direction) by `per_chunk`; zero for full speed.
    pub fn slow(&self, per_chunk: Duration) {
        *self.shared.delay.lock().unwrap() = per_chunk;
    }

    /// Caps every connection (current and new), each direction on its own, at `bytes_per_sec`;
    /// `None` forwards at full speed again (the default). See [`Proxy::throttle_one_way`].
    pub fn throttle(&self, bytes_per_sec: Option<u64>) {
        self.throttle_one_way(true, bytes_per_sec);
        self.throttle_one_way(false, bytes_per_sec);
    }

    /// As [`Proxy::throttle`], in one direction only: `up` is client → target (e.g. the bridge's
    /// publishes), down is target → client. Each chunk read is held until the connection's
    /// direction has paid for it at the rate (a slow link: the chunk arrives after its
    /// transmission time), and reads are cut to 50 ms worth so the flow stays smooth; idle time
    /// earns no credit, so there are no bursts above the rate.
    pub fn throttle_one_way(&self, up: bool, bytes_per_sec: Option<u64>) {
        let rate = if up {
            &self.shared.up_rate
        } else {
            &self.shared.down_rate
        };
        rate.store(bytes_per_sec.unwrap_or(0), Ordering::SeqCst);
    }

    /// While true, new connections are closed as soon as they are accepted (current ones stay).
    pub fn refuse(&self, refusing: bool) {
        self.shared.refusing.store(refusing, Ordering::SeqCst);
    }

    /// Connections currently forwarded.
    pub fn connections(&self) -> usize {
        self.shared.live.lock().unwrap().len()
    }

    /// Connections accepted so far (refused ones included).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::Relaxed)
    }

    /// Bytes forwarded client → target and target → client.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.shared.bytes_up.load(Ordering::Relaxed),
            self.shared.bytes_down.load(Ordering::Relaxed),
        )
    }

    /// Records every MQTT packet of connections opened from now on (framing only: type, flags,
    /// packet id, the packet's last bytes), for working out where a message was lost or
    /// duplicated. See [`Proxy::tape`].
    pub fn record(&self, on: bool) {
        self.shared.recording.store(on, Ordering::SeqCst);
    }

    /// What was recorded so far, in order of arrival at the proxy.
    pub fn tape(&self) -> Vec<Tapped> {
        self.shared.tape.lock().unwrap().clone()
    }

    /// Cuts every connection at random moments, `gap` apart (uniform in the range), drawn from
    /// an RNG seeded with `seed`: the same seed gives the same gaps. Runs until the returned
    /// handle is stopped or dropped.
    pub fn cut_randomly(&self, seed: u64, gap: Range<Duration>) -> RandomCuts {
        let shared = self.shared.clone();
        let done = Arc::new(AtomicU64::new(0));
        let counter = done.clone();
        let task = tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            loop {
                tokio::time::sleep(random_duration(&mut rng, &gap)).await;
                let cut: Vec<_> = shared.live.lock().unwrap().drain().collect();
                shared.cuts.fetch_add(cut.len() as u64, Ordering::Relaxed);
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        RandomCuts { task, done }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.shared.live.lock().unwrap().clear();
    }
}

/// Random cuts in progress (see [`Proxy::cut_randomly`]); they stop when this is dropped.
pub struct RandomCuts {
    task: JoinHandle<()>,
    done: Arc<AtomicU64>,
}

impl RandomCuts {
    /// Cut rounds so far (a round cuts every live connection, possibly none).
    pub fn rounds(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Stops cutting; returns the rounds done.
    pub fn stop(self) -> u64 {
        self.rounds()
    }
}

impl Drop for RandomCuts {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A duration drawn uniformly from `range` (its start when the range is empty).
pub fn random_duration(rng: &mut StdRng, range: &Range<Duration>) -> Duration {
    let (lo, hi) = (range.start.as_micros() as u64, range.end.as_micros() as u64);
    if hi <= lo {
        return range.start;
    }
    Duration::from_micros(rng.random_range(lo..hi))
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        if shared.refusing.load(Ordering::SeqCst) {
            reset(&client);
            continue;
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (cut_tx, cut_rx) = watch::channel(());
        shared.live.lock().unwrap().insert(id, cut_tx);
        let shared = shared.clone();
        tokio::spawn(async move {
            forward(client, id, &shared, cut_rx).await;
            shared.live.lock().unwrap().remove(&id);
        });
    }
}

/// Forwards one connection until either side closes or the proxy cuts it.
async fn forward(mut client: TcpStream, id: u64, shared: &Shared, mut cut: watch::Receiver<()>) {
    let _ = client.set_nodelay(true);
    let connect = TcpStream::connect(("127.0.0.1", shared.target_port));
    let mut server = tokio::select! {
        s = connect => match s {
            Ok(s) => s,
            // The target is down: the client sees its connection closed, as with a dead broker.
            Err(_) => return reset(&client),
        },
        _ = cut.changed() => return reset(&client),
    };
    let _ = server.set_nodelay(true);
    let cut_off = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let recording = shared.recording.load(Ordering::SeqCst);
        let tap = |up| recording.then(|| Tap::new(id, up));
        let latency = *shared.latency.lock().unwrap();
        if !latency.is_zero() {
            let up = delayed(&mut cr, &mut sw, latency);
            let down = delayed(&mut sr, &mut cw, latency);
            tokio::select! {
                _ = up => {}
                _ = down => {}
                _ = cut.changed() => {}
            }
            return reset(&client);
        }
        let up = pump(&mut cr, &mut sw, shared, true, tap(true));
        let down = pump(&mut sr, &mut cw, shared, false, tap(false));
        tokio::select! {
            _ = up => false,
            _ = down => false,
            // An error means the sender was dropped: that is the cut.
            _ = cut.changed() => true,
        }
    };
    if cut_off {
        reset(&client);
        reset(&server);
    }
    // Otherwise one side closed: dropping both closes the other side gracefully (FIN), after
    // whatever was already forwarded.
}

/// Copies `from` → `to` chunk by chunk, honouring stalls, delays and the throttle. Returns at EOF
/// or error.
async fn pump<R, W>(from: &mut R, to: &mut W, shared: &Shared, up: bool, mut tap: Option<Tap>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (counter, one_way, rate) = if up {
        (&shared.bytes_up, &shared.up_stalled_until, &shared.up_rate)
    } else {
        (
            &shared.bytes_down,
            &shared.down_stalled_until,
            &shared.down_rate,
        )
    };
    let mut stall = shared.stalled_until.subscribe();
    let mut stall_one_way = one_way.subscribe();
    let mut buf = vec![0u8; CHUNK];
    // Throttled: when the bytes forwarded so far are paid for at the rate.
    let mut paid_until = Instant::now();
    loop {
        wait_while_stalled(&mut stall).await;
        wait_while_stalled(&mut stall_one_way).await;
        let max = match rate.load(Ordering::SeqCst) {
            0 => CHUNK,
            r => (r / 20).clamp(1, CHUNK as u64) as usize,
        };
        let n = match from.read(&mut buf[..max]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Read again: the throttle may have changed while the read waited.
        let bytes_per_sec = rate.load(Ordering::SeqCst);
        if bytes_per_sec > 0 {
            let cost = Duration::from_secs_f64(n as f64 / bytes_per_sec as f64);
            paid_until = paid_until.max(Instant::now()) + cost;
            tokio::time::sleep_until(paid_until).await;
        }
        let delay = *shared.delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // A stall that began while this chunk was read holds it too.
        wait_while_stalled(&mut stall).await;
        wait_while_stalled(&mut stall_one_way).await;
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(tap) = tap.as_mut() {
            tap.feed(&buf[..n], &shared.tape);
        }
    }
}

/// Splits one direction's bytes into MQTT packets for the tape.
struct Tap {
    conn: u64,
    up: bool,
    pending: Vec<u8>,
}

impl Tap {
    fn new(conn: u64, up: bool) -> Tap {
        Tap {
            conn,
            up,
            pending: Vec::new(),
        }
    }

    fn feed(&mut self, bytes: &[u8], tape: &Mutex<Vec<Tapped>>) {
        self.pending.extend_from_slice(bytes);
        loop {
            // Fixed header: type and flags, then the remaining length (1-4 bytes, 7 bits each).
            let (mut len, mut shift, mut i) = (0usize, 0, 1);
            let complete = loop {
                let Some(&b) = self.pending.get(i) else {
                    break false;
                };
                len |= usize::from(b & 0x7f) << shift;
                shift += 7;
                i += 1;
                if b & 0x80 == 0 || i > 4 {
                    break true;
                }
            };
            if !complete || self.pending.len() < i + len {
                return;
            }
            let packet: Vec<u8> = self.pending.drain(..i + len).collect();
            let body = &packet[i..];
            let (kind, flags) = (packet[0] >> 4, packet[0] & 0x0f);
            let u16_at = |at: usize| {
                body.get(at..at + 2)
                    .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]))
            };
            let pkid = match kind {
                3 if flags & 0x06 != 0 => u16_at(2 + usize::from(u16_at(0))),
                4..=7 => u16_at(0),
                _ => 0,
            };
            tape.lock().unwrap().push(Tapped {
                conn: self.conn,
                up: self.up,
                kind,
                flags,
                pkid,
                tail: body[body.len().saturating_sub(24)..].to_vec(),
                at: Instant::now(),
            });
        }
    }
}

async fn wait_while_stalled(stall: &mut watch::Receiver<Option<Instant>>) {
    loop {
        let until = *stall.borrow_and_update();
        match until {
            Some(t) if t > Instant::now() => {
                tokio::select! {
                    _ = tokio::time::sleep_until(t) => {}
                    _ = stall.changed() => {}
                }
            }
            _ => return,
        }
    }
}

/// SO_LINGER 0: the close that follows sends RST, so the peer sees a reset, not a clean EOF.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}
