//! Building and running the Pingora server.
//!
//! [`prepare`] makes what lives outside Pingora's runtimes: a small side runtime for the
//! database pool, the admin listener, the certificate store and the signal watchers, plus the
//! metrics. [`build`] makes the Pingora server (HTTP, and HTTPS with SNI and HTTP/2).
//! [`serve`] runs it with Unix signals (the binary); [`spawn`] runs it on a thread stopped
//! through the returned handle (tests and embedding).
//!
//! Pingora makes its own Tokio runtimes, so nothing here may run inside one (`main` is sync).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use pinacle_authz::{Authorizer, CredentialConfig, CredentialVerifier, PodDirectory};
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{ExecutionPhase, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::listening::Service;
use thiserror::Error;
use tokio::sync::oneshot;

use crate::admin::{self, AdminState};
use crate::config::IngressConfig;
use crate::connections::{Gate, Limits};
use crate::directory::{self, Metered};
use crate::proxy::{Clock, Ingress};
use crate::reload::Reloader;
use crate::signals::{Restart, Signals};
use crate::telemetry::Metrics;
use crate::tls::{CertStore, Resolver};

/// The server could not be set up.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The pod directory could not be opened.
    #[error(transparent)]
    Directory(#[from] directory::OpenError),
    /// The credential configuration is unusable.
    #[error("credentials: {0}")]
    Credentials(#[from] pinacle_authz::CredentialConfigError),
    /// A certificate could not be loaded.
    #[error("tls: {0}")]
    Certificate(#[from] crate::tls::CertError),
    /// The side runtime or a thread could not be started.
    #[error("{0}")]
    Io(String),
    /// A listening address cannot be bound (in use, not local, not permitted).
    #[error("cannot listen: {0}")]
    Bind(String),
    /// Metrics could not be registered (a bug).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// What runs beside Pingora.
#[derive(Debug)]
pub struct Prepared {
    side: tokio::runtime::Runtime,
    metrics: Metrics,
    directory: Arc<dyn PodDirectory>,
    /// The directory file, when the directory is one (reloaded by SIGHUP).
    file_directory: Option<Arc<directory::ReloadableFile>>,
    draining: Arc<AtomicBool>,
    certs: Option<Arc<CertStore>>,
    /// The authorizer once [`build`] has made it (`/readyz` reads its stale-if-error state).
    authorizer: Arc<std::sync::OnceLock<Arc<Authorizer>>>,
    /// Agent tunnels (reverse tunnels to servers behind NAT).
    agents: Arc<crate::agents::Agents>,
}

impl Prepared {
    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// Starts the side runtime, opens the directory (unless one is given), loads certificates and
/// starts the admin listener (`upgrade`: once the process handing over lets go of it).
///
/// # Errors
/// The directory, a certificate or the admin address cannot be set up.
pub fn prepare(
    config: &IngressConfig,
    directory: Option<Arc<dyn PodDirectory>>,
    upgrade: bool,
) -> Result<Prepared, ServeError> {
    let side = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("pinacle-side")
        .enable_all()
        .build()
        .map_err(|e| ServeError::Io(format!("cannot start the side runtime: {e}")))?;
    let metrics = Metrics::new()?;
    let (raw, file_directory) = match directory {
        Some(d) => (d, None),
        None => {
            let opened = directory::open(config, side.handle())?;
            (opened.directory, opened.file)
        }
    };
    let directory: Arc<dyn PodDirectory> = Arc::new(Metered::new(raw, metrics.clone()));
    let certs = match &config.tls {
        Some(tls) => Some(CertStore::load(&tls.certificates)?),
        None => None,
    };
    let draining = Arc::new(AtomicBool::new(false));
    let authorizer = Arc::new(std::sync::OnceLock::new());
    let agents = Arc::new(crate::agents::Agents::new(
        metrics.clone(),
        side.handle().clone(),
    ));
    side.spawn(crate::agents::refresh(agents.clone(), directory.clone()));
    if let Some(addr) = config.agent_listen {
        let listener = {
            let _context = side.enter();
            admin::bind(addr).map_err(|e| ServeError::Bind(format!("agent_listen {addr}: {e}")))?
        };
        let acceptor = match &certs {
            Some(certs) => Some(agent_tls(certs.clone())?),
            None => {
                tracing::warn!(%addr, "agent_listen without TLS (no certificates configured): agent secrets cross the network in clear");
                None
            }
        };
        tracing::info!(%addr, tls = acceptor.is_some(), "agent listener bound");
        side.spawn(agents.clone().serve(listener, acceptor));
    }
    if let Some(addr) = config.admin_listen {
        let state = AdminState {
            metrics: metrics.clone(),
            directory: directory.clone(),
            draining: draining.clone(),
            ping_timeout: config.timeouts.directory_query,
            authorizer: authorizer.clone(),
            agents: agents.clone(),
        };
        if upgrade {
            // The previous process answers (`/readyz`: draining) until it exits.
            let limit = config.timeouts.shutdown_grace + std::time::Duration::from_secs(30);
            side.spawn(async move {
                match admin::bind_when_free(addr, limit).await {
                    Ok(listener) => {
                        tracing::info!(%addr, "admin listener bound");
                        admin::serve(listener, state).await;
                    }
                    Err(e) => tracing::error!(%addr, error = %e, "cannot bind admin_listen"),
                }
            });
        } else {
            let listener = {
                let _context = side.enter();
                admin::bind(addr)
                    .map_err(|e| ServeError::Bind(format!("admin_listen {addr}: {e}")))?
            };
            side.spawn(admin::serve(listener, state));
        }
    }
    Ok(Prepared {
        side,
        metrics,
        directory,
        file_directory,
        draining,
        certs,
        authorizer,
        agents,
    })
}

/// TLS for `agent_listen`: the ingress's certificates (chosen by SNI), HTTP/1.1 then HTTP/2
/// over the upgrade (no ALPN needed).
fn agent_tls(certs: Arc<CertStore>) -> Result<tokio_rustls::TlsAcceptor, ServeError> {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ServeError::Io(format!("agent_listen TLS: {e}")))?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(Resolver(certs)));
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// SIGHUP reloads ([`Reloader::reload`]). Watched whatever the configuration, so that SIGHUP
/// (which the shipped unit sends on `systemctl reload`) never terminates the process, as its
/// default action would.
fn watch_reload_signal(side: &tokio::runtime::Runtime, reloader: Reloader) {
    side.spawn(async move {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot watch SIGHUP: the configuration reloads only on restart");
            return;
        };
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading");
            reloader.reload();
        }
    });
}

/// Fails when an address Pingora is to listen on is taken: Pingora itself retries the bind in
/// its service thread and panics there, leaving the process up without a listener.
fn check_listen_addresses(config: &IngressConfig) -> Result<(), ServeError> {
    let tls = config.tls.as_ref().map(|t| ("tls_listen", t.listen));
    for (key, addr) in std::iter::once(("listen", config.listen)).chain(tls) {
        std::net::TcpListener::bind(addr)
            .map_err(|e| ServeError::Bind(format!("{key} {addr}: {e}")))?;
    }
    Ok(())
}

/// Tells systemd (when it watches) that this process serves, and is the service's main process
/// (after an upgrade in place the new process is), once Pingora runs; and that it stops, when
/// a shutdown (not a hand-over) begins.
fn notify_when_serving(side: &tokio::runtime::Runtime, server: &Server) {
    let mut phases = server.watch_execution_phase();
    side.spawn(async move {
        while let Ok(phase) = phases.recv().await {
            match phase {
                ExecutionPhase::Running => {
                    crate::signals::notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
                }
                // A hand-over: the successor announces itself; "stopping" would stop the unit.
                ExecutionPhase::GracefulUpgradeTransferringFds => return,
                ExecutionPhase::GracefulTerminate | ExecutionPhase::ShutdownStarted => {
                    crate::signals::notify("STOPPING=1");
                    return;
                }
                _ => {}
            }
        }
    });
}

/// How often a graceful stop checks whether the process is idle.
const IDLE_CHECK: std::time::Duration = std::time::Duration::from_millis(50);

/// Once a graceful stop has begun, ends the process as soon as no request or tunnel is in
/// flight and no HTTP/1 connection is busy (accepted with its request on the way, or serving
/// one), on two checks [`IDLE_CHECK`] apart: a connection accepted just before the stop reaches
/// the gate in between (exiting under it would reset it). Pingora sleeps the whole grace
/// period unconditionally (`Server::run_server` in pingora-core 0.9.1,
/// `thread::sleep(grace_period_seconds)`); remove this once it stops early.
fn exit_when_idle(
    side: &tokio::runtime::Runtime,
    server: &Server,
    in_flight: Arc<AtomicUsize>,
    busy: Arc<AtomicUsize>,
) {
    let mut phases = server.watch_execution_phase();
    side.spawn(async move {
        loop {
            match phases.recv().await {
                Ok(ExecutionPhase::GracefulTerminate | ExecutionPhase::ShutdownGracePeriod) => {
                    break;
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
        let idle = || in_flight.load(Ordering::SeqCst) == 0 && busy.load(Ordering::SeqCst) == 0;
        let mut idle_before = false;
        loop {
            let now = idle();
            if now && idle_before {
                tracing::info!("graceful stop: nothing in flight, exiting");
                std::process::exit(0);
            }
            idle_before = now;
            tokio::time::sleep(IDLE_CHECK).await;
        }
    });
}

/// Marks the process as draining as soon as Pingora starts a shutdown or hand-over.
fn watch_draining(side: &tokio::runtime::Runtime, server: &Server, draining: Arc<AtomicBool>) {
    let mut phases = server.watch_execution_phase();
    side.spawn(async move {
        while let Ok(phase) = phases.recv().await {
            if matches!(
                phase,
                ExecutionPhase::GracefulUpgradeTransferringFds
                    | ExecutionPhase::GracefulUpgradeCloseTimeout
                    | ExecutionPhase::GracefulTerminate
                    | ExecutionPhase::ShutdownStarted
            ) {
                draining.store(true, Ordering::SeqCst);
            }
        }
    });
}

/// Socket buffers of a plain client connection. Pingora's default puts a 64 KiB read buffer in
/// front of every accepted socket, zero-filled and so resident, and kept for the connection's
/// life: most of an idle keep-alive connection's or WebSocket's memory. Its HTTP/1 reader has
/// buffers of its own (4 KiB for heads, more for bodies), so plain connections read straight
/// from the socket. The write side keeps Pingora's one-segment (1460-byte) coalescing.
fn plain_buffers() -> L4BufferSettings {
    L4BufferSettings::default().read(0)
}

/// TLS reads a record header and then the record: a buffer of one maximal record (16 KiB plus
/// framing) saves a system call per record without holding 64 KiB per connection.
fn tls_buffers() -> L4BufferSettings {
    L4BufferSettings::default().read(16 * 1024 + 256)
}

/// Builds the Pingora server: HTTP on `listen`, HTTPS (SNI, HTTP/2) on `tls.listen`.
/// `upgrade`: take the listening sockets over from a running process (see the README).
///
/// # Errors
/// Unusable credential configuration.
pub fn build(
    config: IngressConfig,
    prepared: &Prepared,
    clock: Clock,
    upgrade: bool,
) -> Result<Built, ServeError> {
    let verifier = CredentialVerifier::new(&CredentialConfig {
        secrets: config.secrets.clone(),
        session_cookies: config.session_cookies.clone(),
        database_sessions: config.database_sessions,
        decrypted_sessions: pinacle_authz::DEFAULT_DECRYPTED_SESSIONS,
    })?;
    let authorizer = Arc::new(Authorizer::new(
        prepared.directory.clone(),
        &config.authorizer,
    ));
    let _ = prepared.authorizer.set(authorizer.clone());
    let live = listen_for_changes(&config, prepared, &authorizer);

    let conf = ServerConf {
        threads: config.threads,
        grace_period_seconds: Some(config.timeouts.shutdown_grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: config.upgrade_sock.display().to_string(),
        daemon: false,
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    server.bootstrap();
    let listen = config.listen.to_string();
    let tls = config.tls.clone();
    let limits = Limits {
        max_connections: config.max_connections,
        request_header_timeout: config.timeouts.request_header,
    };
    let ingress = Ingress::new(
        Arc::new(config),
        verifier,
        authorizer.clone(),
        clock,
        prepared.metrics.clone(),
        prepared.agents.clone(),
    );
    let plain = ingress.plain_requests();
    let in_flight = ingress.in_flight();
    let state = ingress.state();
    let sweep_state = state.clone();
    prepared.side.spawn(crate::revocation::run(
        ingress.revocations(),
        authorizer.clone(),
        live,
        prepared.metrics.clone(),
        move || sweep_state.current_config().authorizer.allow_ttl,
    ));
    prepared
        .side
        .spawn(crate::control::report_activity(state.clone()));
    prepared
        .side
        .spawn(crate::api_auth::run_jwks_refresh(state.clone()));
    let proxy = pingora::proxy::http_proxy(&server.configuration, ingress);
    let gate = Gate::new(proxy, limits, prepared.metrics.clone()).with_plain_requests(plain);
    let limits = gate.limits();
    let busy = gate.busy();
    let mut service = Service::new("pinacle-ingress".to_owned(), gate);
    service.add_listener(ListenerConfig::tcp(listen).l4_buffer(plain_buffers()));
    if let (Some(tls), Some(certs)) = (tls, &prepared.certs) {
        let first = tls
            .certificates
            .first()
            .ok_or_else(|| ServeError::Io("tls_listen needs at least one certificate".into()))?;
        // The paths are ignored once a resolver is set; `intermediate` only needs them present.
        let mut settings = TlsSettings::intermediate(
            &first.cert_file.display().to_string(),
            &first.key_file.display().to_string(),
        )
        .map_err(|e| ServeError::Io(format!("tls settings: {e}")))?;
        settings.set_cert_resolver(Arc::new(Resolver(certs.clone())));
        settings.enable_h2();
        service.add_listener(
            ListenerConfig::tcp(tls.listen.to_string())
                .tls(settings)
                .l4_buffer(tls_buffers()),
        );
    }
    server.add_service(service);
    watch_draining(&prepared.side, &server, prepared.draining.clone());
    Ok(Built {
        server,
        authorizer,
        in_flight,
        busy,
        state,
        limits,
    })
}

/// Starts the directory's change listener ([`pinacle_authz::live`]) on the side runtime when
/// the directory is Postgres and `directory_notifications` is on.
fn listen_for_changes(
    config: &IngressConfig,
    prepared: &Prepared,
    authorizer: &Arc<Authorizer>,
) -> Option<pinacle_authz::live::LiveHandle> {
    let crate::config::DirectorySource::Postgres(url) = &config.directory else {
        return None;
    };
    if !config.directory_notifications {
        return None;
    }
    let connect = std::str::from_utf8(url.expose())
        .ok()?
        .parse::<sqlx::postgres::PgConnectOptions>()
        .ok()?
        .application_name("pinacle-ingress-listen");
    let _context = prepared.side.enter();
    Some(pinacle_authz::live::spawn_listener(
        connect,
        (**authorizer).clone(),
        pinacle_authz::live::LiveOptions {
            timeout: config.timeouts.directory_query,
            ..pinacle_authz::live::LiveOptions::default()
        },
    ))
}

/// What [`build`] makes.
pub struct Built {
    /// The Pingora server, ready to run.
    pub server: Server,
    /// The authorizer (to invalidate cached decisions).
    pub authorizer: Arc<Authorizer>,
    /// Requests and tunnels in flight.
    pub in_flight: Arc<AtomicUsize>,
    /// HTTP/1 connections accepted and not idle ([`crate::connections::Gate::busy`]).
    pub busy: Arc<AtomicUsize>,
    /// The proxy's state (a reload swaps its configuration).
    pub state: Arc<crate::proxy::State>,
    /// The connection gate's limits (a reload swaps them).
    pub limits: Arc<arc_swap::ArcSwap<Limits>>,
}

impl std::fmt::Debug for Built {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Built")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

/// Runs until SIGTERM (graceful: in-flight requests get the grace period), SIGINT (fast) or
/// SIGQUIT (hand the listening sockets to a process started with `--upgrade`). Blocks; must not
/// be called inside a Tokio runtime.
///
/// # Errors
/// The directory, certificates or credentials cannot be set up.
pub fn serve(
    config: IngressConfig,
    clock: Clock,
    upgrade: bool,
    load: Box<dyn Fn() -> Result<IngressConfig, String> + Send + Sync>,
) -> Result<(), ServeError> {
    if !upgrade {
        check_listen_addresses(&config)?;
    }
    let prepared = prepare(&config, None, upgrade)?;
    tracing::info!(
        version = crate::VERSION,
        listen = %config.listen,
        tls = %config.tls.as_ref().map_or_else(|| "off".to_owned(), |t| t.listen.to_string()),
        admin = %config.admin_listen.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        dashboard = %config.dashboard_upstream,
        directory = config.directory.kind(),
        base_domains = %config.base_domains.iter().map(|d| d.as_str()).collect::<Vec<_>>().join(","),
        upgrade,
        "pinacle-ingress starting"
    );
    let built = build(config, &prepared, clock, upgrade)?;
    watch_reload_signal(
        &prepared.side,
        Reloader {
            load,
            state: built.state.clone(),
            limits: built.limits.clone(),
            authorizer: built.authorizer.clone(),
            certs: prepared.certs.clone(),
            file: prepared.file_directory.clone(),
            metrics: prepared.metrics.clone(),
        },
    );
    exit_when_idle(&prepared.side, &built.server, built.in_flight, built.busy);
    notify_when_serving(&prepared.side, &built.server);
    built.server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            restart: Restart::from_env(),
        }),
    });
    prepared.side.shutdown_background();
    Ok(())
}

/// Stops a spawned server when told to (or when the handle is dropped).
struct ChannelSignal(Mutex<Option<oneshot::Receiver<ShutdownKind>>>);

/// How a spawned server should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownKind {
    /// Stop accepting, let in-flight requests finish within the grace period.
    Graceful,
    /// Stop now.
    Fast,
}

#[async_trait]
impl ShutdownSignalWatch for ChannelSignal {
    async fn recv(&self) -> ShutdownSignal {
        let receiver = self.0.lock().ok().and_then(|mut r| r.take());
        let kind = match receiver {
            Some(rx) => rx.await.unwrap_or(ShutdownKind::Fast),
            None => std::future::pending().await,
        };
        match kind {
            ShutdownKind::Graceful => ShutdownSignal::GracefulTerminate,
            ShutdownKind::Fast => ShutdownSignal::FastShutdown,
        }
    }
}

/// A server running on its own thread.
#[derive(Debug)]
pub struct Running {
    stop: Option<oneshot::Sender<ShutdownKind>>,
    thread: Option<JoinHandle<()>>,
    authorizer: Arc<Authorizer>,
    prepared: Option<Prepared>,
}

impl Running {
    /// The authorizer (to invalidate cached decisions).
    pub fn authorizer(&self) -> &Arc<Authorizer> {
        &self.authorizer
    }

    /// The metrics.
    pub fn metrics(&self) -> Option<&Metrics> {
        self.prepared.as_ref().map(Prepared::metrics)
    }

    /// Re-reads the certificate files (as SIGHUP does for `serve`).
    ///
    /// # Errors
    /// A file cannot be loaded; the current certificates stay.
    pub fn reload_certificates(&self) -> Result<(), crate::tls::CertError> {
        match self.prepared.as_ref().and_then(|p| p.certs.as_ref()) {
            Some(certs) => certs.reload(),
            None => Ok(()),
        }
    }

    /// Stops the server and waits for its thread.
    pub fn stop(mut self, kind: ShutdownKind) {
        self.stop_and_join(kind);
    }

    fn stop_and_join(&mut self, kind: ShutdownKind) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(kind);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Some(prepared) = self.prepared.take() {
            // Safe inside an async context, unlike dropping the runtime.
            prepared.side.shutdown_background();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop_and_join(ShutdownKind::Fast);
    }
}

/// Starts the server on a thread of its own with the given directory; it runs until the
/// handle is stopped or dropped. The caller waits for the listener (Pingora does not report
/// when it is bound).
///
/// # Errors
/// Unusable configuration (credentials, certificates, admin address).
pub fn spawn(
    config: IngressConfig,
    directory: Arc<dyn PodDirectory>,
    clock: Clock,
) -> Result<Running, ServeError> {
    check_listen_addresses(&config)?;
    let prepared = prepare(&config, Some(directory), false)?;
    let Built {
        server, authorizer, ..
    } = build(config, &prepared, clock, false)?;
    let (stop, receiver) = oneshot::channel();
    let signal = ChannelSignal(Mutex::new(Some(receiver)));
    let thread = std::thread::Builder::new()
        .name("pinacle-ingress".into())
        .spawn(move || {
            server.run(RunArgs {
                shutdown_signal: Box::new(signal),
            });
        })
        .map_err(|e| ServeError::Io(format!("cannot start the server thread: {e}")))?;
    Ok(Running {
        stop: Some(stop),
        thread: Some(thread),
        authorizer,
        prepared: Some(prepared),
    })
}
