//! The in-process cache (moka) of store records, kept true by the invalidation feed.
//!
//! Records (tokens, users, services) are cached separately, so a role change or a suspension
//! invalidates one user entry and applies to every token of that user on the next request.
//! Concurrent misses of one key share one store read (moka's `try_get_with`).
//!
//! Two rules keep a stale record from ever being used:
//! - While the invalidation feed is down, the cache is bypassed (every lookup reads the store) and
//!   everything cached before is dropped; it is used again only once the feed is back.
//! - A load that was in flight while its key was invalidated must not win: every entry carries the
//!   generation at which its store read started, every invalidation records the generation at which
//!   it happened, and an entry older than its key's last invalidation is treated as a miss.
//!
//! In front of moka sits a small hot tier (quick_cache, [`HOT_CAPACITY`] entries per record kind):
//! the entries read in the last second, copied out of moka, read for a tenth of moka's cost (moka
//! records every read for its eviction policy and checks the clock). moka stays the cache of
//! record: capacity, TTL, eviction and shared loads are its. A hot entry obeys the same two
//! rules (it is checked against the same generations, and an invalidation removes it too) and is
//! used for at most [`HOT_FOR`] after it was read from moka, so a record is at most `ttl` + 1 s old.

use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::store::{CommitListener, Invalidation, Service, Store, StoreError, Stored, TokenRecord, User};
use crate::token::TokenId;

/// Capacity and lifetime of cached entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// Most entries per record kind.
    pub capacity: u64,
    /// Longest an entry lives in moka even without an invalidation; a copy in the hot tier is used
    /// for up to [`HOT_FOR`] (at most this long) after it was read there.
    pub ttl: Duration,
}

struct Entry<V> {
    value: Arc<V>,
    generation: u64,
}

impl<V> Clone for Entry<V> {
    fn clone(&self) -> Self {
        Entry { value: self.value.clone(), generation: self.generation }
    }
}

/// Why a load produced nothing to cache. Not-found is an error here only so moka does not cache it.
enum Miss<V> {
    NotFound,
    Store(StoreError),
    /// Read, but slower than the load bound: served, not kept (see [`RecordCache::load`]).
    Late(Entry<V>),
}

struct Generations {
    current: AtomicU64,
    all_dropped_at: AtomicU64,
    /// The newest generation of any key's invalidation marker, raised before the marker is set: an
    /// entry at least this new needs no marker lookup (the common case on the request path).
    newest_marker: AtomicU64,
    live: AtomicBool,
}

/// Keys are hashed with foldhash, seeded per process: a fraction of SipHash's cost on the request
/// path. It is only minimally DoS-resistant, which is enough here: no key a client chooses is ever
/// inserted (record ids are the store's, and a presented token's id is cached only when the store
/// has that token; a not-found is never cached).
type Hasher = foldhash::fast::RandomState;

/// Most entries of one record kind in the hot tier.
pub const HOT_CAPACITY: usize = 4096;

/// Longest a hot entry is used after it was read from moka (the TTL, when that is shorter).
pub const HOT_FOR: Duration = Duration::from_secs(1);

/// Longest wait before subscribing to the invalidation feed again; a feed that lived this long
/// before it was lost is retried at once (50 ms) again.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// An entry of the hot tier and when it stops being used.
type Hot<V> = (Entry<V>, Instant);

struct RecordCache<K, V> {
    entries: moka::future::Cache<K, Entry<V>, Hasher>,
    hot: quick_cache::sync::Cache<K, Hot<V>, quick_cache::UnitWeighter, Hasher>,
    hot_for: Duration,
    invalidated_at: moka::sync::Cache<K, u64, Hasher>,
    load_bound: Duration,
    hits: prometheus::IntCounter,
    misses: prometheus::IntCounter,
}

/// The cache's instruments.
#[derive(Clone)]
pub struct CacheStats {
    /// Lookups by record kind and result (`hit` or `miss`).
    pub lookups: prometheus::IntCounterVec,
    /// Entries evicted for capacity.
    pub evictions: prometheus::IntCounter,
    /// Invalidations applied from the feed.
    pub invalidations: prometheus::IntCounter,
    /// 1 while the invalidation feed is live and the cache in use, 0 while it is bypassed.
    pub live: prometheus::IntGauge,
    /// Times the feed was lost (the cache dropped, the store read until the feed is back).
    pub feed_lost: prometheus::IntCounter,
}

