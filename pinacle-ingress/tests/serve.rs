//! `pinacle-ingress serve` and `check-config` as real processes, configured the way an operator
//! does it (the dashboard's environment plus `PINACLE_INGRESS_*`), and every config shipped under
//! `config/` loaded by the code that reads it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pinacle_authz::{CredentialConfig, CredentialVerifier, FileDirectory, Secret};
use pinacle_testkit::{client, reserve_port, upstream, wait_for_port};

const BIN: &str = env!("CARGO_BIN_EXE_pinacle-ingress");
const SECRET: &str = "serve-test-secret";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(repo());
    for (var, _) in std::env::vars() {
        if var.starts_with("PINACLE_INGRESS_")
            || var.starts_with("NEXTAUTH_")
            || var.starts_with("AUTH_SECRET")
            || var == "DATABASE_URL"
        {
            cmd.env_remove(var);
        }
    }
    cmd.envs(env.iter().copied());
    cmd
}

#[test]
fn every_shipped_config_loads() {
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("config")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".service") {
            let unit = std::fs::read_to_string(&path).unwrap();
            // The agent's unit is checked against the agent's own CLI in pinacle-agent's tests.
            let binary = name.trim_end_matches(".service");
            assert!(
                unit.contains(&format!("ExecStart=/usr/local/bin/{binary} ")),
                "{name}"
            );
            if binary == "pinacle-ingress" {
                assert!(unit.contains("ExecStart=/usr/local/bin/pinacle-ingress serve --config"));
            }
            seen += 1;
            continue;
        }
        if !name.ends_with(".toml") {
            continue;
        }
        seen += 1;
        if name.starts_with("ingress") {
            let env = |k: &str| (k == "NEXTAUTH_SECRET").then(|| SECRET.to_owned());
            pinacle_ingress::config::load(Some(&path), &env)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        } else if name.starts_with("directory") {
            FileDirectory::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else if name.starts_with("pod-nginx") {
            let text = std::fs::read_to_string(&path).unwrap();
            nginx_templates::render_text(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            panic!("{name}: no test knows this kind of config; add it here");
        }
    }
    assert!(seen >= 3, "only {seen} configs found");
}

#[test]
fn check_config_accepts_the_example_and_lists_every_problem() {
    let out = command(
        &[
            "check-config",
            "--demo",
            "--config",
            "config/ingress.example.toml",
        ],
        &[("NEXTAUTH_SECRET", SECRET)],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration ok"));
    // The pod directory is checked too: a missing file, a URL that is not Postgres.
    for (var, value, key) in [
        (
            "PINACLE_INGRESS_DIRECTORY_FILE",
            "/nonexistent/directory.toml",
            "directory_file",
        ),
        (
            "DATABASE_URL",
            "mysql://db.internal/pinacle",
            "DATABASE_URL",
        ),
    ] {
        let out = command(
            &["check-config"],
            &[("NEXTAUTH_SECRET", SECRET), (var, value)],
        )
        .output()
        .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("- {key}: ")), "{text}");
    }
    // Without a database, a directory file or --demo there is nothing to serve: both commands
    // refuse, naming both ways to give one.
    let args = ["--config", "config/ingress.example.toml"];
    let check = command(
        &[&["check-config"][..], &args].concat(),
        &[("NEXTAUTH_SECRET", SECRET)],
    )
    .output()
    .unwrap();
    assert_eq!(check.status.code(), Some(1), "{check:?}");
    let serve = command(
        &[&["serve"][..], &args].concat(),
        &[("NEXTAUTH_SECRET", SECRET)],
    )
    .output()
    .unwrap();
    assert_eq!(serve.status.code(), Some(2), "{serve:?}");
    for text in [
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&serve.stderr),
    ] {
        assert!(
            text.contains("DATABASE_URL")
                && text.contains("directory_file")
                && text.contains("--demo"),
            "{text}"
        );
    }

    let dir = std::env::temp_dir().join(format!("pinacle-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "listen = \"nowhere\"\ntimeuot = \"1s\"\nupstream_read_timeout = \"soon\"\n\
         max_connections = \"many\"\nhttp_redirect_to_https = 1\n",
    )
    .unwrap();
    let out = command(
        &["check-config", "--config", bad.to_str().unwrap()],
        &[
            ("PINACLE_INGRESS_THREADS", "0"),
            ("PINACLE_INGRESS_LISTNE", "127.0.0.1:1"),
        ],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    for key in [
        "listen",
        "timeuot",
        "upstream_read_timeout",
        "max_connections",
        "http_redirect_to_https",
        "threads",
        "NEXTAUTH_SECRET",
        "PINACLE_INGRESS_LISTNE",
    ] {
        assert!(
            text.contains(&format!("- {key}: ")),
            "{key} not in:\n{text}"
        );
    }
    // `serve` refuses the same configuration before binding anything.
    let out = command(&["serve", "--config", bad.to_str().unwrap()], &[])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("timeuot: unknown key"));
    std::fs::remove_dir_all(&dir).unwrap();
}

