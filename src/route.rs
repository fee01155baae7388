//! The route table: which upstream, org, project and environment a request belongs to, and which
//! permission each HTTP method needs there. Built once per config; matching is pure.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::policy::PermSet;

/// A permission a route requires, by name (for the client's error) and by bit.
#[derive(Debug, Clone)]
pub struct RequiredPermission {
    /// The permission's name.
    pub name: String,
    /// Its bit in the policy registry.
    pub bit: PermSet,
}

/// One protected or public route.
#[derive(Debug)]
pub struct Route {
    /// Name used in logs and metrics.
    pub name: String,
    /// Exact host (lowercase, without port); `None` matches any host.
    pub host: Option<String>,
    /// Path prefix, matched on segment boundaries.
    pub path_prefix: String,
    /// Upstream addresses, resolved when the config was loaded; used in turn.
    pub upstreams: Vec<SocketAddr>,
    /// How long the gateway waits on the upstream.
    pub timeouts: UpstreamTimeouts,
    /// Organization the route belongs to.
    pub org: String,
    /// Project inside the org.
    pub project: String,
    /// Environment of the project.
    pub environment: String,
    /// Whether the route needs no credential.
    pub public: bool,
    /// Whether a token may come in the query string.
    pub query_token: bool,
    /// Whether the upstream gets a signed identity JWT (`X-Auth-Jwt`).
    pub identity_jwt: bool,
    /// The identity JWT's `aud` on this route, where not `jwt.upstream_audience`: an upstream
    /// that checks its own cannot be handed another upstream's JWT (each sees them all within
    /// `jwt.upstream_ttl`).
    pub identity_audience: Option<String>,
    /// Whether header names keep the case they were sent in, both ways. Off: Pingora writes
    /// standard names in their usual capitalization and every other name in lowercase, which
    /// spares its second, case-keeping header map and a parse of every inserted name.
    pub preserve_header_case: bool,
    /// Whether the upstream compares paths with letter case counting. Off (the default): a path
    /// this route takes is refused when another route would take it with case ignored, since
    /// Express or ASP.NET upstreams would run that route's handler. On: no such check.
    pub case_sensitive: bool,
    /// Whether the upstream may read a last segment's `.ext` as a response format (Rails'
    /// `(.:format)`, Spring MVC's suffix patterns), running the handler of the path without it.
    /// On (the default): a path this route takes is refused when, so cut, it is another route's.
    /// Off: the upstream serves `.ext` paths as they are (a static site).
    pub format_extensions: bool,
    /// Permission per method; methods not listed use `read_default` or `write_default`. HEAD,
    /// unless listed, has GET's when GET is listed (see [`Route::new`]).
    pub methods: HashMap<http::Method, RequiredPermission>,
    /// Required for GET, HEAD and OPTIONS unless listed.
    pub read_default: RequiredPermission,
    /// Required for every other method unless listed.
    pub write_default: RequiredPermission,
    next_upstream: AtomicUsize,
    /// Per upstream address, until when (milliseconds since the epoch) it is passed over after a
    /// connection to it failed.
    upstream_down_until: Box<[std::sync::atomic::AtomicI64]>,
    /// This route's `allowed` request counter, looked up once rather than by its labels on every
    /// request.
    pub allowed_requests: std::sync::OnceLock<prometheus::IntCounter>,
}

/// How long an upstream address whose connection failed is passed over while the route has
/// another (nginx's `fail_timeout` default).
pub const UPSTREAM_DOWN_MS: i64 = 10_000;

/// How long the gateway waits on a route's upstream before it answers `504` (`upstream_timeouts`
/// in the config; a route's own override the file's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamTimeouts {
    /// Opening a connection (a pooled one is reused without).
    pub connect: std::time::Duration,
    /// Each wait for the upstream to send: its response head, then each piece of its body. A
    /// response that keeps coming is never cut; one that stalls this long is.
    pub read: std::time::Duration,
    /// Each wait for the upstream to take the request: its head, then each piece of the body.
    pub write: std::time::Duration,
}

impl UpstreamTimeouts {
    /// Sets these on a peer's options.
    pub fn apply(&self, peer: &mut pingora::prelude::HttpPeer) {
        peer.options.connection_timeout = Some(self.connect);
        peer.options.read_timeout = Some(self.read);
        peer.options.write_timeout = Some(self.write);
    }
}

impl Default for UpstreamTimeouts {
    /// nginx's read and send timeouts (60 s); a connect bound of 5 s, as Envoy's, since an
    /// upstream that takes longer to accept is down for a client's purposes.
    fn default() -> UpstreamTimeouts {
        UpstreamTimeouts {
            connect: std::time::Duration::from_secs(5),
            read: std::time::Duration::from_secs(60),
            write: std::time::Duration::from_secs(60),
        }
    }
}

/// Everything needed to make a [`Route`], as validated config.
#[derive(Debug)]
pub struct RouteSpec {
    /// See [`Route::name`].
    pub name: String,
    /// See [`Route::host`].
    pub host: Option<String>,
    /// See [`Route::path_prefix`].
    pub path_prefix: String,
    /// See [`Route::upstreams`].
    pub upstreams: Vec<SocketAddr>,
    /// See [`Route::timeouts`].
    pub timeouts: UpstreamTimeouts,
    /// See [`Route::org`].
    pub org: String,
    /// See [`Route::project`].
    pub project: String,
    /// See [`Route::environment`].
    pub environment: String,
    /// See [`Route::public`].
    pub public: bool,
    /// See [`Route::query_token`].
    pub query_token: bool,
    /// See [`Route::identity_jwt`].
    pub identity_jwt: bool,
    /// See [`Route::identity_audience`].
    pub identity_audience: Option<String>,
    /// See [`Route::preserve_header_case`].
    pub preserve_header_case: bool,
    /// See [`Route::case_sensitive`].
    pub case_sensitive: bool,
    /// See [`Route::format_extensions`].
    pub format_extensions: bool,
    /// See [`Route::methods`].
    pub methods: HashMap<http::Method, RequiredPermission>,
    /// See [`Route::read_default`].
    pub read_default: RequiredPermission,
    /// See [`Route::write_default`].
    pub write_default: RequiredPermission,
}

