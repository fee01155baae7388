//! The YAML file as written by users: serde structs, every field optional where a default exists.
//! Unknown keys are collected (not fatal at once) so that `check-config` can report all of them.
//!
//! The file is read one top-level key at a time (and one route at a time), each in its own pass
//! over the text: serde stops at the first type error, so read whole, a `threads: two` would hide
//! every error after it. Each pass reads the text itself, not a parsed `serde_yaml::Value`, so that
//! a scalar is read as the user wrote it (`listen: 8080` is the string "8080") and an error keeps
//! its line and column.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::marker::PhantomData;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_yaml::Value;

use super::ConfigIssue;

#[derive(Debug, Default)]
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
    /// `None` for a route that could not be read (its error is reported).
    pub routes: Option<Vec<Option<RawRoute>>>,
    pub log: Option<RawLog>,
    pub admin: Option<RawAdmin>,
    pub tokens: Option<RawTokens>,
    pub audit: Option<RawAudit>,
    pub jwt: Option<RawJwt>,
    pub upstream_timeouts: Option<RawTimeouts>,
    pub keepalive_timeout: Option<String>,
    pub client_body_timeout: Option<String>,
    pub client_send_timeout: Option<String>,
    pub forwarded_for: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawTimeouts {
    pub connect: Option<String>,
    pub read: Option<String>,
    pub write: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub last_use_flush: Option<String>,
    pub read_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawTokens {
    pub max_ttl: Option<String>,
    pub require_expiry: Option<bool>,
    pub max_per_owner: Option<usize>,
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
    /// Present but empty (`redis:` with its lines commented out) is a `redis` section without a
    /// URL, refused as such, never the embedded store chosen in silence.
    #[serde(default, deserialize_with = "present")]
    pub redis: Option<RawRedis>,
    pub embedded: Option<RawEmbedded>,
    pub timeout: Option<String>,
}

/// A key that is present: `Some`, its value or, for `null`, the default.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<Option<T>, D::Error> {
    Ok(Some(Option::<T>::deserialize(d)?.unwrap_or_default()))
}

#[derive(Debug, Default, Deserialize)]
pub struct RawRedis {
    pub url: Option<String>,
    pub key_prefix: Option<String>,
    pub wait_replicas: Option<u32>,
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
    pub upstream_timeouts: Option<RawTimeouts>,
    pub org: Option<String>,
    pub project: Option<String>,
    pub environment: Option<String>,
    pub auth: Option<RawAuth>,
    pub query_token: Option<bool>,
    pub identity_jwt: Option<bool>,
    pub identity_jwt_audience: Option<String>,
    pub preserve_header_case: Option<bool>,
    pub case_sensitive: Option<bool>,
    pub format_extensions: Option<bool>,
    pub permissions: Option<Pairs>,
}

/// A mapping in file order, so that of two keys that mean the same the later one is named.
#[derive(Debug, Default)]
pub struct Pairs(pub Vec<(String, String)>);

impl<'de> Deserialize<'de> for Pairs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Pairs, D::Error> {
        struct PairsVisitor;
        impl<'de> Visitor<'de> for PairsVisitor {
            type Value = Pairs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Pairs, A::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = map.next_entry()? {
                    pairs.push(pair);
                }
                Ok(Pairs(pairs))
            }
        }
        deserializer.deserialize_map(PairsVisitor)
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct RawLog {
    pub level: Option<String>,
    pub access: Option<bool>,
}

/// Top-level keys whose value could not be read: their errors are reported, and checks of other
/// settings against them are skipped, since they would only add noise.
pub type Unreadable = BTreeSet<&'static str>;

