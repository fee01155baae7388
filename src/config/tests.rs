//! Config validation: every error, each with its YAML path.

use super::*;

const GOOD: &str = r#"
listen: 127.0.0.1:18080
store:
  redis: { url: "redis://127.0.0.1:6379" }
  timeout: 250ms
credentials: { api_key_header: X-API-Key }
orgs:
  acme:
    projects:
      shop: { environments: [production, staging] }
routes:
  - name: shop
    path: /shop
    upstream: 127.0.0.1:9000
    org: acme
    project: shop
    environment: production
    query_token: true
    permissions: { DELETE: admin }
  - path: /health
    upstream: 127.0.0.1:9000
    auth: none
"#;

fn errors(yaml: &str) -> Vec<String> {
    match Config::parse(yaml) {
        Ok(_) => vec![],
        Err(e) => e.issues.iter().map(|i| format!("{}: {}", i.path, i.message)).collect(),
    }
}

/// Checks that parsing fails and that each expected fragment appears in some error line.
fn check(yaml: &str, expected: &[&str]) {
    let errs = errors(yaml);
    for want in expected {
        assert!(errs.iter().any(|e| e.contains(want)), "no error containing {want:?} in {errs:#?}");
    }
    assert_eq!(errs.len(), expected.len(), "{errs:#?}");
}

#[test]
fn a_good_config_loads() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.listen.port(), 18080);
    assert_eq!(c.store.timeout, Duration::from_millis(250));
    assert_eq!(c.credentials.api_key_header.as_ref().map(|h| h.as_str()), Some("x-api-key"));
    let r = c.routes.route(None, "/shop/items").unwrap().unwrap();
    assert!(r.query_token);
    assert_eq!(r.required_permission(&http::Method::DELETE).name, "admin");
    assert!(c.routes.route(None, "/health").unwrap().unwrap().public);
    assert_eq!(c.identity.header(IdentityField::Subject), Some("x-auth-subject"));
}

#[test]
fn an_empty_file_is_a_valid_config_with_defaults() {
    let c = Config::parse("").unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    assert!(c.store.redis.is_none());
}

#[test]
fn every_unknown_field_is_reported_with_its_path() {
    let yaml = GOOD
        .replace("    query_token: true", "    query_token: true\n    colour: blue")
        .replace("listen:", "lisen: x\nlisten:");
    check(&yaml, &["lisen: unknown field", "routes[0].colour: unknown field"]);
}

#[test]
fn semantic_errors_are_all_collected() {
    let yaml = GOOD
        .replace("upstream: 127.0.0.1:9000\n    org", "upstream: not-an-address\n    org")
        .replace("environment: production", "environment: prod")
        .replace("timeout: 250ms", "timeout: soon")
        .replace("DELETE: admin", "DELETE: superpower");
    check(
        &yaml,
        &[
            "store.timeout: not a duration",
            "routes[0].upstream: \"not-an-address\"",
            "routes[0].environment: environment \"prod\" is not one of",
            "routes[0].permissions.DELETE: permission \"superpower\" is granted by no role",
        ],
    );
}

#[test]
fn a_route_permission_only_a_scope_preset_names_and_an_admin_role_without_admin_are_refused() {
    // Nobody could ever make the POST: every role lacks `deploy`, whatever a token's scope says.
    let yaml = format!("scopes:\n  deploy: [deploy]\n{}", GOOD.replace("DELETE: admin", "DELETE: deploy"));
    check(&yaml, &["routes[0].permissions.DELETE: permission \"deploy\" is granted by no role"]);
    // Admin-only admin calls need the `admin` permission as well as the admin role.
    let yaml = format!(
        "roles:\n  admin: [read, write, execute]\n{}",
        GOOD.replace("DELETE: admin", "DELETE: write")
    );
    check(&yaml, &["roles.admin: must keep the admin permission"]);
    // The defaults a route falls back on need no role: without `write`, the gateway is read-only.
    let read_only = "roles: { editor: [read, execute], admin: [read, execute, admin] }\n";
    let yaml = format!("{read_only}{}", GOOD.replace("DELETE: admin", "DELETE: execute"));
    check(&yaml, &[]);
    // With the roles unreadable, a preset's permission is not judged against the defaults.
    let yaml = format!(
        "roles: {{ editor: deploy }}\nscopes: {{ deploy: [deploy] }}\n{}",
        GOOD.replace("DELETE: admin", "DELETE: deploy")
    );
    check(&yaml, &["roles.editor: invalid type"]);
}

#[test]
fn structural_errors() {
    check("listen: nowhere", &["listen: \"nowhere\" is not an address"]);
    // A port the kernel picks is one no client could find.
    check(
        "listen: '127.0.0.1:0'\nadmin: { listen: '[::1]:0' }\n",
        &["listen: \"127.0.0.1:0\" has port 0", "admin.listen: \"[::1]:0\" has port 0"],
    );
    check(
        "routes:\n  - path: /x\n    upstream: 127.0.0.1:1\n",
        &["routes[0].org: missing", "routes[0].project: missing", "routes[0].environment: missing"],
    );
    check("routes:\n  - upstream: 127.0.0.1:1\n    auth: none\n", &["routes[0].path: missing"]);
    check("routes:\n  - path: /x\n    auth: none\n", &["routes[0].upstream: missing"]);
    // Said at the key written.
    check(
        "routes:\n  - { path: /x, upstreams: [], auth: none }\n",
        &["routes[0].upstreams: list at least one"],
    );
    check(
        "routes:\n  - { path: /x, upstreams: ['nonexistent.invalid:1'], auth: none }\n",
        &["routes[0].upstreams[0]: \"nonexistent.invalid:1\""],
    );
    check(
        "routes:\n  - { path: /x, host: 'https://api.example.com', upstream: 127.0.0.1:1, auth: none }\n",
        &["routes[0].host: \"https://api.example.com\": a host name without a scheme"],
    );
    check(
        "routes:\n  - { path: /files/%7Ebob, upstream: 127.0.0.1:1, auth: none }\n  - { path: /a//b, upstream: 127.0.0.1:1, auth: none }\n  - { path: /a/../b, upstream: 127.0.0.1:1, auth: none }\n",
        &[
            "routes[0].path: \"/files/%7Ebob\" is not in normal form; write \"/files/~bob\"",
            "routes[1].path: \"/a//b\" is not in normal form; write \"/a/b\"",
            "routes[2].path: \"/a/../b\": the path has a dot-segment",
        ],
    );
    check(
        "routes:\n  - { path: /x, upstream: 'http://127.0.0.1:9000', auth: none }\n",
        &["routes[0].upstream: \"http://127.0.0.1:9000\": give host:port, without a scheme"],
    );
    // An upstream's password, with a scheme or without, or where a list was expected, is never
    // repeated (errors reach stderr, --json output and the reload log).
    let yaml = "routes:\n  \
                - { path: /x, upstream: 'http://svc:S3cret@127.0.0.1:9000', auth: none }\n  \
                - { path: /y, upstream: 'svc:S3cret@127.0.0.1:9000', auth: none }\n  \
                - { path: /z, upstreams: 'http://svc:S3cret@127.0.0.1:9000', auth: none }\n";
    let errs = errors(yaml);
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(errs.iter().any(|e| e.contains("\"http://***@127.0.0.1:9000\": give host:port")), "{errs:#?}");
    assert!(errs.iter().all(|e| !e.contains("S3cret")), "{errs:#?}");
    check(
        "routes:\n  - { path: /x, host: 'a.example:abc', upstream: 127.0.0.1:1, auth: none }\n",
        &["routes[0].host: \"a.example:abc\": the host's port is not a number"],
    );
    check("roles: { owner: [read] }", &["roles.owner: unknown role"]);
    check("store: { redis: { url: 'http://x' } }", &["store.redis.url: not a valid Redis URL"]);
    check(
        "store: { redis: { url: 'redis://127.0.0.1:6379', wait_replicas: 17 } }",
        &["store.redis.wait_replicas: 17 is more replicas"],
    );
    // A managed Redis's TLS URL is valid, but not supported: said so, not called malformed.
    check(
        "store: { redis: { url: 'rediss://default:pw@cache.example:6380' } }",
        &["store.redis.url: TLS to Redis (rediss://) is not supported"],
    );
    check(
        "orgs: { acme: { projects: { shop: {} } } }",
        &["orgs.acme.projects.shop.environments: list at least one"],
    );
    check(
        "identity: { headers: [subject, nickname] }",
        &["identity.headers[1]: unknown header \"nickname\""],
    );
    check("identity: { request_id_header: Host }", &["identity.request_id_header: must not be host"]);
    check("orgs: { acme: { projects: { shop: { environments: [p] } } } }\nroutes:\n  - { path: /a, upstream: '127.0.0.1:1', org: acme, project: shop, environment: p }\n  - { path: /a, upstream: '127.0.0.1:1', org: acme, project: shop, environment: p }\n", &["routes[1].path: routes[0] already has path"]);
}

