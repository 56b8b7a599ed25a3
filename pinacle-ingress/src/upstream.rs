//! Upstream choice, pure: the decided target -> a Pingora peer with explicit timeouts, and the
//! `Host` a pod's nginx expects. Connections are pooled per (address, group key); the group key
//! is the pod id, so a recreated pod that gets the same server port never receives a connection
//! opened to its predecessor.

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};

use http::HeaderName;
use http::header;

use pinacle_authz::PodId;
use pingora::upstreams::peer::HttpPeer;

use crate::config::Timeouts;
use crate::host::{BaseDomain, PodHost};

/// Where a request goes, decided in the request filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The dashboard, with the original `Host`.
    Dashboard {
        /// Its address.
        addr: SocketAddr,
    },
    /// A pod's nginx.
    Pod {
        /// `<server ip>:<nginx-proxy external port>`.
        addr: SocketAddr,
        /// The pod (connection pool group).
        pod_id: PodId,
        /// The `Host` header to send.
        host: String,
    },
}

impl Target {
    /// The upstream address.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Self::Dashboard { addr } | Self::Pod { addr, .. } => *addr,
        }
    }
}

/// `localhost-<port>-pod-<slug>.<domain>`: what the pod's nginx routes on.
pub fn pod_upstream_host(pod: &PodHost, domain: &BaseDomain) -> String {
    // Pieces, not `format!` (a request's worth of formatting machinery for one short string).
    let (slug, domain) = (pod.slug.as_str(), domain.as_str());
    let mut port = itoa::Buffer::new();
    let port = port.format(pod.port);
    let mut host = String::with_capacity(20 + port.len() + slug.len() + domain.len());
    for part in ["localhost-", port, "-pod-", slug, ".", domain] {
        host.push_str(part);
    }
    host
}

/// The connection pool group for a pod.
pub fn group_key(pod_id: &PodId) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    pod_id.as_str().hash(&mut hasher);
    hasher.finish()
}

/// One change to the request headers sent upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderEdit {
    /// Replace every value with this one (bytes: a forwarded `Cookie` may hold any byte a
    /// browser sends, non-ASCII included).
    Set(HeaderName, Vec<u8>),
    /// Remove the field.
    Remove(HeaderName),
    /// Remove every field [`is_spoofable`] names: the client is not a trusted proxy.
    RemoveSpoofable,
}

impl HeaderEdit {
    /// Whether this edit replaces or removes the field `name` (any case).
    pub fn edits(&self, name: &[u8]) -> bool {
        match self {
            Self::Set(n, _) | Self::Remove(n) => n.as_str().as_bytes().eq_ignore_ascii_case(name),
            Self::RemoveSpoofable => is_spoofable(name),
        }
    }
}

/// Request fields by which a client could claim another address, scheme, host, path or
/// identity to an upstream, or pose as the ingress (`X-Pinacle-*`). The ingress is the edge:
/// it removes them unless the client is a trusted proxy. `X-Forwarded-For`, `-Proto` and `-Host`
/// are not listed: they are always set by the ingress. Any case.
pub fn is_spoofable(name: &[u8]) -> bool {
    const NAMES: [&[u8]; 7] = [
        b"forwarded",
        b"x-real-ip",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-server",
        b"x-client-ip",
        b"x-original-url",
    ];
    // Fast exit for the common fields: every listed name starts with `f` or `x`.
    match name.first() {
        Some(b'f' | b'F' | b'x' | b'X') => {}
        _ => return false,
    }
    let ours = name
        .get(..10)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"x-pinacle-"));
    ours || NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// What the upstream is told about the request.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    /// Where it goes.
    pub target: &'a Target,
    /// The `Cookie` header left after removing credentials (pods only).
    pub cookie: Option<&'a [u8]>,
    /// The client's address.
    pub client_ip: Option<IpAddr>,
    /// Whether the client is a trusted proxy (its identity fields are kept).
    pub trusted_client: bool,
    /// The `X-Forwarded-For` received, when the client is a trusted proxy (appended to).
    pub trusted_forwarded_for: Option<&'a str>,
    /// Whether the client connected over TLS.
    pub tls: bool,
    /// The `Host` the client sent.
    pub original_host: &'a str,
    /// The request id.
    pub request_id: &'a str,
}

