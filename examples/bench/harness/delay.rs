//! `--delay`: a long link in front of broker B. Every byte crosses it `one_way` after it was
//! sent, in each direction, in order, without holding back the bytes behind it (a link's
//! latency, not a throttle), so a window of W messages carries at most W per round trip.

use std::{io, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
    time::Instant,
};

/// A listening delay proxy; dropping it stops it (and its connections).
pub struct Link {
    pub port: u16,
    task: JoinHandle<()>,
}

impl Link {
    /// Listens on a free loopback port and forwards every connection to `127.0.0.1:target`.
    pub async fn start(target: u16, one_way: Duration) -> io::Result<Link> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                conns.spawn(forward(client, target, one_way));
            }
        });
        Ok(Link { port, task })
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(mut client: TcpStream, target: u16, one_way: Duration) {
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", target)).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    tokio::select! {
        _ = delayed(&mut cr, &mut sw, one_way) => {}
        _ = delayed(&mut sr, &mut cw, one_way) => {}
    }
}

/// Copies `from` → `to`, each chunk `one_way` after it was read (also the test proxy's latency,
/// `tests/support/proxy.rs`).
pub async fn delayed<R, W>(from: &mut R, to: &mut W, one_way: Duration)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(4096);
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0
                || tx
                    .send((Instant::now() + one_way, buf[..n].to_vec()))
                    .await
                    .is_err()
            {
                return;
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(read, write);
}
