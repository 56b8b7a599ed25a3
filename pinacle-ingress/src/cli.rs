//! The command line: argument model and the small commands (`session inspect|mint`, `migrate`).
//! Exit status: 0 success (for `inspect`: valid), 1 a negative answer, 2 usage or setup errors.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use pinacle_authz::{
    Authorizer, AuthorizerConfig, Claims, CredentialConfig, CredentialVerifier, Outcome,
    PostgresDirectory, PostgresOptions, Secret, Verification,
};

use crate::inspect;
use crate::secrets::secrets_from_process_env;

/// Pinacle's ingress: pod hosts to pods, every other host to the dashboard.
#[derive(Debug, Parser)]
#[command(name = "pinacle-ingress", version = crate::LONG_VERSION, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect or mint dashboard session cookies.
    #[command(subcommand)]
    Session(SessionCommand),
    /// Reverse-tunnel agents of pod servers the ingress cannot dial (`pinacle-agent`).
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Apply `migrations/` to `DATABASE_URL` (tests and standalone use; never against the
    /// dashboard's own database, whose schema Drizzle owns).
    Migrate,
    /// Run the ingress (until SIGTERM: graceful, SIGINT: fast).
    ///
    /// The pod directory is `DATABASE_URL` (the dashboard's Postgres), else `directory_file`;
    /// with neither it refuses to start (exit 2) unless `--demo` is given.
    Serve {
        /// A TOML configuration file (see config/ingress.example.toml); `PINACLE_INGRESS_*`
        /// variables override it.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Take the listening sockets over from the running process (zero-downtime restart:
        /// start this, then send the old process SIGQUIT; see the README).
        #[arg(long)]
        upgrade: bool,
        /// Allow the embedded demo pod directory when neither `DATABASE_URL` nor
        /// `directory_file` is set (development only: it grants the demo users access).
        #[arg(long)]
        demo: bool,
    },
    /// Validate the configuration (file and environment) without starting; exit 1 listing
    /// every problem.
    CheckConfig {
        /// The TOML configuration file.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Accept the embedded demo directory, as `serve --demo` does.
        #[arg(long)]
        demo: bool,
        /// Also connect to `DATABASE_URL` and check that the tables the ingress reads exist.
        #[arg(long)]
        connect: bool,
    },
    /// Print the nginx config for a pod (the second hop) from a JSON or TOML description.
    RenderNginx {
        /// The pod's description (see config/pod-nginx.example.toml).
        #[arg(long)]
        pod_config: std::path::PathBuf,
    },
    /// The configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script (e.g. `pinacle-ingress completions bash >
    /// /etc/bash_completion.d/pinacle-ingress`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `pinacle-ingress man > pinacle-ingress.1`.
    Man,
}

/// `config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (file, `PINACLE_INGRESS_*` and defaults applied) as
    /// TOML, secrets redacted, like `nginx -T`; exit 1 with every problem when it is invalid.
    Show {
        /// The TOML configuration file.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Accept the embedded demo directory, as `serve --demo` does.
        #[arg(long)]
        demo: bool,
    },
}

/// `agent ...`
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Register the agent of a server (again: a new secret replaces the old one, whose agent
    /// is disconnected). With `DATABASE_URL` the row is stored (only the secret's SHA-256);
    /// either way the `[[agents]]` row for a directory file is printed, and the secret, shown
    /// this once, is the last line of stdout.
    Register {
        /// The server (`server.id`).
        #[arg(long)]
        server: String,
    },
    /// Remove a server's agent (`DATABASE_URL`): every gateway disconnects it within seconds;
    /// the server's pods are then dialed directly again (behind NAT: 502 or 504) until an
    /// agent is registered anew.
    Revoke {
        /// The server (`server.id`).
        #[arg(long)]
        server: String,
    },
}

