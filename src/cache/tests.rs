//! The cache is used only while the invalidation feed is live, and never serves a record loaded
//! before that record's last invalidation.

use std::collections::BTreeMap;

use super::*;
use crate::lifecycle;
use crate::policy::Role;
use crate::store::memory::MemoryBackend;
use crate::store::Attributes;

async fn live_cache() -> (Arc<MemoryBackend>, Arc<Cache>) {
    let backend = Arc::new(MemoryBackend::default());
    let cache = following(&backend);
    wait(|| cache.is_live()).await;
    (backend, cache)
}

/// A cache on `backend`, following its feed from now on.
fn following(backend: &Arc<MemoryBackend>) -> Arc<Cache> {
    let store = Store::new(backend.clone(), Duration::from_millis(200));
    let cache = Arc::new(Cache::new(store, CacheSettings { capacity: 100, ttl: Duration::from_secs(60) }));
    let follower = cache.clone();
    tokio::spawn(async move { follower.follow(Box::pin(std::future::pending())).await });
    cache
}

async fn wait(cond: impl Fn() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("condition not reached");
}

/// A new viewer, returned once the cache has applied the invalidation its creation sent.
async fn viewer(cache: &Cache) -> User {
    let user = lifecycle::create_user(
        cache.store(),
        "acme",
        "a@x.io",
        Role::Viewer,
        BTreeMap::new(),
        Attributes::new(),
    )
    .await
    .unwrap();
    wait(|| cache.invalidations_applied() >= 1).await;
    user
}

#[tokio::test]
async fn a_lost_feed_bypasses_and_drops_the_cache_until_it_is_back() {
    let (backend, cache) = live_cache().await;
    let user = viewer(&cache).await;
    cache.user(&user.id).await.unwrap().unwrap();
    let reads = backend.reads();
    cache.user(&user.id).await.unwrap().unwrap();
    assert_eq!(backend.reads(), reads, "hit");
    // The gauge follows `is_live` at once; the loss counter after the cache went dark.
    wait(|| cache.stats().live.get() == 1).await;
    assert_eq!(cache.stats().feed_lost.get(), 0);

    backend.set_down(true);
    wait(|| cache.stats().feed_lost.get() == 1).await;
    assert!(!cache.is_live());
    assert_eq!(cache.stats().live.get(), 0);
    assert!(cache.user(&user.id).await.is_err(), "a dark cache reads the store, which is down");
    backend.set_down(false);
    // Until the feed is back every lookup reads the store.
    wait(|| cache.is_live()).await;
    wait(|| cache.stats().live.get() == 1).await;
    let reads = backend.reads();
    cache.user(&user.id).await.unwrap().unwrap();
    assert_eq!(backend.reads(), reads + 1, "the cache was dropped while dark");
}

/// Each lost feed drops the cache and logs; one lost as soon as it is live is retried with the
/// backoff growing to a second, not every 50 ms (time is tokio's, paused: no clock is read).
#[tokio::test(start_paused = true)]
async fn a_feed_that_keeps_ending_at_once_is_retried_with_growing_backoff() {
    let backend = Arc::new(MemoryBackend::default());
    backend.set_feeds_end_at_once(true);
    let cache = following(&backend);
    tokio::time::sleep(Duration::from_secs(10)).await;
    // 0, 0.05, 0.15, 0.35, 0.75, 1.55 s, then one a second: 14 in ten seconds (200 at 50 ms).
    let subscribed = backend.subscriptions();
    assert!((10..=16).contains(&subscribed), "{subscribed} subscriptions in 10 s");

    // One that then stays live a while, lost, is subscribed to again at once (50 ms), not after
    // the second the backoff had reached.
    backend.set_feeds_end_at_once(false);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(cache.is_live());
    let before = backend.subscriptions();
    backend.set_down(true);
    backend.set_down(false);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(backend.subscriptions(), before + 1, "subscribed again within 200 ms");
    assert!(cache.is_live());
}

#[tokio::test]
async fn an_entry_loaded_before_its_invalidation_is_never_served() {
    let (backend, cache) = live_cache().await;
    let mut user = viewer(&cache).await;
    // Simulate the race: a load starts, the record changes and is invalidated, then the load lands.
    let generation = cache.gens.current.load(Ordering::Acquire);
    cache.users.entries.insert(user.id.clone(), Entry { value: Arc::new(user.clone()), generation }).await;
    let before = cache.store().get_user(&user.id).await.unwrap().unwrap();
    user.org_role = Role::Admin;
    cache.store().update_user(&before, &user, None, None).await.unwrap();
    wait(|| cache.invalidations_applied() >= 2).await;
    cache
        .users
        .entries
        .insert(
            user.id.clone(),
            Entry { value: Arc::new(User { org_role: Role::Viewer, ..user.clone() }), generation },
        )
        .await;
    let reads = backend.reads();
    assert_eq!(cache.user(&user.id).await.unwrap().unwrap().org_role, Role::Admin);
    assert_eq!(backend.reads(), reads + 1);
}

