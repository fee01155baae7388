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
    setup_on(Arc::new(MemoryBackend::default())).await
}

/// [`setup`] on a backend the test keeps.
async fn setup_on(backend: Arc<MemoryBackend>) -> (Store, Config, Actor) {
    let store = Store::new(backend, Duration::from_millis(200));
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
        email: Some("a@acme.io".into()),
    };
    (store, config, actor)
}

/// A stored editor of org acme (`ed@acme.io`), acting like `admin` in all else.
async fn editor(store: &Store, admin: &Actor) -> Actor {
    let ed = create_user(store, "acme", "ed@acme.io", Role::Editor, BTreeMap::new(), Attributes::new())
        .await
        .unwrap();
    Actor {
        subject: format!("user:{}", ed.id),
        user_id: Some(ed.id.clone()),
        email: Some(ed.email.clone()),
        roles: RoleSet { org: Role::Editor, projects: BTreeMap::new() },
        ..admin.clone()
    }
}

/// A service of org acme with the viewer role.
fn viewer_service(name: &str) -> CreateService {
    CreateService {
        org: "acme".into(),
        name: name.into(),
        org_role: Some(Role::Viewer),
        ..CreateService::default()
    }
}

/// The message of a refusal of the expected kind: invalid (`400`) or forbidden (`403`).
fn refusal<T: std::fmt::Debug>(r: Result<T>, expect_invalid: bool) -> String {
    match r {
        Err(LifecycleError::Invalid(m)) if expect_invalid => m,
        Err(LifecycleError::Forbidden(m)) if !expect_invalid => m,
        other => panic!("expected a refusal (invalid: {expect_invalid}), got {other:?}"),
    }
}

fn invalid<T: std::fmt::Debug>(r: Result<T>) -> String {
    refusal(r, true)
}

fn forbidden<T: std::fmt::Debug>(r: Result<T>) -> String {
    refusal(r, false)
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
    let added =
        l.add_user(&actor, "acme", "b@acme.io", Role::Viewer, BTreeMap::new(), Attributes::new(), None).await;
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
    // A revocation as stored: decided at `decided`, by its rotation (the reason it writes) or not.
    let revoked = |at: Millis, decided: Option<Millis>, by_rotation: bool| {
        let mut t = record(Some(at), None, true);
        let to = t.rotated_to.clone().unwrap();
        let r = t.revoked.as_mut().unwrap();
        r.decided_at = decided;
        r.reason = by_rotation.then(|| format!("rotated to {to}"));
        t
    };
    check(record(None, None, false), "active");
    check(record(None, Some(100), false), "expired");
    check(record(Some(50), None, false), "revoked");
    check(revoked(50, Some(50), false), "revoked");
    check(revoked(50, Some(40), true), "rotated");
    check(revoked(150, Some(40), true), "deprecated");
    check(revoked(150, Some(150), true), "rotated");
    // Revoked on an instance whose clock is ahead of this one's: revoked here too, at once.
    check(revoked(150, Some(150), false), "revoked");
    check(record(Some(150), None, false), "revoked");
    // A grace stored before `decided_at` was kept still runs to its end; a revocation of then
    // with another reason held at once.
    check(revoked(150, None, true), "deprecated");
    check(revoked(150, None, false), "revoked");
}

#[tokio::test]
async fn first_tokens_of_services_and_users_follow_the_callers_limits_and_the_config() {
    let (store, config, mut actor) = setup().await;
    let l = Lifecycle::new(&store, &config);
    actor.scope = Some(vec!["read".into(), "write".into(), "execute".into(), "admin".into()]);
    actor.environments = Some(vec!["production".into()]);
    let req = viewer_service("etl");
    let (_, token) = l.create_service(&actor, req).await.unwrap();
    assert_eq!(token.details.environments, Some(vec!["production".to_string()]));
    assert!(token.details.permissions.is_some(), "the caller's scope is inherited");
    assert!(token.details.expires_at.is_some(), "require_expiry and max_ttl apply");

    let add = |actor: Actor| {
        let (roles, lifetime) = (BTreeMap::new(), Some(Lifetime::default()));
        let l = &l;
        async move {
            l.add_user(&actor, "acme", "new@acme.io", Role::Editor, roles, Attributes::new(), lifetime).await
        }
    };
    // Adding a user reaches every environment: no admin's token for one environment does it.
    let msg = forbidden(add(actor.clone()).await);
    assert!(msg.contains("not restricted to environments"), "{msg}");
    let scoped = Actor { environments: None, ..actor.clone() };
    let (_, first) = add(scoped.clone()).await.unwrap();
    let first = first.expect("a first token");
    let view = l.get_token(&scoped, &first.details.id).await.unwrap();
    assert!(view.permissions.is_some(), "the caller's scope is inherited");
    assert!(view.expires_at.is_some());
    assert_eq!(first.details.expires_at, view.expires_at, "told with the token");
}

