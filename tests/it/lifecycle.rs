//! The token lifecycle through the CLI binary, against a running gateway and a real redis-server:
//! the seed documents' scenarios, rights that cannot grow, org isolation, and bad input.

use std::time::Duration;

use serde_json::json;

use tollgate::store::format_millis;

use crate::support::*;

/// The org's first admin (bootstrapped through the library) and a CLI acting as them.
async fn admin(w: &mut World, org: &str) -> Cli {
    w.bootstrap_admin(org).await
}

/// Adds a user through the CLI and returns a CLI acting as them.
fn add_user(admin: &Cli, email: &str, role: &str) -> Cli {
    let out = admin.run(&["user", "add", email, "--org-role", role, "--issue-token"]);
    // `tokens.max_ttl` (30d here) gave the token an expiry no one asked for: printed with it.
    let expires = out.stdout.lines().find_map(|l| l.strip_prefix("Expires:")).expect("an Expires line");
    let expires = humantime::parse_rfc3339(expires.trim()).expect("an RFC 3339 time");
    let lifetime = expires.duration_since(std::time::SystemTime::now()).unwrap_or_default();
    assert!(lifetime > Duration::from_secs(29 * 24 * 3600), "{out:?}");
    admin.as_token(&out.token())
}

/// Asserts that the org's audit log holds each `(action, target)`, made by `by`'s caller.
async fn assert_audited(w: &World, by: &Cli, changes: &[(&str, &str)]) {
    let whoami =
        w.http.get(format!("{}/v1/whoami", w.gateway.admin_url())).bearer_auth(&by.token).send().await;
    let whoami: serde_json::Value = whoami.unwrap().json().await.unwrap();
    let subject = whoami["subject"].as_str().expect("the caller's subject").to_string();
    let log = by.json(&["audit"]);
    for (action, target) in changes {
        let entry = log.as_array().unwrap().iter().find(|e| e["action"] == *action && e["target"] == *target);
        let entry = entry.unwrap_or_else(|| panic!("no {action} of {target} in {log}"));
        assert_eq!(entry["actor"], subject.as_str(), "{entry}");
        // With the token it was made with.
        assert_eq!(entry["by_token"], &by.token[..10], "{entry}");
        // Its time is RFC 3339, as every time the API shows, and recent.
        let at = humantime::parse_rfc3339(entry["at"].as_str().unwrap_or_default());
        let age = at.ok().and_then(|at| std::time::SystemTime::now().duration_since(at).ok());
        assert!(age.is_some_and(|a| a < Duration::from_secs(600)), "{entry}");
    }
}

async fn status(w: &World, method: reqwest::Method, path: &str, token: &str) -> u16 {
    w.http.request(method, w.gateway.url(path)).bearer_auth(token).send().await.unwrap().status().as_u16()
}

/// Seed 000: `rill token issue` alone asks for a display name and, optionally, an expiry. So does
/// `tollgate token issue` at a terminal; a script (no terminal) is asked nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_issue_alone_at_a_terminal_asks_for_a_name_and_a_lifetime() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;

    let asked = admin.run_at_terminal(&["token", "issue"], "Local Development\n1440\n");
    assert!(asked.ok, "{asked:?}");
    assert!(asked.stdout.contains("Display name (empty for none): "), "{asked:?}");
    assert!(asked.stdout.contains("Expires in minutes"), "{asked:?}");
    let token = asked.token();
    let got = admin.json(&["token", "get", &token[..10]]);
    assert_eq!(got["display_name"], "Local Development", "{got}");
    let expires =
        humantime::parse_rfc3339(got["expires_at"].as_str().unwrap_or_default()).expect("an expiry");
    let lifetime = expires.duration_since(std::time::SystemTime::now()).unwrap_or_default().as_secs();
    assert!((1430 * 60..=1440 * 60).contains(&lifetime), "{got}");

    // An expiry time instead of minutes; no name.
    let at = format_millis(tollgate::store::now_millis() / 1000 * 1000 + 2 * 3_600_000);
    let asked = admin.run_at_terminal(&["token", "issue"], &format!("\n{at}\n"));
    let got = admin.json(&["token", "get", &asked.token()[..10]]);
    assert_eq!(got["display_name"], serde_json::Value::Null, "{got}");
    assert_eq!(got["expires_at"], at.as_str(), "{got}");

    // A bad answer is the server's readable refusal, as for `--expires`.
    let refused = admin.run_at_terminal(&["token", "issue"], "x\nnext tuesday\n");
    assert!(!refused.ok && refused.stdout.contains("expires"), "{refused:?}");

    // With no token to call with, that is said before anything is asked.
    let tokenless = admin.as_token("").run_at_terminal(&["token", "issue"], "never read\n");
    assert!(!tokenless.ok && tokenless.stdout.contains("no token"), "{tokenless:?}");
    assert!(!tokenless.stdout.contains("Display name ("), "{tokenless:?}");

    // Given a name, or run with no terminal, or with `--json`: nothing is asked.
    for (args, at_terminal) in [
        (&["token", "issue", "--display-name", "ci"][..], true),
        (&["token", "issue"][..], false),
        (&["--json", "token", "issue"][..], true),
    ] {
        let out = if at_terminal { admin.run_at_terminal(args, "") } else { admin.run(args) };
        assert!(out.ok, "{out:?}");
        assert!(!out.stdout.contains("Display name (") && !out.stderr.contains("Display name ("), "{out:?}");
    }

    // Where the gateway requires an expiry and sets no maximum, the empty answer the prompt
    // offers is asked again, not refused.
    w.gateway.reload(|c| c.replace("tokens: { max_ttl: 30d }", "tokens: { require_expiry: true }")).await;
    let asked = admin.run_at_terminal(&["token", "issue"], "required\n\n60\n");
    assert!(asked.ok && asked.stdout.contains("This gateway requires an expiry"), "{asked:?}");
    let got = admin.json(&["token", "get", &asked.token()[..10]]);
    assert_eq!(got["display_name"], "required", "{got}");
    assert!(got["expires_at"].is_string(), "{got}");
    // Left empty again: the refusal, as before.
    let refused = admin.run_at_terminal(&["token", "issue"], "required\n\n\n");
    assert!(!refused.ok && refused.stdout.contains("give --ttl-minutes or --expires"), "{refused:?}");
}

/// The admin API over plain HTTP is on the machine's loopback: an `http_proxy` set in the
/// environment (as on many CI runners) is not handed the token, and could not reach it anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_never_sends_its_token_through_an_http_proxy() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;
    // A proxy that takes connections and answers none, counting them.
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    proxy.set_nonblocking(true).unwrap();
    // The scheme in any case (a URL's scheme is case-insensitive), and `localhost` too.
    let port = admin.server.rsplit(':').next().unwrap();
    // `0.0.0.0`, no loopback name, reaches the listener on Linux: plain HTTP to any host.
    let any_host = format!("http://0.0.0.0:{port}");
    for server in [
        admin.server.clone(),
        admin.server.replace("http://", "HTTP://"),
        format!("localhost:{port}"),
        any_host,
    ] {
        let cli = Cli { server: server.clone(), token: admin.token.clone() };
        let out = cli.run_with(&["token", "list"], |c| {
            for name in ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"] {
                c.env(name, &proxy_url);
            }
            c.env_remove("no_proxy").env_remove("NO_PROXY");
        });
        assert!(out.ok, "{server}: {out:?}");
        assert!(proxy.accept().is_err(), "{server}: the CLI connected to the proxy");
    }
    // Nothing listening: it says it could not reach the API (nothing was sent).
    let closed = Cli { server: format!("127.0.0.1:{}", free_port()), token: admin.token.clone() };
    let said = closed.run(&["token", "issue"]).failed();
    assert!(said.contains("cannot reach the admin API") && !said.contains("may have been made"), "{said}");
    // Nothing listening there: what to look at.
    assert!(said.contains("is the gateway running, and is --server (TOLLGATE_SERVER)"), "{said}");
}

/// A request the admin API took and never answered may have made its change: the CLI says so,
/// rather than that it could not reach the API (a new token's secret would be in that answer).
#[test]
fn an_unanswered_call_may_have_made_its_change() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = format!("http://{}", silent.local_addr().unwrap());
    let held = std::thread::spawn(move || {
        let (connection, _) = silent.accept().unwrap();
        std::thread::sleep(Duration::from_secs(40));
        drop(connection);
    });
    let cli = Cli { server, token: "tgp_0000000000".into() };
    let out = cli.run(&["token", "issue", "--display-name", "ci"]);
    let said = out.failed();
    assert!(said.contains("did not answer within 30 s") && said.contains("may have been made"), "{said}");
    assert!(!said.contains("cannot reach"), "{said}");
    drop(held);
}

/// Only the admin API's answer to a change it could not confirm (a 503) carries a token to keep;
/// a `token` in any other error (from whatever `--server` names) is not shown as a credential.
#[test]
fn only_an_unconfirmed_change_hands_over_a_token() {
    let answer = |status: &str, error: &str| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = format!("http://{}", listener.local_addr().unwrap());
        let body = format!(r#"{{"error":"{error}","error_description":"no","token":"tgp_fromelsewhere"}}"#);
        let reply = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let served = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut connection, _) = listener.accept().unwrap();
            let mut request = [0u8; 4096];
            let _ = connection.read(&mut request);
            connection.write_all(reply.as_bytes()).unwrap();
        });
        let out =
            Cli { server, token: "tgp_0000000000".into() }.run(&["token", "issue", "--display-name", "ci"]);
        served.join().unwrap();
        assert!(!out.ok, "{out:?}");
        format!("{}{}", out.stdout, out.stderr)
    };
    let said = answer("400 Bad Request", "invalid_request");
    assert!(!said.contains("tgp_fromelsewhere"), "{said}");
    let said = answer("503 Service Unavailable", "temporarily_unavailable");
    assert!(said.contains("Access token: tgp_fromelsewhere"), "{said}");
}

