//! The access rule, pure: owner or joined team member may reach a pod; among pods sharing a slug
//! the newest one the user may reach wins; a reachable pod must be running with an address.

use std::net::SocketAddr;

use crate::ids::{PodId, PodSlug, UserId};
use crate::pod::{PodCandidate, PodStatus, UnavailableReason, upstream_of};

/// Why access was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// No non-archived pod has this slug.
    NoSuchPod,
    /// Pods exist, but the user owns none and is a member of none of their teams.
    NotPermitted,
}

impl DenyReason {
    /// The stable name used in responses and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoSuchPod => "no_such_pod",
            Self::NotPermitted => "not_permitted",
        }
    }
}

/// The answer to "may this user reach this pod, and where is it?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead: the pod's nginx is at `upstream`.
    Allow {
        /// `pod.id`
        pod_id: PodId,
        /// `pod.slug`
        slug: PodSlug,
        /// `<server ip>:<nginx-proxy external port>`.
        upstream: SocketAddr,
    },
    /// The user may reach the pod, but it cannot be reached now.
    Unavailable {
        /// `pod.id`
        pod_id: PodId,
        /// Its status, to show the user.
        status: PodStatus,
        /// What is missing.
        reason: UnavailableReason,
    },
    /// No access.
    Deny(DenyReason),
}

/// Whether `user` may reach `pod`: its owner, or a joined member of its team.
pub fn may_access(pod: &PodCandidate, user: &UserId) -> bool {
    pod.owner_id.as_ref() == Some(user) || pod.requester_is_member
}

/// Decides among the non-archived pods that share a slug (in any order).
/// Where the pod a slug names is, whoever asks (the newest of the pods sharing it, as
/// [`decide`] would pick for their owners): for requests that carry no user by design (CORS
/// preflights passed to the pod). Never a grant to anyone.
pub fn locate(candidates: &[PodCandidate]) -> Decision {
    let newest = candidates.iter().max_by(|a, b| {
        a.created_at_ms
            .cmp(&b.created_at_ms)
            .then_with(|| a.id.cmp(&b.id))
    });
    match newest {
        Some(pod) => reach(pod),
        None => Decision::Deny(DenyReason::NoSuchPod),
    }
}

/// Allow to the pod's upstream, or why it cannot be reached.
fn reach(pod: &PodCandidate) -> Decision {
    match upstream_of(pod) {
        Ok(upstream) => Decision::Allow {
            pod_id: pod.id.clone(),
            slug: pod.slug.clone(),
            upstream,
        },
        Err(reason) => Decision::Unavailable {
            pod_id: pod.id.clone(),
            status: pod.status.clone(),
            reason,
        },
    }
}

pub fn decide(candidates: &[PodCandidate], user: &UserId) -> Decision {
    let chosen = candidates
        .iter()
        .filter(|pod| may_access(pod, user))
        .max_by(|a, b| {
            a.created_at_ms
                .cmp(&b.created_at_ms)
                .then_with(|| a.id.cmp(&b.id))
        });
    let Some(pod) = chosen else {
        return Decision::Deny(if candidates.is_empty() {
            DenyReason::NoSuchPod
        } else {
            DenyReason::NotPermitted
        });
    };
    reach(pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> UserId {
        UserId::new(s).unwrap_or_else(|_| unreachable!())
    }

    fn pod(pod_id: &str, owner: &str, created: i64, member: bool) -> PodCandidate {
        PodCandidate {
            id: PodId::new(pod_id).unwrap_or_else(|_| unreachable!()),
            slug: PodSlug::parse("shared").unwrap_or_else(|_| unreachable!()),
            owner_id: Some(id(owner)),
            status: PodStatus::Running,
            server_address: Some("10.0.0.5".into()),
            ports_json: Some(r#"[{"name":"nginx-proxy","external":30001}]"#.into()),
            created_at_ms: created,
            requester_is_member: member,
        }
    }

    #[test]
    fn owner_and_member_allowed_stranger_denied() {
        let u = id("u");
        assert!(matches!(
            decide(&[pod("p", "u", 1, false)], &u),
            Decision::Allow { .. }
        ));
        assert!(matches!(
            decide(&[pod("p", "x", 1, true)], &u),
            Decision::Allow { .. }
        ));
        assert_eq!(
            decide(&[pod("p", "x", 1, false)], &u),
            Decision::Deny(DenyReason::NotPermitted)
        );
        assert_eq!(decide(&[], &u), Decision::Deny(DenyReason::NoSuchPod));
    }

    #[test]
    fn shared_slug_prefers_accessible_then_newest() {
        let u = id("u");
        let pods = [
            pod("old", "u", 1, false),
            pod("newest-foreign", "x", 9, false),
            pod("new", "u", 5, false),
        ];
        match decide(&pods, &u) {
            Decision::Allow { pod_id, .. } => assert_eq!(pod_id.as_str(), "new"),
            other => unreachable!("{other:?}"),
        }
    }

    #[test]
    fn stopped_pod_carries_its_status() {
        let mut p = pod("p", "u", 1, false);
        p.status = PodStatus::Stopped;
        assert!(matches!(
            decide(&[p], &id("u")),
            Decision::Unavailable {
                status: PodStatus::Stopped,
                reason: UnavailableReason::NotRunning,
                ..
            }
        ));
    }
}
