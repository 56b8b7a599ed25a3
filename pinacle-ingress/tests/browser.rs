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

/// A fresh directory for one test's files (removed by the test when it passes).
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `node <script> <args>` in `testkit/browser` (off the async runtime) and returns the one
/// JSON object it prints; its stderr on failure.
async fn node_script(script: &'static str, args: Vec<std::ffi::OsString>) -> serde_json::Value {
    assert!(
        repo()
            .join("testkit/browser/node_modules/playwright-core")
            .is_dir(),
        "playwright-core is not installed: run scripts/test (it runs npm ci in testkit/browser)"
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .current_dir(repo().join("testkit/browser"))
            .arg(script)
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn the_demo_signs_a_person_in_and_the_ingress_pages_say_no_clearly() {
    // The demo directory, its pod published on a port of this test's.
    let pod = upstream::http_echo("demo-pod").await;
    let dir = scratch("pinacle-browser");
    let directory = std::fs::read_to_string(repo().join("config/directory.example.toml"))
        .unwrap()
        .replace(
            "external = 30001",
            &format!("external = {}", pod.addr.port()),
        );
    std::fs::write(dir.join("directory.toml"), directory).unwrap();

    let (listen, dashboard) = (reserve_port(), reserve_port());
    let _ingress = Process(serve(&dir, listen, dashboard).spawn().unwrap());
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
    let seen = node_script(
        "demo.mjs",
        vec![
            format!("http://localhost-3000-pod-demo.localhost:{listen}/docs?page=1").into(),
            format!("http://localhost-3000-pod-sleepy.localhost:{listen}/").into(),
            shots.clone().into(),
        ],
    )
    .await;

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
    // A stopped pod: its status, which the page follows on its own.
    let stopped = seen["stopped"]["text"].as_str().unwrap();
    for text in [
        "This pod is not running",
        "stopped",
        "This page follows the pod's status",
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

/// The ingress over the directory example with its demo pod published on `pod_port`, the
/// dashboard at `http://localhost:<dashboard>`, and https on `tls` with a test certificate for
/// `*.localhost` (the embed cookie is `Secure`; Chromium is told to accept the certificate).
fn https_ingress(
    dir: &std::path::Path,
    pod_port: u16,
    listen: u16,
    tls: u16,
    dashboard: u16,
) -> Process {
    let directory = std::fs::read_to_string(repo().join("config/directory.example.toml"))
        .unwrap()
        .replace("external = 30001", &format!("external = {pod_port}"));
    std::fs::write(dir.join("directory.toml"), directory).unwrap();
    pinacle_testkit::tls::Ca::new().leaf(&["*.localhost", "localhost"], dir, "wildcard");
    let mut ingress = serve(dir, listen, dashboard);
    ingress
        .env("PINACLE_INGRESS_TLS_LISTEN", format!("127.0.0.1:{tls}"))
        .env("PINACLE_INGRESS_TLS_CERT_FILE", dir.join("wildcard.pem"))
        .env("PINACLE_INGRESS_TLS_KEY_FILE", dir.join("wildcard.key"));
    Process(ingress.spawn().unwrap())
}

/// The pod's nginx rendered by `nginx-templates` in front of `app` (its default port), and the
/// port it listens on.
async fn pod_nginx(app: u16, tag: &str) -> (pinacle_testkit::nginx::Nginx, u16) {
    let port = reserve_port();
    let dir = pinacle_testkit::nginx::Nginx::make_dir(tag);
    let d = dir.display();
    let pod_config = format!(
        r#"{{"listen_port": {port}, "default_port": {app}, "trusted_proxies": ["127.0.0.1"],
            "runtime": {{"pid_path": "{d}/nginx.pid", "error_log": "{d}/error.log",
                         "access_log": "{d}/access.log", "temp_dir": "{d}/temp"}}}}"#
    );
    let rendered = nginx_templates::render_text(&pod_config).unwrap();
    let nginx = pinacle_testkit::nginx::Nginx::start(
        dir,
        &rendered,
        SocketAddr::from(([127, 0, 0, 1], port)),
    )
    .await;
    (nginx, port)
}

/// `pinacle-ingress serve` on `listen` over `<dir>/directory.toml`, the dashboard at
/// `http://localhost:<dashboard>` (proxied to that port), no admin listener, quiet.
fn serve(dir: &std::path::Path, listen: u16, dashboard: u16) -> Command {
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
        .env("PINACLE_INGRESS_THREADS", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    ingress
}

/// A page that frames `src` and titles itself "framed" once the frame has loaded (or failed to).
fn framing_page(dir: &std::path::Path, src: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("index.html"),
        format!(
            "<!doctype html><title>waiting</title>\
             <iframe src=\"{src}\" onload=\"document.title='framed'\" width=600 height=300></iframe>"
        ),
    )
    .unwrap();
}

/// A static file server (python3) on `port` for `dir`.
fn static_server(dir: &std::path::Path, port: u16) -> Process {
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "http.server",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
    ])
    .current_dir(dir)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    Process(cmd.spawn().unwrap())
}

