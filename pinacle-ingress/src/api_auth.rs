//! Credentials for machines (scripts, CI jobs, agents): `Authorization: Bearer <JWT>` checked
//! against a JWKS (RS256, ES256, EdDSA) or configured HS256 secrets, and HMAC-signed requests
//! (`X-Pinacle-Client`, `X-Pinacle-Timestamp`, `X-Pinacle-Signature`). Pure: the keys, the
//! clients and the clock are passed in; fetching a JWKS URL is [`UrlKeys`]'s.
//!
//! A bearer token is *ours* when its key id names one of our keys, or its (unverified) `aud`
//! holds our audience, or its `iss` is our issuer: then it must verify, or the request is
//! refused (401). Any other `Authorization` (a pod app's own API token) is not looked at
//! further: it passes to the pod untouched and the request is judged on its other credentials.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use pinacle_authz::{Secret, UserId};
use serde::Deserialize;
use sha2::Sha256;

/// The client id header of an HMAC-signed request.
pub const CLIENT_HEADER: &str = "x-pinacle-client";
/// Its timestamp (unix seconds).
pub const TIMESTAMP_HEADER: &str = "x-pinacle-timestamp";
/// Its signature: lowercase hex HMAC-SHA256 over `METHOD\nHOST\nPATH_AND_QUERY\nTIMESTAMP`.
pub const SIGNATURE_HEADER: &str = "x-pinacle-signature";

/// One verification key.
#[derive(Clone)]
pub struct Key {
    /// `kid`, when the JWKS gives one.
    pub kid: Option<String>,
    /// The one algorithm it verifies (RS256, ES256 or EdDSA).
    pub alg: Algorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// Public keys from a JWKS document.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    /// Reads a JWKS document. Keys of other types or algorithms (and `use` other than `sig`)
    /// are refused by name: a key set the operator thinks is in force must be.
    ///
    /// # Errors
    /// Not JSON, not a JWKS, or a key that cannot be used.
    pub fn parse(text: &str) -> Result<Self, String> {
        let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut keys = Vec::with_capacity(set.keys.len());
        for jwk in &set.keys {
            let kid = jwk.common.key_id.clone();
            let name = kid.clone().unwrap_or_else(|| "(no kid)".to_owned());
            let alg = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                _ => return Err(format!("key {name}: only RSA, EC P-256 and Ed25519 keys")),
            };
            if let Some(declared) = jwk.common.key_algorithm {
                let declared = format!("{declared:?}");
                if declared != format!("{alg:?}") {
                    return Err(format!("key {name}: alg {declared} is not {alg:?}"));
                }
            }
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {name}: {e}"))?;
            keys.push(Key { kid, alg, key });
        }
        Ok(Self { keys })
    }

    /// Reads a JWKS file.
    ///
    /// # Errors
    /// Unreadable, or as [`Self::parse`].
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
        Self::parse(&text)
    }

    /// Whether a key has this id.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// No keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// One HMAC client (`[[clients]]` of `hmac_clients_file`).
#[derive(Clone)]
pub struct HmacClient {
    /// The user it acts as.
    pub user: UserId,
    secret: Secret,
}

