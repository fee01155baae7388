//! Assembles the running gateway: one Pingora server built from our [`Config`], with the proxy
//! service and the invalidation follower as a background service.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};

use crate::admin::{AdminService, AdminState};
use crate::audit::LastUseLog;
use crate::auth::Verifier;
use crate::cache::Cache;
use crate::config::Config;
use crate::metrics::{Metrics, ProxyMetrics};
use crate::proxy::Gateway;
use crate::store;

/// Follows the store's invalidation feed for the cache until shutdown.
struct Follower(Arc<Cache>);

#[async_trait]
impl BackgroundService for Follower {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let stop = Box::pin(async move {
            let _ = shutdown.changed().await;
        });
        self.0.follow(stop).await;
    }
}

/// Writes last-use records in batches until shutdown.
struct LastUseFlusher {
    log: Arc<LastUseLog>,
    store: store::Store,
    interval: std::time::Duration,
}

#[async_trait]
impl BackgroundService for LastUseFlusher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let stop = Box::pin(async move {
            let _ = shutdown.changed().await;
        });
        self.log.run(&self.store, self.interval, stop).await;
    }
}

/// Reloads the config on SIGHUP and when the file changes. An invalid file is refused with every
/// error logged, and the running config stays. New requests use the new config; requests in flight
/// keep the one they started with.
struct ConfigWatcher {
    path: PathBuf,
    config: Arc<ArcSwap<Config>>,
    /// The config the process started with: what the settings read once at start still are.
    started: Arc<Config>,
    /// Trims the audit log to the reloaded `audit.max_entries`.
    store: store::Store,
    /// The file's stamp from just before `started` was read: an edit made after that, before
    /// the watcher starts, is applied at its start, not left waiting for the next edit.
    loaded: Option<FileStamp>,
    /// A `SIGHUP` stops the gateway instead of reloading it: quickstart's, in a terminal that
    /// closes (whose hangup would otherwise leave it serving unseen, holding its ports).
    hangup_stops: bool,
}

/// The settings read once at start that differ in `new`: they apply only after a restart.
fn needs_restart(started: &Config, new: &Config) -> Vec<&'static str> {
    [
        ("listen", started.listen != new.listen),
        ("admin.listen", started.admin.listen != new.admin.listen),
        ("admin.last_use_flush", started.admin.last_use_flush != new.admin.last_use_flush),
        ("threads", started.threads != new.threads),
        // The real settings, password included: the redacted `Debug` would hide a changed one.
        ("store", started.store != new.store),
        ("cache", started.cache != new.cache),
        ("argon2.max_concurrency", started.argon2.max_concurrency != new.argon2.max_concurrency),
        ("argon2.max_wait", started.argon2.max_wait != new.argon2.max_wait),
        ("shutdown.grace", started.shutdown.grace != new.shutdown.grace),
        ("shutdown.timeout", started.shutdown.timeout != new.shutdown.timeout),
        ("log.level", started.log_level != new.log_level),
    ]
    .into_iter()
    .filter_map(|(field, changed)| changed.then_some(field))
    .collect()
}

/// How often the config file is checked for changes. A change is applied once the file has held
/// still for one interval, so an editor that empties the file and then writes it is not read
/// half-way.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// A file's modification time, length and a digest of its contents: on a file system that keeps
/// times to the second (or two, or an NFS or container mount's), an edit of the same length in
/// the same second as the last would leave time and length as they were.
pub type FileStamp = (std::time::SystemTime, u64, u64);

/// The config file's stamp, to be taken just before it is read and handed to [`run`].
pub fn file_stamp(path: &Path) -> Option<FileStamp> {
    use std::hash::{Hash, Hasher};
    let modified = std::fs::metadata(path).ok()?.modified().unwrap_or(std::time::UNIX_EPOCH);
    let text = std::fs::read(path).ok()?;
    let mut digest = std::hash::DefaultHasher::new();
    text.hash(&mut digest);
    Some((modified, text.len() as u64, digest.finish()))
}

