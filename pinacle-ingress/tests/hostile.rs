//! The ingress against hostile input, on every engine: the plain path (bodiless HTTP/1.1
//! GET), Pingora's loop (a POST with a body, HTTP/1.0, HTTP/2 over TLS) and our WebSocket
//! tunnel. The pod is a raw server that records the request heads it receives, so every
//! assertion is on the bytes a pod gets.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pinacle_authz::testing::hostile_cookies::{self, Case, Material};
use pinacle_authz::{
    CredentialConfig, CredentialVerifier, FileDirectory, ProxyTokenClaims, Secret,
};
use pinacle_ingress::config;
use pinacle_ingress::server::{self, Running};
use pinacle_testkit::tls::{self, Ca};
use pinacle_testkit::upstream::{self, Recording, Reply};
use pinacle_testkit::{reserve_port, wait_for_port};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &str = "hostile-test-secret";
const HOST: &str = "localhost-3000-pod-demo.pinacle.test";

fn unix_now() -> i64 {
    pinacle_ingress::cli::unix_now()
}

/// Scripted answers by path: `/upgrade` switches protocols; anything else is `200 ok`.
fn script(head: &[u8]) -> Reply {
    let line = String::from_utf8_lossy(head.split(|b| *b == b'\r').next().unwrap_or_default())
        .into_owned();
    let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
    let raw = |text: &str| Reply::Bytes(text.as_bytes().to_vec());
    match path.as_str() {
        "/upgrade" => Reply::Upgrade,
        "/half-close" => Reply::UpgradeThenLast(b"the pod's last words".to_vec()),
        "/switch" => Reply::Close(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: x\r\n\r\nraw"
                .to_vec(),
        ),
        "/cl-plus" => raw("HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello"),
        "/cl-twice" => raw("HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello"),
        "/cl-conflict" => {
            raw("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!")
        }
        "/te-cl" => raw(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        "/bad-chunk" => Reply::Close(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
        ),
        "/hop" => raw(
            "HTTP/1.1 200 OK\r\nconnection: x-internal, keep-alive\r\nx-internal: secret\r\n\
             keep-alive: timeout=5\r\nx-app: kept\r\ncontent-length: 2\r\n\r\nok",
        ),
        "/poison" => raw(
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\npoison",
        ),
        "/204-body" => {
            raw("HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\npoison")
        }
        "/304-body" => raw(
            "HTTP/1.1 304 Not Modified\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\npoison",
        ),
        "/head-body" => raw("HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\npoison"),
        "/cookies" => raw(&format!(
            "HTTP/1.1 200 OK\r\n{POD_COOKIES}content-length: 2\r\n\r\nok"
        )),
        "/upgrade-cookies" => Reply::Close(
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
                 sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n{POD_COOKIES}\r\n"
            )
            .into_bytes(),
        ),
        // Anything else: the path, so that answers can be told apart.
        _ => upstream::ok(&path),
    }
}

/// Fields a pod sends: cookies for the whole base domain, the ingress's own cookie, ordinary
/// ones; a site-wide `Clear-Site-Data`; the ingress's marker.
const POD_COOKIES: &str = "set-cookie: a=1; Domain=pinacle.test; Path=/\r\n\
     set-cookie: b=2; path=/; DOMAIN=.pinacle.test; HttpOnly\r\n\
     set-cookie: pinacle-proxy-token=forged; Domain=pinacle.test\r\n\
     set-cookie: pinacle-proxy-token=; Max-Age=0\r\n\
     set-cookie: n=Jos\u{e9}; Secure\r\n\
     set-cookie: theme=dark\r\n\
     clear-site-data: \"cookies\"\r\n\
     x-pinacle-ingress: forged\r\n";

/// What the client gets of [`POD_COOKIES`] from a pod.
const CONFINED: [&str; 4] = [
    "a=1; Path=/",
    "b=2; path=/; HttpOnly",
    "n=Jos\u{e9}; Secure",
    "theme=dark",
];

struct World {
    ingress: Running,
    plain: SocketAddr,
    tls: SocketAddr,
    ca: Ca,
    pod: Recording,
    dashboard: Recording,
    _dir: std::path::PathBuf,
}

