//! Server certificates: PEM files loaded into rustls keys, chosen per connection by SNI
//! (exact names first, then wildcards, else the first certificate), and swapped atomically on
//! reload so open connections keep theirs and new handshakes get the new ones.

use std::path::Path;
use std::sync::{Arc, RwLock};

use pingora::tls::sign::CertifiedKey;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::CertificateFile;

/// A certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

fn file_error(path: &Path, message: impl Into<String>) -> CertError {
    CertError::File {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// One loaded certificate and the DNS names it covers (lowercase; `*.` prefix for wildcards).
#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    names: Vec<String>,
}

fn load_pair(pair: &CertificateFile) -> Result<Loaded, CertError> {
    let cert_text =
        std::fs::read(&pair.cert_file).map_err(|e| file_error(&pair.cert_file, e.to_string()))?;
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_text.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(&pair.cert_file, format!("not PEM: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(file_error(&pair.cert_file, "no certificate in the file"));
    };
    let names = dns_names(leaf).map_err(|m| file_error(&pair.cert_file, m))?;
    let key_text =
        std::fs::read(&pair.key_file).map_err(|e| file_error(&pair.key_file, e.to_string()))?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_text.as_slice())
        .map_err(|e| file_error(&pair.key_file, format!("not PEM: {e}")))?
        .ok_or_else(|| file_error(&pair.key_file, "no private key in the file"))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| file_error(&pair.key_file, format!("unusable key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        file_error(
            &pair.key_file,
            format!("does not match the certificate: {e}"),
        )
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        names,
    })
}

/// The DNS names of a certificate's subject alternative names (lowercase).
fn dns_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    Ok(names)
}

/// Whether `pattern` (a certificate name, maybe `*.example.com`) covers `host`.
fn covers(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == host,
    }
}

/// The certificates currently served, replaceable as a whole.
#[derive(Debug)]
pub struct CertStore {
    pairs: Vec<CertificateFile>,
    loaded: RwLock<Arc<Vec<Loaded>>>,
}

impl CertStore {
    /// Loads every pair (the first is the default).
    ///
    /// # Errors
    /// The first pair that cannot be loaded.
    pub fn load(pairs: &[CertificateFile]) -> Result<Arc<Self>, CertError> {
        let loaded = pairs.iter().map(load_pair).collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(Self {
            pairs: pairs.to_vec(),
            loaded: RwLock::new(Arc::new(loaded)),
        }))
    }

    /// Re-reads every file. On any error the current certificates stay.
    ///
    /// # Errors
    /// The first pair that cannot be loaded.
    pub fn reload(&self) -> Result<(), CertError> {
        let loaded = self
            .pairs
            .iter()
            .map(load_pair)
            .collect::<Result<Vec<_>, _>>()?;
        if let Ok(mut current) = self.loaded.write() {
            *current = Arc::new(loaded);
        }
        Ok(())
    }

    fn current(&self) -> Option<Arc<Vec<Loaded>>> {
        self.loaded.read().ok().map(|l| Arc::clone(&l))
    }

    /// The key for a server name (`None`: no SNI).
    pub fn choose(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let loaded = self.current()?;
        if let Some(host) = server_name.map(str::to_ascii_lowercase) {
            let exact = loaded.iter().find(|l| l.names.contains(&host));
            let wildcard = || {
                loaded
                    .iter()
                    .find(|l| l.names.iter().any(|n| covers(n, &host)))
            };
            if let Some(found) = exact.or_else(wildcard) {
                return Some(found.key.clone());
            }
        }
        loaded.first().map(|l| l.key.clone())
    }
}

/// The rustls resolver over a shared [`CertStore`].
#[derive(Debug)]
pub struct Resolver(pub Arc<CertStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.choose(hello.server_name())
    }
}

#[cfg(test)]
mod tests {
    use super::covers;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(covers("*.pinacle.dev", "localhost-3000-pod-a.pinacle.dev"));
        assert!(!covers("*.pinacle.dev", "pinacle.dev"));
        assert!(!covers("*.pinacle.dev", "a.b.pinacle.dev"));
        assert!(covers("pinacle.dev", "pinacle.dev"));
        assert!(!covers("pinacle.dev", "x.pinacle.dev"));
    }
}
