//! Verification against the in-memory store: what is read, when argon2 runs, what is refused.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::cache::CacheSettings;
use crate::lifecycle::{self, TokenSpec};
use crate::store::memory::MemoryBackend;
use crate::store::{Owner, Store};
use crate::token::Argon2Params;

const ARGON2: Argon2Params = Argon2Params { memory_kib: 256, iterations: 1, parallelism: 1 };

struct Fixture {
    backend: Arc<MemoryBackend>,
    store: Store,
    verifier: Arc<Verifier>,
    user: User,
    token: String,
}

impl Fixture {
    async fn new() -> Fixture {
        let backend = Arc::new(MemoryBackend::default());
        let store = Store::new(backend.clone(), Duration::from_millis(200));
        let cache = Arc::new(Cache::new(
            store.clone(),
            CacheSettings { capacity: 100, ttl: Duration::from_secs(60) },
        ));
        let follower = cache.clone();
        tokio::spawn(async move { follower.follow(Box::pin(std::future::pending())).await });
        let live = async {
            while !cache.is_live() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), live).await.expect("the cache follows the feed");
        let verifier = Arc::new(Verifier::new(cache, 100, 2));
        let user = lifecycle::create_user(
            &store,
            "acme",
            "ann@example.com",
            Role::Editor,
            BTreeMap::new(),
            Default::default(),
        )
        .await
        .unwrap();
        let token = issue(&store, &user, TokenSpec::default()).await;
        let f = Fixture { backend, store, verifier, user, token };
        // The creations above publish invalidations too; let them land first.
        f.settle(0, 2).await;
        f
    }

    /// Waits until the follower has applied everything published so far.
    async fn settle(&self, applied_before: u64, expected_new: u64) {
        let cache = self.verifier.cache();
        for _ in 0..1000 {
            if cache.invalidations_applied() >= applied_before + expected_new {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("invalidation not applied");
    }
}

async fn issue(store: &Store, user: &User, spec: TokenSpec) -> String {
    lifecycle::issue_token(store, ARGON2, &user.org, Owner::User(user.id.clone()), spec)
        .await
        .unwrap()
        .0
        .token
}

fn invalid(r: Result<Principal, AuthError>) -> Invalid {
    match r {
        Err(AuthError::Invalid(i)) => i,
        other => panic!("expected an invalid token, got {other:?}"),
    }
}

#[tokio::test]
async fn a_valid_token_verifies_and_then_hits_the_cache() {
    let f = Fixture::new().await;
    let p = f.verifier.verify(&f.token).await.unwrap();
    assert_eq!(p.subject(), format!("user:{}", f.user.id));
    assert_eq!(p.role_on("any"), Role::Editor);
    assert_eq!(f.verifier.stats().argon2_runs.get(), 1);

    let reads = f.backend.reads();
    for _ in 0..10 {
        f.verifier.verify(&f.token).await.unwrap();
    }
    assert_eq!(f.backend.reads(), reads, "a cache hit must not read the store");
    assert_eq!(f.verifier.stats().argon2_runs.get(), 1, "a cache hit must not run argon2");
}

/// A token this process has just minted (quickstart's) is proven without argon2; a wrong secret
/// for its id is still refused, and a record whose hash is not the one trusted proves nothing.
#[tokio::test]
async fn a_token_just_minted_is_trusted_without_argon2_and_only_its_secret() {
    let f = Fixture::new().await;
    let id = crate::token::parse(&f.token).unwrap().id;
    let stored = f.store.get_token(&id).await.unwrap().unwrap();
    assert!(f.verifier.trust_minted(&f.token, &stored.secret_hash));
    f.verifier.verify(&f.token).await.unwrap();
    assert_eq!(f.verifier.stats().argon2_runs.get(), 0);
    let other = crate::token::generate(crate::token::TokenKind::Pat).token;
    let wrong = crate::token::with_checksum_for_tests(&format!("{}{}", &f.token[..10], &other[10..40]));
    assert_eq!(invalid(f.verifier.verify(&wrong).await), Invalid::WrongSecret);
    assert!(!f.verifier.trust_minted("not a token", &stored.secret_hash));

    // Trusted against another hash: the stored record's is checked by argon2 as ever.
    let g = Fixture::new().await;
    assert!(g.verifier.trust_minted(&g.token, "$argon2id$v=19$m=8,t=1,p=1$c29tZXNhbHQ$aGFzaA"));
    g.verifier.verify(&g.token).await.unwrap();
    assert_eq!(g.verifier.stats().argon2_runs.get(), 1);
}

#[tokio::test]
async fn a_bad_checksum_is_refused_without_touching_the_store() {
    let f = Fixture::new().await;
    let mut bad = f.token.clone().into_bytes();
    let last = bad.len() - 1;
    bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
    let bad = String::from_utf8(bad).unwrap();
    let reads = f.backend.reads();
    assert_eq!(invalid(f.verifier.verify(&bad).await), Invalid::Malformed);
    assert_eq!(invalid(f.verifier.verify("tgp_short").await), Invalid::Malformed);
    assert_eq!(f.backend.reads(), reads);
}

#[tokio::test]
async fn unknown_id_and_wrong_secret_are_both_refused() {
    let f = Fixture::new().await;
    let unknown = crate::token::generate(crate::token::TokenKind::Pat).token;
    assert_eq!(invalid(f.verifier.verify(&unknown).await), Invalid::Unknown);
    // Same id, another secret, a valid checksum.
    let other = crate::token::generate(crate::token::TokenKind::Pat).token;
    let wrong = crate::token::with_checksum_for_tests(&format!("{}{}", &f.token[..10], &other[10..40]));
    assert_eq!(invalid(f.verifier.verify(&wrong).await), Invalid::WrongSecret);
    // After the right secret is proven, a wrong one is still refused (now without argon2).
    f.verifier.verify(&f.token).await.unwrap();
    let runs = f.verifier.stats().argon2_runs.get();
    assert_eq!(invalid(f.verifier.verify(&wrong).await), Invalid::WrongSecret);
    assert_eq!(f.verifier.stats().argon2_runs.get(), runs);
    assert_eq!(Invalid::Unknown.description(), Invalid::WrongSecret.description());
}

#[tokio::test]
async fn concurrent_misses_share_one_store_read_and_one_argon2_run() {
    let f = Fixture::new().await;
    let reads = f.backend.reads();
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (v, t) = (f.verifier.clone(), f.token.clone());
            tokio::spawn(async move { v.verify(&t).await.map(|_| ()) })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(f.verifier.stats().argon2_runs.get(), 1);
    // One read of the token, one of its user.
    assert_eq!(f.backend.reads() - reads, 2);
}

#[tokio::test]
async fn expiry_is_checked_against_the_clock() {
    let f = Fixture::new().await;
    // Long enough for the first check's argon2 run, which yields to everything else on a busy machine.
    let expires_at = now_millis() + 3_000;
    let token =
        issue(&f.store, &f.user, TokenSpec { expires_at: Some(expires_at), ..TokenSpec::default() }).await;
    f.verifier.verify(&token).await.unwrap();
    tokio::time::sleep(Duration::from_millis((expires_at - now_millis()).max(0) as u64 + 50)).await;
    assert_eq!(invalid(f.verifier.verify(&token).await), Invalid::Expired);
}

#[tokio::test]
async fn role_change_suspension_revocation_and_removal_apply_to_the_next_request() {
    let f = Fixture::new().await;
    f.verifier.verify(&f.token).await.unwrap();

    let applied = f.verifier.cache().invalidations_applied();
    let mut user = f.user.clone();
    let before = f.store.get_user(&user.id).await.unwrap().unwrap();
    user.org_role = Role::Viewer;
    f.store.update_user(&before, &user, None, None).await.unwrap();
    f.settle(applied, 1).await;
    assert_eq!(f.verifier.verify(&f.token).await.unwrap().role_on("x"), Role::Viewer);

    let applied = f.verifier.cache().invalidations_applied();
    let before = f.store.get_user(&user.id).await.unwrap().unwrap();
    user.status = UserStatus::Suspended;
    f.store.update_user(&before, &user, None, None).await.unwrap();
    f.settle(applied, 1).await;
    assert_eq!(invalid(f.verifier.verify(&f.token).await), Invalid::OwnerSuspended);

    let applied = f.verifier.cache().invalidations_applied();
    let before = f.store.get_user(&user.id).await.unwrap().unwrap();
    user.status = UserStatus::Active;
    f.store.update_user(&before, &user, None, None).await.unwrap();
    let id = crate::token::parse(&f.token).unwrap().id;
    f.store.revoke_token(&id, Some("leaked".into()), None).await.unwrap();
    f.settle(applied, 2).await;
    assert_eq!(invalid(f.verifier.verify(&f.token).await), Invalid::Revoked);

    // Removed, with a token of theirs not revoked (a removal always revokes them; a record
    // written otherwise, or by another version): the owner is gone.
    let kept = issue(&f.store, &user, TokenSpec::default()).await;
    f.verifier.verify(&kept).await.unwrap();
    let applied = f.verifier.cache().invalidations_applied();
    let before = f.store.get_user(&user.id).await.unwrap().unwrap();
    let revoking_none = crate::store::Revoking { members: 2, tokens: vec![] };
    f.store.delete_user(&before, &revoking_none, None, None).await.unwrap();
    f.settle(applied, 1).await;
    assert_eq!(invalid(f.verifier.verify(&kept).await), Invalid::OwnerGone);
}

/// A token whose record names an org other than its owner's is its owner's in no org.
#[tokio::test]
async fn a_token_of_another_orgs_owner_is_refused() {
    let f = Fixture::new().await;
    let globex = lifecycle::create_user(
        &f.store,
        "globex",
        "gus@globex.io",
        Role::Admin,
        BTreeMap::new(),
        Default::default(),
    )
    .await
    .unwrap();
    let applied = f.verifier.cache().invalidations_applied();
    let token = lifecycle::issue_token(
        &f.store,
        ARGON2,
        "acme",
        Owner::User(globex.id.clone()),
        TokenSpec::default(),
    )
    .await
    .unwrap()
    .0
    .token;
    f.settle(applied, 1).await;
    assert_eq!(invalid(f.verifier.verify(&token).await), Invalid::OwnerGone);
    // Its own org's token of the same user verifies.
    f.verifier.verify(&issue(&f.store, &globex, TokenSpec::default()).await).await.unwrap();
}

#[tokio::test]
async fn an_unreachable_store_is_an_infrastructure_error_and_recovers() {
    let f = Fixture::new().await;
    f.backend.set_down(true);
    assert!(matches!(f.verifier.verify(&f.token).await, Err(AuthError::Unavailable(_))));
    f.backend.set_down(false);
    // The follower resubscribes; until then the store is read directly.
    assert!(f.verifier.verify(&f.token).await.is_ok());
}

#[tokio::test]
async fn concurrent_wrong_guesses_for_a_known_id_never_make_the_right_secret_fail() {
    let f = Fixture::new().await;
    let other = crate::token::generate(crate::token::TokenKind::Pat).token;
    let wrong = crate::token::with_checksum_for_tests(&format!("{}{}", &f.token[..10], &other[10..40]));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (v, t) = (f.verifier.clone(), if i == 8 { f.token.clone() } else { wrong.clone() });
        tasks.push(tokio::spawn(async move { (i == 8, v.verify(&t).await.is_ok()) }));
    }
    for t in tasks {
        let (right, ok) = t.await.unwrap();
        assert_eq!(right, ok, "only the right secret verifies, and it always does");
    }
}

