//! Prometheus metrics. Each component owns its instruments (the proxy its request counters, the
//! cache its lookups, the store its latencies); [`Metrics`] registers them in one registry and
//! renders it for `/metrics` on the admin listener. Nothing here is global, so tests in one process
//! do not share counts.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use crate::auth::VerifierStats;

/// Latency buckets in seconds, from 50 µs to 2.5 s.
const BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// A counter vector; the names are fixed at compile time, so failure is a programming error.
pub fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

/// A counter.
pub fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

/// A gauge.
pub fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

/// A latency histogram in seconds.
pub fn histogram(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

/// The proxy's own instruments.
#[derive(Clone)]
pub struct ProxyMetrics {
    /// Requests by route and outcome (`allowed` or the denial reason).
    pub requests: IntCounterVec,
    /// Time from the start of `request_filter` to a decision.
    pub auth_latency: Histogram,
    /// Requests let through whose proxying failed, by route and the status answered (`502` the
    /// upstream down, `504` silent past its bound): counted as `allowed` in `requests` too.
    pub proxy_failures: IntCounterVec,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        ProxyMetrics {
            requests: counter_vec(
                "tollgate_requests_total",
                "Requests by route and outcome",
                &["route", "outcome"],
            ),
            auth_latency: histogram("tollgate_auth_seconds", "Time to verify and authorize a request"),
            proxy_failures: counter_vec(
                "tollgate_proxy_failures_total",
                "Requests let through whose proxying failed, by route and status answered",
                &["route", "status"],
            ),
        }
    }
}

/// Every instrument, registered once.
pub struct Metrics {
    registry: Registry,
    argon2_waiting: IntGauge,
    verifier: Arc<VerifierStats>,
    /// Admin API calls by route template (never the path as sent: it names emails and ids) and
    /// status.
    pub admin_requests: IntCounterVec,
}

impl Metrics {
    /// Registers the given instruments.
    pub fn new(
        collectors: Vec<Box<dyn prometheus::core::Collector>>,
        verifier: Arc<VerifierStats>,
    ) -> Metrics {
        let registry = Registry::new();
        let argon2_waiting = gauge("tollgate_argon2_queue_depth", "Verifications waiting for an argon2 slot");
        let admin_requests = counter_vec(
            "tollgate_admin_requests_total",
            "Admin API calls by route template and status",
            &["route", "status"],
        );
        let all = collectors.into_iter().chain([
            Box::new(argon2_waiting.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(verifier.argon2_runs.clone()),
            Box::new(admin_requests.clone()),
        ]);
        for c in all {
            if let Err(e) = registry.register(c) {
                tracing::error!(error = %e, "metric not registered");
            }
        }
        Metrics { registry, argon2_waiting, verifier, admin_requests }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        self.argon2_waiting.set(self.verifier.argon2_waiting.load(Ordering::Relaxed) as i64);
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics not encoded");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