async fn world(tag: &str, extra: &str) -> World {
    let pod = upstream::recording(Arc::new(script)).await;
    let dashboard = upstream::recording(Arc::new(script)).await;
    let dir = std::env::temp_dir().join(format!("pinacle-hostile-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Ca::new();
    ca.leaf(&["*.pinacle.test", "pinacle.test"], &dir, "wildcard");
    let text = pinacle_authz::testing::owner_directory_toml(
        "ada",
        &[("p_demo", "demo", pod.upstream.addr.port())],
    );
    let directory = FileDirectory::from_toml(&text, "hostile test").unwrap();
    let plain: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let tls: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let d = dir.display();
    let text = format!(
        "listen = \"{plain}\"\ntls_listen = \"{tls}\"\ndashboard_upstream = \"{dash}\"\n\
         admin_listen = \"off\"\nthreads = 2\nbase_domains = [\"pinacle.test\"]\n\
         shutdown_grace_period = \"1s\"\nupstream_read_timeout = \"5s\"\n\
         tls_cert_file = \"{d}/wildcard.pem\"\ntls_key_file = \"{d}/wildcard.key\"\n\
         {plain_path}{extra}\n",
        plain_path = if extra.contains("plain_path") {
            String::new()
        } else {
            format!("plain_path = {}\n", plain_path_on())
        },
        dash = dashboard.upstream.addr,
    );
    let env: HashMap<&str, &str> = HashMap::from([
        ("NEXTAUTH_SECRET", SECRET),
        ("NEXTAUTH_URL", "http://pinacle.test"),
    ]);
    let config = config::from_toml(&text, "hostile test", &|k| {
        env.get(k).map(|v| (*v).to_owned())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let ingress = server::spawn(config, Arc::new(directory), unix_now).unwrap();
    wait_for_port(plain).await;
    wait_for_port(tls).await;
    World {
        ingress,
        plain,
        tls,
        ca,
        pod,
        dashboard,
        _dir: dir,
    }
}

/// Whether the ingresses here serve plain requests on the plain path: yes unless
/// `PINACLE_TEST_PLAIN_PATH=false` (scripts/test runs these tests both ways). The engine names
/// below say what carries a request when it is on.
fn plain_path_on() -> bool {
    std::env::var("PINACLE_TEST_PLAIN_PATH").as_deref() != Ok("false")
}

fn material() -> Material {
    let now = unix_now();
    let verifier =
        CredentialVerifier::new(&CredentialConfig::with_secrets(vec![Secret::new(SECRET)]))
            .unwrap();
    let proxy_token = verifier
        .mint_proxy_token(&ProxyTokenClaims {
            user_id: "ada".into(),
            pod_id: "p_demo".into(),
            pod_slug: "demo".into(),
            target_port: 3000,
            iat: now,
            exp: now + 900,
        })
        .unwrap();
    Material {
        name: "next-auth.session-token".to_owned(),
        dashboard: pinacle_authz::testing::session_cookie_value(SECRET, "ada", now, 3600),
        foreign: pinacle_authz::testing::session_cookie_value("pod-app-secret", "u", now, 3600),
        proxy_token,
    }
}

/// How a request is sent, and so which engine carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    /// A bodiless HTTP/1.1 GET: the plain path.
    Plain,
    /// A POST with a body: Pingora's HTTP/1 loop.
    PingoraPost,
    /// An HTTP/1.0 GET: Pingora's HTTP/1 loop.
    PingoraHttp10,
    /// A WebSocket upgrade: the tunnel.
    Tunnel,
    /// HTTP/2 over TLS: Pingora's HTTP/2 server.
    Http2,
}

const ENGINES: [Engine; 5] = [
    Engine::Plain,
    Engine::PingoraPost,
    Engine::PingoraHttp10,
    Engine::Tunnel,
    Engine::Http2,
];

/// Reads one response head (and a `content-length` body) from a raw stream; its status and head.
async fn read_response(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> (u16, String) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("a response within 5 s")
            .unwrap();
        assert!(
            n > 0,
            "closed before a response head: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&got[..end]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head)
}

/// Sends one request with these `Cookie` fields (raw bytes) and extra fields on `engine`;
/// returns the status.
async fn send(w: &World, engine: Engine, cookies: &[Vec<u8>], extra: &[(&str, &str)]) -> u16 {
    send_to(w, HOST, engine, cookies, extra).await
}

/// [`send`] to another host.
async fn send_to(
    w: &World,
    host: &str,
    engine: Engine,
    cookies: &[Vec<u8>],
    extra: &[(&str, &str)],
) -> u16 {
    if engine == Engine::Http2 {
        return send_h2(w, host, cookies, extra).await;
    }
    let (line, framing): (&str, &str) = match engine {
        Engine::Plain => ("GET /plain HTTP/1.1", ""),
        Engine::PingoraPost => ("POST /post HTTP/1.1", "content-length: 5\r\n"),
        Engine::PingoraHttp10 => ("GET /old HTTP/1.0", ""),
        Engine::Tunnel => (
            "GET /upgrade HTTP/1.1",
            "connection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n\
             sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        ),
        Engine::Http2 => unreachable!(),
    };
    let mut request = format!("{line}\r\nhost: {host}\r\naccept: */*\r\n{framing}").into_bytes();
    for (name, value) in extra {
        request.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    for cookie in cookies {
        request.extend_from_slice(b"cookie: ");
        request.extend_from_slice(cookie);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n");
    if engine == Engine::PingoraPost {
        request.extend_from_slice(b"hello");
    }
    let mut stream = TcpStream::connect(w.plain).await.unwrap();
    stream.write_all(&request).await.unwrap();
    read_response(&mut stream).await.0
}

async fn send_h2(w: &World, host: &str, cookies: &[Vec<u8>], extra: &[(&str, &str)]) -> u16 {
    let stream = tls::connect(&w.ca.connector(&[b"h2"]), w.tls, host).await;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("https://{host}/h2"));
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    for cookie in cookies {
        request = request.header("cookie", http::HeaderValue::from_bytes(cookie).unwrap());
    }
    let request = request
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    status
}

/// The last request head the pod received.
fn last_head(w: &World) -> Vec<u8> {
    w.pod.heads().pop().expect("the pod received a request")
}

/// The values of every `name` field of a raw head, joined by `"; "`.
fn fields(head: &[u8], name: &str) -> Vec<Vec<u8>> {
    head.split(|b| *b == b'\n')
        .filter_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let colon = line.iter().position(|b| *b == b':')?;
            let (n, v) = line.split_at(colon);
            n.eq_ignore_ascii_case(name.as_bytes())
                .then(|| v[1..].trim_ascii().to_vec())
        })
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn plain_requests_now(w: &World) -> f64 {
    let text = w.ingress.metrics().unwrap().render();
    text.lines()
        .find_map(|l| l.strip_prefix("pinacle_ingress_plain_requests_total "))
        .map_or(0.0, |v| v.parse().unwrap())
}

/// The plain path counts a request when it has finished with it, which can be just after the
/// client has read the last byte of the answer; so the count is read until it reaches `expected`
/// (at most a second), then read once more after a settle, so that an overcount also shows.
async fn plain_requests(w: &World, expected: f64) -> f64 {
    for _ in 0..100 {
        if plain_requests_now(w) >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    plain_requests_now(w)
}

fn expected_ok(engine: Engine) -> u16 {
    if engine == Engine::Tunnel { 101 } else { 200 }
}

#[tokio::test]
async fn no_dashboard_credential_reaches_a_pod_on_any_engine_whatever_the_cookie_header_holds() {
    let w = world("cookies", "").await;
    let m = material();
    let mut runner = TestRunner::deterministic();
    let strategy = hostile_cookies::case();
    let mut checked = 0;
    for round in 0..40 {
        let case: Case = strategy.new_tree(&mut runner).unwrap().current();
        let cookies: Vec<Vec<u8>> = case
            .fields(&m)
            .into_iter()
            .map(String::into_bytes)
            .collect();
        let engine = ENGINES[round % ENGINES.len()];
        for engine in [engine, ENGINES[(round + 2) % ENGINES.len()]] {
            w.pod.clear();
            let status = send(&w, engine, &cookies, &[]).await;
            if !case.authenticates() {
                // Not signed in (or only junk): never forwarded with a credential, if at all.
                if let Some(head) = w.pod.heads().pop() {
                    for secret in case.secrets(&m) {
                        assert!(!contains(&head, secret.as_bytes()), "{engine:?} {case:?}");
                    }
                }
                continue;
            }
            assert_eq!(status, expected_ok(engine), "{engine:?}: {case:?}");
            let head = last_head(&w);
            for secret in case.secrets(&m) {
                assert!(
                    !contains(&head, secret.as_bytes()),
                    "{engine:?} leaked {secret:.24}… for {case:?}:\n{}",
                    String::from_utf8_lossy(&head)
                );
            }
            let cookie = fields(&head, "cookie");
            assert!(cookie.len() <= 1, "{engine:?}: one Cookie field at most");
            let forwarded = cookie.into_iter().next().unwrap_or_default();
            let kept = case.kept(&m);
            let forwarded_kept: Vec<String> = pinacle_authz::cookies::segments(&forwarded)
                .map(|s| String::from_utf8(s.raw.to_vec()).unwrap())
                .filter(|s| kept.contains(s))
                .collect();
            assert_eq!(forwarded_kept, kept, "{engine:?}: {case:?}");
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} authenticated cases");
}

#[tokio::test]
async fn the_reported_shadowing_is_stripped_on_every_engine() {
    let w = world("shadow", "").await;
    let m = material();
    let (real, token) = (&m.dashboard, &m.proxy_token);
    let cases: Vec<Vec<Vec<u8>>> = vec![
        vec![format!(
            "pinacle-proxy-token={token}; next-auth.session-token=junk; next-auth.session-token={real}"
        )
        .into_bytes()],
        vec![format!("next-auth.session-token.9=junk; next-auth.session-token={real}").into_bytes()],
        // Several fields, a non-ASCII cookie in the first.
        vec![
            "name=Jos\u{e9}; next-auth.session-token=junk".as_bytes().to_vec(),
            format!("next-auth.session-token={real}").into_bytes(),
        ],
        vec![b"raw=\xff\xfe".to_vec(), format!("pinacle-proxy-token={token}").into_bytes()],
    ];
    for cookies in &cases {
        for engine in ENGINES {
            w.pod.clear();
            let status = send(&w, engine, cookies, &[]).await;
            assert_eq!(status, expected_ok(engine), "{engine:?} {cookies:?}");
            let head = last_head(&w);
            assert!(!contains(&head, real.as_bytes()), "{engine:?}");
            assert!(!contains(&head, token.as_bytes()), "{engine:?}");
        }
    }
    // The engines are the ones named: the plain path served every bodiless GET.
    let expected = if plain_path_on() {
        cases.len() as f64
    } else {
        0.0
    };
    assert_eq!(
        plain_requests(&w, expected).await,
        expected,
        "the plain path served each plain GET (when on)"
    );
    // Unrecognised bytes reach the pod untouched.
    for engine in ENGINES {
        w.pod.clear();
        let cookies = [
            b"raw=\xff\xfe; theme=dark".to_vec(),
            format!("pinacle-proxy-token={token}").into_bytes(),
        ];
        assert_eq!(send(&w, engine, &cookies, &[]).await, expected_ok(engine));
        assert_eq!(
            fields(&last_head(&w), "cookie"),
            vec![b"raw=\xff\xfe; theme=dark".to_vec()],
            "{engine:?}"
        );
    }
}

const SPOOFED: [(&str, &str); 9] = [
    ("forwarded", "for=203.0.113.9;proto=https"),
    ("x-real-ip", "203.0.113.9"),
    ("x-forwarded-port", "443"),
    ("x-forwarded-prefix", "/admin"),
    ("x-forwarded-server", "evil"),
    ("x-client-ip", "203.0.113.9"),
    ("x-original-url", "/admin"),
    ("x-pinacle-user", "admin"),
    ("X-Pinacle-Ingress", "forged"),
];

fn spoofed_in(head: &[u8]) -> Vec<&'static str> {
    SPOOFED
        .iter()
        .filter(|(name, _)| !fields(head, name).is_empty())
        .map(|(name, _)| *name)
        .collect()
}

#[tokio::test]
async fn identity_fields_from_clients_reach_neither_pods_nor_the_dashboard_on_any_engine() {
    let w = world("spoof", "").await;
    let token = format!("pinacle-proxy-token={}", material().proxy_token).into_bytes();
    for engine in ENGINES {
        w.pod.clear();
        let status = send(&w, engine, std::slice::from_ref(&token), &SPOOFED).await;
        assert_eq!(status, expected_ok(engine), "{engine:?}");
        let head = last_head(&w);
        assert_eq!(spoofed_in(&head), Vec::<&str>::new(), "{engine:?}");
        // The ingress's own X-Forwarded-* replace the client's.
        assert_eq!(fields(&head, "x-forwarded-proto").len(), 1, "{engine:?}");

        w.dashboard.clear();
        let status = send_to(&w, "pinacle.test", engine, &[], &SPOOFED).await;
        assert_eq!(status, expected_ok(engine), "{engine:?}");
        let head = w
            .dashboard
            .heads()
            .pop()
            .expect("the dashboard got the request");
        assert_eq!(
            spoofed_in(&head),
            Vec::<&str>::new(),
            "{engine:?} to the dashboard"
        );
    }
}

#[tokio::test]
async fn a_trusted_proxys_identity_fields_are_kept() {
    let w = world("trusted", "trusted_proxies = [\"127.0.0.1/32\"]").await;
    let token = format!("pinacle-proxy-token={}", material().proxy_token).into_bytes();
    for engine in ENGINES {
        w.pod.clear();
        let status = send(&w, engine, std::slice::from_ref(&token), &SPOOFED).await;
        assert_eq!(status, expected_ok(engine), "{engine:?}");
        assert_eq!(
            spoofed_in(&last_head(&w)).len(),
            SPOOFED.len(),
            "{engine:?}"
        );
    }
}

/// A whole response as a strict HTTP client (hyper) reads it.
struct Fetched {
    status: u16,
    headers: http::HeaderMap,
    body: Vec<u8>,
}

/// Fetches `path` from the pod on `engine` (not [`Engine::Tunnel`]) with the proxy token.
async fn fetch(w: &World, engine: Engine, path: &str) -> Result<Fetched, String> {
    let token = format!("pinacle-proxy-token={}", material().proxy_token);
    let (method, version, body): (&str, http::Version, &'static [u8]) = match engine {
        Engine::Plain => ("GET", http::Version::HTTP_11, b""),
        Engine::PingoraPost | Engine::Http2 => ("POST", http::Version::HTTP_11, b"hello"),
        Engine::PingoraHttp10 => ("GET", http::Version::HTTP_10, b""),
        Engine::Tunnel => unreachable!(),
    };
    let request = http::Request::builder()
        .method(method)
        .header("cookie", token)
        .header("accept", "*/*");
    let response = if engine == Engine::Http2 {
        let stream = tls::connect(&w.ca.connector(&[b"h2"]), w.tls, HOST).await;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let request = request
            .uri(format!("https://{HOST}{path}"))
            .body(Full::new(Bytes::from_static(body)))
            .unwrap();
        sender.send_request(request).await
    } else {
        let stream = TcpStream::connect(w.plain).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = request
            .uri(path)
            .version(version)
            .header("host", HOST)
            .body(Full::new(Bytes::from_static(body)))
            .unwrap();
        sender.send_request(request).await
    };
    let response = response.map_err(|e| format!("{e}"))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        response.into_body().collect(),
    )
    .await
    .map_err(|_| "body timed out".to_owned())?
    .map_err(|e| format!("body: {e}"))?
    .to_bytes()
    .to_vec();
    Ok(Fetched {
        status,
        headers,
        body,
    })
}

const HTTP_ENGINES: [Engine; 4] = [
    Engine::Plain,
    Engine::PingoraPost,
    Engine::PingoraHttp10,
    Engine::Http2,
];

#[tokio::test]
async fn a_101_to_a_request_that_asked_for_no_upgrade_is_502_on_every_engine() {
    let w = world("switch", "").await;
    for engine in HTTP_ENGINES {
        let r = fetch(&w, engine, "/switch").await.unwrap();
        assert_eq!(r.status, 502, "{engine:?}");
        assert_eq!(
            r.headers["x-pinacle-ingress"], "upstream-refused",
            "{engine:?}"
        );
    }
}

#[tokio::test]
async fn response_framing_gets_one_treatment_on_every_engine() {
    let w = world("framing", "").await;
    for engine in HTTP_ENGINES {
        // A malformed or conflicting length: nothing of it reaches the client.
        for path in ["/cl-plus", "/cl-conflict"] {
            let r = fetch(&w, engine, path).await;
            assert_eq!(r.map(|r| r.status), Ok(502), "{engine:?} {path}");
        }
        // The same length twice is that length.
        let r = fetch(&w, engine, "/cl-twice").await.unwrap();
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &b"hello"[..]),
            "{engine:?}"
        );
        assert!(
            r.headers.get_all("content-length").iter().count() <= 1,
            "{engine:?}"
        );
        // Transfer-Encoding wins over Content-Length, which is not passed on.
        let r = fetch(&w, engine, "/te-cl").await.unwrap();
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &b"hello"[..]),
            "{engine:?}"
        );
        assert!(
            !(r.headers.contains_key("transfer-encoding")
                && r.headers.contains_key("content-length")),
            "{engine:?}"
        );
        // A malformed chunked body: 502 on the plain path, which has sent nothing yet; Pingora
        // sends the head first, so there the response breaks off. Never a complete body.
        let r = fetch(&w, engine, "/bad-chunk").await;
        match engine {
            Engine::Plain if plain_path_on() => assert_eq!(r.map(|r| r.status), Ok(502)),
            _ => assert!(r.is_err(), "{engine:?}"),
        }
        // Hop-by-hop fields of the upstream's are not forwarded.
        let r = fetch(&w, engine, "/hop").await.unwrap();
        assert_eq!(r.status, 200, "{engine:?}");
        assert_eq!(
            r.headers.get("x-app").map(|v| v.as_bytes()),
            Some(&b"kept"[..])
        );
        for hop in ["x-internal", "keep-alive"] {
            assert!(r.headers.get(hop).is_none(), "{engine:?} forwarded {hop}");
        }
    }
}

/// A pod is untrusted code under the dashboard's domain: its cookies stay on its own host (no
/// `Domain` attribute reaches the browser), it cannot set or clear the ingress's proxy token or
/// clear the site's data, nor pass for the ingress (its marker); the dashboard's own cookies and
/// `Clear-Site-Data` pass as they are. On every engine.
#[tokio::test]
async fn a_pods_answer_stays_on_its_host_on_every_engine() {
    let w = world("set-cookie", "").await;
    let confined: Vec<&[u8]> = CONFINED.iter().map(|c| c.as_bytes()).collect();
    for engine in HTTP_ENGINES {
        let r = fetch(&w, engine, "/cookies").await.unwrap();
        assert_eq!(r.status, 200, "{engine:?}");
        let got: Vec<&[u8]> = r
            .headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        assert_eq!(got, confined, "{engine:?}");
        for field in ["clear-site-data", "x-pinacle-ingress"] {
            assert!(r.headers.get(field).is_none(), "{engine:?}: {field}");
        }
    }
    // A WebSocket handshake's 101 (the tunnel).
    let token = format!("pinacle-proxy-token={}", material().proxy_token);
    let (status, head) = raw_exchange(
        &w,
        format!(
            "GET /upgrade-cookies HTTP/1.1\r\nhost: {HOST}\r\nconnection: Upgrade\r\n\
             upgrade: websocket\r\nsec-websocket-version: 13\r\n\
             sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\ncookie: {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(status, 101, "{head}");
    assert_eq!(
        fields(head.as_bytes(), "set-cookie"),
        confined.iter().map(|c| c.to_vec()).collect::<Vec<_>>(),
        "{head}"
    );
    for field in ["clear-site-data", "x-pinacle-ingress"] {
        assert!(fields(head.as_bytes(), field).is_empty(), "{head}");
    }
    // The dashboard is trusted with its own domain.
    let (status, head) = raw_exchange(
        &w,
        b"GET /cookies HTTP/1.1\r\nhost: pinacle.test\r\naccept: */*\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(fields(head.as_bytes(), "set-cookie").len(), 6, "{head}");
    assert!(head.contains("a=1; Domain=pinacle.test; Path=/"), "{head}");
    assert_eq!(
        fields(head.as_bytes(), "clear-site-data"),
        vec![b"\"cookies\"".to_vec()]
    );
    assert!(
        fields(head.as_bytes(), "x-pinacle-ingress").is_empty(),
        "{head}"
    );
}

/// Sends raw bytes on a fresh connection; the status and head of the answer.
async fn raw_exchange(w: &World, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(w.plain).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_response(&mut stream).await
}

#[tokio::test]
async fn requests_with_odd_framing_or_targets_are_normalised_or_refused() {
    let w = world("requests", "").await;
    let token = format!("pinacle-proxy-token={}", material().proxy_token);

    // Upgrade without Connection: upgrade is a plain request with Upgrade removed.
    w.pod.clear();
    let (status, _) = raw_exchange(
        &w,
        format!(
            "GET /plain HTTP/1.1\r\nhost: {HOST}\r\nupgrade: websocket\r\ncookie: {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(status, 200);
    assert!(fields(&last_head(&w), "upgrade").is_empty());

    // Content-Length: 3, 3 is forwarded as one Content-Length: 3 (or refused).
    w.pod.clear();
    let (status, _) = raw_exchange(
        &w,
        format!("POST /post HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: 3, 3\r\ncookie: {token}\r\n\r\nabc")
            .as_bytes(),
    )
    .await;
    if status == 200 {
        assert_eq!(
            fields(&last_head(&w), "content-length"),
            vec![b"3".to_vec()]
        );
    } else {
        assert_eq!(status, 400);
    }

    // HTTP/1.1 without Host: 400, on the plain path's shape and Pingora's.
    for request in [
        "GET /plain HTTP/1.1\r\naccept: */*\r\n\r\n",
        "POST /post HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi",
    ] {
        let (status, head) = raw_exchange(&w, request.as_bytes()).await;
        assert_eq!(status, 400, "{request:?}: {head}");
    }

    // An absolute-form target's authority routes the request; a Host that names another
    // site is refused, never routed by.
    for method in ["GET", "POST"] {
        w.pod.clear();
        let request = |host: &str| {
            format!(
                "{method} http://{HOST}/abs HTTP/1.1\r\nhost: {host}\r\ncontent-length: 0\r\ncookie: {token}\r\n\r\n"
            )
        };
        let (status, head) = raw_exchange(&w, request(HOST).as_bytes()).await;
        assert_eq!(status, 200, "{method}: {head}");
        let heads = w.pod.heads();
        assert_eq!(heads.len(), 1, "{method}: the pod got it");
        assert!(heads[0].starts_with(format!("{method} /abs HTTP/1.1").as_bytes()));
        w.dashboard.clear();
        let (status, head) = raw_exchange(&w, request("pinacle.test").as_bytes()).await;
        assert_eq!(status, 400, "{method}: {head}");
        assert!(w.dashboard.heads().is_empty());
    }
}

/// Reads exactly one response from a kept connection: its status and body (by
/// `content-length`; none for `HEAD`, 1xx, 204 and 304).
async fn read_one(stream: &mut TcpStream, head_request: bool) -> Result<(u16, Vec<u8>), String> {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut byte))
            .await
            .map_err(|_| "no response within 5 s".to_owned())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("closed: {:?}", String::from_utf8_lossy(&got)));
        }
        got.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.trim().parse().unwrap());
    let bodiless = head_request || matches!(status, 100..=199 | 204 | 304);
    let mut body = vec![0u8; if bodiless { 0 } else { length }];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, body))
}

