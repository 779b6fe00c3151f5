//! The shared-subscription self-test (SPEC 4.1), pure. Brokers without shared subscriptions
//! (NATS's MQTT listener, aedes, amqtt) take `$share/<group>/<filter>` as a literal filter: the
//! SUBACK grants it and nothing ever arrives. So after the route's SUBACKs a 3.x pair subscribes
//! `<share>/<group>/mqbridge/probe/<client id>` and publishes one QoS 0 message to
//! `mqbridge/probe/<client id>`: only a real shared subscription delivers it back. The pair is
//! ready once it does; if it has not within `PROBE_TIMEOUT` the route's `share` is wrong for this
//! broker, and the pair stays not ready.

use std::time::{Duration, Instant};

/// How long the probe may take, from its SUBSCRIBE to its message coming back.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Packet ids of the probe's SUBSCRIBE and UNSUBSCRIBE (apart from the route's 1.., the
/// parking UNSUBSCRIBE's 900 and dead letters' 1000..).
pub const SUBSCRIBE_PKID: u16 = 901;
pub const UNSUBSCRIBE_PKID: u16 = 902;

/// What the driver writes for the probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    Subscribe { pkid: u16, filter: String },
    Publish { topic: String },
    Unsubscribe { pkid: u16, filter: String },
}

/// The verdict, once there is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The probe came back: the broker shares.
    Shares,
    /// It did not within the timeout, or the broker refused the probe's subscription.
    DoesNotShare,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Idle,
    Subscribing,
    Waiting,
    Done(Verdict),
}

/// One connection's probe.
#[derive(Debug, Clone)]
pub struct ShareProbe {
    topic: String,
    filter: String,
    state: State,
    deadline: Option<Instant>,
}

impl ShareProbe {
    /// `share_prefix` is `$share/<group>` or `$oshare/<group>`.
    pub fn new(share_prefix: &str, client_id: &str) -> Self {
        let topic = format!("mqbridge/probe/{client_id}");
        ShareProbe {
            filter: format!("{share_prefix}/{topic}"),
            topic,
            state: State::Idle,
            deadline: None,
        }
    }

    /// The route's subscriptions are granted: start the test.
    pub fn start(&mut self, now: Instant) -> Transmit {
        self.state = State::Subscribing;
        self.deadline = Some(now + PROBE_TIMEOUT);
        Transmit::Subscribe {
            pkid: SUBSCRIBE_PKID,
            filter: self.filter.clone(),
        }
    }

    /// The probe's SUBACK (`code` ≥ 0x80: refused).
    pub fn suback(&mut self, code: u8) -> Option<Transmit> {
        if self.state != State::Subscribing {
            return None;
        }
        if code >= 0x80 {
            return Some(self.finish(Verdict::DoesNotShare));
        }
        self.state = State::Waiting;
        Some(Transmit::Publish {
            topic: self.topic.clone(),
        })
    }

    /// A PUBLISH on `topic` arrived. `Some` when it is the probe: the driver forwards nothing
    /// and writes what is returned.
    pub fn publish(&mut self, topic: &str) -> Option<Option<Transmit>> {
        if topic != self.topic {
            return None;
        }
        if self.state == State::Waiting || self.state == State::Subscribing {
            return Some(Some(self.finish(Verdict::Shares)));
        }
        Some(None) // a late copy (a resumed session): still ours, still not forwarded
    }

    /// When the driver must call [`ShareProbe::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Option<Transmit> {
        match self.deadline {
            Some(d) if now >= d => Some(self.finish(Verdict::DoesNotShare)),
            _ => None,
        }
    }

    pub fn verdict(&self) -> Option<Verdict> {
        match self.state {
            State::Done(v) => Some(v),
            _ => None,
        }
    }

    pub fn is_running(&self) -> bool {
        matches!(self.state, State::Subscribing | State::Waiting)
    }

    /// A new connection: the test starts again after its SUBACKs.
    pub fn reset(&mut self) {
        self.state = State::Idle;
        self.deadline = None;
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    fn finish(&mut self, v: Verdict) -> Transmit {
        self.state = State::Done(v);
        self.deadline = None;
        Transmit::Unsubscribe {
            pkid: UNSUBSCRIBE_PKID,
            filter: self.filter.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe() -> (ShareProbe, Instant) {
        (ShareProbe::new("$share/g", "c-0"), Instant::now())
    }

    #[test]
    fn a_sharing_broker_delivers_the_probe_back() {
        let (mut p, t0) = probe();
        assert_eq!(
            p.start(t0),
            Transmit::Subscribe {
                pkid: SUBSCRIBE_PKID,
                filter: "$share/g/mqbridge/probe/c-0".into()
            }
        );
        assert_eq!(
            p.suback(0),
            Some(Transmit::Publish {
                topic: "mqbridge/probe/c-0".into()
            })
        );
        assert_eq!(p.publish("other/topic"), None, "not the probe");
        assert!(matches!(
            p.publish("mqbridge/probe/c-0"),
            Some(Some(Transmit::Unsubscribe { .. }))
        ));
        assert_eq!(p.verdict(), Some(Verdict::Shares));
        assert_eq!(p.poll_timeout(), None);
        assert_eq!(p.handle_timeout(t0 + PROBE_TIMEOUT * 2), None);
    }

    #[test]
    fn a_literal_filter_never_delivers_and_the_probe_times_out() {
        let (mut p, t0) = probe();
        p.start(t0);
        p.suback(0);
        assert_eq!(p.poll_timeout(), Some(t0 + PROBE_TIMEOUT));
        assert_eq!(p.handle_timeout(t0 + PROBE_TIMEOUT / 2), None);
        assert!(p.is_running());
        assert!(matches!(
            p.handle_timeout(t0 + PROBE_TIMEOUT),
            Some(Transmit::Unsubscribe { .. })
        ));
        assert_eq!(p.verdict(), Some(Verdict::DoesNotShare));
        assert_eq!(
            p.publish("mqbridge/probe/c-0"),
            Some(None),
            "a late probe is swallowed, not forwarded"
        );
    }

    #[test]
    fn a_refused_probe_subscription_does_not_share() {
        let (mut p, t0) = probe();
        p.start(t0);
        assert!(matches!(p.suback(0x80), Some(Transmit::Unsubscribe { .. })));
        assert_eq!(p.verdict(), Some(Verdict::DoesNotShare));
    }

    #[test]
    fn a_reconnect_starts_over() {
        let (mut p, t0) = probe();
        p.start(t0);
        p.handle_timeout(t0 + PROBE_TIMEOUT);
        p.reset();
        assert_eq!(p.verdict(), None);
        assert_eq!(p.poll_timeout(), None);
        p.start(t0 + PROBE_TIMEOUT);
        assert!(p.is_running());
    }
}
