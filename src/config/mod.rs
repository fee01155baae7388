//! Configuration: the YAML file is read into raw serde structs, then validated into one [`Config`]
//! with real types (addresses resolved, durations parsed, permissions interned, routes built).
//!
//! Validation never stops at the first problem: every error is collected with its YAML path
//! (`routes[1].upstream: ...`), including every unknown key, so one `check-config` run shows all.

mod raw;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;

use crate::cache::CacheSettings;
use crate::jwt::{self, JwtKey, JwtSettings, KeyMaterial};
use crate::policy::{Policy, Role, MAX_PERMISSIONS};
use crate::route::{
    normalize_host, route_path, RequiredPermission, Route, RouteSpec, RouteTable, UpstreamTimeouts,
};
use crate::token::Argon2Params;
use raw::*;

/// The longest duration the config takes.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// YAML path, e.g. `routes[0].upstream`; empty for the whole file.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The problems, in file order where known.
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match issue.path.as_str() {
                "" => write!(f, "{}", issue.message)?,
                path => write!(f, "{path}: {}", issue.message)?,
            }
        }
        Ok(())
    }
}

impl ConfigError {
    fn single(path: &str, message: impl Into<String>) -> ConfigError {
        ConfigError { issues: vec![ConfigIssue { path: path.into(), message: message.into() }] }
    }
}

/// Where tokens are kept.
#[derive(Clone, PartialEq)]
pub struct StoreSettings {
    /// Redis, if configured; otherwise the embedded store.
    pub redis: Option<RedisSettings>,
    /// The embedded store's file, used when no Redis is configured.
    pub embedded_path: std::path::PathBuf,
    /// Bound on every store call.
    pub timeout: Duration,
}

/// The most replicas `store.redis.wait_replicas` may ask for.
const MAX_WAIT_REPLICAS: u32 = 16;

/// Where the embedded store keeps its file when neither Redis nor a path is configured.
pub const DEFAULT_EMBEDDED_PATH: &str = "tollgate-data/tollgate.redb";

/// Redis connection settings. The URL may hold a password, so `Debug` redacts it.
#[derive(Clone, PartialEq)]
pub struct RedisSettings {
    /// `redis://[:password@]host:port[/db]`.
    pub url: String,
    /// Prefix of every key and of the invalidation channel.
    pub key_prefix: String,
    /// How many replicas must have a change before it is acknowledged (Redis `WAIT`); 0 waits
    /// for none.
    pub wait_replicas: u32,
}

impl fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redis = self.redis.as_ref().map(|r| (redact_url(&r.url), r.key_prefix.clone(), r.wait_replicas));
        f.debug_struct("StoreSettings")
            .field("redis", &redis)
            .field("embedded_path", &self.embedded_path)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// `redis://user:pass@host` -> `redis://***@host`.
pub fn redact_url(url: &str) -> String {
    // After the scheme if there is one (`user:password@host:port` is hidden without one too).
    let start = url.find("://").map_or(0, |i| i + 3);
    match url.rfind('@') {
        Some(at) if at >= start => format!("{}***{}", &url[..start], &url[at..]),
        _ => url.to_string(),
    }
}

/// Where the gateway looks for a token.
#[derive(Debug, Clone)]
pub struct CredentialSettings {
    /// `Authorization: Bearer <token>`.
    pub bearer: bool,
    /// Query parameter name (used only on routes with `query_token: true`).
    pub query_param: String,
    /// An API-key header, if any.
    pub api_key_header: Option<HeaderName>,
}

/// One identity header the gateway can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentityField {
    /// `user:<id>` / `service:<name>`.
    Subject,
    /// The token id.
    TokenId,
    /// `pat` / `service`.
    TokenKind,
    /// The route's org.
    Org,
    /// The route's project.
    Project,
    /// The route's environment.
    Environment,
    /// The role in effect.
    Role,
    /// Effective permissions.
    Permissions,
    /// The user's email.
    Email,
    /// All attributes as JSON.
    Attributes,
    /// One header per scalar attribute.
    Attr,
}

impl IdentityField {
    /// Every field, in header order.
    pub const ALL: [IdentityField; 11] = [
        IdentityField::Subject,
        IdentityField::TokenId,
        IdentityField::TokenKind,
        IdentityField::Org,
        IdentityField::Project,
        IdentityField::Environment,
        IdentityField::Role,
        IdentityField::Permissions,
        IdentityField::Email,
        IdentityField::Attributes,
        IdentityField::Attr,
    ];

    /// The name after the prefix (`subject` -> `x-auth-subject`).
    pub fn suffix(self) -> &'static str {
        match self {
            IdentityField::Subject => "subject",
            IdentityField::TokenId => "token-id",
            IdentityField::TokenKind => "token-kind",
            IdentityField::Org => "org",
            IdentityField::Project => "project",
            IdentityField::Environment => "environment",
            IdentityField::Role => "role",
            IdentityField::Permissions => "permissions",
            IdentityField::Email => "email",
            IdentityField::Attributes => "attributes",
            IdentityField::Attr => "attr",
        }
    }
}

/// The identity namespace and which headers go in it.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    /// Lowercase prefix of every identity header; client headers with it are removed.
    pub prefix: String,
    /// Enabled fields with their full header names, parsed once (`attr` holds the prefix of
    /// per-attribute names).
    pub headers: Vec<(IdentityField, HeaderName)>,
    /// Request id header, set on the upstream request and the response.
    pub request_id_header: HeaderName,
    /// The identity JWT header of routes with `identity_jwt` (`<prefix>jwt`).
    pub jwt_header: HeaderName,
}

impl IdentitySettings {
    /// The full header name of a field, if enabled.
    pub fn header(&self, field: IdentityField) -> Option<&str> {
        self.headers.iter().find(|(f, _)| *f == field).map(|(_, h)| h.as_str())
    }
}

/// Argon2 parameters and how many checks may run at once.
#[derive(Debug, Clone, Copy)]
pub struct Argon2Settings {
    /// Cost parameters for new hashes.
    pub params: Argon2Params,
    /// Concurrent verifications, off the request threads.
    pub max_concurrency: usize,
    /// Longest a request waits for its token's turn and a free argon2 thread, and then again for
    /// the run, before it is answered `503`: under a flood of never-seen secrets, or on a
    /// saturated machine, a request is refused, never left hanging.
    pub max_wait: Duration,
}

/// Graceful shutdown bounds.
#[derive(Debug, Clone, Copy)]
pub struct ShutdownSettings {
    /// Time new connections are still accepted after SIGTERM.
    pub grace: Duration,
    /// Time in-flight requests get to finish after that.
    pub timeout: Duration,
}

/// A project's environments.
#[derive(Debug, Clone, Default)]
pub struct OrgSettings {
    /// Project name to its environments.
    pub projects: BTreeMap<String, Vec<String>>,
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    /// Proxy listen address.
    pub listen: SocketAddr,
    /// Proxy worker threads.
    pub threads: usize,
    /// Shutdown bounds.
    pub shutdown: ShutdownSettings,
    /// Store settings.
    pub store: StoreSettings,
    /// Cache settings.
    pub cache: CacheSettings,
    /// Credential sources.
    pub credentials: CredentialSettings,
    /// Identity headers.
    pub identity: IdentitySettings,
    /// Roles, permissions and scope presets.
    pub policy: Policy,
    /// Argon2 settings.
    pub argon2: Argon2Settings,
    /// Orgs with their projects and environments.
    pub orgs: BTreeMap<String, OrgSettings>,
    /// The routes.
    pub routes: RouteTable,
    /// Default log level (overridden by `RUST_LOG`).
    pub log_level: String,
    /// Whether to write one access line per request (at info level).
    pub access_log: bool,
    /// Admin API listener.
    pub admin: AdminSettings,
    /// Limits on new tokens.
    pub tokens: TokenLimits,
    /// Audit entries kept per org.
    pub audit_max: usize,
    /// JWT keys and lifetimes, if ephemeral credentials or identity JWTs are used.
    pub jwt: Option<JwtSettings>,
    /// How long a client's connection may sit idle between requests, in whole seconds; `None`:
    /// one request per connection (`keepalive_timeout: 0s`).
    pub keepalive: Option<u64>,
    /// How long the gateway waits for each piece of a request's body (`client_body_timeout`).
    pub client_body_timeout: Duration,
    /// How long the gateway waits for the client to take each piece of its answer
    /// (`client_send_timeout`).
    pub client_send_timeout: Duration,
    /// What the upstream's `X-Forwarded-For` says (`forwarded_for`).
    pub forwarded_for: ForwardedFor,
}

