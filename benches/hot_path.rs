//! Microbenchmarks of the request path's pure and cached pieces: token parsing, cache-hit
//! verification, the authorization decision, header strip and inject, and JWT verification.
//! Run with `cargo bench --bench hot_path`.

// Set-up failures in a benchmark should stop it with their message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use pingora::http::RequestHeader;
use tollgate::auth::Verifier;
use tollgate::cache::{Cache, CacheSettings};
use tollgate::config::Config;
use tollgate::lifecycle::{self, TokenSpec};
use tollgate::policy::{self, Role};
use tollgate::store::memory::MemoryBackend;
use tollgate::store::{Owner, Store};
use tollgate::token::{self, TokenKind};

const CONFIG: &str = r#"
argon2: { memory_kib: 256, iterations: 1, parallelism: 1 }
orgs: { acme: { projects: { shop: { environments: [production] } } } }
routes:
  - { name: shop, path: /shop, upstream: "127.0.0.1:9000", org: acme, project: shop, environment: production }
"#;

// The allocator `tollgate serve` runs with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Warm {
    runtime: tokio::runtime::Runtime,
    config: std::sync::Arc<Config>,
    verifier: Arc<Verifier>,
    token: String,
}

/// A verifier whose cache already holds the token and its owner.
fn warm() -> Warm {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let config = Config::parse(CONFIG).unwrap();
    let (verifier, token) = runtime.block_on(async {
        let store = Store::new(Arc::new(MemoryBackend::default()), Duration::from_secs(1));
        let cache = Arc::new(Cache::new(
            store.clone(),
            CacheSettings { capacity: 1000, ttl: Duration::from_secs(600) },
        ));
        let follower = cache.clone();
        tokio::spawn(async move { follower.follow(Box::pin(std::future::pending())).await });
        while !cache.is_live() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let attrs = serde_json::json!({"team": "data", "groups": ["eng"]}).as_object().unwrap().clone();
        let user = lifecycle::create_user(&store, "acme", "a@acme.io", Role::Editor, BTreeMap::new(), attrs)
            .await
            .unwrap();
        let params = config.argon2.params;
        let (t, _) =
            lifecycle::issue_token(&store, params, "acme", Owner::User(user.id), TokenSpec::default())
                .await
                .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let verifier = Arc::new(Verifier::new(cache, 1000, 2));
        verifier.verify(&t.token).await.unwrap();
        (verifier, t.token)
    });
    Warm { runtime, config: std::sync::Arc::new(config), verifier, token }
}

fn token_parse(c: &mut Criterion) {
    let good = token::generate(TokenKind::Pat).token;
    let mut bad = good.clone().into_bytes();
    bad[20] = if bad[20] == b'a' { b'b' } else { b'a' };
    let bad = String::from_utf8(bad).unwrap();
    c.bench_function("token/parse_valid", |b| b.iter(|| token::parse(black_box(&good)).is_ok()));
    c.bench_function("token/parse_bad_checksum", |b| b.iter(|| token::parse(black_box(&bad)).is_err()));
}

fn cache_hit(c: &mut Criterion) {
    let w = warm();
    c.bench_function("auth/verify_cache_hit", |b| {
        b.to_async(&w.runtime).iter(|| async { w.verifier.verify(black_box(&w.token)).await.unwrap() })
    });
}

fn authorize_and_headers(c: &mut Criterion) {
    let w = warm();
    let principal = w.runtime.block_on(w.verifier.verify(&w.token)).unwrap();
    let route = w.config.routes.route(None, "/shop/items").unwrap().unwrap().clone();
    c.bench_function("policy/authorize", |b| {
        b.iter(|| {
            policy::authorize(&w.config.policy, route.clone(), &http::Method::GET, principal.clone()).unwrap()
        })
    });

    let permit = policy::authorize(&w.config.policy, route, &http::Method::GET, principal).unwrap();
    let mut request = RequestHeader::build("GET", b"/shop/items?a=1", None).unwrap();
    for (name, value) in [
        ("host", "api.example.com"),
        ("authorization", format!("Bearer {}", w.token).as_str()),
        ("user-agent", "bench/1.0"),
        ("accept", "application/json"),
        ("x-auth-subject", "user:forged"),
    ] {
        request.append_header(name.to_string(), value).unwrap();
    }
    let request_id = http::HeaderValue::from_static("0123456789abcdef0123456789abcdef");
    let made = tollgate::proxy::headers::IdentityHeaders::default();
    let client = Some(std::net::IpAddr::from([192, 0, 2, 7]));
    c.bench_function("headers/strip_and_inject", |b| {
        b.iter_batched(
            || request.clone(),
            |mut req| {
                tollgate::proxy::headers::forward(&w.config, &permit, &mut req, &request_id, &made, client)
                    .unwrap()
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

/// An ephemeral credential: its signature check (what a first request pays) and a verification
/// with the JWT, its minting token and service cached (what every later request pays).
fn jwt(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k1.pem");
    std::fs::write(&key, tollgate::jwt::generate_key(jsonwebtoken::Algorithm::EdDSA).unwrap()).unwrap();
    let text = format!(
        "{CONFIG}jwt: {{ signing_key: k1, keys: [ {{ kid: k1, key_file: \"{}\" }} ] }}\n",
        key.display()
    );
    let config = Config::parse(&text).unwrap();
    let w = warm();
    let jwt = config.jwt.as_ref().unwrap();
    let token = w.runtime.block_on(async {
        let store = w.verifier.cache().store().clone();
        let roles = BTreeMap::from([("shop".to_string(), Role::Editor)]);
        let service =
            lifecycle::create_service(&store, "acme", "embed", None, roles, Default::default(), None)
                .await
                .unwrap();
        let (parent, record) = lifecycle::issue_token(
            &store,
            config.argon2.params,
            "acme",
            Owner::Service(service.id.clone()),
            TokenSpec::default(),
        )
        .await
        .unwrap();
        drop(parent);
        let now = tollgate::store::now_millis() / 1000;
        let claims = tollgate::jwt::EphemeralClaims {
            iss: jwt.issuer.clone(),
            aud: jwt.audience.clone(),
            sub: "eu@customer.io".into(),
            iat: now,
            nbf: now,
            exp: now + 3600,
            jti: "bench".into(),
            org: "acme".into(),
            project: "shop".into(),
            svc: service.id,
            tid: record.id.to_string(),
            tg: tollgate::jwt::EPHEMERAL.into(),
            email: Some("eu@customer.io".into()),
            uid: None,
            attrs: serde_json::json!({"tenant": "t-1"}).as_object().unwrap().clone(),
            scope: None,
            env: None,
        };
        let token = jwt.sign(&claims).unwrap();
        w.verifier.verify_ephemeral(&token, jwt).await.unwrap();
        token
    });
    c.bench_function("jwt/verify_signature_and_claims", |b| {
        b.iter(|| jwt.verify(black_box(&token)).unwrap())
    });
    c.bench_function("auth/verify_ephemeral_cache_hit", |b| {
        b.to_async(&w.runtime)
            .iter(|| async { w.verifier.verify_ephemeral(black_box(&token), jwt).await.unwrap() })
    });
}

criterion_group!(benches, token_parse, cache_hit, authorize_and_headers, jwt);
criterion_main!(benches);