#[test]
fn a_type_error_names_its_path() {
    check("cache: { capacity: lots }", &["cache.capacity: invalid type"]);
}

#[test]
fn a_type_error_hides_no_other_error() {
    let yaml = r#"
threads: two
cache: { colour: red, capacity: lots }
routes:
  - { path: /a, upstream: "127.0.0.1:1", auth: maybe }
  - { path: b, upstream: nowhere, auth: none, colour: blue }
  - { path: /c, upstream: "127.0.0.1:1", auth: none, query_token: sometimes }
  - { path: /d, upstream: "127.0.0.1:1", auth: none, permissions: { DELET: admin } }
log: { level: loud, colour: green }
flavour: vanilla
"#;
    check(
        yaml,
        &[
            "threads: invalid type: string \"two\", expected usize at line 2",
            "cache.colour: unknown field",
            "cache.capacity: invalid type",
            "routes[0].auth: unknown variant `maybe`",
            "routes[1].colour: unknown field",
            "routes[1].path: \"b\" must start with '/'",
            "routes[1].upstream: \"nowhere\" is not a reachable host:port",
            "routes[2].query_token: invalid type",
            "routes[3].permissions.DELET: \"DELET\" is not a known HTTP method; did you mean DELETE?",
            "routes[3].permissions: a public route (auth: none) checks no token",
            "log.colour: unknown field",
            "log.level: \"loud\" is not one of",
            "flavour: unknown field",
        ],
    );
    // Reading one key at a time changes nothing else: a scalar is read as written.
    check("listen: 8080", &["listen: \"8080\" is not an address"]);
    assert!(Config::parse("orgs: { acme: { projects: { shop: { environments: [2024] } } } }").is_ok());
    check("routes: 5", &["routes: invalid type: integer `5`, expected a list of routes"]);
    check("- listen: x", &["expected a mapping of settings"]);
    check("listen: [", &["did not find expected node content"]);
    // A syntax error inside a value is placed at the last key named, never at a `?`.
    let errs = errors("routes:\n  - { path: /x upstream: 127.0.0.1:1 }\n");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(!errs[0].contains('?') && errs[0].contains("line 2"), "{errs:#?}");
    check("? [a]\n: 1\nthreads: two\n", &["every top-level key must be a name like `listen`"]);
}

#[test]
fn a_route_without_a_usable_path_is_still_checked() {
    check(
        "routes:\n  - { upstream: nowhere, auth: none, permissions: { DELET: admin } }\n  \
         - { path: x, upstream: nowhere, auth: none }\n",
        &[
            "routes[0].path: missing",
            "routes[0].upstream: \"nowhere\"",
            "routes[0].permissions.DELET: \"DELET\" is not a known HTTP method; did you mean DELETE?",
            "routes[0].permissions: a public route",
            "routes[1].path: \"x\" must start with '/'",
            "routes[1].upstream: \"nowhere\"",
        ],
    );
}

#[test]
fn what_refers_to_an_unreadable_section_is_not_checked_against_its_defaults() {
    // Each has only its own error: the route's org, permission and identity JWT may be in the
    // section that could not be read, and the default `listen` stands in for nothing.
    let route = "routes:\n  - { path: /a, upstream: '127.0.0.1:1', org: acme, project: shop, environment: production, permissions: { POST: deploy }, identity_jwt: true }\n";
    let orgs = "orgs: { acme: { projects: { shop: { environments: [production] } } } }\n";
    let roles = "roles: { editor: [read, write, deploy] }\n";
    check(
        &format!("orgs: {{ acme: {{ projects: {{ shop: {{ environments: production }} }} }} }}\n{roles}jwt: 5\n{route}"),
        &["orgs.acme.projects.shop.environments: invalid type", "jwt: invalid type"],
    );
    check(
        &format!("{orgs}roles: {{ editor: deploy }}\n{route}"),
        &["roles.editor: invalid type", "routes[0].identity_jwt: needs a `jwt` section"],
    );
    check("listen: [1]\nadmin: { listen: '127.0.0.1:8080' }\n", &["listen: invalid type"]);
}

#[test]
fn permissions_name_each_method_once_and_refuse_near_misses_of_known_ones() {
    let route = |permissions: &str| {
        format!(
            "orgs: {{ acme: {{ projects: {{ shop: {{ environments: [production] }} }} }} }}\nroutes:\n  - {{ path: /a, upstream: '127.0.0.1:1', org: acme, project: shop, environment: production, permissions: {{ {permissions} }} }}\n"
        )
    };
    check(
        &route("DELET: admin"),
        &["routes[0].permissions.DELET: \"DELET\" is not a known HTTP method; did you mean DELETE?"],
    );
    check(
        &route("PUTT: admin"),
        &["routes[0].permissions.PUTT: \"PUTT\" is not a known HTTP method; did you mean PUT?"],
    );
    check(&route("POSTT: admin"), &["did you mean POST?"]);
    check(&route("'BR EW': admin"), &["routes[0].permissions.BR EW: \"BR EW\" is not an HTTP method"]);
    // The later of two keys is named, in file order (a sorted map would name `get`).
    check(
        &route("get: read, GET: admin"),
        &["routes[0].permissions.GET: \"GET\" is the same method as \"get\"; give each method once"],
    );
    check(
        &route("Post: admin, POST: admin, post: admin"),
        &[
            "routes[0].permissions.POST: \"POST\" is the same method as \"Post\"",
            "routes[0].permissions.post: \"post\" is the same method as \"Post\"",
        ],
    );
    // Registered methods, cache purges, and extension methods not close to a known one.
    let c = Config::parse(&route(
        "delete: admin, Propfind: admin, MKCOL: admin, search: read, ACL: admin, purge: admin, BREW: admin, \
         TRACK: admin, BDELETE: admin, MKCOLL: admin",
    ))
    .unwrap();
    let r = c.routes.route(None, "/a").unwrap().unwrap();
    for (method, want) in [
        ("DELETE", "admin"),
        ("PROPFIND", "admin"),
        ("MKCOL", "admin"),
        ("SEARCH", "read"),
        ("ACL", "admin"),
        ("PURGE", "admin"),
        ("BREW", "admin"),
        ("TRACK", "admin"),
        ("BDELETE", "admin"),
        ("MKCOLL", "admin"),
        ("PUT", "write"),
    ] {
        let method = http::Method::from_bytes(method.as_bytes()).unwrap();
        assert_eq!(r.required_permission(&method).name, want, "{method}");
    }
}

