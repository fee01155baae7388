//! Last-use tracking: the proxy notes each authenticated request's token id, time and client IP in
//! memory; a background task writes them to the store in one batch every few seconds, so the request
//! path never writes to the store.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use crate::store::{now_millis, LastUse, Millis, Store};
use crate::token::TokenId;

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

    /// Writes what is pending. On a store failure the records are kept for the next flush.
    pub async fn flush(&self, store: &Store) {
        let _one_at_a_time = self.flushing.lock().await;
        let batch = self.take();
        if batch.is_empty() {
            return;
        }
        if let Err(e) = store.record_last_use(&batch).await {
            tracing::warn!(error = %e, records = batch.len(), "could not write last-use records; will retry");
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for (id, last) in batch {
                pending.entry(id).or_insert((last.at, last.ip.parse().ok()));
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
