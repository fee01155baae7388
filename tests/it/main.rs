//! The one integration-test binary (Pingora is linked once). Each module starts real processes.

// A failed setup step in a test should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod ephemeral;
mod gateway;
mod lifecycle;
mod ops;
mod quickstart;
mod support;