/// Set by a `SIGHUP` that came before the config watcher listened for one.
static EARLY_HANGUP: std::sync::OnceLock<Arc<std::sync::atomic::AtomicBool>> = std::sync::OnceLock::new();

/// Set by a `SIGTERM` or `SIGQUIT` that came before the shutdown watch listened for one.
static EARLY_STOP: std::sync::OnceLock<Arc<std::sync::atomic::AtomicBool>> = std::sync::OnceLock::new();

/// Called first thing by the commands that serve. A `SIGHUP` from here until the config watcher
/// starts (a deploy tool's "restart, then reload" sends it while the store is still being
/// checked) is a reload once the watcher starts, not the end of the process, which is its
/// default action. A `SIGTERM` (or `SIGQUIT`) before the shutdown watch starts is a graceful
/// shutdown once it does: as a container's first process, which the kernel spares the default
/// action, it would otherwise be lost, and the container stopped only by `SIGKILL`. (`SIGINT`
/// keeps its default: Ctrl-C during start-up stops at once.)
pub fn catch_early_signals() {
    use signal_hook::consts::{SIGHUP, SIGQUIT, SIGTERM};
    let hangup = EARLY_HANGUP.get_or_init(Arc::default);
    if let Err(e) = signal_hook::flag::register(SIGHUP, hangup.clone()) {
        tracing::warn!(error = %e, "a SIGHUP during start-up would end the process");
    }
    let stop = EARLY_STOP.get_or_init(Arc::default);
    for signal in [SIGTERM, SIGQUIT] {
        if let Err(e) = signal_hook::flag::register(signal, stop.clone()) {
            tracing::warn!(error = %e, signal, "a stop signal during start-up would end the process at once");
        }
    }
}

/// Whether a `SIGHUP` came before the watcher listened for one (and forgets it).
fn early_hangup() -> bool {
    EARLY_HANGUP.get().is_some_and(|flag| flag.swap(false, std::sync::atomic::Ordering::SeqCst))
}

impl ConfigWatcher {
    /// Applies the file if it is valid; returns the settings it changed that need a restart (each
    /// also logged).
    fn reload(&self, why: &str) -> Vec<&'static str> {
        // Read once: what is checked is what is applied.
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) => {
                tracing::error!(path = %self.path.display(), why, error = %e, "config reload refused: the file cannot be read; the running config stays");
                return Vec::new();
            }
        };
        // A file with no settings (empty, only comments, `---`, `{}`, `null`), or whose `routes:`
        // holds nothing, is a valid config with no routes; on a reload it is a file being written
        // (or a mistake), never a wish to refuse every request.
        if let Some(refusal) = crate::config::reload_refusal(&text) {
            tracing::error!(
                path = %self.path.display(),
                why,
                "config reload refused: {refusal}; the running config stays"
            );
            return Vec::new();
        }
        match Config::parse_reload(&text, &self.started) {
            Ok(new) => {
                // Compared with what runs, not with the last file: a setting put back is no
                // change, and one still changed is still reported on every reload.
                let restart = needs_restart(&self.started, &new);
                for field in &restart {
                    tracing::warn!(field, "this setting changed but applies only after a restart");
                }
                self.store.set_audit_max(new.audit_max);
                let routes = new.routes.iter().count();
                self.config.store(Arc::new(new));
                tracing::info!(path = %self.path.display(), why, routes, "config reloaded");
                restart
            }
            Err(e) => {
                // As `check-config` prints them, on one line.
                let errors = e.to_string().lines().collect::<Vec<_>>().join("; ");
                tracing::error!(
                    path = %self.path.display(),
                    why,
                    %errors,
                    "config reload refused; the running config stays"
                );
                Vec::new()
            }
        }
    }
}

/// A graceful shutdown, as on `SIGTERM`, for a hangup that stops the gateway.
fn stop_on_hangup() {
    tracing::info!("SIGHUP (the terminal closed): stopping");
    if let Err(e) = signal_hook::low_level::raise(signal_hook::consts::SIGTERM) {
        tracing::warn!(error = %e, "could not stop on SIGHUP");
    }
}

