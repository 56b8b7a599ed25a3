//! Credential stripping as a property over generated `Cookie` headers: whatever a pod plants
//! beside the user's real credentials (same-named junk before or after, stray chunks, a foreign
//! app's own session cookie) and however the header is spaced or split, no dashboard value or
//! proxy token is ever forwarded, the real credential still authenticates, and every other
//! cookie is forwarded byte for byte.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use pinacle_authz::testing::hostile_cookies::{self, Case, Material};
use pinacle_authz::testing::session_cookie_value;
use pinacle_authz::{
    CredentialConfig, CredentialVerifier, Outcome, ProxyTokenClaims, Secret, Verification, cookies,
};
use proptest::prelude::*;

const NOW: i64 = 1_800_000_000;
const DASHBOARD_SECRET: &str = "dashboard-secret";

fn verifier() -> CredentialVerifier {
    CredentialVerifier::new(&CredentialConfig::with_secrets(vec![
        Secret::new(DASHBOARD_SECRET),
        Secret::new("an-older-dashboard-secret"),
    ]))
    .unwrap()
}

fn material(name: &str) -> Material {
    let proxy_token = verifier()
        .mint_proxy_token(&ProxyTokenClaims {
            user_id: "ada".into(),
            pod_id: "p_demo".into(),
            pod_slug: "demo".into(),
            target_port: 3000,
            iat: NOW,
            exp: NOW + 900,
        })
        .unwrap();
    Material {
        name: name.to_owned(),
        dashboard: session_cookie_value(DASHBOARD_SECRET, "ada", NOW, 3600),
        foreign: session_cookie_value("a-pod-apps-own-secret", "pod-user", NOW, 3600),
        proxy_token,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Checks one case; the forwarded header is returned for further checks.
fn check(v: &CredentialVerifier, m: &Material, case: &Case) -> Vec<u8> {
    let header = case.joined(m);
    let inspection = v.inspect(&header, NOW);
    let forwarded = inspection
        .forwardable_cookie_header(header.as_bytes())
        .map(|c| c.into_owned())
        .unwrap_or_default();
    for secret in case.secrets(m) {
        assert!(
            !contains(&forwarded, secret.as_bytes()),
            "leaked {secret:.30}… in {:?} from {case:?}",
            String::from_utf8_lossy(&forwarded)
        );
    }
    let kept = case.kept(m);
    let forwarded_kept: Vec<String> = cookies::segments(&forwarded)
        .map(|s| String::from_utf8(s.raw.to_vec()).unwrap())
        .filter(|s| kept.contains(s))
        .collect();
    assert_eq!(forwarded_kept, kept, "{case:?}");
    if case.authenticates() {
        let Verification::Decided(Outcome::Valid(p)) = &inspection.verification else {
            panic!("locked out: {:?} for {case:?}", inspection.verification)
        };
        assert_eq!(p.user_id.as_str(), "ada");
    }
    forwarded
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn no_dashboard_value_is_ever_forwarded_and_the_real_one_always_counts(
        case in hostile_cookies::case(),
        secure in any::<bool>(),
    ) {
        let name = if secure { "__Secure-next-auth.session-token" } else { "next-auth.session-token" };
        check(&verifier(), &material(name), &case);
    }
}

#[test]
fn the_issue_repros_are_stripped_and_authenticate() {
    let v = verifier();
    let m = material("next-auth.session-token");
    let (real, token) = (&m.dashboard, &m.proxy_token);
    for header in [
        format!(
            "pinacle-proxy-token={token}; next-auth.session-token=junk; next-auth.session-token={real}"
        ),
        format!("next-auth.session-token.9=junk; next-auth.session-token={real}"),
        format!("next-auth.session-token={real}; next-auth.session-token.0=junk"),
        format!("pinacle-proxy-token=junk; pinacle-proxy-token={token}; x=1"),
    ] {
        let inspection = v.inspect(&header, NOW);
        let forwarded = inspection
            .forwardable_cookie_header(header.as_bytes())
            .map(|c| c.into_owned())
            .unwrap_or_default();
        assert!(!contains(&forwarded, real.as_bytes()), "{header}");
        assert!(!contains(&forwarded, token.as_bytes()), "{header}");
        assert!(
            matches!(
                inspection.verification,
                Verification::Decided(Outcome::Valid(_))
            ),
            "{header}: {:?}",
            inspection.verification
        );
    }
}

#[test]
fn a_foreign_chunked_cookie_passes_byte_for_byte_and_partial_or_ambiguous_chunks_do_not() {
    let v = verifier();
    let m = material("next-auth.session-token");
    let (head, tail) = m.foreign.split_at(100);
    let foreign = format!("next-auth.session-token.0={head}; next-auth.session-token.1={tail}");
    let forwarded = v
        .inspect(&foreign, NOW)
        .forwardable_cookie_header(foreign.as_bytes())
        .map(|c| c.into_owned());
    assert_eq!(forwarded.as_deref(), Some(foreign.as_bytes()));
    // A gap, a repeated number, a lone chunk: not one cookie's, so none goes.
    for header in [
        format!("next-auth.session-token.0={head}; next-auth.session-token.2={tail}"),
        format!("{foreign}; next-auth.session-token.1={tail}"),
        format!(
            "next-auth.session-token.0={}",
            &m.dashboard[..m.dashboard.len() - 3]
        ),
        format!("next-auth.session-token.99999999999=x; {foreign}"),
    ] {
        let forwarded = v
            .inspect(&header, NOW)
            .forwardable_cookie_header(header.as_bytes());
        assert_eq!(forwarded, None, "{header}");
    }
}

#[test]
fn non_ascii_cookies_hide_nothing_and_pass_untouched() {
    let v = verifier();
    let m = material("next-auth.session-token");
    let mut header = b"name=Jos\xc3\xa9; raw=\xff\xfe; next-auth.session-token=".to_vec();
    header.extend_from_slice(m.dashboard.as_bytes());
    header.extend_from_slice(b"; z=\x80");
    let inspection = v.inspect(&header, NOW);
    assert!(matches!(
        inspection.verification,
        Verification::Decided(Outcome::Valid(_))
    ));
    assert_eq!(
        inspection.forwardable_cookie_header(&header).as_deref(),
        Some(&b"name=Jos\xc3\xa9; raw=\xff\xfe; z=\x80"[..])
    );
}

#[test]
fn candidates_are_bounded_and_the_untried_are_stripped() {
    let v = verifier();
    let m = material("next-auth.session-token");
    let mut header = "next-auth.session-token=junk; ".repeat(40);
    header.push_str(&format!("next-auth.session-token={}", m.dashboard));
    let inspection = v.inspect(&header, NOW);
    let forwarded = inspection
        .forwardable_cookie_header(header.as_bytes())
        .map(|c| c.into_owned())
        .unwrap_or_default();
    assert!(!contains(&forwarded, m.dashboard.as_bytes()));
}
