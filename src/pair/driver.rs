//! Runs one pair's `Machine` over real sockets. It decides nothing: it opens and closes the
//! connections the machine asks for, reads as much as the machine admits into its buffers,
//! writes what the machine transmits, and sleeps until the machine's next deadline.

use std::{
    future::Future,
    pin::Pin,
    sync::atomic::Ordering::{self, Relaxed},
    time::Duration,
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::watch,
};
use tracing::info;

use super::{
    PairSpec,
    machine::{Activation, Ended, Event, Machine, Mode, Role, Wake},
    retire,
    spool_io::{SpoolIo, from_record, spool_reply},
};
use crate::{
    link::{self, Connection, LinkError},
    spool::Reply,
};

type Connecting = Pin<Box<dyn Future<Output = Result<Connection, LinkError>> + Send>>;

/// One side's sockets: what the machine cannot hold.
#[derive(Default)]
struct Io {
    reader: Option<link::Reader>,
    writer: Option<link::Writer>,
    /// The reader's socket's wake-up threshold; lives exactly as long as `reader`.
    wake: link::WakeThreshold,
    connecting: Option<Connecting>,
}

impl Io {
    fn close(&mut self) {
        self.wake = link::WakeThreshold::none();
        self.reader = None;
        self.writer = None;
        self.connecting = None;
    }
}

/// Runs one pair until `shutdown` turns true and the pair has drained (or `drain_timeout` passed).
pub async fn run(spec: PairSpec, shutdown: watch::Receiver<bool>) {
    let (_always, active) = watch::channel(true);
    run_pooled(spec, shutdown, active).await;
}

/// Runs one pair of an automatically sized pool: connected while `active` is true, parked
/// (unsubscribed, drained, disconnected) while it is false, until `shutdown`.
pub async fn run_pooled(
    spec: PairSpec,
    mut shutdown: watch::Receiver<bool>,
    mut active: watch::Receiver<bool>,
) {
    if !*active.borrow() && !*shutdown.borrow() {
        // Parked from the start: an earlier run may have left this index subscribed, and the
        // broker queues for it meanwhile. Clean up first (SPEC 4.1); nothing there is a no-op.
        spec.stats.parked.store(true, Relaxed);
        retire::retire(spec.clone(), shutdown.clone()).await;
    }
    loop {
        spec.stats.parked.store(!*active.borrow(), Relaxed);
        while !*active.borrow_and_update() {
            tokio::select! {
                r = active.changed() => if r.is_err() { return },
                r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return },
            }
        }
        if *shutdown.borrow() {
            return;
        }
        spec.stats.parked.store(false, Relaxed);
        let ran = run_connected(spec.clone(), &mut shutdown, &mut active, Mode::Serve).await;
        if ran.ended == Ended::Shutdown {
            return;
        }
        info!(route = %spec.route.name, pair = spec.index, "pair parked: the pool shrank");
    }
}

