//! Test support for the workspace's end-to-end tests (one module tree, used by every crate's
//! tests): real upstreams on ephemeral ports, a real nginx process, and a raw HTTP/1.1 client that
//! can send any Host header.
//!
//! - [`upstream`]: HTTP echo (counts connections), server-sent events, WebSocket echo, and a
//!   WebSocket server that answers 101 instantly, and a raw server that records every request
//!   head it receives and answers as scripted.
//! - [`nginx`]: runs nginx with a given config, stopped (by its PID) on drop.
//! - [`client`]: one request on a fresh or given connection, the whole response read.
//! - [`tls`]: a certificate authority made in the test and a client connector trusting it.
//! - [`control`]: a control-plane stand-in that verifies the ingress's tokens.
//! - [`redis`]: a Redis server of the test's own, to kill and start again.
//! - [`relay`]: a TCP relay the test can cut and restore (fault tests: a database outage).

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test support fails loudly
#![allow(clippy::result_large_err)] // tungstenite's handshake callback signature, not ours

pub mod client;
pub mod control;
pub mod netns;
pub mod nginx;
pub mod redis;
pub mod relay;
pub mod tls;
pub mod upstream;

use std::net::{SocketAddr, TcpListener};

/// A free port on 127.0.0.1 for a process that cannot report the port it bound (nginx, Pingora,
/// an in-process ingress), reserved for the rest of this test process.
///
/// A port the kernel hands out for `127.0.0.1:0` and that is then released can be handed out
/// again (to another test process reserving one, or as the source port of any connection)
/// before the server meant to bind it has: a full run once sent a test's requests to another
/// test's admin listener. So ports are taken below the kernel's ephemeral range (never a
/// source port) and each is held by an advisory lock on a file named after it, which other
/// test processes respect and the kernel drops when this process ends, however it ends.
pub fn reserve_port() -> u16 {
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let Some((low, high)) = reservable_ports() else {
        return kernel_port();
    };
    let dir = std::env::temp_dir().join("pinacle-test-ports");
    if std::fs::create_dir_all(&dir).is_err() {
        return kernel_port();
    }
    let start = {
        use std::hash::{BuildHasher, RandomState};
        RandomState::new().hash_one(std::process::id())
    };
    let span = u64::from(high - low) + 1;
    for attempt in 0..2_000u64 {
        let port = low + u16::try_from((start + attempt * 7_919) % span).unwrap_or(0);
        let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
        else {
            continue;
        };
        if file.try_lock().is_err() || TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        HELD.lock().unwrap_or_else(|e| e.into_inner()).push(file);
        return port;
    }
    kernel_port()
}

/// Ports below the kernel's ephemeral range, from 20000 (none when that range starts lower).
fn reservable_ports() -> Option<(u16, u16)> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let first: u16 = range.split_whitespace().next()?.parse().ok()?;
    (first > 21_000).then(|| (20_000, first - 1))
}

/// A port the kernel chose, bound and released (where no better is possible).
fn kernel_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Waits (bounded, 10 s) until something accepts TCP connections on `addr`.
pub async fn wait_for_port(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing listens on {addr} after 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The value of one series in Prometheus text (`name{labels}` exactly as rendered), 0 when
/// absent (a series not yet created reads as zero, as Prometheus would count it).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
