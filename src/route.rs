//! The route table: which upstream, org, project and environment a request belongs to, and which
//! permission each HTTP method needs there. Built once per config; matching is pure.

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
    /// Permission per method; methods not listed use `read_default` or `write_default`.
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
            methods: spec.methods,
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

    /// All routes, for listing.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.by_host.values().flatten().chain(self.any_host.iter())
    }
}

/// Refuses paths that an upstream could read as another path than the one routed on: dot-segments
/// (`/public/../admin`), encoded dots and separators (`%2e`, `%2f`, `%5c`) and backslashes. Routing
/// on the raw path is then the same as routing on the normalised one.
pub fn check_path(path: &str) -> Result<(), &'static str> {
    // Byte by byte, nothing allocated: this runs on every request.
    let bytes = path.as_bytes();
    let mut segments = bytes.split(|&b| b == b'/');
    if segments.any(|segment| segment == b"." || segment == b"..") {
        return Err("the path has a dot-segment (./ or ../)");
    }
    let encoded_dot_or_separator = |i: usize| {
        matches!(bytes.get(i + 1..i + 3), Some([b'2', b'e' | b'E' | b'f' | b'F'] | [b'5', b'c' | b'C']))
    };
    if bytes.iter().enumerate().any(|(i, &b)| b == b'\\' || (b == b'%' && encoded_dot_or_separator(i))) {
        return Err("the path has an encoded dot or separator, or a backslash");
    }
    Ok(())
}

/// Lowercases a host and drops a port (`API.example.com:8080` -> `api.example.com`).
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
    without_port.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perm(name: &str) -> RequiredPermission {
        RequiredPermission { name: name.into(), bit: PermSet::EMPTY }
    }

    fn route(name: &str, host: Option<&str>, prefix: &str) -> Route {
        Route::new(RouteSpec {
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
        })
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
            "/a/%2e%2e/b",
            "/a/%2E/b",
            "/a%2fb",
            "/a%2Fb",
            "/a%5Cb",
            "/a%5cb",
            "/a\\b",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        for good in [
            "/",
            "/shop/items",
            "/a/.well-known/x",
            "/a/..b/c",
            "/files/v1.2.3",
            "/q%20x",
            "/a%2",
            "/a%",
            "/a%252e",
        ] {
            assert_eq!(check_path(good), Ok(()), "{good}");
        }
    }

    #[test]
    fn host_normalization() {
        assert_eq!(normalize_host("API.Example.com:8080"), "api.example.com");
        assert_eq!(normalize_host("example.com"), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
    }
}
