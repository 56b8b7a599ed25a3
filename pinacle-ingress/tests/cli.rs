//! The operator CLI contract, run as a real process: JSON shape and exit status of
//! `session inspect` over the credential fixtures, `session mint` round-trips, `migrate` on Postgres.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_pinacle-ingress");

fn fixture(name: &str) -> Value {
    pinacle_authz::testing::nextauth_fixture(name)
}

fn ingress(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for var in [
        "NEXTAUTH_SECRET",
        "AUTH_SECRET",
        "NEXTAUTH_SECRET_FILE",
        "AUTH_SECRET_FILE",
        "DATABASE_URL",
        "NEXTAUTH_URL",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `session inspect` on a fixture case's Cookie header at the case's `now`.
fn inspect_case(case: &Value, secret: (&str, &str)) -> Output {
    let now = case["now"].to_string();
    let header = case["cookie_header"].as_str().unwrap();
    ingress(
        &[
            "session",
            "inspect",
            "--cookie-header",
            header,
            "--now",
            &now,
        ],
        &[secret],
    )
}

#[test]
fn inspect_reports_every_fixture_case_with_the_right_exit_status() {
    let fixture = fixture("public.json");
    for case in fixture["cases"].as_array().unwrap() {
        let out = inspect_case(case, ("NEXTAUTH_SECRET", case["secret"].as_str().unwrap()));
        let report = json_of(&out);
        let name = case["name"].as_str().unwrap();
        let expect = case["expect"].as_str().unwrap();
        let want_outcome = match expect {
            "valid" | "expired" => expect,
            _ => "invalid",
        };
        assert_eq!(report["outcome"], want_outcome, "{name}: {report}");
        assert_eq!(
            out.status.code(),
            Some(if expect == "valid" { 0 } else { 1 }),
            "{name}"
        );
        assert_eq!(report["cookie"], case["cookie_name"], "{name}");
        let kind = if case["library"] == "authjs-v5" {
            "authjs-v5"
        } else {
            "nextauth-v4"
        };
        assert_eq!(report["kind"], kind, "{name}");
        if expect == "valid" {
            assert_eq!(report["claims"], case["claims"], "{name}");
            assert!(report["user_id"].is_string(), "{name}");
        }
        if want_outcome == "invalid" {
            assert!(report["reason"].is_string(), "{name}: {report}");
        }
    }
}

#[test]
fn inspect_reports_proxy_tokens() {
    let fixture = fixture("proxy-token-public.json");
    let secret = fixture["secret"].as_str().unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let out = inspect_case(case, ("AUTH_SECRET", secret));
        let report = json_of(&out);
        assert_eq!(report["outcome"], case["expect"], "{}", case["name"]);
        assert_eq!(report["kind"], "proxy-token");
        if case["expect"] == "valid" {
            assert_eq!(report["user_id"], case["user_id"]);
            assert_eq!(report["scope"]["pod_slug"], case["pod_slug"]);
        }
    }
}

#[test]
fn missing_cookie_exits_1_and_usage_errors_exit_2() {
    let out = ingress(
        &["session", "inspect", "--cookie-header", "theme=dark"],
        &[("NEXTAUTH_SECRET", "s")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json_of(&out)["outcome"], "missing");
    // No secret configured.
    let out = ingress(&["session", "inspect", "--cookie-header", "a=b"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NEXTAUTH_SECRET"));
    // Missing argument, unknown flag.
    assert_eq!(
        ingress(&["session", "inspect"], &[("NEXTAUTH_SECRET", "s")])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        ingress(&["session", "inspect", "--bogus"], &[])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn minted_cookie_inspects_as_valid_and_mint_refuses_without_a_secret() {
    assert_eq!(
        ingress(&["session", "mint", "--user", "ada"], &[])
            .status
            .code(),
        Some(2)
    );
    let out = ingress(
        &["session", "mint", "--user", "ada"],
        &[("NEXTAUTH_SECRET", "dev-only")],
    );
    assert!(out.status.success());
    let cookie = String::from_utf8(out.stdout).unwrap();
    let out = ingress(
        &["session", "inspect", "--cookie-header", cookie.trim()],
        &[("NEXTAUTH_SECRET", "dev-only")],
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json_of(&out)["user_id"], "ada");
}

#[test]
fn migrate_creates_the_dashboard_tables() {
    let Ok(master) = std::env::var("DATABASE_URL") else {
        panic!("DATABASE_URL must point at a Postgres server (scripts/test sets it)");
    };
    let name = format!("pinacle_cli_migrate_{}", std::process::id());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let admin = rt.block_on(sqlx::PgPool::connect(&master)).unwrap();
    rt.block_on(sqlx::query(&format!("DROP DATABASE IF EXISTS {name}")).execute(&admin))
        .unwrap();
    rt.block_on(sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin))
        .unwrap();
    let url = {
        let mut u = master.clone();
        let cut = u.rfind('/').unwrap();
        u.truncate(cut);
        format!("{u}/{name}")
    };
    // check-config --connect: the database answers, but the tables are not there yet.
    let check = |url: &str| {
        ingress(
            &["check-config", "--connect"],
            &[("DATABASE_URL", url), ("NEXTAUTH_SECRET", "s")],
        )
    };
    let out = check(&url);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("DATABASE_URL: connected, but these tables are missing: user, team"),
        "{text}"
    );
    let out = ingress(&["migrate"], &[("DATABASE_URL", &url)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = check(&url);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("directory postgres"));
    // Twice is fine: applied migrations are recorded.
    assert!(
        ingress(&["migrate"], &[("DATABASE_URL", &url)])
            .status
            .success()
    );
    let db = rt.block_on(sqlx::PgPool::connect(&url)).unwrap();
    let tables: Vec<String> = rt
        .block_on(
            sqlx::query_scalar(
                "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
            )
            .fetch_all(&db),
        )
        .unwrap();
    for t in [
        "pod",
        "server",
        "session",
        "team",
        "team_member",
        "user",
        "pinacle_agent",
    ] {
        assert!(tables.iter().any(|x| x == t), "{t} missing from {tables:?}");
    }
    agent_register_and_revoke(&rt, &db, &url);
    rt.block_on(db.close());
    rt.block_on(sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)")).execute(&admin))
        .unwrap();
    assert_eq!(ingress(&["migrate"], &[]).status.code(), Some(2));
}

/// `agent register` stores only the secret's SHA-256 and prints the secret last; again, a new
/// secret replaces it; `agent revoke` removes it.
fn agent_register_and_revoke(rt: &tokio::runtime::Runtime, db: &sqlx::PgPool, url: &str) {
    use sha2::Digest as _;
    rt.block_on(
        sqlx::query("INSERT INTO server (id, hostname, ip_address, status) VALUES ('s1', 's1', '192.0.2.1', 'online')")
            .execute(db),
    )
    .unwrap();
    let register = || {
        ingress(
            &["agent", "register", "--server", "s1"],
            &[("DATABASE_URL", url)],
        )
    };
    let stored = || -> Vec<String> {
        rt.block_on(
            sqlx::query_scalar("SELECT secret_sha256 FROM pinacle_agent WHERE server_id = 's1'")
                .fetch_all(db),
        )
        .unwrap()
    };
    let mut secrets = Vec::new();
    for _ in 0..2 {
        let out = register();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let secret = text.lines().last().unwrap().to_owned();
        assert_eq!(secret.len(), 64, "{text}");
        let digest: String = sha2::Sha256::digest(secret.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(stored(), vec![digest.clone()]);
        assert!(
            text.contains(&format!(
                "[[agents]]\nserver_id = \"s1\"\nsecret_sha256 = \"{digest}\""
            )),
            "{text}"
        );
        assert!(
            !text.contains(&format!("= \"{secret}\"")),
            "the secret is stored: {text}"
        );
        secrets.push(secret);
    }
    assert_ne!(secrets[0], secrets[1]);
    let unknown = ingress(
        &["agent", "register", "--server", "nope"],
        &[("DATABASE_URL", url)],
    );
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("does the server exist"));
    let revoke = || {
        ingress(
            &["agent", "revoke", "--server", "s1"],
            &[("DATABASE_URL", url)],
        )
    };
    assert_eq!(revoke().status.code(), Some(0));
    assert!(stored().is_empty());
    assert_eq!(revoke().status.code(), Some(1));
    // Without a database: the row to put in a directory file, and no revoking.
    let out = ingress(&["agent", "register", "--server", "s1"], &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("add this row to the directory file"));
    assert_eq!(
        ingress(&["agent", "revoke", "--server", "s1"], &[])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn render_nginx_prints_the_config_or_exits_2_naming_the_field() {
    let example =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/pod-nginx.example.toml");
    let out = ingress(
        &["render-nginx", "--pod-config", example.to_str().unwrap()],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text,
        nginx_templates::render_text(&std::fs::read_to_string(&example).unwrap()).unwrap()
    );
    let bad = std::env::temp_dir().join(format!("pinacle-bad-pod-{}.json", std::process::id()));
    std::fs::write(&bad, r#"{"allowed_ports": [3000, 70000]}"#).unwrap();
    let out = ingress(
        &["render-nginx", "--pod-config", bad.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("allowed_ports[1]"));
    std::fs::remove_file(&bad).ok();
    let out = ingress(&["render-nginx", "--pod-config", "/nonexistent.toml"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn version_names_the_commit() {
    let out = ingress(&["--version"], &[]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let commit = text
        .split("(commit ")
        .nth(1)
        .and_then(|rest| rest.strip_suffix(")\n"))
        .unwrap_or_else(|| panic!("no commit in {text:?}"));
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{text:?}"
    );
    assert!(text.starts_with(&format!("pinacle-ingress {}", env!("CARGO_PKG_VERSION"))));
}

/// Runs the binary with `stdin` piped in.
fn ingress_with_stdin(args: &[&str], env: &[(&str, &str)], stdin: &str) -> Output {
    use std::io::Write;
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("NEXTAUTH_SECRET")
        .env_remove("DATABASE_URL")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn inspect_takes_a_cookie_line_a_bare_token_or_stdin() {
    let env = [("NEXTAUTH_SECRET", "dev-only")];
    let cookie =
        String::from_utf8(ingress(&["session", "mint", "--user", "ada"], &env).stdout).unwrap();
    let cookie = cookie.trim();
    let token = cookie.split_once('=').unwrap().1;
    for (args, stdin) in [
        (vec!["session", "inspect", cookie], String::new()),
        (vec!["session", "inspect", token], String::new()),
        (
            vec!["session", "inspect", "-"],
            format!("Cookie: theme=dark; {cookie}\n"),
        ),
        (vec!["session", "inspect"], format!("{token}\n")),
    ] {
        let out = ingress_with_stdin(&args, &env, &stdin);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        assert_eq!(json_of(&out)["user_id"], "ada", "{args:?}");
    }
    // A proxy token, bare.
    let out = ingress(
        &[
            "session", "mint", "--user", "ada", "--pod", "demo", "--pod-id", "pod_1", "--port",
            "3000",
        ],
        &env,
    );
    assert!(out.status.success(), "{out:?}");
    let line = String::from_utf8(out.stdout).unwrap();
    let token = line.trim().strip_prefix("pinacle-proxy-token=").unwrap();
    let out = ingress(&["session", "inspect", token], &env);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let report = json_of(&out);
    assert_eq!(report["kind"], "proxy-token");
    assert_eq!(report["user_id"], "ada");
}

#[test]
fn mint_refuses_cookie_names_the_ingress_does_not_read() {
    let env = [("NEXTAUTH_SECRET", "dev-only")];
    // Never with a production dashboard's environment.
    let out = ingress(
        &["session", "mint", "--user", "ada"],
        &[
            ("NEXTAUTH_SECRET", "prod"),
            ("NEXTAUTH_URL", "https://pinacle.dev"),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("development secrets only"));
    for name in [
        "session",
        "next-auth.session-token.0",
        "authjs.session-token",
    ] {
        let out = ingress(
            &["session", "mint", "--user", "ada", "--cookie-name", name],
            &env,
        );
        assert_eq!(out.status.code(), Some(2), "{name}: {out:?}");
    }
    let out = ingress(
        &[
            "session",
            "mint",
            "--user",
            "ada",
            "--cookie-name",
            "__Secure-next-auth.session-token",
        ],
        &env,
    );
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn completions_and_the_manual_page_come_from_the_cli() {
    let bash = ingress(&["completions", "bash"], &[]);
    assert!(bash.status.success(), "{bash:?}");
    let text = String::from_utf8_lossy(&bash.stdout);
    for word in ["pinacle-ingress", "serve", "check-config", "session"] {
        assert!(text.contains(word), "{word} not in the bash completions");
    }
    let man = ingress(&["man"], &[]);
    assert!(man.status.success(), "{man:?}");
    let text = String::from_utf8_lossy(&man.stdout);
    assert!(
        text.starts_with(".ie") || text.contains(".TH"),
        "{text:.200}"
    );
    assert!(text.contains("pinacle\\-ingress"), "{text:.400}");
}

#[test]
fn config_show_prints_the_effective_configuration_without_secrets() {
    let out = ingress(
        &["config", "show"],
        &[
            ("NEXTAUTH_SECRET", "show-me-never"),
            (
                "DATABASE_URL",
                "postgres://ingress:pa55word@db.internal/pinacle",
            ),
            ("PINACLE_INGRESS_THREADS", "3"),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("threads = 3\n"), "{text}");
    assert!(text.contains("ingress:REDACTED@db.internal"), "{text}");
    assert!(
        !text.contains("show-me-never") && !text.contains("pa55word"),
        "{text}"
    );
    // Invalid: every problem, exit 1.
    let out = ingress(&["config", "show"], &[("PINACLE_INGRESS_THREADS", "0")]);
    assert_eq!(out.status.code(), Some(1));
}
