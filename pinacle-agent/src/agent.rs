//! The agent: one connection to each gateway, kept up with capped, jittered backoff; each
//! stream a gateway opens carried to `--upstream-host:<port>` within `--allow-ports`.

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::protocol::{self, Head};

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// `host:port` of each gateway's `agent_listen`.
    pub gateways: Vec<String>,
    /// The server this agent speaks for (`server.id`).
    pub server: String,
    /// Its secret (`pinacle-ingress agent register` printed it).
    pub secret: String,
    /// Where the pod ports are (the server's nginx-proxy ports).
    pub upstream_host: String,
    /// The only ports it dials.
    pub allow_ports: RangeInclusive<u16>,
    /// TLS to the gateways (none: plaintext, for tests only).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The name to verify the gateways' certificates for (default: each gateway's host).
    pub tls_server_name: Option<String>,
    /// Connecting and the upgrade, each.
    pub connect_timeout: Duration,
    /// How long a SIGTERM waits for open streams after GOAWAY.
    pub drain_timeout: Duration,
}

/// A connection that stays up this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Runs until `shutdown` turns true: one task per gateway.
pub async fn run(options: Arc<Options>, shutdown: watch::Receiver<bool>) {
    let tasks: Vec<_> = options
        .gateways
        .iter()
        .map(|gateway| {
            tokio::spawn(gateway_loop(
                options.clone(),
                gateway.clone(),
                shutdown.clone(),
            ))
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
}

async fn gateway_loop(options: Arc<Options>, gateway: String, mut shutdown: watch::Receiver<bool>) {
    let mut attempt = 0u32;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let started = Instant::now();
        match connect_and_serve(&options, &gateway, shutdown.clone()).await {
            Ok(Ended::Shutdown) => {
                tracing::info!(gateway, "tunnel drained and closed");
                return;
            }
            Ok(Ended::Closed) => tracing::warn!(gateway, "the gateway closed the tunnel"),
            Err(e) => tracing::warn!(gateway, error = %e, "tunnel failed"),
        }
        if started.elapsed() >= STABLE_AFTER {
            attempt = 0;
        }
        let wait = protocol::backoff(attempt);
        attempt = attempt.saturating_add(1);
        tracing::info!(gateway, wait_ms = wait.as_millis() as u64, "reconnecting");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

enum Ended {
    Shutdown,
    Closed,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn connect(options: &Options, gateway: &str) -> Result<Box<dyn Io>, String> {
    let tcp = tokio::time::timeout(options.connect_timeout, TcpStream::connect(gateway))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = &options.tls else {
        return Ok(Box::new(tcp));
    };
    let host = options.tls_server_name.clone().unwrap_or_else(|| {
        gateway
            .rsplit_once(':')
            .map_or(gateway, |(h, _)| h)
            .trim_matches(['[', ']'])
            .to_owned()
    });
    let name = rustls_pki_types::ServerName::try_from(host).map_err(|e| e.to_string())?;
    let stream = tokio::time::timeout(
        options.connect_timeout,
        tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_owned())?
    .map_err(|e| format!("TLS: {e}"))?;
    Ok(Box::new(stream))
}

async fn connect_and_serve(
    options: &Arc<Options>,
    gateway: &str,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Ended, String> {
    let mut io = connect(options, gateway).await?;
    let head = protocol::request_head(gateway, &options.server, &options.secret);
    let answer = tokio::time::timeout(options.connect_timeout, async {
        io.write_all(&head).await?;
        io.flush().await?;
        protocol::read_head(&mut io).await
    })
    .await
    .map_err(|_| "the gateway did not answer the upgrade in time".to_owned())?
    .map_err(|e| format!("upgrade: {e}"))?;
    let status = Head::parse(&answer).and_then(|h| h.status());
    if status != Some(101) {
        return Err(format!(
            "the gateway refused the tunnel (status {})",
            status.map_or_else(|| "unreadable".to_owned(), |s| s.to_string())
        ));
    }
    let mut connection = h2::server::Builder::new()
        .initial_window_size(protocol::STREAM_WINDOW)
        .initial_connection_window_size(protocol::CONNECTION_WINDOW)
        .max_concurrent_streams(4096)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| format!("HTTP/2: {e}"))?;
    tracing::info!(gateway, server = %options.server, "tunnel open");
    let (dead_tx, mut dead) = watch::channel(false);
    if let Some(mut pings) = connection.ping_pong() {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(protocol::PING_EVERY).await;
                let pong =
                    tokio::time::timeout(protocol::PING_TIMEOUT, pings.ping(h2::Ping::opaque()))
                        .await;
                if !matches!(pong, Ok(Ok(_))) {
                    let _ = dead_tx.send(true);
                    return;
                }
            }
        });
    }
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        tokio::select! {
            accepted = connection.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    let (options, open) = (options.clone(), open.clone());
                    open.fetch_add(1, Ordering::AcqRel);
                    tokio::spawn(async move {
                        carry(&options, request, respond).await;
                        open.fetch_sub(1, Ordering::AcqRel);
                    });
                }
                Some(Err(e)) => return Err(format!("HTTP/2: {e}")),
                None => return Ok(Ended::Closed),
            },
            _ = dead.changed() => return Err("the gateway stopped answering pings".to_owned()),
            _ = shutdown.changed() => {
                // GOAWAY: the gateway opens no new streams here; the open ones finish.
                connection.graceful_shutdown();
                let drained = tokio::time::timeout(options.drain_timeout, async {
                    while let Some(Ok((request, respond))) = connection.accept().await {
                        let options = options.clone();
                        tokio::spawn(async move { carry(&options, request, respond).await });
                    }
                })
                .await;
                if drained.is_err() {
                    tracing::warn!(gateway, streams = open.load(Ordering::Acquire), "drain timed out; closing with streams open");
                }
                return Ok(Ended::Shutdown);
            }
        }
    }
}

fn answer(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    let _ = respond.send_response(response, true);
}

/// One stream: `CONNECT 127.0.0.1:<port>` to `--upstream-host:<port>`, bytes both ways.
async fn carry(
    options: &Options,
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    if request.method() != Method::CONNECT {
        answer(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
        return;
    }
    let Some(port) = request.uri().port_u16() else {
        answer(&mut respond, StatusCode::BAD_REQUEST);
        return;
    };
    if !options.allow_ports.contains(&port) {
        tracing::warn!(port, "refused a stream to a port outside --allow-ports");
        answer(&mut respond, StatusCode::FORBIDDEN);
        return;
    }
    let dialed = tokio::time::timeout(
        options.connect_timeout,
        TcpStream::connect((options.upstream_host.as_str(), port)),
    )
    .await;
    let upstream = match dialed {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(port, error = %e, "upstream refused");
            answer(&mut respond, StatusCode::BAD_GATEWAY);
            return;
        }
        Err(_) => {
            answer(&mut respond, StatusCode::GATEWAY_TIMEOUT);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let Ok(mut tx) = respond.send_response(Response::new(()), false) else {
        return;
    };
    let mut rx = request.into_body();
    let (mut read, mut write) = upstream.into_split();
    let relayed =
        protocol::relay(&mut read, &mut write, &mut tx, &mut rx, (&|_| {}, &|_| {})).await;
    tracing::debug!(
        port,
        sent = relayed.sent,
        received = relayed.received,
        failed = relayed.failed,
        "stream ended"
    );
}