/// Reads config text into its raw form, reporting in `issues` every unknown key and every value of
/// the wrong type, each with its path. `None` when the file as a whole cannot be read (a YAML
/// syntax error, or a document that is not a mapping): that is then the one issue.
pub fn read(text: &str, issues: &mut Vec<ConfigIssue>) -> Option<(RawConfig, Unreadable)> {
    // The whole file as YAML first: a syntax error (or a repeated key) is one error, and the
    // top-level keys and the routes are known before they are read one by one.
    let tree: Value = match serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text)) {
        Ok(tree) => tree,
        Err(e) => {
            let mut issue = type_error(e.path().to_string(), e.into_inner());
            // A top-level key given twice comes without a line: the lines that give it.
            if issue.path.is_empty() && !issue.message.contains(" line ") {
                if let Some(key) = issue.message.strip_prefix("duplicate entry with key \"") {
                    let key = key.split('"').next().unwrap_or_default();
                    let at: Vec<String> = (1..)
                        .zip(text.lines())
                        .filter(|(_, l)| l.strip_prefix(key).is_some_and(|r| r.trim_start().starts_with(':')))
                        .map(|(n, _)| n.to_string())
                        .collect();
                    if at.len() > 1 {
                        issue.message = format!("{} (lines {})", issue.message, at.join(" and "));
                    }
                }
            }
            issues.push(issue);
            return None;
        }
    };
    // YAML's merge key (`<<: *base`) is not applied by the reader: said once, where it is,
    // rather than as an unknown field and every setting it would have brought as missing.
    if let Some(path) = merge_key(&tree, String::new()) {
        issues.push(ConfigIssue {
            path,
            message: "YAML merge keys (`<<: *anchor`) are not supported: write the settings out \
                      (an alias, `*anchor`, standing for a whole value works)"
                .into(),
        });
        return None;
    }
    let mut raw = RawConfig::default();
    let mut unreadable = Unreadable::new();
    let keys = match tree {
        Value::Null => return Some((raw, unreadable)),
        Value::Mapping(keys) => keys,
        other => {
            let found = match other {
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::String(_) => "a string",
                Value::Sequence(_) => "a list",
                _ => "a tagged value",
            };
            issues.push(ConfigIssue {
                path: String::new(),
                message: format!("expected a mapping of settings (`key: value` lines), found {found}"),
            });
            return None;
        }
    };
    // Such a key cannot be followed by the passes below, nor named in a path.
    if keys.keys().any(|k| !matches!(k, Value::String(_) | Value::Number(_) | Value::Bool(_))) {
        issues.push(ConfigIssue {
            path: String::new(),
            message: "every top-level key must be a name like `listen`, not null, a list, a mapping or a tagged value".into(),
        });
        return None;
    }
    for (key, value) in &keys {
        let Some(name) = key.as_str().and_then(|k| SECTIONS.iter().copied().find(|s| *s == k)) else {
            // `tokens.max_ttl: 30d` at the top level: one key whose name has a dot, as YAML reads it.
            let message = match key.as_str().and_then(|k| k.split_once('.')) {
                Some((value, _)) if SINGLE_VALUES.contains(&value) => {
                    format!("unknown top-level key; `{value}` takes one value (`{value}: ...`), no settings under it")
                }
                Some((section, rest)) if SECTIONS.contains(&section) => format!(
                    "unknown top-level key; a setting of `{section}` is written nested: `{section}:` on \
                     one line, `  {rest}: ...` indented under it"
                ),
                _ => "unknown field".into(),
            };
            issues.push(ConfigIssue { path: key_text(key), message });
            continue;
        };
        let read = match name {
            "listen" => section(text, name, issues).map(|v| raw.listen = v),
            "threads" => section(text, name, issues).map(|v| raw.threads = v),
            "shutdown" => section(text, name, issues).map(|v| raw.shutdown = v),
            "store" => section(text, name, issues).map(|v| raw.store = v),
            "cache" => section(text, name, issues).map(|v| raw.cache = v),
            "credentials" => section(text, name, issues).map(|v| raw.credentials = v),
            "identity" => section(text, name, issues).map(|v| raw.identity = v),
            "roles" => section(text, name, issues).map(|v| raw.roles = v),
            "scopes" => section(text, name, issues).map(|v| raw.scopes = v),
            "argon2" => section(text, name, issues).map(|v| raw.argon2 = v),
            "orgs" => section(text, name, issues).map(|v| raw.orgs = v),
            "routes" => routes(text, value, issues).map(|v| raw.routes = v),
            "log" => section(text, name, issues).map(|v| raw.log = v),
            "admin" => section(text, name, issues).map(|v| raw.admin = v),
            "tokens" => section(text, name, issues).map(|v| raw.tokens = v),
            "audit" => section(text, name, issues).map(|v| raw.audit = v),
            // Present but empty (`jwt:` with its lines commented out) is a section without keys,
            // refused as such: ephemeral credentials would otherwise all fail at run time.
            "jwt" if value.is_null() => {
                raw.jwt = Some(RawJwt::default());
                Some(())
            }
            "jwt" => section(text, name, issues).map(|v| raw.jwt = v),
            "upstream_timeouts" => section(text, name, issues).map(|v| raw.upstream_timeouts = v),
            "keepalive_timeout" => section(text, name, issues).map(|v| raw.keepalive_timeout = v),
            "client_body_timeout" => section(text, name, issues).map(|v| raw.client_body_timeout = v),
            "client_send_timeout" => section(text, name, issues).map(|v| raw.client_send_timeout = v),
            "forwarded_for" => section(text, name, issues).map(|v| raw.forwarded_for = v),
            _ => Some(()),
        };
        if read.is_none() {
            unreadable.insert(name);
        }
    }
    Some((raw, unreadable))
}