#[tokio::test]
async fn the_hot_tier_serves_repeated_hits_and_drops_an_entry_on_invalidation() {
    let (backend, cache) = live_cache().await;
    let mut user = viewer(&cache).await;
    cache.user(&user.id).await.unwrap().unwrap(); // loaded into moka
    cache.user(&user.id).await.unwrap().unwrap(); // a moka hit, copied to the hot tier
    assert!(cache.users.hot.get(&user.id).is_some(), "a moka hit is copied to the hot tier");
    let reads = backend.reads();
    cache.user(&user.id).await.unwrap().unwrap();
    assert_eq!(backend.reads(), reads, "hit");

    let before = cache.store().get_user(&user.id).await.unwrap().unwrap();
    user.org_role = Role::Admin;
    cache.store().update_user(&before, &user, None, None).await.unwrap();
    wait(|| cache.invalidations_applied() >= 2).await;
    assert!(cache.users.hot.get(&user.id).is_none(), "the invalidation removed the hot entry");
    assert_eq!(cache.user(&user.id).await.unwrap().unwrap().org_role, Role::Admin);
}

#[tokio::test]
async fn a_hot_entry_older_than_its_invalidation_or_past_its_time_is_never_served() {
    let (_backend, cache) = live_cache().await;
    let mut user = viewer(&cache).await;
    let viewer = user.clone();
    let hot = |generation: u64, until: Instant| -> Hot<User> {
        (Entry { value: Arc::new(viewer.clone()), generation }, until)
    };
    // The race: a stale copy lands in the hot tier after the invalidation removed the old one.
    let generation = cache.gens.current.load(Ordering::Acquire);
    let before = cache.store().get_user(&user.id).await.unwrap().unwrap();
    user.org_role = Role::Admin;
    cache.store().update_user(&before, &user, None, None).await.unwrap();
    wait(|| cache.invalidations_applied() >= 2).await;
    let later = Instant::now() + Duration::from_secs(60);
    cache.users.hot.insert(user.id.clone(), hot(generation, later));
    assert_eq!(cache.user(&user.id).await.unwrap().unwrap().org_role, Role::Admin);

    // A fresh generation, but past its time: moka (here, the store) is asked again.
    let fresh = cache.gens.current.load(Ordering::Acquire) + 1;
    cache.users.hot.insert(user.id.clone(), hot(fresh, Instant::now()));
    assert_eq!(cache.user(&user.id).await.unwrap().unwrap().org_role, Role::Admin);
}

#[tokio::test]
async fn an_invalidation_marker_never_goes_back_to_an_older_generation() {
    let (_backend, cache) = live_cache().await;
    let user = viewer(&cache).await;
    // The follower took generation g and was held up; a local write marked g + 1 meanwhile, and a
    // load began at g. When the follower's marker lands last, the load is still stale.
    let g = cache.gens.current.load(Ordering::Acquire) + 10;
    cache.users.mark_stale(&user.id, g + 1, &cache.gens);
    cache.users.mark_stale(&user.id, g, &cache.gens);
    assert_eq!(cache.users.invalidated_at.get(&user.id), Some(g + 1));
    let loaded_before = Entry { value: Arc::new(user.clone()), generation: g };
    assert!(!cache.users.is_fresh(&user.id, &loaded_before, &cache.gens));
}

#[tokio::test]
async fn a_load_slower_than_the_store_bound_is_served_but_not_kept() {
    let (_backend, cache) = live_cache().await;
    let user = viewer(&cache).await;
    let loads = std::sync::atomic::AtomicUsize::new(0);
    let slow = || async {
        loads.fetch_add(1, Ordering::SeqCst);
        // Past the store's 200 ms bound: as a task not polled for that long would be.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(Some(user.clone()))
    };
    let key = user.id.clone();
    for round in 1..=2 {
        let got = cache.users.get_or_load(&key, &cache.gens, slow).await.unwrap().unwrap();
        assert_eq!(got.id, user.id);
        assert_eq!(loads.load(Ordering::SeqCst), round, "not kept: every lookup loads again");
    }
    let quick = || async {
        loads.fetch_add(1, Ordering::SeqCst);
        Ok(Some(user.clone()))
    };
    cache.users.get_or_load(&key, &cache.gens, quick).await.unwrap().unwrap();
    cache.users.get_or_load(&key, &cache.gens, quick).await.unwrap().unwrap();
    assert_eq!(loads.load(Ordering::SeqCst), 3, "a load within the bound is kept");
}

#[tokio::test]
async fn a_slow_load_overtaken_by_an_invalidation_is_read_again() {
    let (_backend, cache) = live_cache().await;
    let user = viewer(&cache).await;
    let loads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (key, cache2, loads2) = (user.id.clone(), cache.clone(), loads.clone());
    let store = cache.store().clone();
    let lookup = tokio::spawn(async move {
        let slow = || async {
            loads2.fetch_add(1, Ordering::SeqCst);
            let read = store.get_user(&key).await;
            // Past the store's 200 ms bound, with what was read before the change below.
            tokio::time::sleep(Duration::from_millis(300)).await;
            read.map(|u| u.map(crate::store::Stored::into_inner))
        };
        cache2.users.get_or_load(&key, &cache2.gens, slow).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = cache.store().get_user(&user.id).await.unwrap().unwrap();
    let admin = User { org_role: Role::Admin, ..user.clone() };
    cache.store().update_user(&before, &admin, None, None).await.unwrap();
    let got = lookup.await.unwrap().unwrap().unwrap();
    assert_eq!(got.org_role, Role::Admin, "the late read was stale: read again");
    assert_eq!(loads.load(Ordering::SeqCst), 2);
}
