//! The load benchmark: what authentication costs per request, as ratios to a plain Pingora
//! passthrough built from the same dependency versions, measured side by side in one run.
//! Run with `cargo bench --bench load` (installs oha with `cargo install` when it is missing).
//!
//! One run starts a fast origin (a fixed 2-byte answer), a plain Pingora passthrough (no auth: the
//! floor of our own cost), `tollgate serve` on the embedded store, and nginx as a plain proxy when
//! `nginx` is on the PATH. The proxies run with one worker thread each, pinned to the last core; the
//! load generator, the origin and this process are pinned to the others. For each target it
//! measures closed-loop throughput (oha, fixed connections, as fast as answered) and open-loop
//! latency (oha at a fixed request rate with `--latency-correction`, so a stalled response counts the
//! requests that should have been sent meanwhile: coordinated omission corrected), then prints one
//! table with every figure as a ratio to plain Pingora.
//!
//! Targets: direct origin, nginx, plain Pingora, Tollgate with a cached PAT, Tollgate with an
//! ephemeral JWT, and Tollgate with a cached PAT while a storm of distinct never-seen tokens (real
//! tokens, each presented once, so each costs a store read and an argon2 run) hits the same gateway.
//! The storm comparison runs in rounds of the cached-PAT open-loop measurements without and with
//! the storm, back to back in alternating order (`STORM_ROUNDS`, default 5), and its verdict is the
//! median of the rounds' ratios: one p99 from one 10-second run swings too much on a shared
//! machine to decide alone. A round whose storm ran out of tokens is shown but left out of the
//! verdict; `STORM_TOKENS` defaults to enough for the rounds asked for.
//! Throughput and added latency are decided the same way: `THROUGHPUT_ROUNDS` (default 5) rounds
//! of plain Pingora and the cached PAT back to back in alternating order (closed loop, then the
//! light open loop), and the medians of their ratios and differences. Where valgrind is installed,
//! the run ends by counting each proxy's user-space instructions per request with callgrind: the
//! one comparison no neighbour on a shared machine can move.
//!
//! Environment: `LOAD_SECONDS` (per measurement, default 10), `LOAD_CONNECTIONS` (default 32),
//! `LOAD_RATE_FRACTION` (open-loop rate as a fraction of plain Pingora's throughput, default 0.25,
//! a load every target sustains, so latency shows the cost of a request rather than a queue),
//! `LOAD_LIGHT_RATE` (the light open loop's rate, default 2000 req/s),
//! `STORM_TOKENS` (default 1300 per storm round and 1300 for the main table's storm row, 7800 for the default 5 rounds), `STORM_ROUNDS` (default 5), `THROUGHPUT_ROUNDS` (default 5),
//! `LOAD_ARGON2_MEMORY_KIB` (argon2 memory of every token, default 19456, the default of the config).

// Set-up failures in a benchmark should stop it with their message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use tollgate::config::{Config, StoreSettings};
use tollgate::lifecycle::{self, TokenSpec};
use tollgate::policy::Role;
use tollgate::store::{self, Attributes, Owner};
use tollgate::testing::free_port;

// The allocator `tollgate serve` runs with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ROLE: &str = "TOLLGATE_LOAD_ROLE";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn wait_for(port: u16, what: &str) {
    wait_for_within(port, what, Duration::from_secs(30));
}

fn wait_for_within(port: u16, what: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// The two servers this binary plays itself (as child processes, so they can be pinned).

/// The origin: answers every request with `ok`.
fn run_origin(port: u16) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let app = axum::Router::new().fallback(|| async { "ok" });
        axum::serve(listener, app).await.unwrap();
    });
}

/// Plain Pingora: the same proxy service Tollgate builds, with nothing but the upstream choice and
/// the same upstream timeouts and client keep-alive bound (a proxy's, not authentication's: as
/// nginx has its own).
struct Passthrough(std::net::SocketAddr);

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();
    fn new_ctx(&self) {}

    /// The same bound on idle client connections as Tollgate's default (a proxy's cost too).
    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> pingora::Result<bool> {
        tollgate::proxy::bound_keepalive(session, Some(tollgate::config::DEFAULT_KEEPALIVE.as_secs()));
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> pingora::Result<Box<HttpPeer>> {
        let mut peer = Box::new(HttpPeer::new(self.0, false, String::new()));
        tollgate::route::UpstreamTimeouts::default().apply(&mut peer);
        Ok(peer)
    }
}

