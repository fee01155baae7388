//! The Redis backend: one multiplexed connection (redis-rs `ConnectionManager`, which reconnects by
//! itself) for reads and writes, a Lua script for atomic conditional batches, and a dedicated pub/sub
//! connection with a heartbeat for invalidations. This is the only module that talks to Redis.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::io::tcp::{socket2, TcpSettings};
use redis::{AsyncCommands, IntoConnectionInfo};

use super::{Backend, Batch, Invalidation, InvalidationStream, StoreError};

/// Applies a batch atomically: checks that the `absent` keys do not exist, the `expect` keys hold
/// what was read and the `sizes` sets at most so many members, then publishes, then writes. Answers '' (done), '=' + a key (exists) or
/// '~' + a key (changed): every answer but the first is tagged, so no key prefix reads as a tag. Redis does not undo a script's writes when a later command fails, so the invalidations
/// go first: a Redis user refused PUBLISH (Redis 7's `acl-pubsub-default` is `resetchannels`) fails
/// the batch before anything is written, instead of storing a revocation no instance hears of; and
/// no instance reads the store between the two, since a script runs alone.
const COMMIT_SCRIPT: &str = r#"
local b = cjson.decode(ARGV[1])
for _, k in ipairs(b.absent) do
  if redis.call('EXISTS', k) == 1 then return '=' .. k end
end
for _, e in ipairs(b.expect) do
  if redis.call('GET', e[1]) ~= e[2] then return '~' .. e[1] end
end
for _, c in ipairs(b.sizes) do
  if redis.call('SCARD', c[1]) > c[2] then return '~' .. c[1] end
end
for _, msg in ipairs(b.publish) do redis.call('PUBLISH', ARGV[2], msg) end
for _, kv in ipairs(b.put) do redis.call('SET', kv[1], kv[2]) end
for _, k in ipairs(b.del) do redis.call('DEL', k) end
for _, m in ipairs(b.sadd) do redis.call('SADD', m[1], m[2]) end
for _, m in ipairs(b.srem) do redis.call('SREM', m[1], m[2]) end
for _, l in ipairs(b.lpush) do
  redis.call('LPUSH', l[1], l[2])
  redis.call('LTRIM', l[1], 0, l[3] - 1)
end
for _, n in ipairs(b.newer) do
  local cur = redis.call('GET', n[1])
  local ok, rec = pcall(cjson.decode, cur or '')
  local at = ok and type(rec) == 'table' and tonumber(rec.at) or 0
  if not cur or at < n[3] then redis.call('SET', n[1], n[2]) end
end
return ''
"#;

/// How long a readiness ping's success stands for the probes that follow.
const PING_FRESH: Duration = Duration::from_millis(500);

/// How often the subscription proves it is alive.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// The Redis backend.
pub struct RedisBackend {
    client: redis::Client,
    prefix: String,
    channel: String,
    timeout: Duration,
    /// The shared connection for reads, made on first use.
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// The connection changes are sent on, made on first use, so that a change's `WAIT` for
    /// replicas (which holds every later command of its connection) never holds a read; dropped
    /// (and made again by the next change) when it turns out to reach a replica.
    writer: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// When [`Backend::ping`] last succeeded.
    last_ping: tokio::sync::Mutex<Option<std::time::Instant>>,
    script: redis::Script,
    display: String,
    /// Replicas that must have a change before it is acknowledged.
    wait_replicas: u32,
    /// Counts [`RedisBackend::reconnect`]s: a feed made before the last one ends, so that it is
    /// made anew where the address names now (see [`Backend::subscribe`]).
    reconnects: tokio::sync::watch::Sender<u64>,
}

