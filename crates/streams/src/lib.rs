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
//! - Under a lease ([`StreamConsumer::with_lease`]), one process consumes a
//!   label at a time: the others wait as standbys; every offset save is
//!   fenced by the holder's token; a holder that cannot renew in time, or
//!   whose save is refused, drops what it read and waits again.
//!
//! # Public face
//!
//! - The engine: [`StreamConsumer`], and how a session ended (the domain's
//!   [`RunOutcome`] and [`StopReason`]), with its live counters
//!   ([`ConsumerStats`], [`StatsSnapshot`], on the clock of [`now_ms`]).
//! - Its settings: [`ConsumerConfig`], [`StartFrom`], [`Checkpoint`],
//!   [`BackoffPolicy`], [`TlsFiles`] and [`TlsSettings`].
//! - Its errors: [`ConsumerError`], [`TlsError`], [`ReplyError`], and
//!   [`classify`] ([`FaultClass`]) for telling transient Redis failures from
//!   permanent ones. Errors name settings in backticks (`` `batch_size` ``),
//!   never a program's flags: a program maps them to its own terms.
//! - The traits it is generic over: [`EntryDecoder`] (with [`Decoded`]) and
//!   the domain's [`EventHandler`], re-exported here.
//! - Reading entries without consuming them (`tail`-like tools): the
//!   parsers of the general client's `XRANGE` / `XREAD` replies,
//!   [`parse_range_reply`] and [`parse_xread_reply`], into [`StreamEntry`]s;
//!   the engine uses the same parsers, so untrusted replies are checked one
//!   way.
//! - [`dead_letter`]: the dead-letter copy written exactly once per entry,
//!   and the layout of its marker hash.
//!
//! The reply scanner, the reading connection, the per-key window and the
//! state machine are crate-private. The fuzz targets, the read-path
//! benchmark and a few tests reach some of them through a hidden
//! `internals` module that is not a stable API.
//!
//! # Layout
//!
//! - `engine`: the driver ([`StreamConsumer`]): the async loop that
//!   performs what the state machine decides.
//! - `lease`: the lease's timing decisions (when to renew, until when this
//!   process may consume, how often a standby tries), without I/O.
//! - `machine`: the state machine, with no I/O and no clock: what to read
//!   next, what to start, which offset to save, when reading pauses; `trim`:
//!   judging from reads and probes whether entries were deleted unread;
//!   `window`: the per-key queues.
//! - `reader`: the task that owns the reading connection and the reply in
//!   flight, fed by a channel.
//! - `decoder`: the decoder trait the engine is generic over.
//! - [`dead_letter`]: copying a failing entry to the dead-letter stream
//!   exactly once (one script, with a marker keyed by the entry's id).
//! - `read_conn`: the reading connection (hand-written `XREAD`, and a
//!   deletion probe before a read when the driver asks for one); `resp`: its zero-copy, resumable reply
//!   scanner.
//! - `config`: the settings; `backoff`: retry delays; `fault`: transient
//!   versus permanent Redis failures; `error`: the errors of `run`; `reply`:
//!   parsing the replies of the general client without trusting them;
//!   `stats`: counters; `outcome`: the engine's report in the domain's
//!   terms; `tls`: certificates for `rediss://`.

mod backoff;
mod config;
pub mod dead_letter;
mod decoder;
mod endpoint;
mod engine;
mod error;
mod fault;
mod lease;
mod machine;
mod read_conn;
mod reader;
mod reply;
mod resp;
mod stats;
mod tls;
mod trim;
mod window;

pub use backoff::BackoffPolicy;
pub use config::{
    Checkpoint, ConsumerConfig, StartFrom, DEFAULT_CONCURRENCY, DEFAULT_LEASE_TTL,
    DEFAULT_MAX_HELD_BYTES, DEFAULT_MAX_REPLY_BYTES,
};
pub use decoder::{Decoded, EntryDecoder};
pub use endpoint::{
    cluster_changed, master_moved, parse_cluster_slots, ClusterNodes, ConnectionTimeouts,
    FollowedCluster, FollowedMaster, RedisConnection, RedisEndpoint, SentinelMaster, SlotOwner,
};
pub use engine::StreamConsumer;
pub use error::{BoxError, ConsumerError};
pub use fault::{
    advice, advice_read, classify, not_redis, quote_answer, write_refusal, FaultClass,
    ANSWER_QUOTED,
};
pub use lifecycle_domain::{ConsumerLease, EventHandler, FenceToken, Renewal};
pub use lifecycle_domain::{RunOutcome, StopReason};
pub use reply::{parse_range_reply, parse_xread_reply, ReplyError, StreamEntry};
pub use stats::{now_ms, ConsumerStats, StatsSnapshot};
pub use tls::{TlsError, TlsFiles, TlsSettings};

/// Crate-private parts, re-exported for the fuzz targets, the read-path
/// benchmark, the reading connection's TLS test and `lobby-worker bench`'s
/// raw baseline. **Not a stable API**: it changes with the engine, without
/// notice; nothing else should use it.
#[doc(hidden)]
pub mod internals {
    pub use crate::fault::classify_read;
    pub use crate::read_conn::{ReadConnection, ReadError};
    pub use crate::resp::{Batch, Parsed, XreadParser};
}
