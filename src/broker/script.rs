//! Fault injection for tests: a `Script` handle, shared between the test and the embedded
//! broker's thread, says what the broker advertises in CONNACK and how it acknowledges
//! publishes (delayed, withheld until released, refused with a reason code, or cut off by a
//! disconnect). Rules apply from the moment they are set; CONNACK values to new connections.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::sync::watch;

use crate::topic::TopicFilter;

/// The rules. Cheap to clone (a handle); every clone sees the same rules.
#[derive(Clone, Debug)]
pub struct Script {
    rules: Arc<Mutex<Rules>>,
    /// Bumped by `release_acks`: withheld acks wait for it to change.
    released: Arc<watch::Sender<u64>>,
    /// Bumped by `cut_connections`: the broker's accept loop watches it.
    cuts: Arc<watch::Sender<u64>>,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            rules: Arc::default(),
            released: Arc::new(watch::channel(0).0),
            cuts: Arc::new(watch::channel(0).0),
        }
    }
}

#[derive(Debug, Default)]
struct Rules {
    receive_maximum: Option<u16>,
    maximum_packet_size: Option<u32>,
    maximum_qos: Option<u8>,
    delays: Vec<(TopicFilter, Duration)>,
    withhold: Vec<TopicFilter>,
    reasons: Vec<(TopicFilter, u8)>,
    /// Publishes still to take before the connection taking the last one is cut.
    disconnect_after: Option<u64>,
    /// Client ids whose connections are to be cut now.
    cut: Vec<String>,
}

/// How the broker acknowledges one publish, decided when it arrives.
#[derive(Debug)]
pub(crate) struct AckPlan {
    /// A reason code >= 0x80: refused, not routed. On MQTT 3.x, where an ack cannot say
    /// no, the message is dropped and acknowledged, as 3.x brokers do on an ACL denial.
    pub reason: Option<u8>,
    pub delay: Option<Duration>,
    /// Wait for `release_acks` (this receiver sees the change).
    pub withhold: Option<watch::Receiver<u64>>,
}

#[track_caller]
fn filter(f: &str) -> TopicFilter {
    TopicFilter::parse(f).unwrap_or_else(|e| panic!("Script: invalid topic filter {f:?}: {e}"))
}

impl Script {
    pub fn new() -> Script {
        Script::default()
    }

