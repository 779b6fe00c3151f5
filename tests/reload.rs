//! SIGHUP reload (issue #5): the bridge reads its config file again and applies it route by
//! route. Unchanged routes keep running untouched (no message lost or doubled, no reconnect),
//! changed ones restart with their new settings, added ones start, removed ones stop; a broken
//! file changes nothing and is reported as `check` reports it; `[bridge]` changes wait for a
//! restart; a changed password restarts the routes that use it and is never logged.

mod support;

use std::time::Duration;
use support::*;

/// Messages of the `k/#` stream kept flowing across the reload.
const STREAM: u32 = 2000;

/// `keep` (`k/#`, 2 pairs) and `change` (`c/#` rewritten to `<change_to>/…`) from `src` to
/// `dst`, then `others` (more `[[routes]]`), and the admin endpoint on `admin`.
fn config(src: &Mosquitto, dst: &Mosquitto, admin: &str, change_to: &str, others: &str) -> String {
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.name = "keep";
    cfg.topics = r#"["k/#"]"#;
    cfg.qos = 1;
    cfg.pool_size = 2;
    cfg.tail = format!(
        r#"
[[routes]]
name = "change"
from = "src"
to = "dst"
topics = ["c/#"]
qos = 1

[[routes.rewrite]]
match = "c/#"
to = "{change_to}/{{1}}"
{others}
[admin]
listen = "{admin}"
"#
    );
    cfg.toml()
}

/// A plain route `name` on `filter` from `src` to `dst`.
fn plain_route(name: &str, filter: &str) -> String {
    format!(
        "\n[[routes]]\nname = \"{name}\"\nfrom = \"src\"\nto = \"dst\"\ntopics = [\"{filter}\"]\nqos = 1\n"
    )
}

