//! Hot path of `pinacle-authz`: Cookie header scan, v4/v5 session decode, proxy token verify,
//! authorize on a cache hit. Run: `cargo bench -p pinacle-benches --bench authz`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use pinacle_authz::{
    Authorizer, AuthorizerConfig, CredentialConfig, CredentialVerifier, FileDirectory, PodSlug,
    Secret, UserId, cookies,
};
use pinacle_benches::{case, fixture};

/// A verifier that decodes every time (`remember` 0) or remembers decrypted cookies.
fn verifier_remembering(secret: &str, remember: u64) -> CredentialVerifier {
    CredentialVerifier::new(&CredentialConfig {
        decrypted_sessions: remember,
        ..CredentialConfig::with_secrets(vec![Secret::new(secret)])
    })
    .unwrap_or_else(|e| unreachable!("{e}"))
}

fn verifier(secret: &str) -> CredentialVerifier {
    verifier_remembering(secret, 0)
}

fn decode(c: &mut Criterion) {
    let sessions = fixture("public.json").unwrap_or_else(|e| unreachable!("{e}"));
    for (label, name) in [
        ("decode/nextauth_v4", "v4_valid_default_30d_maxage"),
        ("decode/authjs_v5", "v5_valid"),
        ("decode/nextauth_v4_chunked_10k", "v4_valid_chunked"),
    ] {
        let case = case(&sessions, name).unwrap_or_else(|| unreachable!("{name}"));
        let v = verifier(case["secret"].as_str().unwrap_or_default());
        let header = format!(
            "theme=dark; {}",
            case["cookie_header"].as_str().unwrap_or_default()
        );
        let now = case["now"].as_i64().unwrap_or_default();
        c.bench_function(label, |b| b.iter(|| v.inspect(black_box(&header), now)));
        if name == "v4_valid_default_30d_maxage" {
            // What the ingress does: the same cookie again, remembered decrypted.
            let v = verifier_remembering(case["secret"].as_str().unwrap_or_default(), 16);
            c.bench_function("decode/nextauth_v4_remembered", |b| {
                b.iter(|| v.inspect(black_box(&header), now))
            });
        }
    }
    let tokens = fixture("proxy-token-public.json").unwrap_or_else(|e| unreachable!("{e}"));
    let case = case(&tokens, "valid_hs256").unwrap_or_else(|| unreachable!());
    let v = verifier(tokens["secret"].as_str().unwrap_or_default());
    let header = case["cookie_header"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let now = case["now"].as_i64().unwrap_or_default();
    c.bench_function("decode/proxy_token_hs256", |b| {
        b.iter(|| v.inspect(black_box(&header), now))
    });
}

fn cookie_scan(c: &mut Criterion) {
    let header = "theme=dark; _ga=GA1.2.3; next-auth.session-token.1=BBBB; next-auth.session-token.0=AAAA; \
                  csrf=abc; next-auth.session-token.2=CC";
    c.bench_function("cookies/find_3_chunks", |b| {
        b.iter(|| {
            cookies::pairs(black_box(header.as_bytes()))
                .filter(|p| cookies::match_name(p.name, "next-auth.session-token").is_some())
                .count()
        })
    });
}

fn authorize_hit(c: &mut Criterion) {
    let directory = FileDirectory::from_toml(
        r#"
        [[users]]
        id = "ada"
        [[teams]]
        id = "t1"
        [[servers]]
        id = "s1"
        ip_address = "127.0.0.1"
        [[pods]]
        id = "p1"
        slug = "proj"
        owner_id = "ada"
        team_id = "t1"
        server_id = "s1"
        status = "running"
        ports = [{ name = "nginx-proxy", external = 30001 }]
        "#,
        "bench",
    )
    .unwrap_or_else(|e| unreachable!("{e}"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| unreachable!("{e}"));
    let authz = Authorizer::new(Arc::new(directory), &AuthorizerConfig::default());
    let (user, slug) = (
        UserId::new("ada").unwrap_or_else(|e| unreachable!("{e}")),
        PodSlug::parse("proj").unwrap_or_else(|e| unreachable!("{e}")),
    );
    let _warm = rt.block_on(authz.authorize(&user, &slug));
    c.bench_function("authorize/cache_hit", |b| {
        b.to_async(&rt)
            .iter(|| authz.authorize(black_box(&user), black_box(&slug)))
    });
}

criterion_group!(benches, decode, cookie_scan, authorize_hit);
criterion_main!(benches);