fn authenticated(line: &str, extra: &str) -> Vec<u8> {
    let token = material().proxy_token;
    format!("{line}\r\nhost: {HOST}\r\ncookie: pinacle-proxy-token={token}\r\n{extra}\r\n")
        .into_bytes()
}

#[tokio::test]
async fn smuggling_shapes_never_reach_a_pod_as_a_second_request() {
    let w = world("smuggle", "").await;
    let inner = format!("GET /smuggled HTTP/1.1\r\nhost: {HOST}\r\n\r\n");
    let chunked_body = format!("0\r\n\r\n{inner}");
    for framing in [
        // CL.TE and TE.CL.
        format!(
            "content-length: {}\r\ntransfer-encoding: chunked\r\n",
            chunked_body.len()
        ),
        format!(
            "transfer-encoding: chunked\r\ncontent-length: {}\r\n",
            chunked_body.len()
        ),
        format!(
            "transfer-encoding: chunked, identity\r\ncontent-length: {}\r\n",
            chunked_body.len()
        ),
    ] {
        w.pod.clear();
        let mut request = authenticated("POST /outer HTTP/1.1", &framing);
        request.extend_from_slice(chunked_body.as_bytes());
        let mut stream = TcpStream::connect(w.plain).await.unwrap();
        stream.write_all(&request).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            stream.read_to_end(&mut answer),
        )
        .await;
        let heads = w.pod.heads();
        assert!(
            !heads.iter().any(|h| contains(h, b"/smuggled")),
            "{framing:?}: the pod got a smuggled request"
        );
        // The outer request either was refused or reached the pod with one framing only.
        for head in &heads {
            let framed =
                fields(head, "content-length").len() + fields(head, "transfer-encoding").len();
            assert!(
                framed <= 1,
                "{framing:?}: {}",
                String::from_utf8_lossy(head)
            );
        }
    }
}

