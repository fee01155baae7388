//! Store semantics, run against every backend: memory, embedded, and Redis when a `redis-server`
//! binary is installed (the integration tests always need one; .ci/run installs it).

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;

use super::memory::MemoryBackend;
use super::*;
use crate::lifecycle;
use crate::policy::Role;

/// A store per backend. The returned guard keeps temporary files and servers alive.
fn stores() -> Vec<(Store, Box<dyn std::any::Any>)> {
    let timeout = Duration::from_millis(500);
    let mut out: Vec<(Store, Box<dyn std::any::Any>)> =
        vec![(Store::new(Arc::new(MemoryBackend::default()), timeout), Box::new(()))];
    let dir = tempfile::tempdir().unwrap();
    let embedded = embedded::EmbeddedBackend::open(&dir.path().join("sub/store.redb")).unwrap();
    out.push((Store::new(Arc::new(embedded), timeout), Box::new(dir)));
    if let Some(server) = RedisServer::start() {
        let backend = redis::RedisBackend::new(&server.url(), "test:", timeout).unwrap();
        out.push((Store::new(Arc::new(backend), timeout), Box::new(server)));
    }
    out
}

/// A throwaway `redis-server` for the store tests.
struct RedisServer {
    port: u16,
    child: std::process::Child,
}