impl Route {
    /// Makes a route from its validated spec.
    pub fn new(spec: RouteSpec) -> Route {
        let mut methods = spec.methods;
        // Upstreams (Express, Flask, Go's mux) answer HEAD by running the GET handler, with its
        // side effects, status and headers: a HEAD needs what a GET needs unless listed itself.
        if let Some(get) =
            methods.get(&http::Method::GET).filter(|_| !methods.contains_key(&http::Method::HEAD))
        {
            methods.insert(http::Method::HEAD, get.clone());
        }
        Route {
            name: spec.name,
            host: spec.host,
            path_prefix: spec.path_prefix,
            upstream_down_until: spec
                .upstreams
                .iter()
                .map(|_| std::sync::atomic::AtomicI64::new(0))
                .collect(),
            upstreams: spec.upstreams,
            timeouts: spec.timeouts,
            org: spec.org,
            project: spec.project,
            environment: spec.environment,
            public: spec.public,
            query_token: spec.query_token,
            identity_jwt: spec.identity_jwt,
            identity_audience: spec.identity_audience,
            preserve_header_case: spec.preserve_header_case,
            case_sensitive: spec.case_sensitive,
            format_extensions: spec.format_extensions,
            methods,
            read_default: spec.read_default,
            write_default: spec.write_default,
            next_upstream: AtomicUsize::new(0),
            allowed_requests: std::sync::OnceLock::new(),
        }
    }

    /// The permission a method needs here.
    pub fn required_permission(&self, method: &http::Method) -> &RequiredPermission {
        if let Some(p) = self.methods.get(method) {
            return p;
        }
        match *method {
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS => &self.read_default,
            _ => &self.write_default,
        }
    }

    /// The upstream address to try: after `tried` (the index of the one whose connection failed),
    /// the next one in the list; first, the next one round robin; in both cases passing over an
    /// address whose connection failed in the last [`UPSTREAM_DOWN_MS`] while another has not
    /// (nginx's `max_fails=1 fail_timeout=10s`). With its index.
    pub fn upstream_after(&self, tried: Option<usize>) -> Option<(usize, SocketAddr)> {
        let n = self.upstreams.len();
        let start = match tried {
            Some(i) => i + 1,
            None if n < 2 => 0,
            None => self.next_upstream.fetch_add(1, Ordering::Relaxed),
        };
        if n < 2 {
            return self.upstreams.first().map(|a| (start, *a));
        }
        let now = crate::store::now_millis();
        let down =
            |i: usize| self.upstream_down_until.get(i % n).is_some_and(|d| d.load(Ordering::Relaxed) > now);
        let live = (0..n).filter(|i| !down(*i)).count();
        let i = match tried {
            // After a failed try: the next address that is not passed over.
            Some(_) => (start..start + n).find(|i| !down(*i)).unwrap_or(start),
            // Round robin over the addresses not passed over (all of them, if none or all are).
            None if live == 0 || live == n => start,
            None => (0..n).filter(|i| !down(*i)).nth(start % live).unwrap_or(start),
        };
        Some((i, self.upstreams[i % n]))
    }

    /// The connection to the address [`Route::upstream_after`] gave as `i` failed: it is passed
    /// over for a while (a route with one address has nothing else to try).
    pub fn upstream_failed(&self, i: usize) {
        let n = self.upstreams.len();
        if let Some(down_until) = self.upstream_down_until.get(i % n.max(1)).filter(|_| n > 1) {
            down_until.store(crate::store::now_millis() + UPSTREAM_DOWN_MS, Ordering::Relaxed);
        }
    }

    /// Whether `path` is under this route's prefix (on a segment boundary), comparing letters
    /// without regard to case when `fold_case`. A prefix ending in `/` covers the path without it
    /// too (`/admin/` takes `/admin`, which Express, Rails and ASP.NET serve as `/admin/`).
    fn matches_path(&self, path: &str, fold_case: bool) -> bool {
        let prefix = self.path_prefix.as_bytes();
        if prefix == b"/" {
            return path.starts_with('/');
        }
        let bare = prefix.strip_suffix(b"/").unwrap_or(prefix);
        let Some((head, rest)) = path.as_bytes().split_at_checked(bare.len()) else { return false };
        let same = if fold_case { caseless_eq(head, bare) } else { same_escaped(head, bare) };
        same && matches!(rest.first(), None | Some(b'/' | b'?'))
    }
}

/// Whether two paths are the same, a percent-escape's hex digits in either case (RFC 3986,
/// section 6.2.2.1: `%c3%a9` is `%C3%A9`; clients and libraries differ in the case they write,
/// and upstreams decode both alike, while a route's path holds them in upper case).
fn same_escaped(a: &[u8], b: &[u8]) -> bool {
    if a == b {
        return true;
    }
    let in_escape = |p: &[u8], i: usize| (i >= 1 && p[i - 1] == b'%') || (i >= 2 && p[i - 2] == b'%');
    a.len() == b.len()
        && a.iter().zip(b).enumerate().all(|(i, (x, y))| {
            x == y
                || (x.eq_ignore_ascii_case(y) && x.is_ascii_hexdigit() && in_escape(a, i) && in_escape(b, i))
        })
}

