//! Every directory file shipped under `config/` loads, and the example behaves as it says.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::path::PathBuf;
use std::sync::Arc;

use pinacle_authz::{
    Authorizer, AuthorizerConfig, CredentialConfig, CredentialVerifier, Decision, DenyReason,
    FileDirectory, Outcome, PodSlug, PodStatus, Secret, UserId,
};

fn config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config")
}

#[test]
fn every_shipped_directory_file_loads() {
    let mut loaded = 0;
    for entry in std::fs::read_dir(config_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("directory") && name.ends_with(".toml") {
            FileDirectory::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
            loaded += 1;
        }
    }
    assert!(loaded >= 1, "no directory file under config/");
}

#[tokio::test]
async fn the_example_directory_answers_like_the_database_would() {
    let dir = FileDirectory::load(&config_dir().join("directory.example.toml")).unwrap();
    let authz = Authorizer::new(Arc::new(dir), &AuthorizerConfig::default());
    let (demo, sleepy) = (
        PodSlug::parse("demo").unwrap(),
        PodSlug::parse("sleepy").unwrap(),
    );
    let user = |u: &str| UserId::new(u).unwrap();
    for who in ["user_ada", "user_bob"] {
        match authz.authorize(&user(who), &demo).await.unwrap() {
            Decision::Allow { upstream, .. } => assert_eq!(upstream.to_string(), "127.0.0.1:30001"),
            other => panic!("{who}: {other:?}"),
        }
    }
    assert_eq!(
        authz.authorize(&user("user_mal"), &demo).await.unwrap(),
        Decision::Deny(DenyReason::NotPermitted)
    );
    assert!(matches!(
        authz.authorize(&user("user_ada"), &sleepy).await.unwrap(),
        Decision::Unavailable {
            status: PodStatus::Stopped,
            ..
        }
    ));
    let verifier =
        CredentialVerifier::new(&CredentialConfig::with_secrets(vec![Secret::new("x")])).unwrap();
    let inspection = verifier.inspect(
        "next-auth.session-token=6b43bcf7-b3a5-490c-a100-f72c61fe0bb3",
        1_800_000_000,
    );
    match authz
        .resolve(inspection.verification, 1_800_000_000)
        .await
        .unwrap()
    {
        Outcome::Valid(p) => assert_eq!(p.user_id.as_str(), "user_ada"),
        other => panic!("{other:?}"),
    }
}
