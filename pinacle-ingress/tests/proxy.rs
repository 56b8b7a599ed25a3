//! The ingress end to end, in-process, against real peers on ephemeral ports: Postgres (each test
//! its own migrated database), the pod's real nginx rendered by `nginx-templates` as the second
//! hop, and real HTTP, SSE and WebSocket servers behind it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use pinacle_authz::testing::{PodSeed, Seed, ports_json};
use pinacle_authz::{
    CredentialConfig, CredentialVerifier, PodDirectory, PodSlug, PostgresDirectory,
    ProxyTokenClaims, Secret, UserId,
};
use pinacle_ingress::config;
use pinacle_ingress::server::{self, Running};
use pinacle_testkit::client::{self, Collected, Connection};
use pinacle_testkit::nginx::Nginx;
use pinacle_testkit::{reserve_port, upstream, wait_for_port};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "end-to-end-test-secret";
const DASHBOARD_URL: &str = "http://pinacle.test:3000";

fn unix_now() -> i64 {
    pinacle_ingress::cli::unix_now()
}

fn verifier() -> CredentialVerifier {
    CredentialVerifier::new(&CredentialConfig::with_secrets(vec![Secret::new(
        SECRET.to_owned(),
    )]))
    .unwrap()
}

/// A next-auth v4 session cookie for `user`, valid for an hour.
fn session_cookie(user: &str) -> String {
    let value = pinacle_authz::testing::session_cookie_value(SECRET, user, unix_now(), 3600);
    format!("next-auth.session-token={value}")
}

fn proxy_token(user: &str, pod_id: &str, slug: &str, port: u16) -> String {
    proxy_token_left(user, pod_id, slug, port, 900)
}

/// A proxy token with `left` seconds of its 900 to go.
fn proxy_token_left(user: &str, pod_id: &str, slug: &str, port: u16, left: i64) -> String {
    let now = unix_now();
    verifier()
        .mint_proxy_token(&ProxyTokenClaims {
            user_id: user.into(),
            pod_id: pod_id.into(),
            pod_slug: slug.into(),
            target_port: port,
            iat: now + left - 900,
            exp: now + left,
        })
        .unwrap()
}

/// Whether the ingresses of these tests serve plain requests on the plain path: yes unless
/// `PINACLE_TEST_PLAIN_PATH=false` (scripts/test runs these tests both ways).
fn plain_path() -> bool {
    std::env::var("PINACLE_TEST_PLAIN_PATH").as_deref() != Ok("false")
}

/// How many requests the plain path served: `n` when it is on, none when it is off.
fn served_plain(n: f64) -> f64 {
    if plain_path() { n } else { 0.0 }
}

fn pod_host(port: u16, slug: &str) -> String {
    format!("localhost-{port}-pod-{slug}.pinacle.test")
}

/// Starts the ingress with `extra` TOML lines on reserved ports (proxy and admin) and waits
/// for both.
async fn start_ingress(
    directory: Arc<dyn PodDirectory>,
    dashboard: SocketAddr,
    extra: &str,
) -> (Running, SocketAddr) {
    let (running, addr, _admin) = start_ingress_with_admin(directory, dashboard, extra).await;
    (running, addr)
}

async fn start_ingress_with_admin(
    directory: Arc<dyn PodDirectory>,
    dashboard: SocketAddr,
    extra: &str,
) -> (Running, SocketAddr, SocketAddr) {
    let listen: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let text = format!(
        "listen = \"{listen}\"\ndashboard_upstream = \"{dashboard}\"\n\
         admin_listen = \"{admin}\"\n\
         base_domains = [\"pinacle.test\", \"pinacle.localhost\"]\nthreads = 2\n\
         shutdown_grace_period = \"1s\"\nplain_path = {}\n{extra}",
        plain_path()
    );
    let env: HashMap<&str, &str> =
        HashMap::from([("NEXTAUTH_SECRET", SECRET), ("NEXTAUTH_URL", DASHBOARD_URL)]);
    let config = config::from_toml(&text, "test", &|k| env.get(k).map(|v| (*v).to_owned()))
        .unwrap_or_else(|e| panic!("{e}"));
    if std::env::var_os("PINACLE_TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("PINACLE_TEST_LOG"))
            .with_test_writer()
            .try_init();
    }
    let running = server::spawn(config, directory, unix_now).unwrap();
    wait_for_port(listen).await;
    wait_for_port(admin).await;
    (running, listen, admin)
}

/// Everything one test needs: the database seeded, upstreams behind a real pod nginx, the
/// ingress in front.
///
/// Users: `ada` owns team `t1` and its pods; `bob` is a joined member; `eve` a pending invitee;
/// `mal` a stranger. Pods (server `s1` at 127.0.0.1):
/// `demo` (running, nginx-proxy = the real nginx), `direct` (running, nginx-proxy = an HTTP
/// echo directly, to count connections), `sleepy` (stopped), `attic` (archived),
/// `gone` (running, nothing listens), `mute` (running, never answers), `instant` (running,
/// nginx-proxy = the instant-101 WebSocket server directly).
struct World {
    pool: PgPool,
    addr: SocketAddr,
    ingress: Running,
    echo: upstream::Upstream,
    direct: upstream::Upstream,
    sse: upstream::Upstream,
    ws: upstream::Upstream,
    instant: upstream::Upstream,
    dashboard: upstream::Upstream,
    _nginx: Nginx,
    _mute: upstream::Upstream,
}

async fn world(pool: PgPool) -> World {
    let (echo, direct, sse, ws, instant, dashboard, mute) = (
        upstream::http_echo("pod-app").await,
        upstream::http_echo("direct").await,
        upstream::sse().await,
        upstream::websocket_echo().await,
        upstream::instant_upgrade().await,
        upstream::http_echo("dashboard").await,
        upstream::silent().await,
    );
    let nginx_port = reserve_port();
    let dir = Nginx::make_dir("ingress");
    let d = dir.display();
    let pod_config = format!(
        r#"{{"listen_port": {nginx_port}, "default_port": {app},
            "trusted_proxies": ["127.0.0.1"],
            "runtime": {{"pid_path": "{d}/nginx.pid", "error_log": "{d}/error.log",
                         "access_log": "{d}/access.log", "temp_dir": "{d}/temp"}}}}"#,
        app = echo.addr.port(),
    );
    let rendered = nginx_templates::render_text(&pod_config).unwrap();
    let nginx_addr: SocketAddr = format!("127.0.0.1:{nginx_port}").parse().unwrap();
    let nginx = Nginx::start(dir, &rendered, nginx_addr).await;

    let seed = Seed(&pool);
    seed.people().await.unwrap();
    seed.server("s1", "127.0.0.1").await.unwrap();
    let gone_port = reserve_port();
    for (id, slug, status, port) in [
        ("p_demo", "demo", "running", nginx_port),
        ("p_direct", "direct", "running", direct.addr.port()),
        ("p_sleepy", "sleepy", "stopped", nginx_port),
        ("p_attic", "attic", "running", nginx_port),
        ("p_gone", "gone", "running", gone_port),
        ("p_mute", "mute", "running", mute.addr.port()),
        ("p_instant", "instant", "running", instant.addr.port()),
    ] {
        seed_pod(&pool, id, slug, status, port).await;
    }
    seed.archive_pod("p_attic").await.unwrap();

    let directory = Arc::new(PostgresDirectory::from_pool(
        pool.clone(),
        Duration::from_secs(5),
    ));
    let (ingress, addr) = start_ingress(
        directory,
        dashboard.addr,
        "upstream_read_timeout = \"1s\"\ndirectory_query_timeout = \"500ms\"",
    )
    .await;
    World {
        pool,
        addr,
        ingress,
        echo,
        direct,
        sse,
        ws,
        instant,
        dashboard,
        _nginx: nginx,
        _mute: mute,
    }
}

/// A pod of `ada`'s team `t1` on server `s1` whose nginx-proxy port is `port`.
async fn seed_pod(pool: &PgPool, id: &str, slug: &str, status: &str, port: u16) {
    let ports = ports_json(port);
    Seed(pool)
        .pod(&PodSeed {
            id,
            slug,
            owner_id: "ada",
            team_id: "t1",
            server_id: Some("s1"),
            status,
            ports: Some(&ports),
            age_secs: 60.0,
        })
        .await
        .unwrap();
}

impl World {
    fn app_host(&self, slug: &str) -> String {
        pod_host(self.echo.addr.port(), slug)
    }

