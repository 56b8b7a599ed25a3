//! A control-plane stand-in (the dashboard's `/api/ingress`): verifies the ingress's bearer
//! token as a real control plane must (HS256 over the shared secret, `iss`, `aud`, `exp` at
//! most 60 s after `iat`, `act` and `pod` matching the path), records every call, answers
//! start and stop as told (202 by default) and, on a 202, runs the test's action (flip the
//! pod's status in Postgres). Activity reports get 204 and are recorded.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What the test does when a start or stop is accepted: `(act, pod id)`.
pub type OnAction =
    Arc<dyn Fn(String, String) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// One call the stand-in received.
#[derive(Debug, Clone)]
pub struct ControlCall {
    /// The request path.
    pub path: String,
    /// The verified claims (`None`: the token was refused, see `token_error`).
    pub claims: Option<serde_json::Value>,
    /// Why the token was refused.
    pub token_error: Option<String>,
    /// The JSON body (`null` when empty).
    pub body: serde_json::Value,
    /// When it arrived.
    pub at: std::time::Instant,
}

/// How the stand-in answers start and stop.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status (202, 409, 500...).
    pub status: u16,
    /// The body.
    pub body: String,
    /// Wait this long before answering (slow control planes; concurrent wakes).
    pub delay: Duration,
}

impl Default for Answer {
    fn default() -> Self {
        Self {
            status: 202,
            body: "{}".to_owned(),
            delay: Duration::ZERO,
        }
    }
}

/// The running stand-in.
pub struct ControlPlane {
    /// Where it listens.
    pub addr: SocketAddr,
    https: bool,
    calls: Arc<Mutex<Vec<ControlCall>>>,
    answer: Arc<Mutex<Answer>>,
    activity_status: Arc<Mutex<u16>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Shared {
    secret: String,
    calls: Arc<Mutex<Vec<ControlCall>>>,
    answer: Arc<Mutex<Answer>>,
    activity_status: Arc<Mutex<u16>>,
    on_action: OnAction,
}

impl ControlPlane {
    /// Listens on 127.0.0.1:0; `secret` is `control_secret`.
    pub async fn start(secret: &str, on_action: OnAction) -> Self {
        Self::start_with(secret, on_action, None).await
    }

    /// The same over TLS with the PEM certificate chain and key at these paths
    /// ([`crate::tls::Ca::leaf`]).
    pub async fn start_tls(secret: &str, on_action: OnAction, cert: &Path, key: &Path) -> Self {
        use rustls_pki_types::pem::PemObject;
        let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Self::start_with(secret, on_action, Some(acceptor)).await
    }

    async fn start_with(
        secret: &str,
        on_action: OnAction,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(Mutex::new(Answer::default()));
        let activity_status = Arc::new(Mutex::new(204));
        let shared = Arc::new(Shared {
            secret: secret.to_owned(),
            calls: calls.clone(),
            answer: answer.clone(),
            activity_status: activity_status.clone(),
            on_action,
        });
        let https = tls.is_some();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let shared = shared.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(shared.clone(), req));
                    let builder = http1::Builder::new();
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            https,
            calls,
            answer,
            activity_status,
            task,
        }
    }

    /// `control_url` for the ingress (`https://localhost:<port>/...` over TLS).
    pub fn url(&self) -> String {
        match self.https {
            true => format!("https://localhost:{}/api/ingress", self.addr.port()),
            false => format!("http://{}/api/ingress", self.addr),
        }
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<ControlCall> {
        self.calls.lock().unwrap().clone()
    }

    /// The calls to `path_suffix` (`/start`, `/stop`, `/activity`).
    pub fn calls_to(&self, path_suffix: &str) -> Vec<ControlCall> {
        self.calls()
            .into_iter()
            .filter(|c| c.path.ends_with(path_suffix))
            .collect()
    }

    /// Answers start and stop with this from now on.
    pub fn answer_with(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    /// Answers activity reports with this status from now on.
    pub fn answer_activity_with(&self, status: u16) {
        *self.activity_status.lock().unwrap() = status;
    }

    /// Waits (bounded by `within`) until `n` calls to `path_suffix` arrived; returns them.
    pub async fn wait_for(
        &self,
        path_suffix: &str,
        n: usize,
        within: Duration,
    ) -> Vec<ControlCall> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let calls = self.calls_to(path_suffix);
            if calls.len() >= n || tokio::time::Instant::now() >= deadline {
                return calls;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Verifies the token as the contract says; the claims or why not.
fn verify(secret: &str, token: &str, path: &str) -> Result<serde_json::Value, String> {
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_audience(&["pinacle-control"]);
    validation.set_issuer(&["pinacle-ingress"]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
    validation.leeway = 0;
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .map_err(|e| e.to_string())?
    .claims;
    let (iat, exp) = (claims["iat"].as_i64(), claims["exp"].as_i64());
    match (iat, exp) {
        (Some(iat), Some(exp)) if exp > iat && exp - iat <= 60 => {}
        _ => return Err(format!("exp must be at most 60 s after iat: {claims}")),
    }
    let act = claims["act"].as_str().unwrap_or_default();
    if path.ends_with("/activity") {
        if act != "activity" || claims.get("sub").is_some() {
            return Err(format!(
                "an activity token must say act=activity, no sub: {claims}"
            ));
        }
        return Ok(claims);
    }
    let mut parts = path.rsplit('/');
    let (action, pod) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if act != action || claims["pod"].as_str() != Some(pod) || claims["sub"].as_str().is_none() {
        return Err(format!("claims do not match {path}: {claims}"));
    }
    Ok(claims)
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_owned();
    let post = req.method() == hyper::Method::POST;
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let verified = verify(&shared.secret, &token, &path);
    shared.calls.lock().unwrap().push(ControlCall {
        path: path.clone(),
        claims: verified.as_ref().ok().cloned(),
        token_error: verified.as_ref().err().cloned(),
        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        at: std::time::Instant::now(),
    });
    let reply = |status: u16, body: String| {
        Ok(Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap())
    };
    if !post {
        return reply(405, "{\"error\":\"POST only\"}".into());
    }
    let claims = match verified {
        Ok(claims) => claims,
        Err(e) => return reply(401, serde_json::json!({ "error": e }).to_string()),
    };
    if path.ends_with("/activity") {
        let status = *shared.activity_status.lock().unwrap();
        return reply(status, String::new());
    }
    let answer = shared.answer.lock().unwrap().clone();
    tokio::time::sleep(answer.delay).await;
    if answer.status == 202 {
        let act = claims["act"].as_str().unwrap_or_default().to_owned();
        let pod = claims["pod"].as_str().unwrap_or_default().to_owned();
        // Runs before the answer (a first transition the test makes at once), and whatever it
        // spawns after.
        (shared.on_action)(act, pod).await;
    }
    reply(answer.status, answer.body)
}
