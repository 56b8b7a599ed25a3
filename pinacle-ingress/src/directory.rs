//! The pod directory as the ingress uses it: opened from the configuration (Postgres, a TOML
//! file or the embedded demo), and wrapped so every query's latency and failures are measured.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pinacle_authz::{
    DirectoryError, FileDirectory, PodCandidate, PodDirectory, PodSlug, PostgresDirectory,
    PostgresOptions, SessionRecord, SessionToken, UserId,
};

use crate::config::{DEMO_DIRECTORY, DirectorySource, IngressConfig};
use crate::telemetry::Metrics;

/// The directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A bad file, URL or runtime.
    #[error("pod directory: {0}")]
    Directory(String),
}

/// A directory file that a reload (SIGHUP) reads again; queries use the last one that loaded.
#[derive(Debug)]
pub struct ReloadableFile {
    path: std::path::PathBuf,
    current: ArcSwap<FileDirectory>,
}

impl ReloadableFile {
    /// Loads `path`.
    ///
    /// # Errors
    /// The file cannot be read or is not a valid directory.
    pub fn load(path: &std::path::Path) -> Result<Self, OpenError> {
        let directory =
            FileDirectory::load(path).map_err(|e| OpenError::Directory(e.to_string()))?;
        Ok(Self {
            path: path.to_owned(),
            current: ArcSwap::from_pointee(directory),
        })
    }

    /// Reads the file again; on any problem the current contents stay.
    ///
    /// # Errors
    /// The file cannot be read or is not a valid directory.
    pub fn reload(&self) -> Result<(), OpenError> {
        let directory =
            FileDirectory::load(&self.path).map_err(|e| OpenError::Directory(e.to_string()))?;
        self.current.store(Arc::new(directory));
        Ok(())
    }
}

#[async_trait]
impl PodDirectory for ReloadableFile {
    async fn pods_by_slug(
        &self,
        slug: &PodSlug,
        user: &UserId,
    ) -> Result<Vec<PodCandidate>, DirectoryError> {
        self.current.load_full().pods_by_slug(slug, user).await
    }

    async fn session(&self, token: &SessionToken) -> Result<Option<SessionRecord>, DirectoryError> {
        self.current.load_full().session(token).await
    }

    async fn user_exists(&self, user: &UserId) -> Result<bool, DirectoryError> {
        self.current.load_full().user_exists(user).await
    }

    async fn agents(&self) -> Result<Vec<pinacle_authz::AgentRegistration>, DirectoryError> {
        self.current.load_full().agents().await
    }

    async fn ping(&self) -> Result<(), DirectoryError> {
        self.current.load_full().ping().await
    }
}

/// An opened directory, and the file behind it when it is one (to reload).
#[derive(Debug)]
pub struct Opened {
    /// The directory.
    pub directory: Arc<dyn PodDirectory>,
    /// The directory file, when the directory is one.
    pub file: Option<Arc<ReloadableFile>>,
}

/// Opens the configured directory. Postgres pools are made inside `runtime` (their connections
/// and maintenance tasks live there), which must outlive the directory.
///
/// # Errors
/// An unreadable directory file or a bad `DATABASE_URL`.
pub fn open(config: &IngressConfig, runtime: &tokio::runtime::Handle) -> Result<Opened, OpenError> {
    if let DirectorySource::File(path) = &config.directory {
        let file = Arc::new(ReloadableFile::load(path)?);
        return Ok(Opened {
            directory: file.clone(),
            file: Some(file),
        });
    }
    open_fixed(config, runtime).map(|directory| Opened {
        directory,
        file: None,
    })
}

fn open_fixed(
    config: &IngressConfig,
    runtime: &tokio::runtime::Handle,
) -> Result<Arc<dyn PodDirectory>, OpenError> {
    match &config.directory {
        DirectorySource::Postgres(url) => {
            let options = PostgresOptions {
                query_timeout: config.timeouts.directory_query,
                acquire_timeout: config.timeouts.directory_query,
                ..PostgresOptions::default()
            };
            let url = std::str::from_utf8(url.expose())
                .map_err(|_| OpenError::Directory("DATABASE_URL is not UTF-8".into()))?;
            let _context = runtime.enter();
            let directory = PostgresDirectory::connect_lazy(url, &options)
                .map_err(|e| OpenError::Directory(e.to_string()))?;
            Ok(Arc::new(directory))
        }
        DirectorySource::File(path) => FileDirectory::load(path)
            .map(|d| Arc::new(d) as Arc<dyn PodDirectory>)
            .map_err(|e| OpenError::Directory(e.to_string())),
        DirectorySource::EmbeddedDemo => {
            tracing::warn!(
                "no DATABASE_URL and no directory_file: using the embedded demo directory \
                 (config/directory.example.toml)"
            );
            FileDirectory::from_toml(DEMO_DIRECTORY, "<embedded demo>")
                .map(|d| Arc::new(d) as Arc<dyn PodDirectory>)
                .map_err(|e| OpenError::Directory(e.to_string()))
        }
    }
}

/// A directory whose every query is timed and whose failures are counted.
#[derive(Debug)]
pub struct Metered {
    inner: Arc<dyn PodDirectory>,
    metrics: Metrics,
}

impl Metered {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn PodDirectory>, metrics: Metrics) -> Self {
        Self { inner, metrics }
    }

    fn record<T>(&self, query: &str, started: Instant, result: &Result<T, DirectoryError>) {
        let kind = result.as_ref().err().map(|e| match e {
            DirectoryError::Unavailable(_) => "unavailable",
            DirectoryError::Timeout => "timeout",
            DirectoryError::Query(_) => "query",
        });
        self.metrics.directory_query(query, started.elapsed(), kind);
    }
}

#[async_trait]
impl PodDirectory for Metered {
    async fn pods_by_slug(
        &self,
        slug: &PodSlug,
        user: &UserId,
    ) -> Result<Vec<PodCandidate>, DirectoryError> {
        let started = Instant::now();
        let result = self.inner.pods_by_slug(slug, user).await;
        self.record("pods_by_slug", started, &result);
        result
    }

    async fn session(&self, token: &SessionToken) -> Result<Option<SessionRecord>, DirectoryError> {
        let started = Instant::now();
        let result = self.inner.session(token).await;
        self.record("session", started, &result);
        result
    }

    async fn user_exists(&self, user: &UserId) -> Result<bool, DirectoryError> {
        let started = Instant::now();
        let result = self.inner.user_exists(user).await;
        self.record("user_exists", started, &result);
        result
    }

    async fn ping(&self) -> Result<(), DirectoryError> {
        let started = Instant::now();
        let result = self.inner.ping().await;
        self.record("ping", started, &result);
        result
    }

    async fn agents(&self) -> Result<Vec<pinacle_authz::AgentRegistration>, DirectoryError> {
        let started = Instant::now();
        let result = self.inner.agents().await;
        self.record("agents", started, &result);
        result
    }
}
