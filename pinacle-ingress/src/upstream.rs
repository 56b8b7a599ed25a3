//! Upstream choice, pure: the decided target -> a Pingora peer with explicit timeouts, and the
//! `Host` a pod's nginx expects. Connections are pooled per (address, group key); the group key
//! is the pod id, so a recreated pod that gets the same server port never receives a connection
//! opened to its predecessor.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;

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
    format!(
        "localhost-{}-pod-{}.{}",
        pod.port,
        pod.slug.as_str(),
        domain.as_str()
    )
}

/// The connection pool group for a pod.
pub fn group_key(pod_id: &PodId) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    pod_id.as_str().hash(&mut hasher);
    hasher.finish()
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