/// The top-level settings that take one value rather than settings of their own.
const SINGLE_VALUES: [&str; 6] =
    ["listen", "threads", "keepalive_timeout", "client_body_timeout", "client_send_timeout", "forwarded_for"];

/// The top-level keys, as in [`RawConfig`].
const SECTIONS: [&str; 22] = [
    "listen",
    "threads",
    "shutdown",
    "store",
    "cache",
    "credentials",
    "identity",
    "roles",
    "scopes",
    "argon2",
    "orgs",
    "routes",
    "log",
    "admin",
    "tokens",
    "audit",
    "jwt",
    "upstream_timeouts",
    "keepalive_timeout",
    "client_body_timeout",
    "client_send_timeout",
    "forwarded_for",
];

/// A scalar key as written (near enough) for an error's path.
fn key_text(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

/// One top-level key's value; `None` when it cannot be read (the error is reported).
fn section<T: for<'de> Deserialize<'de> + Default>(
    text: &str,
    name: &'static str,
    issues: &mut Vec<ConfigIssue>,
) -> Option<T> {
    pass(text, name, PhantomData::<T>, issues)
}

/// The routes, each read on its own: a route that cannot be read is `None` (its error reported) and
/// the next pass starts after it. `None` when the list itself cannot be read.
fn routes(text: &str, value: &Value, issues: &mut Vec<ConfigIssue>) -> Option<Option<Vec<Option<RawRoute>>>> {
    if value.is_null() {
        return Some(None);
    }
    let count = value.as_sequence().map_or(0, Vec::len);
    let mut routes = Vec::new();
    loop {
        let start = routes.len();
        match pass(text, "routes", RoutesFrom { start, routes: &mut routes }, issues) {
            Some(()) => return Some(Some(routes)),
            // The pass read the routes before the one that failed.
            None if routes.len() < count => routes.push(None),
            None => return None,
        }
    }
}

/// One pass over the text that reads the top-level key `name` with `seed` and skips the others,
/// reporting the unknown keys inside `name` and the first type error there, with their paths.
fn pass<'de, S>(
    text: &'de str,
    name: &'static str,
    seed: S,
    issues: &mut Vec<ConfigIssue>,
) -> Option<S::Value>
where
    S: DeserializeSeed<'de>,
    S::Value: Default,
{
    let mut unknown = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let read = {
        // Every other key is skipped, which serde_ignored reports too; and so is every route before
        // the first one a later routes pass reads (`routes[0]`): only keys inside this one count.
        let mut ignored = |path: serde_ignored::Path<'_>| {
            // (A top-level key `admin.listen` is not inside `admin`: its first step is not `admin`.)
            let under_name = top_key(&path) == Some(name);
            let path = yaml_path(&path);
            let inside = under_name
                && path.strip_prefix(name).is_some_and(|rest| {
                    rest.starts_with('.') || (rest.starts_with('[') && rest.contains('.'))
                });
            if inside {
                unknown.push(path);
            }
        };
        let de = serde_ignored::Deserializer::new(serde_yaml::Deserializer::from_str(text), &mut ignored);
        Only { name, seed }.deserialize(serde_path_to_error::Deserializer::new(de, &mut track))
    };
    issues.extend(unknown.into_iter().map(|path| ConfigIssue { path, message: "unknown field".into() }));
    match read {
        Ok(value) => Some(value),
        Err(e) => {
            issues.push(type_error(track.path().to_string(), e));
            None
        }
    }
}

