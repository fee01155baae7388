//! What the integration tests need, started for real: a `redis-server` on a free port owned by the
//! test, an upstream that echoes what it received, and `tollgate` processes.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::lifecycle::{self, TokenSpec};
use tollgate::policy::Role;
use tollgate::store::redis::RedisBackend;
use tollgate::store::{Attributes, Owner, Store, User};
use tollgate::token::Argon2Params;

/// Cheap argon2 settings so tests spend their time on behaviour, not hashing.
pub const ARGON2: Argon2Params = Argon2Params { memory_kib: 512, iterations: 1, parallelism: 1 };

pub use tollgate::testing::free_port;
use tollgate::testing::{wait_for_port, RedisServer};

/// A `redis-server` with AOF (`appendfsync always`) in a temporary directory.
pub struct Redis {
    server: RedisServer,
    _dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut args: Vec<std::ffi::OsString> =
            ["--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir"].map(Into::into).into();
        args.push(dir.path().into());
        let server = RedisServer::start(args);
        Redis { server, _dir: dir }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Kills the server; its AOF keeps every acknowledged write.
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Starts it again on the same port and data directory.
    pub fn restart(&mut self) {
        self.server.restart();
    }

    /// Freezes the server: connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.server.pause();
    }

    /// Lets a paused server run again.
    pub fn resume(&self) {
        self.server.resume();
    }

    /// A synchronous connection for inspecting the server (INFO, CONFIG).
    pub fn client(&self) -> redis::Connection {
        self.server.client()
    }

    /// `CONFIG SET name value` on the server, as an operator would.
    pub fn config_set(&self, name: &str, value: &str) {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query(&mut self.client())
            .expect("CONFIG SET");
    }

    /// How many times a command has run since the last `CONFIG RESETSTAT`.
    pub fn command_calls(&self, command: &str) -> u64 {
        let info: String = redis::cmd("INFO").arg("commandstats").query(&mut self.client()).expect("INFO");
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// The commands run since the last `CONFIG RESETSTAT`, but the invalidation feeds' heartbeats
    /// and a test's own inspection (`ping`, `info`, `config|resetstat`).
    pub fn commands_run(&self) -> Vec<String> {
        let info: String = redis::cmd("INFO").arg("commandstats").query(&mut self.client()).expect("INFO");
        info.lines()
            .filter_map(|l| l.strip_prefix("cmdstat_"))
            .filter_map(|l| l.split(':').next())
            .filter(|c| !["ping", "info", "config|resetstat"].contains(c))
            .map(str::to_string)
            .collect()
    }

    pub fn reset_stats(&self) {
        let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut self.client()).expect("RESETSTAT");
    }
}

/// An HTTP upstream that answers every request with JSON of what it received.
pub struct Upstream {
    pub port: u16,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(tollgate::echo::serve(listener));
        Upstream { port }
    }
}

/// An upstream that keeps every request head exactly as it arrived (bytes, header case and all)
/// and answers each with a reason phrase of its own and a mixed-case header.
pub struct RawUpstream {
    pub port: u16,
    heads: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl RawUpstream {
    /// One that answers each request `delay` after receiving its head.
    pub fn start_slow(delay: Duration) -> RawUpstream {
        RawUpstream::spawn(delay, Self::ANSWER)
    }

    /// One that answers each request with `answer` (a whole response, bodiless requests only).
    pub fn start_answering(answer: &'static [u8]) -> RawUpstream {
        RawUpstream::spawn(Duration::ZERO, answer)
    }

    fn spawn(delay: Duration, answer: &'static [u8]) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind raw upstream");
        let port = listener.local_addr().expect("addr").port();
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = heads.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let kept = kept.clone();
                std::thread::spawn(move || RawUpstream::answer(stream, &kept, delay, answer));
            }
        });
        RawUpstream { port, heads }
    }
}

impl RawUpstream {
    pub const ANSWER: &'static [u8] =
        b"HTTP/1.1 200 Fine By Me\r\nX-Upstream-Note: yes\r\nContent-Length: 2\r\n\r\nok";

    pub fn start() -> RawUpstream {
        RawUpstream::start_slow(Duration::ZERO)
    }

