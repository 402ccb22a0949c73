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
//! - Memory is bounded whatever the entries: replies are sized by entry size
//!   and capped; an entry larger than a reply may be is absorbed unread.
//!
//! # Layout
//!
//! - [`engine`]: the loop ([`StreamConsumer`]).
//! - [`decoder`]: the traits it is generic over.
//! - [`read_conn`]: the reading connection (hand-written `XREAD`, the next
//!   read pipelined, a deletion probe before each read); [`resp`]: its
//!   zero-copy, resumable reply scanner.
//! - [`window`]: the low watermark and the per-key queues.
//! - [`config`]: its settings; [`backoff`]: retry delays; [`fault`]:
//!   transient versus permanent Redis failures; [`reply`]: parsing the
//!   replies of the general client without trusting them; [`stats`]:
//!   counters; [`tls`]: certificates for `rediss://`.

pub mod backoff;
pub mod config;
pub mod decoder;
pub mod engine;
pub mod error;
pub mod fault;
pub mod read_conn;
pub mod reply;
pub mod resp;
pub mod stats;
pub mod tls;
pub mod window;

pub use backoff::{Backoff, BackoffPolicy};
pub use config::{Checkpoint, ConsumerConfig, StartFrom};
pub use decoder::{Decoded, EntryDecoder, EntryHandler};
pub use engine::{RunReport, StopReason, StreamConsumer};
pub use error::ConsumerError;
pub use fault::{classify, write_refusal, FaultClass};
pub use reply::{parse_range_reply, parse_xread_reply, ReplyError, StreamEntry};
pub use stats::{ConsumerStats, StatsSnapshot};
pub use tls::{tls_failure, TlsError, TlsFiles, TlsSettings};
