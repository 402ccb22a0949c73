//! The handler decorator of `run`: it times each call, counts the calls in
//! flight and remembers the last success. The metrics registry exposes what
//! it records, and readiness reads the last success; this module knows
//! neither.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use lifecycle_domain::{BoxFuture, EventHandler, HandlerError};
use lifecycle_streams::now_ms;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// Upper bounds of the handler-duration buckets, in seconds: a cascade
/// takes well under a millisecond on a quiet Redis, seconds when it is in
/// trouble.
const HANDLER_BUCKETS: [f64; 16] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// What the handler decorator measures.
#[derive(Debug)]
pub struct HandlerMetrics {
    /// Duration of each call, registered as `lobby_handler_duration_seconds`.
    pub duration: Histogram,
    /// Calls running now, registered as `lobby_handler_calls_in_flight`.
    pub in_flight: Gauge,
    /// When a handler call last succeeded (ms since the epoch; 0: never).
    last_success_ms: AtomicU64,
}

impl Default for HandlerMetrics {
    fn default() -> Self {
        Self {
            duration: Histogram::new(HANDLER_BUCKETS),
            in_flight: Gauge::default(),
            last_success_ms: AtomicU64::new(0),
        }
    }
}

impl HandlerMetrics {
    /// When a handler call last succeeded (ms since the epoch; 0: never).
    pub fn last_success_ms(&self) -> u64 {
        self.last_success_ms.load(Ordering::Relaxed)
    }
}

/// Decrements the in-flight gauge however the call ends (even dropped at
/// the end of the shutdown grace period).
struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A handler that times every call of the handler it wraps.
pub struct InstrumentedHandler<H> {
    inner: H,
    metrics: Arc<HandlerMetrics>,
}

impl<H> InstrumentedHandler<H> {
    /// Wraps `inner`, recording into `metrics`.
    pub fn new(inner: H, metrics: Arc<HandlerMetrics>) -> Self {
        Self { inner, metrics }
    }
}

impl<T: Sync, H: EventHandler<T>> EventHandler<T> for InstrumentedHandler<H> {
    fn handle<'a>(&'a self, event: &'a T) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let _in_flight = InFlight::enter(&self.metrics.in_flight);
            let started = Instant::now();
            let result = self.inner.handle(event).await;
            self.metrics
                .duration
                .observe(started.elapsed().as_secs_f64());
            if result.is_ok() {
                self.metrics
                    .last_success_ms
                    .store(now_ms(), Ordering::Relaxed);
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_success_is_timed_and_remembered_and_a_failure_only_timed() {
        let metrics = Arc::new(HandlerMetrics::default());
        let ok = InstrumentedHandler::new(
            |_: u32| async { Ok::<(), HandlerError>(()) },
            Arc::clone(&metrics),
        );
        let failing = InstrumentedHandler::new(
            |_: u32| async { Err(HandlerError::msg("no")) },
            Arc::clone(&metrics),
        );
        assert!(failing.handle(&1).await.is_err());
        assert_eq!(metrics.last_success_ms(), 0);
        assert!(ok.handle(&2).await.is_ok());
        assert!(metrics.last_success_ms() > 0);
        assert_eq!(metrics.in_flight.get(), 0);
    }
}
