//! `pinacle-ingress`: the Pingora proxy in front of Pinacle pods and the dashboard.
//!
//! - [`cli`]: the command line (thin `main.rs` calls [`cli::run`]).
//! - [`secrets`]: the dashboard secret from the environment.
//! - [`inspect`]: the JSON report of `session inspect`.

#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod cli;
pub mod inspect;
pub mod secrets;
