//! The control plane (the dashboard) at the door: Start and Stop from the status page, wake on
//! request, and the activity reports that keep a pod alive. The ingress never orchestrates a
//! pod itself; it asks the control plane, whose contract is `docs/control-plane.openapi.yaml`
//! and the README's "Pod lifecycle" section:
//!
//! - `POST {control_url}/pods/{pod_id}/start` and `.../stop`, `Authorization: Bearer <JWT>`:
//!   202 accepted, 409 already in transition (not an error), anything else shown plainly.
//! - `POST {control_url}/activity` with `{"pods": [{"pod_id", "last_seen", "users"}]}`.
//!
//! The token is HS256 over `control_secret`: `iss` "pinacle-ingress", `aud` "pinacle-control",
//! `sub` (the acting user; none for activity), `pod`, `act`, `iat`, `exp` (60 s later).
//!
//! The pure parts (tokens, CSRF tokens, outcomes, the activity batch) are separate from the
//! one HTTP call ([`Client::call`]), which is bounded by `control_timeout` from connect to the
//! last byte. A hand-written HTTP/1.1 call (hyper's connection API and tokio-rustls, both in
//! the build already) instead of a client crate: one request per call, no pool, no redirects.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use pinacle_authz::{PodId, Secret, UserId};
use serde::Serialize;
use sha2::Sha256;

use crate::config::ControlConfig;

/// `iss` of our tokens.
pub const ISSUER: &str = "pinacle-ingress";
/// `aud` of our tokens.
pub const AUDIENCE: &str = "pinacle-control";
/// A token's life: `exp - iat`.
pub const TOKEN_LIFETIME_SECS: i64 = 60;
/// How long a CSRF token on a status page stays good.
pub const CSRF_LIFETIME_SECS: i64 = 12 * 3600;
/// The header the status page sends its CSRF token in (a custom header also makes a
/// cross-origin `fetch` need a preflight, which pod hosts do not grant to other sites).
pub const CSRF_HEADER: &str = "x-pinacle-csrf";
/// The most of a control-plane answer read (its error message).
const MAX_ANSWER_BYTES: usize = 16 * 1024;
/// The most of a control-plane error message shown to the user.
const MAX_MESSAGE_CHARS: usize = 300;

/// What a person asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start a stopped pod.
    Start,
    /// Stop a running pod.
    Stop,
}

impl Action {
    /// `start` or `stop` (the path segment, the `act` claim, the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
        }
    }

    /// Whether a pod in `status` can take this action now.
    pub fn applies_to(self, status: &str) -> bool {
        match self {
            Self::Start => matches!(status, "stopped" | "error"),
            Self::Stop => status == "running",
        }
    }
}

/// The claims of every token we send.
#[derive(Debug, Serialize)]
struct Claims<'a> {
    iss: &'static str,
    aud: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<&'a str>,
    act: &'a str,
    iat: i64,
    exp: i64,
}

/// A token for one call: `act` by `sub` on `pod`, issued at `now`.
///
/// # Errors
/// Only if signing fails (never with an HMAC key).
pub fn token(
    secret: &Secret,
    act: &str,
    sub: Option<&str>,
    pod: Option<&str>,
    now: i64,
) -> Result<String, jsonwebtoken::errors::Error> {
    let claims = Claims {
        iss: ISSUER,
        aud: AUDIENCE,
        sub,
        pod,
        act,
        iat: now,
        exp: now + TOKEN_LIFETIME_SECS,
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.expose()),
    )
}

type HmacSha256 = Hmac<Sha256>;

/// The CSRF key: derived from `control_secret`, so every gateway accepts every other's tokens
/// and the JWT key itself signs nothing else. (HMAC takes keys of any length: never `None`.)
fn csrf_mac(secret: &Secret, user: &str, slug: &str, expires: i64) -> Option<HmacSha256> {
    let mut derive = HmacSha256::new_from_slice(secret.expose()).ok()?;
    derive.update(b"pinacle-ingress csrf v1");
    let key = derive.finalize().into_bytes();
    let mut mac = HmacSha256::new_from_slice(&key).ok()?;
    for part in [user.as_bytes(), b"\0", slug.as_bytes(), b"\0"] {
        mac.update(part);
    }
    mac.update(expires.to_string().as_bytes());
    Some(mac)
}

/// A CSRF token for `user` on pod `slug`'s status page, good until `now + CSRF_LIFETIME_SECS`:
/// `<expires>.<hex HMAC>`.
pub fn csrf_token(secret: &Secret, user: &UserId, slug: &str, now: i64) -> String {
    let expires = now + CSRF_LIFETIME_SECS;
    let tag = csrf_mac(secret, user.as_str(), slug, expires)
        .map(|mac| crate::hex::encode(&mac.finalize().into_bytes()))
        .unwrap_or_default();
    format!("{expires}.{tag}")
}