#[tokio::test]
async fn malformed_heads_are_refused_before_any_pod_sees_them() {
    let w = world("malformed", "").await;
    let many: String = (0..300).map(|i| format!("x-f{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "obs-fold",
            authenticated("GET /plain HTTP/1.1", "x-a: a\r\n b\r\n"),
        ),
        ("NUL", authenticated("GET /plain HTTP/1.1", "x-a: a\0b\r\n")),
        (
            "bare CR",
            authenticated("GET /plain HTTP/1.1", "x-a: a\rb\r\n"),
        ),
        (
            "duplicate Host",
            authenticated("GET /plain HTTP/1.1", "host: pinacle.test\r\n"),
        ),
        (
            "userinfo in Host",
            format!("GET /plain HTTP/1.1\r\nhost: user@{HOST}\r\n\r\n").into_bytes(),
        ),
        ("300 fields", authenticated("GET /plain HTTP/1.1", &many)),
    ];
    for (what, request) in cases {
        w.pod.clear();
        w.dashboard.clear();
        let (status, head) = raw_exchange(&w, &request).await;
        assert!(matches!(status, 400 | 431), "{what}: {head}");
        assert!(w.pod.heads().is_empty(), "{what} reached the pod");
        assert!(
            w.dashboard.heads().is_empty(),
            "{what} reached the dashboard"
        );
    }
}

