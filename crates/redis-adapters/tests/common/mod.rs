//! Helpers shared by the adapters' integration tests.

use std::time::Duration;

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
