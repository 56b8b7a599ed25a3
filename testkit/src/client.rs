//! A raw HTTP/1.1 client on hyper's connection API: any Host header, connection reuse under the
//! test's control, the whole response body collected (or streamed, for SSE).

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A response with its body read to the end.
#[derive(Debug)]
pub struct Collected {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: hyper::HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Collected {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An open HTTP/1.1 connection.
pub struct Connection {
    sender: SendRequest<Full<Bytes>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connection")
    }
}

impl Connection {
    /// Connects to `addr`.
    pub async fn open(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Self { sender }
    }

    /// Sends `method path` with `headers` (Host among them) and returns the response head.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Response<Incoming> {
        let mut req = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.sender.ready().await.unwrap();
        self.sender
            .send_request(req.body(Full::new(body)).unwrap())
            .await
            .unwrap()
    }

    /// Sends and reads the whole body.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Collected {
        let resp = self.send(method, path, headers, Bytes::new()).await;
        collect(resp).await
    }
}

/// Reads a whole response.
pub async fn collect(resp: Response<Incoming>) -> Collected {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Collected {
        status,
        headers,
        body,
    }
}

/// One GET on a fresh connection.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Collected {
    Connection::open(addr)
        .await
        .request("GET", path, headers)
        .await
}

/// The next data frame of a streaming body, as text.
pub async fn next_chunk(body: &mut Incoming) -> Option<String> {
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            return Some(String::from_utf8_lossy(&data).into_owned());
        }
    }
    None
}
