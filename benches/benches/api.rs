//! Per-request costs of API clients: a rate-limit check in memory and against a real Redis on
//! this machine (one Lua script, one round trip over loopback), and the verification of a
//! bearer JWT (RS256, ES256, EdDSA, HS256) or an HMAC signature.
//! Run: `cargo bench -p pinacle-benches --bench api` (needs `redis-server`; scripts/test
//! installs it).

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use pinacle_authz::Secret;
use pinacle_ingress::api_auth::{self, ApiConfig, HmacClients, KeySet, Signed};
use pinacle_ingress::rate_limit::{Check, Kind, Limit, Limiter, RateLimits};

fn limits(redis_url: Option<String>) -> RateLimits {
    RateLimits {
        api_per_user: Some(Limit {
            burst: u32::MAX,
            per_second: 1e9,
            daily: Some(u64::MAX / 2),
        }),
        api_per_pod: Some(Limit {
            burst: u32::MAX,
            per_second: 1e9,
            daily: None,
        }),
        browser_per_user: None,
        lookups_per_client: None,
        redis_url: redis_url.map(Secret::new),
        redis_timeout: Duration::from_millis(200),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn rate_limit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| unreachable!("{e}"));
    let memory = limits(None);
    let check = Check::of(&memory, Kind::Api, "user_ada", "pod_demo");
    let limiter = Limiter::default();
    c.bench_function("rate_limit/memory (user bucket + quota, pod bucket)", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(limiter.check(&memory, &check, now_ms()).await) })
    });
    let Some(redis) = rt.block_on(async {
        if std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("redis-server is not installed: the Redis bench is skipped");
            return None;
        }
        Some(pinacle_testkit::redis::RedisServer::start().await)
    }) else {
        return;
    };
    let shared = limits(Some(redis.url()));
    let limiter = Limiter::default();
    let (verdict, backend, _) = rt.block_on(limiter.check(&shared, &check, now_ms()));
    assert_eq!(backend.as_str(), "redis", "{verdict:?}");
    c.bench_function("rate_limit/redis (user bucket + quota, pod bucket)", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(limiter.check(&shared, &check, now_ms()).await) })
    });
    // Many requests at once share the one multiplexed connection (pipelined): what the
    // check costs a busy gateway per request is this time divided by 64.
    let checks: Vec<Check> = (0..64)
        .map(|i| Check::of(&shared, Kind::Api, &format!("user_{i}"), "pod_demo"))
        .collect();
    c.bench_function("rate_limit/redis, 64 at once (divide by 64)", |b| {
        b.to_async(&rt).iter(|| async {
            let now = now_ms();
            let all = checks
                .iter()
                .map(|check| limiter.check(&shared, check, now));
            black_box(futures_util::future::join_all(all).await)
        })
    });
    drop(redis);
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../pinacle-ingress/tests/fixtures/api")
        .join(name)
}

fn verify(c: &mut Criterion) {
    let keys = KeySet::load(&fixture("keys.jwks.json")).unwrap_or_else(|e| unreachable!("{e}"));
    let api = ApiConfig {
        audience: "pinacle-ingress".into(),
        issuer: None,
        leeway: Duration::from_secs(30),
        jwks_file: None,
        file_keys: Arc::new(keys),
        jwks_url: None,
        jwks_timeout: Duration::from_secs(2),
        jwks_refresh_interval: Duration::from_secs(60),
        hs256: vec![Secret::new("hs256-secret-for-the-api-tests-0123")],
        hmac_clients_file: None,
        clients: Arc::new(HmacClients::default()),
        hmac_tolerance: Duration::from_secs(300),
    };
    let none = KeySet::default();
    let now = now_ms() / 1000;
    let claims =
        serde_json::json!({"sub": "user_ada", "aud": "pinacle-ingress", "exp": now + 3600});
    let tokens = [
        ("jwt/RS256", jsonwebtoken::Algorithm::RS256, "rsa-1"),
        ("jwt/ES256", jsonwebtoken::Algorithm::ES256, "ec-1"),
        ("jwt/EdDSA", jsonwebtoken::Algorithm::EdDSA, "ed-1"),
    ];
    for (label, alg, kid) in tokens {
        let pem = std::fs::read(fixture(&format!("{kid}.key.pem"))).unwrap_or_default();
        let key = match alg {
            jsonwebtoken::Algorithm::RS256 => jsonwebtoken::EncodingKey::from_rsa_pem(&pem),
            jsonwebtoken::Algorithm::ES256 => jsonwebtoken::EncodingKey::from_ec_pem(&pem),
            _ => jsonwebtoken::EncodingKey::from_ed_pem(&pem),
        }
        .unwrap_or_else(|e| unreachable!("{e}"));
        let mut header = jsonwebtoken::Header::new(alg);
        header.kid = Some(kid.into());
        let token = jsonwebtoken::encode(&header, &claims, &key).unwrap_or_default();
        assert!(matches!(
            api_auth::verify_jwt(&token, &api, &none, now),
            api_auth::Verdict::Valid(_)
        ));
        c.bench_function(label, |b| {
            b.iter(|| api_auth::verify_jwt(black_box(&token), &api, &none, now))
        });
    }
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"hs256-secret-for-the-api-tests-0123"),
    )
    .unwrap_or_default();
    c.bench_function("jwt/HS256", |b| {
        b.iter(|| api_auth::verify_jwt(black_box(&token), &api, &none, now))
    });
    let signed = Signed {
        method: "GET",
        host: "localhost-3000-pod-demo.pinacle.dev",
        path_and_query: "/api/items?page=2",
    };
    c.bench_function("hmac/sign (the verification's cost)", |b| {
        b.iter(|| {
            api_auth::sign(
                b"hmac-client-secret-for-the-tests-0123",
                black_box(signed),
                now,
            )
        })
    });
}

criterion_group!(benches, rate_limit, verify);
criterion_main!(benches);
