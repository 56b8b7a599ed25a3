//! Live authorization across gateways (issue 16): two in-process gateways against one real
//! Postgres (each test its own migrated database, the notification triggers included), each
//! reaching it through a TCP relay the test owns. A change committed in one transaction reaches
//! both within a second and closes the open WebSockets it revokes; a database outage keeps known
//! users working from stale grants while `/readyz` says degraded, and a change made meanwhile
//! applies once the link is back, without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pinacle_authz::testing::{PodSeed, Seed, ports_json};
use pinacle_authz::{PostgresDirectory, PostgresOptions};
use pinacle_ingress::config;
use pinacle_ingress::server::{self, Running};
use pinacle_testkit::client::{self, Collected};
use pinacle_testkit::relay::Relay;
use pinacle_testkit::{reserve_port, upstream, wait_for_port};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const SECRET: &str = "live-authorization-test-secret";
const DASHBOARD_URL: &str = "http://pinacle.test:3000";

fn unix_now() -> i64 {
    pinacle_ingress::cli::unix_now()
}

fn session_cookie(user: &str) -> String {
    let value = pinacle_authz::testing::session_cookie_value(SECRET, user, unix_now(), 3600);
    format!("next-auth.session-token={value}")
}

/// The test database, reached through a relay: its URL and the relay.
async fn relayed_database(pool: &PgPool) -> (String, Relay) {
    let options = pool.connect_options();
    let host = match options.get_host() {
        h if h.starts_with('/') => "127.0.0.1",
        h => h,
    };
    let target = tokio::net::lookup_host((host, options.get_port()))
        .await
        .unwrap()
        .find(SocketAddr::is_ipv4)
        .unwrap();
    let relay = Relay::start(target).await;
    let url = format!(
        "postgres://{}@{}/{}",
        options.get_username(),
        relay.addr,
        options.get_database().unwrap()
    );
    (url, relay)
}

/// A gateway whose directory and notification listener use `database_url`.
async fn gateway(database_url: &str, dashboard: SocketAddr, extra: &str) -> Gateway {
    let listen: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let text = format!(
        "listen = \"{listen}\"\ndashboard_upstream = \"{dashboard}\"\nadmin_listen = \"{admin}\"\n\
         base_domains = [\"pinacle.test\"]\nthreads = 2\nshutdown_grace_period = \"1s\"\n\
         directory_query_timeout = \"300ms\"\n{extra}"
    );
    let env: HashMap<&str, &str> = HashMap::from([
        ("NEXTAUTH_SECRET", SECRET),
        ("NEXTAUTH_URL", DASHBOARD_URL),
        ("DATABASE_URL", database_url),
    ]);
    let config = config::from_toml(&text, "test", &|k| env.get(k).map(|v| (*v).to_owned()))
        .unwrap_or_else(|e| panic!("{e}"));
    let directory = PostgresDirectory::connect_lazy(
        database_url,
        &PostgresOptions {
            acquire_timeout: Duration::from_millis(300),
            query_timeout: Duration::from_millis(300),
            ..PostgresOptions::default()
        },
    )
    .unwrap();
    let running = server::spawn(config, Arc::new(directory), unix_now).unwrap();
    wait_for_port(listen).await;
    wait_for_port(admin).await;
    Gateway {
        running,
        addr: listen,
        admin,
    }
}

struct Gateway {
    running: Running,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Gateway {
    async fn get(&self, host: &str, user: &str) -> Collected {
        client::get(
            self.addr,
            "/",
            &[("host", host), ("cookie", &session_cookie(user))],
        )
        .await
    }

    /// A streaming GET of `user`'s, raw, read until `enough` holds for what arrived.
    async fn stream(
        &self,
        host: &str,
        path: &str,
        user: &str,
        enough: impl Fn(&str) -> bool,
    ) -> tokio::net::TcpStream {
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nhost: {host}\r\ncookie: {}\r\n\r\n",
            session_cookie(user)
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        while !enough(&String::from_utf8_lossy(&seen)) {
            let mut buf = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "the stream ended early");
            seen.extend_from_slice(&buf[..n]);
        }
        stream
    }