#[tokio::test]
async fn rotation_keeps_the_old_settings_or_refuses_a_narrower_caller() {
    let (store, config, actor) = setup().await;
    let l = Lifecycle::new(&store, &config);
    let old =
        l.issue_pat(&actor, IssueRequest { ttl_minutes: Some(5), ..IssueRequest::default() }).await.unwrap();
    let rotate = |grace| RotateRequest { grace_seconds: Some(grace), ..RotateRequest::default() };

    // A caller narrower than the token neither narrows it silently nor replaces it by a narrower
    // one (a leaked narrow token would swap its owner's wide token away): refused, with why.
    let staging_only = Actor { environments: Some(vec!["production".into()]), ..actor.clone() };
    let msg = forbidden(l.rotate(&staging_only, &old.details.id, rotate(60)).await);
    assert!(msg.contains("reaches further"), "{msg}");
    let read_only = Actor { scope: Some(vec!["read".into()]), ..actor.clone() };
    let msg = forbidden(l.rotate(&read_only, &old.details.id, rotate(60)).await);
    assert!(msg.contains("reaches further"), "{msg}");
    let narrowed = RotateRequest { scope: Some("read".into()), ..rotate(60) };
    let msg = forbidden(l.rotate(&read_only, &old.details.id, narrowed.clone()).await);
    assert!(msg.contains("reaches further"), "{msg}");
    // Asked for explicitly by a caller that holds it all, the narrower scope is fine.
    let new = l.rotate(&actor, &old.details.id, narrowed).await.unwrap();
    assert_eq!(new.details.permissions, Some(vec!["read".to_string()]));
    // A narrow token rotates itself.
    let own = Actor { token_id: crate::token::TokenId::parse(&new.details.id), ..read_only.clone() };
    let newer = l.rotate(&own, &new.details.id, rotate(0)).await.unwrap();
    assert_eq!(newer.details.permissions, Some(vec!["read".to_string()]));

    // By an unrestricted caller, unrestricted stays unrestricted.
    let again =
        l.issue_pat(&actor, IssueRequest { ttl_minutes: Some(5), ..IssueRequest::default() }).await.unwrap();
    let new = l.rotate(&actor, &again.details.id, rotate(0)).await.unwrap();
    assert_eq!((new.details.permissions, new.details.environments), (None, None));
    // The new token's history starts with its issue, by rotation.
    let history = l.audit_log(&actor, "acme", Some(&new.details.id), 10).await.unwrap();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].action, "token.issue");
    assert_eq!(history[0].details["rotated_from"], again.details.id.as_str());
}

#[tokio::test]
async fn rotation_keeps_the_scope_as_resolved_at_issue() {
    let (store, config, actor) = setup().await;
    let old = Lifecycle::new(&store, &config)
        .issue_pat(
            &actor,
            IssueRequest { ttl_minutes: Some(5), scope: Some("read".into()), ..IssueRequest::default() },
        )
        .await
        .unwrap();
    // The preset redefined since, wider: the rotated token keeps what the old one had.
    let wider = Config::parse(&format!("{CONFIG}scopes: {{ read: [read, write] }}\n")).unwrap();
    let new = Lifecycle::new(&store, &wider)
        .rotate(&actor, &old.details.id, RotateRequest::default())
        .await
        .unwrap();
    assert_eq!(new.details.permissions, Some(vec!["read".to_string()]));
    assert_eq!(new.details.scope.as_deref(), Some("read"));
}

#[test]
fn expiry_takes_any_utc_offset() {
    let now = 0;
    let at = |text: &str| parse_expiry(None, Some(text), now).unwrap().unwrap();
    let utc = at("2099-01-01T00:00:00Z");
    assert_eq!(at("2099-01-01T01:00:00+01:00"), utc);
    assert_eq!(at("2098-12-31T19:00:00-05:00"), utc);
    assert_eq!(at("2099-01-01T00:00:00.250Z"), utc + 250);
    assert!(parse_expiry(None, Some("2099-01-01"), now).is_err());
    assert!(parse_expiry(None, Some("tomorrow"), now).is_err());
}

