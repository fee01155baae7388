//! Last-use tracking: the proxy notes each authenticated request's token id, time and client IP in
//! memory; a background task writes them to the store in one batch every few seconds, so the request
//! path never writes to the store.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use crate::store::{now_millis, LastUse, Millis, Store};
use crate::token::TokenId;

/// Most last-use records written in one store call (about a millisecond of Redis's time).
pub const FLUSH_CHUNK: usize = 1000;

/// Pending last-use records of one instance.
#[derive(Default)]
pub struct LastUseLog {
    /// Time and client address of the latest use; formatted only when flushed, so that noting a
    /// use on the request path allocates nothing once the token is known.
    pending: Mutex<HashMap<TokenId, (Millis, Option<IpAddr>), foldhash::fast::RandomState>>,
    /// One flush at a time: a later one (at shutdown) waits for an earlier write to land, so
    /// writes never overtake each other.
    flushing: tokio::sync::Mutex<()>,
}

impl LastUseLog {
    /// Notes a use; only the latest per token is kept until the next flush.
    pub fn note(&self, id: &TokenId, ip: Option<IpAddr>) {
        let use_ = (now_millis(), ip);
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match pending.get_mut(id) {
            Some(last) => *last = use_,
            None => {
                pending.insert(id.clone(), use_);
            }
        }
    }

    fn take(&self) -> Vec<(TokenId, LastUse)> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        pending
            .into_iter()
            .map(|(id, (at, ip))| (id, LastUse { at, ip: ip.map(|a| a.to_string()).unwrap_or_default() }))
            .collect()
    }

    /// Writes what is pending, [`FLUSH_CHUNK`] records per store call: one script over 100k records
    /// held Redis for half a second, longer than the invalidation feed's heartbeat may wait, so
    /// every instance dropped its cache. On a store failure the records not yet written are kept
    /// for the next flush (a newer use noted meanwhile wins).
    pub async fn flush(&self, store: &Store) {
        let _one_at_a_time = self.flushing.lock().await;
        let batch = self.take();
        let mut chunks = batch.chunks(FLUSH_CHUNK);
        while let Some(chunk) = chunks.next() {
            if let Err(e) = store.record_last_use(chunk).await {
                let unwritten: Vec<_> = std::iter::once(chunk).chain(chunks).flatten().collect();
                tracing::warn!(error = %e, records = unwritten.len(), "could not write last-use records; will retry");
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                for (id, last) in unwritten {
                    pending.entry(id.clone()).or_insert((last.at, last.ip.parse().ok()));
                }
                return;
            }
        }
    }

    /// Flushes every `interval` until `stop` resolves, then once more.
    pub async fn run(
        &self,
        store: &Store,
        interval: Duration,
        mut stop: impl std::future::Future<Output = ()> + Unpin,
    ) {
        let mut tick = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = tick.tick() => self.flush(store).await,
                _ = &mut stop => break,
            }
        }
        self.flush(store).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::redis::RedisBackend;
    use crate::testing::RedisServer;
    use crate::token::{generate, TokenKind};

    #[tokio::test]
    async fn a_flush_writes_every_record_a_bounded_chunk_at_a_time() {
        let server = RedisServer::start(["--save", "", "--appendonly", "no"]);
        // Generous: what is counted is the chunks, and a loaded machine (the suite's other tests
        // beside it) once kept the first chunk's answer from the client past a 500 ms bound.
        let timeout = Duration::from_secs(10);
        let store = Store::new(Arc::new(RedisBackend::new(&server.url(), "t:", timeout).unwrap()), timeout);
        let log = LastUseLog::default();
        // The script is loaded by a first write; then only the flush is counted.
        log.note(&generate(TokenKind::Pat).id, None);
        log.flush(&store).await;
        let _: () = ::redis::cmd("CONFIG").arg("RESETSTAT").query(&mut server.client()).unwrap();

        let ids: Vec<TokenId> = (0..2 * FLUSH_CHUNK + 500).map(|_| generate(TokenKind::Pat).id).collect();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for id in &ids {
            log.note(id, Some(ip));
        }
        log.flush(&store).await;
        let info: String = ::redis::cmd("INFO").arg("commandstats").query(&mut server.client()).unwrap();
        let scripts = info
            .lines()
            .filter_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .filter_map(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .sum::<u64>();
        assert_eq!(scripts, 3, "{info}");
        for id in &ids {
            let last = store.last_use(id).await.unwrap().expect("written");
            assert_eq!(last.ip, "192.0.2.7");
        }
        assert!(log.pending.lock().unwrap().is_empty());
    }
}