/// The header edits for a forwarded request: pods get their rewritten `Host` and the stripped
/// `Cookie`; everyone gets `X-Forwarded-For/Proto/Host` (replacing whatever the client claimed:
/// the ingress is the edge, unless the client is a trusted proxy whose chain is kept) and the
/// request id, and loses every other identity field ([`is_spoofable`]) unless it is a trusted
/// proxy.
pub fn forwarding_edits(f: &Forwarding<'_>) -> Vec<HeaderEdit> {
    let mut edits = Vec::with_capacity(7);
    if let Target::Pod { host, .. } = f.target {
        edits.push(HeaderEdit::Set(header::HOST, host.clone().into_bytes()));
        edits.push(match f.cookie {
            Some(cookie) => HeaderEdit::Set(header::COOKIE, cookie.to_vec()),
            None => HeaderEdit::Remove(header::COOKIE),
        });
    }
    if !f.trusted_client {
        edits.push(HeaderEdit::RemoveSpoofable);
    }
    let xff = HeaderName::from_static("x-forwarded-for");
    edits.push(match (f.trusted_forwarded_for, f.client_ip) {
        (Some(chain), Some(ip)) => {
            let mut value = String::with_capacity(chain.len() + 2 + 39);
            value.push_str(chain);
            value.push_str(", ");
            push_ip(&mut value, ip);
            HeaderEdit::Set(xff, value.into_bytes())
        }
        (None, Some(ip)) => {
            let mut value = String::with_capacity(39);
            push_ip(&mut value, ip);
            HeaderEdit::Set(xff, value.into_bytes())
        }
        (Some(chain), None) => HeaderEdit::Set(xff, chain.as_bytes().to_vec()),
        (None, None) => HeaderEdit::Remove(xff),
    });
    let proto = if f.tls { "https" } else { "http" };
    edits.push(HeaderEdit::Set(
        HeaderName::from_static("x-forwarded-proto"),
        proto.as_bytes().to_vec(),
    ));
    edits.push(HeaderEdit::Set(
        HeaderName::from_static("x-forwarded-host"),
        f.original_host.as_bytes().to_vec(),
    ));
    edits.push(HeaderEdit::Set(
        HeaderName::from_static("x-request-id"),
        f.request_id.as_bytes().to_vec(),
    ));
    edits
}

/// Appends `ip` as text; IPv4 (nearly every client) without `fmt`, which costs ~1.5k
/// instructions a request.
fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(digits.format(octet));
            }
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

