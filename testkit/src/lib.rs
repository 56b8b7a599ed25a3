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
pub mod nginx;
pub mod redis;
pub mod relay;
pub mod tls;
pub mod upstream;

use std::net::{SocketAddr, TcpListener};

/// A free port on 127.0.0.1 for a process that cannot report the port it bound (nginx, Pingora):
/// bound and released; the kernel does not hand it out again right away.
pub fn reserve_port() -> u16 {
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
