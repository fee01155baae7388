//! `tollgate quickstart`, followed as a newcomer would: run it, read what it prints, try it. Also
//! shows that the embedded store keeps tokens, and revocations, across a restart.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::*;

struct Quickstart {
    child: Child,
    printed: Vec<String>,
    /// Its stderr.
    log: std::path::PathBuf,
}

impl Quickstart {
    /// Starts it, run from the working directory `cwd` (this process's if none), where `dir` may
    /// be relative, and reads its instructions (everything up to the `token list` line).
    fn start_from(
        cwd: Option<&std::path::Path>,
        dir: &std::path::Path,
        port: u16,
        admin_port: u16,
    ) -> Quickstart {
        let mut child = Quickstart::spawn(cwd, dir, port, admin_port);
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let last = line.contains("token list");
                let _ = tx.send(line);
                if last {
                    break;
                }
            }
        });
        let mut printed = Vec::new();
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
            let last = line.contains("token list");
            printed.push(line);
            if last {
                break;
            }
        }
        assert!(printed.iter().any(|l| l.contains("token list")), "quickstart printed: {printed:#?}");
        Quickstart { child, printed, log: Quickstart::log(cwd, dir) }
    }

    fn log(cwd: Option<&std::path::Path>, dir: &std::path::Path) -> std::path::PathBuf {
        cwd.map_or_else(|| dir.to_path_buf(), |cwd| cwd.join(dir)).with_extension("log")
    }

    /// `tollgate quickstart` with its stdout piped (its stderr goes to the log).
    fn spawn(cwd: Option<&std::path::Path>, dir: &std::path::Path, port: u16, admin_port: u16) -> Child {
        Quickstart::command(cwd, dir, port, admin_port)
            .stderr(std::fs::File::create(Quickstart::log(cwd, dir)).unwrap())
            .spawn()
            .unwrap()
    }

    /// `tollgate quickstart` with its stdout piped, its stderr for the caller to say.
    fn command(cwd: Option<&std::path::Path>, dir: &std::path::Path, port: u16, admin_port: u16) -> Command {
        let mut cmd = Command::new(tollgate_bin());
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        cmd.arg("quickstart")
            .arg("--dir")
            .arg(dir)
            .args(["--port", &port.to_string(), "--admin-port", &admin_port.to_string()])
            // Its log level is its config's, which the tests read, not the caller's.
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped());
        cmd
    }

    fn token(&self) -> String {
        let token =
            self.printed.iter().find_map(|l| l.strip_prefix("Access token: ")).expect("a token").to_string();
        remember_secret(&token);
        token
    }

    /// The URL of the authenticated curl line.
    fn curl_url(&self) -> String {
        let line =
            self.printed.iter().find(|l| l.contains("curl -i -H")).expect("a curl line with the token");
        line.split_whitespace().last().unwrap().to_string()
    }

    fn stop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        for _ in 0..1500 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Quickstart {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for the gateway to answer at `url` (60 s: the machine may be busy with every other test);
/// else fails with whether it is still running and what it logged.
async fn wait_ready(http: &reqwest::Client, url: &str, quickstart: &mut Quickstart) {
    let ready = eventually(Duration::from_secs(60), || async { http.get(url).send().await.is_ok() }).await;
    if !ready {
        let exited = quickstart.child.try_wait().ok().flatten();
        let log = std::fs::read_to_string(&quickstart.log).unwrap_or_default();
        panic!("{url} never answered (exited: {exited:?}); its log:\n{log}");
    }
}

/// The status of `url` with `token`, asked again as a client does while the answer is `503` with
/// `Retry-After`: a token's first check runs argon2 at the default cost, at the lowest priority,
/// and on a busy machine (an unoptimized build, tests beside it) it can outlast
/// `argon2.max_wait`, which answers `503` while the run goes on.
async fn status_as_a_client_retries(http: &reqwest::Client, url: &str, token: &str) -> reqwest::StatusCode {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let resp = http.get(url).bearer_auth(token).send().await.unwrap();
        let busy = resp.status() == 503 && resp.headers().contains_key("retry-after");
        if !busy || std::time::Instant::now() > deadline {
            return resp.status();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_prints_a_token_that_works_and_the_embedded_store_survives_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("qs");
    // The echo upstream listens on the admin port's next.
    let [port, admin_port, _echo] = tollgate::testing::free_ports();
    // A hang guard only: the token's first check runs argon2 at the default cost, which an
    // unoptimized build on a busy machine takes seconds to finish.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();

    // The first run from the directory above, named relatively (as `tollgate quickstart` with
    // its default `--dir` is); the second from elsewhere must find the same store.
    let mut first = Quickstart::start_from(Some(root.path()), std::path::Path::new("qs"), port, admin_port);
    let token = first.token();
    let url = first.curl_url();
    wait_ready(&http, &url, &mut first).await;
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401, "the first curl line: no token");
    // The printed token is known good to the gateway it started: its first check runs no argon2
    // (which, at the lowest priority on a busy machine, could answer it busy).
    let resp = http.get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the second curl line, at once");
    let metrics = http.get(format!("http://127.0.0.1:{admin_port}/metrics")).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(metrics.lines().any(|l| l == "tollgate_argon2_runs_total 0"), "{metrics}");
    let echo: serde_json::Value = resp.json().await.unwrap();
    assert!(echo["headers"]["x-auth-subject"][0].as_str().unwrap().starts_with("user:u_"));
    assert_eq!(echo["headers"]["x-auth-org"][0], "demo");

    // The third line: the CLI against its admin API, named as it runs (the binary itself, however
    // it was started). Issue one token and revoke another.
    let third = first.printed.iter().find(|l| l.ends_with(" token list")).expect("the token list line");
    let program = third.split_whitespace().rev().nth(2).unwrap();
    assert_eq!(std::path::Path::new(program), tollgate_bin(), "{third}");
    let cli = Cli { server: format!("http://127.0.0.1:{admin_port}"), token: token.clone() };
    assert!(cli.run(&["token", "list"]).ok().contains(&token[..10]));
    let kept = cli.run(&["token", "issue", "--display-name", "kept"]).token();
    let revoked = cli.run(&["token", "issue", "--display-name", "gone"]).token();
    cli.run(&["token", "revoke", &revoked[..10]]).ok();
    let first_log = std::fs::read_to_string(&first.log).unwrap();
    assert!(first_log.contains("INFO"), "quickstart's own lines at info: {first_log}");
    first.stop();
    // Each run's log is scanned before the next run (which writes the same file) starts.
    assert_no_secret_in(
        &std::fs::read_to_string(&first.log).expect("the first run's log"),
        "the first run's log",
    );

    // The user's edits to the config survive a second run, and its echo upstream starts where
    // the config says.
    let config_path = dir.join("tollgate.yaml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let echo =
        config.lines().find_map(|l| l.strip_prefix("# quickstart echo upstream: ")).expect("echo line");
    // `log.level` too, which applies at the next start.
    let edited = format!(
        "{config}  - {{ name: mine, path: /mine, upstream: \"{echo}\", auth: none }}\nlog: {{ level: warn }}\n"
    );
    std::fs::write(&config_path, &edited).unwrap();

    let elsewhere = tempfile::tempdir().unwrap();
    let mut second = Quickstart::start_from(Some(elsewhere.path()), &dir, port, admin_port);
    wait_ready(&http, &url, &mut second).await;
    let second_token = second.token();
    for (t, expected) in [(&token, 200), (&kept, 200), (&revoked, 401), (&second_token, 200)] {
        assert_eq!(status_as_a_client_retries(&http, &url, t).await, expected, "{}", &t[..10]);
    }
    assert_eq!(std::fs::read_to_string(&config_path).unwrap(), edited, "the edited config was rewritten");
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0, "a store made where it was run from");
    let mine = url.replace("/demo/hello", "/mine/x");
    assert_eq!(http.get(&mine).send().await.unwrap().status(), 200, "the route the user added");
    let second_log = std::fs::read_to_string(&second.log).unwrap();
    assert!(!second_log.contains("INFO"), "log.level: warn, as edited: {second_log}");
    // The second run's token is issued like any other: audited, within the token limits.
    let audit = cli.json(&["audit", "--org", "demo", "--token-id", &second_token[..10]]);
    assert_eq!(audit[0]["action"], "token.issue", "{audit}");
    assert_eq!(audit[0]["actor"], "quickstart", "{audit}");
    // A second quickstart on the same directory is told the store is in use, not that the echo
    // upstream's port in the config is taken.
    // Each must fail at once: one that started serving instead is stopped, and fails the test.
    let run = |dir: &std::path::Path, port: u16| {
        let mut child = Command::new(tollgate_bin())
            .args(["quickstart", "--dir"])
            .arg(dir)
            .args(["--port", &port.to_string(), "--admin-port", &admin_port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let Some(status) = exit_within(&mut child, Duration::from_secs(60)) else {
            let _ = child.kill();
            panic!("quickstart kept running instead of refusing to start");
        };
        assert!(!status.success());
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        err
    };
    let err = run(&dir, port);
    assert!(err.contains("in use by another tollgate process"), "{err}");
    let tokens = cli.json(&["token", "list"]).as_array().unwrap().len();
    let second_log_path = second.log.clone();
    drop(second);
    assert_no_secret_in(
        &std::fs::read_to_string(&second_log_path).expect("the second run's log"),
        "the second run's log",
    );
    // With its gateway port taken, a run stops before it issues a token.
    let taken = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let err = run(&dir, port);
    assert!(err.contains("nothing was issued"), "{err}");
    // A fresh directory with that port taken is left without a config: the next run, with a free
    // port, writes its own instead of using one it could never serve.
    let fresh = root.path().join("fresh");
    let err = run(&fresh, port);
    assert!(err.contains("nothing was written or issued") && err.contains("--port"), "{err}");
    assert!(!fresh.join("tollgate.yaml").exists(), "a config was written for a port that is taken");
    drop(taken);
    // An earlier run's config is used as it is: a different port asked for is refused, naming it.
    let [other] = tollgate::testing::free_ports();
    let err = run(&dir, other);
    assert!(err.contains(&format!("--port {other} differs from")) && err.contains("tollgate.yaml"), "{err}");
    // A config an earlier version wrote, with its store path relative (to where it was run):
    // run from there it finds the same store, and says the path is relative.
    let config = std::fs::read_to_string(&config_path).unwrap();
    let absolute = serde_json::Value::from(dir.join("store.redb").to_string_lossy()).to_string();
    assert!(config.contains(&absolute), "{config}");
    std::fs::write(&config_path, config.replace(&absolute, "\"qs/store.redb\"")).unwrap();
    let mut third = Quickstart::start_from(Some(root.path()), std::path::Path::new("qs"), port, admin_port);
    assert!(
        third.printed.iter().any(|l| l.contains("store path qs/store.redb is relative")),
        "{:#?}",
        third.printed
    );
    wait_ready(&http, &url, &mut third).await;
    let cli = Cli { server: cli.server.clone(), token: third.token() };
    // Proven through the proxy first (the admin API shares the proof), as above.
    assert_eq!(status_as_a_client_retries(&http, &url, &cli.token).await, 200);
    assert_eq!(cli.json(&["token", "list"]).as_array().unwrap().len(), tokens + 1, "only the third run's");
    drop(third);
    let log = std::fs::read_to_string(dir.with_extension("log")).expect("the third run's log");
    assert_no_secret_in(&log, "the third run's log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_keeps_serving_when_nobody_reads_what_it_prints() {
    let s = Serving::start(|dir, port, admin_port| {
        let mut child = Quickstart::spawn(None, dir, port, admin_port);
        // Whoever read it is gone before it prints (`tollgate quickstart | head -1`, a closed pager).
        drop(child.stdout.take());
        child
    })
    .await;
    assert_eq!(s.http.get(&s.url).send().await.unwrap().status(), 401);
    let mut quickstart = s.quickstart;
    assert!(quickstart.child.try_wait().unwrap().is_none(), "still running");
}

/// A quickstart of its own in a fresh directory, answering at `url` (its `/demo` route).
struct Serving {
    _root: tempfile::TempDir,
    quickstart: Quickstart,
    http: reqwest::Client,
    url: String,
    admin_port: u16,
}

impl Serving {
    /// Started by `spawn(dir, port, admin_port)`, once it answers.
    async fn start(spawn: impl FnOnce(&std::path::Path, u16, u16) -> Child) -> Serving {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("qs");
        let [port, admin_port, _echo] = tollgate::testing::free_ports();
        let child = spawn(&dir, port, admin_port);
        let mut quickstart = Quickstart { child, printed: Vec::new(), log: dir.with_extension("log") };
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let url = format!("http://127.0.0.1:{port}/demo/hello");
        wait_ready(&http, &url, &mut quickstart).await;
        Serving { _root: root, quickstart, http, url, admin_port }
    }
}

/// Nor when its log cannot be written (`quickstart 2>&1 | head`, a closed terminal): a line that
/// cannot be written is dropped, and the gateway and the admin API go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_keeps_serving_when_its_log_cannot_be_written() {
    let s = Serving::start(|dir, port, admin_port| {
        let mut child =
            Quickstart::command(None, dir, port, admin_port).stderr(Stdio::piped()).spawn().unwrap();
        drop(child.stdout.take());
        drop(child.stderr.take());
        child
    })
    .await;
    // Each request writes an access line (the proxy's and the admin API's).
    for _ in 0..3 {
        assert_eq!(s.http.get(&s.url).send().await.unwrap().status(), 401);
        let whoami = format!("http://127.0.0.1:{}/v1/whoami", s.admin_port);
        assert_eq!(s.http.get(whoami).send().await.unwrap().status(), 401);
    }
    let mut quickstart = s.quickstart;
    assert!(quickstart.child.try_wait().unwrap().is_none(), "still running");
}

/// A closed terminal sends its quickstart `SIGHUP`: it stops, gracefully, rather than serve on
/// unseen holding its ports and store (the next run would be told the store is in use).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_stops_when_its_terminal_hangs_up() {
    let s = Serving::start(|dir, port, admin_port| Quickstart::spawn(None, dir, port, admin_port)).await;
    let mut quickstart = s.quickstart;
    let _ = Command::new("kill").arg("-HUP").arg(quickstart.child.id().to_string()).status();
    let status = exit_within(&mut quickstart.child, Duration::from_secs(30)).expect("it stops on SIGHUP");
    assert!(status.success(), "{status}");
}

/// A port the kernel would pick is no port a config can keep: refused before anything is written
/// (a file with `:0` in it would have stopped every later run).
#[test]
fn quickstart_refuses_port_0_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for flag in ["--port", "--admin-port"] {
        let out = Command::new(tollgate_bin())
            .args(["quickstart", "--dir"])
            .arg(dir.path().join("qs"))
            .args([flag, "0"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(flag), "{out:?}");
        assert!(!dir.path().join("qs").exists(), "{flag}: something was written");
    }
}
