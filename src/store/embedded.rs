//! The embedded backend: a redb database file on disk, for a single gateway node without Redis.
//! Every commit is durable (redb fsyncs on commit) before it is acknowledged. Invalidations stay in
//! the process, which is enough because only one process can open the file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableTable, TableDefinition};

use super::feed::LocalFeed;
use super::{Backend, Batch, InvalidationStream, StoreError};

const KV: TableDefinition<&str, &str> = TableDefinition::new("kv");
/// Set membership as (set, member) keys.
const SETS: TableDefinition<(&str, &str), ()> = TableDefinition::new("sets");
/// List entries as (list, descending sequence) keys, so a forward range reads newest first.
const LISTS: TableDefinition<(&str, u64), &str> = TableDefinition::new("lists");

/// The embedded backend.
pub struct EmbeddedBackend {
    db: Arc<Database>,
    path: PathBuf,
    feed: Arc<LocalFeed>,
    /// An I/O error (a full disk, say) met: redb refuses every later write, and every read it
    /// cannot answer from memory, until the file is opened again, so readiness says so.
    broken: AtomicBool,
    /// Slots for reads on the blocking threads: see [`READS_AT_ONCE`].
    reads: Arc<tokio::sync::Semaphore>,
}

/// Reads run on blocking threads at most this many at once. One given up on past
/// `store.timeout` still runs to its end, so under a flood of reads the database answers more
/// slowly than they come (each unknown token id a client makes up is one), a read waits for a
/// slot within its bound and is given up on without queueing work, rather than the blocking
/// queue and its memory growing with the flood.
const READS_AT_ONCE: usize = 32;

fn failed(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("embedded store: {e}"))
}

/// How an error that leaves the file unusable until it is opened again begins.
const BROKEN: &str = "embedded store: an I/O error";

/// A redb error; an I/O error, or one redb keeps answering since one, marks the store broken
/// ([`EmbeddedBackend::blocking`]).
fn redb_failed(e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        e @ (redb::Error::Io(_) | redb::Error::PreviousIo) => {
            StoreError::Unavailable(format!("{BROKEN}: {e}"))
        }
        e => failed(e),
    }
}

impl EmbeddedBackend {
    /// Opens (or creates) the database file, creating its directory.
    pub fn open(path: &Path) -> Result<EmbeddedBackend, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| failed(format!("cannot create {}: {e}", dir.display())))?;
        }
        // Made by us, readable by its owner only: it holds users' emails and attributes, the audit
        // log and the secrets' hashes. (A file that exists keeps its mode.)
        {
            use std::os::unix::fs::OpenOptionsExt;
            let made = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path);
            match made {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(failed(format!("cannot create {}: {e}", path.display()))),
            }
        }
        // redb panics on some damaged files (a truncated one fails an assertion) instead of
        // answering an error: caught here, so that the file is named and the process ends cleanly.
        // Quietly: the panic's own message (an assertion in redb's code) would only confuse.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let opened = std::panic::catch_unwind(|| Database::create(path));
        std::panic::set_hook(hook);
        let opened = opened.map_err(|_| {
            failed(format!(
                "{} is damaged (truncated or corrupt) and cannot be opened; restore it from a backup, \
                 or move it away to start with an empty store",
                path.display()
            ))
        })?;
        let db = opened.map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => failed(format!(
                "{} is in use by another tollgate process (the embedded store serves one process: \
                 stop the other, `serve` or `quickstart`, first)",
                path.display()
            )),
            other => failed(format!("cannot open {}: {other}", path.display())),
        })?;
        // A file made before it was made 0600 (or through a link) may be readable by others.
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(mode) = std::fs::metadata(path).map(|m| m.permissions().mode()) {
                if mode & 0o077 != 0 {
                    tracing::warn!(
                        path = %path.display(),
                        mode = format!("{:o}", mode & 0o777),
                        "the store file is readable by other users (it holds emails, attributes, the audit log and secret hashes): chmod 600 it"
                    );
                }
            }
        }
        // Create the tables so that reads never meet a missing table.
        let tx = db.begin_write().map_err(redb_failed)?;
        tx.open_table(KV).map_err(redb_failed)?;
        tx.open_table(SETS).map_err(redb_failed)?;
        tx.open_table(LISTS).map_err(redb_failed)?;
        tx.commit().map_err(redb_failed)?;
        Ok(EmbeddedBackend {
            db: Arc::new(db),
            path: path.to_path_buf(),
            feed: Arc::default(),
            broken: AtomicBool::new(false),
            reads: Arc::new(tokio::sync::Semaphore::new(READS_AT_ONCE)),
        })
    }

    /// Runs a read off the async threads once a read slot is free; the slot goes with the work.
    async fn reading<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let slot = self.reads.clone().acquire_owned().await.map_err(failed)?;
        self.blocking(move |db| {
            let _slot = slot;
            work(db)
        })
        .await
    }

    /// Every read slot, held: reads wait as under a flood.
    #[cfg(test)]
    pub(crate) async fn hold_read_slots(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.reads.clone().acquire_many_owned(READS_AT_ONCE as u32).await.expect("open")
    }

    /// Runs blocking database work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        let done = tokio::task::spawn_blocking(move || work(&db)).await.map_err(failed)?;
        if let Err(StoreError::Unavailable(why)) = &done {
            if why.starts_with(BROKEN) && !self.broken.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    path = %self.path.display(),
                    error = %why,
                    "the embedded store met an I/O error (a full disk?) and refuses further changes: fix the cause, then restart the gateway; /readyz and /healthz answer 503 until then"
                );
            }
        }
        done
    }
}

