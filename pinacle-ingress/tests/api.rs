//! API clients end to end: bearer JWTs (RS256, ES256, EdDSA from a JWKS file or URL, HS256),
//! HMAC-signed requests, scope narrowing, and rate limits and daily quotas, in memory and
//! shared through a Redis of the test's own (killed and started again mid-run).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pinacle_authz::PostgresDirectory;
use pinacle_authz::testing::Seed;
use pinacle_ingress::api_auth::{self, Signed};
use pinacle_ingress::config;
use pinacle_ingress::server::{self, Running};
use pinacle_testkit::client::{self, Collected};
use pinacle_testkit::redis::RedisServer;
use pinacle_testkit::{reserve_port, upstream, wait_for_port};
use serde_json::json;
use sqlx::PgPool;

const SECRET: &str = "api-test-secret";
const HS256_SECRET: &str = "hs256-secret-for-the-api-tests-0123";
const HMAC_SECRET: &str = "hmac-client-secret-for-the-tests-0123";
const DASHBOARD_URL: &str = "http://pinacle.test:3000";

fn unix_now() -> i64 {
    pinacle_ingress::cli::unix_now()
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/api")
        .join(name)
}

fn plain_path() -> bool {
    std::env::var("PINACLE_TEST_PLAIN_PATH").as_deref() != Ok("false")
}

fn session_cookie(user: &str) -> String {
    let value = pinacle_authz::testing::session_cookie_value(SECRET, user, unix_now(), 3600);
    format!("next-auth.session-token={value}")
}

fn host(port: u16, slug: &str) -> String {
    format!("localhost-{port}-pod-{slug}.pinacle.test")
}

/// The private key of a fixture (`rsa-1`, `rsa-2`, `ec-1`, `ed-1`).
fn signing_key(name: &str) -> (Algorithm, EncodingKey) {
    let pem = std::fs::read(fixture(&format!("{name}.key.pem"))).unwrap();
    match name.split('-').next().unwrap() {
        "rsa" => (Algorithm::RS256, EncodingKey::from_rsa_pem(&pem).unwrap()),
        "ec" => (Algorithm::ES256, EncodingKey::from_ec_pem(&pem).unwrap()),
        _ => (Algorithm::EdDSA, EncodingKey::from_ed_pem(&pem).unwrap()),
    }
}

/// The claims of a good token for `sub`, valid ten minutes.
fn claims(sub: &str) -> serde_json::Value {
    json!({ "sub": sub, "aud": "pinacle-ingress", "exp": unix_now() + 600, "iat": unix_now() })
}

/// A token signed by the fixture key `key`, naming `kid`.
fn jwt(key: &str, kid: Option<&str>, claims: &serde_json::Value) -> String {
    let (alg, encoding) = signing_key(key);
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &encoding).unwrap()
}