/// `session` subcommands.
#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Decode the credentials in a Cookie header and print one JSON object.
    ///
    /// The input is a whole `Cookie: ...` line, a header value, or a bare token; `-` (or
    /// nothing) reads it from stdin, which keeps cookies out of the shell history.
    Inspect {
        /// What to inspect; `-` or absent: stdin.
        input: Option<String>,
        /// The Cookie header value (kept for scripts; prefer the argument or stdin).
        #[arg(long, conflicts_with = "input")]
        cookie_header: Option<String>,
        /// Evaluate at this time (unix seconds) instead of now.
        #[arg(long)]
        now: Option<i64>,
    },
    /// Print a next-auth v4 session cookie for a user, or with `--port` a proxy token for a pod
    /// (development: needs an explicit secret).
    Mint {
        /// The user id to put in `id` and `sub` (`userId` in a proxy token).
        #[arg(long)]
        user: String,
        /// Lifetime in seconds (a proxy token: 900, as the dashboard mints them).
        #[arg(long)]
        ttl_secs: Option<i64>,
        /// The session cookie name to print: one the ingress reads.
        #[arg(long, default_value = "next-auth.session-token")]
        cookie_name: String,
        /// Mint a proxy token for this port of `--pod` instead of a session cookie.
        #[arg(long, requires_all = ["pod", "pod_id"])]
        port: Option<u16>,
        /// The pod's slug (proxy token).
        #[arg(long)]
        pod: Option<String>,
        /// The pod's id (proxy token).
        #[arg(long)]
        pod_id: Option<String>,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Session(SessionCommand::Inspect {
            input,
            cookie_header,
            now,
        }) => {
            inspect_input(input.or(cookie_header)).and_then(|header| session_inspect(&header, now))
        }
        Command::Session(SessionCommand::Mint {
            user,
            ttl_secs,
            cookie_name,
            port,
            pod,
            pod_id,
        }) => match (port, pod, pod_id) {
            (Some(port), Some(pod), Some(pod_id)) => {
                proxy_token_mint(&user, &pod, &pod_id, port, ttl_secs.unwrap_or(900))
            }
            _ => session_mint(&user, ttl_secs.unwrap_or(30 * 24 * 3600), &cookie_name),
        },
        Command::Migrate => migrate(),
        Command::Agent(AgentCommand::Register { server }) => agent_register(&server),
        Command::Agent(AgentCommand::Revoke { server }) => agent_revoke(&server),
        Command::RenderNginx { pod_config } => render_nginx(&pod_config),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(
                shell,
                &mut command,
                "pinacle-ingress",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
            .render(&mut std::io::stdout())
            .map(|()| ExitCode::SUCCESS)
            .context("writing the manual page"),
        Command::Serve {
            config,
            upgrade,
            demo,
        } => serve(config.as_deref(), upgrade, demo),
        Command::CheckConfig {
            config,
            demo,
            connect,
        } => check_config(config.as_deref(), demo, connect),
        Command::Config(ConfigCommand::Show { config, demo }) => {
            config_show(config.as_deref(), demo)
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("pinacle-ingress: {e:#}");
        ExitCode::from(2)
    })
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn required_secrets() -> anyhow::Result<Vec<Secret>> {
    let secrets = secrets_from_process_env()?;
    if secrets.is_empty() {
        bail!(
            "set NEXTAUTH_SECRET (or AUTH_SECRET, or a *_FILE variant) to the dashboard's secret"
        );
    }
    Ok(secrets)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn postgres_from_env() -> anyhow::Result<Option<PostgresDirectory>> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Ok(Some(PostgresDirectory::connect_lazy(
            &url,
            &PostgresOptions::default(),
        )?)),
        _ => Ok(None),
    }
}

