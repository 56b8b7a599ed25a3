//! One bounded HTTP/1.1 request as a client (the control plane, a JWKS URL). Hand-written on
//! hyper's connection API and tokio-rustls, both in the build already: one request per call, no
//! pool, no redirects; a client crate would bring its own TLS stack and pool for two rare calls.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

/// Which CA file (path and modification time) TLS settings were built from.
type CaVersion = Option<(std::path::PathBuf, Option<std::time::SystemTime>)>;

/// Client TLS settings, built again only when the CA file (its path or its modification time)
/// changes: loading the system's roots costs milliseconds.
#[derive(Debug, Default)]
pub struct TlsCache(std::sync::Mutex<Option<(CaVersion, Arc<rustls::ClientConfig>)>>);

impl TlsCache {
    /// The settings for the system's roots and `ca_file`'s.
    ///
    /// # Errors
    /// The CA file cannot be read.
    pub fn get(
        &self,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Arc<rustls::ClientConfig>, String> {
        let version: CaVersion = ca_file.map(|path| {
            let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            (path.to_path_buf(), modified)
        });
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((built_from, tls)) = cached.as_ref()
            && *built_from == version
        {
            return Ok(tls.clone());
        }
        let tls = Arc::new(client_tls(ca_file)?);
        *cached = Some((version, tls.clone()));
        Ok(tls)
    }
}

/// The system's roots and `ca_file`'s (the agent's settings: `pinacle_agent::protocol`).
///
/// # Errors
/// `ca_file` cannot be read.
pub fn client_tls(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    pinacle_agent::protocol::client_tls(ca_file)
}

/// A connection to the peer, TLS or not.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// One request on a new connection: `url` (http, or https with `tls`), the given fields
/// (`Host`, `Content-Length` and `User-Agent` are added), at most `max_answer` bytes of the
/// answer read. No redirects, no pool; the caller bounds the time.
///
/// # Errors
/// Why there is no complete answer, in words.
pub async fn request(
    method: http::Method,
    url: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    fields: &[(http::HeaderName, &str)],
    body: Bytes,
    max_answer: usize,
) -> Result<(u16, Bytes), String> {
    let unreachable = |e: &dyn std::fmt::Display| e.to_string();
    let url = url::Url::parse(url).map_err(|e| unreachable(&e))?;
    if url.scheme() == "https" && tls.is_none() {
        return Err("https without TLS settings".to_owned());
    }
    let host = url
        .host_str()
        .ok_or_else(|| "no host".to_owned())?
        .to_owned();
    let port = url
        .port_or_known_default()
        .ok_or_else(|| "no port".to_owned())?;
    let bare_host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tcp = tokio::net::TcpStream::connect((bare_host.as_str(), port))
        .await
        .map_err(|e| unreachable(&e))?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = match tls {
        Some(tls) => {
            let name = rustls_pki_types::ServerName::try_from(bare_host.clone())
                .map_err(|e| unreachable(&e))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| unreachable(&e))?;
            Box::new(stream)
        }
        None => Box::new(tcp),
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| unreachable(&e))?;
    let driver = tokio::spawn(connection);
    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    };
    let target = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let mut builder = http::Request::builder()
        .method(method.clone())
        .uri(target)
        .header(http::header::HOST, authority)
        .header(
            http::header::USER_AGENT,
            format!("pinacle-ingress/{}", crate::VERSION),
        );
    for (name, value) in fields {
        builder = builder.header(name, *value);
    }
    if method != http::Method::GET || !body.is_empty() {
        builder = builder.header(http::header::CONTENT_LENGTH, body.len());
    }
    let request = builder.body(Full::new(body)).map_err(|e| unreachable(&e))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(&e))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), max_answer)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    driver.abort();
    result
}
