//! Counters of the embedded broker, readable from any thread while it runs: per client id,
//! what it sent in CONNECT, how many publishes it sent us, and the most QoS 1/2 messages it
//! had unacknowledged from us at once (so a test can show a window was never exceeded).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
};

use crate::config::Protocol;

/// What a client said about itself in its latest CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectInfo {
    pub protocol: Protocol,
    /// 3.x clean session / 5 clean start.
    pub clean_start: bool,
    pub keep_alive: u16,
    /// MQTT 5 Session Expiry Interval (seconds); 3.x: 0 for a clean session, else `u32::MAX`.
    pub session_expiry: u32,
    /// MQTT 5 Receive Maximum the client announced (`None`: absent, meaning 65535).
    pub receive_maximum: Option<u16>,
    /// MQTT 5 Maximum Packet Size the client announced.
    pub maximum_packet_size: Option<u32>,
}

/// Everything counted about one client id.
#[derive(Debug, Clone, Default)]
pub struct ClientStats {
    pub connects: u64,
    pub connected: bool,
    pub connect: Option<ConnectInfo>,
    /// PUBLISH packets received from the client (any QoS, duplicates included).
    pub publishes_received: u64,
    /// PUBLISH packets written to the client (resends included).
    pub publishes_sent: u64,
    /// QoS 1/2 messages written to the client and not yet acknowledged, now.
    pub unacked: usize,
    /// The most there ever were at once.
    pub max_unacked: usize,
    /// PUBACK/PUBREC from the client with an MQTT 5 reason code >= 0x80.
    pub refusals_received: u64,
    /// PUBACK/PUBREC from the client that overtook one for an earlier PUBLISH (MQTT-4.6.0-2/3).
    pub acks_out_of_order: u64,
    /// Messages for this client dropped: queue full, offline QoS 0, expired, too large.
    pub dropped: u64,
    /// QoS 1/2 publishes from the client the broker refused with a scripted reason code.
    pub refused: u64,
    /// PUBLISH packets discarded over the PUBLISH/s quota (never routed nor acknowledged on
    /// MQTT 3.x; the MQTT 5 client was disconnected).
    pub over_rate: u64,
    /// QoS 2 exchanges the client opened towards the broker (PUBLISH taken) and has not yet
    /// ended with PUBREL, now: held in its session across reconnects (MQTT-4.4.0-1).
    pub qos2_open: usize,
}

/// A handle on the counters; clones share them.
#[derive(Debug, Clone, Default)]
pub struct BrokerStats {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    clients: BTreeMap<String, ClientStats>,
    subscriptions: Vec<(String, String)>,
    retained: usize,
}

impl BrokerStats {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The counters of `client_id`, if it ever connected.
    pub fn client(&self, client_id: &str) -> Option<ClientStats> {
        self.lock().clients.get(client_id).cloned()
    }

    /// Every client id that connected, in order.
    pub fn client_ids(&self) -> Vec<String> {
        self.lock().clients.keys().cloned().collect()
    }

    /// PUBLISH packets received from `client_id`.
    pub fn publishes_received(&self, client_id: &str) -> u64 {
        self.client(client_id).map_or(0, |c| c.publishes_received)
    }

    /// PUBLISH packets received from every client.
    pub fn total_publishes_received(&self) -> u64 {
        self.lock()
            .clients
            .values()
            .map(|c| c.publishes_received)
            .sum()
    }

    /// The most QoS 1/2 messages `client_id` ever had unacknowledged from the broker at once.
    pub fn max_unacked(&self, client_id: &str) -> usize {
        self.client(client_id).map_or(0, |c| c.max_unacked)
    }

    /// What `client_id` sent in its latest CONNECT.
    pub fn connect_info(&self, client_id: &str) -> Option<ConnectInfo> {
        self.client(client_id).and_then(|c| c.connect)
    }

    /// Current subscriptions as `(client id, filter as subscribed)`, shared ones with their
    /// `$share/<group>/` or `$oshare/<group>/` prefix.
    pub fn subscriptions(&self) -> Vec<(String, String)> {
        self.lock().subscriptions.clone()
    }

    /// Topics with a retained message.
    pub fn retained_count(&self) -> usize {
        self.lock().retained
    }

    pub(crate) fn update(&self, client_id: &str, f: impl FnOnce(&mut ClientStats)) {
        let mut inner = self.lock();
        match inner.clients.get_mut(client_id) {
            Some(c) => f(c),
            None => f(inner.clients.entry(client_id.to_string()).or_default()),
        }
    }

    pub(crate) fn set_unacked(&self, client_id: &str, unacked: usize) {
        self.update(client_id, |c| {
            c.unacked = unacked;
            c.max_unacked = c.max_unacked.max(unacked);
        });
    }

    pub(crate) fn set_subscriptions(&self, list: Vec<(String, String)>) {
        self.lock().subscriptions = list;
    }

    pub(crate) fn set_retained(&self, n: usize) {
        self.lock().retained = n;
    }
}
