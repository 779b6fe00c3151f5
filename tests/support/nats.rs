//! A real NATS server with its MQTT listener (MQTT 3.1.1 only, JetStream behind it) on private
//! ports of 127.0.0.1. It has no shared subscriptions: `$share/g/f` is a literal filter there.

use super::process::kill_and_reap;
use super::temp::{TestDir, free_port};
use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const NATS: &str = "/usr/sbin/nats-server";

pub struct Nats {
    mqtt_port: u16,
    dir: TestDir,
    child: Option<Child>,
}

impl Nats {
    /// Starts `nats-server` with JetStream in its own directory and waits until its MQTT port
    /// accepts connections. `None` when nats-server is not installed.
    pub async fn start() -> Option<Nats> {
        if !std::path::Path::new(NATS).exists() {
            return None;
        }
        let dir = TestDir::new("nats");
        let (client, mqtt) = (free_port(), free_port());
        let conf = dir.write(
            "nats.conf",
            &format!(
                "listen: 127.0.0.1:{client}\nserver_name: t{client}\n\
                 jetstream {{ store_dir: \"{}\" }}\n\
                 mqtt {{ listen: 127.0.0.1:{mqtt} }}\n",
                dir.path().join("js").display()
            ),
        );
        let out = File::create(dir.path().join("nats.out")).expect("create nats.out");
        let child = Command::new(NATS)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::from(out.try_clone().expect("dup")))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("spawn nats-server");
        let nats = Nats {
            mqtt_port: mqtt,
            dir,
            child: Some(child),
        };
        let up = super::wait_until_async(Duration::from_secs(20), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", mqtt))
                .await
                .is_ok()
        })
        .await;
        assert!(up, "nats-server did not listen:\n{}", nats.log());
        Some(nats)
    }

    pub fn mqtt_port(&self) -> u16 {
        self.mqtt_port
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.out")).unwrap_or_default()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c);
        }
    }
}
