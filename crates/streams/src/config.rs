//! Settings of one consumer.

use std::time::Duration;

use lifecycle_domain::EntryId;

use crate::backoff::BackoffPolicy;

/// Where to start when no offset is stored for the label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// The first entry of the stream (`0-0`), as the reference does.
    #[default]
    Beginning,
    /// After the stream's last entry at start-up: only new entries.
    End,
    /// At this entry id, inclusive.
    Id(EntryId),
}

impl StartFrom {
    /// The id reading starts after when no offset is stored: `None` for the
    /// stream's end, which only Redis knows.
    pub fn read_after(self) -> Option<EntryId> {
        match self {
            StartFrom::Beginning => Some(EntryId::ZERO),
            StartFrom::Id(id) => Some(id.predecessor().unwrap_or(EntryId::ZERO)),
            StartFrom::End => None,
        }
    }
}

/// When the offset is written to the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Checkpoint {
    /// After every entry: the reference's behaviour, one extra round trip per
    /// entry, nothing replayed after a crash.
    EveryEntry,
    /// After every batch (and before idling and at shutdown): a crash replays
    /// at most one batch.
    #[default]
    EveryBatch,
}

/// Settings of a [`StreamConsumer`](crate::StreamConsumer).
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    /// The stream key to read.
    pub stream: String,
    /// The label the offset is stored under.
    pub label: String,
    /// How long one `XREAD` blocks waiting for new entries.
    pub block_timeout: Duration,
    /// How many entries one `XREAD` asks for at most.
    pub batch_size: usize,
    /// Where to start when no offset is stored.
    pub start_from: StartFrom,
    /// When offsets are saved.
    pub checkpoint: Checkpoint,
    /// With [`Checkpoint::EveryBatch`], while caught up with the stream, how
    /// long a due offset save may wait so that one save covers the entries
    /// that trickled in meanwhile; a crash then replays at most that long's
    /// entries. Zero saves after every read.
    pub checkpoint_delay: Duration,
    /// Back-off between retries of a failing handler.
    pub handler_retry: BackoffPolicy,
    /// Back-off between attempts to reach Redis after a fault.
    pub redis_retry: BackoffPolicy,
    /// After this many failed attempts an entry is copied to the dead-letter
    /// stream and skipped; `None` retries for ever.
    pub dead_letter_after: Option<u32>,
    /// The dead-letter stream key.
    pub dead_letter_stream: String,
    /// How long the whole stop may take once shutdown is requested: handler
    /// calls in flight, the final offset save and any connect it needs.
    pub shutdown_timeout: Duration,
    /// Stop, rather than wait, once the entries present at start-up are done.
    pub drain: bool,
    /// How long establishing a connection to Redis may take.
    pub connect_timeout: Duration,
    /// How many items may be handled at once; items with the same ordering
    /// key never concurrently. 1 keeps strict stream order.
    pub concurrency: usize,
    /// The most bytes of one `XREAD` reply held in memory once parsed (its
    /// bytes and the records of its fields). Reads are sized to stay well
    /// below it; an entry larger than it is absorbed unread.
    pub max_reply_bytes: usize,
    /// The most bytes of entries read but not finished (queued, running,
    /// waiting to be dead-lettered), counted as they cost once read, with the
    /// reply of the read in flight. Reading pauses at the cap.
    pub max_held_bytes: usize,
    /// How long the consumer lease lasts without a renewal, when the consumer
    /// runs under one ([`crate::StreamConsumer::with_lease`]): renewed every
    /// third of it; a holder that cannot renew stops consuming before it can
    /// have run out; a standby that sees it gone takes over.
    pub lease_ttl: Duration,
}

/// The default of [`ConsumerConfig::concurrency`]: where the cascade's rate
/// levels off on one Redis (`lobby-worker bench` measures 1 to 256). Per-user
/// order holds at any concurrency, and memory is bounded by bytes, not by it.
pub const DEFAULT_CONCURRENCY: usize = 64;
/// The default of [`ConsumerConfig::max_reply_bytes`].
pub const DEFAULT_MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;
/// The default of [`ConsumerConfig::max_held_bytes`].
pub const DEFAULT_MAX_HELD_BYTES: usize = 16 * 1024 * 1024;

