//! Reverse tunnels, the gateway's side (the agent and the protocol: `pinacle_agent`).
//!
//! Agents connect to `agent_listen` and prove which server they speak for; the gateway then
//! holds an HTTP/2 client connection over each. A server with a registered agent (the
//! directory's `agents()`, refreshed every [`REFRESH_EVERY`]) is never dialed: requests to its
//! pods go to a *bridge*, a listener on 127.0.0.1 of this process per (server, port), whose
//! every accepted connection becomes one `CONNECT 127.0.0.1:<port>` stream on one of the
//! server's tunnels. The engines therefore forward to the bridge exactly as to a pod's nginx
//! (credentials, header edits, limits, logging, revocation, WebSockets, pooling unchanged);
//! only the address differs. No tunnel up: [`Route::Offline`], answered at once with 502.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use pinacle_agent::protocol::{self, Head};
use pinacle_authz::AgentRegistration;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::telemetry::Metrics;

/// How often the registered agents are read from the directory.
pub const REFRESH_EVERY: Duration = Duration::from_secs(2);
/// How long a connection to `agent_listen` has, from its accept, to finish TLS and send its
/// upgrade request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Unauthenticated connections one peer address (IPv6: one /64) may have at once on
/// `agent_listen` (agents behind one NAT each hold one only for their handshake).
pub const PENDING_PER_PEER: usize = 8;
/// Unauthenticated connections `agent_listen` holds at once, from all peers.
pub const PENDING_TOTAL: usize = 512;
/// Tunnels tried for one bridged connection when the first ones are going away.
const MAX_OPEN_ATTEMPTS: usize = 4;
/// How long opening a stream may take before the bridged connection is closed.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection closed before its first byte (what `wait_for_port` or a load balancer's
/// probe does).
const NOTHING_SENT: &str = "closed before sending anything";
/// [`protocol::read_head`]'s error for that.
const NOTHING_READ: &str = protocol::NOTHING_READ;

/// Why a stream was not opened.
enum Open {
    /// The tunnel is going away (GOAWAY): try another.
    GoingAway,
    /// Anything else.
    Failed(String),
}

/// Where a pod's upstream is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Dialed directly (no agent registered for its server).
    Direct,
    /// Through a tunnel: this bridge on 127.0.0.1.
    Tunnel(SocketAddr),
    /// The server has a registered agent and none is connected.
    Offline,
}

/// What the directory says about agents.
#[derive(Debug, Default)]
struct Registered {
    /// Server ids by the address their pods are published on.
    by_ip: HashMap<IpAddr, String>,
    /// Secret hashes by server id.
    hashes: HashMap<String, String>,
}

/// One agent's connection.
struct Link {
    id: u64,
    server: String,
    peer: SocketAddr,
    since: SystemTime,
    send: h2::client::SendRequest<Bytes>,
    /// Ends the connection's driver (revocation, a newer secret).
    close: tokio::sync::watch::Sender<bool>,
    streams: AtomicUsize,
    secret_sha256: String,
}

/// The gateway's agents: registered, connected, and the bridges to them.
pub struct Agents {
    registered: ArcSwap<Registered>,
    links: Mutex<HashMap<String, Vec<Arc<Link>>>>,
    bridges: Mutex<HashMap<(String, u16), SocketAddr>>,
    next_id: AtomicU64,
    pending: Arc<Mutex<Pending>>,
    metrics: Metrics,
    runtime: tokio::runtime::Handle,
}

/// Connections to `agent_listen` that have not proved who they are yet, by peer address: what
/// bounds what anyone on the network can make the gateway hold.
#[derive(Debug, Default)]
struct Pending {
    by_peer: HashMap<IpAddr, usize>,
    total: usize,
    /// Refused since the last warning, and when that was (one warning per 10 s at most).
    refused: u64,
    warned: Option<std::time::Instant>,
}

