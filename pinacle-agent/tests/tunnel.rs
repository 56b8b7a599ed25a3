//! Reverse tunnels end to end: the gateway (`pinacle-ingress`, in-process, real Postgres) and
//! the `pinacle-agent` binary. The pods' server is registered at 192.0.2.10 (TEST-NET-1:
//! nothing the gateway can dial), while its services listen on 127.0.0.1, which only the agent
//! dials: every answer below came through the tunnel.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use pinacle_authz::PostgresDirectory;
use pinacle_authz::testing::Seed;
use pinacle_ingress::config;
use pinacle_ingress::server::{self, Running};
use pinacle_testkit::client::{self, Collected, Connection};
use pinacle_testkit::{reserve_port, upstream, wait_for_port};
use sqlx::PgPool;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const AGENT: &str = env!("CARGO_BIN_EXE_pinacle-agent");
const SECRET: &str = "tunnel-test-secret";
const AGENT_SECRET: &str = "agent-secret-0123456789abcdef0123456789abcdef";
const DASHBOARD_URL: &str = "http://pinacle.test:3000";
/// The server's registered address: nothing answers there.
const UNREACHABLE: &str = "192.0.2.10";

fn unix_now() -> i64 {
    pinacle_ingress::cli::unix_now()
}

fn session_cookie(user: &str) -> String {
    let value = pinacle_authz::testing::session_cookie_value(SECRET, user, unix_now(), 3600);
    format!("next-auth.session-token={value}")
}

