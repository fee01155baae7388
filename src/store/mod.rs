//! The store of orgs, users, services and tokens, and the invalidation feed that tells every
//! gateway instance what changed.
//!
//! The domain logic (keys, indexes, which change invalidates what) is written once in [`Store`], over
//! a small [`Backend`] trait that each storage engine implements: reads of single keys and sets, an
//! atomic conditional batch of writes that also publishes the invalidations, and a subscription.
//! A write is acknowledged only once the backend has it, and every write carries its invalidations
//! in the same atomic batch, so no change can land without telling the other instances.

pub mod embedded;
mod feed;
pub mod memory;
mod model;
pub mod redis;

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::Stream;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use model::*;

use crate::token::TokenId;

/// A store failure. `Unavailable` is an infrastructure fault (503 at the gateway); the others are
/// about the request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached in time.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A change was sent to a remote store and its answer did not come (a timeout, a dropped
    /// connection): the store may apply it anyway.
    #[error("the store did not answer ({0}); the change may still have been made: look before retrying")]
    Unanswered(String),
    /// A unique key is already taken (duplicate email, service name, token id).
    #[error("{0} already exists")]
    Conflict(String),
    /// The store refused a change for want of memory (Redis past `maxmemory` under
    /// `noeviction`): nothing was changed, and retrying does not help until memory is freed.
    #[error("the store is full: {0}")]
    Full(String),
    /// A record the change needs does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A record changed (or vanished) between being read and being written.
    #[error("{0} changed while this change was being made")]
    Changed(String),
    /// A stored record could not be decoded.
    #[error("corrupt record at {key}: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// The decoder's message.
        reason: String,
    },
}

/// What changed, as told to every instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Invalidation {
    /// A token record changed (revoked, rotated, created).
    Token(TokenId),
    /// A user changed (role, status, removal).
    User(String),
    /// A service changed (roles, attributes, deletion).
    Service(String),
}

impl Invalidation {
    /// The wire form: `token:<id>`, `user:<id>`, `service:<id>`.
    pub fn encode(&self) -> String {
        match self {
            Invalidation::Token(id) => format!("token:{id}"),
            Invalidation::User(id) => format!("user:{id}"),
            Invalidation::Service(id) => format!("service:{id}"),
        }
    }

    /// Parses the wire form.
    pub fn decode(s: &str) -> Option<Invalidation> {
        let (kind, id) = s.split_once(':')?;
        match kind {
            "token" => TokenId::parse(id).map(Invalidation::Token),
            "user" => Some(Invalidation::User(id.to_string())),
            "service" => Some(Invalidation::Service(id.to_string())),
            _ => None,
        }
    }
}

/// A record and the exact text it was read from. A change to it goes ahead only if its key still
/// holds that text: the text itself, not the record written out again, which need not be the same
/// (a float attribute parses to the nearest double and may print differently; a field an older
/// version did not write comes back with its default), and would refuse every change to such a
/// record as a conflict.
#[derive(Debug, Clone)]
pub struct Stored<T> {
    record: T,
    text: String,
}

impl<T> Stored<T> {
    /// The record alone.
    pub fn into_inner(self) -> T {
        self.record
    }
}

impl<T> std::ops::Deref for Stored<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.record
    }
}

/// The record of whoever makes a change, as read when the change was decided: the change goes
/// ahead only while that record is unchanged too, so that two admins demoting, suspending or
/// removing each other at once cannot both succeed, and an admin removed meanwhile adds no user.
pub enum Acting {
    /// A user, through a personal access token.
    User(Stored<User>),
    /// A service, through its token.
    Service(Stored<Service>),
    /// Either of the above, and the token it called with (not revoked meanwhile either).
    Through(Box<Acting>, Stored<TokenRecord>),
}

/// A stream of invalidations; it ends when the subscription is lost.
pub type InvalidationStream = Pin<Box<dyn Stream<Item = Invalidation> + Send>>;

/// An atomic, conditional set of writes. Either all apply or, when a key in `absent` exists, none.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Batch {
    /// Keys that must not exist.
    pub absent: Vec<String>,
    /// Keys that must still hold exactly this text (the record as it was read: [`Stored`]).
    pub expect: Vec<(String, String)>,
    /// Sets that must hold at most this many members. An owner's token set only ever grows while
    /// the owner is there, so its count when read tells whether a token was added since, and a
    /// larger bound lets that many be added meanwhile (issues within `tokens.max_per_owner`).
    pub sizes: Vec<(String, usize)>,
    /// Keys to set to JSON values.
    pub put: Vec<(String, String)>,
    /// Keys to delete.
    pub del: Vec<String>,
    /// Set members to add: (set, member).
    pub sadd: Vec<(String, String)>,
    /// Set members to remove: (set, member).
    pub srem: Vec<(String, String)>,
    /// Values to push at the front of a list, which is then trimmed to `max` entries.
    pub lpush: Vec<(String, String, usize)>,
    /// Invalidations to publish once the writes are applied.
    pub publish: Vec<String>,
    /// Keys to set to a JSON record unless the one stored has an `at` at least this new: last-use
    /// records, which instances flush on their own schedules (a late flush must not move a
    /// token's last use back).
    pub newer: Vec<(String, String, Millis)>,
}

