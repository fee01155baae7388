//! Revocation propagation and memory per cached token. Run with `cargo bench --bench propagation`
//! (needs `redis-server` on the PATH).
//!
//! Propagation: two `tollgate serve` processes (the real binary, each with its own Redis
//! connections, cache and invalidation follower) share one `redis-server`. For each trial a token
//! is issued through instance A's admin API and proven at instance B's proxy (so B has it cached),
//! then revoked through A's admin API (`POST /v1/tokens/{id}/revoke`), and B's proxy is asked again
//! and again, over one kept-alive connection, until it answers `401` for a revoked token; the time
//! from the revoke call's answer to that `401` is recorded.
//!
//! Memory: resident memory grows by how much when N tokens (and their owners) are cached and their
//! secrets proven; reported as bytes per cached token.

// Set-up failures in a benchmark should stop it with their message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::auth::Verifier;
use tollgate::cache::{Cache, CacheSettings};
use tollgate::lifecycle::{self, TokenSpec};
use tollgate::policy::Role;
use tollgate::store::memory::MemoryBackend;
use tollgate::store::redis::RedisBackend;
use tollgate::store::{Attributes, Owner, Store};
use tollgate::testing::{free_port, wait_for_port, RedisServer};
use tollgate::token::Argon2Params;

const ARGON2: Argon2Params = Argon2Params { memory_kib: 64, iterations: 1, parallelism: 1 };
const TRIALS: usize = 300;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A `tollgate serve` on `redis_url`, its proxy on `port` in front of `upstream`; stopped on drop.
struct Instance {
    child: Child,
    port: u16,
    admin: u16,
    _dir: tempfile::TempDir,
}

impl Instance {
    fn start(redis_url: &str, upstream: u16) -> Instance {
        let (port, admin) = (free_port(), free_port());
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            r#"
listen: 127.0.0.1:{port}
threads: 1
admin: {{ listen: "127.0.0.1:{admin}" }}
store: {{ redis: {{ url: "{redis_url}", key_prefix: "bench:" }}, timeout: 1s }}
log: {{ level: warn, access: false }}
argon2: {{ memory_kib: {mem}, iterations: 1, parallelism: 1 }}
orgs: {{ acme: {{ projects: {{ shop: {{ environments: [production] }} }} }} }}
routes:
  - {{ name: shop, path: /, upstream: "127.0.0.1:{upstream}", org: acme, project: shop, environment: production }}
"#,
            mem = ARGON2.memory_kib,
        );
        let path = dir.path().join("tollgate.yaml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(port, "tollgate", &mut child, None);
        wait_for_port(admin, "tollgate admin API", &mut child, None);
        Instance { child, port, admin, _dir: dir }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn propagation() {
    let redis = RedisServer::start(["--save", "", "--appendonly", "no"]);
    let url = redis.url();
    // The first admin, made as `tollgate bootstrap` makes one (on the store directly).
    let store = Store::new(
        Arc::new(RedisBackend::new(&url, "bench:", Duration::from_secs(1)).unwrap()),
        Duration::from_secs(1),
    );
    lifecycle::ensure_org(&store, "acme").await.unwrap();
    let limits = Default::default();
    let (_, admin_token, _) =
        lifecycle::bootstrap(&store, ARGON2, &limits, "acme", "p@acme.io").await.unwrap();
    let upstream = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let upstream_port = upstream.local_addr().unwrap().port();
    tokio::spawn(tollgate::echo::serve(upstream));
    let (a, b) = (Instance::start(&url, upstream_port), Instance::start(&url, upstream_port));
    let http = reqwest::Client::builder().pool_max_idle_per_host(4).build().unwrap();
    let admin = |path: &str| format!("http://127.0.0.1:{}{path}", a.admin);
    let at_b = format!("http://127.0.0.1:{}/items", b.port);
    let mut times = Vec::with_capacity(TRIALS);
    for trial in 0..TRIALS {
        let issued: serde_json::Value = http
            .post(admin("/v1/tokens"))
            .bearer_auth(&admin_token.token)
            .json(&serde_json::json!({ "display_name": format!("trial {trial}") }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = issued["token"].as_str().expect("a token issued").to_string();
        let id = issued["id"].as_str().expect("its id").to_string();
        // Proven at B, so that B holds it in its cache.
        let proven = http.get(&at_b).bearer_auth(&token).send().await.unwrap();
        assert_eq!(proven.status(), 200, "instance B did not accept a new token");
        let revoked = http
            .post(admin(&format!("/v1/tokens/{id}/revoke")))
            .bearer_auth(&admin_token.token)
            .json(&serde_json::json!({}))
            .send()
            .await
            .unwrap();
        assert!(revoked.status().is_success(), "the revoke failed: {}", revoked.status());
        let returned = Instant::now();
        loop {
            let resp = http.get(&at_b).bearer_auth(&token).send().await.unwrap();
            if resp.status() == 401 {
                let body = resp.text().await.unwrap();
                assert!(body.contains("revoked"), "refused, but not as revoked: {body}");
                break;
            }
            assert_eq!(resp.status(), 200, "instance B answered otherwise");
            assert!(returned.elapsed() < Duration::from_secs(5), "revocation never reached instance B");
        }
        times.push(returned.elapsed());
    }
    times.sort();
    println!(
        "revocation propagation over {TRIALS} trials (admin API of A to B's proxy, over HTTP): p50 {:?}, p99 {:?}, max {:?}",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times[times.len() - 1]
    );
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

async fn memory(n: usize) {
    let store = Store::new(Arc::new(MemoryBackend::default()), Duration::from_secs(5));
    let cache = Arc::new(Cache::new(
        store.clone(),
        CacheSettings { capacity: n as u64 + 1000, ttl: Duration::from_secs(3600) },
    ));
    let follower = cache.clone();
    tokio::spawn(async move { follower.follow(Box::pin(std::future::pending())).await });
    while !cache.is_live() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let verifier = Verifier::new(cache, n as u64 + 1000, 2);
    // One user per 10 tokens, as with people holding a few tokens each.
    let mut tokens = Vec::with_capacity(n);
    let mut user = None;
    for i in 0..n {
        if i % 10 == 0 {
            let u = lifecycle::create_user(
                &store,
                "acme",
                &format!("u{i}@acme.io"),
                Role::Viewer,
                BTreeMap::new(),
                Attributes::new(),
            )
            .await
            .unwrap();
            user = Some(u.id);
        }
        let owner = Owner::User(user.clone().unwrap());
        let (t, _) =
            lifecycle::issue_token(&store, ARGON2, "acme", owner, TokenSpec::default()).await.unwrap();
        tokens.push(t.token);
    }
    let before = resident_bytes();
    for t in &tokens {
        verifier.verify(t).await.unwrap();
    }
    let after = resident_bytes();
    let per_token = after.saturating_sub(before) as f64 / n as f64;
    println!(
        "memory with {n} cached tokens: {:.0} bytes per cached token (RSS {} MiB -> {} MiB)",
        per_token,
        before >> 20,
        after >> 20
    );
}

// The allocator `tollgate serve` runs with, so the memory figures are the product's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // `cargo test --benches` runs benches with `--bench` absent; do the work only under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // `cargo bench --bench propagation -- memory` (or `-- propagation`) runs one part.
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let wanted = |part: &str| only.is_empty() || only.iter().any(|o| o == part);
    runtime.block_on(async {
        if wanted("propagation") {
            propagation().await;
        }
        if wanted("memory") {
            for n in [100_000, 1_000_000] {
                memory(n).await;
            }
        }
    });
}