/// Lines of the bridge log that have every one of `needles`.
fn log_lines(bridge: &Bridge, needles: &[&str]) -> usize {
    bridge
        .log()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

/// What arrived on topics starting with `prefix`.
fn on(c: &Collector, prefix: &str) -> Vec<Received> {
    c.received()
        .into_iter()
        .filter(|r| r.topic.starts_with(prefix))
        .collect()
}

async fn reloaded(bridge: &Bridge, round: usize) {
    let ok = wait_until(Duration::from_secs(10), || {
        log_lines(bridge, &["configuration reload"]) >= round
    })
    .await;
    assert!(ok, "no reload outcome logged; log:\n{}", bridge.log());
}

async fn metrics(admin: &str) -> String {
    http_get(admin, "/metrics")
        .await
        .unwrap_or_else(|| panic!("no answer from http://{admin}/metrics"))
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_restarts_only_what_changed_while_the_rest_keeps_every_message() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let admin = format!("127.0.0.1:{}", free_port());
    let collector = Collector::start_many(
        dst.port(),
        Proto::V5,
        &[
            ("k/#", 1),
            ("c/#", 1),
            ("old/#", 1),
            ("new/#", 1),
            ("a/#", 1),
            ("g/#", 1),
        ],
    )
    .await;
    let before = config(&src, &dst, &admin, "old", &plain_route("gone", "g/#"));
    // keep: 2 pairs, change: 1, gone: 1.
    let mut bridge = start_ready(&before, 4).await;

    publish_numbered(src.port(), Proto::V5, |i| format!("c/{i}"), 1, 0, 20, "c0").await;
    publish_numbered(src.port(), Proto::V5, |i| format!("g/{i}"), 1, 0, 20, "g0").await;
    assert!(
        collector
            .wait_for(Duration::from_secs(10), |r| {
                r.iter().filter(|m| m.topic.starts_with("old/")).count() >= 20
                    && r.iter().filter(|m| m.topic.starts_with("g/")).count() >= 20
            })
            .await,
        "before the reload: {} on old/, {} on g/\n{}",
        on(&collector, "old/").len(),
        on(&collector, "g/").len(),
        bridge.log()
    );

    // A QoS 1 stream through `keep` for the whole reload.
    let stream = tokio::spawn({
        let port = src.port();
        async move {
            let mut p = Publisher::connect(port, Proto::V5).await;
            p.publish_numbered(
                |i| format!("k/{i}"),
                1,
                0,
                STREAM,
                "k",
                Some(Duration::from_millis(2)),
            )
            .await;
            assert!(
                p.wait_acked(Duration::from_secs(30)).await,
                "stream not acked"
            );
            p.disconnect().await;
        }
    });
    assert!(
        collector
            .wait_for(Duration::from_secs(20), |r| {
                r.iter().filter(|m| m.topic.starts_with("k/")).count() >= 300
            })
            .await,
        "the stream does not flow"
    );

    // `change` gets a new rewrite, `gone` goes, `added` comes; `keep` is as it was.
    let after = config(&src, &dst, &admin, "new", &plain_route("added", "a/#"));
    bridge.rewrite_config(&after);
    bridge.hangup();
    reloaded(&bridge, 1).await;
    assert_eq!(
        log_lines(&bridge, &["configuration reloaded"]),
        1,
        "{}",
        bridge.log()
    );
    // change restarted (1 more), added started (1 more).
    wait_ready(&bridge, 6, 1).await;
    assert!(
        on(&collector, "k/").len() < STREAM as usize,
        "the stream ended before the reload was applied: make it longer"
    );

    publish_numbered(src.port(), Proto::V5, |i| format!("c/{i}"), 1, 0, 50, "c1").await;
    publish_numbered(src.port(), Proto::V5, |i| format!("a/{i}"), 1, 0, 50, "a1").await;
    publish_numbered(src.port(), Proto::V5, |i| format!("g/{i}"), 1, 0, 50, "g1").await;
    assert!(
        collector
            .wait_for(Duration::from_secs(10), |r| {
                count_ids(r, "c1", 0..50).unique == 50 && count_ids(r, "a1", 0..50).unique == 50
            })
            .await,
        "after the reload: c1 {}, a1 {}\n{}",
        count_ids(&collector.received(), "c1", 0..50),
        count_ids(&collector.received(), "a1", 0..50),
        bridge.log()
    );

    stream.await.expect("the stream publisher failed");
    collector
        .settle(Duration::from_millis(500), Duration::from_secs(20))
        .await;
    let received = collector.received();

    // Every message of the stream through the untouched route, once.
    let k = count_ids(&on(&collector, "k/"), "k", 0..STREAM);
    assert!(k.exactly_once(), "k/# stream across the reload: {k}");
    // The changed route: only the new rewrite after the reload, nothing unrewritten.
    let c1_new = count_ids(&on(&collector, "new/"), "c1", 0..50);
    assert!(
        c1_new.exactly_once(),
        "c/# after the reload on new/: {c1_new}"
    );
    assert_eq!(count_ids(&on(&collector, "old/"), "c1", 0..50).unique, 0);
    assert_eq!(count_ids(&on(&collector, "c/"), "c1", 0..50).unique, 0);
    assert!(count_ids(&received, "a1", 0..50).exactly_once());
    // The removed route forwards nothing any more.
    assert_eq!(
        count_ids(&received, "g1", 0..50).unique,
        0,
        "{}",
        bridge.log()
    );

    // `keep`'s pairs were never touched: connected once each, never stopped, no reconnect.
    assert_eq!(
        log_lines(&bridge, &["source connected", "route=keep"]),
        2,
        "{}",
        bridge.log()
    );
    assert_eq!(log_lines(&bridge, &["pair stopped", "route=keep"]), 0);
    assert_eq!(log_lines(&bridge, &["pair stopped", "route=gone"]), 1);
    assert_eq!(log_lines(&bridge, &["pair stopped", "route=change"]), 1);
    // The admin endpoint follows: `added` is there, `gone` is not once it drained.
    let ok = wait_until_async(Duration::from_secs(10), || async {
        let m = metrics(&admin).await;
        m.contains(r#"mqbridge_pairs{route="added"} 1"#) && !m.contains(r#"route="gone""#)
    })
    .await;
    let m = metrics(&admin).await;
    assert!(ok, "metrics after the reload:\n{m}");
    for line in [
        r#"mqbridge_reconnects_total{broker="src",route="keep"} 0"#,
        r#"mqbridge_reconnects_total{broker="dst",route="keep"} 0"#,
        r#"mqbridge_pairs_ready{route="keep"} 2"#,
        r#"mqbridge_pairs_ready{route="change"} 1"#,
    ] {
        assert!(m.lines().any(|l| l == line), "missing {line:?} in:\n{m}");
    }
    let (status, body) = http_get(&admin, "/readyz").await.expect("/readyz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("4 pairs"), "{body}");

    // SIGTERM still drains every route, those started by the reload included.
    let status = bridge.stop(Duration::from_secs(20)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", bridge.log());
    assert_eq!(log_lines(&bridge, &["pair stopped", "route=keep"]), 2);
    assert_eq!(log_lines(&bridge, &["pair stopped", "route=change"]), 2);
    assert_eq!(log_lines(&bridge, &["pair stopped", "route=added"]), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_is_rejected_with_its_key_and_the_running_config_stays() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    let collector =
        Collector::start_many(dst.port(), Proto::V5, &[("in/#", 1), ("out/#", 1)]).await;
    let bridge = start_ready(&cfg.toml(), 1).await;

    // A typo: `pool` for `pool_size`.
    let mut broken = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    broken.route_extra = "pool = 2".into();
    bridge.rewrite_config(&broken.toml());
    bridge.hangup();
    reloaded(&bridge, 1).await;
    let check = mqbridge_cli(
        &["check", "-c", bridge.config_path().to_str().unwrap()],
        &[],
    );
    assert_eq!(check.code(), Some(2));
    let message = check.stderr.trim().trim_start_matches("error: ");
    assert!(
        message.contains(r#"unknown key "pool" in routes[0]"#),
        "{message}"
    );
    let log = bridge.log();
    let rejected = log
        .lines()
        .find(|l| l.contains("configuration reload rejected"))
        .unwrap_or_else(|| panic!("no rejection logged:\n{log}"));
    assert!(
        rejected.contains(message),
        "check says {message:?}; the log: {rejected}"
    );

    // The old config runs on, untouched.
    publish_numbered(src.port(), Proto::V5, |i| format!("in/{i}"), 1, 0, 100, "m").await;
    assert!(
        collector.wait_for_count(100, Duration::from_secs(10)).await,
        "{}",
        bridge.log()
    );
    assert_exactly_once(&on(&collector, "in/"), "m", 0..100);
    assert_eq!(log_lines(&bridge, &["pair ready"]), 1);
    assert_eq!(log_lines(&bridge, &["pair stopped"]), 0);

    // Fixed, with a rewrite this time: the next SIGHUP applies it.
    let mut fixed = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    fixed.tail = "[[routes.rewrite]]\nmatch = \"in/#\"\nto = \"out/{1}\"\n".into();
    bridge.rewrite_config(&fixed.toml());
    bridge.hangup();
    reloaded(&bridge, 2).await;
    wait_ready(&bridge, 1, 2).await;
    publish_numbered(src.port(), Proto::V5, |i| format!("in/{i}"), 1, 0, 100, "n").await;
    assert!(
        collector
            .wait_for(Duration::from_secs(10), |r| count_ids(r, "n", 0..100)
                .unique
                == 100)
            .await,
        "{}",
        bridge.log()
    );
    assert_exactly_once(&on(&collector, "out/"), "n", 0..100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_settings_wait_for_a_restart_and_change_no_route() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let bridge = start_ready(&cfg.toml(), 1).await;

    // A new bridge name would change the default share group and client ids: not live.
    let renamed = cfg.toml().replace("name = \"test\"", "name = \"renamed\"");
    bridge.rewrite_config(&renamed);
    bridge.hangup();
    reloaded(&bridge, 1).await;
    assert_eq!(
        log_lines(&bridge, &["bridge.name changed, which needs a restart"]),
        1,
        "{}",
        bridge.log()
    );
    assert_eq!(
        log_lines(&bridge, &["configuration reloaded", "unchanged=[\"r\"]"]),
        1,
        "{}",
        bridge.log()
    );

    publish_numbered(src.port(), Proto::V5, |i| format!("in/{i}"), 1, 0, 100, "m").await;
    assert!(collector.wait_for_count(100, Duration::from_secs(10)).await);
    assert_exactly_once(&collector.received(), "m", 0..100);
    assert_eq!(log_lines(&bridge, &["pair ready"]), 1);
    assert_eq!(log_lines(&bridge, &["pair stopped"]), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_password_restarts_the_route_and_is_never_logged() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.dst_extra = "username = \"bridge\"\npassword = \"first-Secret-1\"\n".into();
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let bridge = start_ready(&cfg.toml(), 1).await;

    cfg.dst_extra = "username = \"bridge\"\npassword = \"second-Secret-2\"\n".into();
    bridge.rewrite_config(&cfg.toml());
    bridge.hangup();
    reloaded(&bridge, 1).await;
    wait_ready(&bridge, 1, 2).await;
    assert_eq!(
        log_lines(&bridge, &["route changed", "brokers.dst.password"]),
        1,
        "{}",
        bridge.log()
    );

    publish_numbered(src.port(), Proto::V5, |i| format!("in/{i}"), 1, 0, 100, "m").await;
    assert!(collector.wait_for_count(100, Duration::from_secs(10)).await);
    assert_exactly_once(&collector.received(), "m", 0..100);
    let log = bridge.log();
    assert!(
        !log.contains("Secret-"),
        "a password reached the log:\n{log}"
    );
}

/// A route whose topics changed across a restart resumes its persistent session, which still
/// holds the old subscription: what arrives through it is not forwarded (and is counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_left_in_a_resumed_session_by_an_older_config_are_not_forwarded() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.qos = 1;
    cfg.topics = r#"["old/#"]"#;
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    assert!(
        bridge
            .stop(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success())
    );

    cfg.topics = r#"["new/#"]"#;
    let collector = Collector::start(dst.port(), Proto::V5, "#", 1).await;
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    assert!(
        bridge.log().contains("session_present=true"),
        "{}",
        bridge.log()
    );
    publish_one(src.port(), Proto::V5, "old/x", 1, false, "stale").await;
    publish_one(src.port(), Proto::V5, "new/x", 1, false, "fresh").await;
    assert!(collector.wait_for_count(1, Duration::from_secs(10)).await);
    collector
        .settle(Duration::from_millis(500), Duration::from_secs(2))
        .await;
    let topics: Vec<_> = collector
        .received()
        .iter()
        .map(|r| r.topic.clone())
        .collect();
    assert_eq!(topics, ["new/x"]);
    assert!(
        bridge.log().contains("older subscriptions"),
        "{}",
        bridge.log()
    );
    assert!(
        bridge
            .stop(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success())
    );
}