/// The `at` of a stored JSON record (0 when it has none or is unreadable: any newer write wins).
pub fn stored_at(text: &str) -> Millis {
    #[derive(serde::Deserialize)]
    struct At {
        at: Millis,
    }
    serde_json::from_str::<At>(text).map_or(0, |r| r.at)
}

impl Batch {
    fn put<T: Serialize>(&mut self, key: String, value: &T) -> Result<(), StoreError> {
        let json = serde_json::to_string(value)
            .map_err(|e| StoreError::Corrupt { key: key.clone(), reason: e.to_string() })?;
        self.put.push((key, json));
        Ok(())
    }

    /// The write goes ahead only if `key` still holds `value` as it was read.
    fn expect<T>(&mut self, key: String, value: &Stored<T>) {
        self.expect.push((key, value.text.clone()));
    }

    /// Only while the acting user or service is unchanged (see [`Acting`]).
    fn acting(&mut self, actor: Option<&Acting>) {
        match actor {
            Some(Acting::User(u)) => self.expect(user_key(&u.id), u),
            Some(Acting::Service(s)) => self.expect(service_key(&s.id), s),
            Some(Acting::Through(owner, token)) => {
                self.acting(Some(owner));
                self.expect(token_key(&token.id), token);
            }
            None => {}
        }
    }

    fn invalidate(&mut self, inv: Invalidation) {
        self.publish.push(inv.encode());
    }

    fn audit(&mut self, event: Option<&AuditEvent>, max: usize) -> Result<(), StoreError> {
        match event {
            Some(event) => self.audit_into(audit_key(&event.org), event, max),
            None => Ok(()),
        }
    }

    /// `event` at the front of the audit list `key`, which keeps its newest `max`.
    fn audit_into(&mut self, key: String, event: &AuditEvent, max: usize) -> Result<(), StoreError> {
        let json = serde_json::to_string(event)
            .map_err(|e| StoreError::Corrupt { key: key.clone(), reason: e.to_string() })?;
        self.lpush.push((key, json, max));
        Ok(())
    }
}

/// A new token's writes: the record (which must not exist yet) and its indexes.
fn add_token(b: &mut Batch, token: &TokenRecord) -> Result<(), StoreError> {
    b.absent.push(token_key(&token.id));
    b.put(token_key(&token.id), token)?;
    b.sadd.push((owner_tokens_key(&token.owner), token.id.to_string()));
    b.invalidate(Invalidation::Token(token.id.clone()));
    Ok(())
}

/// An owner's tokens as read ([`Store::owner_tokens`]).
pub struct OwnerTokens {
    /// How many ids the owner's token set held.
    pub members: usize,
    /// The records, each with the text it was read as.
    pub tokens: Vec<Stored<TokenRecord>>,
}

/// The tokens an owner's removal revokes: each as read and as it is to be written, and how many ids
/// the owner's token set held when they were read. The removal commits only if none of them has
/// changed and no token was added meanwhile (else `Changed`, and the caller tries again): a token
/// issued, revoked or rotated while the owner was being removed is never left out or overwritten.
#[derive(Default)]
pub struct Revoking {
    /// [`OwnerTokens::members`].
    pub members: usize,
    /// (as read, as revoked).
    pub tokens: Vec<(Stored<TokenRecord>, TokenRecord)>,
}

/// The writes and conditions of revoking `revoking` with the removal of `owner`.
fn revoke_all(b: &mut Batch, owner: &Owner, revoking: &Revoking) -> Result<(), StoreError> {
    b.sizes.push((owner_tokens_key(owner), revoking.members));
    for (before, after) in &revoking.tokens {
        b.expect(token_key(&before.id), before);
        b.put(token_key(&after.id), after)?;
        b.invalidate(Invalidation::Token(after.id.clone()));
    }
    Ok(())
}

/// A token stored in the same change as the user or service that owns it, so that neither is
/// ever stored without the other.
pub struct FirstToken<'a> {
    /// The token.
    pub token: &'a TokenRecord,
    /// Its `token.issue` entry.
    pub audit: Option<&'a AuditEvent>,
}