fn run_passthrough(port: u16, origin: u16) {
    let conf = ServerConf {
        threads: 1,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service(
        &server.configuration,
        Passthrough(std::net::SocketAddr::from(([127, 0, 0, 1], origin))),
    );
    proxy.add_tcp(&format!("127.0.0.1:{port}"));
    server.add_service(proxy);
    server.run_forever();
}

// ---------------------------------------------------------------------------------------------
// Processes, pinned where the machine has cores to spare.

struct Cores {
    /// Where the proxies run.
    servers: Option<String>,
    /// Where the load generator, the origin and this process run.
    load: Option<String>,
}

fn cores() -> Cores {
    let n = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
    let taskset = Command::new("taskset").arg("--version").output().is_ok_and(|o| o.status.success());
    if n < 2 || !taskset {
        return Cores { servers: None, load: None };
    }
    Cores { servers: Some((n - 1).to_string()), load: Some(format!("0-{}", n - 2)) }
}

fn pinned(cpus: &Option<String>, program: &Path) -> Command {
    match cpus {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(mut cmd: Command, what: &'static str) -> Proc {
    Proc(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| panic!("{what}: {e}")))
}

/// oha: on the PATH, or installed with cargo (from crates.io) into `target/`.
fn oha() -> PathBuf {
    if Command::new("oha").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return PathBuf::from("oha");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/oha");
    let bin = root.join("bin/oha");
    if !bin.exists() {
        eprintln!("installing oha (the load generator) with cargo install; this takes a few minutes once");
        let ok = Command::new("cargo")
            .args(["install", "oha", "--locked", "--root"])
            .arg(&root)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cargo install oha failed");
    }
    bin
}

// ---------------------------------------------------------------------------------------------
// Measurements.

#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    rps: f64,
    /// CPU time the server process spent per request (closed loop, proxies only).
    cpu_us: Option<f64>,
    /// The user-space part of `cpu_us` (the rest is the kernel's).
    user_us: Option<f64>,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

struct Load {
    oha: PathBuf,
    cpus: Option<String>,
    seconds: u64,
    connections: usize,
    light_rate: f64,
}

impl Load {
    /// One oha run; `rate` = None for closed loop. With `server`, also the CPU time that process
    /// spent per request.
    fn run(&self, url: &str, token: Option<&str>, rate: Option<f64>, server: Option<u32>) -> Figures {
        self.run_with(url, token, rate, server, self.connections)
    }

    fn run_with(
        &self,
        url: &str,
        token: Option<&str>,
        rate: Option<f64>,
        server: Option<u32>,
        connections: usize,
    ) -> Figures {
        let cpu_before = server.map(cpu_ticks);
        let mut cmd = self.oha(token);
        cmd.arg("-z").arg(format!("{}s", self.seconds)).arg("-c").arg(connections.to_string());
        if let Some(r) = rate {
            cmd.arg("-q").arg(format!("{}", r.round() as u64)).arg("--latency-correction");
        }
        let out = cmd.arg(url).output().expect("oha");
        assert!(out.status.success(), "oha: {}", String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("oha JSON");
        let pct = |p: &str| json["latencyPercentiles"][p].as_f64().unwrap_or(f64::NAN) * 1e6;
        let statuses = json["statusCodeDistribution"].as_object().cloned().unwrap_or_default();
        let errors = statuses
            .iter()
            .filter(|(code, _)| !code.starts_with('2'))
            .map(|(_, n)| n.as_u64().unwrap_or(0))
            .sum::<u64>()
            + json["errorDistribution"].as_object().map_or(0, |e| {
                // The requests still in flight when the run's time is up are not failures.
                e.iter().filter(|(k, _)| !k.contains("deadline")).filter_map(|(_, v)| v.as_u64()).sum()
            });
        let rps = json["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0);
        let requests = rps * json["summary"]["total"].as_f64().unwrap_or(0.0);
        let (cpu_us, user_us) = match (server, cpu_before) {
            // /proc counts in clock ticks of 10 ms.
            (Some(pid), Some((user, system))) if requests > 0.0 => {
                let (user_after, system_after) = cpu_ticks(pid);
                let per_request = |ticks: u64| Some(ticks as f64 * 10_000.0 / requests);
                (per_request(user_after + system_after - user - system), per_request(user_after - user))
            }
            _ => (None, None),
        };
        Figures { rps, cpu_us, user_us, p50_us: pct("p50"), p99_us: pct("p99"), errors }
    }

    /// oha on the load generator's CPUs, JSON output, presenting `token` as a bearer token.
    fn oha(&self, token: Option<&str>) -> Command {
        let mut cmd = pinned(&self.cpus, &self.oha);
        cmd.args(["--no-tui", "--output-format", "json"]);
        if let Some(t) = token {
            cmd.arg("-H").arg(format!("Authorization: Bearer {t}"));
        }
        cmd
    }

    /// Exactly `n` requests on 4 connections, as fast as answered; every one must succeed.
    fn requests(&self, url: &str, token: Option<&str>, n: usize) {
        let mut cmd = self.oha(token);
        cmd.args(["-c", "4", "-n"]).arg(n.to_string());
        let out = cmd.arg(url).output().expect("oha");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("oha JSON");
        let ok = json["statusCodeDistribution"]["200"].as_u64().unwrap_or(0);
        assert_eq!(ok, n as u64, "{url}: {}", String::from_utf8_lossy(&out.stdout));
    }

    /// The two open-loop measurements of `token` alone (the closed loop left out, as NaN).
    fn open(&self, url: &str, token: &str, rate: f64) -> Row {
        let none = Figures {
            rps: f64::NAN,
            cpu_us: None,
            user_us: None,
            p50_us: f64::NAN,
            p99_us: f64::NAN,
            errors: 0,
        };
        Row {
            closed: none,
            loaded: self.run(url, Some(token), Some(rate), None),
            light: self.run_with(url, Some(token), Some(self.light_rate), None, LIGHT_CONNECTIONS),
        }
    }

    /// Closed loop, open loop at `rate`, and open loop at the light rate on few connections.
    fn all(&self, url: &str, token: Option<&str>, rate: f64, server: Option<u32>) -> Row {
        Row {
            closed: self.run(url, token, None, server),
            loaded: self.run(url, token, Some(rate), None),
            light: self.run_with(url, token, Some(self.light_rate), None, LIGHT_CONNECTIONS),
        }
    }
}

/// Connections of the light open-loop measurement: few, so that requests seldom queue behind each
/// other and the latency shows what one request costs.
const LIGHT_CONNECTIONS: usize = 4;

#[derive(Debug, Clone, Copy)]
struct Row {
    closed: Figures,
    loaded: Figures,
    light: Figures,
}

/// User and system CPU time of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) are space-separated; utime and stime
    // are the 14th and 15th fields of the line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    (field(11), field(12))
}

/// Sends never-seen tokens, each once, with `concurrency` requests in flight, until stopped or
/// out of tokens. Counts what it sent.
fn storm(
    url: String,
    tokens: Arc<std::sync::Mutex<std::vec::IntoIter<String>>>,
    concurrency: usize,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let client = reqwest::Client::new();
            let mut tasks = Vec::new();
            for _ in 0..concurrency {
                let (client, tokens, stop, sent, url) =
                    (client.clone(), tokens.clone(), stop.clone(), sent.clone(), url.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let Some(t) = tokens.lock().unwrap().next() else { return };
                        let _ = client.get(&url).bearer_auth(t).timeout(Duration::from_secs(60)).send().await;
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        });
    })
}

// ---------------------------------------------------------------------------------------------
// Tollgate's set-up: a config, records in the embedded store, then `tollgate serve`.

struct Tollgate {
    _proc: Proc,
    config: PathBuf,
    port: u16,
    pat: String,
    jwt: String,
    storm: Vec<String>,
    _dir: tempfile::TempDir,
}

fn start_tollgate(cores: &Cores, origin: u16, storm_tokens: usize) -> Tollgate {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let key = dir.path().join("k1.pem");
    std::fs::write(&key, tollgate::jwt::generate_key(jsonwebtoken::Algorithm::EdDSA).unwrap()).unwrap();
    let config_text = format!(
        r#"
listen: 127.0.0.1:{port}
threads: 1
admin: {{ listen: "127.0.0.1:{admin}" }}
store: {{ embedded: {{ path: "{store}" }} }}
log: {{ level: warn, access: false }}
argon2: {{ memory_kib: {argon2_kib} }}
jwt:
  signing_key: k1
  keys: [ {{ kid: k1, key_file: "{key}" }} ]
orgs: {{ acme: {{ projects: {{ shop: {{ environments: [production] }} }} }} }}
routes:
  - {{ name: bench, path: /, upstream: "127.0.0.1:{origin}", org: acme, project: shop, environment: production }}
"#,
        store = dir.path().join("store.redb").display(),
        key = key.display(),
        argon2_kib = env_or("LOAD_ARGON2_MEMORY_KIB", 19456u32),
    );
    let config_path = dir.path().join("tollgate.yaml");
    std::fs::write(&config_path, &config_text).unwrap();
    let config = Config::parse(&config_text).unwrap();

    // Records first, while no gateway holds the embedded store's file.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (pat, service_token, storm) = runtime.block_on(async {
        // Setting up is not what is measured: thousands of argon2 hashes on two cores can hold a
        // store call past the gateway's 500 ms bound (a run once stopped here), so the set-up's
        // store waits longer.
        let setup = StoreSettings { timeout: Duration::from_secs(30), ..config.store.clone() };
        let store = store::open(&setup, config.audit_max).unwrap();
        let params = config.argon2.params;
        lifecycle::ensure_org(&store, "acme").await.unwrap();
        let attrs: Attributes = serde_json::from_value(serde_json::json!({"team": "bench"})).unwrap();
        let user =
            lifecycle::create_user(&store, "acme", "bench@acme.io", Role::Editor, BTreeMap::new(), attrs)
                .await
                .unwrap();
        let owner = Owner::User(user.id.clone());
        let (pat, _) = lifecycle::issue_token(&store, params, "acme", owner.clone(), TokenSpec::default())
            .await
            .unwrap();
        let roles = BTreeMap::from([("shop".to_string(), Role::Editor)]);
        let service =
            lifecycle::create_service(&store, "acme", "embed", None, roles, Attributes::new(), None)
                .await
                .unwrap();
        let (st, _) =
            lifecycle::issue_token(&store, params, "acme", Owner::Service(service.id), TokenSpec::default())
                .await
                .unwrap();
        eprintln!("issuing {storm_tokens} storm tokens (argon2 with the default parameters)");
        let mut storm = Vec::with_capacity(storm_tokens);
        for chunk in (0..storm_tokens).collect::<Vec<_>>().chunks(4) {
            let issued = futures_util::future::join_all(chunk.iter().map(|_| {
                lifecycle::issue_token(&store, params, "acme", owner.clone(), TokenSpec::default())
            }))
            .await;
            storm.extend(issued.into_iter().map(|r| r.unwrap().0.token));
        }
        (pat.token, st.token, storm)
    });
    drop(runtime);

    let mut cmd = pinned(&cores.servers, Path::new(env!("CARGO_BIN_EXE_tollgate")));
    cmd.arg("serve").arg("--config").arg(&config_path);
    let proc = spawn(cmd, "tollgate");
    wait_for(port, "tollgate");
    wait_for(admin, "tollgate admin API");

    // The ephemeral credential, minted as a service would.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let jwt = runtime.block_on(async {
        let answer: serde_json::Value = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{admin}/v1/orgs/acme/projects/shop/credentials"))
            .bearer_auth(&service_token)
            .json(&serde_json::json!({"attributes": {"tenant": "t-1"}, "ttl_seconds": 3600}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["token"].as_str().expect("minted").to_string()
    });
    Tollgate { _proc: proc, config: config_path, port, pat, jwt, storm, _dir: dir }
}

