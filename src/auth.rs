//! Verification: turns a presented token into a [`Principal`] (who is calling, with which token and
//! which owner record as of now), or says why not.
//!
//! Order of checks: format and checksum (pure, no I/O), token record (cache, then store), secret
//! (constant-time digest compare when this instance has verified the secret before, argon2id off the
//! request threads otherwise), then revocation, expiry against the clock, and the owner's record.
//! Until the secret is proven, every failure looks the same to the client.

use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use tokio::sync::Semaphore;

use crate::cache::Cache;
use crate::jwt::{self, EphemeralClaims, JwtError, JwtSettings, KeyFingerprint};
use crate::policy::Role;
use crate::store::{now_millis, Attributes, Owner, Service, StoreError, TokenRecord, User, UserStatus};
use crate::token::{self, ParsedToken, SecretDigester, TokenId};

/// Why a credential is refused (401). The client sees [`Invalid::description`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// Not a well-formed token (length, prefix, alphabet, checksum).
    Malformed,
    /// No token with that id.
    Unknown,
    /// The secret does not match.
    WrongSecret,
    /// Past its expiry.
    Expired,
    /// Revoked.
    Revoked,
    /// Rotated out: replaced by a rotation, its grace (if any) over.
    Rotated,
    /// The owning user is suspended.
    OwnerSuspended,
    /// The owning user or service no longer exists.
    OwnerGone,
    /// A JWT that fails verification (shape, key, algorithm, signature, claims).
    Jwt(JwtError),
}

impl Invalid {
    /// What the client is told. Malformed, unknown and wrong-secret tokens read the same, so a
    /// client cannot probe which token ids exist; the rest are told only to holders of the secret.
    pub fn description(self) -> &'static str {
        match self {
            Invalid::Malformed | Invalid::Unknown | Invalid::WrongSecret => "the access token is invalid",
            Invalid::Jwt(JwtError::Expired) => "the access token has expired",
            Invalid::Jwt(_) => "the access token is invalid",
            Invalid::Expired => "the access token has expired",
            Invalid::Revoked => "the access token has been revoked",
            Invalid::Rotated => "the access token was rotated: use the token that replaced it",
            Invalid::OwnerSuspended => "the owner of the access token is suspended",
            Invalid::OwnerGone => "the owner of the access token no longer exists",
        }
    }

    /// A short label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Invalid::Malformed => "malformed",
            Invalid::Unknown => "unknown",
            Invalid::WrongSecret => "wrong_secret",
            Invalid::Expired => "expired",
            Invalid::Revoked => "revoked",
            Invalid::Rotated => "rotated",
            Invalid::OwnerSuspended => "owner_suspended",
            Invalid::OwnerGone => "owner_gone",
            Invalid::Jwt(e) => e.label(),
        }
    }
}

/// Verification failure: the client's fault, or the store's.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// The credential is refused.
    #[error("invalid token: {}", .0.label())]
    Invalid(Invalid),
    /// The store was needed and could not answer.
    #[error(transparent)]
    Unavailable(#[from] StoreError),
    /// The secret's first verification waited longer than `argon2.max_wait` (argon2 is busy).
    #[error("verification busy")]
    Busy,
}

/// The record a token acts for.
#[derive(Debug, Clone)]
pub enum OwnerRecord {
    /// A user, as of now.
    User(Arc<User>),
    /// A service, as of now.
    Service(Arc<Service>),
}

/// A verified caller: the token and its owner's current record.
#[derive(Debug, Clone)]
///
/// For an ephemeral credential, `token` and `owner` are the service token that minted it and its
/// service, as of now, and `ephemeral` holds the credential's verified claims.
pub struct Principal {
    token: Arc<TokenRecord>,
    owner: OwnerRecord,
    deprecated: bool,
    ephemeral: Option<Arc<Ephemeral>>,
}