impl std::fmt::Debug for HmacClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HmacClient")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// The HMAC clients by id.
#[derive(Debug, Clone, Default)]
pub struct HmacClients(std::collections::HashMap<String, HmacClient>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientsFile {
    #[serde(default)]
    clients: Vec<ClientEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientEntry {
    id: String,
    secret: Option<String>,
    secret_file: Option<std::path::PathBuf>,
    user_id: String,
}

/// The shortest HMAC client secret accepted.
pub const MIN_HMAC_SECRET_BYTES: usize = 32;

impl HmacClients {
    /// Reads `hmac_clients_file`; relative `secret_file`s are relative to it.
    ///
    /// # Errors
    /// Every problem at once, each naming the client.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
        let file: ClientsFile = toml::from_str(&text).map_err(|e| e.to_string())?;
        let mut clients = std::collections::HashMap::new();
        let mut problems = Vec::new();
        for entry in file.clients {
            let id = entry.id.clone();
            let secret = match (&entry.secret, &entry.secret_file) {
                (Some(s), None) => Some(s.clone()),
                (None, Some(f)) => {
                    let f = path.parent().map_or_else(|| f.clone(), |dir| dir.join(f));
                    match std::fs::read_to_string(&f) {
                        Ok(t) => Some(t.trim_end_matches(['\r', '\n']).to_owned()),
                        Err(e) => {
                            problems.push(format!("client {id}: cannot read {}: {e}", f.display()));
                            None
                        }
                    }
                }
                _ => {
                    problems.push(format!("client {id}: give secret or secret_file (one)"));
                    None
                }
            };
            let user = UserId::new(&entry.user_id)
                .map_err(|e| problems.push(format!("client {id}: user_id: {e}")))
                .ok();
            match (secret, user) {
                (Some(secret), Some(_)) if secret.len() < MIN_HMAC_SECRET_BYTES => problems.push(
                    format!("client {id}: secret shorter than {MIN_HMAC_SECRET_BYTES} bytes"),
                ),
                (Some(secret), Some(user)) => {
                    let client = HmacClient {
                        user,
                        secret: Secret::new(secret),
                    };
                    if clients.insert(id.clone(), client).is_some() {
                        problems.push(format!("client {id}: listed twice"));
                    }
                }
                _ => {}
            }
        }
        if problems.is_empty() {
            Ok(Self(clients))
        } else {
            Err(problems.join("; "))
        }
    }

    /// How many clients.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// None.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `[api]`: what machine credentials are accepted, with the key material loaded.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Required `aud`.
    pub audience: String,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Clock leeway for `exp` and `nbf`.
    pub leeway: Duration,
    /// `jwks_file`.
    pub jwks_file: Option<std::path::PathBuf>,
    /// Keys from `jwks_file`.
    pub file_keys: Arc<KeySet>,
    /// `jwks_url`, fetched and cached ([`UrlKeys`]).
    pub jwks_url: Option<String>,
    /// Longest one JWKS fetch may take.
    pub jwks_timeout: Duration,
    /// The shortest time between two fetches on unknown key ids.
    pub jwks_refresh_interval: Duration,
    /// HS256 secrets (`hs256_secrets`, `hs256_secret_files`).
    pub hs256: Vec<Secret>,
    /// `hmac_clients_file`.
    pub hmac_clients_file: Option<std::path::PathBuf>,
    /// The HMAC clients.
    pub clients: Arc<HmacClients>,
    /// How far an HMAC timestamp may be from now.
    pub hmac_tolerance: Duration,
}

impl PartialEq for ApiConfig {
    /// Equal settings (the key material is compared by what it came from, not byte for byte).
    fn eq(&self, other: &Self) -> bool {
        self.audience == other.audience
            && self.issuer == other.issuer
            && self.leeway == other.leeway
            && self.jwks_url == other.jwks_url
            && self.hs256 == other.hs256
            && self.hmac_tolerance == other.hmac_tolerance
            && self.jwks_file == other.jwks_file
            && self.hmac_clients_file == other.hmac_clients_file
            && self.file_keys.len() == other.file_keys.len()
            && self.clients.len() == other.clients.len()
    }
}

/// What a machine credential may reach (the token's `pods` and `ports` claims; none: all the
/// user may reach).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiScope {
    /// Pod slugs.
    pub pods: Option<Vec<String>>,
    /// Ports.
    pub ports: Option<Vec<u16>>,
}

impl ApiScope {
    /// Whether `slug`:`port` is inside.
    pub fn allows(&self, slug: &str, port: u16) -> bool {
        self.pods
            .as_ref()
            .is_none_or(|p| p.iter().any(|s| s == slug))
            && self.ports.as_ref().is_none_or(|p| p.contains(&port))
    }
}

