//! `pinacle-ingress serve` and `check-config` as real processes, configured the way an operator
//! does it (the dashboard's environment plus `PINACLE_INGRESS_*`), and every config shipped under
//! `config/` loaded by the code that reads it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pinacle_authz::{Claims, CredentialConfig, CredentialVerifier, FileDirectory, Secret};
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
        &["check-config", "--config", "config/ingress.example.toml"],
        &[("NEXTAUTH_SECRET", SECRET)],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration ok"));

    let dir = std::env::temp_dir().join(format!("pinacle-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "listen = \"nowhere\"\ntimeuot = \"1s\"\nupstream_read_timeout = \"soon\"\n",
    )
    .unwrap();
    let out = command(
        &["check-config", "--config", bad.to_str().unwrap()],
        &[("PINACLE_INGRESS_THREADS", "0")],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    for key in [
        "listen",
        "timeuot",
        "upstream_read_timeout",
        "threads",
        "NEXTAUTH_SECRET",
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
    /// SIGTERM, then the exit status within `limit`.
    fn terminate(mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.0.take().unwrap();
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
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
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn directory_file(dir: &Path, pod_port: u16) -> PathBuf {
    let path = dir.join("directory.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[[users]]
id = "user_ada"
email = "ada@example.test"

[[teams]]
id = "team"

[[servers]]
id = "s1"
ip_address = "127.0.0.1"

[[pods]]
id = "pod_1"
slug = "proj"
owner_id = "user_ada"
team_id = "team"
server_id = "s1"
status = "running"
ports = [{{ name = "nginx-proxy", internal = 80, external = {pod_port}, protocol = "tcp" }}]
"#
        ),
    )
    .unwrap();
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
    let (listen_s, dashboard_s) = (listen.to_string(), dashboard.addr.to_string());
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
            ("RUST_LOG", "warn"),
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let process = Process(Some(child));
    wait_for_port(listen).await;

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
    let claims = serde_json::json!({"sub": "user_ada", "iat": now, "exp": now + 600});
    let value = verifier
        .mint_session_v4(&Claims(claims.as_object().cloned().unwrap()))
        .unwrap();
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

    let status = process.terminate(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0));
    std::fs::remove_dir_all(&dir).unwrap();
}
