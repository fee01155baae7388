//! Roles, permissions and scopes, and the authorization decision that turns a verified principal
//! and a route into a [`Permit`]. Pure: no I/O.
//!
//! Permissions are interned into bits when the config is loaded, so a decision on the request path
//! is a few lookups and an `and` of two `u64`s.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::auth::Principal;
use crate::route::Route;

/// The four roles, in increasing order of power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// No permissions by default.
    Guest,
    /// `read` by default.
    Viewer,
    /// `read, write, execute` by default.
    Editor,
    /// Everything by default.
    Admin,
}

impl Role {
    /// All roles, weakest first.
    pub const ALL: [Role; 4] = [Role::Guest, Role::Viewer, Role::Editor, Role::Admin];

    /// The lowercase name used in config, headers and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Guest => "guest",
            Role::Viewer => "viewer",
            Role::Editor => "editor",
            Role::Admin => "admin",
        }
    }

    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of permissions as bits of the config's permission registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PermSet(u64);

impl PermSet {
    /// The empty set.
    pub const EMPTY: PermSet = PermSet(0);

    /// Whether every permission of `other` is in `self`.
    pub fn contains(self, other: PermSet) -> bool {
        self.0 & other.0 == other.0
    }

    /// Set intersection.
    pub fn intersect(self, other: PermSet) -> PermSet {
        PermSet(self.0 & other.0)
    }

    fn union(self, other: PermSet) -> PermSet {
        PermSet(self.0 | other.0)
    }

    /// Set difference: what `self` has and `other` has not.
    pub fn minus(self, other: PermSet) -> PermSet {
        PermSet(self.0 & !other.0)
    }

    /// Whether it holds no permission.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// The most permissions a config may name, one bit each.
pub const MAX_PERMISSIONS: usize = 64;

/// The permission names, roles and scope presets of one config.
#[derive(Debug, Clone)]
pub struct Policy {
    names: Vec<String>,
    bits: HashMap<String, PermSet>,
    roles: [PermSet; 4],
    scopes: BTreeMap<String, Vec<String>>,
}

impl Policy {
    /// The default roles of PRODUCT.md.
    pub fn default_roles() -> BTreeMap<Role, Vec<String>> {
        let p = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        BTreeMap::from([
            (Role::Guest, p(&[])),
            (Role::Viewer, p(&["read"])),
            (Role::Editor, p(&["read", "write", "execute"])),
            (Role::Admin, p(&["read", "write", "execute", "admin"])),
        ])
    }

    /// The default scope presets of PRODUCT.md.
    pub fn default_scopes() -> BTreeMap<String, Vec<String>> {
        let p = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        BTreeMap::from([
            ("read".to_string(), p(&["read"])),
            ("execute".to_string(), p(&["read", "execute"])),
            ("read-write".to_string(), p(&["read", "write", "execute"])),
            ("admin".to_string(), p(&["read", "write", "execute", "admin"])),
        ])
    }

    /// Builds the registry. Every permission named by a role or a preset gets a bit; the caller has
    /// checked there are at most [`MAX_PERMISSIONS`] of them.
    pub fn new(roles: &BTreeMap<Role, Vec<String>>, scopes: BTreeMap<String, Vec<String>>) -> Policy {
        let mut policy =
            Policy { names: Vec::new(), bits: HashMap::new(), roles: [PermSet::EMPTY; 4], scopes };
        let named: Vec<String> =
            roles.values().chain(policy.scopes.values()).flatten().cloned().collect::<Vec<_>>();
        for name in named {
            policy.intern(&name);
        }
        for (role, perms) in roles {
            policy.roles[*role as usize] = policy.set_of(perms);
        }
        policy
    }

    fn intern(&mut self, name: &str) {
        if self.bits.contains_key(name) || self.names.len() >= MAX_PERMISSIONS {
            return;
        }
        self.bits.insert(name.to_string(), PermSet(1 << self.names.len()));
        self.names.push(name.to_string());
    }

    /// How many distinct permissions the roles and presets name.
    pub fn permission_count(
        roles: &BTreeMap<Role, Vec<String>>,
        scopes: &BTreeMap<String, Vec<String>>,
    ) -> usize {
        let mut all: Vec<&String> = roles.values().chain(scopes.values()).flatten().collect();
        all.sort();
        all.dedup();
        all.len()
    }

    /// The bit of one permission, if any role or preset names it.
    pub fn permission(&self, name: &str) -> Option<PermSet> {
        self.bits.get(name).copied()
    }

    /// Whether some role grants `bit`.
    pub fn granted(&self, bit: PermSet) -> bool {
        self.roles.iter().any(|role| role.contains(bit))
    }