/// Whether `token` was made by [`csrf_token`] for this user and pod and has not expired
/// (compared in constant time).
pub fn csrf_valid(secret: &Secret, user: &UserId, slug: &str, token: &str, now: i64) -> bool {
    let Some((expires, hex)) = token.split_once('.') else {
        return false;
    };
    let Ok(expires) = expires.parse::<i64>() else {
        return false;
    };
    if expires < now || expires > now + CSRF_LIFETIME_SECS {
        return false;
    }
    let Some(tag) = crate::hex::decode32(hex) else {
        return false;
    };
    csrf_mac(secret, user.as_str(), slug, expires).is_some_and(|mac| mac.verify_slice(&tag).is_ok())
}

/// What came of asking the control plane to start or stop a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 202: it will.
    Accepted,
    /// 409: the pod is already on its way (ignored, as the page ignores it).
    InTransition,
    /// Any other answer: its status and what it said (plain text, shortened).
    Refused {
        /// The control plane's status code.
        status: u16,
        /// Its message (`error` or `message` of a JSON body, else the text), shortened.
        message: String,
    },
    /// No connection (refused, reset, TLS failure, DNS).
    Unreachable,
    /// No answer within `control_timeout`.
    TimedOut,
}

impl Outcome {
    /// Stable name (metrics, logs).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::InTransition => "in_transition",
            Self::Refused { .. } => "refused",
            Self::Unreachable => "unreachable",
            Self::TimedOut => "timeout",
        }
    }

    /// Reads an answer.
    pub fn from_answer(status: u16, body: &[u8]) -> Self {
        match status {
            202 => Self::Accepted,
            409 => Self::InTransition,
            _ => Self::Refused {
                status,
                message: answer_message(body),
            },
        }
    }
}

/// The words of an error answer: a JSON body's `error` or `message`, else the body as text;
/// control characters dropped, shortened.
fn answer_message(body: &[u8]) -> String {
    let text = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            ["error", "message"]
                .iter()
                .find_map(|k| v.get(k).and_then(|m| m.as_str()).map(str::to_owned))
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let mut clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_MESSAGE_CHARS)
        .collect();
    clean = clean.trim().to_owned();
    clean
}

/// Why a call produced no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No connection or no complete answer.
    #[error("control plane unreachable: {0}")]
    Unreachable(String),
    /// Not within `control_timeout`.
    #[error("control plane did not answer within the timeout")]
    TimedOut,
}

/// Makes the calls (TLS settings cached per `control_ca_file`).
#[derive(Debug, Default)]
pub struct Client {
    tls: crate::http_client::TlsCache,
}

impl Client {
    /// Asks the control plane to start or stop `pod` for `user`.
    pub async fn lifecycle(
        &self,
        config: &ControlConfig,
        action: Action,
        pod: &PodId,
        user: &UserId,
        now: i64,
    ) -> Outcome {
        let Ok(bearer) = token(
            &config.secret,
            action.as_str(),
            Some(user.as_str()),
            Some(pod.as_str()),
            now,
        ) else {
            return Outcome::Unreachable;
        };
        let path = format!(
            "/pods/{}/{}",
            percent_encoding::utf8_percent_encode(pod.as_str(), SEGMENT),
            action.as_str()
        );
        match self.call(config, &path, &bearer, Bytes::new()).await {
            Ok((status, body)) => Outcome::from_answer(status, &body),
            Err(CallError::TimedOut) => Outcome::TimedOut,
            Err(CallError::Unreachable(e)) => {
                tracing::debug!(error = %e, "control plane call failed");
                Outcome::Unreachable
            }
        }
    }

    /// One `POST {control_url}{path}` with the token and a JSON body, bounded by
    /// `control_timeout` from connect to the last byte of the answer.
    ///
    /// # Errors
    /// No complete answer in time.
    pub async fn call(
        &self,
        config: &ControlConfig,
        path: &str,
        bearer: &str,
        body: Bytes,
    ) -> Result<(u16, Bytes), CallError> {
        let tls = match config.url.starts_with("https:") {
            true => Some(self.tls_config(config)?),
            false => None,
        };
        tokio::time::timeout(config.timeout, post(config, tls, path, bearer, body))
            .await
            .map_err(|_| CallError::TimedOut)?
    }