/// Told, synchronously, of the invalidations of every write this process commits, so that its own
/// cache never serves what it has just changed (other instances hear of it through the feed).
pub trait CommitListener: Send + Sync {
    /// The write is in the store; these records changed.
    fn committed(&self, changed: &[Invalidation]);
}

/// A storage engine. Keys are logical (`token:tgp_x`); a backend may prefix them.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// Reads several keys (one round trip where the backend can).
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.get(key).await?);
        }
        Ok(out)
    }
    /// Reads the members of a set.
    async fn members(&self, set: &str) -> Result<Vec<String>, StoreError>;
    /// Reads up to `limit` entries of a list, newest first, after the newest `skip`.
    async fn list(&self, key: &str, skip: usize, limit: usize) -> Result<Vec<String>, StoreError>;
    /// Applies a batch atomically; `Conflict(key)` if a key in `absent` exists, `Changed(key)` if a
    /// key in `expect` holds anything else.
    async fn commit(&self, batch: Batch) -> Result<(), StoreError>;
    /// Whether a commit may be given up on after the store timeout. Not for a store in this
    /// process: its commit, once handed to the writer, lands however long the wait, and a `503`
    /// would tell the caller that nothing was written (a retried issue would make a second token).
    fn commit_may_time_out(&self) -> bool {
        true
    }
    /// Subscribes to invalidations. Returns once the subscription is live.
    async fn subscribe(&self) -> Result<InvalidationStream, StoreError>;
    /// A one-line description for logs (never a password).
    fn describe(&self) -> String;
    /// Why an acknowledged write could still be lost, if it could.
    async fn durability_warning(&self) -> Result<Option<String>, StoreError>;
    /// Checks the backend answers.
    async fn ping(&self) -> Result<(), StoreError> {
        self.get("ping").await.map(|_| ())
    }
    /// Why the backend cannot work again until the process restarts, if so (the embedded file
    /// after an I/O error); an outage that can end by itself (Redis down) is not this.
    fn broken(&self) -> Option<String> {
        None
    }
}

/// What a call given up on is: [`StoreError::Unavailable`] for a read, [`StoreError::Unanswered`]
/// for a change a remote store may still apply.
type Late = fn(String) -> StoreError;

/// Keys read in one round trip by [`Store::read_many`]: a chunk's answer stays well within the
/// store timeout.
const READ_CHUNK: usize = 500;

/// Audit entries read per store command when a log is searched ([`Store::audit_matching`]).
const AUDIT_PAGE: usize = 1_000;

/// The domain operations on top of a backend, each bounded by the store timeout.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    timeout: Duration,
    /// Audit entries kept per org; shared by every clone, so that a reload changes it for all.
    audit_max: Arc<std::sync::atomic::AtomicUsize>,
    listener: Arc<std::sync::OnceLock<std::sync::Weak<dyn CommitListener>>>,
    stats: StoreStats,
}

/// The store's instruments.
#[derive(Clone)]
pub struct StoreStats {
    /// Latency of every store call.
    pub latency: prometheus::Histogram,
    /// Calls that failed for want of the store (timeouts, connection errors).
    pub errors: prometheus::IntCounter,
    /// Reads of a record that could not be decoded.
    pub corrupt: prometheus::IntCounter,
    /// When a failure was last logged, so that an outage writes a line a second, not one a call.
    last_logged: Arc<std::sync::atomic::AtomicU64>,
}

impl StoreStats {
    /// Counts a failed call and logs it, at most once a second.
    fn failed(&self, e: &StoreError) {
        match e {
            StoreError::Unavailable(_) | StoreError::Unanswered(_) | StoreError::Full(_) => self.errors.inc(),
            StoreError::Corrupt { .. } => self.corrupt.inc(),
            _ => return,
        }
        let second = now_millis().max(0) as u64 / 1000;
        if self.last_logged.swap(second, std::sync::atomic::Ordering::Relaxed) == second {
            return;
        }
        match e {
            StoreError::Corrupt { .. } => tracing::error!(error = %e, "a stored record cannot be read"),
            _ => tracing::warn!(error = %e, "store call failed"),
        }
    }
}

impl Default for StoreStats {
    fn default() -> Self {
        StoreStats {
            latency: crate::metrics::histogram("tollgate_store_seconds", "Latency of store calls"),
            errors: crate::metrics::counter(
                "tollgate_store_errors_total",
                "Store calls that found the store unreachable",
            ),
            corrupt: crate::metrics::counter(
                "tollgate_store_corrupt_records_total",
                "Reads of a stored record that could not be decoded",
            ),
            last_logged: Arc::default(),
        }
    }
}

