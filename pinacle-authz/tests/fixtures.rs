//! Every credential minted by the real next-auth, @auth/core and jsonwebtoken packages
//! (`tests/fixtures/nextauth/`) must get the outcome those libraries gave it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use pinacle_authz::{
    CredentialConfig, CredentialKind, CredentialVerifier, InvalidReason, Outcome, Secret,
    Verification,
};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    pinacle_authz::testing::nextauth_fixture(name)
}

fn verifier(secrets: &[&str]) -> CredentialVerifier {
    let secrets = secrets.iter().map(|s| Secret::new(*s)).collect();
    CredentialVerifier::new(&CredentialConfig::with_secrets(secrets)).unwrap()
}

fn decided(v: Verification) -> Outcome {
    match v {
        Verification::Decided(o) => o,
        other => panic!("expected a decided outcome, got {other:?}"),
    }
}

fn str_of<'a>(case: &'a Value, key: &str) -> &'a str {
    case[key]
        .as_str()
        .unwrap_or_else(|| panic!("case lacks {key}: {case}"))
}

fn check_session_case(case: &Value, verifier: &CredentialVerifier) {
    let name = str_of(case, "name");
    let v5 = str_of(case, "library") == "authjs-v5";
    let cookie_name = str_of(case, "cookie_name");
    let now = case["now"].as_i64().unwrap();
    let inspection = verifier.inspect(str_of(case, "cookie_header"), now);
    let outcome = decided(inspection.verification.clone());
    let expected_kind = if v5 {
        CredentialKind::AuthjsV5
    } else {
        CredentialKind::NextauthV4
    };
    match str_of(case, "expect") {
        "valid" => {
            let Outcome::Valid(p) = &outcome else {
                panic!("{name}: expected valid, got {outcome:?}")
            };
            let claims = &case["claims"];
            let expected_user = claims["id"].as_str().or(claims["sub"].as_str()).unwrap();
            assert_eq!(p.user_id.as_str(), expected_user, "{name}");
            assert_eq!(
                Value::Object(p.claims.0.clone()),
                *claims,
                "{name}: claims differ"
            );
            assert_eq!(p.presented.kind, expected_kind, "{name}");
            assert_eq!(&*p.presented.cookie, cookie_name, "{name}");
            assert_eq!(p.expires_at, claims["exp"].as_i64(), "{name}");
            assert_eq!(
                inspection.forwardable_cookie_header(str_of(case, "cookie_header").as_bytes()),
                None,
                "{name}: must be stripped"
            );
        }
        "expired" => {
            let Outcome::Expired {
                claims, presented, ..
            } = &outcome
            else {
                panic!("{name}: expected expired, got {outcome:?}")
            };
            let claims = claims.as_ref().map(|c| Value::Object(c.0.clone()));
            assert_eq!(claims.as_ref(), Some(&case["decrypted_claims"]), "{name}");
            assert_eq!(presented.kind, expected_kind, "{name}");
        }
        expect @ ("tampered" | "wrong_secret" | "malformed") => {
            let Outcome::Invalid { reason, presented } = &outcome else {
                panic!("{name}: expected invalid, got {outcome:?}")
            };
            assert_eq!(&*presented.cookie, cookie_name, "{name}");
            let want = match (expect, v5) {
                ("malformed", _) => InvalidReason::Malformed,
                // v4 (A256GCM, no kid) cannot tell a foreign key from tampering.
                (_, false) => InvalidReason::TamperedOrWrongSecret,
                ("tampered", true) => InvalidReason::Tampered,
                (_, true) => InvalidReason::WrongSecret,
            };
            assert_eq!(*reason, want, "{name}");
        }
        other => panic!("{name}: unknown expectation {other}"),
    }
}

#[test]
fn every_session_cookie_case_matches_the_libraries() {
    let fixture = fixture("public.json");
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 27, "fixture shrank: {}", cases.len());
    for case in cases {
        check_session_case(case, &verifier(&[str_of(case, "secret")]));
    }
}

#[test]
fn remembered_cookies_decide_as_fresh_ones_and_expire_on_time() {
    let fixture = fixture("public.json");
    let cases = fixture["cases"].as_array().unwrap();
    for case in cases {
        let secrets = vec![Secret::new(str_of(case, "secret"))];
        // Decoding every time, and remembering: the second look comes from memory.
        let fresh = CredentialVerifier::new(&CredentialConfig {
            decrypted_sessions: 0,
            ..CredentialConfig::with_secrets(secrets.clone())
        })
        .unwrap();
        let remembering = verifier(&[str_of(case, "secret")]);
        check_session_case(case, &fresh);
        check_session_case(case, &remembering);
        check_session_case(case, &remembering);
    }
    // A remembered cookie is still judged at the time of each use.
    let case = cases
        .iter()
        .find(|c| c["expect"] == "valid" && c["claims"]["exp"].is_i64())
        .unwrap();
    let v = verifier(&[str_of(case, "secret")]);
    let header = str_of(case, "cookie_header");
    let now = case["now"].as_i64().unwrap();
    let exp = case["claims"]["exp"].as_i64().unwrap();
    assert!(matches!(
        decided(v.inspect(header, now).verification),
        Outcome::Valid(_)
    ));
    let later = exp + pinacle_authz::CLOCK_TOLERANCE_SECS + 1;
    assert!(matches!(
        decided(v.inspect(header, later).verification),
        Outcome::Expired { .. }
    ));
    assert!(matches!(
        decided(v.inspect(header, now).verification),
        Outcome::Valid(_)
    ));
}

