//! The directory and the authorizer against real Postgres: each test gets its own migrated
//! database (`#[sqlx::test]`, needs `DATABASE_URL`; `scripts/test` provides it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::sync::Arc;
use std::time::Duration;

use pinacle_authz::testing::{CountingDirectory, PodSeed, Seed, ports_json};
use pinacle_authz::{
    Authorizer, AuthorizerConfig, CredentialConfig, CredentialKind, CredentialVerifier, Decision,
    DenyReason, DirectoryError, InvalidReason, Outcome, PodDirectory, PodSlug, PodStatus,
    PostgresDirectory, PostgresOptions, Secret, UnavailableReason, UserId,
};
use sqlx::PgPool;

fn user(id: &str) -> UserId {
    UserId::new(id).unwrap()
}

fn slug(s: &str) -> PodSlug {
    PodSlug::parse(s).unwrap()
}

fn directory(pool: &PgPool) -> Arc<dyn PodDirectory> {
    Arc::new(PostgresDirectory::from_pool(
        pool.clone(),
        Duration::from_secs(5),
    ))
}

fn authorizer(pool: &PgPool) -> Authorizer {
    Authorizer::new(directory(pool), &AuthorizerConfig::default())
}

/// owner `ada` with team `t1`; `bob` joined member; `eve` pending invitee; `mal` stranger;
/// pod `p1` (slug `proj`) running on server `s1` at 10.1.2.3, nginx on 30001.
async fn seed_world(pool: &PgPool) {
    let seed = Seed(pool);
    seed.people().await.unwrap();
    seed.server("s1", "10.1.2.3").await.unwrap();
    let ports = ports_json(30001);
    seed.pod(&PodSeed {
        id: "p1",
        slug: "proj",
        owner_id: "ada",
        team_id: "t1",
        server_id: Some("s1"),
        status: "running",
        ports: Some(&ports),
        age_secs: 60.0,
    })
    .await
    .unwrap();
}