#[test]
fn a_public_route_takes_no_permission_or_token_parameter() {
    // Every method of a public route passes, so a `permissions` map there protects nothing.
    check(
        "routes:\n  - { path: /a, upstream: '127.0.0.1:1', auth: none, permissions: { POST: write }, query_token: true }\n",
        &[
            "routes[0].permissions: a public route (auth: none) checks no token, so every method would pass",
            "routes[0].query_token: a public route (auth: none) reads no token",
        ],
    );
    assert!(Config::parse(
        "routes:\n  - { path: /a, upstream: '127.0.0.1:1', auth: none, permissions: {} }\n"
    )
    .is_ok());
}

#[test]
fn a_prefix_and_the_same_with_a_trailing_slash_are_one_route() {
    check(
        "routes:\n  - { path: /admin, upstream: '127.0.0.1:1', auth: none }\n  - { path: /admin/, upstream: '127.0.0.1:1', auth: none }\n",
        &["routes[1].path: routes[0] already has path \"/admin/\""],
    );
}

#[test]
fn a_route_cannot_lead_back_to_the_gateway() {
    let yaml = |listen: &str, upstream: &str| {
        format!("listen: '{listen}'\nadmin: {{ listen: '127.0.0.1:18081' }}\nroutes:\n  - {{ path: /a, upstream: '{upstream}', auth: none }}\n")
    };
    check(
        &yaml("127.0.0.1:18080", "127.0.0.1:18080"),
        &["routes[0].upstream: \"127.0.0.1:18080\" (127.0.0.1:18080) is this gateway's own listener"],
    );
    check(&yaml("0.0.0.0:18080", "localhost:18080"), &["is this gateway's own listener"]);
    check(&yaml("127.0.0.1:18080", "127.0.0.1:18081"), &["routes[0].upstream: \"127.0.0.1:18081\""]);
    // Another host on the gateway's port is another service; another port here is too.
    assert!(Config::parse(&yaml("0.0.0.0:18080", "10.1.2.3:18080")).is_ok());
    assert!(Config::parse(&yaml("127.0.0.1:18080", "127.0.0.1:18082")).is_ok());
}

#[test]
fn a_shutdown_grace_of_zero_stops_accepting_at_once() {
    let c = Config::parse("shutdown: { grace: 0s }").unwrap();
    assert_eq!(c.shutdown.grace, Duration::ZERO);
    check("shutdown: { grace: soon }", &["shutdown.grace: not a duration"]);
    check("shutdown: { timeout: 0s }", &["shutdown.timeout: must be greater than zero"]);
}

#[test]
fn files_that_set_nothing_are_known() {
    for text in ["", "\n", "# only a comment\n", "---", "--- # c\n...\n", "{}", "null", "~\n"] {
        assert!(reload_refusal(text).is_some_and(|r| r.contains("sets nothing")), "{text:?}");
        // At start such a file is the default config.
        assert_eq!(Config::parse(text).unwrap().routes.iter().count(), 0, "{text:?}");
    }
    // `routes:` given nothing, as a file being written ends before its routes come.
    for text in ["threads: 2\nroutes:\n", "routes: null", "\u{feff}threads: 2\nroutes: ~\n"] {
        assert!(reload_refusal(text).is_some_and(|r| r.contains("`routes:` holds nothing")), "{text:?}");
        assert_eq!(Config::parse(text).unwrap().routes.iter().count(), 0, "{text:?}");
    }
    // Anything else is for the parser to judge.
    let one_route = "routes:\n  - { path: /a, upstream: '127.0.0.1:1', auth: none }";
    for text in ["threads: 2", "routes: []", one_route, "[]", "listen: [", "x"] {
        assert_eq!(reload_refusal(text), None, "{text:?}");
    }
}

#[test]
fn the_redis_password_is_redacted_in_debug() {
    let c = Config::parse("store: { redis: { url: 'redis://:hunter2@127.0.0.1:6379' } }").unwrap();
    let shown = format!("{:?}", c.store);
    assert!(!shown.contains("hunter2"), "{shown}");
}

