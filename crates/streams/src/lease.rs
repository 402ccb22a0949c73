//! The lease's timing decisions, without I/O or a clock of their own.
//!
//! A lease taken or renewed by a command *sent* at `t` lasts at least until
//! `t + ttl` on the server (the server starts counting when the command
//! arrives, later). This process consumes only until `t + ttl - margin`
//! (the margin covers clock-rate drift between the two machines): a reply
//! that comes late, or never, cannot make it consume past the lease's end.
//! Renewals go out every third of the ttl, so two may fail before the lease
//! is given up; a failed one is retried soon after.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// The lease's periods, all derived from the ttl.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LeaseTiming {
    /// How long the lease lasts without a renewal.
    pub ttl: Duration,
    /// Between renewals.
    pub renew_every: Duration,
    /// Before the lease's end (counted from the renewal's sending), when
    /// this process stops consuming.
    pub margin: Duration,
    /// After a failed renewal, before the next attempt.
    pub retry_every: Duration,
    /// Between a standby's attempts to take the lease.
    pub standby_poll: Duration,
}

impl LeaseTiming {
    /// The periods for `ttl`: renewals every third; a margin of a tenth
    /// (at least 50 ms); retries every twentieth (at least 50 ms); a standby
    /// tries every fifth, at most every second apart and at least 50 ms
    /// apart.
    pub(crate) fn new(ttl: Duration) -> Self {
        let floor = Duration::from_millis(50);
        Self {
            ttl,
            renew_every: ttl / 3,
            margin: (ttl / 10).max(floor),
            retry_every: (ttl / 20).max(floor),
            standby_poll: (ttl / 5).clamp(floor, Duration::from_secs(1)),
        }
    }

    /// Until when a lease taken or renewed by a command sent at `sent_at`
    /// lets this process consume.
    fn valid_until(&self, sent_at: Instant) -> Instant {
        sent_at + self.ttl.saturating_sub(self.margin)
    }
}

/// What the lease keeper is to do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LeaseStep {
    /// Nothing until then.
    WaitUntil(Instant),
    /// Send a renewal; its reply must come before the instant given.
    Renew {
        /// When the lease ends for this process if the renewal is not
        /// confirmed.
        answer_by: Instant,
    },
    /// The lease may have run out: stop consuming.
    Expired,
}

/// A held lease's clock: see the module doc.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LeaseClock {
    timing: LeaseTiming,
    valid_until: Instant,
    next_renewal: Instant,
}

impl LeaseClock {
    /// A lease taken by the command sent at `sent_at`.
    pub(crate) fn acquired(timing: LeaseTiming, sent_at: Instant) -> Self {
        Self {
            timing,
            valid_until: timing.valid_until(sent_at),
            next_renewal: sent_at + timing.renew_every,
        }
    }

    /// What to do at `now`.
    pub(crate) fn step(&self, now: Instant) -> LeaseStep {
        if now >= self.valid_until {
            LeaseStep::Expired
        } else if now >= self.next_renewal {
            LeaseStep::Renew {
                answer_by: self.valid_until,
            }
        } else {
            LeaseStep::WaitUntil(self.next_renewal.min(self.valid_until))
        }
    }

    /// The renewal sent at `sent_at` was confirmed.
    pub(crate) fn renewed(&mut self, sent_at: Instant) {
        self.valid_until = self.valid_until.max(self.timing.valid_until(sent_at));
        self.next_renewal = sent_at + self.timing.renew_every;
    }

    /// The renewal failed at `now` (Redis unreachable): the next goes out
    /// after the retry period, while the lease lasts.
    pub(crate) fn renewal_failed(&mut self, now: Instant) {
        self.next_renewal = now + self.timing.retry_every;
    }

    /// How long the lease lasts without a renewal.
    pub(crate) fn ttl(&self) -> Duration {
        self.timing.ttl
    }

    /// Until when this process may consume.
    pub(crate) fn valid_until(&self) -> Instant {
        self.valid_until
    }
}

/// What the driver checks before it reads, starts a handler call or saves:
/// whether the lease still lets this process consume. Shared between the
/// keeper, which extends it, and the driver; a process resumed after a
/// pause (SIGSTOP, a VM freeze) sees it expired before anything else,
/// whatever order its timers fire in.
#[derive(Debug)]
pub(crate) struct LeaseGuard {
    until: Mutex<Instant>,
}

impl LeaseGuard {
    /// A guard valid until `until`.
    pub(crate) fn new(until: Instant) -> Self {
        Self {
            until: Mutex::new(until),
        }
    }

