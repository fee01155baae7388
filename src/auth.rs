//! Verification: turns a presented token into a [`Principal`] (who is calling, with which token and
//! which owner record as of now), or says why not.
//!
//! Order of checks: format and checksum (pure, no I/O), token record (cache, then store), secret
//! (constant-time digest compare when this instance has verified the secret before, argon2id off the
//! request threads otherwise), then revocation, expiry against the clock, and the owner's record.
//! Until the secret is proven, every failure looks the same to the client.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::cache::Cache;
use crate::policy::Role;
use crate::store::{now_millis, Attributes, Owner, Service, StoreError, TokenRecord, User, UserStatus};
use crate::token::{self, ParsedToken, SecretDigester, TokenId, TokenKind};

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
    /// Revoked (or rotated out).
    Revoked,
    /// The owning user is suspended.
    OwnerSuspended,
    /// The owning user or service no longer exists.
    OwnerGone,
}

impl Invalid {
    /// What the client is told. Malformed, unknown and wrong-secret tokens read the same, so a
    /// client cannot probe which token ids exist; the rest are told only to holders of the secret.
    pub fn description(self) -> &'static str {
        match self {
            Invalid::Malformed | Invalid::Unknown | Invalid::WrongSecret => "the access token is invalid",
            Invalid::Expired => "the access token has expired",
            Invalid::Revoked => "the access token has been revoked",
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
            Invalid::OwnerSuspended => "owner_suspended",
            Invalid::OwnerGone => "owner_gone",
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
pub struct Principal {
    token: Arc<TokenRecord>,
    owner: OwnerRecord,
    deprecated: bool,
}

impl Principal {
    /// A principal from records already checked (used by tests and by the verifier).
    pub(crate) fn new(token: Arc<TokenRecord>, owner: OwnerRecord, deprecated: bool) -> Principal {
        Principal { token, owner, deprecated }
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

    /// `user:<id>` or `service:<name>`.
    pub fn subject(&self) -> String {
        match &self.owner {
            OwnerRecord::User(u) => format!("user:{}", u.id),
            OwnerRecord::Service(s) => format!("service:{}", s.name),
        }
    }

    /// The token id.
    pub fn token_id(&self) -> &TokenId {
        &self.token.id
    }

    /// `pat` or `service`.
    pub fn kind(&self) -> TokenKind {
        self.token.kind
    }

    /// The user's email, where the owner is a user.
    pub fn email(&self) -> Option<&str> {
        match &self.owner {
            OwnerRecord::User(u) => Some(&u.email),
            OwnerRecord::Service(_) => None,
        }
    }

    /// The owner's attributes; a user's include `email` and `domain` unless set explicitly.
    pub fn attributes(&self) -> Attributes {
        match &self.owner {
            OwnerRecord::User(u) => {
                let mut attrs = u.attributes.clone();
                attrs.entry("email").or_insert_with(|| u.email.clone().into());
                if let Some((_, domain)) = u.email.rsplit_once('@') {
                    attrs.entry("domain").or_insert_with(|| domain.into());
                }
                attrs
            }
            OwnerRecord::Service(s) => s.attributes.clone(),
        }
    }
}

/// A secret this instance has proven with argon2, remembered as a keyed digest.
#[derive(Clone)]
struct Proven {
    secret: blake3::Hash,
    phc: blake3::Hash,
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct VerifierStats {
    /// argon2 verifications run.
    pub argon2_runs: AtomicU64,
    /// Verifications waiting for an argon2 slot.
    pub argon2_waiting: AtomicUsize,
}

/// Verifies credentials against the cache and store.
pub struct Verifier {
    cache: Arc<Cache>,
    digester: SecretDigester,
    proven: moka::future::Cache<TokenId, Proven>,
    argon2_slots: Arc<Semaphore>,
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
        Verifier {
            cache,
            digester: SecretDigester::new(),
            proven: moka::future::Cache::builder().max_capacity(capacity).build(),
            argon2_slots: Arc::new(Semaphore::new(argon2_concurrency.max(1))),
            stats: Arc::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<VerifierStats> {
        &self.stats
    }

    /// The cache in use.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Verifies a token as presented by a client.
    pub async fn verify(&self, presented: &str) -> Result<Principal, AuthError> {
        let parsed = token::parse(presented).map_err(|_| AuthError::Invalid(Invalid::Malformed))?;
        let record = self.cache.token(&parsed.id).await?.ok_or(AuthError::Invalid(Invalid::Unknown))?;
        self.check_secret(&parsed, &record).await?;

        let now = now_millis();
        if record.is_revoked(now) {
            return Err(AuthError::Invalid(Invalid::Revoked));
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

    /// Proves the secret: by digest when proven before, else by argon2 (one run for concurrent
    /// requests with the same token).
    async fn check_secret(&self, parsed: &ParsedToken<'_>, record: &TokenRecord) -> Result<(), AuthError> {
        let digest = self.digester.digest(parsed.secret);
        let phc = blake3::hash(record.secret_hash.as_bytes());
        let proven = self
            .proven
            .try_get_with_by_ref(&parsed.id, async {
                if self.argon2(parsed.secret, &record.secret_hash).await {
                    Ok(Proven { secret: digest, phc })
                } else {
                    Err(digest)
                }
            })
            .await;
        match proven {
            // blake3::Hash compares in constant time.
            Ok(p) if p.phc == phc => {
                if p.secret == digest {
                    Ok(())
                } else {
                    Err(AuthError::Invalid(Invalid::WrongSecret))
                }
            }
            Err(failed) if *failed == digest => Err(AuthError::Invalid(Invalid::WrongSecret)),
            // The shared check ran for another secret (a concurrent wrong guess) and failed, or the
            // stored hash changed since it was proven: this request's secret is checked on its own,
            // so nobody guessing wrong secrets for a known id can make the right one fail.
            _ => {
                if self.argon2(parsed.secret, &record.secret_hash).await {
                    self.proven.insert(parsed.id.clone(), Proven { secret: digest, phc }).await;
                    Ok(())
                } else {
                    Err(AuthError::Invalid(Invalid::WrongSecret))
                }
            }
        }
    }

    async fn argon2(&self, secret: &str, phc: &str) -> bool {
        self.stats.argon2_waiting.fetch_add(1, Ordering::Relaxed);
        let slot = self.argon2_slots.clone().acquire_owned().await;
        self.stats.argon2_waiting.fetch_sub(1, Ordering::Relaxed);
        let Ok(slot) = slot else { return false };
        self.stats.argon2_runs.fetch_add(1, Ordering::Relaxed);
        let (secret, phc) = (secret.to_owned(), phc.to_owned());
        let ok = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            token::verify_secret(&secret, &phc)
        })
        .await;
        ok.unwrap_or(false)
    }
}

#[cfg(test)]
mod tests;
