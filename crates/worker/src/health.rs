//! Whether the worker is consuming: what `/readyz` and `lobby_ready` say.

use std::sync::Arc;
use std::time::Duration;

use lifecycle_streams::{now_ms, ConsumerStats};

use crate::handler_metrics::HandlerMetrics;

/// The verdict of one readiness check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Connected to Redis and consuming.
    Ready,
    /// Not consuming, and why, in a few words.
    NotReady(String),
}

impl Readiness {
    /// Whether it is [`Readiness::Ready`].
    pub fn is_ready(&self) -> bool {
        matches!(self, Readiness::Ready)
    }
}

/// Tells readiness from the consumer's counters and the handler's last
/// success.
#[derive(Debug)]
pub struct Health {
    stats: Arc<ConsumerStats>,
    handler: Arc<HandlerMetrics>,
    stale_after: Duration,
    /// When the worker started (ms since the Unix epoch).
    started_ms: u64,
}

impl Health {
    /// Ready once the first read was sent, while no Redis failure came
    /// after the last read reply, and while the last read reply (or handled
    /// event) is at most `stale_after` old.
    pub fn new(
        stats: Arc<ConsumerStats>,
        handler: Arc<HandlerMetrics>,
        stale_after: Duration,
    ) -> Self {
        Self {
            stats,
            handler,
            stale_after,
            started_ms: now_ms(),
        }
    }

    /// How long a worker may go without a read reply or a handled event
    /// before it is not ready: two blocking reads and a margin.
    pub fn stale_after(block_timeout: Duration) -> Duration {
        block_timeout.saturating_mul(2) + Duration::from_secs(5)
    }

    /// The verdict at `now` (ms since the Unix epoch, on the clock of
    /// [`now_ms`]).
    pub fn readiness(&self, now: u64) -> Readiness {
        let stats = self.stats.snapshot();
        let ago = |at: u64| seconds(now.saturating_sub(at));
        if stats.last_fault_ms > 0 && stats.last_fault_ms >= stats.last_read_ms {
            return Readiness::NotReady(format!(
                "Redis unavailable: last failure {} ago, retrying",
                ago(stats.last_fault_ms)
            ));
        }
        if stats.last_read_ms == 0 && stats.reads == 0 {
            return Readiness::NotReady("starting: not reading from Redis yet".to_owned());
        }
        // The first read of an idle stream is answered after a whole block.
        let progress = stats
            .last_read_ms
            .max(self.handler.last_success_ms())
            .max(self.started_ms);
        let idle = now.saturating_sub(progress);
        if u128::from(idle) > self.stale_after.as_millis() {
            return Readiness::NotReady(format!(
                "not consuming: no read from Redis and no event handled for {}",
                seconds(idle)
            ));
        }
        Readiness::Ready
    }
}

fn seconds(ms: u64) -> String {
    format!("{}.{}s", ms / 1000, (ms % 1000) / 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_worker_is_starting() {
        let health = Health::new(
            Arc::default(),
            Arc::default(),
            Health::stale_after(Duration::from_secs(5)),
        );
        assert_eq!(
            health.readiness(1_000),
            Readiness::NotReady("starting: not reading from Redis yet".into())
        );
        assert_eq!(seconds(15_250), "15.2s");
    }

    #[test]
    fn the_stale_window_is_two_blocks_and_a_margin() {
        assert_eq!(
            Health::stale_after(Duration::from_millis(250)),
            Duration::from_millis(5_500)
        );
    }
}