    /// Moves the end to `until` (never earlier).
    pub(crate) fn extend(&self, until: Instant) {
        let mut current = self.until.lock().unwrap_or_else(PoisonError::into_inner);
        *current = (*current).max(until);
    }

    /// Ends it now: nothing more is read, started or saved.
    pub(crate) fn revoke(&self) {
        *self.until.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    /// Whether the lease lets this process consume now.
    pub(crate) fn valid(&self) -> bool {
        Instant::now() < *self.until.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(9);

    #[test]
    fn the_periods_follow_the_ttl() {
        let timing = LeaseTiming::new(Duration::from_secs(10));
        assert_eq!(
            timing.renew_every,
            Duration::from_millis(3333) + Duration::from_nanos(333_333)
        );
        assert_eq!(timing.margin, Duration::from_secs(1));
        assert_eq!(timing.retry_every, Duration::from_millis(500));
        assert_eq!(timing.standby_poll, Duration::from_secs(1));
        let short = LeaseTiming::new(Duration::from_millis(500));
        assert_eq!(short.standby_poll, Duration::from_millis(100));
        assert_eq!(short.margin, Duration::from_millis(50));
        assert_eq!(short.retry_every, Duration::from_millis(50));
    }

    #[test]
    fn a_lease_is_renewed_every_third_and_lasts_from_when_it_was_sent() {
        let t0 = Instant::now();
        let timing = LeaseTiming::new(TTL);
        let mut clock = LeaseClock::acquired(timing, t0);
        // The acquisition's reply came late: it still counts from t0.
        assert_eq!(clock.valid_until(), t0 + TTL - timing.margin);
        assert_eq!(
            clock.step(t0 + Duration::from_secs(1)),
            LeaseStep::WaitUntil(t0 + Duration::from_secs(3))
        );
        assert_eq!(
            clock.step(t0 + Duration::from_secs(3)),
            LeaseStep::Renew {
                answer_by: t0 + TTL - timing.margin
            }
        );
        // Sent at 3 s, confirmed at 5 s: valid until 3 s + ttl - margin.
        let sent = t0 + Duration::from_secs(3);
        clock.renewed(sent);
        assert_eq!(clock.valid_until(), sent + TTL - timing.margin);
        assert_eq!(
            clock.step(t0 + Duration::from_secs(5)),
            LeaseStep::WaitUntil(t0 + Duration::from_secs(6))
        );
    }

    #[test]
    fn failed_renewals_are_retried_until_the_lease_expires() {
        let t0 = Instant::now();
        let timing = LeaseTiming::new(TTL);
        let mut clock = LeaseClock::acquired(timing, t0);
        let end = t0 + TTL - timing.margin;
        let mut now = t0 + timing.renew_every;
        let mut attempts = 0;
        loop {
            match clock.step(now) {
                LeaseStep::Renew { answer_by } => {
                    assert_eq!(answer_by, end, "a reply after the end does not count");
                    attempts += 1;
                    clock.renewal_failed(now);
                }
                LeaseStep::WaitUntil(at) => {
                    assert!(at > now && at <= end);
                    now = at;
                }
                LeaseStep::Expired => break,
            }
        }
        assert_eq!(now, end, "stops exactly when the lease may have run out");
        assert!(attempts >= 10, "retried every {:?}", timing.retry_every);
    }

    #[test]
    fn a_late_confirmation_never_shortens_the_lease() {
        let t0 = Instant::now();
        let timing = LeaseTiming::new(TTL);
        let mut clock = LeaseClock::acquired(timing, t0 + Duration::from_secs(3));
        let before = clock.valid_until();
        // A confirmation of an older renewal arrives out of order.
        clock.renewed(t0);
        assert_eq!(clock.valid_until(), before);
    }

    #[test]
    fn a_paused_process_finds_its_lease_expired_on_waking() {
        let t0 = Instant::now();
        let clock = LeaseClock::acquired(LeaseTiming::new(TTL), t0);
        assert_eq!(clock.ttl(), TTL, "what each renewal asks for");
        // SIGSTOP for longer than the ttl, then SIGCONT: no renewal is
        // attempted, the lease is given up.
        assert_eq!(clock.step(t0 + TTL * 2), LeaseStep::Expired);
    }

    #[test]
    fn the_guard_extends_forwards_and_revokes_at_once() {
        let now = Instant::now();
        let guard = LeaseGuard::new(now + Duration::from_secs(60));
        assert!(guard.valid());
        guard.extend(now);
        assert!(guard.valid(), "never moved earlier");
        guard.revoke();
        assert!(!guard.valid());
        let expired = LeaseGuard::new(now);
        assert!(!expired.valid());
        expired.extend(now + Duration::from_secs(60));
        assert!(expired.valid(), "extended forwards");
    }
}