/// What the gateway does with `X-Forwarded-For` (`forwarded_for` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardedFor {
    /// The client's list, then the client's address (nginx's `$proxy_add_x_forwarded_for`):
    /// behind a load balancer that adds its own.
    Append,
    /// The client's address alone: where the gateway faces clients directly, and what they send
    /// is not to be believed.
    Replace,
    /// As sent (Pingora's default): only where the upstream never reads it.
    Keep,
}

impl ForwardedFor {
    /// Whether the gateway writes `X-Forwarded-For` itself (`append`, `replace`).
    pub fn rewrites(self) -> bool {
        self != ForwardedFor::Keep
    }
}

/// Request headers that HTTP, or an upstream, relies on: the identity prefix may cover none.
const HEADERS_NOT_IN_PREFIX: [&str; 30] = [
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "authorization",
    "proxy-authorization",
    "cookie",
    "accept",
    "accept-encoding",
    "user-agent",
    "origin",
    "referer",
    "range",
    "cache-control",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "sec-websocket-key",
    "sec-websocket-version",
    "traceparent",
];

/// Response headers that HTTP, or a client, relies on: the request id, set on every response, may
/// be none of them (nor of [`HEADERS_NOT_IN_PREFIX`], which it would replace upstream).
const RESPONSE_HEADERS_RELIED_ON: [&str; 19] = [
    "set-cookie",
    "location",
    "www-authenticate",
    "proxy-authenticate",
    "retry-after",
    "vary",
    "etag",
    "last-modified",
    "expires",
    "date",
    "server",
    "age",
    "content-location",
    "content-range",
    "content-disposition",
    "accept-ranges",
    "strict-transport-security",
    "access-control-allow-origin",
    "x-real-ip",
];

/// The header HTTP or its users rely on that `name` is, in any spelling an upstream reads as it
/// (`Content_Length`), if any: of `names`.
fn relied_on<'a>(name: &HeaderName, names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    names.into_iter().find(|h| crate::proxy::headers::spelled_alike(name.as_str().as_bytes(), h.as_bytes()))
}

/// A route's `host` (normalized) as requests can name it, or why none can: a DNS name (letters,
/// digits, `-` and `_` in dot-separated labels), an IPv4 address or a bracketed IPv6 one. A
/// wildcard, a path, a space or a name in Unicode would leave the route unreachable, its requests
/// going to a route for any host.
fn route_host(host: String) -> Result<String, &'static str> {
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let ipv6 = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok());
    match () {
        _ if host.is_empty() => Err("empty; leave `host` out to match any host"),
        _ if host.contains('*') => Err("wildcards are not supported; give each host its own route, or leave `host` out to match any host"),
        _ if host.contains('/') => Err("a host name without a scheme or path (api.example.com)"),
        _ if !host.is_ascii() => Err("write a name in Unicode in its ASCII form, as requests carry it (xn--...)"),
        _ if ipv6 || (host.len() <= 253 && host.split('.').all(label)) => Ok(host),
        _ => Err("not a host name (letters, digits, '-' and '_' in labels separated by '.'), an IPv4 address or a bracketed IPv6 one"),
    }
}

/// Why no request path can start with `prefix`, if so: a request's path has no query or fragment,
/// no space, control byte, `<`, `>` or `` ` `` (refused by the parser), and a `%` only to start an
/// escape; browsers send `"`, `{`, `}` and non-ASCII percent-encoded. A prefix matches literally:
/// a segment of `*` alone (`/api/*`, `/api/**/x`) is taken for the wildcard it is not.
fn path_chars(prefix: &str) -> Result<(), &'static str> {
    let bytes = prefix.as_bytes();
    if prefix.split('/').any(|segment| !segment.is_empty() && segment.bytes().all(|b| b == b'*')) {
        return Err("a prefix covers every path under it and matches literally: no `*` segment (it would match only itself)");
    }
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'?' | b'#' => return Err("a path prefix without a query or fragment ('?', '#')"),
            b'%' if !bytes.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) => {
                return Err("'%' must start a percent-escape of two hex digits (%25 for '%' itself)")
            }
            // Requests match escapes in either case, so two routes must not differ by it alone.
            b'%' if bytes[i + 1..i + 3].iter().any(u8::is_ascii_lowercase) => {
                return Err("write a percent-escape's hex digits in upper case (%C3%A9), as RFC 3986 has them")
            }
            0x80.. => {
                return Err("write it percent-encoded, as browsers and most clients send it (/caf%C3%A9 for /café)")
            }
            ..=0x20 | 0x7f | b'<' | b'>' | b'`' => {
                return Err("no request path holds a space, a control character, '<', '>' or '`': percent-encode it")
            }
            b'"' | b'{' | b'}' => {
                return Err("browsers send '\"', '{' and '}' percent-encoded, so no one form would be routed from every client; leave them out of the prefix")
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether a listener on `a` and one on `b` would take the same socket: the same port on the same
/// address, or on any address of its family where one of them listens on all (`0.0.0.0`, `[::]`).
pub fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    // `[::]` takes both families (Linux's default, `bindv6only` 0), `0.0.0.0` IPv4 only; an
    // IPv4-mapped address is its IPv4 one.
    let covers = |any: IpAddr, other: IpAddr| match any {
        IpAddr::V6(ip) => ip.is_unspecified(),
        IpAddr::V4(ip) => ip.is_unspecified() && other.is_ipv4(),
    };
    let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
    a.port() == b.port() && (x == y || covers(x, y) || covers(y, x))
}

/// Whether an upstream at `upstream` is the gateway's listener on `own`: the same address, or a
/// loopback or unspecified one where the listener takes all of its family. (Another host's
/// address on the same port is not: a gateway on `0.0.0.0:8080` may front `api:8080`.)
fn is_own(own: SocketAddr, upstream: SocketAddr) -> bool {
    let here = upstream.ip().to_canonical();
    let local = here.is_loopback() || here.is_unspecified();
    same_socket(own, upstream) && (own.ip().to_canonical() == here || local)
}

/// Most threads for the proxy (`threads`) or for argon2 (`argon2.max_concurrency`).
pub const MAX_THREADS: usize = 1024;

/// Most memory one argon2 hash may take: 1 GiB (the default is 19 MiB, OWASP's minimum).
pub const MAX_ARGON2_MEMORY_KIB: u32 = 1024 * 1024;

/// Most audit entries kept per org (each is a few hundred bytes of the store's memory).
pub const MAX_AUDIT_ENTRIES: usize = 10_000_000;

/// How long a client's connection is kept open for its next request: nginx's `keepalive_timeout`
/// is 75 s, Pingora's own apps use 60 s.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(60);

/// The admin API listener.
#[derive(Debug, Clone, Copy)]
pub struct AdminSettings {
    /// Address of the admin API (and its health endpoints).
    pub listen: SocketAddr,
    /// How often last-use records are written to the store, in one batch.
    pub last_use_flush: Duration,
    /// How long a client may take to send a request's head, or its body, and may leave its
    /// connection idle between requests.
    pub read_timeout: Duration,
}

/// Limits on the tokens users may issue.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenLimits {
    /// Longest lifetime a new token may have.
    pub max_ttl: Option<Duration>,
    /// Whether every new token needs an expiry.
    pub require_expiry: bool,
    /// Most working (not revoked, not expired) tokens one user or service may hold when another
    /// is issued: records are kept after they end, and any user may issue their own, so without
    /// a bound one owner could grow the store, and the change that removes them, without end.
    pub max_per_owner: usize,
}

/// [`TokenLimits::max_per_owner`]'s default.
pub const DEFAULT_MAX_TOKENS_PER_OWNER: usize = 1000;