/// A machine that proved who it acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// The user.
    pub user: UserId,
    /// When the credential stops being good (a JWT's `exp` plus leeway).
    pub expires_at: Option<i64>,
    /// What the credential is limited to.
    pub scope: ApiScope,
    /// `jwt` or `hmac` (logs).
    pub kind: &'static str,
}

/// The verdict on a request's machine credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// None of ours (no HMAC headers, no bearer token of ours).
    Absent,
    /// Valid.
    Valid(Machine),
    /// Ours, and wrong: 401. The reason is for the log only (stable names).
    Invalid(&'static str),
}

/// What a bearer token is, before its signature is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bearer<'a> {
    /// Not ours: the pod's own business.
    NotOurs,
    /// Ours by its key id, audience or issuer; `unknown_kid` when its key id names none of
    /// the keys at hand (a JWKS URL may know it after a refresh).
    Ours {
        /// The token.
        token: &'a str,
        /// Its key id names no key we have.
        unknown_kid: Option<String>,
    },
}

/// The bearer token of an `Authorization` value, if it is one.
pub fn bearer_token(value: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(value).ok()?;
    let (scheme, token) = text.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[derive(Deserialize)]
struct Peek {
    #[serde(default)]
    aud: Option<serde_json::Value>,
    #[serde(default)]
    iss: Option<String>,
}

#[derive(Deserialize)]
struct PeekHeader {
    #[serde(default)]
    kid: Option<String>,
}

fn b64_json<T: serde::de::DeserializeOwned>(part: &str) -> Option<T> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Whether `token` is ours ([module docs](self)), reading its header and claims unverified.
pub fn classify<'a>(token: &'a str, api: &ApiConfig, url_keys: &KeySet) -> Bearer<'a> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Bearer::NotOurs;
    };
    let kid = b64_json::<PeekHeader>(header).and_then(|h| h.kid);
    let known_kid = kid
        .as_deref()
        .is_some_and(|k| api.file_keys.has_kid(k) || url_keys.has_kid(k));
    let peek = b64_json::<Peek>(payload);
    let aud_ours = peek
        .as_ref()
        .and_then(|p| p.aud.as_ref())
        .is_some_and(|a| match a {
            serde_json::Value::String(s) => *s == api.audience,
            serde_json::Value::Array(list) => {
                list.iter().any(|v| v.as_str() == Some(&api.audience))
            }
            _ => false,
        });
    let iss_ours = api
        .issuer
        .as_deref()
        .is_some_and(|iss| peek.as_ref().and_then(|p| p.iss.as_deref()) == Some(iss));
    if !(known_kid || aud_ours || iss_ours) {
        return Bearer::NotOurs;
    }
    Bearer::Ours {
        token,
        unknown_kid: kid.filter(|_| !known_kid),
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    #[serde(default)]
    pods: Option<Vec<String>>,
    #[serde(default)]
    ports: Option<Vec<serde_json::Value>>,
}

