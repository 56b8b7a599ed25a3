//! A real nginx, started from a rendered config on a reserved port, in front of real upstreams:
//! routing by Host (both forms), forwarded headers, WebSocket echo, incremental SSE, the
//! disallowed-port page (JSON and HTML) and the health location.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use pinacle_testkit::client::{self, Connection};
use pinacle_testkit::nginx::Nginx;
use pinacle_testkit::{reserve_port, upstream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

struct World {
    nginx: Nginx,
    a: upstream::Upstream,
    b: upstream::Upstream,
    ws: upstream::Upstream,
    sse: upstream::Upstream,
}

async fn world() -> World {
    let (a, b, ws, sse) = (
        upstream::http_echo("a").await,
        upstream::http_echo("b").await,
        upstream::websocket_echo().await,
        upstream::sse().await,
    );
    let listen = reserve_port();
    let dir = Nginx::make_dir("templates");
    let d = dir.display();
    let input = format!(
        r#"{{"listen_port": {listen}, "default_port": {a},
            "allowed_ports": [{a}, {b}, {ws}, {sse}],
            "trusted_proxies": ["127.0.0.1"],
            "runtime": {{"pid_path": "{d}/nginx.pid", "error_log": "{d}/error.log",
                         "access_log": "{d}/access.log", "temp_dir": "{d}/temp"}}}}"#,
        a = a.addr.port(),
        b = b.addr.port(),
        ws = ws.addr.port(),
        sse = sse.addr.port(),
    );
    let config = nginx_templates::render_text(&input).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    let nginx = Nginx::start(dir, &config, addr).await;
    World {
        nginx,
        a,
        b,
        ws,
        sse,
    }
}

fn host(port: u16) -> String {
    format!("localhost-{port}-pod-demo.pinacle.test")
}

#[tokio::test]
async fn routes_by_host_with_forwarded_headers_and_answers_the_rest() {
    let w = world().await;
    let (a, b) = (w.a.addr.port(), w.b.addr.port());

    let h = host(a);
    let r = client::get(
        w.nginx.addr,
        "/x?y=1",
        &[("host", &h), ("x-forwarded-for", "203.0.113.7")],
    )
    .await;
    assert_eq!(r.status, 200);
    let echo = r.json();
    assert_eq!(echo["name"], "a");
    assert_eq!(echo["path"], "/x?y=1");
    let headers = &echo["headers"];
    assert_eq!(headers["host"], format!("localhost:{a}"));
    assert_eq!(headers["x-forwarded-proto"], "https");
    assert_eq!(headers["x-forwarded-host"], h);
    // 127.0.0.1 is a trusted proxy: the client's address comes from X-Forwarded-For.
    assert_eq!(headers["x-real-ip"], "203.0.113.7");

    // Legacy form and upper case reach the other upstream.
    let legacy = format!("LOCALHOST-{b}.pod-demo.pinacle.test:443");
    let r = client::get(w.nginx.addr, "/", &[("host", &legacy)]).await;
    assert_eq!(r.json()["name"], "b");
    assert_eq!(r.json()["headers"]["host"], format!("localhost:{b}"));

    // No port in the Host: the default port.
    let r = client::get(w.nginx.addr, "/", &[("host", "pinacle.test")]).await;
    assert_eq!(r.json()["name"], "a");

    // A port the pod does not declare: 404 naming it, JSON or HTML.
    let r = client::get(
        w.nginx.addr,
        "/",
        &[("host", "localhost-1-pod-demo.pinacle.test")],
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["port"], 1);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    assert_eq!(r.header("x-pinacle-pod-router"), Some("port-not-exposed"));
    let r = client::get(
        w.nginx.addr,
        "/",
        &[
            ("host", "localhost-9-pod-demo.pinacle.test"),
            ("accept", "text/html,*/*"),
        ],
    )
    .await;
    assert_eq!(r.status, 404);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(r.text().contains("Port 9 is not exposed"));

    // Health on any Host, without touching a service.
    let before = w.a.connection_count();
    let r = client::get(w.nginx.addr, "/__pinacle/health", &[("host", &host(a))]).await;
    assert_eq!((r.status, r.json()["status"].as_str()), (200, Some("ok")));
    assert_eq!(w.a.connection_count(), before);
}

#[tokio::test]
async fn websocket_echo_passes_through_with_subprotocol() {
    let w = world().await;
    let mut request = format!("ws://{}/socket", w.nginx.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("host", host(w.ws.addr.port()).parse().unwrap());
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "vscode-remote, other".parse().unwrap(),
    );
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "vscode-remote"
    );
    assert_eq!(
        response.headers()["x-seen-host"],
        format!("localhost:{}", w.ws.addr.port())
    );
    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text(format!("hello {i}"))
        );
    }
    ws.send(Message::binary(vec![0u8, 1, 2])).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![0u8, 1, 2])
    );
}

#[tokio::test]
async fn server_sent_events_arrive_incrementally() {
    let w = world().await;
    let mut conn = Connection::open(w.nginx.addr).await;
    let h = host(w.sse.addr.port());
    let resp = conn
        .send(
            "GET",
            "/events",
            &[("host", &h), ("accept", "text/event-stream")],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // The first event arrives while the upstream is still holding the second back.
    let first = client::next_chunk(&mut body).await.unwrap();
    assert!(first.contains("data: first"), "{first:?}");
    w.sse.release.notify_one();
    let mut rest = String::new();
    while let Some(chunk) = client::next_chunk(&mut body).await {
        rest.push_str(&chunk);
    }
    assert!(rest.contains("data: second"), "{rest:?}");
}

#[tokio::test]
async fn nginx_marks_its_own_502_and_504_and_passes_the_apps_own() {
    let (silent, own_502) = (
        upstream::silent().await,
        upstream::recording(std::sync::Arc::new(|_: &[u8]| {
            upstream::Reply::Bytes(
                b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 7\r\n\r\nthe app".to_vec(),
            )
        }))
        .await,
    );
    let nothing = reserve_port();
    let listen = reserve_port();
    let dir = Nginx::make_dir("templates-failures");
    let d = dir.display();
    let input = format!(
        r#"{{"listen_port": {listen}, "default_port": {nothing}, "proxy_timeout": "1s",
            "runtime": {{"pid_path": "{d}/nginx.pid", "error_log": "{d}/error.log",
                         "access_log": "{d}/access.log", "temp_dir": "{d}/temp"}}}}"#
    );
    let config = nginx_templates::render_text(&input).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    let nginx = Nginx::start(dir, &config, addr).await;

    // Nothing listens: nginx's 502, marked, naming the port.
    let r = client::get(nginx.addr, "/", &[("host", &host(nothing))]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-pinacle-pod-router"), Some("not-listening"));
    assert_eq!(r.json()["port"], nothing);
    // Accepted but silent past proxy_timeout: nginx's 504, marked.
    let r = client::get(nginx.addr, "/", &[("host", &host(silent.addr.port()))]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.header("x-pinacle-pod-router"), Some("timeout"));
    // The app's own 502 passes as it is, unmarked.
    let r = client::get(
        nginx.addr,
        "/",
        &[("host", &host(own_502.upstream.addr.port()))],
    )
    .await;
    assert_eq!((r.status, r.text().as_str()), (502, "the app"));
    assert_eq!(r.header("x-pinacle-pod-router"), None);
}