#[allow(clippy::print_stdout)] // printing the report is this command's job
fn session_inspect(cookie_header: &str, now: Option<i64>) -> anyhow::Result<ExitCode> {
    let verifier = CredentialVerifier::new(&CredentialConfig::with_secrets(required_secrets()?))?;
    let now = now.unwrap_or_else(unix_now);
    let verification = verifier.inspect(cookie_header, now).verification;
    let needs_directory = match &verification {
        Verification::DatabaseSessions(_) => true,
        Verification::Decided(Outcome::Valid(p)) => p.impersonated_by.is_some(),
        Verification::Decided(_) => false,
    };
    let outcome = match (verification, needs_directory) {
        (Verification::Decided(outcome), false) => outcome,
        (verification, _) => {
            let rt = runtime()?;
            let _context = rt.enter(); // the pool needs a runtime to exist in
            let Some(directory) = postgres_from_env()? else {
                bail!(
                    "this cookie needs the database (a database session or an impersonation): \
                     set DATABASE_URL"
                );
            };
            let authorizer =
                Authorizer::new(std::sync::Arc::new(directory), &AuthorizerConfig::default());
            rt.block_on(authorizer.resolve(verification, now))?
        }
    };
    println!("{}", inspect::report(&outcome));
    Ok(if matches!(outcome, Outcome::Valid(_)) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The Cookie header to inspect from what was given: `-` or nothing reads stdin; a leading
/// `Cookie:` is dropped; a bare token (no `=`) is tried as a proxy token (three segments) or
/// under every session cookie name the ingress reads.
fn inspect_input(input: Option<String>) -> anyhow::Result<String> {
    let text = match input.as_deref() {
        None | Some("-") => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .context("reading the cookie from stdin")?;
            text
        }
        Some(given) => given.to_owned(),
    };
    let text = text.trim();
    let value = match text.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("cookie:") => {
            text.get(7..).unwrap_or("").trim()
        }
        _ => text,
    };
    if value.is_empty() {
        bail!("nothing to inspect: give a Cookie header, a token, or pipe one to stdin");
    }
    if value.contains('=') {
        return Ok(value.to_owned());
    }
    if value.split('.').count() == 3 {
        return Ok(format!("{}={value}", pinacle_authz::PROXY_TOKEN_COOKIE));
    }
    Ok(pinacle_authz::SessionCookie::defaults()
        .iter()
        .map(|c| format!("{}={value}", c.name))
        .collect::<Vec<_>>()
        .join("; "))
}

/// Minting is for development: never with a production dashboard's environment (an https
/// `NEXTAUTH_URL`), where a minted cookie would open every pod.
fn development_secrets() -> anyhow::Result<Vec<Secret>> {
    if std::env::var("NEXTAUTH_URL").is_ok_and(|url| url.starts_with("https://")) {
        bail!(
            "NEXTAUTH_URL is https: this looks like a production dashboard's environment, and \
             minting is for development secrets only; unset NEXTAUTH_URL to mint"
        );
    }
    required_secrets()
}

