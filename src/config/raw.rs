//! The YAML file as written by users: serde structs, every field optional where a default exists.
//! Unknown keys are collected (not fatal at once) so that `check-config` can report all of them.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    pub listen: Option<String>,
    pub threads: Option<usize>,
    pub shutdown: Option<RawShutdown>,
    pub store: Option<RawStore>,
    pub cache: Option<RawCache>,
    pub credentials: Option<RawCredentials>,
    pub identity: Option<RawIdentity>,
    pub roles: Option<BTreeMap<String, Vec<String>>>,
    pub scopes: Option<BTreeMap<String, Vec<String>>>,
    pub argon2: Option<RawArgon2>,
    pub orgs: Option<BTreeMap<String, RawOrg>>,
    pub routes: Option<Vec<RawRoute>>,
    pub log: Option<RawLog>,
    pub admin: Option<RawAdmin>,
    pub tokens: Option<RawTokens>,
    pub audit: Option<RawAudit>,
    pub jwt: Option<RawJwt>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub last_use_flush: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawTokens {
    pub max_ttl: Option<String>,
    pub require_expiry: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAudit {
    pub max_entries: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawJwt {
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub upstream_audience: Option<String>,
    pub leeway: Option<String>,
    pub default_ttl: Option<String>,
    pub max_ttl: Option<String>,
    pub upstream_ttl: Option<String>,
    pub signing_key: Option<String>,
    pub keys: Option<Vec<RawJwtKey>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawJwtKey {
    pub kid: Option<String>,
    pub algorithm: Option<String>,
    pub key_file: Option<String>,
    pub secret_file: Option<String>,
    pub secret_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawShutdown {
    pub grace: Option<String>,
    pub timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawStore {
    pub redis: Option<RawRedis>,
    pub embedded: Option<RawEmbedded>,
    pub timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawRedis {
    pub url: Option<String>,
    pub key_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawEmbedded {
    pub path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawCache {
    pub capacity: Option<u64>,
    pub ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawCredentials {
    pub bearer: Option<bool>,
    pub query_param: Option<String>,
    pub api_key_header: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawIdentity {
    pub prefix: Option<String>,
    pub headers: Option<Vec<String>>,
    pub request_id_header: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawArgon2 {
    pub memory_kib: Option<u32>,
    pub iterations: Option<u32>,
    pub parallelism: Option<u32>,
    pub max_concurrency: Option<usize>,
    pub max_wait: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawOrg {
    pub projects: Option<BTreeMap<String, RawProject>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawProject {
    pub environments: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawAuth {
    Required,
    None,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawRoute {
    pub name: Option<String>,
    pub host: Option<String>,
    pub path: Option<String>,
    pub upstream: Option<String>,
    pub upstreams: Option<Vec<String>>,
    pub org: Option<String>,
    pub project: Option<String>,
    pub environment: Option<String>,
    pub auth: Option<RawAuth>,
    pub query_token: Option<bool>,
    pub identity_jwt: Option<bool>,
    pub preserve_header_case: Option<bool>,
    pub case_sensitive: Option<bool>,
    pub permissions: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawLog {
    pub level: Option<String>,
    pub access: Option<bool>,
}
