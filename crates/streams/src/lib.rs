//! A generic, reliable Redis Streams consumer.
//!
//! One loop serves every stream: what differs between streams is an
//! [`EntryDecoder`] and a label, never a copy of the loop.
//!
//! # Guarantees
//!
//! - At least once, in stream order: the offset (the last entry whose handling
//!   finished) is saved only after the handler succeeded, or after the entry
//!   was absorbed (malformed, unknown type) or dead-lettered.
//! - A failing handler holds the offset and is retried with exponential
//!   back-off and jitter; optionally, after N attempts, the entry goes to a
//!   dead-letter stream.
//! - Redis faults are retried with back-off on a fresh connection; only faults
//!   that need a person (authentication, a key of the wrong type) end `run`.
//! - Shutdown interrupts the blocking read at once, lets the handler call in
//!   flight finish within a grace period, saves the offset and returns.
//! - With `concurrency` > 1, items of one ordering key (user) run one at a
//!   time in stream order, and the saved offset is the low watermark.
//! - Memory is bounded by bytes whatever the entries: entries read but not
//!   finished are charged what they cost once parsed, reading pauses at
//!   `max_held_bytes`, replies are capped at `max_reply_bytes` and an entry
//!   larger than that is absorbed unread. Jobs own their decoded items, never
//!   the reply they came in.
//! - One deadline, `shutdown_timeout`, bounds the whole stop.
//!
//! # Layout
//!
//! - [`engine`]: the driver ([`StreamConsumer`]): the async loop that
//!   performs what the state machine decides.
//! - `machine`: the state machine, with no I/O and no clock: what to read
//!   next, what to start, which offset to save, when reading pauses; `trim`:
//!   judging from reads and probes whether entries were deleted unread;
//!   `window`: the per-key queues.
//! - `reader`: the task that owns the reading connection and the reply in
//!   flight, fed by a channel.
//! - [`decoder`]: the decoder trait the engine is generic over; the handler
//!   trait is the domain's [`EventHandler`], re-exported here.
//! - [`dead_letter`]: copying a failing entry to the dead-letter stream
//!   exactly once (one script, with a marker keyed by the entry's id).
//! - [`read_conn`]: the reading connection (hand-written `XREAD`, a
//!   deletion probe before each read); [`resp`]: its zero-copy, resumable
//!   reply scanner.
//! - [`config`]: its settings; [`backoff`]: retry delays; [`fault`]:
//!   transient versus permanent Redis failures; [`reply`]: parsing the
//!   replies of the general client without trusting them; [`stats`]:
//!   counters; `outcome`: the engine's report in the domain's terms
//!   ([`RunOutcome`](lifecycle_domain::RunOutcome), through `From`);
//!   [`tls`]: certificates for `rediss://`.

pub mod backoff;
pub mod config;
pub mod dead_letter;
pub mod decoder;
pub mod engine;
pub mod error;
pub mod fault;
mod machine;
mod outcome;
pub mod read_conn;
mod reader;
pub mod reply;
pub mod resp;
pub mod stats;
pub mod tls;
mod trim;
mod window;

pub use backoff::{Backoff, BackoffPolicy};
pub use config::{
    Checkpoint, ConsumerConfig, StartFrom, DEFAULT_MAX_HELD_BYTES, DEFAULT_MAX_REPLY_BYTES,
};
pub use decoder::{Decoded, EntryDecoder};
pub use engine::{RunReport, StopReason, StreamConsumer};
pub use error::ConsumerError;
pub use fault::{classify, FaultClass};
pub use lifecycle_domain::EventHandler;
pub use reply::{parse_range_reply, parse_xread_reply, ReplyError, StreamEntry};
pub use stats::{now_ms, ConsumerStats, StatsSnapshot};
pub use tls::{tls_failure, TlsError, TlsFiles, TlsSettings};
