//! Lifecycle operations on orgs, users, services and tokens: who may do what, and the store changes
//! with their audit entries. Used by the admin API, `bootstrap` and tests. Secrets are hashed off the
//! async threads and exist only in the return value of the call that makes them.
//!
//! Nobody can grant more than they hold: a new token's scope and environments stay within the
//! caller's effective rights, and a service's roles within its creator's at creation.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::auth::{OwnerRecord, Principal};
use crate::config::{Config, TokenLimits};
use crate::policy::{PermSet, Role};
use crate::store::{
    format_millis, now_millis, Acting, Attributes, AuditEvent, FirstToken, LastUse, Millis, Org, Owner,
    Revocation, Revoking, RoleSet, Scope, Service, Store, StoreError, Stored, TokenRecord, User, UserStatus,
};
use crate::token::{self, Argon2Params, NewToken, TokenId, TokenKind};

mod ephemeral;
pub use ephemeral::{CredentialsRequest, IssuedCredential};

/// A lifecycle failure; the admin API maps each kind to one status.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The store refused or could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The caller may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// The thing named does not exist (or is not visible to the caller).
    #[error("{0}")]
    NotFound(String),
    /// The name is taken, or the request is ambiguous.
    #[error("{0}")]
    Conflict(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// Hashing the secret failed (bad argon2 parameters).
    #[error("hashing the token secret failed: {0}")]
    Hash(String),
    /// A change carrying a new token was sent to the store and not answered.
    #[error(transparent)]
    UnansweredToken(UnansweredToken),
}

/// A change carrying a new token that was sent to the store and not answered: it may have been
/// made, and then this is the caller's only copy of the token. The message, which a log may keep,
/// names its id only, and `Debug` shows no secret.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[error("the store did not answer in time; the change may still have been made: if it was, token {id} is the new one (look with token get {id})")]
pub struct UnansweredToken {
    /// The new token's id.
    pub id: String,
    /// The whole new token.
    pub token: String,
}

impl std::fmt::Debug for UnansweredToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnansweredToken").field("id", &self.id).field("token", &"<redacted>").finish()
    }
}

type Result<T> = std::result::Result<T, LifecycleError>;

/// A store error from storing `new`: one that may have stored it (sent, not answered) keeps the
/// token, which is otherwise lost with the answer the caller never gets.
fn keeping(new: &NewToken) -> impl FnOnce(LifecycleError) -> LifecycleError + '_ {
    move |e| match e {
        LifecycleError::Store(StoreError::Unanswered(_)) => {
            LifecycleError::UnansweredToken(UnansweredToken {
                id: new.id.to_string(),
                token: new.token.clone(),
            })
        }
        e => e,
    }
}

fn conflict(e: StoreError, what: impl FnOnce() -> String) -> LifecycleError {
    match e {
        StoreError::Conflict(_) => LifecycleError::Conflict(what()),
        other => LifecycleError::Store(other),
    }
}

/// Who is acting, with the rights in effect for this call.
#[derive(Debug, Clone)]
pub struct Actor {
    /// `user:<id>`, `service:<name>` or `bootstrap`.
    pub subject: String,
    /// The org the actor belongs to; nobody reaches another.
    pub org: String,
    /// The user behind the token, if a user.
    pub user_id: Option<String>,
    /// Roles now.
    pub roles: RoleSet,
    /// The calling token's scope, if narrowed.
    pub scope: Option<Vec<String>>,
    /// The calling token's environments, if restricted.
    pub environments: Option<Vec<String>>,
    /// The calling token's id (`None` for `bootstrap`).
    pub token_id: Option<TokenId>,
    /// The service behind the token, if a service.
    pub service_id: Option<String>,
    /// The user's email, if a user.
    pub email: Option<String>,
}

impl Actor {
    /// The actor behind a verified principal.
    pub fn from_principal(p: &Principal) -> Actor {
        let (subject, user_id, roles, service_id, email) = match p.owner() {
            OwnerRecord::User(u) => {
                (format!("user:{}", u.id), Some(u.id.clone()), user_roles(u), None, Some(u.email.clone()))
            }
            OwnerRecord::Service(s) => {
                (format!("service:{}", s.name), None, service_roles(s), Some(s.id.clone()), None)
            }
        };
        Actor {
            subject,
            org: p.org().to_string(),
            user_id,
            roles,
            scope: p.scope().map(<[String]>::to_vec),
            environments: p.environments().map(<[String]>::to_vec),
            token_id: Some(p.token_id().clone()),
            service_id,
            email,
        }
    }

    /// Permissions in effect for org-wide actions: the org role's, narrowed by the token's scope.
    fn org_permissions(&self, config: &Config) -> PermSet {
        self.permissions_for(config, self.roles.org)
    }

    fn permissions_for(&self, config: &Config, role: Role) -> PermSet {
        let p = config.policy.role_permissions(role);
        match &self.scope {
            Some(scope) => p.intersect(config.policy.set_of(scope)),
            None => p,
        }
    }

    fn may(&self, config: &Config, permission: &str) -> bool {
        config.policy.permission(permission).is_some_and(|bit| self.org_permissions(config).contains(bit))
    }

    /// An org admin's change reaches every environment (a role, a token, a service used in all of
    /// them), so a token restricted to some environments is no admin's, whatever its owner's role.
    fn require_admin(&self, config: &Config) -> Result<()> {
        match (self.roles.org == Role::Admin && self.may(config, "admin"), &self.environments) {
            (true, None) => Ok(()),
            (true, Some(envs)) => Err(LifecycleError::Forbidden(format!(
                "this needs an org admin's token not restricted to environments (yours may be used only in {})",
                envs.join(", ")
            ))),
            (false, _) => Err(LifecycleError::Forbidden(
                "this needs an org admin (role admin, token with the admin permission)".into(),
            )),
        }
    }

    fn require_org(&self, org: &str) -> Result<()> {
        if self.org == org {
            Ok(())
        } else {
            // Other orgs are not even confirmed to exist.
            Err(LifecycleError::NotFound(format!("org {:?} not found", shown(org))))
        }
    }

    fn audit(&self, action: &str, target: impl Into<String>) -> AuditEvent {
        AuditEvent {
            at: now_millis(),
            org: self.org.clone(),
            actor: self.subject.clone(),
            action: action.to_string(),
            target: target.into(),
            token_id: None,
            by_token: self.token_id.as_ref().map(|t| t.to_string()),
            actor_email: self.email.clone(),
            reason: None,
            details: serde_json::Value::Null,
        }
    }
}

/// The first of `s`'s roles above `cap`: where (`org role`, `role on project "p"`), the service's
/// role there and `cap`'s.
fn role_above(s: &Service, cap: &RoleSet) -> Option<(String, Role, Role)> {
    if let Some(role) = s.org_role.filter(|r| *r > cap.org) {
        return Some(("org role".into(), role, cap.org));
    }
    let (project, role) = s.project_roles.iter().find(|(project, role)| **role > cap.on(project))?;
    Some((format!("role on project {project:?}"), *role, cap.on(project)))
}

/// Why a service (an admin one included) is refused a user's token: it would hold a person's
/// credential, and act as them or beyond what services may (create services, issue PATs).
const USER_TOKENS_BY_USERS: &str = "a user's token is issued by an org admin who is a user, not by a service";

/// Why a caller who may manage no service is refused a service's listing or details (the same
/// whether a name exists or not).
const SERVICES_SEEN_BY: &str = "services are seen by org admins and by editors whose token may write";

/// What a new token may do, as asked for by a client.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueRequest {
    /// Name shown in lists.
    pub display_name: Option<String>,
    /// Lifetime in minutes.
    pub ttl_minutes: Option<i64>,
    /// Expiry as RFC 3339.
    pub expires: Option<String>,
    /// A scope preset name.
    pub scope: Option<String>,
    /// An explicit permission list instead of a preset.
    pub permissions: Option<Vec<String>>,
    /// Environments the token may be used in.
    pub environments: Option<Vec<String>>,
    /// A service of the caller's org to issue the token to instead (its admins and its creator):
    /// the way back for a service whose tokens all expired or were revoked. Left out when unset,
    /// so that a gateway older than the field still takes the body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// A user of the caller's org (by email) to issue a personal access token to instead (org
    /// admins): the way back for a user whose tokens all expired or were revoked, who has no
    /// token to issue one with. Left out when unset, as `service` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// When a first token (a new service's, a new user's) ends: in `ttl_minutes`, at `expires`
/// (RFC 3339), or, given neither, as a token issued without an expiry (`tokens.max_ttl`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Lifetime {
    /// Lifetime in minutes.
    pub ttl_minutes: Option<i64>,
    /// Expiry as RFC 3339.
    pub expires: Option<String>,
}

impl Lifetime {
    /// A new user's first token, if `issue_token`, lasting `self`; a lifetime given without a
    /// token to apply it to is refused.
    pub fn of_first_token(self, issue_token: bool) -> Result<Option<Lifetime>> {
        match (issue_token, self == Lifetime::default()) {
            (true, _) => Ok(Some(self)),
            (false, true) => Ok(None),
            (false, false) => Err(LifecycleError::Invalid(
                "ttl_minutes and expires (--ttl-minutes, --expires) are the first token's: give issue_token \
                 (--issue-token) too"
                    .into(),
            )),
        }
    }
}

/// A rotation request: the new token keeps the old one's settings unless overridden.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// New scope preset.
    pub scope: Option<String>,
    /// New permission list.
    pub permissions: Option<Vec<String>>,
    /// New expiry (RFC 3339).
    pub expires: Option<String>,
    /// New lifetime in minutes.
    pub ttl_minutes: Option<i64>,
    /// New environments it works in.
    pub environments: Option<Vec<String>>,
    /// Seconds the old token keeps working (with a `Deprecation` header); 0 revokes it at once.
    pub grace_seconds: Option<i64>,
}

/// A token as shown to clients: never the secret or its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenView {
    /// Token id.
    pub id: String,
    /// `pat` or `service`.
    pub kind: String,
    /// Org.
    pub org: String,
    /// `user:<email>` or `service:<name>`.
    pub owner: String,
    /// Display name.
    pub display_name: Option<String>,
    /// Scope preset name, if any.
    pub scope: Option<String>,
    /// Scope permissions, if narrowed.
    pub permissions: Option<Vec<String>>,
    /// Environments, if restricted.
    pub environments: Option<Vec<String>>,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Expiry time (RFC 3339).
    pub expires_at: Option<String>,
    /// `active`, `deprecated` (in a rotation's grace), `suspended` (working, but its owner is
    /// suspended: refused until they are reactivated), `expired`, `revoked` or `rotated`.
    pub status: String,
    /// When it was or will be revoked.
    pub revoked_at: Option<String>,
    /// Why.
    pub revoke_reason: Option<String>,
    /// The token that replaced it.
    pub rotated_to: Option<String>,
    /// Last use time (RFC 3339).
    pub last_used_at: Option<String>,
    /// Last use client IP.
    pub last_used_ip: Option<String>,
}

/// A new token: its text (shown once) and its details.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuedToken {
    /// The whole token. Shown once.
    pub token: String,
    /// Details.
    #[serde(flatten)]
    pub details: TokenView,
}

/// The status of a token at `now`.
pub fn token_status(t: &TokenRecord, now: Millis) -> &'static str {
    match &t.revoked {
        Some(_) if t.is_revoked(now) => {
            // Revoked by its rotation, not by a revocation during the grace (which stops it at
            // once and replaces the rotation's reason).
            if t.revoked_by_rotation() {
                "rotated"
            } else {
                "revoked"
            }
        }
        _ if t.is_expired(now) => "expired",
        Some(_) => "deprecated",
        None => "active",
    }
}

