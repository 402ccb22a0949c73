//! The handler decorator of `run`: it times each call, counts the calls in
//! flight and remembers the last success. The metrics registry exposes what
//! it records, and readiness reads the last success; this module knows
//! neither.

use std::sync::Arc;
use std::time::Instant;

use lifecycle_domain::{BoxFuture, EventHandler, HandlerError};

use crate::outcome::LastOutcome;
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
    /// Successes, and failures on an unavailable dependency (transient: a
    /// cascade Redis refused or could not take); failures that may be the
    /// event's own fault are left out.
    outcome: LastOutcome,
}

impl Default for HandlerMetrics {
    fn default() -> Self {
        Self {
            duration: Histogram::new(HANDLER_BUCKETS),
            in_flight: Gauge::default(),
            outcome: LastOutcome::default(),
        }
    }
}

impl HandlerMetrics {
    /// The last handler call's success or dependency failure.
    pub fn outcome(&self) -> &LastOutcome {
        &self.outcome
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
            match &result {
                Ok(()) => self.metrics.outcome.succeeded(),
                Err(err) if err.is_transient() => self.metrics.outcome.failed(err),
                Err(_) => {}
            }
            result
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use lifecycle_domain::{StoreError, UserLifecycleEvent};

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
        assert_eq!(metrics.outcome().last_success_ms(), 0);
        assert!(ok.handle(&2).await.is_ok());
        assert!(metrics.outcome().last_success_ms() > 0);
        assert_eq!(metrics.in_flight.get(), 0);
    }

    /// A handler answering each call with the next of `outcomes`.
    struct Scripted(std::sync::Mutex<Vec<Result<(), HandlerError>>>);

    impl EventHandler<UserLifecycleEvent> for Scripted {
        fn handle<'a>(
            &'a self,
            _event: &'a UserLifecycleEvent,
        ) -> BoxFuture<'a, Result<(), HandlerError>> {
            let next = self.0.lock().unwrap().remove(0);
            Box::pin(async move { next })
        }
    }

    fn refused() -> StoreError {
        StoreError {
            action: "apply the cascade of entry 1-0".to_owned(),
            permanent: false,
            source: Box::new(redis::make_extension_error(
                "OOM".to_owned(),
                Some("command not allowed when used memory > 'maxmemory'.".to_owned()),
            )),
        }
    }

    #[tokio::test]
    async fn the_handlers_dependency_failures_are_recorded_and_its_own_are_not() {
        let metrics = Arc::new(HandlerMetrics::default());
        let handler = InstrumentedHandler::new(
            Scripted(std::sync::Mutex::new(vec![
                Err(HandlerError::with_source("apply the lobby cascade", refused()).transient()),
                Ok(()),
                Err(HandlerError::msg("the event's own fault")),
            ])),
            Arc::clone(&metrics),
        );
        let fields: [(&[u8], &[u8]); 3] = [
            (b"event_type", b"user.deleted"),
            (b"user_id", b"u"),
            (b"occurred_at_ms", b"5"),
        ];
        let event = lifecycle_domain::decode_user_lifecycle_event(
            lifecycle_domain::EntryId::new(1, 0),
            &fields,
        )
        .unwrap();
        assert!(handler.handle(&event).await.is_err());
        let failing = metrics.outcome().failing().unwrap();
        assert_eq!(failing.refused, Some("OOM"));
        handler.handle(&event).await.unwrap();
        assert_eq!(metrics.outcome().failing(), None);
        assert!(metrics.outcome().last_success_ms() > 0);
        assert!(handler.handle(&event).await.is_err());
        assert_eq!(
            metrics.outcome().failing(),
            None,
            "an own fault was recorded"
        );
    }
}