#[tokio::test]
async fn answers_stay_with_their_requests_on_kept_connections() {
    let w = world("desync", "").await;
    // Pipelined: two requests in one write. The first is answered; the second is answered in
    // order or the connection closes after the first (clients then retry), never a wrong answer.
    let mut stream = TcpStream::connect(w.plain).await.unwrap();
    let mut both = authenticated("GET /p1 HTTP/1.1", "");
    both.extend(authenticated("GET /p2 HTTP/1.1", ""));
    stream.write_all(&both).await.unwrap();
    assert_eq!(
        read_one(&mut stream, false).await,
        Ok((200, b"/p1".to_vec()))
    );
    match read_one(&mut stream, false).await {
        Ok(second) => assert_eq!(second, (200, b"/p2".to_vec())),
        Err(e) => assert!(e.starts_with("closed"), "{e}"),
    }

    // Bytes an upstream sends beyond its answer (after a body, a 204, a 304 or a HEAD) are
    // never taken for the next answer, on the plain path (GET/HEAD) and Pingora's (POST).
    for (line, head_request, status) in [
        ("GET /poison HTTP/1.1", false, 200),
        ("POST /poison HTTP/1.1", false, 200),
        ("GET /204-body HTTP/1.1", false, 204),
        ("POST /204-body HTTP/1.1", false, 204),
        ("GET /304-body HTTP/1.1", false, 304),
        ("HEAD /head-body HTTP/1.1", true, 200),
    ] {
        let mut stream = TcpStream::connect(w.plain).await.unwrap();
        let framing = if line.starts_with("POST") {
            "content-length: 0\r\n"
        } else {
            ""
        };
        stream
            .write_all(&authenticated(line, framing))
            .await
            .unwrap();
        let (got, body) = read_one(&mut stream, head_request)
            .await
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(got, status, "{line}");
        assert!(!contains(&body, b"poison"), "{line}");
        for next in ["GET /after HTTP/1.1", "POST /after HTTP/1.1"] {
            let framing = if next.starts_with("POST") {
                "content-length: 0\r\n"
            } else {
                ""
            };
            stream
                .write_all(&authenticated(next, framing))
                .await
                .unwrap();
            assert_eq!(
                read_one(&mut stream, false).await,
                Ok((200, b"/after".to_vec())),
                "{line} then {next}"
            );
        }
    }
}

