//! A second floor for `benches/load/run.sh`: the least a Tokio HTTP/1 forwarder written without
//! a proxy framework does per request, on the same runtime shape as the ingress (a multi-thread
//! runtime with one worker, jemalloc). It answers one question: how far below `pingora-floor`
//! a hand-written path for plain requests could go, before anyone writes one.
//!
//! It parses each request head with httparse, copies it to a pooled keep-alive upstream
//! connection, parses the response head and relays a `Content-Length` body. Anything else (a
//! request body, chunked or close-delimited responses, pipelining, upgrades) is out of scope:
//! such a request closes the connection. Not a proxy to run; a measuring stick.
//!
//! ```text
//! tokio-floor LISTEN UPSTREAM      e.g. tokio-floor 127.0.0.1:8080 127.0.0.1:8081
//! ```

#![allow(clippy::print_stderr)] // a usage line is this tool's only output

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Every wait of this tool: a stuck peer ends its connection, never the tool.
const WAIT: Duration = Duration::from_secs(10);
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
const POOL: usize = 128;

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Upstream {
    addr: SocketAddr,
    idle: Mutex<Vec<TcpStream>>,
}

impl Upstream {
    async fn take(&self) -> Result<TcpStream, Error> {
        let pooled = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match pooled {
            Some(stream) => Ok(stream),
            None => {
                let stream = tokio::time::timeout(WAIT, TcpStream::connect(self.addr)).await??;
                stream.set_nodelay(true)?;
                Ok(stream)
            }
        }
    }

    fn give_back(&self, stream: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < POOL {
            idle.push(stream);
        }
    }
}

/// Reads until `buf` holds a complete head; returns its length.
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    mut complete: impl FnMut(&[u8]) -> Option<usize>,
) -> Result<Option<usize>, Error> {
    loop {
        if let Some(len) = complete(buf) {
            return Ok(Some(len));
        }
        if buf.len() >= MAX_HEAD {
            return Err("head too large".into());
        }
        buf.reserve(4096);
        if tokio::time::timeout(WAIT, stream.read_buf(buf)).await?? == 0 {
            return Ok(None);
        }
    }
}

fn request_head(buf: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::Request::new(&mut headers).parse(buf) {
        Ok(httparse::Status::Complete(len)) => Some(len),
        _ => None,
    }
}

/// The response head's length and its `Content-Length`.
fn response_head(buf: &[u8]) -> Option<(usize, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(len)) = response.parse(buf) else {
        return None;
    };
    let body = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
        .unwrap_or(0);
    Some((len, body))
}

async fn serve(mut client: TcpStream, upstream: Arc<Upstream>) -> Result<(), Error> {
    client.set_nodelay(true)?;
    let mut request = Vec::with_capacity(4096);
    let mut response = Vec::with_capacity(8192);
    loop {
        request.clear();
        let Some(head_len) = read_head(&mut client, &mut request, request_head).await? else {
            return Ok(());
        };
        if head_len != request.len() {
            return Err("request body or pipelining: out of scope".into());
        }
        let mut up = upstream.take().await?;
        tokio::time::timeout(WAIT, up.write_all(&request)).await??;
        response.clear();
        let mut parsed = None;
        read_head(&mut up, &mut response, |b| {
            parsed = response_head(b);
            parsed.map(|(len, _)| len)
        })
        .await?;
        let Some((head, body)) = parsed else {
            return Err("upstream closed".into());
        };
        let mut remaining = (head + body).saturating_sub(response.len());
        tokio::time::timeout(WAIT, client.write_all(&response)).await??;
        while remaining > 0 {
            response.clear();
            response.reserve(remaining.min(64 * 1024));
            let n = tokio::time::timeout(WAIT, up.read_buf(&mut response)).await??;
            if n == 0 {
                return Err("upstream closed mid-body".into());
            }
            remaining = remaining.saturating_sub(n);
            tokio::time::timeout(WAIT, client.write_all(&response)).await??;
        }
        upstream.give_back(up);
    }
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(listen), Some(Ok(addr))) =
        (args.first(), args.get(1).map(|a| a.parse::<SocketAddr>()))
    else {
        eprintln!("usage: tokio-floor LISTEN UPSTREAM");
        std::process::exit(2);
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind(listen).await?;
        let upstream = Arc::new(Upstream {
            addr,
            idle: Mutex::new(Vec::new()),
        });
        loop {
            let (client, _) = listener.accept().await?;
            tokio::spawn(serve(client, upstream.clone()));
        }
    })
}