/// Seed 004 rotates a token to change its restrictions: environments too (`--env`), checked as
/// on an issue; left out, they are the old token's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_may_move_a_token_to_other_environments() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;
    let ann = add_user(&admin, "ann@acme.io", "editor");
    let prod = ann.run(&["token", "issue", "--display-name", "ci", "--env", "production"]).token();
    assert_eq!(status(&w, reqwest::Method::GET, "/staging", &prod).await, 403);

    let staging =
        ann.run(&["tokens", "rotate", &prod[..10], "--scope", "execute", "--env", "staging"]).token();
    assert_eq!(status(&w, reqwest::Method::GET, "/staging", &staging).await, 200);
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &staging).await, 403, "production no more");
    let got = ann.json(&["token", "get", &staging[..10]]);
    assert_eq!(got["environments"], json!(["staging"]), "{got}");
    assert_eq!(got["scope"], "execute", "{got}");
    // Left out, they are kept.
    let kept = ann.run(&["token", "rotate", &staging[..10]]).token();
    assert_eq!(ann.json(&["token", "get", &kept[..10]])["environments"], json!(["staging"]));

    let err = ann.run(&["token", "rotate", &kept[..10], "--env", "moon"]).failed();
    assert!(err.contains("unknown environment \"moon\""), "{err}");
    // No wider than the calling token: one for production only moves nothing to staging.
    let narrow = ann.as_token(&ann.run(&["token", "issue", "--env", "production"]).token());
    let other = ann.run(&["token", "issue", "--env", "production"]).token();
    let err = narrow.run(&["token", "rotate", &other[..10], "--env", "staging"]).failed();
    assert!(err.contains("may not be used in environment \"staging\""), "{err}");
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &other).await, 200, "nothing rotated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_issues_lists_and_revokes_tokens_by_id_and_by_display_name() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;
    let ann = add_user(&admin, "ann@acme.io", "editor");

    let mcp = ann.run(&["token", "issue", "--display-name", "MCP Token", "--ttl-minutes", "1440"]).token();
    let local = ann.run(&["token", "issue", "--display-name", "Local Development"]).token();
    let (mcp_id, local_id) = (mcp[..10].to_string(), local[..10].to_string());

    let listed = ann.run(&["token", "list"]).ok();
    assert!(listed.starts_with("ID"), "{listed}");
    assert!(listed.contains("DISPLAY NAME") && listed.contains("EXPIRES"), "{listed}");
    let mcp_line = listed.lines().find(|l| l.contains(&mcp_id)).expect("MCP token listed");
    assert!(mcp_line.contains("MCP Token"));
    let local_line = listed.lines().find(|l| l.contains(&local_id)).expect("local token listed");
    assert!(!local_line.trim_end().ends_with("Never"), "{local_line}");
    let lifetime = |id: &str| {
        let details = ann.json(&["token", "get", id]);
        let expires = humantime::parse_rfc3339(details["expires_at"].as_str().unwrap()).unwrap();
        expires.duration_since(std::time::SystemTime::now()).unwrap()
    };
    let day = Duration::from_secs(24 * 3600);
    let mcp_lifetime = lifetime(&mcp_id);
    assert!(
        mcp_lifetime > day - Duration::from_secs(120) && mcp_lifetime <= day,
        "a 24-hour TTL: {mcp_lifetime:?}"
    );
    // Under `tokens.max_ttl` (30d here), a token asked for without an expiry gets that lifetime.
    let local_lifetime = lifetime(&local_id);
    assert!(
        local_lifetime > 30 * day - Duration::from_secs(120) && local_lifetime <= 30 * day,
        "the configured maximum: {local_lifetime:?}"
    );

    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &mcp).await, 200);
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &local).await, 200);

    // Last use is written in batches, then shown with the client address.
    assert!(
        eventually(Duration::from_secs(5), || async {
            ann.json(&["token", "get", &mcp_id])["last_used_ip"].as_str() == Some("127.0.0.1")
        })
        .await
    );
    // So is a token's use on the admin API: ann's own, which her CLI sends, is used nowhere else.
    let own_id = ann.token[..10].to_string();
    assert!(
        eventually(Duration::from_secs(5), || async {
            ann.json(&["token", "get", &own_id])["last_used_ip"].as_str() == Some("127.0.0.1")
        })
        .await
    );

    // Revoked by the whole token, as pasted from a leak report: only its id travels, and the
    // secret is never printed back.
    let out = ann.run(&["token", "revoke", &mcp, "--reason", "no longer in use"]);
    assert!(!out.stdout.contains(&mcp) && !out.stderr.contains(&mcp), "{out:?}");
    out.ok();
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &mcp).await, 401, "refused once the call returns");
    // And the admin API, given a whole token in its path, does not repeat it either.
    let resp = w
        .http
        .get(format!("{}/v1/tokens/{local}", w.gateway.admin_url()))
        .bearer_auth(&local)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(!resp.text().await.unwrap().contains(&local));
    // Nor where a user, a service or an owner is named (its id is said instead).
    for path in [
        format!("/v1/orgs/acme/users/{local}"),
        format!("/v1/orgs/acme/services/{local}"),
        format!("/v1/tokens?owner={local}"),
        format!("/v1/orgs/{local}/users"),
    ] {
        let resp =
            w.http.get(format!("{}{path}", w.gateway.admin_url())).bearer_auth(&admin.token).send().await;
        let text = resp.unwrap().text().await.unwrap();
        assert!(!text.contains(&local[10..]) && text.contains(&local[..10]), "{}: {text}", &path[..12]);
    }
    // Nor where a body's value is refused: a token pasted into the wrong field.
    for body in [
        json!({"display_name": "x", "ttl_minutes": local}),
        json!({"display_name": "x", "environments": [local]}),
        json!({"display_name": "x", "scope": local}),
        json!({"display_name": "x", "permissions": [local]}),
    ] {
        let resp = w
            .http
            .post(format!("{}/v1/tokens", w.gateway.admin_url()))
            .bearer_auth(&local)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let text = resp.text().await.unwrap();
        assert!(!text.contains(&local[10..]) && text.contains(&local[..10]), "{text}");
    }
    ann.run(&["token", "revoke", "--display-name", "Local Development"]).ok();
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &local).await, 401);

    let active = ann.run(&["token", "list"]).ok();
    assert!(!active.contains(&mcp_id) && !active.contains(&local_id), "{active}");
    let all = ann.run(&["token", "list", "--all"]).ok();
    assert!(all.lines().next().unwrap().contains("STATUS"), "{all}");
    for id in [&mcp_id, &local_id] {
        assert!(all.lines().any(|l| l.contains(id.as_str()) && l.trim_end().ends_with("revoked")), "{all}");
    }

    // As ToolFront's users type it: `tokens create <name>`.
    let tf = ann.run(&["tokens", "create", "my-token", "--scope", "execute"]).token();
    assert_eq!(ann.json(&["token", "get", &tf[..10]])["display_name"], "my-token");
    ann.run(&["tokens", "revoke", &tf[..10], "--reason", "No longer in use"]).ok();

    // Several tokens with one name: refused, naming them.
    let a = ann.run(&["token", "issue", "--display-name", "ci"]).token();
    let b = ann.run(&["token", "issue", "--display-name", "ci"]).token();
    let err = ann.run(&["token", "revoke", "--display-name", "ci"]).failed();
    assert!(err.contains(&a[..10]) && err.contains(&b[..10]), "{err}");
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &a).await, 200, "nothing was revoked");
    // Anything else that merely starts like an id is refused, sending nothing: a list, a path,
    // an id with more after it would otherwise revoke or rotate the first id alone.
    let (a_id, b_id) = (&a[..10], &b[..10]);
    for arg in [format!("{a_id},{b_id}"), format!("{a_id}/../x"), format!("{a_id}_wrong"), a_id[..9].into()] {
        for verb in ["revoke", "rotate", "get"] {
            let err = ann.run(&["token", verb, &arg]).failed();
            assert!(err.contains("not a token id"), "{verb} {arg}: {err}");
        }
    }
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &a).await, 200, "neither revoked nor rotated");
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &b).await, 200, "neither revoked nor rotated");
    // A whole token with a character of its secret mistyped is still that token's.
    let mistyped = format!("{}{}", &b[..b.len() - 1], if b.ends_with('x') { 'y' } else { 'x' });
    ann.run(&["token", "revoke", &mistyped]).ok();
    assert_eq!(
        status(&w, reqwest::Method::GET, "/shop", &b).await,
        401,
        "revoked by its mistyped whole token"
    );

    // The audit log has who did what, with the reason.
    let audit = admin.json(&["audit", "--token-id", &mcp_id]);
    let actions: Vec<&str> =
        audit.as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["token.revoke", "token.issue"]);
    assert_eq!(audit[0]["reason"], "no longer in use");
    // A narrowed token tells who it is and what it may do.
    let ci =
        ann.run(&["token", "issue", "--display-name", "who", "--scope", "read", "--env", "staging"]).token();
    let me = ann.as_token(&ci).run(&["whoami"]).ok();
    let line = |words: &[&str]| me.lines().any(|l| l.split_whitespace().eq(words.iter().copied()));
    assert!(line(&["Org:", "acme", "(role", "editor)"]) && line(&["Token:", &ci[..10]]), "{me}");
    assert!(line(&["Scope:", "read"]) && line(&["Environments:", "staging"]), "{me}");
    assert!(line(&["Email:", "ann@acme.io"]), "{me}");
    let me = ann.as_token(&ci).json(&["whoami"]);
    assert!(me["subject"].as_str().is_some_and(|s| s.starts_with("user:u_")), "{me}");
    assert_eq!(me["email"], "ann@acme.io", "{me}");
    assert_eq!(
        (&me["org_role"], &me["token_id"]),
        (&serde_json::json!("editor"), &serde_json::json!(&ci[..10]))
    );
    // What a token did is found by it too (a leaked token's use): the admin's added ann.
    let by_admin = admin.json(&["audit", "--token-id", &admin.token[..10]]);
    let added = by_admin.as_array().unwrap().iter().find(|e| e["action"] == "user.add");
    assert!(added.is_some_and(|e| e["target"] == "user:ann@acme.io"), "{by_admin}");
    // Who `user:<id>` is, by the email no command needs the id for.
    assert!(added.is_some_and(|e| e["actor_email"] == "admin@acme.io"), "{by_admin}");
    let table = admin.run(&["audit", "--token-id", &admin.token[..10]]).ok();
    let by = format!("admin@acme.io ({})", &admin.token[..10]);
    assert!(table.lines().any(|l| l.contains("user.add") && l.contains(&by)), "{table}");
    // A list cut at `--limit` says so, beside the table (stderr); a whole one says nothing.
    let cut = admin.run(&["audit", "--limit", "1"]);
    assert!(cut.ok && cut.stdout.lines().count() == 2, "{cut:?}");
    assert!(cut.stderr.contains("the newest 1 entries") && cut.stderr.contains("--limit"), "{cut:?}");
    let whole = admin.run(&["audit", "--limit", "1000"]);
    assert!(whole.ok && whole.stderr.is_empty(), "{whole:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_token_with_two_environments_works_only_there() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;
    let ann = add_user(&admin, "ann@acme.io", "editor");
    let out = ann.run(&["token", "issue", "--scope", "execute", "--env", "production", "--env", "staging"]);
    let token = out.token();
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &token).await, 200);
    assert_eq!(status(&w, reqwest::Method::GET, "/staging", &token).await, 200);
    assert_eq!(status(&w, reqwest::Method::GET, "/dev", &token).await, 403, "not its environment");
    assert_eq!(status(&w, reqwest::Method::POST, "/shop", &token).await, 403, "execute has no write");
    let details = ann.json(&["token", "get", &token[..10]]);
    assert_eq!(details["scope"], "execute");
    assert_eq!(details["environments"], serde_json::json!(["production", "staging"]));

    // As PRODUCT writes it (`--env E...`, `--permission P...`): every value after the flag is one
    // of its own, never the token's name.
    let out =
        ann.run(&["token", "issue", "--permission", "read", "execute", "--env", "production", "staging"]);
    let details = ann.json(&["token", "get", &out.token()[..10]]);
    assert_eq!(details["permissions"], serde_json::json!(["read", "execute"]), "{details}");
    assert_eq!(details["environments"], serde_json::json!(["production", "staging"]));
    assert!(details["display_name"].is_null(), "{details}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_without_grace_refuses_the_old_token_at_once_on_every_instance() {
    let mut w = World::start().await;
    let second = w.second_gateway();
    let admin = admin(&mut w, "acme").await;
    let ann = add_user(&admin, "ann@acme.io", "editor");
    let old = ann.run(&["token", "issue", "--display-name", "deploy"]).token();
    for g in [&w.gateway, &second] {
        assert_eq!(w.get(g, "/shop", &old).await.status(), 200, "cached on both instances");
    }
    let new = ann.run(&["token", "rotate", &old[..10]]).token();
    let resp = w.get(&w.gateway, "/shop", &old).await;
    assert_eq!(resp.status(), 401, "refused once the call returns");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        body["error_description"], "the access token was rotated: use the token that replaced it",
        "{body}"
    );
    let refused =
        eventually(Duration::from_secs(2), || async { w.get(&second, "/shop", &old).await.status() == 401 });
    assert!(refused.await, "and on the other instance");
    for g in [&w.gateway, &second] {
        assert_eq!(w.get(g, "/shop", &new).await.status(), 200);
    }
    // `audit --token-id` shows where the new token came from, in its text too.
    let audit = admin.run(&["audit", "--token-id", &new[..10]]).ok();
    let issue = audit.lines().find(|l| l.contains("token.issue")).expect("the new token's issue");
    assert!(issue.contains(&format!("\"rotated_from\":\"{}\"", &old[..10])), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_the_store_cannot_take_fails_loudly_and_changes_nothing() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;
    let ann = add_user(&admin, "ann@acme.io", "editor");
    let token = ann.run(&["token", "issue", "--display-name", "deploy"]).token();
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &token).await, 200);

    w.redis.stop();
    let err = ann.run(&["token", "revoke", &token[..10]]).failed();
    assert!(err.contains("unreachable"), "{err}");
    w.redis.restart();
    // Not acknowledged, so not done: the token still works, and a retry revokes it.
    let back = eventually(Duration::from_secs(10), || async {
        status(&w, reqwest::Method::GET, "/shop", &token).await == 200
    });
    assert!(back.await, "the unacknowledged revocation changed nothing");
    ann.run(&["token", "revoke", &token[..10]]).ok();
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &token).await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_changes_scope_and_expiry_and_the_old_token_dies_after_its_grace() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;
    let ann = add_user(&admin, "ann@acme.io", "editor");
    let old = ann.run(&["token", "issue", "--display-name", "deploy", "--scope", "read-write"]).token();
    assert_eq!(status(&w, reqwest::Method::POST, "/shop", &old).await, 200);

    // An admin sees the token but cannot rotate it: the new secret would be shown to the admin.
    let err = admin.run(&["token", "rotate", &old[..10]]).failed();
    assert!(err.contains("only its owner can rotate"), "{err}");
    assert_eq!(status(&w, reqwest::Method::POST, "/shop", &old).await, 200, "nothing was rotated");

    let expires = format_millis(tollgate::store::now_millis() + 3 * 24 * 3600 * 1000);
    let out = ann.run(&[
        "token",
        "rotate",
        &old[..10],
        "--scope",
        "read",
        "--expires",
        &expires,
        // Long enough for everything below on a loaded machine; a short grace's end is shown
        // with a token of its own at the end.
        "--grace-seconds",
        "300",
    ]);
    let new = out.token();
    // Said with the time it stops: the grace's end, or the old token's expiry where that is sooner.
    let old_details = ann.json(&["token", "get", &old[..10]]);
    let until = old_details["revoked_at"].as_str().expect("an end to the grace");
    assert!(out.stdout.contains(&format!("the old token keeps working until {until}.")), "{out:?}");
    // `token get` says so too, not that it was revoked at a time still to come; `token list`
    // shows that time (today) where the expiry (in three days) would be.
    let shown = ann.run(&["token", "get", &old[..10]]).ok();
    assert!(shown.lines().any(|l| l.starts_with("Works until:") && l.contains(until)), "{shown}");
    assert!(!shown.lines().any(|l| l.starts_with("Revoked:")), "{shown}");
    let listed = ann.run(&["token", "list"]).ok();
    let row = listed.lines().find(|l| l.contains(&old[..10])).expect(&listed);
    let cells: Vec<&str> = row.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
    assert_eq!(cells.get(3).copied(), Some(until[..16].replace('T', " ").as_str()), "EXPIRES in {listed}");
    let short = ann.run(&["token", "issue", "--display-name", "short", "--ttl-minutes", "1"]).token();
    let out = ann.run(&["token", "rotate", &short[..10], "--grace-seconds", "300"]);
    out.token();
    let short_expiry = ann.json(&["token", "get", &short[..10]])["expires_at"].as_str().unwrap().to_string();
    assert!(out.stdout.contains(&format!("the old token keeps working until {short_expiry}.")), "{out:?}");
    let details = ann.json(&["token", "get", &new[..10]]);
    assert_eq!(details["scope"], "read");
    assert_eq!(details["expires_at"], expires);
    assert_eq!(details["display_name"], "deploy");
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &new).await, 200);
    assert_eq!(status(&w, reqwest::Method::POST, "/shop", &new).await, 403, "the new scope applies");

    let resp = w.http.get(w.gateway.url("/shop")).bearer_auth(&old).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the old token works during its grace");
    let deprecation = resp.headers().get("deprecation").expect("and says it is deprecated").to_str().unwrap();
    assert!(deprecation.starts_with('@'), "{deprecation}");
    assert!(resp.headers().get("sunset").is_some(), "and when it stops");
    // So does every other answer to it: a refusal, and the admin API's.
    let refused = w.http.get(w.gateway.url("/reports")).bearer_auth(&old).send().await.unwrap();
    assert_eq!(refused.status(), 403);
    let failed = w.http.get(w.gateway.url("/dead")).bearer_auth(&old).send().await.unwrap();
    assert_eq!(failed.status(), 502);
    let admin_call = w.http.get(format!("{}/v1/whoami", w.gateway.admin_url())).bearer_auth(&old);
    let admin_call = admin_call.send().await.unwrap();
    assert_eq!(admin_call.status(), 200);
    for (what, r) in
        [("the refusal", &refused), ("the upstream's failure", &failed), ("the admin API", &admin_call)]
    {
        assert_eq!(r.headers().get("deprecation"), resp.headers().get("deprecation"), "{what}");
        assert_eq!(r.headers().get("sunset"), resp.headers().get("sunset"), "{what}");
    }
    // In its grace it still reads, but changes nothing: a leaked old token cannot revoke or
    // rotate away its replacement, nor make more tokens.
    let old_cli = ann.as_token(&old);
    for args in
        [vec!["token", "revoke", &new[..10]], vec!["token", "rotate", &new[..10]], vec!["token", "issue"]]
    {
        let err = old_cli.run(&args).failed();
        assert!(err.contains("was rotated"), "{args:?}: {err}");
    }
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &new).await, 200, "the replacement is untouched");
    let read = old_cli.run(&["token", "list"]);
    // Said to whoever still calls with it, once, on stderr (the output stays as it was).
    let sunset = resp.headers().get("sunset").unwrap().to_str().unwrap();
    let warning = format!("warning: the token you called with was rotated and stops working at {sunset}");
    assert_eq!(read.stderr.matches(&warning).count(), 1, "{read:?}");
    assert!(read.ok().contains(&new[..10]), "reading still works");
    // The plain list shows it, with a status saying it is on its way out.
    let listed = ann.run(&["token", "list"]).ok();
    assert!(listed.lines().next().unwrap().contains("STATUS"), "{listed}");
    assert!(
        listed.lines().any(|l| l.contains(&old[..10]) && l.trim_end().ends_with("deprecated")),
        "{listed}"
    );
    // Past its grace the old token stops, and is listed as rotated.
    let brief = ann.run(&["token", "issue", "--display-name", "brief"]).token();
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &brief).await, 200);
    ann.run(&["token", "rotate", &brief[..10], "--grace-seconds", "1"]).token();
    assert!(
        eventually(Duration::from_secs(10), || async {
            status(&w, reqwest::Method::GET, "/shop", &brief).await == 401
        })
        .await
    );
    let all = ann.run(&["token", "list", "--all"]).ok();
    assert!(all.lines().any(|l| l.contains(&brief[..10]) && l.trim_end().ends_with("rotated")), "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_manages_services_end_to_end() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;

    let out = admin.run(&["service", "create", "reporting", "--org", "acme", "--org-role", "viewer"]);
    assert!(out.stdout.contains("Created service \"reporting\" in org \"acme\"."), "{out:?}");
    let reporting = out.token();
    // `tokens.max_ttl` (30d here) gave it an expiry no one asked for: printed with it.
    let expires = out.stdout.lines().find_map(|l| l.strip_prefix("Expires:")).expect("an Expires line");
    assert_eq!(admin.json(&["token", "get", &reporting[..10]])["expires_at"], expires.trim(), "{out:?}");
    assert!(reporting.starts_with("tgs_"));
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &reporting).await, 200);
    assert_eq!(status(&w, reqwest::Method::POST, "/shop", &reporting).await, 403);
    // No project role reads `-`, as no org role does (Rill's `service list`).
    let listed = admin.run(&["service", "list"]).ok();
    let line = listed.lines().find(|l| l.starts_with("reporting")).expect("listed");
    assert_eq!(line.split_whitespace().collect::<Vec<_>>(), ["reporting", "viewer", "-", "{}"], "{listed}");

    let out = admin.run(&[
        "service",
        "create",
        "embed",
        "--org",
        "acme",
        "--project",
        "shop",
        "--project-role",
        "editor",
        "--attributes",
        r#"{"tier":"gold","region":"us-west"}"#,
    ]);
    let embed = out.token();
    let echo = echoed(w.get(&w.gateway, "/shop", &embed).await).await;
    assert_eq!(echo["headers"]["x-auth-subject"][0], "service:embed");
    assert_eq!(echo["headers"]["x-auth-token-kind"][0], "service");
    assert_eq!(echo["headers"]["x-auth-attr-tier"][0], "gold");
    assert_eq!(echo["headers"]["x-auth-role"][0], "editor");

    admin.run(&["service", "edit", "embed", "--attributes", r#"{"tier":"silver"}"#]).ok();
    let echo = echoed(w.get(&w.gateway, "/shop", &embed).await).await;
    assert_eq!(echo["headers"]["x-auth-attr-tier"][0], "silver", "the next request sees the edit");
    assert!(echo["headers"].get("x-auth-attr-region").is_none());
    admin.run(&["service", "edit", "embed", "--attributes", "{}"]).ok();
    let echo = echoed(w.get(&w.gateway, "/shop", &embed).await).await;
    assert_eq!(echo["headers"]["x-auth-attributes"][0], "{}");
    // An edit to what it already is writes and audits nothing.
    let audited = admin.json(&["audit"]).as_array().unwrap().len();
    admin.run(&["service", "edit", "embed", "--attributes", "{}", "--new-name", "embed"]).ok();
    assert_eq!(admin.json(&["audit"]).as_array().unwrap().len(), audited);
    // A service's first token is audited naming the service, as every other token issued for
    // someone else is.
    let log = admin.json(&["audit", "--token-id", &embed[..10]]);
    let issued = log.as_array().unwrap().iter().find(|e| e["action"] == "token.issue").expect("its issue");
    assert_eq!(issued["details"]["for"], "service:embed", "{log}");

    // The org role and a project's role change in one call, as `service create` sets both.
    admin
        .run(&["service", "set-role", "embed", "--org-role", "viewer", "--project", "shop", "--remove"])
        .ok();
    let err = admin.run(&["service", "set-role", "embed", "--project", "shop"]).failed();
    assert!(err.contains("give --project-role (the role there) or --remove"), "{err}");
    let shown = admin.json(&["service", "show", "embed"]);
    assert_eq!(shown["org_role"], "viewer");
    assert_eq!(shown["project_roles"], serde_json::json!({}));
    assert_eq!(status(&w, reqwest::Method::POST, "/shop", &embed).await, 403, "now a viewer");

    admin.run(&["service", "edit", "embed", "--new-name", "dashboards"]).ok();
    let echo = echoed(w.get(&w.gateway, "/shop", &embed).await).await;
    assert_eq!(echo["headers"]["x-auth-subject"][0], "service:dashboards");
    let listed = admin.run(&["service", "list"]).ok();
    assert!(
        listed.contains("dashboards") && listed.contains("reporting") && !listed.contains("embed"),
        "{listed}"
    );

    let deleted = admin.run(&["service", "delete", "dashboards", "--reason", "retired"]).ok();
    assert!(deleted.contains("revoked 1 token(s)"), "as user remove says it: {deleted}");
    let log = admin.json(&["audit"]);
    let deletion = log.as_array().unwrap().iter().find(|e| e["action"] == "service.delete").expect("audited");
    assert_eq!(deletion["reason"], "retired", "{log}");
    assert_eq!(
        status(&w, reqwest::Method::GET, "/shop", &embed).await,
        401,
        "a deleted service's token is refused"
    );
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &reporting).await, 200);
    assert_audited(
        &w,
        &admin,
        &[
            ("service.create", "service:reporting"),
            ("service.create", "service:embed"),
            ("service.edit", "service:embed"),
            ("service.set_role", "service:embed"),
            ("service.delete", "service:dashboards"),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_grants_more_than_they_hold() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;
    let viewer = add_user(&admin, "val@acme.io", "viewer");
    let editor = add_user(&admin, "ed@acme.io", "editor");

    let err = viewer.run(&["service", "create", "sneaky", "--org-role", "viewer"]).failed();
    assert!(err.contains("editor role"), "{err}");
    let err = viewer.run(&["token", "issue", "--scope", "admin"]).failed();
    assert!(err.contains("more rights") && err.contains("than you hold ("), "{err}");
    // The viewer's own default token can only read.
    let token = viewer.run(&["token", "issue"]).token();
    assert_eq!(status(&w, reqwest::Method::POST, "/shop", &token).await, 403);
    // Nor does naming a scope its token was given when its owner held more: an admin's
    // `--scope admin` token, its owner since made a viewer, asks for that scope again in vain
    // (left unset, the new token inherits it, and the viewer's role caps it).
    let ada = add_user(&admin, "ada@acme.io", "admin");
    let ada = ada.as_token(&ada.run(&["token", "issue", "--scope", "admin"]).token());
    admin.run(&["user", "set-role", "ada@acme.io", "--org-role", "viewer"]).ok();
    let err = ada.run(&["token", "issue", "--scope", "admin"]).failed();
    assert!(err.contains("more rights"), "{err}");
    let inherited = ada.run(&["token", "issue"]).token();
    assert_eq!(status(&w, reqwest::Method::POST, "/shop", &inherited).await, 403, "capped by the role");

    let err = editor.run(&["service", "create", "big", "--org-role", "admin"]).failed();
    assert!(err.contains("may not exceed"), "{err}");
    let etl = editor.run(&["service", "create", "etl", "--org-role", "editor"]).token();
    let err = admin.run(&["service", "set-role", "etl", "--org-role", "admin"]).failed();
    assert!(
        err.contains("may not exceed its creator's (editor)"),
        "a service made by an editor cannot become admin: {err}"
    );
    // An editor whose token may not `write` is told so, not that the role is missing.
    let reading = editor.as_token(&editor.run(&["token", "issue", "--scope", "execute"]).token());
    let err = reading.run(&["service", "create", "annex", "--org-role", "viewer"]).failed();
    assert!(err.contains("a token that may `write`"), "{err}");

    // Removing the editor kills their PATs and leaves their service working.
    let ed_pat = editor.run(&["token", "issue"]).token();
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &ed_pat).await, 200);
    let ed_subject = editor.json(&["user", "show", "ed@acme.io"])["id"].as_str().unwrap().to_string();
    let out = admin.run(&["user", "remove", "ed@acme.io", "--reason", "left the team"]).ok();
    let log = admin.json(&["audit"]);
    let removal = log.as_array().unwrap().iter().find(|e| e["action"] == "user.remove").expect("audited");
    assert_eq!(removal["reason"], "left the team", "{log}");
    // The id ed's own entries name (`user:<id>`) stays tied to the email once ed is gone.
    assert_eq!(removal["details"]["id"], ed_subject.as_str(), "{removal}");
    let added = log
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "user.add" && e["target"] == "user:ed@acme.io");
    assert_eq!(added.expect("ed's addition")["details"]["id"], ed_subject.as_str());
    assert!(out.contains("revoked 3 token(s)"), "the one he was added with, the execute one, ed_pat: {out}");
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &ed_pat).await, 401);
    assert_eq!(
        status(&w, reqwest::Method::POST, "/shop", &etl).await,
        200,
        "the service survives its creator"
    );

    // Suspension and role changes through the CLI.
    admin.run(&["user", "suspend", "val@acme.io", "--reason", "offboarding"]).ok();
    // A user named in another case than added is one user in the log: the stored email.
    add_user(&admin, "Mia@Acme.io", "viewer");
    admin.run(&["user", "suspend", "MIA@acme.io"]).ok();
    let log = admin.json(&["audit"]);
    let suspended = log
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "user.suspend" && e["target"] != "user:val@acme.io");
    assert_eq!(suspended.expect("audited")["target"], "user:Mia@Acme.io", "{log}");
    // Only ASCII case is folded: the Kelvin sign (which Unicode lowercases to `k`) names no one.
    add_user(&admin, "kate@acme.io", "viewer");
    let err = admin.run(&["user", "show", "\u{212a}ate@acme.io"]).failed();
    assert!(err.contains("no user"), "{err}");
    // Removed by another case, the answer names the stored email.
    let removed = admin.json(&["user", "remove", "KATE@acme.io"]);
    assert_eq!(removed["removed"], "kate@acme.io", "{removed}");
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &token).await, 401);
    // The suspended user's tokens say so, as the gateway refuses them; and no longer once back.
    let statuses = || {
        let listed = admin.json(&["token", "list", "--owner", "val@acme.io"]);
        listed
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["status"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert!(!statuses().is_empty() && statuses().iter().all(|s| s == "suspended"), "{:?}", statuses());
    admin.run(&["user", "reactivate", "val@acme.io", "--reason", "back from leave"]).ok();
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &token).await, 200);
    assert!(statuses().iter().all(|s| s == "active"), "{:?}", statuses());
    let log = admin.json(&["audit"]);
    let entry = log.as_array().unwrap().iter().find(|e| e["action"] == "user.reactivate").unwrap();
    assert_eq!(entry["reason"], "back from leave", "kept as a suspension's is: {entry}");
    // A change that changes nothing is refused, and not audited.
    let audited = admin.json(&["audit"]).as_array().unwrap().len();
    let err = admin.run(&["user", "reactivate", "val@acme.io"]).failed();
    assert!(err.contains("already active"), "{err}");
    assert_eq!(admin.json(&["audit"]).as_array().unwrap().len(), audited);
    admin.run(&["user", "set-role", "val@acme.io", "--org-role", "editor"]).ok();
    assert_eq!(
        status(&w, reqwest::Method::POST, "/shop", &token).await,
        200,
        "the PAT follows its owner's role"
    );
    let shown = admin.json(&["user", "show", "val@acme.io"]);
    assert_eq!(shown["org_role"], "editor");
    assert_audited(
        &w,
        &admin,
        &[
            ("user.remove", "user:ed@acme.io"),
            ("user.suspend", "user:val@acme.io"),
            ("user.reactivate", "user:val@acme.io"),
            ("user.set_role", "user:val@acme.io"),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pat_cannot_reach_another_org_and_non_admins_cannot_list_others_tokens() {
    let mut w = World::start().await;
    let acme = admin(&mut w, "acme").await;
    let globex = admin(&mut w, "globex").await;
    acme.run(&["service", "create", "etl", "--org-role", "viewer"]).ok();
    let ann = add_user(&acme, "ann@acme.io", "editor");
    ann.run(&["token", "issue", "--display-name", "mine"]).ok();

    for args in [
        vec!["user", "list", "--org", "acme"],
        vec!["user", "show", "ann@acme.io", "--org", "acme"],
        vec!["user", "suspend", "ann@acme.io", "--org", "acme"],
        vec!["service", "show", "etl", "--org", "acme"],
        vec!["service", "delete", "etl", "--org", "acme"],
        vec!["audit", "--org", "acme"],
    ] {
        let err = globex.run(&args).failed();
        assert!(err.contains("not found"), "{args:?}: {err}");
    }
    let err = globex.run(&["token", "get", &ann.token[..10]]).failed();
    assert!(err.contains("not found"), "{err}");
    let err = globex.run(&["token", "revoke", &ann.token[..10]]).failed();
    assert!(err.contains("not found"), "{err}");
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &globex.token).await, 403);

    let bob = add_user(&acme, "bob@acme.io", "editor");
    let err = bob.run(&["token", "list", "--owner", "ann@acme.io"]).failed();
    assert!(err.contains("org admin"), "{err}");
    let err = bob.run(&["token", "get", &ann.token[..10]]).failed();
    assert!(err.contains("not found"), "{err}");
    let listed = acme.json(&["token", "list", "--owner", "ann@acme.io"]);
    assert_eq!(listed.as_array().unwrap().len(), 2, "an admin can: {listed}");
}

