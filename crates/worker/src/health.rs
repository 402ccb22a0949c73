//! Whether the worker is consuming: what `/readyz` and `lobby_ready` say.

use std::sync::Arc;
use std::time::Duration;

use lifecycle_streams::{now_ms, ConsumerStats};

use crate::handler_metrics::HandlerMetrics;
use crate::outcome::{Failing, LastOutcome};

/// The verdict of one readiness check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Connected to Redis and consuming.
    Ready,
    /// Waiting as a standby while another process holds the consumer lease,
    /// with Redis answering: healthy, ready to take over.
    Standby,
    /// Not consuming, and why, in a few words.
    NotReady(String),
}

impl Readiness {
    /// Whether it is [`Readiness::Ready`].
    pub fn is_ready(&self) -> bool {
        matches!(self, Readiness::Ready | Readiness::Standby)
    }
}

/// Tells readiness from the consumer's counters, the handler's outcomes
/// and the offset saves' outcomes.
#[derive(Debug)]
pub struct Health {
    stats: Arc<ConsumerStats>,
    handler: Arc<HandlerMetrics>,
    offset_saves: Arc<LastOutcome>,
    stale_after: Duration,
    /// When the worker started (ms since the Unix epoch).
    started_ms: u64,
    /// Whether the worker consumes only while holding the consumer lease.
    leased: bool,
}

impl Health {
    /// Ready once the first read was sent, while Redis takes the worker's
    /// writes (the last offset save and the last cascade did not fail), no
    /// Redis failure came after the last read reply, and the last read reply
    /// (or handled event) is at most `stale_after` old.
    pub fn new(
        stats: Arc<ConsumerStats>,
        handler: Arc<HandlerMetrics>,
        offset_saves: Arc<LastOutcome>,
        stale_after: Duration,
    ) -> Self {
        Self {
            stats,
            handler,
            offset_saves,
            stale_after,
            started_ms: now_ms(),
            leased: false,
        }
    }

    /// For a worker that consumes only while holding the consumer lease: a
    /// standby whose attempts at the lease get answers is [`Readiness::Standby`].
    #[must_use]
    pub fn under_lease(mut self) -> Self {
        self.leased = true;
        self
    }

    /// How long a worker may go without a read reply or a handled event
    /// before it is not ready: two blocking reads and a margin.
    pub fn stale_after(block_timeout: Duration) -> Duration {
        block_timeout.saturating_mul(2) + Duration::from_secs(5)
    }