struct Process(Option<Child>);

impl Process {
    /// The child, no longer killed on drop.
    fn into_child(mut self) -> Child {
        self.0.take().unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `pinacle-ingress <args>` with `env`, its stderr written to `log`; ended (by its PID)
/// when the returned handle is dropped.
fn start_logged(args: &[&str], env: &[(&str, &str)], log: &Path) -> Process {
    let child = command(args, env)
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .unwrap();
    Process(Some(child))
}

fn directory_file(dir: &Path, pod_port: u16) -> PathBuf {
    let path = dir.join("directory.toml");
    let text =
        pinacle_authz::testing::owner_directory_toml("user_ada", &[("pod_1", "proj", pod_port)]);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn serve_runs_from_the_dashboards_environment_and_exits_0_on_sigterm() {
    let (pod, dashboard) = (
        upstream::http_echo("pod").await,
        upstream::http_echo("dashboard").await,
    );
    let dir = std::env::temp_dir().join(format!("pinacle-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let directory = directory_file(&dir, pod.addr.port());
    let listen: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let (listen_s, dashboard_s, admin_s) = (
        listen.to_string(),
        dashboard.addr.to_string(),
        admin.to_string(),
    );
    let log_path = dir.join("stderr.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let child = command(
        &["serve"],
        &[
            ("NEXTAUTH_SECRET", SECRET),
            ("NEXTAUTH_URL", "https://pinacle.test"),
            ("PINACLE_INGRESS_LISTEN", &listen_s),
            ("PINACLE_INGRESS_DASHBOARD_UPSTREAM", &dashboard_s),
            (
                "PINACLE_INGRESS_DIRECTORY_FILE",
                directory.to_str().unwrap(),
            ),
            ("PINACLE_INGRESS_SHUTDOWN_GRACE_PERIOD", "1s"),
            ("PINACLE_INGRESS_THREADS", "1"),
            ("PINACLE_INGRESS_BASE_DOMAINS", "pinacle.test, pinacle.io"),
            ("PINACLE_INGRESS_UPSTREAM_DOMAIN", "pods.internal"),
            ("PINACLE_INGRESS_ADMIN_LISTEN", &admin_s),
            ("PINACLE_INGRESS_LOG_FORMAT", "json"),
            // The most verbose logs there are: still no secret may appear in them.
            ("RUST_LOG", "trace"),
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::from(log_file))
    .spawn()
    .unwrap();
    let process = Process(Some(child));
    wait_for_port(listen).await;
    wait_for_port(admin).await;
    let health = client::get(admin, "/healthz", &[]).await;
    assert_eq!(
        (health.status, health.json()["status"].as_str()),
        (200, Some("ok"))
    );
    let ready = client::get(admin, "/readyz", &[]).await;
    assert_eq!(
        (ready.status, ready.json()["status"].as_str()),
        (200, Some("ready"))
    );

    let host = "localhost-3000-pod-proj.pinacle.test";
    let r = client::get(listen, "/x", &[("host", host), ("accept", "text/html")]).await;
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location"),
        Some("https://pinacle.test/api/proxy-auth?pod=proj&port=3000&return_url=%2Fx")
    );

    // https dashboard: the session cookie has the __Secure- name.
    let verifier = CredentialVerifier::new(&CredentialConfig::with_secrets(vec![Secret::new(
        SECRET.to_owned(),
    )]))
    .unwrap();
    let now = pinacle_ingress::cli::unix_now();
    let value = pinacle_authz::testing::session_cookie_value(SECRET, "user_ada", now, 600);
    let cookie = format!("__Secure-next-auth.session-token={value}");
    let r = client::get(listen, "/x", &[("host", host), ("cookie", &cookie)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The configured upstream domain replaces the one the request came in on.
    assert_eq!(
        r.json()["headers"]["host"],
        "localhost-3000-pod-proj.pods.internal"
    );
    let r = client::get(
        listen,
        "/",
        &[
            ("host", "localhost-5173.pod-proj.pinacle.io"),
            ("cookie", &cookie),
        ],
    )
    .await;
    assert_eq!(
        r.json()["headers"]["host"],
        "localhost-5173-pod-proj.pods.internal"
    );
    // The plain name is not the dashboard's on https: it is the pod's own cookie.
    let plain = format!("next-auth.session-token={value}");
    let r = client::get(listen, "/x", &[("host", host), ("cookie", &plain)]).await;
    assert_eq!(r.status, 401);

    let r = client::get(listen, "/", &[("host", "pinacle.test")]).await;
    assert_eq!(r.json()["name"], "dashboard");

    // A proxy token through the callback, then used.
    let token = verifier
        .mint_proxy_token(&pinacle_authz::ProxyTokenClaims {
            user_id: "user_ada".into(),
            pod_id: "pod_1".into(),
            pod_slug: "proj".into(),
            target_port: 3000,
            iat: now,
            exp: now + 900,
        })
        .unwrap();
    let r = client::get(
        listen,
        &format!("/pinacle-proxy-callback?token={token}&return_url=%2Fdocs"),
        &[("host", host)],
    )
    .await;
    assert_eq!(r.status, 302);
    let r = client::get(
        listen,
        "/docs?page=1",
        &[
            ("host", host),
            ("cookie", &format!("pinacle-proxy-token={token}")),
        ],
    )
    .await;
    assert_eq!(r.status, 200);

    // The counters moved. A request is counted when it is logged, just after its response
    // was sent: scrape until they settle (bounded).
    let expected = [
        "pinacle_ingress_requests_total{port=\"3000\",route=\"pod\",status_class=\"2xx\"} 2",
        "pinacle_ingress_requests_total{port=\"3000\",route=\"pod\",status_class=\"4xx\"} 1",
        "pinacle_ingress_requests_total{port=\"3000\",route=\"pod\",status_class=\"3xx\"} 1",
        "pinacle_ingress_requests_total{port=\"5173\",route=\"pod\",status_class=\"2xx\"} 1",
        "pinacle_ingress_requests_total{port=\"3000\",route=\"callback\",status_class=\"3xx\"} 1",
        "pinacle_ingress_requests_total{port=\"\",route=\"dashboard\",status_class=\"2xx\"} 1",
        "pinacle_ingress_authz_cache_lookups_total{result=\"miss\"} 1",
        "pinacle_ingress_authz_cache_lookups_total{result=\"hit\"} 2",
        "pinacle_ingress_directory_query_duration_seconds_count{query=\"pods_by_slug\"} 1",
        "pinacle_ingress_upstream_response_seconds_count{route=\"pod\"} 3",
        "pinacle_ingress_websocket_tunnels_open 0",
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = client::get(admin, "/metrics", &[]).await;
        assert_eq!(metrics.status, 200);
        let text = metrics.text();
        let missing: Vec<&&str> = expected.iter().filter(|l| !text.contains(**l)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{missing:?} not in:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Build and process metrics are there too.
    let text = client::get(admin, "/metrics", &[]).await.text();
    for series in [
        "pinacle_ingress_build_info{commit=\"",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_start_time_seconds ",
    ] {
        assert!(text.contains(series), "{series} not in:\n{text}");
    }

    // SIGHUP (sent by the unit's reload) never ends the process, TLS or not.
    let mut child = process.into_child();
    Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    let r = client::get(listen, "/", &[("host", "pinacle.test")]).await;
    assert_eq!(r.json()["name"], "dashboard", "still serving after SIGHUP");
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP ended the process"
    );

    // SIGTERM with nothing in flight: the process exits 0 at once (draining with a request in
    // flight: `a_graceful_stop_drains_then_exits_at_once`).
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(15));
    assert_eq!(status.code(), Some(0));

    // One JSON access line per request, and nothing secret anywhere in the logs.
    let logs = std::fs::read_to_string(&log_path).unwrap();
    for secret in [SECRET, value.as_str(), token.as_str()] {
        assert!(!logs.contains(secret), "a secret reached the logs");
    }
    let access: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "pinacle_ingress::access")
        .collect();
    assert_eq!(access.len(), 8, "{logs}");
    let callback = access.iter().find(|v| v["route"] == "callback").unwrap();
    // Bodiless GETs take the plain path whatever their route: the pod's, the dashboard's and
    // the callback (judged by the same policy; the engine only carries the verdict out).
    for route in ["pod", "dashboard", "callback"] {
        assert!(
            access
                .iter()
                .any(|v| v["route"] == route && v["engine"] == "plain"),
            "{route}: {logs}"
        );
    }
    assert_eq!(
        callback["path"],
        "/pinacle-proxy-callback?token=REDACTED&return_url=%2Fdocs"
    );
    for field in [
        "request_id",
        "client",
        "host",
        "pod",
        "port",
        "user",
        "method",
        "status",
        "bytes_out",
        "duration_us",
        "upstream",
        "authz",
        "engine",
    ] {
        assert!(
            callback.get(field).is_some(),
            "{field} missing in {callback}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve did not exit within {limit:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Log lines about a failed request (Pingora's "Fail to proxy: ...", our "upstream failed")
/// name it with its query values redacted as in the access log, on the pod route and the
/// dashboard's; an upstream hanging up is a WARN, not an ERROR.
#[tokio::test]
async fn pingoras_error_lines_redact_query_credentials() {
    use std::sync::Arc;
    use upstream::Reply;

    // Both upstreams close every connection without answering.
    let hang_up = || upstream::recording(Arc::new(|_: &[u8]| Reply::Close(Vec::new())));
    let (pod, dashboard) = (hang_up().await, hang_up().await);
    let dir = std::env::temp_dir().join(format!("pinacle-redact-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let directory = directory_file(&dir, pod.upstream.addr.port());
    let listen: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let (listen_s, dashboard_s) = (listen.to_string(), dashboard.upstream.addr.to_string());
    let log_path = dir.join("stderr.log");
    let _process = start_logged(
        &["serve"],
        &[
            ("NEXTAUTH_SECRET", SECRET),
            ("NEXTAUTH_URL", "http://pinacle.test"),
            ("PINACLE_INGRESS_LISTEN", &listen_s),
            ("PINACLE_INGRESS_DASHBOARD_UPSTREAM", &dashboard_s),
            (
                "PINACLE_INGRESS_DIRECTORY_FILE",
                directory.to_str().unwrap(),
            ),
            ("PINACLE_INGRESS_ADMIN_LISTEN", "off"),
            ("PINACLE_INGRESS_THREADS", "1"),
            ("PINACLE_INGRESS_BASE_DOMAINS", "pinacle.test"),
            ("RUST_LOG", "info"),
        ],
        &log_path,
    );
    wait_for_port(listen).await;

    let now = pinacle_ingress::cli::unix_now();
    let value = pinacle_authz::testing::session_cookie_value(SECRET, "user_ada", now, 600);
    let cookie = format!("next-auth.session-token={value}");
    let secrets = [
        "tok3nValue9secret",
        "acc3ssValue7secret",
        "c0deValue5secret",
    ];
    let pod_host = "localhost-3000-pod-proj.pinacle.test";
    for (host, target) in [
        (
            pod_host,
            "/x?token=tok3nValue9secret&access_token=acc3ssValue7secret&page=2",
        ),
        (
            "pinacle.test",
            "/api/auth/callback/github?code=c0deValue5secret&state=1",
        ),
    ] {
        let mut stream = tokio::net::TcpStream::connect(listen).await.unwrap();
        let request = format!(
            "POST {target} HTTP/1.1\r\nhost: {host}\r\ncookie: {cookie}\r\ncontent-length: 2\r\n\r\nhi"
        );
        tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut answer),
        )
        .await;
        assert!(
            answer.starts_with(b"HTTP/1.1 502"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    // Both failures are named in a WARN line of their own besides the access line, not in
    // Pingora's ERROR line (bounded wait for the lines to be written).
    let deadline = Instant::now() + Duration::from_secs(5);
    let logs = loop {
        let logs = std::fs::read_to_string(&log_path).unwrap();
        if logs.matches("upstream failed").count() >= 2 {
            break logs;
        }
        assert!(
            Instant::now() < deadline,
            "no upstream failure lines in:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for line in logs.lines().filter(|l| l.contains("upstream failed")) {
        assert!(line.contains(" WARN "), "{line}");
    }
    assert!(!logs.lines().any(|l| l.contains(" ERROR ")), "{logs}");
    for secret in secrets {
        assert!(!logs.contains(secret), "{secret} in:\n{logs}");
    }
    assert!(
        logs.contains("token=REDACTED&access_token=REDACTED&page=2"),
        "{logs}"
    );
    assert!(logs.contains("code=REDACTED&state=1"), "{logs}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A listening address that is taken ends `serve` at once with a message naming it, for the
/// proxy listener and the admin listener alike (no silent sharing).
#[tokio::test]
async fn addresses_in_use_end_serve_with_their_name() {
    let dir = std::env::temp_dir().join(format!("pinacle-bind-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let directory = directory_file(&dir, 1);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let free = format!("127.0.0.1:{}", reserve_port());
    for (listen, admin, key) in [
        (taken_addr.as_str(), "off", "listen"),
        (free.as_str(), taken_addr.as_str(), "admin_listen"),
    ] {
        let started = Instant::now();
        let out = command(
            &["serve"],
            &[
                ("NEXTAUTH_SECRET", SECRET),
                ("PINACLE_INGRESS_LISTEN", listen),
                ("PINACLE_INGRESS_ADMIN_LISTEN", admin),
                (
                    "PINACLE_INGRESS_DIRECTORY_FILE",
                    directory.to_str().unwrap(),
                ),
                ("PINACLE_INGRESS_THREADS", "1"),
            ],
        )
        .output()
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(2), "{key}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("{key} {taken_addr}")),
            "{key}: {stderr}"
        );
        // Not a terminal: plain text, no colour codes.
        assert!(!stderr.contains('\u{1b}'), "{stderr}");
    }
    drop(taken);

    // Two instances of ours on one admin address: the second refuses to start, instead of
    // sharing it (SO_REUSEPORT) and answering half the health checks.
    let admin = format!("127.0.0.1:{}", reserve_port());
    let start_one = |log: &str| {
        let listen = format!("127.0.0.1:{}", reserve_port());
        let child = command(
            &["serve"],
            &[
                ("NEXTAUTH_SECRET", SECRET),
                ("PINACLE_INGRESS_LISTEN", listen.as_str()),
                ("PINACLE_INGRESS_ADMIN_LISTEN", admin.as_str()),
                (
                    "PINACLE_INGRESS_DIRECTORY_FILE",
                    directory.to_str().unwrap(),
                ),
                ("PINACLE_INGRESS_THREADS", "1"),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(dir.join(log)).unwrap()))
        .spawn()
        .unwrap();
        (Process(Some(child)), listen)
    };
    let (first, first_listen) = start_one("first.log");
    wait_for_port(first_listen.parse().unwrap()).await;
    let (second, _) = start_one("second.log");
    let mut second = second.into_child();
    let status = wait_exit(&mut second, Duration::from_secs(10));
    assert_eq!(status.code(), Some(2));
    let stderr = std::fs::read_to_string(dir.join("second.log")).unwrap();
    assert!(
        stderr.contains(&format!("admin_listen {admin}")),
        "{stderr}"
    );
    drop(first);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A graceful stop drains what is in flight (`/readyz` says so), including a connection
/// accepted whose request has not arrived yet, and then ends at once, not after the whole
/// grace period.
#[tokio::test]
async fn a_graceful_stop_drains_then_exits_at_once() {
    let events = upstream::sse().await;
    let dir = std::env::temp_dir().join(format!("pinacle-idle-stop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let directory = directory_file(&dir, events.addr.port());
    let listen: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let (listen_s, admin_s) = (listen.to_string(), admin.to_string());
    let child = command(
        &["serve"],
        &[
            ("NEXTAUTH_SECRET", SECRET),
            ("PINACLE_INGRESS_LISTEN", &listen_s),
            ("PINACLE_INGRESS_ADMIN_LISTEN", &admin_s),
            (
                "PINACLE_INGRESS_DIRECTORY_FILE",
                directory.to_str().unwrap(),
            ),
            ("PINACLE_INGRESS_SHUTDOWN_GRACE_PERIOD", "60s"),
            ("PINACLE_INGRESS_BASE_DOMAINS", "pinacle.test"),
            ("PINACLE_INGRESS_THREADS", "1"),
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let process = Process(Some(child));
    wait_for_port(listen).await;
    wait_for_port(admin).await;

    // One streaming request in flight.
    let now = pinacle_ingress::cli::unix_now();
    let value = pinacle_authz::testing::session_cookie_value(SECRET, "user_ada", now, 600);
    let cookie = format!("next-auth.session-token={value}");
    let mut conn = client::Connection::open(listen).await;
    let response = conn
        .send(
            "GET",
            "/events",
            &[
                ("host", "localhost-3000-pod-proj.pinacle.test"),
                ("cookie", &cookie),
            ],
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    assert_eq!(
        client::next_chunk(&mut body).await.unwrap(),
        "data: first\n\n"
    );
    // A second connection, accepted (the gate counts it open) before its request is sent.
    let mut late = tokio::net::TcpStream::connect(listen).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !client::get(admin, "/metrics", &[])
        .await
        .text()
        .contains("\npinacle_ingress_client_connections_open 2\n")
    {
        assert!(
            Instant::now() < deadline,
            "the second connection was never counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut child = process.into_child();
    let started = Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = client::get(admin, "/readyz", &[]).await;
        if r.status == 503 {
            assert_eq!(r.json()["status"], "draining");
            break;
        }
        assert!(Instant::now() < deadline, "/readyz never reported draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited with a request in flight"
    );
    events.release.notify_one();
    while client::next_chunk(&mut body).await.is_some() {}
    drop(conn);
    // The accepted connection still counts: its request, sent now, is answered (exiting
    // under it used to reset it), and the connection then closes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited with an accepted connection waiting for its request"
    );
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        late.write_all(
            b"GET / HTTP/1.1\r\nHost: localhost-3000-pod-proj.pinacle.test\r\n\
              sec-fetch-mode: cors\r\n\r\n",
        )
        .await
        .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), late.read_to_end(&mut answer))
            .await
            .expect("the answer and the close within 10 s")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
        assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    }
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?} once nothing was in flight (grace period 60 s)",
        started.elapsed()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A database that cannot be reached: 503, and the access line says why; JSON log lines hold
/// JSON values (no debug-printed `Some(..)`/`None`).
#[tokio::test]
async fn directory_failures_are_named_in_the_access_line() {
    let dir = std::env::temp_dir().join(format!("pinacle-dir-error-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let listen_s = listen.to_string();
    let closed = format!("postgres://postgres@127.0.0.1:{}/pinacle", reserve_port());
    let log_path = dir.join("stderr.log");
    let _process = start_logged(
        &["serve"],
        &[
            ("NEXTAUTH_SECRET", SECRET),
            ("DATABASE_URL", &closed),
            ("PINACLE_INGRESS_LISTEN", &listen_s),
            ("PINACLE_INGRESS_ADMIN_LISTEN", "off"),
            ("PINACLE_INGRESS_BASE_DOMAINS", "pinacle.test"),
            ("PINACLE_INGRESS_DIRECTORY_QUERY_TIMEOUT", "500ms"),
            ("PINACLE_INGRESS_THREADS", "1"),
            ("PINACLE_INGRESS_LOG_FORMAT", "json"),
        ],
        &log_path,
    );
    wait_for_port(listen).await;
    let now = pinacle_ingress::cli::unix_now();
    let value = pinacle_authz::testing::session_cookie_value(SECRET, "user_ada", now, 600);
    let cookie = format!("next-auth.session-token={value}");
    let r = client::get(
        listen,
        "/",
        &[
            ("host", "localhost-3000-pod-proj.pinacle.test"),
            ("cookie", &cookie),
        ],
    )
    .await;
    assert_eq!(r.status, 503);
    let deadline = Instant::now() + Duration::from_secs(5);
    let (logs, access) = loop {
        let logs = std::fs::read_to_string(&log_path).unwrap();
        let access = logs
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["target"] == "pinacle_ingress::access");
        if let Some(access) = access {
            break (logs, access);
        }
        assert!(Instant::now() < deadline, "no access line in:\n{logs}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(access["status"], 503);
    let error = access["error"].as_str().unwrap();
    assert!(
        ["directory_unavailable", "directory_timeout"].contains(&error),
        "{access}"
    );
    let mut pingora_lines = 0;
    for line in logs.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            !line.contains("Some(") && !line.contains("\"None\""),
            "{line}"
        );
        // Pingora's own lines too: one field each, no source paths.
        assert!(
            !line.contains("log.file") && !line.contains("log.line"),
            "{line}"
        );
        if value["target"] == "pingora" {
            pingora_lines += 1;
            assert!(
                value["log_target"].as_str().unwrap().starts_with("pingora"),
                "{line}"
            );
        }
    }
    assert!(pingora_lines > 0, "no Pingora line in:\n{logs}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SIGHUP re-reads the configuration file and the directory file: live keys apply to the next
/// requests, restart-only keys keep their running value (and are named in a warning), an
/// invalid file changes nothing; each reload is counted by result.
#[tokio::test]
async fn sighup_applies_what_can_change_live_and_keeps_the_rest() {
    let pod = upstream::http_echo("pod").await;
    let dir = std::env::temp_dir().join(format!("pinacle-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let directory = directory_file(&dir, pod.addr.port());
    let listen: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let config_path = dir.join("ingress.toml");
    let write_config = |extra: &str| {
        std::fs::write(
            &config_path,
            format!(
                "listen = \"{listen}\"\nadmin_listen = \"{admin}\"\n\
                 base_domains = [\"pinacle.test\"]\ndirectory_file = \"{}\"\n{extra}",
                directory.display()
            ),
        )
        .unwrap();
    };
    write_config("max_request_header_bytes = 16384\nthreads = 1\n");
    let log_path = dir.join("stderr.log");
    let process = start_logged(
        &["serve", "--config", config_path.to_str().unwrap()],
        &[("NEXTAUTH_SECRET", SECRET)],
        &log_path,
    );
    wait_for_port(listen).await;
    wait_for_port(admin).await;
    let pid = process.0.as_ref().unwrap().id().to_string();
    let hup = || Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    let reloads = |result: &'static str| async move {
        let text = client::get(admin, "/metrics", &[]).await.text();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "pinacle_ingress_config_reloads_total{{result=\"{result}\"}} "
                ))
                .map(|v| v.parse::<u32>().unwrap())
            })
            .unwrap_or(0)
    };
    let wait_reloads = |result: &'static str, n: u32| async move {
        let deadline = Instant::now() + Duration::from_secs(5);
        while reloads(result).await < n {
            assert!(Instant::now() < deadline, "no {result} reload counted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let now = pinacle_ingress::cli::unix_now();
    let value = pinacle_authz::testing::session_cookie_value(SECRET, "user_ada", now, 600);
    let cookie = format!("next-auth.session-token={value}");
    let host = "localhost-3000-pod-proj.pinacle.test";
    let big = "x".repeat(8000);
    let get = |extra: Option<&str>| {
        let mut headers = vec![("host", host), ("cookie", cookie.as_str())];
        if let Some(big) = extra {
            headers.push(("x-big", big));
        }
        let headers: Vec<(String, String)> = headers
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        async move {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            client::get(listen, "/", &headers).await.status
        }
    };
    assert_eq!(get(Some(&big)).await, 200);

    // A live key (the header limit) and a restart-only one (threads).
    let access_lines = || {
        std::fs::read_to_string(&log_path)
            .unwrap()
            .lines()
            .filter(|l| l.contains("pinacle_ingress::access"))
            .count()
    };
    write_config("max_request_header_bytes = 4096\nthreads = 2\nlog_filter = \"warn\"\n");
    hup();
    wait_reloads("applied", 1).await;
    let logged = access_lines();
    assert_eq!(get(Some(&big)).await, 431, "the new limit applies");
    assert_eq!(get(None).await, 200);
    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains("restart") && l.contains("threads")),
        "{logs}"
    );

    // The directory file is read again: a pod given to someone else is no longer ada's.
    let text = std::fs::read_to_string(&directory).unwrap();
    std::fs::write(
        &directory,
        text.replace("owner_id = \"user_ada\"", "owner_id = \"user_bob\"")
            .replace(
                "[[users]]\nid = \"user_ada\"",
                "[[users]]\nid = \"user_bob\"\n\n[[users]]\nid = \"user_ada\"",
            ),
    )
    .unwrap();
    write_config("max_request_header_bytes = 4096\nthreads = 2\n");
    hup();
    wait_reloads("applied", 2).await;
    assert_eq!(
        get(None).await,
        403,
        "the reloaded directory applies at once"
    );
    // The log filter applied too: nothing at info while it was "warn", the access line of the
    // last request (filter back at "info") is there.
    let deadline = Instant::now() + Duration::from_secs(5);
    while access_lines() == logged {
        assert!(
            Instant::now() < deadline,
            "no access line after the filter went back to info"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        access_lines(),
        logged + 1,
        "requests were logged while log_filter was warn"
    );

    // An invalid file changes nothing and is counted.
    std::fs::write(&config_path, "threads = \"many\"\n").unwrap();
    hup();
    wait_reloads("rejected", 1).await;
    assert_eq!(
        get(Some(&big)).await,
        431,
        "the running configuration stays"
    );
    drop(process);
    std::fs::remove_dir_all(&dir).unwrap();
}
