//! Ephemeral credentials end to end: a service mints JWTs for its end users through the admin API
//! and the CLI, the gateway verifies them on the request path (forgeries refused, the minting
//! service and token checked as of now, on every instance), keys rotate, and an independent JWT
//! implementation verifies what Tollgate signs with the published JWKS.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jwt_compact::alg::Ed25519;
use jwt_compact::jwk::JsonWebKey;
use jwt_compact::{AlgorithmExt, Claims, UntrustedToken};
use serde_json::{json, Value};
use tollgate::lifecycle::TokenSpec;
use tollgate::policy::Role;
use tollgate::store::Scope;

use crate::support::*;

/// Mints through the admin API with `token`; returns the status and the JSON answer.
async fn mint(
    w: &World,
    gateway: &Gateway,
    token: &str,
    org: &str,
    project: &str,
    body: Value,
) -> (u16, Value) {
    let resp = w
        .http
        .post(format!("{}/v1/orgs/{org}/projects/{project}/credentials", gateway.admin_url()))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let cache = resp.headers().get("cache-control").map(|v| v.to_str().unwrap().to_string());
    let body: Value = resp.json().await.unwrap();
    if let Some(t) = body["token"].as_str() {
        remember_secret(t);
        assert_eq!(cache.as_deref(), Some("no-store"), "a new secret is kept by no cache");
    }
    (status, body)
}

/// Mints and expects success; returns the JWT.
async fn minted(w: &World, gateway: &Gateway, token: &str, project: &str, body: Value) -> String {
    let (status, answer) = mint(w, gateway, token, "acme", project, body).await;
    assert_eq!(status, 201, "{answer}");
    answer["token"].as_str().unwrap().to_string()
}

async fn status_of(w: &World, gateway: &Gateway, path: &str, token: &str) -> u16 {
    w.get(gateway, path, token).await.status().as_u16()
}