    /// The verdict at `now_ms` (ms since the Unix epoch).
    pub fn readiness(&self, now_ms: u64) -> Readiness {
        let stats = self.stats.snapshot();
        let ago = |at: u64| seconds(now_ms.saturating_sub(at));
        if self.leased && stats.lease_held == 0 {
            let checked = stats.lease_checked_ms;
            let since = now_ms.saturating_sub(checked.max(self.started_ms));
            return if checked > 0 && u128::from(since) <= self.stale_after.as_millis() {
                Readiness::Standby
            } else if checked == 0 && u128::from(since) <= self.stale_after.as_millis() {
                Readiness::NotReady("starting: the lease not checked yet".to_owned())
            } else {
                Readiness::NotReady(format!(
                    "standby: no answer from Redis about the lease for {}",
                    seconds(since)
                ))
            };
        }
        let writes = [
            ("offset save", self.offset_saves.failing()),
            ("cascade", self.handler.outcome().failing()),
        ];
        // Refused writes first: reads may go on meanwhile.
        for (what, failing) in writes {
            if let Some(Failing {
                at_ms,
                refused: Some(code),
            }) = failing
            {
                return Readiness::NotReady(format!(
                    "Redis refuses writes ({code}): the last {what} was refused {} ago, retrying",
                    ago(at_ms)
                ));
            }
        }
        if stats.last_fault_ms > 0 && stats.last_fault_ms >= stats.last_read_ms {
            return Readiness::NotReady(format!(
                "Redis unavailable: last failure {} ago, retrying",
                ago(stats.last_fault_ms)
            ));
        }
        for (what, failing) in writes {
            if let Some(Failing { at_ms, .. }) = failing {
                return Readiness::NotReady(format!(
                    "the last {what} failed {} ago, retrying",
                    ago(at_ms)
                ));
            }
        }
        if stats.last_read_ms == 0 && stats.reads == 0 {
            return Readiness::NotReady("starting: not reading from Redis yet".to_owned());
        }
        // The first read of an idle stream is answered after a whole block.
        let progress = stats
            .last_read_ms
            .max(self.handler.outcome().last_success_ms())
            .max(self.started_ms);
        let idle = now_ms.saturating_sub(progress);
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
#[allow(clippy::unwrap_used)]
mod tests {
    use lifecycle_domain::{HandlerError, StoreError};

    use super::*;
    use crate::outcome::refusal_in;

    /// The error the `redis` crate makes of the server's reply `-LINE`.
    fn redis_error(line: &str) -> redis::RedisError {
        redis::parse_redis_value(format!("-{line}\r\n").as_bytes())
            .and_then(redis::Value::extract_error)
            .unwrap_err()
    }

    /// A store's failure over `err`, as the Redis stores make it.
    fn store_error(err: redis::RedisError) -> StoreError {
        StoreError {
            action: "save the offset 5-0 at lobby:stream_offsets:user_lifecycle".to_owned(),
            permanent: false,
            source: Box::new(err),
        }
    }

    const OOM: &str = "OOM command not allowed when used memory > 'maxmemory'. script: d60fc68d93de5c99ba4ffcd709951d3992a752ee, on @user_script:28.";

    fn health(handler: &Arc<HandlerMetrics>, offset_saves: &Arc<LastOutcome>) -> Health {
        Health::new(
            Arc::default(),
            Arc::clone(handler),
            Arc::clone(offset_saves),
            Health::stale_after(Duration::from_secs(5)),
        )
    }

    #[test]
    fn a_refusal_is_found_among_the_causes() {
        let store = store_error(redis_error(OOM));
        assert_eq!(refusal_in(&store), Some("OOM"));
        let handler = HandlerError::with_source("apply the lobby cascade", store).transient();
        assert_eq!(refusal_in(&handler), Some("OOM"));
        let misconf = store_error(redis_error(
            "MISCONF Redis is configured to save RDB snapshots",
        ));
        assert_eq!(refusal_in(&misconf), Some("MISCONF"));
        let wrong_type = store_error(redis_error("WRONGTYPE Operation against a key"));
        assert_eq!(refusal_in(&wrong_type), None);
        let io = store_error(redis::RedisError::from(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert_eq!(refusal_in(&io), None);
        assert_eq!(refusal_in(&HandlerError::msg("no cause")), None);
    }

    #[test]
    fn an_outcome_fails_from_a_failure_until_a_success() {
        let outcome = LastOutcome::default();
        assert_eq!(outcome.failing(), None);
        outcome.failed_at(1_000, &store_error(redis_error(OOM)));
        assert_eq!(
            outcome.failing(),
            Some(Failing {
                at_ms: 1_000,
                refused: Some("OOM")
            })
        );
        outcome.succeeded_at(1_500);
        assert_eq!(outcome.failing(), None);
        assert_eq!(outcome.last_success_ms(), 1_500);
        // The latest failure's cause is the one told.
        outcome.failed_at(2_000, &HandlerError::msg("no cause"));
        assert_eq!(
            outcome.failing(),
            Some(Failing {
                at_ms: 2_000,
                refused: None
            })
        );
    }

    #[test]
    fn refused_writes_make_the_worker_not_ready_until_one_passes() {
        let handler = Arc::new(HandlerMetrics::default());
        let offset_saves = Arc::new(LastOutcome::default());
        let health = health(&handler, &offset_saves);
        offset_saves.failed_at(1_000, &store_error(redis_error(OOM)));
        assert_eq!(
            health.readiness(1_400),
            Readiness::NotReady(
                "Redis refuses writes (OOM): the last offset save was refused 0.4s ago, retrying"
                    .into()
            )
        );
        offset_saves.succeeded_at(1_500);
        let cascade = HandlerError::with_source(
            "apply the lobby cascade",
            store_error(redis_error(
                "MISCONF Redis is configured to save RDB snapshots",
            )),
        )
        .transient();
        handler.outcome().failed_at(2_000, &cascade);
        assert_eq!(
            health.readiness(4_000),
            Readiness::NotReady(
                "Redis refuses writes (MISCONF): the last cascade was refused 2.0s ago, retrying"
                    .into()
            )
        );
        handler.outcome().succeeded_at(4_500);
        assert_eq!(
            health.readiness(5_000),
            Readiness::NotReady("starting: not reading from Redis yet".into())
        );
    }

    #[test]
    fn other_write_failures_make_the_worker_not_ready_too() {
        let handler = Arc::new(HandlerMetrics::default());
        let offset_saves = Arc::new(LastOutcome::default());
        let health = health(&handler, &offset_saves);
        let reset = || {
            store_error(redis::RedisError::from(std::io::Error::from(
                std::io::ErrorKind::ConnectionReset,
            )))
        };
        handler.outcome().failed_at(1_000, &reset());
        assert_eq!(
            health.readiness(1_300),
            Readiness::NotReady("the last cascade failed 0.3s ago, retrying".into())
        );
        offset_saves.failed_at(1_100, &reset());
        assert_eq!(
            health.readiness(1_300),
            Readiness::NotReady("the last offset save failed 0.2s ago, retrying".into())
        );
        // A refusal is told before a plain failure.
        handler
            .outcome()
            .failed_at(1_200, &store_error(redis_error(OOM)));
        assert_eq!(
            health.readiness(1_300),
            Readiness::NotReady(
                "Redis refuses writes (OOM): the last cascade was refused 0.1s ago, retrying"
                    .into()
            )
        );
    }

    #[test]
    fn a_fresh_worker_is_starting() {
        let health = Health::new(
            Arc::default(),
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