    /// Answers request after request (bodiless) on one kept-alive connection.
    fn answer(mut stream: TcpStream, kept: &std::sync::Mutex<Vec<Vec<u8>>>, delay: Duration, answer: &[u8]) {
        use std::io::{Read, Write};
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = buf.drain(..end + 4).collect();
                kept.lock().unwrap().push(head);
                std::thread::sleep(delay);
                if stream.write_all(answer).is_err() {
                    return;
                }
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The request heads received so far.
    pub fn heads(&self) -> Vec<String> {
        self.raw_heads().iter().map(|head| String::from_utf8_lossy(head).into_owned()).collect()
    }

    /// The request heads received so far, byte for byte (a target need not be UTF-8).
    pub fn raw_heads(&self) -> Vec<Vec<u8>> {
        self.heads.lock().unwrap().clone()
    }
}

/// The config every gateway test uses: two orgs, and routes for each case.
pub fn gateway_config(port: u16, redis_url: &str, upstream: u16) -> String {
    let admin = free_port();
    format!(
        r#"
listen: 127.0.0.1:{port}
admin: {{ listen: "127.0.0.1:{admin}", last_use_flush: 200ms }}
tokens: {{ max_ttl: 30d }}
threads: 2
log: {{ level: debug }}
store:
  redis: {{ url: "{redis_url}", key_prefix: "t:" }}
  timeout: 1s
cache: {{ capacity: 1000, ttl: 60s }}
credentials: {{ query_param: access_token, api_key_header: X-API-Key }}
argon2: {{ memory_kib: {mem}, iterations: 1, parallelism: 1, max_concurrency: 2, max_wait: 120s }}
orgs:
  acme:
    projects:
      shop: {{ environments: [production, staging, dev] }}
      blog: {{ environments: [production] }}
  globex:
    projects:
      web: {{ environments: [production] }}
routes:
  - {{ name: shop, path: /shop, upstream: "127.0.0.1:{upstream}", org: acme, project: shop, environment: production, query_token: true, permissions: {{ DELETE: admin }} }}
  - {{ name: staging, path: /staging, upstream: "127.0.0.1:{upstream}", org: acme, project: shop, environment: staging }}
  - {{ name: dev, path: /dev, upstream: "127.0.0.1:{upstream}", org: acme, project: shop, environment: dev }}
  - {{ name: noquery, path: /noquery, upstream: "127.0.0.1:{upstream}", org: acme, project: shop, environment: production }}
  - {{ name: globex, path: /globex, upstream: "127.0.0.1:{upstream}", org: globex, project: web, environment: production }}
  - {{ name: reports, path: /reports, upstream: "127.0.0.1:{upstream}", org: acme, project: shop, environment: production, permissions: {{ GET: admin }} }}
  - {{ name: blog, path: /blog, upstream: "127.0.0.1:{upstream}", org: acme, project: blog, environment: production }}
  - {{ name: public, path: /public, upstream: "127.0.0.1:{upstream}", auth: none }}
  - {{ name: dead, path: /dead, upstream: "127.0.0.1:{dead}", org: acme, project: shop, environment: production, query_token: true }}
"#,
        mem = ARGON2.memory_kib,
        dead = free_port(),
    )
}

/// JWT signing keys for the ephemeral-credential tests: two Ed25519 private keys, `k1` and `k2`,
/// written by `tollgate keygen` as a user would.
pub struct JwtKeys {
    pub k1: PathBuf,
    pub k2: PathBuf,
    _dir: tempfile::TempDir,
}

impl JwtKeys {
    pub fn generate() -> JwtKeys {
        let dir = tempfile::tempdir().expect("tempdir");
        let (k1, k2) = (dir.path().join("k1.pem"), dir.path().join("k2.pem"));
        for path in [&k1, &k2] {
            let out =
                Command::new(tollgate_bin()).arg("keygen").arg("--out").arg(path).output().expect("keygen");
            assert!(out.status.success(), "keygen: {out:?}");
        }
        JwtKeys { k1, k2, _dir: dir }
    }