/// A verified ephemeral credential, as cached.
#[derive(Debug)]
pub struct Ephemeral {
    /// The verified claims.
    pub claims: EphemeralClaims,
    /// `ephemeral:<sub>`.
    subject: String,
    key: KeyFingerprint,
    /// Its weight in the verified-JWT cache: about the KiB it holds.
    weight: u32,
}

/// About the heap bytes a JSON value holds once parsed (a map entry, a `Value`, a string's bytes),
/// so that credentials with large attributes weigh what they cost.
fn json_footprint(v: &serde_json::Value) -> usize {
    use serde_json::Value;
    const VALUE: usize = 48;
    VALUE
        + match v {
            Value::String(s) => s.len(),
            Value::Array(items) => items.iter().map(json_footprint).sum(),
            Value::Object(map) => map.iter().map(|(k, v)| VALUE + k.len() + json_footprint(v)).sum(),
            Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        }
}

/// A verified credential's weight: 1 per KiB its claims hold, rounded up.
fn ephemeral_weight(claims: &EphemeralClaims, presented_len: usize) -> u32 {
    let attrs: usize = claims.attrs.iter().map(|(k, v)| 48 + k.len() + json_footprint(v)).sum();
    // The fixed part and the claims' strings, which the JWT's length bounds.
    let bytes = 512 + presented_len + attrs;
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

impl Principal {
    /// A principal from records already checked (used by tests and by the verifier).
    pub(crate) fn new(token: Arc<TokenRecord>, owner: OwnerRecord, deprecated: bool) -> Principal {
        Principal { token, owner, deprecated, ephemeral: None }
    }

    /// The ephemeral credential's claims, when the caller presented one.
    pub fn ephemeral(&self) -> Option<&EphemeralClaims> {
        self.ephemeral.as_deref().map(|e| &e.claims)
    }

    /// The token's org.
    pub fn org(&self) -> &str {
        &self.token.org
    }

    /// The token record.
    pub fn token(&self) -> &TokenRecord {
        &self.token
    }

    /// The owner's record.
    pub fn owner(&self) -> &OwnerRecord {
        &self.owner
    }

    /// Whether the token is in a rotation's grace period.
    pub fn deprecated(&self) -> bool {
        self.deprecated
    }

    /// The environments the token is limited to, if any.
    pub fn environments(&self) -> Option<&[String]> {
        self.token.environments.as_deref()
    }

    /// The token's scope permissions, if narrowed.
    pub fn scope(&self) -> Option<&[String]> {
        self.token.scope.as_ref().map(|s| s.permissions.as_slice())
    }

    /// The role on a project now: the higher of the org role and the project role.
    pub fn role_on(&self, project: &str) -> Role {
        let (org_role, project_roles) = match &self.owner {
            OwnerRecord::User(u) => (Some(u.org_role), &u.project_roles),
            OwnerRecord::Service(s) => (s.org_role, &s.project_roles),
        };
        org_role.into_iter().chain(project_roles.get(project).copied()).max().unwrap_or(Role::Guest)
    }

    /// `user:<id>`, `service:<name>` or `ephemeral:<sub>`.
    pub fn subject(&self) -> String {
        if let Some(e) = &self.ephemeral {
            return e.subject.clone();
        }
        match &self.owner {
            OwnerRecord::User(u) => format!("user:{}", u.id),
            OwnerRecord::Service(s) => format!("service:{}", s.name),
        }
    }

    /// The addresses of the records this principal was made from (token, owner, ephemeral claims
    /// or 0). They name these records only while something holds [`Principal::anchors`]: weak
    /// references that keep the addresses from being reused.
    pub fn record_addresses(&self) -> [usize; 3] {
        let owner = match &self.owner {
            OwnerRecord::User(u) => Arc::as_ptr(u) as usize,
            OwnerRecord::Service(s) => Arc::as_ptr(s) as usize,
        };
        let ephemeral = self.ephemeral.as_ref().map_or(0, |e| Arc::as_ptr(e) as usize);
        [Arc::as_ptr(&self.token) as usize, owner, ephemeral]
    }

    /// Weak references to the records of [`Principal::record_addresses`].
    pub fn anchors(&self) -> RecordAnchors {
        let (user, service) = match &self.owner {
            OwnerRecord::User(u) => (Some(Arc::downgrade(u)), None),
            OwnerRecord::Service(s) => (None, Some(Arc::downgrade(s))),
        };
        RecordAnchors {
            _token: Arc::downgrade(&self.token),
            _user: user,
            _service: service,
            _ephemeral: self.ephemeral.as_ref().map(Arc::downgrade),
        }
    }

    /// The id of the stored token: the caller's own, or the one that minted an ephemeral credential.
    pub fn token_id(&self) -> &TokenId {
        &self.token.id
    }

    /// The id shown for the credential presented: the token id, or an ephemeral credential's `jti`.
    pub fn credential_id(&self) -> &str {
        match &self.ephemeral {
            Some(e) => &e.claims.jti,
            None => self.token.id.as_str(),
        }
    }

    /// `pat`, `service` or `ephemeral`.
    pub fn kind(&self) -> &'static str {
        match &self.ephemeral {
            Some(_) => "ephemeral",
            None => self.token.kind.as_str(),
        }
    }

    /// The user's email, where the owner is a user, or the ephemeral credential's.
    pub fn email(&self) -> Option<&str> {
        if let Some(e) = &self.ephemeral {
            return e.claims.email.as_deref();
        }
        match &self.owner {
            OwnerRecord::User(u) => Some(&u.email),
            OwnerRecord::Service(_) => None,
        }
    }

    /// The attributes the upstream sees: a user's own, with `email` and `domain` added unless set
    /// explicitly; a service's; an ephemeral credential's, as minted. A view, not a copy: this
    /// runs on every request.
    pub fn attributes(&self) -> AttributeView<'_> {
        if let Some(e) = &self.ephemeral {
            return AttributeView { own: &e.claims.attrs, added: [None, None] };
        }
        match &self.owner {
            OwnerRecord::User(u) => {
                let domain = u.email.rsplit_once('@').map(|(_, d)| d);
                // In key order, so that the merged view iterates sorted like a JSON map.
                AttributeView {
                    own: &u.attributes,
                    added: [domain.map(|d| ("domain", d)), Some(("email", &u.email))],
                }
            }
            OwnerRecord::Service(s) => AttributeView { own: &s.attributes, added: [None, None] },
        }
    }
}

