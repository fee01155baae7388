//! What a graceful shutdown waits for: requests in flight, on the proxy and the admin API, and
//! whether one has begun (`/readyz` then says so, for load balancers).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static STOPPING: AtomicBool = AtomicBool::new(false);

/// How many requests this process is serving right now.
pub fn in_flight() -> usize {
    IN_FLIGHT.load(Ordering::Acquire)
}

/// Marks the start of a graceful shutdown.
pub fn begin_shutdown() {
    STOPPING.store(true, Ordering::Release);
}

/// Whether a graceful shutdown has begun.
pub fn stopping() -> bool {
    STOPPING.load(Ordering::Acquire)
}

/// Counts a request in flight from its making to its dropping.
pub struct InFlight(());

impl InFlight {
    /// A request begins.
    pub fn begin() -> InFlight {
        IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}