/// The peer for a target. Upgraded requests (WebSockets) get the long idle timeout for reads
/// and writes, since the tunnel's frames flow as body and may pause for hours.
pub fn peer(target: &Target, timeouts: &Timeouts, upgrade: bool) -> HttpPeer {
    let mut peer = HttpPeer::new(target.addr(), false, String::new());
    if let Target::Pod { pod_id, .. } = target {
        peer.group_key = group_key(pod_id);
    }
    let options = &mut peer.options;
    options.connection_timeout = Some(timeouts.upstream_connect);
    options.total_connection_timeout = Some(timeouts.upstream_connect);
    let read = if upgrade {
        timeouts.websocket_idle
    } else {
        timeouts.upstream_read
    };
    options.read_timeout = Some(read);
    options.write_timeout = Some(read);
    options.idle_timeout = Some(timeouts.upstream_idle);
    peer
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinacle_authz::PodSlug;
    use std::time::Duration;

    fn timeouts() -> Timeouts {
        Timeouts {
            upstream_connect: Duration::from_secs(1),
            upstream_read: Duration::from_secs(2),
            upstream_idle: Duration::from_secs(3),
            websocket_idle: Duration::from_secs(4),
            client_read: Duration::from_secs(5),
            request_header: Duration::from_secs(8),
            directory_query: Duration::from_secs(6),
            shutdown_grace: Duration::from_secs(7),
        }
    }

    fn pod(id: &str) -> Target {
        Target::Pod {
            addr: "10.0.0.1:30001".parse().unwrap(),
            pod_id: PodId::new(id).unwrap(),
            host: "h".into(),
        }
    }

    #[test]
    fn the_host_names_port_slug_and_domain() {
        let host = PodHost {
            port: 8726,
            slug: PodSlug::parse("my-pod").unwrap(),
            base: 0,
        };
        assert_eq!(
            pod_upstream_host(&host, &BaseDomain::parse("pinacle.dev").unwrap()),
            "localhost-8726-pod-my-pod.pinacle.dev"
        );
    }

    #[test]
    fn pods_at_one_address_do_not_share_connections() {
        let (a, b) = (
            peer(&pod("pod_a"), &timeouts(), false),
            peer(&pod("pod_b"), &timeouts(), false),
        );
        assert_ne!(a.group_key, b.group_key);
        assert_eq!(
            a.group_key,
            peer(&pod("pod_a"), &timeouts(), true).group_key
        );
    }

    #[test]
    fn forwarding_rewrites_pods_and_only_annotates_the_dashboard() {
        let target = pod("p");
        let edits = forwarding_edits(&Forwarding {
            target: &target,
            cookie: None,
            client_ip: Some("203.0.113.1".parse().unwrap()),
            trusted_client: false,
            trusted_forwarded_for: None,
            tls: true,
            original_host: "localhost-1-pod-p.pinacle.dev",
            request_id: "r1",
        });
        assert_eq!(edits[0], HeaderEdit::Set(header::HOST, b"h".to_vec()));
        assert_eq!(edits[1], HeaderEdit::Remove(header::COOKIE));
        assert!(edits.contains(&HeaderEdit::Set(
            HeaderName::from_static("x-forwarded-for"),
            b"203.0.113.1".to_vec()
        )));
        assert!(edits.contains(&HeaderEdit::Set(
            HeaderName::from_static("x-forwarded-proto"),
            b"https".to_vec()
        )));
        let dashboard = Target::Dashboard {
            addr: "127.0.0.1:3000".parse().unwrap(),
        };
        let edits = forwarding_edits(&Forwarding {
            target: &dashboard,
            cookie: Some(b"ignored"),
            client_ip: None,
            trusted_client: true,
            trusted_forwarded_for: Some("198.51.100.7"),
            tls: false,
            original_host: "pinacle.dev",
            request_id: "r2",
        });
        assert!(!edits.iter().any(
            |e| matches!(e, HeaderEdit::Set(n, _) | HeaderEdit::Remove(n)
            if n == header::HOST || n == header::COOKIE)
        ));
    }

    #[test]
    fn identity_fields_are_spoofable_in_any_case_and_common_ones_are_not() {
        for name in [
            "Forwarded",
            "x-real-ip",
            "X-Forwarded-Port",
            "x-forwarded-prefix",
            "X-FORWARDED-SERVER",
            "x-client-ip",
            "X-Original-URL",
            "x-pinacle-ingress",
            "X-Pinacle-User",
        ] {
            assert!(is_spoofable(name.as_bytes()), "{name}");
        }
        for name in [
            "host",
            "cookie",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-pinacle",
            "x-pinaclex-a",
            "forwarded-x",
            "accept",
        ] {
            assert!(!is_spoofable(name.as_bytes()), "{name}");
        }
        let untrusted = forwarding_edits(&Forwarding {
            target: &pod("p"),
            cookie: None,
            client_ip: None,
            trusted_client: false,
            trusted_forwarded_for: None,
            tls: false,
            original_host: "h",
            request_id: "r",
        });
        assert!(untrusted.contains(&HeaderEdit::RemoveSpoofable));
        let trusted = forwarding_edits(&Forwarding {
            trusted_client: true,
            trusted_forwarded_for: Some("198.51.100.7"),
            target: &pod("p"),
            cookie: None,
            client_ip: None,
            tls: false,
            original_host: "h",
            request_id: "r",
        });
        assert!(!trusted.contains(&HeaderEdit::RemoveSpoofable));
    }

    #[test]
    fn client_addresses_are_written_as_std_writes_them() {
        for ip in [
            "0.0.0.0",
            "203.0.113.1",
            "255.255.255.255",
            "10.20.3.4",
            "::1",
            "2001:db8::7",
        ] {
            let mut text = String::new();
            push_ip(&mut text, ip.parse().unwrap());
            assert_eq!(text, ip);
        }
        let target = pod("p");
        let edits = forwarding_edits(&Forwarding {
            target: &target,
            cookie: None,
            client_ip: Some("192.0.2.44".parse().unwrap()),
            trusted_client: true,
            trusted_forwarded_for: Some("198.51.100.7"),
            tls: false,
            original_host: "h",
            request_id: "r",
        });
        assert!(edits.contains(&HeaderEdit::Set(
            HeaderName::from_static("x-forwarded-for"),
            b"198.51.100.7, 192.0.2.44".to_vec()
        )));
    }

    #[test]
    fn timeouts_are_explicit_and_upgrades_get_the_idle_one() {
        let plain = peer(&pod("p"), &timeouts(), false);
        assert_eq!(
            plain.options.connection_timeout,
            Some(Duration::from_secs(1))
        );
        assert_eq!(plain.options.read_timeout, Some(Duration::from_secs(2)));
        assert_eq!(plain.options.idle_timeout, Some(Duration::from_secs(3)));
        let ws = peer(&pod("p"), &timeouts(), true);
        assert_eq!(ws.options.read_timeout, Some(Duration::from_secs(4)));
        assert_eq!(ws.options.write_timeout, Some(Duration::from_secs(4)));
    }
}