#[tokio::test]
async fn a_change_needs_the_acting_admin_as_authenticated() {
    let (store, config, actor) = setup().await;
    let l = Lifecycle::new(&store, &config);
    let me = store.get_user(actor.user_id.as_ref().unwrap()).await.unwrap().unwrap();
    // Read when the change was decided; demoted before it is written.
    let acting = Acting::User(store.get_user(&me.id).await.unwrap().unwrap());
    let mut demoted = (*me).clone();
    demoted.org_role = Role::Viewer;
    store.update_user(&me, &demoted, None, None).await.unwrap();

    let user = new_user("acme", "late@acme.io", Role::Admin, BTreeMap::new(), Attributes::new());
    let written = store.create_user(&user, None, None, Some(&acting)).await;
    assert!(matches!(written, Err(StoreError::Changed(_))), "{written:?}");
    assert!(store.find_user_by_email("acme", "late@acme.io").await.unwrap().is_none());

    // And the lifecycle refuses outright once it reads the change.
    let msg = forbidden(
        l.add_user(&actor, "acme", "late@acme.io", Role::Admin, BTreeMap::new(), Attributes::new(), None)
            .await,
    );
    assert!(msg.contains("changed meanwhile"), "{msg}");
    let req = viewer_service("late");
    assert!(matches!(l.create_service(&actor, req).await, Err(LifecycleError::Forbidden(_))));
    // Nor a token: an admin demoted while rotating a service's token gets no new secret.
    let ttl = IssueRequest { ttl_minutes: Some(5), ..IssueRequest::default() };
    assert!(forbidden(l.issue_pat(&actor, ttl).await).contains("changed meanwhile"));
}

#[tokio::test]
async fn bad_input_is_refused_with_a_reason() {
    let (store, config, actor) = setup().await;
    let l = Lifecycle::new(&store, &config);
    let long_local = format!("{}@acme.io", "a".repeat(65));
    let bad_shapes =
        ["a@example..com", "a@-example.com", "a@example-.com", ".a@acme.io", "a.@acme.io", "a..b@acme.io"];
    for bad in [
        "a@",
        "@b",
        "a@b@c",
        "a b@c",
        "\u{e9}@acme.io",
        "a\u{7}@acme.io",
        "a@acme.io.",
        "a,b@acme.io",
        "\"a,b\"@acme.io",
        &long_local,
    ]
    .into_iter()
    .chain(bad_shapes)
    {
        assert!(check_new_email(bad).is_err(), "{bad:?}");
    }
    // Users added before the shape check are still found by (and bound to) their addresses.
    for stored in ["a@acme.io.", "j..doe@acme.io", "a@corp_ad.local"] {
        assert!(check_email(stored).is_ok() && check_new_email(stored).is_err(), "{stored:?}");
    }
    for good in ["a@b", "first.last+tag@sub.acme.io", "o'neil@xn--bcher-kva.example", "a@[10.0.0.1]"] {
        assert!(check_new_email(good).is_ok(), "{good:?}");
    }
    let mut big = Attributes::new();
    big.insert("notes".into(), "x".repeat(5000).into());
    let added = l.add_user(&actor, "acme", "big@acme.io", Role::Viewer, BTreeMap::new(), big, None).await;
    assert!(matches!(&added, Err(LifecycleError::Invalid(m)) if m.contains("4096 bytes")), "{added:?}");

    let ttl = IssueRequest { ttl_minutes: Some(5), ..IssueRequest::default() };
    let none = IssueRequest { permissions: Some(vec![]), ..ttl.clone() };
    assert!(invalid(l.issue_pat(&actor, none).await).contains("at least one permission"));
    let nowhere = IssueRequest { environments: Some(vec![]), ..ttl.clone() };
    assert!(invalid(l.issue_pat(&actor, nowhere).await).contains("at least one environment"));

    // A display name is kept trimmed, and found again the same way.
    let named = IssueRequest { display_name: Some("  ci  ".into()), ..ttl };
    let t = l.issue_pat(&actor, named).await.unwrap();
    assert_eq!(t.details.display_name.as_deref(), Some("ci"));
    let revoked = l.revoke(&actor, None, Some(" ci "), None).await.unwrap();
    assert_eq!((revoked.id, revoked.status.as_str()), (t.details.id, "revoked"));
}

