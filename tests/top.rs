//! `mqbridge top` and the `/status` endpoint behind it, against a running bridge between two
//! mosquittos: the JSON counts what was published, and `top --once` (stdout not a terminal)
//! prints the plain table with a line per route and per pair. Nothing here depends on speed.

mod support;

use std::time::Duration;
use support::*;

const PUBLISHED: u64 = 200;

/// A two-pair QoS 1 route `in/#` from `src` to `dst` with the admin endpoint on a free port.
fn config(src: &Mosquitto, dst: &Mosquitto) -> (RouteConfig, String) {
    let admin = format!("127.0.0.1:{}", free_port());
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.pool_size = 2;
    cfg.qos = 1;
    cfg.tail = format!("\n[admin]\nlisten = \"{admin}\"\n");
    (cfg, admin)
}

async fn status(admin: &str) -> serde_json::Value {
    let (code, body) = http_get(admin, "/status")
        .await
        .unwrap_or_else(|| panic!("no answer from http://{admin}/status"));
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// `mqbridge <args>` off the async threads (it takes a couple of polls).
async fn top(args: &[&str]) -> CliOutput {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        mqbridge_cli(&args, &[])
    })
    .await
    .expect("mqbridge top ran")
}

/// The whitespace-separated fields of the first line of `table` that starts with `start`.
fn line_fields<'a>(table: &'a str, start: &str) -> Vec<&'a str> {
    table
        .lines()
        .find(|l| l.starts_with(start))
        .unwrap_or_else(|| panic!("no line starting with {start:?} in:\n{table}"))
        .split_whitespace()
        .collect()
}

/// "in flight/window" as two numbers, the window above zero.
fn in_flight_and_window(cell: &str) -> (u64, u64) {
    let parsed = cell
        .split_once('/')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
    match parsed {
        Some((in_flight, window)) if window > 0 => (in_flight, window),
        _ => panic!("{cell:?} is not in-flight/window"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_top_show_the_routes_and_pairs_of_a_running_bridge() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let (cfg, admin) = config(&src, &dst);
    let bridge = start_ready(&cfg.toml(), 2).await;

    publish_numbered(
        src.port(),
        Proto::V5,
        |i| format!("in/{}", i % 10),
        1,
        0,
        PUBLISHED as u32,
        "m",
    )
    .await;

    // (a) /status: every message counted once the target's acks are in.
    let mut s = status(&admin).await;
    let mut done = false;
    for _ in 0..400 {
        if s["routes"][0]["forwarded"].as_u64() >= Some(PUBLISHED) {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        s = status(&admin).await;
    }
    assert!(
        done,
        "forwarded never reached {PUBLISHED}: {s:#}\n{}",
        bridge.log()
    );
    assert_eq!(s["bridge"], "test");
    assert_eq!(s["instance"], format!("t{}", src.port()));
    assert!(s["uptime_s"].is_u64(), "{s:#}");
    let route = &s["routes"][0];
    assert_eq!(route["name"], "r");
    assert_eq!(route["source"], "src");
    assert_eq!(route["target"], "dst");
    assert_eq!(route["received"], PUBLISHED, "{s:#}");
    assert_eq!(route["forwarded"], PUBLISHED, "{s:#}");
    assert_eq!(route["pairs_ready"], 2, "{s:#}");
    assert_eq!(route["in_flight"], 0, "{s:#}");
    assert!(route["window"].as_u64() > Some(0), "{s:#}");
    assert_eq!(route["dropped"]["refused"], 0, "{s:#}");
    assert!(route["spool"].is_null(), "{s:#}");
    let pairs = route["pairs"].as_array().expect("pairs listed");
    assert_eq!(pairs.len(), 2, "{s:#}");
    for (i, pair) in pairs.iter().enumerate() {
        assert_eq!(pair["index"], i, "{s:#}");
        assert_eq!(pair["state"], "ready", "{s:#}");
        assert_eq!(pair["source_up"], true, "{s:#}");
        assert_eq!(pair["target_up"], true, "{s:#}");
        assert!(pair["window"].as_u64() > Some(0), "{s:#}");
    }
    let per_pair: u64 = pairs.iter().filter_map(|p| p["forwarded"].as_u64()).sum();
    assert_eq!(
        per_pair, PUBLISHED,
        "the route is the sum of its pairs: {s:#}"
    );

    // (b) `top --once` with stdout a pipe: one plain table, a line per route and per pair.
    let out = top(&["top", "--admin", &admin, "--once", "--interval", "300ms"]).await;
    assert_eq!(out.code(), Some(0), "{out:?}");
    let table = &out.stdout;
    assert!(
        table.starts_with("mqbridge top: bridge test (instance t"),
        "{table}"
    );
    let header = line_fields(table, "ROUTE / PAIR").join(" ");
    assert!(
        header.contains("STATE RECV/S FWD/S IN FLIGHT/WINDOW DROPS LAST ACK"),
        "{table}"
    );
    // r (src → dst)  ready  RECV/S  FWD/S  IN-FLIGHT/WINDOW  DROPS  LAST-ACK
    let route_line = line_fields(table, "r (src → dst)");
    assert_eq!(route_line[4], "ready", "{table}");
    in_flight_and_window(route_line[7]);
    assert_eq!(route_line[8], "0", "no drops: {table}");
    for (i, pair) in pairs.iter().enumerate() {
        // "  pair I  ready  RECV/S  FWD/S  IN-FLIGHT/WINDOW  DROPS  LAST-ACK"
        let pair_line = line_fields(table, &format!("  pair {i}"));
        assert_eq!(pair_line[2], "ready", "{table}");
        for rate in &pair_line[3..5] {
            assert!(
                rate.parse::<f64>().is_ok(),
                "a rate after two polls: {table}"
            );
        }
        let (_, window) = in_flight_and_window(pair_line[5]);
        assert_eq!(
            Some(window),
            pair["window"].as_u64(),
            "the pair's window: {table}"
        );
    }
    assert_eq!(
        table.lines().count(),
        5,
        "title, header, route, 2 pairs: {table}"
    );

    // The address from the config's [admin] listen.
    let config = bridge
        .config_path()
        .to_str()
        .expect("utf-8 path")
        .to_owned();
    let out = top(&["top", "-c", &config, "--once", "--interval", "200ms"]).await;
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        out.stdout.contains(&format!("admin {admin}")),
        "{}",
        out.stdout
    );
    line_fields(&out.stdout, "  pair 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_without_a_bridge_exits_1_naming_the_address() {
    let addr = format!("127.0.0.1:{}", free_port());
    for args in [
        vec!["top", "--admin", addr.as_str(), "--once"],
        // Not --once, stdout a pipe: the plain table's loop never starts.
        vec!["top", "--admin", addr.as_str()],
    ] {
        let out = top(&args).await;
        assert_eq!(out.code(), Some(1), "{args:?}: {out:?}");
        assert!(
            out.stderr.contains(&format!(
                "cannot reach the admin endpoint at {addr}: connection refused (is mqbridge \
                 running with [admin] listen = \"{addr}\"?)"
            )),
            "{args:?}: {}",
            out.stderr
        );
        assert!(out.stdout.is_empty(), "{}", out.stdout);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_with_a_config_without_an_admin_table_says_so() {
    let dir = TestDir::new("top");
    let cfg = RouteConfig::new(free_port(), Proto::V5, free_port(), Proto::V5);
    let path = dir.write("bridge.toml", &cfg.toml());
    let path = path.to_str().expect("utf-8 path").to_owned();
    let out = top(&["top", "-c", &path, "--once"]).await;
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains("has no [admin] table"),
        "{}",
        out.stderr
    );
}