/// A type error at `path` (`.` for the whole file).
fn type_error(path: String, error: serde_yaml::Error) -> ConfigIssue {
    // serde_path_to_error writes `?` for a step it could not name (a YAML syntax error inside a
    // value): the path ends at the last step named, and the message gives the line.
    let path = path.split('.').filter(|step| *step != "?").collect::<Vec<_>>().join(".");
    let path = if path == "." { String::new() } else { path };
    let message = error.to_string();
    // serde_yaml names the path in its message too: say it once.
    let message = message.strip_prefix(&format!("{path}: ")).map(str::to_string).unwrap_or(message);
    // A value under `store`, or an upstream address, may be a URL with a password, and one given
    // for `secret_file` or `secret_env` may be the secret itself: the message never repeats it,
    // quoted as a string ("…") or as a number too large to read (`…`, a hex one in decimal).
    let secretive = path == "store"
        || path.starts_with("store.")
        || path.split('.').any(|step| {
            matches!(step.split('[').next(), Some("upstream" | "upstreams" | "secret_file" | "secret_env"))
        });
    // A repeated key's name is no value.
    let secretive = secretive && !message.starts_with("duplicate entry with key");
    // A string is quoted to its last `"` (it may hold escaped ones); a number is the first span
    // in backticks (a later one would be what was expected).
    let quoted = match (message.find('"'), message.rfind('"'), message.find('`')) {
        (Some(open), Some(close), _) if close > open => Some((open, close)),
        (_, _, Some(open)) => message[open + 1..].find('`').map(|len| (open, open + 1 + len)),
        _ => None,
    };
    let message = match (secretive, quoted) {
        (true, Some((open, close))) => {
            format!("{}(value not shown){}", &message[..open], &message[close + 1..])
        }
        _ => message,
    };
    ConfigIssue { path, message }
}

/// The path of the first merge key (`<<`) in `value`, under `at`.
fn merge_key(value: &Value, at: String) -> Option<String> {
    let join = |key: &str| if at.is_empty() { key.to_string() } else { format!("{at}.{key}") };
    match value {
        Value::Mapping(map) => map.iter().find_map(|(k, v)| match k.as_str() {
            Some("<<") => Some(join("<<")),
            Some(key) => merge_key(v, join(key)),
            None => merge_key(v, at.clone()),
        }),
        Value::Sequence(items) => {
            items.iter().enumerate().find_map(|(i, v)| merge_key(v, format!("{at}[{i}]")))
        }
        Value::Tagged(tagged) => merge_key(&tagged.value, at),
        _ => None,
    }
}

/// The top-level key a path starts with.
fn top_key<'a>(path: &'a serde_ignored::Path<'a>) -> Option<&'a str> {
    match path {
        serde_ignored::Path::Root => None,
        serde_ignored::Path::Map { parent, key } => match **parent {
            serde_ignored::Path::Root => Some(key.as_str()),
            _ => top_key(parent),
        },
        serde_ignored::Path::Seq { parent, .. }
        | serde_ignored::Path::Some { parent }
        | serde_ignored::Path::NewtypeStruct { parent }
        | serde_ignored::Path::NewtypeVariant { parent } => top_key(parent),
    }
}

fn yaml_path(path: &serde_ignored::Path<'_>) -> String {
    match path {
        serde_ignored::Path::Root => String::new(),
        serde_ignored::Path::Seq { parent, index } => format!("{}[{index}]", yaml_path(parent)),
        serde_ignored::Path::Map { parent, key } => match yaml_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        serde_ignored::Path::Some { parent }
        | serde_ignored::Path::NewtypeStruct { parent }
        | serde_ignored::Path::NewtypeVariant { parent } => yaml_path(parent),
    }
}

/// The file's mapping with only the key `name` read (by `seed`), every other value skipped.
struct Only<S> {
    name: &'static str,
    seed: S,
}

impl<'de, S> DeserializeSeed<'de> for Only<S>
where
    S: DeserializeSeed<'de>,
    S::Value: Default,
{
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<S::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de, S> Visitor<'de> for Only<S>
where
    S: DeserializeSeed<'de>,
    S::Value: Default,
{
    type Value = S::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping of settings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<S::Value, A::Error> {
        let mut seed = Some(self.seed);
        let mut value = None;
        // Keys as YAML values, as the first reading saw them: any key, even a list, is skipped.
        while let Some(key) = map.next_key::<Value>()? {
            if key.as_str() == Some(self.name) {
                if let Some(seed) = seed.take() {
                    value = Some(map.next_value_seed(seed)?);
                    continue;
                }
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(value.unwrap_or_default())
    }
}

/// The routes list, read from route `start` on (the ones before are skipped), each read route
/// pushed at once so that those before a failing one are kept.
struct RoutesFrom<'a> {
    start: usize,
    routes: &'a mut Vec<Option<RawRoute>>,
}

impl<'de> DeserializeSeed<'de> for RoutesFrom<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for RoutesFrom<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of routes")
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        for _ in 0..self.start {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        while let Some(route) = seq.next_element::<RawRoute>()? {
            self.routes.push(Some(route));
        }
        Ok(())
    }
}