impl Pending {
    /// Takes a place for `peer`, or says why there is none.
    fn admit(&mut self, peer: IpAddr) -> Result<(), &'static str> {
        if self.total >= PENDING_TOTAL {
            return Err("too many agent handshakes at once");
        }
        let n = self.by_peer.entry(peer).or_default();
        if *n >= PENDING_PER_PEER {
            return Err("too many agent handshakes from this address");
        }
        *n += 1;
        self.total += 1;
        Ok(())
    }

    fn release(&mut self, peer: IpAddr) {
        if let Some(n) = self.by_peer.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                self.by_peer.remove(&peer);
            }
            self.total -= 1;
        }
    }
}

/// A place in [`Pending`], given back when dropped (handshake done, refused or timed out).
struct Admitted {
    pending: Arc<Mutex<Pending>>,
    peer: IpAddr,
    metrics: Metrics,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        lock(&self.pending).release(self.peer);
        self.metrics.agent_handshakes(-1);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl std::fmt::Debug for Agents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agents")
            .field("registered", &self.registered.load().hashes.len())
            .finish_non_exhaustive()
    }
}

impl Agents {
    /// Bridges and tunnels run on `runtime` (the side runtime).
    pub fn new(metrics: Metrics, runtime: tokio::runtime::Handle) -> Self {
        Self {
            registered: ArcSwap::default(),
            links: Mutex::default(),
            bridges: Mutex::default(),
            next_id: AtomicU64::new(1),
            pending: Arc::default(),
            metrics,
            runtime,
        }
    }

    /// Where `upstream` is reached. Cheap when no agent is registered (one map lookup).
    pub fn route(self: &Arc<Self>, upstream: SocketAddr) -> Route {
        let registered = self.registered.load();
        if registered.by_ip.is_empty() {
            return Route::Direct;
        }
        let Some(server) = registered.by_ip.get(&upstream.ip()) else {
            return Route::Direct;
        };
        if !self.connected(server) {
            return Route::Offline;
        }
        match self.bridge(server, upstream.port()) {
            Some(addr) => Route::Tunnel(addr),
            None => Route::Offline,
        }
    }

    fn connected(&self, server: &str) -> bool {
        lock(&self.links).get(server).is_some_and(|l| !l.is_empty())
    }

    /// Takes the directory's registrations; agents no longer registered, or registered with
    /// another secret, are disconnected.
    pub fn set_registered(&self, registrations: Vec<AgentRegistration>) {
        let mut next = Registered::default();
        for r in registrations {
            if let Ok(ip) = r.ip_address.parse::<IpAddr>() {
                next.by_ip.insert(ip, r.server_id.clone());
            }
            next.hashes.insert(r.server_id, r.secret_sha256);
        }
        let mut links = lock(&self.links);
        for list in links.values_mut() {
            list.retain(|link| {
                let valid = next.hashes.get(&link.server) == Some(&link.secret_sha256);
                if !valid {
                    tracing::warn!(server = %link.server, peer = %link.peer, "agent registration revoked: tunnel closed");
                    let _ = link.close.send(true);
                }
                valid
            });
        }
        links.retain(|_, list| !list.is_empty());
        self.metrics
            .agents_connected(links.values().map(Vec::len).sum());
        drop(links);
        self.registered.store(Arc::new(next));
    }

    /// The connected agents (the admin listener's `/agents`).
    pub fn list(&self) -> serde_json::Value {
        let links = lock(&self.links);
        let mut all: Vec<serde_json::Value> = links
            .values()
            .flatten()
            .map(|l| {
                serde_json::json!({
                    "server": l.server,
                    "peer": l.peer.to_string(),
                    "connected_at": l.since.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                    "streams_open": l.streams.load(Ordering::Acquire),
                })
            })
            .collect();
        all.sort_by_key(|v| v["server"].as_str().map(str::to_owned));
        serde_json::json!({ "agents": all })
    }

