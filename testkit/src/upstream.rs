//! Real upstream servers bound to 127.0.0.1:0. Each runs until its handle is dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::server::{
    Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// A running server; aborted on drop.
#[derive(Debug)]
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// TCP connections accepted so far.
    pub connections: Arc<AtomicUsize>,
    /// For SSE: lets the next event go.
    pub release: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Connections accepted so far.
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP/1.1 server (keep-alive) that answers every request with JSON describing it:
/// `{"name", "method", "path", "headers": {lowercased name: value}, "body_len"}`. The body is read
/// and counted as it streams, so large uploads use bounded memory.
pub async fn http_echo(name: &'static str) -> Upstream {
    serve(move |stream| async move {
        let service = service_fn(move |req: Request<Incoming>| echo(name, req));
        let _ = http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await;
    })
    .await
}

/// Accepts connections on 127.0.0.1:0, counts them and runs `handle` on each in its own task.
async fn serve<F, Fut>(handle: F) -> Upstream
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(handle(stream));
        }
    });
    Upstream {
        addr,
        connections,
        release: Arc::new(Notify::new()),
        task,
    }
}

async fn echo(name: &str, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().to_string();
    let path = req.uri().to_string();
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
            )
        })
        .collect();
    let mut body = req.into_body();
    let mut body_len: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => body_len += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
    let json = serde_json::json!({
        "name": name, "method": method, "path": path, "headers": headers, "body_len": body_len,
    });
    Ok(Response::builder()
        .header("content-type", "application/json")
        .header("x-frame-options", "DENY")
        .header("cross-origin-opener-policy", "same-origin")
        .body(Full::new(Bytes::from(json.to_string())))
        .unwrap())
}

/// A stream that never idles: a chunked body of `tick\n` every 100 ms, for at most 60 s (or
/// until the client goes away).
pub async fn ticking() -> Upstream {
    serve(|mut stream| async move {
        if read_head(&mut stream).await.is_none() {
            return;
        }
        let head =
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n";
        if stream.write_all(head).await.is_err() {
            return;
        }
        for _ in 0..600 {
            if stream.write_all(b"5\r\ntick\n\r\n").await.is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let _ = stream.write_all(b"0\r\n\r\n").await;
    })
    .await
}

/// A server-sent events endpoint: sends `data: first`, waits for [`Upstream::release`], then sends
/// `data: second` and closes. A client that sees `first` before releasing proves streaming.
pub async fn sse() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let release = Arc::new(Notify::new());
    let gate = release.clone();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            counted.fetch_add(1, Ordering::SeqCst);
            let gate = gate.clone();
            tokio::spawn(async move {
                if read_head(&mut stream).await.is_none() {
                    return;
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\ndata: first\n\n")
                    .await;
                gate.notified().await;
                let _ = stream.write_all(b"data: second\n\n").await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Upstream {
        addr,
        connections,
        release,
        task,
    }
}

/// A WebSocket echo server. It answers the handshake with the first offered subprotocol and
/// reports the Host and `Sec-WebSocket-Extensions` it received as `x-seen-host` and
/// `x-seen-extensions` in the handshake response.
pub async fn websocket_echo() -> Upstream {
    serve(|stream| async move {
        let callback = |req: &WsRequest, mut resp: WsResponse| {
            if let Some(protocols) = req.headers().get("sec-websocket-protocol") {
                let first = protocols
                    .to_str()
                    .unwrap_or("")
                    .split(',')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned();
                if let Ok(v) = HeaderValue::from_str(&first) {
                    resp.headers_mut().insert("sec-websocket-protocol", v);
                }
            }
            if let Some(host) = req.headers().get("host") {
                resp.headers_mut().insert("x-seen-host", host.clone());
            }
            if let Some(ext) = req.headers().get("sec-websocket-extensions") {
                resp.headers_mut().insert("x-seen-extensions", ext.clone());
            }
            Ok(resp)
        };
        let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
            return;
        };
        echo_messages(ws).await;
    })
    .await
}

/// A WebSocket server that answers as fast as it can: as soon as the request head has arrived,
/// one write carries the `101` and a first text frame (`hello`), before the client has sent
/// anything else; then it echoes. Proxies that set up the tunnel only after the 101 has been
/// "processed" have lost such first frames (Pingora issue 946).
pub async fn instant_upgrade() -> Upstream {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    serve(|mut stream| async move {
        let Some(head) = read_head(&mut stream).await else {
            return;
        };
        let text = String::from_utf8_lossy(&head).into_owned();
        let key = text
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.trim()
                    .eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| value.trim().to_owned())
            })
            .unwrap_or_default();
        let accept = derive_accept_key(key.as_bytes());
        let mut out = format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
        )
        .into_bytes();
        out.extend_from_slice(&[0x81, 5]);
        out.extend_from_slice(b"hello");
        if stream.write_all(&out).await.is_err() {
            return;
        }
        let ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(stream, Role::Server, None).await;
        echo_messages(ws).await;
    })
    .await
}