#[async_trait]
impl BackgroundService for ConfigWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler; reloads follow file changes only");
                None
            }
        };
        let mut stamp = self.loaded;
        // Listened for from here on (above): one that came earlier is applied now.
        let early = early_hangup();
        if early && self.hangup_stops {
            return stop_on_hangup();
        }
        if early {
            stamp = file_stamp(&self.path);
            self.reload("SIGHUP during start-up");
        }
        // A changed stamp waits here for the next tick; it is applied if it is still the same.
        let mut settling = None;
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        // After a stall, no burst of ticks: "held still for one check" means half a second.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    if self.hangup_stops {
                        return stop_on_hangup();
                    }
                    stamp = file_stamp(&self.path);
                    settling = None;
                    self.reload("SIGHUP");
                }
                _ = tick.tick() => {
                    let now = file_stamp(&self.path);
                    if now == stamp {
                        settling = None;
                    } else if settling == Some(now) {
                        stamp = now;
                        settling = None;
                        self.reload("file changed");
                    } else {
                        settling = Some(now);
                    }
                }
            }
        }
    }
}

/// `SIGTERM`: keep accepting for `shutdown.grace` (while load balancers take the instance out),
/// then stop accepting and exit as soon as no request is in flight, or after `shutdown.timeout`
/// at most. `SIGINT`: stop at once. Pingora's own graceful shutdown sleeps its whole grace period
/// and then drops whatever is still running, so the waiting for requests is done here.
struct Shutdown {
    grace: std::time::Duration,
    timeout: std::time::Duration,
    last_use: Arc<LastUseLog>,
    store: store::Store,
}

#[async_trait]
impl ShutdownSignalWatch for Shutdown {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) =
            (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::quit()))
        else {
            tracing::error!("cannot watch for signals; stopping");
            return ShutdownSignal::FastShutdown;
        };
        // One that came during start-up counts as come now.
        let early = EARLY_STOP.get().is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst));
        if !early {
            tokio::select! {
                _ = term.recv() => {}
                _ = quit.recv() => {}
                _ = int.recv() => return ShutdownSignal::FastShutdown,
            }
        }
        crate::drain::begin_shutdown();
        tracing::info!(grace = ?self.grace, "shutting down: still accepting for shutdown.grace; /readyz answers 503");
        tokio::select! {
            _ = tokio::time::sleep(self.grace) => {}
            _ = int.recv() => return ShutdownSignal::FastShutdown,
        }
        // SIGINT still stops at once, whenever it comes (this runtime outlives the handover).
        tokio::spawn(async move {
            int.recv().await;
            tracing::warn!("SIGINT: stopping now");
            std::process::exit(0);
        });
        tracing::info!(timeout = ?self.timeout, in_flight = crate::drain::in_flight(), "no longer accepting; finishing requests in flight");
        let (last_use, store, deadline) =
            (self.last_use.clone(), self.store.clone(), std::time::Instant::now() + self.timeout);
        std::thread::spawn(move || drain(&last_use, &store, deadline));
        ShutdownSignal::GracefulTerminate
    }
}

/// Waits for the requests in flight (until `deadline`), writes the last uses noted meanwhile
/// (after the flusher's own last write, if that is still under way), and exits; whatever is
/// still running at the deadline is stopped.
fn drain(last_use: &LastUseLog, store: &store::Store, deadline: std::time::Instant) {
    match crate::drain::wait_until_idle(deadline) {
        0 => tracing::info!("no request in flight"),
        left => tracing::warn!(left, "shutdown.timeout reached with requests in flight; stopping them"),
    }
    if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
        runtime.block_on(last_use.flush(store));
    }
    tracing::info!("exiting");
    std::process::exit(0);
}