    /// Accepts agents on `listener` until the process ends (TLS with `tls`). Until it has
    /// proved which server it speaks for, a connection holds a place of the pending ones (at most
    /// [`PENDING_PER_PEER`] per address, [`PENDING_TOTAL`] in all; beyond, closed at once) and
    /// has 10 s from its accept for TLS and its upgrade request together.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Some(admitted) = self.admit(peer) else {
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (agents, tls) = (self.clone(), tls.clone());
            tokio::spawn(async move {
                let result = match tls {
                    Some(acceptor) => {
                        let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
                        match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => {
                                agents
                                    .clone()
                                    .handshake(stream, peer, deadline, admitted)
                                    .await
                            }
                            Ok(Err(e)) => Err(format!("TLS: {e}")),
                            Err(_) => Err("TLS handshake timed out".to_owned()),
                        }
                    }
                    None => {
                        let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
                        agents
                            .clone()
                            .handshake(stream, peer, deadline, admitted)
                            .await
                    }
                };
                match result {
                    Ok(()) => {}
                    // Closed before saying anything: a port probe, not an agent.
                    Err(e) if e == NOTHING_SENT => {
                        tracing::debug!(%peer, "closed without a request")
                    }
                    Err(e) => {
                        agents.metrics.agent_connect("refused");
                        tracing::warn!(%peer, error = %e, "agent not accepted");
                    }
                }
            });
        }
    }

    /// A place for a new connection from `peer`, or `None` (counted as `busy`, and warned
    /// about at most once per 10 s with the number refused since).
    fn admit(&self, peer: SocketAddr) -> Option<Admitted> {
        let ip = crate::rate_limit::client_net(peer.ip());
        let mut pending = lock(&self.pending);
        match pending.admit(ip) {
            Ok(()) => {
                self.metrics.agent_handshakes(1);
                Some(Admitted {
                    pending: self.pending.clone(),
                    peer: ip,
                    metrics: self.metrics.clone(),
                })
            }
            Err(why) => {
                self.metrics.agent_connect("busy");
                pending.refused += 1;
                let now = std::time::Instant::now();
                if pending
                    .warned
                    .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(10))
                {
                    tracing::warn!(
                        %peer,
                        refused = pending.refused,
                        "{why}: agent connections closed unanswered"
                    );
                    pending.refused = 0;
                    pending.warned = Some(now);
                }
                None
            }
        }
    }

    /// The upgrade: who is this, and is the secret right (never logged).
    async fn handshake<S>(
        self: Arc<Self>,
        mut stream: S,
        peer: SocketAddr,
        deadline: tokio::time::Instant,
        admitted: Admitted,
    ) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let head = tokio::time::timeout_at(deadline, protocol::read_head(&mut stream))
            .await
            .map_err(|_| "no upgrade request in time".to_owned())?
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof if e.to_string() == NOTHING_READ => {
                    NOTHING_SENT.to_owned()
                }
                _ => format!("upgrade request: {e}"),
            })?;
        let head = Head::parse(&head).ok_or("unreadable upgrade request")?;
        let server = head.field(protocol::SERVER_HEADER).unwrap_or("").to_owned();
        let secret = head
            .field("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let upgrade_ok = head.first_line == format!("GET {} HTTP/1.1", protocol::PATH)
            && head
                .field("upgrade")
                .is_some_and(|u| u.eq_ignore_ascii_case(protocol::UPGRADE));
        let expected = self.registered.load().hashes.get(&server).cloned();
        let digest = secret_digest(secret);
        let valid = upgrade_ok
            && expected
                .as_deref()
                .is_some_and(|e| protocol::constant_time_eq(e.as_bytes(), digest.as_bytes()));
        if !valid {
            let _ = tokio::time::timeout_at(deadline, async {
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                    .await;
                let _ = stream.shutdown().await;
            })
            .await;
            return Err(if !upgrade_ok {
                "not an agent upgrade request".to_owned()
            } else if expected.is_none() {
                format!("no agent registered for server {server:?}")
            } else {
                format!("wrong secret for server {server:?}")
            });
        }
        let switched = tokio::time::timeout_at(deadline, async {
            stream
                .write_all(
                    format!(
                        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {}\r\n\r\n",
                        protocol::UPGRADE
                    )
                    .as_bytes(),
                )
                .await
                .map_err(|e| e.to_string())?;
            h2::client::Builder::new()
                .initial_window_size(protocol::STREAM_WINDOW)
                .initial_connection_window_size(protocol::CONNECTION_WINDOW)
                .handshake::<_, Bytes>(stream)
                .await
                .map_err(|e| format!("HTTP/2: {e}"))
        })
        .await;
        let (send, mut connection) = switched.map_err(|_| "upgrade timed out".to_owned())??;
        // Proved: no longer one of the pending.
        drop(admitted);
        let pings = connection.ping_pong();
        let (close, mut closed) = tokio::sync::watch::channel(false);
        let link = Arc::new(Link {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            server: server.clone(),
            peer,
            since: SystemTime::now(),
            send,
            close,
            streams: AtomicUsize::new(0),
            secret_sha256: digest,
        });
        self.add(link.clone());
        self.metrics.agent_connect("accepted");
        tracing::info!(%server, %peer, "agent connected");
        let (dead_tx, mut dead) = tokio::sync::watch::channel(false);
        if let Some(mut pings) = pings {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(protocol::PING_EVERY).await;
                    let pong = tokio::time::timeout(
                        protocol::PING_TIMEOUT,
                        pings.ping(h2::Ping::opaque()),
                    )
                    .await;
                    if !matches!(pong, Ok(Ok(_))) {
                        let _ = dead_tx.send(true);
                        return;
                    }
                }
            });
        }
        let why = tokio::select! {
            result = &mut connection => match result {
                Ok(()) => "closed by the agent".to_owned(),
                Err(e) => format!("HTTP/2: {e}"),
            },
            _ = closed.changed() => "registration revoked".to_owned(),
            _ = dead.changed() => "stopped answering pings".to_owned(),
        };
        self.remove(&link);
        tracing::info!(%server, %peer, why, "agent disconnected");
        Ok(())
    }

    fn add(&self, link: Arc<Link>) {
        let mut links = lock(&self.links);
        links.entry(link.server.clone()).or_default().push(link);
        self.metrics
            .agents_connected(links.values().map(Vec::len).sum());
    }

    fn remove(&self, link: &Arc<Link>) {
        let mut links = lock(&self.links);
        if let Some(list) = links.get_mut(&link.server) {
            list.retain(|l| l.id != link.id);
            if list.is_empty() {
                links.remove(&link.server);
            }
        }
        self.metrics
            .agents_connected(links.values().map(Vec::len).sum());
    }

    /// A live tunnel of `server`: the one carrying the fewest streams.
    fn pick(&self, server: &str) -> Option<Arc<Link>> {
        let links = lock(&self.links);
        links
            .get(server)?
            .iter()
            .min_by_key(|l| l.streams.load(Ordering::Acquire))
            .cloned()
    }

    /// The bridge for `server`:`port`, made on first use.
    fn bridge(self: &Arc<Self>, server: &str, port: u16) -> Option<SocketAddr> {
        let mut bridges = lock(&self.bridges);
        if let Some(addr) = bridges.get(&(server.to_owned(), port)) {
            return Some(*addr);
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
        listener.set_nonblocking(true).ok()?;
        let addr = listener.local_addr().ok()?;
        let (agents, server_id) = (self.clone(), server.to_owned());
        self.runtime.spawn(async move {
            let Ok(listener) = TcpListener::from_std(listener) else {
                return;
            };
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let (agents, server_id) = (agents.clone(), server_id.clone());
                tokio::spawn(async move { agents.carry(&server_id, port, stream).await });
            }
        });
        bridges.insert((server.to_owned(), port), addr);
        Some(addr)
    }

    /// One bridged connection: a `CONNECT` stream on a tunnel of `server`, bytes both ways. A
    /// tunnel that is going away (its agent sent GOAWAY: SIGTERM) takes no new stream: it is
    /// forgotten and the next one is tried, so a draining agent's new requests go elsewhere
    /// or answer `tunnel-offline`.
    async fn carry(&self, server: &str, port: u16, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        for _ in 0..MAX_OPEN_ATTEMPTS {
            let Some(link) = self.pick(server) else {
                return;
            };
            let opened = self.open(&link, port).await;
            match opened {
                Ok((response, tx)) => {
                    link.streams.fetch_add(1, Ordering::AcqRel);
                    self.metrics.agent_streams(1);
                    let result = self.carry_on(response, tx, stream).await;
                    link.streams.fetch_sub(1, Ordering::AcqRel);
                    self.metrics.agent_streams(-1);
                    if let Err(e) = result {
                        tracing::debug!(%server, port, error = %e, "tunnel stream ended with an error");
                    }
                    return;
                }
                Err(Open::GoingAway) => {
                    tracing::info!(%server, peer = %link.peer, "agent is draining: no new streams on its tunnel");
                    self.remove(&link);
                }
                Err(Open::Failed(e)) => {
                    tracing::debug!(%server, port, error = %e, "tunnel stream not opened");
                    return;
                }
            }
        }
    }

    /// Opens a `CONNECT` stream to `port` on `link`.
    async fn open(
        &self,
        link: &Link,
        port: u16,
    ) -> Result<(http::Response<h2::RecvStream>, h2::SendStream<Bytes>), Open> {
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("127.0.0.1:{port}"))
            .body(())
            .map_err(|e| Open::Failed(e.to_string()))?;
        let opened = tokio::time::timeout(OPEN_TIMEOUT, async {
            let mut send = link.send.clone().ready().await?;
            let (response, tx) = send.send_request(request, false)?;
            Ok::<_, h2::Error>((response.await?, tx))
        })
        .await
        .map_err(|_| Open::Failed("the agent did not open the stream in time".to_owned()))?;
        opened.map_err(|e| {
            if e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM) {
                Open::GoingAway
            } else {
                Open::Failed(e.to_string())
            }
        })
    }

    async fn carry_on(
        &self,
        response: http::Response<h2::RecvStream>,
        mut tx: h2::SendStream<Bytes>,
        stream: TcpStream,
    ) -> Result<(), String> {
        if response.status() != http::StatusCode::OK {
            return Err(format!("the agent answered {}", response.status()));
        }
        let mut rx = response.into_body();
        let (mut read, mut write) = stream.into_split();
        let metrics = &self.metrics;
        let relayed = protocol::relay(
            &mut read,
            &mut write,
            &mut tx,
            &mut rx,
            (&|n| metrics.agent_bytes("to_agent", n), &|n| {
                metrics.agent_bytes("from_agent", n)
            }),
        )
        .await;
        if relayed.failed {
            return Err("a way failed; the stream was reset".to_owned());
        }
        Ok(())
    }
}

