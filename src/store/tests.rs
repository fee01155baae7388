//! Store semantics, run against every backend: memory, embedded, and Redis (a real `redis-server`,
//! which must be installed, as for the integration tests; .ci/run installs it).

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
    let server = crate::testing::RedisServer::start(["--save", "", "--appendonly", "no"]);
    // A prefix starting with the commit script's "changed" tag: a taken key still reads as taken.
    let backend = redis::RedisBackend::new(&server.url(), "~test:", timeout).unwrap();
    out.push((Store::new(Arc::new(backend), timeout), Box::new(server)));
    out
}

/// The feed's next message, or a failure after 10 s (never a hang).
async fn next(feed: &mut InvalidationStream) -> Option<Invalidation> {
    tokio::time::timeout(Duration::from_secs(10), feed.next()).await.expect("an invalidation within 10 s")
}

/// The records read, without the text they were read from.
fn records<T>(read: Vec<Stored<T>>) -> Vec<T> {
    read.into_iter().map(Stored::into_inner).collect()
}

fn record<T>(read: Option<Stored<T>>) -> Option<T> {
    read.map(Stored::into_inner)
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
    assert_eq!(records(s.list_users("acme").await.unwrap()), vec![user.clone()]);
    assert_eq!(record(s.find_user_by_email("acme", "ann@example.com").await.unwrap()), Some(user));
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

/// A viewer service `etl` in org `acme`.
async fn etl(s: &Store) -> Service {
    lifecycle::create_service(s, "acme", "etl", Some(Role::Viewer), BTreeMap::new(), Attributes::new(), None)
        .await
        .unwrap()
}

/// A new token of `svc`.
async fn service_token(s: &Store, svc: &Service) -> (crate::token::NewToken, TokenRecord) {
    let params = crate::token::Argon2Params { memory_kib: 256, iterations: 1, parallelism: 1 };
    let owner = Owner::Service(svc.id.clone());
    lifecycle::issue_token(s, params, "acme", owner, lifecycle::TokenSpec::default()).await.unwrap()
}

async fn writes_publish(s: &Store) {
    let s = s.clone();
    let mut feed = s.subscribe().await.unwrap();
    let svc = etl(&s).await;
    assert_eq!(next(&mut feed).await, Some(Invalidation::Service(svc.id.clone())));
    let (token, record) = service_token(&s, &svc).await;
    assert_eq!(next(&mut feed).await, Some(Invalidation::Token(token.id.clone())));
    assert_eq!(records(s.list_owner_tokens(&Owner::Service(svc.id.clone())).await.unwrap()), vec![record]);
    s.revoke_token(&token.id, Some("leaked".into()), Some("u_admin".into())).await.unwrap();
    assert_eq!(next(&mut feed).await, Some(Invalidation::Token(token.id.clone())));
    assert!(s.get_token(&token.id).await.unwrap().unwrap().is_revoked(now_millis()));
    // Its one token, revoked already, is left as it is.
    let none = Revoking { members: 1, tokens: vec![] };
    s.delete_service(&s.get_service(&svc.id).await.unwrap().unwrap(), &none, None, None).await.unwrap();
    assert_eq!(next(&mut feed).await, Some(Invalidation::Service(svc.id.clone())));
    assert!(s.get_service(&svc.id).await.unwrap().is_none());
    assert!(s.find_service_by_name("acme", "etl").await.unwrap().is_none());
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

/// An invalidation this build cannot read (a newer build's, in a rolling upgrade) names records it
/// cannot tell: the feed ends, as for a feed lost, so the cache is dropped rather than kept stale.
#[tokio::test]
async fn an_unreadable_invalidation_ends_the_redis_feed() {
    let server = crate::testing::RedisServer::start(["--save", "", "--appendonly", "no"]);
    let backend = redis::RedisBackend::new(&server.url(), "tg:", Duration::from_millis(500)).unwrap();
    let s = Store::new(Arc::new(backend), Duration::from_millis(500));
    let mut feed = s.subscribe().await.unwrap();
    let svc = etl(&s).await;
    assert_eq!(next(&mut feed).await, Some(Invalidation::Service(svc.id.clone())));
    let _: i64 = ::redis::cmd("PUBLISH")
        .arg("tg:invalidate")
        .arg("token:v2-format")
        .query(&mut server.client())
        .unwrap();
    assert_eq!(next(&mut feed).await, None);
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
    assert_eq!(record(s.get_user(&user.id).await.unwrap()), Some(user));
    // A second process cannot open the same file while it is open.
    assert!(embedded::EmbeddedBackend::open(&path).is_err());
    // Its owner alone may read it: it holds emails, attributes, the audit log, secret hashes.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
}

/// redb panics on some damaged files; the store names the file and says what to do instead.
#[test]
fn a_damaged_embedded_store_is_an_error_naming_the_file_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    drop(embedded::EmbeddedBackend::open(&path).unwrap());
    let whole = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.redb");
    std::fs::write(&cut, &whole[..whole.len().min(4096)]).unwrap();
    let Err(e) = embedded::EmbeddedBackend::open(&cut) else { panic!("a truncated store opened") };
    let message = e.to_string();
    assert!(message.contains("cut.redb") && message.contains("damaged"), "{message}");
}

#[tokio::test]
async fn a_change_to_a_record_read_before_another_change_is_refused_on_every_backend() {
    for (s, _guard) in stores() {
        let user =
            lifecycle::create_user(&s, "acme", "r@x.io", Role::Viewer, BTreeMap::new(), Attributes::new())
                .await
                .unwrap();
        let read = s.get_user(&user.id).await.unwrap().unwrap();
        let (mut suspended, mut promoted) = (user.clone(), user.clone());
        suspended.status = UserStatus::Suspended;
        promoted.org_role = Role::Admin;
        s.update_user(&read, &suspended, None, None).await.unwrap();
        // The second writer read the user before the suspension: refused, the suspension stays.
        let lost = s.update_user(&read, &promoted, None, None).await;
        assert!(matches!(lost, Err(StoreError::Changed(_))), "{}: {lost:?}", s.describe());
        assert_eq!(record(s.get_user(&user.id).await.unwrap()), Some(suspended.clone()), "{}", s.describe());
        // A deleted service cannot be written back.
        let svc =
            lifecycle::create_service(&s, "acme", "etl", None, BTreeMap::new(), Attributes::new(), None)
                .await
                .unwrap();
        let read = s.get_service(&svc.id).await.unwrap().unwrap();
        s.delete_service(&read, &Revoking::default(), None, None).await.unwrap();
        let mut renamed = svc.clone();
        renamed.org_role = Some(Role::Admin);
        assert!(matches!(s.update_service(&read, &renamed, None, None).await, Err(StoreError::Changed(_))));
        assert!(s.get_service(&svc.id).await.unwrap().is_none(), "{}", s.describe());
        // A service renamed after it was read for deletion is not deleted (its new name would stay
        // taken by nothing).
        let svc =
            lifecycle::create_service(&s, "acme", "etl2", None, BTreeMap::new(), Attributes::new(), None)
                .await
                .unwrap();
        let read = s.get_service(&svc.id).await.unwrap().unwrap();
        let renamed = Service { name: "etl3".into(), ..svc.clone() };
        s.update_service(&read, &renamed, None, None).await.unwrap();
        let refused = s.delete_service(&read, &Revoking::default(), None, None).await;
        assert!(matches!(refused, Err(StoreError::Changed(_))), "{}: {refused:?}", s.describe());
        assert!(s.find_service_by_name("acme", "etl3").await.unwrap().is_some(), "{}", s.describe());
    }
}

/// An unchanged write of `svc` with the audit entry `step.<i>`.
async fn audited_step(s: &Store, svc: &Service, i: Millis) {
    let event = AuditEvent {
        at: i,
        org: "acme".into(),
        actor: "user:u_1".into(),
        action: format!("step.{i}"),
        target: "service:etl".into(),
        token_id: None,
        by_token: None,
        actor_email: None,
        reason: None,
        details: serde_json::Value::Null,
    };
    let read = s.get_service(&svc.id).await.unwrap().unwrap();
    s.update_service(&read, svc, Some(&event), None).await.unwrap();
}

#[tokio::test]
async fn the_audit_log_is_bounded_newest_first_on_every_backend() {
    for (s, _guard) in stores() {
        let s = s.with_audit_max(3);
        let svc = etl(&s).await;
        for i in 0..5 {
            audited_step(&s, &svc, i).await;
        }
        let actions: Vec<String> =
            s.audit_log("acme", 100).await.unwrap().into_iter().map(|e| e.action).collect();
        assert_eq!(actions, ["step.4", "step.3", "step.2"], "{}", s.describe());
        assert_eq!(s.audit_log("acme", 1).await.unwrap().len(), 1);
        assert!(s.audit_log("other", 10).await.unwrap().is_empty());
        // An entry that cannot be read hides none of the others.
        let mut b = Batch::default();
        b.lpush.push((audit_key("acme"), "{\"at\": \"not a time\"".into(), 3));
        s.commit(b).await.unwrap();
        audited_step(&s, &svc, 5).await;
        let corrupt = s.stats().corrupt.get();
        let actions: Vec<String> =
            s.audit_log("acme", 100).await.unwrap().into_iter().map(|e| e.action).collect();
        assert_eq!(actions, ["step.5", "step.4"], "{}", s.describe());
        // And it is counted as any unreadable record is (the log line then at most one a second).
        assert_eq!(s.stats().corrupt.get(), corrupt + 1, "{}", s.describe());
    }
}

/// A search for old entries (`tollgate audit --token-id`) may read the whole log, which may hold
/// millions: it reads a page per store command, not all of it in one.
#[tokio::test]
async fn an_audit_search_reads_the_log_a_page_per_command_and_finds_the_oldest_entries() {
    let actions = |events: Vec<AuditEvent>| events.into_iter().map(|e| e.action).collect::<Vec<_>>();
    for (s, _guard) in stores() {
        let s = s.with_audit_max(8);
        let svc = etl(&s).await;
        for i in 0..10 {
            audited_step(&s, &svc, i).await;
        }
        let found =
            s.audit_search("acme", 5, 3, |e| e.action == "step.2" || e.action == "step.7").await.unwrap();
        assert_eq!(actions(found), ["step.7", "step.2"], "{}", s.describe());
        let all = s.audit_search("acme", 100, 3, |_| true).await.unwrap();
        let kept: Vec<String> = (2..10).rev().map(|i| format!("step.{i}")).collect();
        assert_eq!(actions(all), kept, "{}", s.describe());
        let newest = s.audit_search("acme", 4, 3, |_| true).await.unwrap();
        assert_eq!(actions(newest), kept[..4], "{}", s.describe());
    }
    // Counted: eight entries in pages of three are three commands, and one for the empty list of
    // credentials minted; a search that has found enough stops.
    let backend = Arc::new(MemoryBackend::default());
    let s = Store::new(backend.clone(), Duration::from_millis(500)).with_audit_max(8);
    let svc = etl(&s).await;
    for i in 0..10 {
        audited_step(&s, &svc, i).await;
    }
    let before = backend.reads();
    s.audit_search("acme", 5, 3, |_| false).await.unwrap();
    assert_eq!(backend.reads() - before, 4);
    let before = backend.reads();
    s.audit_search("acme", 2, 3, |_| true).await.unwrap();
    assert_eq!(backend.reads() - before, 2);
}

/// Cheap argon2 settings for the tokens these tests make.
const CHEAP: crate::token::Argon2Params =
    crate::token::Argon2Params { memory_kib: 64, iterations: 1, parallelism: 1 };

/// A viewer of org acme, `ann@x.io`, and her as a token owner.
async fn ann(s: &Store) -> (User, Owner) {
    let ann = lifecycle::create_user(s, "acme", "ann@x.io", Role::Viewer, BTreeMap::new(), Attributes::new())
        .await
        .unwrap();
    let owner = Owner::User(ann.id.clone());
    (ann, owner)
}

#[tokio::test]
async fn a_new_owner_and_its_first_token_are_stored_together_or_not_at_all() {
    for (s, _guard) in stores() {
        let params = CHEAP;
        let (ann, owner) = ann(&s).await;
        let (_, taken) =
            lifecycle::issue_token(&s, params, "acme", owner, lifecycle::TokenSpec::default()).await.unwrap();
        // Bob's write carries a token whose id is taken: the whole change is refused, Bob included.
        let bob = User { id: "u_bob".into(), email: "bob@x.io".into(), ..ann.clone() };
        let first = FirstToken { token: &taken, audit: None };
        let refused = s.create_user(&bob, None, Some(first), None).await;
        assert!(matches!(refused, Err(StoreError::Conflict(_))), "{refused:?}");
        assert!(s.find_user_by_email("acme", "bob@x.io").await.unwrap().is_none());
        assert_eq!(records(s.list_users("acme").await.unwrap()), vec![ann.clone()]);
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
        let refused =
            s.create_service(&svc, None, Some(FirstToken { token: &taken, audit: None }), None).await;
        assert!(matches!(refused, Err(StoreError::Conflict(_))), "{refused:?}");
        assert!(s.list_services("acme").await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn a_record_that_does_not_write_out_as_it_was_stored_can_still_be_changed_on_every_backend() {
    for (s, _guard) in stores() {
        // A double that serde_json writes as 989.9951327998887 and reads back as the next one up,
        // which it writes as ...888.
        let score = f64::from_bits(0x408e_eff6_082f_7597);
        let attributes: Attributes = [("score".to_string(), serde_json::json!(score))].into_iter().collect();
        let user = lifecycle::create_user(&s, "acme", "f@x.io", Role::Viewer, BTreeMap::new(), attributes)
            .await
            .unwrap();
        let read = s.get_user(&user.id).await.unwrap().unwrap();
        assert_ne!(
            serde_json::to_string(&*read).unwrap(),
            serde_json::to_string(&user).unwrap(),
            "the case under test: the record read back does not write out as it was stored"
        );
        let mut suspended = (*read).clone();
        suspended.status = UserStatus::Suspended;
        s.update_user(&read, &suspended, None, None).await.unwrap();
        assert_eq!(
            s.get_user(&user.id).await.unwrap().unwrap().status,
            UserStatus::Suspended,
            "{}",
            s.describe()
        );

        // A record stored without a field that has a default (as an older version wrote it).
        let mut b = Batch::default();
        let old = r#"{"id":"u_old","org":"acme","email":"o@x.io","status":"active","org_role":"viewer","created_at":1}"#;
        b.put.push((user_key("u_old"), old.to_string()));
        s.commit(b).await.unwrap();
        let read = s.get_user("u_old").await.unwrap().unwrap();
        let mut promoted = (*read).clone();
        promoted.org_role = Role::Editor;
        s.update_user(&read, &promoted, None, None).await.unwrap();
        assert_eq!(s.get_user("u_old").await.unwrap().unwrap().org_role, Role::Editor, "{}", s.describe());
    }
}

#[tokio::test]
async fn two_admins_demoting_each_other_at_once_cannot_both_succeed_on_every_backend() {
    for (s, _guard) in stores() {
        let create = |email: &'static str| {
            lifecycle::create_user(&s, "acme", email, Role::Admin, BTreeMap::new(), Attributes::new())
        };
        let (ann, bob) = (create("ann@x.io").await.unwrap(), create("bob@x.io").await.unwrap());
        // Both read both records, then each demotes the other.
        let (ann_read, bob_read) =
            (s.get_user(&ann.id).await.unwrap().unwrap(), s.get_user(&bob.id).await.unwrap().unwrap());
        let demoted = |u: &User| User { org_role: Role::Viewer, ..u.clone() };
        let ann_acting = Acting::User(s.get_user(&ann.id).await.unwrap().unwrap());
        let bob_acting = Acting::User(s.get_user(&bob.id).await.unwrap().unwrap());
        s.update_user(&bob_read, &demoted(&bob), None, Some(&ann_acting)).await.unwrap();
        let second = s.update_user(&ann_read, &demoted(&ann), None, Some(&bob_acting)).await;
        assert!(matches!(second, Err(StoreError::Changed(_))), "{}: {second:?}", s.describe());
        assert_eq!(s.get_user(&ann.id).await.unwrap().unwrap().org_role, Role::Admin, "{}", s.describe());

        // Nor does anything else the demoted admin decided before: adding a user, creating,
        // changing or deleting a service.
        let carl = lifecycle::new_user("acme", "carl@x.io", Role::Admin, BTreeMap::new(), Attributes::new());
        let refused = s.create_user(&carl, None, None, Some(&bob_acting)).await;
        assert!(matches!(refused, Err(StoreError::Changed(_))), "{}: {refused:?}", s.describe());
        let svc =
            lifecycle::create_service(&s, "acme", "etl", None, BTreeMap::new(), Attributes::new(), None)
                .await
                .unwrap();
        let svc_read = s.get_service(&svc.id).await.unwrap().unwrap();
        let renamed = Service { name: "etl2".into(), ..svc.clone() };
        let refused = s.update_service(&svc_read, &renamed, None, Some(&bob_acting)).await;
        assert!(matches!(refused, Err(StoreError::Changed(_))), "{}: {refused:?}", s.describe());
        let refused = s.delete_service(&svc_read, &Revoking::default(), None, Some(&bob_acting)).await;
        assert!(matches!(refused, Err(StoreError::Changed(_))), "{}: {refused:?}", s.describe());
        let other = Service { id: "s_other".into(), name: "other".into(), ..svc.clone() };
        let refused = s.create_service(&other, None, None, Some(&bob_acting)).await;
        assert!(matches!(refused, Err(StoreError::Changed(_))), "{}: {refused:?}", s.describe());
        assert!(s.find_user_by_email("acme", "carl@x.io").await.unwrap().is_none());
        assert!(s.get_service("s_other").await.unwrap().is_none());
        // An acting service counts the same way.
        let svc_acting = Acting::Service(s.get_service(&svc.id).await.unwrap().unwrap());
        s.update_service(&svc_read, &renamed, None, Some(&ann_acting)).await.unwrap();
        let refused = s.create_user(&carl, None, None, Some(&svc_acting)).await;
        assert!(matches!(refused, Err(StoreError::Changed(_))), "{}: {refused:?}", s.describe());
    }
}

#[tokio::test]
async fn a_late_flush_never_moves_a_last_use_back_on_every_backend() {
    for (s, _guard) in stores() {
        let id = crate::token::generate(crate::token::TokenKind::Pat).id;
        let used = |at: Millis, ip: &str| vec![(id.clone(), LastUse { at, ip: ip.into() })];
        s.record_last_use(&used(200, "10.0.0.2")).await.unwrap();
        // Another instance's flush of an earlier use lands later.
        s.record_last_use(&used(100, "10.0.0.1")).await.unwrap();
        assert_eq!(s.last_use(&id).await.unwrap().map(|l| (l.at, l.ip)), Some((200, "10.0.0.2".into())));
        s.record_last_use(&used(300, "10.0.0.3")).await.unwrap();
        assert_eq!(s.last_use(&id).await.unwrap().map(|l| l.at), Some(300));
    }
}

#[tokio::test]
async fn a_changed_audit_max_trims_from_the_next_write_in_every_clone() {
    // The reload applies `audit.max_entries` to its own clone of the store; the admin API writes
    // through another, and must trim to the same bound its reads use.
    let s = Store::new(Arc::new(MemoryBackend::default()), Duration::from_millis(500)).with_audit_max(10);
    let reloaded = s.clone();
    let svc = lifecycle::create_service(&s, "acme", "etl", None, BTreeMap::new(), Attributes::new(), None)
        .await
        .unwrap();
    for i in 0..5 {
        if i == 4 {
            reloaded.set_audit_max(2);
        }
        audited_step(&s, &svc, i).await;
    }
    let actions: Vec<String> =
        s.audit_log("acme", 100).await.unwrap().into_iter().map(|e| e.action).collect();
    assert_eq!(actions, ["step.4", "step.3"]);
}

/// A Redis user refused PUBLISH (Redis 7's default for a new ACL user) must not store a change no
/// instance hears of: the batch fails before any write.
#[tokio::test]
async fn a_redis_user_that_may_not_publish_stores_nothing() {
    let timeout = Duration::from_millis(500);
    let server = crate::testing::RedisServer::start(["--save", "", "--appendonly", "no"]);
    let mut admin = server.client();
    let _: () = ::redis::cmd("ACL")
        .arg("SETUSER")
        .arg("nopub")
        .arg(&["on", ">pw", "~*", "resetchannels", "+@all"])
        .query(&mut admin)
        .unwrap();
    let full =
        Store::new(Arc::new(redis::RedisBackend::new(&server.url(), "test:", timeout).unwrap()), timeout);
    let url = server.url().replace("redis://", "redis://nopub:pw@");
    let narrow = Store::new(Arc::new(redis::RedisBackend::new(&url, "test:", timeout).unwrap()), timeout);
    let svc = etl(&full).await;
    let (token, _) = service_token(&full, &svc).await;
    // The user reaches the store (reads work): what is refused is the change, for its PUBLISH.
    assert!(narrow.get_token(&token.id).await.unwrap().is_some());
    let refused = narrow.revoke_token(&token.id, Some("leaked".into()), None).await;
    let why = format!("{refused:?}");
    assert!(refused.is_err() && why.contains("can't publish"), "{why}");
    let stored = full.get_token(&token.id).await.unwrap().unwrap();
    assert!(!stored.is_revoked(now_millis()), "nothing was written");
}

/// A remote store may apply a change after its caller gave up waiting: the error says the change
/// may have been made, never that nothing was written.
#[tokio::test]
async fn a_redis_commit_given_up_on_says_it_may_still_land() {
    let timeout = Duration::from_millis(200);
    let server = crate::testing::RedisServer::start(["--save", "", "--appendonly", "no"]);
    let s = Store::new(Arc::new(redis::RedisBackend::new(&server.url(), "test:", timeout).unwrap()), timeout);
    let svc = etl(&s).await;
    let (token, _) = service_token(&s, &svc).await;
    // Redis holds write commands until told, then runs them.
    let _: () =
        ::redis::cmd("CLIENT").arg("PAUSE").arg(60_000).arg("WRITE").query(&mut server.client()).unwrap();
    let late = s.revoke_token(&token.id, Some("leaked".into()), None).await;
    let _: () = ::redis::cmd("CLIENT").arg("UNPAUSE").query(&mut server.client()).unwrap();
    match &late {
        Err(e @ StoreError::Unanswered(_)) => {
            assert!(e.to_string().contains("may still have been made"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    // (A read on the connection queues behind the held script until the pause ends.)
    let landed = async {
        while !s.get_token(&token.id).await.ok().flatten().is_some_and(|t| t.is_revoked(now_millis())) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), landed).await.expect("the change lands after the pause");
}

/// An owner's removal read its tokens, then wrote them back revoked: a token issued in between was
/// left active under a removed owner, and a revocation or rotation in between was overwritten.
#[tokio::test]
async fn a_removal_fails_when_a_token_of_the_owner_is_added_or_changed_meanwhile() {
    let params = crate::token::Argon2Params { memory_kib: 64, iterations: 1, parallelism: 1 };
    for (s, _guard) in stores() {
        let ann =
            lifecycle::create_user(&s, "acme", "ann@x.io", Role::Viewer, BTreeMap::new(), Attributes::new())
                .await
                .unwrap();
        let owner = Owner::User(ann.id.clone());
        let issue =
            || lifecycle::issue_token(&s, params, "acme", owner.clone(), lifecycle::TokenSpec::default());
        let (first, _) = issue().await.unwrap();
        let revoking = |read: OwnerTokens| Revoking {
            members: read.members,
            tokens: read
                .tokens
                .into_iter()
                .map(|before| {
                    let mut after = TokenRecord::clone(&before);
                    after.revoked =
                        Some(Box::new(Revocation { at: 1, decided_at: Some(1), reason: None, by: None }));
                    (before, after)
                })
                .collect(),
        };
        let user = s.get_user(&ann.id).await.unwrap().unwrap();

        // A token issued after the removal read the owner's tokens.
        let stale = revoking(s.owner_tokens(&owner).await.unwrap());
        let (second, _) = issue().await.unwrap();
        let refused = s.delete_user(&user, &stale, None, None).await;
        assert!(matches!(refused, Err(StoreError::Changed(_))), "{}: {refused:?}", s.describe());

        // A token revoked (with its reason) after the removal read it.
        let stale = revoking(s.owner_tokens(&owner).await.unwrap());
        s.revoke_token(&first.id, Some("leaked".into()), Some("u_admin".into())).await.unwrap();
        let refused = s.delete_user(&user, &stale, None, None).await;
        assert!(matches!(refused, Err(StoreError::Changed(_))), "{}: {refused:?}", s.describe());
        let kept = s.get_token(&first.id).await.unwrap().unwrap();
        assert_eq!(
            kept.revoked.as_ref().and_then(|r| r.reason.as_deref()),
            Some("leaked"),
            "{}",
            s.describe()
        );

        // Read again, the removal lands and leaves no token of the owner unrevoked.
        let fresh = revoking(s.owner_tokens(&owner).await.unwrap());
        s.delete_user(&user, &fresh, None, None).await.unwrap();
        assert!(s.get_user(&ann.id).await.unwrap().is_none(), "{}", s.describe());
        assert!(s.get_token(&second.id).await.unwrap().unwrap().revoked.is_some(), "{}", s.describe());
    }
}

/// A service minting credentials (one audit entry each) could push every change out of a bounded
/// log: minted credentials are kept in a list of their own, and the listing merges both by time.
#[tokio::test]
async fn credentials_minted_do_not_push_the_orgs_changes_out_of_the_audit_log() {
    for (s, _guard) in stores() {
        let s = s.with_audit_max(3);
        let svc = etl(&s).await;
        for i in 0..3 {
            audited_step(&s, &svc, i).await;
        }
        for i in 0..10 {
            let minted = AuditEvent {
                at: 10 + i,
                org: "acme".into(),
                actor: "service:etl".into(),
                action: "credentials.issue".into(),
                target: "project:shop".into(),
                token_id: None,
                by_token: None,
                actor_email: None,
                reason: None,
                details: serde_json::json!({ "n": i }),
            };
            s.append_credentials_audit(&minted).await.unwrap();
        }
        audited_step(&s, &svc, 15).await;
        let log: Vec<(Millis, String)> =
            s.audit_log("acme", 100).await.unwrap().into_iter().map(|e| (e.at, e.action)).collect();
        let want: Vec<(Millis, String)> = [
            (19, "credentials.issue"),
            (18, "credentials.issue"),
            (17, "credentials.issue"),
            (15, "step.15"),
            (2, "step.2"),
            (1, "step.1"),
        ]
        .into_iter()
        .map(|(at, action)| (at, action.to_string()))
        .collect();
        assert_eq!(log, want, "{}", s.describe());
        assert_eq!(s.audit_log("acme", 2).await.unwrap().len(), 2, "the limit holds over both");
    }
}

/// Commits that take longer than the store timeout, as the embedded store's can behind a busy
/// disk (its writer then finishes them whatever the caller does).
struct SlowCommits {
    inner: MemoryBackend,
    may_time_out: bool,
}

#[async_trait]
impl Backend for SlowCommits {
    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.inner.get(key).await
    }
    async fn members(&self, set: &str) -> Result<Vec<String>, StoreError> {
        self.inner.members(set).await
    }
    async fn list(&self, key: &str, skip: usize, limit: usize) -> Result<Vec<String>, StoreError> {
        self.inner.list(key, skip, limit).await
    }
    async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.inner.commit(batch).await
    }
    fn commit_may_time_out(&self) -> bool {
        self.may_time_out
    }
    async fn subscribe(&self) -> Result<InvalidationStream, StoreError> {
        self.inner.subscribe().await
    }
    fn describe(&self) -> String {
        "slow commits".into()
    }
    async fn durability_warning(&self) -> Result<Option<String>, StoreError> {
        Ok(None)
    }
}

/// A `503` must mean nothing was written. A store in this process finishes a commit once handed
/// over, so its callers wait for it rather than answer `503` for a change that then lands (a
/// retried issue made a second token whose secret nobody saw).
#[tokio::test]
async fn a_commit_that_lands_anyway_is_waited_for_not_timed_out() {
    assert!(!embedded::EmbeddedBackend::open(&tempfile::tempdir().unwrap().path().join("s.redb"))
        .unwrap()
        .commit_may_time_out());
    for may_time_out in [false, true] {
        let slow = SlowCommits { inner: MemoryBackend::default(), may_time_out };
        let s = Store::new(Arc::new(slow), Duration::from_millis(100));
        let made =
            lifecycle::create_user(&s, "acme", "w@x.io", Role::Viewer, BTreeMap::new(), Attributes::new())
                .await;
        match may_time_out {
            false => assert!(s.get_user(&made.unwrap().id).await.unwrap().is_some()),
            true => assert!(
                matches!(made, Err(lifecycle::LifecycleError::Store(StoreError::Unanswered(_)))),
                "{made:?}"
            ),
        }
    }
}

#[tokio::test]
async fn a_token_issued_for_another_owner_lands_only_while_the_owner_is_as_read_on_every_backend() {
    for (s, _guard) in stores() {
        let params = CHEAP;
        let (ann, owner) = ann(&s).await;
        let mint = || lifecycle::mint(&s, params, "acme", owner.clone(), lifecycle::TokenSpec::default());
        let read =
            || async { (s.get_user(&ann.id).await.unwrap().unwrap(), s.owner_tokens(&owner).await.unwrap()) };

        // Suspended meanwhile: refused.
        let (as_read, held) = read().await;
        let mut suspended = User::clone(&as_read);
        suspended.status = UserStatus::Suspended;
        s.update_user(&as_read, &suspended, None, None).await.unwrap();
        let (_, token) = mint().await.unwrap();
        let refused =
            s.insert_token_for(&token, None, None, Some(&Acting::User(as_read)), Some(held.members)).await;
        assert!(matches!(refused, Err(StoreError::Changed(_))), "{}: {refused:?}", s.describe());
        assert!(s.get_token(&token.id).await.unwrap().is_none());

        // Issued another token meanwhile: refused.
        let (as_read, held) = read().await;
        lifecycle::issue_token(&s, params, "acme", owner.clone(), lifecycle::TokenSpec::default())
            .await
            .unwrap();
        let (_, token) = mint().await.unwrap();
        let refused =
            s.insert_token_for(&token, None, None, Some(&Acting::User(as_read)), Some(held.members)).await;
        assert!(matches!(refused, Err(StoreError::Changed(_))), "{}: {refused:?}", s.describe());

        // Nothing changed: stored.
        let (as_read, held) = read().await;
        let (_, token) = mint().await.unwrap();
        s.insert_token_for(&token, None, None, Some(&Acting::User(as_read)), Some(held.members))
            .await
            .unwrap();
        assert!(s.get_token(&token.id).await.unwrap().is_some(), "{}", s.describe());

        // The bound is a most: with room for one more id, one issued meanwhile passes, two do not
        // (`tokens.max_per_owner` near its cap).
        let (_, held) = read().await;
        let issue =
            || lifecycle::issue_token(&s, params, "acme", owner.clone(), lifecycle::TokenSpec::default());
        issue().await.unwrap();
        let (_, token) = mint().await.unwrap();
        s.insert_token_for(&token, None, None, None, Some(held.members + 2)).await.unwrap();
        let (_, held) = read().await;
        issue().await.unwrap();
        issue().await.unwrap();
        let (_, token) = mint().await.unwrap();
        let refused = s.insert_token_for(&token, None, None, None, Some(held.members + 1)).await;
        assert!(matches!(refused, Err(StoreError::Changed(_))), "{}: {refused:?}", s.describe());
    }
}

/// Under a flood of reads the embedded database answers more slowly than they come: a read with no
/// free slot is refused (503) once `store.timeout` has passed, rather than queued until one frees
/// (how soon is not asserted: the machine may be loaded); changes do not wait for read slots;
/// once slots are free, reads are answered again.
#[tokio::test]
async fn an_embedded_read_with_no_free_slot_is_refused_not_queued() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(embedded::EmbeddedBackend::open(&dir.path().join("store.redb")).unwrap());
    let store = Store::new(backend.clone(), Duration::from_millis(100));
    let held = backend.hold_read_slots().await;
    let id = TokenId::parse("tgp_AAAAAA").unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(60), store.get_token(&id)).await;
    assert!(matches!(refused.expect("refused, not held"), Err(StoreError::Unavailable(_))));
    let user =
        lifecycle::create_user(&store, "acme", "a@x.io", Role::Admin, BTreeMap::new(), Attributes::new())
            .await
            .expect("a change needs no read slot");
    drop(held);
    assert_eq!(record(store.get_user(&user.id).await.unwrap()), Some(user));
}
