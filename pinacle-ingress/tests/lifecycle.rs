//! The pod lifecycle at the door, end to end: Start and Stop from the status page, wake on
//! request and activity reports, against a control-plane stand-in
//! (`pinacle_testkit::control`) that verifies the ingress's tokens and flips the pod's status
//! in this test's Postgres database. (Chromium clicking the buttons: `browser.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use pinacle_authz::PostgresDirectory;
use pinacle_authz::testing::Seed;
use pinacle_ingress::config;
use pinacle_ingress::server::{self, Running};
use pinacle_testkit::client::{self, Collected, Connection};
use pinacle_testkit::control::{Answer, ControlPlane, OnAction};
use pinacle_testkit::{reserve_port, upstream, wait_for_port};
use sqlx::PgPool;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "lifecycle-test-secret";
const CONTROL_SECRET: &str = "control-plane-secret-of-32-bytes!!";
const DASHBOARD_URL: &str = "http://pinacle.test:3000";

fn unix_now() -> i64 {
    pinacle_ingress::cli::unix_now()
}

fn session_cookie(user: &str) -> String {
    let value = pinacle_authz::testing::session_cookie_value(SECRET, user, unix_now(), 3600);
    format!("next-auth.session-token={value}")
}

fn pod_host(slug: &str) -> String {
    format!("localhost-3000-pod-{slug}.pinacle.test")
}

fn plain_path() -> bool {
    std::env::var("PINACLE_TEST_PLAIN_PATH").as_deref() != Ok("false")
}

/// The test's world: `ada` owns team `t1` and its pods, `bob` is a member, `mal` a stranger.
/// Pods: `sleepy` (stopped), `awake` (running, an HTTP echo as its nginx), `chat` (running, a
/// WebSocket echo).
struct World {
    pool: PgPool,
    addr: SocketAddr,
    ingress: Running,
    _pods: Vec<upstream::Upstream>,
}

async fn seed(pool: &PgPool) -> Vec<upstream::Upstream> {
    let (echo, ws) = (
        upstream::http_echo("awake").await,
        upstream::websocket_echo().await,
    );
    let seed = Seed(pool);
    seed.people().await.unwrap();
    seed.server("s1", "127.0.0.1").await.unwrap();
    seed.team_pods(
        "s1",
        &[
            ("p_sleepy", "sleepy", "stopped", echo.addr.port()),
            ("p_awake", "awake", "running", echo.addr.port()),
            ("p_chat", "chat", "running", ws.addr.port()),
        ],
    )
    .await
    .unwrap();
    vec![echo, ws]
}

/// The ingress over `pool`, seeded, with `extra` configuration lines (short authorization
/// TTLs, so the stand-in's status changes show without live notifications).
async fn world(pool: PgPool, extra: &str) -> World {
    let pods = seed(&pool).await;
    let mut w = world_again(
        pool,
        &format!("authz_deny_ttl = \"1s\"\nauthz_allow_ttl = \"1s\"\n{extra}"),
    )
    .await;
    w._pods.extend(pods);
    w
}

fn control_lines(url: &str, extra: &str) -> String {
    format!("control_url = \"{url}\"\ncontrol_secret = \"{CONTROL_SECRET}\"\n{extra}")
}

/// A stand-in that flips the status as a control plane would: `starting` (or `stopping`) at
/// once, then `running` (`stopped`) after `settle`.
async fn control_plane(pool: &PgPool, settle: Duration) -> ControlPlane {
    let pool = pool.clone();
    let on_action: OnAction = Arc::new(move |act, pod| {
        let pool = pool.clone();
        Box::pin(async move {
            let (now, then) = match act.as_str() {
                "start" => ("starting", "running"),
                _ => ("stopping", "stopped"),
            };
            set_status(&pool, &pod, now).await;
            tokio::spawn(async move {
                tokio::time::sleep(settle).await;
                set_status(&pool, &pod, then).await;
            });
        })
    });
    ControlPlane::start(CONTROL_SECRET, on_action).await
}

async fn set_status(pool: &PgPool, pod: &str, status: &str) {
    sqlx::query("UPDATE pod SET status = $1 WHERE id = $2")
        .bind(status)
        .bind(pod)
        .execute(pool)
        .await
        .unwrap();
}