    /// The `jwt` section listing `keys` (kid, file) and signing with `signing`.
    pub fn section(&self, signing: &str, keys: &[&str]) -> String {
        let mut out = format!(
            "jwt:\n  issuer: tollgate-test\n  leeway: 1s\n  default_ttl: 5m\n  max_ttl: 10m\n  signing_key: {signing}\n  keys:\n"
        );
        for kid in keys {
            let path = if *kid == "k1" { &self.k1 } else { &self.k2 };
            out.push_str(&format!("    - {{ kid: {kid}, key_file: \"{}\" }}\n", path.display()));
        }
        out
    }
}

/// The gateway config plus routes that send the upstream an identity JWT (`/billing` with its own
/// audience), and a `jwt` section.
pub fn jwt_gateway_config(port: u16, redis_url: &str, upstream: u16, jwt_section: &str) -> String {
    format!(
        "{}  - {{ name: signed, path: /signed, upstream: \"127.0.0.1:{upstream}\", org: acme, project: shop, environment: production, identity_jwt: true }}\n  \
         - {{ name: billing, path: /billing, upstream: \"127.0.0.1:{upstream}\", org: acme, project: shop, environment: production, identity_jwt: true, identity_jwt_audience: billing }}\n{jwt_section}",
        gateway_config(port, redis_url, upstream)
    )
}

/// A gateway with the `jwt` section of `keys`, `k1` signing.
pub fn jwt_gateway(redis: &Redis, upstream: &Upstream, keys: &JwtKeys) -> Gateway {
    let port = free_port();
    Gateway::start_with(
        port,
        &jwt_gateway_config(port, &redis.url(), upstream.port, &keys.section("k1", &["k1"])),
    )
}

/// A running `tollgate serve`, its log captured to a file.
pub struct Gateway {
    pub port: u16,
    pub admin_port: u16,
    pub config_path: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
    pub log: PathBuf,
}

impl Gateway {
    pub fn start(redis: &Redis, upstream: &Upstream) -> Gateway {
        let port = free_port();
        Gateway::start_with(port, &gateway_config(port, &redis.url(), upstream.port))
    }

    pub fn start_with(port: u16, config: &str) -> Gateway {
        Gateway::start_with_env(port, config, &[])
    }

    /// Like [`Gateway::start_with`], with these environment variables set.
    pub fn start_with_env(port: u16, config: &str, env: &[(&str, &str)]) -> Gateway {
        Gateway::start_by(port, config, |config_path| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
            cmd.arg("serve").arg("--config").arg(config_path).envs(env.iter().copied());
            cmd
        })
    }

    /// A gateway started by the command `serve` makes for the config file's path (one that
    /// prepares something first, then runs `tollgate serve --config` in its own place).
    pub fn start_by(port: u16, config: &str, serve: impl FnOnce(&std::path::Path) -> Command) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("tollgate.yaml");
        std::fs::write(&config_path, config).expect("write config");
        let log = dir.path().join("tollgate.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut child = serve(&config_path)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn tollgate");
        wait_for_port(port, "tollgate", &mut child, Some(&log));
        let admin_port = config
            .lines()
            .find_map(|l| l.trim().strip_prefix("admin: { listen: \"127.0.0.1:"))
            .and_then(|rest| rest.split('"').next())
            .and_then(|p| p.parse().ok())
            .expect("the test config names admin.listen");
        wait_for_port(admin_port, "tollgate admin API", &mut child, Some(&log));
        Gateway { port, admin_port, config_path, child, _dir: dir, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`HUP`, `TERM`) to the gateway process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{name}");
    }

    /// Waits up to `within` for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        exit_within(&mut self.child, within)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Rewrites the config file as `edit` makes it from the current one and reloads it with
    /// SIGHUP, as an operator would; returns once the gateway has logged the reload.
    pub async fn reload(&self, edit: impl FnOnce(&str) -> String) {
        let old = std::fs::read_to_string(&self.config_path).expect("config");
        let reloads = || self.log_text().matches("config reloaded").count();
        let before = reloads();
        std::fs::write(&self.config_path, edit(&old)).expect("write config");
        self.signal("HUP");
        assert!(eventually(Duration::from_secs(5), || async { reloads() > before }).await, "reload applied");
    }
}

impl Drop for Gateway {
    /// Stops the process, then checks that no line of its log holds any token issued so far in
    /// this test run.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            assert_no_secret_in(&self.log_text(), &self.log.display().to_string());
        }
    }
}

/// Every token the test run has issued or been shown.
static SECRETS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Remembers a token so that every gateway log is checked for it.
pub fn remember_secret(token: &str) {
    SECRETS.lock().unwrap_or_else(|e| e.into_inner()).push(token.to_string());
}

