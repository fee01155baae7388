//! The gateway end to end: real redis-server, real upstream, real `tollgate serve`.

use std::time::Duration;

use tollgate::lifecycle::TokenSpec;
use tollgate::policy::Role;
use tollgate::store::{now_millis, Scope, UserStatus};
use tollgate::token;

use crate::support::*;

fn header<'a>(echo: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    echo["headers"][name][0].as_str()
}

async fn error_body(resp: reqwest::Response, status: u16) -> (Option<String>, serde_json::Value) {
    assert_eq!(resp.status(), status);
    let www = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
    let body: serde_json::Value = resp.json().await.expect("JSON error body");
    assert!(body["request_id"].as_str().is_some_and(|r| !r.is_empty()), "{body}");
    (www, body)
}

#[tokio::test]
async fn a_valid_pat_reaches_the_upstream_with_identity_and_without_the_credential() {
    let mut w = World::start().await;
    let user = w
        .user(
            "acme",
            "ann@example.com",
            Role::Editor,
            serde_json::json!({"groups": ["eng"], "tier": "gold", "name": "Zoë"}),
        )
        .await;
    let token = w.pat(&user, TokenSpec::default()).await;

    let resp = w.get(&w.gateway, "/shop/items", &token).await;
    assert!(resp.headers().get("x-request-id").is_some());
    let echo = echoed(resp).await;
    assert_eq!(echo["uri"], "/shop/items");
    assert!(echo["headers"].get("authorization").is_none(), "the credential must not reach the upstream");
    let expect = [
        ("x-auth-subject", format!("user:{}", user.id)),
        ("x-auth-token-id", token[..10].to_string()),
        ("x-auth-token-kind", "pat".into()),
        ("x-auth-org", "acme".into()),
        ("x-auth-project", "shop".into()),
        ("x-auth-environment", "production".into()),
        ("x-auth-role", "editor".into()),
        ("x-auth-permissions", "read,write,execute".into()),
        ("x-auth-email", "ann@example.com".into()),
        ("x-auth-attr-tier", "gold".into()),
        ("x-auth-attr-domain", "example.com".into()),
    ];
    for (name, value) in expect {
        assert_eq!(header(&echo, name), Some(value.as_str()), "{name}");
    }
    let attrs: serde_json::Value = serde_json::from_str(header(&echo, "x-auth-attributes").unwrap()).unwrap();
    assert_eq!(attrs["groups"], serde_json::json!(["eng"]));
    assert_eq!(attrs["name"], "Zoë");
    assert!(header(&echo, "x-auth-attributes").unwrap().is_ascii());
    assert!(header(&echo, "x-request-id").is_some());

    // The API-key header works too and is stripped as well.
    let resp = w.http.get(w.gateway.url("/shop")).header("X-API-Key", &token).send().await.unwrap();
    let echo = echoed(resp).await;
    assert!(echo["headers"].get("x-api-key").is_none());
    assert_eq!(header(&echo, "x-auth-subject"), Some(format!("user:{}", user.id).as_str()));
}