/// Secrets are hashed with the configured argon2 parameters (here the test config's 256 KiB, one
/// pass, one lane), not the defaults.
#[tokio::test]
async fn secrets_are_hashed_with_the_configured_argon2_parameters() {
    let (store, config, actor) = setup().await;
    let five = IssueRequest { ttl_minutes: Some(5), ..IssueRequest::default() };
    let issued = Lifecycle::new(&store, &config).issue_pat(&actor, five).await.unwrap();
    let id = crate::token::TokenId::parse(&issued.details.id).unwrap();
    let hash = store.get_token(&id).await.unwrap().unwrap().into_inner().secret_hash;
    assert!(hash.starts_with("$argon2id$v=19$m=256,t=1,p=1$"), "{hash}");
}

/// Listing an owner of many tokens (a service rotated hourly for years) took two store reads per
/// token, one after the other.
#[tokio::test]
async fn listing_tokens_takes_a_few_store_reads_however_many_tokens() {
    let backend = Arc::new(MemoryBackend::default());
    let (store, config, actor) = setup_on(backend.clone()).await;
    let l = Lifecycle::new(&store, &config);
    let mut ids = Vec::new();
    for _ in 0..12 {
        let t = l.issue_pat(&actor, IssueRequest { ttl_minutes: Some(5), ..IssueRequest::default() }).await;
        ids.push(t.unwrap().details.id);
    }
    let reads = backend.reads();
    let listed = l.list_tokens(&actor, false, None).await.unwrap();
    assert!(backend.reads() - reads <= 4, "{} reads for 12 tokens", backend.reads() - reads);
    let listed: Vec<String> = listed.into_iter().map(|v| v.id).collect();
    assert_eq!(listed, ids, "all of them, oldest first");
}

#[tokio::test]
async fn a_deleted_services_tokens_and_a_token_revoked_in_its_grace_read_as_revoked() {
    let (store, config, actor) = setup().await;
    let l = Lifecycle::new(&store, &config);
    let req = viewer_service("etl");
    let (_, token) = l.create_service(&actor, req).await.unwrap();
    l.delete_service(&actor, "acme", "etl", None).await.unwrap();
    let view = l.get_token(&actor, &token.details.id).await.unwrap();
    assert_eq!((view.status.as_str(), view.revoke_reason.as_deref()), ("revoked", Some("service deleted")));
    // The token's history says who revoked it, with the rest of the service's.
    let history = l.audit_log(&actor, "acme", Some(&token.details.id), 10).await.unwrap();
    let actions: Vec<&str> = history.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["service.delete", "token.issue"], "{history:?}");

    let old =
        l.issue_pat(&actor, IssueRequest { ttl_minutes: Some(5), ..IssueRequest::default() }).await.unwrap();
    let rotate = RotateRequest { grace_seconds: Some(600), ..RotateRequest::default() };
    l.rotate(&actor, &old.details.id, rotate).await.unwrap();
    assert_eq!(l.get_token(&actor, &old.details.id).await.unwrap().status, "deprecated");
    l.revoke(&actor, Some(&old.details.id), None, Some("leaked".into())).await.unwrap();
    assert_eq!(l.get_token(&actor, &old.details.id).await.unwrap().status, "revoked");
}

#[tokio::test]
async fn a_token_whose_inherited_scope_names_more_than_its_role_can_still_be_rotated() {
    let (store, config, admin) = setup().await;
    let l = Lifecycle::new(&store, &config);
    // A scoped admin token hands its scope (admin included) to a new editor's first token.
    let scope = ["read", "write", "execute", "admin"].map(String::from).to_vec();
    let scoped_admin = Actor { scope: Some(scope.clone()), ..admin };
    let (editor, first) = l
        .add_user(
            &scoped_admin,
            "acme",
            "ed@acme.io",
            Role::Editor,
            BTreeMap::new(),
            Attributes::new(),
            Some(Lifetime::default()),
        )
        .await
        .unwrap();
    let first = first.unwrap();
    let me = Actor {
        subject: format!("user:{}", editor.id),
        user_id: Some(editor.id.clone()),
        roles: RoleSet { org: Role::Editor, projects: BTreeMap::new() },
        scope: Some(scope.clone()),
        ..scoped_admin
    };
    // The editor rotates it with itself: nothing is widened (the role caps it on every request).
    let new = l.rotate(&me, &first.details.id, RotateRequest::default()).await.unwrap();
    assert_eq!(new.details.permissions, Some(scope));
    // Asked for anew, a scope beyond the role is still refused, as at issue.
    let wider = RotateRequest { scope: Some("admin".into()), ..RotateRequest::default() };
    assert!(forbidden(l.rotate(&me, &new.details.id, wider).await).contains("more rights"));
}