/// Panics if `text` contains any remembered token.
pub fn assert_no_secret_in(text: &str, what: &str) {
    let secrets = SECRETS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(s) = secrets.iter().find(|s| text.contains(s.as_str())) {
        panic!("{what} contains the token with id {}", &s[..10]);
    }
}

/// Redis, an upstream, one gateway, and a store handle for creating users and tokens.
pub struct World {
    pub redis: Redis,
    pub upstream: Upstream,
    pub gateway: Gateway,
    pub store: Store,
    pub http: reqwest::Client,
}

impl World {
    /// The first admin of `org` (`admin@<org>.io`, made by `bootstrap`), as a CLI user.
    pub async fn bootstrap_admin(&self, org: &str) -> Cli {
        lifecycle::ensure_org(&self.store, org).await.unwrap();
        let (_, token, _) =
            lifecycle::bootstrap(&self.store, ARGON2, &Default::default(), org, &format!("admin@{org}.io"))
                .await
                .unwrap();
        remember_secret(&token.token);
        Cli::new(&self.gateway, &token.token)
    }

    pub async fn start() -> World {
        World::start_with(Gateway::start).await
    }

    /// Like [`World::start`], with ephemeral credentials signed by `keys` (`k1` signing).
    pub async fn start_jwt(keys: &JwtKeys) -> World {
        World::start_with(|redis, upstream| jwt_gateway(redis, upstream, keys)).await
    }

    /// Like [`World::start`], with the gateway `gateway` starts.
    /// A world whose gateway has `routes` (YAML list items) after the usual ones.
    pub async fn with_routes(routes: &str) -> World {
        World::start_with(|redis, echo| {
            let port = free_port();
            Gateway::start_with(port, &(gateway_config(port, &redis.url(), echo.port) + routes))
        })
        .await
    }

    pub async fn start_with(gateway: impl FnOnce(&Redis, &Upstream) -> Gateway) -> World {
        let redis = Redis::start();
        let upstream = Upstream::start().await;
        let gateway = gateway(&redis, &upstream);
        let backend = RedisBackend::new(&redis.url(), "t:", Duration::from_secs(1)).expect("backend");
        let store = Store::new(Arc::new(backend), Duration::from_secs(1));
        // As long as the suite's `argon2.max_wait`: a first check on a loaded machine may take that.
        let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("client");
        World { redis, upstream, gateway, store, http }
    }

    /// A second gateway on the same Redis and upstream.
    pub fn second_gateway(&self) -> Gateway {
        Gateway::start(&self.redis, &self.upstream)
    }

    /// Another gateway on the same Redis and upstream, with the `jwt` section of `keys`.
    pub fn jwt_gateway(&self, keys: &JwtKeys) -> Gateway {
        jwt_gateway(&self.redis, &self.upstream, keys)
    }

    /// A service with the given project roles and its first token (remembered for the log scan).
    pub async fn service(
        &self,
        org: &str,
        name: &str,
        project_roles: &[(&str, Role)],
        spec: TokenSpec,
    ) -> (tollgate::store::Service, String) {
        lifecycle::ensure_org(&self.store, org).await.expect("org");
        let roles = project_roles.iter().map(|(p, r)| (p.to_string(), *r)).collect();
        let service = lifecycle::create_service(&self.store, org, name, None, roles, Attributes::new(), None)
            .await
            .expect("service");
        let (token, _) =
            lifecycle::issue_token(&self.store, ARGON2, org, Owner::Service(service.id.clone()), spec)
                .await
                .expect("token");
        remember_secret(&token.token);
        (service, token.token)
    }

    pub async fn user(&self, org: &str, email: &str, role: Role, attributes: serde_json::Value) -> User {
        let attributes: Attributes = serde_json::from_value(attributes).expect("attributes object");
        lifecycle::ensure_org(&self.store, org).await.expect("org");
        lifecycle::create_user(&self.store, org, email, role, BTreeMap::new(), attributes)
            .await
            .expect("user")
    }

    /// Issues a PAT for `user` and remembers its text for the log scan.
    pub async fn pat(&mut self, user: &User, spec: TokenSpec) -> String {
        let (token, _) =
            lifecycle::issue_token(&self.store, ARGON2, &user.org, Owner::User(user.id.clone()), spec)
                .await
                .expect("token");
        remember_secret(&token.token);
        token.token
    }