/// Whether two paths read alike without regard to letter case, a letter that is no ASCII too once
/// its escapes are decoded (ASP.NET's `OrdinalIgnoreCase` and Java's `equalsIgnoreCase` read
/// `%C3%89`, É, as `%C3%A9`, é). (A letter whose other case is of another length in UTF-8, such
/// as the Kelvin sign, is not matched: the two paths are compared at equal lengths.)
fn caseless_eq(a: &[u8], b: &[u8]) -> bool {
    if a.eq_ignore_ascii_case(b) {
        return true;
    }
    if !a.contains(&b'%') && !b.contains(&b'%') {
        return false;
    }
    let fold = |p: &[u8]| percent_encoding::percent_decode(p).decode_utf8_lossy().to_lowercase();
    fold(a) == fold(b)
}

/// Routes grouped by host, each group ordered longest prefix first.
#[derive(Debug, Default)]
pub struct RouteTable {
    by_host: HashMap<String, Vec<Entry>>,
    any_host: Vec<Entry>,
    /// The longest route prefix: a path cut longer than it is no route's prefix.
    longest_prefix: usize,
}

/// A route in the table.
#[derive(Debug)]
struct Entry {
    route: Arc<Route>,
    /// Whether a route tried before this one has a prefix that reads, without regard to letter
    /// case, as this one's or as one inside it (`/Shop`, or `/shop/admin` beside `/shop`): only
    /// then can a path this route takes be another route's to a case-insensitive upstream, so
    /// only then is the path matched a second time, without regard to case. Known when the
    /// table is built, so an ordinary request pays nothing for it.
    check_case: bool,
    /// Whether a route tried before this one has a longer prefix inside this one's (`/shop/admin`
    /// beside `/shop`): only then can a path this route takes (`/shop/admin.json`) be that
    /// route's to an upstream that drops a format extension (Rails' `(.:format)`, Spring MVC's
    /// suffix patterns), so only then is the path matched again without its extension.
    check_extension: bool,
}

impl RouteTable {
    /// Builds the table.
    pub fn new(routes: Vec<Route>) -> RouteTable {
        let mut by_host: HashMap<String, Vec<Arc<Route>>> = HashMap::new();
        let mut any_host = Vec::new();
        for route in routes {
            let route = Arc::new(route);
            match &route.host {
                Some(h) => by_host.entry(h.clone()).or_default().push(route),
                None => any_host.push(route),
            }
        }
        let longest_first = |v: &mut Vec<Arc<Route>>| {
            v.sort_by_key(|r| std::cmp::Reverse(r.path_prefix.len()));
        };
        by_host.values_mut().for_each(longest_first);
        longest_first(&mut any_host);
        // A host's routes are tried before the routes for any host, on that host.
        let named: Vec<&Arc<Route>> = by_host.values().flatten().collect();
        let any_host = entries(&any_host, &named);
        let by_host: HashMap<String, Vec<Entry>> =
            by_host.iter().map(|(host, routes)| (host.clone(), entries(routes, &[]))).collect();
        let longest_prefix =
            by_host.values().chain([&any_host]).flatten().map(|e| e.route.path_prefix.len()).max();
        RouteTable { by_host, any_host, longest_prefix: longest_prefix.unwrap_or(0) }
    }

    /// Matches host first (routes naming the host, then routes for any host), then the longest
    /// path prefix. `host` is a [`normalize_host`]d name.
    fn find(&self, host: Option<&str>, path: &str, fold_case: bool) -> Option<&Entry> {
        let named = host.and_then(|h| self.by_host.get(h));
        named
            .into_iter()
            .flatten()
            .chain(self.any_host.iter())
            .find(|e| e.route.matches_path(path, fold_case))
    }

    /// The route of a request for `path` on `host` (which may carry a port and any case), or why
    /// the request is refused: a host whose port is not a number, a path [`route_path`] refuses,
    /// or a path that upstreams could read as another route's. Upstreams differ in how they read
    /// `;`, `//` and encoded characters, and in whether letter case matters (Express and ASP.NET
    /// route without regard to it), so a path must reach the same route read every way (or no
    /// route at all, as sent and normalized).
    pub fn route(&self, host: Option<&str>, path: &str) -> Result<Option<&Arc<Route>>, &'static str> {
        let host = self.host_key(host)?;
        let host = host.as_deref();
        // Bytes that are no ASCII, sent raw (Pingora passes them on), are read as their encoding
        // every way, as upstreams read them: no route's path holds them raw.
        let mut encoded = String::new();
        let path = match path.is_ascii() {
            true => path,
            false => {
                push_encoded(&mut encoded, path);
                encoded.as_str()
            }
        };
        let normalized = route_path(path)?;
        let sent = self.find(host, path, false);
        let same = |other: Option<&Entry>| match (sent, other) {
            (Some(a), Some(b)) => std::ptr::eq(a, b),
            (a, b) => a.is_none() && b.is_none(),
        };
        if let Cow::Owned(normalized) = &normalized {
            if !same(self.find(host, normalized, false)) {
                return Err(
                    "the path reads as another route's once normalized (;, // or an encoded character)",
                );
            }
        }
        // Rails and Spring read the path normalized, then without its extension: refused when
        // that leads to another route. Only a cut as long as some prefix can (a longer route
        // would have taken the whole path), which bounds the cuts tried.
        if let Some(entry) = sent.filter(|e| e.check_extension) {
            let normalized_differs = matches!(normalized, Cow::Owned(_));
            let readings = std::iter::once(path).chain(normalized_differs.then_some(&*normalized));
            let cuts = readings.flat_map(without_extension).filter(|bare| bare.len() <= self.longest_prefix);
            for bare in cuts {
                for fold in [false, true].into_iter().take(if entry.check_case { 2 } else { 1 }) {
                    if self.find(host, bare, fold).is_some_and(|o| !std::ptr::eq(o, entry)) {
                        return Err(
                            "the path reads as another route's without its extension (as Rails reads .json)",
                        );
                    }
                }
            }
        }
        if sent.is_some_and(|e| e.check_case) {
            let folded_alike = |path: &str| same(self.find(host, path, true));
            let normalized_differs = matches!(normalized, Cow::Owned(_));
            if !folded_alike(path) || (normalized_differs && !folded_alike(&normalized)) {
                return Err("the path reads as another route's when letter case is ignored");
            }
        }
        Ok(sent.map(|e| &e.route))
    }

    /// The host as the table is keyed ([`normalize_host`]), refused if its port is not a number;
    /// `None` when no route names a host, which spares making it (an allocation).
    ///
    /// A request's host holding what ends a host in a URL (`/`, `?`, `#`, `\`, `@`), a space or a
    /// byte that is no ASCII is refused too: `api.example.com/` would be looked up as no route's
    /// host, while an upstream building the request's URL from `Host` (Node's `new URL(req.url,
    /// 'http://' + host)`, and the frameworks built on it) reads `api.example.com`. (A route's
    /// own `host` is checked at config load, with hints.)
    ///
    /// So is a host with a `%` (Node decodes `%73ecure.example.com` to `secure.example.com`) and
    /// an IPv4 address in any form but dotted decimal (`0x0a.9.8.7`, `168364039`, `012.9.8.7`,
    /// which WHATWG URL parsers read as `10.9.8.7`).
    fn host_key(&self, host: Option<&str>) -> Result<Option<String>, &'static str> {
        if host.is_some_and(|h| h.bytes().any(|b| NO_HOST_BYTE[usize::from(b)])) {
            return Err("the host holds a character no host name has (/, ?, #, \\, @, %, a space)");
        }
        let Some(name) = host.map(host_name).transpose()? else { return Ok(None) };
        if odd_ipv4(name) {
            return Err("an IPv4 address is written in dotted decimal (10.9.8.7)");
        }
        Ok((!self.by_host.is_empty()).then(|| fold_name(name)))
    }

    /// Whether some route names a host (so a request's host decides its route).
    pub fn names_hosts(&self) -> bool {
        !self.by_host.is_empty()
    }

    /// All routes, for listing.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.by_host.values().flatten().chain(self.any_host.iter()).map(|e| &e.route)
    }
}

