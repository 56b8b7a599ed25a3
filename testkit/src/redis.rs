//! A Redis server of the test's own on a free port (`redis-server` from the distribution), which
//! the test may kill and start again on the same port. Never the machine's Redis.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

/// A running `redis-server`, killed (by its PID) when dropped.
#[derive(Debug)]
pub struct RedisServer {
    /// Where it listens.
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a free port of 127.0.0.1 (nothing kept on disk) and waits until it
    /// accepts connections.
    pub async fn start() -> Self {
        let port = crate::reserve_port();
        let mut server = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: None,
        };
        server.restart().await;
        server
    }

    /// `redis://` URL.
    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Kills it (SIGKILL, by PID) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (empty) and waits until it accepts connections.
    pub async fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.addr.port().to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt install redis-server; scripts/test installs it)");
        self.child = Some(child);
        crate::wait_for_port(self.addr).await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