#[tokio::test]
async fn a_narrowed_admin_token_hands_on_no_role_its_scope_does_not_cover() {
    let (store, config, mut actor) = setup().await;
    let l = Lifecycle::new(&store, &config);
    l.add_user(&actor, "acme", "bob@acme.io", Role::Viewer, BTreeMap::new(), Attributes::new(), None)
        .await
        .unwrap();
    // An admin's PAT scoped read-write-execute acts as an editor: it may create services (the
    // creator path), but not hand on the admin role it cannot use itself.
    actor.scope = Some(vec!["read".into(), "write".into(), "execute".into()]);
    let admin_service = CreateService { org_role: Some(Role::Admin), ..viewer_service("ops") };
    let why = forbidden(l.create_service(&actor, admin_service).await);
    assert!(why.contains("cannot hand on the admin role"), "{why}");
    let editor_service = CreateService { org_role: Some(Role::Editor), ..viewer_service("etl") };
    l.create_service(&actor, editor_service).await.unwrap();
    let to_admin = RoleChange { org_role: Some(Role::Admin), ..RoleChange::default() };
    let why = forbidden(l.set_service_role(&actor, "acme", "etl", to_admin.clone()).await);
    assert!(why.contains("cannot hand on the admin role"), "{why}");
    // The same for users, through a token that keeps the admin permission but not write.
    actor.scope = Some(vec!["read".into(), "admin".into()]);
    let why = forbidden(l.set_user_role(&actor, "acme", "bob@acme.io", to_admin.clone()).await);
    assert!(why.contains("cannot hand on the admin role"), "{why}");
    let on_shop = RoleChange {
        project: Some("shop".into()),
        project_role: Some(Role::Editor),
        ..RoleChange::default()
    };
    let why = forbidden(l.set_user_role(&actor, "acme", "bob@acme.io", on_shop).await);
    assert!(why.contains("cannot hand on the editor role on project \"shop\""), "{why}");
    let why = forbidden(
        l.add_user(&actor, "acme", "eve@acme.io", Role::Editor, BTreeMap::new(), Attributes::new(), None)
            .await,
    );
    assert!(why.contains("cannot hand on the editor role"), "{why}");
    // Lowering a role adds nothing: allowed through the narrowed token.
    actor.scope = None;
    l.set_user_role(&actor, "acme", "bob@acme.io", to_admin.clone()).await.unwrap();
    actor.scope = Some(vec!["read".into(), "admin".into()]);
    let to_editor = RoleChange { org_role: Some(Role::Editor), ..RoleChange::default() };
    l.set_user_role(&actor, "acme", "bob@acme.io", to_editor).await.unwrap();
    // An unscoped admin later raises what the narrowed one made: the service is capped by its
    // creator's role (admin), not by the creating token.
    actor.scope = None;
    l.set_service_role(&actor, "acme", "etl", to_admin).await.unwrap();
}

#[tokio::test]
async fn roles_whose_permissions_no_higher_role_has_can_still_be_handed_on() {
    // Roles need not nest: a viewer here may `export`, which no admin may.
    let custom = format!("{CONFIG}roles: {{ viewer: [read, export] }}\n");
    let config = Config::parse(&custom).unwrap();
    let (store, _, actor) = setup().await;
    let l = Lifecycle::new(&store, &config);
    l.add_user(&actor, "acme", "v@acme.io", Role::Viewer, BTreeMap::new(), Attributes::new(), None)
        .await
        .unwrap();
    l.create_service(&actor, viewer_service("exporter")).await.unwrap();
    // So may an admin whose token's scope covers the whole admin role.
    let preset =
        Actor { scope: Some(config.policy.scope_preset("admin").unwrap().to_vec()), ..actor.clone() };
    l.create_service(&preset, viewer_service("exporter-2")).await.unwrap();
    // An editor, who cannot export, does not get to through a service it creates (and holds the
    // token of).
    let editor = editor(&store, &actor).await;
    let why = forbidden(l.create_service(&editor, viewer_service("exporter-3")).await);
    assert!(why.contains("its org role (viewer) would carry export,"), "{why}");
    // Nor when an admin later "lowers" the editor's service to viewer.
    let mine = CreateService { org_role: Some(Role::Editor), ..viewer_service("editors") };
    l.create_service(&editor, mine).await.unwrap();
    let to_viewer = RoleChange { org_role: Some(Role::Viewer), ..RoleChange::default() };
    let why = forbidden(l.set_service_role(&actor, "acme", "editors", to_viewer).await);
    assert!(why.contains("which its creator did not hold when creating it (as editor)"), "{why}");
}

