//! Hot path of `pinacle-ingress` outside the credentials: host routing, request intent, the
//! upstream peer and the forwarded header edits, the access log's path, and a ready-made
//! answer. Run: `cargo bench -p pinacle-benches --bench ingress`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, Method};
use pinacle_authz::{PodId, PodSlug, cookies};
use pinacle_ingress::config::Timeouts;
use pinacle_ingress::host::{self, BaseDomain, PodHost};
use pinacle_ingress::responses::Answer;
use pinacle_ingress::upstream::{self, Forwarding, Target};
use pinacle_ingress::{intent, telemetry};

fn bases() -> Vec<BaseDomain> {
    ["pinacle.dev", "pinacle.io"]
        .iter()
        .map(|d| BaseDomain::parse(d).unwrap_or_else(|e| unreachable!("{e}")))
        .collect()
}

fn routing(c: &mut Criterion) {
    let bases = bases();
    c.bench_function("host/pod", |b| {
        b.iter(|| {
            host::route(
                black_box("localhost-8726-pod-my-project.pinacle.dev"),
                &bases,
            )
        })
    });
    c.bench_function("host/pod_legacy_upper_port", |b| {
        b.iter(|| {
            host::route(
                black_box("LOCALHOST-3000.POD-My-Project.pinacle.io:443"),
                &bases,
            )
        })
    });
    c.bench_function("host/dashboard", |b| {
        b.iter(|| host::route(black_box("pinacle.dev"), &bases))
    });
    let mut headers = HeaderMap::new();
    headers.insert(
        "accept",
        "text/html,application/xhtml+xml,*/*;q=0.8"
            .parse()
            .unwrap_or_else(|_| unreachable!()),
    );
    headers.insert(
        "sec-fetch-mode",
        "navigate".parse().unwrap_or_else(|_| unreachable!()),
    );
    c.bench_function("intent/navigation", |b| {
        b.iter(|| intent::classify(&Method::GET, black_box(&headers)))
    });
}

fn cookie_scan(c: &mut Criterion) {
    let header = b"theme=dark; _ga=GA1.2.3; next-auth.session-token=eyJhbGciOiJkaXIi; csrf=abc; \
                  pinacle-proxy-token=eyJhbGciOiJIUzI1NiJ9.e30.x";
    c.bench_function("cookies/scan_5_pairs", |b| {
        b.iter(|| cookies::pairs(black_box(header)).count())
    });
    c.bench_function("cookies/strip_credentials", |b| {
        b.iter(|| cookies::without_segments(black_box(header), &[2, 4]))
    });
}

fn upstream_choice(c: &mut Criterion) {
    let timeouts = Timeouts {
        upstream_connect: std::time::Duration::from_secs(5),
        upstream_read: std::time::Duration::from_secs(300),
        upstream_idle: std::time::Duration::from_secs(60),
        websocket_idle: std::time::Duration::from_secs(86_400),
        client_read: std::time::Duration::from_secs(60),
        request_header: std::time::Duration::from_secs(30),
        directory_query: std::time::Duration::from_secs(2),
        shutdown_grace: std::time::Duration::from_secs(10),
    };
    let pod = PodHost {
        port: 8726,
        slug: PodSlug::parse("my-project").unwrap_or_else(|e| unreachable!("{e}")),
        base: 0,
    };
    let domain = &bases()[0];
    let target = Target::Pod {
        addr: "10.0.0.7:30001".parse().unwrap_or_else(|_| unreachable!()),
        pod_id: PodId::new("pod_362KstAbcdef").unwrap_or_else(|e| unreachable!("{e}")),
        host: upstream::pod_upstream_host(&pod, domain),
    };
    c.bench_function("upstream/peer", |b| {
        b.iter(|| upstream::peer(black_box(&target), &timeouts, false))
    });
    c.bench_function("upstream/host_and_forwarding_edits", |b| {
        b.iter(|| {
            let host = upstream::pod_upstream_host(black_box(&pod), domain);
            let edits = upstream::forwarding_edits(&Forwarding {
                target: &target,
                cookie: Some(b"theme=dark; csrf=abc"),
                client_ip: Some("203.0.113.9".parse().unwrap_or_else(|_| unreachable!())),
                trusted_client: false,
                trusted_forwarded_for: None,
                tls: true,
                original_host: "localhost-8726-pod-my-project.pinacle.dev",
                request_id: "0123456789abcdef00000001",
            });
            (host, edits)
        })
    });
}

fn answers(c: &mut Criterion) {
    c.bench_function("responses/unauthenticated_json", |b| {
        b.iter(|| {
            Answer::Unauthenticated
                .reply(false)
                .header("unauthenticated", black_box("0123456789abcdef00000001"))
        })
    });
    c.bench_function("telemetry/loggable_target", |b| {
        b.iter(|| {
            telemetry::loggable_target(
                black_box("/pinacle-proxy-callback"),
                Some("token=eyJhbGciOiJIUzI1NiJ9.e30.sig&return_url=%2Fdocs"),
            )
        })
    });
}

criterion_group!(benches, routing, cookie_scan, upstream_choice, answers);
criterion_main!(benches);
