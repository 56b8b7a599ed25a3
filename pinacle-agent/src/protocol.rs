//! What the agent and the gateway agree on: the upgrade request that opens a tunnel, and
//! carrying a byte stream over an HTTP/2 stream with flow control.

use std::time::Duration;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The path of the upgrade request.
pub const PATH: &str = "/pinacle-agent/v1";
/// Its `Upgrade` token.
pub const UPGRADE: &str = "pinacle-agent-h2";
/// The server the agent speaks for.
pub const SERVER_HEADER: &str = "x-pinacle-server";
/// The largest request or response head either side reads.
pub const MAX_HEAD: usize = 8 * 1024;
/// How much is read from a socket at a time before it is offered to the HTTP/2 stream.
pub const CHUNK: usize = 16 * 1024;
/// The stream and connection windows (flow control): what may be in flight unread.
pub const STREAM_WINDOW: u32 = 1024 * 1024;
/// The connection's window.
pub const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
/// How often each side pings the other, and how long a ping may go unanswered.
pub const PING_EVERY: Duration = Duration::from_secs(10);
/// See [`PING_EVERY`].
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// The agent's upgrade request.
pub fn request_head(host: &str, server: &str, secret: &str) -> Vec<u8> {
    format!(
        "GET {PATH} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: {UPGRADE}\r\n\
         {SERVER_HEADER}: {server}\r\nAuthorization: Bearer {secret}\r\n\r\n"
    )
    .into_bytes()
}

/// [`read_head`]'s error when the peer closed before sending anything.
pub const NOTHING_READ: &str = "closed before the first byte";

/// Reads one head (up to and including the blank line) byte by byte, so that nothing after it
/// (the HTTP/2 preface) is consumed; at most [`MAX_HEAD`] bytes.
///
/// # Errors
/// The peer closed, sent too much, or the read failed.
pub async fn read_head<R: AsyncRead + Unpin>(reader: &mut R) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(std::io::Error::other("head too large"));
        }
        if reader.read(&mut byte).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                if head.is_empty() {
                    NOTHING_READ
                } else {
                    "closed in the middle of the head"
                },
            ));
        }
        head.push(byte[0]);
    }
    Ok(head)
}

/// A parsed head: the first line and the fields (names lowercase).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// `GET /path HTTP/1.1` or `HTTP/1.1 101 Switching Protocols`.
    pub first_line: String,
    /// The fields, names lowercase, in order.
    pub fields: Vec<(String, String)>,
}

impl Head {
    /// Parses a head read by [`read_head`].
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut lines = text.split("\r\n");
        let first_line = lines.next()?.to_owned();
        let mut fields = Vec::new();
        for line in lines.filter(|l| !l.is_empty()) {
            let (name, value) = line.split_once(':')?;
            fields.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        Some(Self { first_line, fields })
    }

    /// A field's value.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The status code of a response head.
    pub fn status(&self) -> Option<u16> {
        let mut parts = self.first_line.split(' ');
        let version = parts.next()?;
        version.starts_with("HTTP/1.").then_some(())?;
        parts.next()?.parse().ok()
    }
}

/// Sends `data` on `tx` as flow control allows (waits for the peer's window).
///
/// # Errors
/// The stream was reset or the connection ended.
pub async fn send_all(tx: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), h2::Error> {
    while !data.is_empty() {
        tx.reserve_capacity(data.len());
        let granted = std::future::poll_fn(|cx| tx.poll_capacity(cx))
            .await
            .ok_or_else(|| h2::Error::from(h2::Reason::CANCEL))??;
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        tx.send_data(chunk, false)?;
    }
    Ok(())
}

/// Copies `reader` into the stream until the reader's end, then ends the stream. Returns the
/// bytes sent. Reads only after the previous chunk was accepted: at most one [`CHUNK`] and the
/// stream's window are buffered.
///
/// # Errors
/// A read failed or the stream was reset.
pub async fn pump_to_stream<R: AsyncRead + Unpin>(
    reader: &mut R,
    tx: &mut SendStream<Bytes>,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> std::io::Result<u64> {
    let mut total = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            tx.send_data(Bytes::new(), true)
                .map_err(std::io::Error::other)?;
            return Ok(total);
        }
        total += n as u64;
        send_all(tx, Bytes::copy_from_slice(buf.get(..n).unwrap_or_default()))
            .await
            .map_err(std::io::Error::other)?;
        on_bytes(n as u64);
    }
}