/// The default of [`ConsumerConfig::lease_ttl`].
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

impl ConsumerConfig {
    /// Defaults for reading `stream` under `label`; the dead-letter stream is
    /// `<stream>:dead`.
    pub fn new(stream: impl Into<String>, label: impl Into<String>) -> Self {
        let stream = stream.into();
        Self {
            dead_letter_stream: format!("{stream}:dead"),
            stream,
            label: label.into(),
            block_timeout: Duration::from_secs(5),
            batch_size: 1024,
            start_from: StartFrom::Beginning,
            checkpoint: Checkpoint::EveryBatch,
            checkpoint_delay: Duration::from_millis(100),
            handler_retry: BackoffPolicy {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(30),
            },
            redis_retry: BackoffPolicy {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(10),
            },
            dead_letter_after: None,
            shutdown_timeout: Duration::from_secs(10),
            drain: false,
            connect_timeout: Duration::from_secs(5),
            concurrency: DEFAULT_CONCURRENCY,
            max_reply_bytes: DEFAULT_MAX_REPLY_BYTES,
            max_held_bytes: DEFAULT_MAX_HELD_BYTES,
            lease_ttl: DEFAULT_LEASE_TTL,
        }
    }

    /// Response timeout of the reading connection: longer than the block so a
    /// quiet stream is not mistaken for a dead server.
    pub fn read_response_timeout(&self) -> Duration {
        self.block_timeout + self.block_timeout / 2 + Duration::from_secs(2)
    }

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// A text naming the setting that is out of range, in backticks
    /// (`` `batch_size` ``).
    pub fn validate(&self) -> Result<(), String> {
        if self.stream.trim().is_empty() {
            return Err("`stream` must not be empty".into());
        }
        if self.label.trim().is_empty() {
            return Err("`label` must not be empty".into());
        }
        if self.batch_size == 0 {
            return Err("`batch_size` must be at least 1".into());
        }
        if self.block_timeout < Duration::from_millis(1) {
            return Err("`block_timeout` must be at least 1ms (0 would block for ever)".into());
        }
        if self.checkpoint_delay > Duration::from_secs(60) {
            return Err("`checkpoint_delay` must be at most 60s".into());
        }
        if self.concurrency == 0 || self.concurrency > 10_000 {
            return Err("`concurrency` must be between 1 and 10000".into());
        }
        if self.max_reply_bytes < 64 * 1024 {
            return Err("`max_reply_bytes` must be at least 64 KiB".into());
        }
        if self.max_held_bytes < self.max_reply_bytes.saturating_mul(2) {
            return Err(format!(
                "`max_held_bytes` must be at least twice `max_reply_bytes` ({} bytes), so that a whole reply fits beside what is held",
                self.max_reply_bytes.saturating_mul(2)
            ));
        }
        if self.lease_ttl < Duration::from_millis(500) || self.lease_ttl > Duration::from_secs(3600)
        {
            return Err("`lease_ttl` must be between 500ms and 1h".into());
        }
        if self.shutdown_timeout < Duration::from_millis(100) {
            return Err("`shutdown_timeout` must be at least 100ms".into());
        }
        if self.dead_letter_after == Some(0) {
            return Err("`dead_letter_after` must be at least 1 attempt".into());
        }
        if self.handler_retry.initial > self.handler_retry.max {
            return Err(
                "`handler_retry.initial` must not be larger than `handler_retry.max`".into(),
            );
        }
        // Checked whether or not dead-lettering is on: a setting that would
        // copy failing entries back into the stream is wrong either way.
        if self.dead_letter_stream.trim().is_empty() {
            return Err("`dead_letter_stream` must not be empty".into());
        }
        if self.dead_letter_stream == self.stream {
            return Err("`dead_letter_stream` must differ from `stream`".into());
        }
        Ok(())
    }
}