#[tokio::test]
async fn services_are_not_probed_by_non_managers_nor_deleted_or_demoted_by_themselves() {
    let (store, config, actor) = setup().await;
    let l = Lifecycle::new(&store, &config);
    let ops = CreateService { org_role: Some(Role::Admin), ..viewer_service("ops") };
    let (ops, _) = l.create_service(&actor, ops).await.unwrap();

    // A viewer learns nothing from a name: the same refusal whether the service exists or not.
    let viewer = Actor { roles: RoleSet { org: Role::Viewer, projects: BTreeMap::new() }, ..actor.clone() };
    for name in ["ops", "nope"] {
        let why = forbidden(l.edit_service(&viewer, "acme", name, None, Some(Attributes::new())).await);
        assert!(why.contains("only org admins"), "{name}: {why}");
        assert!(
            forbidden(l.delete_service(&viewer, "acme", name, None).await).contains("only org admins"),
            "{name}"
        );
    }

    // Nor does an editor whose token may not write, nor a service that is no admin: neither lists
    // services nor sees one, whether its name exists or not. An editor whose token writes does.
    let editor = Actor { roles: RoleSet { org: Role::Editor, projects: BTreeMap::new() }, ..actor.clone() };
    let reader = Actor { scope: Some(vec!["read".into()]), ..editor.clone() };
    let editor_service = Actor {
        subject: "service:etl".into(),
        user_id: None,
        service_id: Some("s_etl".into()),
        ..editor.clone()
    };
    for who in [&reader, &editor_service] {
        let why = forbidden(l.list_services(who, "acme").await);
        assert!(why.contains("services are seen by"), "{}: {why}", who.subject);
        for name in ["ops", "nope"] {
            let why = forbidden(l.show_service(who, "acme", name).await);
            assert!(why.contains("services are seen by"), "{} {name}: {why}", who.subject);
        }
    }
    assert_eq!(l.list_services(&editor, "acme").await.unwrap().len(), 1);
    assert_eq!(l.show_service(&editor, "acme", "ops").await.unwrap().name, "ops");

    // An admin service acting as an org admin may not remove or demote itself.
    let itself = Actor {
        subject: "service:ops".into(),
        user_id: None,
        service_id: Some(ops.id.clone()),
        roles: RoleSet { org: Role::Admin, projects: BTreeMap::new() },
        ..actor.clone()
    };
    assert!(forbidden(l.delete_service(&itself, "acme", "ops", None).await).contains("may not delete itself"));
    let demote = RoleChange { org_role: Some(Role::Viewer), ..RoleChange::default() };
    let why = forbidden(l.set_service_role(&itself, "acme", "ops", demote).await);
    assert!(why.contains("may not change its own role"), "{why}");
    // It adds users, but issues none a first token: it would hold a person's credential (an
    // admin's, here), and act as them beyond what services may.
    let first = Some(Lifetime { ttl_minutes: Some(30), expires: None });
    let roles = BTreeMap::new();
    let why = forbidden(
        l.add_user(&itself, "acme", "m@acme.io", Role::Admin, roles.clone(), Attributes::new(), first).await,
    );
    assert!(why.contains("not by a service"), "{why}");
    assert!(store.find_user_by_email("acme", "m@acme.io").await.unwrap().is_none(), "nothing added");
    l.add_user(&itself, "acme", "m@acme.io", Role::Viewer, roles, Attributes::new(), None).await.unwrap();
    l.delete_service(&actor, "acme", "ops", None).await.unwrap();
}

