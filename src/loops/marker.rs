//! Loop markers, as user properties on MQTT 5: each bridge that forwards a message appends its
//! name (`mqbridge-via`) and the broker it took the message from (`mqbridge-from`, as
//! `host:port`). A bridge does not forward a message it already forwarded, nor one into a broker
//! it already came from, so a ring of bridges delivers a message once to each broker.

use crate::message::Properties;

/// The user property key carrying the names of the bridges a message crossed.
pub const VIA: &str = "mqbridge-via";

/// The user property key carrying the brokers (`host:port`) a message was taken from.
pub const FROM: &str = "mqbridge-from";

/// Whether the message was already taken from broker `id` (forwarding it there again would
/// deliver it twice).
pub fn visited(props: Option<&Properties>, id: &str) -> bool {
    props.is_some_and(|p| p.user_properties.iter().any(|(k, v)| k == FROM && v == id))
}

/// Whether the message already crossed bridge `name`.
pub fn crossed(props: Option<&Properties>, name: &str) -> bool {
    props.is_some_and(|p| p.user_properties.iter().any(|(k, v)| k == VIA && v == name))
}

/// Appends bridge `name` and source broker `from` to the message's markers (after any it
/// already carries).
pub fn add(props: &mut Option<Box<Properties>>, name: &str, from: &str) {
    let user = &mut props.get_or_insert_with(Default::default).user_properties;
    user.push((VIA.to_string(), name.to_string()));
    user.push((FROM.to_string(), from.to_string()));
}

/// The markers a message carries, to keep when its other properties are dropped.
pub fn markers(props: &Properties) -> impl Iterator<Item = &(String, String)> {
    props
        .user_properties
        .iter()
        .filter(|(k, _)| k == VIA || k == FROM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_of_three_bridges_is_cut_where_it_started() {
        // x: a → b, y: b → c, z: c → a.
        let mut props = None;
        for (bridge, from, to) in [("x", "a", "b"), ("y", "b", "c")] {
            assert!(
                !crossed(props.as_deref(), bridge),
                "{bridge} sees it for the first time"
            );
            assert!(!visited(props.as_deref(), to), "{to} has not had it yet");
            add(&mut props, bridge, from);
        }
        assert!(
            visited(props.as_deref(), "a"),
            "z does not take it back to a, where it began"
        );
        assert!(
            crossed(props.as_deref(), "x"),
            "and x would not forward it again"
        );
        let marks: Vec<_> = markers(props.as_deref().unwrap())
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(marks, ["x", "a", "y", "b"]);
    }

    #[test]
    fn other_user_properties_are_kept_in_order() {
        let mut props = Some(Box::new(Properties {
            user_properties: vec![("a".into(), "1".into())],
            ..Default::default()
        }));
        add(&mut props, "edge-1", "127.0.0.1:21883");
        assert_eq!(
            props.unwrap().user_properties,
            vec![
                ("a".into(), "1".into()),
                (VIA.into(), "edge-1".into()),
                (FROM.into(), "127.0.0.1:21883".into())
            ]
        );
    }
}