    fn tls_config(&self, config: &ControlConfig) -> Result<Arc<rustls::ClientConfig>, CallError> {
        self.tls
            .get(config.ca_file.as_deref())
            .map_err(CallError::Unreachable)
    }
}

/// Characters escaped in a path segment.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

async fn post(
    config: &ControlConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    path: &str,
    bearer: &str,
    body: Bytes,
) -> Result<(u16, Bytes), CallError> {
    let url = format!("{}{path}", config.url);
    let authorization = format!("Bearer {bearer}");
    crate::http_client::request(
        http::Method::POST,
        &url,
        tls,
        &[
            (http::header::AUTHORIZATION, authorization.as_str()),
            (http::header::CONTENT_TYPE, "application/json"),
        ],
        body,
        MAX_ANSWER_BYTES,
    )
    .await
    .map_err(CallError::Unreachable)
}

/// Starts a stopped pod on a navigation (`wake_on_request`): at most one start call per pod
/// in flight, however many requests arrive.
#[derive(Debug, Default)]
pub struct Wakes {
    in_flight: Mutex<HashSet<PodId>>,
}

/// A wake in flight; ends when dropped.
#[derive(Debug)]
pub struct Waking {
    wakes: Arc<Wakes>,
    pod: PodId,
}

impl Wakes {
    /// Claims the one start call for `pod`, or `None` when one is already in flight.
    pub fn begin(self: &Arc<Self>, pod: &PodId) -> Option<Waking> {
        let mut set = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        set.insert(pod.clone()).then(|| Waking {
            wakes: self.clone(),
            pod: pod.clone(),
        })
    }
}

impl Drop for Waking {
    fn drop(&mut self) {
        let mut set = self
            .wakes
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        set.remove(&self.pod);
    }
}

/// Pods distinct in one report at most; more are dropped (and counted) until the next report.
pub const MAX_REPORTED_PODS: usize = 10_000;
/// Users named per pod in one report at most.
pub const MAX_USERS_PER_POD: usize = 32;

/// One pod in an activity report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodActivity {
    /// `pod.id`.
    pub pod_id: String,
    /// Unix seconds of the last traffic.
    pub last_seen: i64,
    /// Who made it (user ids), at most [`MAX_USERS_PER_POD`].
    pub users: Vec<String>,
}

/// The body of `POST {control_url}/activity`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Pods that carried traffic since the last report.
    pub pods: Vec<PodActivity>,
}

#[derive(Debug)]
struct Seen {
    last_seen: i64,
    users: Vec<UserId>,
}

/// Traffic since the last report, per pod: a bounded map, not a queue of events, so a busy
/// pod costs one entry however many requests it carries.
#[derive(Debug, Default)]
pub struct Activity {
    pods: Mutex<HashMap<PodId, Seen>>,
}

impl Activity {
    /// Notes traffic on `pod` by `user` at `now`; false when the batch is full (dropped).
    pub fn record(&self, pod: &PodId, user: &UserId, now: i64) -> bool {
        let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(seen) = pods.get_mut(pod) {
            seen.last_seen = seen.last_seen.max(now);
            if seen.users.len() < MAX_USERS_PER_POD && !seen.users.contains(user) {
                seen.users.push(user.clone());
            }
            return true;
        }
        if pods.len() >= MAX_REPORTED_PODS {
            return false;
        }
        pods.insert(
            pod.clone(),
            Seen {
                last_seen: now,
                users: vec![user.clone()],
            },
        );
        true
    }

    /// Takes what was seen since the last call, as a report (pods in id order).
    pub fn take(&self) -> Report {
        let taken = std::mem::take(&mut *self.pods.lock().unwrap_or_else(|e| e.into_inner()));
        let mut pods: Vec<PodActivity> = taken
            .into_iter()
            .map(|(pod, seen)| PodActivity {
                pod_id: pod.as_str().to_owned(),
                last_seen: seen.last_seen,
                users: seen.users.iter().map(|u| u.as_str().to_owned()).collect(),
            })
            .collect();
        pods.sort_by(|a, b| a.pod_id.cmp(&b.pod_id));
        Report { pods }
    }

    /// Puts back a report that could not be sent, so the next one carries it; returns how many
    /// pods did not fit.
    pub fn restore(&self, report: Report) -> usize {
        let mut dropped = 0;
        for pod in report.pods {
            let Ok(id) = PodId::new(&pod.pod_id) else {
                continue;
            };
            for user in pod.users.iter().filter_map(|u| UserId::new(u).ok()) {
                if !self.record(&id, &user, pod.last_seen) {
                    dropped += 1;
                    break;
                }
            }
        }
        dropped
    }
}