/// Verifies a token of ours (`now`: unix seconds).
pub fn verify_jwt(token: &str, api: &ApiConfig, url_keys: &KeySet, now: i64) -> Verdict {
    let Ok(header) = jsonwebtoken::decode_header(token) else {
        // `alg: none` and anything else jsonwebtoken cannot read.
        return Verdict::Invalid("jwt_malformed");
    };
    let mut validation = Validation::new(header.alg);
    validation.set_audience(&[&api.audience]);
    if let Some(iss) = &api.issuer {
        validation.set_issuer(&[iss]);
        // Else a token without `iss` would pass the issuer check.
        validation.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
    } else {
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
    }
    validation.leeway = api.leeway.as_secs();
    validation.validate_nbf = true;
    // `exp` is checked here against the ingress's clock (the one passed in), not inside
    // jsonwebtoken, so tests and the rest of the ingress share one clock.
    validation.validate_exp = false;
    let hs_keys: Vec<DecodingKey>;
    let keys: Vec<&DecodingKey> = if header.alg == Algorithm::HS256 {
        // Only configured secrets: never a public key taken for an HMAC secret.
        hs_keys = api
            .hs256
            .iter()
            .map(|s| DecodingKey::from_secret(s.expose()))
            .collect();
        hs_keys.iter().collect()
    } else {
        api.file_keys
            .keys
            .iter()
            .chain(url_keys.keys.iter())
            .filter(|k| k.alg == header.alg)
            .filter(|k| header.kid.is_none() || k.kid == header.kid)
            .map(|k| &k.key)
            .collect()
    };
    if keys.is_empty() {
        return Verdict::Invalid("jwt_no_key");
    }
    let mut last = "jwt_bad_signature";
    for key in keys {
        match jsonwebtoken::decode::<Claims>(token, key, &validation) {
            Ok(data) => {
                let leeway = i64::try_from(api.leeway.as_secs()).unwrap_or(i64::MAX);
                if data.claims.exp.saturating_add(leeway) <= now {
                    return Verdict::Invalid("jwt_expired");
                }
                let expires_at = data.claims.exp.saturating_add(leeway);
                return machine(data.claims, expires_at);
            }
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind;
                last = match e.kind() {
                    ErrorKind::InvalidSignature => "jwt_bad_signature",
                    ErrorKind::InvalidAudience => "jwt_wrong_audience",
                    ErrorKind::InvalidIssuer => "jwt_wrong_issuer",
                    ErrorKind::ImmatureSignature => "jwt_not_yet_valid",
                    ErrorKind::MissingRequiredClaim(_) => "jwt_missing_claim",
                    ErrorKind::InvalidAlgorithm => "jwt_wrong_algorithm",
                    _ => "jwt_invalid",
                };
                // A wrong audience or issuer is the token's, whichever key: stop here.
                if last != "jwt_bad_signature" && last != "jwt_wrong_algorithm" {
                    return Verdict::Invalid(last);
                }
            }
        }
    }
    Verdict::Invalid(last)
}

fn machine(claims: Claims, expires_at: i64) -> Verdict {
    let Ok(user) = UserId::new(&claims.sub) else {
        return Verdict::Invalid("jwt_bad_subject");
    };
    let ports = match claims.ports {
        None => None,
        Some(list) => {
            let parsed: Option<Vec<u16>> = list
                .iter()
                .map(|v| match v {
                    serde_json::Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                    serde_json::Value::String(s) => s.parse().ok(),
                    _ => None,
                })
                .collect();
            match parsed {
                Some(p) => Some(p),
                None => return Verdict::Invalid("jwt_bad_scope"),
            }
        }
    };
    Verdict::Valid(Machine {
        user,
        expires_at: Some(expires_at),
        scope: ApiScope {
            pods: claims.pods,
            ports,
        },
        kind: "jwt",
    })
}

/// The parts of a request an HMAC signature covers.
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    /// The method.
    pub method: &'a str,
    /// The `Host` as sent.
    pub host: &'a str,
    /// The path and query as sent.
    pub path_and_query: &'a str,
}

