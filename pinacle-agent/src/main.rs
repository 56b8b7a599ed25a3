//! `pinacle-agent`: run on a pod server the ingress cannot dial; it dials out to every gateway
//! and carries their streams to the server's nginx-proxy ports (README "Reverse tunnels").

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use pinacle_agent::agent::{self, Options};
use pinacle_agent::protocol;

/// Reverse-tunnel agent for Pinacle's ingress.
#[derive(Debug, Parser)]
#[command(name = "pinacle-agent", version, about)]
struct Cli {
    /// A gateway's `agent_listen` (`host:port`); repeat for every gateway.
    #[arg(long = "gateway", required = true, value_name = "HOST:PORT")]
    gateways: Vec<String>,
    /// The server this agent speaks for (`server.id`).
    #[arg(long, value_name = "ID")]
    server: String,
    /// A file holding the secret `pinacle-ingress agent register` printed (else the variable
    /// PINACLE_AGENT_SECRET).
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// Where the pod ports are.
    #[arg(long, default_value = "127.0.0.1", value_name = "HOST")]
    upstream_host: String,
    /// The only ports the agent dials (the nginx-proxy range).
    #[arg(long, default_value = "30000-40000", value_name = "LOW-HIGH")]
    allow_ports: String,
    /// PEM certificates trusted for the gateways besides the system's roots.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// The name the gateways' certificates are checked for (default: each gateway's host).
    #[arg(long, value_name = "NAME")]
    tls_server_name: Option<String>,
    /// Talk to the gateways without TLS. For tests only: the secret crosses the wire in clear.
    #[arg(long)]
    insecure_plaintext: bool,
    /// `text` or `json` log lines.
    #[arg(long, default_value = "text")]
    log_format: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        );
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    match options(&cli) {
        Ok(options) => run(options),
        Err(e) => {
            eprintln!("pinacle-agent: {e}");
            ExitCode::from(2)
        }
    }
}

fn options(cli: &Cli) -> Result<Options, String> {
    let secret = match (&cli.secret_file, std::env::var("PINACLE_AGENT_SECRET")) {
        (Some(path), _) => std::fs::read_to_string(path)
            .map_err(|e| format!("--secret-file {}: {e}", path.display()))?
            .trim()
            .to_owned(),
        (None, Ok(secret)) => secret.trim().to_owned(),
        (None, Err(_)) => return Err("give --secret-file or PINACLE_AGENT_SECRET".into()),
    };
    if secret.is_empty() {
        return Err("the secret is empty".into());
    }
    let allow_ports =
        protocol::parse_ports(&cli.allow_ports).map_err(|e| format!("--allow-ports {e}"))?;
    let tls = if cli.insecure_plaintext {
        tracing::warn!("--insecure-plaintext: the secret and all traffic cross the wire in clear");
        None
    } else {
        Some(Arc::new(
            protocol::client_tls(cli.ca_file.as_deref()).map_err(|e| format!("--ca-file {e}"))?,
        ))
    };
    Ok(Options {
        gateways: cli.gateways.clone(),
        server: cli.server.clone(),
        secret,
        upstream_host: cli.upstream_host.clone(),
        allow_ports,
        tls,
        tls_server_name: cli.tls_server_name.clone(),
        connect_timeout: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(10),
    })
}

fn run(options: Options) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pinacle-agent: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return,
            };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: draining"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
            }
            let _ = stop.send(true);
        });
        tracing::info!(version = env!("CARGO_PKG_VERSION"), server = %options.server, gateways = ?options.gateways, "pinacle-agent starting");
        agent::run(Arc::new(options), shutdown).await;
    });
    ExitCode::SUCCESS
}