#[tokio::test]
async fn the_dashboard_can_frame_a_pod_page_and_an_unrelated_origin_cannot() {
    let pod = upstream::http_echo("framed-pod").await;
    let dir = scratch("pinacle-frame");
    let (listen, tls, dashboard, unrelated) = (
        reserve_port(),
        reserve_port(),
        reserve_port(),
        reserve_port(),
    );
    let _ingress = https_ingress(&dir, pod.addr.port(), listen, tls, dashboard);
    // The Workbench's way in: the callback with a proxy token, for embedding.
    let token = demo_proxy_token(3000);
    let pod_url = format!(
        "https://localhost-3000-pod-demo.localhost:{tls}/pinacle-proxy-callback\
         ?token={token}&embed=true&return_url=%2Fframed"
    );
    framing_page(&dir.join("dashboard"), &pod_url);
    framing_page(&dir.join("unrelated"), &pod_url);
    let _dashboard = static_server(&dir.join("dashboard"), dashboard);
    let _unrelated = static_server(&dir.join("unrelated"), unrelated);
    for port in [listen, tls, dashboard, unrelated] {
        wait_for_port(SocketAddr::from(([127, 0, 0, 1], port))).await;
    }
    let seen = node_script(
        "frame.mjs",
        vec![
            format!("http://localhost:{dashboard}/").into(),
            format!("http://127.0.0.1:{unrelated}/").into(),
        ],
    )
    .await;
    // The dashboard frames the pod: the pod's own page is shown, authenticated.
    let inside = seen["dashboard"]["text"].as_str().unwrap();
    let echo: serde_json::Value = serde_json::from_str(inside)
        .unwrap_or_else(|e| panic!("the dashboard's frame shows {inside:?}: {e}"));
    assert_eq!(echo["name"], "framed-pod");
    assert_eq!(echo["path"], "/framed");
    // An unrelated origin does not: Chromium refuses the frame by the frame-ancestors policy.
    let unrelated = &seen["unrelated"];
    assert!(
        !unrelated["text"].as_str().unwrap().contains("framed-pod"),
        "{unrelated}"
    );
    assert!(
        unrelated["blocked"]
            .as_array()
            .is_some_and(|b| !b.is_empty())
            || unrelated["frameUrl"]
                .as_str()
                .unwrap()
                .starts_with("chrome-error:"),
        "{unrelated}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// In Chromium, a pod's `Set-Cookie` for the whole base domain never reaches the dashboard (or
/// any other host), its own host-only cookies work, and its forged proxy token neither replaces
/// the real one nor reaches the app.
#[tokio::test]
async fn a_pods_cookies_stay_on_its_host_in_chromium() {
    let dir = scratch("pinacle-cookies");
    let (app, listen, dashboard) = (reserve_port(), reserve_port(), reserve_port());
    let directory = std::fs::read_to_string(repo().join("config/directory.example.toml"))
        .unwrap()
        .replace("external = 30001", &format!("external = {app}"));
    std::fs::write(dir.join("directory.toml"), directory).unwrap();
    let mut ingress = serve(&dir, listen, dashboard);
    ingress.env("PINACLE_INGRESS_BASE_DOMAINS", "pinacle.test");
    let _ingress = Process(ingress.spawn().unwrap());
    wait_for_port(SocketAddr::from(([127, 0, 0, 1], listen))).await;

    let pod = format!("http://localhost-3000-pod-demo.pinacle.test:{listen}");
    let callback = format!(
        "{pod}/pinacle-proxy-callback?token={}&return_url=%2F",
        demo_proxy_token(3000)
    );
    let seen = node_script(
        "cookies.mjs",
        vec![
            callback.into(),
            app.to_string().into(),
            format!("http://pinacle.test:{listen}/").into(),
            dashboard.to_string().into(),
        ],
    )
    .await;

    assert_eq!(seen["again"]["url"], format!("{pod}/"), "{seen}");
    assert_eq!(
        seen["again"]["text"], "the app got: site=planted; own=kept",
        "the app gets its own cookies (now both of its host), no proxy token: {seen}"
    );
    assert_eq!(
        seen["atDashboard"]["cookie"],
        serde_json::Value::Null,
        "a pod's cookie reached the dashboard: {seen}"
    );
    let cookies = seen["cookies"].as_array().unwrap();
    let host = "localhost-3000-pod-demo.pinacle.test";
    for cookie in cookies {
        assert_eq!(cookie["domain"], host, "{seen}");
        assert_ne!(cookie["value"], "forged", "{seen}");
    }
    let names: Vec<&str> = cookies.iter().filter_map(|c| c["name"].as_str()).collect();
    assert!(names.contains(&"own") && names.contains(&"site"), "{seen}");
    assert!(names.contains(&"pinacle-proxy-token"), "{seen}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A proxy token for `user_ada` on port `port` of the demo pod (the directory example's).
fn demo_proxy_token(port: u16) -> String {
    let minted = clean(Command::new(BIN))
        .args(["session", "mint", "--user", "user_ada", "--pod", "demo"])
        .args(["--pod-id", "pod_demo", "--port", &port.to_string()])
        .env("NEXTAUTH_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        minted.status.success(),
        "{}",
        String::from_utf8_lossy(&minted.stderr)
    );
    String::from_utf8(minted.stdout)
        .unwrap()
        .trim()
        .strip_prefix("pinacle-proxy-token=")
        .unwrap()
        .to_owned()
}

/// Runs `dev_server` (started on the port it is given, serving `app_dir` whose `message.js`
/// exports "one") behind the pod's real nginx and the ingress over https, and checks in Chromium
/// that an edit reaches the page by hot reload, top level and inside an embedded frame.
async fn hot_reloads_through_the_ingress(
    dir: &std::path::Path,
    app_dir: &std::path::Path,
    message: &std::path::Path,
    dev_server: impl FnOnce(u16) -> Command,
) {
    // The user's dev server, on the port the browser names in the pod host.
    let app = reserve_port();
    let mut server = dev_server(app);
    server
        .current_dir(app_dir)
        .env("NO_COLOR", "1")
        .env("NEXT_TELEMETRY_DISABLED", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _server = Process(server.spawn().unwrap());
    // The pod's nginx from nginx-templates, in front of it.
    let (_nginx, nginx_port) = pod_nginx(app, "devserver").await;
    let (listen, tls, dashboard) = (reserve_port(), reserve_port(), reserve_port());
    let _ingress = https_ingress(dir, nginx_port, listen, tls, dashboard);
    let token = demo_proxy_token(app);
    let pod = format!("https://localhost-{app}-pod-demo.localhost:{tls}");
    let top = format!("{pod}/pinacle-proxy-callback?token={token}&return_url=%2F");
    let embedded = format!("{pod}/pinacle-proxy-callback?token={token}&embed=true&return_url=%2F");
    framing_page(&dir.join("dashboard"), &embedded);
    let _dashboard = static_server(&dir.join("dashboard"), dashboard);
    for port in [app, listen, tls, dashboard] {
        wait_for_port(SocketAddr::from(([127, 0, 0, 1], port))).await;
    }

    let seen = node_script(
        "devserver.mjs",
        vec![
            top.into(),
            format!("http://localhost:{dashboard}/").into(),
            message.into(),
        ],
    )
    .await;
    // Top level: the edit arrived over the dev server's WebSocket through both hops, without a
    // reload.
    assert_eq!(seen["top"]["url"], format!("{pod}/"));
    assert_eq!(seen["top"]["text"], "two");
    assert_eq!(seen["top"]["marker"], "kept", "the page reloaded: {seen}");
    // The same inside the Workbench's frame (the embedded cookie, the frame policy).
    assert_eq!(seen["framed"]["text"], "three");
    assert_eq!(
        seen["framed"]["marker"], "kept",
        "the frame reloaded: {seen}"
    );
}

#[tokio::test]
async fn vite_hot_reloads_through_the_ingress_top_level_and_inside_the_workbench_frame() {
    let browser = repo().join("testkit/browser");
    assert!(
        browser.join("node_modules/vite").is_dir(),
        "Vite is not installed: run scripts/test (it runs npm ci in testkit/browser)"
    );
    let dir = std::env::temp_dir().join(format!("pinacle-vite-{}", std::process::id()));
    let app_dir = dir.join("app");
    std::fs::create_dir_all(&app_dir).unwrap();
    for file in ["index.html", "main.js", "message.js"] {
        std::fs::copy(browser.join("vite-app").join(file), app_dir.join(file)).unwrap();
    }
    let vite = browser.join("node_modules/vite/bin/vite.js");
    hot_reloads_through_the_ingress(&dir, &app_dir, &app_dir.join("message.js"), |port| {
        let mut cmd = Command::new("node");
        cmd.arg(&vite).args([
            "--port",
            &port.to_string(),
            "--strictPort",
            "--host",
            "127.0.0.1",
        ]);
        cmd
    })
    .await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Next.js (`next dev`, Turbopack, Fast Refresh over `/_next/webpack-hmr`): the slowest test of
/// the suite (a first compile), run in CI all the same.
#[tokio::test]
async fn next_dev_fast_refreshes_through_the_ingress_top_level_and_inside_the_workbench_frame() {
    let browser = repo().join("testkit/browser");
    assert!(
        browser.join("node_modules/next").is_dir(),
        "Next.js is not installed: run scripts/test (it runs npm ci in testkit/browser)"
    );
    let dir = scratch("pinacle-next");
    // Inside testkit/browser, so that `next` and `react` resolve from its node_modules.
    let app_dir = browser.join(format!(".next-run-{}", std::process::id()));
    std::fs::create_dir_all(app_dir.join("app")).unwrap();
    std::fs::copy(
        browser.join("next-app/next.config.mjs"),
        app_dir.join("next.config.mjs"),
    )
    .unwrap();
    for file in ["layout.js", "page.js", "message.js"] {
        std::fs::copy(
            browser.join("next-app/app").join(file),
            app_dir.join("app").join(file),
        )
        .unwrap();
    }
    let next = browser.join("node_modules/next/dist/bin/next");
    hot_reloads_through_the_ingress(&dir, &app_dir, &app_dir.join("app/message.js"), |port| {
        let mut cmd = Command::new("node");
        cmd.arg(&next).args([
            "dev",
            "--port",
            &port.to_string(),
            "--hostname",
            "127.0.0.1",
        ]);
        cmd
    })
    .await;
    std::fs::remove_dir_all(&app_dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_port_that_starts_later_turns_from_our_page_into_the_app() {
    let dir = scratch("pinacle-waiting");
    // The pod's real nginx; nothing listens on the app's port yet.
    let app = reserve_port();
    let (_nginx, nginx_port) = pod_nginx(app, "waiting").await;
    let (listen, tls, dashboard) = (reserve_port(), reserve_port(), reserve_port());
    let _ingress = https_ingress(&dir, nginx_port, listen, tls, dashboard);
    for port in [listen, tls] {
        wait_for_port(SocketAddr::from(([127, 0, 0, 1], port))).await;
    }
    let token = demo_proxy_token(app);
    let url = format!(
        "https://localhost-{app}-pod-demo.localhost:{tls}/pinacle-proxy-callback?token={token}&return_url=%2F"
    );
    let seen = node_script("waiting.mjs", vec![url.into(), app.to_string().into()]).await;
    let before = seen["before"]["text"].as_str().unwrap();
    for expected in [
        "Nothing is listening on this port yet",
        &format!("Pod demo, port {app}"),
    ] {
        assert!(before.contains(expected), "{expected} not in {before}");
    }
    assert_eq!(seen["after"]["title"], "the app");
    assert_eq!(
        seen["after"]["url"],
        format!("https://localhost-{app}-pod-demo.localhost:{tls}/")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_stopped_pods_page_follows_its_status_and_opens_the_pod_once_it_runs() {
    let pod = upstream::http_echo("woken-pod").await;
    let dir = scratch("pinacle-follow");
    let (listen, tls, dashboard) = (reserve_port(), reserve_port(), reserve_port());
    // The example directory's stopped pod `sleepy`, published on this test's pod.
    let ingress = https_ingress(&dir, pod.addr.port(), listen, tls, dashboard);
    let stopped = std::fs::read_to_string(dir.join("directory.toml"))
        .unwrap()
        .replace(
            "external = 30002",
            &format!("external = {}", pod.addr.port()),
        );
    std::fs::write(dir.join("directory.toml"), &stopped).unwrap();
    let started = stopped.replacen("status = \"stopped\"", "status = \"running\"", 1);
    assert_ne!(started, stopped);
    wait_for_port(SocketAddr::from(([127, 0, 0, 1], tls))).await;
    // The token is for the stopped pod (its id in the example directory).
    let minted = clean(Command::new(BIN))
        .args(["session", "mint", "--user", "user_ada", "--pod", "sleepy"])
        .args(["--pod-id", "pod_stopped", "--port", "3000"])
        .env("NEXTAUTH_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(minted.status.success());
    let token = String::from_utf8(minted.stdout).unwrap();
    let token = token.trim().strip_prefix("pinacle-proxy-token=").unwrap();
    let url = format!(
        "https://localhost-3000-pod-sleepy.localhost:{tls}/pinacle-proxy-callback?token={token}&return_url=%2Fdocs%3Fpage%3D2"
    );
    let seen = node_script(
        "follow.mjs",
        vec![
            url.into(),
            dir.join("directory.toml").into(),
            started.into(),
            ingress.0.id().to_string().into(),
        ],
    )
    .await;
    let before = seen["before"]["text"].as_str().unwrap();
    for expected in [
        "This pod is not running",
        "stopped",
        "follows the pod's status",
    ] {
        assert!(before.contains(expected), "{expected} not in {before}");
    }
    assert_eq!(
        seen["after"]["url"],
        format!("https://localhost-3000-pod-sleepy.localhost:{tls}/docs?page=2")
    );
    let echo: serde_json::Value =
        serde_json::from_str(seen["after"]["text"].as_str().unwrap()).unwrap();
    assert_eq!(echo["name"], "woken-pod");
    assert_eq!(echo["path"], "/docs?page=2");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The secret the control-plane stand-in and the ingress share.
const CONTROL_SECRET: &str = "browser-control-secret-of-32-bytes";

/// A proxy token for `user` on `slug` (pod id `pod_id`), port 3000.
fn proxy_token_for(user: &str, slug: &str, pod_id: &str) -> String {
    let minted = clean(Command::new(BIN))
        .args(["session", "mint", "--user", user, "--pod", slug])
        .args(["--pod-id", pod_id, "--port", "3000"])
        .env("NEXTAUTH_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(minted.status.success());
    String::from_utf8(minted.stdout)
        .unwrap()
        .trim()
        .strip_prefix("pinacle-proxy-token=")
        .unwrap()
        .to_owned()
}

/// `DATABASE_URL` for the binary: the test's own database on the suite's server.
fn database_url_of(pool: &sqlx::PgPool) -> String {
    let base = std::env::var("DATABASE_URL").unwrap();
    let mut url = url::Url::parse(&base).unwrap();
    url.set_path(pool.connect_options().get_database().unwrap());
    url.to_string()
}

/// A control-plane stand-in that flips the status in Postgres as a real one would: `starting`
/// (`stopping`) at once, `running` (`stopped`) a second and a half later.
async fn flipping_control_plane(pool: &sqlx::PgPool) -> pinacle_testkit::control::ControlPlane {
    let pool = pool.clone();
    let on_action: pinacle_testkit::control::OnAction = std::sync::Arc::new(move |act, pod| {
        let pool = pool.clone();
        Box::pin(async move {
            let (now, then) = match act.as_str() {
                "start" => ("starting", "running"),
                _ => ("stopping", "stopped"),
            };
            let set = |status: &'static str, pool: sqlx::PgPool, pod: String| async move {
                sqlx::query("UPDATE pod SET status = $1 WHERE id = $2")
                    .bind(status)
                    .bind(pod)
                    .execute(&pool)
                    .await
                    .unwrap();
            };
            set(now, pool.clone(), pod.clone()).await;
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
                set(then, pool, pod).await;
            });
        })
    });
    pinacle_testkit::control::ControlPlane::start(CONTROL_SECRET, on_action).await
}

/// `ada`'s team, server `s1`, and her pods `sleepy` (stopped) and `awake` (running), both
/// published on `pod_port`.
async fn seed_lifecycle(pool: &sqlx::PgPool, pod_port: u16) {
    let seed = pinacle_authz::testing::Seed(pool);
    seed.people().await.unwrap();
    seed.server("s1", "127.0.0.1").await.unwrap();
    seed.team_pods(
        "s1",
        &[
            ("p_sleepy", "sleepy", "stopped", pod_port),
            ("p_awake", "awake", "running", pod_port),
        ],
    )
    .await
    .unwrap();
}

/// The binary over the test's database, with the control plane at `control`.
fn lifecycle_ingress(
    dir: &std::path::Path,
    pool: &sqlx::PgPool,
    control: &str,
    listen: u16,
    extra: &[(&str, &str)],
) -> Process {
    std::fs::write(dir.join("directory.toml"), "").unwrap();
    let mut ingress = serve(dir, listen, reserve_port());
    ingress
        .env_remove("PINACLE_INGRESS_DIRECTORY_FILE")
        .env("DATABASE_URL", database_url_of(pool))
        .env("PINACLE_INGRESS_CONTROL_URL", control)
        .env("PINACLE_INGRESS_CONTROL_SECRET", CONTROL_SECRET)
        .env("PINACLE_INGRESS_AUTHZ_DENY_TTL", "30s");
    for (k, v) in extra {
        ingress.env(k, v);
    }
    Process(ingress.spawn().unwrap())
}

/// Where the screenshots of the lifecycle tests go (kept: `target/screenshots`).
fn screenshots() -> PathBuf {
    let dir = repo().join("target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[sqlx::test(migrations = "../migrations")]
async fn start_on_a_stopped_pods_page_reaches_the_control_plane_and_lands_on_the_pod(
    pool: sqlx::PgPool,
) {
    let pod = upstream::http_echo("started-pod").await;
    seed_lifecycle(&pool, pod.addr.port()).await;
    let control = flipping_control_plane(&pool).await;
    let dir = scratch("pinacle-lifecycle-start");
    let listen = reserve_port();
    let _ingress = lifecycle_ingress(&dir, &pool, &control.url(), listen, &[]);
    wait_for_port(SocketAddr::from(([127, 0, 0, 1], listen))).await;
    let token = proxy_token_for("ada", "sleepy", "p_sleepy");
    let url = format!(
        "http://localhost-3000-pod-sleepy.localhost:{listen}/pinacle-proxy-callback?token={token}&return_url=%2Fdocs%3Fpage%3D2"
    );
    let shots = screenshots();
    let seen = node_script(
        "lifecycle.mjs",
        vec!["start".into(), url.into(), shots.clone().into()],
    )
    .await;
    let before = &seen["before"];
    assert_eq!(before["title"], "This pod is not running");
    assert_eq!(before["status"], "stopped");
    assert_eq!(
        (before["start"].as_bool(), before["startEnabled"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(before["stop"], false);
    let during = &seen["during"];
    assert_eq!(during["message"], "Starting the pod\u{2026}");
    assert_eq!(during["startEnabled"], false);
    // The click reached the stand-in with the contract's claims.
    let calls = control.calls_to("/start");
    assert_eq!(calls.len(), 1, "{calls:?}");
    let claims = calls[0]
        .claims
        .clone()
        .unwrap_or_else(|| panic!("{:?}", calls[0].token_error));
    assert_eq!(calls[0].path, "/api/ingress/pods/p_sleepy/start");
    assert_eq!(
        (claims["sub"].as_str(), claims["act"].as_str()),
        (Some("ada"), Some("start"))
    );
    // And the page landed on the pod at the path first asked for.
    assert_eq!(
        seen["after"]["url"],
        format!("http://localhost-3000-pod-sleepy.localhost:{listen}/docs?page=2")
    );
    let echo: serde_json::Value =
        serde_json::from_str(seen["after"]["text"].as_str().unwrap()).unwrap();
    assert_eq!(
        (echo["name"].as_str(), echo["path"].as_str()),
        (Some("started-pod"), Some("/docs?page=2"))
    );
    for step in ["before", "during"] {
        assert!(
            std::fs::metadata(shots.join(format!("start-{step}.png")))
                .unwrap()
                .len()
                > 1000
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn stop_on_a_running_pods_status_page_then_start_again_and_open_it(pool: sqlx::PgPool) {
    let pod = upstream::http_echo("stopped-pod").await;
    seed_lifecycle(&pool, pod.addr.port()).await;
    let control = flipping_control_plane(&pool).await;
    let dir = scratch("pinacle-lifecycle-stop");
    let listen = reserve_port();
    let _ingress = lifecycle_ingress(&dir, &pool, &control.url(), listen, &[]);
    wait_for_port(SocketAddr::from(([127, 0, 0, 1], listen))).await;
    let token = proxy_token_for("ada", "awake", "p_awake");
    let url = format!(
        "http://localhost-3000-pod-awake.localhost:{listen}/pinacle-proxy-callback?token={token}&return_url=%2F__pinacle%2Fstatus"
    );
    let seen = node_script(
        "lifecycle.mjs",
        vec!["stop".into(), url.into(), screenshots().into()],
    )
    .await;
    let before = &seen["before"];
    assert_eq!(
        (before["title"].as_str(), before["status"].as_str()),
        (Some("Pod status"), Some("running"))
    );
    assert_eq!(
        (before["stop"].as_bool(), before["start"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(seen["during"]["message"], "Stopping the pod\u{2026}");
    let stopped = &seen["stopped"];
    assert_eq!(
        (stopped["start"].as_bool(), stopped["stop"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(seen["running"]["status"], "running");
    let acts: Vec<String> = control
        .calls()
        .iter()
        .map(|c| {
            c.claims.as_ref().unwrap()["act"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(acts, ["stop", "start"]);
    assert_eq!(
        seen["after"]["url"],
        format!("http://localhost-3000-pod-awake.localhost:{listen}/")
    );
    assert!(
        seen["after"]["text"]
            .as_str()
            .unwrap()
            .contains("stopped-pod")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn wake_on_request_opens_a_stopped_pod_without_a_click(pool: sqlx::PgPool) {
    let pod = upstream::http_echo("woken-pod").await;
    seed_lifecycle(&pool, pod.addr.port()).await;
    let control = flipping_control_plane(&pool).await;
    let dir = scratch("pinacle-lifecycle-wake");
    let listen = reserve_port();
    let _ingress = lifecycle_ingress(
        &dir,
        &pool,
        &control.url(),
        listen,
        &[("PINACLE_INGRESS_WAKE_ON_REQUEST", "true")],
    );
    wait_for_port(SocketAddr::from(([127, 0, 0, 1], listen))).await;
    let token = proxy_token_for("ada", "sleepy", "p_sleepy");
    let url = format!(
        "http://localhost-3000-pod-sleepy.localhost:{listen}/pinacle-proxy-callback?token={token}&return_url=%2Fnotes%2F7"
    );
    let seen = node_script(
        "lifecycle.mjs",
        vec!["wake".into(), url.into(), screenshots().into()],
    )
    .await;
    assert!(
        seen["first"]["text"]
            .as_str()
            .unwrap()
            .contains("It is being started now"),
        "{}",
        seen["first"]
    );
    assert_eq!(
        seen["after"]["url"],
        format!("http://localhost-3000-pod-sleepy.localhost:{listen}/notes/7")
    );
    let calls = control.calls_to("/start");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].claims.as_ref().unwrap()["sub"], "ada");
    std::fs::remove_dir_all(&dir).unwrap();
}