impl Config {
    /// Reads and validates a reload of `running`: as [`Config::parse`], with the running gateway's
    /// listeners also refused as upstreams. `listen` and `admin.listen` change only on a restart,
    /// so until then the new file's own addresses are not the ones serving.
    pub fn parse_reload(text: &str, running: &Config) -> Result<Config, ConfigError> {
        Config::parse_with(text, &[running.listen, running.admin.listen])
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::single("", format!("cannot read {}: {e}", path.display())))?;
        Config::parse(&text)
    }

    /// Validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_with(text, &[])
    }

    /// [`Config::parse`], `also_own` being listeners of this gateway besides the file's.
    fn parse_with(text: &str, also_own: &[SocketAddr]) -> Result<Config, ConfigError> {
        let text = without_bom(text);
        let mut issues = Vec::new();
        let Some((raw, unreadable)) = raw::read(text, &mut issues) else {
            return Err(ConfigError { issues });
        };
        let mut v = Validator { issues, unreadable, also_own: also_own.to_vec() };
        let config = v.config(raw);
        match config {
            Some(c) if v.issues.is_empty() => Ok(c),
            _ => Err(ConfigError { issues: v.issues }),
        }
    }
}

/// Why a reload does not take config text that is valid at start (where it means no routes), if
/// it does not: a file that sets nothing (empty, only comments, or a document that is null or an
/// empty mapping: `---`, `null`, `{}`), or that names `routes` and gives it nothing (`routes:`
/// ending the file): a file being written, or a mistake, never a wish to refuse every request.
pub fn reload_refusal(text: &str) -> Option<&'static str> {
    match serde_yaml::from_str::<serde_yaml::Value>(without_bom(text)) {
        Ok(serde_yaml::Value::Null) => Some(SETS_NOTHING),
        Ok(serde_yaml::Value::Mapping(m)) if m.is_empty() => Some(SETS_NOTHING),
        Ok(serde_yaml::Value::Mapping(m)) if m.get("routes").is_some_and(serde_yaml::Value::is_null) => {
            Some("`routes:` holds nothing (a file being written? `routes: []` serves none)")
        }
        _ => None,
    }
}

const SETS_NOTHING: &str = "the file sets nothing (empty, only comments, `{}` or `null`)";

/// Config text without the byte order mark some editors write before it (Windows' own, and
/// PowerShell 5's `-Encoding utf8`; YAML allows one): serde_yaml would read it as a first document.
fn without_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// The methods a route's `permissions` knows by name: IANA's HTTP method registry (the standard
/// methods, WebDAV, CalDAV, versioning, QUERY), the cache purges of Varnish and nginx, IIS's TRACK
/// and Exchange's WebDAV batch methods. Another method token is taken as an extension method
/// unless it is one edit from a method every API uses (`DELET`, `PUTT`, `POSTT`): a misspelt
/// DELETE must not silently be a method of its own while DELETE keeps its default.
const METHODS: [&str; 49] = [
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "PATCH",
    "OPTIONS",
    "TRACE",
    "CONNECT",
    "QUERY",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "ACL",
    "SEARCH",
    "REPORT",
    "MKCALENDAR",
    "BIND",
    "REBIND",
    "UNBIND",
    "LINK",
    "UNLINK",
    "MKREDIRECTREF",
    "UPDATEREDIRECTREF",
    "ORDERPATCH",
    "VERSION-CONTROL",
    "CHECKIN",
    "CHECKOUT",
    "UNCHECKOUT",
    "MKWORKSPACE",
    "UPDATE",
    "LABEL",
    "MERGE",
    "BASELINE-CONTROL",
    "MKACTIVITY",
    "PRI",
    "PURGE",
    "BAN",
    "TRACK",
    "BCOPY",
    "BMOVE",
    "BDELETE",
    "BPROPFIND",
    "BPROPPATCH",
    "BATCH",
];

/// The methods a misspelling is checked against.
const COMMON_METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];

/// A `permissions` key as the method it names (upper case), or why it names none.
fn permission_method(key: &str) -> Result<(String, http::Method), String> {
    let upper = key.to_ascii_uppercase();
    let method =
        http::Method::from_bytes(upper.as_bytes()).map_err(|_| format!("{key:?} is not an HTTP method"))?;
    if !METHODS.contains(&upper.as_str()) {
        let near = COMMON_METHODS.iter().find(|m| strsim::damerau_levenshtein(m, &upper) <= 1);
        if let Some(near) = near {
            return Err(format!(
                "{key:?} is not a known HTTP method; did you mean {near}? (an extension method not this \
                 close to a known one is taken as written)"
            ));
        }
    }
    Ok((upper, method))
}

struct Validator {
    issues: Vec<ConfigIssue>,
    /// Top-level keys that could not be read: their errors are reported already.
    unreadable: Unreadable,
    /// The running gateway's listeners, on a reload: no upstream either.
    also_own: Vec<SocketAddr>,
}