/// Audit entries kept per org unless configured otherwise.
pub const DEFAULT_AUDIT_MAX: usize = 10_000;

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("backend", &self.backend.describe()).finish()
    }
}

fn token_key(id: &TokenId) -> String {
    format!("token:{id}")
}
fn user_key(id: &str) -> String {
    format!("user:{id}")
}
fn service_key(id: &str) -> String {
    format!("service:{id}")
}
fn org_key(name: &str) -> String {
    format!("org:{name}")
}
fn user_email_key(org: &str, email: &str) -> String {
    // Stored emails are ASCII (`check_email`): a name in another script (the Kelvin sign, which
    // Unicode lowercases to `k`) names no one.
    format!("user-email:{org}:{}", email.to_ascii_lowercase())
}
fn service_name_key(org: &str, name: &str) -> String {
    format!("service-name:{org}:{name}")
}
fn org_users_key(org: &str) -> String {
    format!("org-users:{org}")
}
fn org_services_key(org: &str) -> String {
    format!("org-services:{org}")
}
fn audit_key(org: &str) -> String {
    format!("audit:{org}")
}
/// Ephemeral credentials minted: a list of its own, so that a service minting many cannot push the
/// org's changes out of `audit:{org}`.
fn credentials_audit_key(org: &str) -> String {
    format!("audit-credentials:{org}")
}
fn last_use_key(id: &TokenId) -> String {
    format!("last-use:{id}")
}
fn owner_tokens_key(owner: &Owner) -> String {
    match owner {
        Owner::User(id) => format!("user-tokens:{id}"),
        Owner::Service(id) => format!("service-tokens:{id}"),
    }
}

/// Opens the store the config names, keeping `audit_max` entries of each org's audit log (every
/// process that writes to it must be told, or it trims the log to its own default).
pub fn open(settings: &crate::config::StoreSettings, audit_max: usize) -> Result<Store, StoreError> {
    let backend: Arc<dyn Backend> = match &settings.redis {
        Some(r) => Arc::new(
            redis::RedisBackend::new(&r.url, &r.key_prefix, settings.timeout)?
                .waiting_for_replicas(r.wait_replicas),
        ),
        None => Arc::new(embedded::EmbeddedBackend::open(&settings.embedded_path)?),
    };
    Ok(Store::new(backend, settings.timeout).with_audit_max(audit_max))
}

impl Store {
    /// A store over `backend`, every call bounded by `timeout`.
    pub fn new(backend: Arc<dyn Backend>, timeout: Duration) -> Store {
        Store {
            backend,
            timeout,
            audit_max: Arc::new(std::sync::atomic::AtomicUsize::new(DEFAULT_AUDIT_MAX)),
            listener: Arc::default(),
            stats: StoreStats::default(),
        }
    }

    /// Registers the local cache to hear of this process's writes (once; later calls are ignored).
    pub fn set_listener(&self, listener: std::sync::Weak<dyn CommitListener>) {
        let _ = self.listener.set(listener);
    }

    /// Keeps at most `max` audit entries per org.
    pub fn with_audit_max(self, max: usize) -> Store {
        self.set_audit_max(max);
        self
    }

