//! Running it like a product: metrics, logs without secrets.

use std::time::Duration;

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

    // A request is counted in its logging phase, which runs after the client has its answer.
    let last = r#"tollgate_requests_total{outcome="malformed",route="shop"}"#;
    let counted = eventually(Duration::from_secs(5), || async {
        sample(&scrape(&w).await, last) - sample(&before, last) >= 1.0
    })
    .await;
    assert!(counted, "the last request was never counted");
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
async fn a_cached_token_costs_the_store_nothing_and_its_last_use_is_written_later() {
    let mut w = World::start().await;
    // Last uses are written only at shutdown here, so that any store command during the requests
    // is the request path's.
    let port = free_port();
    let config = gateway_config(port, &w.redis.url(), w.upstream.port)
        .replace("last_use_flush: 200ms", "last_use_flush: 1h");
    let mut g = Gateway::start_with(port, &config);
    let user = w.user("acme", "hits@acme.io", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    let id = tollgate::token::parse(&token).unwrap().id;
    assert_eq!(w.get(&g, "/shop", &token).await.status(), 200, "cached from here on");

    w.redis.reset_stats();
    for _ in 0..100 {
        assert_eq!(w.get(&g, "/shop/x", &token).await.status(), 200);
    }
    let commands = w.redis.commands_run();
    assert!(commands.is_empty(), "100 cached requests sent the store {commands:?}");
    assert_eq!(w.store.last_use(&id).await.unwrap(), None, "nothing written yet");

    g.signal("TERM");
    assert!(g.wait_exit(Duration::from_secs(30)).is_some_and(|s| s.success()));
    let written = w.store.last_use(&id).await.unwrap().expect("the last use is written at shutdown");
    assert_eq!(written.ip, "127.0.0.1", "{written:?}");
}

/// Redis runs a change it has read even when the gateway stopped waiting for its answer: the
/// caller is told the change may have been made (a blind retry would issue a second token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_redis_answers_too_late_is_said_to_be_possibly_made() {
    // Last uses (admin calls note theirs) are written only at shutdown here: a flush held by the
    // pause would hold the shared connection's reads behind it, and the call would not get as far
    // as its commit.
    let w = World::start_with(|redis, upstream| {
        let port = free_port();
        let config = gateway_config(port, &redis.url(), upstream.port)
            .replace("last_use_flush: 200ms", "last_use_flush: 1h");
        Gateway::start_with(port, &config)
    })
    .await;
    let admin = w.bootstrap_admin("acme").await;
    admin.run(&["token", "list"]).ok();
    // Redis holds write commands (the change's script) past the store timeout (1 s), until told.
    let _: () =
        redis::cmd("CLIENT").arg("PAUSE").arg(60_000).arg("WRITE").query(&mut w.redis.client()).unwrap();
    let out = admin.run(&["token", "issue", "--display-name", "during-pause"]);
    let as_json = admin.run(&["--json", "token", "issue", "--display-name", "during-pause-json"]);
    // The answer carries a secret: no cache keeps it, as none keeps a 201's.
    let raw = w.http.post(format!("{}/v1/tokens", w.gateway.admin_url())).bearer_auth(&admin.token);
    let raw = raw.json(&serde_json::json!({ "display_name": "during-pause-raw" })).send().await.unwrap();
    assert_eq!(raw.status(), 503);
    assert_eq!(raw.headers().get("cache-control").map(|v| v.to_str().unwrap()), Some("no-store"));
    // Looked for before retrying, not retried at a `Retry-After` (which would make it twice).
    assert_eq!(raw.headers().get("retry-after"), None);
    remember_secret(raw.json::<serde_json::Value>().await.unwrap()["token"].as_str().expect("the token"));
    let _: () = redis::cmd("CLIENT").arg("UNPAUSE").query(&mut w.redis.client()).unwrap();
    // With --json, the kept token is JSON too.
    let kept_json: serde_json::Value = serde_json::from_str(&as_json.stdout).expect("JSON");
    let kept_json = kept_json["token"].as_str().expect("the token").to_string();
    remember_secret(&kept_json);
    assert!(!as_json.ok && as_json.stderr.contains(&kept_json[..10]), "{as_json:?}");
    // The new token comes with the answer: if the change was made, it is the caller's only copy.
    let kept = out.token();
    let err = out.failed();
    assert!(err.contains("may still have been made") && err.contains(&kept[..10]), "{err}");
    assert!(!err.contains(&kept), "the message names the id only: {err}");
    let landed = eventually(Duration::from_secs(15), || async {
        admin.run(&["token", "list"]).stdout.contains("during-pause")
    })
    .await;
    assert!(landed, "the change was made once the pause ended");
    assert_eq!(w.get(&w.gateway, "/shop", &kept).await.status(), 200, "and the kept token is it");
    assert!(!w.gateway.log_text().contains(&kept), "never logged");
}

/// A `redis-server` replicating the one on `port`, with its data directory (where it writes the
/// copy it is sent) a temporary one of its own.
fn replica_of(port: &str) -> (tollgate::testing::RedisServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut args: Vec<std::ffi::OsString> =
        ["--replicaof", "127.0.0.1", port, "--save", "", "--dir"].map(Into::into).into();
    args.push(dir.path().into());
    (tollgate::testing::RedisServer::start(args), dir)
}

/// With replicas, a change is acknowledged only once `store.redis.wait_replicas` of them have it,
/// so a failover to one loses no acknowledged revocation; short of them, the caller is told the
/// change may have been made. A gateway that waits for none, with a replica there, warns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_acknowledged_once_the_replicas_asked_for_have_it() {
    let w = World::start_with(|redis, upstream| {
        let port = free_port();
        let config = gateway_config(port, &redis.url(), upstream.port)
            .replace(r#"key_prefix: "t:" }"#, r#"key_prefix: "t:", wait_replicas: 1 }"#)
            .replace("last_use_flush: 200ms", "last_use_flush: 1h");
        Gateway::start_with(port, &config)
    })
    .await;
    let primary = w.redis.url();
    let port = primary.rsplit(':').next().unwrap().to_string();
    let (replica, _dir) = replica_of(&port);
    let synced = eventually(Duration::from_secs(30), || async {
        let info: String = redis::cmd("INFO").arg("replication").query(&mut replica.client()).unwrap();
        info.contains("master_link_status:up")
    });
    assert!(synced.await, "the replica never caught up");

    let admin = w.bootstrap_admin("acme").await;
    let token = admin.run(&["token", "issue", "--display-name", "replicated"]).token();
    assert_eq!(w.get(&w.gateway, "/shop", &token).await.status(), 200);
    // The replica stopped: the revocation reaches the primary, but not the replica asked for.
    replica.pause();
    let err = admin.run(&["token", "revoke", &token[..10]]).failed();
    replica.resume();
    assert!(err.contains("may still have been made"), "{err}");
    assert_eq!(w.get(&w.gateway, "/shop", &token).await.status(), 401, "made on the primary");
    // With it running again, a change is acknowledged.
    let other = admin.run(&["token", "issue", "--display-name", "after"]).token();
    admin.run(&["token", "revoke", &other[..10]]).ok();

    let plain = w.second_gateway();
    let log = plain.log_text();
    assert!(log.contains("1 replica(s)") && log.contains("wait_replicas"), "{log}");
}

/// A TCP forwarder on a port of its own to the Redis port in `target`, read per new connection:
/// an address that moves to another server, as a failover's DNS name or virtual IP does, while
/// connections made before it stay with the old one.
async fn moving_address(target: std::sync::Arc<std::sync::atomic::AtomicU16>) -> u16 {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let to = target.load(std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    port
}

/// A gateway whose Redis address moves (see [`moving_address`]): its world, and where the
/// address points.
async fn behind_a_moving_address() -> (World, std::sync::Arc<std::sync::atomic::AtomicU16>) {
    use std::sync::atomic::{AtomicU16, Ordering};
    let target = std::sync::Arc::new(AtomicU16::new(0));
    let w = World::start_with(|redis, upstream| {
        let primary = redis.url().rsplit(':').next().unwrap().parse().unwrap();
        target.store(primary, Ordering::SeqCst);
        let address = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(moving_address(target.clone()))
        });
        let port = free_port();
        let config = gateway_config(port, &format!("redis://127.0.0.1:{address}"), upstream.port)
            .replace("last_use_flush: 200ms", "last_use_flush: 1h");
        Gateway::start_with(port, &config)
    })
    .await;
    (w, target)
}