/// A server that accepts connections and reads requests but never answers (timeouts).
pub async fn silent() -> Upstream {
    serve(|mut stream| async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    })
    .await
}

/// Echoes text and binary messages until the peer closes.
async fn echo_messages<S>(mut ws: tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(Ok(msg)) = ws.next().await {
        if msg.is_close() {
            break;
        }
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            break;
        }
    }
}

/// Reads up to the end of a request head; `None` if the peer goes away first.
async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// What a [`recording`] server answers to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// These bytes, then the connection is kept for the next request.
    Bytes(Vec<u8>),
    /// These bytes, then the connection is closed.
    Close(Vec<u8>),
    /// `101 Switching Protocols`, then every byte received is echoed until the peer closes.
    Upgrade,
    /// `101 Switching Protocols`, echo, and once the peer has half-closed (EOF), these bytes
    /// before closing: what a server still says after its client stopped sending.
    UpgradeThenLast(Vec<u8>),
}

/// A [`recording`] server's script: the reply to a request, given its head (request line and
/// fields, as received).
pub type Script = Arc<dyn Fn(&[u8]) -> Reply + Send + Sync>;

/// A raw HTTP/1.1 server that records every request head exactly as received (the bytes a pod
/// gets) and answers as `script` says. Request bodies (by `content-length`, or chunked) are
/// read and dropped.
#[derive(Debug)]
pub struct Recording {
    /// The server.
    pub upstream: Upstream,
    heads: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl Recording {
    /// Every request head received so far, in order.
    pub fn heads(&self) -> Vec<Vec<u8>> {
        self.heads.lock().unwrap().clone()
    }

    /// Forgets the heads received so far.
    pub fn clear(&self) {
        self.heads.lock().unwrap().clear();
    }
}

/// A `200` with `body`, framed by `content-length`.
pub fn ok(body: &str) -> Reply {
    Reply::Bytes(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

/// Starts a [`Recording`] server; `Upgrade` requests get [`Reply::Upgrade`] by default only if the
/// script says so.
pub async fn recording(script: Script) -> Recording {
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = heads.clone();
    let upstream = serve(move |mut stream| {
        let (heads, script) = (kept.clone(), script.clone());
        async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                    match stream.read(&mut buf).await {
                        Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                    continue;
                };
                let head: Vec<u8> = got.drain(..end + 4).collect();
                heads.lock().unwrap().push(head.clone());
                if !read_body(&mut stream, &head, &mut got, &mut buf).await {
                    return;
                }
                match script(&head) {
                    Reply::Bytes(bytes) => {
                        if stream.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                    Reply::Close(bytes) => {
                        let _ = stream.write_all(&bytes).await;
                        let _ = stream.shutdown().await;
                        return;
                    }
                    Reply::Upgrade | Reply::UpgradeThenLast(_) => {
                        let last = match script(&head) {
                            Reply::UpgradeThenLast(last) => last,
                            _ => Vec::new(),
                        };
                        let answer = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                        if !got.is_empty() && stream.write_all(&got).await.is_err() {
                            return;
                        }
                        loop {
                            match stream.read(&mut buf).await {
                                Ok(0) => {
                                    let _ = stream.write_all(&last).await;
                                    let _ = stream.shutdown().await;
                                    return;
                                }
                                Ok(n) => {
                                    if stream.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                                Err(_) => return,
                            }
                        }
                    }
                }
            }
        }
    })
    .await;
    Recording { upstream, heads }
}

/// Reads (and drops) the body the head announces, taking what is already in `got` first;
/// false when the peer goes away first.
async fn read_body(
    stream: &mut tokio::net::TcpStream,
    head: &[u8],
    got: &mut Vec<u8>,
    buf: &mut [u8],
) -> bool {
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
    };
    let chunked = field("transfer-encoding:").is_some_and(|v| v.contains("chunked"));
    let length: usize = field("content-length:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    loop {
        let done = if chunked {
            got.windows(5)
                .position(|w| w == b"0\r\n\r\n")
                .map(|i| i + 5)
        } else {
            (got.len() >= length).then_some(length)
        };
        if let Some(end) = done {
            got.drain(..end);
            return true;
        }
        match stream.read(buf).await {
            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return false,
        }
    }
}