#[tokio::test]
async fn a_users_attribute_view_adds_email_and_domain_in_key_order() {
    let f = Fixture::new().await;
    let record = f.store.get_token(&token::parse(&f.token).unwrap().id).await.unwrap().unwrap().into_inner();
    let check = |attrs: serde_json::Value, want: &str| {
        let mut user = f.user.clone();
        user.email = "Ann@Acme.io".into();
        user.attributes = attrs.as_object().unwrap().clone();
        let p = Principal::new(Arc::new(record.clone()), OwnerRecord::User(Arc::new(user)), false);
        assert_eq!(serde_json::to_string(&p.attributes()).unwrap(), want);
    };
    check(serde_json::json!({}), r#"{"domain":"Acme.io","email":"Ann@Acme.io"}"#);
    check(
        serde_json::json!({"a": 1, "dz": [true], "team": "red"}),
        r#"{"a":1,"domain":"Acme.io","dz":[true],"email":"Ann@Acme.io","team":"red"}"#,
    );
    check(serde_json::json!({"email": "other@x.io"}), r#"{"domain":"Acme.io","email":"other@x.io"}"#);
}

#[tokio::test]
async fn verified_jwts_are_held_by_weight_so_large_attributes_cannot_fill_memory() {
    let f = Fixture::new().await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    std::fs::write(&key, crate::jwt::generate_key(jsonwebtoken::Algorithm::EdDSA).unwrap()).unwrap();
    let config = crate::config::Config::parse(&format!(
        "jwt:\n  signing_key: k\n  keys:\n    - {{ kid: k, key_file: '{}' }}\n",
        key.display()
    ))
    .unwrap();
    let settings = config.jwt.unwrap();
    let now = crate::store::now_millis() / 1000;
    // Many tiny attributes: about 4 KiB of JSON, tens of KiB once parsed.
    let attrs: crate::store::Attributes = (0..580).map(|i| (format!("a{i}"), serde_json::json!(0))).collect();
    for i in 0..10 {
        let claims = crate::jwt::EphemeralClaims {
            iss: settings.issuer.clone(),
            aud: settings.audience.clone(),
            sub: "end-user".into(),
            iat: now,
            nbf: now,
            exp: now + 60,
            jti: format!("j{i}"),
            org: "acme".into(),
            project: "shop".into(),
            svc: "s_1".into(),
            tid: "tgs_abcdef".into(),
            tg: crate::jwt::EPHEMERAL.into(),
            email: None,
            uid: None,
            attrs: attrs.clone(),
            scope: None,
            env: None,
        };
        let jwt = settings.sign(&claims).unwrap();
        // Verified and remembered, then refused: its minting token does not exist.
        assert!(f.verifier.verify_ephemeral(&jwt, &settings).await.is_err());
    }
    f.verifier.jwts.run_pending_tasks();
    // The verifier holds 100 units (KiB): one such credential weighs more than a third of that.
    assert!(f.verifier.jwts.entry_count() <= 2, "{} held", f.verifier.jwts.entry_count());
    assert!(f.verifier.jwts.weighted_size() <= 100);
}

#[tokio::test]
async fn a_first_verification_that_would_wait_too_long_is_busy_not_a_hang() {
    let f = Fixture::new().await;
    let v = Verifier::new(f.verifier.cache().clone(), 100, 1).with_argon2_wait(Duration::from_millis(50));
    // Its one argon2 thread busy for longer than the wait: refused as busy, and counted out again.
    let held = v.prover.slots.clone().acquire_owned().await.unwrap();
    assert!(matches!(v.verify(&f.token).await, Err(AuthError::Busy)));
    // (The wait is a task's, which ends at its own deadline.)
    let uncounted = async {
        while v.stats.argon2_waiting.load(Ordering::Relaxed) != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), uncounted).await.expect("a given-up wait is not counted");
    drop(held);
    // Free again: the run proves the secret (asked again while it is busy, as a client would:
    // argon2 runs at the lowest priority and may outlast the short bound on a busy machine),
    // and the next request needs no run.
    let proved = async {
        while matches!(v.verify(&f.token).await, Err(AuthError::Busy)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), proved).await.expect("proven once a slot is free");
    v.verify(&f.token).await.unwrap();
    let runs = v.stats.argon2_runs.get();
    v.verify(&f.token).await.unwrap();
    assert_eq!(v.stats.argon2_runs.get(), runs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_outlasts_the_bound_is_busy_and_its_proof_serves_the_retry() {
    let f = Fixture::new().await;
    // Two slots, so that only the token's turn keeps a retry from a second run; and the argon2
    // threads are the test's, so a run lasts until the test ends it (as one at the lowest
    // priority on a saturated machine may outlast any bound).
    let mut v = Verifier::new(f.verifier.cache().clone(), 100, 2).with_argon2_wait(Duration::from_millis(20));
    let (jobs, queue) = crossbeam_channel::unbounded::<Argon2Job>();
    Arc::get_mut(&mut v.prover).expect("not shared yet").workers = jobs;
    let answer = v.verify(&f.token).await;
    assert!(matches!(answer, Err(AuthError::Busy)), "{answer:?}");
    // The run goes on, holding the token's turn: a retry meanwhile waits for it (and is busy
    // past its own bound) rather than starting a second run on the free slot.
    let answer = v.verify(&f.token).await;
    assert!(matches!(answer, Err(AuthError::Busy)), "{answer:?}");
    assert_eq!(v.stats.argon2_runs.get(), 1, "one run at a time per token");
    assert_eq!(queue.len(), 1);
    // The run ends, matching: its proof is kept, and the retry after it needs no run of its own.
    let job = queue.recv_timeout(Duration::from_secs(10)).expect("the run");
    assert!(crate::token::verify_secret_in(&job.secret, &job.phc, &mut Vec::new()), "the presented secret");
    job.done.send(true).unwrap();
    let kept = async {
        while v.prover.proven.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), kept).await.expect("the run's proof is kept");
    v.verify(&f.token).await.unwrap();
    assert_eq!(v.stats.argon2_runs.get(), 1);
}

#[tokio::test]
async fn without_argon2_threads_a_first_check_is_busy_never_invalid() {
    let f = Fixture::new().await;
    let mut v = Verifier::new(f.verifier.cache().clone(), 100, 1);
    // As when no thread could start (a process limit): nobody takes the jobs.
    let (jobs, queue) = crossbeam_channel::unbounded();
    drop(queue);
    Arc::get_mut(&mut v.prover).expect("not shared yet").workers = jobs;
    let answer = v.verify(&f.token).await;
    assert!(matches!(answer, Err(AuthError::Busy)), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_while_a_first_check_waits_for_argon2_is_not_missed() {
    let f = Fixture::new().await;
    // No bound on the wait, and the argon2 threads are the test's: a run lasts until the test
    // ends it, so the right secret's check is surely waiting when the token is revoked.
    let mut v = Verifier::new(f.verifier.cache().clone(), 100, 2).with_argon2_wait(Duration::from_secs(600));
    let (jobs, queue) = crossbeam_channel::unbounded::<Argon2Job>();
    Arc::get_mut(&mut v.prover).expect("not shared yet").workers = jobs;
    let v = Arc::new(v);
    let applied = f.verifier.cache().invalidations_applied();
    let token = issue(&f.store, &f.user, TokenSpec::default()).await;
    f.settle(applied, 1).await;
    let other = crate::token::generate(crate::token::TokenKind::Pat).token;
    let wrong = crate::token::with_checksum_for_tests(&format!("{}{}", &token[..10], &other[10..40]));
    // A made-up secret takes the token's turn (its run held by the test)...
    let (v1, w) = (v.clone(), wrong.clone());
    let flood = tokio::spawn(async move { v1.verify(&w).await.map(|_| ()) });
    let flood_job = tokio::task::spawn_blocking({
        let queue = queue.clone();
        move || queue.recv_timeout(Duration::from_secs(10)).expect("the made-up secret's run")
    })
    .await
    .unwrap();
    // ... and the right one reads the token's record (a hit: the made-up secret's check cached
    // it, and a hit is counted with the record in hand), then waits behind it.
    let lookups = || f.verifier.cache().stats().lookups.with_label_values(&["token", "hit"]).get();
    let read_before = lookups();
    let (v2, t) = (v.clone(), token.clone());
    let right = tokio::spawn(async move { v2.verify(&t).await.map(|_| ()) });
    let read = async {
        while lookups() == read_before {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the right secret's check reads the record");

    let applied = f.verifier.cache().invalidations_applied();
    let id = crate::token::parse(&token).unwrap().id;
    f.store.revoke_token(&id, Some("leaked".into()), None).await.unwrap();
    f.settle(applied, 1).await;
    assert!(!right.is_finished(), "the right secret's check waits for the token's turn");
    // The made-up secret's run fails; the right one's runs and matches, and the record read
    // again after the wait is revoked.
    flood_job.done.send(false).unwrap();
    let right_job = tokio::task::spawn_blocking(move || {
        queue.recv_timeout(Duration::from_secs(10)).expect("the right secret's run")
    })
    .await
    .unwrap();
    right_job.done.send(true).unwrap();
    let answer = right.await.unwrap();
    assert!(matches!(answer, Err(AuthError::Invalid(Invalid::Revoked))), "{answer:?}");
    assert!(flood.await.unwrap().is_err());
}
