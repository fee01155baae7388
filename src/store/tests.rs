//! Store semantics on the in-memory backend; the integration tests run the same operations on Redis.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;

use super::memory::MemoryBackend;
use super::*;
use crate::lifecycle;
use crate::policy::Role;

fn store() -> Store {
    Store::new(Arc::new(MemoryBackend::default()), Duration::from_millis(200))
}

#[tokio::test]
async fn unique_keys_conflict_and_change_nothing() {
    let s = store();
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
    assert!(matches!(again, Err(lifecycle::LifecycleError::Store(StoreError::Conflict(_)))), "{again:?}");
    assert_eq!(s.list_users("acme").await.unwrap(), vec![user.clone()]);
    assert_eq!(s.find_user_by_email("acme", "ann@example.com").await.unwrap(), Some(user));
    // Another org may use the same email.
    lifecycle::create_user(&s, "other", "ann@example.com", Role::Admin, BTreeMap::new(), Attributes::new())
        .await
        .unwrap();
}

#[tokio::test]
async fn writes_publish_invalidations() {
    let s = store();
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
    s.delete_service(&svc).await.unwrap();
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