/// A client that stops sending (half-closes its side of a WebSocket tunnel) still gets what the
/// pod sends afterwards, until the pod closes too.
#[tokio::test]
async fn a_tunnel_relays_the_pods_data_after_the_client_half_closes() {
    let w = world("half-close", "").await;
    let token = material().proxy_token;
    let mut stream = TcpStream::connect(w.plain).await.unwrap();
    let request = format!(
        "GET /half-close HTTP/1.1\r\nhost: {HOST}\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         cookie: pinacle-proxy-token={token}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let (status, _) = read_response(&mut stream).await;
    assert_eq!(status, 101);
    stream.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut rest),
    )
    .await
    .expect("the tunnel ends once the pod closes")
    .unwrap();
    assert_eq!(rest, b"the pod's last words");
}

/// One request, raw, on a fresh connection: the status, the response's fields that are not
/// per hop or per request (sorted, names lowercased), and the body (chunked bodies de-chunked
/// by their end marker).
async fn plain_exchange(
    addr: SocketAddr,
    request: &[u8],
    head_request: bool,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("a response head within 5 s")
            .unwrap();
        assert_eq!(n, 1, "closed mid-head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let request_id = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(n, _)| n.eq_ignore_ascii_case("x-request-id"))
        })
        .map(|(_, v)| v.trim().to_owned());
    let mut fields: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .filter(|(n, _)| {
            !matches!(
                n.as_str(),
                "date" | "x-request-id" | "connection" | "server"
            )
        })
        .collect();
    fields.sort();
    let field = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let bodiless = head_request || matches!(status, 100..=199 | 204 | 304);
    let mut body = Vec::new();
    if bodiless {
    } else if field("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut raw = Vec::new();
        while !raw.ends_with(b"0\r\n\r\n") {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut byte))
                .await
                .expect("the chunked body within 5 s")
                .unwrap();
            assert_eq!(n, 1, "closed mid-body");
            raw.push(byte[0]);
        }
        body = raw;
    } else {
        let length: usize = field("content-length").map_or(0, |v| v.parse().unwrap());
        body = vec![0u8; length];
        stream.read_exact(&mut body).await.unwrap();
    }
    // Our own pages and JSON name the request id, which each ingress makes for itself.
    if let Some(id) = request_id.filter(|id| !id.is_empty()) {
        body = String::from_utf8_lossy(&body)
            .replace(&id, "<request id>")
            .into_bytes();
    }
    (status, fields, body)
}