    async fn readyz(&self) -> Collected {
        client::get(self.admin, "/readyz", &[("host", "admin")]).await
    }

    fn metric(&self, name: &str) -> f64 {
        pinacle_testkit::metric(&self.running.metrics().unwrap().render(), name)
    }

    async fn websocket(
        &self,
        host: &str,
        user: &str,
    ) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>
    {
        let mut request = format!("ws://{}/term", self.addr)
            .into_client_request()
            .unwrap();
        request.headers_mut().insert("host", host.parse().unwrap());
        request
            .headers_mut()
            .insert("cookie", session_cookie(user).parse().unwrap());
        let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
        assert_eq!(response.status(), 101);
        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
        ws
    }
}

/// The people (`ada` owns team `t1`, `bob` a member, `mal` a stranger) and pods of `t1` on
/// server `s1` at 127.0.0.1: `(id, slug, nginx-proxy port)`.
async fn seed(pool: &PgPool, pods: &[(&str, &str, u16)]) {
    let seed = Seed(pool);
    seed.people().await.unwrap();
    seed.server("s1", "127.0.0.1").await.unwrap();
    for &(id, slug, port) in pods {
        let ports = ports_json(port);
        seed.pod(&PodSeed {
            id,
            slug,
            owner_id: "ada",
            team_id: "t1",
            server_id: Some("s1"),
            status: "running",
            ports: Some(&ports),
            age_secs: 60.0,
        })
        .await
        .unwrap();
    }
}