#[tokio::test]
async fn a_service_gets_no_permission_its_creator_lacks_on_the_creators_own_projects() {
    // Here an editor may deploy and an admin may not; Ann is an editor with admin on shop, so on
    // shop she cannot deploy, and a service she makes as editor would there.
    let custom = format!("{CONFIG}roles: {{ editor: [read, write, execute, deploy] }}\n");
    let config = Config::parse(&custom).unwrap();
    let (store, _, admin) = setup().await;
    let l = Lifecycle::new(&store, &config);
    let ann = Actor {
        roles: RoleSet { org: Role::Editor, projects: BTreeMap::from([("shop".to_string(), Role::Admin)]) },
        ..admin
    };
    let editor_service = CreateService { org_role: Some(Role::Editor), ..viewer_service("deployer") };
    let why = forbidden(l.create_service(&ann, editor_service).await);
    assert!(why.contains("its role on project \"shop\" (editor) would carry deploy"), "{why}");
}

#[tokio::test]
async fn a_service_made_before_its_roles_stopped_nesting_can_still_be_lowered() {
    let (store, config, admin) = setup().await;
    let editor = editor(&store, &admin).await;
    let reporter = CreateService {
        project_roles: BTreeMap::from([("shop".to_string(), Role::Viewer)]),
        ..viewer_service("reporter")
    };
    Lifecycle::new(&store, &config).create_service(&editor, reporter).await.unwrap();
    // Then a viewer may export, which the editor who made it may not: lowering adds nothing and
    // goes ahead, raising it back would add export and does not.
    let custom = Config::parse(&format!("{CONFIG}roles: {{ viewer: [read, export] }}\n")).unwrap();
    let l = Lifecycle::new(&store, &custom);
    let remove = RoleChange { project: Some("shop".into()), remove: true, ..RoleChange::default() };
    l.set_service_role(&admin, "acme", "reporter", remove).await.unwrap();
    let to_guest = RoleChange { org_role: Some(Role::Guest), ..RoleChange::default() };
    l.set_service_role(&admin, "acme", "reporter", to_guest).await.unwrap();
    let back = RoleChange { org_role: Some(Role::Viewer), ..RoleChange::default() };
    let why = forbidden(l.set_service_role(&admin, "acme", "reporter", back).await);
    assert!(why.contains("its org role (viewer) would carry export"), "{why}");
}

#[tokio::test]
async fn a_tokens_history_outlives_a_flood_of_credentials_minted() {
    // The minted list full of entries newer than a PAT's issue: `audit --token-id` still finds it
    // (the two lists were merged and cut before the filter, which then found nothing).
    let (store, mut config, actor) = setup().await;
    config.audit_max = 3;
    let store = store.with_audit_max(3);
    let l = Lifecycle::new(&store, &config);
    let pat =
        l.issue_pat(&actor, IssueRequest { ttl_minutes: Some(5), ..IssueRequest::default() }).await.unwrap();
    for i in 0..3 {
        let minted = AuditEvent {
            at: now_millis() + 1000 + i,
            org: "acme".into(),
            actor: "service:etl".into(),
            action: "credentials.issue".into(),
            target: "project:shop".into(),
            token_id: Some("tgs_aaaaaa".into()),
            by_token: None,
            actor_email: None,
            reason: None,
            details: serde_json::Value::Null,
        };
        store.append_credentials_audit(&minted).await.unwrap();
    }
    let history = l.audit_log(&actor, "acme", Some(&pat.details.id), 10).await.unwrap();
    assert_eq!(history.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(), ["token.issue"], "{history:?}");
    // Unfiltered, the newest entries of both, cut to the limit.
    let newest = l.audit_log(&actor, "acme", None, 2).await.unwrap();
    assert!(newest.iter().all(|e| e.action == "credentials.issue"), "{newest:?}");
    assert_eq!(l.audit_log(&actor, "acme", None, 10).await.unwrap().len(), 4);
}

/// The CLI reads an audit entry's time as RFC 3339, and as the epoch milliseconds an older
/// gateway sends.
#[test]
fn an_audit_entry_reads_its_time_in_either_form() {
    let entry = |at: serde_json::Value| -> AuditEntry {
        serde_json::from_value(serde_json::json!({
            "at": at, "org": "acme", "actor": "bootstrap", "action": "token.issue", "target": "x",
            "token_id": null, "reason": null, "details": null,
        }))
        .unwrap()
    };
    assert_eq!(entry(serde_json::json!(1_764_220_000_000i64)).at.0, "2025-11-27T05:06:40Z");
    assert_eq!(entry(serde_json::json!("2026-11-27T06:30:00Z")).at.0, "2026-11-27T06:30:00Z");
}