/// One activation of a pair: until shutdown (drained) or until parked.
pub(super) async fn run_connected(
    spec: PairSpec,
    shutdown: &mut watch::Receiver<bool>,
    active: &mut watch::Receiver<bool>,
    mode: Mode,
) -> Activation {
    let route = spec.route.clone();
    let (m_spec_spool, m_spec_index) = (spec.spool.clone(), spec.index);
    let seed = rand::random::<u64>();
    let mut m = Machine::new(
        spec,
        mode,
        *shutdown.borrow(),
        std::time::Instant::now(),
        seed,
    );
    let (mut source, mut target) = (Io::default(), Io::default());
    let mut active_open = true;
    let mut spool = loop {
        match SpoolIo::open(&m_spec_spool, m_spec_index).await {
            Ok(Some((s, opened))) => {
                m.spool_opened(
                    std::time::Instant::now(),
                    opened.next_seq,
                    opened.first_unacked,
                );
                break Some(s);
            }
            Ok(None) => break None,
            Err(e) => {
                // Not opened (still held by a pool that is stopping, a disk error): without it
                // the pair takes nothing, so nothing is lost; it says so and tries again.
                tracing::error!(route = %route.name, pair = m_spec_index, error = %e, "spool: cannot open; retrying in 2 s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = shutdown.changed() => {}
                }
                if *shutdown.borrow() {
                    return m.activation(Ended::Shutdown);
                }
            }
        }
    };
    // One timer for the whole activation, moved only when the machine's deadline moves: a new
    // `Sleep` per pass registered and removed a timer entry for every wake-up.
    let timer = tokio::time::sleep_until(tokio::time::Instant::now());
    tokio::pin!(timer);
    loop {
        if let Some(s) = spool.as_ref() {
            m.spool_full(s.link.gauges.full.load(Ordering::Relaxed));
        }
        if let Some(ended) = m.handle_input(std::time::Instant::now()) {
            goodbye(&mut m, Role::Source, &mut source).await;
            goodbye(&mut m, Role::Target, &mut target).await;
            if let Some(s) = spool.take() {
                s.close();
            }
            m.stopped();
            return m.activation(ended);
        }
        while let Some(event) = m.poll_event() {
            match event {
                Event::Connect(role, params) => {
                    let broker = match role {
                        Role::Source => route.from.clone(),
                        Role::Target => route.to.clone(),
                    };
                    io(role, &mut source, &mut target).connecting =
                        Some(Box::pin(
                            async move { link::connect(&broker, &params).await },
                        ));
                }
                Event::Close(role) => io(role, &mut source, &mut target).close(),
                Event::Wake(role, wake) => {
                    let w = &mut io(role, &mut source, &mut target).wake;
                    match wake {
                        Wake::Raise => w.raise(),
                        Wake::RaiseTo(n) => w.raise_to(n),
                        Wake::Lower => w.lower(),
                    }
                }
                Event::Spool(op) => {
                    if let Some(s) = spool.as_ref() {
                        s.send(op);
                    }
                }
            }
        }
        let now = std::time::Instant::now();
        let next_timer = tokio::time::Instant::from_std(m.poll_timeout(now));
        if timer.deadline() != next_timer {
            timer.as_mut().reset(next_timer);
        }
        let target_room = m.read_room(now, Role::Target);
        let source_room = m.read_room(now, Role::Source);
        let draining = m.is_draining();
        let parking = m.is_parking() || !active_open;
        let (source_rbuf, target_rbuf, source_out, target_out) = m.buffers(now);
        tokio::select! {
            // Reads first: what is readable is taken in before anything is written, so acks and
            // publishes leave in batches (fewer syscalls per message than a random pick).
            biased;
            r = read_some(&mut target.reader, target_rbuf, target_room.unwrap_or(0)), if target_room.is_some() => {
                read_done(&mut m, Role::Target, r, target_room.unwrap_or(0))
            }
            r = read_some(&mut source.reader, source_rbuf, source_room.unwrap_or(0)), if source_room.is_some() => {
                read_done(&mut m, Role::Source, r, source_room.unwrap_or(0))
            }
            r = write_some(&mut target.writer, target_out), if !target_out.is_empty() => {
                write_done(&mut m, Role::Target, r)
            }
            r = write_some(&mut source.writer, source_out), if !source_out.is_empty() => {
                write_done(&mut m, Role::Source, r)
            }
            c = connecting(&mut target.connecting) => {
                target.connecting = None;
                established(&mut m, Role::Target, &mut target, c);
            }
            c = connecting(&mut source.connecting) => {
                source.connecting = None;
                established(&mut m, Role::Source, &mut source, c);
            }
            _ = shutdown.changed(), if !draining => m.shutdown(std::time::Instant::now()),
            r = active.changed(), if !draining && !parking => match r {
                Ok(()) if !*active.borrow_and_update() => m.park(),
                Ok(()) => {}
                // The pool's controller is gone (the route is stopping): nothing more to follow.
                Err(_) => active_open = false,
            },
            reply = spool_reply(&mut spool) => {
                let now = std::time::Instant::now();
                match reply {
                    Some(Reply::Durable(n)) => m.spool_durable(now, n),
                    Some(Reply::Failed(n, _)) => m.spool_failed(now, n),
                    Some(Reply::Records(records)) => {
                        let records = records.into_iter().map(|r| from_record(r, now)).collect();
                        m.spool_records(now, records);
                    }
                    // The spool thread is gone (the process is ending): no more answers.
                    None => spool = None,
                }
            }
            _ = &mut timer => m.handle_timeout(std::time::Instant::now()),
        }
    }
}

fn io<'a>(role: Role, source: &'a mut Io, target: &'a mut Io) -> &'a mut Io {
    match role {
        Role::Source => source,
        Role::Target => target,
    }
}

fn read_done(m: &mut Machine, role: Role, r: std::io::Result<usize>, room: usize) {
    let now = std::time::Instant::now();
    match r {
        Ok(n) => m.handle_read(now, role, n, room),
        Err(e) => m.lost(now, role, &e),
    }
}

fn write_done(m: &mut Machine, role: Role, r: std::io::Result<usize>) {
    let now = std::time::Instant::now();
    match r {
        Ok(n) => m.written(now, role, n),
        Err(e) => m.lost(now, role, &e),
    }
}

fn established(m: &mut Machine, role: Role, io: &mut Io, c: Result<Connection, LinkError>) {
    let now = std::time::Instant::now();
    match c {
        Ok(c) => {
            io.reader = Some(c.reader);
            io.writer = Some(c.writer);
            io.wake = c.wake_threshold;
            m.connected(now, role, c.connack, c.codec, c.rbuf);
        }
        Err(e) => m.cannot_connect(now, role, &e),
    }
}

/// Writes what is left for `role` and a DISCONNECT (bounded in time), then closes it.
async fn goodbye(m: &mut Machine, role: Role, io: &mut Io) {
    if let (Some(buf), Some(w)) = (m.goodbye(role), io.writer.as_mut()) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = w.write_all(&buf).await;
            let _ = w.shutdown().await;
        })
        .await;
    }
    io.close();
}

/// One read into `buf`, of at most `limit` bytes.
async fn read_some(
    reader: &mut Option<link::Reader>,
    buf: &mut BytesMut,
    limit: usize,
) -> std::io::Result<usize> {
    match reader {
        Some(r) if limit < buf.capacity() - buf.len() => r.take(limit as u64).read_buf(buf).await,
        Some(r) => r.read_buf(buf).await,
        None => std::future::pending().await,
    }
}

async fn write_some(writer: &mut Option<link::Writer>, buf: &[u8]) -> std::io::Result<usize> {
    match writer {
        Some(w) => w.write(buf).await,
        None => std::future::pending().await,
    }
}

async fn connecting(c: &mut Option<Connecting>) -> Result<Connection, LinkError> {
    match c {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}
