//! Identifier newtypes: built only through fallible constructors, cheap to clone (they key caches).

use std::fmt;
use std::sync::Arc;

use thiserror::Error;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdError {
    /// The value was empty.
    #[error("{what} is empty")]
    Empty {
        /// Which identifier.
        what: &'static str,
    },
    /// The value was longer than allowed.
    #[error("{what} is longer than {max} characters")]
    TooLong {
        /// Which identifier.
        what: &'static str,
        /// The limit.
        max: usize,
    },
    /// The value held a character the identifier may not contain.
    #[error("{what} contains an invalid character")]
    InvalidCharacter {
        /// Which identifier.
        what: &'static str,
    },
}

macro_rules! opaque_id {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Builds the identifier from an opaque string (never parsed further).
            ///
            /// # Errors
            /// Empty, longer than the column allows, or containing control characters.
            pub fn new(value: &str) -> Result<Self, IdError> {
                if value.is_empty() {
                    return Err(IdError::Empty { what: $what });
                }
                if value.len() > $max {
                    return Err(IdError::TooLong { what: $what, max: $max });
                }
                if value.chars().any(char::is_control) {
                    return Err(IdError::InvalidCharacter { what: $what });
                }
                Ok(Self(Arc::from(value)))
            }

            /// The identifier as stored in the database.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

opaque_id!(
    /// A user id (`"user".id`): opaque text, KSUID-like or UUID.
    UserId,
    "user id",
    255
);
opaque_id!(
    /// A pod id (`pod.id`): opaque text.
    PodId,
    "pod id",
    255
);

/// A pod slug as it appears in a pod hostname: lowercase ASCII letters, digits and `-`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodSlug(Arc<str>);

impl PodSlug {
    /// Longest slug the `pod.slug` column holds.
    pub const MAX_LEN: usize = 100;

    /// Parses a slug; callers lowercase hostnames first.
    ///
    /// # Errors
    /// Empty, longer than [`PodSlug::MAX_LEN`], or holding anything but `[a-z0-9-]`.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        const WHAT: &str = "pod slug";
        if value.is_empty() {
            return Err(IdError::Empty { what: WHAT });
        }
        if value.len() > Self::MAX_LEN {
            return Err(IdError::TooLong {
                what: WHAT,
                max: Self::MAX_LEN,
            });
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(IdError::InvalidCharacter { what: WHAT });
        }
        Ok(Self(Arc::from(value)))
    }

    /// The slug text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PodSlug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PodSlug({:?})", &*self.0)
    }
}

impl fmt::Display for PodSlug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_accept_dns_label_characters_only() {
        assert!(PodSlug::parse("my-project-2").is_ok());
        assert_eq!(
            PodSlug::parse("My-Project"),
            Err(IdError::InvalidCharacter { what: "pod slug" })
        );
        assert!(PodSlug::parse("").is_err());
        assert!(PodSlug::parse(&"a".repeat(101)).is_err());
        assert!(PodSlug::parse("a.b").is_err());
    }

    #[test]
    fn ids_are_opaque_but_bounded() {
        assert_eq!(
            UserId::new("pod_362Kst").map(|u| u.to_string()).ok(),
            Some("pod_362Kst".into())
        );
        assert!(UserId::new("").is_err());
        assert!(UserId::new("a\nb").is_err());
    }
}