/// [`Verifier::trust_minted`] for each token, against its record as stored (a token whose record
/// cannot be read is proven by argon2 as any other).
fn trust_minted(verifier: &Verifier, store: &store::Store, minted: &[String]) {
    if minted.is_empty() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
    for token in minted {
        let Ok(parsed) = crate::token::parse(token) else { continue };
        if let Ok(Some(record)) = runtime.block_on(store.get_token(&parsed.id)) {
            verifier.trust_minted(token, &record.secret_hash);
        }
    }
}

/// No revocation may be lost: say so at start when the store could lose acknowledged writes.
fn warn_if_not_durable(store: &store::Store) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return tracing::warn!(error = %e, "could not check the store's durability"),
    };
    match runtime.block_on(store.durability_warning()) {
        Ok(None) => {}
        Ok(Some(why)) => tracing::warn!(store = %store.describe(), "store is not durable: {why}"),
        Err(e) => tracing::warn!(
            store = %store.describe(),
            error = %e,
            "could not check at start whether the store is durable (is it reachable?); requests that need it get 503 until it answers"
        ),
    }
}

/// How the gateway is started: by `serve` (the default), or by `quickstart` at a terminal.
#[derive(Debug, Default)]
pub struct Started {
    /// Tokens this process has just issued, whose secrets are known good: their first check
    /// needs no argon2 run.
    pub minted: Vec<String>,
    /// A `SIGHUP` stops the gateway instead of reloading it (see [`ConfigWatcher`]).
    pub hangup_stops: bool,
}

