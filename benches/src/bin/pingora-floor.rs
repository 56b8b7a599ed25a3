//! The floor for `benches/load/run.sh`: the smallest Pingora 0.9.1 proxy (same version and
//! allocator as the ingress) that sends every request to one upstream over pooled keep-alive
//! connections, and does nothing else: no routing, no credentials, no logging, no metrics.
//! What the ingress costs above this is ours; what this costs above nginx is Pingora's.
//!
//! ```text
//! pingora-floor LISTEN UPSTREAM      e.g. pingora-floor 127.0.0.1:8080 127.0.0.1:8081
//! ```

#![allow(clippy::print_stderr)] // a usage line is this tool's only output

use std::net::SocketAddr;

use async_trait::async_trait;
use pingora::prelude::{HttpPeer, ProxyHttp, Session};
use pingora::server::Server;
use pingora::server::configuration::{Opt, ServerConf};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

struct Floor {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(listen), Some(Ok(upstream))) =
        (args.first(), args.get(1).map(|a| a.parse::<SocketAddr>()))
    else {
        eprintln!("usage: pingora-floor LISTEN UPSTREAM");
        std::process::exit(2);
    };
    let conf = ServerConf {
        threads: 1,
        daemon: false,
        // Stops within a second of SIGTERM (the load script stops it between phases).
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(Opt::default()), conf);
    server.bootstrap();
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, Floor { upstream });
    service.add_tcp(listen);
    server.add_service(service);
    server.run_forever();
}
