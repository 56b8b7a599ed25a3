//! Where the dashboard's secret comes from: `NEXTAUTH_SECRET` (alias `AUTH_SECRET`), older ones
//! for rotation in `AUTH_SECRET_1` ... `AUTH_SECRET_9`, each also readable from a `*_FILE` path.

use pinacle_authz::Secret;
use thiserror::Error;

/// The secret could not be read.
#[derive(Debug, Error)]
pub enum SecretsError {
    /// A `*_FILE` variable names a file that cannot be read.
    #[error("{var}: cannot read {path}: {source}")]
    File {
        /// The variable.
        var: String,
        /// The path it names.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A variable is set but empty.
    #[error("{0} is set but empty")]
    Empty(String),
}

/// Reads `name`, else the file named by `name_FILE` (one trailing newline removed).
fn read_var(
    env: &impl Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<Secret>, SecretsError> {
    let value = match env(name) {
        Some(v) => v,
        None => {
            let var = format!("{name}_FILE");
            let Some(path) = env(&var) else {
                return Ok(None);
            };
            let text = std::fs::read_to_string(&path).map_err(|source| SecretsError::File {
                var: var.clone(),
                path,
                source,
            })?;
            let trimmed = text.strip_suffix('\n').unwrap_or(&text);
            trimmed.strip_suffix('\r').unwrap_or(trimmed).to_owned()
        }
    };
    if value.is_empty() {
        return Err(SecretsError::Empty(name.to_owned()));
    }
    Ok(Some(Secret::new(value)))
}

/// Every configured secret, newest first, without duplicates. Empty when none is set.
///
/// # Errors
/// A set-but-empty variable, or an unreadable `*_FILE`.
pub fn secrets_from_env(env: impl Fn(&str) -> Option<String>) -> Result<Vec<Secret>, SecretsError> {
    let mut names = vec!["NEXTAUTH_SECRET".to_owned(), "AUTH_SECRET".to_owned()];
    names.extend((1..=9).map(|i| format!("AUTH_SECRET_{i}")));
    let mut secrets: Vec<Secret> = Vec::new();
    for name in names {
        if let Some(secret) = read_var(&env, &name)?
            && !secrets.contains(&secret)
        {
            secrets.push(secret);
        }
    }
    Ok(secrets)
}

/// [`secrets_from_env`] over the process environment.
///
/// # Errors
/// As [`secrets_from_env`].
pub fn secrets_from_process_env() -> Result<Vec<Secret>, SecretsError> {
    secrets_from_env(|k| std::env::var(k).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn nextauth_first_then_alias_then_rotation_without_duplicates() {
        let s = secrets_from_env(env(&[
            ("AUTH_SECRET_2", "old"),
            ("AUTH_SECRET", "cur"),
            ("NEXTAUTH_SECRET", "cur"),
        ]))
        .unwrap_or_default();
        assert_eq!(s, vec![Secret::new("cur"), Secret::new("old")]);
        assert!(secrets_from_env(env(&[])).unwrap_or_default().is_empty());
        assert!(matches!(
            secrets_from_env(env(&[("AUTH_SECRET", "")])),
            Err(SecretsError::Empty(_))
        ));
    }

    #[test]
    fn file_variants_are_read_and_trimmed() {
        let dir = std::env::temp_dir().join(format!("pinacle-secret-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("secret");
        let _ = std::fs::write(&path, "from-file\n");
        let s = secrets_from_env(env(&[(
            "NEXTAUTH_SECRET_FILE",
            path.to_str().unwrap_or(""),
        )]))
        .unwrap_or_default();
        assert_eq!(s, vec![Secret::new("from-file")]);
        assert!(matches!(
            secrets_from_env(env(&[("AUTH_SECRET_FILE", "/nonexistent/x")])),
            Err(SecretsError::File { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