/// Every token may be given an expiry when it is made (PRODUCT: "optional expiry on every
/// token"), a service's and a new user's first token included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_tokens_take_an_expiry_when_they_are_made() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;
    let expires_in = |token: &str| {
        let details = admin.json(&["token", "get", &token[..10]]);
        let at = humantime::parse_rfc3339(details["expires_at"].as_str().unwrap()).unwrap();
        at.duration_since(std::time::SystemTime::now()).unwrap()
    };
    let hour = Duration::from_secs(3600);
    let svc =
        admin.run(&["service", "create", "nightly", "--org-role", "viewer", "--ttl-minutes", "60"]).token();
    let left = expires_in(&svc);
    assert!(left > hour - Duration::from_secs(120) && left <= hour, "{left:?}");
    let soon = humantime::format_rfc3339_seconds(std::time::SystemTime::now() + 2 * hour).to_string();
    let out = admin.run(&[
        "user",
        "add",
        "tmp@acme.io",
        "--org-role",
        "viewer",
        "--issue-token",
        "--expires",
        &soon,
    ]);
    let left = expires_in(&out.token());
    assert!(left > 2 * hour - Duration::from_secs(120) && left <= 2 * hour, "{left:?}");
    // Bounded like any token, and only for a token that is made.
    let err = admin
        .run(&["service", "create", "forever", "--org-role", "viewer", "--ttl-minutes", "100000"])
        .failed();
    assert!(err.contains("maximum lifetime of 30d"), "{err}");
    let err = admin.run(&["user", "add", "x@acme.io", "--org-role", "viewer", "--ttl-minutes", "5"]).failed();
    assert!(err.contains("--issue-token"), "{err}");
    let err = admin.run(&["service", "show", "forever"]).failed();
    assert!(err.contains("no service \"forever\""), "the refused service was not made: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_a_clear_error_and_changes_nothing() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;
    admin.run(&["service", "create", "etl", "--org-role", "viewer"]).ok();
    let before = admin.json(&["service", "list"]);
    let audit_before = admin.json(&["audit"]).as_array().unwrap().len();

    let err = admin.run(&["service", "create", "x", "--org-role", "viewer", "--attributes", "{bad"]).failed();
    assert!(err.contains("--attributes is not valid JSON"), "{err}");
    let err = admin.run(&["service", "create", "x", "--org-role", "viewer", "--attributes", "[1]"]).failed();
    assert!(err.contains("JSON object"), "{err}");
    // `--remove` is set-role's: the commands that make a user or a service do not offer it.
    for args in [
        &["user", "add", "bob@acme.io", "--org-role", "viewer", "--project", "shop", "--remove"][..],
        &["service", "create", "x", "--org-role", "viewer", "--project", "shop", "--remove"],
    ] {
        let err = admin.run(args).failed();
        assert!(err.contains("unexpected argument '--remove'"), "{args:?}: {err}");
    }
    let err = admin
        .run(&[
            "user",
            "set-role",
            "bob@acme.io",
            "--project",
            "shop",
            "--project-role",
            "viewer",
            "--remove",
        ])
        .failed();
    assert!(err.contains("cannot be used with"), "{err}");
    let err = admin.run(&["user", "add", "bob@acme.io", "--org-role", "superuser"]).failed();
    assert!(err.contains("unknown role"), "{err}");
    let err = admin.run(&["token", "issue", "--ttl-minutes", "-5"]).failed();
    assert!(err.contains("ttl_minutes must be positive"), "{err}");
    let err = admin.run(&["token", "issue", "--expires", "tomorrow"]).failed();
    assert!(err.contains("RFC 3339"), "{err}");
    let err = admin.run(&["token", "issue", "--ttl-minutes", "100000"]).failed();
    assert!(err.contains("maximum lifetime of 30d"), "{err}");
    // The org's admin cannot demote themself (nor suspend or remove themself): an org keeps one.
    let err = admin.run(&["user", "set-role", "admin@acme.io", "--org-role", "viewer"]).failed();
    assert!(err.contains("cannot lower your own org role"), "{err}");
    // `--server host:port` means plain HTTP, as the default does.
    let schemeless =
        Cli { server: admin.server.trim_start_matches("http://").to_string(), token: admin.token.clone() };
    assert!(schemeless.run(&["token", "list"]).ok().starts_with("ID"));
    // Output into a pipe that closes early ends the command quietly, as `| head` does.
    let mut listing = std::process::Command::new(tollgate_bin())
        .args(["--server", admin.server.trim_start_matches("http://"), "token", "list"])
        .env("TOLLGATE_TOKEN", &admin.token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(listing.stdout.take());
    let out = listing.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    // Ended by SIGPIPE (13), as `ls | head` ends `ls`; not a panic, not an error message.
    assert_eq!(out.status.signal(), Some(13), "{:?}: {stderr}", out.status);
    assert!(stderr.is_empty(), "{stderr}");
    let err = admin.run(&["token", "issue", "--scope", "everything"]).failed();
    assert!(err.contains("unknown scope"), "{err}");
    let err = admin.run(&["token", "issue", "--env", "moon"]).failed();
    assert!(err.contains("unknown environment"), "{err}");
    let err = admin.run(&["service", "create", "etl", "--org-role", "viewer"]).failed();
    assert!(err.contains("already exists"), "{err}");
    let err = admin.run(&["service", "create", "bad name!", "--org-role", "viewer"]).failed();
    assert!(err.contains("not a service name"), "{err}");
    let err = admin.run(&["user", "add", "not-an-email", "--org-role", "viewer"]).failed();
    assert!(err.contains("not an email"), "{err}");
    admin.run(&["user", "add", "bob@acme.io", "--org-role", "viewer"]).ok();
    let err = admin.run(&["user", "add", "bob@acme.io", "--org-role", "viewer"]).failed();
    assert!(err.contains("already exists"), "{err}");
    let err = admin
        .run(&["service", "set-role", "etl", "--project", "nowhere", "--project-role", "viewer"])
        .failed();
    assert!(err.contains("not defined"), "{err}");

    // The API itself answers JSON errors, never a 5xx.
    let http = reqwest::Client::new();
    let url = format!("{}/v1/orgs/acme/users", w.gateway.admin_url());
    for body in
        [r#"{"email":"c@acme.io","org_role":"superuser"}"#, r#"{"email":"c@acme.io"}"#, "{not json", "[]"]
    {
        let resp = http
            .post(&url)
            .bearer_auth(&admin.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let json: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(json["error"], "invalid_request", "{body}");
        assert!(!json["error_description"].as_str().unwrap().is_empty());
    }
    // Also where axum itself refuses: a query or a path segment that does not parse, a method the
    // route lacks.
    let admin_url = w.gateway.admin_url();
    for (method, path, status) in [
        (reqwest::Method::GET, "/v1/orgs/acme/audit?limit=abc", 400),
        (reqwest::Method::GET, "/v1/tokens?all=1", 400),
        // A filter misspelt would answer unfiltered.
        (reqwest::Method::GET, "/v1/orgs/acme/audit?tokenid=tgp_a1B2c3", 400),
        (reqwest::Method::GET, "/v1/tokens?owners=etl", 400),
        (reqwest::Method::GET, "/v1/orgs/acme/users/%FF", 400),
        (reqwest::Method::PUT, "/v1/tokens", 405),
    ] {
        let resp = http
            .request(method.clone(), format!("{admin_url}{path}"))
            .bearer_auth(&admin.token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{method} {path}");
        let content_type = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
        assert_eq!(content_type.as_deref(), Some("application/json"), "{method} {path}");
        let json: serde_json::Value = resp.json().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert!(!json["error_description"].as_str().unwrap().is_empty(), "{method} {path}: {json}");
    }
    let resp = http.get(format!("{}/v1/tokens", w.gateway.admin_url())).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().get("www-authenticate").is_some());
    // Two Authorization headers: which one counts would be the order's choice, as in the gateway.
    let bearer = format!("Bearer {}", admin.token);
    for (i, [first, second]) in
        [[bearer.as_str(), "Bearer xyz"], ["Bearer xyz", bearer.as_str()]].iter().enumerate()
    {
        let url = format!("{}/v1/whoami", w.gateway.admin_url());
        let resp =
            http.get(url).header("authorization", *first).header("authorization", *second).send().await;
        assert_eq!(resp.unwrap().status(), 400, "order {i}");
    }

    // What would be accepted and then break something later: attributes nested deeper than the
    // records holding them can be read back, or longer than 4 KiB once escaped for their header;
    // a name a URL cannot carry; a reason of any length; a body of any size.
    let deep = (0..20).fold(serde_json::json!(1), |v, _| serde_json::json!({ "a": v }));
    let wide = "\u{1F600}".repeat(1018);
    let post = |path: &str, body: String, content_type: &'static str| {
        http.post(format!("{admin_url}{path}"))
            .bearer_auth(&admin.token)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let json = "application/json";
    let long_reason = serde_json::json!({ "reason": "x".repeat(501) }).to_string();
    let resp = post("/v1/tokens", r#"{"environments":["production","production","staging"]}"#.into(), json);
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["cache-control"], "no-store", "the answer holds a new secret");
    let issued: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(issued["environments"], serde_json::json!(["production", "staging"]), "each once: {issued}");
    let id = issued["id"].as_str().unwrap().to_string();
    for (path, body, content_type, status, says) in [
        (
            "/v1/orgs/acme/services",
            serde_json::json!({"name": "deep", "org_role": "viewer", "attributes": {"d": deep}}).to_string(),
            json,
            400,
            "nest",
        ),
        (
            "/v1/orgs/acme/users",
            serde_json::json!({"email": "wide@acme.io", "org_role": "viewer", "attributes": {"n": wide}})
                .to_string(),
            json,
            400,
            "4096 bytes",
        ),
        (
            "/v1/orgs/acme/services",
            r#"{"name": "..", "org_role": "viewer"}"#.into(),
            json,
            400,
            "not a service name",
        ),
        (
            "/v1/orgs/acme/services",
            r#"{"name": ".hidden", "org_role": "viewer"}"#.into(),
            json,
            400,
            "not a service name",
        ),
        (&format!("/v1/tokens/{id}/revoke"), long_reason.clone(), json, 400, "at most 500"),
        ("/v1/orgs/acme/users/bob@acme.io/suspend", long_reason, json, 400, "at most 500"),
        (&format!("/v1/tokens/{id}/revoke"), r#"{"display_name": "ci"}"#.into(), json, 400, "not both"),
        ("/v1/tokens", format!(r#"{{"display_name": "{}"}}"#, "x".repeat(70_000)), json, 413, "length limit"),
        ("/v1/tokens", "{}".into(), "text/plain", 415, "Content-Type"),
        // Settings sent as query parameters are refused, never ignored: this token would never
        // expire, and that rotation would cut the old token off at once.
        ("/v1/tokens?ttl_minutes=1", "{}".into(), json, 400, "no query parameters"),
        (&format!("/v1/tokens/{id}/rotate?grace_seconds=300"), "{}".into(), json, 400, "no query parameters"),
        // A key given twice in a map would otherwise keep its last value silently.
        (
            "/v1/orgs/acme/users",
            r#"{"email": "twice@acme.io", "org_role": "viewer", "attributes": {"team": "a", "team": "b"}}"#.into(),
            json,
            400,
            r#"the key "team" is given twice"#,
        ),
        (
            "/v1/orgs/acme/services",
            r#"{"name": "twice", "org_role": "viewer", "project_roles": {"shop": "viewer", "shop": "admin"}}"#
                .into(),
            json,
            400,
            r#"the key "shop" is given twice"#,
        ),
        (
            "/v1/orgs/acme/services",
            r#"{"name": "twice", "org_role": "viewer", "attributes": {"x": [{"k": 1, "k": 2}]}}"#.into(),
            json,
            400,
            r#"the key "k" is given twice"#,
        ),
    ] {
        let resp = post(path, body, content_type).await.unwrap();
        assert_eq!(resp.status(), status, "{path}");
        let answer: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(answer["error"], "invalid_request", "{path}: {answer}");
        assert!(answer["error_description"].as_str().unwrap().contains(says), "{path}: {answer}");
    }
    assert!(admin.json(&["audit"]).as_array().is_some(), "the audit log still reads");
    let resp = http.get(format!("{admin_url}/v1/tokens/{id}?fields=all")).bearer_auth(&admin.token).send();
    assert_eq!(resp.await.unwrap().status(), 400, "a query the call does not read");
    let details = admin.json(&["token", "get", &id]);
    assert_eq!(details["status"], "active", "not rotated: {details}");
    admin.run(&["token", "revoke", &id]).ok();
    // A client that waits for `100 Continue` is refused before it sends a declared-too-long body.
    let addr: std::net::SocketAddr = admin_url.trim_start_matches("http://").parse().unwrap();
    let head = format!(
        "POST /v1/tokens HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 99999999\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        admin.token
    );
    let answer = raw_request(addr, head.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // A body refused for its size is counted and logged like any call.
    let metrics = http.get(format!("{admin_url}/metrics")).send().await.unwrap().text().await.unwrap();
    let counted = r#"tollgate_admin_requests_total{route="/v1/tokens",status="413"} 2"#;
    assert!(metrics.contains(counted), "{metrics}");
    assert!(w.gateway.log_text().contains("status=413"), "{}", w.gateway.log_text());

    assert_eq!(admin.json(&["service", "list"]), before, "nothing changed");
    // Only the one successful `user add`, and the token issued and revoked, were audited.
    assert_eq!(admin.json(&["audit"]).as_array().unwrap().len(), audit_before + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_serves_its_openapi_document_and_health() {
    let w = World::start().await;
    let http = reqwest::Client::new();
    let doc: serde_json::Value = http
        .get(format!("{}/openapi.json", w.gateway.admin_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    for path in [
        "/v1/tokens",
        "/v1/tokens/{id}/rotate",
        "/v1/orgs/{org}/services/{name}",
        "/v1/orgs/{org}/audit",
        "/v1/orgs/{org}/projects/{project}/credentials",
        "/.well-known/jwks.json",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path}");
    }
    let health = http.get(format!("{}/healthz", w.gateway.admin_url())).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = http.get(format!("{}/readyz", w.gateway.admin_url())).send().await.unwrap();
    assert_eq!(ready.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narrowed_token_manages_nothing_beyond_its_reach() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;
    let main_id = admin.token[..10].to_string();
    let bob = add_user(&admin, "bob@acme.io", "editor");
    let bobs_id = bob.token[..10].to_string();

    // An admin's token for one environment is no org admin's: its changes would reach them all.
    let staging = admin.as_token(&admin.run(&["token", "issue", "--env", "staging"]).token());
    let envs = "not restricted to environments";
    for (args, says) in [
        (&["user", "set-role", "bob@acme.io", "--org-role", "admin"][..], envs),
        (&["user", "add", "carl@acme.io", "--org-role", "viewer"], envs),
        (&["user", "suspend", "bob@acme.io"], envs),
        (&["token", "list", "--owner", "bob@acme.io"], envs),
        // Another's token is not even confirmed to exist.
        (&["token", "revoke", &bobs_id], "not found"),
    ] {
        let err = staging.run(args).failed();
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(admin.json(&["user", "show", "bob@acme.io"])["org_role"], "editor");
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &bob.token).await, 200);
    // Nor does it revoke its owner's token that reaches every environment.
    let err = staging.run(&["token", "revoke", &main_id]).failed();
    assert!(err.contains("reaches further"), "{err}");

    // A read-only token does not revoke its owner's wider tokens either; a narrower one it does,
    // and itself.
    let read = admin.as_token(&admin.run(&["token", "issue", "--scope", "read"]).token());
    let read_staging = admin.run(&["token", "issue", "--scope", "read", "--env", "staging"]).token();
    for wider in [&main_id, &staging.token[..10]] {
        let err = read.run(&["token", "revoke", wider]).failed();
        assert!(err.contains("reaches further"), "{wider}: {err}");
        // Nor swaps it for a read-only one by rotating it away at once.
        let err = read.run(&["token", "rotate", wider, "--scope", "read", "--grace-seconds", "0"]).failed();
        assert!(err.contains("reaches further"), "{wider}: {err}");
    }
    assert_eq!(status(&w, reqwest::Method::DELETE, "/shop", &admin.token).await, 200, "still whole");
    read.run(&["token", "revoke", &read_staging[..10]]).ok();
    assert_eq!(status(&w, reqwest::Method::GET, "/staging", &read_staging).await, 401);
    read.run(&["token", "revoke", &read.token[..10]]).ok();
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &read.token).await, 401);

    // The admin's own unrestricted token still does all of it.
    admin.run(&["token", "revoke", &staging.token[..10]]).ok();
    admin.run(&["user", "set-role", "bob@acme.io", "--org-role", "viewer"]).ok();
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &admin.token).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_whose_tokens_are_gone_is_issued_a_new_one() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;
    let first = admin.run(&["service", "create", "nightly", "--org", "acme", "--org-role", "viewer"]).token();
    admin.run(&["token", "revoke", &first[..10], "--reason", "leaked"]).ok();
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &first).await, 401);
    let err = admin.run(&["token", "rotate", &first[..10]]).failed();
    assert!(err.contains("not active"), "{err}");

    let out = admin.run(&[
        "token",
        "issue",
        "--service",
        "nightly",
        "--display-name",
        "again",
        "--env",
        "production",
    ]);
    let again = out.token();
    assert!(again.starts_with("tgs_"), "{again}");
    let echo = echoed(w.get(&w.gateway, "/shop", &again).await).await;
    assert_eq!(echo["headers"]["x-auth-subject"][0], "service:nightly");
    assert_eq!(echo["headers"]["x-auth-role"][0], "viewer", "the service's own role");
    assert_eq!(status(&w, reqwest::Method::POST, "/shop", &again).await, 403);
    assert_eq!(status(&w, reqwest::Method::GET, "/staging", &again).await, 403, "production only");
    let listed = admin.json(&["token", "list", "--owner", "nightly"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["display_name"], "again");
    assert_audited(&w, &admin, &[("token.issue", &again[..10])]).await;

    // A service rotates and revokes its own token, as a user does theirs.
    let nightly = admin.as_token(&again);
    let rotated = nightly.run(&["token", "rotate", &again[..10]]).token();
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &again).await, 401, "rotated without grace");
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &rotated).await, 200);
    let nightly = admin.as_token(&rotated);
    // By display name too (the rotation kept it): a service names only the token it calls with.
    nightly.run(&["token", "revoke", "--display-name", "again", "--reason", "moved to vault"]).ok();
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &rotated).await, 401);
    let again = admin.run(&["token", "issue", "--service", "nightly"]).token();
    let err = admin.as_token(&again).run(&["token", "get", &first[..10]]).failed();
    assert!(err.contains("not found"), "only its own token: {err}");

    // Within the service's roles, and only for those who manage it.
    let err = admin.run(&["token", "issue", "--service", "nightly", "--scope", "admin"]).failed();
    assert!(err.contains("more rights") && err.contains("than the service holds ("), "{err}");
    let viewer = add_user(&admin, "vic@acme.io", "viewer");
    let err = viewer.run(&["token", "issue", "--service", "nightly"]).failed();
    assert!(err.contains("only org admins and the service's creator"), "{err}");
    let err = admin.run(&["token", "issue", "--service", "nobody"]).failed();
    assert!(err.contains("no service"), "{err}");

    // A creator who is no admin issues their service's tokens, while they could give it its
    // roles: one demoted since cannot come back through it.
    let ed = add_user(&admin, "ed@acme.io", "editor");
    ed.run(&["service", "create", "etl", "--org", "acme", "--org-role", "editor"]).token();
    let etl = ed.run(&["token", "issue", "--service", "etl"]).token();
    assert_eq!(status(&w, reqwest::Method::POST, "/shop", &etl).await, 200);
    // And sees, rotates and revokes them: a leaked one is theirs to stop.
    let listed = ed.json(&["token", "list", "--owner", "etl"]);
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    assert_eq!(ed.json(&["token", "get", &etl[..10]])["owner"], "service:etl");
    let etl_new = ed.run(&["token", "rotate", &etl[..10]]).token();
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &etl).await, 401, "rotated");
    ed.run(&["token", "revoke", &etl_new[..10], "--reason", "leaked"]).ok();
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &etl_new).await, 401, "revoked");
    // Nobody else who is no admin does, nor learns through --owner who or what exists.
    let eve = add_user(&admin, "eve@acme.io", "editor");
    let etl = ed.run(&["token", "issue", "--service", "etl"]).token();
    for args in
        [["token", "get", &etl[..10]], ["token", "revoke", &etl[..10]], ["token", "rotate", &etl[..10]]]
    {
        let err = eve.run(&args).failed();
        assert!(err.contains("not found"), "{args:?}: {err}");
    }
    for owner in ["etl", "ed@acme.io", "nothing-here"] {
        let err = eve.run(&["token", "list", "--owner", owner]).failed();
        assert!(err.contains("needs an org admin"), "{owner}: {err}");
    }
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &etl).await, 200, "untouched");
    admin.run(&["user", "set-role", "ed@acme.io", "--org-role", "viewer"]).ok();
    let err = ed.run(&["token", "issue", "--service", "etl"]).failed();
    assert!(err.contains("only org admins and the service's creator"), "{err}");
    let ann = add_user(&admin, "ann@acme.io", "admin");
    let ops = ann.run(&["service", "create", "ops", "--org", "acme", "--org-role", "admin"]).token();
    admin.run(&["user", "set-role", "ann@acme.io", "--org-role", "editor"]).ok();
    let err = ann.run(&["token", "issue", "--service", "ops"]).failed();
    assert!(err.contains("above yours"), "{err}");
    // Nor by rotating one of its tokens, which hands the caller a new secret as an issue does.
    let err = ann.run(&["token", "rotate", &ops[..10]]).failed();
    assert!(err.contains("not found"), "no longer one of theirs: {err}");
    // Nor switches off, demotes or renames the service that now outranks them (and so takes its
    // name and its X-Auth-Subject).
    for args in [
        vec!["service", "delete", "ops"],
        vec!["service", "set-role", "ops", "--org-role", "viewer"],
        vec!["service", "edit", "ops", "--new-name", "ops-old"],
        vec!["token", "revoke", &ops[..10]],
    ] {
        let err = ann.run(&args).failed();
        assert!(err.contains("above yours") || err.contains("not found"), "{args:?}: {err}");
    }
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &ops).await, 200, "and the token is untouched");
    assert_eq!(admin.json(&["service", "show", "ops"])["org_role"], "admin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_environments_removed_from_the_config_do_not_block_other_changes() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;
    admin
        .run(&[
            "user",
            "add",
            "bob@acme.io",
            "--org-role",
            "editor",
            "--project",
            "blog",
            "--project-role",
            "admin",
        ])
        .ok();
    let dev = admin.run(&["token", "issue", "--env", "dev"]).token();
    // The blog project and the dev environment go from the config.
    w.gateway
        .reload(|old| {
            old.lines()
                .filter(|l| !l.contains("blog"))
                .map(|l| l.replace("[production, staging, dev]", "[production, staging]"))
                .filter(|l| !l.contains("name: dev,"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .await;

    // A demotion does not wait for the stale project role to be cleaned up.
    admin.run(&["user", "set-role", "bob@acme.io", "--org-role", "viewer"]).ok();
    assert_eq!(admin.json(&["user", "show", "bob@acme.io"])["org_role"], "viewer");
    // A new role on the removed project is still refused; removing the stale one works.
    let err = admin
        .run(&["user", "set-role", "bob@acme.io", "--project", "blog", "--project-role", "viewer"])
        .failed();
    assert!(err.contains("not defined"), "{err}");
    admin.run(&["user", "set-role", "bob@acme.io", "--project", "blog", "--remove"]).ok();
    // A token for the removed environment can still be rotated away (its leak is no less urgent).
    let rotated = admin.run(&["token", "rotate", &dev[..10]]).token();
    assert_eq!(admin.json(&["token", "get", &rotated[..10]])["environments"], json!(["dev"]));
    // Asking for the removed environment anew is refused.
    let err = admin.run(&["token", "issue", "--env", "dev"]).failed();
    assert!(err.contains("unknown environment"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_issues_a_token_to_a_user_whose_tokens_are_gone() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;
    let bob = add_user(&admin, "bob@acme.io", "editor");
    let subject = echoed(w.get(&w.gateway, "/shop", &bob.token).await).await["headers"]["x-auth-subject"][0]
        .as_str()
        .unwrap()
        .to_string();
    admin.run(&["token", "revoke", &bob.token[..10], "--reason", "expired laptop"]).ok();
    assert_eq!(status(&w, reqwest::Method::GET, "/shop", &bob.token).await, 401);

    // Bob has no token to issue one with; an admin gives him one, and he is still himself.
    let again = admin.run(&["token", "issue", "--user", "bob@acme.io", "--display-name", "laptop"]).token();
    assert!(again.starts_with("tgp_"), "{again}");
    let echo = echoed(w.get(&w.gateway, "/shop", &again).await).await;
    assert_eq!(echo["headers"]["x-auth-subject"][0], subject.as_str(), "the same user id upstream");
    assert_eq!(echo["headers"]["x-auth-role"][0], "editor");
    let bob = admin.as_token(&again);
    let listed = bob.json(&["token", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["display_name"], "laptop");
    assert_audited(&w, &admin, &[("token.issue", &again[..10])]).await;
    let log = admin.json(&["audit"]);
    let entry = log.as_array().unwrap().iter().find(|e| e["target"] == again[..10]).unwrap();
    assert_eq!(entry["details"]["for"], "user:bob@acme.io", "{entry}");

    // Not while the user has a working token: they issue their own, and an admin holding a second
    // credential of someone who uses theirs would act as them unnoticed.
    let err = admin.run(&["token", "issue", "--user", "bob@acme.io"]).failed();
    assert!(err.contains("still has a working token"), "{err}");
    // Nor by a service, admin or not.
    let ops = admin.run(&["service", "create", "ops", "--org", "acme", "--org-role", "admin"]).token();
    admin.run(&["user", "add", "idle@acme.io", "--org-role", "viewer"]).ok();
    let err = admin.as_token(&ops).run(&["token", "issue", "--user", "idle@acme.io"]).failed();
    assert!(err.contains("not by a service"), "{err}");

    // Only org admins, within what their own token may hand on, for an active user.
    let err = bob.run(&["token", "issue", "--user", "admin@acme.io"]).failed();
    assert!(err.contains("org admin"), "{err}");
    admin.run(&["user", "add", "root@acme.io", "--org-role", "admin"]).ok();
    let scoped = admin.as_token(&admin.run(&["token", "issue", "--scope", "read-write"]).token());
    let err = scoped.run(&["token", "issue", "--user", "root@acme.io"]).failed();
    assert!(err.contains("org admin"), "{err}");
    let admin_only = admin.as_token(&admin.run(&["token", "issue", "--permission", "admin"]).token());
    let err = admin_only.run(&["token", "issue", "--user", "root@acme.io"]).failed();
    assert!(err.contains("hand on"), "{err}");
    admin.run(&["user", "suspend", "bob@acme.io"]).ok();
    let err = admin.run(&["token", "issue", "--user", "bob@acme.io"]).failed();
    assert!(err.contains("suspended"), "{err}");
    let err = admin.run(&["token", "issue", "--user", "nobody@acme.io"]).failed();
    assert!(err.contains("no user"), "{err}");
    let err = admin.run(&["token", "issue", "--user", "bob@acme.io", "--service", "x"]).failed();
    assert!(err.contains("cannot be used with"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_pasted_into_a_reason_name_or_attributes_is_never_kept() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;
    let ann = add_user(&admin, "ann@acme.io", "editor");
    let leaked = ann.run(&["token", "issue", "--display-name", "leaky"]).token();
    let id = leaked[..10].to_string();
    // Revoked in a hurry with the token in the reason: done, the reason kept with its id only.
    ann.run(&["token", "revoke", &id, "--reason", &format!("leaked {leaked} in a gist")]).ok();
    assert_eq!(ann.json(&["token", "get", &id])["revoke_reason"], format!("leaked {id}… in a gist"));
    let audit = admin.json(&["audit", "--token-id", &id]).to_string();
    assert!(audit.contains(&format!("leaked {id}…")) && !audit.contains(&leaked[10..]), "{audit}");

    // Kept as a display name, a service's name or an attribute: refused, with nothing made.
    let live = ann.run(&["token", "issue", "--display-name", "live"]).token();
    let attributes = serde_json::json!({ "note": format!("key {live}") }).to_string();
    let refused = [
        ann.run(&["token", "issue", "--display-name", &format!("copy of {live}")]).failed(),
        ann.run(&["service", "create", &live, "--org-role", "viewer"]).failed(),
        ann.run(&["service", "create", "svc", "--org-role", "viewer", "--attributes", &attributes]).failed(),
        admin
            .run(&["user", "add", "bo@acme.io", "--org-role", "viewer", "--attributes", &attributes])
            .failed(),
        admin.run(&["user", "add", &format!("{live}@acme.io"), "--org-role", "viewer"]).failed(),
    ];
    for err in &refused {
        assert!(err.contains("holds a credential") && !err.contains(&live[10..]), "{err}");
    }
    let listed = ann.run(&["token", "list"]).ok();
    assert_eq!(
        listed.lines().count(),
        3,
        "the header, ann's first token and live (leaky is revoked): {listed}"
    );
    assert!(admin.run(&["service", "list"]).ok().lines().count() <= 1, "no service made");
    // A name that merely starts like a token is a name.
    ann.run(&["token", "issue", "--display-name", "tgp_migration_helper"]).token();

    // The audit log asked about no token, or about a whole token by the API: refused, not an
    // empty answer (the CLI itself cuts a whole token to its id).
    let err = admin.run(&["audit", "--token-id", ""]).failed();
    assert!(err.contains("is not a token id"), "{err}");
    let url = format!("{}/v1/orgs/acme/audit?token_id={live}", w.gateway.admin_url());
    let resp = w.http.get(url).bearer_auth(&admin.token).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let body = resp.text().await.unwrap();
    assert!(body.contains("character id") && !body.contains(&live[10..]), "{body}");
    assert_eq!(admin.json(&["audit", "--token-id", &live]).as_array().map(Vec::len), Some(1), "by its id");
    // Pasted with a stray character after it, it is still cut to its id, never sent.
    let pasted = format!("{live}.");
    assert_eq!(
        admin.json(&["audit", "--token-id", &pasted]).as_array().map(Vec::len),
        Some(1),
        "a whole token and a dot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_or_dot_argument_is_refused_before_it_is_sent_as_another_path() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;
    let ann = add_user(&admin, "ann@acme.io", "editor");
    for args in [
        vec!["user", "show", ""],
        vec!["user", "suspend", "."],
        vec!["user", "remove", ".."],
        vec!["token", "get", ""],
        vec!["token", "revoke", "."],
        vec!["token", "rotate", "."],
    ] {
        let err = admin.run(&args).failed();
        let token_id = args[0] == "token" && err.contains("is not a token id");
        assert!(err.contains("names nothing") || token_id, "{args:?}: {err}");
    }
    // Nothing was done: ann and her token still work.
    assert_eq!(ann.json(&["token", "list"]).as_array().map(Vec::len), Some(1));
    // A --server with a path of its own is named as the likely mistake.
    let err = admin.run(&["--server", &format!("{}/v1", w.gateway.admin_url()), "token", "list"]).failed();
    assert!(err.contains("is --server (TOLLGATE_SERVER) the admin listener"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setting_a_role_already_held_changes_and_audits_nothing() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;
    add_user(&admin, "ann@acme.io", "viewer");
    admin.run(&["service", "create", "svc", "--org-role", "viewer"]).ok();
    let entries = |admin: &Cli| admin.json(&["audit"]).as_array().map(Vec::len).unwrap_or(0);
    let before = entries(&admin);
    admin.run(&["user", "set-role", "ann@acme.io", "--org-role", "viewer"]).ok();
    admin.run(&["service", "set-role", "svc", "--org-role", "viewer"]).ok();
    assert_eq!(entries(&admin), before, "no change, no entry");
    // A change is still a change.
    admin.run(&["user", "set-role", "ann@acme.io", "--org-role", "editor"]).ok();
    let audit = admin.json(&["audit"]);
    assert_eq!(audit.as_array().map(Vec::len), Some(before + 1));
    assert_eq!(audit[0]["action"], "user.set_role", "{audit}");
}

/// A call whose every body field is optional (an issue, a revocation by id, a rotation, a
/// suspension) may send no body, as a reactivation may; an admin cannot suspend, remove or demote
/// themself (`403`, as a service acting on itself); a service's token lists itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodyless_calls_self_refusals_and_a_service_listing_itself() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;
    let api = w.gateway.admin_url();
    let bare = |method: reqwest::Method, path: &str, token: &str| {
        w.http.request(method, format!("{api}{path}")).bearer_auth(token).send()
    };

    let issued = bare(reqwest::Method::POST, "/v1/tokens", &admin.token).await.unwrap();
    assert_eq!(issued.status(), 201);
    let issued: serde_json::Value = issued.json().await.unwrap();
    let token = issued["token"].as_str().expect("the new token").to_string();
    remember_secret(&token);
    let rotated = bare(reqwest::Method::POST, &format!("/v1/tokens/{}/rotate", &token[..10]), &admin.token);
    let rotated = rotated.await.unwrap();
    assert_eq!(rotated.status(), 201);
    let rotated: serde_json::Value = rotated.json().await.unwrap();
    let successor = rotated["token"].as_str().expect("the new token").to_string();
    remember_secret(&successor);
    let revoked =
        bare(reqwest::Method::POST, &format!("/v1/tokens/{}/revoke", &successor[..10]), &admin.token);
    assert_eq!(revoked.await.unwrap().status(), 200);
    assert_eq!(w.get(&w.gateway, "/shop", &successor).await.status(), 401);

    admin.run(&["user", "add", "bob@acme.io", "--org-role", "viewer"]).ok();
    let suspended = bare(reqwest::Method::POST, "/v1/orgs/acme/users/bob@acme.io/suspend", &admin.token);
    assert_eq!(suspended.await.unwrap().status(), 200);
    assert!(admin.run(&["user", "show", "bob@acme.io"]).ok().contains("suspended"));

    // Refused as forbidden, with the reason, and nothing changed.
    let user = "/v1/orgs/acme/users/admin@acme.io".to_string();
    for (method, path) in
        [(reqwest::Method::POST, format!("{user}/suspend")), (reqwest::Method::DELETE, user.clone())]
    {
        let resp = bare(method.clone(), &path, &admin.token).await.unwrap();
        assert_eq!(resp.status(), 403, "{method} {path}");
        let json: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(json["error"], "forbidden", "{method} {path}");
        assert!(json["error_description"].as_str().unwrap().contains("yourself"), "{json}");
    }
    let demote = w.http.post(format!("{api}{user}/role")).bearer_auth(&admin.token);
    let demote = demote.json(&json!({ "org_role": "viewer" })).send().await.unwrap();
    assert_eq!(demote.status(), 403);
    assert_eq!(admin.json(&["whoami"])["org_role"], "admin", "still an admin");

    // A service's token lists what it sees of its service's tokens: itself.
    let etl = admin.run(&["service", "create", "etl", "--org-role", "viewer"]).token();
    admin.run(&["token", "issue", "--service", "etl", "--display-name", "second"]).ok();
    let listed = admin.as_token(&etl).json(&["token", "list"]);
    let ids: Vec<&str> = listed.as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [&etl[..10]], "{listed}");
    assert_eq!(admin.json(&["token", "list", "--owner", "etl"]).as_array().unwrap().len(), 2);
    // An admin service's token sees every one of its service's tokens, as `token get` does.
    let ops = admin.run(&["service", "create", "ops", "--org-role", "admin"]).token();
    admin.run(&["token", "issue", "--service", "ops", "--display-name", "second"]).ok();
    assert_eq!(admin.as_token(&ops).json(&["token", "list"]).as_array().unwrap().len(), 2);
    // Minting takes no body either: the call is read and judged (this gateway signs nothing).
    let minted = bare(reqwest::Method::POST, "/v1/orgs/acme/projects/shop/credentials", &etl).await.unwrap();
    assert_eq!(minted.status(), 400);
    let minted: serde_json::Value = minted.json().await.unwrap();
    assert!(minted["error_description"].as_str().unwrap().contains("no `jwt` section"), "{minted}");
}

/// What the CLI's `--attributes` would change unnoticed (a key given twice, a number too large to
/// keep exactly) is refused there, as the admin API refuses it; a 64-bit id is kept exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attributes_are_kept_as_sent_or_refused() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;
    let twice = r#"{"t":"gold","t":"free"}"#;
    let err =
        admin.run(&["service", "create", "twice", "--org-role", "viewer", "--attributes", twice]).failed();
    assert!(err.contains("given twice"), "{err}");
    let big = r#"{"customer_id":123456789012345678901}"#;
    let err = admin.run(&["user", "add", "n@acme.io", "--org-role", "viewer", "--attributes", big]).failed();
    assert!(err.contains("beyond 64 bits"), "{err}");
    let listed = admin.run(&["service", "list"]).ok();
    assert!(!listed.contains("twice"), "nothing was made: {listed}");
    let api = format!("{}/v1/orgs/acme/services", w.gateway.admin_url());
    let body = r#"{"name":"big","org_role":"viewer","attributes":{"customer_id":123456789012345678903}}"#;
    let resp = w.http.post(api).bearer_auth(&admin.token).header("content-type", "application/json");
    let resp = resp.body(body).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let json: serde_json::Value = resp.json().await.unwrap();
    assert!(json["error_description"].as_str().unwrap().contains("beyond 64 bits"), "{json}");
    // A double as sent (a fraction, an exponent) is kept as one, and a name holding digits is text.
    let doubles = r#"{"avogadro":6.022e23,"ratio":0.5,"note":"123456789012345678901"}"#;
    admin.run(&["service", "create", "doubles", "--org-role", "viewer", "--attributes", doubles]).ok();

    let exact = r#"{"customer_id":12345678901234567890}"#;
    let token =
        admin.run(&["service", "create", "exact", "--org-role", "viewer", "--attributes", exact]).token();
    let echo = echoed(w.get(&w.gateway, "/shop", &token).await).await;
    assert_eq!(echo["headers"]["x-auth-attributes"][0], exact, "{echo}");
}

/// A new secret the CLI cannot write out is not lost without a word: a full disk under stdout
/// gets a failure naming the token made (to revoke), and no panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_that_cannot_be_shown_is_named_for_revoking() {
    let mut w = World::start().await;
    let admin = admin(&mut w, "acme").await;
    let full = |c: &mut std::process::Command| {
        c.stdout(std::fs::File::create("/dev/full").unwrap());
    };
    let out = admin.run_with(&["token", "issue", "--display-name", "to-a-full-disk"], full);
    assert!(!out.ok && !out.stderr.contains("panicked"), "{out:?}");
    assert!(out.stderr.contains("was made but its secret could not be shown"), "{out:?}");
    let listed = admin.json(&["token", "list"]);
    let made = listed.as_array().unwrap().iter().find(|t| t["display_name"] == "to-a-full-disk");
    let id = made.expect("the token was made")["id"].as_str().unwrap().to_string();
    assert!(out.stderr.contains(&format!("tollgate token revoke {id}")), "{out:?}");
    // A listing into a full disk fails with a reason, no panic either.
    let out = admin.run_with(&["token", "list"], full);
    assert!(!out.ok && out.stderr.contains("cannot write the answer to stdout"), "{out:?}");
    let out = admin.run_with(&["user", "add", "quiet@acme.io", "--org-role", "viewer"], full);
    assert!(!out.ok && out.stderr.starts_with("error: cannot write the answer to stdout"), "{out:?}");
}