#[test]
fn every_session_cookie_case_holds_with_a_rotated_secret_list() {
    let fixture = fixture("public.json");
    for case in fixture["cases"].as_array().unwrap() {
        // The right secret second: rotation accepts old secrets, and outcomes do not change.
        check_session_case(
            case,
            &verifier(&[
                "a-newer-secret-not-yet-used-by-the-dashboard",
                str_of(case, "secret"),
            ]),
        );
    }
}

#[test]
fn other_cookies_are_ignored_and_no_cookie_is_missing() {
    let fixture = fixture("public.json");
    let case = &fixture["cases"][0];
    let v = verifier(&[str_of(case, "secret")]);
    let header = format!("theme=dark; {}; other=1", str_of(case, "cookie_header"));
    assert!(matches!(
        decided(
            v.inspect(&header, case["now"].as_i64().unwrap())
                .verification
        ),
        Outcome::Valid(_)
    ));
    assert_eq!(
        decided(v.inspect("theme=dark; a=b", 0).verification),
        Outcome::Missing
    );
    assert_eq!(decided(v.inspect("", 0).verification), Outcome::Missing);
}

/// Informational cases: we read base64url the way jose 6 (current @auth/core) does: canonical
/// padding is tolerated, junk characters, wrong padding and the standard alphabet are not.
#[test]
fn noncanonical_base64_follows_jose_6() {
    let fixture = fixture("public.json");
    for case in fixture["divergence_cases"].as_array().unwrap() {
        let name = str_of(case, "name");
        let v = verifier(&[str_of(case, "secret")]);
        let header = format!("{}={}", str_of(case, "cookie_name"), str_of(case, "token"));
        let outcome = decided(
            v.inspect(&header, case["now"].as_i64().unwrap())
                .verification,
        );
        let lenient_ok = name.ends_with("auth_tag_with_correct_padding");
        assert_eq!(
            matches!(outcome, Outcome::Valid(_)),
            lenient_ok,
            "{name}: {outcome:?}"
        );
    }
}

#[test]
fn every_proxy_token_case_matches_jsonwebtoken() {
    let fixture = fixture("proxy-token-public.json");
    let v = verifier(&[str_of(&fixture, "secret")]);
    for case in fixture["cases"].as_array().unwrap() {
        let name = str_of(case, "name");
        let inspection = v.inspect(str_of(case, "cookie_header"), case["now"].as_i64().unwrap());
        assert_eq!(
            inspection
                .forwardable_cookie_header(str_of(case, "cookie_header").as_bytes())
                .as_deref(),
            Some(&b"theme=dark"[..]),
            "{name}: the proxy token is never forwarded"
        );
        let outcome = decided(inspection.verification);
        match str_of(case, "expect") {
            "valid" => {
                let Outcome::Valid(p) = &outcome else {
                    panic!("{name}: {outcome:?}")
                };
                assert_eq!(p.user_id.as_str(), str_of(case, "user_id"));
                let scope = p.scope.as_ref().unwrap();
                assert_eq!(scope.pod_slug.as_str(), str_of(case, "pod_slug"));
                assert_eq!(
                    u64::from(scope.target_port),
                    case["target_port"].as_u64().unwrap()
                );
                assert_eq!(p.presented.kind, CredentialKind::ProxyToken);
            }
            "expired" => assert!(
                matches!(outcome, Outcome::Expired { .. }),
                "{name}: {outcome:?}"
            ),
            "invalid" => assert!(
                matches!(outcome, Outcome::Invalid { .. }),
                "{name}: {outcome:?}"
            ),
            other => panic!("{name}: unknown expectation {other}"),
        }
    }
}

#[test]
fn foreign_cookies_with_dashboard_names_are_forwarded_but_ours_are_not() {
    let fixture = fixture("public.json");
    let cases = fixture["cases"].as_array().unwrap();
    let by_name = |n: &str| cases.iter().find(|c| c["name"] == n).unwrap();
    // A pod app's own Auth.js cookie (another secret, so another kid) is the app's, not ours.
    let foreign = by_name("v5_wrong_secret");
    let v = verifier(&[str_of(foreign, "secret")]);
    let header = format!("{}; x=1", str_of(foreign, "cookie_header"));
    let inspection = v.inspect(&header, 0);
    assert_eq!(
        inspection
            .forwardable_cookie_header(header.as_bytes())
            .as_deref(),
        Some(header.as_bytes())
    );
    // The dashboard's chunked cookie loses every chunk.
    let chunked = by_name("v4_valid_chunked");
    let v = verifier(&[str_of(chunked, "secret")]);
    let header = format!("a=1; {}; b=2", str_of(chunked, "cookie_header"));
    let inspection = v.inspect(&header, chunked["now"].as_i64().unwrap());
    assert_eq!(
        inspection
            .forwardable_cookie_header(header.as_bytes())
            .as_deref(),
        Some(&b"a=1; b=2"[..])
    );
}

#[test]
fn debug_output_never_shows_secrets_or_tokens() {
    let fixture = fixture("public.json");
    let case = &fixture["cases"][0];
    let v = verifier(&[str_of(case, "secret")]);
    let inspection = v.inspect(str_of(case, "cookie_header"), case["now"].as_i64().unwrap());
    let debug = format!("{v:?} {inspection:?}");
    assert!(!debug.contains(str_of(case, "secret")));
    assert!(!debug.contains(&str_of(case, "token")[..40]));
}
