//! Building and running the Pingora server: the directory from the configuration, the proxy
//! service on its listener, and two ways to run it: [`serve`] (the binary: Unix signals) and
//! [`spawn`] (tests and embedding: a thread stopped through the returned handle).
//!
//! Pingora makes its own Tokio runtimes, so nothing here may run inside one (`main` is sync).

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use pinacle_authz::{
    Authorizer, CredentialConfig, CredentialVerifier, FileDirectory, PodDirectory,
    PostgresDirectory, PostgresOptions,
};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use thiserror::Error;
use tokio::sync::oneshot;

use crate::config::{DEMO_DIRECTORY, DirectorySource, IngressConfig};
use crate::proxy::{Clock, Ingress};

/// The server could not be set up.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The pod directory could not be opened.
    #[error("pod directory: {0}")]
    Directory(String),
    /// The credential configuration is unusable.
    #[error("credentials: {0}")]
    Credentials(#[from] pinacle_authz::CredentialConfigError),
    /// A runtime for the database pool could not be started.
    #[error("cannot start the database runtime: {0}")]
    Runtime(std::io::Error),
}

/// An opened directory, and the runtime its connections live on (for Postgres).
pub struct OpenDirectory {
    /// The directory.
    pub directory: Arc<dyn PodDirectory>,
    /// Kept alive as long as the directory: the pool's connections and tasks run here.
    pub runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for OpenDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenDirectory")
            .field("postgres", &self.runtime.is_some())
            .finish_non_exhaustive()
    }
}

/// Opens the configured directory. Postgres gets a small runtime of its own (Pingora's runtimes
/// do not exist yet, and a pool must be made inside one).
///
/// # Errors
/// An unreadable directory file, a bad `DATABASE_URL`, or no runtime.
pub fn open_directory(config: &IngressConfig) -> Result<OpenDirectory, ServeError> {
    match &config.directory {
        DirectorySource::Postgres(url) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("pinacle-directory")
                .enable_all()
                .build()
                .map_err(ServeError::Runtime)?;
            let options = PostgresOptions {
                query_timeout: config.timeouts.directory_query,
                ..PostgresOptions::default()
            };
            let directory = {
                let _context = runtime.enter();
                let url = std::str::from_utf8(url.expose())
                    .map_err(|_| ServeError::Directory("DATABASE_URL is not UTF-8".into()))?;
                PostgresDirectory::connect_lazy(url, &options)
                    .map_err(|e| ServeError::Directory(e.to_string()))?
            };
            Ok(OpenDirectory {
                directory: Arc::new(directory),
                runtime: Some(runtime),
            })
        }
        DirectorySource::File(path) => {
            let directory =
                FileDirectory::load(path).map_err(|e| ServeError::Directory(e.to_string()))?;
            Ok(OpenDirectory {
                directory: Arc::new(directory),
                runtime: None,
            })
        }
        DirectorySource::EmbeddedDemo => {
            tracing::warn!(
                "no DATABASE_URL and no directory_file: using the embedded demo directory \
                 (config/directory.example.toml)"
            );
            let directory = FileDirectory::from_toml(DEMO_DIRECTORY, "<embedded demo>")
                .map_err(|e| ServeError::Directory(e.to_string()))?;
            Ok(OpenDirectory {
                directory: Arc::new(directory),
                runtime: None,
            })
        }
    }
}

/// Builds the Pingora server with the proxy service listening on `config.listen`.
///
/// # Errors
/// Unusable credential configuration.
pub fn build(
    config: IngressConfig,
    directory: Arc<dyn PodDirectory>,
    clock: Clock,
) -> Result<(Server, Arc<Authorizer>), ServeError> {
    let verifier = CredentialVerifier::new(&CredentialConfig {
        secrets: config.secrets.clone(),
        session_cookies: config.session_cookies.clone(),
        database_sessions: true,
    })?;
    let authorizer = Arc::new(Authorizer::new(directory, &config.authorizer));

    let mut conf = ServerConf {
        threads: config.threads,
        grace_period_seconds: Some(config.timeouts.shutdown_grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    conf.daemon = false;
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let listen = config.listen.to_string();
    let ingress = Ingress::new(Arc::new(config), verifier, authorizer.clone(), clock);
    let mut service = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        ingress,
        "pinacle-ingress",
    );
    service.add_tcp(&listen);
    server.add_service(service);
    Ok((server, authorizer))
}

/// Runs until SIGTERM (graceful: in-flight requests get the grace period), SIGINT (fast) or
/// SIGQUIT (graceful upgrade hand-over). Blocks; must not be called inside a Tokio runtime.
///
/// # Errors
/// The directory or credentials cannot be set up.
pub fn serve(config: IngressConfig, clock: Clock) -> Result<(), ServeError> {
    let opened = open_directory(&config)?;
    tracing::info!(
        listen = %config.listen,
        dashboard = %config.dashboard_upstream,
        base_domains = ?config.base_domains.iter().map(|d| d.as_str()).collect::<Vec<_>>(),
        "pinacle-ingress starting"
    );
    let (server, _authorizer) = build(config, opened.directory.clone(), clock)?;
    server.run(RunArgs::default());
    drop(opened);
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
}

impl Running {
    /// The authorizer (to invalidate cached decisions).
    pub fn authorizer(&self) -> &Arc<Authorizer> {
        &self.authorizer
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
/// Unusable credential configuration.
pub fn spawn(
    config: IngressConfig,
    directory: Arc<dyn PodDirectory>,
    clock: Clock,
) -> Result<Running, ServeError> {
    let (server, authorizer) = build(config, directory, clock)?;
    let (stop, receiver) = oneshot::channel();
    let signal = ChannelSignal(Mutex::new(Some(receiver)));
    let thread = std::thread::Builder::new()
        .name("pinacle-ingress".into())
        .spawn(move || {
            server.run(RunArgs {
                shutdown_signal: Box::new(signal),
            });
        })
        .map_err(ServeError::Runtime)?;
    Ok(Running {
        stop: Some(stop),
        thread: Some(thread),
        authorizer,
    })
}