fn allowed_pod(d: &Decision) -> Option<&str> {
    match d {
        Decision::Allow { pod_id, .. } => Some(pod_id.as_str()),
        _ => None,
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn owner_and_member_reach_the_pod_at_its_nginx(pool: PgPool) {
    seed_world(&pool).await;
    let authz = authorizer(&pool);
    for who in ["ada", "bob"] {
        match authz.authorize(&user(who), &slug("proj")).await.unwrap() {
            Decision::Allow {
                upstream, pod_id, ..
            } => {
                assert_eq!(upstream.to_string(), "10.1.2.3:30001");
                assert_eq!(pod_id.as_str(), "p1");
            }
            other => panic!("{who}: {other:?}"),
        }
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn stranger_and_pending_invitee_are_denied(pool: PgPool) {
    seed_world(&pool).await;
    let authz = authorizer(&pool);
    for who in ["mal", "eve"] {
        assert_eq!(
            authz.authorize(&user(who), &slug("proj")).await.unwrap(),
            Decision::Deny(DenyReason::NotPermitted),
            "{who}"
        );
    }
    assert_eq!(
        authz.authorize(&user("ada"), &slug("nope")).await.unwrap(),
        Decision::Deny(DenyReason::NoSuchPod)
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn archived_pod_is_unreachable_even_for_its_owner(pool: PgPool) {
    seed_world(&pool).await;
    Seed(&pool).archive_pod("p1").await.unwrap();
    assert_eq!(
        authorizer(&pool)
            .authorize(&user("ada"), &slug("proj"))
            .await
            .unwrap(),
        Decision::Deny(DenyReason::NoSuchPod)
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn shared_slug_picks_the_newest_pod_the_user_may_reach(pool: PgPool) {
    seed_world(&pool).await;
    let seed = Seed(&pool);
    seed.team("t2", "mal").await.unwrap();
    let (p30002, p30003, p30004) = (ports_json(30002), ports_json(30003), ports_json(30004));
    let pod = |id, owner, team, ports, age| PodSeed {
        id,
        slug: "proj",
        owner_id: owner,
        team_id: team,
        server_id: Some("s1"),
        status: "running",
        ports: Some(ports),
        age_secs: age,
    };
    // Newer than p1 but foreign to ada; an even newer archived one of ada's; an older one of ada's.
    seed.pod(&pod("p_mal", "mal", "t2", &p30002, 1.0))
        .await
        .unwrap();
    seed.pod(&pod("p_arch", "ada", "t1", &p30003, 0.5))
        .await
        .unwrap();
    seed.archive_pod("p_arch").await.unwrap();
    seed.pod(&pod("p_old", "ada", "t1", &p30004, 3600.0))
        .await
        .unwrap();
    let authz = authorizer(&pool);
    assert_eq!(
        allowed_pod(&authz.authorize(&user("ada"), &slug("proj")).await.unwrap()),
        Some("p1")
    );
    assert_eq!(
        allowed_pod(&authz.authorize(&user("mal"), &slug("proj")).await.unwrap()),
        Some("p_mal")
    );
    assert_eq!(
        authz.authorize(&user("eve"), &slug("proj")).await.unwrap(),
        Decision::Deny(DenyReason::NotPermitted)
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn removed_member_is_denied_after_invalidation(pool: PgPool) {
    seed_world(&pool).await;
    let authz = authorizer(&pool);
    assert!(allowed_pod(&authz.authorize(&user("bob"), &slug("proj")).await.unwrap()).is_some());
    Seed(&pool).remove_member("t1", "bob").await.unwrap();
    // Still cached until invalidated (bounded by allow_ttl otherwise).
    assert!(allowed_pod(&authz.authorize(&user("bob"), &slug("proj")).await.unwrap()).is_some());
    authz.invalidate_user(&user("bob"));
    assert_eq!(
        authz.authorize(&user("bob"), &slug("proj")).await.unwrap(),
        Decision::Deny(DenyReason::NotPermitted)
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn stopped_pod_and_bad_ports_are_unavailable_with_a_reason(pool: PgPool) {
    seed_world(&pool).await;
    let seed = Seed(&pool);
    seed.set_pod_status("p1", "stopped").await.unwrap();
    let bad = |id, ports: Option<&'static str>, server: Option<&'static str>| PodSeed {
        id,
        slug: id,
        owner_id: "ada",
        team_id: "t1",
        server_id: server,
        status: "running",
        ports,
        age_secs: 1.0,
    };
    seed.pod(&bad("malformed", Some("{oops"), Some("s1")))
        .await
        .unwrap();
    seed.pod(&bad(
        "noproxy",
        Some(r#"[{"name":"app","external":3000}]"#),
        Some("s1"),
    ))
    .await
    .unwrap();
    let ok_ports: &'static str = r#"[{"name":"nginx-proxy","external":30009}]"#;
    seed.pod(&bad("noserver", Some(ok_ports), None))
        .await
        .unwrap();
    let authz = authorizer(&pool);
    let expect = [
        ("proj", PodStatus::Stopped, UnavailableReason::NotRunning),
        (
            "malformed",
            PodStatus::Running,
            UnavailableReason::MalformedPorts,
        ),
        (
            "noproxy",
            PodStatus::Running,
            UnavailableReason::NoNginxProxyPort,
        ),
        ("noserver", PodStatus::Running, UnavailableReason::NoServer),
    ];
    for (s, want_status, want_reason) in expect {
        match authz.authorize(&user("ada"), &slug(s)).await.unwrap() {
            Decision::Unavailable { status, reason, .. } => {
                assert_eq!((status, reason), (want_status, want_reason), "{s}");
            }
            other => panic!("{s}: {other:?}"),
        }
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_cache_hit_issues_no_query(pool: PgPool) {
    seed_world(&pool).await;
    let counting = Arc::new(CountingDirectory::new(directory(&pool), Duration::ZERO));
    let authz = Authorizer::new(counting.clone(), &AuthorizerConfig::default());
    for _ in 0..10 {
        authz.authorize(&user("ada"), &slug("proj")).await.unwrap();
    }
    assert_eq!(counting.pod_lookups(), 1);
    // Denials are cached too, under their own key.
    for _ in 0..10 {
        authz.authorize(&user("mal"), &slug("proj")).await.unwrap();
    }
    assert_eq!(counting.pod_lookups(), 2);
    authz.invalidate_pod(&slug("proj"));
    authz.authorize(&user("ada"), &slug("proj")).await.unwrap();
    assert_eq!(counting.pod_lookups(), 3);
}

#[sqlx::test(migrations = "../migrations")]
async fn concurrent_misses_for_one_key_issue_one_query(pool: PgPool) {
    seed_world(&pool).await;
    // Each lookup lingers so that all 100 callers arrive while the first is in flight.
    let counting = Arc::new(CountingDirectory::new(
        directory(&pool),
        Duration::from_millis(200),
    ));
    let authz = Authorizer::new(counting.clone(), &AuthorizerConfig::default());
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let authz = authz.clone();
            tokio::spawn(async move { authz.authorize(&user("bob"), &slug("proj")).await })
        })
        .collect();
    for t in tasks {
        assert!(allowed_pod(&t.await.unwrap().unwrap()).is_some());
    }
    assert_eq!(counting.pod_lookups(), 1);
}

#[tokio::test]
async fn unreachable_database_is_an_error_never_a_cached_denial() {
    // Port 1 on loopback: nothing listens there.
    let options = PostgresOptions {
        max_connections: 1,
        acquire_timeout: Duration::from_millis(500),
        query_timeout: Duration::from_millis(500),
    };
    let dir =
        PostgresDirectory::connect_lazy("postgres://postgres@127.0.0.1:1/none", &options).unwrap();
    let counting = Arc::new(CountingDirectory::new(Arc::new(dir), Duration::ZERO));
    let authz = Authorizer::new(counting.clone(), &AuthorizerConfig::default());
    for attempt in 1..=2 {
        let err = authz
            .authorize(&user("ada"), &slug("proj"))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                DirectoryError::Unavailable(_) | DirectoryError::Timeout
            ),
            "{err:?}"
        );
        assert_eq!(counting.pod_lookups(), attempt, "errors are not cached");
    }
}

/// The database sessions in the fixture, evaluated at its `now`.
#[sqlx::test(migrations = "../migrations")]
async fn database_sessions_from_the_fixture(pool: PgPool) {
    let fixture = pinacle_authz::testing::nextauth_fixture("public.json");
    let rows = fixture["database_sessions"]["rows"].as_array().unwrap();
    let seed = Seed(&pool);
    for row in rows {
        let uid = row["userId"].as_str().unwrap();
        if !pinacle_authz_user_exists(&pool, uid).await {
            seed.user(uid).await.unwrap();
        }
        seed.session(
            row["sessionToken"].as_str().unwrap(),
            uid,
            row["expires_unix_ms"].as_i64().unwrap(),
        )
        .await
        .unwrap();
    }
    let verifier =
        CredentialVerifier::new(&CredentialConfig::with_secrets(vec![Secret::new("unused")]))
            .unwrap();
    let authz = authorizer(&pool);
    for row in rows {
        let now = row["now"].as_i64().unwrap();
        let inspection = verifier.inspect(row["cookie_header"].as_str().unwrap(), now);
        assert_eq!(
            inspection.stripped_count(),
            1,
            "database session cookies are stripped"
        );
        let outcome = authz.resolve(inspection.verification, now).await.unwrap();
        match row["expect"].as_str().unwrap() {
            "valid" => match outcome {
                Outcome::Valid(p) => {
                    assert_eq!(p.user_id.as_str(), row["userId"].as_str().unwrap());
                    assert_eq!(p.presented.kind, CredentialKind::DatabaseSession);
                }
                other => panic!("{row}: {other:?}"),
            },
            "expired" => assert!(
                matches!(outcome, Outcome::Expired { .. }),
                "{row}: {outcome:?}"
            ),
            other => panic!("unknown expectation {other}"),
        }
    }
    // A junk token of the same name, before or after, neither shadows nor leaks the real one.
    let valid = rows.iter().find(|r| r["expect"] == "valid").unwrap();
    let (header, now) = (
        valid["cookie_header"].as_str().unwrap(),
        valid["now"].as_i64().unwrap(),
    );
    let (name, _) = header.split_once('=').unwrap();
    let short = format!("{name}=short");
    for (shadowed, forwarded) in [
        (
            format!("{name}=00000000-0000-4000-8000-000000000000; {header}"),
            None,
        ),
        (
            format!("{header}; {name}=00000000-0000-4000-8000-000000000000; {short}"),
            Some(short.as_bytes()),
        ),
    ] {
        let inspection = verifier.inspect(&shadowed, now);
        assert_eq!(
            inspection
                .forwardable_cookie_header(shadowed.as_bytes())
                .as_deref(),
            forwarded,
            "{shadowed}"
        );
        let outcome = authz.resolve(inspection.verification, now).await.unwrap();
        assert!(
            matches!(outcome, Outcome::Valid(_)),
            "{shadowed}: {outcome:?}"
        );
    }
    let unknown = verifier.inspect(
        "authjs.session-token=22222222-0000-4000-8000-000000000000; \
         authjs.session-token=11111111-0000-4000-8000-000000000000",
        0,
    );
    // Two tokens nobody looked up yet: two queries; once asked (and not found), none.
    assert_eq!(authz.lookups_needed(&unknown.verification), 2);
    assert!(matches!(
        authz
            .resolve(unknown.verification.clone(), 0)
            .await
            .unwrap(),
        Outcome::Invalid {
            reason: InvalidReason::UnknownSession,
            ..
        }
    ));
    assert_eq!(authz.lookups_needed(&unknown.verification), 0);
    assert!(matches!(
        authz.resolve(unknown.verification, 0).await.unwrap(),
        Outcome::Invalid {
            reason: InvalidReason::UnknownSession,
            ..
        }
    ));
}

async fn pinacle_authz_user_exists(pool: &PgPool, id: &str) -> bool {
    directory(pool).user_exists(&user(id)).await.unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn impersonation_needs_an_existing_target(pool: PgPool) {
    seed_world(&pool).await;
    let verifier = CredentialVerifier::new(&CredentialConfig::with_secrets(vec![Secret::new(
        "dev-secret",
    )]))
    .unwrap();
    let authz = authorizer(&pool);
    for (target, valid) in [("bob", true), ("ghost", false)] {
        let claims = serde_json::json!({"id": "ada", "sub": "ada", "impersonatingUserId": target,
            "realAdminId": "ada", "exp": 4_000_000_000_i64});
        let cookie = verifier
            .mint_session_v4(&pinacle_authz::Claims(claims.as_object().unwrap().clone()))
            .unwrap();
        let inspection =
            verifier.inspect(format!("next-auth.session-token={cookie}"), 1_800_000_000);
        let outcome = authz
            .resolve(inspection.verification, 1_800_000_000)
            .await
            .unwrap();
        match (outcome, valid) {
            (Outcome::Valid(p), true) => {
                assert_eq!(p.user_id.as_str(), "bob");
                assert_eq!(
                    p.impersonated_by.map(|u| u.to_string()).as_deref(),
                    Some("ada")
                );
            }
            (
                Outcome::Invalid {
                    reason: InvalidReason::UnknownUser,
                    ..
                },
                false,
            ) => {}
            (other, _) => panic!("{target}: {other:?}"),
        }
    }
}

/// The operator's file and the migration are the same SQL; it can be applied again and
/// removed (twice each) without error, and the notifications name ids, never session tokens.
#[sqlx::test(migrations = "../migrations")]
async fn the_notify_sql_is_the_migration_idempotent_removable_and_names_no_secret(pool: PgPool) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let apply = std::fs::read_to_string(format!("{root}/sql/pinacle-notify.sql")).unwrap();
    let remove = std::fs::read_to_string(format!("{root}/sql/pinacle-notify-remove.sql")).unwrap();
    let migration =
        std::fs::read_to_string(format!("{root}/migrations/0002_pinacle_notify.sql")).unwrap();
    assert_eq!(
        apply, migration,
        "sql/pinacle-notify.sql and migration 0002 drifted apart"
    );
    let triggers = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'pinacle_authz_notify'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert_eq!(triggers(pool.clone()).await, 5);
    sqlx::raw_sql(&apply).execute(&pool).await.unwrap();
    assert_eq!(triggers(pool.clone()).await, 5);
    sqlx::raw_sql(&remove).execute(&pool).await.unwrap();
    sqlx::raw_sql(&remove).execute(&pool).await.unwrap();
    assert_eq!(triggers(pool.clone()).await, 0);
    sqlx::raw_sql(&apply).execute(&pool).await.unwrap();

    let seed = Seed(&pool);
    seed.people().await.unwrap();
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener.listen(pinacle_authz::live::CHANNEL).await.unwrap();
    let expires = "now() + interval '1 hour'";
    sqlx::query(&format!(
        "INSERT INTO session (\"sessionToken\", \"userId\", expires) VALUES ('secret-session-token', 'bob', {expires})"
    ))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("DELETE FROM session")
        .execute(&pool)
        .await
        .unwrap();
    seed.remove_member("t1", "bob").await.unwrap();
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|p: &String| p.contains("team_member") && p.contains("\"bob\""))
    {
        let n = tokio::time::timeout(Duration::from_secs(5), listener.recv())
            .await
            .expect("notifications arrive")
            .unwrap();
        seen.push(n.payload().to_owned());
    }
    assert!(
        seen.iter().all(|p| !p.contains("secret-session-token")),
        "{seen:?}"
    );
    let sessions: Vec<_> = seen
        .iter()
        .map(|p| pinacle_authz::live::Invalidation::from_payload(p))
        .filter(|i| *i == pinacle_authz::live::Invalidation::Users(vec![user("bob")]))
        .collect();
    assert_eq!(sessions.len(), 3, "{seen:?}");
}
