//! Table-driven tests of the authorization decision.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::*;
use crate::auth::{OwnerRecord, Principal};
use crate::route::{RequiredPermission, Route, RouteSpec};
use crate::store::{Owner, Scope, TokenRecord, User, UserStatus};
use crate::token::{self, TokenKind};

fn policy() -> Policy {
    Policy::new(&Policy::default_roles(), Policy::default_scopes())
}

fn route(policy: &Policy) -> Arc<Route> {
    let req = |n: &str| RequiredPermission { name: n.into(), bit: policy.permission(n).unwrap() };
    Arc::new(Route::new(RouteSpec {
        name: "r".into(),
        host: None,
        path_prefix: "/".into(),
        upstreams: vec![],
        timeouts: Default::default(),
        org: "acme".into(),
        project: "shop".into(),
        environment: "production".into(),
        public: false,
        query_token: false,
        identity_jwt: false,
        identity_audience: None,
        preserve_header_case: false,
        case_sensitive: false,
        format_extensions: true,
        methods: HashMap::from([(http::Method::DELETE, req("admin"))]),
        read_default: req("read"),
        write_default: req("write"),
    }))
}

struct Case {
    org_role: Role,
    project_role: Option<Role>,
    scope: Option<&'static [&'static str]>,
    envs: Option<&'static [&'static str]>,
    org: &'static str,
}

const BASE: Case = Case { org_role: Role::Editor, project_role: None, scope: None, envs: None, org: "acme" };

fn principal(c: &Case) -> Principal {
    let user = User {
        id: "u_1".into(),
        org: c.org.into(),
        email: "a@example.com".into(),
        status: UserStatus::Active,
        org_role: c.org_role,
        project_roles: c.project_role.map(|r| BTreeMap::from([("shop".to_string(), r)])).unwrap_or_default(),
        attributes: Default::default(),
        created_at: 0,
    };
    let token = TokenRecord {
        id: token::generate(TokenKind::Pat).id,
        kind: TokenKind::Pat,
        org: c.org.into(),
        owner: Owner::User("u_1".into()),
        display_name: None,
        secret_hash: String::new(),
        scope: c
            .scope
            .map(|s| Box::new(Scope { name: None, permissions: s.iter().map(|p| p.to_string()).collect() })),
        environments: c.envs.map(|e| e.iter().map(|p| p.to_string()).collect()),
        created_at: 0,
        expires_at: None,
        revoked: None,
        rotated_to: None,
    };
    Principal::new(Arc::new(token), OwnerRecord::User(Arc::new(user)), false)
}

/// Runs one decision; `Ok` carries the role and effective permissions.
fn check(c: Case, method: http::Method, expected: Result<(&str, &str), Forbidden>) {
    let p = policy();
    let got = authorize(&p, route(&p), &method, principal(&c)).map(|permit| {
        let g = permit.grant().unwrap();
        (g.role.as_str().to_string(), p.names_of(g.permissions))
    });
    let expected = expected.map(|(r, perms)| (r.to_string(), perms.to_string()));
    assert_eq!(got, expected);
}

#[test]
fn role_and_scope_decide() {
    use http::Method as M;
    check(Case { ..BASE }, M::GET, Ok(("editor", "read,write,execute")));
    check(Case { ..BASE }, M::POST, Ok(("editor", "read,write,execute")));
    check(Case { ..BASE }, M::DELETE, Err(Forbidden::Permission("admin".into())));
    check(Case { scope: Some(&["read"]), ..BASE }, M::POST, Err(Forbidden::Permission("write".into())));
    check(Case { scope: Some(&["read"]), ..BASE }, M::GET, Ok(("editor", "read")));
    // A viewer's token with scope admin can still only read.
    let viewer_admin_scope =
        || Case { org_role: Role::Viewer, scope: Some(&["read", "write", "execute", "admin"]), ..BASE };
    check(viewer_admin_scope(), M::GET, Ok(("viewer", "read")));
    check(viewer_admin_scope(), M::PUT, Err(Forbidden::Permission("write".into())));
    // The higher of org role and project role.
    check(
        Case { org_role: Role::Guest, project_role: Some(Role::Admin), ..BASE },
        M::DELETE,
        Ok(("admin", "read,write,execute,admin")),
    );
    check(
        Case { org_role: Role::Admin, project_role: Some(Role::Viewer), ..BASE },
        M::DELETE,
        Ok(("admin", "read,write,execute,admin")),
    );
    check(Case { org_role: Role::Guest, ..BASE }, M::GET, Err(Forbidden::Permission("read".into())));
    // A scope naming permissions no role has adds nothing.
    check(Case { scope: Some(&["nonsense"]), ..BASE }, M::GET, Err(Forbidden::Permission("read".into())));
}

#[test]
fn org_and_environment_are_enforced() {
    check(Case { org: "other", ..BASE }, http::Method::GET, Err(Forbidden::Org));
    check(
        Case { envs: Some(&["staging"]), ..BASE },
        http::Method::GET,
        Err(Forbidden::Environment("production".into())),
    );
    check(
        Case { envs: Some(&["staging", "production"]), ..BASE },
        http::Method::GET,
        Ok(("editor", "read,write,execute")),
    );
}

#[test]
fn config_can_override_roles() {
    let mut roles = Policy::default_roles();
    roles.insert(Role::Viewer, vec!["read".into(), "execute".into()]);
    let p = Policy::new(&roles, Policy::default_scopes());
    assert_eq!(p.names_of(p.role_permissions(Role::Viewer)), "read,execute");
    assert_eq!(p.names_of(p.role_permissions(Role::Guest)), "");
    assert_eq!(p.scope_preset("execute"), Some(&["read".to_string(), "execute".to_string()][..]));
}