/// The table's entries for `routes` (in the order they are tried), each told whether a route
/// tried before it, among the earlier ones and `before`, could take its paths without regard to
/// case.
fn entries(routes: &[Arc<Route>], before: &[&Arc<Route>]) -> Vec<Entry> {
    routes
        .iter()
        .enumerate()
        .map(|(i, route)| {
            let mut earlier = routes[..i].iter().chain(before.iter().copied());
            let prefix = route.path_prefix.as_str();
            Entry {
                check_case: !route.case_sensitive
                    && earlier.clone().any(|e| could_shadow(&e.path_prefix, prefix)),
                check_extension: route.format_extensions
                    && earlier
                        .any(|e| e.path_prefix.len() > prefix.len() && could_shadow(&e.path_prefix, prefix)),
                route: route.clone(),
            }
        })
        .collect()
}

/// `path` with its last segment's extension dropped at each of its dots
/// (`/shop/admin.v1.json/` -> `/shop/admin`, `/shop/admin.v1`): Rails drops a trailing `/` too.
fn without_extension(path: &str) -> impl Iterator<Item = &str> {
    let path = path.trim_end_matches('/');
    let last = path.rfind('/').map_or(0, |i| i + 1);
    path[last..].match_indices('.').filter(|&(dot, _)| dot > 0).map(move |(dot, _)| &path[..last + dot])
}

/// Whether a route with prefix `earlier`, tried before one with prefix `prefix`, could match a
/// path the latter matches when letter case is ignored and not when it counts. Errs on the safe
/// side: a yes only costs such paths a second lookup.
fn could_shadow(earlier: &str, prefix: &str) -> bool {
    let (earlier, prefix) = (earlier.as_bytes(), prefix.as_bytes());
    match earlier.split_at_checked(prefix.len()) {
        // Longer: a path under `prefix` whose next segments spell the rest of `earlier` in
        // another case (`/shop/ADMIN` beside `/shop/admin`).
        Some((head, rest)) if !rest.is_empty() => {
            caseless_eq(head, prefix) && (prefix.ends_with(b"/") || rest[0] == b'/')
        }
        // As long or shorter: `prefix` itself in another case. One that is exactly a prefix of
        // it already matches every path it does, case-sensitively.
        _ => {
            prefix.get(..earlier.len()).is_some_and(|head| caseless_eq(head, earlier))
                && !prefix.starts_with(earlier)
        }
    }
}