#[test]
fn jwt_keys_load_and_every_error_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k1.pem");
    std::fs::write(&key, crate::jwt::generate_key(jsonwebtoken::Algorithm::EdDSA).unwrap()).unwrap();
    let good =
        format!("jwt:\n  signing_key: k1\n  keys:\n    - {{ kid: k1, key_file: '{}' }}\n", key.display());
    let c = Config::parse(&good).unwrap();
    let jwt = c.jwt.unwrap();
    assert_eq!(jwt.default_ttl, Duration::from_secs(15 * 60));
    assert_eq!(jwt.signing_key().kid, "k1");
    assert_eq!(jwt.signing_key().algorithm, jsonwebtoken::Algorithm::EdDSA, "EdDSA by default");
    assert_eq!((jwt.leeway, jwt.max_ttl), (Duration::from_secs(5), Duration::from_secs(3600)));
    check(
        "routes:\n  - { path: /p, upstream: '127.0.0.1:1', auth: none, identity_jwt: true }\n",
        &["routes[0].identity_jwt: needs a `jwt` section", "routes[0].identity_jwt: a public route"],
    );
    // A route's own identity audience: only where it signs one, never empty, never the
    // credentials' audience.
    let routes = "routes:\n  \
         - { path: /a, upstream: '127.0.0.1:1', org: acme, project: shop, environment: production, identity_jwt: true, identity_jwt_audience: billing }\n  \
         - { path: /b, upstream: '127.0.0.1:1', org: acme, project: shop, environment: production, identity_jwt_audience: billing }\n  \
         - { path: /c, upstream: '127.0.0.1:1', org: acme, project: shop, environment: production, identity_jwt: true, identity_jwt_audience: ' ' }\n  \
         - { path: /d, upstream: '127.0.0.1:1', org: acme, project: shop, environment: production, identity_jwt: true, identity_jwt_audience: tollgate }\n";
    let orgs = "orgs:\n  acme:\n    projects:\n      shop: { environments: [production] }\n";
    check(
        &format!("{good}{orgs}{routes}"),
        &[
            "routes[1].identity_jwt_audience: only for a route with `identity_jwt: true`",
            "routes[2].identity_jwt_audience: must not be empty",
            "routes[3].identity_jwt_audience: must differ from jwt.audience",
        ],
    );
    let one = routes.lines().take(2).collect::<Vec<_>>().join("\n");
    let c = Config::parse(&format!("{good}{orgs}{one}\n")).unwrap();
    let route = c.routes.iter().next().unwrap();
    assert_eq!(route.identity_audience.as_deref(), Some("billing"));
    // A signing key that did not load is named once, where it failed; a `jwt:` whose lines are
    // commented out is a section without keys, never "no JWTs" in silence.
    check(
        "jwt:\n  signing_key: k1\n  keys:\n    - { kid: k1, key_file: /nonexistent/k1.pem }\n",
        &["jwt.keys[0].key_file: cannot read /nonexistent/k1.pem"],
    );
    check(
        "jwt:\n  signing_key: k1\n  keys:\n    - { kid: k1, algorithm: PS512, key_file: x.pem }\n",
        &["jwt.keys[0].algorithm: \"PS512\" is not one of"],
    );
    check(
        "jwt:\n#  signing_key: k1\n#  keys: []\n",
        &["jwt.keys: list at least one key", "jwt.signing_key: missing"],
    );
    // Without `default_ttl`, a `max_ttl` under 15 minutes is the default lifetime too.
    let short = good.replace("jwt:\n", "jwt:\n  max_ttl: 10m\n");
    let jwt = Config::parse(&short).unwrap().jwt.unwrap();
    assert_eq!((jwt.default_ttl, jwt.max_ttl), (Duration::from_secs(600), Duration::from_secs(600)));
    check(
        &good.replace("jwt:\n", "jwt:\n  max_ttl: 10m\n  default_ttl: 11m\n"),
        &["jwt.default_ttl: must not exceed jwt.max_ttl"],
    );
    // JWT times are whole seconds: 500ms became an identity JWT with `exp == iat`.
    check(
        &good.replace(
            "jwt:\n",
            "jwt:\n  max_ttl: 900ms\n  default_ttl: 500ms\n  upstream_ttl: 1500ms\n  leeway: 2500ms\n",
        ),
        &[
            "jwt.max_ttl: must be whole seconds",
            "jwt.default_ttl: must be whole seconds",
            "jwt.upstream_ttl: must be whole seconds",
            "jwt.leeway: must be whole seconds",
        ],
    );
    // A default taken from a fractional `max_ttl` is not blamed on `default_ttl`, never written.
    check(&good.replace("jwt:\n", "jwt:\n  max_ttl: 600500ms\n"), &["jwt.max_ttl: must be whole seconds"]);

    let bad = format!(
        r#"
jwt:
  signing_key: nope
  audience: same
  upstream_audience: same
  max_ttl: 1m
  default_ttl: 5m
  upstream_ttl: 5m
  keys:
    - {{ kid: k1, key_file: '{key}' }}
    - {{ kid: k1, key_file: '{key}' }}
    - {{ kid: k2, algorithm: PS512, key_file: '{key}' }}
    - {{ kid: k3, algorithm: ES256, key_file: '{key}' }}
    - {{ kid: k4, algorithm: HS256, secret_env: TOLLGATE_TEST_UNSET_SECRET }}
    - {{ kid: k5, key_file: /nonexistent/key.pem }}
    - {{ kid: k6, algorithm: HS256, secret_env: 'pasted-s3cret/value+A==' }}
    - {{ kid: k7, key_file: "-----BEGIN PRIVATE KEY-----\\nMC4CAQAwBQYDK2VwBCIEIPASTED\\n-----END PRIVATE KEY-----" }}
    - {{ kid: k8, algorithm: HS256, secret_env: a3f9s3cret0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8 }}
    - {{ kid: k9, algorithm: HS256, secret_file: q8Zxs3cretAbCdEfGhIjKlMnOpQrStUvWxYz0123456789 }}
    - {{ kid: k10, algorithm: HS256, secret_env: JWT-SECRET-UNSET }}
    - {{ kid: k11, key_file: MC4CAQAwBQYDK2VwBCIEIPASTEDs3cret/one+line== }}
routes:
  - {{ path: /p, upstream: '127.0.0.1:1', auth: none, identity_jwt: true }}
"#,
        key = key.display()
    );
    check(
        &bad,
        &[
            "jwt.upstream_audience: must differ",
            "jwt.default_ttl: must not exceed",
            "jwt.upstream_ttl: at most 60s",
            "jwt.keys[1].kid: another key already has kid \"k1\"",
            "jwt.keys[2].algorithm: \"PS512\" is not one of EdDSA, ES256, RS256, HS256",
            "jwt.keys[3].key_file: not a usable ES256 key",
            "jwt.keys[4].secret_env: names an environment variable that is not set",
            "jwt.keys[5].key_file: cannot read /nonexistent/key.pem",
            "jwt.keys[6].secret_env: is not an environment variable's name",
            "jwt.keys[7].key_file: holds a key's text; give the path",
            "jwt.keys[8].secret_env: names an environment variable that is not set",
            "jwt.keys[9].secret_file: cannot read the file it names",
            "jwt.keys[10].secret_env: names an environment variable that is not set",
            "jwt.keys[11].key_file: cannot read the file it names",
            "jwt.signing_key: no key in jwt.keys has kid \"nope\"",
            "routes[0].identity_jwt: a public route has no identity to sign",
        ],
    );
    // Neither pasted value is echoed back, whatever else the errors say.
    for err in errors(&bad) {
        assert!(!err.contains("s3cret") && !err.contains("PASTED"), "{err}");
    }
}

#[test]
fn two_routes_with_one_name_or_one_path_are_refused_naming_the_first() {
    let yaml = r#"
orgs: { acme: { projects: { shop: { environments: [production] } } } }
routes:
  - { name: dup, path: /a, upstream: "127.0.0.1:9000", auth: none }
  - { name: dup, path: /b, upstream: "127.0.0.1:9000", auth: none }
  - { name: other, path: /a, upstream: "127.0.0.1:9000", auth: none }
"#;
    let err = Config::parse(yaml).unwrap_err().to_string();
    assert!(err.contains("routes[1].name: routes[0] is already named \"dup\""), "{err}");
    assert!(err.contains("routes[2].path: routes[0] already has path \"/a\""), "{err}");
    assert!(!err.contains("None"), "{err}");
}

#[test]
fn a_default_name_counts_too() {
    // A route without `name` is named by its path: a name given that equals it, or two such
    // routes on different hosts, would share one label in metrics and logs.
    let yaml = r#"
routes:
  - { path: /a, upstream: "127.0.0.1:9000", auth: none }
  - { name: /a, path: /b, upstream: "127.0.0.1:9000", auth: none }
  - { path: /c, host: x.example, upstream: "127.0.0.1:9000", auth: none }
  - { path: /c, host: y.example, upstream: "127.0.0.1:9000", auth: none }
"#;
    check(
        yaml,
        &[
            "routes[1].name: routes[0] is already named \"/a\"",
            "routes[3].name: routes[2] is already named \"/c\", this route's default name",
        ],
    );
}

