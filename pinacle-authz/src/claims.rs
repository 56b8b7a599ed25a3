//! Session token claims: the JSON payload NextAuth/Auth.js put inside their JWE, and the rules
//! that turn it into an effective user (id, impersonation, expiry with clock tolerance).

use serde_json::{Map, Value};

use crate::ids::UserId;

/// Seconds of clock tolerance NextAuth and Auth.js allow when checking `exp` and `nbf`.
pub const CLOCK_TOLERANCE_SECS: i64 = 15;

/// A time claim that is not a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("time claim is not a number")]
pub struct NotANumber;

/// The decoded claims of a session token, exactly as the library wrote them.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims(pub Map<String, Value>);

/// What the claims say about the session once checked at `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClaimCheck {
    /// In force: the effective user, who impersonates them (if anyone) and the expiry.
    Valid {
        user: UserId,
        impersonated_by: Option<UserId>,
        expires_at: Option<i64>,
    },
    /// `exp <= now - 15`.
    Expired { user: Option<UserId> },
    /// `nbf > now + 15`.
    NotYetValid,
    /// No usable `id`/`sub`.
    NoSubject,
    /// A time claim that is not a number.
    BadTimeClaim,
}

impl Claims {
    /// A numeric claim as 64-bit seconds (`Err` when present but not a number).
    ///
    /// # Errors
    /// [`NotANumber`] when the claim is present with another type.
    pub fn time(&self, name: &str) -> Result<Option<i64>, NotANumber> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .or_else(|| n.as_f64().map(|f| f.floor() as i64))
                .map(Some)
                .ok_or(NotANumber),
            Some(_) => Err(NotANumber),
        }
    }

    fn string(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }

    /// The effective user: `impersonatingUserId` when it and `realAdminId` are both present,
    /// else `id`, else `sub`. The second value is the admin doing the impersonation.
    pub fn effective_user(&self) -> Option<(UserId, Option<UserId>)> {
        if let (Some(target), Some(admin)) = (
            self.string("impersonatingUserId"),
            self.string("realAdminId"),
        ) {
            return Some((UserId::new(target).ok()?, Some(UserId::new(admin).ok()?)));
        }
        let id = self.string("id").or_else(|| self.string("sub"))?;
        Some((UserId::new(id).ok()?, None))
    }

    pub(crate) fn check(&self, now: i64) -> ClaimCheck {
        let (Ok(exp), Ok(nbf)) = (self.time("exp"), self.time("nbf")) else {
            return ClaimCheck::BadTimeClaim;
        };
        let user = self.effective_user();
        if exp.is_some_and(|exp| exp <= now - CLOCK_TOLERANCE_SECS) {
            return ClaimCheck::Expired {
                user: user.map(|(u, _)| u),
            };
        }
        if nbf.is_some_and(|nbf| nbf > now + CLOCK_TOLERANCE_SECS) {
            return ClaimCheck::NotYetValid;
        }
        match user {
            Some((user, impersonated_by)) => ClaimCheck::Valid {
                user,
                impersonated_by,
                expires_at: exp,
            },
            None => ClaimCheck::NoSubject,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Claims {
        match v {
            Value::Object(m) => Claims(m),
            _ => Claims(Map::new()),
        }
    }

    #[test]
    fn id_beats_sub_and_impersonation_needs_both_fields() {
        let c = claims(json!({"sub": "s", "id": "i"}));
        assert_eq!(
            c.effective_user().map(|(u, _)| u.to_string()),
            Some("i".into())
        );
        let c = claims(json!({"sub": "s"}));
        assert_eq!(
            c.effective_user().map(|(u, _)| u.to_string()),
            Some("s".into())
        );
        let c = claims(json!({"id": "admin", "impersonatingUserId": "victim"}));
        assert_eq!(
            c.effective_user().map(|(u, _)| u.to_string()),
            Some("admin".into())
        );
        let c = claims(json!({"id": "admin", "impersonatingUserId": "v", "realAdminId": "admin"}));
        let (user, by) = c
            .effective_user()
            .unwrap_or_else(|| (UserId::new("x").unwrap_or_else(|_| unreachable!()), None));
        assert_eq!(
            (user.as_str(), by.map(|b| b.to_string())),
            ("v", Some("admin".into()))
        );
    }

    #[test]
    fn expiry_uses_fifteen_seconds_of_tolerance_and_64_bit_times() {
        let c = claims(json!({"id": "u", "exp": 4_920_825_600_i64}));
        assert!(matches!(c.check(4_920_825_614), ClaimCheck::Valid { .. }));
        assert!(matches!(c.check(4_920_825_615), ClaimCheck::Expired { .. }));
        let c = claims(json!({"id": "u", "exp": "soon"}));
        assert_eq!(c.check(0), ClaimCheck::BadTimeClaim);
        let c = claims(json!({"id": "u", "nbf": 100}));
        assert_eq!(c.check(84), ClaimCheck::NotYetValid);
        assert_eq!(claims(json!({"exp": 100})).check(0), ClaimCheck::NoSubject);
    }
}
