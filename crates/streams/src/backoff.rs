//! Exponential back-off with jitter, for handler retries and Redis faults.

use std::time::Duration;

use rand::Rng;

/// Bounds of an exponential back-off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// Ceiling of the first delay.
    pub initial: Duration,
    /// Ceiling every later delay is capped at.
    pub max: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

/// The delays of one run of failures: each delay is drawn from
/// `[ceiling / 2, ceiling]` ("equal jitter") and the ceiling doubles up to
/// `max`. The lower half-bound keeps delays growing while the ceiling grows
/// (the next delay is at least the previous ceiling), and the jitter keeps a
/// fleet of workers from retrying in step.
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: BackoffPolicy,
    ceiling: Duration,
    attempts: u32,
}

impl Backoff {
    /// A fresh back-off whose first delay is at most `policy.initial`.
    pub fn new(policy: BackoffPolicy) -> Self {
        let initial = policy.initial.min(policy.max);
        Self {
            policy,
            ceiling: initial,
            attempts: 0,
        }
    }

    /// The delay before the next retry.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(&mut rand::rng())
    }

    /// [`Backoff::next_delay`] with a caller's source of randomness, for
    /// reproducible tests.
    pub fn next_delay_with(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling;
        let floor = ceiling / 2;
        let span = ceiling.saturating_sub(floor).as_nanos();
        let jitter = u64::try_from(span).unwrap_or(u64::MAX);
        let delay = floor + Duration::from_nanos(rng.random_range(0..=jitter));
        self.ceiling = ceiling.saturating_mul(2).min(self.policy.max);
        self.attempts = self.attempts.saturating_add(1);
        delay
    }

    /// How many delays were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        *self = Self::new(self.policy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn policy(initial_ms: u64, max_ms: u64) -> BackoffPolicy {
        BackoffPolicy {
            initial: Duration::from_millis(initial_ms),
            max: Duration::from_millis(max_ms),
        }
    }

    #[test]
    fn delays_grow_until_the_cap_then_stay_within_it() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut backoff = Backoff::new(policy(100, 1_000));
        let delays: Vec<Duration> = (0..12).map(|_| backoff.next_delay_with(&mut rng)).collect();
        let ceilings = [
            100u64, 200, 400, 800, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000,
        ];
        for (delay, ceiling) in delays.iter().zip(ceilings) {
            let ceiling = Duration::from_millis(ceiling);
            assert!(
                *delay >= ceiling / 2 && *delay <= ceiling,
                "{delay:?} vs {ceiling:?}"
            );
        }
        for pair in delays.windows(2).take(4) {
            if let [earlier, later] = pair {
                assert!(later >= earlier, "{delays:?}");
            }
        }
        assert_eq!(backoff.attempts(), 12);
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut backoff = Backoff::new(policy(1_000, 1_000));
        let distinct: std::collections::HashSet<Duration> =
            (0..50).map(|_| backoff.next_delay()).collect();
        assert!(distinct.len() > 40, "{}", distinct.len());
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::new(policy(10, 10_000));
        for _ in 0..8 {
            backoff.next_delay();
        }
        backoff.reset();
        assert_eq!(backoff.attempts(), 0);
        assert!(backoff.next_delay() <= Duration::from_millis(10));
    }

    #[test]
    fn an_initial_above_the_max_is_capped() {
        let mut backoff = Backoff::new(policy(5_000, 50));
        assert!(backoff.next_delay() <= Duration::from_millis(50));
    }

    #[test]
    fn zero_delays_do_not_panic() {
        let mut backoff = Backoff::new(policy(0, 0));
        assert_eq!(backoff.next_delay(), Duration::ZERO);
    }
}