/// What `pinacle_agent.secret_sha256` holds for a secret: its SHA-256, lowercase hex (the
/// secret is 256 random bits, so a fast hash is enough).
pub fn secret_digest(secret: &str) -> String {
    crate::hex::encode(&Sha256::digest(secret.as_bytes()))
}

/// Reads the registered agents from `directory` every [`REFRESH_EVERY`] (a failed read keeps
/// what was known).
pub async fn refresh(agents: Arc<Agents>, directory: Arc<dyn pinacle_authz::PodDirectory>) {
    loop {
        match directory.agents().await {
            Ok(list) => agents.set_registered(list),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the registered agents; keeping the last list")
            }
        }
        tokio::time::sleep(REFRESH_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_handshakes_are_bounded_per_peer_and_in_all() {
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let mut p = Pending::default();
        for _ in 0..PENDING_PER_PEER {
            p.admit(a).unwrap();
        }
        assert!(p.admit(a).is_err(), "one address holds at most its share");
        p.admit(b).unwrap();
        p.release(a);
        p.admit(a).unwrap();
        for _ in 0..=PENDING_PER_PEER {
            p.release(a);
        }
        p.release(b);
        assert_eq!(
            (p.total, p.by_peer.len()),
            (0, 0),
            "every place given back once"
        );
        p.release(b);
        assert_eq!(p.total, 0, "a place not held is not given back");

        for i in 0..PENDING_TOTAL {
            let ip = IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]);
            p.admit(ip).unwrap();
        }
        assert!(p.admit(b).is_err(), "no place left for anyone");
    }
}