/// Validated token settings, ready to store.
#[derive(Debug, Clone, Default)]
pub struct TokenSpec {
    /// Name shown in lists.
    pub display_name: Option<String>,
    /// Narrowing below the owner's role.
    pub scope: Option<Scope>,
    /// Environments it may be used in.
    pub environments: Option<Vec<String>>,
    /// Expiry.
    pub expires_at: Option<Millis>,
}

/// An empty environment list would make a credential refused everywhere.
const EMPTY_ENVIRONMENTS: &str =
    "an environment list names at least one environment (leave it out for every environment)";

/// Whose rights a new token's are checked against ([`Lifecycle::spec`]), as a refusal names them.
#[derive(Debug, Clone, Copy)]
enum Holder {
    /// The caller's own token (their PAT, a rotation of it).
    Caller,
    /// A user's, issued by an admin.
    User,
    /// A service's.
    Service,
}

impl Holder {
    /// "you hold", or the owner's, through the caller's token where that is narrowed.
    fn holds(self, actor: &Actor) -> String {
        let through = if actor.scope.is_some() { " through your token" } else { "" };
        match self {
            Holder::Caller => "you hold".into(),
            Holder::User => format!("the user holds{through}"),
            Holder::Service => format!("the service holds{through}"),
        }
    }
}

/// What a token is made as, which decides what its unset scope or environments mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Making {
    /// A new token: unset means the caller's own narrowing (a token made with a narrowed token
    /// stays as narrow).
    New,
    /// A rotation: unset means unrestricted, as on the token it replaces, refused if the caller
    /// is narrower rather than silently narrowed. `scope_kept`, `envs_kept`: the scope, the
    /// environments are the old token's, not asked for anew.
    Rotation { scope_kept: bool, envs_kept: bool },
}

/// A display name as kept and as looked up: trimmed, and none if empty.
fn display_name_of(name: &str) -> Option<String> {
    Some(name.trim()).filter(|n| !n.is_empty()).map(str::to_string)
}

/// The `token.issue` entry of a token `actor` issued.
fn issue_audit(actor: &Actor, record: &TokenRecord, details: serde_json::Value) -> AuditEvent {
    let mut audit = actor.audit("token.issue", record.id.to_string());
    audit.token_id = Some(record.id.to_string());
    audit.details = details;
    audit
}

/// A user's roles as a role set.
fn user_roles(u: &User) -> RoleSet {
    RoleSet { org: u.org_role, projects: u.project_roles.clone() }
}

/// A service's roles as a role set (no org role: guest in the org).
fn service_roles(s: &Service) -> RoleSet {
    RoleSet { org: s.org_role.unwrap_or(Role::Guest), projects: s.project_roles.clone() }
}

/// The ids a removal revokes, for its audit entry.
fn revoked_ids(revoking: &Revoking) -> Vec<String> {
    revoking.tokens.iter().map(|(_, t)| t.id.to_string()).collect()
}

/// An admin service may not demote or delete itself, as an admin may not (an org keeps an admin).
fn not_itself(actor: &Actor, s: &Service, what: &str) -> Result<()> {
    match &actor.service_id {
        Some(id) if *id == s.id => {
            Err(LifecycleError::Forbidden(format!("a service may not {what}; an org admin does that")))
        }
        _ => Ok(()),
    }
}

/// The expiry of a token made without anyone choosing one (a service's, a new user's first, the
/// bootstrap admin's): the configured maximum lifetime, or 90 days where an expiry is required
/// without one.
fn implicit_expiry(limits: &TokenLimits, now: Millis) -> Option<Millis> {
    match (limits.max_ttl, limits.require_expiry) {
        (Some(max), _) => Some(now + max.as_millis() as Millis),
        (None, true) => Some(now + 90 * 24 * 3600 * 1000),
        (None, false) => None,
    }
}

/// A lifetime as the config writes it: `90d`, `12h`, `30m`, `45s` (humantime would say
/// `2months 29days 2h 52m 48s` for 90 days).
fn lifetime(d: std::time::Duration) -> String {
    match d.as_secs() {
        s if s > 0 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s > 0 && s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        _ => humantime::format_duration(d).to_string(),
    }
}

/// 9999-12-31T23:59:59Z: the last instant RFC 3339 can write.
const MAX_EXPIRY: Millis = 253_402_300_799_000;

/// A name or email from a request, as an error message may repeat it: never a whole token that
/// was pasted in its place ([`crate::token::redacted`]).
fn shown(name: &str) -> std::borrow::Cow<'_, str> {
    crate::token::redacted(name).map_or(std::borrow::Cow::Borrowed(name), std::borrow::Cow::Owned)
}

fn parse_expiry(ttl_minutes: Option<i64>, expires: Option<&str>, now: Millis) -> Result<Option<Millis>> {
    match (ttl_minutes, expires) {
        (Some(_), Some(_)) => {
            Err(LifecycleError::Invalid("give --ttl-minutes or --expires, not both".into()))
        }
        (Some(m), None) if m <= 0 => {
            Err(LifecycleError::Invalid(format!("ttl_minutes must be positive, got {m}")))
        }
        (Some(m), None) => match m.checked_mul(60_000).and_then(|ms| now.checked_add(ms)) {
            Some(at) if at <= MAX_EXPIRY => Ok(Some(at)),
            _ => Err(LifecycleError::Invalid(format!("ttl_minutes {m} ends after the year 9999"))),
        },
        (None, Some(text)) => {
            let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .map_err(|_| {
                    LifecycleError::Invalid(format!(
                        "expires {text:?} is not an RFC 3339 time like 2026-12-31T23:59:59Z or \
                         2026-12-31T23:59:59+01:00"
                    ))
                })?;
            let ms = (t.unix_timestamp_nanos() / 1_000_000).clamp(0, i128::from(Millis::MAX)) as Millis;
            if ms <= now {
                return Err(LifecycleError::Invalid(format!("expires {text:?} is in the past")));
            }
            if ms > MAX_EXPIRY {
                return Err(LifecycleError::Invalid(format!("expires {text:?} is after the year 9999")));
            }
            Ok(Some(ms))
        }
        (None, None) => Ok(None),
    }
}

/// The lifecycle service over one store and the config in force.
pub struct Lifecycle<'a> {
    store: &'a Store,
    config: &'a Config,
}

