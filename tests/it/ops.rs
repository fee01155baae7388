//! Running it like a product: metrics, logs without secrets.

use tollgate::lifecycle::TokenSpec;
use tollgate::policy::Role;

use crate::support::*;

async fn scrape(w: &World) -> String {
    reqwest::get(format!("{}/metrics", w.gateway.admin_url())).await.unwrap().text().await.unwrap()
}

/// The value of one sample line, 0 when absent.
fn sample(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_allowed_and_denied_requests() {
    let mut w = World::start().await;
    let user = w.user("acme", "m@acme.io", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    let before = scrape(&w).await;

    for _ in 0..3 {
        assert_eq!(w.get(&w.gateway, "/shop", &token).await.status(), 200);
    }
    assert_eq!(w.post(&w.gateway, "/shop", &token).await.status(), 403);
    assert_eq!(w.http.get(w.gateway.url("/shop")).send().await.unwrap().status(), 401);
    assert_eq!(w.get(&w.gateway, "/shop", "tgp_garbage").await.status(), 401);

    let after = scrape(&w).await;
    let delta = |key: &str| sample(&after, key) - sample(&before, key);
    assert_eq!(delta(r#"tollgate_requests_total{outcome="allowed",route="shop"}"#), 3.0, "{after}");
    assert_eq!(delta(r#"tollgate_requests_total{outcome="forbidden_permission",route="shop"}"#), 1.0);
    assert_eq!(delta(r#"tollgate_requests_total{outcome="missing_token",route="shop"}"#), 1.0);
    assert_eq!(delta(r#"tollgate_requests_total{outcome="malformed",route="shop"}"#), 1.0);
    assert!(delta("tollgate_auth_seconds_count") >= 6.0);
    assert!(sample(&after, r#"tollgate_cache_lookups_total{kind="token",result="hit"}"#) >= 1.0, "{after}");
    assert!(sample(&after, "tollgate_store_seconds_count") >= 1.0);
    assert!(after.contains("tollgate_argon2_queue_depth"));
    assert!(after.contains("tollgate_invalidations_total"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_holds_a_token_not_even_from_the_query_or_pingoras_errors() {
    let mut w = World::start().await;
    let user = w.user("acme", "l@acme.io", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    // A query token to a dead upstream: Pingora logs the failure with its request summary.
    let resp = w.http.get(w.gateway.url(&format!("/dead/x?access_token={token}&a=1"))).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(w.get(&w.gateway, "/shop", &token).await.status(), 200);
    let log = w.gateway.log_text();
    assert!(log.contains("tollgate::access"), "one access line per request: {log}");
    assert!(log.contains(&token[..10]), "the access line names the token id");
    assert!(log.contains("/dead/x"), "Pingora's error line is there: {log}");
    // World's drop scans the whole log for every issued token.
}