/// nginx in one process (`master_process off`), so that stopping it leaves no worker behind: a
/// master killed outright orphans its workers, which would go on running on the proxies' CPU.
fn start_nginx(cores: &Cores, origin: u16) -> Option<(Proc, u16, tempfile::TempDir)> {
    let nginx =
        ["nginx", "/usr/sbin/nginx"].into_iter().find(|n| Command::new(n).arg("-v").output().is_ok())?;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = format!(
        r#"
worker_processes 1;
daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream origin {{ server 127.0.0.1:{origin}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"#,
        dir = dir.path().display()
    );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let mut cmd = pinned(&cores.servers, Path::new(nginx));
    cmd.arg("-p").arg(dir.path()).arg("-c").arg(&conf_path);
    let proc = spawn(cmd, "nginx");
    wait_for(port, "nginx");
    Some((proc, port, dir))
}

fn self_exe(cpus: &Option<String>, role: &str, args: &[u16]) -> Command {
    let mut cmd = pinned(cpus, &std::env::current_exe().unwrap());
    cmd.env(ROLE, role).args(args.iter().map(u16::to_string));
    cmd
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let n = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
    format!("{n} × {cpu}")
}

fn main() {
    let mut args = std::env::args().skip(1);
    match std::env::var(ROLE).as_deref() {
        Ok("origin") => return run_origin(args.next().unwrap().parse().unwrap()),
        Ok("passthrough") => {
            let port = args.next().unwrap().parse().unwrap();
            return run_passthrough(port, args.next().unwrap().parse().unwrap());
        }
        _ => {}
    }
    // `cargo test --benches` runs benches without `--bench`; do the work only under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }

    let cores = cores();
    let machine = machine();
    if let Some(load) = &cores.load {
        // This process (the storm, the set-up) stays off the servers' core.
        let _ = Command::new("taskset")
            .args(["-a", "-p", "-c", load])
            .arg(std::process::id().to_string())
            .output();
    }
    let load = Load {
        oha: oha(),
        cpus: cores.load.clone(),
        seconds: env_or("LOAD_SECONDS", 10),
        connections: env_or("LOAD_CONNECTIONS", 32),
        light_rate: env_or("LOAD_LIGHT_RATE", 2000.0),
    };
    let fraction: f64 = env_or("LOAD_RATE_FRACTION", 0.25);

    let origin_port = free_port();
    let _origin = spawn(self_exe(&cores.load, "origin", &[origin_port]), "origin");
    wait_for(origin_port, "origin");
    let pingora_port = free_port();
    let _pingora = spawn(self_exe(&cores.servers, "passthrough", &[pingora_port, origin_port]), "pingora");
    wait_for(pingora_port, "plain pingora");
    let nginx = start_nginx(&cores, origin_port);
    // About 1,000 cold tokens go per storm round, and as many to the main table's storm row.
    let storm_rounds_asked = env_or("STORM_ROUNDS", 5usize).max(1);
    let tg = start_tollgate(&cores, origin_port, env_or("STORM_TOKENS", 1300 * (storm_rounds_asked + 1)));
    let url = |port: u16| format!("http://127.0.0.1:{port}/items");

    // Warm every path once (connections, caches), then measure plain Pingora first: its
    // throughput sets the open-loop rate for everyone.
    for token in [&tg.pat, &tg.jwt] {
        let _ = load.run(&url(tg.port), Some(token), Some(100.0), None);
    }
    // Plain Pingora too: the same warm-up before the loop that sets every target's rate.
    let _ = load.run(&url(pingora_port), None, Some(100.0), None);
    let pingora_pid = Some(_pingora.0.id());
    let tollgate_pid = Some(tg._proc.0.id());
    let pingora_closed = load.run(&url(pingora_port), None, None, pingora_pid);
    let rate = pingora_closed.rps * fraction;
    eprintln!("plain pingora: {:.0} req/s closed loop; open-loop rate {rate:.0} req/s", pingora_closed.rps);
    let pingora = Row {
        closed: pingora_closed,
        loaded: load.run(&url(pingora_port), None, Some(rate), None),
        light: load.run_with(&url(pingora_port), None, Some(load.light_rate), None, LIGHT_CONNECTIONS),
    };

    let mut rows: Vec<(&str, Row)> = vec![("direct origin", load.all(&url(origin_port), None, rate, None))];
    if let Some((_, port, _)) = &nginx {
        rows.push(("nginx (plain proxy)", load.all(&url(*port), None, rate, None)));
    }
    rows.push(("plain pingora", pingora));
    rows.push(("tollgate, cached PAT", load.all(&url(tg.port), Some(&tg.pat), rate, tollgate_pid)));
    rows.push(("tollgate, ephemeral JWT", load.all(&url(tg.port), Some(&tg.jwt), rate, tollgate_pid)));

    // Side-by-side rounds: plain Pingora and the cached PAT back to back (closed loop, then the
    // light open loop), the order alternating, so that drift of a shared machine falls on both
    // alike; the throughput and added-latency verdicts are medians of the rounds, not one pair of
    // runs measured minutes apart.
    let throughput_rounds = env_or("THROUGHPUT_ROUNDS", 5usize).max(1);
    let mut pairs: Vec<SideBySide> = Vec::with_capacity(throughput_rounds);
    for round in 0..throughput_rounds {
        let measure = |port: u16, token: Option<&str>, pid: Option<u32>| {
            let closed = load.run(&url(port), token, None, pid);
            (closed, load.run_with(&url(port), token, Some(load.light_rate), None, LIGHT_CONNECTIONS))
        };
        let plain = || measure(pingora_port, None, pingora_pid);
        let pat = || measure(tg.port, Some(&tg.pat), tollgate_pid);
        let ((pingora, pingora_light), (tollgate, tollgate_light)) = if round % 2 == 0 {
            let p = plain();
            (p, pat())
        } else {
            let t = pat();
            (plain(), t)
        };
        pairs.push(SideBySide { pingora, tollgate, pingora_light, tollgate_light });
    }

    let storm_tokens = tg.storm.len();
    let tokens = Arc::new(std::sync::Mutex::new(tg.storm.clone().into_iter()));
    // The main table's storm row: the whole measurement (the closed loop, then the open loops)
    // with a storm running, apart from the rounds, whose sides must be measured alike. (During its
    // closed loop the proxy takes the whole CPU, and the argon2 threads, at the lowest priority,
    // little of it: the cold tokens sent say how much of a storm there was.)
    let storm_row_sent = {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let storm_thread = storm(url(tg.port), tokens.clone(), 16, stop.clone(), sent.clone());
        std::thread::sleep(STORM_RAMP);
        rows.push((
            "tollgate, cached PAT + cold storm",
            load.all(&url(tg.port), Some(&tg.pat), rate, tollgate_pid),
        ));
        stop.store(true, Ordering::Relaxed);
        let _ = storm_thread.join();
        sent.load(Ordering::Relaxed)
    };

    // The storm: rounds of the cached-PAT open-loop measurements without and with a storm
    // running, back to back, the order alternating (and the same pause before each), so that drift
    // of the machine, and whatever follows a measurement, falls on both sides alike.
    // An idle argon2 thread frees its memory `ARGON2_MEMORY_KEPT` after its last run: a calm side
    // that would span that moment waits it out first, so that no side holds the release (a storm
    // side's allocating afresh is the storm's own cost).
    let storm_ended = std::cell::Cell::new(Instant::now());
    let rounds = storm_rounds_asked;
    let mut storm_rounds = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let calm = || {
            let freed = storm_ended.get() + tollgate::auth::ARGON2_MEMORY_KEPT + Duration::from_secs(1);
            let takes = STORM_RAMP + Duration::from_secs(2 * load.seconds + 2);
            let now = Instant::now();
            if now < freed && now + takes > freed - Duration::from_secs(1) {
                std::thread::sleep(freed - now);
            }
            std::thread::sleep(STORM_RAMP);
            load.open(&url(tg.port), &tg.pat, rate)
        };
        let stormy = || {
            let stop = Arc::new(AtomicBool::new(false));
            let sent = Arc::new(AtomicUsize::new(0));
            let storm_thread = storm(url(tg.port), tokens.clone(), 16, stop.clone(), sent.clone());
            std::thread::sleep(STORM_RAMP);
            let row = load.open(&url(tg.port), &tg.pat, rate);
            let out_of_tokens = tokens.lock().unwrap().len() == 0;
            stop.store(true, Ordering::Relaxed);
            // Every storm request in flight is answered (its argon2 run done) before this returns.
            let _ = storm_thread.join();
            storm_ended.set(Instant::now());
            (row, sent.load(Ordering::Relaxed), out_of_tokens)
        };
        let (calm, (stormy, sent, out_of_tokens)) = if round % 2 == 0 {
            (calm(), stormy())
        } else {
            let s = stormy();
            (calm(), s)
        };
        storm_rounds.push(StormRound { calm, stormy, sent, out_of_tokens });
    }

    // Instructions per request, counted by callgrind where valgrind is installed: the ratio no
    // neighbour on a shared machine can move. The gateway is restarted under valgrind (the
    // embedded store is one process at a time).
    let Tollgate { _proc: tollgate_proc, config: tollgate_config, port: tollgate_port, pat, .. } = tg;
    drop(tollgate_proc);
    let instructions = callgrind().then(|| {
        let port = free_port();
        let (mut passthrough, out) =
            under_callgrind(&std::env::current_exe().unwrap(), &[port.to_string(), origin_port.to_string()]);
        let plain = count_instructions(&load, (passthrough.env(ROLE, "passthrough"), &out), port, None);
        let (mut serve, out) = under_callgrind(
            Path::new(env!("CARGO_BIN_EXE_tollgate")),
            &["serve".into(), "--config".into(), tollgate_config.display().to_string()],
        );
        let gateway = count_instructions(&load, (&mut serve, &out), tollgate_port, Some(&pat));
        (plain, gateway)
    });

    // The table.
    let base = pingora;
    println!();
    println!(
        "Load benchmark: {} s per measurement; closed loop on {} connections; open loop (coordinated omission corrected) light: {:.0} req/s on {LIGHT_CONNECTIONS} connections, loaded: {rate:.0} req/s on {} connections",
        load.seconds, load.connections, load.light_rate, load.connections
    );
    println!(
        "machine: {}; proxies pinned to CPU {}, load generator and origin to CPU {}",
        machine,
        cores.servers.as_deref().unwrap_or("-"),
        cores.load.as_deref().unwrap_or("-")
    );
    println!();
    // Every figure with its ratio to plain Pingora's.
    let ratio = |v: f64, b: f64, decimals: usize| format!("{v:.decimals$} ({:.2}×)", v / b);
    println!("| target | req/s (closed) | × pingora | CPU µs/req | light p50 µs | light p99 µs | light p50 − pingora µs | loaded p50 µs | loaded p99 µs | errors |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, r) in &rows {
        println!(
            "| {name} | {:.0} | {:.3} | {} | {} | {} | {:+.0} | {} | {} | {} |",
            r.closed.rps,
            r.closed.rps / base.closed.rps,
            match (r.closed.cpu_us, base.closed.cpu_us) {
                (Some(c), Some(b)) => ratio(c, b, 1),
                (c, _) => c.map_or("-".to_string(), |c| format!("{c:.1}")),
            },
            ratio(r.light.p50_us, base.light.p50_us, 0),
            ratio(r.light.p99_us, base.light.p99_us, 0),
            r.light.p50_us - base.light.p50_us,
            ratio(r.loaded.p50_us, base.loaded.p50_us, 0),
            ratio(r.loaded.p99_us, base.loaded.p99_us, 0),
            r.closed.errors + r.loaded.errors + r.light.errors,
        );
    }
    println!(
        "(the storm row: {storm_row_sent} cold tokens sent over its closed and open loops; in the closed loop the proxy leaves argon2 little CPU)"
    );
    println!();
    println!(
        "Side-by-side rounds: plain pingora and the cached PAT back to back (order alternating): closed loop, then the light open loop"
    );
    println!();
    println!("| round | pingora req/s | cached PAT req/s | × | pingora CPU µs/req (user + kernel) | cached PAT CPU µs/req (user + kernel) | added CPU µs (user + kernel) | pingora light p50 µs | cached PAT light p50 µs | added p50 µs | errors |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (i, r) in pairs.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.0} | {:.3} | {} | {} | {} | {:.0} | {:.0} | {:+.0} | {} |",
            i + 1,
            r.pingora.rps,
            r.tollgate.rps,
            r.ratio(),
            cpu_split(r.pingora.cpu_us, r.pingora.user_us, false),
            cpu_split(r.tollgate.cpu_us, r.tollgate.user_us, false),
            cpu_split(r.added_cpu_us(), r.added_user_us(), true),
            r.pingora_light.p50_us,
            r.tollgate_light.p50_us,
            r.added_p50_us(),
            r.pingora.errors + r.tollgate.errors + r.pingora_light.errors + r.tollgate_light.errors,
        );
    }
    println!();
    println!(
        "Storm rounds: cached-PAT p99 without and with a storm of never-seen tokens, back to back, the order alternating ({storm_tokens} issued; 16 in flight)"
    );
    println!();
    println!("| round | loaded p99 µs | with storm | × | light p99 µs | with storm | × | cold tokens sent | errors |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (i, r) in storm_rounds.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} | {}{} | {} |",
            i + 1,
            r.calm.loaded.p99_us,
            r.stormy.loaded.p99_us,
            r.loaded_ratio(),
            r.calm.light.p99_us,
            r.stormy.light.p99_us,
            r.light_ratio(),
            r.sent,
            if r.out_of_tokens { " (ran out of tokens: raise STORM_TOKENS)" } else { "" },
            r.calm.loaded.errors + r.calm.light.errors + r.stormy.loaded.errors + r.stormy.light.errors,
        );
    }

    let find = |name: &str| rows.iter().find(|r| r.0 == name).map(|r| r.1).unwrap();
    let pat = find("tollgate, cached PAT");
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!();
    println!("targets:");
    let ratio = median(pairs.iter().map(SideBySide::ratio).collect());
    println!(
        "- cached-PAT throughput, median of {throughput_rounds} rounds: {ratio:.3}× plain pingora (≥ 0.95): {}",
        verdict(ratio >= 0.95)
    );
    let added_cpu: Vec<f64> = pairs.iter().filter_map(SideBySide::added_cpu_us).collect();
    if !added_cpu.is_empty() {
        let pingora_cpu = median(pairs.iter().filter_map(|r| r.pingora.cpu_us).collect());
        let pingora_user = median(pairs.iter().filter_map(|r| r.pingora.user_us).collect());
        let added_user = median(pairs.iter().filter_map(SideBySide::added_user_us).collect());
        let added_kernel =
            median(pairs.iter().filter_map(|r| Some(r.added_cpu_us()? - r.added_user_us()?)).collect());
        // Throughput P / (P + A) ≥ 0.95 when the added CPU A is at most P / 19.
        println!(
            "- CPU per request, median of the rounds: authentication adds {:.1} µs (user {added_user:+.1}, kernel {added_kernel:+.1}) to plain pingora's {pingora_cpu:.1} µs (user {pingora_user:.1}, kernel {:.1}); 0.95× allows {:.1} µs",
            median(added_cpu),
            pingora_cpu - pingora_user,
            pingora_cpu / 19.0
        );
    }
    if let Some((plain, gateway)) = instructions {
        println!(
            "- user-space instructions per request (callgrind, {COUNTED_REQUESTS} requests): tollgate {:.1} k, plain pingora {:.1} k: {:.3}× ({:.3}× in throughput if time followed instructions)",
            gateway / 1e3,
            plain / 1e3,
            gateway / plain,
            plain / gateway
        );
        // Cycles can follow instructions only so loosely: a median well above the instruction
        // bound says the machine drifted between the rounds' halves, not that the code got cheaper.
        if ratio > plain / gateway + 0.05 {
            let cpu = pairs.iter().filter_map(|r| r.pingora.cpu_us);
            let range =
                cpu.clone().reduce(f64::min).zip(cpu.reduce(f64::max)).map_or(String::new(), |(l, h)| {
                    format!("; plain pingora's CPU per request ranged {l:.1}–{h:.1} µs over the rounds")
                });
            println!(
                "  caution: the throughput median is above the {:.3}× the instruction count allows{range}: the machine drifted, read this run's throughput verdict with the instruction ratio",
                plain / gateway
            );
        }
    }
    let added = median(pairs.iter().map(SideBySide::added_p50_us).collect());
    println!(
        "- added p50 latency at the light rate, median of {throughput_rounds} rounds: {added:.0} µs (≤ 20 µs): {}",
        verdict(added <= 20.0)
    );
    let loaded_added = pat.loaded.p50_us - base.loaded.p50_us;
    println!("  (at the loaded rate: {loaded_added:.0} µs, queueing included)");
    // Only rounds whose storm lasted the whole measurement decide.
    let stormy: Vec<&StormRound> = storm_rounds.iter().filter(|r| !r.out_of_tokens).collect();
    let left_out = match storm_rounds.len() - stormy.len() {
        0 => String::new(),
        n => format!(" ({n} left out: their storm ran out of tokens)"),
    };
    if stormy.is_empty() {
        println!("- cached-PAT p99 under a cold storm: no round had a storm throughout: raise STORM_TOKENS");
    } else {
        let storm_ratio = median(stormy.iter().map(|r| r.loaded_ratio()).collect());
        let light_storm = median(stormy.iter().map(|r| r.light_ratio()).collect());
        println!(
            "- cached-PAT p99 under a cold storm, median of {} rounds{left_out}: {storm_ratio:.2}× without at the loaded rate, {light_storm:.2}× at the light rate (≤ 1.5 both): {}",
            stormy.len(),
            verdict(storm_ratio <= 1.5 && light_storm <= 1.5)
        );
    }
}

