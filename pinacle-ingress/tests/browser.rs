//! The ingress as a person meets it, in Debian's Chromium (driven by playwright-core from
//! `testkit/browser`, installed by `scripts/test`): the demo's sign-in round trip through the
//! real proxy-token callback, and the pages the ingress shows when it says no.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use pinacle_testkit::{reserve_port, upstream, wait_for_port};

const BIN: &str = env!("CARGO_BIN_EXE_pinacle-ingress");
const SECRET: &str = "browser-test-secret";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A child process, ended (by its PID) when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn clean(mut cmd: Command) -> Command {
    for (var, _) in std::env::vars() {
        if var.starts_with("PINACLE_INGRESS_")
            || var.starts_with("NEXTAUTH_")
            || var == "DATABASE_URL"
        {
            cmd.env_remove(var);
        }
    }
    cmd
}

#[tokio::test]
async fn the_demo_signs_a_person_in_and_the_ingress_pages_say_no_clearly() {
    let browser = repo().join("testkit/browser");
    assert!(
        browser.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run scripts/test (it runs npm ci in testkit/browser)"
    );
    // The demo directory, its pod published on a port of this test's.
    let pod = upstream::http_echo("demo-pod").await;
    let dir = std::env::temp_dir().join(format!("pinacle-browser-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let directory = std::fs::read_to_string(repo().join("config/directory.example.toml"))
        .unwrap()
        .replace(
            "external = 30001",
            &format!("external = {}", pod.addr.port()),
        );
    std::fs::write(dir.join("directory.toml"), directory).unwrap();

    let (listen, dashboard) = (reserve_port(), reserve_port());
    let mut ingress = clean(Command::new(BIN));
    ingress
        .arg("serve")
        .env("NEXTAUTH_SECRET", SECRET)
        .env("NEXTAUTH_URL", format!("http://localhost:{dashboard}"))
        .env("PINACLE_INGRESS_LISTEN", format!("127.0.0.1:{listen}"))
        .env(
            "PINACLE_INGRESS_DASHBOARD_UPSTREAM",
            format!("127.0.0.1:{dashboard}"),
        )
        .env("PINACLE_INGRESS_DIRECTORY_FILE", dir.join("directory.toml"))
        .env("PINACLE_INGRESS_ADMIN_LISTEN", "off")
        .env("PINACLE_INGRESS_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _ingress = Process(ingress.spawn().unwrap());
    let mut stand_in = clean(Command::new("python3"));
    stand_in
        .arg(repo().join("scripts/demo-dashboard.py"))
        .args([
            &dashboard.to_string(),
            BIN,
            &listen.to_string(),
            "localhost",
        ])
        .env("NEXTAUTH_SECRET", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _stand_in = Process(stand_in.spawn().unwrap());
    wait_for_port(SocketAddr::from(([127, 0, 0, 1], listen))).await;
    wait_for_port(SocketAddr::from(([127, 0, 0, 1], dashboard))).await;

    let shots = dir.join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let out = tokio::task::spawn_blocking({
        let (browser, shots) = (browser.clone(), shots.clone());
        move || {
            Command::new("node")
                .current_dir(&browser)
                .arg("demo.mjs")
                .arg(format!(
                    "http://localhost-3000-pod-demo.localhost:{listen}/docs?page=1"
                ))
                .arg(format!(
                    "http://localhost-3000-pod-sleepy.localhost:{listen}/"
                ))
                .arg(&shots)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    // The owner signs in on the stand-in and lands on the pod, at the path first asked for.
    let owner = &seen["owner"];
    assert_eq!(owner["signInTitle"], "Sign in to the demo");
    assert_eq!(
        owner["url"],
        format!("http://localhost-3000-pod-demo.localhost:{listen}/docs?page=1")
    );
    let echo: serde_json::Value = serde_json::from_str(owner["text"].as_str().unwrap()).unwrap();
    assert_eq!(echo["name"], "demo-pod");
    assert_eq!(echo["path"], "/docs?page=1");
    assert!(
        echo["headers"].get("cookie").is_none(),
        "the proxy token reached the pod"
    );

    // A stranger gets the ingress's page: what, which pod and port, the request id, a way out.
    let stranger = seen["stranger"]["text"].as_str().unwrap();
    for text in [
        "No access to this pod",
        "Pod demo, port 3000",
        "Request id",
        "Back to the dashboard",
    ] {
        assert!(stranger.contains(text), "{text} not in {stranger}");
    }
    // A stopped pod: its status, and it checks again on its own.
    let stopped = seen["stopped"]["text"].as_str().unwrap();
    for text in [
        "This pod is not running",
        "stopped",
        "Checking again in 5 seconds",
        "Pod sleepy, port 3000",
    ] {
        assert!(stopped.contains(text), "{text} not in {stopped}");
    }
    for shot in ["demo-owner", "demo-stranger", "demo-stopped"] {
        assert!(shots.join(format!("{shot}.png")).is_file());
    }
    if std::env::var_os("PINACLE_KEEP_SCREENSHOTS").is_none() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