impl World {
    async fn get(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> Collected {
        let mut all = vec![("host", host)];
        all.extend_from_slice(headers);
        client::get(self.addr, path, &all).await
    }

    async fn post(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> Collected {
        let mut all = vec![("host", host), ("content-length", "0")];
        all.extend_from_slice(headers);
        let mut conn = Connection::open(self.addr).await;
        client::collect(conn.send("POST", path, &all, Bytes::new()).await).await
    }

    /// The CSRF token on `user`'s status page of `slug`.
    async fn csrf(&self, slug: &str, user: &str) -> String {
        let r = self
            .get(
                &pod_host(slug),
                "/__pinacle/status",
                &[("cookie", &session_cookie(user)), ("accept", "text/html")],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let page = r.text();
        let start = page
            .find("\"csrf\":\"")
            .unwrap_or_else(|| panic!("no csrf in {page}"))
            + 8;
        page[start..].split('"').next().unwrap().to_owned()
    }

    /// The status JSON as `ada` sees it.
    async fn status(&self, slug: &str) -> serde_json::Value {
        let r = self
            .get(
                &pod_host(slug),
                "/__pinacle/status.json",
                &[("cookie", &session_cookie("ada"))],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// Waits (bounded) until `slug`'s status is `status`.
    async fn wait_for_status(&self, slug: &str, status: &str) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let seen = self.status(slug).await;
            if seen["status"] == status {
                return seen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{slug} stayed {seen} (waiting for {status})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn metric(&self, name: &str) -> f64 {
        pinacle_testkit::metric(&self.ingress.metrics().unwrap().render(), name)
    }
}

/// A request that must be refused: what it is, its headers, the status and marker expected.
type Refusal<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16, &'a str);

fn assert_ours(r: &Collected, marker: &str) {
    assert_eq!(
        r.header("x-pinacle-ingress"),
        Some(marker),
        "{} {}",
        r.status,
        r.text()
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn start_and_stop_reach_the_control_plane_with_the_right_claims_only_from_the_pods_own_page(
    pool: PgPool,
) {
    let control = control_plane(&pool, Duration::from_millis(300)).await;
    let w = world(pool.clone(), &control_lines(&control.url(), "")).await;
    let host = pod_host("sleepy");
    let origin = format!("http://{host}");
    assert_eq!(
        w.status("sleepy").await,
        serde_json::json!({"pod": "sleepy", "status": "stopped", "port": 3000,
                           "can_start": true, "can_stop": false})
    );
    let page = w
        .get(
            &host,
            "/__pinacle/status",
            &[("cookie", &session_cookie("ada")), ("accept", "text/html")],
        )
        .await
        .text();
    assert!(
        page.contains("<button type=\"button\" id=\"start\">Start</button>"),
        "{page}"
    );
    assert!(page.contains("id=\"stop\" hidden disabled>Stop"), "{page}");
    let csrf = w.csrf("sleepy", "ada").await;
    let bobs = w.csrf("sleepy", "bob").await;
    let ada = session_cookie("ada");
    let mal = session_cookie("mal");

    // None of these may reach the control plane.
    let refused: Vec<Refusal> = vec![
        (
            "no Origin",
            vec![("cookie", &ada), ("x-pinacle-csrf", &csrf)],
            403,
            "lifecycle-forbidden",
        ),
        (
            "another site",
            vec![
                ("cookie", &ada),
                ("x-pinacle-csrf", &csrf),
                ("origin", "https://evil.example"),
            ],
            403,
            "lifecycle-forbidden",
        ),
        (
            "another pod",
            vec![
                ("cookie", &ada),
                ("x-pinacle-csrf", &csrf),
                ("origin", "http://localhost-3000-pod-awake.pinacle.test"),
            ],
            403,
            "lifecycle-forbidden",
        ),
        (
            "cross-site fetch metadata",
            vec![
                ("cookie", &ada),
                ("x-pinacle-csrf", &csrf),
                ("origin", &origin),
                ("sec-fetch-site", "cross-site"),
            ],
            403,
            "lifecycle-forbidden",
        ),
        (
            "no CSRF token",
            vec![("cookie", &ada), ("origin", &origin)],
            403,
            "lifecycle-forbidden",
        ),
        (
            "another user's CSRF token",
            vec![
                ("cookie", &ada),
                ("origin", &origin),
                ("x-pinacle-csrf", &bobs),
            ],
            403,
            "lifecycle-forbidden",
        ),
        (
            "a stranger",
            vec![
                ("cookie", &mal),
                ("origin", &origin),
                ("x-pinacle-csrf", &csrf),
            ],
            403,
            "forbidden",
        ),
        (
            "nobody",
            vec![("origin", &origin), ("x-pinacle-csrf", &csrf)],
            401,
            "unauthenticated",
        ),
        (
            "stop on a stopped pod",
            vec![
                ("cookie", &ada),
                ("origin", &origin),
                ("x-pinacle-csrf", &csrf),
            ],
            409,
            "lifecycle-conflict",
        ),
    ];
    for (case, headers, status, marker) in &refused {
        let path = if *case == "stop on a stopped pod" {
            "/__pinacle/status/stop"
        } else {
            "/__pinacle/status/start"
        };
        let r = w.post(&host, path, headers).await;
        assert_eq!(r.status, *status, "{case}: {}", r.text());
        assert_ours(&r, marker);
        assert!(r.json()["error"].as_str().is_some(), "{case}: {}", r.text());
    }
    let r = w
        .get(&host, "/__pinacle/status/start", &[("cookie", &ada)])
        .await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    assert!(control.calls().is_empty(), "{:?}", control.calls());

    // From the page: accepted, with the contract's claims.
    let r = w
        .post(
            &host,
            "/__pinacle/status/start",
            &[
                ("cookie", &ada),
                ("origin", &origin),
                ("x-pinacle-csrf", &csrf),
                ("sec-fetch-site", "same-origin"),
            ],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_ours(&r, "control-accepted");
    assert_eq!(
        r.json(),
        serde_json::json!({"result": "accepted", "action": "start"})
    );
    let calls = control.calls_to("/start");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].path, "/api/ingress/pods/p_sleepy/start");
    let claims = calls[0]
        .claims
        .clone()
        .unwrap_or_else(|| panic!("{:?}", calls[0].token_error));
    assert_eq!(claims["iss"], "pinacle-ingress");
    assert_eq!(claims["aud"], "pinacle-control");
    assert_eq!(claims["sub"], "ada");
    assert_eq!(claims["pod"], "p_sleepy");
    assert_eq!(claims["act"], "start");
    let iat = claims["iat"].as_i64().unwrap();
    assert!((iat - unix_now()).abs() <= 5);
    assert!(claims["exp"].as_i64().unwrap() - iat <= 60);

    // The stand-in's transitions show, then Stop (bob, a member, this time) likewise.
    let starting = w.status("sleepy").await;
    assert!(
        ["starting", "running"].contains(&starting["status"].as_str().unwrap()),
        "{starting}"
    );
    let running = w.wait_for_status("sleepy", "running").await;
    assert_eq!(running["can_stop"], true);
    assert_eq!(running["can_start"], false);
    let r = w
        .post(
            &host,
            "/__pinacle/status/stop",
            &[
                ("cookie", &session_cookie("bob")),
                ("origin", &origin),
                ("x-pinacle-csrf", &bobs),
            ],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let stop = control.calls_to("/stop");
    assert_eq!(stop.len(), 1);
    let claims = stop[0].claims.clone().unwrap();
    assert_eq!(
        (claims["sub"].as_str(), claims["act"].as_str()),
        (Some("bob"), Some("stop"))
    );
    w.wait_for_status("sleepy", "stopped").await;

    // 409 from the control plane is no error; anything else is said plainly.
    control.answer_with(Answer {
        status: 409,
        ..Answer::default()
    });
    let start_headers = [
        ("cookie", ada.as_str()),
        ("origin", origin.as_str()),
        ("x-pinacle-csrf", csrf.as_str()),
    ];
    let post_start = || w.post(&host, "/__pinacle/status/start", &start_headers);
    let r = post_start().await;
    assert_eq!(
        (r.status, r.json()["result"].as_str()),
        (202, Some("in_transition"))
    );
    control.answer_with(Answer {
        status: 500,
        body: r#"{"error":"no capacity on any server"}"#.into(),
        ..Answer::default()
    });
    let r = post_start().await;
    assert_eq!(r.status, 502);
    assert_ours(&r, "control-refused");
    assert_eq!(
        r.json()["error"],
        "The control plane refused to start the pod (HTTP 500): no capacity on any server"
    );
    assert_eq!(
        w.metric("pinacle_ingress_control_calls_total{act=\"start\",result=\"accepted\"}"),
        1.0
    );
    assert_eq!(
        w.metric("pinacle_ingress_control_calls_total{act=\"start\",result=\"refused\"}"),
        1.0
    );
    // Every call carried a token the stand-in accepted.
    assert!(control.calls().iter().all(|c| c.claims.is_some()));
    drop(w.pool);
}

#[sqlx::test(migrations = "../migrations")]
async fn an_unreachable_or_silent_control_plane_gives_a_clear_answer_in_bounded_time(pool: PgPool) {
    // Nothing listens on `closed`; `silent` accepts and never answers.
    let closed = format!("http://127.0.0.1:{}/api/ingress", reserve_port());
    let silent = upstream::silent().await;
    let w = world(
        pool.clone(),
        &control_lines(&closed, "control_timeout = \"1s\""),
    )
    .await;
    let host = pod_host("sleepy");
    let origin = format!("http://{host}");
    let csrf = w.csrf("sleepy", "ada").await;
    let ada = session_cookie("ada");
    let headers = [
        ("cookie", ada.as_str()),
        ("origin", &origin),
        ("x-pinacle-csrf", &csrf),
    ];
    let r = w.post(&host, "/__pinacle/status/start", &headers).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_ours(&r, "control-unreachable");
    assert_eq!(r.header("retry-after"), Some("5"));
    assert_eq!(
        r.json()["error"],
        "The control plane cannot be reached, so the pod was not asked to start. Try again in a moment."
    );

    // The same ingress pointed at a control plane that never answers (SIGHUP-free: a second
    // world shares the database).
    drop(w);
    let w = world_again(
        pool,
        &control_lines(
            &format!("http://{}/api", silent.addr),
            "control_timeout = \"1s\"",
        ),
    )
    .await;
    let csrf = w.csrf("sleepy", "ada").await;
    let headers = [
        ("cookie", ada.as_str()),
        ("origin", &origin),
        ("x-pinacle-csrf", &csrf),
    ];
    let started = std::time::Instant::now();
    let r = w.post(&host, "/__pinacle/status/start", &headers).await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert_ours(&r, "control-timeout");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        w.metric("pinacle_ingress_control_calls_total{act=\"start\",result=\"timeout\"}"),
        1.0
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn an_https_control_plane_is_verified_against_control_ca_file(pool: PgPool) {
    let dir = std::env::temp_dir().join(format!("pinacle-control-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = pinacle_testkit::tls::Ca::new();
    ca.leaf(&["localhost"], &dir, "control");
    std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
    let on_action: OnAction = Arc::new(|_, _| Box::pin(async {}));
    let control = ControlPlane::start_tls(
        CONTROL_SECRET,
        on_action,
        &dir.join("control.pem"),
        &dir.join("control.key"),
    )
    .await;
    let trusted = format!("control_ca_file = \"{}\"", dir.join("ca.pem").display());
    let w = world(pool.clone(), &control_lines(&control.url(), &trusted)).await;
    let host = pod_host("sleepy");
    let origin = format!("http://{host}");
    let csrf = w.csrf("sleepy", "ada").await;
    let ada = session_cookie("ada");
    let headers = [
        ("cookie", ada.as_str()),
        ("origin", &origin),
        ("x-pinacle-csrf", &csrf),
    ];
    let r = w.post(&host, "/__pinacle/status/start", &headers).await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(control.calls_to("/start").len(), 1);
    drop(w);
    // Without the authority (the system's roots only) the certificate is refused: nothing is
    // sent.
    let w = world_again(pool, &control_lines(&control.url(), "")).await;
    let csrf = w.csrf("sleepy", "ada").await;
    let headers = [
        ("cookie", ada.as_str()),
        ("origin", &origin),
        ("x-pinacle-csrf", &csrf),
    ];
    let r = w.post(&host, "/__pinacle/status/start", &headers).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_ours(&r, "control-unreachable");
    assert_eq!(control.calls_to("/start").len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Another ingress over an already seeded database.
async fn world_again(pool: PgPool, extra: &str) -> World {
    let listen: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let dashboard = upstream::http_echo("dashboard").await;
    let text = format!(
        "listen = \"{listen}\"\ndashboard_upstream = \"{}\"\nadmin_listen = \"off\"\n\
         base_domains = [\"pinacle.test\"]\nthreads = 2\nshutdown_grace_period = \"1s\"\n\
         plain_path = {}\n{extra}",
        dashboard.addr,
        plain_path()
    );
    let env: HashMap<&str, &str> =
        HashMap::from([("NEXTAUTH_SECRET", SECRET), ("NEXTAUTH_URL", DASHBOARD_URL)]);
    let config = config::from_toml(&text, "test", &|k| env.get(k).map(|v| (*v).to_owned()))
        .unwrap_or_else(|e| panic!("{e}"));
    let directory = Arc::new(PostgresDirectory::from_pool(
        pool.clone(),
        Duration::from_secs(5),
    ));
    let ingress = server::spawn(config, directory, unix_now).unwrap();
    wait_for_port(listen).await;
    World {
        pool,
        addr: listen,
        ingress,
        _pods: vec![dashboard],
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_navigation_wakes_a_stopped_pod_once_however_many_arrive(pool: PgPool) {
    let control = control_plane(&pool, Duration::from_millis(500)).await;
    // A slow control plane: every navigation below arrives while the one call is in flight.
    control.answer_with(Answer {
        delay: Duration::from_millis(700),
        ..Answer::default()
    });
    let w = world(
        pool.clone(),
        &control_lines(&control.url(), "wake_on_request = true"),
    )
    .await;
    let host = pod_host("sleepy");
    let ada = session_cookie("ada");
    // Not a navigation: 503 with Retry-After, and no wake.
    let r = w
        .get(
            &host,
            "/api/data",
            &[("cookie", &ada), ("accept", "application/json")],
        )
        .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("5"));
    assert_eq!(r.json()["status"], "stopped");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(control.calls().is_empty());
    // Twenty navigations at once: one start call.
    let navigations = (0..20).map(|i| {
        let (w, host, ada) = (&w, &host, &ada);
        async move {
            w.get(
                host,
                &format!("/docs/{i}"),
                &[
                    ("cookie", ada),
                    ("accept", "text/html"),
                    ("sec-fetch-mode", "navigate"),
                    ("sec-fetch-dest", "document"),
                ],
            )
            .await
        }
    });
    for r in futures_util::future::join_all(navigations).await {
        assert_eq!(r.status, 503);
        assert_ours(&r, "pod-unavailable");
        let page = r.text();
        assert!(page.contains("It is being started now"), "{page}");
        assert!(page.contains("/__pinacle/status"), "{page}");
    }
    let calls = control.wait_for("/start", 1, Duration::from_secs(5)).await;
    assert_eq!(calls.len(), 1, "{calls:?}");
    let claims = calls[0].claims.clone().unwrap();
    assert_eq!(
        (claims["sub"].as_str(), claims["pod"].as_str()),
        (Some("ada"), Some("p_sleepy"))
    );
    w.wait_for_status("sleepy", "running").await;
    // The pod runs: the navigation reaches it.
    let r = w
        .get(
            &host,
            "/docs/1",
            &[
                ("cookie", &ada),
                ("accept", "text/html"),
                ("sec-fetch-mode", "navigate"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/docs/1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(control.calls_to("/start").len(), 1);
    assert_eq!(
        w.metric("pinacle_ingress_control_calls_total{act=\"wake\",result=\"accepted\"}"),
        1.0
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn activity_is_reported_in_batches_requests_and_websocket_frames_alike(pool: PgPool) {
    let control = control_plane(&pool, Duration::from_millis(100)).await;
    let w = world(
        pool.clone(),
        &control_lines(&control.url(), "activity_interval = \"1s\""),
    )
    .await;
    // Nothing happened: nothing is reported.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(control.calls_to("/activity").is_empty());

    // Thirty requests on two pods by two users within one interval: one report names both.
    let first = control.calls_to("/activity").len();
    for i in 0..30 {
        let (slug, user) = if i % 3 == 0 {
            ("chat", "bob")
        } else {
            ("awake", "ada")
        };
        let r = w
            .get(&pod_host(slug), "/", &[("cookie", &session_cookie(user))])
            .await;
        assert!(
            // `chat` answers only WebSocket handshakes (502 here): traffic all the same.
            r.status == 200 || r.status == 502,
            "{}",
            r.status
        );
    }
    let reports = control
        .wait_for("/activity", first + 1, Duration::from_secs(5))
        .await;
    let report = &reports[first];
    assert_eq!(report.claims.as_ref().unwrap()["act"], "activity");
    let pods = report.body["pods"].as_array().unwrap();
    let now = unix_now();
    let find = |id: &str| pods.iter().find(|p| p["pod_id"] == id).cloned();
    let awake = find("p_awake").unwrap_or_else(|| panic!("{pods:?}"));
    assert_eq!(awake["users"], serde_json::json!(["ada"]));
    assert!((awake["last_seen"].as_i64().unwrap() - now).abs() <= 3);
    assert_eq!(find("p_chat").unwrap()["users"], serde_json::json!(["bob"]));
    // The thirty requests (spread over at most two intervals) made at most two reports.
    let after_requests = control
        .wait_for("/activity", first + 2, Duration::from_millis(1500))
        .await;
    assert!(
        after_requests.len() <= first + 2,
        "{}",
        after_requests.len()
    );

    // Only WebSocket frames now, for four seconds: the pod is reported again and again.
    let mut request = format!("ws://{}/", w.addr).into_client_request_with_host(&pod_host("chat"));
    request
        .headers_mut()
        .insert("cookie", session_cookie("ada").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let before = control.calls_to("/activity").len();
    for i in 0..20 {
        ws.send(Message::Text(format!("frame {i}").into()))
            .await
            .unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap();
        assert!(echoed.is_some());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let during = control.calls_to("/activity");
    let frames: Vec<_> = during[before..]
        .iter()
        .filter(|c| {
            c.body["pods"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["pod_id"] == "p_chat")
        })
        .collect();
    assert!(
        frames.len() >= 2,
        "{} reports carried the tunnel's pod",
        frames.len()
    );
    // Never more than one report a second (a little slack for the timer).
    for pair in during.windows(2) {
        assert!(pair[1].at - pair[0].at >= Duration::from_millis(900));
    }
    drop(ws);

    // A report the control plane fails is carried by the next one.
    control.answer_activity_with(503);
    let failed_from = control.calls_to("/activity").len();
    let r = w
        .get(
            &pod_host("awake"),
            "/",
            &[("cookie", &session_cookie("bob"))],
        )
        .await;
    assert_eq!(r.status, 200);
    let failed = control
        .wait_for("/activity", failed_from + 1, Duration::from_secs(5))
        .await;
    assert!(
        failed[failed_from].body["pods"]
            .to_string()
            .contains("p_awake")
    );
    control.answer_activity_with(204);
    let carried = control
        .wait_for("/activity", failed_from + 2, Duration::from_secs(5))
        .await;
    let again = &carried[failed_from + 1].body["pods"];
    assert!(
        again.to_string().contains("p_awake") && again.to_string().contains("bob"),
        "{again}"
    );
    assert_eq!(
        w.metric("pinacle_ingress_control_calls_total{act=\"activity\",result=\"refused\"}"),
        1.0
    );
    assert_eq!(w.metric("pinacle_ingress_activity_dropped_total"), 0.0);
}

/// A WebSocket client request with a Host of our choosing.
trait WithHost {
    fn into_client_request_with_host(
        self,
        host: &str,
    ) -> tokio_tungstenite::tungstenite::handshake::client::Request;
}

impl WithHost for String {
    fn into_client_request_with_host(
        self,
        host: &str,
    ) -> tokio_tungstenite::tungstenite::handshake::client::Request {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = self.into_client_request().unwrap();
        request.headers_mut().insert("host", host.parse().unwrap());
        request
    }
}
