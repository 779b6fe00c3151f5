//! `mqbridge top`: a live view of a running bridge, from its admin endpoint's `/status`. One row
//! per route and per pair (state, msg/s, in flight against the window, drops, age of the last
//! ack), refreshed every interval. A full-screen table (ratatui) when stdout is a terminal, a
//! plain text table per interval otherwise or with `--once`.

pub mod tui;
pub mod view;

use std::{
    io::{IsTerminal, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;

use self::view::Sample;
use crate::admin::status::Status;

/// How long one poll may take before it counts as failed.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct TopOptions {
    /// The admin endpoint, `host:port`.
    pub admin: String,
    pub interval: Duration,
    /// One plain table (after two polls, so the rates are real), then exit.
    pub once: bool,
}

/// Where to find the admin endpoint: `--admin` if given, else the config's `[admin] listen`
/// (a wildcard address is reached on loopback), else the default `listen`.
pub fn admin_address(admin: Option<&str>, config: Option<&Path>) -> anyhow::Result<String> {
    if let Some(addr) = admin {
        return Ok(addr.to_owned());
    }
    let Some(path) = config else {
        return Ok(crate::config::schema::default_admin_listen());
    };
    let plan = crate::config::load_plan(path)?;
    let Some(listen) = plan.admin_listen else {
        anyhow::bail!(
            "{} has no [admin] table, so the bridge serves no /status; add [admin] listen = \"{}\" \
             and restart it, or give --admin ADDR",
            path.display(),
            crate::config::schema::default_admin_listen()
        );
    };
    Ok(reachable(listen).to_string())
}

/// `0.0.0.0:9464` listens everywhere; this machine reaches it on loopback.
fn reachable(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, listen.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, listen.port()).into(),
        _ => listen,
    }
}

/// One `GET /status` on a fresh HTTP/1 connection. The error is a sentence for the operator.
pub async fn fetch(addr: &str) -> Result<Status, String> {
    match tokio::time::timeout(POLL_TIMEOUT, exchange(addr)).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "the admin endpoint at {addr} did not answer GET /status within {}s",
            POLL_TIMEOUT.as_secs()
        )),
    }
}

async fn exchange(addr: &str) -> Result<Status, String> {
    let unreachable = |cause: String| {
        format!(
            "cannot reach the admin endpoint at {addr}: {cause} (is mqbridge running with \
             [admin] listen = \"{addr}\"?)"
        )
    };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| unreachable(io_cause(&e)))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
    // Ends when the sender is dropped, at the end of this exchange.
    tokio::spawn(connection);
    let request = Request::get("/status")
        .header(header::HOST, addr)
        .header(header::ACCEPT, "application/json")
        .body(Empty::new())
        .map_err(|e| format!("cannot build GET /status for {addr}: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    if status == StatusCode::NOT_FOUND {
        return Err(format!(
            "the admin endpoint at {addr} has no /status (404): an mqbridge older than `top`, \
             or not mqbridge"
        ));
    }
    if status != StatusCode::OK {
        let text = String::from_utf8_lossy(&body);
        return Err(format!(
            "the admin endpoint at {addr} answered GET /status with {status}: {}",
            text.trim().chars().take(200).collect::<String>()
        ));
    }
    serde_json::from_slice(&body).map_err(|e| {
        format!("the admin endpoint at {addr} answered GET /status with something else than mqbridge's status: {e}")
    })
}

/// "connection refused" rather than "Connection refused (os error 111)".
fn io_cause(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused | ConnectionReset | TimedOut | HostUnreachable | NetworkUnreachable
        | AddrNotAvailable => e.kind().to_string(),
        _ => e.to_string(),
    }
}

/// Runs `top` until quit (or, with `--once` or a plain table, until done): `Err` when the
/// endpoint cannot be reached at the start, or with `--once` at all.
pub fn run(options: &TopOptions) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // The first poll decides whether there is anything to show.
    let first = runtime
        .block_on(fetch(&options.admin))
        .map_err(anyhow::Error::msg)?;
    let first = Sample {
        status: first,
        at: Instant::now(),
    };
    if !options.once && std::io::stdout().is_terminal() {
        tui::run(&runtime, options, first)?;
        Ok(())
    } else {
        runtime.block_on(plain(options, first))
    }
}

/// A plain table each interval, from the second poll on (the first has no rates). A failed poll
/// is said on stderr and the next one tried, except with `--once`.
async fn plain(options: &TopOptions, first: Sample) -> anyhow::Result<()> {
    let mut before = first;
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + options.interval,
        options.interval,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut printed = false;
    loop {
        tick.tick().await;
        let now = match fetch(&options.admin).await {
            Ok(status) => Sample {
                status,
                at: Instant::now(),
            },
            Err(e) if options.once => anyhow::bail!(e),
            Err(e) => {
                eprintln!("error: {e}");
                continue;
            }
        };
        let rows = view::rows(Some(&before), &now);
        let mut text = view::plain(&now.status, &options.admin, &rows);
        if printed {
            text.insert(0, '\n');
        }
        let mut out = std::io::stdout().lock();
        if out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            // The reader went away (`top | head`): nothing more to do.
            return Ok(());
        }
        printed = true;
        if options.once {
            return Ok(());
        }
        before = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listen_address_is_reached_on_loopback() {
        let r = |s: &str| reachable(s.parse().unwrap()).to_string();
        assert_eq!(r("0.0.0.0:9464"), "127.0.0.1:9464");
        assert_eq!(r("[::]:9464"), "[::1]:9464");
        assert_eq!(r("10.0.0.5:9000"), "10.0.0.5:9000");
    }

    #[test]
    fn without_config_or_flag_the_default_listen_address_is_used() {
        assert_eq!(admin_address(None, None).unwrap(), "127.0.0.1:9464");
        assert_eq!(
            admin_address(Some("127.0.0.1:1"), None).unwrap(),
            "127.0.0.1:1"
        );
    }

    #[test]
    fn a_refused_connection_names_the_address() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // A port just released: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let e = rt.block_on(fetch(&addr)).unwrap_err();
        assert_eq!(
            e,
            format!(
                "cannot reach the admin endpoint at {addr}: connection refused (is mqbridge \
                 running with [admin] listen = \"{addr}\"?)"
            )
        );
    }
}
