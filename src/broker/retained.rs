//! Retained messages of the embedded broker: the last retained message per topic, handed to
//! new subscriptions; a retained message with an empty payload deletes the topic's entry.

use std::{collections::HashMap, rc::Rc, time::Instant};

use super::message::Message;
use crate::topic::TopicFilter;

#[derive(Debug, Default)]
pub(crate) struct Retained {
    by_topic: HashMap<String, Rc<Message>>,
}

impl Retained {
    /// Keeps `message` (whose RETAIN flag is set) as its topic's retained message, or deletes
    /// the entry when the payload is empty (MQTT 3.3.1.3).
    pub fn store(&mut self, message: &Rc<Message>) {
        if message.payload.is_empty() {
            self.by_topic.remove(&*message.topic);
        } else {
            self.by_topic
                .insert(message.topic.to_string(), message.clone());
        }
    }

    /// The retained messages matching `filter`, expired ones left out (and forgotten).
    pub fn matching(&mut self, filter: &TopicFilter, now: Instant) -> Vec<Rc<Message>> {
        self.by_topic.retain(|_, m| !m.is_expired(now));
        let mut found: Vec<Rc<Message>> = self
            .by_topic
            .iter()
            .filter(|(topic, _)| filter.matches(topic))
            .map(|(_, m)| m.clone())
            .collect();
        // Deterministic order helps tests and humans reading a trace.
        found.sort_by(|a, b| a.topic.cmp(&b.topic));
        found
    }

    pub fn len(&self) -> usize {
        self.by_topic.len()
    }
}

#[cfg(test)]
mod tests {
    use ntex_bytes::{ByteString, Bytes};
    use ntex_mqtt::QoS;

    use super::*;

    fn msg(topic: &str, payload: &str) -> Rc<Message> {
        Rc::new(Message {
            topic: ByteString::from(topic),
            payload: Bytes::from(payload.to_string()),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: None,
            publisher: Rc::from("p"),
            received_at: Instant::now(),
        })
    }

    #[test]
    fn last_one_wins_and_empty_payload_deletes() {
        let mut r = Retained::default();
        r.store(&msg("a/1", "x"));
        r.store(&msg("a/1", "y"));
        r.store(&msg("a/2", "z"));
        let all = r.matching(&TopicFilter::parse("a/+").unwrap(), Instant::now());
        assert_eq!(all.len(), 2);
        assert_eq!(&all[0].payload[..], b"y");
        r.store(&msg("a/1", ""));
        assert_eq!(r.len(), 1);
    }
}