fn host(slug: &str) -> String {
    format!("localhost-3000-pod-{slug}.pinacle.test")
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An agent process, killed (by PID) when dropped.
struct Agent(Child);

impl Agent {
    fn start(gateways: &[SocketAddr], secret: &str, extra: &[&str]) -> Self {
        let mut command = Command::new(AGENT);
        for g in gateways {
            command.args(["--gateway", &g.to_string()]);
        }
        command.args(["--server", "s_nat"]).args(extra);
        if !extra.contains(&"--ca-file") && !extra.contains(&"--tls") {
            command.arg("--insecure-plaintext");
        }
        if !extra.contains(&"--allow-ports") {
            command.args(["--allow-ports", "1024-65535"]);
        }
        command
            .env("PINACLE_AGENT_SECRET", secret)
            .env(
                "RUST_LOG",
                std::env::var("PINACLE_TEST_AGENT_LOG").unwrap_or("off".into()),
            )
            .stdout(Stdio::null());
        Self(command.spawn().unwrap())
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Peak resident memory (kB), from /proc.
    fn peak_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct World {
    pool: PgPool,
    _pods: Vec<upstream::Upstream>,
    sse: upstream::Upstream,
}

/// `ada`'s pods on server `s_nat` (registered at an address nothing answers on): `demo` (an
/// HTTP echo), `chat` (a WebSocket echo), `feed` (server-sent events); the agent registered
/// with [`AGENT_SECRET`].
async fn seed(pool: PgPool) -> World {
    let (demo, chat, sse) = (
        upstream::http_echo("demo").await,
        upstream::websocket_echo().await,
        upstream::sse().await,
    );
    let seed = Seed(&pool);
    seed.people().await.unwrap();
    seed.server("s_nat", UNREACHABLE).await.unwrap();
    seed.team_pods(
        "s_nat",
        &[
            ("p_demo", "demo", "running", demo.addr.port()),
            ("p_chat", "chat", "running", chat.addr.port()),
            ("p_feed", "feed", "running", sse.addr.port()),
        ],
    )
    .await
    .unwrap();
    sqlx::query("INSERT INTO pinacle_agent (server_id, secret_sha256) VALUES ('s_nat', $1)")
        .bind(sha256_hex(AGENT_SECRET))
        .execute(&pool)
        .await
        .unwrap();
    World {
        pool,
        _pods: vec![demo, chat],
        sse,
    }
}

struct Gateway {
    running: Running,
    addr: SocketAddr,
    agents: SocketAddr,
    admin: SocketAddr,
}

async fn gateway(pool: &PgPool) -> Gateway {
    gateway_with(pool, "").await
}

async fn gateway_with(pool: &PgPool, extra: &str) -> Gateway {
    gateway_at(
        pool,
        SocketAddr::from(([127, 0, 0, 1], reserve_port())),
        extra,
    )
    .await
}

/// A gateway whose agents connect to `agents`.
async fn gateway_at(pool: &PgPool, agents: SocketAddr, extra: &str) -> Gateway {
    let (listen, admin) = (
        SocketAddr::from(([127, 0, 0, 1], reserve_port())),
        SocketAddr::from(([127, 0, 0, 1], reserve_port())),
    );
    let text = format!(
        "listen = \"{listen}\"\ndashboard_upstream = \"127.0.0.1:9\"\nadmin_listen = \"{admin}\"\n\
         agent_listen = \"{agents}\"\nbase_domains = [\"pinacle.test\"]\nthreads = 2\n\
         shutdown_grace_period = \"1s\"\nupstream_connect_timeout = \"2s\"\n\
         upstream_read_timeout = \"30s\"\n{extra}"
    );
    let env: HashMap<&str, &str> =
        HashMap::from([("NEXTAUTH_SECRET", SECRET), ("NEXTAUTH_URL", DASHBOARD_URL)]);
    let config = config::from_toml(&text, "test", &|k| env.get(k).map(|v| (*v).to_owned()))
        .unwrap_or_else(|e| panic!("{e}"));
    let directory = Arc::new(PostgresDirectory::from_pool(
        pool.clone(),
        Duration::from_secs(5),
    ));
    if std::env::var_os("PINACLE_TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("PINACLE_TEST_LOG"))
            .with_test_writer()
            .try_init();
    }
    let running = server::spawn(config, directory, unix_now).unwrap();
    wait_for_port(listen).await;
    wait_for_port(agents).await;
    Gateway {
        running,
        addr: listen,
        agents,
        admin,
    }
}

impl Gateway {
    async fn get(&self, slug: &str, path: &str) -> Collected {
        client::get(
            self.addr,
            path,
            &[("host", &host(slug)), ("cookie", &session_cookie("ada"))],
        )
        .await
    }

    fn metric(&self, name: &str) -> f64 {
        pinacle_testkit::metric(&self.running.metrics().unwrap().render(), name)
    }

    /// Waits (bounded) until `n` agents are connected.
    async fn wait_for_agents(&self, n: f64) {
        self.wait_for_metric("pinacle_ingress_agents_connected", n)
            .await;
    }

    /// Waits (at most 15 s) until the series `name` reads `n`.
    async fn wait_for_metric(&self, name: &str, n: f64) {
        self.wait_until(name, |v| v == n, &format!("waiting for {n}"))
            .await;
    }

    /// Waits (at most 15 s) until the series `name` satisfies `ok`; `what` names the wait.
    async fn wait_until(&self, name: &str, ok: impl Fn(f64) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !ok(self.metric(name)) {
            assert!(
                Instant::now() < deadline,
                "{name}: {} ({what})",
                self.metric(name)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn http_sse_websocket_and_a_hundred_streams_cross_the_tunnel(pool: PgPool) {
    let w = seed(pool).await;
    let g = gateway(&w.pool).await;
    // Registered, not connected: 502 at once, the server's address never dialed.
    tokio::time::sleep(Duration::from_millis(2500)).await; // the registration is read every 2 s
    let started = Instant::now();
    let r = g.get("demo", "/").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.header("x-pinacle-ingress"), Some("tunnel-offline"));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    let _agent = Agent::start(&[g.agents], AGENT_SECRET, &[]);
    g.wait_for_agents(1.0).await;
    let r = g.get("demo", "/items?x=1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let echo = r.json();
    assert_eq!(
        (echo["name"].as_str(), echo["path"].as_str()),
        (Some("demo"), Some("/items?x=1"))
    );
    assert!(
        echo["headers"].get("cookie").is_none(),
        "credentials crossed: {echo}"
    );
    assert_eq!(echo["headers"]["x-forwarded-host"], host("demo"));

    // Server-sent events: the first event, then the second once released.
    let mut conn = Connection::open(g.addr).await;
    let response = conn
        .send(
            "GET",
            "/events",
            &[
                ("host", &host("feed")),
                ("cookie", &session_cookie("ada")),
                ("accept", "text/event-stream"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), client::next_chunk(&mut body))
        .await
        .unwrap()
        .unwrap();
    assert!(first.contains("data: first"), "{first}");
    w.sse.release.notify_one();
    let second = tokio::time::timeout(Duration::from_secs(5), client::next_chunk(&mut body))
        .await
        .unwrap()
        .unwrap();
    assert!(second.contains("data: second"), "{second}");

    // A WebSocket echo.
    let mut request = format!("ws://{}/socket", g.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("host", host("chat").parse().unwrap());
    request
        .headers_mut()
        .insert("cookie", session_cookie("ada").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    for i in 0..5 {
        ws.send(Message::Text(format!("hello {i}").into()))
            .await
            .unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), format!("hello {i}"));
    }
    drop(ws);

    // A hundred requests at once, each on its own connection (so its own stream).
    let requests = (0..100).map(|i| {
        let g = &g;
        async move { g.get("demo", &format!("/n/{i}")).await }
    });
    let answers = futures_util::future::join_all(requests).await;
    for (i, r) in answers.iter().enumerate() {
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.json()["path"], format!("/n/{i}"));
    }
    // The admin listener names the agent.
    let listed = client::get(g.admin, "/agents", &[("host", "admin")])
        .await
        .json();
    assert_eq!(listed["agents"][0]["server"], "s_nat", "{listed}");
    assert!(g.metric("pinacle_ingress_agent_connects_total{result=\"accepted\"}") >= 1.0);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_gibibyte_upload_crosses_the_tunnel_in_bounded_memory(pool: PgPool) {
    let w = seed(pool).await;
    let g = gateway(&w.pool).await;
    let agent = Agent::start(&[g.agents], AGENT_SECRET, &[]);
    g.wait_for_agents(1.0).await;
    const TOTAL: u64 = 1 << 30;
    const CHUNK: usize = 1 << 20;
    let (sender, body) = {
        let (tx, rx) = tokio::sync::mpsc::channel::<
            Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
        >(4);
        (
            tx,
            http_body_util::StreamBody::new(tokio_stream_like::Receiver(rx)),
        )
    };
    let writer = tokio::spawn(async move {
        let chunk = Bytes::from(vec![b'x'; CHUNK]);
        for _ in 0..(TOTAL / CHUNK as u64) {
            if sender
                .send(Ok(hyper::body::Frame::data(chunk.clone())))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let stream = tokio::net::TcpStream::connect(g.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = hyper::Request::post("/upload")
        .header("host", host("demo"))
        .header("cookie", session_cookie("ada"))
        .header("content-length", TOTAL.to_string())
        .body(body)
        .unwrap();
    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(600), send.send_request(request))
        .await
        .unwrap()
        .unwrap();
    let status = response.status();
    let bytes = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    writer.await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    let echo: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(echo["body_len"], TOTAL);
    let peak_mb = agent.peak_kb() / 1024;
    eprintln!(
        "1 GiB through the tunnel in {:?}; the agent's peak resident memory: {peak_mb} MiB",
        started.elapsed()
    );
    assert!(peak_mb < 64, "the agent held {peak_mb} MiB at its peak");
    // This process holds the gateway, the client and the pod: none of them held the upload.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let own_mb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .unwrap()
        / 1024;
    eprintln!("the test process's peak resident memory (gateway, client, pod): {own_mb} MiB");
    assert!(
        own_mb < 400,
        "the gateway side held {own_mb} MiB at its peak"
    );
    assert!(g.metric("pinacle_ingress_agent_bytes_total{direction=\"to_agent\"}") >= TOTAL as f64);
}

/// A `Stream` over a tokio receiver (what `tokio-stream` would give).
mod tokio_stream_like {
    pub struct Receiver<T>(pub tokio::sync::mpsc::Receiver<T>);

    impl<T> futures_util::Stream for Receiver<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn an_agent_killed_mid_traffic_gives_quick_502s_then_traffic_again(pool: PgPool) {
    let w = seed(pool).await;
    let g = gateway(&w.pool).await;
    let agent = Agent::start(&[g.agents], AGENT_SECRET, &[]);
    g.wait_for_agents(1.0).await;
    for _ in 0..5 {
        assert_eq!(g.get("demo", "/").await.status, 200);
    }
    // SIGKILL: the tunnel's TCP connection ends with the process.
    drop(agent);
    g.wait_for_agents(0.0).await;
    for _ in 0..5 {
        let started = Instant::now();
        let r = g.get("demo", "/").await;
        assert_eq!(
            (r.status, r.header("x-pinacle-ingress")),
            (502, Some("tunnel-offline"))
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    let _again = Agent::start(&[g.agents], AGENT_SECRET, &[]);
    g.wait_for_agents(1.0).await;
    assert_eq!(g.get("demo", "/").await.status, 200);
    assert!(g.metric("pinacle_ingress_agent_connects_total{result=\"accepted\"}") >= 2.0);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_wrong_or_revoked_secret_gets_no_tunnel(pool: PgPool) {
    let w = seed(pool).await;
    let g = gateway(&w.pool).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let wrong = Agent::start(&[g.agents], "not-the-secret", &[]);
    g.wait_until(
        "pinacle_ingress_agent_connects_total{result=\"refused\"}",
        |v| v >= 1.0,
        "the wrong secret was not refused",
    )
    .await;
    assert_eq!(g.metric("pinacle_ingress_agents_connected"), 0.0);
    assert_eq!(g.get("demo", "/").await.status, 502);
    drop(wrong);

    let _agent = Agent::start(&[g.agents], AGENT_SECRET, &[]);
    g.wait_for_agents(1.0).await;
    assert_eq!(g.get("demo", "/").await.status, 200);
    // Revoked: the gateway drops the tunnel within its refresh, and the pod is no longer
    // reached (its server's registered address is not reachable from here).
    sqlx::query("DELETE FROM pinacle_agent WHERE server_id = 's_nat'")
        .execute(&w.pool)
        .await
        .unwrap();
    g.wait_for_agents(0.0).await;
    let r = g.get("demo", "/").await;
    assert!(r.status >= 500 && r.status != 200, "{}", r.status);
    assert_ne!(r.header("x-pinacle-ingress"), None);
}

/// The server behind NAT for real: its service listens on the loopback of a network namespace
/// of its own, where the agent runs too; the gateway (here) can reach nothing in there, and the
/// agent reaches the gateway over the namespace's one link. The pod is served through the
/// tunnel and only through it. Needs root (CI and the README's test command run as root).
#[sqlx::test(migrations = "../migrations")]
async fn a_server_in_its_own_network_namespace_is_reached_through_its_agent(pool: PgPool) {
    let ns = match pinacle_testkit::netns::Netns::create("tunnel") {
        Ok(ns) => ns,
        Err(e) if !running_as_root() => {
            eprintln!("skipped: a network namespace needs root ({e})");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let w = seed(pool).await;
    let seed = Seed(&w.pool);
    seed.server("s_ns", &ns.inside.to_string()).await.unwrap();
    seed.team_pods("s_ns", &[("p_in", "inside", "running", 8080)])
        .await
        .unwrap();
    sqlx::query("INSERT INTO pinacle_agent (server_id, secret_sha256) VALUES ('s_ns', $1)")
        .bind(sha256_hex(AGENT_SECRET))
        .execute(&w.pool)
        .await
        .unwrap();
    let www = std::env::temp_dir().join(format!("pinacle-netns-www-{}", std::process::id()));
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "hello from inside").unwrap();
    // A server, not an agent, but ended by its PID on drop the same way.
    let _service = Agent(
        ns.command("python3")
            .args(["-m", "http.server", "8080", "--bind", "127.0.0.1"])
            .current_dir(&www)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let g = gateway_at(&w.pool, SocketAddr::from((ns.outside, reserve_port())), "").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = g.get("inside", "/hello.txt").await;
    assert_eq!(r.header("x-pinacle-ingress"), Some("tunnel-offline"));
    // Nothing of ours reaches the service: it is on the namespace's own loopback.
    let direct = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect((ns.inside, 8080)),
    )
    .await;
    assert!(
        !matches!(direct, Ok(Ok(_))),
        "the service is reachable from outside"
    );

    let _agent = Agent(
        ns.command(AGENT)
            .args(["--gateway", &g.agents.to_string(), "--server", "s_ns"])
            .args(["--insecure-plaintext", "--allow-ports", "8080"])
            .env("PINACLE_AGENT_SECRET", AGENT_SECRET)
            .env("RUST_LOG", "off")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    g.wait_for_agents(1.0).await;
    // The service may still be starting: bounded retries.
    let deadline = Instant::now() + Duration::from_secs(15);
    let r = loop {
        let r = g.get("inside", "/hello.txt").await;
        if r.status == 200 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((r.status, r.text()), (200, "hello from inside".to_owned()));
    let listed = client::get(g.admin, "/agents", &[("host", "admin")])
        .await
        .json();
    let peer = listed["agents"][0]["peer"].as_str().unwrap_or_default();
    assert!(
        peer.starts_with(&format!("{}:", ns.inside)),
        "the agent came from inside: {listed}"
    );
    std::fs::remove_dir_all(&www).unwrap();
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

/// Connects to `to` from `from` (a loopback address of this machine's 127.0.0.0/8).
async fn connect_from(from: [u8; 4], to: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// What `stream` says within 5 s: its bytes up to the close.
async fn said(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got))
        .await
        .expect("closed within 5 s");
    got
}

/// What the gateway answers an upgrade request without a secret from `from`.
async fn not_an_agent(from: [u8; 4], to: SocketAddr) -> Vec<u8> {
    let mut stream = connect_from(from, to).await;
    tokio::io::AsyncWriteExt::write_all(
        &mut stream,
        b"GET /pinacle-agent/v1 HTTP/1.1\r\nhost: x\r\nupgrade: pinacle-agent-h2\r\n\r\n",
    )
    .await
    .unwrap();
    said(&mut stream).await
}

/// Anyone can reach `agent_listen`: an address holding its share of unauthenticated
/// connections gets no more (closed unanswered, counted as busy) while other addresses are
/// still answered, and its places come back as its connections end.
#[sqlx::test(migrations = "../migrations")]
async fn silent_connections_cannot_crowd_agents_out(pool: PgPool) {
    let w = seed(pool).await;
    let g = gateway(&w.pool).await;
    let pending = "pinacle_ingress_agent_handshakes_pending";
    // Connections are accepted in order: once a later one is answered, the gateway's readiness
    // probe has been accepted too; then every place is free once its close has been seen.
    assert!(
        not_an_agent([127, 0, 0, 2], g.agents)
            .await
            .starts_with(b"HTTP/1.1 401 ")
    );
    g.wait_for_metric(pending, 0.0).await;
    let mut silent = Vec::new();
    for _ in 0..pinacle_ingress::agents::PENDING_PER_PEER {
        silent.push(connect_from([127, 0, 0, 1], g.agents).await);
    }
    let held = pinacle_ingress::agents::PENDING_PER_PEER as f64;
    g.wait_for_metric(pending, held).await;
    let mut more = connect_from([127, 0, 0, 1], g.agents).await;
    assert_eq!(said(&mut more).await, b"", "closed unanswered");
    assert_eq!(
        g.metric("pinacle_ingress_agent_connects_total{result=\"busy\"}"),
        1.0
    );
    // Another address is still heard (and refused: it is no agent).
    assert!(
        not_an_agent([127, 0, 0, 2], g.agents)
            .await
            .starts_with(b"HTTP/1.1 401 ")
    );
    // The silent ones go: the real agent, from the crowded address, gets its tunnel.
    drop(silent);
    g.wait_for_metric(pending, 0.0).await;
    let _agent = Agent::start(&[g.agents], AGENT_SECRET, &[]);
    g.wait_for_agents(1.0).await;
    assert_eq!(g.get("demo", "/").await.status, 200);
    assert_eq!(
        g.metric("pinacle_ingress_agent_connects_total{result=\"busy\"}"),
        1.0,
        "no agent connection was turned away once they had gone"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn one_agent_serves_every_gateway_and_dials_only_allowed_ports(pool: PgPool) {
    let w = seed(pool).await;
    let (a, b) = (gateway(&w.pool).await, gateway(&w.pool).await);
    let _agent = Agent::start(&[a.agents, b.agents], AGENT_SECRET, &[]);
    a.wait_for_agents(1.0).await;
    b.wait_for_agents(1.0).await;
    assert_eq!(a.get("demo", "/").await.status, 200);
    assert_eq!(b.get("demo", "/").await.status, 200);
    // An agent that may dial only 30000-30001 refuses every other port: the pod is not reached.
    let c = gateway(&w.pool).await;
    let _narrow = Agent::start(&[c.agents], AGENT_SECRET, &["--allow-ports", "30000-30001"]);
    c.wait_for_agents(1.0).await;
    let r = c.get("demo", "/").await;
    assert_eq!(r.status, 502, "{}", r.text());
}

#[sqlx::test(migrations = "../migrations")]
async fn sigterm_drains_the_agent_and_it_exits_cleanly(pool: PgPool) {
    let w = seed(pool).await;
    let g = gateway(&w.pool).await;
    let mut agent = Agent::start(&[g.agents], AGENT_SECRET, &[]);
    g.wait_for_agents(1.0).await;
    assert_eq!(g.get("demo", "/").await.status, 200);
    let kill = Command::new("kill")
        .args(["-TERM", &agent.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    // While the agent drains, requests neither hang nor fail strangely: a stream already open
    // (the gateway's pooled upstream connection) finishes its requests (200); a new one is not
    // opened on the going-away tunnel, which is then forgotten: tunnel-offline from then on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut offline = false;
    for _ in 0..10 {
        let burst = (0..5).map(|_| g.get("demo", "/"));
        let started = Instant::now();
        for r in futures_util::future::join_all(burst).await {
            assert!(
                r.status == 200 || r.status == 502,
                "{} {}",
                r.status,
                r.text()
            );
            offline |= r.header("x-pinacle-ingress") == Some("tunnel-offline");
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        if offline {
            break;
        }
    }
    assert!(offline, "a draining agent kept taking new streams");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = agent.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    g.wait_for_agents(0.0).await;
}

#[sqlx::test(migrations = "../migrations")]
async fn the_agent_listener_speaks_tls_and_the_agent_verifies_it(pool: PgPool) {
    let w = seed(pool).await;
    let dir = std::env::temp_dir().join(format!("pinacle-agent-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = pinacle_testkit::tls::Ca::new();
    ca.leaf(&["localhost"], &dir, "gateway");
    std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
    let tls_port = reserve_port();
    let g = gateway_with(
        &w.pool,
        &format!(
            "tls_listen = \"127.0.0.1:{tls_port}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            dir.join("gateway.pem").display(),
            dir.join("gateway.key").display()
        ),
    )
    .await;
    let gateway = format!("localhost:{}", g.agents.port());
    // Not trusted (the system's roots only): no tunnel.
    let mut untrusting = Command::new(AGENT);
    untrusting
        .args([
            "--gateway",
            &gateway,
            "--server",
            "s_nat",
            "--allow-ports",
            "1024-65535",
        ])
        .env("PINACLE_AGENT_SECRET", AGENT_SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let untrusting = Agent(untrusting.spawn().unwrap());
    g.wait_until(
        "pinacle_ingress_agent_connects_total{result=\"refused\"}",
        |v| v >= 1.0,
        "the untrusted handshake was not refused",
    )
    .await;
    assert_eq!(g.metric("pinacle_ingress_agents_connected"), 0.0);
    drop(untrusting);
    // Trusting the gateway's authority: the tunnel works.
    let mut trusting = Command::new(AGENT);
    trusting
        .args([
            "--gateway",
            &gateway,
            "--server",
            "s_nat",
            "--allow-ports",
            "1024-65535",
        ])
        .args(["--ca-file", dir.join("ca.pem").to_str().unwrap()])
        .env("PINACLE_AGENT_SECRET", AGENT_SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _trusting = Agent(trusting.spawn().unwrap());
    g.wait_for_agents(1.0).await;
    assert_eq!(g.get("demo", "/").await.status, 200);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_shipped_unit_names_only_flags_the_agent_takes() {
    let unit = std::fs::read_to_string(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../config/pinacle-agent.service"),
    )
    .unwrap();
    let exec = unit
        .replace("\\\n", " ")
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart=/usr/local/bin/pinacle-agent "))
        .unwrap()
        .to_owned();
    let args: Vec<String> = exec
        .split_whitespace()
        .map(|a| a.replace("/etc/pinacle/agent-secret", "/nonexistent/agent-secret"))
        .collect();
    // Every flag parses; the run stops at the missing secret file (exit 2, naming it).
    let out = Command::new(AGENT)
        .args(&args)
        .env_remove("PINACLE_AGENT_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--secret-file /nonexistent/agent-secret"),
        "{stderr}"
    );
    let version = Command::new(AGENT).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("pinacle-agent "));
}