/// Another instance of `w`'s gateway, on the same (moving) Redis address.
fn another_instance(w: &World) -> Gateway {
    let port = free_port();
    let config = std::fs::read_to_string(&w.gateway.config_path).unwrap();
    let config = config.replace(&w.gateway.port.to_string(), &port.to_string());
    let config = config.replace(&w.gateway.admin_port.to_string(), &free_port().to_string());
    Gateway::start_with(port, &config)
}

/// The failover: a replica of `w`'s Redis is synced and promoted, the old primary follows it,
/// the address moves to it. The new primary, and the directory it keeps.
async fn fail_over(
    w: &World,
    target: &std::sync::atomic::AtomicU16,
) -> (tollgate::testing::RedisServer, tempfile::TempDir) {
    use std::sync::atomic::Ordering;
    let old = target.load(Ordering::SeqCst).to_string();
    let (new, dir) = replica_of(&old);
    let synced = |server: &tollgate::testing::RedisServer| {
        let info: String = redis::cmd("INFO").arg("replication").query(&mut server.client()).unwrap();
        info.contains("master_link_status:up")
    };
    assert!(eventually(Duration::from_secs(30), || async { synced(&new) }).await, "the replica never synced");
    let _: () = redis::cmd("REPLICAOF").arg("NO").arg("ONE").query(&mut new.client()).unwrap();
    let _: () = redis::cmd("REPLICAOF").arg("127.0.0.1").arg(new.port).query(&mut w.redis.client()).unwrap();
    target.store(new.port, Ordering::SeqCst);
    (new, dir)
}

/// A gateway behind a moving address and a second instance on it, which makes no change itself,
/// both caching a token of `admin`'s: the world, where the address points, the second instance,
/// the admin and the token.
async fn two_instances_caching_a_token(
) -> (World, std::sync::Arc<std::sync::atomic::AtomicU16>, Gateway, Cli, String) {
    let (w, target) = behind_a_moving_address().await;
    let second = another_instance(&w);
    let admin = w.bootstrap_admin("acme").await;
    let token = admin.run(&["token", "issue", "--display-name", "before"]).token();
    for g in [&w.gateway, &second] {
        assert_eq!(w.get(g, "/shop", &token).await.status(), 200, "cached on both");
    }
    (w, target, second, admin, token)
}

/// A failover that moves the store's address to the new primary while the old one, now a
/// replica, keeps its clients: the gateway's connection there refuses every change (READONLY),
/// so the gateway connects again, and a revocation lands on the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_after_a_failover_reaches_the_new_primary() {
    let (w, target, second, admin, token) = two_instances_caching_a_token().await;

    let (new, _dir) = fail_over(&w, &target).await;
    admin.run(&["token", "revoke", &token[..10], "--reason", "after the failover"]).ok();
    assert_eq!(w.get(&w.gateway, "/shop", &token).await.status(), 401);
    // The other instance hears it: from the new primary once its feed finds the old one a
    // replica, or, until then, from the old one, which replicates what the new one publishes.
    let refused = eventually(Duration::from_secs(5), || async {
        w.get(&second, "/shop", &token).await.status() == 401
    });
    assert!(refused.await, "the other instance still accepts the revoked token: {}", second.log_text());
    let revoked: Option<String> =
        redis::cmd("GET").arg(format!("t:token:{}", &token[..10])).query(&mut new.client()).unwrap();
    assert!(revoked.is_some_and(|r| r.contains("after the failover")), "the new primary has the revocation");
}

/// `argon2.max_concurrency` left out defaults to the CPUs the gateway could use at start: a reload
/// after it was given fewer (an affinity, a cgroup quota) is no change that waits for a restart,
/// which it would otherwise warn of on every reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_after_the_cpus_changed_warns_of_no_restart() {
    let w = World::start_with(|redis, upstream| {
        let port = free_port();
        let config = gateway_config(port, &redis.url(), upstream.port).replace(" max_concurrency: 2,", "");
        assert!(!config.contains("max_concurrency"), "{config}");
        Gateway::start_with(port, &config)
    })
    .await;
    // Pinned to the first CPU of those this process may use (on a machine of one, which changes
    // nothing, the check has nothing to look at).
    let taskset = |args: &[&str]| {
        let out = std::process::Command::new("taskset").args(args).output().expect("taskset (util-linux)");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let allowed = taskset(&["-c", "-p", &std::process::id().to_string()]);
    let first = allowed.rsplit(": ").next().unwrap().trim().split([',', '-']).next().unwrap().to_string();
    taskset(&["-a", "-p", "-c", &first, &w.gateway.pid().to_string()]);
    w.gateway.reload(|c| format!("{c}\n# reloaded once pinned to one CPU\n")).await;
    let log = w.gateway.log_text();
    assert!(!log.contains("applies only after a restart"), "{log}");
}

/// After a failover that left the old primary a replica cut off from the new one (it answers
/// `PING`s and reads, but hears nothing the new primary publishes), an instance subscribed there
/// that makes no change itself still hears a revocation made on the new primary: its feed sees
/// that its server is no longer a primary and subscribes anew, where the address now points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_left_on_a_demoted_primary_is_made_anew_at_the_new_one() {
    let (w, target, second, admin, token) = two_instances_caching_a_token().await;

    let (_new, _dir) = fail_over(&w, &target).await;
    // The old primary follows a server that is not there: a replica that hears nothing new.
    let nowhere = free_port();
    let _: () = redis::cmd("REPLICAOF").arg("127.0.0.1").arg(nowhere).query(&mut w.redis.client()).unwrap();
    admin.run(&["token", "revoke", &token[..10], "--reason", "after the failover"]).ok();
    assert_eq!(w.get(&w.gateway, "/shop", &token).await.status(), 401);
    let refused = eventually(Duration::from_secs(10), || async {
        w.get(&second, "/shop", &token).await.status() == 401
    });
    assert!(refused.await, "the other instance still accepts the revoked token: {}", second.log_text());
    let log = second.log_text();
    assert!(log.contains("is a replica now"), "{log}");
}

/// After a failover, an instance whose invalidation feed was lost (its server stalled) subscribes
/// again at the address, now the new primary, and reads from there too: a record read from the
/// old primary, which may lag the new one or no longer follow it, would be cached after its
/// invalidation and served until `cache.ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_reads_come_from_where_invalidations_come_from() {
    let (w, target) = behind_a_moving_address().await;
    let admin = w.bootstrap_admin("acme").await;
    let token = admin.run(&["token", "issue", "--display-name", "before"]).token();
    let cached = w.get(&w.gateway, "/shop", &token).await.status();
    assert_eq!(cached, 200, "cached, its connections on the old primary");

    // The failover; then the old primary stalls past the feed's heartbeat (`store.timeout`, 1 s
    // here), so the instance subscribes again, at the address that now names the new primary.
    let (_new, _dir) = fail_over(&w, &target).await;
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(3000).arg("ALL").query(&mut w.redis.client()).unwrap();
    // Past the pause, the old primary is cut off from the new one: it keeps what it had.
    let _: () = redis::cmd("REPLICAOF").arg("NO").arg("ONE").query(&mut w.redis.client()).unwrap();

    // Revoked through an instance started after the failover (its every connection on the new
    // primary): the first instance hears it from there, and must read the record from there.
    let third = another_instance(&w);
    let by_third = Cli { server: third.admin_url(), token: admin.token.clone() };
    by_third.run(&["token", "revoke", &token[..10], "--reason", "after the failover"]).ok();
    let refused = eventually(Duration::from_secs(10), || async {
        w.get(&w.gateway, "/shop", &token).await.status() == 401
    });
    assert!(refused.await, "the first instance still accepts the revoked token: {}", w.gateway.log_text());
}

