//! The admin listener: `/healthz` (the process answers), `/readyz` (the directory answers and we
//! are not draining; `degraded`, still 200, while grants are honoured stale-if-error) and `/metrics` (Prometheus text). A small hyper server on the side runtime,
//! not a Pingora service, so it keeps answering (`/readyz`: 503) while Pingora drains. Bound
//! without `SO_REUSEPORT`: two processes never share it; a process taking over (`--upgrade`)
//! binds it once the previous one has let go ([`bind_when_free`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use pinacle_authz::PodDirectory;
use tokio::net::{TcpListener, TcpSocket};

use crate::telemetry::Metrics;

/// What the admin endpoints read.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// Metrics to expose.
    pub metrics: Metrics,
    /// The directory `/readyz` pings.
    pub directory: Arc<dyn PodDirectory>,
    /// Set when shutdown or hand-over starts.
    pub draining: Arc<AtomicBool>,
    /// Longest `/readyz` waits for the directory.
    pub ping_timeout: Duration,
    /// The authorizer, once built: with the directory down, grants it can still honour
    /// (stale-if-error) make `/readyz` say `degraded` (200) instead of 503.
    pub authorizer: Arc<std::sync::OnceLock<Arc<pinacle_authz::Authorizer>>>,
    /// The agent tunnels (`/agents`).
    pub agents: Arc<crate::agents::Agents>,
}

/// How recent a stale answer must be for `/readyz` to call the gateway degraded rather than
/// down.
const STALE_RECENT: Duration = Duration::from_secs(60);

/// Binds the admin address.
///
/// # Errors
/// The address cannot be bound (e.g. another process holds it).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

/// [`bind`] for a process taking over from another: retried every 100 ms while the address is
/// in use, for at most `limit` (the previous process holds it until it exits).
///
/// # Errors
/// The address is still in use after `limit`, or cannot be bound at all.
pub async fn bind_when_free(addr: SocketAddr, limit: Duration) -> std::io::Result<TcpListener> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match bind(addr) {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Serves until the runtime stops.
pub async fn serve(listener: TcpListener, state: AdminState) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, typically: do not spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&state, &req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn reply(status: u16, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
}

async fn answer(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    const JSON: &str = "application/json";
    match req.uri().path() {
        "/healthz" => reply(200, JSON, r#"{"status":"ok"}"#.into()),
        "/readyz" => {
            if state.draining.load(Ordering::SeqCst) {
                return reply(503, JSON, r#"{"status":"draining"}"#.into());
            }
            match tokio::time::timeout(state.ping_timeout, state.directory.ping()).await {
                Ok(Ok(())) => reply(200, JSON, r#"{"status":"ready"}"#.into()),
                _ if state.authorizer.get().is_some_and(|a| {
                    a.served_stale_within(STALE_RECENT) || a.stale_grants() > 0
                }) =>
                {
                    // Known users keep working from stale grants: taking every gateway out of
                    // the load balancer would stop them too.
                    reply(200, JSON, r#"{"status":"degraded"}"#.into())
                }
                _ => reply(503, JSON, r#"{"status":"directory unavailable"}"#.into()),
            }
        }
        "/agents" => reply(200, JSON, state.agents.list().to_string()),
        "/metrics" => reply(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            state.metrics.render(),
        ),
        _ => reply(404, JSON, r#"{"error":"Not found"}"#.into()),
    }
}
