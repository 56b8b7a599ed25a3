//! Pinacle's per-pod proxy token: an HS256 JWT over the raw secret bytes (the `jsonwebtoken`
//! package's defaults: HS256/384/512 accepted, no leeway, expired once `now >= exp`).

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::ids::{PodId, PodSlug, UserId};
use crate::secret::Secret;

/// Lifetime of a proxy token minted by the dashboard.
pub const PROXY_TOKEN_LIFETIME_SECS: i64 = 900;

/// The claims of a proxy token, with the dashboard's field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyTokenClaims {
    /// The user it was minted for.
    pub user_id: String,
    /// The pod id.
    pub pod_id: String,
    /// The pod slug it is valid on.
    pub pod_slug: String,
    /// The port it is valid on.
    pub target_port: u16,
    /// Issued at (unix seconds).
    pub iat: i64,
    /// Expiry (unix seconds).
    pub exp: i64,
}

/// What a verified proxy token allows: one port of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyScope {
    /// The pod id in the token.
    pub pod_id: PodId,
    /// The pod slug in the token.
    pub pod_slug: PodSlug,
    /// The port in the token.
    pub target_port: u16,
    /// Issued by the ingress for an embedded (iframe) cookie (`embed: true`, a claim the
    /// dashboard's tokens never carry): a renewal keeps the embedding cookie's attributes.
    pub embed: bool,
}

/// The claims as decoded: the dashboard's, and the ingress's own `embed` mark.
#[derive(Debug, Deserialize)]
struct Decoded {
    #[serde(flatten)]
    claims: ProxyTokenClaims,
    #[serde(default)]
    embed: bool,
}

/// The claims the ingress mints: the dashboard's, plus `embed` when set.
#[derive(Debug, Serialize)]
struct Reissued<'a> {
    #[serde(flatten)]
    claims: &'a ProxyTokenClaims,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    embed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenCheck {
    Valid {
        user: UserId,
        scope: ProxyScope,
        expires_at: i64,
    },
    Expired {
        user: Option<UserId>,
    },
    Malformed,
    UnsupportedAlgorithm,
    BadSignature,
    BadClaims,
}

/// Verifying (and minting) keys for proxy tokens, made once per secret.
pub(crate) struct ProxyTokenKeys {
    decoding: Vec<DecodingKey>,
    encoding: EncodingKey,
    validation: Validation,
}

impl std::fmt::Debug for ProxyTokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyTokenKeys")
            .field("secrets", &self.decoding.len())
            .finish_non_exhaustive()
    }
}

impl ProxyTokenKeys {
    /// `secrets` must be non-empty; the first one mints.
    pub(crate) fn new(first: &Secret, rest: &[Secret]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
        // Expiry is checked against the injected clock below, not the system time.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        validation.required_spec_claims.clear();
        Self {
            decoding: std::iter::once(first)
                .chain(rest)
                .map(|s| DecodingKey::from_secret(s.expose()))
                .collect(),
            encoding: EncodingKey::from_secret(first.expose()),
            validation,
        }
    }

    pub(crate) fn verify(&self, token: &str, now: i64) -> TokenCheck {
        let mut result = TokenCheck::BadSignature;
        for key in &self.decoding {
            match jsonwebtoken::decode::<Decoded>(token, key, &self.validation) {
                Ok(data) => return check_claims(data.claims.claims, data.claims.embed, now),
                Err(e) => match e.kind() {
                    ErrorKind::InvalidSignature => continue,
                    ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                        return TokenCheck::UnsupportedAlgorithm;
                    }
                    ErrorKind::Json(_) if token.split('.').count() == 3 => {
                        result = TokenCheck::BadClaims;
                    }
                    _ => return TokenCheck::Malformed,
                },
            }
        }
        result
    }

    /// Mints a token the way the dashboard does (HS256, first secret).
    pub(crate) fn mint(
        &self,
        claims: &ProxyTokenClaims,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        self.mint_marked(claims, false)
    }

    /// Mints a token with the ingress's `embed` mark when `embed`.
    pub(crate) fn mint_marked(
        &self,
        claims: &ProxyTokenClaims,
        embed: bool,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Reissued { claims, embed },
            &self.encoding,
        )
    }
}

fn check_claims(claims: ProxyTokenClaims, embed: bool, now: i64) -> TokenCheck {
    let user = UserId::new(&claims.user_id).ok();
    if now >= claims.exp {
        return TokenCheck::Expired { user };
    }
    let (Some(user), Ok(pod_id), Ok(pod_slug), true) = (
        user,
        PodId::new(&claims.pod_id),
        PodSlug::parse(&claims.pod_slug),
        claims.target_port > 0,
    ) else {
        return TokenCheck::BadClaims;
    };
    TokenCheck::Valid {
        user,
        scope: ProxyScope {
            pod_id,
            pod_slug,
            target_port: claims.target_port,
            embed,
        },
        expires_at: claims.exp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> ProxyTokenClaims {
        ProxyTokenClaims {
            user_id: "u1".into(),
            pod_id: "pod_1".into(),
            pod_slug: "proj".into(),
            target_port: 3000,
            iat: exp - PROXY_TOKEN_LIFETIME_SECS,
            exp,
        }
    }

    #[test]
    fn minted_tokens_verify_until_exp_and_not_at_exp() {
        let keys = ProxyTokenKeys::new(&Secret::new("k"), &[]);
        let token = keys.mint(&claims(1000)).unwrap_or_default();
        assert!(matches!(keys.verify(&token, 999), TokenCheck::Valid { .. }));
        assert!(matches!(
            keys.verify(&token, 1000),
            TokenCheck::Expired { .. }
        ));
    }

    #[test]
    fn the_embed_mark_survives_a_round_trip_and_dashboard_tokens_lack_it() {
        let keys = ProxyTokenKeys::new(&Secret::new("k"), &[]);
        let embed = |token: &str| matches!(keys.verify(token, 1), TokenCheck::Valid { scope, .. } if scope.embed);
        let plain = keys.mint(&claims(1000)).unwrap_or_default();
        assert!(matches!(keys.verify(&plain, 1), TokenCheck::Valid { .. }));
        assert!(!embed(&plain));
        assert!(embed(
            &keys.mint_marked(&claims(1000), true).unwrap_or_default()
        ));
    }

    #[test]
    fn rotated_secret_still_verifies_and_wrong_secret_does_not() {
        let old = ProxyTokenKeys::new(&Secret::new("old"), &[]);
        let token = old.mint(&claims(1000)).unwrap_or_default();
        let rotated = ProxyTokenKeys::new(&Secret::new("new"), &[Secret::new("old")]);
        assert!(matches!(
            rotated.verify(&token, 1),
            TokenCheck::Valid { .. }
        ));
        let other = ProxyTokenKeys::new(&Secret::new("new"), &[]);
        assert_eq!(other.verify(&token, 1), TokenCheck::BadSignature);
        assert_eq!(other.verify("not.a.token", 1), TokenCheck::Malformed);
    }
}