/// Checks an HMAC-signed request: `None` when it carries no `X-Pinacle-Client`.
pub fn verify_hmac(
    headers: &http::HeaderMap,
    signed: Signed<'_>,
    api: &ApiConfig,
    now: i64,
) -> Option<Verdict> {
    let client = headers.get(CLIENT_HEADER)?;
    let verdict = (|| {
        let client = client.to_str().ok().and_then(|id| api.clients.0.get(id));
        let Some(client) = client else {
            return Verdict::Invalid("hmac_unknown_client");
        };
        let Some(timestamp) = headers
            .get(TIMESTAMP_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|t| t.parse::<i64>().ok())
        else {
            return Verdict::Invalid("hmac_bad_timestamp");
        };
        if now.abs_diff(timestamp) > api.hmac_tolerance.as_secs() {
            return Verdict::Invalid("hmac_stale");
        }
        let Some(signature) = headers
            .get(SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::hex::decode32)
        else {
            return Verdict::Invalid("hmac_bad_signature");
        };
        let Some(mac) = request_mac(client.secret.expose(), signed, timestamp) else {
            return Verdict::Invalid("hmac_bad_signature");
        };
        match mac.verify_slice(&signature) {
            Ok(()) => Verdict::Valid(Machine {
                user: client.user.clone(),
                expires_at: None,
                scope: ApiScope::default(),
                kind: "hmac",
            }),
            Err(_) => Verdict::Invalid("hmac_bad_signature"),
        }
    })();
    Some(verdict)
}

/// The MAC over `METHOD\nHOST\nPATH_AND_QUERY\nTIMESTAMP` (HMAC takes keys of any length:
/// never `None`).
fn request_mac(secret: &[u8], signed: Signed<'_>, timestamp: i64) -> Option<Hmac<Sha256>> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).ok()?;
    for part in [
        signed.method,
        "\n",
        signed.host,
        "\n",
        signed.path_and_query,
        "\n",
    ] {
        mac.update(part.as_bytes());
    }
    mac.update(timestamp.to_string().as_bytes());
    Some(mac)
}

/// The lowercase hex signature of a request (clients and tests).
pub fn sign(secret: &[u8], signed: Signed<'_>, timestamp: i64) -> String {
    let Some(mac) = request_mac(secret, signed, timestamp) else {
        return String::new();
    };
    crate::hex::encode(&mac.finalize().into_bytes())
}

/// Keys from `jwks_url`: fetched in the background ([`run_jwks_refresh`]) and again when a
/// token names a key id nobody knows, at most once per `jwks_refresh_interval` (requests that
/// arrive during a fetch wait for it, bounded by `jwks_timeout`).
#[derive(Debug, Default)]
pub struct UrlKeys {
    keys: arc_swap::ArcSwap<KeySet>,
    last_fetch: tokio::sync::Mutex<Option<std::time::Instant>>,
    tls: crate::http_client::TlsCache,
}

/// The most of a JWKS document read.
const MAX_JWKS_BYTES: usize = 256 * 1024;

impl UrlKeys {
    /// The keys fetched last.
    pub fn current(&self) -> Arc<KeySet> {
        self.keys.load_full()
    }

    /// Fetches `url` now (bounded by `timeout`) and keeps its keys; the old ones stay when it
    /// fails.
    ///
    /// # Errors
    /// Why the keys were not replaced.
    pub async fn fetch(&self, url: &str, timeout: Duration) -> Result<usize, String> {
        let tls = if url.starts_with("https:") {
            Some(self.tls.get(None)?)
        } else {
            None
        };
        let call = crate::http_client::request(
            http::Method::GET,
            url,
            tls,
            &[(http::header::ACCEPT, "application/json")],
            bytes::Bytes::new(),
            MAX_JWKS_BYTES,
        );
        let (status, body) = tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| "timed out".to_owned())??;
        if status != 200 {
            return Err(format!("HTTP {status}"));
        }
        let set = KeySet::parse(&String::from_utf8_lossy(&body))?;
        let count = set.len();
        self.keys.store(Arc::new(set));
        Ok(count)
    }

    /// Fetches again for an unknown key id unless the last fetch was less than
    /// `jwks_refresh_interval` ago; whether the keys may have changed.
    pub async fn refresh_on_unknown_kid(
        &self,
        url: &str,
        api: &ApiConfig,
        metrics: &crate::telemetry::Metrics,
    ) -> bool {
        let before = Arc::as_ptr(&self.keys.load_full()) as usize;
        let Ok(mut last) = tokio::time::timeout(api.jwks_timeout, self.last_fetch.lock()).await
        else {
            return false;
        };
        // Someone else fetched while this request waited.
        if Arc::as_ptr(&self.keys.load_full()) as usize != before {
            return true;
        }
        if last.is_some_and(|at| at.elapsed() < api.jwks_refresh_interval) {
            return false;
        }
        *last = Some(std::time::Instant::now());
        let result = self.fetch(url, api.jwks_timeout).await;
        record_fetch(metrics, url, "unknown_kid", &result);
        result.is_ok()
    }
}