#[allow(clippy::print_stdout)] // printing the cookie is this command's job
fn session_mint(user: &str, ttl_secs: i64, cookie_name: &str) -> anyhow::Result<ExitCode> {
    let secrets = development_secrets()?;
    let user = pinacle_authz::UserId::new(user)?;
    if ttl_secs <= 0 {
        bail!("--ttl-secs must be positive");
    }
    let names = pinacle_authz::SessionCookie::defaults();
    if !names.iter().any(|c| c.name == cookie_name) {
        bail!(
            "the ingress does not read a cookie named {cookie_name:?}; use one of: {}",
            names
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if cookie_name.contains("authjs") {
        bail!(
            "only next-auth v4 cookies can be minted; use next-auth.session-token or its __Secure- form"
        );
    }
    let verifier = CredentialVerifier::new(&CredentialConfig::with_secrets(secrets))?;
    let now = unix_now();
    let claims = serde_json::json!({
        "sub": user.as_str(),
        "id": user.as_str(),
        "iat": now,
        "exp": now.saturating_add(ttl_secs),
    });
    let claims = Claims(claims.as_object().cloned().unwrap_or_default());
    let value = verifier.mint_session_v4(&claims)?;
    println!("{cookie_name}={value}");
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::print_stdout)] // printing the cookie is this command's job
fn proxy_token_mint(
    user: &str,
    pod: &str,
    pod_id: &str,
    port: u16,
    ttl_secs: i64,
) -> anyhow::Result<ExitCode> {
    let secrets = development_secrets()?;
    let user = pinacle_authz::UserId::new(user)?;
    let slug = pinacle_authz::PodSlug::parse(pod)?;
    let pod_id = pinacle_authz::PodId::new(pod_id)?;
    if port == 0 || !(1..=900).contains(&ttl_secs) {
        bail!("--port must be 1..=65535 and --ttl-secs 1..=900");
    }
    let verifier = CredentialVerifier::new(&CredentialConfig::with_secrets(secrets))?;
    let now = unix_now();
    let token = verifier.mint_proxy_token(&pinacle_authz::ProxyTokenClaims {
        user_id: user.as_str().to_owned(),
        pod_id: pod_id.as_str().to_owned(),
        pod_slug: slug.as_str().to_owned(),
        target_port: port,
        iat: now,
        exp: now.saturating_add(ttl_secs),
    })?;
    println!("{}={token}", pinacle_authz::PROXY_TOKEN_COOKIE);
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::print_stdout)]
fn migrate() -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    let _context = rt.enter();
    let Some(directory) = postgres_from_env()? else {
        bail!("set DATABASE_URL to the database to migrate");
    };
    rt.block_on(async {
        pinacle_authz::MIGRATOR
            .run(directory.pool())
            .await
            .context("applying migrations")
    })?;
    println!("migrations applied");
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::print_stdout)] // the row and the secret are this command's output
fn agent_register(server: &str) -> anyhow::Result<ExitCode> {
    let mut random = [0u8; 32];
    getrandom::fill(&mut random).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let secret = crate::hex::encode(&random);
    let digest = crate::agents::secret_digest(&secret);
    let rt = runtime()?;
    let _context = rt.enter();
    let stored = match postgres_from_env()? {
        Some(directory) => {
            rt.block_on(async {
                sqlx::query(
                    "INSERT INTO pinacle_agent (server_id, secret_sha256) VALUES ($1, $2) \
                     ON CONFLICT (server_id) DO UPDATE \
                     SET secret_sha256 = EXCLUDED.secret_sha256, created_at = now()",
                )
                .bind(server)
                .bind(&digest)
                .execute(directory.pool())
                .await
            })
            .with_context(|| {
                format!("registering the agent of server {server:?} (does the server exist, and did `pinacle-ingress migrate` run?)")
            })?;
            true
        }
        None => false,
    };
    if stored {
        println!("# stored in the database; for a directory file instead, this row:");
    } else {
        println!("# no DATABASE_URL: add this row to the directory file (and reload the ingress):");
    }
    println!("[[agents]]\nserver_id = {server:?}\nsecret_sha256 = \"{digest}\"");
    println!("# the agent's secret (shown once; give it to pinacle-agent --secret-file):");
    println!("{secret}");
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::print_stdout)] // what happened is this command's output
fn agent_revoke(server: &str) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    let _context = rt.enter();
    let Some(directory) = postgres_from_env()? else {
        bail!(
            "set DATABASE_URL (with a directory file, remove the server's [[agents]] row and reload)"
        );
    };
    let removed = rt
        .block_on(async {
            sqlx::query("DELETE FROM pinacle_agent WHERE server_id = $1")
                .bind(server)
                .execute(directory.pool())
                .await
        })
        .context("revoking the agent")?
        .rows_affected();
    if removed == 0 {
        println!("no agent is registered for server {server:?}");
        return Ok(ExitCode::from(1));
    }
    println!("revoked the agent of server {server:?}: gateways disconnect it within seconds");
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::print_stdout)] // the rendered config is this command's output
fn render_nginx(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let rendered =
        nginx_templates::render_text(&text).with_context(|| path.display().to_string())?;
    print!("{rendered}");
    Ok(ExitCode::SUCCESS)
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Why `serve` (and `check-config`) refuse a configuration without a pod directory.
const NO_DIRECTORY: &str = "no pod directory: set DATABASE_URL (the dashboard's Postgres) or \
     directory_file (PINACLE_INGRESS_DIRECTORY_FILE), or pass --demo to serve the embedded demo \
     directory (development only)";

/// The configuration `serve` would run, or every problem with it: the file and environment,
/// unknown `PINACLE_INGRESS_*` variables, a pod directory (file loaded, `DATABASE_URL` parsed).
fn load_for_serving(
    config: Option<&std::path::Path>,
    demo: bool,
) -> Result<crate::config::IngressConfig, String> {
    use crate::config::{ConfigError, DirectorySource, Problem};
    let names: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .collect();
    let mut problems = crate::config::unknown_env_vars(names.iter().map(String::as_str));
    let loaded = crate::config::load(config, &process_env);
    let problem = |key: &str, message: String| Problem {
        key: key.to_owned(),
        message,
    };
    match &loaded {
        Err(ConfigError(found)) => problems.extend(found.iter().cloned()),
        Ok(c) => match &c.directory {
            DirectorySource::EmbeddedDemo if !demo => {
                problems.push(problem("directory", NO_DIRECTORY.to_owned()));
            }
            DirectorySource::EmbeddedDemo => {}
            DirectorySource::File(path) => {
                if let Err(e) = pinacle_authz::FileDirectory::load(path) {
                    problems.push(problem("directory_file", e.to_string()));
                }
            }
            DirectorySource::Postgres(url) => {
                let parsed = std::str::from_utf8(url.expose())
                    .ok()
                    .and_then(|u| url::Url::parse(u).ok())
                    .filter(|u| matches!(u.scheme(), "postgres" | "postgresql"));
                if parsed.is_none() {
                    problems.push(problem(
                        "DATABASE_URL",
                        "not a postgres:// or postgresql:// URL".to_owned(),
                    ));
                }
            }
        },
    }
    match loaded {
        Ok(config) if problems.is_empty() => Ok(config),
        _ => Err(ConfigError(problems).to_string()),
    }
}

fn serve(path: Option<&std::path::Path>, upgrade: bool, demo: bool) -> anyhow::Result<ExitCode> {
    let config = match load_for_serving(path, demo) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("pinacle-ingress: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    crate::telemetry::init_logging(config.log_format, &config.log_filter);
    let path = path.map(std::path::Path::to_owned);
    let load = Box::new(move || load_for_serving(path.as_deref(), demo));
    crate::server::serve(config, unix_now, upgrade, load)?;
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::print_stdout)] // the verdict is this command's output
fn check_config(
    config: Option<&std::path::Path>,
    demo: bool,
    connect: bool,
) -> anyhow::Result<ExitCode> {
    match load_for_serving(config, demo) {
        Ok(c) => {
            if connect
                && let crate::config::DirectorySource::Postgres(url) = &c.directory
                && let Err(e) = check_database(url, c.timeouts.directory_query)
            {
                println!("invalid configuration:\n  - DATABASE_URL: {e:#}");
                return Ok(ExitCode::from(1));
            }
            println!("configuration ok: {}", crate::config_show::summary(&c));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("{e}");
            Ok(ExitCode::from(1))
        }
    }
}

/// The tables the ingress reads (`"user"` quoted: a reserved word).
const TABLES: [&str; 6] = ["user", "team", "team_member", "server", "pod", "session"];

/// Connects (bounded by `limit`) and checks that every table the ingress reads exists.
fn check_database(url: &pinacle_authz::Secret, limit: std::time::Duration) -> anyhow::Result<()> {
    let url = std::str::from_utf8(url.expose()).context("not UTF-8")?;
    let rt = runtime()?;
    let _context = rt.enter();
    let directory = PostgresDirectory::connect_lazy(
        url,
        &PostgresOptions {
            acquire_timeout: limit,
            query_timeout: limit,
            ..PostgresOptions::default()
        },
    )?;
    rt.block_on(async {
        let found: Vec<String> = tokio::time::timeout(
            limit,
            sqlx::query_scalar(
                "select table_name::text from information_schema.tables \
                 where table_schema = current_schema() and table_name = any($1)",
            )
            .bind(TABLES.map(str::to_owned).to_vec())
            .fetch_all(directory.pool()),
        )
        .await
        .context("no answer in time")?
        .context("cannot query the database")?;
        let missing: Vec<&str> = TABLES
            .iter()
            .copied()
            .filter(|t| !found.iter().any(|f| f == t))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            anyhow::bail!(
                "connected, but these tables are missing: {}",
                missing.join(", ")
            )
        }
    })
}

#[allow(clippy::print_stdout)] // the configuration is this command's output
fn config_show(config: Option<&std::path::Path>, demo: bool) -> anyhow::Result<ExitCode> {
    match load_for_serving(config, demo) {
        Ok(c) => {
            print!("{}", crate::config_show::render(&c));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("{e}");
            Ok(ExitCode::from(1))
        }
    }
}