/// Copies the stream into `writer` until the stream ends, then shuts the writer down (a
/// half-close: the other way may go on). Window is released only after each write, so an
/// unread socket stops the peer. Returns the bytes written.
///
/// # Errors
/// A write failed or the stream was reset.
pub async fn pump_from_stream<W: AsyncWrite + Unpin>(
    rx: &mut RecvStream,
    writer: &mut W,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> std::io::Result<u64> {
    let mut total = 0u64;
    while let Some(chunk) = rx.data().await {
        let chunk = chunk.map_err(std::io::Error::other)?;
        writer.write_all(&chunk).await?;
        total += chunk.len() as u64;
        let _ = rx.flow_control().release_capacity(chunk.len());
        on_bytes(chunk.len() as u64);
    }
    writer.flush().await?;
    writer.shutdown().await?;
    Ok(total)
}

/// Bytes carried each way by [`relay`], and whether it ended on an error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relayed {
    /// From the socket into the stream.
    pub sent: u64,
    /// From the stream into the socket.
    pub received: u64,
    /// One way failed (the stream was reset, or the socket): the other was abandoned.
    pub failed: bool,
}

/// Counts what [`relay`] carries as it goes: `(sent, received)` byte callbacks.
pub type Progress<'a> = (
    &'a (dyn Fn(u64) + Send + Sync),
    &'a (dyn Fn(u64) + Send + Sync),
);

/// Carries a socket over a stream both ways until both ways have ended (each end is passed on
/// as a half-close), or one fails: then the stream is reset and the socket dropped.
pub async fn relay<R, W>(
    read: &mut R,
    write: &mut W,
    tx: &mut SendStream<Bytes>,
    rx: &mut RecvStream,
    (on_sent, on_received): Progress<'_>,
) -> Relayed
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut relayed = Relayed::default();
    {
        let up = pump_to_stream(read, tx, on_sent);
        let down = pump_from_stream(rx, write, on_received);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        while !(relayed.failed || up_done && down_done) {
            tokio::select! {
                result = &mut up, if !up_done => {
                    up_done = true;
                    match result {
                        Ok(n) => relayed.sent = n,
                        Err(_) => relayed.failed = true,
                    }
                }
                result = &mut down, if !down_done => {
                    down_done = true;
                    match result {
                        Ok(n) => relayed.received = n,
                        Err(_) => relayed.failed = true,
                    }
                }
            }
        }
    }
    if relayed.failed {
        tx.send_reset(h2::Reason::CANCEL);
    }
    relayed
}

/// The wait before reconnect attempt `attempt` (0-based): 0.5 s doubling to 30 s, each with
/// jitter between half and all of it, so agents cut off together do not come back together.
pub fn backoff(attempt: u32) -> Duration {
    let base_ms = 500u64.saturating_mul(1u64 << attempt.min(6)).min(30_000);
    let mut random = [0u8; 2];
    let _ = getrandom::fill(&mut random);
    let fraction = u64::from(u16::from_le_bytes(random)) as f64 / f64::from(u16::MAX);
    Duration::from_millis(base_ms / 2 + ((base_ms / 2) as f64 * fraction) as u64)
}

/// Client TLS settings: the system's roots and `ca_file`'s (PEM), ring as the provider (what
/// Pingora's rustls uses). Shared by the agent and the gateway's own client calls.
///
/// # Errors
/// `ca_file` cannot be read or holds no usable certificate.
pub fn client_tls(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().unwrap_or_default() {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())
    .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// Compares two byte strings in time that depends only on their length.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Hand-written: it is the whole of it; equal lengths are known (hex SHA-256 digests).
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Parses `30000-40000` (or one port).
///
/// # Errors
/// Not a port or a range of ports.
pub fn parse_ports(text: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (low, high) = text.split_once('-').unwrap_or((text, text));
    let low: u16 = low
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: not a port"))?;
    let high: u16 = high
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: not a port"))?;
    if low == 0 || low > high {
        return Err(format!("{text:?}: not a range of ports"));
    }
    Ok(low..=high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_and_name_their_fields() {
        let head =
            Head::parse(&request_head("gw:7443", "s1", "secret")).unwrap_or_else(|| unreachable!());
        assert_eq!(head.first_line, "GET /pinacle-agent/v1 HTTP/1.1");
        assert_eq!(head.field("x-pinacle-server"), Some("s1"));
        assert_eq!(head.field("authorization"), Some("Bearer secret"));
        let response = Head::parse(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n");
        assert_eq!(response.and_then(|h| h.status()), Some(101));
    }

    #[test]
    fn backoff_grows_to_thirty_seconds_with_jitter() {
        for attempt in 0..20 {
            let d = backoff(attempt);
            let cap = 500u64.saturating_mul(1 << attempt.min(6)).min(30_000);
            assert!(d >= Duration::from_millis(cap / 2) && d <= Duration::from_millis(cap));
        }
        assert!(backoff(30) <= Duration::from_secs(30));
    }

    #[test]
    fn ports_and_comparisons() {
        assert_eq!(parse_ports("30000-40000"), Ok(30000..=40000));
        assert_eq!(parse_ports("8080"), Ok(8080..=8080));
        assert!(parse_ports("0-5").is_err() && parse_ports("5-1").is_err());
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd") && !constant_time_eq(b"ab", b"abc"));
    }
}
