//! The records the store holds: orgs, users, services and tokens, serialized as JSON.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::policy::Role;
use crate::token::{TokenId, TokenKind};

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// The current time in milliseconds since the Unix epoch.
pub fn now_millis() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as Millis).unwrap_or(0)
}

/// Formats a timestamp as RFC 3339 (UTC, seconds).
pub fn format_millis(ms: Millis) -> String {
    // RFC 3339 ends with the year 9999; later times (never stored by this version) are clamped.
    let ms = ms.clamp(0, 253_402_300_799_000);
    let t = UNIX_EPOCH + std::time::Duration::from_millis(ms as u64);
    let mut out = String::new();
    match std::fmt::Write::write_fmt(&mut out, format_args!("{}", humantime::format_rfc3339_seconds(t))) {
        Ok(()) => out,
        Err(_) => "9999-12-31T23:59:59Z".to_string(),
    }
}

/// Free-form attributes: any JSON object.
pub type Attributes = serde_json::Map<String, serde_json::Value>;

/// A tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Org {
    /// Unique name.
    pub name: String,
    /// Creation time.
    pub created_at: Millis,
}

/// Whether a user may act.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserStatus {
    /// Normal.
    Active,
    /// Blocked: every token of the user is refused until reactivated.
    Suspended,
}

/// A person in an org.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// Stable id (`u_` + base62), used in `X-Auth-Subject`.
    pub id: String,
    /// The org the user belongs to.
    pub org: String,
    /// Email, unique in the org.
    pub email: String,
    /// Active or suspended. A removed user has no record.
    pub status: UserStatus,
    /// Role in the whole org.
    pub org_role: Role,
    /// Roles on single projects.
    #[serde(default)]
    pub project_roles: BTreeMap<String, Role>,
    /// Attributes (groups, department, ...).
    #[serde(default)]
    pub attributes: Attributes,
    /// Creation time.
    pub created_at: Millis,
}

/// An org role and per-project roles, as held by a user at some moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleSet {
    /// Role in the whole org.
    pub org: Role,
    /// Roles on single projects.
    #[serde(default)]
    pub projects: BTreeMap<String, Role>,
}

impl RoleSet {
    /// The role on a project: the higher of the org role and the project role.
    pub fn on(&self, project: &str) -> Role {
        self.projects.get(project).copied().map_or(self.org, |p| p.max(self.org))
    }

    /// The highest role anywhere.
    pub fn highest(&self) -> Role {
        self.projects.values().copied().fold(self.org, Role::max)
    }
}

/// A service account, owned by the org.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Service {
    /// Stable id (`s_` + base62); the name can change.
    pub id: String,
    /// The org that owns it.
    pub org: String,
    /// Name, unique in the org, used in `X-Auth-Subject`.
    pub name: String,
    /// Role in the whole org, if any.
    pub org_role: Option<Role>,
    /// Roles on single projects.
    #[serde(default)]
    pub project_roles: BTreeMap<String, Role>,
    /// Attributes injected for the upstream.
    #[serde(default)]
    pub attributes: Attributes,
    /// The user who created it (informational: the service survives them).
    pub created_by: Option<String>,
    /// The creator's roles when it was created: the service's roles may never exceed them.
    #[serde(default)]
    pub creator_roles: Option<RoleSet>,
    /// Creation time.
    pub created_at: Millis,
}

/// Whose token it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "id", rename_all = "lowercase")]
pub enum Owner {
    /// A user's personal access token.
    User(String),
    /// A service's token.
    Service(String),
}

/// A scope narrowing a token below its role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// The preset it came from, if any.
    pub name: Option<String>,
    /// The permissions, resolved when the token was issued.
    pub permissions: Vec<String>,
}

/// When and why a token stops working.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// From this time on the token is refused; in the future during a rotation's grace.
    pub at: Millis,
    /// When the revocation was decided (the start of a rotation's grace).
    #[serde(default)]
    pub decided_at: Option<Millis>,
    /// Why, if given.
    pub reason: Option<String>,
    /// Who revoked it.
    pub by: Option<String>,
}