/// CPU per request as `total (user + kernel)`, signed when it is a `difference`.
fn cpu_split(total: Option<f64>, user: Option<f64>, difference: bool) -> String {
    match (total, user) {
        (Some(t), Some(u)) if difference => format!("{t:+.1} ({u:+.1} {:+.1})", t - u),
        (Some(t), Some(u)) => format!("{t:.1} ({u:.1} + {:.1})", t - u),
        _ => "-".to_string(),
    }
}

/// The pause before each storm-round measurement (the storm gets it to reach its 16 in flight).
const STORM_RAMP: Duration = Duration::from_millis(500);

/// Requests counted by callgrind, after as many again to warm up.
const COUNTED_REQUESTS: usize = 2000;

/// Whether valgrind's callgrind and its control script are installed.
fn callgrind() -> bool {
    ["valgrind", "callgrind_control"]
        .iter()
        .all(|p| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()))
}

/// `program` with `args` under callgrind, and where its profile goes (the temporary directory).
fn under_callgrind(program: &Path, args: &[String]) -> (Command, PathBuf) {
    let mut cmd = Command::new("valgrind");
    let out =
        std::env::temp_dir().join(format!("tollgate-load-{}-{}.callgrind", std::process::id(), args[0]));
    cmd.arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(program)
        .args(args);
    (cmd, out)
}

