//! An in-memory backend for unit tests: one process, nothing on disk. Counts reads so tests can
//! prove that a request path did not touch the store, and can be switched off to act unreachable.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;

use super::feed::LocalFeed;
use super::{Backend, Batch, InvalidationStream, StoreError};

#[derive(Default)]
struct State {
    kv: HashMap<String, String>,
    sets: HashMap<String, BTreeSet<String>>,
    lists: HashMap<String, VecDeque<String>>,
}

/// The in-memory backend.
pub struct MemoryBackend {
    state: Mutex<State>,
    feed: LocalFeed,
    reads: AtomicU64,
    down: AtomicBool,
    subscriptions: AtomicU64,
    feeds_end_at_once: AtomicBool,
    before_commit: Mutex<Option<BeforeCommit>>,
}

/// A change another writer makes just before the next batch is checked.
/// Values, then sets, as [`MemoryBackend::before_next_commit`] changes them.
pub type Changed<'a> = (&'a mut HashMap<String, String>, &'a mut HashMap<String, BTreeSet<String>>);
type BeforeCommit = Box<dyn FnOnce(Changed<'_>) + Send>;

impl Default for MemoryBackend {
    fn default() -> Self {
        MemoryBackend {
            state: Mutex::default(),
            feed: LocalFeed::default(),
            reads: AtomicU64::new(0),
            down: AtomicBool::new(false),
            subscriptions: AtomicU64::new(0),
            feeds_end_at_once: AtomicBool::new(false),
            before_commit: Mutex::default(),
        }
    }
}

impl MemoryBackend {
    /// How many reads (`get`, `get_many`, `members`, `list`: store commands) have been served.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    /// How many times the invalidation feed has been subscribed to.
    pub fn subscriptions(&self) -> u64 {
        self.subscriptions.load(Ordering::SeqCst)
    }

    /// Makes every subscription end as soon as it is made (as Redis's does for an instance that
    /// cannot read what a newer build publishes), or not.
    pub fn set_feeds_end_at_once(&self, end: bool) {
        self.feeds_end_at_once.store(end, Ordering::SeqCst);
    }

    /// Runs `change` on the stored values and sets just before the next batch is checked: another
    /// writer's change landing between a decision's reads and its write.
    pub fn before_next_commit(&self, change: impl FnOnce(Changed<'_>) + Send + 'static) {
        *self.before_commit.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(change));
    }

    /// Makes every call fail as if the store were unreachable, or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.feed.close();
        }
    }

    fn state(&self) -> Result<std::sync::MutexGuard<'_, State>, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("memory backend switched off".into()));
        }
        // A panic while holding the lock cannot leave half a batch: batches apply after all checks.
        Ok(self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        Ok(self.state()?.kv.get(key).cloned())
    }

    /// One read, as one round trip on a backend that has them.
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let state = self.state()?;
        Ok(keys.iter().map(|key| state.kv.get(key).cloned()).collect())
    }

    async fn members(&self, set: &str) -> Result<Vec<String>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        Ok(self.state()?.sets.get(set).map(|s| s.iter().cloned().collect()).unwrap_or_default())
    }

    async fn list(&self, key: &str, skip: usize, limit: usize) -> Result<Vec<String>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let state = self.state()?;
        Ok(state
            .lists
            .get(key)
            .map(|l| l.iter().skip(skip).take(limit).cloned().collect())
            .unwrap_or_default())
    }

    async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        {
            let mut state = self.state()?;
            let change = self.before_commit.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(change) = change {
                let State { kv, sets, .. } = &mut *state;
                change((kv, sets));
            }
            if let Some(k) = batch.absent.iter().find(|k| state.kv.contains_key(*k)) {
                return Err(StoreError::Conflict(k.clone()));
            }
            if let Some((k, _)) = batch.expect.iter().find(|(k, v)| state.kv.get(k) != Some(v)) {
                return Err(StoreError::Changed(k.clone()));
            }
            if let Some((k, _)) =
                batch.sizes.iter().find(|(k, n)| state.sets.get(k).map_or(0, |s| s.len()) > *n)
            {
                return Err(StoreError::Changed(k.clone()));
            }
            for (k, v) in batch.put {
                state.kv.insert(k, v);
            }
            for k in batch.del {
                state.kv.remove(&k);
            }
            for (k, v, at) in batch.newer {
                if state.kv.get(&k).is_none_or(|cur| super::stored_at(cur) < at) {
                    state.kv.insert(k, v);
                }
            }
            for (set, member) in batch.sadd {
                state.sets.entry(set).or_default().insert(member);
            }
            for (set, member) in batch.srem {
                if let Some(s) = state.sets.get_mut(&set) {
                    s.remove(&member);
                }
            }
            for (key, value, max) in batch.lpush {
                let list = state.lists.entry(key).or_default();
                list.push_front(value);
                list.truncate(max);
            }
        }
        self.feed.publish(&batch.publish);
        Ok(())
    }

    async fn subscribe(&self) -> Result<InvalidationStream, StoreError> {
        drop(self.state()?);
        self.subscriptions.fetch_add(1, Ordering::SeqCst);
        if self.feeds_end_at_once.load(Ordering::SeqCst) {
            return Ok(Box::pin(futures_util::stream::empty()));
        }
        Ok(self.feed.subscribe())
    }

    async fn durability_warning(&self) -> Result<Option<String>, StoreError> {
        Ok(Some("the in-memory store keeps nothing across a restart".into()))
    }

    fn describe(&self) -> String {
        "memory (tests only)".into()
    }
}