/// The differential suite: the same requests through an ingress with the plain path and one
/// without (everything on Pingora's loop); what the pod receives and what the client gets must
/// agree wherever the README promises they do.
#[tokio::test]
async fn both_engines_give_pods_and_clients_the_same_thing() {
    let with = world("diff-plain", "plain_path = true").await;
    let without = world("diff-pingora", "plain_path = false").await;
    let token = material().proxy_token;
    let requests: Vec<(String, bool)> = [
        ("GET /", ""),
        ("GET /a/b?c=1&d=%2F", "X-Custom: one\r\nx-custom: two\r\nAccept: text/html\r\n"),
        ("GET /cl-twice", ""),
        ("GET /te-cl", ""),
        ("GET /hop", "Accept-Encoding: gzip\r\n"),
        ("GET /204-body", ""),
        ("HEAD /head-body", ""),
        ("GET /", "Cookie: theme=dark; name=Jos\u{e9}\r\n"),
        ("GET /", "X-Forwarded-For: 203.0.113.9\r\nForwarded: for=x\r\nX-Pinacle-User: a\r\n"),
    ]
    .iter()
    .map(|(line, extra)| {
        (
            format!(
                "{line} HTTP/1.1\r\nHost: {HOST}\r\ncookie: pinacle-proxy-token={token}\r\n{extra}\r\n"
            ),
            line.starts_with("HEAD"),
        )
    })
    .collect();
    let normalise = |heads: Vec<Vec<u8>>| -> Vec<(String, Vec<(String, String)>)> {
        heads
            .iter()
            .map(|h| {
                let text = String::from_utf8_lossy(h).into_owned();
                let mut lines = text.lines();
                let line = lines.next().unwrap_or_default().to_owned();
                let mut fields: Vec<(String, String)> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_owned()))
                    .filter(|(n, _)| n != "x-request-id")
                    .collect();
                fields.sort_by(|a, b| a.0.cmp(&b.0));
                (line, fields)
            })
            .collect()
    };
    for (request, head) in &requests {
        with.pod.clear();
        without.pod.clear();
        let a = plain_exchange(with.plain, request.as_bytes(), *head).await;
        let b = plain_exchange(without.plain, request.as_bytes(), *head).await;
        assert_eq!(a, b, "the clients got different answers to {request:?}");
        // What the pods got, but for the request id each ingress made. Pingora's header map
        // groups fields by name, so the order of different names is not kept (RFC 9110 §5.3:
        // it carries no meaning); the values of one name stay in order. Field names the
        // ingress sets are in its own case on the plain path and in the client's on Pingora's.
        let (pod_a, pod_b) = (normalise(with.pod.heads()), normalise(without.pod.heads()));
        assert_eq!(pod_a.len(), 1, "{request:?}");
        // The same request line and fields with the same values.
        assert_eq!(
            pod_a, pod_b,
            "the pods got different requests for {request:?}"
        );
    }
    // The ingress's own answers, and the dashboard's route, without a credential: the same
    // answers (our pages and JSON, the sign-in redirect, the callback's refusal) and the same
    // request at the dashboard.
    let answered = [
        "GET /app?x=1 HTTP/1.1\r\nHost: pinacle.test\r\nCookie: theme=1\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n".to_owned(),
        format!("GET /page HTTP/1.1\r\nHost: {HOST}\r\nSec-Fetch-Mode: navigate\r\nSec-Fetch-Dest: document\r\n\r\n"),
        format!("GET /api HTTP/1.1\r\nHost: {HOST}\r\nAccept: application/json\r\n\r\n"),
        format!("HEAD /api HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
        format!("GET /pinacle-proxy-callback?token=forged&return_url=%2F HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
        "GET / HTTP/1.1\r\nHost: localhost-99999-pod-demo.pinacle.test\r\n\r\n".to_owned(),
        "GET / HTTP/1.1\r\nHost: localhost-3000-pod-.pinacle.test\r\n\r\n".to_owned(),
    ];
    for request in &answered {
        with.dashboard.clear();
        without.dashboard.clear();
        with.pod.clear();
        let head = request.starts_with("HEAD");
        let a = plain_exchange(with.plain, request.as_bytes(), head).await;
        let b = plain_exchange(without.plain, request.as_bytes(), head).await;
        assert_eq!(a, b, "the clients got different answers to {request:?}");
        assert!(with.pod.heads().is_empty(), "{request:?} reached the pod");
        let (dash_a, dash_b) = (
            normalise(with.dashboard.heads()),
            normalise(without.dashboard.heads()),
        );
        let to_dashboard = usize::from(request.contains("Host: pinacle.test"));
        assert_eq!(dash_a.len(), to_dashboard, "{request:?}");
        assert_eq!(
            dash_a, dash_b,
            "the dashboard got different requests for {request:?}"
        );
    }
    // The requests really took both engines.
    let all = (requests.len() + answered.len()) as f64;
    assert_eq!(plain_requests(&with, all).await, all);
    assert_eq!(plain_requests(&without, 0.0).await, 0.0);
}
