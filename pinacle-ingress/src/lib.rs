//! `pinacle-ingress`: the Pingora proxy in front of Pinacle pods and the dashboard.
//!
//! A request flows one way:
//!
//! ```text
//! Host --host::route--> pod or dashboard --intent::classify--> navigation / upgrade / other
//!   --credentials (pinacle-authz)--> Principal --Authorizer--> Decision
//!   --upstream::peer--> Pingora proxies --responses (our own answers)--> access log
//! ```
//!
//! - [`host`]: pod hostnames, both forms, several base domains.
//! - [`intent`]: navigation, upgrade or anything else.
//! - [`callback`]: `/pinacle-proxy-callback` and the sign-in redirect URL.
//! - [`cors`]: CORS preflights and grants on pod hosts.
//! - [`upstream`]: the peer (pooled per pod) and the `Host` sent to a pod.
//! - [`responses`]: every response the ingress makes itself.
//! - [`tunnel`]: WebSocket tunnels (works around a Pingora 0.9.1 upgrade race).
//! - [`policy`]: every decision about a request, made once ([`policy::Verdict`]: our answer or
//!   a [`policy::Plan`] to forward); [`access`]: the one record and access line.
//! - [`proxy`]: the shared state; the engines that carry a verdict out: [`plain_engine`],
//!   [`pingora_engine`] (the `ProxyHttp` implementation) and [`tunnel`].
//! - [`framing`]: `Content-Length` values and hop-by-hop response fields, one rule for every
//!   engine.
//! - [`plain`]: the plain engine's pure parts and upstream exchange (bodiless `GET`/`HEAD`).
//! - [`connections`]: `max_connections` and `request_header_timeout` (around Pingora's app).
//! - [`config`]: the TOML file, environment overrides, validation; [`config_show`]: the
//!   effective configuration for operators (`config show`, the `check-config` summary).
//! - [`server`]: building and running the Pingora server; [`admin`]: health and metrics;
//!   [`reload`]: what SIGHUP re-reads and applies; [`signals`]: the other signals, the upgrade in
//!   place (SIGUSR2) and systemd's notifications.
//! - [`directory`]: the pod directory opened from the configuration, metered.
//! - [`telemetry`]: metrics, logging setup, what may be logged.
//! - [`tls`]: certificates by SNI, reloadable.
//! - [`cli`]: the command line (thin `main.rs` calls [`cli::run`]); [`secrets`], [`inspect`].

#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

/// The crate version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit the binary was built from ("unknown" outside a checkout).
pub const GIT_COMMIT: &str = env!("PINACLE_GIT_COMMIT");

/// `--version`: the version and the commit.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("PINACLE_GIT_COMMIT"),
    ")"
);

pub mod access;
pub mod admin;
pub mod agents;
pub mod api_auth;
pub mod callback;
pub mod cli;
pub mod config;
pub mod config_show;
pub mod confine;
pub mod connections;
pub mod control;
pub mod cors;
pub mod directory;
pub mod framing;
pub mod hex;
pub mod host;
pub mod http_client;
pub mod inspect;
pub mod intent;
pub mod path_routing;
pub mod pingora_engine;
pub mod plain;
pub mod plain_engine;
pub mod policy;
pub mod proxy;
pub mod rate_limit;
pub mod reload;
pub mod request_id;
pub mod responses;
pub mod revocation;
pub mod secrets;
pub mod server;
pub mod signals;
pub mod telemetry;
pub mod tls;
pub mod tunnel;
pub mod upstream;