    async fn get(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> Collected {
        let mut all = vec![("host", host)];
        all.extend_from_slice(headers);
        client::get(self.addr, path, &all).await
    }
}

fn assert_ours(r: &Collected, marker: &str) {
    assert_eq!(r.header("x-pinacle-ingress"), Some(marker), "{}", r.text());
    assert_eq!(r.header("x-request-id").map(str::len), Some(24));
}

#[sqlx::test(migrations = "../migrations")]
async fn owner_and_member_get_through_with_the_rewritten_host_and_no_credentials(pool: PgPool) {
    let w = world(pool).await;
    let host = w.app_host("demo");
    for user in ["ada", "bob"] {
        let cookie = format!(
            "theme=dark; {}; next-auth.session-token.x=pods-own; app_session=abc%3D=",
            session_cookie(user)
        );
        let r = w
            .get(
                &host,
                "/api/items?q=1&r=%2F",
                &[
                    ("cookie", &cookie),
                    ("x-forwarded-for", "203.0.113.9"),
                    ("accept", "application/json"),
                ],
            )
            .await;
        assert_eq!(r.status, 200, "{user}: {}", r.text());
        let echo = r.json();
        assert_eq!(echo["name"], "pod-app");
        assert_eq!(echo["method"], "GET");
        assert_eq!(echo["path"], "/api/items?q=1&r=%2F");
        let headers = &echo["headers"];
        // Second hop: the pod's nginx routed on our rewritten Host.
        assert_eq!(headers["host"], format!("localhost:{}", w.echo.addr.port()));
        assert_eq!(headers["x-forwarded-host"], host);
        // The client's claim is replaced by its real address (nginx trusts us and passes it on).
        assert_eq!(headers["x-real-ip"], "127.0.0.1");
        assert_eq!(
            headers["cookie"],
            "theme=dark; next-auth.session-token.x=pods-own; app_session=abc%3D="
        );
        assert!(headers.get("x-request-id").is_some());
        // Framing headers are dropped so the dashboard can embed the pod.
        assert_eq!(r.header("x-frame-options"), None);
        assert_eq!(r.header("cross-origin-opener-policy"), None);
        assert_eq!(r.header("x-pinacle-ingress"), None);
    }
    // Both were served by the plain path (`pinacle_ingress::plain`), not Pingora's loop.
    wait_for_metric(
        &w.ingress,
        "pinacle_ingress_plain_requests_total",
        served_plain(2.0),
    )
    .await;
}

#[sqlx::test(migrations = "../migrations")]
async fn the_rewritten_host_reaches_the_pod_exactly(pool: PgPool) {
    let w = world(pool).await;
    // `direct` has no nginx in between: the echo sees exactly what the ingress sent.
    let host = format!("LOCALHOST-{}.POD-direct.pinacle.test:8443", 5173);
    let r = w
        .get(&host, "/", &[("cookie", &session_cookie("ada"))])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let headers = &r.json()["headers"];
    assert_eq!(headers["host"], "localhost-5173-pod-direct.pinacle.test");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert!(headers.get("cookie").is_none(), "{headers}");
    // The second base domain works too, and the Host keeps the domain the request came in on.
    let r = w
        .get(
            "localhost-80-pod-direct.pinacle.localhost",
            "/",
            &[("cookie", &session_cookie("ada"))],
        )
        .await;
    assert_eq!(
        r.json()["headers"]["host"],
        "localhost-80-pod-direct.pinacle.localhost"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn stranger_and_pending_invitee_get_403(pool: PgPool) {
    let w = world(pool).await;
    let host = w.app_host("demo");
    for user in ["mal", "eve"] {
        let r = w
            .get(&host, "/", &[("cookie", &session_cookie(user))])
            .await;
        assert_eq!(r.status, 403, "{user}");
        assert_ours(&r, "forbidden");
        assert_eq!(r.json()["error"], "Forbidden");
    }
    assert_eq!(w.echo.connection_count(), 0);
}

/// A denial keeps the client's connection open on both engines: a tab that met a 401 or a
/// 403 goes on to use the same connection once it has a credential.
#[sqlx::test(migrations = "../migrations")]
async fn denials_keep_the_connection_alive(pool: PgPool) {
    let w = world(pool).await;
    let host = w.app_host("demo");
    let plain = "pinacle_ingress_plain_requests_total";
    let before = metric_or_zero(&w.ingress, plain);
    let ada = session_cookie("ada");
    let mal = session_cookie("mal");
    let mut conn = Connection::open(w.addr).await;
    let steps: [(&[(&str, &str)], u16); 5] = [
        (&[("sec-fetch-mode", "cors")], 401),
        (&[("cookie", &mal)], 403),
        (&[("cookie", &ada)], 200),
        (&[("cookie", &mal)], 403),
        (&[("cookie", &ada)], 200),
    ];
    for (i, (extra, status)) in steps.iter().enumerate() {
        let mut headers = vec![("host", host.as_str())];
        headers.extend_from_slice(extra);
        let method = if i == 3 { "HEAD" } else { "GET" };
        let r = conn.request(method, "/", &headers).await;
        assert_eq!(r.status, *status, "step {i}: {}", r.text());
        // Pingora says `keep-alive`, the plain path nothing: HTTP/1.1's default.
        assert_ne!(r.header("connection"), Some("close"), "step {i}");
        if *status != 200 {
            assert!(r.header("x-pinacle-ingress").is_some(), "step {i}");
        }
        if method == "HEAD" {
            assert_eq!(r.text(), "", "a HEAD answer has no body");
        }
    }
    wait_for_metric(&w.ingress, plain, before + served_plain(5.0)).await;
}

#[sqlx::test(migrations = "../migrations")]
async fn archived_pod_is_unreachable_and_stopped_pod_is_503(pool: PgPool) {
    let w = world(pool).await;
    let cookie = session_cookie("ada");
    let r = w
        .get(&w.app_host("attic"), "/", &[("cookie", &cookie)])
        .await;
    assert_eq!(r.status, 403);
    assert_ours(&r, "forbidden");

    let r = w
        .get(&w.app_host("sleepy"), "/", &[("cookie", &cookie)])
        .await;
    assert_eq!(r.status, 503);
    assert_ours(&r, "pod-unavailable");
    assert_eq!(r.json()["status"], "stopped");
    assert_eq!(r.header("retry-after"), Some("5"));
    let page = w
        .get(
            &w.app_host("sleepy"),
            "/",
            &[("cookie", &cookie), ("accept", "text/html")],
        )
        .await;
    assert_eq!(page.status, 503);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    let text = page.text();
    assert!(text.contains("class=\"s-stopped\">stopped</strong>"));
    // It follows the pod's status by itself (and opens the pod once it runs), and names the
    // pod, the user and the request.
    assert!(
        text.contains("\"base\":\"/__pinacle/status\"") && text.contains("fetch(c.base+'.json'")
    );
    assert!(text.contains("location.reload()") && !text.contains("http-equiv=\"refresh\""));
    assert!(text.contains("Pod <strong>sleepy</strong>, port <strong>"));
    assert!(text.contains(page.header("x-request-id").unwrap()));
    assert!(text.contains("Signed in as <strong>ada@example.test</strong>"));
    assert_eq!(w.echo.connection_count(), 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn no_credentials_redirect_navigations_and_refuse_fetch_and_websocket(pool: PgPool) {
    let w = world(pool).await;
    let host = w.app_host("demo");
    let port = w.echo.addr.port();

    let r = w
        .get(&host, "/a%20b/?x=1&y=%2F", &[("accept", "text/html,*/*")])
        .await;
    assert_eq!(r.status, 302);
    assert_ours(&r, "sign-in");
    assert_eq!(
        r.header("location").unwrap(),
        format!(
            "{DASHBOARD_URL}/api/proxy-auth?pod=demo&port={port}&return_url=%2Fa%2520b%2F%3Fx%3D1%26y%3D%252F"
        )
    );
    // Chromium over https says so with Sec-Fetch-Mode.
    let r = w
        .get(
            &host,
            "/",
            &[("sec-fetch-mode", "navigate"), ("accept", "*/*")],
        )
        .await;
    assert_eq!(r.status, 302);

    // fetch/XHR: 401 JSON, even when it accepts HTML.
    let r = w
        .get(
            &host,
            "/api",
            &[("sec-fetch-mode", "cors"), ("accept", "text/html")],
        )
        .await;
    assert_eq!(r.status, 401);
    assert_ours(&r, "unauthenticated");
    assert_eq!(r.json()["error"], "Authentication required");

    // An expired session counts as none.
    let expired =
        pinacle_authz::testing::session_cookie_value(SECRET, "ada", unix_now() - 7200, 3600);
    let r = w
        .get(
            &host,
            "/",
            &[("cookie", &format!("next-auth.session-token={expired}"))],
        )
        .await;
    assert_eq!(r.status, 401);

    // WebSocket handshake without credentials.
    let mut request = format!("ws://{}/socket", w.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("host", pod_host(w.ws.addr.port(), "demo").parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401);
            assert_eq!(resp.headers()["x-pinacle-ingress"], "unauthenticated");
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    assert_eq!(w.echo.connection_count(), 0);
    assert_eq!(w.ws.connection_count(), 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn callback_sets_the_cookie_which_then_works_and_is_never_forwarded(pool: PgPool) {
    let w = world(pool).await;
    let port = w.echo.addr.port();
    let host = w.app_host("demo");
    let token = proxy_token("bob", "p_demo", "demo", port);

    let r = w
        .get(
            &host,
            &format!("/pinacle-proxy-callback?token={token}&return_url=%2Fdocs%3Fpage%3D2"),
            &[],
        )
        .await;
    assert_eq!(r.status, 302, "{}", r.text());
    assert_ours(&r, "callback");
    assert_eq!(r.header("location"), Some("/docs?page=2"));
    assert_eq!(
        r.header("set-cookie").unwrap(),
        format!("pinacle-proxy-token={token}; Path=/; Max-Age=900; HttpOnly; SameSite=Lax")
    );

    // Off-host return URLs go home.
    for bad in [
        "https%3A%2F%2Fevil.example%2F",
        "%2F%2Fevil.example",
        "%2F%5Cevil.example",
    ] {
        let r = w
            .get(
                &host,
                &format!("/pinacle-proxy-callback?token={token}&return_url={bad}"),
                &[],
            )
            .await;
        assert_eq!(r.header("location"), Some("/"), "{bad}");
    }

    // The cookie gets bob through, and the pod never sees it.
    let cookie = format!("pinacle-proxy-token={token}; mine=1");
    let r = w.get(&host, "/docs", &[("cookie", &cookie)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["cookie"], "mine=1");

    // It is only good for its own port.
    let other = pod_host(port + 1, "demo");
    let r = w.get(&other, "/", &[("cookie", &cookie)]).await;
    assert_eq!(r.status, 401);

    // Errors, with the dashboard's bodies.
    let r = w.get(&host, "/pinacle-proxy-callback", &[]).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (400, r#"{"error":"Missing token parameter"}"#)
    );
    let r = w
        .get(&host, "/pinacle-proxy-callback?token=not-a-jwt", &[])
        .await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (401, r#"{"error":"Invalid or expired token"}"#)
    );
    let r = w
        .get(
            &other,
            &format!("/pinacle-proxy-callback?token={token}"),
            &[],
        )
        .await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (
            403,
            r#"{"error":"Token does not match requested pod/port"}"#
        )
    );
    // The callback never reaches the pod.
    assert_eq!(w.echo.connection_count(), 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_second_request_reuses_the_upstream_connection(pool: PgPool) {
    let w = world(pool).await;
    let host = pod_host(3000, "direct");
    let cookie = session_cookie("ada");
    // One client connection: Pingora returns the upstream connection to its pool before it
    // reads the next request on it, so the count is exact.
    let mut conn = Connection::open(w.addr).await;
    for _ in 0..3 {
        let r = conn
            .request("GET", "/", &[("host", &host), ("cookie", &cookie)])
            .await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(w.direct.connection_count(), 1);
    // A different pod at another address gets its own connection.
    let r = w
        .get(&w.app_host("demo"), "/", &[("cookie", &cookie)])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(w.direct.connection_count(), 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn websocket_echo_through_both_hops(pool: PgPool) {
    let w = world(pool).await;
    let mut request = format!("ws://{}/socket", w.addr)
        .into_client_request()
        .unwrap();
    let headers = request.headers_mut();
    headers.insert("host", pod_host(w.ws.addr.port(), "demo").parse().unwrap());
    headers.insert("cookie", session_cookie("bob").parse().unwrap());
    headers.insert("sec-websocket-protocol", "vscode, other".parse().unwrap());
    headers.insert(
        "sec-websocket-extensions",
        "x-pinacle-test; level=2".parse().unwrap(),
    );
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["sec-websocket-protocol"], "vscode");
    assert_eq!(
        response.headers()["x-seen-extensions"],
        "x-pinacle-test; level=2"
    );
    assert_eq!(
        response.headers()["x-seen-host"],
        format!("localhost:{}", w.ws.addr.port())
    );
    for i in 0..5 {
        ws.send(Message::text(format!("ping {i}"))).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed, Message::text(format!("ping {i}")));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![0u8, 1, 2, 255])
    );
    // Quiet for longer than the upstream read timeout (1 s here): the tunnel stays open.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ws.send(Message::text("still there")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("still there")
    );
    ws.close(None).await.unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn an_upstream_that_answers_101_instantly_keeps_its_first_frame(pool: PgPool) {
    let w = world(pool).await;
    // The race this guards against (Pingora issue 946) is lost only some of the time: most
    // rounds go straight to the server (the fastest 101), some through the pod's nginx.
    for round in 0..40 {
        let mut request = format!("ws://{}/term", w.addr)
            .into_client_request()
            .unwrap();
        let host = if round % 4 == 0 {
            pod_host(w.instant.addr.port(), "demo")
        } else {
            pod_host(7681, "instant")
        };
        let headers = request.headers_mut();
        headers.insert("host", host.parse().unwrap());
        headers.insert("cookie", session_cookie("ada").parse().unwrap());
        let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
        assert_eq!(response.status(), 101);
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
        ws.send(Message::text("echo me")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("echo me"));
    }
    // An upstream that refuses the upgrade: its answer is relayed as it is.
    let mut request = format!("ws://{}/not-a-socket", w.addr)
        .into_client_request()
        .unwrap();
    let headers = request.headers_mut();
    headers.insert("host", pod_host(3000, "direct").parse().unwrap());
    headers.insert("cookie", session_cookie("ada").parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 200);
            let body = String::from_utf8(resp.body().clone().unwrap()).unwrap();
            assert!(body.contains("\"name\":\"direct\""), "{body}");
            assert_eq!(resp.headers().get("x-frame-options"), None);
        }
        other => panic!("expected the upstream's 200, got {other:?}"),
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn server_sent_events_arrive_as_they_are_sent(pool: PgPool) {
    let w = world(pool).await;
    let host = pod_host(w.sse.addr.port(), "demo");
    let mut conn = Connection::open(w.addr).await;
    let cookie = session_cookie("ada");
    let resp = conn
        .send(
            "GET",
            "/events",
            &[
                ("host", &host),
                ("cookie", &cookie),
                ("accept", "text/event-stream"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // The second event is held back until we release it: the first must arrive alone.
    let first = tokio::time::timeout(Duration::from_secs(10), client::next_chunk(&mut body))
        .await
        .expect("first event did not arrive while the second was held back")
        .unwrap();
    assert_eq!(first, "data: first\n\n");
    w.sse.release.notify_one();
    let second = tokio::time::timeout(Duration::from_secs(10), client::next_chunk(&mut body))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second, "data: second\n\n");
}

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

#[sqlx::test(migrations = "../migrations")]
async fn a_1_gib_upload_streams_through_both_hops_in_bounded_memory(pool: PgPool) {
    const TOTAL: u64 = 1024 * 1024 * 1024;
    const CHUNK: usize = 256 * 1024;
    let w = world(pool).await;
    let host = w.app_host("demo");
    let cookie = session_cookie("ada");
    let before = resident_bytes();

    let mut stream = tokio::net::TcpStream::connect(w.addr).await.unwrap();
    let head = format!(
        "PUT /upload HTTP/1.1\r\nhost: {host}\r\ncookie: {cookie}\r\ncontent-length: {TOTAL}\r\n\
         content-type: application/octet-stream\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'x'; CHUNK];
    let mut sent = 0u64;
    let mut peak = before;
    while sent < TOTAL {
        stream.write_all(&chunk).await.unwrap();
        sent += CHUNK as u64;
        if sent.is_multiple_of(16 * 1024 * 1024) {
            peak = peak.max(resident_bytes());
        }
    }
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        let mut buf = [0u8; 8192];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            response.extend_from_slice(&buf[..n]);
            if response.windows(4).any(|w| w == b"\r\n\r\n")
                && String::from_utf8_lossy(&response).contains("\"body_len\"")
            {
                break;
            }
        }
    });
    read.await.expect("no response to the upload");
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains(&format!("\"body_len\":{TOTAL}")), "{text}");
    // The client, the ingress and the echo behind nginx all live in this process: a hop that
    // buffered the body would add up to 1 GiB here.
    let growth = peak.saturating_sub(before);
    assert!(
        growth < 96 * 1024 * 1024,
        "resident memory grew by {} MiB during a 1 GiB upload",
        growth / (1024 * 1024)
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn other_hosts_go_to_the_dashboard_with_their_own_host(pool: PgPool) {
    let w = world(pool).await;
    let cookie = session_cookie("ada");
    for host in ["pinacle.test", "www.pinacle.test:3000", "example.org"] {
        let r = w.get(host, "/api/trpc?x=1", &[("cookie", &cookie)]).await;
        assert_eq!(r.status, 200);
        let echo = r.json();
        assert_eq!(echo["name"], "dashboard");
        assert_eq!(echo["path"], "/api/trpc?x=1");
        assert_eq!(echo["headers"]["host"], host);
        assert_eq!(echo["headers"]["x-forwarded-host"], host);
        assert_eq!(echo["headers"]["x-forwarded-proto"], "http");
        // The dashboard's own cookies are its business.
        assert_eq!(echo["headers"]["cookie"], cookie);
        // And its framing policy too.
        assert_eq!(r.header("x-frame-options"), Some("DENY"));
    }
    assert!(w.dashboard.connection_count() >= 1);
    // A bad pod port is answered by us, not the dashboard.
    let r = w
        .get("localhost-99999-pod-demo.pinacle.test", "/", &[])
        .await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (400, r#"{"error":"Invalid port number: 99999"}"#)
    );
    assert_ours(&r, "bad-port");
}

/// A WebSocket handshake to the dashboard's Next.js HMR endpoint through the ingress.
fn hmr_request(addr: SocketAddr) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut request = format!("ws://{addr}/_next/webpack-hmr")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("host", "pinacle.test".parse().unwrap());
    request
}

#[sqlx::test(migrations = "../migrations")]
async fn dashboard_websockets_are_tunnelled_and_idle_ones_closed(pool: PgPool) {
    // Next.js HMR in development: the dashboard itself speaks WebSocket.
    let ws_dashboard = upstream::websocket_echo().await;
    let directory = Arc::new(PostgresDirectory::from_pool(pool, Duration::from_secs(5)));
    let (_ingress, addr) = start_ingress(
        directory,
        ws_dashboard.addr,
        "websocket_idle_timeout = \"1s\"",
    )
    .await;
    let request = hmr_request(addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    ws.send(Message::text("hmr")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hmr"));
    // Silent both ways for longer than the configured idle timeout: the ingress closes it.
    let end = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("the idle tunnel was not closed");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
}

/// A metric's value, 0 when no series has been recorded yet.
fn metric_or_zero(ingress: &Running, name: &str) -> f64 {
    pinacle_testkit::metric(&ingress.metrics().unwrap().render(), name)
}

/// Polls until `metric` reaches `value` (bounded).
async fn wait_for_metric(ingress: &Running, name: &str, value: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while metric_or_zero(ingress, name) != value {
        assert!(
            std::time::Instant::now() < deadline,
            "{name} stayed at {} (waiting for {value})",
            metric_or_zero(ingress, name)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_tunnel_runs_on_the_raw_connection_counts_while_open_and_is_recorded_when_it_ends(
    pool: PgPool,
) {
    // The tunnel runs after Pingora has finished its request (connections::Takeover): it must
    // still count under max_concurrent_requests, and be logged and counted when it ends.
    let ws_dashboard = upstream::websocket_echo().await;
    let directory = Arc::new(PostgresDirectory::from_pool(pool, Duration::from_secs(5)));
    let (ingress, addr) =
        start_ingress(directory, ws_dashboard.addr, "max_concurrent_requests = 1").await;
    let upgraded =
        "pinacle_ingress_requests_total{port=\"\",route=\"dashboard\",status_class=\"1xx\"}";
    let open = "pinacle_ingress_websocket_tunnels_open";
    let request = hmr_request(addr);
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["x-request-id"].len(), 24);
    ws.send(Message::text("a".repeat(10_000))).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("a".repeat(10_000))
    );
    wait_for_metric(&ingress, open, 1.0).await;
    assert_eq!(metric_or_zero(&ingress, upgraded), 0.0);

    // The open tunnel takes the one request place.
    let r = client::get(addr, "/", &[("host", "pinacle.test")]).await;
    assert_eq!(r.status, 503);
    assert_ours(&r, "overloaded");

    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    wait_for_metric(&ingress, open, 0.0).await;
    wait_for_metric(&ingress, upgraded, 1.0).await;
    // Both directions were counted: the frames (with their WebSocket framing) and the closes.
    let received = metric_or_zero(
        &ingress,
        "pinacle_ingress_received_bytes_total{route=\"dashboard\"}",
    );
    let sent = metric_or_zero(
        &ingress,
        "pinacle_ingress_sent_bytes_total{route=\"dashboard\"}",
    );
    assert!(received > 10_000.0 && sent > 10_000.0, "{received} {sent}");
    // The place is free again.
    let r = client::get(addr, "/", &[("host", "pinacle.test")]).await;
    assert_ne!(
        r.header("x-pinacle-ingress"),
        Some("overloaded"),
        "{}",
        r.text()
    );

    // A client that sends bytes behind its upgrade request, before the 101 (which WebSocket
    // clients must not do): closed without a 101, the upstream side closed, nothing held.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(
        b"GET /_next/webpack-hmr HTTP/1.1\r\nHost: pinacle.test\r\nConnection: Upgrade\r\n\
          Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n\x81\x02hi",
    )
    .await
    .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), read_to_close(&mut raw))
        .await
        .expect("the connection was not closed");
    assert!(!answer.contains(" 101 "), "{answer}");
    let unanswered =
        "pinacle_ingress_requests_total{port=\"\",route=\"dashboard\",status_class=\"none\"}";
    wait_for_metric(&ingress, unanswered, 1.0).await;
    assert_eq!(metric_or_zero(&ingress, upgraded), 1.0);
    assert_eq!(metric_or_zero(&ingress, open), 0.0);
}

#[sqlx::test(migrations = "../migrations")]
async fn removing_a_team_member_denies_the_next_request(pool: PgPool) {
    let w = world(pool).await;
    let host = w.app_host("demo");
    let cookie = session_cookie("bob");
    assert_eq!(w.get(&host, "/", &[("cookie", &cookie)]).await.status, 200);
    Seed(&w.pool).remove_member("t1", "bob").await.unwrap();
    w.ingress
        .authorizer()
        .invalidate_user(&UserId::new("bob").unwrap());
    let r = w.get(&host, "/", &[("cookie", &cookie)]).await;
    assert_eq!(r.status, 403);
    // The owner is unaffected; stopping the pod (and invalidating it) turns it away too.
    assert_eq!(
        w.get(&host, "/", &[("cookie", &session_cookie("ada"))])
            .await
            .status,
        200
    );
    Seed(&w.pool)
        .set_pod_status("p_demo", "stopped")
        .await
        .unwrap();
    w.ingress
        .authorizer()
        .invalidate_pod(&PodSlug::parse("demo").unwrap());
    assert_eq!(
        w.get(&host, "/", &[("cookie", &session_cookie("ada"))])
            .await
            .status,
        503
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn database_sessions_are_accepted(pool: PgPool) {
    let w = world(pool).await;
    let expires_ms = (unix_now() + 3600) * 1000;
    let token = "0b5e8f0c-2a53-4a3e-9d1f-6c1f3b0a9e11";
    Seed(&w.pool)
        .session(token, "bob", expires_ms)
        .await
        .unwrap();
    let r = w
        .get(
            &w.app_host("demo"),
            "/",
            &[("cookie", &format!("next-auth.session-token={token}; a=b"))],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["cookie"], "a=b");
    let unknown = w
        .get(
            &w.app_host("demo"),
            "/",
            &[(
                "cookie",
                "next-auth.session-token=11111111-2222-3333-4444-555555555555",
            )],
        )
        .await;
    assert_eq!(unknown.status, 401);
}

#[sqlx::test(migrations = "../migrations")]
async fn upstream_refused_is_502_and_silence_is_504(pool: PgPool) {
    let w = world(pool).await;
    let cookie = session_cookie("ada");
    let r = w
        .get(&pod_host(3000, "gone"), "/", &[("cookie", &cookie)])
        .await;
    assert_eq!(r.status, 502);
    assert_ours(&r, "upstream-refused");
    let r = w
        .get(
            &pod_host(3000, "mute"),
            "/",
            &[("cookie", &cookie), ("accept", "text/html")],
        )
        .await;
    assert_eq!(r.status, 504);
    assert_ours(&r, "upstream-timeout");
    assert!(r.text().contains("No answer in time"));
    // Both answered on the plain path; only the refused one failed to connect (the silent
    // one accepted). A HEAD gets the head alone.
    wait_for_metric(
        &w.ingress,
        "pinacle_ingress_plain_requests_total",
        served_plain(2.0),
    )
    .await;
    assert_eq!(
        metric_or_zero(
            &w.ingress,
            "pinacle_ingress_upstream_connect_failures_total{route=\"pod\"}"
        ),
        1.0
    );
    let mut conn = TcpStream::connect(w.addr).await.unwrap();
    let head = format!(
        "HEAD / HTTP/1.1\r\nHost: {}\r\nCookie: {cookie}\r\n\r\n",
        pod_host(3000, "gone")
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let answer = read_to_close(&mut conn).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\n"),
        "a HEAD answer has no body: {answer}"
    );
}

/// An ingress whose directory is a database at `url` that cannot answer (waits bounded at
/// 300 ms), and its dashboard.
async fn without_database(url: &str) -> (Running, SocketAddr, upstream::Upstream) {
    let directory = pinacle_authz::PostgresDirectory::connect_lazy(
        url,
        &pinacle_authz::PostgresOptions {
            acquire_timeout: Duration::from_millis(300),
            query_timeout: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .unwrap();
    let dashboard = upstream::http_echo("dashboard").await;
    let (ingress, addr) = start_ingress(Arc::new(directory), dashboard.addr, "").await;
    (ingress, addr, dashboard)
}

/// `GET /` to pod `demo` with ada's session.
async fn demo_as_ada(addr: SocketAddr) -> Collected {
    client::get(
        addr,
        "/",
        &[
            ("host", "localhost-3000-pod-demo.pinacle.test"),
            ("cookie", &session_cookie("ada")),
        ],
    )
    .await
}

#[tokio::test]
async fn an_unreachable_directory_is_503_never_a_denial() {
    // Nothing listens on this port: every lookup fails.
    let url = format!("postgres://postgres@127.0.0.1:{}/none", reserve_port());
    let (_ingress, addr, _dashboard) = without_database(&url).await;
    let r = demo_as_ada(addr).await;
    assert_eq!(r.status, 503);
    assert_ours(&r, "authorization-unavailable");
    // Without credentials it is still a plain 401: nothing needed the directory.
    let r = client::get(
        addr,
        "/",
        &[("host", "localhost-3000-pod-demo.pinacle.test")],
    )
    .await;
    assert_eq!(r.status, 401);
}

#[sqlx::test(migrations = "../migrations")]
async fn limits_answer_clearly(pool: PgPool) {
    // The dashboard here holds its answer until released: one request stays in flight.
    let held = upstream::sse().await;
    let directory = Arc::new(PostgresDirectory::from_pool(pool, Duration::from_secs(5)));
    let (_ingress, addr) = start_ingress(
        directory,
        held.addr,
        "max_concurrent_requests = 1\nmax_request_header_bytes = 4096\n\
         upstream_read_timeout = \"5s\"\ndirectory_query_timeout = \"1s\"",
    )
    .await;

    let big = "x".repeat(5000);
    let r = client::get(addr, "/", &[("host", "pinacle.test"), ("x-big", &big)]).await;
    assert_eq!(r.status, 431);
    assert_ours(&r, "header-too-large");
    assert_eq!(r.json()["error"], "Request header too large");

    let mut conn = Connection::open(addr).await;
    let resp = conn
        .send("GET", "/events", &[("host", "pinacle.test")], Bytes::new())
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    assert_eq!(
        client::next_chunk(&mut body).await.unwrap(),
        "data: first\n\n"
    );
    let r = client::get(addr, "/", &[("host", "pinacle.test")]).await;
    assert_eq!(r.status, 503);
    assert_ours(&r, "overloaded");
    assert_eq!(r.header("retry-after"), Some("1"));
    held.release.notify_one();
    while client::next_chunk(&mut body).await.is_some() {}
    drop(conn);
    // The slot is free again once the held request has been logged.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        // Only the head: this upstream holds every body until released.
        let status = Connection::open(addr)
            .await
            .send("GET", "/", &[("host", "pinacle.test")], Bytes::new())
            .await
            .status();
        if status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads until the ingress closes the connection (at most 10 s) and returns what came.
async fn read_to_close(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one response with a `content-length` body; returns the head.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() >= end + 4 + length {
                return head;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("a response within 10 s")
            .unwrap();
        assert!(
            n > 0,
            "closed before a whole response: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

fn metric(ingress: &Running, name: &str) -> f64 {
    let text = ingress.metrics().unwrap().render();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} not in {text}"))
        .parse()
        .unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn slow_request_heads_get_408_and_only_heads_are_timed(pool: PgPool) {
    let dashboard = upstream::http_echo("dashboard").await;
    let directory = Arc::new(PostgresDirectory::from_pool(pool, Duration::from_secs(5)));
    let (ingress, addr) = start_ingress(
        directory,
        dashboard.addr,
        "request_header_timeout = \"300ms\"",
    )
    .await;

    // A head dripped a byte every 50 ms: each read is quick, the head as a whole is late.
    let (mut reader, mut writer) = TcpStream::connect(addr).await.unwrap().into_split();
    writer
        .write_all(b"GET / HTTP/1.1\r\nHost: pinacle.test\r\nX-Slow: ")
        .await
        .unwrap();
    let drip = async move {
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if writer.write_all(b"a").await.is_err() {
                break;
            }
        }
    };
    let (answer, ()) = tokio::join!(read_to_close(&mut reader), drip);
    assert!(
        answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{answer}"
    );
    assert!(answer.contains("\r\nx-pinacle-ingress: request-header-timeout\r\n"));
    assert!(answer.contains("\r\nconnection: close\r\n"));
    assert!(
        answer.ends_with(r#"{"error":"Request header timeout"}"#),
        "{answer}"
    );

    // On a kept-alive connection neither the pause between requests nor a slow body is timed;
    // a late head is, from its first byte.
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: pinacle.test\r\n\r\n");
    conn.write_all(get("/one").as_bytes()).await.unwrap();
    assert!(read_response(&mut conn).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(700)).await;
    conn.write_all(get("/two").as_bytes()).await.unwrap();
    assert!(read_response(&mut conn).await.starts_with("HTTP/1.1 200"));
    conn.write_all(b"POST /three HTTP/1.1\r\nHost: pinacle.test\r\ncontent-length: 5\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    conn.write_all(b"hello").await.unwrap();
    assert!(read_response(&mut conn).await.starts_with("HTTP/1.1 200"));
    conn.write_all(b"GET /four HTTP/1.1\r\nHost: pin")
        .await
        .unwrap();
    let answer = read_to_close(&mut conn).await;
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");

    // A connection that never sends a byte is closed without an answer.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_to_close(&mut idle).await, "");

    assert_eq!(
        metric(&ingress, "pinacle_ingress_request_header_timeouts_total"),
        2.0
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn connections_above_max_connections_get_503_and_are_closed(pool: PgPool) {
    let dashboard = upstream::http_echo("dashboard").await;
    let directory = Arc::new(PostgresDirectory::from_pool(pool, Duration::from_secs(5)));
    let (ingress, addr) = start_ingress(directory, dashboard.addr, "max_connections = 2").await;
    let host = [("host", "pinacle.test")];

    // Two kept-alive connections, each known to the ingress (a request answered on it). The
    // readiness probe's connection may still hold a slot for a moment: retry until it has gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut held = Vec::new();
    while held.len() < 2 {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\nHost: pinacle.test\r\n\r\n")
            .await
            .unwrap();
        let head = read_response(&mut conn).await;
        if head.starts_with("HTTP/1.1 200") {
            held.push(conn);
        } else {
            assert!(std::time::Instant::now() < deadline, "{head}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(
        metric(&ingress, "pinacle_ingress_client_connections_open"),
        2.0
    );

    let mut third = TcpStream::connect(addr).await.unwrap();
    third
        .write_all(b"GET / HTTP/1.1\r\nHost: pinacle.test\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut third).await;
    assert!(
        answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{answer}"
    );
    for field in [
        "x-pinacle-ingress: too-many-connections",
        "retry-after: 1",
        "connection: close",
    ] {
        assert!(
            answer.contains(&format!("\r\n{field}\r\n")),
            "{field}: {answer}"
        );
    }
    assert!(
        answer.ends_with(r#"{"error":"Too many connections"}"#),
        "{answer}"
    );
    assert_eq!(
        metric(&ingress, "pinacle_ingress_client_connections_refused_total"),
        1.0
    );

    // The held connections still work; closing one frees its slot.
    for conn in &mut held {
        conn.write_all(b"GET /again HTTP/1.1\r\nHost: pinacle.test\r\n\r\n")
            .await
            .unwrap();
        assert!(read_response(conn).await.starts_with("HTTP/1.1 200"));
    }
    drop(held.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = client::get(addr, "/", &host).await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503);
        assert!(
            std::time::Instant::now() < deadline,
            "the slot was not given back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn request_ids_and_forwarded_for_are_kept_only_from_trusted_proxies(pool: PgPool) {
    let dashboard = upstream::http_echo("dashboard").await;
    let directory: Arc<dyn PodDirectory> =
        Arc::new(PostgresDirectory::from_pool(pool, Duration::from_secs(5)));
    let headers = [
        ("host", "pinacle.test"),
        ("x-request-id", "lb-7f3a:42"),
        ("x-forwarded-for", "203.0.113.5"),
    ];

    let (_trusting, addr) = start_ingress(
        directory.clone(),
        dashboard.addr,
        "trusted_proxies = [\"127.0.0.0/8\"]",
    )
    .await;
    let r = client::get(addr, "/", &headers).await;
    assert_eq!(r.header("x-request-id"), Some("lb-7f3a:42"));
    let seen = &r.json()["headers"];
    assert_eq!(seen["x-request-id"], "lb-7f3a:42");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.5, 127.0.0.1");
    // A value that could break log lines is never kept.
    let r = client::get(
        addr,
        "/",
        &[("host", "pinacle.test"), ("x-request-id", "a b\"c")],
    )
    .await;
    assert_ne!(r.header("x-request-id"), Some("a b\"c"));

    let (_edge, addr) = start_ingress(directory, dashboard.addr, "").await;
    let r = client::get(addr, "/", &headers).await;
    let id = r.header("x-request-id").unwrap().to_owned();
    assert_ne!(id, "lb-7f3a:42");
    let seen = &r.json()["headers"];
    assert_eq!(seen["x-request-id"], id);
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
}

/// An upstream that answers by path, as raw HTTP/1.1, on keep-alive connections (each
/// request's body, if any, read by its `content-length`): `/chunked` (chunked with a trailer),
/// `/hints` (a 103 before the 200), `/empty` (204), `/head` (`content-length: 10`, no body, for
/// `HEAD`), `/close` (no length: the body runs until it closes), `/bye` (closes right after a
/// complete answer), anything else `200 ok`; its `connections` count what it accepted.
async fn scripted_upstream() -> upstream::Recording {
    upstream::recording(Arc::new(|head: &[u8]| {
        let head = String::from_utf8_lossy(head).to_ascii_lowercase();
        let reply = |bytes: &[u8]| upstream::Reply::Bytes(bytes.to_vec());
        match head.split(' ').nth(1).unwrap_or("/") {
            "/chunked" => reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"),
            "/hints" => reply(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
            "/empty" => reply(b"HTTP/1.1 204 No Content\r\n\r\n"),
            "/head" => reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
            "/close" => upstream::Reply::Close(b"HTTP/1.1 200 OK\r\n\r\nuntil-close".to_vec()),
            "/bye" => upstream::Reply::Close(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye".to_vec()),
            _ => reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        }
    }))
    .await
}

#[sqlx::test(migrations = "../migrations")]
async fn plain_requests_relay_every_framing_on_kept_connections(pool: PgPool) {
    use std::sync::atomic::Ordering;

    let w = world(pool).await;
    let scripted = scripted_upstream().await;
    let accepted = scripted.upstream.connections.clone();
    seed_pod(
        &w.pool,
        "p_script",
        "script",
        "running",
        scripted.upstream.addr.port(),
    )
    .await;
    let host = pod_host(3000, "script");
    let cookie = session_cookie("ada");
    let headers = [("host", host.as_str()), ("cookie", cookie.as_str())];
    let plain = "pinacle_ingress_plain_requests_total";
    let before = metric_or_zero(&w.ingress, plain);

    // One client connection, one upstream connection, every framing.
    let mut conn = Connection::open(w.addr).await;
    let r = conn.request("GET", "/chunked", &headers).await;
    assert_eq!((r.status, r.text().as_str()), (200, "hello world"));
    assert_eq!(r.header("x-request-id").map(str::len), Some(24));
    let r = conn.request("GET", "/hints", &headers).await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    let r = conn.request("GET", "/empty", &headers).await;
    assert_eq!(r.status, 204);
    let r = conn.request("HEAD", "/head", &headers).await;
    assert_eq!((r.status, r.header("content-length")), (200, Some("10")));
    assert_eq!(r.text(), "");
    let r = conn.request("GET", "/", &headers).await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // Counted when recorded, just after the answer went out.
    wait_for_metric(&w.ingress, plain, before + served_plain(5.0)).await;

    // A body that runs until the upstream closes: relayed whole, and the upstream connection
    // is not kept. The plain path closes the client's connection after it (README: a
    // difference a client can see); Pingora frames the body anew and keeps it.
    let r = conn.request("GET", "/close", &headers).await;
    assert_eq!((r.status, r.text().as_str()), (200, "until-close"));
    if plain_path() {
        assert_eq!(r.header("connection"), Some("close"));
    }
    // An upstream that closes right after its answer: the next request gets a new connection.
    let mut conn = Connection::open(w.addr).await;
    let r = conn.request("GET", "/bye", &headers).await;
    assert_eq!((r.status, r.text().as_str()), (200, "bye"));
    let r = conn.request("GET", "/", &headers).await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    wait_for_metric(&w.ingress, plain, before + served_plain(8.0)).await;

    // A request with a body is Pingora's: still proxied, not counted as plain.
    let resp = conn
        .send("POST", "/", &headers, Bytes::from_static(b"x"))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(client::collect(resp).await.text(), "ok");
    // Recorded (all nine requests), the POST not among the plain ones.
    let all = "pinacle_ingress_requests_total{port=\"3000\",route=\"pod\",status_class=\"2xx\"}";
    wait_for_metric(&w.ingress, all, 9.0).await;
    assert_eq!(
        metric_or_zero(&w.ingress, plain),
        before + served_plain(8.0)
    );
}

/// A database that never answers costs a request one directory wait, not two: the plain path
/// answers the 503 itself instead of handing the request to Pingora to be judged again.
#[tokio::test]
async fn a_directory_outage_costs_one_wait_per_request() {
    let black_hole = upstream::silent().await;
    let url = format!("postgres://postgres@{}/none", black_hole.addr);
    let (ingress, addr, _dashboard) = without_database(&url).await;
    let r = demo_as_ada(addr).await;
    assert_eq!(r.status, 503);
    assert_ours(&r, "authorization-unavailable");
    let errors: f64 = ingress
        .metrics()
        .unwrap()
        .render()
        .lines()
        .filter(|l| {
            l.starts_with("pinacle_ingress_directory_errors_total{")
                && l.contains("query=\"pods_by_slug\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(errors, 1.0, "the request was judged more than once");
    wait_for_metric(
        &ingress,
        "pinacle_ingress_plain_requests_total",
        served_plain(1.0),
    )
    .await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_proxy_token_past_half_its_life_is_renewed_once_authorized(pool: PgPool) {
    let w = world(pool).await;
    let port = w.echo.addr.port();
    let host = w.app_host("demo");
    let cookie = |t: &str| format!("pinacle-proxy-token={t}");
    // Young: nothing to renew.
    let young = proxy_token_left("bob", "p_demo", "demo", port, 800);
    let r = w.get(&host, "/", &[("cookie", &cookie(&young))]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("set-cookie"), None);
    // Past half its life: a fresh token with the callback's attributes, and the pod never sees
    // either token.
    let old = proxy_token_left("bob", "p_demo", "demo", port, 300);
    let r = w.get(&host, "/", &[("cookie", &cookie(&old))]).await;
    assert_eq!(r.status, 200);
    let set_cookie = r.header("set-cookie").expect("a renewed token").to_owned();
    assert!(
        set_cookie.ends_with("; Path=/; Max-Age=900; HttpOnly; SameSite=Lax"),
        "{set_cookie}"
    );
    let fresh = set_cookie
        .strip_prefix("pinacle-proxy-token=")
        .and_then(|rest| rest.split(';').next())
        .unwrap();
    assert!(!r.text().contains(&old) && !r.text().contains(fresh));
    let pinacle_authz::Outcome::Valid(renewed) = verifier().verify_proxy_token(fresh, unix_now())
    else {
        panic!("the renewed token verifies")
    };
    assert!(renewed.expires_at.unwrap() >= unix_now() + 890);
    let scope = renewed.scope.unwrap();
    assert_eq!((scope.pod_slug.as_str(), scope.target_port), ("demo", port));
    assert_eq!(renewed.user_id.as_str(), "bob");
    // The fresh one works on its own.
    let r = w.get(&host, "/", &[("cookie", &cookie(fresh))]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("set-cookie"), None);
    // A denied request renews nothing.
    let stranger = proxy_token_left("mal", "p_demo", "demo", port, 300);
    let r = w.get(&host, "/", &[("cookie", &cookie(&stranger))]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.header("set-cookie"), None);
}

/// One request of `method` on a fresh connection.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Collected {
    Connection::open(addr)
        .await
        .request(method, path, headers)
        .await
}

#[sqlx::test(migrations = "../migrations")]
async fn cors_preflights_are_answered_for_the_pod_and_the_dashboard_only(pool: PgPool) {
    let w = world(pool).await;
    let port = w.direct.addr.port();
    let host = pod_host(port, "direct");
    let before = w.direct.connection_count();
    let same_pod = "https://localhost-5173-pod-direct.pinacle.test";
    let matrix = [
        (same_pod, true),
        ("http://localhost-8080-pod-direct.pinacle.test:8443", true),
        ("http://pinacle.test:3000", true), // the dashboard (DASHBOARD_URL)
        ("https://localhost-5173-pod-demo.pinacle.test", false), // another pod
        ("https://evil.example", false),
        ("null", false),
    ];
    for (origin, granted) in matrix {
        for cookie in [None, Some(session_cookie("ada"))] {
            let mut headers = vec![
                ("host", host.as_str()),
                ("origin", origin),
                ("access-control-request-method", "PUT"),
                ("access-control-request-headers", "Content-Type, X-Custom"),
            ];
            if let Some(cookie) = &cookie {
                headers.push(("cookie", cookie));
            }
            let r = request(w.addr, "OPTIONS", "/api/items", &headers).await;
            if granted {
                assert_eq!(r.status, 204, "{origin}: {}", r.text());
                assert_ours(&r, "cors-preflight");
                assert_eq!(r.header("access-control-allow-origin"), Some(origin));
                assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
                assert_eq!(r.header("access-control-allow-methods"), Some("PUT"));
                assert_eq!(
                    r.header("access-control-allow-headers"),
                    Some("Content-Type, X-Custom")
                );
                assert_eq!(r.header("access-control-max-age"), Some("600"));
                assert!(r.header("vary").unwrap().starts_with("Origin"));
                assert_eq!(r.header("content-length"), None);
                assert!(r.body.is_empty());
            } else {
                assert_eq!(r.status, 403, "{origin}");
                assert_ours(&r, "cors-refused");
                assert_eq!(r.header("access-control-allow-origin"), None);
            }
        }
    }
    // A request header list that is not a list of names is refused, never echoed.
    let r = request(
        w.addr,
        "OPTIONS",
        "/",
        &[
            ("host", &host),
            ("origin", same_pod),
            ("access-control-request-method", "GET"),
            ("access-control-request-headers", "x\"y"),
        ],
    )
    .await;
    assert_eq!(r.status, 403);
    // The pod saw none of them; an OPTIONS that is not a preflight still needs credentials.
    assert_eq!(w.direct.connection_count(), before);
    let r = request(w.addr, "OPTIONS", "/", &[("host", &host)]).await;
    assert_eq!(r.status, 401);
}

#[sqlx::test(migrations = "../migrations")]
async fn credentialed_cross_origin_responses_and_the_frame_policy(pool: PgPool) {
    let w = world(pool).await;
    let scripted = upstream::recording(Arc::new(|head: &[u8]| {
        let head = String::from_utf8_lossy(head).to_ascii_lowercase();
        let reply = |bytes: &[u8]| upstream::Reply::Bytes(bytes.to_vec());
        match head.split(' ').nth(1).unwrap_or("/") {
            "/own-cors" => reply(b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: *\r\nContent-Length: 2\r\n\r\nok"),
            "/own-csp" => reply(b"HTTP/1.1 200 OK\r\nContent-Security-Policy: frame-ancestors 'none'; script-src 'self'\r\nX-Frame-Options: DENY\r\nContent-Length: 2\r\n\r\nok"),
            _ => reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        }
    }))
    .await;
    seed_pod(
        &w.pool,
        "p_script",
        "script",
        "running",
        scripted.upstream.addr.port(),
    )
    .await;
    let host = pod_host(3000, "script");
    let cookie = session_cookie("ada");
    let same_pod = "https://localhost-5173-pod-script.pinacle.test";
    let get = |path: &'static str, origin: Option<&'static str>| {
        let (host, cookie) = (host.clone(), cookie.clone());
        async move {
            let mut headers = vec![("host", host.as_str()), ("cookie", cookie.as_str())];
            if let Some(origin) = origin {
                headers.push(("origin", origin));
            }
            client::get(w.addr, path, &headers).await
        }
    };
    // A granted origin: allowed with credentials, and caches told the answer depends on it.
    let r = get("/", Some(same_pod)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), Some(same_pod));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(r.header("vary"), Some("Origin"));
    // Any other origin gets nothing from the ingress.
    let r = get("/", Some("https://evil.example")).await;
    assert_eq!(r.header("access-control-allow-origin"), None);
    // The pod's own CORS answer is left alone.
    let r = get("/own-cors", Some(same_pod)).await;
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(r.header("access-control-allow-credentials"), None);
    // The frame policy: ours on every pod response (the pod, the dashboard, nothing else),
    // beside a pod's own policy, which keeps its other directives and can only narrow ours.
    let ours = "frame-ancestors 'self' http://pinacle.test:3000";
    let r = get("/", None).await;
    let policies: Vec<&str> = r
        .headers
        .get_all("content-security-policy")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(policies, [ours]);
    let r = get("/own-csp", None).await;
    let policies: Vec<&str> = r
        .headers
        .get_all("content-security-policy")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(
        policies,
        ["frame-ancestors 'none'; script-src 'self'", ours]
    );
    assert_eq!(r.header("x-frame-options"), None);
    // The dashboard's responses get none of this.
    let r = client::get(
        w.addr,
        "/",
        &[("host", "pinacle.test"), ("origin", same_pod)],
    )
    .await;
    assert_eq!(r.header("content-security-policy"), None);
    assert_eq!(r.header("access-control-allow-origin"), None);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_port_nobody_listens_on_yet_gets_our_page_until_it_answers(pool: PgPool) {
    let w = world(pool).await;
    let cookie = session_cookie("ada");
    let own_502 = upstream::recording(Arc::new(|_: &[u8]| {
        upstream::Reply::Bytes(
            b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 7\r\n\r\nthe app".to_vec(),
        )
    }))
    .await;
    let port = reserve_port();
    let host = pod_host(port, "demo");
    // A browser gets our page naming the pod and port, which checks again on its own.
    let r = w
        .get(
            &host,
            "/app",
            &[
                ("cookie", &cookie),
                ("sec-fetch-mode", "navigate"),
                ("accept", "text/html"),
            ],
        )
        .await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_ours(&r, "port-not-listening");
    assert!(r.header("retry-after").is_some());
    let text = r.text();
    for expected in [
        "Nothing is listening on this port yet",
        &format!("Pod <strong>demo</strong>, port <strong>{port}</strong>"),
        "sessionStorage",
    ] {
        assert!(text.contains(expected), "{expected} not in {text}");
    }
    // fetch gets JSON naming the port.
    let r = w.get(&host, "/api", &[("cookie", &cookie)]).await;
    assert_eq!(r.status, 502);
    assert_ours(&r, "port-not-listening");
    assert_eq!(r.json()["port"], port);
    // Once the dev server is up, the app answers.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let _ = stream.read(&mut buf).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nready")
            .await;
    });
    let r = w.get(&host, "/app", &[("cookie", &cookie)]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "ready"));
    assert_eq!(r.header("x-pinacle-ingress"), None);
    // The app's own 502 is the app's: relayed as it is.
    let host = pod_host(own_502.upstream.addr.port(), "demo");
    let r = w.get(&host, "/", &[("cookie", &cookie)]).await;
    assert_eq!((r.status, r.text().as_str()), (502, "the app"));
    assert_eq!(r.header("x-pinacle-ingress"), None);
}

#[sqlx::test(migrations = "../migrations")]
async fn path_routing_reaches_pods_under_a_prefix_on_one_host(pool: PgPool) {
    let w = world(pool).await;
    let directory = Arc::new(PostgresDirectory::from_pool(
        w.pool.clone(),
        Duration::from_secs(5),
    ));
    let (_ingress, addr) = start_ingress(
        directory,
        w.dashboard.addr,
        "path_routing_host = \"pods.pinacle.test\"",
    )
    .await;
    let redirecting = upstream::recording(Arc::new(|head: &[u8]| {
        let head = String::from_utf8_lossy(head).to_ascii_lowercase();
        let location = if head.starts_with("get /e ") {
            "//evil.example/"
        } else {
            "/login?next=%2F"
        };
        upstream::Reply::Bytes(
            format!("HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n")
                .into_bytes(),
        )
    }))
    .await;
    seed_pod(
        &w.pool,
        "p_redir",
        "redir",
        "running",
        redirecting.upstream.addr.port(),
    )
    .await;
    let ada = session_cookie("ada");
    let get = |path: String, cookie: Option<String>| async move {
        let mut headers = vec![("host", "pods.pinacle.test")];
        if let Some(cookie) = &cookie {
            headers.push(("cookie", cookie.as_str()));
        }
        client::get(addr, &path, &headers).await
    };
    let port = w.echo.addr.port();
    let prefix = format!("/_pod/demo/{port}");
    // The bare prefix goes to its slash form, query kept.
    let r = get(format!("{prefix}?a=1"), Some(ada.clone())).await;
    assert_eq!(r.status, 308);
    assert_ours(&r, "add-slash");
    assert_eq!(
        r.header("location"),
        Some(format!("{prefix}/?a=1").as_str())
    );
    // Through the pod's nginx to the app, the prefix removed and named, no credentials.
    let r = get(format!("{prefix}/x?y=1"), Some(ada.clone())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let echo = r.json();
    assert_eq!(echo["path"], "/x?y=1");
    assert_eq!(echo["headers"]["x-forwarded-prefix"], prefix);
    assert!(echo["headers"].get("cookie").is_none());
    assert_eq!(echo["headers"]["host"], format!("localhost:{port}"));
    // The same decisions as on pod hosts.
    let r = get(format!("{prefix}/x"), Some(session_cookie("mal"))).await;
    assert_eq!(r.status, 403);
    let r = get(format!("{prefix}/x"), None).await;
    assert_eq!(r.status, 401);
    let r = get("/_pod/nope/3000/".to_owned(), Some(ada.clone())).await;
    assert_eq!(r.status, 403);
    // Anything else on that host is not a pod address.
    let r = get("/".to_owned(), Some(ada.clone())).await;
    assert_eq!(r.status, 404);
    assert_ours(&r, "not-a-pod-path");
    // A pod's redirect to a path on its host keeps the prefix; another host's is left alone.
    let redir = "/_pod/redir/3000";
    let r = get(format!("{redir}/r"), Some(ada.clone())).await;
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location"),
        Some(format!("{redir}/login?next=%2F").as_str())
    );
    let r = get(format!("{redir}/e"), Some(ada.clone())).await;
    assert_eq!(r.header("location"), Some("//evil.example/"));
    // The callback under the prefix: a cookie scoped to it, and back to the path under it.
    let token = proxy_token("ada", "p_demo", "demo", port);
    let r = get(
        format!("{prefix}/pinacle-proxy-callback?token={token}&return_url=%2Fdocs"),
        None,
    )
    .await;
    assert_eq!(r.status, 302, "{}", r.text());
    assert_eq!(
        r.header("location"),
        Some(format!("{prefix}/docs").as_str())
    );
    let set_cookie = r.header("set-cookie").unwrap();
    assert!(
        set_cookie.contains(&format!("; Path={prefix}/;")),
        "{set_cookie}"
    );
    let r = get(
        format!("{prefix}/docs"),
        Some(format!("pinacle-proxy-token={token}")),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/docs");
    // Pod hosts and the dashboard work as before on the same ingress.
    let r = client::get(
        addr,
        "/",
        &[("host", &w.app_host("demo")), ("cookie", &ada)],
    )
    .await;
    assert_eq!(r.status, 200);
    // Never on the dashboard's own host.
    let env: HashMap<&str, &str> =
        HashMap::from([("NEXTAUTH_SECRET", SECRET), ("NEXTAUTH_URL", DASHBOARD_URL)]);
    let refused = config::from_toml(
        "dashboard_upstream = \"127.0.0.1:1\"\npath_routing_host = \"pinacle.test\"\n",
        "test",
        &|k| env.get(k).map(|v| (*v).to_owned()),
    )
    .unwrap_err()
    .to_string();
    assert!(refused.contains("path_routing_host"), "{refused}");
}

#[sqlx::test(migrations = "../migrations")]
async fn preflights_pass_to_pods_with_their_own_cors_policy_without_credentials(pool: PgPool) {
    let w = world(pool).await;
    let directory = Arc::new(PostgresDirectory::from_pool(
        w.pool.clone(),
        Duration::from_secs(5),
    ));
    let passing = w.direct.addr.port();
    let (_ingress, addr) = start_ingress(
        directory,
        w.dashboard.addr,
        &format!("cors_pass_ports = [\"{passing}\"]"),
    )
    .await;
    let preflight = |host: String| async move {
        request(
            addr,
            "OPTIONS",
            "/api",
            &[
                ("host", host.as_str()),
                ("origin", "https://evil.example"),
                ("access-control-request-method", "PUT"),
                ("cookie", &session_cookie("ada")),
            ],
        )
        .await
    };
    // On a passing port the pod answers (the echo), and never sees a credential.
    let r = preflight(pod_host(passing, "direct")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-pinacle-ingress"), None);
    let echo = r.json();
    assert_eq!(echo["method"], "OPTIONS");
    assert!(echo["headers"].get("cookie").is_none());
    assert_eq!(echo["headers"]["origin"], "https://evil.example");
    // A slug that names no pod is refused like any preflight, telling nothing.
    let r = preflight(pod_host(passing, "nope")).await;
    assert_eq!(r.status, 403);
    assert_ours(&r, "cors-refused");
    // Other ports keep the ingress's own answer.
    let r = preflight(pod_host(passing + 1, "direct")).await;
    assert_eq!(r.status, 403);
    assert_ours(&r, "cors-refused");
}

#[sqlx::test(migrations = "../migrations")]
async fn the_pod_status_is_answered_to_those_who_may_reach_the_pod_and_never_forwarded(
    pool: PgPool,
) {
    let w = world(pool).await;
    let before = w.direct.connection_count();
    for (slug, status, class) in [
        ("direct", "running", "running"),
        ("sleepy", "stopped", "stopped"),
    ] {
        let host = pod_host(8080, slug);
        for user in ["ada", "bob"] {
            let r = w
                .get(
                    &host,
                    "/__pinacle/status.json",
                    &[("cookie", &session_cookie(user))],
                )
                .await;
            assert_eq!(r.status, 200, "{slug} {user}: {}", r.text());
            assert_ours(&r, "pod-status");
            assert_eq!(
                r.json(),
                serde_json::json!({
                    "pod": slug, "status": status, "port": 8080,
                    "can_start": false, "can_stop": false,
                })
            );
        }
        let r = w
            .get(
                &host,
                "/__pinacle/status",
                &[("cookie", &session_cookie("ada")), ("accept", "text/html")],
            )
            .await;
        assert_eq!(r.status, 200);
        assert!(r.header("content-type").unwrap().starts_with("text/html"));
        let page = r.text();
        let shown = format!("id=\"pod-status\" class=\"s-{class}\">{status}</strong>");
        for expected in [
            shown.as_str(),
            "\"base\":\"/__pinacle/status\"",
            "Pod <strong>",
        ] {
            assert!(page.contains(expected), "{expected} not in {page}");
        }
        // Strangers and the unauthenticated learn nothing.
        let r = w
            .get(
                &host,
                "/__pinacle/status.json",
                &[("cookie", &session_cookie("mal"))],
            )
            .await;
        assert_eq!(r.status, 403);
        let r = w.get(&host, "/__pinacle/status.json", &[]).await;
        assert_eq!(r.status, 401);
    }
    assert_eq!(
        w.direct.connection_count(),
        before,
        "a status request reached the pod"
    );
}