/// The path a request is routed on, or why it is refused.
///
/// Refused: paths that an upstream could read as another path than the one routed on, namely
/// dot-segments, also behind a segment parameter (`/public/../admin`, `/public/..;/admin`), encoded
/// dots and separators (`%2e`, `%2f`, `%5c`) and backslashes.
///
/// Otherwise the path as upstreams that normalize read it: a run of `/` counts as one, a
/// segment's parameters (`;x`, which Tomcat and Jetty drop) are left out, and percent-encoded
/// characters that a route may hold as they are (`%61` for `a`, `%3A` for `:`; see
/// [`decoded_in_routing`]) are decoded, and bytes that are no ASCII (a raw UTF-8 target)
/// encoded (borrowed when that changes nothing). Other
/// upstreams read the path as sent, so the gateway routes a request only when both readings pick
/// the same route: `/api//admin`, `/api;x/admin` and `/api/%61dmin` are refused beside an
/// `/api/admin` route, not routed as `/api`.
pub fn route_path(path: &str) -> Result<Cow<'_, str>, &'static str> {
    // Byte by byte, nothing allocated for a plain path: this runs on every request.
    let bytes = path.as_bytes();
    let mut plain = true;
    let mut segment = 0; // where the current segment starts
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'/' => {
                if matches!(&bytes[segment..i], b"." | b"..") {
                    return Err(DOT_SEGMENT);
                }
                plain &= bytes.get(i + 1) != Some(&b'/');
                segment = i + 1;
            }
            b'\\' => return Err(ENCODED_DOT_OR_SEPARATOR),
            b'%' => match bytes.get(i + 1..i + 3) {
                Some([b'2', b'e' | b'E' | b'f' | b'F'] | [b'5', b'c' | b'C']) => {
                    return Err(ENCODED_DOT_OR_SEPARATOR)
                }
                Some(&[high, low]) => plain &= decoded_in_routing(high, low).is_none(),
                _ => {}
            },
            b';' => plain = false,
            0x80.. => plain = false,
            _ => {}
        }
    }
    if matches!(&bytes[segment..], b"." | b"..") {
        return Err(DOT_SEGMENT);
    }
    if plain {
        return Ok(Cow::Borrowed(path));
    }
    let mut routed = String::with_capacity(path.len());
    for (n, segment) in path.split('/').enumerate() {
        let core = segment.split(';').next().unwrap_or_default();
        if core == "." || core == ".." {
            return Err(DOT_SEGMENT);
        }
        // A separator unless the last segment was empty: runs of `/` become one.
        if n > 0 && !routed.ends_with('/') {
            routed.push('/');
        }
        let mut rest = core;
        while let Some(at) = rest.find('%') {
            let decoded = rest.as_bytes().get(at + 1..at + 3).and_then(|h| decoded_in_routing(h[0], h[1]));
            push_encoded(&mut routed, &rest[..at]);
            match decoded {
                Some(c) => {
                    routed.push(c);
                    rest = &rest[at + 3..];
                }
                None => {
                    routed.push('%');
                    rest = &rest[at + 1..];
                }
            }
        }
        push_encoded(&mut routed, rest);
    }
    Ok(Cow::Owned(routed))
}

/// Appends `text` with each byte that is no ASCII percent-encoded (upper-case hex), as a route's
/// path holds it: Pingora hands a raw UTF-8 target on as sent, and upstreams (Go, Spring) read
/// `/café` as `/caf%C3%A9`.
fn push_encoded(routed: &mut String, text: &str) {
    if text.is_ascii() {
        routed.push_str(text);
        return;
    }
    use std::fmt::Write as _;
    for b in text.bytes() {
        match b {
            0x80.. => {
                let _ = write!(routed, "%{b:02X}");
            }
            _ => routed.push(char::from(b)),
        }
    }
}

const DOT_SEGMENT: &str = "the path has a dot-segment (./ or ../)";
const ENCODED_DOT_OR_SEPARATOR: &str = "the path has an encoded dot or separator, or a backslash";

/// The character that `%<high><low>` encodes, if routing reads it decoded: one a route's path
/// may hold as it is and upstreams decode alike: the unreserved ones (RFC 3986, section 2.3; the
/// dot is not among them here, since an encoded dot is refused), the sub-delimiters but `;`
/// (so `*` among them), `:` and `@` too, and the `|`, `[`, `]` and `^` that clients send as
/// they are. So
/// `/v1/items%3Abatch` reads as `/v1/items:batch`, and is refused where that is another route's.
fn decoded_in_routing(high: u8, low: u8) -> Option<char> {
    let hex = |d: u8| char::from(d).to_digit(16);
    let c = char::from(u8::try_from(hex(high)? * 16 + hex(low)?).ok()?);
    let kept = c.is_ascii_alphanumeric()
        || matches!(
            c,
            '-' | '_' | '~' | '!' | '$' | '&' | '\'' | '(' | ')' | '*' | '+' | ',' | '=' | ':' | '@'
        )
        || matches!(c, '|' | '[' | ']' | '^');
    kept.then_some(c)
}

/// Lowercases a host and drops a port and the root's trailing dot (`API.example.com.:8080` ->
/// `api.example.com`): the forms name the same host, and a route for it must not be missed. A
/// port that is not a number is refused ([`host_name`]).
pub fn normalize_host(host: &str) -> Result<String, &'static str> {
    host_name(host).map(fold_name)
}

/// A host without its port (`api.example.com:8080` -> `api.example.com`, `[::1]:80` -> `[::1]`),
/// or why it is refused: a port that is not a number of at most five digits (`example.com:abc`,
/// `a:b:80`). Upstreams drop such a port to read the name (Go's `net.SplitHostPort` does not check
/// it), while a lookup of the whole text would miss the host's routes. An empty port is allowed
/// (RFC 3986, section 3.2.3).
fn host_name(host: &str) -> Result<&str, &'static str> {
    const BAD_PORT: &str = "the host's port is not a number";
    let (name, port) = if host.starts_with('[') {
        // An IPv6 literal keeps its colons inside the brackets.
        host.find(']').map(|end| host.split_at(end + 1)).ok_or(BAD_PORT)?
    } else {
        host.find(':').map_or((host, ""), |at| host.split_at(at))
    };
    match port.strip_prefix(':') {
        None if port.is_empty() => Ok(name),
        Some(digits) if digits.len() <= 5 && digits.bytes().all(|b| b.is_ascii_digit()) => Ok(name),
        _ => Err(BAD_PORT),
    }
}

/// Whether a host (without its port) is an IPv4 address written otherwise than in dotted decimal:
/// a URL parser takes a host whose last label is a number (decimal, `0x` hex, or octal by a
/// leading zero) for an address, in any of its forms.
fn odd_ipv4(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    let last = name.rsplit('.').next().unwrap_or_default();
    let hex = last.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("0x"));
    let numeric = match hex {
        true => last[2..].bytes().all(|b| b.is_ascii_hexdigit()),
        false => !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()),
    };
    numeric && !dotted_decimal(name)
}

