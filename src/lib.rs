//! Tollgate: an authentication gateway on Pingora. See ARCHITECTURE.md for the map.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod config;
pub mod drain;
pub mod echo;
pub mod jwt;
pub mod lifecycle;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod route;
pub mod server;
pub mod store;
#[doc(hidden)]
pub mod testing;
pub mod token;