#[tokio::test]
async fn a_service_token_rotated_by_its_manager_is_stored_only_while_the_service_is_as_read() {
    let backend = Arc::new(MemoryBackend::default());
    let (store, config, actor) = setup_on(backend.clone()).await;
    let l = Lifecycle::new(&store, &config);
    let (service, token) = l.create_service(&actor, viewer_service("etl")).await.unwrap();
    // The service's record changes (a role given, say) after the rotation read it.
    let id = service.id.clone();
    backend.before_next_commit(move |(kv, _)| {
        let (_, record) = kv.iter_mut().find(|(k, v)| k.contains(&id) && v.contains("\"org_role\"")).unwrap();
        record.push(' ');
    });
    let rotated = l.rotate(&actor, &token.details.id, RotateRequest::default()).await;
    assert!(matches!(rotated, Err(LifecycleError::Store(StoreError::Changed(_)))), "{rotated:?}");
    let old = TokenId::parse(&token.details.id).unwrap();
    assert!(store.get_token(&old).await.unwrap().unwrap().revoked.is_none(), "nothing rotated");
}

/// An owner holds at most `tokens.max_per_owner` working tokens: another is refused (409) until
/// one is revoked; a service's by issue as a user's; a rotation is not counted against it.
#[tokio::test]
async fn an_owner_holds_at_most_the_configured_working_tokens() {
    let (store, _, actor) = setup().await;
    let config = Config::parse(&CONFIG.replace("max_ttl: 1h }", "max_ttl: 1h, max_per_owner: 2 }")).unwrap();
    let l = Lifecycle::new(&store, &config);
    let issue = || l.issue_pat(&actor, IssueRequest { ttl_minutes: Some(5), ..IssueRequest::default() });
    let first = issue().await.unwrap();
    issue().await.unwrap();
    let refused = issue().await;
    assert!(
        matches!(&refused, Err(LifecycleError::Conflict(m)) if m.contains("tokens.max_per_owner")),
        "{refused:?}"
    );
    // A rotation replaces one: not refused.
    let rotated = l.rotate(&actor, &first.details.id, RotateRequest::default()).await.unwrap();
    l.revoke(&actor, Some(&rotated.details.id), None, None).await.unwrap();
    issue().await.expect("room again once one is revoked");

    let (service, _) = l.create_service(&actor, viewer_service("etl")).await.unwrap();
    let for_service = |name: &str| IssueRequest {
        ttl_minutes: Some(5),
        service: Some(name.to_string()),
        ..IssueRequest::default()
    };
    l.issue_pat(&actor, for_service(&service.name)).await.unwrap();
    let refused = l.issue_pat(&actor, for_service(&service.name)).await;
    assert!(matches!(&refused, Err(LifecycleError::Conflict(_))), "{refused:?}");
}

/// Issues at the same moment each read the owner's tokens before the others store theirs: the
/// cap still holds, and far from it they do not refuse each other.
#[tokio::test]
async fn issues_at_the_same_moment_do_not_pass_the_cap_together() {
    let backend = Arc::new(MemoryBackend::default());
    let (store, _, actor) = setup_on(backend.clone()).await;
    let config = Config::parse(&CONFIG.replace("max_ttl: 1h }", "max_ttl: 1h, max_per_owner: 3 }")).unwrap();
    let l = Lifecycle::new(&store, &config);
    let issue = || l.issue_pat(&actor, IssueRequest { ttl_minutes: Some(5), ..IssueRequest::default() });
    // Another issue lands between this one's count and its write.
    let another_lands = || {
        let user = actor.user_id.clone().unwrap();
        backend.before_next_commit(move |(_, sets)| {
            let (_, ids) = sets.iter_mut().find(|(k, _)| k.contains(&user)).unwrap();
            ids.insert(format!("tgp_{}", ids.len()));
        });
    };
    issue().await.unwrap();
    another_lands();
    issue().await.expect("two working, one landing meanwhile: three, the cap");
    another_lands();
    let refused = issue().await;
    assert!(matches!(&refused, Err(LifecycleError::Store(StoreError::Changed(_)))), "{refused:?}");
}
