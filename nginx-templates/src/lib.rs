//! `nginx-templates` renders the nginx config that runs inside each Pinacle pod (the second hop):
//! it reads the target port from the Host header the ingress sets and proxies to that port.
//!
//! - [`config`]: the file model ([`PodNginxFile`], JSON or TOML) and its validation into
//!   [`PodNginx`], reporting every problem with its field.
//! - [`render`](mod@render): [`PodNginx`] -> nginx.conf text, pure and deterministic.

#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod config;
pub mod render;

pub use config::{PodNginx, PodNginxFile, Problem, RuntimeFile};
pub use render::{MARKER_HEADER, render};

use thiserror::Error;

/// Why a pod config could not be rendered.
#[derive(Debug, Error)]
pub enum TemplateError {
    /// The input is not valid JSON/TOML of the expected shape.
    #[error("{0}")]
    Parse(String),
    /// The input parsed but holds invalid values.
    #[error("invalid pod nginx config: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Problem>),
}

/// Parses a pod config: JSON when it starts with `{`, TOML otherwise.
///
/// # Errors
/// [`TemplateError::Parse`] with the location of the syntax or shape error.
pub fn parse(text: &str) -> Result<PodNginxFile, TemplateError> {
    if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| TemplateError::Parse(format!("JSON: {e}")))
    } else {
        toml::from_str(text).map_err(|e| TemplateError::Parse(format!("TOML: {e}")))
    }
}

/// Parses, validates and renders.
///
/// # Errors
/// Any [`TemplateError`].
pub fn render_text(text: &str) -> Result<String, TemplateError> {
    let config = parse(text)?.validate().map_err(TemplateError::Invalid)?;
    Ok(render(&config))
}