/// Weak references to a principal's records (see [`Principal::anchors`]).
#[derive(Debug)]
pub struct RecordAnchors {
    _token: Weak<TokenRecord>,
    _user: Option<Weak<User>>,
    _service: Option<Weak<Service>>,
    _ephemeral: Option<Weak<Ephemeral>>,
}

/// A principal's attributes: its record's own, plus up to two derived ones (a user's `domain` and
/// `email`) that the record does not set itself. Iterates and serializes in key order, like the
/// JSON object it stands for.
#[derive(Debug, Clone, Copy)]
pub struct AttributeView<'a> {
    own: &'a Attributes,
    added: [Option<(&'static str, &'a str)>; 2],
}

/// One attribute value of an [`AttributeView`].
#[derive(Debug, Clone, Copy)]
pub enum AttributeValue<'a> {
    /// From the record.
    Json(&'a serde_json::Value),
    /// Derived text.
    Text(&'a str),
}

impl<'a> AttributeView<'a> {
    /// Every attribute, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, AttributeValue<'a>)> + 'a {
        let own = self.own;
        // An own key spelled otherwise (`Domain`) travels in the same header: it wins too.
        let added = self.added.into_iter().flatten().filter(move |(k, _)| {
            !own.keys()
                .any(|o| crate::proxy::headers::attr_suffix(o).eq(crate::proxy::headers::attr_suffix(k)))
        });
        let mut own = own.iter().map(|(k, v)| (k.as_str(), AttributeValue::Json(v))).peekable();
        let mut added = added.map(|(k, v)| (k, AttributeValue::Text(v))).peekable();
        std::iter::from_fn(move || match (own.peek(), added.peek()) {
            (Some(o), Some(a)) if a.0 < o.0 => added.next(),
            (Some(_), _) => own.next(),
            (None, _) => added.next(),
        })
    }
}