/// A long-lived connection's way to note its traffic (a WebSocket tunnel's frames either
/// way), at most once a second.
#[derive(Debug, Clone)]
pub struct Touch {
    /// Where it is noted.
    pub activity: Arc<Activity>,
    /// The pod.
    pub pod: PodId,
    /// The user.
    pub user: UserId,
    /// Unix seconds now.
    pub clock: crate::proxy::Clock,
}

impl Touch {
    /// Notes traffic now.
    pub fn touch(&self) {
        self.activity.record(&self.pod, &self.user, (self.clock)());
    }
}

/// Sends what [`Activity`] gathered every `activity_interval`, in the background; a report
/// that fails is carried by the next one. Reads the configuration each round (a reload may
/// turn reports on or off or change the interval).
pub async fn report_activity(state: Arc<crate::proxy::State>) {
    loop {
        let interval = state
            .current_config()
            .control
            .as_ref()
            .and_then(|c| c.activity_interval)
            .unwrap_or(Duration::from_secs(60));
        tokio::time::sleep(interval).await;
        let config = state.current_config();
        let Some(control) = config
            .control
            .as_ref()
            .filter(|c| c.activity_interval.is_some())
        else {
            drop(state.activity.take());
            continue;
        };
        let report = state.activity.take();
        if report.pods.is_empty() {
            continue;
        }
        let now = (state.clock)();
        let pods = report.pods.len();
        let result = match (
            token(&control.secret, "activity", None, None, now),
            serde_json::to_vec(&report),
        ) {
            (Ok(bearer), Ok(body)) => state
                .control
                .call(control, "/activity", &bearer, Bytes::from(body))
                .await
                .map(|(status, body)| (status, answer_message(&body))),
            _ => Err(CallError::Unreachable("cannot encode the report".into())),
        };
        match result {
            Ok((status, _)) if (200..300).contains(&status) => {
                state.metrics.control_call("activity", "accepted");
                tracing::debug!(pods, "activity reported");
            }
            failed => {
                let (outcome, why) = match &failed {
                    Ok((status, message)) => ("refused", format!("HTTP {status}: {message}")),
                    Err(CallError::TimedOut) => ("timeout", "timed out".to_owned()),
                    Err(e) => ("unreachable", e.to_string()),
                };
                state.metrics.control_call("activity", outcome);
                let dropped = state.activity.restore(report);
                state.metrics.activity_dropped(dropped);
                tracing::warn!(pods, dropped, error = %why, "activity report failed; kept for the next one");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::new("0123456789abcdef0123456789abcdef")
    }

    fn user(id: &str) -> UserId {
        UserId::new(id).unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn tokens_carry_the_contracts_claims_and_expire_within_a_minute() {
        let t = token(&secret(), "start", Some("u1"), Some("p1"), 1_000).unwrap_or_default();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_issuer(&[ISSUER]);
        validation.validate_exp = false;
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &t,
            &jsonwebtoken::DecodingKey::from_secret(secret().expose()),
            &validation,
        )
        .map(|d| d.claims)
        .unwrap_or_default();
        assert_eq!(data["sub"], "u1");
        assert_eq!(data["pod"], "p1");
        assert_eq!(data["act"], "start");
        assert_eq!(data["iat"], 1_000);
        assert_eq!(data["exp"], 1_060);
        let activity = token(&secret(), "activity", None, None, 5).unwrap_or_default();
        let payload = activity.split('.').nth(1).unwrap_or_default();
        let json =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
                .unwrap_or_default();
        let text = String::from_utf8(json).unwrap_or_default();
        assert!(
            !text.contains("\"sub\"") && !text.contains("\"pod\""),
            "{text}"
        );
    }

    #[test]
    fn csrf_tokens_are_bound_to_the_user_the_pod_and_time() {
        let t = csrf_token(&secret(), &user("alice"), "demo", 100);
        assert!(csrf_valid(&secret(), &user("alice"), "demo", &t, 100));
        assert!(csrf_valid(
            &secret(),
            &user("alice"),
            "demo",
            &t,
            100 + CSRF_LIFETIME_SECS
        ));
        assert!(!csrf_valid(
            &secret(),
            &user("alice"),
            "demo",
            &t,
            101 + CSRF_LIFETIME_SECS
        ));
        assert!(!csrf_valid(&secret(), &user("bob"), "demo", &t, 100));
        assert!(!csrf_valid(&secret(), &user("alice"), "other", &t, 100));
        let other = Secret::new("another-secret-another-secret-00");
        assert!(!csrf_valid(&other, &user("alice"), "demo", &t, 100));
        // A later expiry written over the signed one does not verify.
        let (_, tag) = t.split_once('.').unwrap_or_default();
        let forged = format!("{}.{tag}", 200 + CSRF_LIFETIME_SECS);
        assert!(csrf_valid(&secret(), &user("alice"), "demo", &t, 200));
        assert!(!csrf_valid(&secret(), &user("alice"), "demo", &forged, 200));
        for junk in ["", ".", "x.y", "100.zz", &format!("{}.", 200)] {
            assert!(!csrf_valid(&secret(), &user("alice"), "demo", junk, 100));
        }
    }

    #[test]
    fn answers_become_outcomes_with_plain_messages() {
        assert_eq!(Outcome::from_answer(202, b""), Outcome::Accepted);
        assert_eq!(Outcome::from_answer(409, b"{}"), Outcome::InTransition);
        assert_eq!(
            Outcome::from_answer(500, br#"{"error":"no capacity\n on server"}"#),
            Outcome::Refused {
                status: 500,
                message: "no capacity  on server".into()
            }
        );
        let long = "x".repeat(5000);
        match Outcome::from_answer(400, long.as_bytes()) {
            Outcome::Refused { message, .. } => assert_eq!(message.len(), MAX_MESSAGE_CHARS),
            other => unreachable!("{other:?}"),
        }
    }

    #[test]
    fn actions_apply_to_the_statuses_they_change() {
        assert!(Action::Start.applies_to("stopped"));
        assert!(Action::Start.applies_to("error"));
        assert!(!Action::Start.applies_to("starting"));
        assert!(!Action::Start.applies_to("running"));
        assert!(Action::Stop.applies_to("running"));
        assert!(!Action::Stop.applies_to("stopping"));
    }

    #[test]
    fn the_openapi_file_says_what_the_code_does() {
        let doc = include_str!("../../docs/control-plane.openapi.yaml");
        for expected in [
            format!("`iss` \"{ISSUER}\""),
            format!("`aud` \"{AUDIENCE}\""),
            format!("({TOKEN_LIFETIME_SECS} s after `iat`)"),
            "/pods/{pod_id}/start:".to_owned(),
            "/pods/{pod_id}/stop:".to_owned(),
            "/activity:".to_owned(),
            format!("maxItems: {MAX_USERS_PER_POD}"),
            format!("at most {MAX_REPORTED_PODS} pods per report"),
            format!("at most {MAX_MESSAGE_CHARS} characters"),
            format!("at most {} KiB", MAX_ANSWER_BYTES / 1024),
        ] {
            assert!(
                doc.contains(&expected),
                "{expected} not in the OpenAPI file"
            );
        }
    }

    #[test]
    fn one_wake_per_pod_at_a_time() {
        let wakes = Arc::new(Wakes::default());
        let pod = PodId::new("p1").unwrap_or_else(|_| unreachable!());
        let first = wakes.begin(&pod);
        assert!(first.is_some());
        assert!(wakes.begin(&pod).is_none());
        drop(first);
        assert!(wakes.begin(&pod).is_some());
    }

    #[test]
    fn activity_is_batched_per_pod_bounded_and_restored_after_a_failure() {
        let activity = Activity::default();
        let p1 = PodId::new("p1").unwrap_or_else(|_| unreachable!());
        let p2 = PodId::new("p2").unwrap_or_else(|_| unreachable!());
        for now in 1..=100 {
            assert!(activity.record(&p1, &user("alice"), now));
        }
        assert!(activity.record(&p1, &user("bob"), 50));
        assert!(activity.record(&p2, &user("bob"), 7));
        let report = activity.take();
        assert_eq!(
            report.pods,
            vec![
                PodActivity {
                    pod_id: "p1".into(),
                    last_seen: 100,
                    users: vec!["alice".into(), "bob".into()]
                },
                PodActivity {
                    pod_id: "p2".into(),
                    last_seen: 7,
                    users: vec!["bob".into()]
                },
            ]
        );
        assert!(activity.take().pods.is_empty());
        assert_eq!(activity.restore(report.clone()), 0);
        assert_eq!(activity.take(), report);
        for i in 0..MAX_REPORTED_PODS {
            let pod = PodId::new(&format!("pod-{i}")).unwrap_or_else(|_| unreachable!());
            assert!(activity.record(&pod, &user("u"), 1));
        }
        assert!(!activity.record(&p1, &user("u"), 1), "full: dropped");
        assert!(activity.record(
            &PodId::new("pod-0").unwrap_or_else(|_| unreachable!()),
            &user("v"),
            2
        ));
    }
}