impl<'a> Lifecycle<'a> {
    /// Operations on `store` under `config`.
    pub fn new(store: &'a Store, config: &'a Config) -> Lifecycle<'a> {
        Lifecycle { store, config }
    }

    fn argon2(&self) -> Argon2Params {
        self.config.argon2.params
    }

    /// A scope asked for by preset name or permission list (not both), resolved and checked against
    /// the config; `None` when neither was given.
    fn requested_scope(
        &self,
        scope: Option<String>,
        permissions: Option<Vec<String>>,
    ) -> Result<Option<Scope>> {
        let policy = &self.config.policy;
        match (scope, permissions) {
            (Some(_), Some(_)) => {
                Err(LifecycleError::Invalid("give --scope or --permission, not both".into()))
            }
            (Some(name), None) => {
                let perms = policy.scope_preset(&name).ok_or_else(|| {
                    LifecycleError::Invalid(format!(
                        "unknown scope {name:?}; presets: {}",
                        policy.scope_names().join(", ")
                    ))
                })?;
                Ok(Some(Scope { name: Some(name), permissions: perms.to_vec() }))
            }
            (None, Some(mut perms)) => {
                if perms.is_empty() {
                    return Err(LifecycleError::Invalid(
                        "a permission list names at least one permission (a token with none could do nothing)"
                            .into(),
                    ));
                }
                if let Some(bad) = perms.iter().find(|p| policy.permission(p).is_none()) {
                    return Err(LifecycleError::Invalid(format!("unknown permission {bad:?}")));
                }
                once_each(&mut perms);
                Ok(Some(Scope { name: None, permissions: perms }))
            }
            (None, None) => Ok(None),
        }
    }

    /// Validates a token's settings against the config and the caller's rights. Where `wanted`
    /// leaves the scope or the environments unset, `making` says what that means.
    fn spec(
        &self,
        actor: &Actor,
        holder: Holder,
        wanted: TokenSpec,
        making: Making,
        now: Millis,
    ) -> Result<TokenSpec> {
        let TokenSpec { display_name, scope, mut environments, expires_at } = wanted;
        if let Some(envs) = &mut environments {
            once_each(envs);
        }
        let policy = &self.config.policy;
        let asked = scope.is_some();
        // A token made with a narrowed token stays as narrow. (Inherited, it cannot exceed what
        // the caller holds: the owner's role caps it on every request.)
        let scope = match (scope, making) {
            (None, Making::New) => actor.scope.clone().map(|permissions| Scope { name: None, permissions }),
            (scope, _) => scope,
        };
        // Only when left unset: one asked for is checked against what the caller holds, even
        // when it names the caller's own scope (an admin's scoped token, its owner since demoted).
        let inherited = making == Making::New && !asked && actor.scope.is_some();
        // Never more than the caller holds anywhere in the org, narrowed by the caller's own scope.
        let held = actor.permissions_for(self.config, actor.roles.highest());
        let role = policy.role_permissions(actor.roles.highest());
        let wanted = match (&scope, making) {
            // A kept scope may name more than the owner's role now (inherited from an admin's
            // scoped token, or the owner since demoted): the role caps it on every request, so
            // what it gives is what counts.
            (Some(s), Making::Rotation { scope_kept: true, .. }) => {
                policy.set_of(&s.permissions).intersect(role)
            }
            (Some(s), _) => policy.set_of(&s.permissions),
            (None, _) => role,
        };
        if !inherited && !held.contains(wanted) {
            return Err(LifecycleError::Forbidden(format!(
                "the token would have more rights ({}) than {} ({}){}",
                policy.names_of(wanted),
                holder.holds(actor),
                policy.names_of(held),
                match making {
                    Making::Rotation { .. } => "; give a narrower --scope, or use a token that holds them",
                    Making::New => "",
                }
            )));
        }
        if let Some(envs) = &environments {
            if envs.is_empty() {
                return Err(LifecycleError::Invalid(EMPTY_ENVIRONMENTS.into()));
            }
            let known: Vec<&String> = self
                .config
                .orgs
                .get(&actor.org)
                .map(|o| o.projects.values().flatten().collect())
                .unwrap_or_default();
            // A rotation keeps the old token's environments, one since removed from the config
            // included: it is not asked for again (and is refused by the proxy until it returns).
            let asked = !matches!(making, Making::Rotation { envs_kept: true, .. });
            if let Some(bad) = envs.iter().find(|e| asked && !known.contains(e)) {
                return Err(LifecycleError::Invalid(format!(
                    "unknown environment {bad:?} in org {:?}",
                    actor.org
                )));
            }
            if let Some(mine) = &actor.environments {
                if let Some(bad) = envs.iter().find(|e| !mine.contains(e)) {
                    return Err(LifecycleError::Forbidden(format!(
                        "your token may not be used in environment {bad:?}"
                    )));
                }
            }
        }
        let environments = match (environments, making, &actor.environments) {
            (None, Making::New, mine) => mine.clone(),
            (None, Making::Rotation { .. }, Some(mine)) => {
                return Err(LifecycleError::Forbidden(format!(
                    "the token may be used in every environment, and yours only in {}: \
                     use a token that is not restricted to environments",
                    mine.join(", ")
                )))
            }
            (environments, _, _) => environments,
        };
        let limits = &self.config.tokens;
        if expires_at.is_none() && limits.require_expiry {
            return Err(LifecycleError::Invalid(
                "this gateway requires an expiry: give --ttl-minutes or --expires".into(),
            ));
        }
        // Under a maximum lifetime, a token asked for without an expiry gets that lifetime.
        let expires_at = expires_at.or_else(|| limits.max_ttl.map(|max| now + max.as_millis() as Millis));
        if let (Some(max), Some(at)) = (limits.max_ttl, expires_at) {
            if at - now > max.as_millis() as Millis {
                return Err(LifecycleError::Invalid(format!(
                    "the expiry is beyond the maximum lifetime of {}",
                    lifetime(max)
                )));
            }
        }
        let display_name = display_name.as_deref().and_then(display_name_of);
        if display_name.as_ref().is_some_and(|n| n.chars().count() > 100) {
            return Err(LifecycleError::Invalid("display names are at most 100 characters".into()));
        }
        // A rotation keeps the name the token had, which was accepted then.
        if let (Some(name), Making::New) = (&display_name, &making) {
            refuse_credential("the display name", name)?;
        }
        Ok(TokenSpec { display_name, scope, environments, expires_at })
    }

    /// How a token's owner is shown, and whether it is a suspended user (whose tokens the
    /// gateway refuses while they are).
    async fn owner_label(&self, owner: &Owner) -> (String, bool) {
        match owner {
            Owner::User(id) => match self.store.get_user(id).await {
                Ok(Some(u)) => (format!("user:{}", u.email), u.status == UserStatus::Suspended),
                _ => (format!("user:{id}"), false),
            },
            Owner::Service(id) => match self.store.get_service(id).await {
                Ok(Some(s)) => (format!("service:{}", s.name), false),
                _ => (format!("service:{id}"), false),
            },
        }
    }

    /// The client view of a token.
    pub async fn view(&self, t: &TokenRecord) -> Result<TokenView> {
        let last = self.store.last_use(&t.id).await?;
        Ok(self.view_with(t, last).await)
    }

    /// The view of a token just changed: the change is done, so a failure to read its last use
    /// (only shown, never decided on) must not turn the answer into an error, which would lose a
    /// new secret or claim that a revocation failed.
    async fn view_after_change(&self, t: &TokenRecord) -> TokenView {
        let last = self.store.last_use(&t.id).await.unwrap_or_else(|e| {
            tracing::warn!(token_id = %t.id, error = %e, "could not read the last use of a changed token");
            None
        });
        self.view_with(t, last).await
    }

    async fn view_with(&self, t: &TokenRecord, last: Option<LastUse>) -> TokenView {
        Self::view_of(t, last, self.owner_label(&t.owner).await)
    }

    fn view_of(t: &TokenRecord, last: Option<LastUse>, (owner, suspended): (String, bool)) -> TokenView {
        // A working token of a suspended user is refused as long as they are: said so.
        let status = match token_status(t, now_millis()) {
            "active" | "deprecated" if suspended => "suspended",
            status => status,
        };
        TokenView {
            id: t.id.to_string(),
            kind: t.kind.as_str().to_string(),
            org: t.org.clone(),
            owner,
            display_name: t.display_name.clone(),
            scope: t.scope.as_ref().and_then(|s| s.name.clone()),
            permissions: t.scope.as_ref().map(|s| s.permissions.clone()),
            environments: t.environments.clone(),
            created_at: format_millis(t.created_at),
            expires_at: t.expires_at.map(format_millis),
            status: status.to_string(),
            revoked_at: t.revoked.as_ref().map(|r| format_millis(r.at)),
            revoke_reason: t.revoked.as_ref().and_then(|r| r.reason.clone()),
            rotated_to: t.rotated_to.as_ref().map(|id| id.to_string()),
            last_used_at: last.as_ref().map(|l| format_millis(l.at)),
            last_used_ip: last.map(|l| l.ip),
        }
    }

    async fn mint(&self, org: &str, owner: Owner, spec: TokenSpec) -> Result<(NewToken, TokenRecord)> {
        mint(self.store, self.argon2(), org, owner, spec).await
    }

    /// Stores a freshly minted token with its audit entry, for another owner only while that
    /// owner's record (and, if counted, token set) is as `guard` read it, and only while the
    /// owner's token set holds at most `room` ids ([`Lifecycle::room_for_a_token`]).
    async fn store_issued(
        &self,
        actor: &Actor,
        record: &TokenRecord,
        details: serde_json::Value,
        guard: Option<(Acting, Option<usize>)>,
        room: usize,
    ) -> Result<()> {
        let acting = self.acting(actor).await?;
        let audit = issue_audit(actor, record, details);
        let (owner, members) = guard.map_or((None, None), |(owner, n)| (Some(owner), n));
        // The tighter of the two bounds on the owner's token set.
        let owner_tokens = Some(members.map_or(room, |n| n.min(room)));
        let stored =
            self.store.insert_token_for(record, Some(&audit), acting.as_ref(), owner.as_ref(), owner_tokens);
        Ok(stored.await?)
    }

    /// A first token made by `actor` for a new owner holding `roles`: unscoped beyond the caller's
    /// own scope, with the implicit expiry. Made before its owner is stored, so that both go in
    /// one change.
    async fn first_token(
        &self,
        actor: &Actor,
        org: &str,
        owner: Owner,
        roles: RoleSet,
        display_name: String,
        lifetime: &Lifetime,
    ) -> Result<(NewToken, TokenRecord)> {
        let now = now_millis();
        let asked = parse_expiry(lifetime.ttl_minutes, lifetime.expires.as_deref(), now)?;
        let wanted = TokenSpec {
            display_name: Some(display_name),
            expires_at: asked.or_else(|| implicit_expiry(&self.config.tokens, now)),
            ..TokenSpec::default()
        };
        self.mint_for(actor, roles, org, owner, wanted, now).await
    }

    /// A new token for `owner`, who holds `roles`, made by `actor`: `wanted` within those roles,
    /// narrowed by the caller's token ([`Lifecycle::spec`]).
    async fn mint_for(
        &self,
        actor: &Actor,
        roles: RoleSet,
        org: &str,
        owner: Owner,
        wanted: TokenSpec,
        now: Millis,
    ) -> Result<(NewToken, TokenRecord)> {
        let owner_actor = Actor { roles, ..actor.clone() };
        let holder = match owner {
            Owner::User(_) => Holder::User,
            Owner::Service(_) => Holder::Service,
        };
        let spec = self.spec(&owner_actor, holder, wanted, Making::New, now)?;
        self.mint(org, owner, spec).await
    }

    /// The answer to a stored new token. Infallible: the token exists now, and an error would
    /// lose its secret.
    async fn issued(&self, new: NewToken, record: &TokenRecord) -> IssuedToken {
        // Never used yet: no last use to read.
        IssuedToken { token: new.token, details: self.view_with(record, None).await }
    }

    /// Issues a personal access token to the calling user, or with `user` to that user, or with
    /// `service` a token to that service.
    pub async fn issue_pat(&self, actor: &Actor, mut req: IssueRequest) -> Result<IssuedToken> {
        match (req.service.take(), req.user.take()) {
            (Some(_), Some(_)) => {
                return Err(LifecycleError::Invalid(
                    "give service or user (--service, --user), not both".into(),
                ))
            }
            (Some(name), None) => return self.issue_service_token(actor, &name, req).await,
            (None, Some(email)) => return self.issue_user_token(actor, &email, req).await,
            (None, None) => {}
        }
        let user_id = actor
            .user_id
            .clone()
            .ok_or_else(|| LifecycleError::Forbidden("only users have personal access tokens".into()))?;
        let now = now_millis();
        let spec = self.spec(actor, Holder::Caller, self.wanted(req, now)?, Making::New, now)?;
        let owner = Owner::User(user_id);
        let room = self.room_for_a_token(&owner, now).await?;
        let (new, record) = self.mint(&actor.org, owner, spec).await?;
        self.store_issued(actor, &record, serde_json::Value::Null, None, room)
            .await
            .map_err(keeping(&new))?;
        Ok(self.issued(new, &record).await)
    }

    /// Whether `owner` may be issued another token: at most `tokens.max_per_owner` working ones
    /// (a rotation, which ends the one it replaces, is not counted against it). Answers how many
    /// ids the owner's token set may hold when the new one is stored: each id added meanwhile by
    /// another issue counts as a working token, so issues at the same moment cannot pass the cap
    /// together, and far from it they do not refuse each other.
    async fn room_for_a_token(&self, owner: &Owner, now: Millis) -> Result<usize> {
        let max = self.config.tokens.max_per_owner;
        let held = self.store.owner_tokens(owner).await?;
        let working = held.tokens.iter().filter(|t| !t.is_revoked(now) && !t.is_expired(now)).count();
        if working >= max {
            return Err(LifecycleError::Conflict(format!(
                "{working} working tokens already, the most tokens.max_per_owner allows: revoke one first"
            )));
        }
        Ok(held.members + (max - working - 1))
    }

    /// What `req` asks a new token to be.
    fn wanted(&self, req: IssueRequest, now: Millis) -> Result<TokenSpec> {
        Ok(TokenSpec {
            expires_at: parse_expiry(req.ttl_minutes, req.expires.as_deref(), now)?,
            scope: self.requested_scope(req.scope, req.permissions)?,
            display_name: req.display_name,
            environments: req.environments,
        })
    }

    /// Issues a personal access token to another user of the caller's org who has none left (an
    /// org admin who is a user): the way back in for someone with no token to issue one with.
    /// Within the user's roles, narrowed by the caller's token, handing on no permission the
    /// caller could not (`check_grantable`). A user who still has a working token issues their
    /// own: an admin holding a second, silent credential of someone who uses theirs would act as
    /// them unnoticed (as rotating another's token would).
    async fn issue_user_token(&self, actor: &Actor, email: &str, req: IssueRequest) -> Result<IssuedToken> {
        actor.require_admin(self.config)?;
        if actor.user_id.is_none() {
            return Err(LifecycleError::Forbidden(USER_TOKENS_BY_USERS.into()));
        }
        let user = self.user_in(actor, &actor.org, email).await?;
        if user.status != UserStatus::Active {
            return Err(LifecycleError::Conflict(format!(
                "user {} is suspended; reactivate them first",
                shown(&user.email)
            )));
        }
        let owner = Owner::User(user.id.clone());
        let held = self.store.owner_tokens(&owner).await?;
        let now = now_millis();
        let live: Vec<String> = held
            .tokens
            .iter()
            .filter(|t| matches!(token_status(t, now), "active" | "deprecated"))
            .map(|t| t.id.to_string())
            .collect();
        if !live.is_empty() {
            return Err(LifecycleError::Conflict(format!(
                "user {} still has a working token ({}): they issue another themselves; an admin \
                 issues one only to a user who has none left (revoke theirs first if it is lost)",
                shown(&user.email),
                live.join(", ")
            )));
        }
        let roles = user_roles(&user);
        self.check_grantable(actor, None, &roles)?;
        let label = format!("user:{}", user.email);
        let guard = (Acting::User(user), Some(held.members));
        self.issue_for(actor, roles, owner, label, guard, req).await
    }

    /// Issues a token to `owner`, who holds `roles`, made by `actor` as `req` asks: within those
    /// roles, narrowed by the caller's token, audited as issued for `label`, and stored only while
    /// the owner's record (and, if counted, token set) is as `guard` read it.
    async fn issue_for(
        &self,
        actor: &Actor,
        roles: RoleSet,
        owner: Owner,
        label: String,
        guard: (Acting, Option<usize>),
        req: IssueRequest,
    ) -> Result<IssuedToken> {
        let now = now_millis();
        let room = self.room_for_a_token(&owner, now).await?;
        let (new, record) =
            self.mint_for(actor, roles, &actor.org, owner, self.wanted(req, now)?, now).await?;
        let details = serde_json::json!({ "for": label });
        self.store_issued(actor, &record, details, Some(guard), room).await.map_err(keeping(&new))?;
        Ok(self.issued(new, &record).await)
    }

    /// Issues a token to a service of the caller's org (its admins and its creator), within the
    /// service's roles and the caller's own narrowing, as a rotation of one of its tokens is.
    async fn issue_service_token(&self, actor: &Actor, name: &str, req: IssueRequest) -> Result<IssuedToken> {
        let s = self.managed_service_in(actor, &actor.org, name).await?;
        let roles = self.may_hand_out(actor, &s)?;
        let (owner, label) = (Owner::Service(s.id.clone()), format!("service:{}", s.name));
        self.issue_for(actor, roles, owner, label, (Acting::Service(s), None), req).await
    }

    /// The service's roles, if `actor` may be handed a token that acts as it: whoever holds one
    /// acts as the service, so only someone who manages it and could give it its roles now (a
    /// creator since demoted cannot) gets one, by issue or by rotation.
    fn may_hand_out(&self, actor: &Actor, s: &Service) -> Result<RoleSet> {
        self.may_manage_service(actor, s)?;
        let roles = service_roles(s);
        self.check_service_roles(actor, Some(&roles), s)?;
        self.check_grantable(actor, None, &roles)?;
        Ok(roles)
    }

    /// A token the caller may see: their own, one of a service they manage (as its creator: they
    /// issue its tokens, so they revoke and rotate them too), or any in their org for an admin.
    async fn visible_token(&self, actor: &Actor, id: &str) -> Result<Stored<TokenRecord>> {
        let not_found = || match id.len() > crate::token::ID_LEN {
            // Perhaps a whole token: never repeat a secret.
            true => LifecycleError::NotFound(format!(
                "token not found; give its {}-character id",
                crate::token::ID_LEN
            )),
            false => LifecycleError::NotFound(format!("token {id} not found")),
        };
        let id = TokenId::parse(id).ok_or_else(not_found)?;
        let t = self.store.get_token(&id).await?.ok_or_else(not_found)?;
        if t.org != actor.org {
            return Err(not_found());
        }
        // A user's tokens are theirs; a service's own token is its own too (it revokes or rotates
        // itself).
        let own = matches!(&t.owner, Owner::User(u) if Some(u) == actor.user_id.as_ref())
            || actor.token_id.as_ref() == Some(&t.id);
        if !own && actor.require_admin(self.config).is_err() && !self.manages_owner(actor, &t.owner).await? {
            return Err(not_found());
        }
        Ok(t)
    }

    /// Whether `owner` is a service of the caller's org that the caller manages
    /// ([`Lifecycle::may_manage_service`]).
    async fn manages_owner(&self, actor: &Actor, owner: &Owner) -> Result<bool> {
        let Owner::Service(id) = owner else { return Ok(false) };
        let Some(s) = self.store.get_service(id).await? else { return Ok(false) };
        Ok(s.org == actor.org && self.may_manage_service(actor, &s).is_ok())
    }

    /// Lists tokens: the caller's own (a service's token: those of its service's tokens it sees,
    /// as `get_token`: itself, or all of them for an admin service), a given user's or service's
    /// (admins), or a service's its creator manages; `all` adds inactive ones.
    pub async fn list_tokens(&self, actor: &Actor, all: bool, owner: Option<&str>) -> Result<Vec<TokenView>> {
        let mut only = None;
        let owner = match owner {
            None => match (&actor.user_id, &actor.service_id, &actor.token_id) {
                (Some(user), _, _) => Owner::User(user.clone()),
                (None, Some(service), Some(id)) => {
                    // An org admin's (an admin service's) sees every one, as `get_token` does.
                    if actor.require_admin(self.config).is_err() {
                        only = Some(id);
                    }
                    Owner::Service(service.clone())
                }
                _ => {
                    return Err(LifecycleError::Invalid(
                        "this caller has no tokens of its own; an org admin lists a user's or a service's with --owner <name>"
                            .into(),
                    ))
                }
            },
            Some(name) => match actor.require_admin(self.config) {
                Ok(()) => self.owner_by_name(&actor.org, name).await?,
                // Anyone else names only a service they manage; whether a user or another service
                // has that name is not told.
                Err(not_admin) => {
                    let service = self.store.find_service_by_name(&actor.org, name).await?;
                    match service.filter(|s| self.may_manage_service(actor, s).is_ok()) {
                        Some(s) => Owner::Service(s.into_inner().id),
                        None => return Err(not_admin),
                    }
                }
            },
        };
        let now = now_millis();
        let mut tokens = self.store.list_owner_tokens(&owner).await?;
        tokens.retain(|t| only.is_none_or(|id| *id == t.id));
        tokens.retain(|t| all || matches!(token_status(t, now), "active" | "deprecated"));
        tokens.sort_by_key(|t| t.created_at);
        // One owner, and the last uses read together: a read per token made listing a service
        // rotated for years take minutes.
        let label = self.owner_label(&owner).await;
        let ids: Vec<&TokenId> = tokens.iter().map(|t| &t.id).collect();
        let last = self.store.last_uses(&ids).await?;
        Ok(tokens.iter().zip(last).map(|(t, last)| Self::view_of(t, last, label.clone())).collect())
    }

    async fn owner_by_name(&self, org: &str, name: &str) -> Result<Owner> {
        if let Some(u) = self.store.find_user_by_email(org, name).await? {
            return Ok(Owner::User(u.into_inner().id));
        }
        if let Some(s) = self.store.find_service_by_name(org, name).await? {
            return Ok(Owner::Service(s.into_inner().id));
        }
        Err(LifecycleError::NotFound(format!("no user or service {:?} in org {org:?}", shown(name))))
    }

    /// One token's details.
    pub async fn get_token(&self, actor: &Actor, id: &str) -> Result<TokenView> {
        let t = self.visible_token(actor, id).await?;
        self.view(&t).await
    }

    /// Revokes a token by id, or the caller's token with a display name (refused when ambiguous).
    pub async fn revoke(
        &self,
        actor: &Actor,
        id: Option<&str>,
        display_name: Option<&str>,
        reason: Option<String>,
    ) -> Result<TokenView> {
        let reason = check_reason(reason)?;
        let before = match (id, display_name) {
            (Some(id), None) => self.visible_token(actor, id).await?,
            (None, Some(name)) => {
                // As it was kept at issue: trimmed.
                let name = &display_name_of(name)
                    .ok_or_else(|| LifecycleError::Invalid("the display name is empty".into()))?;
                let now = now_millis();
                let mine = self.list_owned(actor).await?;
                let matches: Vec<Stored<TokenRecord>> = mine
                    .into_iter()
                    .filter(|t| {
                        t.display_name.as_ref() == Some(name)
                            && matches!(token_status(t, now), "active" | "deprecated")
                    })
                    .collect();
                match matches.len() {
                    0 => return Err(LifecycleError::NotFound(format!("no token named {:?}", shown(name)))),
                    1 => matches
                        .into_iter()
                        .next()
                        .ok_or_else(|| LifecycleError::NotFound(name.to_string()))?,
                    _ => {
                        let ids: Vec<String> = matches.iter().map(|t| t.id.to_string()).collect();
                        return Err(LifecycleError::Conflict(format!(
                            "{} tokens are named {name:?}: {}; revoke one by id",
                            ids.len(),
                            ids.join(", ")
                        )));
                    }
                }
            }
            _ => return Err(LifecycleError::Invalid("give a token id or --display-name".into())),
        };
        self.within_reach(actor, &before)?;
        let mut t = (*before).clone();
        if t.is_revoked(now_millis()) {
            return Err(LifecycleError::Conflict(format!("token {} is already revoked", t.id)));
        }
        let now = now_millis();
        t.revoked = Some(Box::new(Revocation {
            at: now,
            decided_at: Some(now),
            reason: reason.clone(),
            by: Some(actor.subject.clone()),
        }));
        let mut audit = actor.audit("token.revoke", t.id.to_string());
        audit.token_id = Some(t.id.to_string());
        audit.reason = reason;
        self.store.update_token(&before, &t, Some(&audit), self.acting(actor).await?.as_ref()).await?;
        Ok(self.view_after_change(&t).await)
    }

    /// Whether the caller's token may revoke or rotate `t`: an org admin's may, and a token
    /// itself; otherwise (another of its owner's tokens) only one reaching no further, with no
    /// permission the caller's scope leaves out and no environment outside the caller's. A token
    /// narrowed for one job (a read-only dashboard's, a staging bot's) does not revoke its owner's
    /// wider tokens, as it could not have issued them.
    fn within_reach(&self, actor: &Actor, t: &TokenRecord) -> Result<()> {
        if actor.require_admin(self.config).is_ok() || actor.token_id.as_ref() == Some(&t.id) {
            return Ok(());
        }
        let policy = &self.config.policy;
        let role = policy.role_permissions(actor.roles.highest());
        let reaches = t.scope.as_ref().map_or(role, |s| policy.set_of(&s.permissions).intersect(role));
        let held = actor.permissions_for(self.config, actor.roles.highest());
        let envs_within = match (&actor.environments, &t.environments) {
            (None, _) => true,
            (Some(mine), Some(theirs)) => theirs.iter().all(|e| mine.contains(e)),
            (Some(_), None) => false,
        };
        match held.contains(reaches) && envs_within {
            true => Ok(()),
            false => Err(LifecycleError::Forbidden(format!(
                "token {} reaches further than the token you called with (its permissions or \
                 environments): use a token that holds as much",
                t.id
            ))),
        }
    }

    /// The tokens a caller may name by display name: a user's own; for a service, the token it
    /// calls with (its only one it may revoke, as by id).
    async fn list_owned(&self, actor: &Actor) -> Result<Vec<Stored<TokenRecord>>> {
        match (&actor.user_id, &actor.token_id) {
            (Some(id), _) => Ok(self.store.list_owner_tokens(&Owner::User(id.clone())).await?),
            (None, Some(id)) => Ok(self.store.get_token(id).await?.into_iter().collect()),
            (None, None) => Ok(vec![]),
        }
    }

    /// Replaces a token with a new one of the same settings (overridable); the old one stops now or
    /// at the end of the grace period.
    pub async fn rotate(&self, actor: &Actor, id: &str, req: RotateRequest) -> Result<IssuedToken> {
        let before = self.visible_token(actor, id).await?;
        // A rotation revokes the old token (at once without a grace): bounded as revoking is.
        self.within_reach(actor, &before)?;
        let mut old = (*before).clone();
        // The new secret is shown to whoever rotates: for a personal token only its owner, or an
        // admin would silently take over the credential its owner uses. An admin revokes it, or
        // issues the user a token of its own (`IssueRequest::user`), audited as that.
        if matches!(&old.owner, Owner::User(u) if Some(u) != actor.user_id.as_ref()) {
            return Err(LifecycleError::Forbidden(format!(
                "only its owner can rotate personal access token {}; an admin can revoke it",
                old.id
            )));
        }
        let now = now_millis();
        if old.revoked.is_some() || old.is_expired(now) {
            return Err(LifecycleError::Conflict(format!("token {} is not active; issue a new one", old.id)));
        }
        let grace = req.grace_seconds.unwrap_or(0);
        if !(0..=7 * 24 * 3600).contains(&grace) {
            return Err(LifecycleError::Invalid(format!(
                "grace_seconds must be between 0 and 604800, got {grace}"
            )));
        }
        let expires_at = match (req.ttl_minutes, req.expires.as_deref()) {
            (None, None) => old.expires_at,
            (ttl, expires) => parse_expiry(ttl, expires, now)?,
        };
        // The old token's scope as it was resolved then (a preset redefined since does not
        // widen it), unless a new one is asked for.
        let scope_kept = req.scope.is_none() && req.permissions.is_none();
        let scope = match scope_kept {
            true => old.scope.as_deref().cloned(),
            false => self.requested_scope(req.scope, req.permissions)?,
        };
        // A service token is rotated on behalf of its service, within the service's rights; the
        // service read for that is the one the new token is stored against (a role change
        // meanwhile refuses the rotation, as it does an issue).
        let mut owner_guard = None;
        let owner_actor = match &old.owner {
            Owner::Service(sid) => {
                let s = self
                    .store
                    .get_service(sid)
                    .await?
                    .ok_or_else(|| LifecycleError::NotFound("service gone".into()))?;
                // The new secret goes to the caller: as for an issue, unless the service rotates
                // its own token.
                if actor.token_id.as_ref() != Some(&old.id) {
                    self.may_hand_out(actor, &s)?;
                }
                // The caller's own narrowing (scope, environments) still applies.
                let owner_actor = Actor { roles: service_roles(&s), ..actor.clone() };
                owner_guard = Some(Acting::Service(s));
                owner_actor
            }
            Owner::User(_) => actor.clone(),
        };
        let envs_kept = req.environments.is_none();
        let wanted = TokenSpec {
            display_name: old.display_name.clone(),
            scope,
            environments: req.environments.or_else(|| old.environments.clone()),
            expires_at,
        };
        let holder = match &old.owner {
            Owner::Service(sid) if actor.service_id.as_ref() != Some(sid) => Holder::Service,
            _ => Holder::Caller,
        };
        let spec =
            self.spec(&owner_actor, holder, wanted, Making::Rotation { scope_kept, envs_kept }, now)?;
        let (new, record) = self.mint(&old.org, old.owner.clone(), spec).await?;
        old.revoked = Some(Box::new(Revocation {
            at: now + grace * 1000,
            decided_at: Some(now),
            reason: Some(format!("{}{}", crate::store::ROTATED_TO, record.id)),
            by: Some(actor.subject.clone()),
        }));
        old.rotated_to = Some(record.id.clone());
        let mut audit = actor.audit("token.rotate", old.id.to_string());
        audit.token_id = Some(old.id.to_string());
        audit.details = serde_json::json!({ "new_token_id": record.id.to_string(), "grace_seconds": grace });
        let issued = issue_audit(actor, &record, serde_json::json!({ "rotated_from": old.id.to_string() }));
        let acting = self.acting(actor).await?;
        self.store
            .rotate_token(
                &before,
                &old,
                &record,
                [Some(&audit), Some(&issued)],
                acting.as_ref(),
                owner_guard.as_ref(),
            )
            .await
            .map_err(|e| keeping(&new)(e.into()))?;
        Ok(self.issued(new, &record).await)
    }

    /// Every project given a role it did not have (`before`) is one the config defines. Roles kept
    /// on a project since removed from the config are not checked again: a demotion or another
    /// project's change must not wait for that one to be cleaned up.
    fn check_roles(
        &self,
        org: &str,
        project_roles: &BTreeMap<String, Role>,
        before: Option<&BTreeMap<String, Role>>,
    ) -> Result<()> {
        let projects = self.config.orgs.get(org).map(|o| &o.projects);
        let given = project_roles.iter().filter(|(p, r)| before.and_then(|b| b.get(*p)) != Some(*r));
        for (project, _) in given {
            if !projects.is_some_and(|p| p.contains_key(project)) {
                return Err(LifecycleError::Invalid(format!(
                    "project {project:?} is not defined in org {org:?}"
                )));
            }
        }
        Ok(())
    }

    /// Adds a user (admins only), and with `first_token` their first token (issued by the admin
    /// who added them, who must be a user: a service is issued no user's PAT, this way or any
    /// other; within the configured limits, shown once), in one change.
    #[allow(clippy::too_many_arguments)]
    pub async fn add_user(
        &self,
        actor: &Actor,
        org: &str,
        email: &str,
        org_role: Role,
        project_roles: BTreeMap<String, Role>,
        attributes: Attributes,
        first_token: Option<Lifetime>,
    ) -> Result<(User, Option<IssuedToken>)> {
        actor.require_org(org)?;
        actor.require_admin(self.config)?;
        if first_token.is_some() && actor.user_id.is_none() {
            return Err(LifecycleError::Forbidden(USER_TOKENS_BY_USERS.into()));
        }
        check_new_email(email)?;
        check_attributes(&attributes)?;
        self.check_roles(org, &project_roles, None)?;
        self.check_grantable(actor, None, &RoleSet { org: org_role, projects: project_roles.clone() })?;
        let user = new_user(org, email, org_role, project_roles, attributes);
        let first = match first_token {
            Some(lifetime) => {
                let roles = user_roles(&user);
                let owner = Owner::User(user.id.clone());
                Some(self.first_token(actor, org, owner, roles, "initial".into(), &lifetime).await?)
            }
            None => None,
        };
        let issued = first.as_ref().map(|(_, record)| {
            issue_audit(actor, record, serde_json::json!({ "for": format!("user:{}", user.email) }))
        });
        let mut audit = actor.audit("user.add", format!("user:{}", user.email));
        // The id the user's own actions are audited under (`user:<id>`), beside their email.
        audit.details =
            serde_json::json!({ "id": user.id, "org_role": org_role, "project_roles": user.project_roles });
        let with = first.as_ref().map(|(_, record)| FirstToken { token: record, audit: issued.as_ref() });
        self.store
            .create_user(&user, Some(&audit), with, self.acting(actor).await?.as_ref())
            .await
            .map_err(|e| conflict(e, || format!("user {email} already exists in org {org}")))
            .map_err(|e| match &first {
                Some((new, _)) => keeping(new)(e),
                None => e,
            })?;
        let first = match first {
            Some((new, record)) => Some(self.issued(new, &record).await),
            None => None,
        };
        Ok((user, first))
    }

    async fn user_in(&self, actor: &Actor, org: &str, email: &str) -> Result<Stored<User>> {
        actor.require_org(org)?;
        self.store
            .find_user_by_email(org, email)
            .await?
            .ok_or_else(|| LifecycleError::NotFound(format!("no user {} in org {org}", shown(email))))
    }

    /// The users of an org (admins only).
    pub async fn list_users(&self, actor: &Actor, org: &str) -> Result<Vec<User>> {
        actor.require_org(org)?;
        actor.require_admin(self.config)?;
        let mut users: Vec<User> =
            self.store.list_users(org).await?.into_iter().map(Stored::into_inner).collect();
        users.sort_by(|a, b| a.email.cmp(&b.email));
        Ok(users)
    }

    /// One user (admins, or the user themself). A non-admin asking for anyone else is refused the
    /// same way whether that user exists or not.
    pub async fn show_user(&self, actor: &Actor, org: &str, email: &str) -> Result<User> {
        actor.require_org(org)?;
        let user = self.store.find_user_by_email(org, email).await?;
        match user {
            Some(u) if actor.user_id.as_deref() == Some(u.id.as_str()) => Ok(u.into_inner()),
            _ if actor.require_admin(self.config).is_err() => {
                Err(LifecycleError::Forbidden("only org admins see other users".into()))
            }
            Some(u) => Ok(u.into_inner()),
            None => Err(LifecycleError::NotFound(format!("no user {} in org {org}", shown(email)))),
        }
    }

    /// The acting user's or service's record as stored now, while it still has the status and
    /// the roles the actor was authenticated with; the change is then made only while that record
    /// is unchanged (see [`Acting`]). `None` for `bootstrap`, which has no actor record.
    async fn acting(&self, actor: &Actor) -> Result<Option<Acting>> {
        let Some(acting) = self.acting_owner(actor).await? else { return Ok(None) };
        let Some(id) = &actor.token_id else { return Ok(Some(acting)) };
        // The calling token too: one revoked while the call was decided changes nothing. And one
        // in its rotation's grace changes nothing at all: the grace keeps clients working while
        // they move to the new token, it is no licence to manage tokens (a leaked old token could
        // otherwise revoke or rotate away its own replacement).
        let now = now_millis();
        match self.store.get_token(id).await? {
            Some(token) if token.revoked.is_some() && !token.is_revoked(now) => {
                Err(LifecycleError::Forbidden(
                    "the token you called with was rotated: it still reads, but changes need its replacement"
                        .into(),
                ))
            }
            Some(token) if !token.is_revoked(now) && !token.is_expired(now) => {
                Ok(Some(Acting::Through(Box::new(acting), token)))
            }
            _ => Err(LifecycleError::Forbidden("the token you called with was revoked meanwhile".into())),
        }
    }

    /// The acting user or service, as now, if unchanged since the call was authenticated.
    async fn acting_owner(&self, actor: &Actor) -> Result<Option<Acting>> {
        let changed =
            || LifecycleError::Forbidden("your own role or status changed meanwhile; try again".into());
        if let Some(id) = &actor.user_id {
            return match self.store.get_user(id).await? {
                Some(me)
                    if me.status == UserStatus::Active
                        && me.org_role == actor.roles.org
                        && me.project_roles == actor.roles.projects =>
                {
                    Ok(Some(Acting::User(me)))
                }
                _ => Err(changed()),
            };
        }
        if let Some(id) = &actor.service_id {
            return match self.store.get_service(id).await? {
                Some(me)
                    if me.org_role.unwrap_or(Role::Guest) == actor.roles.org
                        && me.project_roles == actor.roles.projects =>
                {
                    Ok(Some(Acting::Service(me)))
                }
                _ => Err(changed()),
            };
        }
        Ok(None)
    }

    /// Changes a user's org role and/or one project role (admins only).
    pub async fn set_user_role(
        &self,
        actor: &Actor,
        org: &str,
        email: &str,
        change: RoleChange,
    ) -> Result<User> {
        actor.require_org(org)?;
        actor.require_admin(self.config)?;
        let before = self.user_in(actor, org, email).await?;
        let mut user = (*before).clone();
        let project_roles = change.apply(&mut user.org_role, &mut user.project_roles)?;
        // As with suspending or removing oneself: the acting admin stays one, so an org always
        // keeps an admin (only admins change roles).
        if actor.user_id.as_deref() == Some(user.id.as_str()) && user.org_role < before.org_role {
            return Err(LifecycleError::Forbidden(
                "you cannot lower your own org role; another org admin can".into(),
            ));
        }
        self.check_roles(org, &project_roles, Some(&before.project_roles))?;
        let (had, has) = (user_roles(&before), user_roles(&user));
        self.check_grantable(actor, Some(&had), &has)?;
        let acting = self.acting(actor).await?;
        // Already so: nothing to write or audit (the caller's right to set it was checked).
        if user.org_role == before.org_role && user.project_roles == before.project_roles {
            return Ok(user);
        }
        let mut audit = actor.audit("user.set_role", format!("user:{}", user.email));
        audit.details = serde_json::to_value(&change).unwrap_or_default();
        self.store.update_user(&before, &user, Some(&audit), acting.as_ref()).await?;
        Ok(user)
    }

    /// Suspends or reactivates a user (admins only). Suspension blocks every PAT of the user at once.
    pub async fn set_user_status(
        &self,
        actor: &Actor,
        org: &str,
        email: &str,
        status: UserStatus,
        reason: Option<String>,
    ) -> Result<User> {
        let reason = check_reason(reason)?;
        actor.require_org(org)?;
        actor.require_admin(self.config)?;
        let before = self.user_in(actor, org, email).await?;
        let mut user = (*before).clone();
        if actor.user_id.as_deref() == Some(user.id.as_str()) && status == UserStatus::Suspended {
            return Err(LifecycleError::Forbidden(
                "you cannot suspend yourself; another org admin can".into(),
            ));
        }
        if user.status == status {
            let now = if status == UserStatus::Suspended { "suspended" } else { "active" };
            return Err(LifecycleError::Conflict(format!("user {email} is already {now}")));
        }
        user.status = status;
        let action = if status == UserStatus::Suspended { "user.suspend" } else { "user.reactivate" };
        let mut audit = actor.audit(action, format!("user:{}", user.email));
        audit.reason = reason;
        self.store.update_user(&before, &user, Some(&audit), self.acting(actor).await?.as_ref()).await?;
        Ok(user)
    }

    /// Removes a user and revokes their PATs (admins only). Services they created stay.
    pub async fn remove_user(
        &self,
        actor: &Actor,
        org: &str,
        email: &str,
        reason: Option<String>,
    ) -> Result<(String, usize)> {
        let reason = check_reason(reason)?;
        actor.require_org(org)?;
        actor.require_admin(self.config)?;
        let user = self.user_in(actor, org, email).await?;
        if actor.user_id.as_deref() == Some(user.id.as_str()) {
            return Err(LifecycleError::Forbidden(
                "you cannot remove yourself; another org admin can".into(),
            ));
        }
        let tokens = self.revoked_tokens_of(&Owner::User(user.id.clone()), actor, "owner removed").await?;
        let mut audit = actor.audit("user.remove", format!("user:{}", user.email));
        audit.reason = reason;
        audit.details = serde_json::json!({ "id": user.id, "revoked_tokens": revoked_ids(&tokens) });
        self.store.delete_user(&user, &tokens, Some(&audit), self.acting(actor).await?.as_ref()).await?;
        Ok((user.email.clone(), tokens.tokens.len()))
    }

    /// An owner's tokens not yet revoked, revoked now by `actor`: written with the owner's removal,
    /// which fails (`Changed`) if a token of the owner is added or changed before it lands.
    async fn revoked_tokens_of(&self, owner: &Owner, actor: &Actor, reason: &str) -> Result<Revoking> {
        let now = now_millis();
        let read = self.store.owner_tokens(owner).await?;
        let tokens = read
            .tokens
            .into_iter()
            // An expired token needs no revocation (and a long-lived owner may have many).
            .filter(|t| !t.is_revoked(now) && !t.is_expired(now))
            .map(|before| {
                let mut after = TokenRecord::clone(&before);
                after.revoked = Some(Box::new(Revocation {
                    at: now,
                    decided_at: Some(now),
                    reason: Some(reason.into()),
                    by: Some(actor.subject.clone()),
                }));
                (before, after)
            })
            .collect();
        Ok(Revoking { members: read.members, tokens })
    }

    /// Org admins manage every service; its creator, who is no admin, while their token may write
    /// everywhere and the service holds no role above theirs now (a creator since demoted does
    /// not delete, rename, re-role or revoke the org's admin automation, nor take its name).
    fn may_manage_service(&self, actor: &Actor, s: &Service) -> Result<()> {
        if actor.require_admin(self.config).is_ok() {
            return Ok(());
        }
        match (&s.created_by, &actor.user_id) {
            (Some(creator), Some(me))
                if creator == me && actor.may(self.config, "write") && actor.environments.is_none() =>
            {
                match role_above(s, &actor.roles) {
                    Some(_) => Err(LifecycleError::Forbidden(
                        "the service holds a role above yours now: only org admins manage it".into(),
                    )),
                    None => Ok(()),
                }
            }
            _ => Err(LifecycleError::Forbidden("only org admins and the service's creator manage it".into())),
        }
    }

    /// Roles handed on (a new or changed user or service: `before` to `after`) may not add a
    /// permission the caller could not use: for an org admin, none its token's scope leaves out of
    /// its role (an admin whose token is scoped `read-write` hands on no role with `admin`; an
    /// unscoped admin hands on any role, whatever the roles' permissions); for anyone else (an
    /// editor creating a service), none outside its own permissions as its token narrows them.
    /// Only what a change adds counts, at the org and on each project (a project role removed
    /// can add the org role's permissions there); where roles nest, lowering adds nothing.
    fn check_grantable(&self, actor: &Actor, before: Option<&RoleSet>, after: &RoleSet) -> Result<()> {
        use crate::policy::PermSet;
        let policy = &self.config.policy;
        let admin = actor.require_admin(self.config).is_ok();
        let check = |held: Role, had: Option<Role>, given: Role, place: String| {
            let usable = actor.permissions_for(self.config, held);
            let had = had.map_or(PermSet::EMPTY, |r| policy.role_permissions(r));
            let added = policy.role_permissions(given).minus(had);
            let allowed = match admin {
                true => added.intersect(policy.role_permissions(held).minus(usable)).is_empty(),
                false => usable.contains(added),
            };
            match allowed {
                true => Ok(()),
                false => Err(LifecycleError::Forbidden(format!(
                    "you cannot hand on the {given} role{place}: it has permissions your token cannot use"
                ))),
            }
        };
        check(actor.roles.org, before.map(|b| b.org), after.org, String::new())?;
        // Every project whose roles differ from the org's, the caller's own included.
        let projects = after
            .projects
            .keys()
            .chain(before.into_iter().flat_map(|b| b.projects.keys()))
            .chain(actor.roles.projects.keys());
        for project in projects {
            let had = before.map(|b| b.on(project));
            check(actor.roles.on(project), had, after.on(project), format!(" on project {project:?}"))?;
        }
        Ok(())
    }

    /// The roles a service may have: never above its creator's at creation, nor the actor's now.
    fn check_service_roles(&self, actor: &Actor, before: Option<&RoleSet>, s: &Service) -> Result<()> {
        self.check_roles(&s.org, &s.project_roles, before.map(|b| &b.projects))?;
        let caps = [(s.creator_roles.clone(), "its creator's"), (Some(actor.roles.clone()), "yours")];
        for (cap, whose) in caps.iter().filter_map(|(cap, whose)| Some((cap.as_ref()?, whose))) {
            if let Some((place, role, capped)) = role_above(s, cap) {
                return Err(LifecycleError::Forbidden(format!(
                    "a service's {place} ({role}) may not exceed {whose} ({capped})"
                )));
            }
        }
        // A creator who is no org admin holds the service's first token: where roles do not
        // nest, a lower role can still carry a permission the creator's lacked, which no role
        // change (an admin's later set-role included) may add. Only what a change adds counts.
        if let Some(creator) = s.creator_roles.as_ref().filter(|c| c.org < Role::Admin) {
            let policy = &self.config.policy;
            let roles = service_roles(s);
            let places = s
                .project_roles
                .keys()
                .chain(creator.projects.keys())
                .chain(before.into_iter().flat_map(|b| b.projects.keys()));
            let checks = std::iter::once(("its org role".to_string(), None))
                .chain(places.map(|p| (format!("its role on project {p:?}"), Some(p))));
            for (place, project) in checks {
                let at = |r: &RoleSet| project.map_or(r.org, |p| r.on(p));
                let had = before.map_or(crate::policy::PermSet::EMPTY, |b| policy.role_permissions(at(b)));
                let lacking = policy
                    .role_permissions(at(&roles))
                    .minus(had)
                    .minus(policy.role_permissions(at(creator)));
                if !lacking.is_empty() {
                    return Err(LifecycleError::Forbidden(format!(
                        "service {:?}: {place} ({}) would carry {}, which its creator did not hold when creating it \
                         (as {}); a service never gets more than that",
                        s.name,
                        at(&roles),
                        policy.names_of(lacking),
                        at(creator)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Creates a service and its first token. Users with at least the editor role may create one,
    /// with roles no higher than their own.
    pub async fn create_service(&self, actor: &Actor, req: CreateService) -> Result<(Service, IssuedToken)> {
        actor.require_org(&req.org)?;
        let creator = actor
            .user_id
            .clone()
            .ok_or_else(|| LifecycleError::Forbidden("services are created by users".into()))?;
        if actor.roles.org < Role::Editor {
            return Err(LifecycleError::Forbidden(
                "creating a service needs the editor role or higher".into(),
            ));
        }
        if !actor.may(self.config, "write") {
            return Err(LifecycleError::Forbidden(
                "creating a service needs a token that may `write`; this one's scope leaves it out".into(),
            ));
        }
        if !crate::config::is_name(&req.name) {
            return Err(LifecycleError::Invalid(format!(
                "{:?} is not a service name (letters, digits, '-', '_', '.' (not first), up to 64)",
                req.name
            )));
        }
        refuse_credential("the service name", &req.name)?;
        if req.org_role.is_none() && req.project_roles.is_empty() {
            return Err(LifecycleError::Invalid("give --org-role or --project with --project-role".into()));
        }
        check_attributes(&req.attributes)?;
        let service = Service {
            id: format!("s_{}", token::random_base62(12)),
            org: req.org.clone(),
            name: req.name.clone(),
            org_role: req.org_role,
            project_roles: req.project_roles,
            attributes: req.attributes,
            created_by: Some(creator),
            creator_roles: Some(actor.roles.clone()),
            created_at: now_millis(),
        };
        self.check_service_roles(actor, None, &service)?;
        self.check_grantable(actor, None, &service_roles(&service))?;
        let roles = service_roles(&service);
        let owner = Owner::Service(service.id.clone());
        let display_name = format!("{} token", service.name);
        let lifetime = Lifetime { ttl_minutes: req.ttl_minutes, expires: req.expires.clone() };
        let (new, record) =
            self.first_token(actor, &service.org, owner, roles, display_name, &lifetime).await?;
        // Dated once the secret is hashed, just before the write, as the other changes are: an
        // entry dated before a change written meanwhile would be listed out of order.
        let label = format!("service:{}", service.name);
        let mut audit = actor.audit("service.create", label.clone());
        audit.details =
            serde_json::json!({ "org_role": service.org_role, "project_roles": service.project_roles });
        let issued = issue_audit(actor, &record, serde_json::json!({ "for": label }));
        let (org, name) = (req.org.clone(), req.name.clone());
        self.store
            .create_service(
                &service,
                Some(&audit),
                Some(FirstToken { token: &record, audit: Some(&issued) }),
                self.acting(actor).await?.as_ref(),
            )
            .await
            .map_err(|e| conflict(e, || format!("service {name:?} already exists in org {org:?}")))
            .map_err(keeping(&new))?;
        let issued = self.issued(new, &record).await;
        Ok((service, issued))
    }

    /// A service to manage: only callers who could manage some service learn whether it exists.
    async fn managed_service_in(&self, actor: &Actor, org: &str, name: &str) -> Result<Stored<Service>> {
        actor.require_org(org)?;
        self.require_service_manager(actor, "only org admins and the service's creator manage it")?;
        self.service_in(actor, org, name).await
    }

    /// Whether the caller may see and manage services at all: an org admin, or a user whose token
    /// holds `write` (an editor, who creates services). Checked before any name is looked up, so
    /// that nobody else learns which services exist: not a viewer, not a token narrowed to `read`
    /// or `execute`, not a service that is no admin.
    fn require_service_manager(&self, actor: &Actor, refusal: &str) -> Result<()> {
        let user_who_writes = actor.user_id.is_some() && actor.may(self.config, "write");
        if actor.require_admin(self.config).is_err() && !user_who_writes {
            return Err(LifecycleError::Forbidden(refusal.into()));
        }
        Ok(())
    }

    async fn service_in(&self, actor: &Actor, org: &str, name: &str) -> Result<Stored<Service>> {
        actor.require_org(org)?;
        self.store
            .find_service_by_name(org, name)
            .await?
            .ok_or_else(|| LifecycleError::NotFound(format!("no service {:?} in org {org:?}", shown(name))))
    }

    /// The services of an org (org admins, and editors whose token holds `write`).
    pub async fn list_services(&self, actor: &Actor, org: &str) -> Result<Vec<Service>> {
        actor.require_org(org)?;
        if actor.roles.org < Role::Editor {
            return Err(LifecycleError::Forbidden(SERVICES_SEEN_BY.into()));
        }
        self.require_service_manager(actor, SERVICES_SEEN_BY)?;
        let mut services: Vec<Service> =
            self.store.list_services(org).await?.into_iter().map(Stored::into_inner).collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(services)
    }

    /// One service.
    pub async fn show_service(&self, actor: &Actor, org: &str, name: &str) -> Result<Service> {
        actor.require_org(org)?;
        if actor.roles.org < Role::Editor {
            return Err(LifecycleError::Forbidden(SERVICES_SEEN_BY.into()));
        }
        self.require_service_manager(actor, SERVICES_SEEN_BY)?;
        self.service_in(actor, org, name).await.map(Stored::into_inner)
    }

    /// Renames a service and/or replaces its attributes (`{}` clears them).
    pub async fn edit_service(
        &self,
        actor: &Actor,
        org: &str,
        name: &str,
        new_name: Option<String>,
        attributes: Option<Attributes>,
    ) -> Result<Service> {
        let before = self.managed_service_in(actor, org, name).await?;
        let mut s = (*before).clone();
        self.may_manage_service(actor, &s)?;
        if new_name.is_none() && attributes.is_none() {
            return Err(LifecycleError::Invalid("give --new-name and/or --attributes".into()));
        }
        if let Some(n) = &new_name {
            if !crate::config::is_name(n) {
                return Err(LifecycleError::Invalid(format!("{n:?} is not a service name")));
            }
            refuse_credential("the service name", n)?;
            s.name = n.clone();
        }
        if let Some(a) = attributes {
            check_attributes(&a)?;
            s.attributes = a;
        }
        // Already so: nothing to write, announce or audit (as a role set to what it is).
        if s.name == before.name && s.attributes == before.attributes {
            return Ok(s);
        }
        let mut audit = actor.audit("service.edit", format!("service:{name}"));
        audit.details = serde_json::json!({ "new_name": new_name, "attributes": s.attributes });
        let taken = s.name.clone();
        self.store
            .update_service(&before, &s, Some(&audit), self.acting(actor).await?.as_ref())
            .await
            .map_err(|e| conflict(e, || format!("service {taken:?} already exists in org {org:?}")))?;
        Ok(s)
    }

    /// Changes a service's org role, or sets or removes one project role.
    pub async fn set_service_role(
        &self,
        actor: &Actor,
        org: &str,
        name: &str,
        change: RoleChange,
    ) -> Result<Service> {
        let before = self.managed_service_in(actor, org, name).await?;
        let mut s = (*before).clone();
        self.may_manage_service(actor, &s)?;
        not_itself(actor, &s, "change its own role")?;
        let mut org_role = s.org_role.unwrap_or(Role::Guest);
        let had_org_role = s.org_role.is_some();
        change.apply(&mut org_role, &mut s.project_roles)?;
        s.org_role = if change.org_role.is_some() || had_org_role { Some(org_role) } else { None };
        self.check_service_roles(actor, Some(&service_roles(&before)), &s)?;
        self.check_grantable(actor, Some(&service_roles(&before)), &service_roles(&s))?;
        let acting = self.acting(actor).await?;
        // Already so: nothing to write or audit (the caller's right to set it was checked).
        if s.org_role == before.org_role && s.project_roles == before.project_roles {
            return Ok(s);
        }
        let mut audit = actor.audit("service.set_role", format!("service:{name}"));
        audit.details = serde_json::to_value(&change).unwrap_or_default();
        self.store.update_service(&before, &s, Some(&audit), acting.as_ref()).await?;
        Ok(s)
    }

    /// Deletes a service; its tokens (and anything they minted) stop at once. Answers how many
    /// working tokens it revoked.
    pub async fn delete_service(
        &self,
        actor: &Actor,
        org: &str,
        name: &str,
        reason: Option<String>,
    ) -> Result<usize> {
        let reason = check_reason(reason)?;
        let s = self.managed_service_in(actor, org, name).await?;
        self.may_manage_service(actor, &s)?;
        not_itself(actor, &s, "delete itself")?;
        let tokens = self.revoked_tokens_of(&Owner::Service(s.id.clone()), actor, "service deleted").await?;
        let mut audit = actor.audit("service.delete", format!("service:{name}"));
        audit.reason = reason;
        audit.details = serde_json::json!({ "revoked_tokens": revoked_ids(&tokens) });
        self.store.delete_service(&s, &tokens, Some(&audit), self.acting(actor).await?.as_ref()).await?;
        Ok(tokens.tokens.len())
    }

    /// The org's audit log, newest first, optionally for one token (admins only).
    pub async fn audit_log(
        &self,
        actor: &Actor,
        org: &str,
        token_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>> {
        actor.require_org(org)?;
        actor.require_admin(self.config)?;
        // A filter that matches nothing is a mistake, not an empty log (never repeating a whole
        // token given for an id). An ephemeral credential's id (its `X-Auth-Token-Id`) finds its
        // minting.
        let credential = token_id.filter(|id| ephemeral::is_credential_id(id));
        if let Some(id) = token_id.filter(|id| TokenId::parse(id).is_none() && credential.is_none()) {
            return Err(LifecycleError::Invalid(match id.len() > crate::token::ID_LEN {
                true if id.len() != ephemeral::CREDENTIAL_ID_LEN => format!(
                    "token_id: give a token's {}-character id (or a credential's {}-character one), never the token",
                    crate::token::ID_LEN,
                    ephemeral::CREDENTIAL_ID_LEN
                ),
                _ => format!("token_id {id:?} is not a token id (such as tgp_a1B2c3) or a credential's"),
            }));
        }
        // A token's entries: its own, what was done with it, and the removal of an owner that
        // revoked it with the rest; a credential's, its minting.
        let about = |e: &AuditEvent, id: &str| match credential {
            Some(_) => e.action == "credentials.issue" && e.details["id"] == id,
            None => {
                e.token_id.as_deref() == Some(id)
                    || e.by_token.as_deref() == Some(id)
                    || e.target == id
                    || e.details["revoked_tokens"].as_array().is_some_and(|ids| ids.iter().any(|t| t == id))
            }
        };
        let events =
            self.store.audit_matching(org, limit, |e| token_id.is_none_or(|id| about(e, id))).await?;
        Ok(events.into_iter().map(AuditEntry::from).collect())
    }
}

/// An audit log entry as the admin API shows it: its time in RFC 3339, as every other time the
/// API shows (a token's `created_at`, `last_used_at`), not the stored milliseconds.
pub type AuditEntry = AuditEvent<AuditTime>;

/// An audit entry's time as the API shows it (RFC 3339, UTC, to the second); read also from the
/// epoch milliseconds a gateway before this view sent (a CLI newer than the gateway still reads
/// its log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct AuditTime(pub String);

impl<'de> Deserialize<'de> for AuditTime {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum At {
            Text(String),
            Millis(Millis),
        }
        Ok(AuditTime(match At::deserialize(d)? {
            At::Text(text) => text,
            At::Millis(ms) => format_millis(ms),
        }))
    }
}

impl From<AuditEvent> for AuditEntry {
    fn from(e: AuditEvent) -> AuditEntry {
        AuditEvent {
            at: AuditTime(format_millis(e.at)),
            org: e.org,
            actor: e.actor,
            action: e.action,
            target: e.target,
            token_id: e.token_id,
            by_token: e.by_token,
            actor_email: e.actor_email,
            reason: e.reason,
            details: e.details,
        }
    }
}

/// A role change: the org role, one project's role set or removed, or both.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleChange {
    /// New org role.
    pub org_role: Option<Role>,
    /// The project whose role changes.
    pub project: Option<String>,
    /// Its new role.
    pub project_role: Option<Role>,
    /// Remove the project's role instead.
    #[serde(default)]
    pub remove: bool,
}

impl RoleChange {
    fn apply(
        &self,
        org_role: &mut Role,
        projects: &mut BTreeMap<String, Role>,
    ) -> Result<BTreeMap<String, Role>> {
        // The org role and one project's role may change together, as `user add` and `service
        // create` give both.
        let project =
            match (&self.project, self.project_role, self.remove) {
                (None, None, false) => None,
                (Some(p), Some(r), false) => Some((p, Some(r))),
                (Some(p), None, true) => Some((p, None)),
                (Some(_), Some(_), true) => return Err(LifecycleError::Invalid(
                    "give --project-role to set the project's role, or --remove to take it away, not both"
                        .into(),
                )),
                (Some(_), None, false) => {
                    return Err(LifecycleError::Invalid(
                        "with --project, give --project-role (the role there) or --remove".into(),
                    ))
                }
                (None, _, _) => {
                    return Err(LifecycleError::Invalid("--project-role and --remove need --project".into()))
                }
            };
        if self.org_role.is_none() && project.is_none() {
            return Err(LifecycleError::Invalid(
                "give --org-role, or --project with --project-role or --remove (or both)".into(),
            ));
        }
        match project {
            Some((p, Some(r))) => {
                projects.insert(p.clone(), r);
            }
            Some((p, None)) => {
                projects
                    .remove(p)
                    .ok_or_else(|| LifecycleError::NotFound(format!("no role on project {p:?} to remove")))?;
            }
            None => {}
        }
        if let Some(r) = self.org_role {
            *org_role = r;
        }
        Ok(projects.clone())
    }
}

/// A service to create.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateService {
    /// Org.
    #[serde(default)]
    pub org: String,
    /// Name, unique in the org.
    pub name: String,
    /// Org role.
    pub org_role: Option<Role>,
    /// Project roles.
    #[serde(default)]
    pub project_roles: BTreeMap<String, Role>,
    /// Attributes.
    #[serde(default)]
    pub attributes: Attributes,
    /// Its token's lifetime in minutes ([`Lifetime`]). Left out when not given, so that a gateway
    /// older than the field still takes the body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_minutes: Option<i64>,
    /// Its token's expiry as RFC 3339 ([`Lifetime`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

/// Refuses what cannot be an email address.
/// Longest attributes object, as compact JSON: it travels in every request's headers.
const MAX_ATTRIBUTES_BYTES: usize = 4096;

/// Deepest nesting of lists and objects inside an attribute value.
const MAX_ATTRIBUTES_DEPTH: usize = 16;

/// How many attributes a user, a service or an end user has at most: each scalar one travels in a
/// header of its own, beside the 13 identity headers and the client's, and upstream servers
/// commonly refuse a request of more than 100 headers (hyper's and gunicorn's bound).
const MAX_ATTRIBUTES: usize = 50;

/// Longest reason for a revocation, suspension or removal, in characters.
const MAX_REASON_CHARS: usize = 500;

/// A reason as kept, refused when longer than [`MAX_REASON_CHARS`]: it is kept twice (the record
/// and the audit entry) and read with every audit listing. A token or JWT in it (`leaked tgp_…`,
/// pasted while revoking it) is cut to what logs show of one, its id: a revocation in a hurry is
/// not refused for it, and no secret is kept.
fn check_reason(reason: Option<String>) -> Result<Option<String>> {
    match reason {
        Some(r) if r.chars().count() > MAX_REASON_CHARS => {
            Err(LifecycleError::Invalid(format!("a reason is at most {MAX_REASON_CHARS} characters")))
        }
        r => Ok(r.map(|r| crate::token::redacted_within(&r).into_owned())),
    }
}

/// Refused: a name or value given for keeping (a display name, a service's name, attributes)
/// that holds a whole token or a JWT. It would be stored, listed, audited and, for attributes
/// and service names, sent to upstreams: a secret kept where only ids belong.
pub(crate) fn refuse_credential(what: &str, text: &str) -> Result<()> {
    match crate::token::whole_credential_in(text) {
        Some(cut) => Err(LifecycleError::Invalid(format!(
            "{what} holds a credential ({cut}); give a token by its id, never the token itself"
        ))),
        None => Ok(()),
    }
}

/// A user's, a service's or an end user's attributes: at most [`MAX_ATTRIBUTES`] of them, in at
/// most [`MAX_ATTRIBUTES_BYTES`] of JSON.
fn check_attributes(attributes: &Attributes) -> Result<()> {
    // Measured as it travels: non-ASCII escaped (`\uXXXX`), as in `X-Auth-Attributes`.
    let json = crate::proxy::headers::ascii_json(attributes);
    refuse_credential("the attributes", &json)?;
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(LifecycleError::Invalid(format!(
            "at most {MAX_ATTRIBUTES} attributes ({} given): each scalar one travels in a header of its own, and \
             upstream servers commonly refuse a request of more than 100 headers; group them under \
             one key (an object) instead",
            attributes.len()
        )));
    }
    if json.len() > MAX_ATTRIBUTES_BYTES {
        return Err(LifecycleError::Invalid(format!(
            "attributes are at most {MAX_ATTRIBUTES_BYTES} bytes of JSON, non-ASCII characters \
             counted as their \\uXXXX escapes"
        )));
    }
    // Records nest them a level or two deeper (an audit entry's details), and JSON readers stop at
    // 128 levels: a deep value would make the records holding it unreadable.
    fn depth(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            serde_json::Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    if attributes.values().map(depth).max().unwrap_or(0) > MAX_ATTRIBUTES_DEPTH {
        return Err(LifecycleError::Invalid(format!(
            "attribute values nest at most {MAX_ATTRIBUTES_DEPTH} lists or objects deep"
        )));
    }
    // Each scalar one with an ASCII key travels in a header of its own (the others only in
    // `X-Auth-Attributes`): two keys the upstream would read as one are refused.
    let mut headers: HashMap<String, &str> = HashMap::new();
    let own_header = |(key, value): &(&String, &serde_json::Value)| {
        crate::proxy::headers::own_header_text(key, value).is_some()
    };
    for (key, _) in attributes.iter().filter(own_header) {
        let header: String = crate::proxy::headers::attr_suffix(key).collect();
        if let Some(first) = headers.get(&header) {
            return Err(LifecycleError::Invalid(format!(
                "attributes {first:?} and {key:?} would travel as one header (attr-{header}); keep one"
            )));
        }
        headers.insert(header, key);
    }
    Ok(())
}

/// `local@domain`, in printable ASCII (it travels in `X-Auth-Email`, a header), at most 254 bytes:
/// the shape every address the gateway takes has, stored users' included, however they were
/// added (end users' addresses for credentials, and the subject guard, take this much).
fn check_email(email: &str) -> Result<()> {
    let printable = email.bytes().all(|b| b.is_ascii_graphic());
    let shaped = matches!(email.split_once('@'), Some((local, domain))
        if !local.is_empty() && !domain.is_empty() && !domain.contains('@'));
    if !printable || !shaped || email.len() > 254 {
        return Err(not_an_email(email));
    }
    refuse_credential("the email address", email)
}

/// A new user's address, shaped as mail servers take it (RFC 5321/5322), beyond [`check_email`]:
/// the local part at most 64 bytes of dot-separated words of letters, digits and
/// ``!#$%&'*+-/=?^_`{|}~`` (no quoted string: its comma or quote would reach upstreams in
/// `X-Auth-Email`); the domain dot-separated labels of letters, digits and `-`, none empty or
/// starting or ending with `-`, or an address literal in brackets. `a..b@x.io`, `.a@x.io` and
/// `a@x.io.` are refused: the last would be a second user for the mailbox `a@x.io`. (Users added
/// before this check keep their addresses, and are found by them.)
fn check_new_email(email: &str) -> Result<()> {
    fn words(s: &str, char_ok: impl Fn(u8) -> bool, word_ok: impl Fn(&str) -> bool) -> bool {
        s.split('.').all(|w| !w.is_empty() && w.bytes().all(&char_ok) && word_ok(w))
    }
    check_email(email)?;
    let atext = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b);
    let label = |l: &str| l.len() <= 63 && !l.starts_with('-') && !l.ends_with('-');
    let literal = |d: &str| d.len() > 2 && d.starts_with('[') && d.ends_with(']');
    let shaped = matches!(email.split_once('@'), Some((local, domain))
        if local.len() <= 64
            && words(local, atext, |_| true)
            && (literal(domain) || words(domain, |b| b.is_ascii_alphanumeric() || b == b'-', label)));
    match shaped {
        true => Ok(()),
        false => Err(not_an_email(email)),
    }
}

fn not_an_email(email: &str) -> LifecycleError {
    LifecycleError::Invalid(format!(
        "{:?} is not an email address (local@domain, printable ASCII, no empty part between dots: \
         write an internationalized domain in its xn-- form)",
        shown(email)
    ))
}

/// Keeps each name once, in the order first given.
fn once_each(names: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
}

pub(crate) fn new_user(
    org: &str,
    email: &str,
    org_role: Role,
    project_roles: BTreeMap<String, Role>,
    attributes: Attributes,
) -> User {
    User {
        id: format!("u_{}", token::random_base62(12)),
        org: org.to_string(),
        email: email.to_string(),
        status: UserStatus::Active,
        org_role,
        project_roles,
        attributes,
        created_at: now_millis(),
    }
}

/// Generates a token whose id is not taken yet. Ids have 6 base62 characters (5.7e10 of them), so
/// among a million tokens a few collisions are expected; a taken id is simply drawn again. (The
/// store's atomic "absent" check still guards the write itself.)
async fn fresh_token(store: &Store, kind: TokenKind) -> Result<NewToken> {
    for _ in 0..8 {
        let new = token::generate(kind);
        if store.get_token(&new.id).await?.is_none() {
            return Ok(new);
        }
    }
    Err(LifecycleError::Conflict("no free token id after 8 draws; try again".into()))
}

/// Generates a token and hashes its secret (off the async threads) into a record, not yet stored.
pub(crate) async fn mint(
    store: &Store,
    argon2: Argon2Params,
    org: &str,
    owner: Owner,
    spec: TokenSpec,
) -> Result<(NewToken, TokenRecord)> {
    let kind = match owner {
        Owner::User(_) => TokenKind::Pat,
        Owner::Service(_) => TokenKind::Service,
    };
    let new = fresh_token(store, kind).await?;
    let secret = new.secret().to_owned();
    let hash = tokio::task::spawn_blocking(move || token::hash_secret(&secret, &argon2))
        .await
        .map_err(|e| LifecycleError::Hash(e.to_string()))?
        .map_err(|e| LifecycleError::Hash(e.to_string()))?;
    let record = TokenRecord {
        id: new.id.clone(),
        kind,
        org: org.to_string(),
        owner,
        display_name: spec.display_name,
        secret_hash: hash,
        scope: spec.scope.map(Box::new),
        environments: spec.environments,
        created_at: now_millis(),
        expires_at: spec.expires_at,
        revoked: None,
        rotated_to: None,
    };
    Ok((new, record))
}

/// Generates, hashes and stores a token directly (bootstrap and tests: no actor checks).
pub async fn issue_token(
    store: &Store,
    argon2: Argon2Params,
    org: &str,
    owner: Owner,
    spec: TokenSpec,
) -> Result<(NewToken, TokenRecord)> {
    let (new, record) = mint(store, argon2, org, owner, spec).await?;
    store.insert_token(&record, None, None).await?;
    Ok((new, record))
}

/// Creates the org if it does not exist yet.
pub async fn ensure_org(store: &Store, name: &str) -> Result<()> {
    if store.get_org(name).await?.is_none() {
        match store.create_org(&Org { name: name.to_string(), created_at: now_millis() }).await {
            Ok(()) | Err(StoreError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Creates an active user directly (bootstrap and tests: no actor checks).
pub async fn create_user(
    store: &Store,
    org: &str,
    email: &str,
    org_role: Role,
    project_roles: BTreeMap<String, Role>,
    attributes: Attributes,
) -> Result<User> {
    let user = new_user(org, email, org_role, project_roles, attributes);
    store
        .create_user(&user, None, None, None)
        .await
        .map_err(|e| conflict(e, || format!("user {email} already exists in org {org}")))?;
    Ok(user)
}

/// Creates a service directly (tests: no actor checks).
pub async fn create_service(
    store: &Store,
    org: &str,
    name: &str,
    org_role: Option<Role>,
    project_roles: BTreeMap<String, Role>,
    attributes: Attributes,
    created_by: Option<String>,
) -> Result<Service> {
    let service = Service {
        id: format!("s_{}", token::random_base62(12)),
        org: org.to_string(),
        name: name.to_string(),
        org_role,
        project_roles,
        attributes,
        created_by,
        creator_roles: None,
        created_at: now_millis(),
    };
    store.create_service(&service, None, None, None).await?;
    Ok(service)
}

/// The org's first admin and a token for them (within the configured token limits, so it may
/// expire: its expiry comes with it), audited as done by `bootstrap`.
pub async fn bootstrap(
    store: &Store,
    argon2: Argon2Params,
    limits: &TokenLimits,
    org: &str,
    email: &str,
) -> Result<(User, NewToken, Option<Millis>)> {
    check_new_email(email)?;
    ensure_org(store, org).await?;
    let user = new_user(org, email, Role::Admin, BTreeMap::new(), Attributes::new());
    let now = now_millis();
    let (token, record, issued) =
        operator_mint(store, argon2, limits, &user, "bootstrap", "bootstrap", now).await?;
    let details = serde_json::json!({ "id": user.id, "org_role": "admin" });
    let added = operator_audit(org, "bootstrap", "user.add", format!("user:{email}"), details, now);
    store
        .create_user(&user, Some(&added), Some(FirstToken { token: &record, audit: Some(&issued) }), None)
        .await
        .map_err(|e| conflict(e, || format!("user {email} already exists in org {org}")))
        .map_err(keeping(&token))?;
    Ok((user, token, record.expires_at))
}

/// A fresh token for an existing active user, made by an operator on the store directly
/// (`quickstart` run again): the implicit expiry, and a `token.issue` audit entry by `actor`.
pub async fn operator_token(
    store: &Store,
    argon2: Argon2Params,
    limits: &TokenLimits,
    user: &User,
    actor: &str,
) -> Result<NewToken> {
    if user.status != UserStatus::Active {
        return Err(LifecycleError::Invalid(format!(
            "user {} of org {} is suspended; reactivate them first",
            user.email, user.org
        )));
    }
    let (token, record, issued) =
        operator_mint(store, argon2, limits, user, actor, actor, now_millis()).await?;
    store.insert_token(&record, Some(&issued), None).await?;
    Ok(token)
}

/// A token for `user` made by an operator (no acting user), with its `token.issue` audit entry.
async fn operator_mint(
    store: &Store,
    argon2: Argon2Params,
    limits: &TokenLimits,
    user: &User,
    actor: &str,
    display_name: &str,
    now: Millis,
) -> Result<(NewToken, TokenRecord, AuditEvent)> {
    let spec = TokenSpec {
        display_name: Some(display_name.into()),
        expires_at: implicit_expiry(limits, now),
        ..TokenSpec::default()
    };
    let (token, record) = mint(store, argon2, &user.org, Owner::User(user.id.clone()), spec).await?;
    let details = serde_json::json!({ "for": format!("user:{}", user.email) });
    let mut issued = operator_audit(&user.org, actor, "token.issue", record.id.to_string(), details, now);
    issued.token_id = Some(record.id.to_string());
    Ok((token, record, issued))
}

/// An audit entry by an operator working on the store directly (`bootstrap`, `quickstart`).
fn operator_audit(
    org: &str,
    actor: &str,
    action: &str,
    target: String,
    details: serde_json::Value,
    now: Millis,
) -> AuditEvent {
    AuditEvent {
        at: now,
        org: org.to_string(),
        actor: actor.into(),
        action: action.into(),
        target,
        token_id: None,
        by_token: None,
        actor_email: None,
        reason: None,
        details,
    }
}

#[cfg(test)]
mod tests;