#[test]
fn an_hmac_signing_key_cannot_sign_identity_jwts() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hs.key");
    std::fs::write(&secret, "a-shared-secret-of-at-least-32-bytes!!").unwrap();
    let yaml = |algorithm: &str, identity_jwt: bool| {
        let material = match algorithm {
            "HS256" => format!("secret_file: '{}'", secret.display()),
            _ => {
                let key = dir.path().join("ed.pem");
                std::fs::write(&key, crate::jwt::generate_key(jsonwebtoken::Algorithm::EdDSA).unwrap())
                    .unwrap();
                format!("key_file: '{}'", key.display())
            }
        };
        format!(
            "orgs: {{ acme: {{ projects: {{ shop: {{ environments: [production] }} }} }} }}\n\
             jwt:\n  signing_key: k\n  keys:\n    - {{ kid: k, algorithm: {algorithm}, {material} }}\n\
             routes:\n  - {{ path: /a, upstream: '127.0.0.1:1', org: acme, project: shop, environment: production }}\n  \
             - {{ path: /b, upstream: '127.0.0.1:1', org: acme, project: shop, environment: production, identity_jwt: {identity_jwt} }}\n  \
             - {{ path: /c, upstream: '127.0.0.1:1', org: acme, project: shop, environment: production, identity_jwt: {identity_jwt} }}\n"
        )
    };
    // Whoever verifies an HMAC-signed identity JWT holds the secret that signs credentials. Every
    // such route is named (the first alone was).
    check(
        &yaml("HS256", true),
        &[
            "routes[1].identity_jwt: the signing key \"k\" is an HMAC key",
            "routes[2].identity_jwt: the signing key \"k\" is an HMAC key",
        ],
    );
    assert!(Config::parse(&yaml("HS256", false)).is_ok(), "HMAC credentials alone are fine");
    assert!(Config::parse(&yaml("EdDSA", true)).is_ok());
}

#[test]
fn durations_are_at_most_a_hundred_years() {
    // Expiries are added up in milliseconds; a longer lifetime would overflow them.
    check("tokens: { max_ttl: 200years }\n", &["tokens.max_ttl: must be at most 100 years"]);
    assert!(Config::parse("tokens: { max_ttl: 100years }\n").is_err(), "100 years of 365.25 days is more");
    assert!(Config::parse("tokens: { max_ttl: 99years }\n").is_ok());
}

#[test]
fn prefixes_differing_only_in_case_are_refused_unless_the_route_tried_later_is_case_sensitive() {
    let yaml = |flags: &str| {
        format!(
            "routes:\n  - {{ path: /Shop, upstream: '127.0.0.1:1', auth: none{flags} }}\n  \
             - {{ path: /shop, upstream: '127.0.0.1:1', auth: none{flags} }}\n"
        )
    };
    check(&yaml(""), &["routes[1].path: \"/shop\" differs from routes[0].path only in letter case"]);
    // A host's route against one for any host (tried on that host too).
    check(
        "routes:\n  - { path: /Shop, host: api.example.com, upstream: '127.0.0.1:1', auth: none }\n  \
         - { path: /shop, upstream: '127.0.0.1:1', auth: none }\n",
        &["routes[1].path: \"/shop\" differs from routes[0].path only in letter case"],
    );
    assert!(Config::parse(&yaml(", case_sensitive: true")).is_ok());
    // Only the route tried later can be refused: here the any-host one, which compares exactly.
    let fine = "routes:\n  - { path: /Shop, host: api.example.com, upstream: '127.0.0.1:1', auth: none }\n  \
                - { path: /shop, upstream: '127.0.0.1:1', auth: none, case_sensitive: true }\n";
    assert!(Config::parse(fine).is_ok());
    // A trailing `/` changes nothing: the shorter one is tried later, and refused.
    check(
        "routes:\n  - { path: /Shop, upstream: '127.0.0.1:1', auth: none }\n  \
         - { path: /shop/, upstream: '127.0.0.1:1', auth: none }\n",
        &["routes[1].path: \"/shop/\" differs from routes[0].path only in letter case"],
    );
}

#[test]
fn a_query_parameter_name_must_be_usable_in_a_query() {
    for bad in ["a;b", "a&b", "a=b", ""] {
        check(
            &format!("credentials: {{ query_param: '{bad}' }}\n"),
            &[&format!("credentials.query_param: {bad:?} is not a usable parameter name")],
        );
    }
}

#[test]
fn a_store_value_of_the_wrong_type_is_not_repeated_in_the_error() {
    let errs = errors("store: { redis: \"redis://:hunter2@db:6379\" }\nthreads: two\n");
    assert!(
        errs.iter().any(|e| e.starts_with("store.redis: invalid type: string (value not shown)")),
        "{errs:#?}"
    );
    assert!(!errs.iter().any(|e| e.contains("hunter2")), "{errs:#?}");
    assert!(
        errs.iter().any(|e| e.contains("threads") && e.contains("\"two\"")),
        "other values are quoted: {errs:#?}"
    );
}

#[test]
fn a_secret_written_as_a_number_is_not_repeated_in_the_error() {
    // YAML reads an unquoted run of digits (or `0x…`, `0o…`) as an integer, one beyond 64 bits
    // fails to read, and its message quotes it (in decimal, for a hex one) in backticks.
    for (key, value, shown) in [
        ("secret_env", "12345678901234567890123456789012", "12345678901234567890123456789012"),
        ("secret_file", "0x9f3a77b2c1d4e5f60718293a4b5c6d7e", "211650832316940391011605355563675577726"),
    ] {
        let yaml = format!(
            "jwt:\n  signing_key: hs\n  keys:\n    - {{ kid: hs, algorithm: HS256, {key}: {value} }}\n"
        );
        let errs = errors(&yaml);
        assert!(errs.iter().any(|e| e.contains(key) && e.contains("(value not shown)")), "{errs:#?}");
        assert!(!errs.iter().any(|e| e.contains(shown) || e.contains(value)), "{errs:#?}");
    }
    let errs = errors("store: { redis: { url: 123456789012345678901234567890 } }\n");
    assert!(errs.iter().any(|e| e.contains("(value not shown)")), "{errs:#?}");
    assert!(!errs.iter().any(|e| e.contains("1234567890123")), "{errs:#?}");
}

#[test]
fn a_byte_order_mark_before_the_config_is_no_second_document() {
    // Windows editors and PowerShell 5's `-Encoding utf8` write one; YAML allows it.
    let c = Config::parse(&format!("\u{feff}{}", GOOD.trim_start())).expect("read as without it");
    assert_eq!(c.listen.port(), 18080);
}

#[test]
fn upstream_timeouts_default_and_a_route_overrides_only_what_it_names() {
    let c = Config::parse(GOOD).unwrap();
    let shop = c.routes.route(None, "/shop").unwrap().unwrap();
    assert_eq!(shop.timeouts, UpstreamTimeouts::default());
    assert_eq!(shop.timeouts.connect, Duration::from_secs(5));
    assert_eq!(shop.timeouts.read, Duration::from_secs(60));

    let yaml = GOOD.replace("listen:", "upstream_timeouts: { read: 2s, write: 3s }\nlisten:").replace(
        "    query_token: true\n",
        "    query_token: true\n    upstream_timeouts: { read: 5m }\n    format_extensions: false\n",
    );
    let c = Config::parse(&yaml).unwrap();
    let shop = c.routes.route(None, "/shop").unwrap().unwrap();
    let health = c.routes.route(None, "/health").unwrap().unwrap();
    assert!(!shop.format_extensions && health.format_extensions);
    let t = |connect, read, write| UpstreamTimeouts {
        connect: Duration::from_secs(connect),
        read: Duration::from_secs(read),
        write: Duration::from_secs(write),
    };
    assert_eq!(shop.timeouts, t(5, 300, 3), "the route's read, the file's write, the default connect");
    assert_eq!(health.timeouts, t(5, 2, 3));

    let bad = GOOD.replace("listen:", "upstream_timeouts: { read: soon, idle: 1s }\nlisten:").replace(
        "    query_token: true\n",
        "    query_token: true\n    upstream_timeouts: { connect: 0s }\n",
    );
    check(
        &bad,
        &[
            "upstream_timeouts.read: not a duration",
            "upstream_timeouts.idle: unknown field",
            "routes[0].upstream_timeouts.connect: must be greater than zero",
        ],
    );
}