    pub async fn get(&self, gateway: &Gateway, path: &str, token: &str) -> reqwest::Response {
        self.http.get(gateway.url(path)).bearer_auth(token).send().await.expect("request")
    }

    pub async fn post(&self, gateway: &Gateway, path: &str, token: &str) -> reqwest::Response {
        self.http.post(gateway.url(path)).bearer_auth(token).body("{}").send().await.expect("request")
    }
}

/// The `tollgate` CLI pointed at a gateway's admin API with a token.
pub struct Cli {
    pub server: String,
    pub token: String,
}

/// What a CLI run printed, and whether it succeeded.
#[derive(Debug)]
pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The value after `Access token: `, which must be printed; remembered for the log scans.
    pub fn token(&self) -> String {
        let token = self
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("Access token: "))
            .unwrap_or_else(|| panic!("no token in {self:?}"))
            .to_string();
        remember_secret(&token);
        token
    }

    /// Asserts success and returns stdout.
    pub fn ok(self) -> String {
        assert!(self.ok, "command failed: {self:?}");
        self.stdout
    }

    /// Asserts failure and returns stderr.
    pub fn failed(self) -> String {
        assert!(!self.ok, "command should have failed: {self:?}");
        assert!(!self.stderr.contains("panicked"), "{self:?}");
        self.stderr
    }
}

impl Cli {
    pub fn new(gateway: &Gateway, token: &str) -> Cli {
        Cli { server: gateway.admin_url(), token: token.to_string() }
    }

    pub fn as_token(&self, token: &str) -> Cli {
        Cli { server: self.server.clone(), token: token.to_string() }
    }

    /// Runs `tollgate ARGS` with `TOLLGATE_SERVER` and `TOLLGATE_TOKEN` set.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, |_| {})
    }

    /// Runs `tollgate ARGS` as [`Cli::run`] does, after `more` has set the command up further
    /// (its environment, say).
    pub fn run_with(&self, args: &[&str], more: impl FnOnce(&mut Command)) -> Output {
        let mut command = Command::new(tollgate_bin());
        command.args(args).env("TOLLGATE_SERVER", &self.server).env("TOLLGATE_TOKEN", &self.token);
        more(&mut command);
        let out = command.output().expect("run tollgate");
        Output {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `tollgate ARGS` as [`Cli::run`] does, but at a terminal (a pseudo-terminal made by
    /// util-linux's `script`) on which `typed` is typed: `stdout` is what the terminal showed (the
    /// typed text's echo, the prompts and the output, lines ending in `\n`).
    pub fn run_at_terminal(&self, args: &[&str], typed: &str) -> Output {
        use std::io::Write;
        let quoted = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let mut line = quoted(&tollgate_bin().to_string_lossy());
        for arg in args {
            line.push(' ');
            line.push_str(&quoted(arg));
        }
        let mut child = Command::new("script")
            .args(["--quiet", "--return", "--command", &line, "/dev/null"])
            .env("TOLLGATE_SERVER", &self.server)
            .env("TOLLGATE_TOKEN", &self.token)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run script (util-linux)");
        child.stdin.take().expect("stdin").write_all(typed.as_bytes()).expect("type");
        let out = child.wait_with_output().expect("run tollgate at a terminal");
        Output {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n"),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs with `--json` and parses the answer.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.run(&all).ok();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }
}

/// Polls `f` until it returns true, for at most `within`. Cross-instance invalidation travels
/// through Redis pub/sub, so a second instance learns of a change a few milliseconds later.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The JSON the echo upstream sent back.
pub async fn echoed(resp: reqwest::Response) -> serde_json::Value {
    assert_eq!(resp.status(), 200, "expected the upstream's answer");
    resp.json().await.expect("echo json")
}

/// Raw HTTP/1.1 exchange, for requests a client library refuses to send.
pub fn raw_request(addr: SocketAddr, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    stream.write_all(request).expect("write");
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

pub fn tollgate_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tollgate"))
}

/// Waits up to `within` for a child process to exit; `None` if it is still running.
pub fn exit_within(child: &mut std::process::Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Reads one response (head, then a `Content-Length` body) off a kept-alive connection.
pub fn read_one_response(stream: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return text;
            }
        }
        let n = stream.read(&mut buf).expect("the response arrives");
        assert!(n > 0, "the connection closed before the response was whole: {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}