/// A stored token: everything but the secret, of which only an argon2id hash is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The public id.
    pub id: TokenId,
    /// PAT or service token.
    pub kind: TokenKind,
    /// The org it works in.
    pub org: String,
    /// The user or service it acts for.
    pub owner: Owner,
    /// A name chosen by the owner.
    pub display_name: Option<String>,
    /// argon2id PHC string of the secret.
    pub secret_hash: String,
    /// Narrowing below the owner's role; `None` means all of the role's permissions. (Boxed, as
    /// is `revoked`: most tokens have neither, and every cached record is smaller for it.)
    pub scope: Option<Box<Scope>>,
    /// Environments it may be used in; `None` means all.
    pub environments: Option<Vec<String>>,
    /// Creation time.
    pub created_at: Millis,
    /// Expiry time, if any.
    pub expires_at: Option<Millis>,
    /// Revocation, if any.
    pub revoked: Option<Box<Revocation>>,
    /// The token that replaced this one in a rotation.
    #[serde(default)]
    pub rotated_to: Option<TokenId>,
}

impl TokenRecord {
    /// Whether the token has expired at `now`.
    pub fn is_expired(&self, now: Millis) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// Whether the token is revoked at `now`. Only a rotation's grace (decided ahead of its end)
    /// waits for the clock; a revocation that takes effect when decided holds whatever this
    /// instance's clock reads, so that a clock behind the deciding instance's, or stepped back,
    /// cannot let it through.
    pub fn is_revoked(&self, now: Millis) -> bool {
        self.revoked.as_ref().is_some_and(|r| (r.is_immediate() && !self.is_legacy_grace(r)) || r.at <= now)
    }

    /// A rotation's grace stored before `decided_at` was kept (every revocation writes it now).
    fn is_legacy_grace(&self, r: &Revocation) -> bool {
        r.decided_at.is_none() && self.revoked_by_rotation()
    }

    /// Whether its revocation is its rotation's: it gives exactly the reason the rotation wrote,
    /// naming the token it was rotated to (a later revocation in the grace replaces it).
    pub fn revoked_by_rotation(&self) -> bool {
        match (&self.revoked, &self.rotated_to) {
            (Some(r), Some(to)) => {
                r.reason.as_deref().and_then(|why| why.strip_prefix(ROTATED_TO)) == Some(to.as_str())
            }
            _ => false,
        }
    }
}

/// The reason a rotation gives the token it replaces: `rotated to <new id>`.
pub const ROTATED_TO: &str = "rotated to ";

impl Revocation {
    /// Whether it took effect as it was decided (every revocation but a rotation's grace).
    pub fn is_immediate(&self) -> bool {
        self.decided_at.is_none_or(|decided| self.at <= decided)
    }
}

/// One entry of an org's audit log: its time in milliseconds as stored, or as the admin API shows
/// it ([`crate::lifecycle::AuditEntry`], RFC 3339).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent<At = Millis> {
    /// When.
    pub at: At,
    /// The org.
    pub org: String,
    /// Who: `user:<id>`, `service:<name>`, or `bootstrap`.
    pub actor: String,
    /// What, e.g. `token.issue`, `user.suspend`.
    pub action: String,
    /// On what: a token id, `user:<email>`, `service:<name>`.
    pub target: String,
    /// The token acted on (or, for `credentials.issue`, the one that minted), if any.
    pub token_id: Option<String>,
    /// The token the actor made the change with (`None` for an operator on the store directly, and
    /// in entries written before 2026-11-27): what a leaked token did is found by it.
    #[serde(default)]
    pub by_token: Option<String>,
    /// The acting user's email (`None` for a service, an operator, and in entries written before
    /// 2026-11-28): who `user:<id>` was, even once removed.
    #[serde(default)]
    pub actor_email: Option<String>,
    /// The reason given, if any.
    pub reason: Option<String>,
    /// Anything else worth keeping (new role, new name).
    #[serde(default)]
    pub details: serde_json::Value,
}

/// When and from where a token was last used, written in batches by each gateway instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastUse {
    /// Time of the last request.
    pub at: Millis,
    /// The client's IP address.
    pub ip: String,
}