fn record_fetch(
    metrics: &crate::telemetry::Metrics,
    url: &str,
    why: &str,
    result: &Result<usize, String>,
) {
    match result {
        Ok(keys) => {
            metrics.jwks_fetch("ok");
            tracing::info!(url, keys, why, "JWKS fetched");
        }
        Err(e) => {
            metrics.jwks_fetch("failed");
            tracing::warn!(url, error = %e, why, "JWKS fetch failed; the keys fetched before stay");
        }
    }
}

/// How often the JWKS URL is fetched in the background.
pub const JWKS_BACKGROUND_INTERVAL: Duration = Duration::from_secs(300);

/// Fetches `jwks_url` at start and every [`JWKS_BACKGROUND_INTERVAL`] (a reload may set,
/// change or remove the URL).
pub async fn run_jwks_refresh(state: Arc<crate::proxy::State>) {
    loop {
        let config = state.current_config();
        if let Some(api) = config.api.as_deref()
            && let Some(url) = &api.jwks_url
        {
            let mut last = state.url_keys.last_fetch.lock().await;
            *last = Some(std::time::Instant::now());
            let result = state.url_keys.fetch(url, api.jwks_timeout).await;
            drop(last);
            record_fetch(&state.metrics, url, "scheduled", &result);
        }
        tokio::time::sleep(JWKS_BACKGROUND_INTERVAL).await;
    }
}

/// Bearer tokens verified lately, so a client that sends the same token many times pays for
/// one signature check (RS256 and ES256 cost 0.1 to 0.3 ms each with the pure-Rust backend):
/// keyed by the whole token, good until its `exp` and only under the configuration and key
/// set it was verified with (a reload or a JWKS change makes every entry a miss).
#[derive(Debug)]
pub struct VerifiedTokens {
    cache: moka::sync::Cache<Arc<str>, Arc<Remembered>>,
}

#[derive(Debug)]
struct Remembered {
    machine: Machine,
    /// The `ApiConfig` and the URL key set it was verified under (weak: they keep their
    /// allocation, so a new configuration can never take the old one's address).
    api: std::sync::Weak<ApiConfig>,
    keys: std::sync::Weak<KeySet>,
}

/// Tokens remembered at most.
pub const VERIFIED_TOKENS: u64 = 10_000;

impl Default for VerifiedTokens {
    fn default() -> Self {
        Self {
            cache: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_TOKENS)
                .time_to_live(Duration::from_secs(3600))
                .build(),
        }
    }
}

impl VerifiedTokens {
    /// The machine `token` was verified as, if it still holds under `api` and `keys` at `now`.
    pub fn get(
        &self,
        token: &str,
        api: &Arc<ApiConfig>,
        keys: &Arc<KeySet>,
        now: i64,
    ) -> Option<Machine> {
        let hit = self.cache.get(token)?;
        let same = std::sync::Weak::ptr_eq(&hit.api, &Arc::downgrade(api))
            && std::sync::Weak::ptr_eq(&hit.keys, &Arc::downgrade(keys));
        let fresh = hit.machine.expires_at.is_some_and(|exp| exp > now);
        if same && fresh {
            Some(hit.machine.clone())
        } else {
            self.cache.invalidate(token);
            None
        }
    }