/// A 401 with the JSON error of an invalid token, never anything else.
async fn assert_refused(w: &World, token: &str, what: &str) {
    let resp = w.get(&w.gateway, "/shop/x", token).await;
    assert_eq!(resp.status(), 401, "{what}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_token", "{what}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minted_credential_works_on_its_project_only_and_until_it_expires() {
    let keys = JwtKeys::generate();
    let mut w = World::start_jwt(&keys).await;
    // A reader of the blog too: a credential minted for the shop must still not reach it.
    let (_, service_token) = w
        .service("acme", "embed", &[("shop", Role::Editor), ("blog", Role::Viewer)], TokenSpec::default())
        .await;

    // The CLI, as the service's backend would run it.
    let cli = Cli::new(&w.gateway, &service_token);
    let out = cli.run(&[
        "credentials",
        "issue",
        "--org",
        "acme",
        "--project",
        "shop",
        "--attributes",
        r#"{"tenant": "t-42", "email": "eu@customer.io", "groups": ["a", "b"]}"#,
    ]);
    assert!(
        out.stdout.contains("Issued an ephemeral credential for \"ephemeral:eu@customer.io\""),
        "{out:?}"
    );
    let jwt = out.token();
    // Its id, which upstreams see as X-Auth-Token-Id and the audit log keeps, is printed too.
    let id = out.stdout.lines().find_map(|l| l.strip_prefix("Credential id: ")).expect("the id line");
    let claims = tollgate::jwt::unverified_claims(&jwt).unwrap();
    assert_eq!(claims["jti"].as_str(), Some(id), "{out:?}");
    // By that id (an upstream's log has it) the audit log finds its minting.
    let admin = w.bootstrap_admin("acme").await;
    let found = admin.json(&["audit", "--token-id", id]);
    let found = found.as_array().unwrap();
    assert!(found.len() == 1 && found[0]["action"] == "credentials.issue", "{found:?}");
    assert_eq!(found[0]["token_id"], &service_token[..10]);

    // Sent to a public route (in the header or the query), it goes no further; a JWT of another
    // issuer, the upstream's own, does.
    let public = |target: &str, bearer: Option<&str>| {
        let req = w.http.get(w.gateway.url(target));
        let req = match bearer {
            Some(b) => req.bearer_auth(b),
            None => req,
        };
        async move { echoed(req.send().await.unwrap()).await }
    };
    let echo = public("/public/x", Some(&jwt)).await;
    assert!(echo["headers"].get("authorization").is_none(), "{echo}");
    assert_eq!(public(&format!("/public/x?access_token={jwt}&y=1"), None).await["uri"], "/public/x?y=1");
    let part = |json: &str| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, json);
    let foreign = format!("{}.{}.c2ln", part(r#"{"alg":"HS256"}"#), part(r#"{"iss":"https://idp.example"}"#));
    let echo = public("/public/x", Some(&foreign)).await;
    assert_eq!(echo["headers"]["authorization"][0], format!("Bearer {foreign}"), "{echo}");

    // Handed to `token revoke` or `token get` (a leaked embed credential, say), it is never sent:
    // the message names the service token whose revocation ends it.
    let nowhere = Cli { server: "http://127.0.0.1:9".into(), token: service_token.clone() };
    for args in [&["token", "revoke", &jwt][..], &["token", "get", &jwt], &["audit", "--token-id", &jwt]] {
        let said = nowhere.run(args).failed();
        assert!(said.contains("ephemeral credential") && said.contains(&service_token[..10]), "{said}");
        assert!(!said.contains("cannot reach") && !said.contains(&jwt), "{said}");
    }

    let echo = echoed(w.get(&w.gateway, "/shop/orders", &jwt).await).await;
    let h = &echo["headers"];
    assert_eq!(h["x-auth-subject"][0], "ephemeral:eu@customer.io");
    assert_eq!(h["x-auth-token-kind"][0], "ephemeral");
    // Its own id, the JWT's `jti`: never the minting service token's.
    let untrusted = UntrustedToken::new(&jwt).unwrap();
    let claims = untrusted.deserialize_claims_unchecked::<serde_json::Map<String, Value>>().unwrap();
    assert!(claims.custom["jti"].as_str().is_some_and(|j| !j.is_empty()), "{:?}", claims.custom);
    assert_eq!(h["x-auth-token-id"][0], claims.custom["jti"]);
    assert_eq!(h["x-auth-org"][0], "acme");
    assert_eq!(h["x-auth-project"][0], "shop");
    assert_eq!(h["x-auth-permissions"][0], "read,write,execute", "the service's editor role");
    assert_eq!(h["x-auth-email"][0], "eu@customer.io");
    assert_eq!(h["x-auth-attr-tenant"][0], "t-42");
    let attrs: Value = serde_json::from_str(h["x-auth-attributes"][0].as_str().unwrap()).unwrap();
    assert_eq!(attrs["groups"], json!(["a", "b"]));
    assert!(h.get("authorization").is_none(), "the credential is stripped");

    // Another project of the org (which the service may read), another org: valid credential,
    // wrong place, and refused for that reason.
    for (path, reason) in [
        ("/blog/x", "the credential is not valid for project \"blog\""),
        ("/globex/x", "the token is not valid for this organization"),
    ] {
        let resp = w.get(&w.gateway, path, &jwt).await;
        assert_eq!(resp.status(), 403, "{path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error_description"], reason, "{path}");
    }

    // By email: the org's user with that email lends their attributes.
    let user = w.user("acme", "bob@acme.io", Role::Viewer, json!({"team": "red"})).await;
    let by_email = minted(&w, &w.gateway, &service_token, "shop", json!({"user_email": user.email})).await;
    let echo = echoed(w.get(&w.gateway, "/shop/x", &by_email).await).await;
    assert_eq!(echo["headers"]["x-auth-attr-team"][0], "red");
    assert_eq!(echo["headers"]["x-auth-attr-domain"][0], "acme.io");
    assert_eq!(echo["headers"]["x-auth-subject"][0], "ephemeral:bob@acme.io");
    // A user's own `Domain` travels as X-Auth-Attr-Domain, the header the added `domain` would
    // take: theirs is sent, once, by credential and by PAT alike.
    let carol = w.user("acme", "carol@acme.io", Role::Viewer, json!({"Domain": "eng"})).await;
    let by_carol = minted(&w, &w.gateway, &service_token, "shop", json!({"user_email": carol.email})).await;
    for credential in [by_carol, w.pat(&carol, TokenSpec::default()).await] {
        let echo = echoed(w.get(&w.gateway, "/shop/x", &credential).await).await;
        assert_eq!(echo["headers"]["x-auth-attr-domain"], json!(["eng"]), "{echo}");
    }
    // However the service spells the address, the user reaches the upstream as stored, the same
    // address a PAT of theirs carries.
    for body in [json!({"user_email": "Bob@ACME.io"}), json!({"attributes": {"Email": "BOB@acme.IO"}})] {
        let jwt = minted(&w, &w.gateway, &service_token, "shop", body.clone()).await;
        let echo = echoed(w.get(&w.gateway, "/shop/x", &jwt).await).await;
        let h = &echo["headers"];
        assert_eq!(h["x-auth-subject"][0], "ephemeral:bob@acme.io", "{body}");
        assert_eq!(h["x-auth-email"][0], "bob@acme.io", "{body}");
        assert_eq!(h["x-auth-attr-email"][0], "bob@acme.io", "{body}");
    }

    // A narrowed credential: read only, and only in production.
    let narrow = minted(
        &w,
        &w.gateway,
        &service_token,
        "shop",
        json!({"attributes": {}, "scope": "read", "environments": ["staging"]}),
    )
    .await;
    assert_eq!(status_of(&w, &w.gateway, "/staging/x", &narrow).await, 200);
    assert_eq!(status_of(&w, &w.gateway, "/shop/x", &narrow).await, 403, "not in production");
    let post = w.post(&w.gateway, "/staging/x", &narrow).await;
    assert_eq!(post.status(), 403, "read only");

    // Expiry: one second to live, one second of leeway.
    let short =
        minted(&w, &w.gateway, &service_token, "shop", json!({"attributes": {}, "ttl_seconds": 1})).await;
    assert_eq!(status_of(&w, &w.gateway, "/shop/x", &short).await, 200);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let resp = w.get(&w.gateway, "/shop/x", &short).await;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error_description"], "the access token has expired");

    // Every mint is in the audit log, under the minting token.
    let audit = w.store.audit_log("acme", 100).await.unwrap();
    assert_eq!(audit.iter().filter(|e| e.action == "credentials.issue").count(), 7);
}

/// Base64url JSON, as a JWT part.
fn part(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_malformed_jwts_are_refused_with_401() {
    let keys = JwtKeys::generate();
    let w = World::start_jwt(&keys).await;
    let (_, service_token) =
        w.service("acme", "embed", &[("shop", Role::Editor)], TokenSpec::default()).await;
    let good = minted(&w, &w.gateway, &service_token, "shop", json!({"attributes": {"tier": "free"}})).await;
    assert_eq!(status_of(&w, &w.gateway, "/shop/x", &good).await, 200);
    let parts: Vec<&str> = good.split('.').collect();
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();

    // Payload changed under the original signature.
    let mut richer = claims.clone();
    richer["attrs"]["tier"] = json!("enterprise");
    assert_refused(&w, &format!("{}.{}.{}", parts[0], part(&richer), parts[2]), "tampered payload").await;

    // Signature changed.
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    sig[0] ^= 1;
    assert_refused(
        &w,
        &format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig)),
        "tampered signature",
    )
    .await;

    // alg: none, with and without a signature part.
    let none = part(&json!({"alg": "none", "kid": "k1", "typ": "JWT"}));
    assert_refused(&w, &format!("{none}.{}.", parts[1]), "alg none").await;
    assert_refused(&w, &format!("{none}.{}.{}", parts[1], parts[2]), "alg none with a signature").await;

    // HS256 with the public key as the HMAC secret: as PEM, and as the raw key bytes.
    let published = jwks(&w).await;
    let x = URL_SAFE_NO_PAD.decode(published["keys"][0]["x"].as_str().unwrap()).unwrap();
    let spki = [&[0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00][..], &x].concat();
    let public_pem = pem::encode(&pem::Pem::new("PUBLIC KEY", spki));
    let mut hs = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    hs.kid = Some("k1".into());
    for secret in [public_pem.as_bytes(), &x[..]] {
        let confused =
            jsonwebtoken::encode(&hs, &claims, &jsonwebtoken::EncodingKey::from_secret(secret)).unwrap();
        assert_refused(&w, &confused, "HS256 signed with the public key").await;
    }

    // Signed with the real private key, but under an unknown kid, or without exp.
    let pem_text = std::fs::read(&keys.k1).unwrap();
    let signer = jsonwebtoken::EncodingKey::from_ed_pem(&pem_text).unwrap();
    let mut ed = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    ed.kid = Some("k9".into());
    assert_refused(&w, &jsonwebtoken::encode(&ed, &claims, &signer).unwrap(), "unknown kid").await;
    ed.kid = None;
    assert_refused(&w, &jsonwebtoken::encode(&ed, &claims, &signer).unwrap(), "no kid").await;
    ed.kid = Some("k1".into());
    let mut no_exp = claims.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    assert_refused(&w, &jsonwebtoken::encode(&ed, &no_exp, &signer).unwrap(), "missing exp").await;
    // The right key, but another service's name on a token it did not mint, or another issuer.
    let mut stolen = claims.clone();
    stolen["svc"] = json!("s_someoneelse");
    assert_refused(&w, &jsonwebtoken::encode(&ed, &stolen, &signer).unwrap(), "svc/tid mismatch").await;
    let mut other_iss = claims.clone();
    other_iss["iss"] = json!("evil");
    assert_refused(&w, &jsonwebtoken::encode(&ed, &other_iss, &signer).unwrap(), "issuer").await;
    // The same claims re-signed properly are accepted, so the refusals above are about the forgery.
    assert_eq!(
        status_of(&w, &w.gateway, "/shop/x", &jsonwebtoken::encode(&ed, &claims, &signer).unwrap()).await,
        200
    );

    // Garbage shaped like a JWT; and a JWT on the admin API, which takes stored tokens only.
    for junk in ["eyJ.eyJ.", "eyJhbGciOi.e30.x"] {
        let resp = w
            .http
            .get(w.gateway.url("/shop/x"))
            .header("authorization", format!("Bearer {junk}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{junk}");
    }
    // A control byte no HTTP client library would send, written on the socket.
    let raw = raw_request(
        w.gateway.addr(),
        b"GET /shop/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer eyJ\x7f.a.b\r\nConnection: close\r\n\r\n",
    );
    let status = raw.split(' ').nth(1).and_then(|s| s.parse::<u16>().ok()).unwrap_or(0);
    assert!((400..500).contains(&status), "{raw}");
    let whoami =
        w.http.get(format!("{}/v1/whoami", w.gateway.admin_url())).bearer_auth(&good).send().await.unwrap();
    assert_eq!(whoami.status(), 401);
    // Told why: the credential is good, the admin API is not for it.
    let body: Value = whoami.json().await.unwrap();
    assert!(body["error_description"].as_str().unwrap().contains("cannot call the admin API"), "{body}");
}

/// A world with minting, a second gateway instance on its Redis, acme's admin, and the signing
/// keys' files (kept while the gateways run).
async fn two_instances() -> (World, Gateway, Cli, JwtKeys) {
    let keys = JwtKeys::generate();
    let w = World::start_jwt(&keys).await;
    let second = w.jwt_gateway(&keys);
    let admin = w.bootstrap_admin("acme").await;
    (w, second, admin, keys)
}

/// A credential minted by a service token in its rotation's grace ends with that grace: its
/// answers say so, as the old token's own do (`Deprecation`, `Sunset`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_of_a_token_in_its_grace_carries_the_deprecation() {
    let keys = JwtKeys::generate();
    let w = World::start_jwt(&keys).await;
    let (_, old) = w.service("acme", "embed", &[("shop", Role::Viewer)], TokenSpec::default()).await;
    let fresh = minted(&w, &w.gateway, &old, "shop", json!({"attributes": {}})).await;
    let resp = w.get(&w.gateway, "/shop/x", &fresh).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("deprecation").is_none(), "nothing is deprecated yet");
    let admin = w.bootstrap_admin("acme").await;
    admin.run(&["token", "rotate", &old[..10], "--grace-seconds", "300"]).ok();
    for credential in [fresh, minted(&w, &w.gateway, &old, "shop", json!({"attributes": {}})).await] {
        let resp = w.get(&w.gateway, "/shop/x", &credential).await;
        assert_eq!(resp.status(), 200);
        let said = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let deprecation = said("deprecation").expect("Deprecation on a credential of a token in its grace");
        assert!(deprecation.starts_with('@'), "{deprecation}");
        assert!(said("sunset").is_some(), "and when it ends");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minting_refuses_what_the_service_may_not_grant() {
    let keys = JwtKeys::generate();
    let mut w = World::start_jwt(&keys).await;
    let (_, viewer) = w.service("acme", "viewer-svc", &[("shop", Role::Viewer)], TokenSpec::default()).await;

    // The calling token's own narrowing bounds the credential too.
    let narrowed = TokenSpec {
        scope: Some(Scope { name: None, permissions: vec!["read".into()] }),
        environments: Some(vec!["staging".into()]),
        ..TokenSpec::default()
    };
    let (_, editor_read) = w.service("acme", "editor-svc", &[("shop", Role::Editor)], narrowed).await;
    let user = w.user("acme", "ann@acme.io", Role::Admin, json!({})).await;
    let pat = w.pat(&user, TokenSpec::default()).await;
    // Suspension stops what is done on a user's behalf too.
    w.user("acme", "sus@acme.io", Role::Viewer, json!({"secret_team": "x"})).await;
    let before = w.store.find_user_by_email("acme", "sus@acme.io").await.unwrap().unwrap();
    let mut suspended = (*before).clone();
    suspended.status = tollgate::store::UserStatus::Suspended;
    w.store.update_user(&before, &suspended, None, None).await.unwrap();

    let attrs = json!({"attributes": {}});
    let with = |extra: Value| {
        let mut body = attrs.clone();
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    // (caller, org, project, body, status, part of the reason)
    let cases = [
        (
            &viewer,
            "acme",
            "shop",
            with(json!({"ttl_seconds": 7200})),
            400,
            "above the maximum of 600 seconds",
        ),
        (
            &viewer,
            "acme",
            "shop",
            with(json!({"scope": "read-write"})),
            403,
            "more rights (read,write,execute)",
        ),
        (&viewer, "acme", "shop", with(json!({"scope": "read"})), 201, ""),
        (
            &editor_read,
            "acme",
            "shop",
            with(json!({"permissions": ["write"]})),
            403,
            "more rights (write) than this token of the service holds",
        ),
        (&editor_read, "acme", "shop", with(json!({"environments": ["production"]})), 403, "environment"),
        (&viewer, "acme", "blog", attrs.clone(), 403, "no permissions on project"),
        (&viewer, "acme", "nowhere", attrs.clone(), 404, "not found"),
        (&viewer, "globex", "web", attrs.clone(), 404, "not found"),
        (&pat, "acme", "shop", attrs.clone(), 403, "service token"),
        (&viewer, "acme", "shop", json!({}), 400, "one of the two"),
        (&viewer, "acme", "shop", with(json!({"user_email": "a@b.c"})), 400, "one of the two"),
        (&viewer, "acme", "shop", json!({"attributes": [1]}), 400, "attributes"),
        (&viewer, "acme", "shop", json!({"user_email": "nope"}), 400, "not an email"),
        (&viewer, "acme", "shop", with(json!({"ttl_seconds": 0})), 400, "must be positive"),
        (&viewer, "acme", "shop", with(json!({"colour": 1})), 400, "colour"),
        (&viewer, "acme", "shop", with(json!({"environments": []})), 400, "at least one environment"),
        (&viewer, "acme", "shop", json!({"user_email": "a@b@c"}), 400, "not an email"),
        (&viewer, "acme", "shop", json!({"user_email": "sus@acme.io"}), 403, "is suspended"),
        // A subject that is an org user's address is that user's binding or nothing.
        (&viewer, "acme", "shop", with(json!({"subject": "SUS@acme.io"})), 403, "is suspended"),
        (&viewer, "acme", "shop", with(json!({"subject": "Ann@acme.io"})), 400, "send it as `user_email`"),
        (&viewer, "acme", "shop", with(json!({"subject": "ann@acme.io "})), 400, "send it as `user_email`"),
        (
            &viewer,
            "acme",
            "shop",
            json!({"attributes": {"email": "bob@elsewhere.io"}, "subject": "ann@acme.io"}),
            400,
            "is org user ann@acme.io's address",
        ),
        (&viewer, "acme", "shop", json!({"user_email": "ann@acme.io", "subject": "ANN@acme.io"}), 201, ""),
        (&viewer, "acme", "shop", with(json!({"subject": "carol@elsewhere.io"})), 201, ""),
        // `alice ` would reach the upstream as `alice`: two end users as one.
        (&viewer, "acme", "shop", with(json!({"subject": "alice "})), 400, "no space at either end"),
        (&viewer, "acme", "shop", with(json!({"subject": " alice"})), 400, "no space at either end"),
        // Each a header of its own: more than upstream servers take in one request.
        (
            &viewer,
            "acme",
            "shop",
            json!({"attributes": (0..51).map(|i| (format!("k{i}"), json!(1))).collect::<serde_json::Map<_, _>>()}),
            400,
            "at most 50 attributes (51 given)",
        ),
    ];
    for (caller, org, project, body, want, reason) in cases {
        let (status, answer) = mint(&w, &w.gateway, caller, org, project, body.clone()).await;
        assert_eq!(status, want, "{org}/{project} {body}: {answer}");
        if want != 201 {
            let text = answer["error_description"].as_str().unwrap_or_default();
            assert!(text.contains(reason), "{org}/{project} {body}: {answer}");
        }
    }

    // A credential ends no later than the token that minted it.
    let soon = tollgate::store::now_millis() + 120_000;
    let (_, ending) = w
        .service(
            "acme",
            "ending-svc",
            &[("shop", Role::Viewer)],
            TokenSpec { expires_at: Some(soon), ..TokenSpec::default() },
        )
        .await;
    let (status, answer) =
        mint(&w, &w.gateway, &ending, "acme", "shop", with(json!({"ttl_seconds": 600}))).await;
    assert_eq!(status, 201, "{answer}");
    let expires_in = answer["expires_in"].as_i64().unwrap();
    assert!((100..=120).contains(&expires_in), "{answer}");
    // Neither narrowed: no `permissions` or `environments` at all (the OpenAPI document's arrays
    // are not nullable), rather than `null`.
    let answer = answer.as_object().unwrap();
    assert!(!answer.contains_key("permissions") && !answer.contains_key("environments"), "{answer:?}");

    // An environment named twice is carried once.
    let (status, answer) =
        mint(&w, &w.gateway, &viewer, "acme", "shop", with(json!({"environments": ["staging", "staging"]})))
            .await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["environments"], json!(["staging"]));

    // Unasked, it is as narrow as the token minting it (its scope within the service's role, its
    // environments of the project), and says so; the CLI prints both.
    let (status, answer) = mint(&w, &w.gateway, &editor_read, "acme", "shop", attrs.clone()).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!((&answer["permissions"], &answer["environments"]), (&json!(["read"]), &json!(["staging"])));
    let out = Cli::new(&w.gateway, &editor_read)
        .run(&["credentials", "issue", "--org", "acme", "--project", "shop", "--attributes", "{}"])
        .ok();
    let line = |words: &[&str]| out.lines().any(|l| l.split_whitespace().eq(words.iter().copied()));
    assert!(line(&["Permissions:", "read"]) && line(&["Environments:", "staging"]), "{out}");
    // The minting token's scope as it is, as a PAT inherits it: a viewer service's token scoped
    // read-write mints credentials scoped read-write, which its role caps at read on each use
    // (and would not, were the service made an editor).
    let wide = TokenSpec {
        scope: Some(Scope { name: None, permissions: vec!["read".into(), "write".into()] }),
        ..TokenSpec::default()
    };
    let (_, viewer_wide) = w.service("acme", "viewer-wide", &[("shop", Role::Viewer)], wide).await;
    let (status, answer) = mint(&w, &w.gateway, &viewer_wide, "acme", "shop", attrs.clone()).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["permissions"], json!(["read", "write"]));
    // A token that may be used in none of the project's environments mints nothing there.
    let staging_only = TokenSpec { environments: Some(vec!["staging".into()]), ..TokenSpec::default() };
    let (_, blog_staging) = w.service("acme", "blog-svc", &[("blog", Role::Editor)], staging_only).await;
    let (status, answer) = mint(&w, &w.gateway, &blog_staging, "acme", "blog", attrs.clone()).await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer["error_description"].as_str().unwrap().contains("none of them"), "{answer}");

    // The CLI shows the reason.
    let err = Cli::new(&w.gateway, &viewer)
        .run(&[
            "credentials",
            "issue",
            "--org",
            "acme",
            "--project",
            "shop",
            "--attributes",
            "{}",
            "--ttl-seconds",
            "9999",
        ])
        .failed();
    assert!(err.contains("above the maximum"), "{err}");
}

