//! The JSON report of `pinacle-ingress session inspect`: a stable shape scripts rely on.

use pinacle_authz::Outcome;
use serde_json::{Value, json};

/// One JSON object: `outcome`, `kind`, `cookie`, `user_id`, `claims`, and `reason` when invalid.
pub fn report(outcome: &Outcome) -> Value {
    let presented = outcome.presented();
    let mut report = json!({
        "outcome": outcome.as_str(),
        "kind": presented.map(|p| p.kind.as_str()),
        "cookie": presented.map(|p| &*p.cookie),
        "user_id": Value::Null,
        "claims": Value::Null,
    });
    match outcome {
        Outcome::Valid(p) => {
            report["user_id"] = json!(p.user_id.as_str());
            report["claims"] = Value::Object(p.claims.0.clone());
            report["expires_at"] = json!(p.expires_at);
            if let Some(admin) = &p.impersonated_by {
                report["impersonated_by"] = json!(admin.as_str());
            }
            if let Some(scope) = &p.scope {
                report["scope"] = json!({
                    "pod_id": scope.pod_id.as_str(),
                    "pod_slug": scope.pod_slug.as_str(),
                    "target_port": scope.target_port,
                });
            }
        }
        Outcome::Expired {
            user_id, claims, ..
        } => {
            report["user_id"] = json!(user_id.as_ref().map(|u| u.as_str()));
            report["claims"] = claims
                .as_ref()
                .map_or(Value::Null, |c| Value::Object(c.0.clone()));
        }
        Outcome::Invalid { reason, .. } => report["reason"] = json!(reason.as_str()),
        Outcome::Missing => {}
    }
    report
}