/// A full disk under the embedded store: changes are refused (503, never a crash), and since
/// redb refuses every later write until the file is opened anew, `/readyz` says not ready (for an
/// orchestrator to restart the gateway), where a read answered from memory said ready. The disk
/// is a small tmpfs in a mount namespace of the gateway's own (`unshare`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_store_on_a_full_disk_says_it_is_not_ready() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let token_file = dir.path().join("token");
    let port = free_port();
    let config = gateway_config(port, "redis://unused", upstream.port).replace(
        r#"redis: { url: "redis://unused", key_prefix: "t:" }"#,
        &format!(r#"embedded: {{ path: "{}/store.redb" }}"#, disk.display()),
    );
    // Mounted, the first admin made, the disk filled but for 64 KiB, then the gateway.
    let script = r#"mount -t tmpfs -o size=4m tmpfs "$1" \
        && "$2" bootstrap --config "$3" --org acme --email admin@acme.io > "$4" \
        && dd if=/dev/zero of="$1/slack" bs=64k count=1 2>/dev/null \
        && { dd if=/dev/zero of="$1/filler" bs=4k 2>/dev/null; rm "$1/slack"; } \
        && exec "$2" serve --config "$3""#;
    let g = Gateway::start_by(port, &config, |config_path| {
        let mut cmd = std::process::Command::new("unshare");
        cmd.args(["-rm", "sh", "-c", script, "sh"])
            .arg(&disk)
            .arg(tollgate_bin())
            .arg(config_path)
            .arg(&token_file);
        cmd
    });
    let printed = std::fs::read_to_string(&token_file).unwrap();
    let token = printed.lines().find_map(|l| l.strip_prefix("Access token: ")).expect("a token").to_string();
    remember_secret(&token);
    let http = reqwest::Client::new();
    let ready = || async { http.get(format!("{}/readyz", g.admin_url())).send().await.unwrap().status() };
    assert_eq!(ready().await, 200);
    assert_eq!(http.get(format!("{}/healthz", g.admin_url())).send().await.unwrap().status(), 200);

    // Changes (users with 4 KiB of attributes each) until the disk is full: the one refused
    // answers 503, and the gateway keeps running.
    let mut refused = None;
    for i in 0..2000 {
        let user = serde_json::json!({
            "email": format!("u{i}@acme.io"), "org_role": "viewer", "attributes": { "blob": "x".repeat(4000) }
        });
        let resp = http
            .post(format!("{}/v1/orgs/acme/users", g.admin_url()))
            .bearer_auth(&token)
            .json(&user)
            .send()
            .await
            .unwrap();
        if !resp.status().is_success() {
            refused = Some((resp.status(), resp.text().await.unwrap()));
            break;
        }
    }
    let (status, body) = refused.expect("the disk never filled");
    assert_eq!(status, 503, "{body}");
    assert_eq!(ready().await, 503, "{}", g.log_text());
    // Liveness says so too: only a restart mends it, and an orchestrator restarts on liveness.
    let live = http.get(format!("{}/healthz", g.admin_url())).send().await.unwrap();
    assert_eq!(live.status(), 503);
    assert!(live.text().await.unwrap().contains("restarts"));
    assert!(g.log_text().contains("restart the gateway"), "{}", g.log_text());
    assert!(!g.log_text().contains(&token), "never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_the_client_never_reads_is_counted_as_a_refusal() {
    use tokio::io::AsyncWriteExt;
    let w = World::start().await;
    let before = scrape(&w).await;
    // An unknown token needs the store, which hangs: the 503 comes after the store timeout
    // (1 s), by when the client has reset the connection, so writing it fails.
    w.redis.pause();
    let token = tollgate::token::generate(tollgate::token::TokenKind::Pat).token;
    let mut client = tokio::net::TcpStream::connect(w.gateway.addr()).await.unwrap();
    let request = format!("GET /shop HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
    client.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.set_zero_linger().unwrap();
    drop(client);

    let refused = r#"tollgate_requests_total{outcome="store_unavailable",route="shop"}"#;
    let allowed = r#"tollgate_requests_total{outcome="allowed",route="shop"}"#;
    let counted = eventually(Duration::from_secs(5), || async {
        let now = scrape(&w).await;
        sample(&now, refused) - sample(&before, refused) >= 1.0
            || sample(&now, allowed) > sample(&before, allowed)
    })
    .await;
    w.redis.resume();
    assert!(counted, "the request was never counted");
    let after = scrape(&w).await;
    assert_eq!(sample(&after, allowed), sample(&before, allowed), "{after}");
    assert_eq!(sample(&after, refused) - sample(&before, refused), 1.0, "{after}");
    let logged = eventually(Duration::from_secs(5), || async {
        w.gateway
            .log_text()
            .lines()
            .any(|l| l.contains("tollgate::access") && l.contains("store_unavailable"))
    });
    assert!(logged.await, "{}", w.gateway.log_text());
    assert!(!w.gateway.log_text().lines().any(|l| l.contains("tollgate::access") && l.contains("allowed")));
    // Nor is it a failure of proxying (it was never let through): no 5xx counted, none logged.
    let failures = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("tollgate_proxy_failures_total{"))
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(failures(&after), failures(&before), "{after}");
    assert!(!w.gateway.log_text().contains("proxying failed"), "{}", w.gateway.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_holds_a_token_not_even_from_the_query_or_pingoras_errors() {
    let mut w = World::start().await;
    let user = w.user("acme", "l@acme.io", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    // A query token to a dead upstream: Pingora logs the failure with its request summary.
    let resp = w.http.get(w.gateway.url(&format!("/dead/x?access_token={token}&a=1"))).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    // In the gateway's JSON, with the request id, like its refusals.
    let id = resp.headers().get("x-request-id").expect("a request id").to_str().unwrap().to_string();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "bad_gateway", "{body}");
    assert_eq!(body["request_id"], id.as_str(), "{body}");
    assert_eq!(w.get(&w.gateway, "/shop", &token).await.status(), 200);
    let log = w.gateway.log_text();
    assert!(log.contains("tollgate::access"), "one access line per request: {log}");
    assert!(log.contains(&token[..10]), "the access line names the token id");
    assert!(log.contains("proxying failed") && log.contains("/dead/x"), "the failure's own line: {log}");
    // A token sent as the Host (to a route for any host) is cut to its id in that line too.
    let resp = w.http.get(w.gateway.url("/dead/y")).header("host", &token).bearer_auth(&token);
    let resp = resp.send().await.unwrap();
    assert_eq!(resp.status(), 502);
    let cut = eventually(Duration::from_secs(5), || async {
        let log = w.gateway.log_text();
        log.lines().any(|l| l.contains("proxying failed") && l.contains(&format!("Host: {}", &token[..10])))
    });
    assert!(cut.await, "{}", w.gateway.log_text());
    // A refused token's access line names its id too (who still uses a revoked token).
    w.store.revoke_token(&tollgate::token::parse(&token).unwrap().id, None, None).await.unwrap();
    let refused = eventually(Duration::from_secs(5), || async {
        w.get(&w.gateway, "/shop", &token).await.status() == 401
    });
    assert!(refused.await);
    let named = eventually(Duration::from_secs(5), || async {
        w.gateway.log_text().lines().any(|l| {
            l.contains("tollgate::access") && l.contains("outcome=\"revoked\"") && l.contains(&token[..10])
        })
    });
    assert!(named.await, "{}", w.gateway.log_text());
    // A token sent as the method (`curl -X "$TOKEN"`) is logged by its id, on both listeners.
    let as_method = reqwest::Method::from_bytes(token.as_bytes()).unwrap();
    let proxied = w.http.request(as_method.clone(), w.gateway.url("/shop")).send().await.unwrap();
    assert!(proxied.status().is_client_error(), "{proxied:?}");
    let admin = format!("{}/v1/whoami", w.gateway.admin_url());
    let admin = w.http.request(as_method, admin).send().await.unwrap();
    assert!(admin.status().is_client_error(), "{admin:?}");
    let by_id = format!("method={}", &token[..10]);
    let both = eventually(Duration::from_secs(5), || async {
        let log = w.gateway.log_text();
        ["tollgate::access", "tollgate::admin_access"]
            .iter()
            .all(|target| log.lines().any(|l| l.contains(target) && l.contains(&by_id)))
    });
    assert!(both.await, "{}", w.gateway.log_text());
    assert!(!w.gateway.log_text().contains(&token), "never the token");
    // World's drop scans the whole log for every issued token.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_drop_nothing_add_routes_and_refuse_invalid_configs() {
    let mut w = World::start().await;
    let user = w.user("acme", "r@acme.io", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    let original = std::fs::read_to_string(&w.gateway.config_path).unwrap();

    // Steady load on an existing route for the whole test (bounded in count and time).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (http, url, token, stop) = (w.http.clone(), w.gateway.url("/shop"), token.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && ok < 20_000
                && std::time::Instant::now() < deadline
            {
                match http.get(&url).bearer_auth(&token).send().await {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => failed.push(r.status().to_string()),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        })
    };

    let added = original.replace(
        "  - { name: public,",
        &format!("  - {{ name: added, path: /added, upstream: \"127.0.0.1:{}\", auth: none }}\n  - {{ name: public,", w.upstream.port),
    );
    std::fs::write(&w.gateway.config_path, &added).unwrap();
    w.gateway.signal("HUP");
    let added_answers = eventually(std::time::Duration::from_secs(5), || async {
        w.http.get(w.gateway.url("/added/x")).send().await.map(|r| r.status() == 200).unwrap_or(false)
    });
    assert!(added_answers.await, "a route added by reload answers");

    // An invalid file (picked up by the file watch, no signal) changes nothing and says why: not
    // even its valid part, which would drop the added route again.
    std::fs::write(&w.gateway.config_path, format!("{original}\nbogus_key: 1\n")).unwrap();
    let refused = eventually(std::time::Duration::from_secs(5), || async {
        w.gateway.log_text().contains("config reload refused")
    });
    assert!(refused.await, "{}", w.gateway.log_text());
    // Readable as check-config prints it, not as a debug dump of a list.
    assert!(w.gateway.log_text().contains("errors=bogus_key: unknown field"), "{}", w.gateway.log_text());
    assert_eq!(w.http.get(w.gateway.url("/added/x")).send().await.unwrap().status(), 200);

    // An emptied file (as an editor leaves it before writing, or by mistake) is a valid config
    // with no routes, but never applied by a reload: every route keeps answering.
    let empty = "config reload refused: the file sets nothing";
    std::fs::write(&w.gateway.config_path, "").unwrap();
    let refused = eventually(std::time::Duration::from_secs(5), || async {
        w.gateway.log_text().matches(empty).count() == 1
    });
    assert!(refused.await, "{}", w.gateway.log_text());
    assert_eq!(w.http.get(w.gateway.url("/added/x")).send().await.unwrap().status(), 200);
    // So is one with only comments, which would parse as the same empty config.
    std::fs::write(&w.gateway.config_path, "# being written\n\n").unwrap();
    let refused = eventually(std::time::Duration::from_secs(5), || async {
        w.gateway.log_text().matches(empty).count() == 2
    });
    assert!(refused.await, "{}", w.gateway.log_text());
    assert_eq!(w.http.get(w.gateway.url("/added/x")).send().await.unwrap().status(), 200);
    // So is one whose routes have not come yet: everything up to `routes:`, as a file being
    // written stands for a moment.
    let cut = &added[..added.find("routes:").unwrap() + "routes:\n".len()];
    std::fs::write(&w.gateway.config_path, cut).unwrap();
    let refused = eventually(std::time::Duration::from_secs(5), || async {
        w.gateway.log_text().contains("config reload refused: `routes:` holds nothing")
    });
    assert!(refused.await, "{}", w.gateway.log_text());
    assert_eq!(w.http.get(w.gateway.url("/added/x")).send().await.unwrap().status(), 200);

    // A setting that applies only after a restart is applied with the rest, and the log says so.
    let resized = added.replace("cache: { capacity: 1000,", "cache: { capacity: 2000,");
    assert_ne!(resized, added);
    std::fs::write(&w.gateway.config_path, &resized).unwrap();
    let told = eventually(std::time::Duration::from_secs(5), || async {
        w.gateway.log_text().contains("applies only after a restart")
    });
    assert!(told.await, "{}", w.gateway.log_text());
    assert!(w.gateway.log_text().contains("field=\"cache\""), "{}", w.gateway.log_text());

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(ok > 0);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across reloads: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_gracefully_within_the_configured_bounds() {
    let mut w = World::start().await;
    let config = std::fs::read_to_string(&w.gateway.config_path).unwrap();
    let port = free_port();
    let config = config
        .replace(&format!("listen: 127.0.0.1:{}", w.gateway.port), &format!("listen: 127.0.0.1:{port}"))
        .replace("threads: 2", "threads: 2\nshutdown: { grace: 1s, timeout: 2s }")
        .replace(
            &format!("127.0.0.1:{}\", last_use_flush", w.gateway.admin_port),
            &format!("127.0.0.1:{}\", last_use_flush", free_port()),
        );
    // A route whose upstream answers only after 120 s, and may be waited on that long.
    let slow = RawUpstream::start_slow(Duration::from_secs(120));
    let config = config
        + &format!(
            "  - {{ name: slow, path: /slow, upstream: \"127.0.0.1:{}\", org: acme, project: shop, \
             environment: production, upstream_timeouts: {{ read: 300s }} }}\n",
            slow.port
        );
    let mut g = Gateway::start_with(port, &config);
    let user = w.user("acme", "s@acme.io", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    assert_eq!(w.get(&g, "/shop", &token).await.status(), 200);
    // A request still running at SIGTERM: the shutdown timeout ends it, not the upstream.
    let held = tokio::spawn({
        let (http, url, token) = (reqwest::Client::new(), g.url("/slow/x"), token.clone());
        async move { http.get(url).bearer_auth(token).send().await.map(|r| r.status().as_u16()) }
    });
    assert!(
        eventually(Duration::from_secs(10), || async { !slow.heads().is_empty() }).await,
        "it reached the upstream"
    );
    g.signal("TERM");
    // Grace (1 s) plus the shutdown timeout (2 s), with room for a loaded machine; far before
    // the upstream would answer.
    let status = g.wait_exit(std::time::Duration::from_secs(30)).expect("the gateway exits after SIGTERM");
    assert!(status.success(), "{status}");
    let cut =
        tokio::time::timeout(Duration::from_secs(10), held).await.expect("the held request ended").unwrap();
    assert_ne!(cut.ok(), Some(200), "the held request was cut off, not answered by the upstream");
    w.gateway.signal("TERM");
    assert!(w.gateway.wait_exit(std::time::Duration::from_secs(30)).is_some());
}

/// A `SIGTERM` while the gateway is still starting (here: waiting for a store that does not
/// answer) is a graceful shutdown once it serves, never lost (a container's first process would
/// ignore it) nor the end of the process by the default action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_during_start_up_is_a_graceful_shutdown_once_serving() {
    let w = World::start().await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("tollgate.yaml");
    // The start-up's store check waits for its timeout on a stopped Redis: long enough that the
    // window lasts until the test resumes it.
    let config = gateway_config(port, &w.redis.url(), w.upstream.port).replace("timeout: 1s", "timeout: 20s");
    std::fs::write(&config_path, config).unwrap();
    let log = dir.path().join("tollgate.log");
    w.redis.pause();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("serve")
        .arg("--config")
        .arg(&config_path)
        .env_remove("RUST_LOG")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Caught while the proxy is not yet listening: in the start-up, before the shutdown watch.
    // The kernel shows a handler for SIGQUIT (signal 3), which is registered after SIGTERM's
    // (a handler is installed a moment before its action is added).
    let caught = |pid: u32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let mask = status.lines().find_map(|l| l.strip_prefix("SigCgt:")).map(str::trim).unwrap_or("0");
        u64::from_str_radix(mask, 16).is_ok_and(|m| m & (1 << 2) != 0)
    };
    let starting = eventually(Duration::from_secs(10), || async {
        caught(child.id()) && std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
    });
    let starting = starting.await;
    let sent = std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    w.redis.resume();
    assert!(starting, "SIGTERM is caught during start-up");
    assert!(sent.is_ok_and(|s| s.success()));
    let Some(status) = exit_within(&mut child, Duration::from_secs(30)) else {
        let _ = child.kill();
        let text = std::fs::read_to_string(&log).unwrap().replace('\n', " | ");
        panic!("the SIGTERM during start-up was lost: {text}");
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}: {text}");
    assert!(text.contains("shutting down"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_request_in_flight_finish() {
    let mut w = World::start().await;
    // It answers after the gateway has stopped accepting (shutdown.grace, 2 s, after SIGTERM).
    let slow = RawUpstream::start_slow(Duration::from_millis(3000));
    let port = free_port();
    let config = gateway_config(port, &w.redis.url(), slow.port)
        .replace("threads: 2", "threads: 2\nshutdown: { grace: 2s, timeout: 10s }");
    let mut g = Gateway::start_with(port, &config);
    let user = w.user("acme", "f@acme.io", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;

    let in_flight = {
        let (http, url, token) = (w.http.clone(), g.url("/shop/slow"), token.clone());
        tokio::spawn(async move { http.get(url).bearer_auth(token).send().await })
    };
    // The request has reached the upstream, which answers 3 s later; stop the gateway now.
    assert!(eventually(Duration::from_secs(10), || async { !slow.heads().is_empty() }).await);
    g.signal("TERM");
    // While it still accepts (shutdown.grace), it tells load balancers to take it out.
    let readyz = format!("{}/readyz", g.admin_url());
    let stopping = eventually(Duration::from_secs(2), || async {
        w.http.get(&readyz).send().await.is_ok_and(|r| r.status() == 503)
    });
    assert!(stopping.await, "/readyz says 503 once a shutdown has begun");
    let resp = in_flight.await.unwrap().expect("the request in flight gets its answer");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "ok");
    let status = g.wait_exit(Duration::from_secs(30)).expect("then the gateway exits");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_silent_past_its_read_timeout_gets_a_504_and_a_route_may_wait_longer() {
    let mut w = World::start().await;
    // It answers each request 1.5 s after its head.
    let slow = RawUpstream::start_slow(Duration::from_millis(1500));
    // One that never answers within the test: only a timeout ends a request to it.
    let mute = RawUpstream::start_slow(Duration::from_secs(3600));
    let port = free_port();
    let patient = format!(
        "  - {{ name: patient, path: /patient, upstream: \"127.0.0.1:{}\", org: acme, project: shop, \
         environment: production, upstream_timeouts: {{ read: 30s }} }}\n  - {{ name: mute, path: /mute, \
         upstream: \"127.0.0.1:{}\", org: acme, project: shop, environment: production }}\n",
        slow.port, mute.port
    );
    let config = gateway_config(port, &w.redis.url(), slow.port)
        .replace("threads: 2", "threads: 2\nupstream_timeouts: { read: 300ms }")
        + &patient;
    let g = Gateway::start_with(port, &config);
    let user = w.user("acme", "t@acme.io", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;

    let resp = w.http.get(g.url("/mute/slow")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status(), 504);
    assert!(resp.headers().get("www-authenticate").is_none(), "the token was accepted");
    let id = resp.headers().get("x-request-id").expect("a request id").to_str().unwrap().to_string();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "gateway_timeout", "{body}");
    assert_eq!(body["request_id"], id.as_str(), "{body}");
    assert!(!mute.heads().is_empty(), "the request reached the upstream before the gateway gave up");
    // Counted as allowed (it was), and as a proxy failure an operator can alert on.
    let failures = r#"tollgate_proxy_failures_total{route="mute",status="504"}"#;
    let allowed = r#"tollgate_requests_total{outcome="allowed",route="mute"}"#;
    let metrics = format!("{}/metrics", g.admin_url());
    let counted = eventually(Duration::from_secs(5), || async {
        let now = w.http.get(&metrics).send().await.unwrap().text().await.unwrap();
        sample(&now, failures) == 1.0 && sample(&now, allowed) == 1.0
    });
    assert!(counted.await, "the 504 is counted as a proxy failure");

    // An upstream waiting for the rest of a body the client stopped sending is not silent: the
    // client is told it stopped (408), and no 504 is counted against the upstream.
    stalled_body_gets_a_408(g.addr(), "GET /mute/upload", &token).await;
    let now = w.http.get(&metrics).send().await.unwrap().text().await.unwrap();
    assert_eq!(sample(&now, failures), 1.0, "{now}");

    // The route's own bound replaces the file's: the same upstream's answer arrives.
    let resp = w.http.get(g.url("/patient/slow")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "ok");
    let logged = eventually(Duration::from_secs(5), || async {
        g.log_text().lines().any(|l| l.contains("tollgate::access") && l.contains("status=504"))
    });
    assert!(logged.await, "{}", g.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_warns_when_redis_could_lose_a_revocation() {
    let w = World::start().await;
    assert!(!w.gateway.log_text().contains("not durable"), "AOF with appendfsync always is durable");
    w.redis.config_set("appendfsync", "everysec");
    let second = w.second_gateway();
    let log = second.log_text();
    assert!(log.contains("store is not durable") && log.contains("appendfsync everysec"), "{log}");
    drop(second);

    // Durable on paper, but not while the AOF is rewritten; and keys that may be evicted.
    for (name, value) in
        [("appendfsync", "always"), ("no-appendfsync-on-rewrite", "yes"), ("maxmemory-policy", "allkeys-lru")]
    {
        w.redis.config_set(name, value);
    }
    let third = w.second_gateway();
    let log = third.log_text();
    assert!(!log.contains("appendfsync everysec"), "{log}");
    assert!(
        log.contains("no-appendfsync-on-rewrite yes") && log.contains("maxmemory-policy allkeys-lru"),
        "{log}"
    );
}

/// Whether the peer closes `stream` within `within` (whatever it sends first is kept in `sent`).
fn closed_within(stream: &mut std::net::TcpStream, within: Duration, sent: &mut Vec<u8>) -> bool {
    use std::io::Read;
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => sent.extend_from_slice(&buf[..n]),
            // A reset is a close too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// `Connection: close` in a second `Connection` line counts (RFC 9110: the lines are one list):
/// the answer says close and the connection is closed, not kept for the keep-alive timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_in_any_connection_line_closes_the_connection() {
    let w = World::start().await;
    let addr = w.gateway.addr();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        for (version, lines) in [
            ("1.1", "Connection: bar\r\nConnection: close"),
            ("1.0", "Connection: keep-alive\r\nConnection: close"),
        ] {
            let mut conn = std::net::TcpStream::connect(addr).unwrap();
            let request = format!("GET /public/x HTTP/{version}\r\nHost: x\r\n{lines}\r\n\r\n");
            conn.write_all(request.as_bytes()).unwrap();
            let mut sent = Vec::new();
            // Closed well before the keep-alive timeout (60 s), after the whole answer.
            assert!(closed_within(&mut conn, Duration::from_secs(20), &mut sent), "{version}: kept open");
            let answer = String::from_utf8_lossy(&sent).to_ascii_lowercase();
            assert!(answer.starts_with("http/1.1 200") && answer.contains("connection: close"), "{answer}");
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_are_closed_on_both_listeners() {
    use std::io::Write;
    use std::net::TcpStream;
    let port = free_port();
    let w = World::start_with(|redis, upstream| {
        let config = gateway_config(port, &redis.url(), upstream.port)
            .replace("threads: 2", "threads: 2\nkeepalive_timeout: 1s")
            .replace("last_use_flush: 200ms", "last_use_flush: 200ms, read_timeout: 1s");
        Gateway::start_with(port, &config)
    })
    .await;
    let g = &w.gateway;
    let admin = std::net::SocketAddr::from((
        [127, 0, 0, 1],
        g.admin_url().rsplit(':').next().unwrap().parse().unwrap(),
    ));
    // Pingora's own default keeps an idle client connection forever; nginx closes it after 75 s.
    let mut proxy = TcpStream::connect(g.addr()).unwrap();
    proxy.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    proxy.write_all(b"GET /public/a HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(read_one_response(&mut proxy).starts_with("HTTP/1.1 200"));
    // Kept alive: a second request on it is served.
    proxy.write_all(b"GET /public/b HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(read_one_response(&mut proxy).starts_with("HTTP/1.1 200"));
    let mut rest = Vec::new();
    assert!(closed_within(&mut proxy, Duration::from_secs(6), &mut rest), "idle past keepalive_timeout");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));

    // The admin API: an idle connection, half a head, and a body that stops coming.
    let mut idle = TcpStream::connect(admin).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(read_one_response(&mut idle).starts_with("HTTP/1.1 200"));
    let mut rest = Vec::new();
    assert!(closed_within(&mut idle, Duration::from_secs(6), &mut rest), "idle past admin.read_timeout");

    let mut half_head = TcpStream::connect(admin).unwrap();
    half_head.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut sent = Vec::new();
    assert!(closed_within(&mut half_head, Duration::from_secs(6), &mut sent), "half a head is cut off");

    let mut half_body = TcpStream::connect(admin).unwrap();
    half_body
        .write_all(b"POST /v1/tokens HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"disp")
        .unwrap();
    let mut sent = Vec::new();
    assert!(closed_within(&mut half_body, Duration::from_secs(6), &mut sent), "a stalled body is cut off");
    let sent = String::from_utf8_lossy(&sent);
    assert!(sent.starts_with("HTTP/1.1 408"), "{sent}");
    assert!(
        sent.contains("\"error\":\"invalid_request\"") && sent.contains("did not arrive within 1s"),
        "{sent}"
    );

    // Requests sent whole are still served, bodies included.
    let resp = w
        .http
        .post(format!("{}/v1/tokens", g.admin_url()))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "read, then refused for want of a token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_holds_a_secret_whatever_rust_log_says_nor_from_a_path_or_an_upstreams_bad_head() {
    let mut w = World::start().await;
    // An upstream whose head Pingora cannot parse (a space in a header name), a cookie before it.
    let broken = RawUpstream::start_answering(
        b"HTTP/1.1 200 OK\r\nSet-Cookie: session=UPSTREAM-SECRET-7f3a\r\nBad Name: x\r\nContent-Length: 2\r\n\r\nok",
    );
    let port = free_port();
    let config = gateway_config(port, &w.redis.url(), w.upstream.port)
        + &format!(
            "  - {{ name: broken, path: /broken, upstream: \"127.0.0.1:{}\", auth: none }}\n",
            broken.port
        );
    // A more specific RUST_LOG directive used to override the cap on Pingora's debug lines, which
    // quote the upstream request head (a public route gets the client's Authorization as sent).
    let rust_log = "debug,pingora_proxy::proxy_h1=debug,pingora_core=trace";
    let g = Gateway::start_with_env(port, &config, &[("RUST_LOG", rust_log)]);
    let user = w.user("acme", "logs@acme.io", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    let resp = w.http.get(g.url("/public/x")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    // A token pasted into the path, by mistake: logged as its id.
    assert_eq!(w.get(&g, &format!("/shop/{token}"), &token).await.status(), 200);
    assert_eq!(w.get(&g, &format!("/dead/{token}"), &token).await.status(), 502);
    assert_eq!(w.http.get(g.url("/broken/x")).send().await.unwrap().status(), 502);
    let lines = eventually(Duration::from_secs(5), || async {
        g.log_text().lines().filter(|l| l.contains("tollgate::access")).count() >= 4
    });
    assert!(lines.await, "{}", g.log_text());
    let log = g.log_text();
    assert_no_secret_in(&log, "the log");
    assert!(!log.contains("UPSTREAM-SECRET-7f3a"), "an upstream's cookie: {log}");
    assert!(log.contains(&format!("/shop/{}…", &token[..10])), "{log}");
    assert!(log.contains("proxying failed") && log.contains("ConnectRefused"), "the failure, named: {log}");
    // (Before, `pingora_core=trace` let its debug lines through: a socket's buffers, connection reuse.)
    assert!(
        !log.lines().any(|l| (l.contains(" DEBUG ") || l.contains(" TRACE ")) && l.contains("pingora")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigterm_answers_close_the_connection_so_no_next_request_is_reset() {
    use std::io::Write;
    let w = World::start().await;
    let port = free_port();
    let config = gateway_config(port, &w.redis.url(), w.upstream.port)
        .replace("threads: 2", "threads: 2\nshutdown: { grace: 3s, timeout: 5s }");
    let mut g = Gateway::start_with(port, &config);
    let mut conn = std::net::TcpStream::connect(g.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    conn.write_all(b"GET /public/a HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let first = read_one_response(&mut conn);
    assert!(first.to_ascii_lowercase().contains("connection: keep-alive"), "{first}");
    g.signal("TERM");
    let stopping = eventually(Duration::from_secs(5), || async { g.log_text().contains("shutting down") });
    assert!(stopping.await, "{}", g.log_text());
    // Still accepting (the grace), and this connection still served: but not kept, since the
    // listener is about to go and a next request on it would meet a reset.
    conn.write_all(b"GET /public/b HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let second = read_one_response(&mut conn);
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert!(second.to_ascii_lowercase().contains("connection: close"), "{second}");
    let mut rest = Vec::new();
    assert!(closed_within(&mut conn, Duration::from_secs(5), &mut rest), "closed after the answer");
    assert!(g.wait_exit(Duration::from_secs(30)).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_probes_open_at_most_a_store_connection_a_half_second() {
    // `/readyz` needs no token; a connection per probe left a socket in TIME-WAIT each.
    let w = World::start().await;
    let received = || {
        let info: String = redis::cmd("INFO").arg("stats").query(&mut w.redis.client()).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap()
    };
    let readyz = format!("{}/readyz", w.gateway.admin_url());
    let before = received();
    let started = std::time::Instant::now();
    for _ in 0..40 {
        assert_eq!(w.http.get(&readyz).send().await.unwrap().status(), 200);
    }
    // At most one a half second, whatever the rate (and `received()` is a connection of its own).
    let allowed = 2 * started.elapsed().as_secs() + 2 + 1;
    let opened = received() - before;
    assert!(opened <= allowed, "{opened} connections for 40 probes in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_are_counted_and_logged_by_route_template_never_by_path() {
    // Someone trying tokens against the admin API left no trace but the 401s they got.
    let mut w = World::start().await;
    let user = w.user("acme", "who@acme.io", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    let forged = tollgate::token::generate(tollgate::token::TokenKind::Pat).token;
    let admin = w.gateway.admin_url();
    for _ in 0..3 {
        let resp = w.http.get(format!("{admin}/v1/tokens")).bearer_auth(&forged).send().await.unwrap();
        assert_eq!(resp.status(), 401);
    }
    let resp = w
        .http
        .get(format!("{admin}/v1/orgs/acme/users/who@acme.io"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "a user sees themselves");
    let metrics = scrape(&w).await;
    assert_eq!(
        sample(&metrics, r#"tollgate_admin_requests_total{route="/v1/tokens",status="401"}"#),
        3.0,
        "{metrics}"
    );
    let user_route = r#"tollgate_admin_requests_total{route="/v1/orgs/{org}/users/{email}",status="200"}"#;
    assert_eq!(sample(&metrics, user_route), 1.0, "{metrics}");
    let logged = eventually(Duration::from_secs(5), || async {
        w.gateway
            .log_text()
            .lines()
            .filter(|l| l.contains("tollgate::admin_access") && l.contains("status=401"))
            .count()
            == 3
    });
    assert!(logged.await, "{}", w.gateway.log_text());
    assert!(!w.gateway.log_text().contains("who@acme.io"), "no email from a path: {}", w.gateway.log_text());
}

/// `identity.headers` picks which identity headers are sent; the others are not, and a client's
/// own in the namespace are still removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_configured_identity_headers_are_sent() {
    let mut w = World::start().await;
    let port = free_port();
    let config =
        gateway_config(port, &w.redis.url(), w.upstream.port) + "identity: { headers: [subject, attr] }\n";
    let g = Gateway::start_with(port, &config);
    let user = w.user("acme", "subset@acme.io", Role::Viewer, serde_json::json!({"tier": "gold"})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    let resp = w.http.get(g.url("/shop")).bearer_auth(&token).header("X-Auth-Role", "admin").send().await;
    let echo = echoed(resp.unwrap()).await;
    let mut sent: Vec<&str> = echo["headers"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .filter(|name| name.starts_with("x-auth-"))
        .collect();
    sent.sort();
    // A user's attributes include the `email` and `domain` of their address.
    let want = ["x-auth-attr-domain", "x-auth-attr-email", "x-auth-attr-tier", "x-auth-subject"];
    assert_eq!(sent, want, "the forged role is gone too: {echo}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_identity_prefix_names_and_guards_the_identity_and_access_lines_can_be_off() {
    let mut w = World::start().await;
    let port = free_port();
    let config = gateway_config(port, &w.redis.url(), w.upstream.port)
        .replace("log: { level: debug }", "log: { level: debug, access: false }")
        + "identity: { prefix: x-gw- }\n";
    let mut g = Gateway::start_with(port, &config);
    let user = w.user("acme", "prefix@acme.io", Role::Viewer, serde_json::json!({"tier": "gold"})).await;
    let token = w.pat(&user, TokenSpec::default()).await;

    let resp = w
        .http
        .get(g.url("/shop"))
        .bearer_auth(&token)
        .header("X-Gw-Role", "admin")
        .header("X_Gw_Subject", "user:root")
        .header("x-gw-anything", "forged")
        .send()
        .await
        .unwrap();
    let echo = echoed(resp).await;
    let headers = echo["headers"].as_object().unwrap();
    let one = |name: &str| {
        let values = headers.get(name).and_then(|v| v.as_array()).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(values.len(), 1, "{name}: {echo}");
        values[0].as_str().unwrap().to_string()
    };
    assert_eq!(one("x-gw-subject"), format!("user:{}", user.id));
    assert_eq!(one("x-gw-role"), "viewer", "the forged value is gone");
    assert_eq!(one("x-gw-attr-tier"), "gold");
    assert_eq!(one("x-gw-email"), "prefix@acme.io");
    for name in ["x_gw_subject", "x-gw-anything", "x-auth-subject", "x-auth-role"] {
        assert!(!headers.contains_key(name), "{name}: {echo}");
    }

    // No access line, for the proxy or the admin API, allowed or refused; the requests are
    // still counted (in the same phase, just before the line would be written).
    assert_eq!(w.http.get(g.url("/shop")).send().await.unwrap().status(), 401);
    let admin = format!("{}/v1/whoami", g.admin_url());
    assert_eq!(w.http.get(&admin).bearer_auth(&token).send().await.unwrap().status(), 200);
    let metrics = || async {
        w.http.get(format!("{}/metrics", g.admin_url())).send().await.unwrap().text().await.unwrap()
    };
    let counted = eventually(Duration::from_secs(5), || async {
        metrics().await.contains(r#"tollgate_requests_total{outcome="missing_token",route="shop"} 1"#)
    });
    assert!(counted.await, "{}", metrics().await);
    // Stopped, so that whatever it would write is written.
    g.signal("TERM");
    assert!(g.wait_exit(Duration::from_secs(30)).is_some(), "it stops");
    let log = g.log_text();
    assert!(log.contains("tollgate gateway listening"), "the log itself is written: {log}");
    assert!(!log.contains("tollgate::access") && !log.contains("tollgate::admin_access"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_breaking_off_its_own_request_head_fills_no_log() {
    let mut w = World::start().await;
    // A head cut off by the client.
    {
        use std::io::Write;
        let mut cut = std::net::TcpStream::connect(w.gateway.addr()).unwrap();
        cut.write_all(b"GET /shop HTTP/1.1\r\nHost: x\r\n").unwrap();
    }
    // After it: a request on a new connection is answered and logged.
    let resp = w.http.get(w.gateway.url("/public/x")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let logged = eventually(Duration::from_secs(5), || async {
        w.gateway.log_text().lines().any(|l| l.contains("tollgate::access") && l.contains("/public/x"))
    });
    assert!(logged.await, "{}", w.gateway.log_text());
    // Stopped, so that whatever it would write of the cut connection is written.
    w.gateway.signal("TERM");
    assert!(w.gateway.wait_exit(Duration::from_secs(30)).is_some(), "it stops");
    let log = w.gateway.log_text();
    assert!(!log.contains("Fail to proxy"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_halfway_through_a_response_is_counted_under_the_status_the_client_has() {
    let mut w = World::start().await;
    // Promises ten bytes and sends two, then nothing: the route's read bound ends the wait.
    let short = RawUpstream::start_answering(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok");
    let port = free_port();
    let config = gateway_config(port, &w.redis.url(), short.port)
        .replace("threads: 2", "threads: 2\nupstream_timeouts: { read: 300ms }");
    let g = Gateway::start_with(port, &config);
    let user = w.user("acme", "h@acme.io", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    let resp = w.http.get(g.url("/shop/x")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.is_err(), "the body is cut short");
    let metrics = format!("{}/metrics", g.admin_url());
    let counted = eventually(Duration::from_secs(5), || async {
        let now = w.http.get(&metrics).send().await.unwrap().text().await.unwrap();
        sample(&now, r#"tollgate_proxy_failures_total{route="shop",status="200"}"#) == 1.0
    });
    assert!(counted.await, "counted as the 200 the client has");
    let now = w.http.get(&metrics).send().await.unwrap().text().await.unwrap();
    assert!(!now.contains(r#"tollgate_proxy_failures_total{route="shop",status="504"}"#), "{now}");
}

#[test]
fn the_echo_upstream_stops_cleanly_on_sigterm_as_a_container_s_first_process_must() {
    let port = free_port();
    let mut echo = std::process::Command::new(tollgate_bin())
        .args(["echo", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let listening = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(listening, "the echo upstream listens");
    let _ = std::process::Command::new("kill").args(["-TERM", &echo.id().to_string()]).status();
    let status = exit_within(&mut echo, Duration::from_secs(5)).expect("it stops");
    // Exiting by its own hand, not killed by the signal's default action (which a container's
    // first process does not have).
    assert_eq!(status.code(), Some(0), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_gets_a_408_but_an_idle_websocket_waits_as_its_route_does() {
    let mut w = World::start().await;
    // One that never answers within the test, on a route that would wait for it a long time:
    // the gateway's own wait for the client's body (`client_body_timeout`) ends the request.
    let mute = RawUpstream::start_slow(Duration::from_secs(3600));
    // One that accepts a WebSocket, then speaks 1 s later (the client says nothing meanwhile).
    let ws = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ws_port = ws.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut conn, _) = ws.accept().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap() == 1 {
            head.push(byte[0]);
        }
        conn.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        )
        .unwrap();
        std::thread::sleep(Duration::from_secs(1));
        let _ = conn.write_all(b"late news");
        std::thread::sleep(Duration::from_secs(5));
    });
    // One that takes a second to say `100 Continue`, then reads a 2-byte body and answers (or,
    // for /late/stall, reads until the connection ends).
    let late = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let late_port = late.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in late.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                std::thread::sleep(Duration::from_secs(1));
                conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
                if String::from_utf8_lossy(&head).contains("/late/stall") {
                    let _ = conn.read_to_end(&mut Vec::new());
                    return;
                }
                let mut body = [0u8; 2];
                conn.read_exact(&mut body).unwrap();
                // (One request per connection: the next goes on a new one.)
                conn.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
                    .unwrap();
            });
        }
    });
    let port = free_port();
    let routes = format!(
        "  - {{ name: upload, path: /upload, upstream: \"127.0.0.1:{}\", org: acme, project: shop, \
         environment: production, upstream_timeouts: {{ read: 5m }} }}\n  - {{ name: ws, path: /ws, \
         upstream: \"127.0.0.1:{ws_port}\", org: acme, project: shop, environment: production, \
         upstream_timeouts: {{ read: 5m }} }}\n  - {{ name: late, path: /late, \
         upstream: \"127.0.0.1:{late_port}\", org: acme, project: shop, environment: production, \
         upstream_timeouts: {{ read: 5m }} }}\n",
        mute.port
    );
    let config = gateway_config(port, &w.redis.url(), w.upstream.port)
        .replace("threads: 2", "threads: 2\nclient_body_timeout: 300ms")
        + &routes;
    let g = Gateway::start_with(port, &config);
    let user = w.user("acme", "t@acme.io", Role::Editor, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    stalled_body_gets_a_408(g.addr(), "POST /upload/report", &token).await;
    let failures = r#"tollgate_proxy_failures_total{route="upload",status="408"}"#;
    let now = w.http.get(format!("{}/metrics", g.admin_url())).send().await.unwrap().text().await.unwrap();
    assert_eq!(sample(&now, failures), 1.0, "{now}");

    // An upgraded connection's client side is no body to time out at `client_body_timeout`: the
    // upstream's word a second later still reaches the silent client.
    let (addr, bearer) = (g.addr(), token.clone());
    let heard = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let head = format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bearer}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        client.write_all(head.as_bytes()).unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        let mut ended = String::new();
        while !String::from_utf8_lossy(&got).contains("late news") {
            match client.read(&mut chunk) {
                Ok(n) if n > 0 => got.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                end => {
                    ended = format!("(the read ended: {end:?})");
                    break;
                }
            }
        }
        format!("{}{ended}", String::from_utf8_lossy(&got))
    })
    .await
    .unwrap();
    assert!(heard.starts_with("HTTP/1.1 101"), "{heard}");
    assert!(heard.contains("late news"), "cut before the upstream spoke: {heard}\n{}", g.log_text());

    // Nor is a client waiting, as asked, for the upstream's `100 Continue` (a second coming)
    // before it sends its body.
    let continued = |path: &'static str, length: usize| {
        let (addr, bearer) = (g.addr(), token.clone());
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut client = std::net::TcpStream::connect(addr).unwrap();
            client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bearer}\r\nExpect: 100-continue\r\n\
                 Content-Length: {length}\r\n\r\n"
            );
            client.write_all(head.as_bytes()).unwrap();
            let mut got = Vec::new();
            let mut chunk = [0u8; 1024];
            while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
                let n = client.read(&mut chunk).unwrap();
                assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&chunk[..n]);
            }
            client.write_all(b"hi").unwrap();
            loop {
                match client.read(&mut chunk) {
                    Ok(n) if n > 0 => got.extend_from_slice(&chunk[..n]),
                    _ => break String::from_utf8_lossy(&got).into_owned(),
                }
            }
        })
    };
    let answered = continued("/late", 2).await.unwrap();
    assert!(answered.starts_with("HTTP/1.1 100 Continue"), "{answered}");
    assert!(answered.contains("HTTP/1.1 200") && answered.ends_with("ok"), "{answered}");
    // Once its body has begun, its stalling is the client's again: `client_body_timeout`, not
    // the route's five minutes.
    let stalled = continued("/late/stall", 10).await.unwrap();
    assert!(
        stalled.contains("HTTP/1.1 408") && stalled.contains("request_timeout"),
        "{stalled}\n{}",
        g.log_text()
    );
}

/// Sends `request` (method and path) with 3 of its 100 declared body bytes, then nothing: the
/// answer is `408 request_timeout`.
async fn stalled_body_gets_a_408(addr: std::net::SocketAddr, request: &str, token: &str) {
    let head = format!(
        "{request} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 100\r\n\r\nabc"
    );
    let stalled = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        client.write_all(head.as_bytes()).unwrap();
        read_one_response(&mut client)
    })
    .await
    .unwrap();
    assert!(stalled.starts_with("HTTP/1.1 408"), "{stalled}");
    assert!(stalled.contains(r#""error":"request_timeout""#), "{stalled}");
}

/// A client that stops taking its answer (reads nothing while a large one comes) is let go after
/// `client_send_timeout`: its connection, and the upstream's, are not held for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_answer_is_let_go() {
    let mut w = World::start().await;
    const LENGTH: usize = 64 << 20;
    let mut answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {LENGTH}\r\n\r\n").into_bytes();
    answer.resize(answer.len() + LENGTH, b'x');
    let big = RawUpstream::start_answering(Box::leak(answer.into_boxed_slice()));
    let port = free_port();
    let route = format!(
        "  - {{ name: big, path: /big, upstream: \"127.0.0.1:{}\", org: acme, project: shop, environment: production }}\n",
        big.port
    );
    let config = gateway_config(port, &w.redis.url(), w.upstream.port)
        .replace("threads: 2", "threads: 2\nclient_send_timeout: 300ms")
        + &route;
    let g = Gateway::start_with(port, &config);
    let user = w.user("acme", "slow@acme.io", Role::Viewer, serde_json::json!({})).await;
    let token = w.pat(&user, TokenSpec::default()).await;
    let mut client = std::net::TcpStream::connect(g.addr()).unwrap();
    std::io::Write::write_all(
        &mut client,
        format!("GET /big/file HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n").as_bytes(),
    )
    .unwrap();
    // Nothing is read; the gateway gives up on the client, and says so in its access line.
    let let_go = eventually(Duration::from_secs(20), || async {
        g.log_text().lines().any(|l| l.contains("tollgate::access") && l.contains("WriteTimedout"))
    });
    assert!(let_go.await, "{}", g.log_text());
    // And what the client finally reads ends before the whole answer.
    client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut read = 0usize;
    let mut chunk = vec![0u8; 1 << 16];
    while let Ok(n) = std::io::Read::read(&mut client, &mut chunk) {
        if n == 0 {
            break;
        }
        read += n;
    }
    assert!(read < LENGTH, "{read} bytes: the whole answer");
}

/// A Redis out of memory (past `maxmemory`, evicting nothing, as recommended) refuses changes:
/// the caller is told so, not that the store is unreachable, and is not asked to retry shortly;
/// nothing was changed, and once memory is freed the change goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_out_of_memory_is_told_as_such_and_changes_nothing() {
    let w = World::start().await;
    let admin = w.bootstrap_admin("acme").await;
    let token = admin.run(&["token", "issue", "--display-name", "kept"]).token();
    w.redis.config_set("maxmemory-policy", "noeviction");
    w.redis.config_set("maxmemory", "1");
    let resp = w
        .http
        .post(format!("{}/v1/tokens/{}/revoke", w.gateway.admin_url(), &token[..10]))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let retry = resp.headers().get("retry-after").is_some();
    let body: serde_json::Value = resp.json().await.unwrap();
    w.redis.config_set("maxmemory", "0");
    assert_eq!((status, &body["error"]), (507, &serde_json::json!("insufficient_storage")), "{body}");
    assert!(body["error_description"].as_str().unwrap().contains("out of memory"), "{body}");
    assert!(!retry, "retrying does not help until memory is freed");
    assert_eq!(w.get(&w.gateway, "/shop", &token).await.status(), 200, "nothing was changed");
    let out = admin.run(&["token", "revoke", &token[..10]]).ok();
    assert!(out.contains("Revoked"), "{out}");
    assert_eq!(w.get(&w.gateway, "/shop", &token).await.status(), 401);
}