/// Whether `name` is four decimal numbers of at most 255 without a leading zero, dot-separated:
/// one pass, nothing allocated (a request to an address runs it; Rust's `Ipv4Addr` parser costs
/// several times as much).
fn dotted_decimal(name: &str) -> bool {
    let (mut labels, mut value, mut digits) = (1, 0u16, 0);
    for b in name.bytes() {
        match b {
            b'.' if digits > 0 => (labels, value, digits) = (labels + 1, 0, 0),
            // A second digit after a leading zero, or a fourth, or past 255.
            b'0'..=b'9' if !(digits == 1 && value == 0) && digits < 3 => {
                value = value * 10 + u16::from(b - b'0');
                digits += 1;
                if value > 255 {
                    return false;
                }
            }
            _ => return false,
        }
    }
    digits > 0 && labels == 4
}

/// The bytes no host name holds: what ends a host in a URL (`/`, `?`, `#`, `\`, `@`), a `%` (URL
/// parsers decode it), a space or control character, and every byte that is no ASCII. A table,
/// as every request's `Host` is read through it.
const NO_HOST_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = b <= 0x20 || b >= 0x7f || matches!(b as u8, b'/' | b'?' | b'#' | b'\\' | b'@' | b'%');
        b += 1;
    }
    table
};

/// A host name as routes are keyed: lowercase, without the root's trailing dot.
fn fold_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perm(name: &str) -> RequiredPermission {
        RequiredPermission { name: name.into(), bit: PermSet::EMPTY }
    }

    fn spec(name: &str, host: Option<&str>, prefix: &str) -> RouteSpec {
        RouteSpec {
            name: name.into(),
            host: host.map(str::to_string),
            path_prefix: prefix.into(),
            upstreams: vec!["127.0.0.1:1".parse().unwrap()],
            timeouts: Default::default(),
            org: "o".into(),
            project: "p".into(),
            environment: "e".into(),
            public: false,
            query_token: false,
            identity_jwt: false,
            identity_audience: None,
            preserve_header_case: false,
            case_sensitive: false,
            format_extensions: true,
            methods: HashMap::from([(http::Method::DELETE, perm("admin"))]),
            read_default: perm("read"),
            write_default: perm("write"),
        }
    }

    fn route(name: &str, host: Option<&str>, prefix: &str) -> Route {
        Route::new(spec(name, host, prefix))
    }

    fn table() -> RouteTable {
        RouteTable::new(vec![
            route("root", None, "/"),
            route("api", None, "/api"),
            route("api-v2", None, "/api/v2/"),
            route("host-api", Some("shop.example.com"), "/api"),
        ])
    }

    #[test]
    fn a_path_must_reach_the_same_route_with_its_extension_dropped() {
        let t = RouteTable::new(vec![
            route("root", None, "/"),
            route("shop", None, "/shop"),
            route("admin", None, "/shop/admin"),
            route("v2", None, "/api/v2/"),
            route("v21", None, "/api/v2.1"),
            route("api", None, "/api"),
        ]);
        let name = |path: &str| t.route(None, path).map(|r| r.map(|r| r.name.as_str()));
        for (path, expected) in [
            ("/shop/items.json", "shop"),
            ("/shop/admin/users.json", "admin"),
            ("/shop/admin.json/x", "shop"),
            ("/robots.txt", "root"),
            ("/.well-known/x", "root"),
            ("/shop/.hidden", "shop"),
        ] {
            assert_eq!(name(path), Ok(Some(expected)), "{path}");
        }
        // Rails runs `/shop/admin(.:format)` for these (and `/api/v2.1(.:format)`): the longer
        // route's, not the one the path as sent matches. Rails reads `//` as `/` and drops a
        // trailing `/`.
        for path in [
            "/shop/admin.json",
            "/shop/admin.",
            "/shop/Admin.json",
            "/shop.json",
            "/shop/admin.json/",
            "/shop//admin.json",
            "/api/v2.1.json",
            // A prefix ending in `/` covers its path without it (see `matching`).
            "/api/v2.json",
        ] {
            assert!(name(path).is_err(), "{path}");
        }
        // A route whose upstream serves `.ext` paths as they are (a static site) says so.
        let t = RouteTable::new(vec![
            Route::new(RouteSpec { format_extensions: false, ..spec("shop", None, "/shop") }),
            route("admin", None, "/shop/admin"),
        ]);
        assert_eq!(t.route(None, "/shop/admin.json").map(|r| r.map(|r| r.name.as_str())), Ok(Some("shop")));
    }

    #[test]
    fn matching() {
        let t = table();
        let check = |host: Option<&str>, path: &str, expected: Option<&str>| {
            let found = t.route(host, path).unwrap();
            assert_eq!(found.map(|r| r.name.as_str()), expected, "{host:?} {path}");
        };
        check(None, "/api", Some("api"));
        check(None, "/api/users", Some("api"));
        check(None, "/apix", Some("root"));
        check(None, "/api/v2/x", Some("api-v2"));
        // `/api/v2/` covers `/api/v2` too, which upstreams serve alike.
        check(None, "/api/v2", Some("api-v2"));
        check(None, "/api/v2?x=1", Some("api-v2"));
        check(None, "/api/v2x", Some("api"));
        check(Some("SHOP.example.com:8443"), "/api/x", Some("host-api"));
        check(Some("shop.example.com"), "/other", Some("root"));
        check(Some("other.example.com"), "/api", Some("api"));
        let no_root = RouteTable::new(vec![route("api", None, "/api")]);
        assert!(no_root.route(None, "/nothing").unwrap().is_none());
    }

    #[test]
    fn method_permissions() {
        let r = route("r", None, "/");
        let check = |m: http::Method, expected: &str| assert_eq!(r.required_permission(&m).name, expected);
        check(http::Method::GET, "read");
        check(http::Method::HEAD, "read");
        check(http::Method::OPTIONS, "read");
        check(http::Method::POST, "write");
        check(http::Method::PATCH, "write");
        check(http::Method::DELETE, "admin");
    }

    #[test]
    fn upstreams_round_robin_passing_over_one_that_failed() {
        let mut r = route("r", None, "/");
        r.upstreams = (1..=3).map(|p| SocketAddr::from(([127, 0, 0, 1], p))).collect();
        r.upstream_down_until = r.upstreams.iter().map(|_| std::sync::atomic::AtomicI64::new(0)).collect();
        let ports =
            |r: &Route| -> Vec<u16> { (0..6).map(|_| r.upstream_after(None).unwrap().1.port()).collect() };
        assert_eq!(ports(&r), [1, 2, 3, 1, 2, 3]);
        // After a failed try, the next address; and the failed one is passed over meanwhile.
        let (i, first) = r.upstream_after(None).unwrap();
        assert_eq!(first.port(), 1);
        r.upstream_failed(i);
        assert_eq!(r.upstream_after(Some(i)).unwrap().1.port(), 2);
        let mut shared = ports(&r);
        shared.sort();
        assert_eq!(shared, [2, 2, 2, 3, 3, 3], "the others share its load evenly");
        // Every one failed: round robin again rather than nothing.
        for i in 0..3 {
            r.upstream_failed(i);
        }
        assert_eq!(ports(&r).len(), 6);
    }

    #[test]
    fn paths_that_could_be_read_as_another_path_are_refused() {
        for bad in [
            "/public/../shop",
            "/./shop",
            "/shop/..",
            "/public/..;/shop",
            "/public/.;x/shop",
            "/public;a/..;b/shop",
            "/a/%2e%2e/b",
            "/a/%2E/b",
            "/a%2fb",
            "/a%2Fb",
            "/a%5Cb",
            "/a%5cb",
            "/a\\b",
        ] {
            assert!(route_path(bad).is_err(), "{bad}");
        }
        for plain in [
            "/",
            "/shop/items",
            "/a/.well-known/x",
            "/a/..b/c",
            "/files/v1.2.3",
            "/q%20x",
            "/a%2",
            "/a%",
            "/a%252e",
            "/a%C3%A9",
        ] {
            assert_eq!(route_path(plain), Ok(Cow::Borrowed(plain)), "{plain}");
        }
    }

    #[test]
    fn paths_are_normalized_as_upstreams_read_them() {
        for (sent, routed) in [
            ("/api//admin", "/api/admin"),
            ("//api///admin/", "/api/admin/"),
            ("/api;x/admin", "/api/admin"),
            ("/api/admin;jsessionid=1/users", "/api/admin/users"),
            ("/api/admin/;x", "/api/admin/"),
            ("/api/%61dmin", "/api/admin"),
            ("/api/%41%2D%5f%7E%30", "/api/A-_~0"),
            ("/api/%61%20%zz%", "/api/a%20%zz%"),
        ] {
            assert_eq!(route_path(sent).as_deref(), Ok(routed), "{sent}");
        }
        let table = RouteTable::new(vec![route("admin", None, "/api/admin"), route("api", None, "/api")]);
        for sent in ["/api/%61dmin/users", "/api;x/admin/users", "/api/admin;x/users", "/api//admin/users"] {
            let path = route_path(sent).unwrap();
            assert_eq!(table.route(None, &path).unwrap().unwrap().name, "admin", "{sent}");
            assert!(table.route(None, sent).is_err(), "{sent}: the path as sent finds another route");
        }
        for (sent, name) in [("/api/admin/x;v=1", "admin"), ("/api//items", "api"), ("/api/%7Ex", "api")] {
            assert_eq!(table.route(None, sent).unwrap().unwrap().name, name, "{sent}");
        }
        // A character a route holds as it is, sent encoded: the decoded reading finds that route,
        // so the path as sent (another route's) is refused, not routed by the broader prefix.
        let table = RouteTable::new(vec![
            route("batch", None, "/v1/items:batch"),
            route("logs", None, "/logs-*"),
            route("root", None, "/"),
        ]);
        for sent in ["/v1/items%3Abatch", "/v1/items%3abatch/x", "/logs-%2A/_search"] {
            assert!(table.route(None, sent).is_err(), "{sent}");
        }
        for (sent, name) in [("/v1/items:batch", "batch"), ("/logs-*/_search", "logs"), ("/v1/a%3Ab", "root")]
        {
            assert_eq!(table.route(None, sent).unwrap().unwrap().name, name, "{sent}");
        }
        assert_eq!(route_path("/a%3B%22%7B%25").as_deref(), Ok("/a%3B%22%7B%25"), "left encoded");
    }

    #[test]
    fn host_normalization() {
        let check = |host: &str, expected: &str| assert_eq!(normalize_host(host).as_deref(), Ok(expected));
        check("API.Example.com:8080", "api.example.com");
        check("example.com", "example.com");
        check("[::1]:80", "[::1]");
        check("[::1]", "[::1]");
        check("API.example.com.:443", "api.example.com");
        check("example.com.", "example.com");
        check("example.com:", "example.com");
    }

    #[test]
    fn a_percent_escape_matches_in_either_case() {
        // Clients differ in the case of an escape's hex digits; a route's path holds them in
        // upper case, as browsers send them.
        let table = RouteTable::new(vec![route("cafe", None, "/pub/caf%C3%A9"), route("pub", None, "/pub")]);
        for path in ["/pub/caf%C3%A9/x", "/pub/caf%c3%a9/x", "/pub/caf%C3%a9"] {
            assert_eq!(table.route(None, path).unwrap().unwrap().name, "cafe", "{path}");
        }
        // Sent raw, as UTF-8 (Pingora hands such a target on as it came): read as its encoding,
        // as upstreams read it, so it is cafe's, not `/pub`'s.
        assert_eq!(table.route(None, "/pub/café/x").unwrap().unwrap().name, "cafe");
        // Only the hex digits of an escape: a letter elsewhere still counts its case (and an
        // upstream that ignores it would read cafe's route: refused), an encoded one too.
        assert!(table.route(None, "/pub/CAF%C3%A9").is_err());
        assert!(table.route(None, "/pub/caf%C3%89/x").is_err(), "É");
        assert!(table.route(None, "/pub/CAFÉ/x").is_err(), "É sent raw");
    }

    #[test]
    fn a_host_whose_port_is_not_a_number_is_refused() {
        for bad in
            ["api.example.com:abc", "api.example.com:80x", "a:b:80", "a:123456", "[::1]:x", "[::1]x", "[::1"]
        {
            assert!(normalize_host(bad).is_err(), "{bad}");
        }
        // Refused whether or not a route names a host, rather than routed to any host's routes.
        let hosted = RouteTable::new(vec![
            route("vault", Some("api.example.com"), "/vault"),
            route("open", None, "/vault"),
        ]);
        let anywhere = RouteTable::new(vec![route("open", None, "/vault")]);
        for table in [&hosted, &anywhere] {
            assert!(table.route(Some("api.example.com:abc"), "/vault").is_err());
            // Nor one an upstream building a URL from it reads as `api.example.com`.
            for bad in [
                "api.example.com/",
                "api.example.com?",
                "api.example.com#x",
                "api.example.com\\",
                "u@api.example.com",
                "api.example.com x",
                "api.exämple.com",
                // Read by URL parsers as another host, or as 10.9.8.7.
                "%61pi.example.com",
                "api%2Eexample.com",
                "0x0a.9.8.7",
                "10.9.2055",
                "168364039",
                "012.9.8.7",
            ] {
                assert!(table.route(Some(bad), "/vault").is_err(), "{bad}");
            }
            for good in [
                "10.9.8.7",
                "10.9.8.7:8080",
                "[::1]:80",
                "10.9.8.7.:80",
                "xn--bcher-kva.example",
                "svc_a.internal.",
                "v2.example",
            ] {
                assert!(table.route(Some(good), "/vault").is_ok(), "{good}");
            }
        }
        assert_eq!(hosted.route(Some("API.example.com:8443"), "/vault").unwrap().unwrap().name, "vault");
    }

    #[test]
    fn head_needs_what_get_needs_unless_listed() {
        let mut get_only = spec("r", None, "/");
        get_only.methods.insert(http::Method::GET, perm("admin"));
        let r = Route::new(get_only);
        assert_eq!(r.required_permission(&http::Method::HEAD).name, "admin");
        assert_eq!(r.required_permission(&http::Method::OPTIONS).name, "read");
        let mut both = spec("r", None, "/");
        both.methods.insert(http::Method::GET, perm("admin"));
        both.methods.insert(http::Method::HEAD, perm("write"));
        assert_eq!(Route::new(both).required_permission(&http::Method::HEAD).name, "write");
    }

    #[test]
    fn a_path_that_reads_as_another_route_s_without_case_is_refused() {
        let table = RouteTable::new(vec![
            route("shop", None, "/shop"),
            route("shop-admin", None, "/shop/admin"),
            route("api", None, "/api"),
            route("root", None, "/"),
            route("host-vault", Some("api.example.com"), "/Vault"),
            route("vault", None, "/vault"),
        ]);
        let check = |host: Option<&str>, path: &str, expected: Result<Option<&str>, ()>| {
            let found = table.route(host, path).map(|r| r.map(|r| r.name.as_str())).map_err(drop);
            assert_eq!(found, expected, "{host:?} {path}");
        };
        for refused in
            ["/shop/ADMIN/users", "/shop/Admin", "/SHOP/admin/users", "/Shop/x", "/API", "/shop//ADMIN/x"]
        {
            check(None, refused, Err(()));
        }
        check(Some("api.example.com"), "/vault/x", Err(()));
        // Case that lands on the same route either way is the upstream's business.
        check(None, "/shop/Items", Ok(Some("shop")));
        check(None, "/shop/admin/Users", Ok(Some("shop-admin")));
        check(None, "/api/ADMIN", Ok(Some("api")));
        check(None, "/Other", Ok(Some("root")));
        check(Some("api.example.com"), "/Vault/x", Ok(Some("host-vault")));
        check(Some("other.example"), "/vault/x", Ok(Some("vault")));
        check(Some("other.example"), "/Vault/x", Err(()));
        let no_root = RouteTable::new(vec![route("shop-admin", None, "/shop/admin")]);
        assert_eq!(no_root.route(None, "/shop/ADMIN").unwrap().map(|r| r.name.as_str()), None);

        // A route whose upstream compares paths exactly says so, and its paths are its own.
        let exact = |name: &str, prefix: &str| {
            Route::new(RouteSpec { case_sensitive: true, ..spec(name, None, prefix) })
        };
        let table = RouteTable::new(vec![
            exact("repos", "/repos"),
            route("repo-admin", None, "/repos/admin"),
            exact("root", "/"),
        ]);
        for (path, expected) in
            [("/repos/Admin/issues", "repos"), ("/API", "root"), ("/repos/admin/x", "repo-admin")]
        {
            assert_eq!(table.route(None, path).unwrap().map(|r| r.name.as_str()), Some(expected), "{path}");
        }
    }

    #[test]
    fn only_prefixes_that_can_read_alike_make_a_route_check_case() {
        for (earlier, prefix, expected) in [
            ("/shop/admin", "/shop", true),
            ("/shop/Admin", "/shop", true),
            ("/Shop/admin", "/shop", true),
            ("/Shop", "/shop", true),
            ("/api/v2/", "/api/", true),
            ("/shop", "/", true),
            ("/shopping", "/shop", false),
            ("/blog/admin", "/shop", false),
            ("/shop", "/shop", false),
            // Shorter (a host's route before any host's): only in another case.
            ("/Shop", "/shop/admin", true),
            ("/shop", "/shop/admin", false),
            ("/", "/shop", false),
        ] {
            assert_eq!(could_shadow(earlier, prefix), expected, "{earlier} before {prefix}");
        }
    }
}
