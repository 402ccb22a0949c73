//! Helpers shared by the adapters' integration tests.

// Each test crate uses its own part of these.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use lifecycle_domain::{RunOutcome, UserLifecycleConsumer};
use lifecycle_redis::{open_client, RedisUserLifecycleConsumer};
use lifecycle_streams::ConsumerError;
use lifecycle_test_support::RedisServer;
use redis::aio::MultiplexedConnection;
use tokio::task::JoinHandle;

/// How often [`wait_until!`] re-checks its condition.
pub const POLL: Duration = Duration::from_millis(5);

/// Polls `$cond` (an expression that may `.await`) every [`POLL`] until it
/// holds; panics naming `$what` when `$timeout` passes first.
#[macro_export]
macro_rules! wait_until {
    ($timeout:expr, $what:expr, $cond:expr) => {{
        let timeout: Duration = $timeout;
        let deadline = Instant::now() + timeout;
        loop {
            if $cond {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting until {}",
                $what
            );
            tokio::time::sleep($crate::common::POLL).await;
        }
    }};
}

/// A connection to `server` for setting up and inspecting keys.
pub async fn connect(server: &RedisServer) -> MultiplexedConnection {
    open_client(&server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A consumer's `run` (the consumer port's) on its own task.
pub type RunHandle = JoinHandle<Result<RunOutcome, ConsumerError>>;

/// Starts `consumer.run()` on its own task.
pub fn spawn_run(consumer: &Arc<RedisUserLifecycleConsumer>) -> RunHandle {
    let consumer = Arc::clone(consumer);
    tokio::spawn(async move { consumer.run().await })
}

/// Awaits the end of a run that was asked to stop (or is about to end).
pub async fn join(run: RunHandle, within: Duration) -> Result<RunOutcome, ConsumerError> {
    tokio::time::timeout(within, run)
        .await
        .unwrap_or_else(|_| panic!("run did not return within {within:?}"))
        .expect("the run task panicked")
}

/// Shuts the consumer down and returns how its run ended; it must end
/// cleanly.
pub async fn stop(consumer: &RedisUserLifecycleConsumer, run: RunHandle) -> RunOutcome {
    consumer.shutdown();
    join(run, Duration::from_secs(5))
        .await
        .expect("run ended with an error")
}
