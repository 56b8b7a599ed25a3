//! A certificate authority made in the test, leaf certificates on disk for the ingress, and a
//! client connector that trusts only that authority.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, Certificate, CertificateParams, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A test certificate authority.
pub struct Ca {
    /// Its certificate.
    pub cert: Certificate,
    key: KeyPair,
}

impl Ca {
    /// A new self-signed authority.
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    /// Writes a leaf for `names` signed by this authority to `<dir>/<tag>.pem` and
    /// `<dir>/<tag>.key`.
    pub fn leaf(&self, names: &[&str], dir: &Path, tag: &str) -> CertificateDer<'static> {
        let params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        std::fs::write(dir.join(format!("{tag}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{tag}.key")), key.serialize_pem()).unwrap();
        cert.der().clone()
    }

    /// A client connector trusting only this authority, offering `alpn`.
    pub fn connector(&self, alpn: &[&[u8]]) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca")
    }
}

impl Default for Ca {
    fn default() -> Self {
        Self::new()
    }
}

/// Connects to `addr` and completes a TLS handshake for `name`.
pub async fn connect(
    connector: &TlsConnector,
    addr: SocketAddr,
    name: &str,
) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
        .await
        .unwrap_or_else(|e| panic!("TLS handshake for {name}: {e}"))
}
