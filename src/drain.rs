//! What a graceful shutdown waits for: requests in flight, on the proxy and the admin API, and
//! whether one has begun (`/readyz` then says so, for load balancers).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static STOPPING: AtomicBool = AtomicBool::new(false);

/// How many requests this process is serving right now.
pub fn in_flight() -> usize {
    IN_FLIGHT.load(Ordering::Acquire)
}

/// Waits (blocking) until nothing is in flight, or until `deadline`; returns how many requests
/// are still in flight. Pingora stops its listeners once the stop is handed over: it is given
/// that moment first. Then two readings of nothing in flight a little apart are needed, since a
/// request already read when the listener stopped is counted a moment later.
pub fn wait_until_idle(deadline: std::time::Instant) -> usize {
    std::thread::sleep(std::time::Duration::from_millis(50));
    let mut quiet = 0;
    while std::time::Instant::now() < deadline && quiet < 2 {
        quiet = if in_flight() == 0 { quiet + 1 } else { 0 };
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    in_flight()
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
