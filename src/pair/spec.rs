//! What a pair is given to run: its route, its index in the pool, its client ids, where its
//! counters go, and what it does against loops.

use std::{sync::Arc, time::Duration};

use super::stats::PairStats;
use crate::{config::RoutePlan, loops::EchoDigest};

/// Everything one pair needs to run.
#[derive(Clone)]
pub struct PairSpec {
    pub route: Arc<RoutePlan>,
    pub index: usize,
    pub source_client_id: String,
    pub target_client_id: String,
    pub stats: Arc<PairStats>,
    pub drain_timeout: Duration,
    /// How long a connected target may acknowledge nothing while publishes wait before they are
    /// taken for dropped and sent again on a new connection (`machine::ack_silence`).
    pub ack_silence: Duration,
    /// Process start, the zero of `PairStats::last_progress_ms`.
    pub epoch: std::time::Instant,
    pub loops: LoopGuard,
    /// The route's spool, when it keeps one: the pair's source side takes messages into it on
    /// its own (SPEC 4.9).
    pub spool: Option<SpoolLink>,
}

/// A pair's way to its route's spool thread.
#[derive(Clone, Debug)]
pub struct SpoolLink {
    pub spool: crate::spool::Spool,
    pub gauges: Arc<crate::spool::LogGauges>,
}

/// What a pair does against loops (SPEC 4.6).
#[derive(Debug, Clone)]
pub struct LoopGuard {
    /// Our `mqbridge-via` marker.
    pub bridge_name: String,
    /// The source and target brokers as `mqbridge-from` names them: `brokers.<name>.id`, by
    /// default a hash of `host:port`, the same in every bridge's config that reaches the broker
    /// by the same address.
    pub source_id: String,
    pub target_id: String,
    /// Add our markers to what goes to an MQTT 5 target (`loop_markers`, resolved).
    pub markers: bool,
    /// The process's echo digest, when this route records or checks (3.x endpoints).
    pub digest: Option<Arc<std::sync::Mutex<EchoDigest>>>,
    /// Remember what we forward into the (3.x) target.
    pub record_echoes: bool,
    /// Drop what comes from the (3.x) source as an echo of something we forwarded there.
    pub check_echoes: bool,
}
