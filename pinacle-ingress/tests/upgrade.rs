//! Zero-downtime restart, as the README describes it, with real processes: a new
//! `serve --upgrade` takes the listening socket over from the running one (SIGQUIT), while a
//! client keeps sending requests on fresh connections; none may fail.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pinacle_testkit::{client, reserve_port, upstream, wait_for_port};

const BIN: &str = env!("CARGO_BIN_EXE_pinacle-ingress");

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(env: &[(&str, String)], upgrade: bool) -> Killed {
    let mut cmd = Command::new(BIN);
    // The dashboard route only: the demo directory is never consulted.
    cmd.args(["serve", "--demo"]);
    if upgrade {
        cmd.arg("--upgrade");
    }
    for (var, _) in std::env::vars() {
        if var.starts_with("PINACLE_INGRESS_") || var == "DATABASE_URL" || var == "RUST_LOG" {
            cmd.env_remove(var);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    Killed(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// What a client saw while [`keep_requesting`] ran: answers, failures, and the processes that
/// answered (the first 16 hex digits of a request id name the process).
type Seen = (u32, Vec<String>, BTreeSet<String>);

/// Requests on fresh connections, one after another, until the flag is set.
fn keep_requesting(listen: SocketAddr) -> (Arc<AtomicBool>, tokio::task::JoinHandle<Seen>) {
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed, mut ids) = (0u32, Vec::new(), BTreeSet::new());
            while !stop.load(Ordering::SeqCst) {
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    client::get(listen, "/", &[("host", "pinacle.test")]),
                )
                .await;
                match r {
                    Ok(r) if r.status == 200 => {
                        ok += 1;
                        let id = r.header("x-request-id").unwrap_or_default();
                        ids.insert(id.get(..16).unwrap_or_default().to_owned());
                    }
                    Ok(r) => failed.push(format!("status {}", r.status)),
                    Err(_) => failed.push("timeout".to_owned()),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, failed, ids)
        })
    };
    (stop, load)
}

/// The environment of a `serve` on `listen` routing everything to `dashboard`, its upgrade
/// socket in `dir`.
fn serve_env(
    listen: SocketAddr,
    dashboard: SocketAddr,
    dir: &std::path::Path,
) -> Vec<(&'static str, String)> {
    vec![
        ("NEXTAUTH_SECRET", "upgrade-test-secret".to_owned()),
        ("PINACLE_INGRESS_LISTEN", listen.to_string()),
        ("PINACLE_INGRESS_DASHBOARD_UPSTREAM", dashboard.to_string()),
        ("PINACLE_INGRESS_ADMIN_LISTEN", "off".to_owned()),
        ("PINACLE_INGRESS_THREADS", "1".to_owned()),
        ("PINACLE_INGRESS_SHUTDOWN_GRACE_PERIOD", "1s".to_owned()),
        (
            "PINACLE_INGRESS_UPGRADE_SOCK",
            dir.join("upgrade.sock").display().to_string(),
        ),
    ]
}

/// The old process exits 0 (bounded), then the requests stop: none failed, and answers came
/// from two processes.
async fn old_exits_and_no_request_failed(
    old: &mut Killed,
    stop: Arc<AtomicBool>,
    load: tokio::task::JoinHandle<Seen>,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = old.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the old process did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let (ok, failed, processes) = load.await.unwrap();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert!(ok > 50, "only {ok} requests");
    assert_eq!(processes.len(), 2, "answers came from {processes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_takes_over_without_a_failed_request() {
    let dashboard = upstream::http_echo("dashboard").await;
    let dir = std::env::temp_dir().join(format!("pinacle-upgrade-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let env = serve_env(listen, dashboard.addr, &dir);
    let mut old = start(&env, false);
    wait_for_port(listen).await;

    let (stop, load) = keep_requesting(listen);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new = start(&env, true);
    // The new process waits on the upgrade socket; the old one hands its listener over.
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&old.0, "QUIT");
    old_exits_and_no_request_failed(&mut old, stop, load).await;
    drop(new);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Waits (bounded) for the next systemd notification on `socket`.
async fn next_notification(socket: &tokio::net::UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(20), socket.recv(&mut buf))
        .await
        .expect("a notification within 20 s")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// SIGUSR2: the running process starts its successor from the binary on disk and hands over to
/// it, as one step; no request fails; systemd is told the new main PID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_upgrades_in_place_and_tells_systemd_the_new_main_pid() {
    let dashboard = upstream::http_echo("dashboard").await;
    let dir = std::env::temp_dir().join(format!("pinacle-usr2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let notify_path = dir.join("notify.sock");
    let notifications = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let mut env = serve_env(listen, dashboard.addr, &dir);
    env.push(("NOTIFY_SOCKET", notify_path.display().to_string()));
    let mut old = start(&env, false);
    let old_pid = old.0.id();
    assert_eq!(
        next_notification(&notifications).await,
        format!("MAINPID={old_pid}\nREADY=1")
    );
    wait_for_port(listen).await;
    let (stop, load) = keep_requesting(listen);
    tokio::time::sleep(Duration::from_millis(300)).await;

    signal(&old.0, "USR2");
    let announced = next_notification(&notifications).await;
    let new_pid: u32 = announced
        .strip_prefix("MAINPID=")
        .and_then(|rest| rest.strip_suffix("\nREADY=1"))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("not a MAINPID notification: {announced:?}"));
    assert_ne!(new_pid, old_pid);
    // The successor, a child of the old process, is ended by its PID whatever happens next.
    struct Successor(u32);
    impl Drop for Successor {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .args(["-INT", &self.0.to_string()])
                .status();
        }
    }
    let successor = Successor(new_pid);

    old_exits_and_no_request_failed(&mut old, stop, load).await;
    drop(successor);
    // Gone within a few seconds of SIGINT.
    let proc_dir = std::path::PathBuf::from(format!("/proc/{new_pid}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while proc_dir.exists()
        && !std::fs::read_to_string(proc_dir.join("stat"))
            .unwrap_or_default()
            .contains(") Z ")
    {
        assert!(Instant::now() < deadline, "the successor did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