    /// The set of the named permissions; names no role grants add nothing.
    pub fn set_of<S: AsRef<str>>(&self, names: &[S]) -> PermSet {
        names.iter().filter_map(|n| self.permission(n.as_ref())).fold(PermSet::EMPTY, PermSet::union)
    }

    /// The permissions a role grants.
    pub fn role_permissions(&self, role: Role) -> PermSet {
        self.roles[role as usize]
    }

    /// The permission list of a scope preset.
    pub fn scope_preset(&self, name: &str) -> Option<&[String]> {
        self.scopes.get(name).map(Vec::as_slice)
    }

    /// The scope preset names.
    pub fn scope_names(&self) -> Vec<&str> {
        self.scopes.keys().map(String::as_str).collect()
    }

    /// Comma-separated names of a set, in registry order.
    pub fn names_of(&self, set: PermSet) -> String {
        let mut out = String::new();
        for (i, name) in self.names.iter().enumerate() {
            if set.0 & (1 << i) != 0 {
                if !out.is_empty() {
                    out.push(',');
                }
                out.push_str(name);
            }
        }
        out
    }
}

/// Why a valid credential may not do this request here. Shown to the client as 403.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Forbidden {
    /// The token belongs to another organization than the route's.
    #[error("the token is not valid for this organization")]
    Org,
    /// The token is restricted to other environments.
    #[error("the token is not valid for environment \"{0}\"")]
    Environment(String),
    /// An ephemeral credential minted for another project.
    #[error("the credential is not valid for project \"{0}\"")]
    Project(String),
    /// The effective permissions lack the one the route requires for this method.
    #[error("this request requires the \"{0}\" permission")]
    Permission(String),
}

/// Proof that authorization ran and allowed the request. Only [`authorize`] and [`Permit::public`]
/// make one, and forwarding a request to an upstream needs one.
#[derive(Debug)]
pub struct Permit {
    route: Arc<Route>,
    grant: Option<Grant>,
}

/// What an authenticated request may do, carried into the upstream headers.
#[derive(Debug)]
pub struct Grant {
    /// Who is calling.
    pub principal: Principal,
    /// The role in effect on the route's project.
    pub role: Role,
    /// Effective permissions: the role's now, intersected with the token's scope.
    pub permissions: PermSet,
}

impl Permit {
    /// A permit for a public route: no identity.
    pub fn public(route: Arc<Route>) -> Permit {
        Permit { route, grant: None }
    }

    /// The route the request goes to.
    pub fn route(&self) -> &Arc<Route> {
        &self.route
    }

    /// The identity and rights, absent on public routes.
    pub fn grant(&self) -> Option<&Grant> {
        self.grant.as_ref()
    }

    /// Whether the grant also covers `method` on this route (a method an upstream may run the
    /// request as, told in a method-override header); public routes allow anything.
    pub fn allows(&self, method: &http::Method) -> Result<(), Forbidden> {
        let Some(grant) = &self.grant else { return Ok(()) };
        let required = self.route.required_permission(method);
        match grant.permissions.contains(required.bit) {
            true => Ok(()),
            false => Err(Forbidden::Permission(required.name.clone())),
        }
    }
}

/// Decides whether `principal` may send a `method` request to `route`.
pub fn authorize(
    policy: &Policy,
    route: Arc<Route>,
    method: &http::Method,
    principal: Principal,
) -> Result<Permit, Forbidden> {
    if principal.org() != route.org {
        return Err(Forbidden::Org);
    }
    let ephemeral = principal.ephemeral();
    if ephemeral.is_some_and(|e| e.project != route.project) {
        return Err(Forbidden::Project(route.project.clone()));
    }
    // An ephemeral credential is bounded by its own environments and those of the token that
    // minted it, and by both scopes.
    let env_limits = principal.environments().into_iter().chain(ephemeral.and_then(|e| e.env.as_deref()));
    for envs in env_limits {
        if !envs.iter().any(|e| *e == route.environment) {
            return Err(Forbidden::Environment(route.environment.clone()));
        }
    }
    let role = principal.role_on(&route.project);
    let mut permissions = policy.role_permissions(role);
    for scope in principal.scope().into_iter().chain(ephemeral.and_then(|e| e.scope.as_deref())) {
        permissions = permissions.intersect(policy.set_of(scope));
    }
    let required = route.required_permission(method);
    if !permissions.contains(required.bit) {
        return Err(Forbidden::Permission(required.name.clone()));
    }
    Ok(Permit { route, grant: Some(Grant { principal, role, permissions }) })
}

#[cfg(test)]
mod tests;