#[async_trait]
impl Backend for EmbeddedBackend {
    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = key.to_string();
        self.reading(move |db| {
            let tx = db.begin_read().map_err(redb_failed)?;
            let table = tx.open_table(KV).map_err(redb_failed)?;
            Ok(table.get(key.as_str()).map_err(redb_failed)?.map(|v| v.value().to_string()))
        })
        .await
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        let keys = keys.to_vec();
        self.reading(move |db| {
            let tx = db.begin_read().map_err(redb_failed)?;
            let table = tx.open_table(KV).map_err(redb_failed)?;
            keys.iter()
                .map(|key| Ok(table.get(key.as_str()).map_err(redb_failed)?.map(|v| v.value().to_string())))
                .collect()
        })
        .await
    }

    async fn members(&self, set: &str) -> Result<Vec<String>, StoreError> {
        let set = set.to_string();
        self.reading(move |db| {
            let tx = db.begin_read().map_err(redb_failed)?;
            let table = tx.open_table(SETS).map_err(redb_failed)?;
            let mut out = Vec::new();
            for row in table.range((set.as_str(), "")..).map_err(redb_failed)? {
                let (key, _) = row.map_err(redb_failed)?;
                let (s, member) = key.value();
                if s != set {
                    break;
                }
                out.push(member.to_string());
            }
            Ok(out)
        })
        .await
    }

    async fn list(&self, key: &str, skip: usize, limit: usize) -> Result<Vec<String>, StoreError> {
        let key = key.to_string();
        self.reading(move |db| {
            let tx = db.begin_read().map_err(redb_failed)?;
            let table = tx.open_table(LISTS).map_err(redb_failed)?;
            let mut out = Vec::new();
            // A list's keys are consecutive from its newest (`commit` inserts one below the
            // smallest and trims from the largest), so the `skip`th is found without walking.
            let whole = (key.as_str(), 0)..=(key.as_str(), u64::MAX);
            let Some(newest) =
                table.range(whole).map_err(redb_failed)?.next().transpose().map_err(redb_failed)?
            else {
                return Ok(out);
            };
            let Some(start) = newest.0.value().1.checked_add(skip as u64) else { return Ok(out) };
            for row in table
                .range((key.as_str(), start)..=(key.as_str(), u64::MAX))
                .map_err(redb_failed)?
                .take(limit)
            {
                out.push(row.map_err(redb_failed)?.1.value().to_string());
            }
            Ok(out)
        })
        .await
    }

    fn commit_may_time_out(&self) -> bool {
        false
    }

    async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let feed = self.feed.clone();
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(redb_failed)?;
            {
                let mut kv = tx.open_table(KV).map_err(redb_failed)?;
                for k in &batch.absent {
                    if kv.get(k.as_str()).map_err(redb_failed)?.is_some() {
                        // Dropping the transaction without commit changes nothing.
                        return Err(StoreError::Conflict(k.clone()));
                    }
                }
                for (k, v) in &batch.expect {
                    if kv.get(k.as_str()).map_err(redb_failed)?.is_none_or(|cur| cur.value() != v.as_str()) {
                        return Err(StoreError::Changed(k.clone()));
                    }
                }
                if !batch.sizes.is_empty() {
                    let sets = tx.open_table(SETS).map_err(redb_failed)?;
                    for (set, members) in &batch.sizes {
                        let mut held = 0;
                        for row in sets.range((set.as_str(), "")..).map_err(redb_failed)? {
                            if row.map_err(redb_failed)?.0.value().0 != set.as_str() {
                                break;
                            }
                            held += 1;
                        }
                        if held > *members {
                            return Err(StoreError::Changed(set.clone()));
                        }
                    }
                }
                for (k, v) in &batch.put {
                    kv.insert(k.as_str(), v.as_str()).map_err(redb_failed)?;
                }
                for k in &batch.del {
                    kv.remove(k.as_str()).map_err(redb_failed)?;
                }
                for (k, v, at) in &batch.newer {
                    let stored =
                        kv.get(k.as_str()).map_err(redb_failed)?.map(|cur| super::stored_at(cur.value()));
                    if stored.is_none_or(|stored| stored < *at) {
                        kv.insert(k.as_str(), v.as_str()).map_err(redb_failed)?;
                    }
                }
                let mut sets = tx.open_table(SETS).map_err(redb_failed)?;
                for (s, m) in &batch.sadd {
                    sets.insert((s.as_str(), m.as_str()), ()).map_err(redb_failed)?;
                }
                for (s, m) in &batch.srem {
                    sets.remove((s.as_str(), m.as_str())).map_err(redb_failed)?;
                }
                let mut lists = tx.open_table(LISTS).map_err(redb_failed)?;
                for (list, value, max) in &batch.lpush {
                    let range = (list.as_str(), 0)..=(list.as_str(), u64::MAX);
                    // The newest entry has the smallest key: one below the current smallest.
                    let newest = lists
                        .range(range.clone())
                        .map_err(redb_failed)?
                        .next()
                        .transpose()
                        .map_err(redb_failed)?;
                    let seq = newest.map_or(u64::MAX, |(k, _)| k.value().1.saturating_sub(1));
                    lists.insert((list.as_str(), seq), value.as_str()).map_err(redb_failed)?;
                    // The entries are numbered one after another from the newest, so those
                    // `max` or more past it are the stale ones, read from the oldest end: a trim
                    // costs what it removes (one entry, usually), not a walk past the `max` kept,
                    // ten million at most, inside the one write transaction.
                    let kept_below = seq.checked_add(u64::try_from(*max).unwrap_or(u64::MAX));
                    let stale: Vec<u64> = lists
                        .range(range)
                        .map_err(redb_failed)?
                        .rev()
                        .map(|row| row.map(|(k, _)| k.value().1))
                        .take_while(|row| {
                            row.as_ref().map_or(true, |s| kept_below.is_some_and(|limit| *s >= limit))
                        })
                        .collect::<Result<_, _>>()
                        .map_err(redb_failed)?;
                    for seq in stale {
                        lists.remove((list.as_str(), seq)).map_err(redb_failed)?;
                    }
                }
            }
            tx.commit().map_err(redb_failed)?;
            // Published here, with the commit, so that a caller who stopped waiting (a store
            // timeout) cannot leave the change unannounced.
            feed.publish(&batch.publish);
            Ok(())
        })
        .await
    }

    async fn subscribe(&self) -> Result<InvalidationStream, StoreError> {
        Ok(self.feed.subscribe())
    }

    async fn durability_warning(&self) -> Result<Option<String>, StoreError> {
        // redb fsyncs every commit before it returns.
        Ok(None)
    }

    /// Not ready once an I/O error broke the file (a read answered from memory would say ready).
    async fn ping(&self) -> Result<(), StoreError> {
        if let Some(why) = self.broken() {
            return Err(StoreError::Unavailable(why));
        }
        self.get("ping").await.map(|_| ())
    }

    fn broken(&self) -> Option<String> {
        self.broken
            .load(Ordering::Relaxed)
            .then(|| format!("{BROKEN} made {} unusable until the gateway restarts", self.path.display()))
    }

    fn describe(&self) -> String {
        format!("embedded store at {}", self.path.display())
    }
}
