//! HTTPS end to end with a certificate authority made in the test: HTTP/1.1 and HTTP/2 over
//! TLS, certificates chosen by SNI, `wss://` WebSockets, the plain listener's redirect, a
//! `Secure` callback cookie, and a certificate reload that keeps open connections.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pinacle_authz::{CredentialConfig, CredentialVerifier, FileDirectory, Secret};
use pinacle_ingress::config;
use pinacle_ingress::server::{self, Running};
use pinacle_testkit::{client, reserve_port, upstream, wait_for_port};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "tls-test-secret";

use pinacle_testkit::tls::{Ca, connect as tls_connect};

fn session_cookie(user: &str) -> String {
    let now = pinacle_ingress::cli::unix_now();
    let value = pinacle_authz::testing::session_cookie_value(SECRET, user, now, 600);
    format!("__Secure-next-auth.session-token={value}")
}

struct World {
    ingress: Running,
    plain: SocketAddr,
    tls: SocketAddr,
    ca: Ca,
    dir: std::path::PathBuf,
    _pod: upstream::Upstream,
    _ws: upstream::Upstream,
    ws_port: u16,
    pod_port: u16,
}

async fn world(tag: &str) -> World {
    world_with(tag, "").await
}

/// [`world`] with `extra` configuration lines.
async fn world_with(tag: &str, extra: &str) -> World {
    let (pod, ws, dashboard) = (
        upstream::http_echo("pod").await,
        upstream::websocket_echo().await,
        upstream::http_echo("dashboard").await,
    );
    let dir = std::env::temp_dir().join(format!("pinacle-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Ca::new();
    ca.leaf(&["*.pinacle.test", "pinacle.test"], &dir, "wildcard");
    ca.leaf(&["other.example"], &dir, "other");

    let text = pinacle_authz::testing::owner_directory_toml(
        "ada",
        &[
            ("p_app", "app", pod.addr.port()),
            ("p_ws", "term", ws.addr.port()),
        ],
    );
    let directory = FileDirectory::from_toml(&text, "tls test").unwrap();
    let plain: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let tls: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let d = dir.display();
    let text = format!(
        "listen = \"{plain}\"\ntls_listen = \"{tls}\"\ndashboard_upstream = \"{dash}\"\n\
         admin_listen = \"off\"\nthreads = 2\nhttp_redirect_to_https = true\n\
         tls_cert_file = \"{d}/wildcard.pem\"\ntls_key_file = \"{d}/wildcard.key\"\n\
         {extra}\n\
         [[tls_certificates]]\ncert_file = \"{d}/other.pem\"\nkey_file = \"{d}/other.key\"\n",
        dash = dashboard.addr,
    );
    let env: HashMap<&str, &str> = HashMap::from([
        ("NEXTAUTH_SECRET", SECRET),
        ("NEXTAUTH_URL", "https://pinacle.test"),
    ]);
    let config = config::from_toml(&text, "tls test", &|k| env.get(k).map(|v| (*v).to_owned()))
        .unwrap_or_else(|e| panic!("{e}"));
    let running =
        server::spawn(config, Arc::new(directory), pinacle_ingress::cli::unix_now).unwrap();
    wait_for_port(plain).await;
    wait_for_port(tls).await;
    drop(dashboard);
    World {
        ingress: running,
        plain,
        tls,
        ca,
        dir,
        ws_port: ws.addr.port(),
        pod_port: pod.addr.port(),
        _pod: pod,
        _ws: ws,
    }
}

async fn h2_get(
    stream: TlsStream<TcpStream>,
    host: &str,
    path: &str,
    cookie: &str,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    u16,
    http::Version,
    String,
) {
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (status, version, body) = h2_request(&mut sender, host, path, cookie).await;
    (sender, status, version, body)
}

async fn h2_request(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    host: &str,
    path: &str,
    cookie: &str,
) -> (u16, http::Version, String) {
    let request = http::Request::builder()
        .uri(format!("https://{host}{path}"))
        .header("cookie", cookie)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let version = response.version();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, version, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn https_h1_h2_sni_wss_redirect_and_secure_callback_cookie() {
    let w = world("main").await;
    let host = format!("localhost-{}-pod-app.pinacle.test", w.pod_port);
    let cookie = session_cookie("ada");

    // HTTP/1.1 over TLS.
    let h1 = w.ca.connector(&[b"http/1.1"]);
    let stream = tls_connect(&h1, w.tls, &host).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = http::Request::builder()
        .uri("/hello")
        .header("host", &host)
        .header("cookie", &cookie)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");
    assert!(echo["headers"].get("cookie").is_none());

    // HTTP/2 (ALPN h2), two requests on one connection.
    let h2 = w.ca.connector(&[b"h2", b"http/1.1"]);
    let stream = tls_connect(&h2, w.tls, &host).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, status, version, body) = h2_get(stream, &host, "/h2?x=1", &cookie).await;
    assert_eq!((status, version), (200, http::Version::HTTP_2), "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["path"], "/h2?x=1");
    let (status, _, _) = h2_request(&mut sender, &host, "/again", &cookie).await;
    assert_eq!(status, 200);
    // Without credentials over h2: the same 401 as over HTTP/1.1.
    let (status, _, body) = h2_request(&mut sender, &host, "/", "").await;
    assert_eq!(status, 401, "{body}");

    // SNI: another name gets its own certificate (verification would fail otherwise).
    let stream = tls_connect(&h1, w.tls, "other.example").await;
    drop(stream);

    // wss:// through the TLS listener.
    let ws_host = format!("localhost-{}-pod-term.pinacle.test", w.ws_port);
    let stream = tls_connect(&h1, w.tls, &ws_host).await;
    let mut request = format!("wss://{ws_host}/socket")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("cookie", cookie.parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    ws.send(Message::text("over tls")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("over tls"));

    // The plain listener sends browsers to https, but answers health checks.
    let r = client::get(w.plain, "/a?b=1", &[("host", &host)]).await;
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location").unwrap(),
        format!("https://{host}:{}/a?b=1", w.tls.port())
    );
    let r = client::get(w.plain, "/healthz", &[("host", "lb")]).await;
    assert_eq!(r.status, 200);

    // The callback over https sets a Secure cookie.
    let verifier = CredentialVerifier::new(&CredentialConfig::with_secrets(vec![Secret::new(
        SECRET.to_owned(),
    )]))
    .unwrap();
    let now = pinacle_ingress::cli::unix_now();
    let token = verifier
        .mint_proxy_token(&pinacle_authz::ProxyTokenClaims {
            user_id: "ada".into(),
            pod_id: "p_app".into(),
            pod_slug: "app".into(),
            target_port: w.pod_port,
            iat: now,
            exp: now + 900,
        })
        .unwrap();
    let stream = tls_connect(&h2, w.tls, &host).await;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = http::Request::builder()
        .uri(format!(
            "https://{host}/pinacle-proxy-callback?token={token}"
        ))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 302);
    let set_cookie = response.headers()["set-cookie"].to_str().unwrap();
    assert!(
        set_cookie.contains("; Secure; SameSite=Lax"),
        "{set_cookie}"
    );
    std::fs::remove_dir_all(&w.dir).unwrap();
}

#[tokio::test]
async fn reloaded_certificates_serve_new_handshakes_and_keep_open_connections() {
    let w = world("reload").await;
    let host = format!("localhost-{}-pod-app.pinacle.test", w.pod_port);
    let cookie = session_cookie("ada");
    let h2 = w.ca.connector(&[b"h2"]);

    let stream = tls_connect(&h2, w.tls, &host).await;
    let before = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (mut open, status, _, _) = h2_get(stream, &host, "/", &cookie).await;
    assert_eq!(status, 200);

    // Re-issue the wildcard certificate (new key, new serial) and reload.
    let reissued =
        w.ca.leaf(&["*.pinacle.test", "pinacle.test"], &w.dir, "wildcard");
    w.ingress.reload_certificates().unwrap();

    // A fresh client: a resumed TLS session would report the certificate of its first handshake.
    let stream = tls_connect(&w.ca.connector(&[b"h2"]), w.tls, &host).await;
    let after = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_ne!(before, after);
    assert_eq!(after, reissued);
    // The connection made before the reload still works.
    let (status, _, _) = h2_request(&mut open, &host, "/still", &cookie).await;
    assert_eq!(status, 200);

    // A broken file keeps the current certificates.
    std::fs::write(w.dir.join("wildcard.pem"), "not a certificate").unwrap();
    assert!(w.ingress.reload_certificates().is_err());
    let stream = tls_connect(&w.ca.connector(&[b"h2"]), w.tls, &host).await;
    assert_eq!(stream.get_ref().1.peer_certificates().unwrap()[0], reissued);
    std::fs::remove_dir_all(&w.dir).unwrap();
}

#[tokio::test]
async fn slow_heads_over_tls_get_408_and_http2_connections_are_not_timed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let w = world_with("slow", "request_header_timeout = \"300ms\"").await;
    let host = format!("localhost-{}-pod-app.pinacle.test", w.pod_port);

    let mut stream = tls_connect(&w.ca.connector(&[b"http/1.1"]), w.tls, &host).await;
    stream
        .write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nCookie: ").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{answer}"
    );
    assert!(answer.contains("\r\nx-pinacle-ingress: request-header-timeout\r\n"));

    // HTTP/2 has its own flow control and framing: an idle h2 connection is not cut by the
    // head timeout.
    let stream = tls_connect(&w.ca.connector(&[b"h2"]), w.tls, &host).await;
    let cookie = session_cookie("ada");
    let (mut sender, status, ..) = h2_get(stream, &host, "/first", &cookie).await;
    assert_eq!(status, 200);
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let (status, ..) = h2_request(&mut sender, &host, "/second", &cookie).await;
    assert_eq!(status, 200);
    std::fs::remove_dir_all(&w.dir).unwrap();
}