impl RedisBackend {
    /// A backend for `url`, with every key under `prefix`. Connects lazily, on first use: the
    /// shared connection's driver task lives in the runtime of the first call that needs it,
    /// which is the proxy's first cache miss unless an admin call comes first (a readiness probe
    /// does not: [`Backend::ping`] uses a connection of its own).
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<RedisBackend, StoreError> {
        let target = url.into_connection_info().map_err(unavailable)?;
        let client =
            redis::Client::open(target.set_tcp_settings(tcp_settings(timeout))).map_err(unavailable)?;
        let info = client.get_connection_info();
        Ok(RedisBackend {
            display: format!(
                "redis at {} (db {}, prefix {prefix:?})",
                info.addr(),
                info.redis_settings().db()
            ),
            client,
            prefix: prefix.to_string(),
            channel: format!("{prefix}invalidate"),
            timeout,
            conn: tokio::sync::Mutex::new(None),
            writer: tokio::sync::Mutex::new(None),
            last_ping: tokio::sync::Mutex::new(None),
            script: redis::Script::new(COMMIT_SCRIPT),
            wait_replicas: 0,
            reconnects: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Acknowledges a change only once `n` replicas have it (Redis `WAIT`, within the store
    /// timeout): otherwise a failover to a replica that had not received it yet would bring back
    /// a revoked token. Short of `n`, the change is answered as one that may have been made.
    pub fn waiting_for_replicas(self, n: u32) -> RedisBackend {
        RedisBackend { wait_replicas: n, ..self }
    }

    async fn conn(&self) -> Result<ConnectionManager, StoreError> {
        self.connection(&self.conn).await
    }

    /// The connection in `slot`, made if there is none.
    async fn connection(
        &self,
        slot: &tokio::sync::Mutex<Option<ConnectionManager>>,
    ) -> Result<ConnectionManager, StoreError> {
        let mut shared = slot.lock().await;
        if let Some(conn) = shared.as_ref() {
            return Ok(conn.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(self.timeout);
        let conn = self.client.get_connection_manager_with_config(config).await.map_err(unavailable)?;
        Ok(shared.insert(conn).clone())
    }

    /// Drops the connections for reads and changes, so that the next call connects (and resolves
    /// the host) anew, and ends the invalidation feed, which the cache then makes anew (and so
    /// connects anew too): after a failover, reads must come from where changes go and
    /// invalidations come from, or a record read from a demoted primary that no longer follows
    /// (or lags) the new one would be cached after its invalidation, and served until
    /// `cache.ttl`; and invalidations heard from the demoted primary are only those it still
    /// receives from the new one.
    ///
    /// `seen` is the count of reconnects when the caller took the connection that met a replica:
    /// one made since (another change's, a new feed's) already made the connections anew, and a
    /// change sent before it and answered after it (the last-use flush, one of several in flight)
    /// would otherwise end the feed just made at the new primary, and drop the cache again.
    async fn reconnect(&self, seen: Option<u64>) {
        let mut writer = self.writer.lock().await;
        let mut conn = self.conn.lock().await;
        let anew = self.reconnects.send_if_modified(|n| match seen.is_none_or(|seen| seen == *n) {
            true => {
                *n += 1;
                true
            }
            false => false,
        });
        if anew {
            writer.take();
            conn.take();
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

/// Whether the server a feed is subscribed on is still a primary. A primary demoted to a replica
/// keeps its clients and answers their `PING`s, but hears only what the new primary still sends
/// it (nothing, if the link between them is down): a feed there would miss revocations. The
/// probe is `HELLO` without arguments on the connection made beside the subscription: it answers
/// the server's `role` and, unlike `ROLE` or `INFO` (`@admin`, `@dangerous`), any Redis user may
/// send it; nor is it held by a `CLIENT PAUSE WRITE` (a failover's), as a change would be.
struct Probe {
    /// `None` once the server refused the probe (a Redis older than 6, or an ACL without
    /// `HELLO`): the feed then goes on without it, as it did before.
    conn: Option<redis::aio::MultiplexedConnection>,
}

impl Probe {
    /// False when the server is a replica now or the probe's connection is lost.
    async fn primary(&mut self) -> bool {
        let Some(conn) = self.conn.as_mut() else { return true };
        let answer = redis::cmd("HELLO").query_async::<HashMap<String, redis::Value>>(conn).await;
        match answer {
            Ok(fields) => {
                let role = fields.get("role").and_then(|r| redis::from_redis_value_ref::<String>(r).ok());
                if role.as_deref() == Some("replica") {
                    tracing::warn!(
                        "the Redis server of the invalidation feed is a replica now; subscribing anew"
                    );
                    return false;
                }
                true
            }
            Err(e) if e.is_timeout() || e.is_io_error() || e.is_connection_dropped() => false,
            Err(e) => {
                tracing::warn!(error = %e, "the invalidation feed cannot check that its server is a primary (HELLO refused); it goes on without");
                self.conn = None;
                true
            }
        }
    }
}

/// Every connection to Redis (data and subscription) gives up on a peer that stopped answering at
/// the TCP level: data unacknowledged for 8 s (or twice the store timeout, if longer), or an idle
/// connection failing keepalive probes (after 5 s idle, 3 probes a second apart: the same 8 s, so
/// that one lost probe does not close a healthy connection), closes it, so the next call
/// connects again. Without this, a Redis that moved away without resetting the connection (a
/// failover behind a virtual IP, a partition) leaves the data connection dead, and every miss a
/// 503, until the kernel gives up on the socket, about 15 minutes later. No Nagle delay either.
fn tcp_settings(timeout: Duration) -> TcpSettings {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(5))
        .with_interval(Duration::from_secs(1))
        .with_retries(3);
    TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive)
        .set_user_timeout((2 * timeout).max(Duration::from_secs(8)))
}

impl RedisBackend {
    /// After a change: `WAIT` for the configured replicas. It waits for everything the connection
    /// for changes wrote before it, the change included (reads go on their own connection). Asked to answer a little
    /// before the connection's own response timeout, so that a shortfall is told as one.
    async fn replicated(&self, conn: &mut ConnectionManager) -> Result<(), StoreError> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        let within = (self.timeout * 4 / 5).as_millis().max(1) as u64;
        let acked: i64 = redis::cmd("WAIT")
            .arg(self.wait_replicas)
            .arg(within)
            .query_async(conn)
            .await
            .map_err(|e| StoreError::Unanswered(format!("waiting for replicas: {e}")))?;
        match acked >= i64::from(self.wait_replicas) {
            true => Ok(()),
            false => Err(StoreError::Unanswered(format!(
                "the change reached {acked} of the {} replicas store.redis.wait_replicas asks for",
                self.wait_replicas
            ))),
        }
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    // Refused before it ran (a write, or a script that may write, under `noeviction`).
    if e.code() == Some("OOM") {
        return StoreError::Full(
            "Redis is out of memory (used memory above maxmemory): nothing was changed; free memory \
             or raise maxmemory"
                .into(),
        );
    }
    StoreError::Unavailable(e.to_string())
}

#[async_trait]
impl Backend for RedisBackend {
    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn().await?.get(self.key(key)).await.map_err(unavailable)
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        // MGET of one key answers a bare value in redis-rs; ask for a list explicitly.
        redis::cmd("MGET").arg(&keys).query_async(&mut self.conn().await?).await.map_err(unavailable)
    }

    async fn members(&self, set: &str) -> Result<Vec<String>, StoreError> {
        self.conn().await?.smembers(self.key(set)).await.map_err(unavailable)
    }

    async fn list(&self, key: &str, skip: usize, limit: usize) -> Result<Vec<String>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let start = isize::try_from(skip).unwrap_or(isize::MAX);
        let stop = start.saturating_add(isize::try_from(limit).unwrap_or(isize::MAX) - 1);
        self.conn().await?.lrange(self.key(key), start, stop).await.map_err(unavailable)
    }

    async fn commit(&self, mut batch: Batch) -> Result<(), StoreError> {
        let unprefixed: Vec<String> = batch
            .absent
            .iter()
            .chain(batch.expect.iter().map(|(k, _)| k))
            .chain(batch.sizes.iter().map(|(k, _)| k))
            .cloned()
            .collect();
        batch.absent.iter_mut().for_each(|k| *k = self.key(k));
        batch.expect.iter_mut().for_each(|(k, _)| *k = self.key(k));
        batch.sizes.iter_mut().for_each(|(k, _)| *k = self.key(k));
        batch.put.iter_mut().for_each(|(k, _)| *k = self.key(k));
        batch.del.iter_mut().for_each(|k| *k = self.key(k));
        batch.sadd.iter_mut().chain(batch.srem.iter_mut()).for_each(|(s, _)| *s = self.key(s));
        batch.lpush.iter_mut().for_each(|(l, _, _)| *l = self.key(l));
        batch.newer.iter_mut().for_each(|(k, _, _)| *k = self.key(k));
        let encoded = serde_json::to_string(&batch)
            .map_err(|e| StoreError::Corrupt { key: "batch".into(), reason: e.to_string() })?;
        let seen = *self.reconnects.borrow();
        let mut conn = self.connection(&self.writer).await?;
        let mut sent = self.script.arg(&encoded).arg(&self.channel).invoke_async::<String>(&mut conn).await;
        // A connection to a server that became a replica (a failover that moved the host name or
        // address to the new primary, while the old one kept its clients) refuses every change:
        // connected anew, the change goes to whatever the address names now. (Refused, it wrote
        // nothing: sending it again is safe.)
        let read_only = redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly);
        if sent.as_ref().is_err_and(|e| e.kind() == read_only) {
            tracing::warn!("the Redis connection reaches a read-only replica; connecting again");
            self.reconnect(Some(seen)).await;
            conn = self.connection(&self.writer).await?;
            sent = self.script.arg(&encoded).arg(&self.channel).invoke_async(&mut conn).await;
        }
        // Sent, then no answer (a timeout, a dropped connection): Redis may run it anyway.
        let conflict =
            sent.map_err(|e| match e.is_timeout() || e.is_io_error() || e.is_connection_dropped() {
                true => StoreError::Unanswered(e.to_string()),
                false => unavailable(e),
            })?;
        if conflict.is_empty() {
            return self.replicated(&mut conn).await;
        }
        let (changed, prefixed) = match (conflict.strip_prefix('~'), conflict.strip_prefix('=')) {
            (Some(k), _) => (true, k.to_string()),
            (_, Some(k)) => (false, k.to_string()),
            _ => {
                return Err(StoreError::Corrupt {
                    key: "commit".into(),
                    reason: format!("answered {conflict:?}"),
                })
            }
        };
        let key = unprefixed.into_iter().find(|k| self.key(k) == prefixed).unwrap_or(prefixed);
        Err(if changed { StoreError::Changed(key) } else { StoreError::Conflict(key) })
    }

    async fn subscribe(&self) -> Result<InvalidationStream, StoreError> {
        let mut pubsub = self.client.get_async_pubsub().await.map_err(unavailable)?;
        // A connection beside the subscription, made to the same address right after it (nothing
        // waited for between the two), that tells whether the server is still a primary (see
        // `Probe`).
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let probe = self.client.get_multiplexed_async_connection_with_config(&config).await;
        let mut probe = Probe { conn: Some(probe.map_err(unavailable)?) };
        pubsub.subscribe(&self.channel).await.map_err(unavailable)?;
        // A feed made anew (the first, or one after the last was lost: a stalled server, a
        // failover) and the connections it guards go to the same server. (Only once it is made:
        // a subscription refused again and again, an ACL without the channel, leaves them be.)
        self.reconnect(None).await;
        let mut reconnected = self.reconnects.subscribe();
        let (mut sink, mut messages) = pubsub.split();
        let (tx, rx) = tokio::sync::mpsc::channel::<Invalidation>(1024);
        let timeout = self.timeout;
        // The pump ends (and so the stream) when the connection drops, a heartbeat goes unanswered
        // (or is answered with an error), the server turns out to be a replica, this instance
        // connects anew for changes and reads (a failover it met), or the receiver is gone; the
        // cache then treats the channel as lost.
        tokio::spawn(async move {
            let mut beat = tokio::time::interval(HEARTBEAT);
            // A beat that took long (its answers waited for) is not followed by a burst of them.
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = reconnected.changed() => {
                        tracing::warn!("connected anew to Redis for changes; subscribing anew too");
                        return;
                    }
                    msg = messages.next() => {
                        let Some(msg) = msg else { return };
                        let payload: String = msg.get_payload().unwrap_or_default();
                        // One that cannot be read (a newer build's, in a rolling upgrade) named
                        // records this instance cannot tell: the stream ends, so the cache is
                        // dropped and read from the store until the feed is back, as for a feed lost.
                        let Some(inv) = Invalidation::decode(&payload) else {
                            let shown: String = payload.chars().take(120).collect();
                            tracing::warn!(payload = ?shown, "unreadable invalidation; dropping the cache");
                            return;
                        };
                        if tx.send(inv).await.is_err() {
                            return;
                        }
                    }
                    _ = beat.tick() => {
                        // Answered within the store timeout, as every store call is: a shorter
                        // bound would end the feed, and drop the cache, whenever a busy machine
                        // (or a Redis an operator gave a longer timeout) is slower than it.
                        let pong = tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await;
                        let answered = matches!(pong, Ok(Ok(ref v)) if !matches!(v, redis::Value::ServerError(_)));
                        if !answered || tx.is_closed() || !probe.primary().await {
                            return;
                        }
                    }
                }
            }
        });
        let stream =
            futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|i| (i, rx)) });
        Ok(stream.boxed())
    }

    fn describe(&self) -> String {
        self.display.clone()
    }

    /// A `PING` on a connection of its own, so that readiness probes (often the first thing to
    /// reach a new instance) do not decide on which runtime the shared connection lives: a new
    /// one each time, as a new client would connect (a password or a failover that only new
    /// connections meet shows), but after a success at most one every [`PING_FRESH`]: probes
    /// meanwhile share it (`/readyz` needs no token, and each connection leaves a socket in
    /// TIME-WAIT). A failure is not kept: the next probe asks again, so readiness comes back
    /// with the store.
    async fn ping(&self) -> Result<(), StoreError> {
        let mut last = self.last_ping.lock().await;
        if last.is_some_and(|at| at.elapsed() < PING_FRESH) {
            return Ok(());
        }
        *last = None;
        let mut conn = self.client.get_multiplexed_async_connection().await.map_err(unavailable)?;
        redis::cmd("PING").query_async::<redis::Value>(&mut conn).await.map_err(unavailable)?;
        *last = Some(std::time::Instant::now());
        Ok(())
    }

    /// Asks the server for its persistence settings on a connection of its own (this may run in a
    /// short-lived runtime at start-up, which must not own the shared connection).
    async fn durability_warning(&self) -> Result<Option<String>, StoreError> {
        let conn = self.client.get_multiplexed_async_connection().await.map_err(unavailable)?;
        let setting = |name: &'static str| {
            let mut conn = conn.clone();
            async move {
                let pair: Vec<String> =
                    redis::cmd("CONFIG").arg("GET").arg(name).query_async(&mut conn).await?;
                Ok::<_, redis::RedisError>(pair.get(1).cloned().unwrap_or_default())
            }
        };
        let (aof, fsync) = match (setting("appendonly").await, setting("appendfsync").await) {
            (Ok(a), Ok(f)) => (a, f),
            _ => return Ok(Some("could not read Redis persistence settings (CONFIG GET refused)".into())),
        };
        let mut warnings = Vec::new();
        match (aof.as_str(), fsync.as_str()) {
            ("yes", "always") => {}
            ("yes", other) => warnings.push(format!("Redis runs AOF with appendfsync {other}: up to a second of revocations can be lost in a crash; use appendfsync always")),
            _ => warnings.push("Redis runs without AOF: revocations can be lost in a crash; run it with appendonly yes and appendfsync always".into()),
        }
        if aof == "yes" && setting("no-appendfsync-on-rewrite").await.is_ok_and(|v| v == "yes") {
            warnings.push("Redis skips fsync while it rewrites its AOF (no-appendfsync-on-rewrite yes): revocations acknowledged meanwhile can be lost in a crash; set it to no".into());
        }
        if let Ok(policy) = setting("maxmemory-policy").await {
            if policy.starts_with("allkeys-") {
                warnings.push(format!("Redis may evict any key (maxmemory-policy {policy}): tokens, users and the indexes that keep emails and service names unique can vanish; use noeviction"));
            }
        }
        let replication: Result<String, _> =
            redis::cmd("INFO").arg("replication").query_async(&mut conn.clone()).await;
        let replicas = replication.ok().and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("connected_slaves:"))
                .and_then(|n| n.trim().parse::<u32>().ok())
        });
        match (replicas, self.wait_replicas) {
            (Some(n), 0) if n > 0 => warnings.push(format!("Redis has {n} replica(s) and store.redis.wait_replicas is 0: a failover to a replica can lose changes already acknowledged, a revocation among them; set wait_replicas")),
            (Some(n), wait) if n < wait => warnings.push(format!("store.redis.wait_replicas is {wait} but Redis has {n} replica(s) connected: every change will answer 503 until they are")),
            _ => {}
        }
        Ok((!warnings.is_empty()).then(|| warnings.join("; ")))
    }
}

/// Checks that `url` is a Redis URL, without connecting. The message never repeats the URL, which
/// may hold a password.
pub fn check_url(url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Err("missing; write e.g. redis://127.0.0.1:6379".into());
    }
    let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
    if scheme.eq_ignore_ascii_case("rediss") {
        return Err("TLS to Redis (rediss://) is not supported: reach it with redis:// over a private network or a TLS tunnel (stunnel, a sidecar)".into());
    }
    redis::Client::open(url).map(|_| ()).map_err(|_| "not a valid Redis URL (redis://host:port[/db])".into())
}