/// An org, project, environment or service name: 1 to 64 letters, digits, `-`, `_` and `.`, not
/// starting with `.` (it travels as a URL path segment, where `.` and `..` are dropped by clients).
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl Validator {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(ConfigIssue { path: path.into(), message: message.into() });
    }

    /// Whether a top-level key was given but could not be read: what refers to it is not checked
    /// against the defaults that stand in for it.
    fn unreadable(&self, key: &str) -> bool {
        self.unreadable.contains(key)
    }

    /// Every duration is at most 100 years: expiries are added up in milliseconds, and a larger
    /// one would overflow that arithmetic.
    fn duration(&mut self, path: &str, value: Option<String>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(s) => match humantime::parse_duration(&s) {
                Ok(d) if d > MAX_DURATION => {
                    self.error(path, "must be at most 100 years");
                    default
                }
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    self.error(path, "must be greater than zero");
                    default
                }
                Err(e) => {
                    self.error(path, format!("not a duration ({e}); write e.g. \"500ms\", \"30s\", \"5m\""));
                    default
                }
            },
        }
    }

    /// `upstream_timeouts` at `path`: each one given replaces the one in `base`.
    fn timeouts(&mut self, path: &str, raw: Option<RawTimeouts>, base: UpstreamTimeouts) -> UpstreamTimeouts {
        let Some(raw) = raw else { return base };
        UpstreamTimeouts {
            connect: self.duration(&format!("{path}.connect"), raw.connect, base.connect),
            read: self.duration(&format!("{path}.read"), raw.read, base.read),
            write: self.duration(&format!("{path}.write"), raw.write, base.write),
        }
    }

    /// A listen address, or `default` when not given.
    fn address(&mut self, path: &str, value: Option<String>, default: &str) -> Option<SocketAddr> {
        let text = value.unwrap_or_else(|| default.to_string());
        match text.parse::<SocketAddr>() {
            // The kernel would pick one, and nothing would say which: no client could find it.
            Ok(a) if a.port() == 0 => {
                self.error(path, format!("{text:?} has port 0; give a fixed port, like {default}"));
                None
            }
            Ok(a) => Some(a),
            Err(_) => {
                self.error(path, format!("{text:?} is not an address like {default}"));
                None
            }
        }
    }

    fn header_name(&mut self, path: &str, value: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(value.to_ascii_lowercase().as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.error(path, format!("{value:?} is not a valid header name"));
                None
            }
        }
    }

    fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let listen = match self.unreadable("listen") {
            true => None,
            false => self.address("listen", raw.listen, "127.0.0.1:8080"),
        };
        let threads = raw.threads.unwrap_or(2);
        if threads == 0 {
            self.error("threads", "must be at least 1");
        } else if threads > MAX_THREADS {
            self.error("threads", format!("must be at most {MAX_THREADS}"));
        }
        let shutdown = raw.shutdown.unwrap_or_default();
        let shutdown = ShutdownSettings {
            // Zero stops accepting at once.
            grace: self.duration_or_zero("shutdown.grace", shutdown.grace, Duration::from_secs(1)),
            timeout: self.duration("shutdown.timeout", shutdown.timeout, Duration::from_secs(10)),
        };
        let store = self.store(raw.store.unwrap_or_default());
        let cache = raw.cache.unwrap_or_default();
        let capacity = cache.capacity.unwrap_or(100_000);
        if capacity == 0 {
            self.error("cache.capacity", "must be at least 1");
        }
        let cache =
            CacheSettings { capacity, ttl: self.duration("cache.ttl", cache.ttl, Duration::from_secs(300)) };
        // A header named at all, valid or not (an invalid one is told apart).
        let api_key_named = raw.credentials.as_ref().is_some_and(|c| c.api_key_header.is_some());
        let credentials = self.credentials(raw.credentials.unwrap_or_default());
        let identity = self.identity(raw.identity.unwrap_or_default());
        if let (Some(key), Some(identity)) = (&credentials.api_key_header, &identity) {
            if relied_on(key, [identity.request_id_header.as_str()]).is_some() {
                self.error(
                    "credentials.api_key_header",
                    format!("must differ from identity.request_id_header ({}): a request id that a client or a proxy in front sends would be taken for a credential", identity.request_id_header),
                );
            }
        }
        let policy = self.policy(raw.roles.unwrap_or_default(), raw.scopes.unwrap_or_default());
        let argon2 = self.argon2(raw.argon2.unwrap_or_default());
        let orgs = self.orgs(raw.orgs.unwrap_or_default());
        // A route's `identity_jwt` needs the section, not its validity: a broken section has its
        // own errors.
        let jwt_present = raw.jwt.is_some() || self.unreadable("jwt");
        let jwt = raw.jwt.and_then(|j| self.jwt(j));
        let identity_jwt_routes: Vec<usize> = raw
            .routes
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, r)| r.as_ref().is_some_and(|r| r.identity_jwt == Some(true)))
            .map(|(i, _)| i)
            .collect();
        let timeouts = self.timeouts("upstream_timeouts", raw.upstream_timeouts, UpstreamTimeouts::default());
        let keepalive = self.duration_or_zero("keepalive_timeout", raw.keepalive_timeout, DEFAULT_KEEPALIVE);
        // nginx's `client_body_timeout`, and Pingora's own bound on each read.
        let client_body_timeout =
            self.duration("client_body_timeout", raw.client_body_timeout, Duration::from_secs(60));
        // nginx's `send_timeout`; Pingora alone waits for ever.
        let client_send_timeout =
            self.duration("client_send_timeout", raw.client_send_timeout, Duration::from_secs(60));
        let forwarded_for = match raw.forwarded_for.as_deref() {
            None | Some("append") => ForwardedFor::Append,
            Some("replace") => ForwardedFor::Replace,
            Some("keep") => ForwardedFor::Keep,
            Some(other) => {
                self.error("forwarded_for", format!("{other:?} is not one of append, replace, keep"));
                ForwardedFor::Append
            }
        };
        // Pingora counts it in seconds; a part of one is one.
        let keepalive =
            (!keepalive.is_zero()).then(|| keepalive.as_secs() + u64::from(keepalive.subsec_nanos() > 0));
        let admin = raw.admin.unwrap_or_default();
        let admin_listen = match self.unreadable("admin") {
            true => None,
            false => self.address("admin.listen", admin.listen, "127.0.0.1:8081"),
        };
        if let (Some(admin), Some(proxy)) = (admin_listen, listen) {
            if same_socket(admin, proxy) {
                self.error("admin.listen", format!("{admin} takes the port of `listen` ({proxy})"));
            }
        }
        let own: Vec<SocketAddr> =
            [listen, admin_listen].into_iter().flatten().chain(self.also_own.iter().copied()).collect();
        // Where no header carries a token, only a route's query can.
        let headers_carry = credentials.bearer || api_key_named;
        let routes = self.routes(
            raw.routes.unwrap_or_default(),
            &orgs,
            &policy,
            (jwt_present, jwt.as_ref().map(|j| j.audience.as_str()), headers_carry),
            timeouts,
            &own,
        );
        // An upstream verifies an HMAC-signed identity JWT with the secret itself, and that secret
        // also signs credentials: an upstream could then mint a credential of any service.
        if let Some(hmac) = jwt.as_ref().map(|j| j.signing_key()).filter(|k| jwt::is_hmac(k.algorithm)) {
            for i in identity_jwt_routes {
                self.error(
                    format!("routes[{i}].identity_jwt"),
                    format!(
                        "the signing key {:?} is an HMAC key: an upstream verifying the identity JWT \
                         with its secret could sign credentials too; sign with an asymmetric key \
                         (EdDSA, ES256, RS256)",
                        hmac.kid
                    ),
                );
            }
        }
        let log = raw.log.unwrap_or_default();
        let access_log = log.access.unwrap_or(true);
        let log_level = log.level.unwrap_or_else(|| "info".into());
        if !["trace", "debug", "info", "warn", "error"].contains(&log_level.as_str()) {
            self.error("log.level", format!("{log_level:?} is not one of trace, debug, info, warn, error"));
        }
        let last_use_flush =
            self.duration("admin.last_use_flush", admin.last_use_flush, Duration::from_secs(5));
        let read_timeout = self.duration("admin.read_timeout", admin.read_timeout, Duration::from_secs(10));
        let tokens = raw.tokens.unwrap_or_default();
        let tokens = TokenLimits {
            max_ttl: tokens.max_ttl.map(|t| self.duration("tokens.max_ttl", Some(t), Duration::from_secs(1))),
            require_expiry: tokens.require_expiry.unwrap_or(false),
            max_per_owner: tokens.max_per_owner.unwrap_or(DEFAULT_MAX_TOKENS_PER_OWNER),
        };
        if !(1..=100_000).contains(&tokens.max_per_owner) {
            self.error("tokens.max_per_owner", "must be between 1 and 100000");
        }
        let audit_max = raw.audit.and_then(|a| a.max_entries).unwrap_or(crate::store::DEFAULT_AUDIT_MAX);
        if audit_max == 0 {
            self.error("audit.max_entries", "must be at least 1");
        } else if audit_max > MAX_AUDIT_ENTRIES {
            // Redis reads the bound as a Lua number: past 2^53 it is no integer, and LTRIM fails.
            self.error("audit.max_entries", format!("must be at most {MAX_AUDIT_ENTRIES}"));
        }
        Some(Config {
            admin: AdminSettings { listen: admin_listen?, last_use_flush, read_timeout },
            tokens,
            audit_max,
            listen: listen?,
            threads,
            shutdown,
            store,
            cache,
            credentials,
            identity: identity?,
            policy,
            argon2,
            orgs,
            routes,
            log_level,
            access_log,
            jwt,
            keepalive,
            client_body_timeout,
            client_send_timeout,
            forwarded_for,
        })
    }

    /// JWT times count whole seconds: `500ms` would become a lifetime of 0.
    fn whole_seconds(&mut self, path: &str, d: Duration) {
        if d.subsec_nanos() != 0 {
            self.error(path, "must be whole seconds (a JWT counts time in seconds)");
        }
    }

    /// A duration that may be zero (a leeway).
    fn duration_or_zero(&mut self, path: &str, value: Option<String>, default: Duration) -> Duration {
        match value.as_deref().map(humantime::parse_duration) {
            None => default,
            Some(Ok(d)) if d > MAX_DURATION => {
                self.error(path, "must be at most 100 years");
                default
            }
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                self.error(path, format!("not a duration ({e}); write e.g. \"5s\""));
                default
            }
        }
    }

    fn jwt(&mut self, raw: RawJwt) -> Option<JwtSettings> {
        let issuer = raw.issuer.unwrap_or_else(|| "tollgate".into());
        let audience = raw.audience.unwrap_or_else(|| "tollgate".into());
        let upstream_audience = raw.upstream_audience.unwrap_or_else(|| "tollgate-upstream".into());
        if audience == upstream_audience {
            self.error(
                "jwt.upstream_audience",
                "must differ from jwt.audience, so an identity JWT is never accepted as a credential",
            );
        }
        let leeway = self.duration_or_zero("jwt.leeway", raw.leeway, Duration::from_secs(5));
        if leeway > Duration::from_secs(300) {
            self.error("jwt.leeway", "at most 5m");
        }
        self.whole_seconds("jwt.leeway", leeway);
        let max_ttl = self.duration("jwt.max_ttl", raw.max_ttl, Duration::from_secs(3600));
        // Not given, the default lifetime is 15 minutes or `max_ttl` if shorter: a short `max_ttl`
        // alone must not be refused over a key the user never wrote.
        let given_default = raw.default_ttl.is_some();
        let default_ttl =
            self.duration("jwt.default_ttl", raw.default_ttl, Duration::from_secs(15 * 60).min(max_ttl));
        if given_default && default_ttl > max_ttl {
            self.error("jwt.default_ttl", "must not exceed jwt.max_ttl");
        }
        let upstream_ttl = self.duration("jwt.upstream_ttl", raw.upstream_ttl, Duration::from_secs(60));
        if upstream_ttl > Duration::from_secs(60) {
            self.error("jwt.upstream_ttl", "at most 60s: the identity JWT is for one request");
        }
        self.whole_seconds("jwt.max_ttl", max_ttl);
        // A default taken from `max_ttl` is judged there.
        if given_default {
            self.whole_seconds("jwt.default_ttl", default_ttl);
        }
        self.whole_seconds("jwt.upstream_ttl", upstream_ttl);
        let mut keys: Vec<Arc<JwtKey>> = Vec::new();
        // Kids of keys listed but not loaded: the signing key among them has its error already.
        let mut failed: Vec<String> = Vec::new();
        let raw_keys = raw.keys.unwrap_or_default();
        if raw_keys.is_empty() {
            self.error("jwt.keys", "list at least one key");
        }
        for (i, k) in raw_keys.into_iter().enumerate() {
            let at = |field: &str| format!("jwt.keys[{i}].{field}");
            let Some(kid) = k.kid.filter(|kid| is_name(kid)) else {
                self.error(at("kid"), "missing or not a name (letters, digits, '-', '_', '.' (not first))");
                continue;
            };
            if keys.iter().any(|other| other.kid == kid) {
                self.error(at("kid"), format!("another key already has kid {kid:?}"));
            }
            let alg_name = k.algorithm.unwrap_or_else(|| "EdDSA".into());
            let Some(algorithm) = jwt::ALGORITHMS.iter().find(|(n, _)| *n == alg_name).map(|(_, a)| *a)
            else {
                let known: Vec<&str> = jwt::ALGORITHMS.iter().map(|(n, _)| *n).collect();
                self.error(at("algorithm"), format!("{alg_name:?} is not one of {}", known.join(", ")));
                failed.push(kid);
                continue;
            };
            // A key or secret written where its file or variable is named is not echoed back.
            let pasted = |file: &Option<String>| {
                file.as_ref().is_some_and(|f| f.contains('\n') || f.contains("-----BEGIN"))
            };
            // Any name a shell, Docker or Kubernetes can set (`JWT-SECRET` too), but none with `=`.
            let not_a_name =
                |var: &Option<String>| var.as_ref().is_some_and(|v| v.is_empty() || v.contains(['=', '\0']));
            let loaded = match (k.key_file, k.secret_file, k.secret_env) {
                (file, None, None) if pasted(&file) => {
                    Err((at("key_file"), "holds a key's text; give the path of the file that holds it".into()))
                }
                (None, file, None) if pasted(&file) => {
                    Err((at("secret_file"), "holds a secret's text; give the path of the file that holds it".into()))
                }
                (None, None, var) if not_a_name(&var) => Err((
                    at("secret_env"),
                    "is not an environment variable's name (it is empty or holds `=`); name the variable that holds the secret, not the secret".into(),
                )),
                (Some(file), None, None) => match std::fs::read_to_string(&file) {
                    Ok(text) => JwtKey::load(&kid, algorithm, KeyMaterial::Pem(&text))
                        .map_err(|e| (at("key_file"), e)),
                    // Repeated only when it cannot be a key's text written by mistake: no base64
                    // alphabet has a `.`, which a file name all but always has.
                    Err(e) if file.contains('.') => Err((at("key_file"), format!("cannot read {file}: {e}"))),
                    Err(e) => Err((at("key_file"), format!("cannot read the file it names: {e}"))),
                },
                (None, Some(file), None) => match std::fs::read(&file) {
                    Ok(bytes) => secret_in_file(&bytes)
                        .and_then(|secret| JwtKey::load(&kid, algorithm, KeyMaterial::Secret(secret)))
                        .map_err(|e| (at("secret_file"), e)),
                    // The value is not repeated: it may be the secret itself, written by mistake.
                    Err(e) => Err((at("secret_file"), format!("cannot read the file it names: {e}"))),
                },
                // Taken as bytes, as `secret_file` is: a secret need not be UTF-8.
                (None, None, Some(var)) => match std::env::var_os(&var) {
                    Some(secret) => {
                        use std::os::unix::ffi::OsStrExt;
                        JwtKey::load(&kid, algorithm, KeyMaterial::Secret(secret.as_bytes()))
                            .map_err(|e| (at("secret_env"), e))
                    }
                    None => Err((at("secret_env"), "names an environment variable that is not set".into())),
                },
                _ => Err((at("key_file"), "give exactly one of key_file, secret_file, secret_env".into())),
            };
            match loaded {
                Ok(key) => keys.push(Arc::new(key)),
                Err((path, message)) => {
                    self.error(path, message);
                    failed.push(kid);
                }
            }
        }
        let signing = match raw.signing_key {
            None => {
                self.error("jwt.signing_key", "missing; name the kid of the key that signs");
                None
            }
            Some(kid) => match keys.iter().position(|k| k.kid == kid) {
                Some(i) if keys[i].can_sign() => Some(i),
                Some(_) => {
                    self.error(
                        "jwt.signing_key",
                        format!("key {kid:?} has only a public key and cannot sign"),
                    );
                    None
                }
                None if failed.contains(&kid) => None,
                None => {
                    self.error("jwt.signing_key", format!("no key in jwt.keys has kid {kid:?}"));
                    None
                }
            },
        };
        Some(JwtSettings {
            issuer,
            audience,
            upstream_audience,
            leeway,
            default_ttl,
            max_ttl,
            upstream_ttl,
            keys,
            signing: signing?,
        })
    }

    fn store(&mut self, raw: RawStore) -> StoreSettings {
        let timeout = self.duration("store.timeout", raw.timeout, Duration::from_millis(500));
        let redis = raw.redis.map(|r| {
            let url = r.url.unwrap_or_default();
            if let Err(e) = crate::store::redis::check_url(&url) {
                self.error("store.redis.url", e);
            }
            let wait_replicas = r.wait_replicas.unwrap_or(0);
            if wait_replicas > MAX_WAIT_REPLICAS {
                self.error(
                    "store.redis.wait_replicas",
                    format!("{wait_replicas} is more replicas than a Redis deployment has; at most {MAX_WAIT_REPLICAS}"),
                );
            }
            RedisSettings { url, key_prefix: r.key_prefix.unwrap_or_else(|| "tollgate:".into()), wait_replicas }
        });
        if redis.is_some() && raw.embedded.is_some() {
            self.error("store", "configure either `redis` or `embedded`, not both");
        }
        let embedded_path = raw.embedded.and_then(|e| e.path).unwrap_or_else(|| DEFAULT_EMBEDDED_PATH.into());
        // (An unset variable substituted into the file, say.)
        if embedded_path.trim().is_empty() {
            self.error(
                "store.embedded.path",
                format!("must not be empty; leave it out for the default, {DEFAULT_EMBEDDED_PATH}"),
            );
        }
        StoreSettings { redis, embedded_path: embedded_path.into(), timeout }
    }

    fn credentials(&mut self, raw: RawCredentials) -> CredentialSettings {
        let query_param = raw.query_param.unwrap_or_else(|| "access_token".into());
        if query_param.is_empty() || query_param.contains(['&', ';', '=', '#', ' ']) {
            self.error("credentials.query_param", format!("{query_param:?} is not a usable parameter name"));
        }
        let api_key_header =
            raw.api_key_header.and_then(|h| self.header_name("credentials.api_key_header", &h));
        if api_key_header.as_ref().is_some_and(|h| h == http::header::AUTHORIZATION) {
            self.error("credentials.api_key_header", "must differ from Authorization; use `bearer: true`");
        } else if let Some(header) = api_key_header.as_ref().and_then(|h| relied_on(h, HEADERS_NOT_IN_PREFIX))
        {
            // Every request carrying it would be taken as presenting a credential, and the header
            // is stripped before the upstream.
            self.error(
                "credentials.api_key_header",
                format!("must not be {header}, which HTTP or upstreams rely on; the usual name is X-API-Key"),
            );
        }
        CredentialSettings { bearer: raw.bearer.unwrap_or(true), query_param, api_key_header }
    }

    fn identity(&mut self, raw: RawIdentity) -> Option<IdentitySettings> {
        let written = raw.prefix.unwrap_or_else(|| "x-auth-".into());
        let prefix = written.to_ascii_lowercase();
        let mut prefix_ok = HeaderName::from_bytes(format!("{prefix}x").as_bytes()).is_ok();
        if !prefix_ok {
            // Quoted as written, with the character a header name cannot hold.
            let bad = written.chars().find(|c| HeaderName::from_bytes(format!("x{c}").as_bytes()).is_err());
            self.error(
                "identity.prefix",
                match bad {
                    Some(c) => format!("{written:?} cannot start a header name: {c:?} is not allowed in one"),
                    None => format!("{written:?} cannot start a header name"),
                },
            );
        }
        // Whatever a client sends under the prefix is stripped: it must not cover a header that
        // HTTP or an upstream relies on (`content-` took `Content-Length` and `Content-Type` away).
        let covered = HEADERS_NOT_IN_PREFIX.iter().find(|h| crate::proxy::headers::in_namespace(h, &prefix));
        if prefix.is_empty() {
            self.error(
                "identity.prefix",
                "must not be empty (every header under it is stripped); the default is x-auth-",
            );
            prefix_ok = false;
        } else if let Some(header) = covered {
            self.error(
                "identity.prefix",
                format!("{prefix:?} would strip {header} from every request (headers under the prefix are stripped); the default is x-auth-"),
            );
            prefix_ok = false;
        }
        let fields: Vec<IdentityField> = match raw.headers {
            None => IdentityField::ALL.to_vec(),
            Some(names) => names
                .iter()
                .enumerate()
                .filter_map(|(i, n)| {
                    let field = IdentityField::ALL.into_iter().find(|f| f.suffix() == n);
                    if field.is_none() {
                        let known: Vec<&str> = IdentityField::ALL.iter().map(|f| f.suffix()).collect();
                        self.error(
                            format!("identity.headers[{i}]"),
                            format!("unknown header {n:?}; known: {}", known.join(", ")),
                        );
                    }
                    field
                })
                .collect(),
        };
        let request_id_header = self.header_name(
            "identity.request_id_header",
            raw.request_id_header.as_deref().unwrap_or("x-request-id"),
        );
        // It replaces the client's header of that name upstream and is set on every response.
        let relied = request_id_header
            .as_ref()
            .and_then(|h| relied_on(h, HEADERS_NOT_IN_PREFIX.into_iter().chain(RESPONSE_HEADERS_RELIED_ON)));
        if let Some(header) = relied {
            self.error(
                "identity.request_id_header",
                format!("must not be {header}, which HTTP or its clients rely on (it is replaced on every request and response); the default is x-request-id"),
            );
        }
        if prefix_ok && request_id_header.as_ref().is_some_and(|h| h.as_str().starts_with(&prefix)) {
            self.error(
                "identity.request_id_header",
                "must not be inside the identity prefix, which is stripped",
            );
        }
        // The prefix was checked above, so every name is valid; an invalid one is left out.
        let wire = |name: String| HeaderName::from_bytes(name.as_bytes()).ok();
        let headers = fields
            .into_iter()
            .filter_map(|f| wire(format!("{prefix}{}", f.suffix())).map(|h| (f, h)))
            .collect();
        let jwt_header = wire(format!("{prefix}jwt"));
        let request_id_header = request_id_header?;
        Some(IdentitySettings { prefix, headers, request_id_header, jwt_header: jwt_header? })
            .filter(|_| prefix_ok)
    }

    fn policy(
        &mut self,
        roles: BTreeMap<String, Vec<String>>,
        scopes: BTreeMap<String, Vec<String>>,
    ) -> Policy {
        let mut all_roles = Policy::default_roles();
        for (name, perms) in roles {
            match Role::parse(&name) {
                Some(role) => {
                    all_roles.insert(role, perms);
                }
                None => self
                    .error(format!("roles.{name}"), "unknown role; roles are guest, viewer, editor, admin"),
            }
        }
        let mut all_scopes = Policy::default_scopes();
        let admin_given = scopes.contains_key("admin");
        all_scopes.extend(scopes);
        for (name, perms) in all_roles
            .iter()
            .map(|(r, p)| (format!("roles.{r}"), p))
            .chain(all_scopes.iter().map(|(s, p)| (format!("scopes.{s}"), p)))
        {
            for (i, p) in perms.iter().enumerate() {
                if !is_name(p) || p.contains('.') {
                    self.error(
                        format!("{name}[{i}]"),
                        format!("{p:?} is not a permission name (letters, digits, - and _)"),
                    );
                }
            }
        }
        // PRODUCT: `admin` = all. Unless the config says otherwise, every permission a role holds,
        // custom ones included (a `deploy` added to roles is in an `admin`-scoped token too). Made
        // after the names are checked: a bad one is told once, where it is written.
        if !admin_given {
            let mut all: Vec<String> = Vec::new();
            for p in all_roles.values().flatten() {
                if !all.contains(p) {
                    all.push(p.clone());
                }
            }
            all_scopes.insert("admin".into(), all);
        }
        // The admin API's org-admin calls need the admin role and the `admin` permission: an
        // admin role without it would leave nobody able to add a user or revoke another's token.
        if all_roles.get(&Role::Admin).is_some_and(|perms| !perms.iter().any(|p| p == "admin")) {
            self.error(
                "roles.admin",
                "must keep the admin permission, which the admin API's admin calls need",
            );
        }
        let count = Policy::permission_count(&all_roles, &all_scopes);
        if count > MAX_PERMISSIONS {
            self.error(
                "roles",
                format!("{count} distinct permissions; at most {MAX_PERMISSIONS} are supported"),
            );
        }
        Policy::new(&all_roles, all_scopes)
    }

    fn argon2(&mut self, raw: RawArgon2) -> Argon2Settings {
        let d = Argon2Params::default();
        let params = Argon2Params {
            memory_kib: raw.memory_kib.unwrap_or(d.memory_kib),
            iterations: raw.iterations.unwrap_or(d.iterations),
            parallelism: raw.parallelism.unwrap_or(d.parallelism),
        };
        // Past these a hash takes seconds or more memory than a host has: an issue or a first
        // verification would stall or abort the process (an allocation that fails is fatal).
        let bounds = [
            ("argon2.memory_kib", params.memory_kib, MAX_ARGON2_MEMORY_KIB, " (1 GiB)"),
            ("argon2.iterations", params.iterations, 100, ""),
            ("argon2.parallelism", params.parallelism, 64, ""),
        ];
        let mut within = true;
        for (path, value, max, shown) in bounds {
            if value > max {
                self.error(path, format!("must be at most {max}{shown}"));
                within = false;
            }
        }
        // argon2's own minima, said with the key that breaks them.
        for (path, value) in
            [("argon2.iterations", params.iterations), ("argon2.parallelism", params.parallelism)]
        {
            if value == 0 {
                self.error(path, "must be at least 1");
                within = false;
            }
        }
        let least_memory = 8 * params.parallelism.clamp(1, 64);
        if params.parallelism <= 64 && params.memory_kib < least_memory {
            self.error(
                "argon2.memory_kib",
                format!("must be at least {least_memory} (8 per lane of argon2.parallelism)"),
            );
            within = false;
        }
        // Only within the bounds: argon2's own check multiplies them.
        if within {
            if let Err(e) = params.validate() {
                self.error("argon2", format!("invalid parameters: {e}"));
            }
        }
        // The CPUs this process could use when it first read a config: a reload resolves the
        // same default, where the CPUs it may use now (an affinity or a cgroup quota changed
        // meanwhile) would be a change that applies only after a restart, warned of on every
        // reload of a file that never set it.
        static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let cpus = *CPUS.get_or_init(|| std::thread::available_parallelism().map(usize::from).unwrap_or(2));
        let max_concurrency = raw.max_concurrency.unwrap_or(cpus.min(MAX_THREADS));
        if max_concurrency == 0 {
            self.error("argon2.max_concurrency", "must be at least 1");
        } else if max_concurrency > MAX_THREADS {
            self.error("argon2.max_concurrency", format!("must be at most {MAX_THREADS}"));
        }
        let max_wait = self.duration("argon2.max_wait", raw.max_wait, Duration::from_secs(5));
        Argon2Settings { params, max_concurrency, max_wait }
    }

    fn orgs(&mut self, raw: BTreeMap<String, RawOrg>) -> BTreeMap<String, OrgSettings> {
        let mut orgs = BTreeMap::new();
        for (org, raw_org) in raw {
            if !is_name(&org) {
                self.error(
                    format!("orgs.{org}"),
                    "org names use letters, digits, '-', '_' and '.' (not first), up to 64",
                );
            }
            let mut settings = OrgSettings::default();
            for (project, raw_project) in raw_org.projects.unwrap_or_default() {
                let path = format!("orgs.{org}.projects.{project}");
                if !is_name(&project) {
                    self.error(
                        &path,
                        "project names use letters, digits, '-', '_' and '.' (not first), up to 64",
                    );
                }
                let envs = raw_project.environments.unwrap_or_default();
                if envs.is_empty() {
                    self.error(format!("{path}.environments"), "list at least one environment");
                }
                for (i, env) in envs.iter().enumerate() {
                    if !is_name(env) {
                        self.error(
                            format!("{path}.environments[{i}]"),
                            format!("{env:?} is not a valid environment name"),
                        );
                    }
                }
                settings.projects.insert(project, envs);
            }
            orgs.insert(org, settings);
        }
        orgs
    }

    fn routes(
        &mut self,
        raw: Vec<Option<RawRoute>>,
        orgs: &BTreeMap<String, OrgSettings>,
        policy: &Policy,
        (jwt_present, credential_audience, headers_carry): (bool, Option<&str>, bool),
        timeouts: UpstreamTimeouts,
        own: &[SocketAddr],
    ) -> RouteTable {
        let mut routes = Vec::new();
        // What each earlier route took, to name it when a later one takes the same.
        let mut seen: HashMap<(Option<String>, String), usize> = HashMap::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        // Each earlier route's host, prefix in lowercase, index, `case_sensitive` and prefix.
        let mut folded: Vec<(Option<String>, String, usize, bool, String)> = Vec::new();
        for (i, r) in raw.into_iter().enumerate() {
            // A route that could not be read has its error; the others are still checked.
            let Some(r) = r else { continue };
            let at = |field: &str| format!("routes[{i}].{field}");
            let public = r.auth == Some(RawAuth::None);
            // Without a usable path the route is not built, but the rest of it is still checked.
            let path_prefix = match r.path {
                Some(p) if p.starts_with('/') => Some(p),
                Some(p) => {
                    self.error(at("path"), format!("{p:?} must start with '/'"));
                    None
                }
                None => {
                    self.error(at("path"), "missing; every route needs a path prefix");
                    None
                }
            };
            let host = r.host.map(|h| {
                let normalized = match (h.contains("://"), h.parse::<std::net::Ipv6Addr>().is_ok()) {
                    (true, _) => Err("a host name without a scheme or path (api.example.com)"),
                    (_, true) => {
                        Err("an IPv6 address is written in brackets, as requests carry it: [2001:db8::1]")
                    }
                    _ => normalize_host(&h).and_then(route_host),
                };
                normalized.unwrap_or_else(|why| {
                    self.error(at("host"), format!("{h:?}: {why}"));
                    h
                })
            });
            let case_sensitive = r.case_sensitive.unwrap_or(false);
            let mut path_clash = None;
            if let Some(path_prefix) = &path_prefix {
                // Requests are routed on paths read both as sent and normalized, and must agree; a
                // prefix only one reading can match would be unreachable.
                match path_chars(path_prefix).and_then(|()| route_path(path_prefix)) {
                    Ok(std::borrow::Cow::Borrowed(_)) => {}
                    Ok(normal) => self.error(
                        at("path"),
                        format!("{path_prefix:?} is not in normal form; write {normal:?} (no ';', '//' or encoded letters, digits, '-', '_', '~')"),
                    ),
                    Err(why) => self.error(at("path"), format!("{path_prefix:?}: {why}")),
                }
                // Keyed without a trailing `/`: `/admin/` covers `/admin` too, so the two are one.
                let key = path_prefix.strip_suffix('/').filter(|p| !p.is_empty()).unwrap_or(path_prefix);
                path_clash = seen.insert((host.clone(), key.to_string()), i);
                if let Some(j) = path_clash {
                    let on = host.as_deref().map(|h| format!(" on host {h:?}")).unwrap_or_default();
                    self.error(
                        at("path"),
                        format!("routes[{j}] already has path {path_prefix:?}{on} (a prefix ending in `/` covers the path without it)"),
                    );
                }
                // Two prefixes that differ only in case, on one host or one for any host (tried on
                // every host, after the host's own): an upstream that ignores case reads them as
                // one, and the gateway would refuse every request under the one tried later, unless
                // that route is `case_sensitive`.
                // Compared without a trailing `/`: `/Shop` beside `/shop/` clashes as well.
                let lower = path_prefix.trim_end_matches('/').to_ascii_lowercase();
                let clash = folded.iter().find(|(h, p, j, earlier_sensitive, exact)| {
                    let same_hosts = match (h, &host) {
                        (Some(a), Some(b)) => a == b,
                        _ => true,
                    };
                    if !same_hosts
                        || *p != lower
                        || exact.trim_end_matches('/') == path_prefix.trim_end_matches('/')
                    {
                        return false;
                    }
                    // The one tried later: a host's routes first, then longer prefixes, then in order.
                    let order = |host: &Option<String>, prefix: &str, index: usize| {
                        (host.is_none(), std::cmp::Reverse(prefix.len()), index)
                    };
                    let later_sensitive = match order(h, exact, *j) > order(&host, path_prefix, i) {
                        true => *earlier_sensitive,
                        false => case_sensitive,
                    };
                    !later_sensitive
                });
                if let Some((_, _, j, _, _)) = clash {
                    self.error(
                        at("path"),
                        format!("{path_prefix:?} differs from routes[{j}].path only in letter case, which upstreams that ignore case read as one path; set `case_sensitive: true` on the routes whose upstreams compare paths exactly"),
                    );
                }
                folded.push((host.clone(), lower, i, case_sensitive, path_prefix.clone()));
            }
            // Names label metrics and logs; a route without one is named by its path.
            let name = r.name.clone().or_else(|| path_prefix.clone());
            if let Some(name) = &name {
                match names.insert(name.clone(), i) {
                    Some(j) if path_clash.is_none() => {
                        let whose =
                            if r.name.is_some() { "" } else { ", this route's default name (its path)" };
                        self.error(
                            at("name"),
                            format!("routes[{j}] is already named {name:?}{whose}; names label metrics and logs, so give each route its own"),
                        );
                    }
                    _ => {}
                }
            }
            let listed = r.upstreams.is_some();
            let addresses: Vec<String> = match (r.upstream, r.upstreams) {
                (Some(one), None) => vec![one],
                (None, Some(many)) if !many.is_empty() => many,
                (Some(_), Some(_)) => {
                    self.error(at("upstreams"), "give either `upstream` or `upstreams`, not both");
                    vec![]
                }
                (None, Some(_)) => {
                    self.error(at("upstreams"), "list at least one `host:port`");
                    vec![]
                }
                (None, None) => {
                    self.error(at("upstream"), "missing; give `upstream: host:port` or `upstreams: [...]`");
                    vec![]
                }
            };
            let mut upstreams = Vec::new();
            for (j, addr) in addresses.iter().enumerate() {
                let path = match listed {
                    true => format!("routes[{i}].upstreams[{j}]"),
                    false => at("upstream"),
                };
                // Every address a name resolves to (`localhost` is `::1` and `127.0.0.1` on most
                // hosts, and an upstream may listen on one of them only): a connection refused by
                // one is tried on the next (see `proxy::Gateway::fail_to_connect`).
                // Repeated with any `user:password@` hidden.
                let shown = redact_url(addr);
                if addr.contains("://") {
                    self.error(path, format!("{shown:?}: give host:port, without a scheme (upstreams are spoken to in plain HTTP)"));
                    continue;
                }
                match addr.to_socket_addrs().map(Iterator::collect::<Vec<_>>) {
                    Ok(found) if found.is_empty() => {
                        self.error(path, format!("{shown:?} resolves to no address"))
                    }
                    Ok(found) => {
                        // The gateway as its own upstream: a protected route strips the
                        // credential and answers itself 401, a public one loops until sockets
                        // run out.
                        if let Some(me) = found.iter().find(|a| own.iter().any(|o| is_own(*o, **a))) {
                            self.error(
                                path.clone(),
                                format!("{shown:?} ({me}) is this gateway's own listener; name the service it fronts"),
                            );
                        }
                        for a in found {
                            if !upstreams.contains(&a) {
                                upstreams.push(a);
                            }
                        }
                    }
                    Err(e) => self.error(path, format!("{shown:?} is not a reachable host:port ({e})")),
                }
            }
            let timeouts = self.timeouts(&at("upstream_timeouts"), r.upstream_timeouts, timeouts);
            let identity_jwt = r.identity_jwt.unwrap_or(false);
            if identity_jwt && !jwt_present {
                self.error(at("identity_jwt"), "needs a `jwt` section with a signing key");
            }
            if identity_jwt && public {
                self.error(at("identity_jwt"), "a public route has no identity to sign");
            }
            let identity_audience = r.identity_jwt_audience.filter(|audience| {
                let why = if !identity_jwt {
                    "only for a route with `identity_jwt: true`"
                } else if audience.trim().is_empty() {
                    "must not be empty"
                } else if credential_audience == Some(audience.as_str()) {
                    "must differ from jwt.audience, so an identity JWT is never accepted as a credential"
                } else {
                    return true;
                };
                self.error(at("identity_jwt_audience"), why);
                false
            });
            // A public route checks no token, so it could hold to no permission or token parameter:
            // every method would pass, whatever `permissions` says.
            if public && r.permissions.as_ref().is_some_and(|p| !p.0.is_empty()) {
                self.error(
                    at("permissions"),
                    "a public route (auth: none) checks no token, so every method would pass; drop `permissions` or drop `auth: none`",
                );
            }
            if public && r.query_token == Some(true) {
                self.error(
                    at("query_token"),
                    "a public route (auth: none) reads no token; drop `query_token`",
                );
            }
            if !public && !headers_carry && r.query_token != Some(true) {
                self.error(
                    at("query_token"),
                    "no token can reach this route: `credentials.bearer` is false and no `credentials.api_key_header` is set; give the route `query_token: true`, or read tokens from a header",
                );
            }
            let (org, project, environment) =
                self.route_target(i, &r.org, &r.project, &r.environment, orgs, public);
            let mut methods = std::collections::HashMap::new();
            // Each method's key as written, to name the first when another key means the same.
            let mut written: HashMap<String, String> = HashMap::new();
            for (method, perm) in r.permissions.unwrap_or_default().0 {
                let path = format!("routes[{i}].permissions.{method}");
                let (known, m) = match permission_method(&method) {
                    Ok(found) => found,
                    Err(why) => {
                        self.error(path, why);
                        continue;
                    }
                };
                if let Some(first) = written.get(known.as_str()) {
                    self.error(
                        path,
                        format!("{method:?} is the same method as {first:?}; give each method once"),
                    );
                    continue;
                }
                written.insert(known, method.clone());
                if let Some(p) = self.required(&path, &perm, policy, true) {
                    methods.insert(m, p);
                }
            }
            let (Some(path_prefix), Some(read_default), Some(write_default)) = (
                path_prefix,
                self.required(&at("path"), "read", policy, false),
                self.required(&at("path"), "write", policy, false),
            ) else {
                continue;
            };
            // Neither default granted and no method given its own permission: the route would
            // refuse every request (a role set renamed `read`, say; one without `write` alone is
            // a read-only gateway).
            if !public
                && methods.is_empty()
                && ![&read_default, &write_default].iter().any(|p| policy.granted(p.bit))
            {
                self.error(
                    at("permissions"),
                    "no role grants read or write, which a route asks for by default (read for GET, HEAD and OPTIONS, write for the rest): every request would be refused; give the route `permissions` or a role those permissions",
                );
            }
            let name = name.unwrap_or_else(|| path_prefix.clone());
            routes.push(Route::new(RouteSpec {
                name,
                host,
                path_prefix,
                upstreams,
                timeouts,
                org,
                project,
                environment,
                public,
                query_token: r.query_token.unwrap_or(false),
                identity_jwt,
                identity_audience,
                preserve_header_case: r.preserve_header_case.unwrap_or(false),
                case_sensitive,
                format_extensions: r.format_extensions.unwrap_or(true),
                methods,
                read_default,
                write_default,
            }));
        }
        RouteTable::new(routes)
    }

    /// The permission `name` a route asks for. One the config names (`explicit`) must be granted by
    /// some role: one only a scope preset names is one nobody has. The defaults (`read`, `write`)
    /// need only exist: a role set without `write` makes a read-only gateway.
    fn required(
        &mut self,
        path: &str,
        name: &str,
        policy: &Policy,
        explicit: bool,
    ) -> Option<RequiredPermission> {
        match policy.permission(name).filter(|bit| !explicit || policy.granted(*bit)) {
            Some(bit) => Some(RequiredPermission { name: name.to_string(), bit }),
            // The permission may be in the roles or scopes that could not be read.
            None if self.unreadable("roles") || self.unreadable("scopes") => None,
            None => {
                self.error(path, format!("permission {name:?} is granted by no role"));
                None
            }
        }
    }

    fn route_target(
        &mut self,
        i: usize,
        org: &Option<String>,
        project: &Option<String>,
        environment: &Option<String>,
        orgs: &BTreeMap<String, OrgSettings>,
        public: bool,
    ) -> (String, String, String) {
        let at = |field: &str| format!("routes[{i}].{field}");
        let (org, project, environment) = match (org, project, environment) {
            (Some(o), Some(p), Some(e)) => (o.clone(), p.clone(), e.clone()),
            _ if public => {
                return (
                    org.clone().unwrap_or_default(),
                    project.clone().unwrap_or_default(),
                    environment.clone().unwrap_or_default(),
                )
            }
            _ => {
                for (field, value) in [("org", org), ("project", project), ("environment", environment)] {
                    if value.is_none() {
                        self.error(
                            at(field),
                            "missing; a protected route names its org, project and environment",
                        );
                    }
                }
                return Default::default();
            }
        };
        match orgs.get(&org).map(|o| o.projects.get(&project)) {
            // The org may be in the `orgs` that could not be read.
            _ if self.unreadable("orgs") => {}
            None => self.error(at("org"), format!("org {org:?} is not defined under `orgs`")),
            Some(None) => {
                self.error(at("project"), format!("project {project:?} is not defined in org {org:?}"))
            }
            Some(Some(envs)) if !envs.contains(&environment) => self.error(
                at("environment"),
                format!(
                    "environment {environment:?} is not one of project {project:?}'s: {}",
                    envs.join(", ")
                ),
            ),
            Some(Some(_)) => {}
        }
        (org, project, environment)
    }
}

/// The secret a `secret_file` holds. A text file (UTF-8: a base64 or hex secret, as
/// `openssl rand -base64 32 > secret` writes, or a passphrase) loses its one line end, which
/// editors and `echo` add and which is no part of the secret; any other file is taken byte for
/// byte, as another system reading it raw takes it (a binary secret's first or last byte may well
/// be a space or a newline, and random bytes are all but never UTF-8). Text that still begins or
/// ends with white space is refused: whether that is part of the secret, each system reading the
/// file decides for itself (and versions before this one trimmed it), so a key that signs
/// differently would fail with no hint why.
fn secret_in_file(bytes: &[u8]) -> Result<&[u8], String> {
    if std::str::from_utf8(bytes).is_err() {
        return Ok(bytes);
    }
    let line = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let secret = line.strip_suffix(b"\r").unwrap_or(line);
    // Unicode's white space (a vertical tab, a no-break space, U+2028 too), as Python's and Go's
    // strip functions take it.
    let text = std::str::from_utf8(secret).unwrap_or_default();
    if text.trim() != text {
        return Err("the file's text begins or ends with white space (a space, a tab, a second line end), \
                    which readers of the file take differently; remove it"
            .into());
    }
    Ok(secret)
}

#[cfg(test)]
mod tests;
