//! Bidirectional mirrors and rings without loops (issue #4): every message reaches every broker
//! once, nothing echoes, nothing circulates.

mod support;

use std::time::Duration;
use support::*;

fn broker(name: &str, port: u16, proto: &str) -> String {
    format!(
        "[brokers.{name}]\nurl = \"mqtt://127.0.0.1:{port}\"\nprotocol = \"{proto}\"\nsession_expiry = \"1h\"\n\n"
    )
}

fn route(name: &str, from: &str, to: &str, topics: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nfrom = \"{from}\"\nto = \"{to}\"\ntopics = [\"{topics}\"]\nqos = 1\npool_size = 2\n\n"
    )
}

/// Two routes mirror `m/#` between A and B: 200 QoS 1 messages published on each side arrive
/// exactly once on the other, and a subscriber on each broker sees 400, no echo, no loss.
async fn mirror(pa: Proto, pb: Proto) {
    mirror_with(pa, pb, "").await
}

/// [`mirror`] with `extra` keys in both routes.
async fn mirror_with(pa: Proto, pb: Proto, extra: &str) {
    let a = Mosquitto::start().await;
    let b = Mosquitto::start().await;
    let toml = format!(
        "[bridge]\nname = \"mirror\"\ninstance = \"t{}\"\n\n{}{}{}{}",
        a.port(),
        broker("a", a.port(), pa.as_config()),
        broker("b", b.port(), pb.as_config()),
        route("a-to-b", "a", "b", "m/#") + extra,
        route("b-to-a", "b", "a", "m/#") + extra,
    );
    let on_a = Collector::start(a.port(), Proto::V5, "m/#", 1).await;
    let on_b = Collector::start(b.port(), Proto::V5, "m/#", 1).await;
    let mut bridge = start_ready(&toml, 4).await;

    let (ap, bp) = (a.port(), b.port());
    let pub_a = tokio::spawn(async move {
        publish_numbered(ap, pa, |i| format!("m/a/{}", i % 4), 1, 0, 200, "A").await
    });
    let pub_b = tokio::spawn(async move {
        publish_numbered(bp, pb, |i| format!("m/b/{}", i % 4), 1, 0, 200, "B").await
    });
    pub_a.await.unwrap();
    pub_b.await.unwrap();
    for (side, c) in [("A", &on_a), ("B", &on_b)] {
        assert!(
            c.wait_for_count(400, Duration::from_secs(20)).await,
            "{side} saw {}\n{}",
            c.count(),
            bridge.log()
        );
        c.settle(Duration::from_millis(500), Duration::from_secs(3))
            .await;
        let rx = c.received();
        assert_eq!(rx.len(), 400, "{side}: no echo ({} received)", rx.len());
        assert_exactly_once(&rx, "A", 0..200);
        assert_exactly_once(&rx, "B", 0..200);
    }
    assert!(
        bridge
            .stop(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success())
    );
    let log = bridge.log();
    let final_lines: Vec<_> = log
        .lines()
        .filter(|l| l.contains(" final route="))
        .collect();
    assert_eq!(final_lines.len(), 2, "{log}");
    for l in final_lines {
        assert!(
            l.contains("loops=200"),
            "each route suppressed the 200 echoes of the other: {l}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_v5_v5() {
    mirror(Proto::V5, Proto::V5).await;
}

/// `loop_markers = "auto"` writes them where `check` finds the loop: the mirror stays cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_v5_v5_with_auto_markers() {
    mirror_with(Proto::V5, Proto::V5, "loop_markers = \"auto\"\n").await;
}

/// What a v5 target receives with each `loop_markers`, on a route that is in no loop: "always"
/// marks it (the broker named by its id, a hash, not host:port), "auto" and "off" do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_markers_always_auto_and_off_on_a_route_in_no_loop() {
    let (src, dst) = (Mosquitto::start().await, Mosquitto::start().await);
    let hashed = mqbridge::config::default_broker_id("127.0.0.1", src.port());
    for (mode, expected) in [
        (
            "always",
            vec![("mqbridge-via", "test"), ("mqbridge-from", hashed.as_str())],
        ),
        ("auto", vec![]),
        ("off", vec![]),
    ] {
        let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
        cfg.qos = 1;
        cfg.route_extra = format!("loop_markers = \"{mode}\"");
        let topic = format!("in/{mode}");
        let collector = Collector::start(dst.port(), Proto::V5, &topic, 1).await;
        let mut bridge = start_ready(&cfg.toml(), 1).await;
        publish_numbered(src.port(), Proto::V5, |_| topic.clone(), 1, 0, 3, mode).await;
        assert!(
            collector.wait_for_count(3, Duration::from_secs(10)).await,
            "{mode}: {}",
            bridge.log()
        );
        for r in collector.received() {
            let markers: Vec<(&str, &str)> = r
                .user_properties
                .iter()
                .filter(|(k, _)| k.starts_with("mqbridge-"))
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert_eq!(markers, expected, "{mode}");
        }
        bridge.stop_cleanly().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_v311_v311() {
    mirror(Proto::V311, Proto::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_v5_v311() {
    mirror(Proto::V5, Proto::V311).await;
}

/// A ring A→B→C→A of three bridges (v5): each message reaches each broker once and stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_of_three_bridges_delivers_once_and_stops() {
    let brokers = [
        Mosquitto::start().await,
        Mosquitto::start().await,
        Mosquitto::start().await,
    ];
    let names = ["a", "b", "c"];
    let collectors = [
        Collector::start(brokers[0].port(), Proto::V5, "m/#", 1).await,
        Collector::start(brokers[1].port(), Proto::V5, "m/#", 1).await,
        Collector::start(brokers[2].port(), Proto::V5, "m/#", 1).await,
    ];
    let mut bridges = Vec::new();
    for i in 0..3 {
        let (from, to) = (i, (i + 1) % 3);
        let toml = format!(
            "[bridge]\nname = \"ring-{}\"\ninstance = \"t{}\"\n\n{}{}{}",
            names[i],
            brokers[0].port(),
            broker(names[from], brokers[from].port(), "5"),
            broker(names[to], brokers[to].port(), "5"),
            route("next", names[from], names[to], "m/#"),
        );
        bridges.push(start_ready(&toml, 2).await);
    }
    for (i, b) in brokers.iter().enumerate() {
        let prefix = names[i].to_uppercase();
        publish_numbered(b.port(), Proto::V5, |n| format!("m/{n}"), 1, 0, 50, &prefix).await;
    }
    for (i, c) in collectors.iter().enumerate() {
        assert!(
            c.wait_for_count(150, Duration::from_secs(20)).await,
            "broker {} saw {}",
            names[i],
            c.count()
        );
        c.settle(Duration::from_millis(700), Duration::from_secs(3))
            .await;
        let rx = c.received();
        assert_eq!(
            rx.len(),
            150,
            "broker {}: each message once, none circulating",
            names[i]
        );
        for p in ["A", "B", "C"] {
            assert_exactly_once(&rx, p, 0..50);
        }
    }
    for mut b in bridges {
        assert!(
            b.stop(Duration::from_secs(10))
                .await
                .is_some_and(|s| s.success())
        );
    }
}

/// `check` on a mirror prints the loop analysis; a loop through 3.x brokers with the echo
/// digest off cannot be cut, so `check` exits 2 and says why.
#[test]
fn check_reports_mirror_loops_and_refuses_an_uncuttable_one() {
    let mirror = |proto: &str, extra: &str| {
        format!(
            "[bridge]\nname = \"m\"\n{extra}\n{}{}{}{}",
            broker("a", 20001, proto),
            broker("b", 20002, proto),
            route("a-to-b", "a", "b", "m/#"),
            route("b-to-a", "b", "a", "m/#"),
        )
    };
    let ok = write_temp("mirror.toml", &mirror("5", ""));
    let out = mqbridge_cli(&["check", "-c", ok.to_str().unwrap()], &[]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stdout
            .contains("could loop: a-to-b (a → b) and b-to-a (b → a)"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("mqbridge-via marker"), "{}", out.stdout);

    let v3 = write_temp("mirror3.toml", &mirror("3.1.1", ""));
    let out = mqbridge_cli(&["check", "-c", v3.to_str().unwrap()], &[]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("digest"), "{}", out.stdout);

    let bad = write_temp(
        "mirror-bad.toml",
        &mirror("3.1.1", "loop_digest_window = \"0s\""),
    );
    let out = mqbridge_cli(&["check", "-c", bad.to_str().unwrap()], &[]);
    assert_eq!(out.code(), Some(2));
    assert!(
        out.stderr.contains("bridge.loop_digest_window"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("around forever"), "{}", out.stderr);

    // A v5 mirror with markers off has nothing to cut it either.
    let off = write_temp(
        "mirror-off.toml",
        &mirror("5", "").replace("pool_size = 2\n", "pool_size = 2\nloop_markers = \"off\"\n"),
    );
    let out = mqbridge_cli(&["check", "-c", off.to_str().unwrap()], &[]);
    assert_eq!(out.code(), Some(2), "{}", out.stdout);
    assert!(
        out.stderr.contains("loop_markers = \"off\""),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("around forever"), "{}", out.stderr);
    // "auto" marks both routes of the loop, and check says so.
    let auto = write_temp(
        "mirror-auto.toml",
        &mirror("5", "").replace(
            "pool_size = 2\n",
            "pool_size = 2\nloop_markers = \"auto\"\n",
        ),
    );
    let out = mqbridge_cli(&["check", "-c", auto.to_str().unwrap()], &[]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(
        out.stdout
            .matches(r#"loop markers: mqbridge-via / mqbridge-from added (loop_markers = "auto")"#)
            .count(),
        2,
        "{}",
        out.stdout
    );
}