#[test]
fn keepalive_timeout_is_whole_seconds_and_zero_turns_keep_alive_off() {
    let keepalive =
        |value: &str| Config::parse(&GOOD.replace("listen:", &format!("{value}listen:"))).unwrap().keepalive;
    assert_eq!(keepalive(""), Some(60));
    assert_eq!(keepalive("keepalive_timeout: 5s\n"), Some(5));
    assert_eq!(keepalive("keepalive_timeout: 1500ms\n"), Some(2), "a part of a second counts as one");
    assert_eq!(keepalive("keepalive_timeout: 0s\n"), None);
    let admin =
        |value: &str| Config::parse(&GOOD.replace("listen:", &format!("{value}listen:"))).unwrap().admin;
    assert_eq!(admin("").read_timeout, Duration::from_secs(10));
    assert_eq!(admin("admin: { read_timeout: 3s }\n").read_timeout, Duration::from_secs(3));
    check(
        &GOOD.replace("listen:", "keepalive_timeout: never\nadmin: { read_timeout: 0s }\nlisten:"),
        &["keepalive_timeout: not a duration", "admin.read_timeout: must be greater than zero"],
    );
}

#[test]
fn audit_max_entries_is_bounded() {
    // Redis trims the list with the bound as a Lua number: past 2^53 the trim fails mid-batch.
    check("audit: { max_entries: 18446744073709551615 }\n", &["audit.max_entries: must be at most 10000000"]);
    check("audit: { max_entries: 0 }\n", &["audit.max_entries: must be at least 1"]);
    assert!(Config::parse(&format!("audit: {{ max_entries: {} }}\n", MAX_AUDIT_ENTRIES)).is_ok());
}

#[test]
fn thread_counts_and_argon2_costs_are_bounded() {
    // Each of these passed check-config and then panicked `serve`, or aborted it at the first
    // token issued after a reload (an allocation of 4 TiB).
    check(
        "threads: 100000\nargon2: { memory_kib: 4294967295, iterations: 1000, parallelism: 65, max_concurrency: 2305843009213693952 }\n",
        &[
            "threads: must be at most 1024",
            "argon2.memory_kib: must be at most 1048576 (1 GiB)",
            "argon2.iterations: must be at most 100",
            "argon2.parallelism: must be at most 64",
            "argon2.max_concurrency: must be at most 1024",
        ],
    );
    assert!(Config::parse("threads: 1024\nargon2: { memory_kib: 1048576, max_concurrency: 1024 }\n").is_ok());
    // And below argon2's minima, each named by its key (not argon2's own wording).
    check(
        "argon2: { memory_kib: 4, iterations: 0, parallelism: 0 }\n",
        &[
            "argon2.iterations: must be at least 1",
            "argon2.parallelism: must be at least 1",
            "argon2.memory_kib: must be at least 8",
        ],
    );
    check(
        "argon2: { memory_kib: 31, parallelism: 4 }\n",
        &["argon2.memory_kib: must be at least 32 (8 per lane"],
    );
    assert!(Config::parse("argon2: { memory_kib: 32, iterations: 1, parallelism: 4 }\n").is_ok());
    // A parallelism past its bound is told once (no memory minimum made of it, no overflow).
    check("argon2: { parallelism: 600000000 }\n", &["argon2.parallelism: must be at most 64"]);
}

#[test]
fn the_identity_prefix_covers_no_header_http_relies_on() {
    for (prefix, header) in [
        ("content-", "content-length"),
        ("ho", "host"),
        ("X-", "x-forwarded-for"),
        ("t", "transfer-encoding"),
    ] {
        check(
            &format!("identity: {{ prefix: \"{prefix}\" }}\n"),
            &[&format!("identity.prefix: {:?} would strip {header}", prefix.to_ascii_lowercase())],
        );
    }
    // Said at the key written, and only there.
    check("identity: { prefix: \"\" }\n", &["identity.prefix: must not be empty"]);
    let c = Config::parse("identity: { prefix: \"x-gw-\" }\n").unwrap();
    assert_eq!(c.identity.prefix, "x-gw-");
}

#[test]
fn the_admin_listener_may_not_take_the_proxys_socket() {
    // `serve` could not bind the second; check-config passed it when the addresses differed.
    for (proxy, admin) in [
        ("0.0.0.0:19104", "127.0.0.1:19104"),
        ("127.0.0.1:19104", "127.0.0.1:19104"),
        ("127.0.0.1:19104", "[::]:19104"),
    ] {
        check(&format!("listen: \"{proxy}\"\nadmin: {{ listen: \"{admin}\" }}\n"), &["admin.listen: "]);
    }
    assert!(Config::parse("listen: 127.0.0.1:19104\nadmin: { listen: \"127.0.0.2:19104\" }\n").is_ok());
    assert!(Config::parse("listen: 0.0.0.0:19104\nadmin: { listen: \"127.0.0.1:19105\" }\n").is_ok());
    // The families as Linux binds them: 0.0.0.0 leaves IPv6 free; a mapped address is its IPv4 one.
    assert!(Config::parse("listen: 0.0.0.0:19104\nadmin: { listen: \"[::1]:19104\" }\n").is_ok());
    check(
        "listen: \"[::ffff:127.0.0.1]:19104\"\nadmin: { listen: \"127.0.0.1:19104\" }\n",
        &["admin.listen: "],
    );
}

#[test]
fn forwarded_for_is_append_unless_said_otherwise() {
    use crate::config::ForwardedFor;
    let mode = |yaml: &str| Config::parse(yaml).unwrap().forwarded_for;
    assert_eq!(mode(""), ForwardedFor::Append);
    assert_eq!(mode("forwarded_for: replace\n"), ForwardedFor::Replace);
    assert_eq!(mode("forwarded_for: keep\n"), ForwardedFor::Keep);
    check("forwarded_for: trust\n", &["forwarded_for: \"trust\" is not one of append, replace, keep"]);
}

#[test]
fn the_request_id_and_api_key_headers_may_be_no_header_http_relies_on() {
    // The request id replaces the client's header upstream and is set on every response.
    for (name, relied) in [
        ("Content-Length", "content-length"),
        ("Content_Length", "content-length"),
        ("Set-Cookie", "set-cookie"),
        ("Location", "location"),
        ("X-Forwarded-For", "x-forwarded-for"),
        ("Authorization", "authorization"),
    ] {
        check(
            &format!("identity: {{ request_id_header: {name} }}"),
            &[&format!(
                "identity.request_id_header: must not be {relied}, which HTTP or its clients rely on"
            )],
        );
    }
    // Every request carrying such a header would be presenting a credential.
    for (name, relied) in [("Host", "host"), ("Cookie", "cookie"), ("User-Agent", "user-agent")] {
        check(
            &format!("credentials: {{ api_key_header: {name} }}"),
            &[&format!("credentials.api_key_header: must not be {relied}, which HTTP or upstreams rely on")],
        );
    }
    check(
        "credentials: { api_key_header: X_Request_Id }",
        &["credentials.api_key_header: must differ from identity.request_id_header (x-request-id)"],
    );
    check(
        "credentials: { api_key_header: X-Trace }\nidentity: { request_id_header: X-Trace }",
        &["credentials.api_key_header: must differ from identity.request_id_header (x-trace)"],
    );
    // Names of their own are fine, each.
    let c = Config::parse(
        "credentials: { api_key_header: X-Request-Id }\nidentity: { request_id_header: X-Correlation-Id }",
    )
    .unwrap();
    assert_eq!(c.identity.request_id_header.as_str(), "x-correlation-id");
}