/// A minted credential carries its service's rights as they are now (PRODUCT): lowering the
/// service's role narrows credentials already out, on every instance, at their next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_follows_its_services_role_as_it_is_now() {
    let (w, second, admin, _keys) = two_instances().await;
    let (_, token) = w.service("acme", "writer", &[("shop", Role::Editor)], TokenSpec::default()).await;
    let jwt = minted(&w, &w.gateway, &token, "shop", json!({"attributes": {}})).await;
    let post = |g: &Gateway| {
        let req = w.http.post(g.url("/shop/orders")).bearer_auth(&jwt).send();
        async move { req.await.unwrap().status().as_u16() }
    };
    for g in [&w.gateway, &second] {
        assert_eq!(post(g).await, 200, "an editor's credential writes");
    }
    admin.run(&["service", "set-role", "writer", "--project", "shop", "--project-role", "viewer"]).ok();
    assert_eq!(post(&w.gateway).await, 403, "at once on the instance that changed it");
    assert!(eventually(Duration::from_secs(2), || async { post(&second).await == 403 }).await);
    assert_eq!(status_of(&w, &second, "/shop/x", &jwt).await, 200, "still a viewer's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_service_or_revoking_its_token_stops_minted_credentials_on_both_instances() {
    let (w, second, admin, _keys) = two_instances().await;

    let (_, token_a) = w.service("acme", "svc-a", &[("shop", Role::Viewer)], TokenSpec::default()).await;
    let (_, token_b) = w.service("acme", "svc-b", &[("shop", Role::Viewer)], TokenSpec::default()).await;
    let jwt_a = minted(&w, &w.gateway, &token_a, "shop", json!({"attributes": {}})).await;
    let jwt_b = minted(&w, &second, &token_b, "shop", json!({"attributes": {}})).await;
    for g in [&w.gateway, &second] {
        assert_eq!(status_of(&w, g, "/shop/x", &jwt_a).await, 200);
        assert_eq!(status_of(&w, g, "/shop/x", &jwt_b).await, 200);
    }

    // Revoke the token that minted jwt_a.
    admin.run(&["token", "revoke", &token_a[..10], "--reason", "leaked"]).ok();
    assert_eq!(
        status_of(&w, &w.gateway, "/shop/x", &jwt_a).await,
        401,
        "at once on the instance that revoked"
    );
    assert!(
        eventually(Duration::from_secs(2), || async {
            status_of(&w, &second, "/shop/x", &jwt_a).await == 401
        })
        .await,
        "the second instance refuses too"
    );

    // Delete the service that minted jwt_b.
    admin.run(&["service", "delete", "svc-b"]).ok();
    assert_eq!(status_of(&w, &w.gateway, "/shop/x", &jwt_b).await, 401);
    assert!(
        eventually(Duration::from_secs(2), || async {
            status_of(&w, &second, "/shop/x", &jwt_b).await == 401
        })
        .await,
        "the second instance refuses too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspending_or_removing_the_user_stops_credentials_minted_for_them_on_both_instances() {
    let (w, second, admin, _keys) = two_instances().await;
    let (_, token) = w.service("acme", "svc", &[("shop", Role::Viewer)], TokenSpec::default()).await;
    w.user("acme", "ann@acme.io", Role::Viewer, json!({"team": "red"})).await;
    let for_ann = minted(&w, &w.gateway, &token, "shop", json!({"user_email": "ann@acme.io"})).await;
    // Naming her by an `email` attribute is the same, however the key is spelled: the upstream
    // reads `Email` as the same header.
    let as_attribute =
        minted(&w, &w.gateway, &token, "shop", json!({"attributes": {"Email": "ANN@acme.io"}})).await;
    // A spelling of her address the upstream would read as hers (a space it trims) is refused.
    // So is a second spelling beside a checked one, which no header carries but
    // `X-Auth-Attributes` does: it would name her unchecked and unbound.
    for attrs in [
        json!({"email": "ann@acme.io "}),
        json!({"EMAIL": " ann@acme.io"}),
        json!({"email": 7}),
        json!({"EMAIL": "eve@ext.io", "email": "ann@acme.io\t"}),
        json!({"EMAIL": "eve@ext.io", "email": ["ann@acme.io"]}),
    ] {
        let (status, answer) =
            mint(&w, &w.gateway, &token, "acme", "shop", json!({"attributes": attrs})).await;
        assert_eq!(status, 400, "{attrs}: {answer}");
    }
    // A token as the subject (sent upstream, audited) or inside an attribute: refused.
    for body in
        [json!({"subject": token, "attributes": {}}), json!({"attributes": {"note": format!("key {token}")}})]
    {
        let (status, answer) = mint(&w, &w.gateway, &token, "acme", "shop", body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer.to_string().contains("holds a credential"), "{answer}");
    }
    let (status, answer) =
        mint(&w, &w.gateway, &token, "acme", "shop", json!({"attributes": {"team_id": "a", "team-id": "b"}}))
            .await;
    assert_eq!(status, 400, "two keys that travel as one header: {answer}");
    assert!(answer.to_string().contains("attr-team-id"), "{answer}");
    // Keys that get no header of their own (not ASCII, or not a scalar) cannot collide.
    let attrs = json!({"部署": "eng", "役職": "lead", "team_id": 2, "team-id": {"x": 1}, "role_x": "é", "role-x": "y"});
    let (status, answer) = mint(&w, &w.gateway, &token, "acme", "shop", json!({"attributes": attrs})).await;
    assert_eq!(status, 201, "{answer}");
    // An end user who is no org user has nobody to suspend.
    let outsider = minted(&w, &w.gateway, &token, "shop", json!({"user_email": "eu@customer.io"})).await;
    let all_refuse = |jwt: &str, want: u16| {
        let jwt = jwt.to_string();
        let (w, second) = (&w, &second);
        async move {
            eventually(Duration::from_secs(2), || async {
                status_of(w, &w.gateway, "/shop/x", &jwt).await == want
                    && status_of(w, second, "/shop/x", &jwt).await == want
            })
            .await
        }
    };
    assert!(all_refuse(&for_ann, 200).await);

    admin.run(&["user", "suspend", "ann@acme.io"]).ok();
    assert_refused(&w, &for_ann, "at once on the instance that suspended").await;
    assert_refused(&w, &as_attribute, "named by an email attribute").await;
    for attrs in [json!({"email": "ann@acme.io"}), json!({"E-mail": "x", "eMail": "Ann@Acme.io"})] {
        let (status, answer) =
            mint(&w, &w.gateway, &token, "acme", "shop", json!({"attributes": attrs})).await;
        assert_eq!(status, 403, "no new credential for her either way: {answer}");
    }
    assert!(all_refuse(&for_ann, 401).await, "the second instance refuses too");
    assert_eq!(status_of(&w, &w.gateway, "/shop/x", &outsider).await, 200);
    admin.run(&["user", "reactivate", "ann@acme.io"]).ok();
    assert!(all_refuse(&for_ann, 200).await, "reactivated");

    admin.run(&["user", "remove", "ann@acme.io"]).ok();
    assert_refused(&w, &for_ann, "removed").await;
    // Someone added again with the same email is someone else.
    w.user("acme", "ann@acme.io", Role::Viewer, json!({})).await;
    assert!(all_refuse(&for_ann, 401).await, "re-added");
    assert_eq!(status_of(&w, &second, "/shop/x", &outsider).await, 200);
}

async fn jwks(w: &World) -> Value {
    w.http
        .get(format!("{}/.well-known/jwks.json", w.gateway.admin_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn kid_of(jwt: &str) -> String {
    let header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(jwt.split('.').next().unwrap()).unwrap()).unwrap();
    header["kid"].as_str().unwrap().to_string()
}

/// Rewrites the config with another `jwt` section and reloads it with SIGHUP.
async fn reconfigure(w: &World, keys: &JwtKeys, signing: &str, listed: &[&str]) {
    reconfigure_with(w, &keys.section(signing, listed), listed.len()).await;
}

/// Rewrites the config with the `jwt` section `section`, listing `want` keys, and reloads it.
async fn reconfigure_with(w: &World, section: &str, want: usize) {
    let config = jwt_gateway_config(w.gateway.port, &w.redis.url(), w.upstream.port, section);
    w.gateway
        .reload(|old| {
            // Keep the admin port the first config chose.
            let admin_line = old.lines().find(|l| l.starts_with("admin:")).unwrap();
            config
                .lines()
                .map(|l| if l.starts_with("admin:") { admin_line } else { l })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            jwks(w).await["keys"].as_array().map(Vec::len) == Some(want)
        })
        .await,
        "the reloaded keys served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_became_verify_only_still_verifies_until_it_is_removed() {
    let keys = JwtKeys::generate();
    let w = World::start_jwt(&keys).await;
    let (_, service_token) =
        w.service("acme", "embed", &[("shop", Role::Viewer)], TokenSpec::default()).await;
    let old = minted(&w, &w.gateway, &service_token, "shop", json!({"attributes": {}})).await;
    assert_eq!(kid_of(&old), "k1");

    // k2 signs from now on; k1 stays to verify what it signed.
    reconfigure(&w, &keys, "k2", &["k1", "k2"]).await;
    let new = minted(&w, &w.gateway, &service_token, "shop", json!({"attributes": {}})).await;
    assert_eq!(kid_of(&new), "k2");
    assert_eq!(status_of(&w, &w.gateway, "/shop/x", &old).await, 200, "verify-only key still verifies");
    assert_eq!(status_of(&w, &w.gateway, "/shop/x", &new).await, 200);

    // k1 listed by its public key alone (a `PUBLIC KEY` PEM, other bytes than the private key's
    // file): what it signed, verified and cached before, still verifies.
    let published = jwks(&w).await;
    let k1 = published["keys"].as_array().unwrap().iter().find(|k| k["kid"] == "k1").unwrap();
    let x = URL_SAFE_NO_PAD.decode(k1["x"].as_str().unwrap()).unwrap();
    let spki = [&[0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00][..], &x].concat();
    let dir = tempfile::tempdir().unwrap();
    let public = dir.path().join("k1.pub.pem");
    std::fs::write(&public, pem::encode(&pem::Pem::new("PUBLIC KEY", spki))).unwrap();
    let section =
        keys.section("k2", &["k2"]) + &format!("    - {{ kid: k1, key_file: \"{}\" }}\n", public.display());
    reconfigure_with(&w, &section, 2).await;
    assert_eq!(status_of(&w, &w.gateway, "/shop/x", &old).await, 200, "the public key verifies");
    assert_eq!(status_of(&w, &w.gateway, "/shop/x", &new).await, 200);

    // k1 removed: what it signed is refused, even though it was verified (and cached) before.
    reconfigure(&w, &keys, "k2", &["k2"]).await;
    assert_eq!(status_of(&w, &w.gateway, "/shop/x", &old).await, 401);
    assert_eq!(status_of(&w, &w.gateway, "/shop/x", &new).await, 200);
}

/// Verifies `jwt` with jwt-compact and ed25519-dalek (not the gateway's jsonwebtoken and ring),
/// using the key the JWKS publishes under the token's kid; returns the claims.
fn verify_independently(jwks: &Value, jwt: &str) -> Claims<serde_json::Map<String, Value>> {
    let kid = kid_of(jwt);
    let jwk = jwks["keys"].as_array().unwrap().iter().find(|k| k["kid"] == kid.as_str()).unwrap();
    let jwk: JsonWebKey<'_> =
        serde_json::from_value(json!({"kty": jwk["kty"], "crv": jwk["crv"], "x": jwk["x"]})).unwrap();
    let key = <Ed25519 as jwt_compact::Algorithm>::VerifyingKey::try_from(&jwk).unwrap();
    let untrusted = UntrustedToken::new(jwt).unwrap();
    let token = Ed25519.validator::<serde_json::Map<String, Value>>(&key).validate(&untrusted).unwrap();
    token.claims().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_implementation_verifies_minted_and_identity_jwts_with_the_jwks() {
    let keys = JwtKeys::generate();
    let mut w = World::start_jwt(&keys).await;
    let (_, service_token) =
        w.service("acme", "embed", &[("shop", Role::Editor)], TokenSpec::default()).await;
    let jwt = minted(
        &w,
        &w.gateway,
        &service_token,
        "shop",
        json!({"attributes": {"plan": "pro"}, "subject": "cust-7"}),
    )
    .await;
    let published = jwks(&w).await;
    assert_eq!(published["keys"][0]["kty"], "OKP");
    assert_eq!(published["keys"][0]["alg"], "EdDSA");

    let minted_claims = verify_independently(&published, &jwt);
    assert_eq!(minted_claims.custom["sub"], "cust-7");
    assert_eq!(minted_claims.custom["attrs"]["plan"], "pro");
    assert!(minted_claims.expiration.is_some());

    // The route signs who is calling for its upstream; a client's own X-Auth-Jwt never passes.
    let resp = w
        .http
        .get(w.gateway.url("/signed/x"))
        .bearer_auth(&jwt)
        .header("x-auth-jwt", "forged")
        .send()
        .await
        .unwrap();
    let echo = echoed(resp).await;
    let identity = echo["headers"]["x-auth-jwt"].as_array().unwrap();
    assert_eq!(identity.len(), 1);
    let identity = identity[0].as_str().unwrap();
    assert_ne!(identity, "forged");
    let claims = verify_independently(&published, identity);
    let c = &claims.custom;
    assert_eq!(c["sub"], "ephemeral:cust-7");
    assert_eq!(c["aud"], "tollgate-upstream");
    assert_eq!(c["iss"], "tollgate-test");
    assert_eq!(
        (c["org"].as_str(), c["project"].as_str(), c["environment"].as_str()),
        (Some("acme"), Some("shop"), Some("production"))
    );
    assert_eq!(c["permissions"], json!(["read", "write", "execute"]));
    assert_eq!(c["attributes"]["plan"], "pro");
    let lifetime = claims.expiration.unwrap().timestamp() - claims.issued_at.unwrap().timestamp();
    assert!((1..=60).contains(&lifetime), "{lifetime}");

    // A PAT on the same route gets one too; a route without identity_jwt sends none.
    let user = w.user("acme", "dev@acme.io", Role::Viewer, json!({})).await;
    let pat = w.pat(&user, TokenSpec::default()).await;
    let echo = echoed(w.get(&w.gateway, "/signed/x", &pat).await).await;
    let claims = verify_independently(&published, echo["headers"]["x-auth-jwt"][0].as_str().unwrap());
    assert_eq!(claims.custom["sub"], format!("user:{}", user.id));
    let echo = echoed(
        w.http
            .get(w.gateway.url("/shop/x"))
            .bearer_auth(&pat)
            .header("x-auth-jwt", "forged")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(echo["headers"].get("x-auth-jwt").is_none(), "{echo}");

    // A route with its own audience signs for it: that upstream cannot be handed another's.
    let echo = echoed(w.get(&w.gateway, "/billing/x", &pat).await).await;
    let claims = verify_independently(&published, echo["headers"]["x-auth-jwt"][0].as_str().unwrap());
    assert_eq!(claims.custom["aud"], "billing");
    assert_eq!(claims.custom["sub"], format!("user:{}", user.id));

    // The identity JWT is not a credential.
    assert_refused(&w, echo_identity(&w, &pat).await.as_str(), "identity JWT presented as a credential")
        .await;
}

async fn echo_identity(w: &World, pat: &str) -> String {
    let echo = echoed(w.get(&w.gateway, "/signed/x", pat).await).await;
    echo["headers"]["x-auth-jwt"][0].as_str().unwrap().to_string()
}
