//! What a graceful shutdown waits for: requests in flight, on the proxy and the admin API, and
//! whether one has begun (`/readyz` then says so, for load balancers).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static IN_FLIGHT: Counter = Counter::new();
static STOPPING: AtomicBool = AtomicBool::new(false);

/// How many requests this process is serving right now.
pub fn in_flight() -> usize {
    IN_FLIGHT.in_flight()
}

/// Waits (blocking) until nothing is in flight, or until `deadline`, and closes the count (see
/// [`Counter::close_when_idle`]); returns how many requests are still in flight. Pingora stops its
/// listeners once the stop is handed over: it is given that moment first.
pub fn wait_until_idle(deadline: Instant) -> usize {
    std::thread::sleep(Duration::from_millis(50));
    IN_FLIGHT.close_when_idle(deadline)
}

/// Marks the start of a graceful shutdown.
pub fn begin_shutdown() {
    STOPPING.store(true, Ordering::Release);
}

/// Whether a graceful shutdown has begun.
pub fn stopping() -> bool {
    STOPPING.load(Ordering::Acquire)
}

/// Requests in flight, and whether the count is closed: the drain found none and the process is
/// exiting, so a request counted after that is one it will not finish.
pub struct Counter(AtomicUsize);

/// The closed mark, in the count's top bit.
const CLOSED: usize = 1 << (usize::BITS - 1);

impl Counter {
    const fn new() -> Counter {
        Counter(AtomicUsize::new(0))
    }

    fn in_flight(&self) -> usize {
        self.0.load(Ordering::Acquire) & !CLOSED
    }

    /// Waits (blocking) until nothing is in flight, or until `deadline`, then closes the count;
    /// returns how many requests are still in flight. Two readings of nothing in flight a little
    /// apart are needed, since a request already read when the listener stopped is counted a
    /// moment later; and the count is closed in the same step as it is found empty, so that an
    /// admin call arriving after that is refused ([`InFlight::begin_unless_exiting`]) rather than
    /// begun and cut off by the exit.
    fn close_when_idle(&self, deadline: Instant) -> usize {
        let mut quiet = 0;
        while Instant::now() < deadline {
            quiet = if self.in_flight() == 0 { quiet + 1 } else { 0 };
            if quiet >= 2 && self.0.compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return 0;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.0.fetch_or(CLOSED, Ordering::AcqRel);
        self.in_flight()
    }
}

/// Counts a request in flight from its making to its dropping.
pub struct InFlight(&'static Counter);

impl InFlight {
    /// A request begins.
    pub fn begin() -> InFlight {
        InFlight::on(&IN_FLIGHT)
    }

    /// A request that begins as the process exits, whatever it does to be lost (the drain found
    /// nothing in flight and closed the count): to be refused without doing anything.
    pub fn begin_unless_exiting() -> Option<InFlight> {
        InFlight::unless_closed(&IN_FLIGHT)
    }

    fn on(counter: &'static Counter) -> InFlight {
        counter.0.fetch_add(1, Ordering::AcqRel);
        InFlight(counter)
    }

    fn unless_closed(counter: &'static Counter) -> Option<InFlight> {
        let counted = InFlight::on(counter);
        (counter.0.load(Ordering::Acquire) & CLOSED == 0).then_some(counted)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> &'static Counter {
        Box::leak(Box::new(Counter::new()))
    }

    #[test]
    fn the_count_closes_once_idle_and_refuses_what_begins_after() {
        let counter = counter();
        let request = InFlight::on(counter);
        let drain =
            std::thread::spawn(move || counter.close_when_idle(Instant::now() + Duration::from_secs(10)));
        // Still open while a request is in flight: another may begin.
        std::thread::sleep(Duration::from_millis(100));
        let second = InFlight::unless_closed(counter).expect("open while requests are in flight");
        drop((request, second));
        assert_eq!(drain.join().unwrap(), 0, "closed once idle");
        assert!(InFlight::unless_closed(counter).is_none(), "a call arriving after is refused");
        assert_eq!(counter.in_flight(), 0, "and not left counted");
    }

    #[test]
    fn at_the_deadline_the_count_closes_with_requests_still_in_flight() {
        let counter = counter();
        let _stuck = InFlight::on(counter);
        assert_eq!(counter.close_when_idle(Instant::now() + Duration::from_millis(50)), 1);
        assert!(InFlight::unless_closed(counter).is_none());
        assert_eq!(counter.in_flight(), 1);
    }
}
