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
    /// Whether header names keep the case they were sent in, both ways. Off: Pingora writes
    /// standard names in their usual capitalization and every other name in lowercase, which
    /// spares its second, case-keeping header map and a parse of every inserted name.
    pub preserve_header_case: bool,
    /// Permission per method; methods not listed use `read_default` or `write_default`. HEAD,
    /// unless listed, has GET's when GET is listed (see [`Route::new`]).
    pub methods: HashMap<http::Method, RequiredPermission>,
    /// Required for GET, HEAD and OPTIONS unless listed.
    pub read_default: RequiredPermission,
    /// Required for every other method unless listed.
    pub write_default: RequiredPermission,
    next_upstream: AtomicUsize,
    /// This route's `allowed` request counter, looked up once rather than by its labels on every
    /// request.
    pub allowed_requests: std::sync::OnceLock<prometheus::IntCounter>,
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
    /// See [`Route::preserve_header_case`].
    pub preserve_header_case: bool,
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
            upstreams: spec.upstreams,
            org: spec.org,
            project: spec.project,
            environment: spec.environment,
            public: spec.public,
            query_token: spec.query_token,
            identity_jwt: spec.identity_jwt,
            preserve_header_case: spec.preserve_header_case,
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

    /// The next upstream address, round robin.
    pub fn next_upstream(&self) -> Option<SocketAddr> {
        let n = self.upstreams.len();
        (n > 0).then(|| self.upstreams[self.next_upstream.fetch_add(1, Ordering::Relaxed) % n])
    }

    fn matches_path(&self, path: &str) -> bool {
        let prefix = self.path_prefix.as_str();
        match path.strip_prefix(prefix) {
            Some(rest) => {
                prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')
            }
            None => false,
        }
    }
}

/// Routes grouped by host, each group ordered longest prefix first.
#[derive(Debug, Default)]
pub struct RouteTable {
    by_host: HashMap<String, Vec<Arc<Route>>>,
    any_host: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Builds the table.
    pub fn new(routes: Vec<Route>) -> RouteTable {
        let mut table = RouteTable::default();
        for route in routes {
            let route = Arc::new(route);
            match &route.host {
                Some(h) => table.by_host.entry(h.clone()).or_default().push(route),
                None => table.any_host.push(route),
            }
        }
        let longest_first = |v: &mut Vec<Arc<Route>>| {
            v.sort_by_key(|r| std::cmp::Reverse(r.path_prefix.len()));
        };
        table.by_host.values_mut().for_each(longest_first);
        longest_first(&mut table.any_host);
        table
    }

    /// Matches host first (routes naming the host, then routes for any host), then the longest
    /// path prefix. `host` may carry a port and any case.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        // Most tables name no host: then the host need not be normalized (an allocation) at all.
        let host = host.filter(|_| !self.by_host.is_empty()).map(normalize_host);
        let named = host.as_deref().and_then(|h| self.by_host.get(h));
        named.into_iter().flatten().chain(self.any_host.iter()).find(|r| r.matches_path(path))
    }

    /// The route of a request for `path` on `host`, or why the path is refused ([`route_path`]).
    /// Upstreams differ in how they read `;`, `//` and encoded characters, so a path that needs
    /// normalizing must reach the same route read either way (or no route at all).
    pub fn route(&self, host: Option<&str>, path: &str) -> Result<Option<&Arc<Route>>, &'static str> {
        match route_path(path)? {
            Cow::Borrowed(_) => Ok(self.find(host, path)),
            Cow::Owned(normalized) => match (self.find(host, path), self.find(host, &normalized)) {
                (Some(a), Some(b)) if Arc::ptr_eq(a, b) => Ok(Some(a)),
                (None, None) => Ok(None),
                _ => Err("the path reads as another route's once normalized (;, // or an encoded character)"),
            },
        }
    }

    /// All routes, for listing.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.by_host.values().flatten().chain(self.any_host.iter())
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
/// unreserved characters (`%61` for `a`) are decoded (borrowed when that changes nothing). Other
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
                Some(&[high, low]) => plain &= unreserved(high, low).is_none(),
                _ => {}
            },
            b';' => plain = false,
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
            let decoded = rest.as_bytes().get(at + 1..at + 3).and_then(|h| unreserved(h[0], h[1]));
            routed.push_str(&rest[..at]);
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
        routed.push_str(rest);
    }
    Ok(Cow::Owned(routed))
}

const DOT_SEGMENT: &str = "the path has a dot-segment (./ or ../)";
const ENCODED_DOT_OR_SEPARATOR: &str = "the path has an encoded dot or separator, or a backslash";

/// The unreserved character (RFC 3986, section 2.3) that `%<high><low>` encodes, if it is one;
/// the dot is not among them here, since an encoded dot is refused.
fn unreserved(high: u8, low: u8) -> Option<char> {
    let hex = |d: u8| char::from(d).to_digit(16);
    let c = char::from(u8::try_from(hex(high)? * 16 + hex(low)?).ok()?);
    (c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '~')).then_some(c)
}

/// Lowercases a host and drops a port and the root's trailing dot (`API.example.com.:8080` ->
/// `api.example.com`): the forms name the same host, and a route for it must not be missed.
pub fn normalize_host(host: &str) -> String {
    let without_port = if let Some(end) = host.strip_prefix('[').and_then(|_| host.find(']')) {
        // An IPv6 literal keeps its colons inside the brackets.
        &host[..=end]
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    let name = without_port.strip_suffix('.').unwrap_or(without_port);
    name.to_ascii_lowercase()
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
            org: "o".into(),
            project: "p".into(),
            environment: "e".into(),
            public: false,
            query_token: false,
            identity_jwt: false,
            preserve_header_case: false,
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
    fn matching() {
        let t = table();
        let check = |host: Option<&str>, path: &str, expected: Option<&str>| {
            assert_eq!(t.find(host, path).map(|r| r.name.as_str()), expected, "{host:?} {path}");
        };
        check(None, "/api", Some("api"));
        check(None, "/api/users", Some("api"));
        check(None, "/apix", Some("root"));
        check(None, "/api/v2/x", Some("api-v2"));
        check(None, "/api/v2", Some("api"));
        check(Some("SHOP.example.com:8443"), "/api/x", Some("host-api"));
        check(Some("shop.example.com"), "/other", Some("root"));
        check(Some("other.example.com"), "/api", Some("api"));
        let no_root = RouteTable::new(vec![route("api", None, "/api")]);
        assert!(no_root.find(None, "/nothing").is_none());
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
    fn upstreams_round_robin() {
        let mut r = route("r", None, "/");
        r.upstreams = vec!["127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap()];
        let ports: Vec<u16> = (0..4).map(|_| r.next_upstream().unwrap().port()).collect();
        assert_eq!(ports, [1, 2, 1, 2]);
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
            assert_eq!(table.find(None, &path).unwrap().name, "admin", "{sent}");
            assert!(table.route(None, sent).is_err(), "{sent}: the path as sent finds another route");
        }
        for (sent, name) in [("/api/admin/x;v=1", "admin"), ("/api//items", "api"), ("/api/%7Ex", "api")] {
            assert_eq!(table.route(None, sent).unwrap().unwrap().name, name, "{sent}");
        }
    }

    #[test]
    fn host_normalization() {
        assert_eq!(normalize_host("API.Example.com:8080"), "api.example.com");
        assert_eq!(normalize_host("example.com"), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("API.example.com.:443"), "api.example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
    }
}
