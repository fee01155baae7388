//! Lifecycle rules on the in-memory store: limits from config, and who may do what.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::store::memory::MemoryBackend;

const CONFIG: &str = r#"
argon2: { memory_kib: 256, iterations: 1, parallelism: 1 }
tokens: { require_expiry: true, max_ttl: 1h }
orgs: { acme: { projects: { shop: { environments: [production] } } } }
"#;

async fn setup() -> (Store, Config, Actor) {
    let store = Store::new(Arc::new(MemoryBackend::default()), Duration::from_millis(200));
    let config = Config::parse(CONFIG).unwrap();
    let admin = create_user(&store, "acme", "a@acme.io", Role::Admin, BTreeMap::new(), Attributes::new())
        .await
        .unwrap();
    let actor = Actor {
        subject: format!("user:{}", admin.id),
        org: "acme".into(),
        user_id: Some(admin.id),
        roles: RoleSet { org: Role::Admin, projects: BTreeMap::new() },
        scope: None,
        environments: None,
        token_id: None,
        service_id: None,
    };
    (store, config, actor)
}

fn invalid(r: Result<IssuedToken>) -> String {
    match r {
        Err(LifecycleError::Invalid(m)) => m,
        other => panic!("expected an invalid request, got {other:?}"),
    }
}

#[tokio::test]
async fn the_config_can_require_an_expiry_and_cap_it() {
    let (store, config, actor) = setup().await;
    let l = Lifecycle::new(&store, &config);
    let msg = invalid(l.issue_pat(&actor, IssueRequest::default()).await);
    assert!(msg.contains("requires an expiry"), "{msg}");
    let msg =
        invalid(l.issue_pat(&actor, IssueRequest { ttl_minutes: Some(61), ..IssueRequest::default() }).await);
    assert!(msg.contains("maximum lifetime of 1h"), "{msg}");
    let ok =
        l.issue_pat(&actor, IssueRequest { ttl_minutes: Some(60), ..IssueRequest::default() }).await.unwrap();
    assert_eq!(ok.details.status, "active");
    let msg =
        invalid(l.issue_pat(&actor, IssueRequest { ttl_minutes: Some(0), ..IssueRequest::default() }).await);
    assert!(msg.contains("positive"), "{msg}");
}

#[tokio::test]
async fn a_narrowed_caller_makes_tokens_no_wider_than_itself() {
    let (store, config, mut actor) = setup().await;
    let l = Lifecycle::new(&store, &config);
    actor.scope = Some(vec!["read".into()]);
    actor.environments = Some(vec!["production".into()]);
    let req = IssueRequest { ttl_minutes: Some(5), ..IssueRequest::default() };
    let t = l.issue_pat(&actor, req.clone()).await.unwrap();
    assert_eq!(t.details.permissions, Some(vec!["read".to_string()]), "inherits the caller's scope");
    assert_eq!(t.details.environments, Some(vec!["production".to_string()]));
    let wider = IssueRequest { scope: Some("read-write".into()), ..req };
    assert!(matches!(l.issue_pat(&actor, wider).await, Err(LifecycleError::Forbidden(_))));
    // A read-scoped admin token cannot manage users.
    let added = l
        .add_user(&actor, "acme", "b@acme.io", Role::Viewer, BTreeMap::new(), Attributes::new(), false)
        .await;
    assert!(matches!(added, Err(LifecycleError::Forbidden(_))), "{added:?}");
}

#[test]
fn token_status_follows_the_clock() {
    let record = |revoked: Option<Millis>, expires: Option<Millis>, rotated: bool| TokenRecord {
        id: token::generate(TokenKind::Pat).id,
        kind: TokenKind::Pat,
        org: "o".into(),
        owner: Owner::User("u".into()),
        display_name: None,
        secret_hash: String::new(),
        scope: None,
        environments: None,
        created_at: 0,
        expires_at: expires,
        revoked: revoked.map(|at| Box::new(Revocation { at, decided_at: None, reason: None, by: None })),
        rotated_to: rotated.then(|| token::generate(TokenKind::Pat).id),
    };
    let check = |t: TokenRecord, expected: &str| assert_eq!(token_status(&t, 100), expected);
    check(record(None, None, false), "active");
    check(record(None, Some(100), false), "expired");
    check(record(Some(50), None, false), "revoked");
    check(record(Some(50), None, true), "rotated");
    check(record(Some(150), None, true), "deprecated");
}

#[tokio::test]
async fn first_tokens_of_services_and_users_follow_the_callers_limits_and_the_config() {
    let (store, config, mut actor) = setup().await;
    let l = Lifecycle::new(&store, &config);
    actor.scope = Some(vec!["read".into(), "write".into(), "admin".into()]);
    actor.environments = Some(vec!["production".into()]);
    let req = CreateService {
        org: "acme".into(),
        name: "etl".into(),
        org_role: Some(Role::Viewer),
        ..CreateService::default()
    };
    let (_, token) = l.create_service(&actor, req).await.unwrap();
    assert_eq!(token.details.environments, Some(vec!["production".to_string()]));
    assert!(token.details.permissions.is_some(), "the caller's scope is inherited");
    assert!(token.details.expires_at.is_some(), "require_expiry and max_ttl apply");

    let (_, first) = l
        .add_user(&actor, "acme", "new@acme.io", Role::Editor, BTreeMap::new(), Attributes::new(), true)
        .await
        .unwrap();
    let first = first.expect("a first token");
    let view = l.get_token(&actor, &first[..10]).await.unwrap();
    assert_eq!(view.environments, Some(vec!["production".to_string()]));
    assert!(view.expires_at.is_some());
}
