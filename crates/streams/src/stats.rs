//! Counters a consumer keeps about itself, for tests, `demo` and metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Live counters of one consumer, shared with whoever observes it.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    handled: AtomicU64,
    malformed: AtomicU64,
    unknown_type: AtomicU64,
    dead_lettered: AtomicU64,
    handler_failures: AtomicU64,
    redis_faults: AtomicU64,
    reconnects: AtomicU64,
    offset_saves: AtomicU64,
    reads: AtomicU64,
    trimmed: AtomicU64,
    trims_suspected: AtomicU64,
    rewinds: AtomicU64,
    held_bytes: AtomicU64,
    held_bytes_peak: AtomicU64,
    held_entries: AtomicU64,
    last_read_ms: AtomicU64,
    last_fault_ms: AtomicU64,
    lease_held: AtomicU64,
    lease_acquisitions: AtomicU64,
    lease_lost: AtomicU64,
    lease_token: AtomicU64,
    lease_checked_ms: AtomicU64,
}

/// A copy of [`ConsumerStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Entries the handler finished.
    pub handled: u64,
    /// Malformed entries absorbed.
    pub malformed: u64,
    /// Entries of unknown type absorbed.
    pub unknown_type: u64,
    /// Entries copied to the dead-letter stream and skipped.
    pub dead_lettered: u64,
    /// Handler calls that returned an error.
    pub handler_failures: u64,
    /// Redis failures met (each retry counts).
    pub redis_faults: u64,
    /// Connections re-established after a fault.
    pub reconnects: u64,
    /// Offsets written to the store.
    pub offset_saves: u64,
    /// `XREAD` round trips.
    pub reads: u64,
    /// Times entries were found deleted before they were handled (or the
    /// stream found behind the position).
    pub trimmed: u64,
    /// Times the stream was found to begin after the position with nothing
    /// to prove that entries lay in between.
    pub trims_suspected: u64,
    /// Times the stored offset was found behind this consumer's saves (Redis
    /// lost acknowledged writes, or an operator rewound it) and the entries
    /// after it were read again.
    pub rewinds: u64,
    /// Bytes of entries read but not finished, as the engine charges them
    /// (see `ConsumerConfig::max_held_bytes`).
    pub held_bytes: u64,
    /// The largest `held_bytes` seen.
    pub held_bytes_peak: u64,
    /// Entries read and not yet behind the offset.
    pub held_entries: u64,
    /// When the last `XREAD` reply arrived (ms since the Unix epoch; 0:
    /// never), entries or not: the read connection works.
    pub last_read_ms: u64,
    /// When the last Redis failure was met (ms since the Unix epoch; 0:
    /// never). After `last_read_ms`: an outage is going on.
    pub last_fault_ms: u64,
    /// Whether this process holds the consumer lease (0 or 1; always 0
    /// without a lease).
    pub lease_held: u64,
    /// Times this process took the lease.
    pub lease_acquisitions: u64,
    /// Times this process lost the lease while consuming (it could not renew
    /// in time, a renewal or a save was refused, or an operator took it),
    /// not counting graceful releases.
    pub lease_lost: u64,
    /// The fencing token of the lease this process holds or last held (0:
    /// never).
    pub lease_token: u64,
    /// When an attempt at the lease last got an answer from the store (ms
    /// since the Unix epoch; 0: never): a standby that keeps getting answers
    /// is healthy.
    pub lease_checked_ms: u64,
}

impl StatsSnapshot {
    /// Entries whose handling is finished, whatever the outcome.
    pub fn finished(&self) -> u64 {
        self.handled + self.malformed + self.unknown_type + self.dead_lettered
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Milliseconds since the Unix epoch (0 before it): the clock of
/// [`StatsSnapshot`]'s timestamps (`last_read_ms`, `last_fault_ms`), for
/// whoever compares them with now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

impl ConsumerStats {
    pub(crate) fn handled(&self) {
        bump(&self.handled);
    }
    pub(crate) fn malformed(&self) {
        bump(&self.malformed);
    }
    pub(crate) fn unknown_type(&self) {
        bump(&self.unknown_type);
    }
    pub(crate) fn dead_lettered(&self) {
        bump(&self.dead_lettered);
    }
    pub(crate) fn handler_failure(&self) {
        bump(&self.handler_failures);
    }
    pub(crate) fn redis_fault(&self) {
        bump(&self.redis_faults);
        self.last_fault_ms.store(now_ms(), Ordering::Relaxed);
    }
    pub(crate) fn reconnect(&self) {
        bump(&self.reconnects);
    }
    pub(crate) fn offset_saved(&self) {
        bump(&self.offset_saves);
    }
    pub(crate) fn read(&self) {
        bump(&self.reads);
    }
    pub(crate) fn trimmed(&self) {
        bump(&self.trimmed);
    }
    pub(crate) fn held(&self, bytes: usize, entries: usize) {
        let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
        self.held_bytes.store(bytes, Ordering::Relaxed);
        self.held_bytes_peak.fetch_max(bytes, Ordering::Relaxed);
        self.held_entries.store(
            u64::try_from(entries).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
    pub(crate) fn rewound(&self) {
        bump(&self.rewinds);
    }
    pub(crate) fn trim_suspected(&self) {
        bump(&self.trims_suspected);
    }
    pub(crate) fn lease_acquired(&self, token: u64) {
        bump(&self.lease_acquisitions);
        self.lease_token.store(token, Ordering::Relaxed);
        self.lease_held.store(1, Ordering::Relaxed);
    }
    pub(crate) fn lease_checked(&self) {
        self.lease_checked_ms.store(now_ms(), Ordering::Relaxed);
    }
    pub(crate) fn lease_released(&self, lost: bool) {
        if lost {
            bump(&self.lease_lost);
        }
        self.lease_held.store(0, Ordering::Relaxed);
    }
    pub(crate) fn read_completed(&self) {
        self.last_read_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StatsSnapshot {
            handled: get(&self.handled),
            malformed: get(&self.malformed),
            unknown_type: get(&self.unknown_type),
            dead_lettered: get(&self.dead_lettered),
            handler_failures: get(&self.handler_failures),
            redis_faults: get(&self.redis_faults),
            reconnects: get(&self.reconnects),
            offset_saves: get(&self.offset_saves),
            reads: get(&self.reads),
            trimmed: get(&self.trimmed),
            trims_suspected: get(&self.trims_suspected),
            rewinds: get(&self.rewinds),
            held_bytes: get(&self.held_bytes),
            held_bytes_peak: get(&self.held_bytes_peak),
            held_entries: get(&self.held_entries),
            last_read_ms: get(&self.last_read_ms),
            last_fault_ms: get(&self.last_fault_ms),
            lease_held: get(&self.lease_held),
            lease_acquisitions: get(&self.lease_acquisitions),
            lease_lost: get(&self.lease_lost),
            lease_token: get(&self.lease_token),
            lease_checked_ms: get(&self.lease_checked_ms),
        }
    }
}