#[test]
fn a_route_host_or_path_no_request_can_name_is_refused() {
    let route = |host: &str, path: &str| {
        format!("routes:\n  - {{ path: '{path}', host: '{host}', upstream: 127.0.0.1:1, auth: none }}\n")
    };
    for (host, why) in [
        ("*.example.com", "wildcards are not supported"),
        ("api.example.com/v1", "a host name without a scheme or path"),
        ("bücher.example", "write a name in Unicode in its ASCII form"),
        ("", "empty; leave `host` out"),
        ("api example.com", "not a host name"),
        ("api..example.com", "not a host name"),
        ("2001:db8::1", "an IPv6 address is written in brackets"),
    ] {
        check(&route(host, "/x"), &[&format!("routes[0].host: {host:?}: {why}")]);
    }
    for host in [
        "api.example.com",
        "API.Example.com.",
        "10.0.0.1",
        "[::1]:8080",
        "svc_a.internal:80",
        "xn--bcher-kva.example",
    ] {
        assert_eq!(errors(&route(host, "/x")), Vec::<String>::new(), "{host}");
    }
    for (path, why) in [
        ("/api/*", "a prefix covers every path under it and matches literally"),
        ("/api/**/x", "a prefix covers every path under it and matches literally"),
        ("/*/x", "a prefix covers every path under it and matches literally"),
        ("/q{x}", "browsers send"),
        ("/api?v=1", "a path prefix without a query or fragment"),
        ("/api#top", "a path prefix without a query or fragment"),
        ("/café", "write it percent-encoded, as browsers"),
        ("/a b", "no request path holds a space"),
        ("/a%zz", "'%' must start a percent-escape"),
        ("/a%2", "'%' must start a percent-escape"),
        // Requests match escapes in either case: `/caf%c3%a9` would be `/caf%C3%A9`'s twin.
        ("/caf%c3%a9", "write a percent-escape's hex digits in upper case"),
    ] {
        check(&route("a.example", path), &[&format!("routes[0].path: {path:?}: {why}")]);
    }
    for path in
        ["/caf%C3%A9", "/v1/items:batch", "/~bob/@me", "/a;b=1", "/logs-*", "/items[0]", "/a|b", "/a*b/c"]
    {
        let errs = errors(&route("a.example", path));
        assert!(errs.iter().all(|e| !e.contains("percent") && !e.contains("wildcard")), "{path}: {errs:?}");
    }
}

#[test]
fn a_route_no_role_can_use_is_refused() {
    let roles = "roles: { viewer: [view], editor: [view, edit], admin: [view, edit, admin] }\n";
    let orgs = "orgs: { acme: { projects: { shop: { environments: [p] } } } }\n";
    let route =
        "routes:\n  - { path: /a, upstream: '127.0.0.1:1', org: acme, project: shop, environment: p }\n";
    check(
        &format!("{roles}{orgs}{route}"),
        &["routes[0].permissions: no role grants read or write, which a route asks for by default"],
    );
    // With its methods' permissions given, or a default granted, or public, it serves.
    let given = "routes:\n  - { path: /a, upstream: '127.0.0.1:1', org: acme, project: shop, environment: p, permissions: { GET: view, POST: edit } }\n";
    assert_eq!(errors(&format!("{roles}{orgs}{given}")), Vec::<String>::new());
    let read_only = "roles: { viewer: [read], editor: [read], admin: [read, admin] }\n";
    assert_eq!(errors(&format!("{read_only}{orgs}{route}")), Vec::<String>::new());
    let public = "routes:\n  - { path: /a, upstream: '127.0.0.1:1', auth: none }\n";
    assert_eq!(errors(&format!("{roles}{public}")), Vec::<String>::new());
}

#[test]
fn a_redis_section_left_empty_is_refused_not_read_as_the_embedded_store() {
    check("store:\n  redis:\n  #  url: redis://127.0.0.1:6379\n", &["store.redis.url: missing"]);
    check("store: { redis: null }", &["store.redis.url: missing"]);
    assert!(Config::parse("store: {}").unwrap().store.redis.is_none());
}

#[test]
fn a_reload_may_not_front_the_listeners_still_serving() {
    let running = Config::parse("listen: 127.0.0.1:18080\nadmin: { listen: 127.0.0.1:18081 }").unwrap();
    // The new file moves `listen` (which applies only after a restart) and fronts the old one.
    let new = "listen: 127.0.0.1:18090\nadmin: { listen: 127.0.0.1:18091 }\nroutes:\n  - { name: loop, path: /, upstream: 127.0.0.1:18080, auth: none }\n  - { name: admin, path: /a, upstreams: [127.0.0.1:18085, 127.0.0.1:18081], auth: none }\n";
    let issues: Vec<String> = Config::parse_reload(new, &running)
        .unwrap_err()
        .issues
        .iter()
        .map(|i| format!("{}: {}", i.path, i.message))
        .collect();
    assert_eq!(
        issues,
        [
            "routes[0].upstream: \"127.0.0.1:18080\" (127.0.0.1:18080) is this gateway's own listener; name the service it fronts",
            "routes[1].upstreams[1]: \"127.0.0.1:18081\" (127.0.0.1:18081) is this gateway's own listener; name the service it fronts",
        ]
    );
    assert!(Config::parse(new).is_ok(), "as a file of its own it is fine");
}

#[test]
fn a_secret_file_is_taken_byte_for_byte_but_for_a_text_files_line_end() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    // Signed with the file's key, checked with the bytes another system would take.
    let signs_as = |stored: &[u8], secret: &[u8]| {
        std::fs::write(&file, stored).unwrap();
        let yaml = format!(
            "jwt:\n  signing_key: k1\n  keys: [ {{ kid: k1, algorithm: HS256, secret_file: '{}' }} ]\n",
            file.display()
        );
        let config = Config::parse(&yaml).unwrap_or_else(|e| panic!("{e}"));
        let signed = config.jwt.as_ref().unwrap().sign(&serde_json::json!({ "sub": "x" })).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        let key = jsonwebtoken::DecodingKey::from_secret(secret);
        jsonwebtoken::decode::<serde_json::Value>(&signed, &key, &validation).is_ok()
    };
    // Random bytes whose first and last are whitespace: all of them are the secret.
    let binary: Vec<u8> =
        [b"\n ".as_slice(), &(0..40u8).map(|i| 0x80 | i).collect::<Vec<_>>(), b" \n"].concat();
    assert!(signs_as(&binary, &binary));
    assert!(!signs_as(&binary, binary.trim_ascii()));
    // A text secret loses its line end only.
    let text = "q8Zxs3cretAbCdEfGhIjKlMnOpQrStUvWxYz0123456789";
    for stored in [format!("{text}\n"), format!("{text}\r\n"), text.to_string()] {
        assert!(signs_as(stored.as_bytes(), text.as_bytes()), "{stored:?}");
    }
    // Text with white space left at an edge: refused, naming the setting.
    let edges =
        [" {text}\n", "{text} \n", "{text}\n\n", "{text}\t", "{text}\u{b}", "{text}\u{a0}", "{text}\u{2028}"];
    for stored in edges.map(|edge| edge.replace("{text}", text)) {
        std::fs::write(&file, &stored).unwrap();
        let yaml = format!(
            "jwt:\n  signing_key: k1\n  keys: [ {{ kid: k1, algorithm: HS256, secret_file: '{}' }} ]\n",
            file.display()
        );
        let err = Config::parse(&yaml).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            err.contains("jwt.keys[0].secret_file: the file's text begins or ends with white space"),
            "{stored:?}: {err}"
        );
    }
}