    /// Keeps at most `max` audit entries per org from the next write on, in this store and every
    /// clone of it (a reloaded `audit.max_entries`).
    pub fn set_audit_max(&self, max: usize) {
        self.audit_max.store(max.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Audit entries kept per org.
    pub fn audit_max(&self) -> usize {
        self.audit_max.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The backend's description.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// The bound on every store call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.measured(fut, Some((self.timeout, StoreError::Unavailable))).await
    }

    /// `fut`, timed and counted, and given up on after `limit` if there is one.
    /// Times and counts a store call; with `limit`, one given up on past it is the error its
    /// [`Late`] makes of the reason.
    async fn measured<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
        limit: Option<(Duration, Late)>,
    ) -> Result<T, StoreError> {
        let timer = self.stats.latency.start_timer();
        let result = match limit {
            Some((limit, late)) => tokio::time::timeout(limit, fut)
                .await
                .unwrap_or_else(|_| Err(late(format!("no answer within {limit:?}")))),
            None => fut.await,
        };
        timer.observe_duration();
        if let Err(e) = &result {
            self.stats.failed(e);
        }
        result
    }

    /// The store's instruments.
    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    async fn read<T: DeserializeOwned>(&self, key: String) -> Result<Option<T>, StoreError> {
        Ok(self.read_stored(key).await?.map(Stored::into_inner))
    }

    async fn read_stored<T: DeserializeOwned>(&self, key: String) -> Result<Option<Stored<T>>, StoreError> {
        let text = self.bounded(self.backend.get(&key)).await?;
        self.decode(key, text)
    }

    fn decode<T: DeserializeOwned>(
        &self,
        key: String,
        text: Option<String>,
    ) -> Result<Option<Stored<T>>, StoreError> {
        let Some(text) = text else { return Ok(None) };
        match serde_json::from_str(&text) {
            Ok(record) => Ok(Some(Stored { record, text })),
            Err(e) => {
                let e = StoreError::Corrupt { key, reason: e.to_string() };
                self.stats.failed(&e);
                Err(e)
            }
        }
    }

    /// Reads records in chunks of [`READ_CHUNK`] keys, a round trip each (one per key before, so
    /// that listing an owner of many tokens took as many round trips).
    async fn read_many<T: DeserializeOwned>(&self, keys: Vec<String>) -> Result<Vec<Stored<T>>, StoreError> {
        // A member whose record is gone (deleted between the two reads) is skipped.
        Ok(self.read_each(keys).await?.into_iter().flatten().collect())
    }

    /// Each key's record, or `None`, in the order of `keys`, read as [`Store::read_many`] reads.
    async fn read_each<T: DeserializeOwned>(
        &self,
        keys: Vec<String>,
    ) -> Result<Vec<Option<Stored<T>>>, StoreError> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(READ_CHUNK) {
            let texts = self.bounded(self.backend.get_many(chunk)).await?;
            for (key, text) in chunk.iter().zip(texts) {
                out.push(self.decode(key.clone(), text)?);
            }
        }
        Ok(out)
    }