    fn rules(&self) -> MutexGuard<'_, Rules> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// MQTT 5 CONNACK Receive Maximum for new connections (`None`: the broker's option).
    pub fn set_receive_maximum(&self, value: Option<u16>) {
        self.rules().receive_maximum = value;
    }

    /// MQTT 5 CONNACK Maximum Packet Size for new MQTT 5 connections; larger packets from
    /// such a client end its connection (`None`: the broker's option).
    pub fn set_maximum_packet_size(&self, value: Option<u32>) {
        self.rules().maximum_packet_size = value;
    }

    /// MQTT 5 CONNACK Maximum QoS (0 or 1) for new connections; `None` or 2: QoS 2 allowed.
    pub fn set_maximum_qos(&self, value: Option<u8>) {
        self.rules().maximum_qos = value;
    }

    /// Acknowledge publishes whose topic matches `topic_filter` only after `delay`.
    ///
    /// # Panics
    /// If `topic_filter` is not a valid filter.
    #[track_caller]
    pub fn delay_acks(&self, topic_filter: &str, delay: Duration) {
        self.rules().delays.push((filter(topic_filter), delay));
    }

    /// Withhold the acks of publishes matching `topic_filter` until [`Script::release_acks`].
    /// The messages themselves are routed at once: the broker has them, it just does not say so.
    ///
    /// # Panics
    /// If `topic_filter` is not a valid filter.
    #[track_caller]
    pub fn withhold_acks(&self, topic_filter: &str) {
        self.rules().withhold.push(filter(topic_filter));
    }

    /// Sends every withheld ack and stops withholding.
    pub fn release_acks(&self) {
        self.rules().withhold.clear();
        self.released.send_modify(|n| *n += 1);
    }

    /// Answer publishes matching `topic_filter` with this PUBACK/PUBREC reason code (MQTT 5),
    /// e.g. 0x87 Not Authorized. Codes >= 0x80 refuse the message: it is not routed. Codes
    /// ntex-mqtt cannot encode (not a PUBACK reason in the MQTT 5 table) become 0x80.
    ///
    /// # Panics
    /// If `topic_filter` is not a valid filter.
    #[track_caller]
    pub fn ack_with_reason(&self, topic_filter: &str, reason_code: u8) {
        self.rules()
            .reasons
            .push((filter(topic_filter), reason_code));
    }

    /// Cut the connection that sends the `n`-th publish from now (counted over all
    /// connections). That publish is neither routed nor acknowledged, so its sender must
    /// resend it. Fires once.
    pub fn disconnect_after_publishes(&self, n: u64) {
        self.rules().disconnect_after = Some(n.max(1));
    }

    /// Cuts `client_id`'s connection now, without a DISCONNECT, as a network failure would;
    /// its session (and what it holds) stays for the reconnect. Acks withheld or delayed on
    /// that connection are never sent.
    pub fn cut_connection(&self, client_id: &str) {
        self.rules().cut.push(client_id.to_string());
        self.cuts.send_modify(|n| *n += 1);
    }

    pub(crate) fn watch_cuts(&self) -> watch::Receiver<u64> {
        self.cuts.subscribe()
    }

    /// The client ids whose connections `cut_connection` asked to cut, once.
    pub(crate) fn take_cuts(&self) -> Vec<String> {
        std::mem::take(&mut self.rules().cut)
    }

    /// Drops every rule (withheld acks are released).
    pub fn reset(&self) {
        *self.rules() = Rules::default();
        self.released.send_modify(|n| *n += 1);
    }

    pub(crate) fn receive_maximum(&self) -> Option<u16> {
        self.rules().receive_maximum
    }

    pub(crate) fn maximum_packet_size(&self) -> Option<u32> {
        self.rules().maximum_packet_size
    }

    pub(crate) fn maximum_qos(&self) -> Option<u8> {
        self.rules().maximum_qos
    }

    /// Counts one publish against `disconnect_after_publishes`: true if this one must cut
    /// its connection.
    pub(crate) fn cut_now(&self) -> bool {
        let mut rules = self.rules();
        match rules.disconnect_after {
            Some(1) => {
                rules.disconnect_after = None;
                true
            }
            Some(n) => {
                rules.disconnect_after = Some(n - 1);
                false
            }
            None => false,
        }
    }

    /// How to acknowledge a publish on `topic` (QoS 1 or 2).
    pub(crate) fn ack_plan(&self, topic: &str) -> AckPlan {
        let rules = self.rules();
        let reason = rules
            .reasons
            .iter()
            .find(|(f, _)| f.matches(topic))
            .map(|(_, code)| *code);
        let delay = rules
            .delays
            .iter()
            .filter(|(f, _)| f.matches(topic))
            .map(|(_, d)| *d)
            .max();
        let withhold = rules
            .withhold
            .iter()
            .any(|f| f.matches(topic))
            .then(|| self.released.subscribe());
        AckPlan {
            reason,
            delay,
            withhold,
        }
    }
}

impl AckPlan {
    /// Waits out the delay and, if withheld, for the release.
    pub async fn wait(&mut self) {
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        if let Some(rx) = self.withhold.as_mut() {
            // An error means the script is gone: nothing will ever release, so let go.
            let _ = rx.changed().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_follow_the_rules() {
        let s = Script::new();
        s.delay_acks("slow/#", Duration::from_millis(5));
        s.ack_with_reason("deny/+", 0x87);
        s.withhold_acks("hold");
        assert_eq!(s.ack_plan("slow/a").delay, Some(Duration::from_millis(5)));
        assert_eq!(s.ack_plan("deny/x").reason, Some(0x87));
        assert!(s.ack_plan("hold").withhold.is_some());
        let plain = s.ack_plan("other");
        assert!(plain.reason.is_none() && plain.delay.is_none() && plain.withhold.is_none());
    }

    #[test]
    fn disconnect_fires_once_on_the_nth() {
        let s = Script::new();
        s.disconnect_after_publishes(3);
        assert_eq!(
            (0..5).map(|_| s.cut_now()).collect::<Vec<_>>(),
            [false, false, true, false, false]
        );
    }

    #[tokio::test]
    async fn release_lets_withheld_acks_go() {
        let s = Script::new();
        s.withhold_acks("#");
        let mut plan = s.ack_plan("a");
        let waiter = tokio::spawn(async move { plan.wait().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        s.release_acks();
        tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(s.ack_plan("a").withhold.is_none());
    }
}