#[test]
fn a_secret_env_holding_bytes_that_are_not_utf8_is_read_as_bytes() {
    use std::os::unix::ffi::OsStrExt;
    // As `secret_file` takes any bytes; it was reported as not set.
    let secret: Vec<u8> = (0..40u8).map(|i| 0x80 | i).collect();
    std::env::set_var("TOLLGATE_TEST_BINARY_SECRET", std::ffi::OsStr::from_bytes(&secret));
    let yaml = "jwt:\n  signing_key: k1\n  keys: [ { kid: k1, algorithm: HS256, secret_env: TOLLGATE_TEST_BINARY_SECRET } ]\n";
    let config = Config::parse(yaml);
    assert!(config.is_ok(), "{:?}", config.err().map(|e| e.to_string()));
}

/// PRODUCT: the `admin` preset is all permissions: with a custom one added to roles, an
/// `admin`-scoped token holds it too, unless the config defines `admin` itself.
#[test]
fn the_admin_preset_is_every_permission_a_role_holds() {
    let roles =
        "roles: { editor: [read, write, execute, deploy], admin: [read, write, execute, admin, deploy] }\n";
    let config = Config::parse(roles).unwrap();
    let admin = config.policy.scope_preset("admin").unwrap();
    for p in ["read", "write", "execute", "admin", "deploy"] {
        assert!(admin.iter().any(|a| a == p), "{p} in {admin:?}");
    }
    assert_eq!(config.policy.scope_preset("read-write").unwrap(), ["read", "write", "execute"]);
    let config = Config::parse(&format!("{roles}scopes: {{ admin: [read, admin] }}\n")).unwrap();
    assert_eq!(config.policy.scope_preset("admin").unwrap(), ["read", "admin"]);
    // A bad permission name is told where it is written, not again under the made preset.
    let errs = errors("roles: { editor: [read, de.ploy] }\n");
    assert!(errs.len() == 1 && errs[0].starts_with("roles.editor[1]"), "{errs:#?}");
    // Without custom permissions, as PRODUCT lists it.
    let config = Config::parse("").unwrap();
    assert_eq!(config.policy.scope_preset("admin").unwrap(), ["read", "write", "execute", "admin"]);
}

/// With no header to carry a token (`bearer: false`, no API-key header), a protected route that
/// reads none from its query would refuse every request: refused, naming the route.
#[test]
fn a_route_no_token_can_reach_is_refused() {
    let routes = "orgs: { acme: { projects: { shop: { environments: [prod] } } } }\nroutes:\n  - { path: /a, upstream: \"127.0.0.1:1\", org: acme, project: shop, environment: prod }\n  - { path: /b, upstream: \"127.0.0.1:1\", org: acme, project: shop, environment: prod, query_token: true }\n  - { path: /c, upstream: \"127.0.0.1:1\", auth: none }\n";
    check(
        &format!("credentials: {{ bearer: false }}\n{routes}"),
        &["routes[0].query_token: no token can reach this route"],
    );
    check(&format!("credentials: {{ bearer: false, api_key_header: X-Key }}\n{routes}"), &[]);
    // A header named but invalid is told as that alone.
    let errs = errors(&format!("credentials: {{ bearer: false, api_key_header: \"X API Key\" }}\n{routes}"));
    assert!(errs.len() == 1 && errs[0].starts_with("credentials.api_key_header"), "{errs:#?}");
    check(routes, &[]);
}

#[test]
fn tokens_per_owner_are_bounded_from_one_to_a_hundred_thousand() {
    assert_eq!(Config::parse("").unwrap().tokens.max_per_owner, 1000);
    check("tokens: { max_per_owner: 0 }\n", &["tokens.max_per_owner: must be between 1 and 100000"]);
    check("tokens: { max_per_owner: 100001 }\n", &["tokens.max_per_owner: must be between 1 and 100000"]);
    assert_eq!(Config::parse("tokens: { max_per_owner: 5 }\n").unwrap().tokens.max_per_owner, 5);
}

/// Mistakes a YAML writer makes, each said once, at its path, in the user's own words.
#[test]
fn yaml_shapes_a_user_writes_by_mistake_are_named_once() {
    // An empty embedded path (an unset variable substituted in) is refused here, not at `serve`.
    check("store: { embedded: { path: '' } }\n", &["store.embedded.path: must not be empty"]);
    // A setting written flat with a dot is one top-level key, said once even beside its section.
    let errs = errors("tokens.max_ttl: 30d\nadmin.listen: 127.0.0.1:9091\nadmin: { last_use_flush: 1s }\n");
    assert_eq!(errs.len(), 2, "{errs:#?}");
    let said = |start: &str| errs.iter().any(|e| e.starts_with(start) && e.contains("written nested"));
    assert!(
        said("admin.listen: unknown top-level key") && said("tokens.max_ttl: unknown top-level key"),
        "{errs:#?}"
    );
    // One that takes a single value has no settings under it.
    check("listen.port: 8080\n", &["listen.port: unknown top-level key; `listen` takes one value"]);
    // A merge key: one error where it is, not an unknown field and the settings it brings missing.
    check(
        "routes:\n  - &base { path: /a, upstream: 127.0.0.1:9000, auth: none }\n  - <<: *base\n    path: /b\n",
        &["routes[1].<<: YAML merge keys"],
    );
    // An alias for a whole value works.
    assert_eq!(
        errors("listen: &l 127.0.0.1:8081\nadmin: { listen: 127.0.0.1:9092 }\n"),
        Vec::<String>::new()
    );
    // A repeated key is named, under `store` too (a key is no secret).
    let errs = errors("store:\n  timeout: 1s\n  embedded: { path: x.redb }\n  timeout: 2s\n");
    assert!(errs.len() == 1 && errs[0].contains("\"timeout\""), "{errs:#?}");
    // A top-level key given twice says where.
    let errs = errors("listen: 127.0.0.1:8081\nthreads: 2\nlisten: 127.0.0.1:8082\n");
    assert!(errs.len() == 1 && errs[0].contains("\"listen\" (lines 1 and 3)"), "{errs:#?}");
    // The identity prefix is quoted as written, with the character that cannot be in a name.
    check(
        "identity: { prefix: 'x auth-' }\n",
        &["identity.prefix: \"x auth-\" cannot start a header name: ' '"],
    );
}
