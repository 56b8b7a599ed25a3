//! Shared inputs for the criterion benches in `benches/benches/`: the real cookies from
//! `pinacle-authz/tests/fixtures/nextauth/` so that the benches decode what the dashboard mints.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use serde_json::Value;

/// A fixture file from `pinacle-authz/tests/fixtures/nextauth/`.
///
/// # Errors
/// The file is missing or is not JSON.
pub fn fixture(name: &str) -> Result<Value, String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../pinacle-authz/tests/fixtures/nextauth")
        .join(name);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The case named `name` in a fixture's `cases`.
pub fn case<'a>(fixture: &'a Value, name: &str) -> Option<&'a Value> {
    fixture["cases"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
}