/// Waits (at most 10 s) until `n` gateways listen for changes on this database.
async fn listening(pool: &PgPool, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listening: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'pinacle-ingress-listen' AND query ILIKE 'LISTEN%'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if listening >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{listening} of {n} gateways listen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn host(port: u16, slug: &str) -> String {
    format!("localhost-{port}-pod-{slug}.pinacle.test")
}

/// Waits (at most `within`) until `ws` is closed by the ingress with 1008 "access revoked".
async fn closed_as_revoked(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    within: Duration,
) {
    let frame = tokio::time::timeout(within, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("the tunnel ended without a close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("the revoked tunnel is closed in time")
    .expect("a close frame with a code");
    assert_eq!(frame.code, CloseCode::Policy);
    assert_eq!(frame.reason.as_str(), "access revoked");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_change_reaches_every_gateway_within_a_second_and_closes_what_it_revokes(pool: PgPool) {
    let (echo, ws_echo, sse, dashboard) = (
        upstream::http_echo("pod").await,
        upstream::websocket_echo().await,
        upstream::sse().await,
        upstream::http_echo("dashboard").await,
    );
    seed(
        &pool,
        &[
            ("p_demo", "demo", echo.addr.port()),
            ("p_term", "term", ws_echo.addr.port()),
            ("p_feed", "feed", sse.addr.port()),
        ],
    )
    .await;
    let (url, _relay) = relayed_database(&pool).await;
    let gateways = [
        gateway(&url, dashboard.addr, "").await,
        gateway(&url, dashboard.addr, "").await,
    ];
    let demo = host(echo.addr.port(), "demo");
    let term = host(ws_echo.addr.port(), "term");
    // Both gateways know bob (his allow cached for 30 s) and hold a terminal of his open.
    let mut terminals = Vec::new();
    for g in &gateways {
        assert_eq!(g.get(&demo, "bob").await.status, 200);
        terminals.push(g.websocket(&term, "bob").await);
    }
    let ada_terminal = gateways[0].websocket(&term, "ada").await;
    // And an event stream of his on each (the plain engine), running for longer than a second
    // so that it counts as long-lived.
    let feed = host(sse.addr.port(), "feed");
    let mut streams = Vec::new();
    for g in &gateways {
        streams.push(
            g.stream(&feed, "/events", "bob", |seen| seen.contains("data: first"))
                .await,
        );
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    listening(&pool, 2).await;
    Seed(&pool).remove_member("t1", "bob").await.unwrap();
    let removed = Instant::now();
    for g in &gateways {
        loop {
            if g.get(&demo, "bob").await.status == 403 {
                break;
            }
            assert!(
                removed.elapsed() < Duration::from_secs(1),
                "a gateway still let bob in a second after his removal"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for ws in &mut terminals {
        closed_as_revoked(ws, Duration::from_secs(2)).await;
    }
    for stream in &mut streams {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut rest))
            .await
            .expect("the revoked stream ends in time")
            .unwrap();
        assert!(!String::from_utf8_lossy(&rest).contains("second"));
    }
    for g in &gateways {
        assert!(g.metric("pinacle_ingress_directory_notifications_total") >= 1.0);
        assert_eq!(
            g.metric("pinacle_ingress_revoked_connections_total{kind=\"tunnel\"}"),
            1.0
        );
        assert_eq!(
            g.metric("pinacle_ingress_revoked_connections_total{kind=\"stream\"}"),
            1.0
        );
        // The owner is unaffected.
        assert_eq!(g.get(&demo, "ada").await.status, 200);
    }
    // Archiving the pod closes the owner's terminal too, and the pod is gone on both.
    let mut ada_terminal = ada_terminal;
    Seed(&pool).archive_pod("p_term").await.unwrap();
    closed_as_revoked(&mut ada_terminal, Duration::from_secs(2)).await;
    let archived = Instant::now();
    for g in &gateways {
        loop {
            let mut request = format!("ws://{}/term", g.addr)
                .into_client_request()
                .unwrap();
            request.headers_mut().insert("host", term.parse().unwrap());
            request
                .headers_mut()
                .insert("cookie", session_cookie("ada").parse().unwrap());
            if tokio_tungstenite::connect_async(request).await.is_err() {
                break;
            }
            assert!(archived.elapsed() < Duration::from_secs(1));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_database_outage_keeps_known_users_and_a_change_made_meanwhile_applies_after(
    pool: PgPool,
) {
    let (echo, dashboard) = (
        upstream::http_echo("pod").await,
        upstream::http_echo("dashboard").await,
    );
    seed(&pool, &[("p_demo", "demo", echo.addr.port())]).await;
    let (url, relay) = relayed_database(&pool).await;
    // `short` forgets its answers after 300 ms (stale-if-error then keeps them); `long` keeps
    // them 60 s, so only the listener's reconnect can make it forget.
    let short = gateway(&url, dashboard.addr, "authz_allow_ttl = \"300ms\"").await;
    let long = gateway(&url, dashboard.addr, "authz_allow_ttl = \"60s\"").await;
    let demo = host(echo.addr.port(), "demo");
    listening(&pool, 2).await;
    assert_eq!(short.get(&demo, "ada").await.status, 200);
    assert_eq!(long.get(&demo, "ada").await.status, 200);
    assert_eq!(short.readyz().await.status, 200);

    relay.cut();
    // Past the allow TTL: ada's grant has expired, and is honoured stale.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = short.get(&demo, "ada").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(short.metric("pinacle_ingress_authz_cache_lookups_total{result=\"stale\"}") >= 1.0);
    // Someone never seen cannot be decided: 503, as without stale-if-error.
    let r = short.get(&demo, "bob").await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.header("x-pinacle-ingress"),
        Some("authorization-unavailable")
    );
    let ready = short.readyz().await;
    assert_eq!(
        (ready.status, ready.text()),
        (200, r#"{"status":"degraded"}"#.to_owned())
    );

    // A change while the gateways cannot hear it: the pod stops.
    Seed(&pool)
        .set_pod_status("p_demo", "stopped")
        .await
        .unwrap();
    assert_eq!(long.get(&demo, "ada").await.status, 200, "still cached");
    relay.restore();

    // Back: the listener reconnects (capped backoff), forgets everything, and the change applies
    // on the gateway whose cache would otherwise have kept the allow for a minute.
    let restored = Instant::now();
    loop {
        if long.get(&demo, "ada").await.status == 503 {
            break;
        }
        assert!(
            restored.elapsed() < Duration::from_secs(15),
            "the change made during the outage never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(long.metric("pinacle_ingress_directory_listener_reconnects_total") >= 1.0);
    loop {
        let ready = short.readyz().await;
        if ready.text() == r#"{"status":"ready"}"# {
            break;
        }
        assert!(
            restored.elapsed() < Duration::from_secs(15),
            "{}",
            ready.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(short.get(&demo, "ada").await.status, 503);
}

#[sqlx::test(migrations = "../migrations")]
async fn without_notifications_live_grants_are_checked_every_allow_ttl_and_expiry_alone_closes_nothing(
    pool: PgPool,
) {
    let (ws_echo, dashboard) = (
        upstream::websocket_echo().await,
        upstream::http_echo("dashboard").await,
    );
    seed(&pool, &[("p_term", "term", ws_echo.addr.port())]).await;
    let (url, _relay) = relayed_database(&pool).await;
    let g = gateway(
        &url,
        dashboard.addr,
        "directory_notifications = false\nauthz_allow_ttl = \"500ms\"",
    )
    .await;
    let term = host(ws_echo.addr.port(), "term");
    let mut bob = g.websocket(&term, "bob").await;
    // ada's terminal is opened with a proxy token that expires in 2 s.
    let now = unix_now();
    let verifier =
        pinacle_authz::CredentialVerifier::new(&pinacle_authz::CredentialConfig::with_secrets(
            vec![pinacle_authz::Secret::new(SECRET.to_owned())],
        ))
        .unwrap();
    let token = verifier
        .mint_proxy_token(&pinacle_authz::ProxyTokenClaims {
            user_id: "ada".into(),
            pod_id: "p_term".into(),
            pod_slug: "term".into(),
            target_port: ws_echo.addr.port(),
            iat: now - 898,
            exp: now + 2,
        })
        .unwrap();
    let mut request = format!("ws://{}/term", g.addr)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert("host", term.parse().unwrap());
    request.headers_mut().insert(
        "cookie",
        format!("pinacle-proxy-token={token}").parse().unwrap(),
    );
    let (mut ada, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    // Nobody announces the removal: the sweep (every allow TTL) finds it.
    Seed(&pool).remove_member("t1", "bob").await.unwrap();
    closed_as_revoked(&mut bob, Duration::from_secs(3)).await;
    // ada's token has expired by now, after several sweeps; her terminal still works.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    ada.send(Message::text("still mine")).await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), ada.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        Message::text("still mine")
    );
    assert_eq!(
        g.metric("pinacle_ingress_directory_notifications_total"),
        0.0
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_streaming_response_on_either_engine_ends_when_access_goes(pool: PgPool) {
    let (ticks, dashboard) = (
        upstream::ticking().await,
        upstream::http_echo("dashboard").await,
    );
    seed(&pool, &[("p_ticks", "ticks", ticks.addr.port())]).await;
    let (url, _relay) = relayed_database(&pool).await;
    let gateways = [
        gateway(&url, dashboard.addr, "plain_path = true").await,
        gateway(&url, dashboard.addr, "plain_path = false").await,
    ];
    let host = host(ticks.addr.port(), "ticks");
    let mut streams = Vec::new();
    for g in &gateways {
        streams.push(
            g.stream(&host, "/ticks", "bob", |seen| {
                seen.matches("tick").count() >= 2
            })
            .await,
        );
    }
    // Long-lived by now (the plain engine registers a response running for over a second).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    listening(&pool, 2).await;
    Seed(&pool).remove_member("t1", "bob").await.unwrap();
    for (stream, g) in streams.iter_mut().zip(&gateways) {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), async {
            // Ends with the connection (closed, or reset by a close with unread bytes).
            let _ = stream.read_to_end(&mut rest).await;
        })
        .await
        .expect("the revoked stream ends within two seconds");
        assert!(!String::from_utf8_lossy(&rest).ends_with("0\r\n\r\n"));
        assert_eq!(
            g.metric("pinacle_ingress_revoked_connections_total{kind=\"stream\"}"),
            1.0
        );
    }
}
