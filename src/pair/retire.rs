//! Retiring a pool index for good (SPEC 4.1): brokers keep delivering to an offline member of a
//! shared subscription whose session persists, so an index no longer run is connected once
//! more, unsubscribed, drained of what its session held, and its sessions ended. The protocol
//! work is the machine's (`Mode::Retire`); this file is the choreography of connections around it.

use std::time::Duration;

use bytes::BytesMut;
use tokio::{io::AsyncWriteExt, sync::watch};
use tracing::{debug, info, warn};

use super::{
    PairSpec, driver,
    machine::{Ended, Mode},
};
use crate::{
    config::{BrokerPlan, Protocol},
    link::{self, ConnectParams, LinkError},
};

/// Cleans up pool index `spec.index` for good: connects both sides with their persistent
/// sessions, unsubscribes the route's filters on the source (retrying until the UNSUBACK, across
/// reconnects), forwards what the session still delivers, then ends both sessions. Returns
/// whether the source had a session for this index (`None` if shut down before it was known).
/// MQTT 3.1 cannot report a session, so there it is always `Some(false)`.
///
/// With a spool holding messages for this index, the clean-up runs whatever the source kept:
/// the pair forwards its spool to the target before it ends (the machine parks only once the
/// spool is empty), so nothing acknowledged to the source is left behind.
pub async fn retire(spec: PairSpec, mut shutdown: watch::Receiver<bool>) -> Option<bool> {
    let spooled = spool_holds_messages(&spec).await;
    if spooled {
        info!(route = %spec.route.name, pair = spec.index, "index {} is no longer in the pool but its spool holds messages: forwarding them before it retires", spec.index);
    }
    if spec.route.from.session_expiry.is_zero() && !spooled {
        return Some(false); // clean sessions: nothing outlives a connection
    }
    // Look first, at the source alone: most starts find nothing, and then no target connection
    // is made. MQTT 3.1 cannot report a session: there the full clean-up runs.
    if spec.route.from.protocol != Protocol::V31 && !spooled {
        match source_session_present(&spec).await {
            Ok(true) => {}
            Ok(false) => return Some(false),
            Err(e) => {
                debug!(route = %spec.route.name, pair = spec.index, "cannot look for a session left at this index: {e}");
                return None;
            }
        }
    }
    let (_hold, mut active) = watch::channel(false);
    let ran = driver::run_connected(spec.clone(), &mut shutdown, &mut active, Mode::Retire).await;
    if ran.ended == Ended::Parked {
        end_sessions(&spec).await;
        if ran.source_session == Some(true) {
            info!(route = %spec.route.name, pair = spec.index, forwarded = ran.forwarded, "retired index {}: its source session was still subscribed; unsubscribed, forwarded what it held, ended its sessions", spec.index);
        }
    }
    ran.source_session
}

/// Whether this index's spool (if the route has one) holds messages.
async fn spool_holds_messages(spec: &PairSpec) -> bool {
    let (Some(_), Some(plan)) = (&spec.spool, &spec.route.spool) else {
        return false;
    };
    let dir = plan.dir.join(spec.index.to_string());
    if !dir.is_dir() {
        return false;
    }
    // Opening scans the segments: what it finds unacknowledged is held.
    tokio::task::spawn_blocking(move || {
        crate::spool::Log::open(&dir, crate::spool::LogOptions::default())
            .is_ok_and(|log| !log.is_empty())
    })
    .await
    .unwrap_or(false)
}

/// Whether the source keeps a session for this index. A session the look itself created is
/// ended again (v5: DISCONNECT with Session Expiry 0; 3.x: a clean-session connection); one that
/// was there is left as it was, for the clean-up to take over.
async fn source_session_present(spec: &PairSpec) -> Result<bool, LinkError> {
    let broker = &spec.route.from;
    let params = ConnectParams::for_broker(broker, spec.source_client_id.clone());
    let look = tokio::time::timeout(Duration::from_secs(10), async {
        let mut c = link::connect(broker, &params).await?;
        let present = c.connack.session_present;
        let mut buf = BytesMut::new();
        let ended = !present && c.codec.disconnect_ending_session(&mut buf);
        if !ended {
            c.codec.disconnect(&mut buf);
        }
        c.writer.write_all(&buf).await?;
        let _ = c.writer.shutdown().await;
        Ok::<_, LinkError>((present, ended))
    })
    .await
    .map_err(|_| LinkError::Timeout(Duration::from_secs(10)))??;
    let (present, ended) = look;
    if !present && !ended {
        end_session(spec, broker, &spec.source_client_id).await;
    }
    Ok(present)
}

/// Ends both sides' sessions of a retired index: a connection with a clean session (v5: Clean
/// Start, Session Expiry 0) discards what the broker kept, and ends with the connection.
async fn end_sessions(spec: &PairSpec) {
    let sides = [
        (&spec.route.from, &spec.source_client_id),
        (&spec.route.to, &spec.target_client_id),
    ];
    for (broker, client_id) in sides {
        end_session(spec, broker, client_id).await;
    }
}

async fn end_session(spec: &PairSpec, broker: &BrokerPlan, client_id: &str) {
    if broker.session_expiry.is_zero() {
        return;
    }
    let mut params = ConnectParams::for_broker(broker, client_id.to_string());
    params.clean_start = true;
    params.session_expiry_secs = 0;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        let mut c = link::connect(broker, &params).await?;
        let mut buf = BytesMut::new();
        c.codec.disconnect(&mut buf);
        c.writer.write_all(&buf).await?;
        let _ = c.writer.shutdown().await;
        Ok::<_, LinkError>(())
    })
    .await;
    match ended {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            warn!(route = %spec.route.name, broker = %broker.name, %client_id, "cannot end the retired index's session: {e}")
        }
        Err(_) => {
            warn!(route = %spec.route.name, broker = %broker.name, %client_id, "cannot end the retired index's session: timed out")
        }
    }
}
