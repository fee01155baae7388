//! Revocation propagation and memory per cached token. Run with `cargo bench --bench propagation`
//! (needs `redis-server` on the PATH).
//!
//! Propagation: two gateway instances, each with its own Redis connections, cache and invalidation
//! follower (exactly what `serve` runs), share one `redis-server`. For each trial a token is warmed in
//! instance B's cache, revoked through instance A's store, and B is polled until it refuses the token;
//! the time from the revoke call returning to B's first refusal is recorded. HTTP is left out: it adds
//! nothing to how fast the news travels.
//!
//! Memory: resident memory grows by how much when N tokens (and their owners) are cached and their
//! secrets proven; reported as bytes per cached token.

// Set-up failures in a benchmark should stop it with their message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::auth::Verifier;
use tollgate::cache::{Cache, CacheSettings};
use tollgate::lifecycle::{self, TokenSpec};
use tollgate::policy::Role;
use tollgate::store::memory::MemoryBackend;
use tollgate::store::redis::RedisBackend;
use tollgate::store::{Attributes, Owner, Store};
use tollgate::testing::RedisServer;
use tollgate::token::Argon2Params;

const ARGON2: Argon2Params = Argon2Params { memory_kib: 64, iterations: 1, parallelism: 1 };
const TRIALS: usize = 300;

/// One instance: store, cache following the feed, verifier.
async fn instance(url: &str) -> (Store, Arc<Verifier>) {
    let store = Store::new(
        Arc::new(RedisBackend::new(url, "bench:", Duration::from_secs(1)).unwrap()),
        Duration::from_secs(1),
    );
    let cache = Arc::new(Cache::new(
        store.clone(),
        CacheSettings { capacity: 100_000, ttl: Duration::from_secs(600) },
    ));
    let follower = cache.clone();
    tokio::spawn(async move { follower.follow(Box::pin(std::future::pending())).await });
    while !cache.is_live() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    (store, Arc::new(Verifier::new(cache, 100_000, 2)))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn propagation() {
    let redis = RedisServer::start(["--save", "", "--appendonly", "no"]);
    let url = redis.url();
    let (store_a, _) = instance(&url).await;
    let (_, verifier_b) = instance(&url).await;
    let user = lifecycle::create_user(
        &store_a,
        "acme",
        "p@acme.io",
        Role::Viewer,
        BTreeMap::new(),
        Attributes::new(),
    )
    .await
    .unwrap();
    let mut times = Vec::with_capacity(TRIALS);
    for _ in 0..TRIALS {
        let (token, _) = lifecycle::issue_token(
            &store_a,
            ARGON2,
            "acme",
            Owner::User(user.id.clone()),
            TokenSpec::default(),
        )
        .await
        .unwrap();
        // Warm B: the record is cached once B has heard of the token's creation and read it.
        tokio::time::sleep(Duration::from_millis(2)).await;
        verifier_b.verify(&token.token).await.unwrap();
        store_a.revoke_token(&token.id, None, None).await.unwrap();
        let returned = Instant::now();
        while verifier_b.verify(&token.token).await.is_ok() {
            tokio::task::yield_now().await;
            assert!(returned.elapsed() < Duration::from_secs(5), "revocation never reached instance B");
        }
        times.push(returned.elapsed());
    }
    times.sort();
    println!(
        "revocation propagation over {TRIALS} trials: p50 {:?}, p99 {:?}, max {:?}",
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