/// Runs the gateway until a shutdown signal; exits the process.
pub fn run(
    config: Config,
    path: &Path,
    loaded: Option<FileStamp>,
    started_by: Started,
) -> anyhow::Result<()> {
    let store = store::open(&config.store, config.audit_max)?;
    warn_if_not_durable(&store);
    let admin_listener = std::net::TcpListener::bind(config.admin.listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on admin.listen {}: {e}", config.admin.listen))?;
    // Pingora binds `listen` in a task of its own and, when it cannot, panics there while the
    // process (and the admin API, `/readyz` included) runs on: try the address first, so that a
    // port in use or an address not on this host stops `serve` with the reason. (The probe is
    // closed again at once; a listening socket that accepted nothing leaves no TIME_WAIT.)
    drop(
        std::net::TcpListener::bind(config.listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on listen {}: {e}", config.listen))?,
    );
    let conf = ServerConf {
        threads: config.threads,
        // Pingora's grace is how long it lets requests run after it stops accepting; `drain` exits
        // sooner, as soon as none is left, and always within `shutdown.timeout` (plus room for
        // its last flush, bounded by the store timeout on Redis; on the embedded store, whose
        // commits are waited for, this grace is the bound).
        grace_period_seconds: Some((config.shutdown.timeout + config.store.timeout).as_secs() + 2),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let cache = Arc::new(Cache::new(store.clone(), config.cache));
    let listener: Arc<dyn store::CommitListener> = cache.clone();
    store.set_listener(Arc::downgrade(&listener));
    let verifier = Arc::new(
        Verifier::new(cache.clone(), config.cache.capacity, config.argon2.max_concurrency)
            .with_argon2_wait(config.argon2.max_wait),
    );
    trust_minted(&verifier, &store, &started_by.minted);
    let (listen, admin_listen) = (config.listen, config.admin.listen);
    let flush_interval = config.admin.last_use_flush;
    let shutdown = config.shutdown;
    let routes = config.routes.iter().count();
    let config = Arc::new(ArcSwap::from_pointee(config));
    let last_use = Arc::new(LastUseLog::default());

    let proxy_metrics = ProxyMetrics::default();
    let metrics = Arc::new(Metrics::new(
        vec![
            Box::new(proxy_metrics.requests.clone()),
            Box::new(proxy_metrics.auth_latency.clone()),
            Box::new(proxy_metrics.proxy_failures.clone()),
            Box::new(cache.stats().lookups.clone()),
            Box::new(cache.stats().evictions.clone()),
            Box::new(cache.stats().invalidations.clone()),
            Box::new(cache.stats().live.clone()),
            Box::new(cache.stats().feed_lost.clone()),
            Box::new(store.stats().latency.clone()),
            Box::new(store.stats().errors.clone()),
            Box::new(store.stats().corrupt.clone()),
        ],
        verifier.stats().clone(),
    ));
    let gateway = Gateway::new(config.clone(), verifier.clone(), last_use.clone(), proxy_metrics);
    let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, gateway);
    proxy.add_tcp(&listen.to_string());
    server.add_service(proxy);
    let watched = config.clone();
    let admin = AdminState { config, verifier, store: store.clone(), metrics, last_use: last_use.clone() };
    server.add_service(AdminService::new(admin_listener, admin));
    server.add_service(background_service("invalidation follower", Follower(cache)));
    let shutdown = Shutdown {
        grace: shutdown.grace,
        timeout: shutdown.timeout,
        last_use: last_use.clone(),
        store: store.clone(),
    };
    let flusher = LastUseFlusher { log: last_use, store: store.clone(), interval: flush_interval };
    server.add_service(background_service("last-use flusher", flusher));
    let started = watched.load_full();
    let watcher = ConfigWatcher {
        path: path.to_path_buf(),
        config: watched,
        started,
        store: store.clone(),
        loaded,
        hangup_stops: started_by.hangup_stops,
    };
    server.add_service(background_service("config watcher", watcher));

    tracing::info!(%listen, %admin_listen, routes, store = %store.describe(), "tollgate gateway listening");
    server.run(RunArgs { shutdown_signal: Box::new(shutdown) });
    std::process::exit(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watcher(dir: &Path, started: &str) -> ConfigWatcher {
        let started = Arc::new(Config::parse(started).unwrap());
        let backend = Arc::new(store::memory::MemoryBackend::default());
        ConfigWatcher {
            path: dir.join("tollgate.yaml"),
            config: Arc::new(ArcSwap::new(started.clone())),
            started,
            store: store::Store::new(backend, std::time::Duration::from_millis(500)),
            loaded: None,
            hangup_stops: false,
        }
    }

    /// One running watcher at a time in this process: a SIGHUP raised by one test would reload
    /// another's watcher, or another's start would take the early-SIGHUP flag first.
    static WATCHING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// A watcher started with `started`, whose file holds `on_disk` as it was read at the start.
    fn watcher_of_file(started: &str, on_disk: &str) -> (tempfile::TempDir, ConfigWatcher) {
        let dir = tempfile::tempdir().unwrap();
        let mut w = watcher(dir.path(), started);
        std::fs::write(&w.path, on_disk).unwrap();
        w.loaded = file_stamp(&w.path);
        (dir, w)
    }

    #[tokio::test]
    async fn an_edit_made_before_the_watcher_starts_is_applied_when_it_starts() {
        let _alone = WATCHING.lock().await;
        let (_dir, w) = watcher_of_file("threads: 2\n", "threads: 2\n");
        // Edited between the start's reading and the watcher's first look.
        std::fs::write(&w.path, "threads: 2\nlog: { access: false }\n").unwrap();
        assert!(watch_until(w, |c| !c.access_log).await, "the edit was applied");
    }

    /// Runs the watcher until `applied` holds of the running config (10 s at most), then stops it.
    async fn watch_until(w: ConfigWatcher, applied: impl Fn(&Config) -> bool) -> bool {
        let w = Arc::new(w);
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let running = tokio::spawn({
            let w = w.clone();
            async move { w.start(shutdown).await }
        });
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while !applied(&w.config.load()) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        stop.send(true).unwrap();
        running.await.unwrap();
        applied(&w.config.load())
    }

    #[tokio::test]
    async fn an_edit_that_keeps_the_files_time_and_length_is_applied() {
        let _alone = WATCHING.lock().await;
        // As on a file system that keeps times to the second: the same length, the same time.
        let (before, after) = ("threads: 2\nlog: { access: true }\n", "threads: 2\nlog: {access: false }\n");
        assert_eq!(before.len(), after.len());
        let (_dir, w) = watcher_of_file(before, before);
        let modified = std::fs::metadata(&w.path).unwrap().modified().unwrap();
        std::fs::write(&w.path, after).unwrap();
        std::fs::File::options().write(true).open(&w.path).unwrap().set_modified(modified).unwrap();
        assert!(watch_until(w, |c| !c.access_log).await, "the edit was applied");
    }

    #[tokio::test]
    async fn a_sighup_during_start_up_is_a_reload_when_the_watcher_starts() {
        let _alone = WATCHING.lock().await;
        // The file as it is when the watcher starts: only the SIGHUP says to read it.
        let (_dir, w) = watcher_of_file("threads: 2\n", "threads: 2\nlog: { access: false }\n");
        catch_early_signals();
        signal_hook::low_level::raise(signal_hook::consts::SIGHUP).unwrap();
        assert!(watch_until(w, |c| !c.access_log).await, "the SIGHUP was applied, and the process is alive");
    }

    #[test]
    fn a_reload_fronting_the_running_listener_is_refused_and_the_old_config_stays() {
        let dir = tempfile::tempdir().unwrap();
        let w = watcher(dir.path(), "listen: 127.0.0.1:18080\nlog: { access: true }\n");
        std::fs::write(
            &w.path,
            "listen: 127.0.0.1:18090\nlog: { access: false }\nroutes:\n  - { path: /, upstream: 127.0.0.1:18080, auth: none }\n",
        )
        .unwrap();
        w.reload("test");
        assert!(w.config.load().access_log, "the running config stays");
        assert_eq!(w.config.load().routes.iter().count(), 0);
    }

    #[test]
    fn a_reload_names_each_setting_that_differs_from_what_runs() {
        let dir = tempfile::tempdir().unwrap();
        let w = watcher(dir.path(), "threads: 2\n");
        let reload = |text: &str| {
            std::fs::write(&w.path, text).unwrap();
            w.reload("test")
        };
        assert_eq!(reload("threads: 3\n"), ["threads"]);
        // Still changed on the next reload, and no change once put back.
        assert_eq!(reload("threads: 3\nlog: { access: false }\n"), ["threads"]);
        assert_eq!(reload("threads: 2\n"), Vec::<&str>::new());
        assert_eq!(
            reload(
                "shutdown: { grace: 0s, timeout: 1s }\nadmin: { last_use_flush: 1s }\nlog: { level: debug }\n"
            ),
            ["admin.last_use_flush", "shutdown.grace", "shutdown.timeout", "log.level"]
        );
    }

    #[test]
    fn a_changed_redis_password_needs_a_restart() {
        let redis = |password: &str| {
            Config::parse(&format!("store: {{ redis: {{ url: 'redis://:{password}@127.0.0.1:6379' }} }}"))
                .unwrap()
        };
        assert_eq!(needs_restart(&redis("old"), &redis("new")), ["store"]);
        assert!(needs_restart(&redis("old"), &redis("old")).is_empty());
    }

    #[test]
    fn a_reload_that_sets_nothing_keeps_the_running_config() {
        let dir = tempfile::tempdir().unwrap();
        let w = watcher(dir.path(), "threads: 3\n");
        for text in ["", "# soon\n", "---\n", "{}\n", "null\n", "threads: 5\nroutes:\n"] {
            std::fs::write(&w.path, text).unwrap();
            w.reload("test");
            assert_eq!(w.config.load().threads, 3, "{text:?}");
        }
    }

    #[test]
    fn a_reload_sets_the_audit_max_every_store_clone_trims_to() {
        let dir = tempfile::tempdir().unwrap();
        let w = watcher(dir.path(), "audit: { max_entries: 10 }\n");
        let running = w.store.clone().with_audit_max(10);
        std::fs::write(&w.path, "audit: { max_entries: 3 }\n").unwrap();
        w.reload("test");
        assert_eq!((w.config.load().audit_max, running.audit_max()), (3, 3));
    }
}
