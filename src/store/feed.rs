//! The in-process invalidation feed of single-node backends (memory, embedded): a broadcast
//! channel whose subscribers see their stream end when the feed is closed or they fall behind.

use futures_util::StreamExt;
use tokio::sync::broadcast;

use super::{Invalidation, InvalidationStream};

/// A broadcast of invalidations within one process.
pub struct LocalFeed {
    /// `None` tells subscribers the feed is lost.
    tx: broadcast::Sender<Option<Invalidation>>,
}

impl Default for LocalFeed {
    fn default() -> Self {
        LocalFeed { tx: broadcast::channel(1024).0 }
    }
}

impl LocalFeed {
    /// Publishes encoded invalidations to every subscriber.
    pub fn publish(&self, messages: &[String]) {
        for inv in messages.iter().filter_map(|m| Invalidation::decode(m)) {
            // No subscriber is not an error.
            let _ = self.tx.send(Some(inv));
        }
    }

    /// Ends every current subscription, as a lost connection would.
    pub fn close(&self) {
        let _ = self.tx.send(None);
    }

    /// A new subscription. A receiver that lags has lost messages, so its stream ends and the
    /// cache is dropped.
    pub fn subscribe(&self) -> InvalidationStream {
        futures_util::stream::unfold(self.tx.subscribe(), |mut rx| async move {
            match rx.recv().await {
                Ok(Some(inv)) => Some((inv, rx)),
                Ok(None) | Err(_) => None,
            }
        })
        .boxed()
    }
}
