//! The embedded broker's subscription table, without I/O: plain subscriptions per client, and
//! shared subscriptions per group — `$share/<group>/<filter>` deliver each message to one
//! member in turn, BifroMQ's `$oshare/<group>/<filter>` to one member per topic (sticky), so
//! one topic's messages keep their order. Matching uses `topic::TopicFilter`.

use std::{
    collections::{BTreeMap, HashMap},
    num::NonZeroU32,
    rc::Rc,
};

use ntex_mqtt::QoS;

use crate::topic::{TopicError, TopicFilter};

/// What a client asked for with one filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubOptions {
    pub qos: QoS,
    /// MQTT 5: not delivered to the connection that published it.
    pub no_local: bool,
    /// MQTT 5: live messages keep the publisher's RETAIN flag.
    pub retain_as_published: bool,
    /// MQTT 5 Subscription Identifier, echoed on deliveries.
    pub id: Option<NonZeroU32>,
}

/// A parsed SUBSCRIBE filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Filter {
    Plain(TopicFilter),
    Shared {
        /// `$oshare`: sticky per topic.
        ordered: bool,
        group: String,
        filter: TopicFilter,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FilterError {
    Topic(TopicError),
    /// `$share/` without a group, a group with a wildcard, or no filter after the group.
    BadShare,
}

impl Filter {
    pub fn parse(raw: &str) -> Result<Filter, FilterError> {
        let shared = raw
            .strip_prefix("$share/")
            .map(|rest| (false, rest))
            .or_else(|| raw.strip_prefix("$oshare/").map(|rest| (true, rest)));
        let Some((ordered, rest)) = shared else {
            return TopicFilter::parse(raw)
                .map(Filter::Plain)
                .map_err(FilterError::Topic);
        };
        let (group, filter) = rest.split_once('/').ok_or(FilterError::BadShare)?;
        if group.is_empty() || group.contains(['+', '#']) {
            return Err(FilterError::BadShare);
        }
        let filter = TopicFilter::parse(filter).map_err(FilterError::Topic)?;
        Ok(Filter::Shared {
            ordered,
            group: group.to_string(),
            filter,
        })
    }

    pub fn is_shared(&self) -> bool {
        matches!(self, Filter::Shared { .. })
    }
}

/// Where one published message goes: one entry per receiving client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    pub client: Rc<str>,
    pub qos: QoS,
    pub retain_as_published: bool,
    pub subscription_ids: Vec<NonZeroU32>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct GroupKey {
    ordered: bool,
    group: String,
    filter: String,
}

#[derive(Debug)]
struct Group {
    filter: TopicFilter,
    members: Vec<(Rc<str>, SubOptions)>,
    /// Round robin position (`$share`).
    next: usize,
    /// Topic -> member that owns it (`$oshare`).
    owners: HashMap<String, Rc<str>>,
}

#[derive(Debug, Default)]
pub(crate) struct Subscriptions {
    plain: BTreeMap<Rc<str>, Vec<(TopicFilter, SubOptions)>>,
    groups: BTreeMap<GroupKey, Group>,
}

impl Subscriptions {
    /// Adds or replaces `client`'s subscription. Returns whether it is new (MQTT 5 Retain
    /// Handling 1 sends retained messages only then); `None` if it would make its shared
    /// group larger than `max_members` (nothing changed).
    pub fn subscribe(
        &mut self,
        client: &Rc<str>,
        filter: &Filter,
        options: SubOptions,
        max_members: Option<usize>,
    ) -> Option<bool> {
        match filter {
            Filter::Plain(f) => {
                let subs = self.plain.entry(client.clone()).or_default();
                if let Some(existing) = subs.iter_mut().find(|(g, _)| g == f) {
                    existing.1 = options;
                    Some(false)
                } else {
                    subs.push((f.clone(), options));
                    Some(true)
                }
            }
            Filter::Shared {
                ordered,
                group,
                filter,
            } => {
                let key = GroupKey {
                    ordered: *ordered,
                    group: group.clone(),
                    filter: filter.as_str().to_string(),
                };
                let g = self.groups.entry(key).or_insert_with(|| Group {
                    filter: filter.clone(),
                    members: Vec::new(),
                    next: 0,
                    owners: HashMap::new(),
                });
                if let Some(m) = g.members.iter_mut().find(|(c, _)| c == client) {
                    m.1 = options;
                    Some(false)
                } else if max_members.is_some_and(|max| g.members.len() >= max) {
                    None
                } else {
                    g.members.push((client.clone(), options));
                    Some(true)
                }
            }
        }
    }

    /// Removes one subscription. Returns whether it existed.
    pub fn unsubscribe(&mut self, client: &Rc<str>, filter: &Filter) -> bool {
        match filter {
            Filter::Plain(f) => {
                let Some(subs) = self.plain.get_mut(client) else {
                    return false;
                };
                let before = subs.len();
                subs.retain(|(g, _)| g != f);
                let removed = subs.len() != before;
                if subs.is_empty() {
                    self.plain.remove(client);
                }
                removed
            }
            Filter::Shared {
                ordered,
                group,
                filter,
            } => {
                let key = GroupKey {
                    ordered: *ordered,
                    group: group.clone(),
                    filter: filter.as_str().to_string(),
                };
                let removed = self.groups.get_mut(&key).is_some_and(|g| g.remove(client));
                self.groups.retain(|_, g| !g.members.is_empty());
                removed
            }
        }
    }

    /// Removes every subscription of `client` (its session ended).
    pub fn remove_client(&mut self, client: &Rc<str>) {
        self.plain.remove(client);
        for g in self.groups.values_mut() {
            g.remove(client);
        }
        self.groups.retain(|_, g| !g.members.is_empty());
    }

    /// The clients a message on `topic` from `publisher` goes to. A client matched by several
    /// plain filters gets it once, at the highest QoS, with every Subscription Identifier;
    /// each matching share group adds one member, preferring connected ones (`online`).
    pub fn route(
        &mut self,
        topic: &str,
        publisher: &str,
        online: impl Fn(&str) -> bool,
    ) -> Vec<Route> {
        let mut routes: Vec<Route> = Vec::new();
        for (client, subs) in &self.plain {
            let mut route: Option<Route> = None;
            for (filter, o) in subs {
                if !filter.matches(topic) || (o.no_local && &**client == publisher) {
                    continue;
                }
                let r = route.get_or_insert_with(|| Route {
                    client: client.clone(),
                    qos: o.qos,
                    retain_as_published: o.retain_as_published,
                    subscription_ids: Vec::new(),
                });
                r.qos = r.qos.max(o.qos);
                r.retain_as_published |= o.retain_as_published;
                r.subscription_ids.extend(o.id);
            }
            routes.extend(route);
        }
        for (key, group) in &mut self.groups {
            if !group.filter.matches(topic) {
                continue;
            }
            let member = if key.ordered {
                group.owner_of(topic, &online)
            } else {
                group.next_member(&online)
            };
            if let Some((client, o)) = member {
                routes.push(Route {
                    client,
                    qos: o.qos,
                    retain_as_published: o.retain_as_published,
                    subscription_ids: o.id.into_iter().collect(),
                });
            }
        }
        routes
    }

    /// Every subscription, as `(client, filter as subscribed)`, for counters and tests.
    pub fn list(&self) -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> = self
            .plain
            .iter()
            .flat_map(|(c, subs)| {
                subs.iter()
                    .map(move |(f, _)| (c.to_string(), f.as_str().to_string()))
            })
            .collect();
        for (key, g) in &self.groups {
            let prefix = if key.ordered { "$oshare" } else { "$share" };
            for (c, _) in &g.members {
                all.push((
                    c.to_string(),
                    format!("{prefix}/{}/{}", key.group, key.filter),
                ));
            }
        }
        all
    }
}