#[tokio::test]
async fn sighup_makes_serve_reread_its_certificates() {
    let dir = std::env::temp_dir().join(format!("pinacle-tls-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Ca::new();
    let first = ca.leaf(&["*.pinacle.test"], &dir, "wildcard");
    let (plain, tls) = (reserve_port(), reserve_port());
    let d = dir.display();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pinacle-ingress"));
    for (var, _) in std::env::vars() {
        if var.starts_with("PINACLE_INGRESS_") || var == "DATABASE_URL" {
            cmd.env_remove(var);
        }
    }
    let mut child = cmd
        .args(["serve", "--demo"])
        .env("NEXTAUTH_SECRET", SECRET)
        .env("PINACLE_INGRESS_LISTEN", format!("127.0.0.1:{plain}"))
        .env("PINACLE_INGRESS_TLS_LISTEN", format!("127.0.0.1:{tls}"))
        .env("PINACLE_INGRESS_TLS_CERT_FILE", format!("{d}/wildcard.pem"))
        .env("PINACLE_INGRESS_TLS_KEY_FILE", format!("{d}/wildcard.key"))
        .env("PINACLE_INGRESS_ADMIN_LISTEN", "off")
        .env("PINACLE_INGRESS_UPGRADE_SOCK", format!("{d}/upgrade.sock"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let tls_addr: SocketAddr = format!("127.0.0.1:{tls}").parse().unwrap();
    wait_for_port(tls_addr).await;
    let served = |connector: TlsConnector| async move {
        let stream = tls_connect(&connector, tls_addr, "x.pinacle.test").await;
        stream.get_ref().1.peer_certificates().unwrap()[0].clone()
    };
    assert_eq!(served(ca.connector(&[b"h2"])).await, first);

    let second = ca.leaf(&["*.pinacle.test"], &dir, "wildcard");
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while served(ca.connector(&[b"h2"])).await != second {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).unwrap();
}