    async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let changed: Vec<Invalidation> =
            batch.publish.iter().filter_map(|m| Invalidation::decode(m)).collect();
        // A change sent to a remote store may still be applied after the wait is given up (Redis
        // runs the script once it reads it): the error says so, for the caller to look before
        // retrying (a retried issue would make a second token).
        let limit =
            self.backend.commit_may_time_out().then_some((self.timeout, StoreError::Unanswered as Late));
        self.measured(self.backend.commit(batch), limit).await?;
        if let Some(listener) = self.listener.get().and_then(std::sync::Weak::upgrade) {
            listener.committed(&changed);
        }
        Ok(())
    }

    /// Subscribes to the invalidation feed.
    pub async fn subscribe(&self) -> Result<InvalidationStream, StoreError> {
        self.bounded(self.backend.subscribe()).await
    }

    /// Why an acknowledged write could still be lost, if it could. A check of several round
    /// trips (on Redis a connection of its own and five queries in turn), run once at start, before
    /// the ports are bound: it is given ten times `store.timeout` within 5 to 10 s, or one
    /// `store.timeout` where that is longer.
    pub async fn durability_warning(&self) -> Result<Option<String>, StoreError> {
        use std::time::Duration;
        let limit =
            (self.timeout * 10).clamp(Duration::from_secs(5), Duration::from_secs(10)).max(self.timeout);
        self.measured(self.backend.durability_warning(), Some((limit, StoreError::Unavailable))).await
    }

    /// Checks the backend answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.bounded(self.backend.ping()).await
    }

    /// See [`Backend::broken`].
    pub fn broken(&self) -> Option<String> {
        self.backend.broken()
    }

    /// A token by id.
    pub async fn get_token(&self, id: &TokenId) -> Result<Option<Stored<TokenRecord>>, StoreError> {
        self.read_stored(token_key(id)).await
    }

    /// A user by id.
    pub async fn get_user(&self, id: &str) -> Result<Option<Stored<User>>, StoreError> {
        self.read_stored(user_key(id)).await
    }

    /// A service by id.
    pub async fn get_service(&self, id: &str) -> Result<Option<Stored<Service>>, StoreError> {
        self.read_stored(service_key(id)).await
    }

    /// An org by name.
    pub async fn get_org(&self, name: &str) -> Result<Option<Org>, StoreError> {
        self.read(org_key(name)).await
    }

    /// A user by org and email.
    pub async fn find_user_by_email(
        &self,
        org: &str,
        email: &str,
    ) -> Result<Option<Stored<User>>, StoreError> {
        match self.read::<String>(user_email_key(org, email)).await? {
            Some(id) => self.get_user(&id).await,
            None => Ok(None),
        }
    }

    /// A service by org and name.
    pub async fn find_service_by_name(
        &self,
        org: &str,
        name: &str,
    ) -> Result<Option<Stored<Service>>, StoreError> {
        match self.read::<String>(service_name_key(org, name)).await? {
            Some(id) => self.get_service(&id).await,
            None => Ok(None),
        }
    }

    /// The users of an org.
    pub async fn list_users(&self, org: &str) -> Result<Vec<Stored<User>>, StoreError> {
        let ids = self.bounded(self.backend.members(&org_users_key(org))).await?;
        self.read_many(ids.iter().map(|id| user_key(id)).collect()).await
    }

    /// The tokens of a user or service.
    pub async fn list_owner_tokens(&self, owner: &Owner) -> Result<Vec<Stored<TokenRecord>>, StoreError> {
        Ok(self.owner_tokens(owner).await?.tokens)
    }

    /// The tokens of a user or service, with how many ids its token set held when read.
    pub async fn owner_tokens(&self, owner: &Owner) -> Result<OwnerTokens, StoreError> {
        let ids = self.bounded(self.backend.members(&owner_tokens_key(owner))).await?;
        let tokens = self
            .read_many(ids.iter().filter_map(|id| TokenId::parse(id)).map(|id| token_key(&id)).collect())
            .await?;
        Ok(OwnerTokens { members: ids.len(), tokens })
    }

    /// Creates an org; `Conflict` if it exists.
    pub async fn create_org(&self, org: &Org) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.absent.push(org_key(&org.name));
        b.put(org_key(&org.name), org)?;
        self.commit(b).await
    }

    /// Creates a user, with their first token if given, in one change; `Conflict` if the email is
    /// taken in the org.
    pub async fn create_user(
        &self,
        user: &User,
        audit: Option<&AuditEvent>,
        first: Option<FirstToken<'_>>,
        actor: Option<&Acting>,
    ) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.audit(audit, self.audit_max())?;
        b.acting(actor);
        self.add_first(&mut b, first)?;
        let email_key = user_email_key(&user.org, &user.email);
        b.absent.extend([email_key.clone(), user_key(&user.id)]);
        b.put(user_key(&user.id), user)?;
        b.put(email_key, &user.id)?;
        b.sadd.push((org_users_key(&user.org), user.id.clone()));
        b.invalidate(Invalidation::User(user.id.clone()));
        self.commit(b).await
    }

    /// Replaces a user's record (role, status, attributes) and tells every instance.
    pub async fn update_user(
        &self,
        before: &Stored<User>,
        user: &User,
        audit: Option<&AuditEvent>,
        actor: Option<&Acting>,
    ) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.audit(audit, self.audit_max())?;
        b.expect(user_key(&before.id), before);
        b.acting(actor);
        b.put(user_key(&user.id), user)?;
        b.invalidate(Invalidation::User(user.id.clone()));
        self.commit(b).await
    }

    /// Creates a service, with its first token if given, in one change; `Conflict` if the name is
    /// taken in the org.
    pub async fn create_service(
        &self,
        service: &Service,
        audit: Option<&AuditEvent>,
        first: Option<FirstToken<'_>>,
        actor: Option<&Acting>,
    ) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.audit(audit, self.audit_max())?;
        b.acting(actor);
        self.add_first(&mut b, first)?;
        let name_key = service_name_key(&service.org, &service.name);
        b.absent.extend([name_key.clone(), service_key(&service.id)]);
        b.put(service_key(&service.id), service)?;
        b.put(name_key, &service.id)?;
        b.sadd.push((org_services_key(&service.org), service.id.clone()));
        b.invalidate(Invalidation::Service(service.id.clone()));
        self.commit(b).await
    }

    /// Deletes a service and writes the given tokens (its own, revoked) in one change; they stop
    /// at once anyway, their owner being gone, and now also read as revoked.
    pub async fn delete_service(
        &self,
        service: &Stored<Service>,
        revoking: &Revoking,
        audit: Option<&AuditEvent>,
        actor: Option<&Acting>,
    ) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.audit(audit, self.audit_max())?;
        b.acting(actor);
        // As read: a rename in between would otherwise leave its new name taken forever.
        b.expect(service_key(&service.id), service);
        b.del.extend([service_key(&service.id), service_name_key(&service.org, &service.name)]);
        b.srem.push((org_services_key(&service.org), service.id.clone()));
        revoke_all(&mut b, &Owner::Service(service.id.clone()), revoking)?;
        b.invalidate(Invalidation::Service(service.id.clone()));
        self.commit(b).await
    }

    /// Stores a new token; `Conflict` if the id is taken.
    pub async fn insert_token(
        &self,
        token: &TokenRecord,
        audit: Option<&AuditEvent>,
        actor: Option<&Acting>,
    ) -> Result<(), StoreError> {
        self.insert_token_for(token, audit, actor, None, None).await
    }

    /// [`Store::insert_token`] for a token issued by one actor to another owner (a user, a
    /// service): with `owner`, stored only while the owner's record is still as read (not removed,
    /// suspended or changed meanwhile) and, with `owner_tokens`, while the owner's token set holds
    /// at most that many ids (its count when read for none issued meanwhile, more for room under
    /// `tokens.max_per_owner`): else `Changed`.
    pub async fn insert_token_for(
        &self,
        token: &TokenRecord,
        audit: Option<&AuditEvent>,
        actor: Option<&Acting>,
        owner: Option<&Acting>,
        owner_tokens: Option<usize>,
    ) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.audit(audit, self.audit_max())?;
        b.acting(actor);
        b.acting(owner);
        if let Some(members) = owner_tokens {
            b.sizes.push((owner_tokens_key(&token.owner), members));
        }
        add_token(&mut b, token)?;
        self.commit(b).await
    }

    /// A first token (and its audit entry) into the change that creates its owner.
    fn add_first(&self, b: &mut Batch, first: Option<FirstToken<'_>>) -> Result<(), StoreError> {
        if let Some(first) = first {
            b.audit(first.audit, self.audit_max())?;
            add_token(b, first.token)?;
        }
        Ok(())
    }

    /// Replaces a token's record (revocation, rotation) and tells every instance.
    pub async fn update_token(
        &self,
        before: &Stored<TokenRecord>,
        token: &TokenRecord,
        audit: Option<&AuditEvent>,
        actor: Option<&Acting>,
    ) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.audit(audit, self.audit_max())?;
        b.acting(actor);
        b.expect(token_key(&before.id), before);
        b.put(token_key(&token.id), token)?;
        b.invalidate(Invalidation::Token(token.id.clone()));
        self.commit(b).await
    }

    /// Revokes a token now, without an audit entry (tests; the admin API goes through `lifecycle`).
    pub async fn revoke_token(
        &self,
        id: &TokenId,
        reason: Option<String>,
        by: Option<String>,
    ) -> Result<(), StoreError> {
        let before = self.get_token(id).await?.ok_or_else(|| StoreError::NotFound(format!("token {id}")))?;
        let mut token = (*before).clone();
        let now = now_millis();
        token.revoked = Some(Box::new(Revocation { at: now, decided_at: Some(now), reason, by }));
        self.update_token(&before, &token, None, None).await
    }

    /// Renames a service (the name index moves with it) or changes its roles or attributes.
    pub async fn update_service(
        &self,
        before: &Stored<Service>,
        service: &Service,
        audit: Option<&AuditEvent>,
        actor: Option<&Acting>,
    ) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.audit(audit, self.audit_max())?;
        b.acting(actor);
        b.expect(service_key(&before.id), before);
        let old_name = before.name.as_str();
        if old_name != service.name {
            let new_key = service_name_key(&service.org, &service.name);
            b.absent.push(new_key.clone());
            b.del.push(service_name_key(&service.org, old_name));
            b.put(new_key, &service.id)?;
        }
        b.put(service_key(&service.id), service)?;
        b.invalidate(Invalidation::Service(service.id.clone()));
        self.commit(b).await
    }

    /// Removes a user and revokes the given tokens (theirs) in one change.
    pub async fn delete_user(
        &self,
        user: &Stored<User>,
        revoking: &Revoking,
        audit: Option<&AuditEvent>,
        actor: Option<&Acting>,
    ) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.audit(audit, self.audit_max())?;
        b.expect(user_key(&user.id), user);
        b.acting(actor);
        b.del.extend([user_key(&user.id), user_email_key(&user.org, &user.email)]);
        b.srem.push((org_users_key(&user.org), user.id.clone()));
        revoke_all(&mut b, &Owner::User(user.id.clone()), revoking)?;
        b.invalidate(Invalidation::User(user.id.clone()));
        self.commit(b).await
    }

    /// Stores a rotated pair: the new token and the old one with its (possibly future) revocation,
    /// with the rotation's audit entry (under the old token) and the new token's (under its own).
    /// `owner`: the service a manager rotates a token of, as read when the rotation was decided;
    /// changed since, nothing is stored.
    pub async fn rotate_token(
        &self,
        before: &Stored<TokenRecord>,
        old: &TokenRecord,
        new: &TokenRecord,
        audit: [Option<&AuditEvent>; 2],
        actor: Option<&Acting>,
        owner: Option<&Acting>,
    ) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.acting(actor);
        b.acting(owner);
        for entry in audit {
            b.audit(entry, self.audit_max())?;
        }
        b.expect(token_key(&before.id), before);
        b.absent.push(token_key(&new.id));
        b.put(token_key(&old.id), old)?;
        b.put(token_key(&new.id), new)?;
        b.sadd.push((owner_tokens_key(&new.owner), new.id.to_string()));
        b.invalidate(Invalidation::Token(old.id.clone()));
        b.invalidate(Invalidation::Token(new.id.clone()));
        self.commit(b).await
    }

    /// The services of an org.
    pub async fn list_services(&self, org: &str) -> Result<Vec<Stored<Service>>, StoreError> {
        let ids = self.bounded(self.backend.members(&org_services_key(org))).await?;
        self.read_many(ids.iter().map(|id| service_key(id)).collect()).await
    }

    /// Writes the audit entry of an ephemeral credential minted (which changes no record), into
    /// the org's list of those, bounded as the changes' list is.
    pub async fn append_credentials_audit(&self, audit: &AuditEvent) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.audit_into(credentials_audit_key(&audit.org), audit, self.audit_max())?;
        self.commit(b).await
    }

    /// The newest `limit` audit entries of an org. An entry that cannot be read (written by hand,
    /// or by a version that wrote another shape) is left out and logged, so that it does not hide
    /// the others.
    pub async fn audit_log(&self, org: &str, limit: usize) -> Result<Vec<AuditEvent>, StoreError> {
        self.audit_matching(org, limit, |_| true).await
    }

    /// The newest `limit` audit entries of an org that are `wanted`. The search may read the whole
    /// log (`audit.max_entries` in each of its two lists), [`AUDIT_PAGE`] entries per store
    /// command: one command for all of it would hold a Redis server, and every instance's reads
    /// and heartbeats with it, for as long as it takes to send.
    pub async fn audit_matching(
        &self,
        org: &str,
        limit: usize,
        wanted: impl Fn(&AuditEvent) -> bool,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        self.audit_search(org, limit, AUDIT_PAGE, wanted).await
    }

    async fn audit_search(
        &self,
        org: &str,
        limit: usize,
        page: usize,
        wanted: impl Fn(&AuditEvent) -> bool,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let max = self.audit_max();
        // The changes and the credentials minted, each newest first, merged by time: the newest
        // `limit` of both are among the newest `limit` of each.
        let mut events = Vec::new();
        for key in [audit_key(org), credentials_audit_key(org)] {
            // An entry written meanwhile moves the older ones down, so a page may begin with the
            // previous page's last entries again: each is taken once.
            let mut taken = std::collections::HashSet::new();
            let mut skip = 0;
            while taken.len() < limit && skip < max {
                // The first page no longer than asked for: unfiltered, it is all that is needed.
                let want = if skip == 0 { page.min(limit) } else { page }.min(max - skip);
                let entries = self.bounded(self.backend.list(&key, skip, want)).await?;
                let read = entries.len();
                for json in entries {
                    match serde_json::from_str::<AuditEvent>(&json) {
                        Ok(event) if wanted(&event) && taken.len() < limit && taken.insert(json) => {
                            events.push(event)
                        }
                        Ok(_) => {}
                        // Left out, counted and logged as any unreadable record (a line a second).
                        Err(e) => self.stats.failed(&StoreError::Corrupt {
                            key: key.clone(),
                            reason: format!("an audit entry, left out: {e}"),
                        }),
                    }
                }
                if read < want {
                    break;
                }
                skip += read;
            }
        }
        // Stable: entries of one list at the same millisecond keep their order.
        events.sort_by_key(|e| std::cmp::Reverse(e.at));
        events.truncate(limit);
        Ok(events)
    }

    /// Writes a batch of last-use records; nothing is invalidated (they are not cached).
    pub async fn record_last_use(&self, uses: &[(TokenId, LastUse)]) -> Result<(), StoreError> {
        let mut b = Batch::default();
        for (id, last) in uses {
            let json = serde_json::to_string(last)
                .map_err(|e| StoreError::Corrupt { key: last_use_key(id), reason: e.to_string() })?;
            b.newer.push((last_use_key(id), json, last.at));
        }
        self.commit(b).await
    }

    /// When and from where a token was last used.
    pub async fn last_use(&self, id: &TokenId) -> Result<Option<LastUse>, StoreError> {
        self.read(last_use_key(id)).await
    }

    /// The last uses of several tokens, in their order, a round trip per [`READ_CHUNK`].
    pub async fn last_uses(&self, ids: &[&TokenId]) -> Result<Vec<Option<LastUse>>, StoreError> {
        let read = self.read_each(ids.iter().map(|id| last_use_key(id)).collect()).await?;
        Ok(read.into_iter().map(|last| last.map(Stored::into_inner)).collect())
    }
}

#[cfg(test)]
mod tests;