/// User-space instructions per request of the process `cmd` starts (listening on `port`): warm-up
/// requests, counters zeroed, [`COUNTED_REQUESTS`] requests on 4 keep-alive connections, counters
/// dumped and read. Counts are the same run after run for the same binary and inputs.
fn count_instructions(load: &Load, (cmd, out): (&mut Command, &Path), port: u16, token: Option<&str>) -> f64 {
    let proc = Proc(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("valgrind"));
    wait_for_within(port, "a proxy under callgrind", Duration::from_secs(300));
    let url = format!("http://127.0.0.1:{port}/items");
    load.requests(&url, token, COUNTED_REQUESTS);
    let pid = proc.0.id().to_string();
    let control = |what: &str| {
        let ok =
            Command::new("callgrind_control").arg(what).arg(&pid).output().is_ok_and(|o| o.status.success());
        assert!(ok, "callgrind_control {what} {pid}");
    };
    control("-z");
    load.requests(&url, token, COUNTED_REQUESTS);
    control("-d");
    drop(proc);
    let dump = PathBuf::from(format!("{}.1", out.display()));
    let text = std::fs::read_to_string(&dump).expect("callgrind dump");
    let _ = std::fs::remove_file(&dump);
    let _ = std::fs::remove_file(out);
    let total: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")))
        .and_then(|n| n.trim().parse().ok())
        .expect("callgrind totals");
    total / COUNTED_REQUESTS as f64
}

/// Plain Pingora and the cached PAT measured back to back: closed loop, then the light open loop.
struct SideBySide {
    pingora: Figures,
    tollgate: Figures,
    pingora_light: Figures,
    tollgate_light: Figures,
}

impl SideBySide {
    fn added_p50_us(&self) -> f64 {
        self.tollgate_light.p50_us - self.pingora_light.p50_us
    }
    fn ratio(&self) -> f64 {
        self.tollgate.rps / self.pingora.rps
    }
    fn added_cpu_us(&self) -> Option<f64> {
        Some(self.tollgate.cpu_us? - self.pingora.cpu_us?)
    }
    fn added_user_us(&self) -> Option<f64> {
        Some(self.tollgate.user_us? - self.pingora.user_us?)
    }
}

/// The cached-PAT open-loop figures of one storm round, without and with the storm.
struct StormRound {
    calm: Row,
    stormy: Row,
    sent: usize,
    out_of_tokens: bool,
}

impl StormRound {
    fn loaded_ratio(&self) -> f64 {
        self.stormy.loaded.p99_us / self.calm.loaded.p99_us
    }
    fn light_ratio(&self) -> f64 {
        self.stormy.light.p99_us / self.calm.light.p99_us
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}