impl serde::Serialize for AttributeView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        for (k, v) in self.iter() {
            match v {
                AttributeValue::Json(v) => map.serialize_entry(k, v)?,
                AttributeValue::Text(t) => map.serialize_entry(k, t)?,
            }
        }
        map.end()
    }
}

/// A secret this instance has proven with argon2, remembered as a keyed digest.
#[derive(Clone)]
struct Proven {
    secret: blake3::Hash,
    /// A keyed 64-bit hash of the stored PHC string the secret was proven against (telling
    /// records apart, not guarding a secret: that is the digest's work).
    phc: u64,
}

/// Counters for metrics and tests.
#[derive(Debug)]
pub struct VerifierStats {
    /// argon2 verifications run (`tollgate_argon2_runs_total`).
    pub argon2_runs: prometheus::IntCounter,
    /// Verifications waiting for an argon2 slot.
    pub argon2_waiting: AtomicUsize,
}

impl Default for VerifierStats {
    fn default() -> VerifierStats {
        VerifierStats {
            argon2_runs: crate::metrics::counter(
                "tollgate_argon2_runs_total",
                "Secrets checked with argon2 (first checks on this instance)",
            ),
            argon2_waiting: AtomicUsize::new(0),
        }
    }
}

/// Puts the calling thread at the lowest scheduling priority: Linux's SCHED_IDLE where it can
/// (any other thread that wakes preempts it at once, which a nice level alone does not promise),
/// else the lowest nice level. Neither needs privileges.
fn lowest_priority() {
    use thread_priority::{NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy};
    let idle = thread_priority::set_thread_priority_and_policy(
        thread_priority::thread_native_id(),
        ThreadPriority::Min,
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
    );
    if idle.is_err() {
        let _ = thread_priority::set_current_thread_priority(ThreadPriority::Min);
    }
}

/// How long a verified JWT's claims are remembered (they are checked again on every use; this
/// only bounds memory held for credentials nobody presents any more).
const JWT_CACHE_SECONDS: u64 = 300;

/// Verifies credentials against the cache and store.
pub struct Verifier {
    cache: Arc<Cache>,
    digester: SecretDigester,
    prover: Arc<Prover>,
    id_hasher: foldhash::fast::RandomState,
    /// Ephemeral credentials whose signature this instance has verified, by keyed digest of the
    /// whole JWT; their times, key and parent are checked again on every request.
    jwts: moka::sync::Cache<blake3::Hash, Arc<Ephemeral>, foldhash::fast::RandomState>,
    /// See [`crate::config::Argon2Settings::max_wait`].
    argon2_wait: std::time::Duration,
    stats: Arc<VerifierStats>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier running at most `argon2_concurrency` argon2 checks at once.
    pub fn new(cache: Arc<Cache>, capacity: u64, argon2_concurrency: usize) -> Verifier {
        let stats = Arc::<VerifierStats>::default();
        let prover = Prover {
            proven: quick_cache::sync::Cache::new(usize::try_from(capacity).unwrap_or(usize::MAX).max(1)),
            slots: Arc::new(Semaphore::new(argon2_concurrency.max(1))),
            workers: start_argon2_workers(argon2_concurrency.max(1)),
            stats: stats.clone(),
        };
        Verifier {
            cache,
            digester: SecretDigester::new(),
            prover: Arc::new(prover),
            id_hasher: foldhash::fast::RandomState::default(),
            // Bounded by weight, not count: a credential's attributes may be a thousand times
            // another's, and any service may mint and present many.
            jwts: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .weigher(|_, e: &Arc<Ephemeral>| e.weight)
                .time_to_live(std::time::Duration::from_secs(JWT_CACHE_SECONDS))
                .build_with_hasher(foldhash::fast::RandomState::default()),
            argon2_wait: DEFAULT_ARGON2_WAIT,
            stats,
        }
    }