fn hs256(secret: &[u8], claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Users: `ada` owns team `t1` and its pods `demo` and `other` (an HTTP echo behind each);
/// `bob` is a member; `mal` a stranger. The HMAC client `ci` acts as `bob`.
struct World {
    addr: SocketAddr,
    ingress: Running,
    _pods: Vec<upstream::Upstream>,
    dir: PathBuf,
}

async fn seed(pool: &PgPool) -> Vec<upstream::Upstream> {
    let (demo, ws) = (
        upstream::http_echo("demo").await,
        upstream::websocket_echo().await,
    );
    let seed = Seed(pool);
    seed.people().await.unwrap();
    seed.server("s1", "127.0.0.1").await.unwrap();
    seed.team_pods(
        "s1",
        &[
            ("p_demo", "demo", "running", demo.addr.port()),
            ("p_other", "other", "running", demo.addr.port()),
            ("p_chat", "chat", "running", ws.addr.port()),
        ],
    )
    .await
    .unwrap();
    vec![demo, ws]
}

/// An ingress over `pool` (already seeded) with `[api]` and `extra` lines after it.
async fn ingress(
    pool: &PgPool,
    tag: &str,
    api_extra: &str,
    extra: &str,
) -> (Running, SocketAddr, PathBuf) {
    let dir = std::env::temp_dir().join(format!("pinacle-api-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("clients.toml"),
        format!("[[clients]]\nid = \"ci\"\nsecret = \"{HMAC_SECRET}\"\nuser_id = \"bob\"\n"),
    )
    .unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let text = format!(
        "listen = \"{listen}\"\ndashboard_upstream = \"127.0.0.1:9\"\nadmin_listen = \"off\"\n\
         base_domains = [\"pinacle.test\"]\nthreads = 2\nshutdown_grace_period = \"1s\"\n\
         plain_path = {}\n{extra}\n\
         [api]\njwks_file = \"{}\"\nhs256_secrets = [\"{HS256_SECRET}\"]\n\
         hmac_clients_file = \"{}\"\n{api_extra}\n",
        plain_path(),
        fixture("keys.jwks.json").display(),
        dir.join("clients.toml").display(),
    );
    let env: HashMap<&str, &str> =
        HashMap::from([("NEXTAUTH_SECRET", SECRET), ("NEXTAUTH_URL", DASHBOARD_URL)]);
    let config = config::from_toml(&text, "test", &|k| env.get(k).map(|v| (*v).to_owned()))
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    let directory = Arc::new(PostgresDirectory::from_pool(
        pool.clone(),
        Duration::from_secs(5),
    ));
    let running = server::spawn(config, directory, unix_now).unwrap();
    wait_for_port(listen).await;
    (running, listen, dir)
}

async fn world(pool: PgPool, api_extra: &str, extra: &str) -> World {
    let pods = seed(&pool).await;
    let (ingress, addr, dir) = ingress(&pool, "w", api_extra, extra).await;
    World {
        addr,
        ingress,
        _pods: pods,
        dir,
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn get(addr: SocketAddr, host: &str, path: &str, headers: &[(&str, &str)]) -> Collected {
    let mut all = vec![("host", host)];
    all.extend_from_slice(headers);
    client::get(addr, path, &all).await
}

impl World {
    async fn get(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> Collected {
        get(self.addr, host, path, headers).await
    }

    async fn bearer(&self, token: &str) -> Collected {
        let auth = format!("Bearer {token}");
        self.get(&host(3000, "demo"), "/api/x", &[("authorization", &auth)])
            .await
    }

    fn metric(&self, name: &str) -> f64 {
        metric(&self.ingress, name)
    }
}

fn metric(ingress: &Running, name: &str) -> f64 {
    pinacle_testkit::metric(&ingress.metrics().unwrap().render(), name)
}

fn assert_refused(r: &Collected, case: &str) {
    assert_eq!(r.status, 401, "{case}: {}", r.text());
    assert_eq!(
        r.header("x-pinacle-ingress"),
        Some("api-unauthorized"),
        "{case}"
    );
    assert_eq!(r.json(), json!({"error": "Invalid credentials"}), "{case}");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer error=\"invalid_token\"")
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn tokens_of_every_key_type_reach_the_pod_without_their_authorization(pool: PgPool) {
    let w = world(pool, "", "").await;
    let tokens = [
        ("RS256", jwt("rsa-1", Some("rsa-1"), &claims("ada"))),
        ("ES256", jwt("ec-1", Some("ec-1"), &claims("ada"))),
        ("EdDSA", jwt("ed-1", Some("ed-1"), &claims("bob"))),
        ("EdDSA without kid", jwt("ed-1", None, &claims("bob"))),
        ("HS256", hs256(HS256_SECRET.as_bytes(), &claims("ada"))),
    ];
    for (case, token) in &tokens {
        let r = w.bearer(token).await;
        assert_eq!(r.status, 200, "{case}: {}", r.text());
        let headers = &r.json()["headers"];
        assert!(headers.get("authorization").is_none(), "{case}: {headers}");
        assert_eq!(r.json()["path"], "/api/x");
    }
    // A member's valid token for a pod of the team; a stranger's valid token: 403.
    let r = w.bearer(&jwt("rsa-1", Some("rsa-1"), &claims("mal"))).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.header("x-pinacle-ingress"), Some("forbidden"));
}

#[sqlx::test(migrations = "../migrations")]
async fn every_bad_token_of_ours_is_refused_and_reaches_nothing(pool: PgPool) {
    let w = world(pool, "leeway = \"0s\"", "").await;
    let before = w._pods[0].connection_count();
    let mut expired = claims("ada");
    expired["exp"] = json!(unix_now() - 5);
    let mut wrong_aud = claims("ada");
    wrong_aud["aud"] = json!("someone-else");
    let mut no_sub = claims("ada");
    no_sub.as_object_mut().unwrap().remove("sub");
    let rsa_public = std::fs::read(fixture("rsa-1.pub.pem")).unwrap();
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims("ada").to_string().as_bytes())
    );
    let good = jwt("rsa-1", Some("rsa-1"), &claims("ada"));
    let mut parts: Vec<&str> = good.split('.').collect();
    let mut elevated = claims("bob");
    elevated["exp"] = json!(unix_now() + 600);
    let forged_payload = b64(elevated.to_string().as_bytes());
    parts[1] = &forged_payload;
    let tampered = parts.join(".");
    let cases = [
        ("expired", jwt("rsa-1", Some("rsa-1"), &expired)),
        (
            "wrong audience (our kid)",
            jwt("rsa-1", Some("rsa-1"), &wrong_aud),
        ),
        (
            "wrong key (our kid, another key)",
            jwt("rsa-2", Some("rsa-1"), &claims("ada")),
        ),
        ("wrong key (no kid)", jwt("rsa-2", None, &claims("ada"))),
        (
            "HS256 signed with our public key",
            hs256(&rsa_public, &claims("ada")),
        ),
        (
            "HS256 with another secret",
            hs256(b"not-our-secret-not-our-secret-000", &claims("ada")),
        ),
        ("alg none", none),
        ("no sub", jwt("ec-1", Some("ec-1"), &no_sub)),
        ("tampered claims", tampered),
        ("ES256 key claimed as EdDSA", {
            let (_, ec) = signing_key("ec-1");
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some("ed-1".into());
            jsonwebtoken::encode(&header, &claims("ada"), &ec).unwrap()
        }),
    ];
    for (case, token) in &cases {
        let r = w.bearer(token).await;
        assert_refused(&r, case);
    }
    // Even beside a valid session cookie: a bad token of ours decides.
    let auth = format!("Bearer {}", cases[0].1);
    let r = w
        .get(
            &host(3000, "demo"),
            "/",
            &[("authorization", &auth), ("cookie", &session_cookie("ada"))],
        )
        .await;
    assert_refused(&r, "expired beside a cookie");
    assert_eq!(
        w._pods[0].connection_count(),
        before,
        "a refused request reached the pod"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_pods_own_authorization_passes_untouched(pool: PgPool) {
    let w = world(pool, "", "").await;
    let foreign_jwt = {
        let mut c = claims("someone");
        c["aud"] = json!("the-pods-own-api");
        hs256(b"the pod app's own secret, not ours!", &c)
    };
    for (case, value) in [
        ("an opaque token", "Bearer app-token-123".to_owned()),
        ("another service's JWT", format!("Bearer {foreign_jwt}")),
        ("basic auth", "Basic dXNlcjpwYXNz".to_owned()),
    ] {
        let r = w
            .get(
                &host(3000, "demo"),
                "/",
                &[
                    ("authorization", &value),
                    ("cookie", &session_cookie("ada")),
                ],
            )
            .await;
        assert_eq!(r.status, 200, "{case}: {}", r.text());
        assert_eq!(
            r.json()["headers"]["authorization"],
            value.as_str(),
            "{case}"
        );
        // Without other credentials: judged as any request without them.
        let r = w
            .get(&host(3000, "demo"), "/", &[("authorization", &value)])
            .await;
        assert_eq!(
            (r.status, r.header("x-pinacle-ingress")),
            (401, Some("unauthenticated")),
            "{case}"
        );
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn the_scope_claims_narrow_what_the_user_may_reach(pool: PgPool) {
    let w = world(pool, "", "").await;
    let mut scoped = claims("ada");
    scoped["pods"] = json!(["demo"]);
    scoped["ports"] = json!([3000, "5173"]);
    let auth = format!("Bearer {}", jwt("rsa-1", Some("rsa-1"), &scoped));
    for (port, slug, status) in [
        (3000, "demo", 200),
        (5173, "demo", 200),
        (8080, "demo", 403),
        (3000, "other", 403),
    ] {
        let r = w
            .get(&host(port, slug), "/", &[("authorization", &auth)])
            .await;
        assert_eq!(r.status, status, "{slug}:{port}: {}", r.text());
    }
    // Unscoped, the same user reaches both.
    let auth = format!("Bearer {}", jwt("rsa-1", Some("rsa-1"), &claims("ada")));
    let r = w
        .get(&host(8080, "other"), "/", &[("authorization", &auth)])
        .await;
    assert_eq!(r.status, 200);
}

fn signed_headers(path: &str, host: &str, timestamp: i64, secret: &str) -> Vec<(String, String)> {
    let signature = api_auth::sign(
        secret.as_bytes(),
        Signed {
            method: "GET",
            host,
            path_and_query: path,
        },
        timestamp,
    );
    vec![
        ("x-pinacle-client".into(), "ci".into()),
        ("x-pinacle-timestamp".into(), timestamp.to_string()),
        ("x-pinacle-signature".into(), signature),
    ]
}

#[sqlx::test(migrations = "../migrations")]
async fn hmac_signed_requests_good_skewed_replayed_and_tampered(pool: PgPool) {
    let w = world(pool, "hmac_clock_tolerance = \"5m\"", "").await;
    let h = host(3000, "demo");
    let send = |path: &'static str, headers: Vec<(String, String)>| {
        let h = h.clone();
        let w = &w;
        async move {
            let refs: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            w.get(&h, path, &refs).await
        }
    };
    let now = unix_now();
    let good = signed_headers("/reports?day=1", &h, now, HMAC_SECRET);
    let r = send("/reports?day=1", good.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = &r.json()["headers"];
    for name in [
        "x-pinacle-client",
        "x-pinacle-timestamp",
        "x-pinacle-signature",
    ] {
        assert!(seen.get(name).is_none(), "{name} reached the pod: {seen}");
    }
    // Within tolerance either way.
    assert_eq!(
        send("/", signed_headers("/", &h, now - 240, HMAC_SECRET))
            .await
            .status,
        200
    );
    assert_eq!(
        send("/", signed_headers("/", &h, now + 240, HMAC_SECRET))
            .await
            .status,
        200
    );
    // Skewed past the tolerance, a replay of a six-minute-old request, a tampered path, query
    // or host, a wrong secret, an unknown client.
    let old = signed_headers("/reports?day=1", &h, now - 360, HMAC_SECRET);
    let mut unknown = good.clone();
    unknown[0].1 = "nobody".into();
    for (case, path, headers) in [
        (
            "skewed ahead",
            "/",
            signed_headers("/", &h, now + 400, HMAC_SECRET),
        ),
        ("replayed outside tolerance", "/reports?day=1", old),
        ("tampered query", "/reports?day=2", good.clone()),
        ("tampered path", "/other?day=1", good.clone()),
        (
            "wrong secret",
            "/",
            signed_headers("/", &h, now, "another-secret-another-secret-0000"),
        ),
        ("unknown client", "/reports?day=1", unknown),
    ] {
        let r = send(path, headers).await;
        assert_refused(&r, case);
    }
    let other_host = signed_headers("/", &host(3000, "other"), now, HMAC_SECRET);
    assert_refused(&send("/", other_host).await, "signed for another host");
}

/// A JWKS URL whose document the test swaps, counting fetches.
struct JwksServer {
    url: String,
    document: Arc<std::sync::Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

async fn jwks_server() -> JwksServer {
    use http_body_util::Full;
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let document = Arc::new(std::sync::Mutex::new(
        std::fs::read_to_string(fixture("keys.jwks.json")).unwrap(),
    ));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (doc, count) = (document.clone(), fetches.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (doc, count) = (doc.clone(), count.clone());
            tokio::spawn(async move {
                let service = service_fn(move |_req| {
                    count.fetch_add(1, Ordering::SeqCst);
                    let body = doc.lock().unwrap().clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            bytes::Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    JwksServer {
        url: format!("http://{addr}/.well-known/jwks.json"),
        document,
        fetches,
        _task: task,
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_jwks_url_is_fetched_again_for_a_new_kid_at_most_once_per_interval(pool: PgPool) {
    let jwks = jwks_server().await;
    let w = world(
        pool,
        &format!(
            "jwks_url = \"{}\"\njwks_refresh_interval = \"1s\"",
            jwks.url
        ),
        "",
    )
    .await;
    // The start-up fetch.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while jwks.fetches.load(Ordering::SeqCst) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no start-up fetch");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The issuer rotates: rsa-2 is published, and a token signed by it arrives.
    *jwks.document.lock().unwrap() = std::fs::read_to_string(fixture("rotated.jwks.json")).unwrap();
    let rotated = jwt("rsa-2", Some("rsa-2"), &claims("ada"));
    let r = w.bearer(&rotated).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 2);
    // Unknown key ids right after: refused without another fetch (at most once a second here).
    let mut unknown = claims("ada");
    unknown["exp"] = json!(unix_now() + 60);
    for _ in 0..3 {
        assert_refused(
            &w.bearer(&jwt("rsa-2", Some("nope"), &unknown)).await,
            "unknown kid",
        );
    }
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 2);
    assert_eq!(
        w.metric("pinacle_ingress_jwks_fetches_total{result=\"ok\"}"),
        2.0
    );
}

/// `[rate_limits]` lines.
fn limits(lines: &str) -> String {
    format!("[rate_limits]\n{lines}\n")
}

#[sqlx::test(migrations = "../migrations")]
async fn a_burst_over_the_bucket_gets_429_with_the_ratelimit_fields(pool: PgPool) {
    let w = world(
        pool,
        "",
        &limits("api_per_user = { burst = 3, per_second = 0.5 }\nbrowser_per_user = { burst = 100, per_second = 50 }"),
    )
    .await;
    let token = jwt("ec-1", Some("ec-1"), &claims("ada"));
    for i in 0..3 {
        assert_eq!(w.bearer(&token).await.status, 200, "request {i}");
    }
    let r = w.bearer(&token).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("x-pinacle-ingress"), Some("rate-limited"));
    assert_eq!(r.header("retry-after"), Some("2"));
    assert_eq!(r.header("ratelimit-policy"), Some("\"api-user\";q=3;w=6"));
    assert_eq!(r.header("ratelimit"), Some("\"api-user\";r=0;t=2"));
    assert_eq!(r.json()["error"], "Too many requests");
    // Another user has their own bucket; a browser is not an API client.
    assert_eq!(
        w.bearer(&jwt("ec-1", Some("ec-1"), &claims("bob")))
            .await
            .status,
        200
    );
    let r = w
        .get(
            &host(3000, "demo"),
            "/",
            &[("cookie", &session_cookie("ada"))],
        )
        .await;
    assert_eq!(r.status, 200);
    // WebSocket handshakes count like requests.
    let auth = format!("Bearer {token}");
    let r = w
        .get(
            &host(3000, "chat"),
            "/",
            &[
                ("authorization", &auth),
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-version", "13"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ],
        )
        .await;
    assert_eq!(r.status, 429);
    assert_eq!(
        w.metric("pinacle_ingress_rate_limit_checks_total{backend=\"memory\",kind=\"api\",outcome=\"limited\"}"),
        2.0
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn the_daily_quota_is_exact_in_memory_and_in_redis(pool: PgPool) {
    let redis = RedisServer::start().await;
    let _pods = seed(&pool).await;
    for (tag, redis_line) in [
        ("memory", String::new()),
        ("redis", format!("redis_url = \"{}\"", redis.url())),
    ] {
        let (running, addr, dir) = ingress(
            &pool,
            tag,
            "",
            &limits(&format!(
                "api_per_user = {{ burst = 1000, per_second = 1000, daily = 7 }}\n{redis_line}"
            )),
        )
        .await;
        // A user of its own per backend: the quota is per user and day.
        let user = if tag == "memory" { "ada" } else { "bob" };
        let auth = format!("Bearer {}", jwt("rsa-1", Some("rsa-1"), &claims(user)));
        for i in 0..7 {
            let r = get(addr, &host(3000, "demo"), "/", &[("authorization", &auth)]).await;
            assert_eq!(r.status, 200, "{tag} request {i}: {}", r.text());
        }
        let r = get(addr, &host(3000, "demo"), "/", &[("authorization", &auth)]).await;
        assert_eq!(r.status, 429, "{tag}");
        assert_eq!(r.json()["error"], "Daily quota exhausted");
        let to_midnight = 86_400 - unix_now().rem_euclid(86_400);
        let retry: i64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((retry - to_midnight).abs() <= 2, "{retry} vs {to_midnight}");
        assert_eq!(
            r.header("ratelimit"),
            Some(format!("\"api-user-daily\";r=0;t={retry}").as_str())
        );
        assert_eq!(
            metric(
                &running,
                &format!(
                    "pinacle_ingress_rate_limit_checks_total{{backend=\"{tag}\",kind=\"api\",outcome=\"allowed\"}}"
                )
            ),
            7.0
        );
        drop(running);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn two_gateways_share_one_bucket_and_redis_dying_leaves_each_limited(pool: PgPool) {
    let mut redis = RedisServer::start().await;
    let pods = seed(&pool).await;
    let rl = limits(&format!(
        "api_per_user = {{ burst = 4, per_second = 0.05 }}\nredis_url = \"{}\"\nredis_timeout = \"200ms\"",
        redis.url()
    ));
    let (a, a_addr, a_dir) = ingress(&pool, "a", "", &rl).await;
    let (b, b_addr, b_dir) = ingress(&pool, "b", "", &rl).await;
    let auth = format!("Bearer {}", jwt("ed-1", Some("ed-1"), &claims("ada")));
    let h = host(3000, "demo");
    let send = |addr: SocketAddr| {
        let (h, auth) = (h.clone(), auth.clone());
        async move { get(addr, &h, "/", &[("authorization", &auth)]).await.status }
    };
    // Four tokens between the two gateways, then none on either.
    assert_eq!(send(a_addr).await, 200);
    assert_eq!(send(b_addr).await, 200);
    assert_eq!(send(a_addr).await, 200);
    assert_eq!(send(b_addr).await, 200);
    assert_eq!(send(a_addr).await, 429);
    assert_eq!(send(b_addr).await, 429);
    let redis_allowed = "pinacle_ingress_rate_limit_checks_total{backend=\"redis\",kind=\"api\",outcome=\"allowed\"}";
    assert_eq!(metric(&a, redis_allowed) + metric(&b, redis_allowed), 4.0);

    // Redis dies: each gateway counts on its own, with the same limits; nothing is a 5xx.
    redis.kill();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(send(a_addr).await);
    }
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        4,
        "{statuses:?}"
    );
    assert!(metric(&a, "pinacle_ingress_rate_limit_redis_failures_total") >= 1.0);
    assert!(
        metric(
            &a,
            "pinacle_ingress_rate_limit_checks_total{backend=\"memory\",kind=\"api\",outcome=\"limited\"}"
        ) >= 2.0
    );

    // Redis is back (empty): after the retry pause the gateway counts there again, no restart.
    redis.restart().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = metric(&a, redis_allowed);
    let bob = format!("Bearer {}", jwt("ed-1", Some("ed-1"), &claims("bob")));
    let mut back = 0;
    for _ in 0..3 {
        let r = get(a_addr, &h, "/", &[("authorization", &bob)]).await;
        assert_eq!(r.status, 200);
        back += 1;
    }
    assert_eq!(metric(&a, redis_allowed) - before, f64::from(back));
    drop((a, b, pods));
    std::fs::remove_dir_all(a_dir).unwrap();
    std::fs::remove_dir_all(b_dir).unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn a_remembered_token_still_expires_and_the_issuer_is_checked(pool: PgPool) {
    let w = world(
        pool,
        "leeway = \"0s\"\nissuer = \"https://issuer.test\"",
        "",
    )
    .await;
    let mut short = claims("ada");
    short["iss"] = json!("https://issuer.test");
    short["exp"] = json!(unix_now() + 2);
    let token = jwt("rsa-1", Some("rsa-1"), &short);
    // Verified once, then remembered.
    assert_eq!(w.bearer(&token).await.status, 200);
    assert_eq!(w.bearer(&token).await.status, 200);
    // Past its exp, the remembered token is refused like any other.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while unix_now() <= short["exp"].as_i64().unwrap() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_refused(&w.bearer(&token).await, "expired after being remembered");
    let mut other_issuer = claims("ada");
    other_issuer["iss"] = json!("https://elsewhere.test");
    assert_refused(
        &w.bearer(&jwt("rsa-1", Some("rsa-1"), &other_issuer)).await,
        "another issuer",
    );
    let no_issuer = jwt("rsa-1", Some("rsa-1"), &claims("ada"));
    assert_refused(&w.bearer(&no_issuer).await, "no issuer");
}

/// One raw HTTP/1.1 GET to `addr` from the loopback address `from`; the status and head.
async fn get_from(
    from: [u8; 4],
    addr: SocketAddr,
    host: &str,
    fields: &[(&str, &str)],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let (method, fields) = match fields.split_first() {
        Some(((":method", m), rest)) => (*m, rest),
        _ => ("GET", fields),
    };
    let mut request = format!("{method} / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n");
    for (name, value) in fields {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text.split(' ').nth(1).unwrap().parse().unwrap();
    (status, text)
}

/// A made-up database session token (the shape next-auth's are), different for each `i`.
fn guess(i: usize) -> String {
    format!("next-auth.session-token={i:08x}-0000-4000-8000-000000000000")
}

/// Any opaque session cookie value is a token to look up, and nobody needs to be signed in to
/// send one: so the lookups a client address may cause are bounded (`lookups_per_client`),
/// per address (a trusted proxy's clients each by their own), while a signed-in user whose
/// session is cached is never held back, and no lookup happens past the limit.
#[sqlx::test(migrations = "../migrations")]
async fn session_guesses_cost_the_directory_a_bounded_number_of_lookups(pool: PgPool) {
    let w = world(
        pool.clone(),
        "",
        &format!(
            "trusted_proxies = [\"127.0.0.2/32\"]\ncors_preflight = \"pass\"\n{}",
            limits("lookups_per_client = { burst = 20, per_second = 0.01 }")
        ),
    )
    .await;
    Seed(&pool)
        .session(
            "feedc0de-0000-4000-8000-000000000000",
            "ada",
            (unix_now() + 3600) * 1000,
        )
        .await
        .unwrap();
    let demo = host(3000, "demo");
    let sessions = "pinacle_ingress_directory_query_duration_seconds_count{query=\"session\"}";
    let ada = "next-auth.session-token=feedc0de-0000-4000-8000-000000000000";
    let r = w.get(&demo, "/", &[("cookie", ada)]).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // 19 more lookups from this address, then 429 and no query.
    let mut allowed = 0;
    let limited = loop {
        let r = w.get(&demo, "/", &[("cookie", &guess(allowed))]).await;
        if r.status == 429 {
            break r;
        }
        assert_eq!(r.status, 401, "{}", r.text());
        allowed += 1;
        assert!(allowed <= 19, "no limit");
    };
    assert_eq!(allowed, 19);
    assert_eq!(limited.header("x-pinacle-ingress"), Some("rate-limited"));
    assert!(limited.header("retry-after").is_some());
    assert_eq!(
        limited.header("ratelimit-policy"),
        Some("\"client-lookups\";q=20;w=2000")
    );
    assert_eq!(w.metric(sessions), 20.0);
    // Sixteen guesses in one header: refused whole, nothing looked up.
    let many: Vec<String> = (100..116).map(guess).collect();
    let r = w.get(&demo, "/", &[("cookie", &many.join("; "))]).await;
    assert_eq!(r.status, 429);
    // X-Forwarded-For from an untrusted client changes nothing.
    let (status, _) = get_from(
        [127, 0, 0, 1],
        w.addr,
        &demo,
        &[("cookie", &guess(200)), ("x-forwarded-for", "198.51.100.8")],
    )
    .await;
    assert_eq!(status, 429);
    assert_eq!(w.metric(sessions), 20.0, "no lookup past the limit");
    // The signed-in user's session is cached: no lookup, no limit.
    assert_eq!(w.get(&demo, "/", &[("cookie", ada)]).await.status, 200);
    // A trusted proxy's clients are counted by the address it names.
    let (status, head) = get_from(
        [127, 0, 0, 2],
        w.addr,
        &demo,
        &[("cookie", &guess(300)), ("x-forwarded-for", "198.51.100.7")],
    )
    .await;
    assert_eq!(status, 401, "{head}");
    assert_eq!(w.metric(sessions), 21.0);
    // CORS preflights passed to pods (`cors_preflight = "pass"`) find the pod by its slug
    // without a user: a slug not cached is a lookup too.
    let preflight = |xff: &'static str| {
        [
            (":method", "OPTIONS"),
            ("origin", "https://elsewhere.example"),
            ("access-control-request-method", "PUT"),
            ("x-forwarded-for", xff),
        ]
    };
    let nowhere = host(3000, "nowhere");
    let (status, _) = get_from([127, 0, 0, 1], w.addr, &nowhere, &preflight("-")).await;
    assert_eq!(status, 429);
    let (status, _) = get_from([127, 0, 0, 2], w.addr, &nowhere, &preflight("198.51.100.7")).await;
    assert_eq!(status, 403, "looked up, and no such pod");
    assert_eq!(
        w.metric("pinacle_ingress_rate_limit_checks_total{backend=\"memory\",kind=\"lookup\",outcome=\"limited\"}"),
        4.0
    );
}

/// With `database_sessions = false` (a dashboard on the JWT strategy, as Pinacle's) an opaque
/// value under the session cookie's name is nobody's credential: never looked up, and passed
/// to the pod like any cookie of the pod's own.
#[sqlx::test(migrations = "../migrations")]
async fn without_database_sessions_an_opaque_cookie_is_never_looked_up(pool: PgPool) {
    let w = world(pool, "", "database_sessions = false").await;
    let demo = host(3000, "demo");
    let r = w.get(&demo, "/", &[("cookie", &guess(1))]).await;
    assert_eq!(r.status, 401);
    let signed_in = format!("{}; {}", guess(2), session_cookie("ada"));
    let r = w.get(&demo, "/", &[("cookie", &signed_in)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let echo = r.json();
    assert_eq!(echo["headers"]["cookie"], guess(2).as_str());
    assert_eq!(
        w.metric("pinacle_ingress_directory_query_duration_seconds_count{query=\"session\"}"),
        0.0
    );
}