    /// Remembers a verified token.
    pub fn insert(&self, token: &str, machine: &Machine, api: &Arc<ApiConfig>, keys: &Arc<KeySet>) {
        self.cache.insert(
            Arc::from(token),
            Arc::new(Remembered {
                machine: machine.clone(),
                api: Arc::downgrade(api),
                keys: Arc::downgrade(keys),
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> ApiConfig {
        ApiConfig {
            audience: "pinacle-ingress".into(),
            issuer: Some("https://issuer.example".into()),
            leeway: Duration::ZERO,
            jwks_file: None,
            file_keys: Arc::new(
                KeySet::parse(
                    r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k1","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#,
                )
                .unwrap_or_default(),
            ),
            jwks_url: None,
            jwks_timeout: Duration::from_secs(1),
            jwks_refresh_interval: Duration::from_secs(60),
            hs256: Vec::new(),
            hmac_clients_file: None,
            clients: Arc::new(HmacClients::default()),
            hmac_tolerance: Duration::from_secs(300),
        }
    }

    fn token(header: &str, claims: &str) -> String {
        use base64::Engine as _;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("{}.{}.sig", e.encode(header), e.encode(claims))
    }

    #[test]
    fn bearer_values_are_read_case_insensitively_and_nothing_else_is() {
        assert_eq!(bearer_token(b"Bearer abc"), Some("abc"));
        assert_eq!(bearer_token(b"bearer  abc "), Some("abc"));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Bearer\xffx"), None);
    }

    #[test]
    fn a_token_is_ours_by_key_id_audience_or_issuer_and_only_then() {
        let api = api();
        let none = KeySet::default();
        let ours = |t: &str| matches!(classify(t, &api, &none), Bearer::Ours { .. });
        assert!(ours(&token(
            r#"{"alg":"EdDSA","kid":"k1"}"#,
            r#"{"sub":"a"}"#
        )));
        assert!(ours(&token(
            r#"{"alg":"HS256"}"#,
            r#"{"aud":"pinacle-ingress"}"#
        )));
        assert!(ours(&token(
            r#"{"alg":"HS256"}"#,
            r#"{"aud":["x","pinacle-ingress"]}"#
        )));
        assert!(ours(&token(
            r#"{"alg":"none"}"#,
            r#"{"iss":"https://issuer.example"}"#
        )));
        assert!(!ours(&token(r#"{"alg":"HS256"}"#, r#"{"aud":"the-app"}"#)));
        assert!(!ours(&token(
            r#"{"alg":"RS256","kid":"other"}"#,
            r#"{"aud":"the-app"}"#
        )));
        assert!(!ours("opaque-token"));
        assert!(!ours("a.b"));
        match classify(
            &token(
                r#"{"alg":"RS256","kid":"new"}"#,
                r#"{"aud":"pinacle-ingress"}"#,
            ),
            &api,
            &none,
        ) {
            Bearer::Ours { unknown_kid, .. } => assert_eq!(unknown_kid.as_deref(), Some("new")),
            Bearer::NotOurs => unreachable!(),
        }
    }

    #[test]
    fn key_sets_take_only_the_three_algorithms_they_are_meant_for() {
        assert!(KeySet::parse(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#).is_err());
        assert!(
            KeySet::parse(
                r#"{"keys":[{"kty":"OKP","crv":"Ed25519","alg":"RS256","kid":"x","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#
            )
            .is_err(),
            "a declared alg that is not the key's"
        );
        assert!(KeySet::parse("not json").is_err());
        assert_eq!(api().file_keys.len(), 1);
    }

    #[test]
    fn scopes_narrow_by_pod_and_port() {
        let scope = ApiScope {
            pods: Some(vec!["demo".into()]),
            ports: Some(vec![3000]),
        };
        assert!(scope.allows("demo", 3000));
        assert!(!scope.allows("demo", 8080));
        assert!(!scope.allows("other", 3000));
        assert!(ApiScope::default().allows("any", 1));
    }
}