impl Group {
    fn remove(&mut self, client: &Rc<str>) -> bool {
        let before = self.members.len();
        self.members.retain(|(c, _)| c != client);
        self.owners.retain(|_, owner| owner != client);
        self.members.len() != before
    }

    /// Round robin over connected members; if none is connected, over all of them (the
    /// message then waits in a persistent session).
    fn next_member(&mut self, online: &impl Fn(&str) -> bool) -> Option<(Rc<str>, SubOptions)> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = self.next % n;
        let pick = (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| online(&self.members[i].0))
            .unwrap_or(start);
        self.next = pick + 1;
        Some(self.members[pick].clone())
    }

    /// The member owning `topic`, choosing one (round robin) the first time. The owner keeps
    /// the topic while it is a member, connected or not, so order is never split.
    fn owner_of(
        &mut self,
        topic: &str,
        online: &impl Fn(&str) -> bool,
    ) -> Option<(Rc<str>, SubOptions)> {
        if let Some(owner) = self.owners.get(topic)
            && let Some(m) = self.members.iter().find(|(c, _)| c == owner)
        {
            return Some(m.clone());
        }
        let chosen = self.next_member(online)?;
        self.owners.insert(topic.to_string(), chosen.0.clone());
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(qos: QoS) -> SubOptions {
        SubOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            id: None,
        }
    }

    fn client(s: &str) -> Rc<str> {
        Rc::from(s)
    }

    fn sub(t: &mut Subscriptions, c: &str, f: &str) {
        t.subscribe(
            &client(c),
            &Filter::parse(f).unwrap(),
            opts(QoS::AtLeastOnce),
            None,
        );
    }

    fn targets(t: &mut Subscriptions, topic: &str) -> Vec<String> {
        let mut v: Vec<String> = t
            .route(topic, "pub", |_| true)
            .into_iter()
            .map(|r| r.client.to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn parses_shared_filters() {
        assert_eq!(
            Filter::parse("$share/g/a/+").unwrap(),
            Filter::Shared {
                ordered: false,
                group: "g".into(),
                filter: TopicFilter::parse("a/+").unwrap()
            }
        );
        assert!(matches!(
            Filter::parse("$oshare/g/#").unwrap(),
            Filter::Shared { ordered: true, .. }
        ));
        assert_eq!(Filter::parse("$share/g"), Err(FilterError::BadShare));
        assert_eq!(Filter::parse("$share//a"), Err(FilterError::BadShare));
        assert!(Filter::parse("a/#/b").is_err());
    }

    #[test]
    fn plain_subscribers_each_get_a_copy_once() {
        let mut t = Subscriptions::default();
        sub(&mut t, "a", "x/+");
        sub(&mut t, "a", "x/#");
        sub(&mut t, "b", "x/y");
        sub(&mut t, "c", "z");
        assert_eq!(targets(&mut t, "x/y"), ["a", "b"]);
    }

    #[test]
    fn share_group_takes_turns() {
        let mut t = Subscriptions::default();
        for c in ["a", "b", "c"] {
            sub(&mut t, c, "$share/g/x/#");
        }
        let mut counts = HashMap::new();
        for _ in 0..30 {
            for c in targets(&mut t, "x/1") {
                *counts.entry(c).or_insert(0) += 1;
            }
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|&n| n == 10), "{counts:?}");
    }

    #[test]
    fn share_group_prefers_connected_members() {
        let mut t = Subscriptions::default();
        sub(&mut t, "a", "$share/g/x");
        sub(&mut t, "b", "$share/g/x");
        for _ in 0..5 {
            let r = t.route("x", "pub", |c| c == "b");
            assert_eq!(&*r[0].client, "b");
        }
    }

    #[test]
    fn oshare_keeps_a_topic_on_one_member() {
        let mut t = Subscriptions::default();
        sub(&mut t, "a", "$oshare/g/x/+");
        sub(&mut t, "b", "$oshare/g/x/+");
        let first = targets(&mut t, "x/1");
        for _ in 0..10 {
            assert_eq!(targets(&mut t, "x/1"), first);
        }
        let other = targets(&mut t, "x/2");
        assert_ne!(other, first, "the next topic goes to the next member");
        t.unsubscribe(&client(&first[0]), &Filter::parse("$oshare/g/x/+").unwrap());
        assert_eq!(targets(&mut t, "x/1"), other, "a leaving owner hands over");
    }

    #[test]
    fn a_full_shared_group_refuses_a_new_member_not_an_old_one() {
        let mut t = Subscriptions::default();
        let f = Filter::parse("$share/g/x").unwrap();
        let o = || opts(QoS::AtLeastOnce);
        assert_eq!(t.subscribe(&client("a"), &f, o(), Some(2)), Some(true));
        assert_eq!(t.subscribe(&client("b"), &f, o(), Some(2)), Some(true));
        assert_eq!(t.subscribe(&client("c"), &f, o(), Some(2)), None);
        // A member subscribing again is not a new member.
        assert_eq!(t.subscribe(&client("a"), &f, o(), Some(2)), Some(false));
        // Other groups and plain filters are not counted.
        let other = Filter::parse("$share/h/x").unwrap();
        assert_eq!(t.subscribe(&client("c"), &other, o(), Some(2)), Some(true));
        assert_eq!(targets(&mut t, "x").len(), 2);
        assert!(t.unsubscribe(&client("b"), &f));
        assert_eq!(t.subscribe(&client("c"), &f, o(), Some(2)), Some(true));
    }

    #[test]
    fn no_local_skips_the_publisher() {
        let mut t = Subscriptions::default();
        let mut o = opts(QoS::AtMostOnce);
        o.no_local = true;
        t.subscribe(&client("pub"), &Filter::parse("x").unwrap(), o, None);
        assert!(t.route("x", "pub", |_| true).is_empty());
        assert_eq!(t.route("x", "other", |_| true).len(), 1);
    }

    #[test]
    fn remove_client_leaves_nothing() {
        let mut t = Subscriptions::default();
        sub(&mut t, "a", "x");
        sub(&mut t, "a", "$share/g/x");
        t.remove_client(&client("a"));
        assert!(t.list().is_empty());
        assert!(targets(&mut t, "x").is_empty());
    }
}