    /// Remembers `token`'s secret as proven against `secret_hash`, the record's stored hash, with
    /// no argon2 run: for a token this process has just minted (quickstart's), whose first check
    /// would otherwise wait for argon2 at the lowest priority on a busy machine. `false` if it is
    /// not a token.
    pub fn trust_minted(&self, token: &str, secret_hash: &str) -> bool {
        let Ok(parsed) = token::parse(token) else { return false };
        let claim = self.claim(&parsed, secret_hash);
        self.prover.proven.insert(claim.key, Proven { secret: claim.digest, phc: claim.phc });
        true
    }

    /// What `parsed` presents against `secret_hash`, the record's stored hash, in the keyed
    /// forms a proof is kept and judged in.
    fn claim(&self, parsed: &ParsedToken<'_>, secret_hash: &str) -> Claim {
        Claim {
            key: self.id_hasher.hash_one(parsed.id.as_str()),
            digest: self.digester.digest(parsed.secret),
            phc: self.id_hasher.hash_one(secret_hash),
        }
    }

    /// The same verifier, answering [`AuthError::Busy`] when a first verification would wait
    /// longer than `wait` for its token's turn and a free argon2 thread, or a started run would
    /// take longer than `wait` again.
    pub fn with_argon2_wait(mut self, wait: std::time::Duration) -> Verifier {
        self.argon2_wait = wait;
        self
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<VerifierStats> {
        &self.stats
    }

    /// The cache in use.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Verifies any credential the gateway accepts: a JWT goes to [`Verifier::verify_ephemeral`]
    /// (refused when no `jwt` section is configured), everything else to [`Verifier::verify`].
    pub async fn verify_credential(
        &self,
        presented: &str,
        jwt: Option<&JwtSettings>,
    ) -> Result<Principal, AuthError> {
        match (jwt::looks_like_jwt(presented), jwt) {
            (true, Some(settings)) => self.verify_ephemeral(presented, settings).await,
            (true, None) => Err(AuthError::Invalid(Invalid::Jwt(JwtError::UnknownKey))),
            (false, _) => self.verify(presented).await,
        }
    }

    /// Verifies an ephemeral credential: the JWT itself (or the cached result of verifying these
    /// exact bytes, whose key, times and audience are checked again), then the service token that
    /// minted it and its service, as of now.
    pub async fn verify_ephemeral(
        &self,
        presented: &str,
        settings: &JwtSettings,
    ) -> Result<Principal, AuthError> {
        let invalid = |e: JwtError| AuthError::Invalid(Invalid::Jwt(e));
        let digest = self.digester.digest(presented);
        let now = now_millis();
        let cached = match self.jwts.get(&digest) {
            Some(e) => match settings.still_valid(&e.claims, &e.key, now / 1000) {
                Ok(()) => Some(e),
                // The key that verified it is gone or configured from other material (a private
                // key listed again as its public key has another fingerprint): verify it again.
                Err(JwtError::UnknownKey) => None,
                Err(e) => return Err(invalid(e)),
            },
            None => None,
        };
        let ephemeral = match cached {
            Some(e) => e,
            None => {
                let (claims, key) = settings.verify(presented).map_err(invalid)?;
                let subject = format!("ephemeral:{}", claims.sub);
                let weight = ephemeral_weight(&claims, presented.len());
                let e = Arc::new(Ephemeral { claims, subject, key, weight });
                self.jwts.insert(digest, e.clone());
                e
            }
        };
        let claims = &ephemeral.claims;
        let parent = TokenId::parse(&claims.tid).ok_or(invalid(JwtError::Claims))?;
        let record = self.cache.token(&parent).await?.ok_or(AuthError::Invalid(Invalid::OwnerGone))?;
        // As of after the read (a store read may take up to `store.timeout`), as for a token.
        let now = now_millis();
        if record.is_revoked(now) {
            return Err(AuthError::Invalid(Invalid::Revoked));
        }
        if record.is_expired(now) {
            return Err(AuthError::Invalid(Invalid::Expired));
        }
        if !matches!(&record.owner, Owner::Service(id) if *id == claims.svc) || record.org != claims.org {
            return Err(AuthError::Invalid(Invalid::OwnerGone));
        }
        let service = self.cache.service(&claims.svc).await?.ok_or(AuthError::Invalid(Invalid::OwnerGone))?;
        if service.org != claims.org {
            return Err(AuthError::Invalid(Invalid::OwnerGone));
        }
        // Minted for an org user: that user as of now.
        if let Some(uid) = &claims.uid {
            let user = self.cache.user(uid).await?.ok_or(AuthError::Invalid(Invalid::OwnerGone))?;
            if user.org != claims.org {
                return Err(AuthError::Invalid(Invalid::OwnerGone));
            }
            if user.status == UserStatus::Suspended {
                return Err(AuthError::Invalid(Invalid::OwnerSuspended));
            }
        }
        // It ends with its minting token's grace, and says so as that token does.
        let deprecated = record.revoked.is_some();
        Ok(Principal {
            token: record,
            owner: OwnerRecord::Service(service),
            deprecated,
            ephemeral: Some(ephemeral),
        })
    }

    /// Verifies a token as presented by a client.
    pub async fn verify(&self, presented: &str) -> Result<Principal, AuthError> {
        let parsed = token::parse(presented).map_err(|_| AuthError::Invalid(Invalid::Malformed))?;
        let mut record = self.cache.token(&parsed.id).await?.ok_or(AuthError::Invalid(Invalid::Unknown))?;
        if self.check_secret(&parsed, &record).await? == Waited::Yes {
            // Read before a wait of up to `argon2.max_wait` and a run: a revocation meanwhile
            // must count. (A cache hit; the secret's hash never changes for a token id.)
            record = self.cache.token(&parsed.id).await?.ok_or(AuthError::Invalid(Invalid::Unknown))?;
        }

        let now = now_millis();
        if record.is_revoked(now) {
            // Its holder is told it was replaced, not that someone revoked it.
            let why = if record.revoked_by_rotation() { Invalid::Rotated } else { Invalid::Revoked };
            return Err(AuthError::Invalid(why));
        }
        if record.is_expired(now) {
            return Err(AuthError::Invalid(Invalid::Expired));
        }
        let owner = match &record.owner {
            Owner::User(id) => {
                let user = self.cache.user(id).await?.ok_or(AuthError::Invalid(Invalid::OwnerGone))?;
                if user.status == UserStatus::Suspended {
                    return Err(AuthError::Invalid(Invalid::OwnerSuspended));
                }
                OwnerRecord::User(user)
            }
            Owner::Service(id) => OwnerRecord::Service(
                self.cache.service(id).await?.ok_or(AuthError::Invalid(Invalid::OwnerGone))?,
            ),
        };
        let owner_org = match &owner {
            OwnerRecord::User(u) => &u.org,
            OwnerRecord::Service(s) => &s.org,
        };
        if *owner_org != record.org {
            return Err(AuthError::Invalid(Invalid::OwnerGone));
        }
        let deprecated = record.revoked.is_some();
        Ok(Principal::new(record, owner, deprecated))
    }

    /// Proves the presented secret: by the proof remembered for this token, else by argon2.
    /// One run at a time per token: concurrent requests with its right secret share one, and a
    /// flood of made-up secrets for a known id takes at most one argon2 thread, so other tokens'
    /// first checks go on (that token's own first check on this instance waits behind them, and
    /// is answered busy past the bound; once proven it is never held up). Waiting for the
    /// token's turn and a free thread is bounded by `argon2_wait` ([`AuthError::Busy`] past it),
    /// and so is a started run, which at the lowest priority on a saturated machine can take far
    /// longer than alone: past that the request is busy too, while the run keeps the token's turn
    /// until it ends and its proof is kept, so the client's retry waits for it rather than
    /// starting another. Answers whether it had to wait (the record may have changed meanwhile).
    async fn check_secret(
        &self,
        parsed: &ParsedToken<'_>,
        record: &TokenRecord,
    ) -> Result<Waited, AuthError> {
        let claim = self.claim(parsed, &record.secret_hash);
        // A hit pays no timer.
        if let Some(p) = self.prover.proven.get(&claim.key).filter(|p| p.phc == claim.phc) {
            return judge(&p, &claim.digest).map(|()| Waited::No);
        }
        let deadline = tokio::time::Instant::now() + self.argon2_wait;
        // The turn and the run belong to a task of their own, which outlives this request when
        // the run outlasts the bound.
        let prover = self.prover.clone();
        let (secret, stored) = (parsed.secret.to_owned(), record.secret_hash.clone());
        let proving = tokio::spawn(async move { prover.prove(claim, &secret, &stored, deadline).await });
        match tokio::time::timeout_at(deadline + self.argon2_wait, proving).await {
            Ok(Ok(proved)) => proved,
            // The task panicked: the secret is unjudged, not wrong.
            Ok(Err(_)) | Err(_) => Err(AuthError::Busy),
        }
    }
}

/// A secret presented for a token: the key of the token's proof, the secret's keyed digest, and
/// the keyed hash of the stored PHC string it is checked against.
#[derive(Clone, Copy)]
struct Claim {
    key: u64,
    digest: blake3::Hash,
    phc: u64,
}

/// The proofs and the argon2 threads that make them, shared with the tasks that run them.
struct Prover {
    /// Secrets proven with argon2, by a per-process keyed hash of the token id (compact: one
    /// small entry per token).
    proven: quick_cache::sync::Cache<u64, Proven>,
    slots: Arc<Semaphore>,
    workers: crossbeam_channel::Sender<Argon2Job>,
    stats: Arc<VerifierStats>,
}

impl Prover {
    /// Takes the token's turn (by `deadline`), then proves the claim with an argon2 run; the turn
    /// is held until the run ends, and a proof, once made, is kept.
    async fn prove(
        &self,
        claim: Claim,
        secret: &str,
        stored: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Waited, AuthError> {
        let turn = tokio::time::timeout_at(deadline, self.proven.get_value_or_guard_async(&claim.key)).await;
        let guard = match turn {
            Err(_) => return Err(AuthError::Busy),
            // Proven meanwhile by a request with its right secret.
            Ok(Ok(p)) if p.phc == claim.phc => return judge(&p, &claim.digest).map(|()| Waited::Yes),
            // A proof against another stored hash (the record changed): this run replaces it.
            Ok(Ok(_)) => None,
            Ok(Err(guard)) => Some(guard),
        };
        let run = self.argon2(secret, stored, deadline).await?;
        // The argon2 thread died mid-run: the secret is unjudged, not wrong.
        let matched = run.await.map_err(|_| AuthError::Busy)?;
        if !matched {
            // The guard goes with this request: the next waiter runs its own secret.
            return Err(AuthError::Invalid(Invalid::WrongSecret));
        }
        let proof = Proven { secret: claim.digest, phc: claim.phc };
        match guard {
            Some(guard) => {
                let _ = guard.insert(proof);
            }
            None => self.proven.insert(claim.key, proof),
        }
        Ok(Waited::Yes)
    }

    /// Starts argon2 on a worker thread once one is free (by `deadline`, else
    /// [`AuthError::Busy`]); the run's verdict comes on the channel answered.
    async fn argon2(
        &self,
        secret: &str,
        phc: &str,
        deadline: tokio::time::Instant,
    ) -> Result<tokio::sync::oneshot::Receiver<bool>, AuthError> {
        let slot = {
            let _waiting = Waiting::count(&self.stats.argon2_waiting);
            tokio::time::timeout_at(deadline, self.slots.clone().acquire_owned()).await
        };
        // Past the deadline, or the slots closed (never, while the verifier lives).
        let Ok(Ok(slot)) = slot else { return Err(AuthError::Busy) };
        self.stats.argon2_runs.inc();
        let (done, result) = tokio::sync::oneshot::channel();
        let job = Argon2Job { secret: secret.to_owned(), phc: phc.to_owned(), done, _slot: slot };
        if self.workers.send(job).is_err() {
            // No thread could start (a process limit): every first check is unjudged, not wrong.
            tracing::error!("the argon2 threads are gone");
            return Err(AuthError::Busy);
        }
        Ok(result)
    }
}

/// One argon2 verification for a worker. The semaphore permit travels with it, so a slot is free
/// again only once the worker has finished.
struct Argon2Job {
    secret: String,
    phc: String,
    done: tokio::sync::oneshot::Sender<bool>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// Counts a request waiting for an argon2 thread while it lives, so that a wait given up (the
/// request refused as busy, or gone) is uncounted too.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(counter: &'a AtomicUsize) -> Waiting<'a> {
        counter.fetch_add(1, Ordering::Relaxed);
        Waiting(counter)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether verifying a secret waited (for its token's turn or an argon2 run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waited {
    No,
    Yes,
}

/// Whether a remembered proof is of `digest`. blake3::Hash compares in constant time. (A proof
/// for another stored hash, the record changed or two ids sharing a key hash, is not asked: the
/// callers compare `phc` first.)
fn judge(p: &Proven, digest: &blake3::Hash) -> Result<(), AuthError> {
    (p.secret == *digest).then_some(()).ok_or(AuthError::Invalid(Invalid::WrongSecret))
}

/// See [`Verifier::with_argon2_wait`]; `argon2.max_wait`'s default.
const DEFAULT_ARGON2_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long an idle argon2 thread keeps its memory (19 MiB with the default parameters).
pub const ARGON2_MEMORY_KEPT: std::time::Duration = std::time::Duration::from_secs(30);

/// Starts `n` long-lived argon2 threads at the lowest scheduling priority; they end when the sender
/// is dropped. Each keeps the memory of its last run until it has been idle for
/// [`ARGON2_MEMORY_KEPT`], so a storm of never-seen tokens allocates, faults in and frees nothing
/// per run (a thread per run that did cost every other thread of the process latency).
fn start_argon2_workers(n: usize) -> crossbeam_channel::Sender<Argon2Job> {
    let (jobs, queue) = crossbeam_channel::unbounded::<Argon2Job>();
    for _ in 0..n {
        let queue = queue.clone();
        let spawned = std::thread::Builder::new().name("argon2".into()).spawn(move || {
            lowest_priority();
            let mut memory = Vec::new();
            loop {
                let job = if memory.is_empty() {
                    match queue.recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    }
                } else {
                    match queue.recv_timeout(ARGON2_MEMORY_KEPT) {
                        Ok(job) => job,
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                            memory = Vec::new();
                            continue;
                        }
                        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
                    }
                };
                let _ = job.done.send(token::verify_secret_in(&job.secret, &job.phc, &mut memory));
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start an argon2 thread");
        }
    }
    jobs
}

#[cfg(test)]
mod tests;