impl Default for CacheStats {
    fn default() -> Self {
        CacheStats {
            lookups: crate::metrics::counter_vec("tollgate_cache_lookups_total", "Cache lookups by record kind and result (hit or miss; while the feed is down every lookup is a miss)", &["kind", "result"]),
            evictions: crate::metrics::counter("tollgate_cache_evictions_total", "Entries evicted for capacity"),
            invalidations: crate::metrics::counter("tollgate_invalidations_total", "Invalidations received from the feed"),
            live: crate::metrics::gauge("tollgate_cache_live", "1 while the invalidation feed is live and the cache in use; 0 while it is bypassed and every lookup reads the store"),
            feed_lost: crate::metrics::counter("tollgate_invalidation_feed_lost_total", "Times the invalidation feed was lost (the cache dropped, the store read until the feed is back)"),
        }
    }
}

impl<K, V> RecordCache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    fn new(settings: CacheSettings, load_bound: Duration, stats: &CacheStats, kind: &str) -> Self {
        let evictions = stats.evictions.clone();
        RecordCache {
            hits: stats.lookups.with_label_values(&[kind, "hit"]),
            misses: stats.lookups.with_label_values(&[kind, "miss"]),
            entries: moka::future::Cache::builder()
                .max_capacity(settings.capacity)
                .time_to_live(settings.ttl)
                .eviction_listener(move |_, _, cause| {
                    if cause == moka::notification::RemovalCause::Size {
                        evictions.inc();
                    }
                })
                .build_with_hasher(Hasher::default()),
            hot: quick_cache::sync::Cache::with(
                HOT_CAPACITY,
                HOT_CAPACITY as u64,
                quick_cache::UnitWeighter,
                Hasher::default(),
                quick_cache::sync::DefaultLifecycle::default(),
            ),
            hot_for: HOT_FOR.min(settings.ttl),
            // An invalidation must be remembered as long as a stale entry could live, so this map is
            // bounded by time only: a capacity bound could evict (or refuse) a marker still needed.
            invalidated_at: moka::sync::Cache::builder()
                .time_to_live(settings.ttl + load_bound * 2)
                .build_with_hasher(Hasher::default()),
            load_bound,
        }
    }

    fn is_fresh(&self, key: &K, entry: &Entry<V>, gens: &Generations) -> bool {
        entry.generation >= gens.all_dropped_at.load(Ordering::Acquire)
            && (entry.generation >= gens.newest_marker.load(Ordering::Acquire)
                || self.invalidated_at.get(key).is_none_or(|g| entry.generation >= g))
    }

    async fn get_or_load<F, Fut>(
        &self,
        key: &K,
        gens: &Generations,
        load: F,
    ) -> Result<Option<Arc<V>>, StoreError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Option<V>, StoreError>>,
    {
        if gens.live.load(Ordering::Acquire) {
            let now = Instant::now();
            if let Some((entry, until)) = self.hot.get(key) {
                if until > now && self.is_fresh(key, &entry, gens) {
                    self.hits.inc();
                    return Ok(Some(entry.value));
                }
            }
            if let Some(entry) = self.entries.get(key).await {
                if self.is_fresh(key, &entry, gens) {
                    self.hits.inc();
                    let value = entry.value.clone();
                    self.hot.insert(key.clone(), (entry, now + self.hot_for));
                    return Ok(Some(value));
                }
            }
        }
        // Boxed: the loading path's future is about 2 KiB, and a hit should not carry (and move)
        // it in every request's futures.
        Box::pin(self.load(key, gens, load)).await
    }

    /// A miss: the store read, shared by concurrent misses of the key, cached when still fresh.
    async fn load<F, Fut>(&self, key: &K, gens: &Generations, load: F) -> Result<Option<Arc<V>>, StoreError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Option<V>, StoreError>>,
    {
        self.misses.inc();
        if !gens.live.load(Ordering::Acquire) {
            return Ok(load().await?.map(Arc::new));
        }
        // A stale entry is dropped first, so the shared load below reads the store again.
        if self.entries.get(key).await.is_some_and(|entry| !self.is_fresh(key, &entry, gens)) {
            self.entries.invalidate(key).await;
        }
        let loaded = self
            .entries
            .try_get_with_by_ref(key, async {
                let generation = gens.current.load(Ordering::Acquire);
                let started = Instant::now();
                match load().await {
                    // An invalidation's marker outlives an entry by twice the load bound, counted
                    // from the invalidation: an entry kept after a longer load (a stalled task, a
                    // paused machine) could outlive the marker that refuses it.
                    Ok(Some(v)) if started.elapsed() > self.load_bound => {
                        Err(Miss::Late(Entry { value: Arc::new(v), generation }))
                    }
                    Ok(Some(v)) => Ok(Entry { value: Arc::new(v), generation }),
                    Ok(None) => Err(Miss::NotFound),
                    Err(e) => Err(Miss::Store(e)),
                }
            })
            .await;
        let entry = match loaded {
            Ok(entry) => entry,
            Err(miss) => match miss.as_ref() {
                Miss::NotFound => return Ok(None),
                Miss::Store(e) => return Err(e.clone()),
                // Served, uncached, unless an invalidation came meanwhile.
                Miss::Late(entry) if self.is_fresh(key, entry, gens) => return Ok(Some(entry.value.clone())),
                Miss::Late(_) => return Ok(load().await?.map(Arc::new)),
            },
        };
        if !self.is_fresh(key, &entry, gens) {
            // A shared load that started before an invalidation: read again, uncached.
            self.entries.invalidate(key).await;
            return Ok(load().await?.map(Arc::new));
        }
        Ok(Some(entry.value))
    }

    /// Marks the key's entry stale at once (the generation check refuses it); removal follows.
    fn mark_stale(&self, key: &K, generation: u64, gens: &Generations) {
        gens.newest_marker.fetch_max(generation, Ordering::AcqRel);
        // The newest generation wins, whichever thread (the feed follower, a local write) gets here
        // last: a marker set back to an older generation would let a load begun in between count
        // as fresh.
        self.invalidated_at
            .entry(key.clone())
            .and_upsert_with(|marked| marked.map_or(generation, |m| m.into_value().max(generation)));
        self.hot.remove(key);
    }

    async fn invalidate(&self, key: &K, generation: u64, gens: &Generations) {
        self.mark_stale(key, generation, gens);
        self.entries.invalidate(key).await;
    }

    fn clear(&self) {
        self.entries.invalidate_all();
        self.hot.clear();
    }
}