impl RedisServer {
    fn start() -> Option<RedisServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(RedisServer { port, child });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn unique_keys_conflict_and_change_nothing() {
    for (s, _guard) in stores() {
        unique_keys_conflict(&s).await;
    }
}

async fn unique_keys_conflict(s: &Store) {
    let s = s.clone();
    let user = lifecycle::create_user(
        &s,
        "acme",
        "Ann@Example.com",
        Role::Viewer,
        BTreeMap::new(),
        Attributes::new(),
    )
    .await
    .unwrap();
    let again = lifecycle::create_user(
        &s,
        "acme",
        "ann@example.com",
        Role::Admin,
        BTreeMap::new(),
        Attributes::new(),
    )
    .await;
    assert!(matches!(again, Err(lifecycle::LifecycleError::Conflict(_))), "{again:?}");
    assert_eq!(s.list_users("acme").await.unwrap(), vec![user.clone()]);
    assert_eq!(s.find_user_by_email("acme", "ann@example.com").await.unwrap(), Some(user));
    // Another org may use the same email.
    lifecycle::create_user(&s, "other", "ann@example.com", Role::Admin, BTreeMap::new(), Attributes::new())
        .await
        .unwrap();
}

#[tokio::test]
async fn writes_publish_invalidations() {
    for (s, _guard) in stores() {
        writes_publish(&s).await;
    }
}

async fn writes_publish(s: &Store) {
    let s = s.clone();
    let mut feed = s.subscribe().await.unwrap();
    let svc = lifecycle::create_service(
        &s,
        "acme",
        "etl",
        Some(Role::Viewer),
        BTreeMap::new(),
        Attributes::new(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(feed.next().await, Some(Invalidation::Service(svc.id.clone())));
    let (token, record) = lifecycle::issue_token(
        &s,
        crate::token::Argon2Params { memory_kib: 256, iterations: 1, parallelism: 1 },
        "acme",
        Owner::Service(svc.id.clone()),
        lifecycle::TokenSpec::default(),
    )
    .await
    .unwrap();
    assert_eq!(feed.next().await, Some(Invalidation::Token(token.id.clone())));
    assert_eq!(s.list_owner_tokens(&Owner::Service(svc.id.clone())).await.unwrap(), vec![record]);
    s.revoke_token(&token.id, Some("leaked".into()), Some("u_admin".into())).await.unwrap();
    assert_eq!(feed.next().await, Some(Invalidation::Token(token.id.clone())));
    assert!(s.get_token(&token.id).await.unwrap().unwrap().is_revoked(now_millis()));
    s.delete_service(&svc, None).await.unwrap();
    assert_eq!(feed.next().await, Some(Invalidation::Service(svc.id.clone())));
    assert_eq!(s.get_service(&svc.id).await.unwrap(), None);
    assert_eq!(s.find_service_by_name("acme", "etl").await.unwrap(), None);
}

#[test]
fn invalidation_wire_form_round_trips() {
    let id = crate::token::generate(crate::token::TokenKind::Pat).id;
    for inv in
        [Invalidation::Token(id), Invalidation::User("u_1".into()), Invalidation::Service("s_1".into())]
    {
        assert_eq!(Invalidation::decode(&inv.encode()), Some(inv));
    }
    assert_eq!(Invalidation::decode("token:nope"), None);
    assert_eq!(Invalidation::decode("garbage"), None);
}

#[tokio::test]
async fn the_embedded_store_keeps_its_data_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let open =
        || Store::new(Arc::new(embedded::EmbeddedBackend::open(&path).unwrap()), Duration::from_millis(500));
    let user = {
        let s = open();
        lifecycle::create_user(&s, "acme", "a@x.io", Role::Admin, BTreeMap::new(), Attributes::new())
            .await
            .unwrap()
    };
    let s = open();
    assert_eq!(s.get_user(&user.id).await.unwrap(), Some(user));
    // A second process cannot open the same file while it is open.
    assert!(embedded::EmbeddedBackend::open(&path).is_err());
}

#[tokio::test]
async fn a_change_to_a_record_read_before_another_change_is_refused_on_every_backend() {
    for (s, _guard) in stores() {
        let user =
            lifecycle::create_user(&s, "acme", "r@x.io", Role::Viewer, BTreeMap::new(), Attributes::new())
                .await
                .unwrap();
        let (mut suspended, mut promoted) = (user.clone(), user.clone());
        suspended.status = UserStatus::Suspended;
        promoted.org_role = Role::Admin;
        s.update_user(&user, &suspended, None).await.unwrap();
        // The second writer read the user before the suspension: refused, the suspension stays.
        let lost = s.update_user(&user, &promoted, None).await;
        assert!(matches!(lost, Err(StoreError::Changed(_))), "{}: {lost:?}", s.describe());
        assert_eq!(s.get_user(&user.id).await.unwrap(), Some(suspended.clone()), "{}", s.describe());
        // A deleted service cannot be written back.
        let svc =
            lifecycle::create_service(&s, "acme", "etl", None, BTreeMap::new(), Attributes::new(), None)
                .await
                .unwrap();
        s.delete_service(&svc, None).await.unwrap();
        let mut renamed = svc.clone();
        renamed.org_role = Some(Role::Admin);
        assert!(matches!(s.update_service(&svc, &renamed, None).await, Err(StoreError::Changed(_))));
        assert_eq!(s.get_service(&svc.id).await.unwrap(), None, "{}", s.describe());
    }
}

#[tokio::test]
async fn the_audit_log_is_bounded_newest_first_on_every_backend() {
    for (s, _guard) in stores() {
        let s = s.with_audit_max(3);
        let svc = lifecycle::create_service(
            &s,
            "acme",
            "etl",
            Some(Role::Viewer),
            BTreeMap::new(),
            Attributes::new(),
            None,
        )
        .await
        .unwrap();
        for i in 0..5 {
            let event = AuditEvent {
                at: i,
                org: "acme".into(),
                actor: "user:u_1".into(),
                action: format!("step.{i}"),
                target: "service:etl".into(),
                token_id: None,
                reason: None,
                details: serde_json::Value::Null,
            };
            s.update_service(&svc, &svc, Some(&event)).await.unwrap();
        }
        let actions: Vec<String> =
            s.audit_log("acme", 100).await.unwrap().into_iter().map(|e| e.action).collect();
        assert_eq!(actions, ["step.4", "step.3", "step.2"], "{}", s.describe());
        assert_eq!(s.audit_log("acme", 1).await.unwrap().len(), 1);
        assert!(s.audit_log("other", 10).await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn a_new_owner_and_its_first_token_are_stored_together_or_not_at_all() {
    for (s, _guard) in stores() {
        let params = crate::token::Argon2Params { memory_kib: 64, iterations: 1, parallelism: 1 };
        let ann =
            lifecycle::create_user(&s, "acme", "ann@x.io", Role::Viewer, BTreeMap::new(), Attributes::new())
                .await
                .unwrap();
        let owner = Owner::User(ann.id.clone());
        let (_, taken) =
            lifecycle::issue_token(&s, params, "acme", owner, lifecycle::TokenSpec::default()).await.unwrap();
        // Bob's write carries a token whose id is taken: the whole change is refused, Bob included.
        let bob = User { id: "u_bob".into(), email: "bob@x.io".into(), ..ann.clone() };
        let first = FirstToken { token: &taken, audit: None };
        let refused = s.create_user(&bob, None, Some(first)).await;
        assert!(matches!(refused, Err(StoreError::Conflict(_))), "{refused:?}");
        assert_eq!(s.find_user_by_email("acme", "bob@x.io").await.unwrap(), None);
        assert_eq!(s.list_users("acme").await.unwrap(), vec![ann.clone()]);
        let svc = Service {
            id: "s_etl".into(),
            org: "acme".into(),
            name: "etl".into(),
            org_role: Some(Role::Viewer),
            project_roles: BTreeMap::new(),
            attributes: Attributes::new(),
            created_by: None,
            creator_roles: None,
            created_at: 0,
        };
        let refused = s.create_service(&svc, None, Some(FirstToken { token: &taken, audit: None })).await;
        assert!(matches!(refused, Err(StoreError::Conflict(_))), "{refused:?}");
        assert!(s.list_services("acme").await.unwrap().is_empty());
    }
}
