//! The migration playbook's config, run as written (URLs from the environment, as
//! docs/migration.md says): retained messages are copied from the old broker to the new one,
//! deletions follow, and live traffic is mirrored both ways exactly once (issue #4).

mod support;

use std::time::Duration;
use support::*;

/// Retained messages a fresh subscriber on `port` gets: (topic, payload), sorted.
async fn retained_on(port: u16) -> Vec<(String, String)> {
    let c = Collector::start(port, Proto::V5, "#", 1).await;
    c.settle(Duration::from_millis(300), Duration::from_secs(2))
        .await;
    let mut got: Vec<_> = c
        .received()
        .iter()
        .filter(|r| r.retain)
        .map(|r| (r.topic.clone(), r.payload_str()))
        .collect();
    c.disconnect().await;
    got.sort();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_config_copies_retained_and_mirrors_both_ways() {
    let old = Mosquitto::start().await;
    let new = Mosquitto::start().await;
    for (topic, payload) in [("state/a", "1"), ("state/b", "2"), ("state/gone", "x")] {
        publish_one(old.port(), Proto::V5, topic, 1, true, payload).await;
    }
    publish_one(old.port(), Proto::V5, "state/gone", 1, true, "").await; // deleted before the copy

    let toml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/migration.toml"
    ))
    .unwrap();
    let old_url = format!("mqtt://127.0.0.1:{}", old.port());
    let new_url = format!("mqtt://127.0.0.1:{}", new.port());
    let instance = format!("t{}", old.port());
    let mut bridge = Bridge::start_with_env(
        &toml,
        &[
            ("MQBRIDGE__BROKERS__OLD__URL", &old_url),
            ("MQBRIDGE__BROKERS__NEW__URL", &new_url),
            ("MQBRIDGE__BRIDGE__INSTANCE", &instance),
        ],
    );
    wait_ready(&bridge, 2, 1).await;

    // Retained messages were copied; the deleted one was not resurrected.
    let want = vec![
        ("state/a".to_string(), "1".to_string()),
        ("state/b".to_string(), "2".to_string()),
    ];
    let new_port = new.port();
    let ok = wait_until_async(Duration::from_secs(10), || {
        let want = want.clone();
        async move { retained_on(new_port).await == want }
    })
    .await;
    assert!(
        ok,
        "new has {:?}\n{}",
        retained_on(new.port()).await,
        bridge.log()
    );

    // A deletion on the old broker during the cut-over deletes the copy too.
    publish_one(old.port(), Proto::V5, "state/b", 1, true, "").await;
    let ok = wait_until_async(Duration::from_secs(10), || async {
        retained_on(new.port()).await == vec![("state/a".to_string(), "1".to_string())]
    })
    .await;
    assert!(ok, "new has {:?}", retained_on(new.port()).await);

    // Live traffic both ways, once each side, while clients are split between the brokers.
    let on_old = Collector::start(old.port(), Proto::V5, "live/#", 1).await;
    let on_new = Collector::start(new.port(), Proto::V5, "live/#", 1).await;
    publish_numbered(
        old.port(),
        Proto::V5,
        |i| format!("live/old/{i}"),
        1,
        0,
        100,
        "O",
    )
    .await;
    publish_numbered(
        new.port(),
        Proto::V311,
        |i| format!("live/new/{i}"),
        1,
        0,
        100,
        "N",
    )
    .await;
    for (side, c) in [("old", &on_old), ("new", &on_new)] {
        assert!(
            c.wait_for_count(200, Duration::from_secs(15)).await,
            "{side}: {}",
            c.count()
        );
        c.settle(Duration::from_millis(500), Duration::from_secs(3))
            .await;
        let rx = c.received();
        assert_eq!(rx.len(), 200, "{side}: no echo");
        assert_exactly_once(&rx, "O", 0..100);
        assert_exactly_once(&rx, "N", 0..100);
    }
    // The retained copy did not bounce back to the old broker as a second copy.
    assert_eq!(
        retained_on(old.port()).await,
        vec![("state/a".to_string(), "1".to_string())]
    );
    assert!(
        bridge
            .stop(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success())
    );
}