#[tokio::test]
async fn a_query_token_is_removed_and_the_rest_of_the_query_kept_in_order() {
    let mut w = World::start().await;
    let user = w.user("acme", "q@example.com", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;

    let url = w.gateway.url(&format!("/shop/search?z=1&access_token={token}&a=%20x&b"));
    let echo = echoed(w.http.get(url).send().await.unwrap()).await;
    assert_eq!(echo["uri"], "/shop/search?z=1&a=%20x&b");
    assert_eq!(header(&echo, "x-auth-role"), Some("viewer"));

    // The parameter's name is read as the upstream reads it, percent-encodings decoded.
    let url = w.gateway.url(&format!("/shop/search?access%5Ftoken={token}&a=1"));
    let echo = echoed(w.http.get(url).send().await.unwrap()).await;
    assert_eq!(echo["uri"], "/shop/search?a=1");
    // And in the other spellings an upstream reads as it: ASP.NET Core ignores case, PHP reads
    // `access.token` as `access_token`. Each is the credential, removed, and counts as a copy.
    // PHP, Rack and Express's `qs` read `access_token[]` and `access_token[0]` as an array named
    // `access_token`, and Rack 2 and `qs` read `[access_token]` as `access_token`: the same
    // parameter.
    for spelled in [
        "ACCESS_TOKEN",
        "access.token",
        "+access_token",
        "access_token[]",
        "access_token%5B0%5D",
        "%5Baccess_token%5D",
    ] {
        let url = w.gateway.url(&format!("/shop/search?{spelled}={token}&a=1"));
        let echo = echoed(w.http.get(url).send().await.unwrap()).await;
        assert_eq!(echo["uri"], "/shop/search?a=1", "{spelled}");
        let url = w.gateway.url(&format!("/shop/search?{spelled}={token}"));
        let (_, body) = error_body(w.http.get(url).bearer_auth(&token).send().await.unwrap(), 400).await;
        assert_eq!(body["error_description"], "send the token once, in one place only", "{spelled}");
    }

    // `;` separates parameters too (Rack 2, Perl's CGI, older Python read it so): a copy behind
    // one is found and removed, and two copies are one too many.
    let url = w.gateway.url(&format!("/shop/search?x=1;access_token={token}&y=2;z"));
    let echo = echoed(w.http.get(url).send().await.unwrap()).await;
    assert_eq!(echo["uri"], "/shop/search?x=1&y=2;z");
    let url = w.gateway.url(&format!("/shop/search?access_token={token}&x=1;access_token={token}"));
    let (_, body) = error_body(w.http.get(url).send().await.unwrap(), 400).await;
    assert_eq!(body["error_description"], "the token query parameter appears more than once");

    // On a route that does not allow query tokens it is no credential at all, and the parameter
    // is the upstream's (which may use the name for a credential of its own).
    let url = w.gateway.url(&format!("/noquery/search?access_token={token}"));
    let (www, body) = error_body(w.http.get(url).send().await.unwrap(), 401).await;
    assert_eq!(www.as_deref(), Some("Bearer realm=\"tollgate\""));
    assert_eq!(body["error"], "unauthorized");
    let url = w.gateway.url("/noquery/search?z=1&access_token=upstream-own&b");
    let echo = echoed(w.http.get(url).bearer_auth(&token).send().await.unwrap()).await;
    assert_eq!(echo["uri"], "/noquery/search?z=1&access_token=upstream-own&b");
    // Unless it holds a Tollgate token (an SDK adding its token to every URL, beside the header),
    // as sent or encoded: that never reaches the upstream's access log, as on a public route.
    for sent in [token.clone(), format!("tgp%5F{}", &token[4..])] {
        let url = w.gateway.url(&format!("/noquery/search?z=1&access_token={sent}&b"));
        let echo = echoed(w.http.get(url).bearer_auth(&token).send().await.unwrap()).await;
        assert_eq!(echo["uri"], "/noquery/search?z=1&b", "{sent}");
    }
}

/// What is not a credential is not taken for one: an empty API-key header or query parameter
/// beside a token (as an empty `Bearer` already was), or an `Authorization` of another scheme
/// holding bytes outside ASCII beside a token in the API-key header.
#[tokio::test]
async fn only_a_credential_counts_as_one() {
    let mut w = World::start().await;
    let user = w.user("acme", "c@example.com", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;

    let echo = echoed(
        w.http
            .get(w.gateway.url("/shop/a"))
            .bearer_auth(&token)
            .header("X-API-Key", "")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(header(&echo, "x-auth-role"), Some("viewer"));
    assert!(header(&echo, "x-api-key").is_none(), "{echo}");
    let url = w.gateway.url("/shop/search?access_token=&a=1");
    let echo = echoed(w.http.get(url).bearer_auth(&token).send().await.unwrap()).await;
    assert_eq!(echo["uri"], "/shop/search?a=1");
    // Alone, an empty one is no credential, as an empty `Bearer` is.
    for empty in [
        w.http.get(w.gateway.url("/shop/a")).header("X-API-Key", ""),
        w.http.get(w.gateway.url("/shop/a?access_token=")),
        w.http.get(w.gateway.url("/shop/a")).header("Authorization", "Bearer "),
    ] {
        let (_, body) = error_body(empty.send().await.unwrap(), 401).await;
        assert_eq!(body["error"], "unauthorized", "{body}");
    }

    let digest = http::HeaderValue::from_bytes(b"Digest username=\"Jos\xe9\"").unwrap();
    let resp = w
        .http
        .get(w.gateway.url("/shop/a"))
        .header("X-API-Key", &token)
        .header("Authorization", digest)
        .send()
        .await
        .unwrap();
    let echo = echoed(resp).await;
    assert_eq!(header(&echo, "x-auth-role"), Some("viewer"));
    assert!(
        header(&echo, "authorization").is_none(),
        "the client's Authorization goes on a protected route: {echo}"
    );
}

/// A public route keeps the client's `Authorization` for the upstream's own scheme, but a
/// Tollgate token sent there, in the API-key header (any spelling) or as a `Bearer`, goes no
/// further: the upstream of a public route may be a third party's.
#[tokio::test]
async fn a_public_route_passes_no_tollgate_token_on() {
    let mut w = World::start().await;
    let user = w.user("acme", "p@example.com", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;

    for (name, value) in [
        ("X-API-Key", token.clone()),
        ("X_API_Key", token.clone()),
        ("Authorization", format!("Bearer {token}")),
        ("Authorization", format!("bearer  {}tgs_{}", "", &token[4..])),
        // Spellings Tollgate does not read as a bearer token, which an upstream may.
        ("Authorization", format!("Bearer\t{token}")),
        ("Authorization", format!("Bearer \"{token}\"")),
        ("Authorization", format!("Bearer: {token}")),
        ("Authorization", format!("Bearer={token}")),
        ("Authorization", format!("Bearer <{token}>")),
        ("Authorization", format!("Bearer%20{token}")),
        ("Authorization", format!("Bearer\u{a0}{token}")),
    ] {
        let resp = w.http.get(w.gateway.url("/public/a")).header(name, &value).send().await.unwrap();
        let echo = echoed(resp).await;
        let leaked =
            echo["headers"].as_object().unwrap().values().any(|v| v.to_string().contains(&token[10..]));
        assert!(!leaked, "{name}: {echo}");
    }
    // A token mistyped in one character (its checksum wrong) is still near enough the secret.
    let last = if token.ends_with('A') { 'B' } else { 'A' };
    let typo = format!("{}{last}", &token[..token.len() - 1]);
    let resp = w.http.get(w.gateway.url("/public/a")).bearer_auth(&typo).send().await.unwrap();
    assert_eq!(header(&echoed(resp).await, "authorization"), None);
    // In the token query parameter too (a query lands in the upstream's access log); the
    // parameter holding anything else is the upstream's.
    // As sent, and in the encodings the upstream's query parser reads back as the token.
    for sent in [token.clone(), format!("tgp%5F{}", &token[4..]), format!("+%74{}", &token[1..])] {
        let echo = echoed(
            w.http.get(w.gateway.url(&format!("/public/a?access_token={sent}&x=1"))).send().await.unwrap(),
        )
        .await;
        assert_eq!(echo["uri"], "/public/a?x=1", "{sent}");
    }
    let echo =
        echoed(w.http.get(w.gateway.url("/public/a?access_token=upstream-own&x=1")).send().await.unwrap())
            .await;
    assert_eq!(echo["uri"], "/public/a?access_token=upstream-own&x=1");
    for own in [
        "Basic dXNlcjpwYXNz",
        "Bearer upstream-session-1",
        r#"Digest username="u", uri="/public/tgs_2024.csv", response="6629fae49393a05397450978507c4ef1""#,
        r#"Digest username="tgs_2024", uri="/public/a", response="6629fae49393a05397450978507c4ef1""#,
        "Bearer tgs_live_abc123",
    ] {
        let resp = w.http.get(w.gateway.url("/public/a")).header("Authorization", own).send().await.unwrap();
        assert_eq!(header(&echoed(resp).await, "authorization"), Some(own));
    }
}

#[tokio::test]
async fn forged_identity_headers_never_reach_the_upstream() {
    let mut w = World::start().await;
    let user = w.user("acme", "f@example.com", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;

    let resp = w
        .http
        .get(w.gateway.url("/shop"))
        .bearer_auth(&token)
        .header("X-Auth-Subject", "user:root")
        .header("X-Auth-Role", "admin")
        .header("x-auth-anything", "forged")
        // CGI-style upstreams read `_` as `-`: HTTP_X_AUTH_EMAIL either way.
        .header("X_Auth_Email", "ceo@example.com")
        .header("x_auth-attr-tenant", "victim")
        // PHP behind Caddy reads `.` as `_` too.
        .header("X.Auth.Email", "ceo@example.com")
        // The request id is the gateway's, however it is spelled.
        .header("X_Request_Id", "forged")
        .header("x-request_id", "forged")
        .header("X.Request.Id", "forged")
        // So is the API-key header a credential came in.
        .header("X_API_Key", &token)
        // Zend, Symfony before 3.3 and Yii 2 run the path these name instead of the one routed
        // and authorized.
        .header("X-Original-URL", "/shop/admin")
        .header("X_Rewrite_Url", "/shop/admin")
        .send()
        .await
        .unwrap();
    let echo = echoed(resp).await;
    assert_no_forged_request_id(&echo);
    let rewrites: Vec<&String> = echo["headers"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.contains("original") || k.contains("rewrite"))
        .collect();
    assert!(rewrites.is_empty(), "{rewrites:?}");
    assert_eq!(header(&echo, "x-auth-subject"), Some(format!("user:{}", user.id).as_str()));
    assert_eq!(header(&echo, "x-auth-role"), Some("viewer"));
    assert_eq!(echo["headers"]["x-auth-subject"].as_array().unwrap().len(), 1);
    assert!(echo["headers"].get("x-auth-anything").is_none());
    let respelled: Vec<&String> = echo["headers"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("x_auth") || k.starts_with("x.auth") || k.starts_with("x_api"))
        .collect();
    assert!(respelled.is_empty(), "{respelled:?}");

    // A public route needs no token and still strips the namespace.
    let resp = w
        .http
        .get(w.gateway.url("/public/page"))
        .header("X-Auth-Subject", "user:root")
        .header("X-Auth-Org", "acme")
        .header("X_Auth_Subject", "user:root")
        .header("X_Request_Id", "forged")
        .send()
        .await
        .unwrap();
    let echo = echoed(resp).await;
    assert_no_forged_request_id(&echo);
    let forged: Vec<&String> = echo["headers"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.replace('_', "-").starts_with("x-auth-"))
        .collect();
    assert!(forged.is_empty(), "{forged:?}");
}

/// The upstream saw one request id, the gateway's, under no other spelling of its name.
fn assert_no_forged_request_id(echo: &serde_json::Value) {
    let ids: Vec<(&String, &serde_json::Value)> = echo["headers"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| name.replace(['_', '.'], "-") == "x-request-id")
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(ids[0].0, "x-request-id");
    assert_eq!(ids[0].1.as_array().map(Vec::len), Some(1), "{ids:?}");
    assert_ne!(ids[0].1[0], "forged");
}

#[tokio::test]
async fn a_bad_checksum_is_refused_before_any_store_access_and_unknown_reads_like_wrong_secret() {
    let mut w = World::start().await;
    let user = w.user("acme", "c@example.com", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    let mut bad = token.clone().into_bytes();
    let i = bad.len() - 3;
    bad[i] = if bad[i] == b'x' { b'y' } else { b'x' };
    let bad = String::from_utf8(bad).unwrap();

    w.redis.reset_stats();
    let (_, malformed) = error_body(w.get(&w.gateway, "/shop", &bad).await, 401).await;
    let commands = w.redis.commands_run();
    assert!(commands.is_empty(), "a malformed token must not reach the store: {commands:?}");

    // The counter does count: an unknown but well-formed id reads the store.
    let unknown = token::generate(token::TokenKind::Pat).token;
    let (www_unknown, unknown_body) = error_body(w.get(&w.gateway, "/shop", &unknown).await, 401).await;
    assert!(w.redis.command_calls("get") > 0);

    // Same id, other secret, valid checksum.
    let other = token::generate(token::TokenKind::Pat).token;
    let body = format!("{}{}", &token[..10], &other[10..40]);
    let wrong = checksummed(&body);
    let (www_wrong, wrong_body) = error_body(w.get(&w.gateway, "/shop", &wrong).await, 401).await;

    assert_eq!(www_unknown.as_deref(), Some("Bearer realm=\"tollgate\", error=\"invalid_token\""));
    assert_eq!(www_unknown, www_wrong);
    for field in ["error", "error_description"] {
        assert_eq!(unknown_body[field], wrong_body[field], "{field}");
        assert_eq!(unknown_body[field], malformed[field], "{field}");
    }
}

#[tokio::test]
async fn only_the_right_secret_learns_that_a_token_is_revoked_expired_or_its_owner_suspended() {
    let mut w = World::start().await;
    let (_, unknown) =
        error_body(w.get(&w.gateway, "/shop", &token::generate(token::TokenKind::Pat).token).await, 401)
            .await;
    let ann = w.user("acme", "ann@example.com", Role::Viewer, serde_json::json!({})).await;
    let revoked = w.pat(&ann, TokenSpec::default()).await;
    w.store.revoke_token(&token::parse(&revoked).unwrap().id, None, None).await.unwrap();
    let past = TokenSpec { expires_at: Some(now_millis() - 60_000), ..TokenSpec::default() };
    let expired = w.pat(&ann, past).await;
    let bob = w.user("acme", "bob@example.com", Role::Viewer, serde_json::json!({})).await;
    let suspended = w.pat(&bob, TokenSpec::default()).await;
    let before = w.store.get_user(&bob.id).await.unwrap().unwrap();
    let mut after = bob.clone();
    after.status = UserStatus::Suspended;
    w.store.update_user(&before, &after, None, None).await.unwrap();

    for (token, reason) in [
        (&revoked, "the access token has been revoked"),
        (&expired, "the access token has expired"),
        (&suspended, "the owner of the access token is suspended"),
    ] {
        // The holder of the token is told why.
        let told = eventually(Duration::from_secs(2), || async {
            let (_, body) = error_body(w.get(&w.gateway, "/shop", token).await, 401).await;
            body["error_description"] == reason
        });
        assert!(told.await, "{reason}");
        // Someone who knows only the id reads what an unknown token reads.
        let other = token::generate(token::TokenKind::Pat).token;
        let guess = checksummed(&format!("{}{}", &token[..10], &other[10..40]));
        let (_, body) = error_body(w.get(&w.gateway, "/shop", &guess).await, 401).await;
        assert_eq!(body["error_description"], unknown["error_description"], "{reason}");
        assert_eq!(body["error"], unknown["error"], "{reason}");
    }
}

/// A well-formed token with the given 40-character body (prefix, id and secret).
fn checksummed(body: &str) -> String {
    let crc = crc32fast::hash(body.as_bytes());
    const B62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut n = crc;
    let mut out = [b'0'; 6];
    for slot in out.iter_mut().rev() {
        *slot = B62[(n % 62) as usize];
        n /= 62;
    }
    let token = format!("{body}{}", String::from_utf8_lossy(&out));
    assert!(token::parse(&token).is_ok(), "test helper must produce a well-formed token");
    token
}

#[tokio::test]
async fn a_token_with_a_short_ttl_works_then_is_refused() {
    let mut w = World::start().await;
    let user = w.user("acme", "t@example.com", Role::Viewer, serde_json::json!({})).await;
    // Long enough for the first request's argon2 run, which yields to everything else on a busy
    // machine (the suite's `argon2.max_wait` is 120 s, so it is not refused busy meanwhile).
    let expires_at = now_millis() + 30_000;
    let token = w.pat(&user, TokenSpec { expires_at: Some(expires_at), ..TokenSpec::default() }).await;
    assert_eq!(w.get(&w.gateway, "/shop", &token).await.status(), 200);
    let wait = (expires_at - now_millis()).max(0) as u64 + 50;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let (_, body) = error_body(w.get(&w.gateway, "/shop", &token).await, 401).await;
    assert_eq!(body["error"], "invalid_token");
    assert_eq!(body["error_description"], "the access token has expired");
}

#[tokio::test]
async fn scope_environment_and_org_are_enforced_with_403() {
    let mut w = World::start().await;
    let editor = w.user("acme", "e@example.com", Role::Editor, serde_json::json!({})).await;
    let read_only = w
        .pat(
            &editor,
            TokenSpec {
                scope: Some(Scope { name: Some("read".into()), permissions: vec!["read".into()] }),
                ..TokenSpec::default()
            },
        )
        .await;
    assert_eq!(w.get(&w.gateway, "/shop", &read_only).await.status(), 200);
    let (www, body) = error_body(w.post(&w.gateway, "/shop", &read_only).await, 403).await;
    assert_eq!(www.as_deref(), Some("Bearer realm=\"tollgate\", error=\"insufficient_scope\""));
    assert_eq!(body["error"], "insufficient_scope");
    assert!(body["error_description"].as_str().unwrap().contains("write"));

    let staging_only = w
        .pat(&editor, TokenSpec { environments: Some(vec!["staging".into()]), ..TokenSpec::default() })
        .await;
    assert_eq!(w.post(&w.gateway, "/staging", &staging_only).await.status(), 200);
    let (_, body) = error_body(w.get(&w.gateway, "/shop", &staging_only).await, 403).await;
    assert!(body["error_description"].as_str().unwrap().contains("production"));

    let outsider = w.user("globex", "o@globex.com", Role::Admin, serde_json::json!({})).await;
    let foreign = w.pat(&outsider, TokenSpec::default()).await;
    assert_eq!(w.get(&w.gateway, "/globex", &foreign).await.status(), 200);
    error_body(w.get(&w.gateway, "/shop", &foreign).await, 403).await;

    // The route's per-method permission: DELETE needs admin, which an editor lacks.
    let full = w.pat(&editor, TokenSpec::default()).await;
    let resp = w.http.delete(w.gateway.url("/shop/1")).bearer_auth(&full).send().await.unwrap();
    error_body(resp, 403).await;
    // Nor can a POST ask the upstream's framework to run it as a DELETE, in any spelling.
    for (header, value, query) in [
        ("X-HTTP-Method-Override", "DELETE", ""),
        ("X-HTTP-Method", "delete", ""),
        ("X-Method-Override", "Delete", ""),
        ("X-Other", "x", "?_method=DELETE"),
        ("X-Other", "x", "?a=1;_method=%44ELETE"),
        ("X_HTTP_Method_Override", "DELETE", ""),
        ("X.HTTP.Method.Override", "DELETE", ""),
        ("X-Other", "x", "?.method=DELETE"),
        ("X-Other", "x", "?+_method=+delete+"),
        ("X-Other", "x", "?_method%00x=DELETE"),
    ] {
        let resp = w
            .http
            .post(w.gateway.url(&format!("/shop/1{query}")))
            .bearer_auth(&full)
            .header(header, value)
            .send()
            .await
            .unwrap();
        let (_, body) = error_body(resp, 403).await;
        assert!(body["error_description"].as_str().unwrap().contains("admin"), "{header} {query}: {body}");
    }
    let post_as = |method: &str| {
        w.http
            .post(w.gateway.url("/shop/1"))
            .bearer_auth(&full)
            .header("X-HTTP-Method-Override", method)
            .send()
    };
    assert_eq!(post_as("PUT").await.unwrap().status(), 200, "an override the grant covers passes");
    assert_eq!(post_as("DE LETE").await.unwrap().status(), 400, "an override that is no method");
    // Slim 3 and 4 take the header on any method: a GET that asks to be a DELETE is one.
    for (header, query) in [("X-HTTP-Method-Override", ""), ("X-Other", "?_method=DELETE")] {
        let resp = w
            .http
            .get(w.gateway.url(&format!("/shop/1{query}")))
            .bearer_auth(&full)
            .header(header, "DELETE")
            .send()
            .await
            .unwrap();
        let (_, body) = error_body(resp, 403).await;
        assert!(body["error_description"].as_str().unwrap().contains("admin"), "{header} {query}: {body}");
    }

    // A route listing GET (admin) and not HEAD: HEAD needs admin too, since upstreams answer it
    // by running the GET handler.
    let resp = w.http.get(w.gateway.url("/reports/q")).bearer_auth(&full).send().await.unwrap();
    error_body(resp, 403).await;
    let resp = w.http.head(w.gateway.url("/reports/q")).bearer_auth(&full).send().await.unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(
        w.post(&w.gateway, "/reports/q", &full).await.status(),
        200,
        "other methods keep their default"
    );
    let admin = w.user("acme", "a@example.com", Role::Admin, serde_json::json!({})).await;
    let admin = w.pat(&admin, TokenSpec::default()).await;
    let resp = w.http.head(w.gateway.url("/reports/q")).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn role_changes_suspension_and_revocation_reach_every_instance() {
    let mut w = World::start().await;
    let second = w.second_gateway();
    let mut user = w.user("acme", "r@example.com", Role::Editor, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    let gateways = [&w.gateway, &second];
    for g in gateways {
        // Warm both caches.
        assert_eq!(w.post(g, "/shop", &token).await.status(), 200);
    }

    let within = Duration::from_secs(2);
    let before = w.store.get_user(&user.id).await.unwrap().unwrap();
    user.org_role = Role::Viewer;
    w.store.update_user(&before, &user, None, None).await.unwrap();
    for g in gateways {
        assert!(eventually(within, || async { w.post(g, "/shop", &token).await.status() == 403 }).await);
        assert_eq!(w.get(g, "/shop", &token).await.status(), 200, "a viewer can still read");
    }

    let before = w.store.get_user(&user.id).await.unwrap().unwrap();
    user.status = UserStatus::Suspended;
    w.store.update_user(&before, &user, None, None).await.unwrap();
    for g in gateways {
        assert!(eventually(within, || async { w.get(g, "/shop", &token).await.status() == 401 }).await);
    }

    let before = w.store.get_user(&user.id).await.unwrap().unwrap();
    user.status = UserStatus::Active;
    w.store.update_user(&before, &user, None, None).await.unwrap();
    for g in gateways {
        assert!(eventually(within, || async { w.get(g, "/shop", &token).await.status() == 200 }).await);
    }

    let id = token::parse(&token).unwrap().id;
    w.store.revoke_token(&id, Some("leaked".into()), None).await.unwrap();
    for g in gateways {
        assert!(eventually(within, || async { w.get(g, "/shop", &token).await.status() == 401 }).await);
        let (_, body) = error_body(w.get(g, "/shop", &token).await, 401).await;
        assert_eq!(body["error_description"], "the access token has been revoked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_lost_its_invalidation_feed_reads_the_store_until_it_is_back() {
    // The second gateway logs in to Redis as a user of its own, so that its subscription alone can
    // be taken away while its reads still work: Redis drops the subscribed connection of a user who
    // loses the channel, and refuses its new SUBSCRIBE, as a broken pub/sub path would.
    let mut w = World::start().await;
    let mut redis = w.redis.client();
    let mut acl = |args: &[&str]| {
        let _: () = redis::cmd("ACL").arg("SETUSER").arg("gw_b").arg(args).query(&mut redis).unwrap();
    };
    acl(&["on", ">secret-b", "~*", "&*", "+@all"]);
    let port = free_port();
    let url = w.redis.url().replace("redis://", "redis://gw_b:secret-b@");
    let second = Gateway::start_with(port, &gateway_config(port, &url, w.upstream.port));
    let live = "invalidation feed live";
    assert!(eventually(Duration::from_secs(5), || async { second.log_text().contains(live) }).await);
    let user = w.user("acme", "feed@acme.io", Role::Viewer, serde_json::json!({})).await;
    let revoked = w.pat(&user, TokenSpec::default()).await;
    let kept = w.pat(&user, TokenSpec::default()).await;
    for token in [&revoked, &kept] {
        assert_eq!(w.get(&second, "/shop", token).await.status(), 200, "cached on the second gateway");
    }

    let health = || async {
        let metrics = w.http.get(format!("{}/metrics", second.admin_url())).send().await.unwrap();
        let metrics = metrics.text().await.unwrap();
        let sample =
            |name: &str| metrics.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).map(String::from);
        let ready = w.http.get(format!("{}/readyz", second.admin_url())).send().await.unwrap();
        assert_eq!(ready.status(), 200, "serving from the store is still serving");
        let ready: serde_json::Value = ready.json().await.unwrap();
        (
            sample("tollgate_cache_live "),
            sample("tollgate_invalidation_feed_lost_total "),
            ready["cache"].clone(),
        )
    };
    assert_eq!(health().await, (Some("1".into()), Some("0".into()), "live".into()));

    acl(&["resetchannels"]);
    let lost =
        eventually(Duration::from_secs(5), || async { second.log_text().contains("invalidation feed lost") });
    assert!(lost.await, "{}", second.log_text());
    // An operator sees it without reading the log.
    assert_eq!(health().await, (Some("0".into()), Some("1".into()), "bypassed".into()));
    // Revoked while the second gateway hears nothing: it must not answer from its cache.
    let id = token::parse(&revoked).unwrap().id;
    w.store.revoke_token(&id, Some("leaked".into()), None).await.unwrap();
    assert_eq!(w.get(&second, "/shop", &revoked).await.status(), 401, "refused at once, from the store");
    assert_eq!(w.get(&second, "/shop", &kept).await.status(), 200, "the store still answers for the rest");

    // Back: the entries from before the loss are gone, not trusted again.
    acl(&["allchannels"]);
    let back = eventually(Duration::from_secs(10), || async { second.log_text().matches(live).count() >= 2 });
    assert!(back.await, "{}", second.log_text());
    assert_eq!(health().await, (Some("1".into()), Some("1".into()), "live".into()));
    assert_eq!(w.get(&second, "/shop", &revoked).await.status(), 401);
    assert_eq!(w.get(&second, "/shop", &kept).await.status(), 200);
    assert!(!second.log_text().contains("secret-b"), "the Redis password is never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_host_cannot_lead_the_upstream_past_the_hosts_routes() {
    let w = World::start().await;
    let port = free_port();
    let hosts = format!(
        "  - {{ name: admin-users, host: admin.example.com, path: /users, upstream: \"127.0.0.1:{up}\", org: acme, \
         project: shop, environment: production, permissions: {{ GET: admin }} }}\n  - {{ name: public-users, path: /users, \
         upstream: \"127.0.0.1:{up}\", auth: none }}\n",
        up = w.upstream.port
    );
    let g = Gateway::start_with(port, &(gateway_config(port, &w.redis.url(), w.upstream.port) + &hosts));
    let get = |headers: &[(&str, &str)]| {
        let mut req = w.http.get(g.url("/users")).header("host", "www.example.com");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.send()
    };
    assert_eq!(get(&[]).await.unwrap().status(), 200, "the public route, without a token");
    // Rails routes by X-Forwarded-Host: these would reach the admin host's handlers.
    for forged in [
        ("X-Forwarded-Host", "admin.example.com"),
        ("X-Forwarded-Host", "cdn.example.net, ADMIN.example.com:443"),
        ("X_Forwarded_Host", "admin.example.com"),
        // Yii 2 takes its host from X-Original-Host behind a trusted proxy.
        ("X-Original-Host", "admin.example.com"),
        ("Forwarded", "for=192.0.2.1;proto=https;host=\"admin.example.com\""),
    ] {
        let (_, body) = error_body(get(&[forged]).await.unwrap(), 400).await;
        assert!(body["error_description"].as_str().unwrap().contains("Forwarded"), "{forged:?}: {body}");
    }
    // One that is not text hides its hosts: refused too.
    let mut raw = b"GET /users HTTP/1.1\r\nHost: www.example.com\r\nX-Forwarded-Host: ".to_vec();
    raw.push(0xff);
    raw.extend_from_slice(b"x, admin.example.com\r\nConnection: close\r\n\r\n");
    let answer = raw_request(g.addr(), &raw);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // A forwarded host routed as `Host` is (a CDN's public name) passes.
    for same in [
        ("X-Forwarded-Host", "www.example.com"),
        ("X-Forwarded-Host", "cdn.example.net"),
        ("Forwarded", "for=192.0.2.1"),
    ] {
        assert_eq!(get(&[same]).await.unwrap().status(), 200, "{same:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_and_the_upstreams_own_answers_pass_through_untouched() {
    let mut w = World::start().await;
    let user = w.user("acme", "body@acme.io", Role::Editor, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;

    // A body of 300 KiB with a length, then one sent in chunks, reach the upstream byte for byte.
    let big: String = (0..300 * 1024).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let resp = w
        .http
        .post(w.gateway.url("/shop/upload"))
        .bearer_auth(&token)
        .body(big.clone())
        .send()
        .await
        .unwrap();
    let echo = echoed(resp).await;
    assert_eq!(echo["body_length"], big.len());
    assert!(echo["body"].as_str() == Some(big.as_str()), "the body arrived changed");
    let chunked = format!(
        "POST /shop/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
    );
    let raw = raw_request(w.gateway.addr(), chunked.as_bytes());
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.contains(r#""body":"hello, world""#), "{raw}");
    // Framing the gateway would pass on otherwise than sent is refused, before any route.
    for (framing, reason) in [
        ("Transfer-Encoding: gzip, chunked", "a Transfer-Encoding other than one chunked is not supported"),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip, chunked",
            "a Transfer-Encoding other than one chunked is not supported",
        ),
        ("Content-Length: 5, 5", "Content-Length must be one number, on one line"),
        ("Content-Length: 5\r\nContent-Length: 5, 5", "Content-Length must be one number, on one line"),
        ("Content-Length: 5\r\nContent-Length: 5", "Content-Length must be one number, on one line"),
    ] {
        let request = format!(
            "POST /public/upload HTTP/1.1\r\nHost: x\r\n{framing}\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let raw = raw_request(w.gateway.addr(), request.as_bytes());
        assert!(raw.starts_with("HTTP/1.1 400") && raw.contains(reason), "{framing}: {raw}");
    }

    // The upstream's own error is its answer, not the gateway's: status, headers and body.
    const DOWN: &[u8] =
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nRetry-After: 7\r\nContent-Length: 11\r\n\r\nmaintenance";
    let down = RawUpstream::start_answering(DOWN);
    let port = free_port();
    let g = Gateway::start_with(port, &gateway_config(port, &w.redis.url(), down.port));
    let resp = w.get(&g, "/shop/x", &token).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "7");
    assert_eq!(resp.headers()["content-type"], "text/plain");
    assert!(resp.headers().get("x-request-id").is_some(), "with the request id added");
    assert_eq!(resp.text().await.unwrap(), "maintenance");
}

#[tokio::test]
async fn identity_headers_follow_role_and_attribute_changes_on_the_next_request() {
    // The gateway keeps made identity headers per principal and route: they must never outlive
    // the records they were made from.
    let mut w = World::start().await;
    let second = w.second_gateway();
    let mut user = w.user("acme", "h@example.com", Role::Editor, serde_json::json!({"tier": "gold"})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    let gateways = [&w.gateway, &second];
    for g in gateways {
        let echo = echoed(w.get(g, "/shop", &token).await).await;
        assert_eq!(header(&echo, "x-auth-role"), Some("editor"));
        assert_eq!(header(&echo, "x-auth-attr-tier"), Some("gold"));
    }

    let before = w.store.get_user(&user.id).await.unwrap().unwrap();
    user.org_role = Role::Viewer;
    user.attributes = serde_json::from_value(serde_json::json!({"tier": "silver", "team": "red"})).unwrap();
    w.store.update_user(&before, &user, None, None).await.unwrap();
    // Both instances hear of the change through Redis: within the propagation bound, then always.
    for g in gateways {
        let changed = eventually(Duration::from_secs(2), || async {
            header(&echoed(w.get(g, "/shop", &token).await).await, "x-auth-role") == Some("viewer")
        })
        .await;
        assert!(changed, "the role header did not follow the change");
        let echo = echoed(w.get(g, "/shop", &token).await).await;
        assert_eq!(header(&echo, "x-auth-role"), Some("viewer"));
        assert_eq!(header(&echo, "x-auth-permissions"), Some("read"));
        assert_eq!(header(&echo, "x-auth-attr-tier"), Some("silver"));
        assert_eq!(header(&echo, "x-auth-attr-team"), Some("red"));
        let attrs: serde_json::Value =
            serde_json::from_str(header(&echo, "x-auth-attributes").unwrap()).unwrap();
        assert_eq!(attrs["tier"], "silver");
    }
}

#[tokio::test]
async fn a_stopped_redis_gives_503_with_retry_after_and_recovery_needs_no_restart() {
    let mut w = World::start().await;
    let user = w.user("acme", "d@example.com", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;

    w.redis.stop();
    // The client's own timeout (10 s) would fail this test if the gateway hung.
    let resp = w.get(&w.gateway, "/shop", &token).await;
    assert_eq!(resp.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
    let (_, body) = error_body(resp, 503).await;
    assert_eq!(body["error"], "temporarily_unavailable");

    w.redis.restart();
    assert!(
        eventually(Duration::from_secs(10), || async {
            w.get(&w.gateway, "/shop", &token).await.status() == 200
        })
        .await
    );
}

/// A record the store holds but this build cannot read (another version wrote it, or a hand): no
/// retry mends that, so it is not answered as an outage with `Retry-After`.
#[tokio::test]
async fn a_record_that_cannot_be_read_is_a_500_without_retry_after() {
    let mut w = World::start().await;
    let user = w.user("acme", "c@example.com", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    let key = format!("t:token:{}", &token[..10]);
    let kept: String = redis::cmd("GET").arg(&key).query(&mut w.redis.client()).unwrap();
    let _: () =
        redis::cmd("SET").arg(&key).arg("\"from a newer build\"").query(&mut w.redis.client()).unwrap();

    let resp = w.get(&w.gateway, "/shop", &token).await;
    assert_eq!(resp.headers().get("retry-after"), None);
    let (_, body) = error_body(resp, 500).await;
    assert_eq!(body["error"], "server_error", "{body}");
    assert!(!body.to_string().contains(&token[10..]), "{body}");
    // The admin API says the same, quoting nothing it read.
    let resp =
        w.http.get(format!("{}/v1/whoami", w.gateway.admin_url())).bearer_auth(&token).send().await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.headers().get("retry-after")), (500, None));
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "internal_error", "{body}");
    assert!(!body.to_string().contains("newer build"), "{body}");

    // Nothing of it was kept: the record read again is the token's.
    let _: () = redis::cmd("SET").arg(&key).arg(&kept).query(&mut w.redis.client()).unwrap();
    assert_eq!(w.get(&w.gateway, "/shop", &token).await.status(), 200);
}

#[tokio::test]
async fn a_redis_that_hangs_gives_503_within_the_store_timeout_and_readyz_says_so() {
    let mut w = World::start().await;
    let user = w.user("acme", "h@example.com", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    let ready = |w: &World| {
        let url = format!("{}/readyz", w.gateway.admin_url());
        let http = w.http.clone();
        async move { http.get(url).send().await.unwrap().status() }
    };
    assert_eq!(ready(&w).await, 200);

    // Connections stay open and nothing answers: only the store timeout can end the wait. (The
    // client's own timeout, 10 s, would fail this test if the gateway hung.)
    w.redis.pause();
    let resp = w.get(&w.gateway, "/shop", &token).await;
    assert_eq!(resp.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
    let (_, body) = error_body(resp, 503).await;
    assert_eq!(body["error"], "temporarily_unavailable");
    assert_eq!(ready(&w).await, 503);

    w.redis.resume();
    assert!(
        eventually(Duration::from_secs(10), || async {
            w.get(&w.gateway, "/shop", &token).await.status() == 200
        })
        .await
    );
    assert_eq!(ready(&w).await, 200);
}

/// A feed connection that hangs is not closed by anything: the heartbeat's failure is what stops
/// the cache (else a revocation would go unheard while a cached token was served on).
#[tokio::test]
async fn a_cached_token_stops_being_served_from_the_cache_when_the_feed_hangs() {
    let mut w = World::start().await;
    let user = w.user("acme", "hang@example.com", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    assert_eq!(w.get(&w.gateway, "/shop", &token).await.status(), 200, "cached");
    w.redis.pause();
    let dark = eventually(Duration::from_secs(10), || async {
        w.get(&w.gateway, "/shop", &token).await.status() == 503
    })
    .await;
    assert!(dark, "the cached grant was still served with the feed hung");
    assert!(w.gateway.log_text().contains("invalidation feed lost"), "{}", w.gateway.log_text());
    w.redis.resume();
    let back = eventually(Duration::from_secs(10), || async {
        w.get(&w.gateway, "/shop", &token).await.status() == 200
    });
    assert!(back.await);
}

#[tokio::test]
async fn no_route_is_a_404_json() {
    let w = World::start().await;
    let resp = w.http.get(w.gateway.url("/nowhere")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers().get("content-type").unwrap(), "application/json");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "not_found");
}

#[tokio::test]
async fn bad_input_gets_a_4xx_never_a_5xx() {
    let mut w = World::start().await;
    let user = w.user("acme", "b@example.com", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    let addr = w.gateway.addr();
    let status = |raw: &str| raw.split(' ').nth(1).and_then(|s| s.parse::<u16>().ok()).unwrap_or(0);

    let dup = format!(
        "GET /shop HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let raw = raw_request(addr, dup.as_bytes());
    assert_eq!(status(&raw), 400, "{raw}");
    assert!(raw.contains("invalid_request"));

    let both = format!("GET /shop HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nX-API-Key: {token}\r\nConnection: close\r\n\r\n");
    assert_eq!(status(&raw_request(addr, both.as_bytes())), 400);

    let utf8 =
        b"GET /shop HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tgp_\xff\xfe\r\nConnection: close\r\n\r\n";
    let raw = raw_request(addr, utf8);
    assert_eq!(status(&raw), 401, "{raw}");

    for junk in ["Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer tgp_", "Bearer a b c"] {
        let resp = w.http.get(w.gateway.url("/shop")).header("Authorization", junk).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{junk:?}");
    }
    // A NUL or another control byte in the credential, sent as is (an HTTP client refuses to):
    // Pingora's parser refuses the head before Tollgate sees it, so what is checked here is
    // only what the client gets, a 4xx.
    for junk in [&b"Bearer tgp_\0"[..], b"Bearer tgp_\x01x", b"Bearer \0"] {
        let mut request = b"GET /shop HTTP/1.1\r\nHost: x\r\nAuthorization: ".to_vec();
        request.extend_from_slice(junk);
        request.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        let raw = raw_request(addr, &request);
        assert!((400..500).contains(&status(&raw)), "{junk:?}: {raw}");
    }

    // A public route cannot be used to reach a protected path.
    for target in ["/public/../shop", "/public/%2e%2e/shop", "/public%2f..%2fshop"] {
        let raw = raw_request(
            addr,
            format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert_eq!(status(&raw), 400, "{target}: {raw}");
    }
    // A full-URL target naming another host than `Host`: Pingora refuses it (its byte-exact
    // check) before Tollgate sees it, so this checks what the client gets, not Tollgate's own
    // (normalizing) comparison, which HTTP/1 never reaches.
    let raw =
        raw_request(addr, b"GET http://other.example/shop HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(status(&raw), 400, "refused, not let through to a 401: {raw}");

    let huge = format!("Bearer {}", "a".repeat(60_000));
    let resp = w.http.get(w.gateway.url("/shop")).header("Authorization", huge).send().await.unwrap();
    assert!(resp.status().is_client_error(), "{}", resp.status());
}

#[tokio::test]
async fn header_names_travel_in_lowercase_unless_the_route_keeps_their_case() {
    let upstream = RawUpstream::start();
    let mut w = World::start_with(|redis, _| {
        let port = free_port();
        let keep = format!(
            "  - {{ name: keep, path: /keep, upstream: \"127.0.0.1:{}\", org: acme, project: shop, \
             environment: production, preserve_header_case: true }}\n",
            upstream.port
        );
        Gateway::start_with(port, &(gateway_config(port, &redis.url(), upstream.port) + &keep))
    })
    .await;
    let user = w.user("acme", "case@example.com", Role::Viewer, serde_json::json!({"tier": "gold"})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    let send = |target: &str| {
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nX-Custom-Thing: 1\r\n\
             X-Auth-Role: admin\r\nConnection: close\r\n\r\n"
        );
        let answer = raw_request(w.gateway.addr(), request.as_bytes());
        (answer, upstream.heads().pop().unwrap_or_default())
    };

    for (target, keeps_case) in [("/noquery/a", false), ("/keep/a", true), ("http://x/noquery/b?q=1", false)]
    {
        let (answer, head) = send(target);
        // Either way: the upstream's reason phrase, the identity set, nothing forged, no credential.
        assert!(answer.starts_with("HTTP/1.1 200 Fine By Me\r\n"), "{target}: {answer}");
        assert!(answer.ends_with("\r\n\r\nok"), "{target}: {answer}");
        assert!(head.contains(&format!("x-auth-subject: user:{}\r\n", user.id)), "{target}: {head}");
        assert!(head.contains("x-auth-role: viewer\r\n"), "{target}: {head}");
        assert!(head.contains("x-auth-attr-tier: gold\r\n"), "{target}: {head}");
        assert!(!head.to_ascii_lowercase().contains("x-auth-role: admin"), "{target}: {head}");
        assert!(!head.to_ascii_lowercase().contains("authorization"), "{target}: {head}");
        let request_id = head.lines().find_map(|l| l.strip_prefix("x-request-id: ")).expect("request id");
        assert!(answer.to_ascii_lowercase().contains(&format!("x-request-id: {request_id}\r\n")));
        // Header names: as sent, or in lowercase both ways.
        let (sent, note) = if keeps_case {
            ("X-Custom-Thing: 1\r\n", "X-Upstream-Note: yes\r\n")
        } else {
            ("x-custom-thing: 1\r\n", "x-upstream-note: yes\r\n")
        };
        assert!(head.contains(sent), "{target}: {head}");
        assert!(answer.contains(note), "{target}: {answer}");
    }
    // An absolute-form target reaches the upstream as Pingora sends it when it keeps the case.
    let (_, lower) = send("http://x/noquery/b?q=1");
    let (_, kept) = send("http://x/keep/b?q=1");
    let line = |head: &str| head.lines().next().unwrap_or_default().replace("/keep/", "/noquery/");
    assert_eq!(line(&lower), line(&kept));
    assert!(line(&lower).contains("/noquery/b?q=1"), "{lower}");
}

// Multi-threaded: the raw requests block a thread while the in-process upstream answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_routed_as_the_upstream_will_read_it() {
    // Routes that a looser reading of the request would confuse: a host's protected /vault beside a
    // public /vault for any host, and /shop/admin (another org) inside /shop.
    let mut w = World::start_with(|redis, upstream| {
        let port = free_port();
        let u = upstream.port;
        let mut config = gateway_config(port, &redis.url(), u);
        config.push_str(&format!(
            "  - {{ name: vault, host: api.example.com, path: /vault, upstream: \"127.0.0.1:{u}\", org: acme, project: shop, environment: production }}\n  - {{ name: open-vault, path: /vault, upstream: \"127.0.0.1:{u}\", auth: none }}\n  - {{ name: shop-admin, path: /shop/admin, upstream: \"127.0.0.1:{u}\", org: globex, project: web, environment: production }}\n"
        ));
        Gateway::start_with(port, &config)
    })
    .await;
    let user = w.user("acme", "r@example.com", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    let addr = w.gateway.addr();
    let status = |raw: &str| raw.split(' ').nth(1).and_then(|s| s.parse::<u16>().ok()).unwrap_or(0);
    let get = |target: &str, headers: &str| {
        raw_request(addr, format!("GET {target} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n").as_bytes())
    };

    // The public route is reachable from any host; the host's protected one is not bypassed by
    // a trailing dot, nor by naming the host in the request target instead of `Host` (a full-URL
    // target needs `Host` too, as every HTTP/1.1 request does).
    let raw = get("/vault", "Host: other.example\r\n");
    assert_eq!(status(&raw), 200, "{raw}");
    for (target, headers) in [
        ("/vault", "Host: api.example.com\r\n"),
        ("/vault", "Host: API.example.com.\r\n"),
        ("http://api.example.com/vault", "Host: api.example.com\r\n"),
    ] {
        let raw = get(target, headers);
        assert_eq!(status(&raw), 401, "{target} {headers}: {raw}");
    }
    for target in ["http://api.example.com/vault", "http://API.example.com:80/vault", "/vault"] {
        let raw = get(target, "");
        assert_eq!(status(&raw), 400, "{target} without Host: {raw}");
        assert!(raw.contains("Host header"), "{target}: {raw}");
    }
    // A port that is not a number does not make the host another one (Go's mux would still read
    // api.example.com), so the host's route cannot be skipped with it.
    for host in ["api.example.com:abc", "api.example.com:80:1", "api.example.com:443x"] {
        let raw = get("/vault", &format!("Host: {host}\r\n"));
        assert_eq!(status(&raw), 400, "{host}: {raw}");
        assert!(raw.contains("port is not a number"), "{host}: {raw}");
    }
    // Nor does what ends a host in a URL, which an upstream building the URL from `Host` drops.
    for host in
        ["api.example.com/", "api.example.com?", "api.example.com#", "api.example.com\\", "%61pi.example.com"]
    {
        let raw = get("/vault", &format!("Host: {host}\r\n"));
        assert_eq!(status(&raw), 400, "{host}: {raw}");
        assert!(raw.contains("no host name has"), "{host}: {raw}");
    }
    // Nor an IPv4 address in another notation, which URL parsers read as the dotted one.
    let raw = get("/vault", "Host: 0x7f.1\r\n");
    assert!(status(&raw) == 400 && raw.contains("dotted decimal"), "{raw}");
    assert_eq!(status(&get("/vault", "Host: api.example.com:8443\r\n")), 401);
    // (Pingora itself refuses user info in the target.)
    assert_eq!(status(&get("http://user@api.example.com/vault", "Host: api.example.com\r\n")), 400);
    let raw = get(
        "http://api.example.com/vault/x",
        &format!("Host: api.example.com\r\nAuthorization: Bearer {token}\r\n"),
    );
    assert_eq!(status(&raw), 200, "{raw}");
    assert!(raw.contains(r#""host":["api.example.com"]"#), "{raw}");

    // A path that upstreams could read as another route's (/shop/admin rather than /shop, as
    // Go, Spring, Tomcat or nginx would) is refused, whichever way the upstream reads it.
    let bearer = format!("Host: x\r\nAuthorization: Bearer {token}\r\n");
    // (So is `//shop/items`: as sent it matches no route.)
    for target in [
        "/shop/%61dmin/users",
        "/shop;x/admin/users",
        "/shop/admin;v=1/users",
        "/shop//admin/users",
        "//shop/items",
    ] {
        let raw = get(target, &bearer);
        assert_eq!(status(&raw), 400, "{target}: {raw}");
        assert!(raw.contains("normalized"), "{target}: {raw}");
    }
    // Express and ASP.NET route without regard to letter case: a path that would reach another
    // route so read is refused; one that reaches the same route either way passes.
    for target in ["/shop/ADMIN/users", "/shop/Admin", "/shop//ADMIN/x"] {
        let raw = get(target, &bearer);
        assert_eq!(status(&raw), 400, "{target}: {raw}");
        assert!(raw.contains("letter case"), "{target}: {raw}");
    }
    for target in ["/shop/Items", "/shop/ITEMS/x"] {
        let raw = get(target, &bearer);
        assert_eq!(status(&raw), 200, "{target}: {raw}");
    }
    // Tomcat's `..;` is a dot-segment.
    for target in ["/shop/..;/admin", "/public/..;x/shop"] {
        let raw = get(target, &bearer);
        assert_eq!(status(&raw), 400, "{target}: {raw}");
    }
    // What is allowed reaches the upstream as it was sent.
    for target in ["/shop/items;v=1", "/shop/%7Eitems", "/shop//items"] {
        let raw = get(target, &bearer);
        assert_eq!(status(&raw), 200, "{target}: {raw}");
        assert!(raw.contains(&format!(r#""uri":"{target}""#)), "{target}: {raw}");
    }
}

// Multi-threaded: the raw requests block a thread while the in-process upstream answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_gets_the_target_as_sent_and_only_a_path_or_a_full_url() {
    let upstream = RawUpstream::start();
    let u = upstream.port;
    let mut w = World::with_routes(&format!(
        "  - {{ name: raw, path: /raw, upstream: \"127.0.0.1:{u}\", org: acme, project: shop, environment: production, query_token: true }}\n  - {{ name: raw-keep, path: /rawkeep, upstream: \"127.0.0.1:{u}\", org: acme, project: shop, environment: production, query_token: true, preserve_header_case: true }}\n  - {{ name: root, path: /, upstream: \"127.0.0.1:{u}\", auth: none }}\n"
    ))
    .await;
    let user = w.user("acme", "raw@example.com", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    let addr = w.gateway.addr();
    let status = |raw: &str| raw.split(' ').nth(1).and_then(|s| s.parse::<u16>().ok()).unwrap_or(0);
    let send = |method: &str, target: &[u8], headers: &str| {
        let mut request = format!("{method} ").into_bytes();
        request.extend_from_slice(target);
        request.extend_from_slice(
            format!(" HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n").as_bytes(),
        );
        let answer = raw_request(addr, &request);
        (answer, upstream.raw_heads().pop().unwrap_or_default())
    };
    let request_line = |head: &[u8]| head.split(|&b| b == b'\r').next().unwrap_or_default().to_vec();

    // A target that is neither a path nor a full URL: Pingora routes it as `/` and sends it as
    // it came, which a lenient upstream reads as `/admin/users`. Refused before any route.
    assert_eq!(status(&send("GET", b"/page", "").0), 200, "the root route answers");
    let seen = upstream.raw_heads().len();
    for (method, target) in
        [("GET", "admin/users"), ("GET", "x:/admin"), ("OPTIONS", "*"), ("GET", "*"), ("GET", "?x=1")]
    {
        let (answer, _) = send(method, target.as_bytes(), "");
        assert_eq!(status(&answer), 400, "{method} {target}: {answer}");
        assert!(answer.contains("neither a path"), "{method} {target}: {answer}");
    }
    assert_eq!(upstream.raw_heads().len(), seen, "nothing reached the upstream");

    // Removing the query token keeps every other byte of the target, whether or not the route
    // keeps header case. (A target that is not UTF-8 never gets this far: Pingora refuses it
    // while reading the head, which the unit tests of `headers` cover for any other way in.)
    let bearer = format!("Authorization: Bearer {token}\r\n");
    for prefix in ["/raw", "/rawkeep"] {
        let target = format!("{prefix}/%FF-%zz-\u{e9}?a=\u{e9}%FE&access_token={token}&b=1;c");
        let (answer, head) = send("GET", target.as_bytes(), "");
        assert_eq!(status(&answer), 200, "{prefix}: {answer}");
        let expected = format!("GET {prefix}/%FF-%zz-\u{e9}?a=\u{e9}%FE&b=1;c HTTP/1.1");
        assert_eq!(String::from_utf8_lossy(&request_line(&head)), expected);
        // With a credential: Pingora's debug line for the refused head quotes the head whole, and
        // the log (at debug here) is scanned for every token.
        let mut not_utf8 = format!("{prefix}/a\u{e9}").into_bytes();
        not_utf8.push(0xff);
        let (answer, _) = send("GET", &not_utf8, &bearer);
        assert_eq!(status(&answer), 400, "{prefix}: {answer}");
        // The request id is the gateway's in every spelling, on both ways of editing headers.
        let (answer, head) = send(
            "GET",
            format!("{prefix}/id").as_bytes(),
            &format!("{bearer}X_Request_Id: forged\r\nx-request_id: forged\r\n"),
        );
        assert_eq!(status(&answer), 200, "{prefix}: {answer}");
        let head = String::from_utf8_lossy(&head);
        assert!(!head.contains("forged"), "{prefix}: {head}");
    }
    // And on a public route.
    let (answer, head) = send("GET", b"/page", "X_Request_Id: forged\r\n");
    assert_eq!(status(&answer), 200, "{answer}");
    assert!(!String::from_utf8_lossy(&head).contains("forged"), "{}", String::from_utf8_lossy(&head));
}

#[tokio::test]
async fn a_method_in_lower_case_is_refused_since_upstreams_read_it_two_ways() {
    // `/shop` needs `admin` for DELETE. Django would run `delete` as DELETE, Go would not run it as
    // anything it knows: no one permission fits, so it never reaches the upstream.
    let mut w = World::start().await;
    let user = w.user("acme", "lower@acme.io", Role::Editor, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    for method in ["delete", "get", "Post"] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = w
            .http
            .request(method.clone(), w.gateway.url("/shop/x"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let (_, body) = error_body(resp, 400).await;
        assert!(body["error_description"].as_str().unwrap().contains("upper case"), "{method}: {body}");
    }
    assert_eq!(w.get(&w.gateway, "/shop/x", &token).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_tried_on_the_routes_next_upstream() {
    // Round robin over a dead and a live upstream answered every other request 502; nothing was
    // sent on a connection that was never made, so the next address takes it (as nginx does).
    let w = World::start().await;
    let port = free_port();
    let route = format!(
        "  - {{ name: pair, path: /pair, upstreams: [\"127.0.0.1:{dead}\", \"127.0.0.1:{live}\"], org: acme, \
         project: shop, environment: production }}\n  - {{ name: gone, path: /gone, upstreams: [\"127.0.0.1:{dead}\", \
         \"127.0.0.1:{dead2}\"], org: acme, project: shop, environment: production }}\n",
        dead = free_port(),
        dead2 = free_port(),
        live = w.upstream.port
    );
    let g = Gateway::start_with(port, &(gateway_config(port, &w.redis.url(), w.upstream.port) + &route));
    let user = w.user("acme", "pair@acme.io", Role::Editor, serde_json::json!({})).await;
    let mut w = w;
    let token = w.pat(&user, TokenSpec::default()).await;
    for i in 0..6 {
        let resp =
            w.http.post(g.url(&format!("/pair/{i}"))).bearer_auth(&token).body("once").send().await.unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        let echoed: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(echoed["body"], "once", "the body arrives whole, once: {echoed}");
    }
    // The dead address is passed over once it failed: one retry in all, not one every other request.
    let retried = g.log_text().matches("trying the route's next upstream").count();
    assert_eq!(retried, 1, "{}", g.log_text());
    // When every address refuses, the client gets the gateway's 502, after one try of each.
    let resp = w.get(&g, "/gone/x", &token).await;
    assert_eq!(resp.status(), 502);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "bad_gateway", "{body}");
}

/// The client's `Connection` header concerns its connection with the gateway: forwarded, one
/// naming `X-Auth-Subject` would have a later proxy (Go's `ReverseProxy`, Traefik, Caddy) delete
/// the gateway's own. Pingora 0.9 removes the client's hop-by-hop headers before the gateway adds
/// its own, and refuses a request whose `Connection` names `Host` or `X-Forwarded-For`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_hop_by_hop_headers_stop_at_the_gateway() {
    let mut w = World::start().await;
    let user = w.user("acme", "hop@acme.io", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    for nominated in ["X-Forwarded-For", "host"] {
        let resp = w
            .http
            .get(w.gateway.url("/shop/a"))
            .bearer_auth(&token)
            .header("Connection", format!("keep-alive, {nominated}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{nominated}");
    }
    for path in ["/shop/a", "/public/a"] {
        let resp = w
            .http
            .get(w.gateway.url(path))
            .bearer_auth(&token)
            .header("Connection", "keep-alive, X-Custom-A")
            .header("Connection", "X-Auth-Subject, X-Auth-Role")
            .header("X-Custom-A", "1")
            .header("X-Custom-B", "2")
            .header("Keep-Alive", "timeout=5")
            .header("Proxy-Connection", "keep-alive")
            .send()
            .await
            .unwrap();
        if resp.status() != 200 {
            panic!("{path}: {} {}", resp.status(), resp.text().await.unwrap());
        }
        let echo = echoed(resp).await;
        let h = &echo["headers"];
        for gone in ["connection", "x-custom-a", "keep-alive", "proxy-connection"] {
            assert!(h.get(gone).is_none(), "{path}: {gone} in {echo}");
        }
        assert_eq!(h["x-custom-b"], serde_json::json!(["2"]), "{path}: others pass");
        assert_eq!(h["x-forwarded-for"], serde_json::json!(["127.0.0.1"]), "{path}");
        assert!(h.get("host").is_some(), "{path}");
        if path == "/shop/a" {
            assert_eq!(h["x-auth-subject"][0], format!("user:{}", user.id), "{path}");
            assert_eq!(h["x-auth-role"][0], "viewer", "{path}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_finds_the_clients_address_at_the_end_of_x_forwarded_for() {
    // Passed as sent, a forged X-Forwarded-For was all an upstream behind a proxy it trusts (Rails'
    // remote_ip trusts private and loopback addresses) could see of the client.
    let mut w = World::start().await;
    let user = w.user("acme", "xff@acme.io", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    let sent = |g: &Gateway, path: &str, forged: Option<&str>| {
        let mut req = w.http.get(g.url(path)).bearer_auth(&token);
        if let Some(forged) = forged {
            req = req.header("X-Forwarded-For", forged);
        }
        req.send()
    };
    let xff = |echo: &serde_json::Value| echo["headers"]["x-forwarded-for"].clone();
    let g = &w.gateway;
    let echo = echoed(sent(g, "/shop/a", Some("203.0.113.9")).await.unwrap()).await;
    assert_eq!(xff(&echo), serde_json::json!(["203.0.113.9, 127.0.0.1"]), "{echo}");
    let echo = echoed(sent(g, "/public/a", None).await.unwrap()).await;
    assert_eq!(xff(&echo), serde_json::json!(["127.0.0.1"]), "public routes too: {echo}");
    // Another spelling of the name, which CGI, Rack and PHP upstreams merge after the real one
    // (where Werkzeug's ProxyFix takes the last entry), is removed; a `Forwarded` list gets the
    // address as its last node, as X-Forwarded-For does.
    let forged = |g: &Gateway, path: &str| {
        w.http
            .get(g.url(path))
            .bearer_auth(&token)
            .header("X-Forwarded-For", "198.51.100.1")
            .header("X_Forwarded_For", "203.0.113.66")
            .header("X.Forwarded.For", "203.0.113.67")
            .header("Forwarded", "for=203.0.113.68")
            .header("X-Real-IP", "203.0.113.69")
            .header("X_Client_IP", "203.0.113.70")
            .header("True-Client-IP", "203.0.113.71")
            .header("CF-Connecting-IP", "203.0.113.72")
            .header("X-Forwarded-Host", "evil.example")
            .header("X_Forwarded_Proto", "https")
            .header("X-Forwarded-Ssl", "on")
            .header("X-Original-Host", "evil.example")
            .header("Front-End-Https", "on")
            .header("X-Forwarded-Protocol", "https")
            .header("X_Forwarded_Prefix", "/evil")
            .send()
    };
    for path in ["/shop/a", "/public/a"] {
        let echo = echoed(forged(g, path).await.unwrap()).await;
        assert_eq!(xff(&echo), serde_json::json!(["198.51.100.1, 127.0.0.1"]), "{path}: {echo}");
        let names: Vec<&String> = echo["headers"].as_object().unwrap().keys().collect();
        assert!(
            !names.iter().any(|n| n.contains("forwarded_for") || n.contains("forwarded.for")),
            "{names:?}"
        );
        assert_eq!(
            echo["headers"]["forwarded"],
            serde_json::json!(["for=203.0.113.68, for=127.0.0.1"]),
            "{path}"
        );
        assert_eq!(
            echo["headers"]["x-real-ip"],
            serde_json::json!(["203.0.113.69"]),
            "{path}: append keeps it"
        );
    }
    // A `Forwarded` line ending inside a quoted string would swallow the node appended after it:
    // it is dropped, and the gateway's node stands alone.
    for unclosed in [r#"for="1.2.3.4"#, r##"for="1.2.3.4\""##] {
        let resp = w.http.get(g.url("/public/a")).header("Forwarded", unclosed).send().await.unwrap();
        let echo = echoed(resp).await;
        assert_eq!(echo["headers"]["forwarded"], serde_json::json!(["for=127.0.0.1"]), "{unclosed}: {echo}");
    }
    let resp = w.http.get(g.url("/public/a")).header("Forwarded", r#"for="[2001:db8::1]";proto=http"#);
    let echo = echoed(resp.send().await.unwrap()).await;
    let kept = r#"for="[2001:db8::1]";proto=http, for=127.0.0.1"#;
    assert_eq!(echo["headers"]["forwarded"], serde_json::json!([kept]), "{echo}");

    // At the edge, what the client sends is dropped.
    let port = free_port();
    let config = gateway_config(port, &w.redis.url(), w.upstream.port)
        .replace("threads: 2", "threads: 2\nforwarded_for: replace");
    let edge = Gateway::start_with(port, &config);
    let echo = echoed(sent(&edge, "/shop/a", Some("203.0.113.9")).await.unwrap()).await;
    assert_eq!(xff(&echo), serde_json::json!(["127.0.0.1"]), "{echo}");
    for path in ["/shop/a", "/public/a"] {
        let echo = echoed(forged(&edge, path).await.unwrap()).await;
        assert_eq!(xff(&echo), serde_json::json!(["127.0.0.1"]), "{path}: {echo}");
        let names: Vec<&String> = echo["headers"].as_object().unwrap().keys().collect();
        let claims = [
            "forwarded",
            "x-real-ip",
            "x_client_ip",
            "true-client-ip",
            "cf-connecting-ip",
            "x-forwarded-host",
            "x_forwarded_proto",
            "x-forwarded-ssl",
            "x-original-host",
            "front-end-https",
            "x-forwarded-protocol",
            "x_forwarded_prefix",
        ];
        assert!(
            !names.iter().any(|n| n.contains("forwarded_for")
                || n.contains("forwarded.for")
                || claims.contains(&n.as_str())),
            "{path}: {names:?}"
        );
    }
}

/// An HTTP/1.0 client (ApacheBench, a load balancer's health check) may send no `Host`, and reads
/// no chunked body. The upstream, sent HTTP/1.1, gets the upstream's address as `Host`; the client
/// gets the body as bytes until the connection closes, not chunk-size lines in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_client_gets_a_host_for_the_upstream_and_no_chunked_body() {
    let mut w = World::start().await;
    let chunked = RawUpstream::start_answering(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    );
    let port = free_port();
    let g = Gateway::start_with(port, &gateway_config(port, &w.redis.url(), chunked.port));
    let user = w.user("acme", "old@acme.io", Role::Editor, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;

    let answer = raw_request(
        g.addr(),
        format!("GET /shop/x HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n").as_bytes(),
    );
    let (head, body) = answer.split_once("\r\n\r\n").expect("a whole answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding"), "{head}");
    assert_eq!(body, "hello world", "{answer}");
    let sent = chunked.heads();
    let host = format!("host: 127.0.0.1:{}", chunked.port);
    assert!(sent.iter().any(|h| h.to_ascii_lowercase().contains(&host)), "{sent:?}");

    // An HTTP/1.1 client still gets it chunked, on a connection kept open.
    let resp = w.http.get(g.url("/shop/x")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    assert_eq!(resp.text().await.unwrap(), "hello world");

    // Nor is it sent a `100 Continue` (which it would read as its answer): its expectation stops
    // at the gateway, and the (echo) upstream, which honours one, gets none.
    let addr = w.gateway.addr();
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let head = format!(
            "POST /shop/x HTTP/1.0\r\nAuthorization: Bearer {token}\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
        );
        client.write_all(head.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        client.write_all(b"hi").unwrap();
        let mut all = Vec::new();
        client.read_to_end(&mut all).unwrap();
        String::from_utf8_lossy(&all).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (_, body) = answer.split_once("\r\n\r\n").expect("a whole answer");
    let echo: serde_json::Value = serde_json::from_str(body).expect("the echo's JSON");
    assert!(header(&echo, "expect").is_none(), "{echo}");
    assert_eq!(echo["body"], "hi", "{echo}");
}

/// Every request on a kept-alive connection is judged on its own (a guard for any state kept per
/// connection): another token, or a wrong secret for the same id, is judged as itself, and a
/// revocation through the admin API refuses the very next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_on_a_kept_alive_connection_is_judged_as_itself() {
    let mut w = World::start().await;
    let admin = w.bootstrap_admin("acme").await;
    let ann = w.user("acme", "ann@example.com", Role::Viewer, serde_json::json!({})).await;
    let bob = w.user("acme", "bob@example.com", Role::Editor, serde_json::json!({})).await;
    let ann_token = w.pat(&ann, TokenSpec::default()).await;
    let bob_token = w.pat(&bob, TokenSpec::default()).await;
    let other = token::generate(token::TokenKind::Pat).token;
    let wrong = checksummed(&format!("{}{}", &ann_token[..10], &other[10..40]));

    let stream = std::net::TcpStream::connect(w.gateway.addr()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let conn = std::sync::Arc::new(std::sync::Mutex::new(stream));
    // One request on the connection: its status, and the role the upstream was told.
    let send = |token: &str| {
        let (conn, token) = (conn.clone(), token.to_string());
        async move {
            tokio::task::spawn_blocking(move || {
                use std::io::Write;
                let mut conn = conn.lock().unwrap();
                let request =
                    format!("GET /shop/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
                conn.write_all(request.as_bytes()).unwrap();
                let response = read_one_response(&mut conn);
                let status = response.split(' ').nth(1).unwrap_or_default().to_string();
                let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
                let role = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|echo| header(&echo, "x-auth-role").map(str::to_string));
                (status, role)
            })
            .await
            .unwrap()
        }
    };
    let ok = |role: &str| ("200".to_string(), Some(role.to_string()));
    assert_eq!(send(&ann_token).await, ok("viewer"));
    assert_eq!(send(&ann_token).await, ok("viewer"));
    assert_eq!(send(&wrong).await.0, "401");
    assert_eq!(send(&bob_token).await, ok("editor"));
    assert_eq!(send(&ann_token).await, ok("viewer"));
    assert_eq!(send(&ann_token).await, ok("viewer"));
    admin.run(&["token", "revoke", &ann_token[..10]]).ok();
    assert_eq!(send(&ann_token).await.0, "401");
    assert_eq!(send(&bob_token).await, ok("editor"));
}

/// Bodies are never buffered (PRODUCT, section 3): the upstream reads the first part of a request
/// body before the client has sent the rest, and the client reads the first part of the answer
/// before the upstream has written the rest. (A gateway that buffered either would hold it until
/// the whole arrived, which here only comes after the other side has seen the first part.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_through_in_both_directions() {
    use std::io::{Read, Write};
    use std::sync::mpsc;
    const WAIT: Duration = Duration::from_secs(30);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = listener.local_addr().unwrap().port();
    // The upstream reports each part of the request body as it arrives, answers the head and a
    // first chunk once the body is whole, and the rest when told.
    let (got_tx, got_rx) = mpsc::channel::<Vec<u8>>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let body_at = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let n = conn.read(&mut chunk).unwrap();
            assert!(n > 0, "the request head arrives");
            buf.extend_from_slice(&chunk[..n]);
        };
        let mut body = buf.split_off(body_at);
        while body.len() < 10 {
            if !body.is_empty() {
                got_tx.send(body.clone()).unwrap();
            }
            let n = conn.read(&mut chunk).unwrap();
            assert!(n > 0, "the request body arrives");
            body.extend_from_slice(&chunk[..n]);
        }
        got_tx.send(body).unwrap();
        conn.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n").unwrap();
        go_rx.recv_timeout(WAIT).unwrap();
        conn.write_all(b"4\r\nrest\r\n0\r\n\r\n").unwrap();
    });
    let mut w = World::with_routes(&format!(
        "  - {{ name: stream, path: /stream, upstream: \"127.0.0.1:{upstream}\", org: acme, project: shop, environment: production }}\n"
    ))
    .await;
    let user = w.user("acme", "stream@example.com", Role::Editor, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    // The first request of a token runs argon2: proven before the streaming one.
    let warm = w.http.get(w.gateway.url("/shop")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(warm.status(), 200);

    let addr = w.gateway.addr();
    tokio::task::spawn_blocking(move || {
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        client.set_read_timeout(Some(WAIT)).unwrap();
        let head = format!(
            "POST /stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 10\r\n\r\nhello"
        );
        client.write_all(head.as_bytes()).unwrap();
        let mut seen = Vec::new();
        while seen != b"hello" {
            seen = got_rx.recv_timeout(WAIT).expect("the upstream reads the body's first part before its rest is sent");
        }
        client.write_all(b"world").unwrap();
        while seen != b"helloworld" {
            seen = got_rx.recv_timeout(WAIT).expect("the rest of the body");
        }

        let mut answer = Vec::new();
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains("first") {
            let n = client.read(&mut chunk).expect("the answer's first part arrives before its rest is written");
            assert!(n > 0, "{}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&chunk[..n]);
        }
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
        go_tx.send(()).unwrap();
        while !answer.ends_with(b"0\r\n\r\n") {
            let n = client.read(&mut chunk).unwrap();
            assert!(n > 0, "{}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&chunk[..n]);
        }
        assert!(String::from_utf8_lossy(&answer).contains("rest"));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_while_another_is_answered_waits_its_turn() {
    // It answers 800 ms after each request head: the second request, and a stray CRLF before it,
    // arrive while the first is with the upstream.
    let slow = RawUpstream::start_slow(Duration::from_millis(800));
    let mut w = World::with_routes(&format!(
        "  - {{ name: slow, path: /slow, upstream: \"127.0.0.1:{}\", org: acme, project: shop, environment: production }}\n",
        slow.port
    ))
    .await;
    let ann = w.user("acme", "ann@example.com", Role::Editor, serde_json::json!({})).await;
    let bob = w.user("acme", "bob@example.com", Role::Editor, serde_json::json!({})).await;
    let (ann, bob) = (w.pat(&ann, TokenSpec::default()).await, w.pat(&bob, TokenSpec::default()).await);
    for token in [&ann, &bob] {
        let warm = w.http.get(w.gateway.url("/shop")).bearer_auth(token).send().await.unwrap();
        assert_eq!(warm.status(), 200);
    }
    let addr = w.gateway.addr();
    let answers = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let first = format!("POST /slow/order HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ann}\r\nContent-Length: 2\r\n\r\nhi");
        client.write_all(first.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        client.write_all(b"\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let second =
            format!("GET /shop HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bob}\r\nConnection: close\r\n\r\n");
        client.write_all(second.as_bytes()).unwrap();
        let mut all = Vec::new();
        client.read_to_end(&mut all).unwrap();
        String::from_utf8_lossy(&all).into_owned()
    })
    .await
    .unwrap();
    // Both answered, in order, each as its own caller: the first with the upstream's answer
    // (not a 400 for the bytes that came after it), the second as bob.
    let (first, second) = answers.split_at(answers.find("\r\n\r\nok").map_or(0, |at| at + 6));
    assert!(first.starts_with("HTTP/1.1 200 Fine By Me"), "{answers}");
    assert!(second.starts_with("HTTP/1.1 200"), "{answers}");
    assert!(second.contains("bob@example.com") && !second.contains("ann@example.com"), "{answers}");
    let heads = slow.heads();
    assert!(heads.len() == 1 && heads[0].contains("x-auth-email: ann@example.com"), "{heads:?}");
}

/// An HTTP/1.0 client is sent no informational answer (which it would read as its answer), while
/// an HTTP/1.1 one still gets the upstream's `103 Early Hints`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_client_gets_no_informational_answer() {
    let hints = RawUpstream::start_answering(
        b"HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    );
    let mut w = World::with_routes(&format!(
        "  - {{ name: hints, path: /hints, upstream: \"127.0.0.1:{}\", org: acme, project: shop, environment: production }}\n",
        hints.port
    ))
    .await;
    let user = w.user("acme", "nc@example.com", Role::Editor, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    let warm = w.http.get(w.gateway.url("/shop")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(warm.status(), 200);
    let addr = w.gateway.addr();
    let exchange = move |request: String| {
        use std::io::{Read, Write};
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        client.write_all(request.as_bytes()).unwrap();
        let mut all = Vec::new();
        let _ = client.read_to_end(&mut all);
        String::from_utf8_lossy(&all).into_owned()
    };
    let (t, ex) = (token.clone(), exchange);
    let old = tokio::task::spawn_blocking(move || {
        ex(format!("GET /hints/page HTTP/1.0\r\nAuthorization: Bearer {t}\r\n\r\n"))
    })
    .await
    .unwrap();
    assert!(old.starts_with("HTTP/1.1 200") && !old.contains("103"), "{old}");
    let t = token.clone();
    let new = tokio::task::spawn_blocking(move || {
        exchange(format!(
            "GET /hints/page HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n"
        ))
    })
    .await
    .unwrap();
    assert!(new.starts_with("HTTP/1.1 103") && new.contains("HTTP/1.1 200"), "{new}");
}

/// A WebSocket carries both ways, however quickly its upstream says `101`: an upstream whose
/// answer is there before the gateway has finished with the request's own (empty) body once got
/// the tunnel torn down right after the `101` (cloudflare/pingora#946): 12 to 24 of these 64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_carries_both_ways_however_fast_its_upstream_answers() {
    // Says `101` as soon as a connection comes, then echoes what arrives after the request head.
    let ws = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ws_port = ws.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in ws.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let _ = conn.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                );
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let mut chunk = [0u8; 256];
                while let Ok(n @ 1..) = conn.read(&mut chunk) {
                    if conn.write_all(&chunk[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let mut w = World::with_routes(&format!(
        "  - {{ name: ws, path: /ws, upstream: \"127.0.0.1:{ws_port}\", org: acme, project: shop, \
         environment: production }}\n"
    ))
    .await;
    let user = w.user("acme", "ws@acme.io", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    let addr = w.gateway.addr();
    let outcomes = tokio::task::spawn_blocking(move || {
        (0..64)
            .map(|i| {
                use std::io::{Read, Write};
                let mut client = std::net::TcpStream::connect(addr).unwrap();
                client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let head = format!(
                    "GET /ws/{i} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                );
                client.write_all(head.as_bytes()).unwrap();
                let mut got = Vec::new();
                let mut chunk = [0u8; 1024];
                let mut sent = false;
                let ping = format!("ping {i}");
                loop {
                    if !sent && got.windows(4).any(|w| w == b"\r\n\r\n") {
                        // The 101 is in: the client speaks first.
                        client.write_all(ping.as_bytes()).unwrap();
                        sent = true;
                    }
                    if String::from_utf8_lossy(&got).ends_with(&ping) {
                        break format!("ok {i}");
                    }
                    match client.read(&mut chunk) {
                        Ok(n) if n > 0 => got.extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        end => break format!("{i}: {:?} then {end:?}", String::from_utf8_lossy(&got)),
                    }
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let failed: Vec<_> = outcomes.iter().filter(|o| !o.starts_with("ok")).collect();
    assert!(failed.is_empty(), "{} of 64 cut: {failed:#?}", failed.len());
}