/// Cached tokens, users and services of one gateway instance.
pub struct Cache {
    store: Store,
    gens: Generations,
    tokens: RecordCache<TokenId, TokenRecord>,
    users: RecordCache<String, User>,
    services: RecordCache<String, Service>,
    stats: CacheStats,
}

impl Cache {
    /// An empty cache in front of `store`. It is bypassed until [`Cache::follow`] has subscribed.
    pub fn new(store: Store, settings: CacheSettings) -> Cache {
        let bound = store.timeout();
        let stats = CacheStats::default();
        Cache {
            gens: Generations {
                current: AtomicU64::new(1),
                all_dropped_at: AtomicU64::new(0),
                newest_marker: AtomicU64::new(0),
                live: AtomicBool::new(false),
            },
            tokens: RecordCache::new(settings, bound, &stats, "token"),
            users: RecordCache::new(settings, bound, &stats, "user"),
            services: RecordCache::new(settings, bound, &stats, "service"),
            stats,
            store,
        }
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether the cache is in use (the invalidation feed is live).
    pub fn is_live(&self) -> bool {
        self.gens.live.load(Ordering::Acquire)
    }

    /// The cache's instruments.
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// How many invalidations this instance has applied.
    pub fn invalidations_applied(&self) -> u64 {
        self.stats.invalidations.get()
    }

    /// A token record, from the cache or the store.
    pub async fn token(&self, id: &TokenId) -> Result<Option<Arc<TokenRecord>>, StoreError> {
        self.tokens
            .get_or_load(id, &self.gens, || async {
                Ok(self.store.get_token(id).await?.map(Stored::into_inner))
            })
            .await
    }

    /// A user record, from the cache or the store.
    pub async fn user(&self, id: &String) -> Result<Option<Arc<User>>, StoreError> {
        self.users
            .get_or_load(id, &self.gens, || async {
                Ok(self.store.get_user(id).await?.map(Stored::into_inner))
            })
            .await
    }

    /// A service record, from the cache or the store.
    pub async fn service(&self, id: &String) -> Result<Option<Arc<Service>>, StoreError> {
        self.services
            .get_or_load(id, &self.gens, || async {
                Ok(self.store.get_service(id).await?.map(Stored::into_inner))
            })
            .await
    }

    /// Applies one invalidation.
    pub async fn invalidate(&self, inv: &Invalidation) {
        let generation = self.next_generation();
        match inv {
            Invalidation::Token(id) => self.tokens.invalidate(id, generation, &self.gens).await,
            Invalidation::User(id) => self.users.invalidate(id, generation, &self.gens).await,
            Invalidation::Service(id) => self.services.invalidate(id, generation, &self.gens).await,
        }
        self.stats.invalidations.inc();
    }

    fn next_generation(&self) -> u64 {
        self.gens.current.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Stops using the cache and drops everything in it.
    fn go_dark(&self) {
        self.gens.live.store(false, Ordering::Release);
        self.stats.live.set(0);
        self.drop_all();
    }

    /// Drops everything, including loads in flight, and starts using the cache.
    fn go_live(&self) {
        self.drop_all();
        self.gens.live.store(true, Ordering::Release);
        self.stats.live.set(1);
    }

    fn drop_all(&self) {
        let generation = self.next_generation();
        self.gens.all_dropped_at.store(generation, Ordering::Release);
        self.tokens.clear();
        self.users.clear();
        self.services.clear();
    }

    /// Follows the invalidation feed until `stop` resolves: subscribes, goes live, applies every
    /// invalidation; when the feed is lost, goes dark and subscribes again with backoff.
    pub async fn follow(&self, mut stop: impl std::future::Future<Output = ()> + Unpin) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let subscribed = tokio::select! {
                s = self.store.subscribe() => s,
                _ = &mut stop => return,
            };
            match subscribed {
                Ok(mut feed) => {
                    self.go_live();
                    tracing::info!(store = %self.store.describe(), "invalidation feed live; cache in use");
                    let live_since = tokio::time::Instant::now();
                    loop {
                        tokio::select! {
                            inv = feed.next() => match inv {
                                Some(inv) => self.invalidate(&inv).await,
                                None => break,
                            },
                            // Requests still in flight while the process drains read the store
                            // from here on: nothing tells this cache of changes any more.
                            _ = &mut stop => return self.go_dark(),
                        }
                    }
                    self.go_dark();
                    self.stats.feed_lost.inc();
                    tracing::warn!(
                        "invalidation feed lost; cache dropped, reading the store until it is back"
                    );
                    // A feed that keeps ending at once (a newer build's invalidations all through
                    // a rolling upgrade, a connection cut as soon as made) is retried with the
                    // backoff growing, not every 50 ms with two log lines each time.
                    if live_since.elapsed() >= MAX_BACKOFF {
                        backoff = Duration::from_millis(50);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "invalidation feed not available yet");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = &mut stop => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

impl CommitListener for Cache {
    /// This process's own writes make the cached records stale before the write call returns.
    fn committed(&self, changed: &[Invalidation]) {
        for inv in changed {
            let generation = self.next_generation();
            match inv {
                Invalidation::Token(id) => self.tokens.mark_stale(id, generation, &self.gens),
                Invalidation::User(id) => self.users.mark_stale(id, generation, &self.gens),
                Invalidation::Service(id) => self.services.mark_stale(id, generation, &self.gens),
            }
        }
    }
}

#[cfg(test)]
mod tests;
