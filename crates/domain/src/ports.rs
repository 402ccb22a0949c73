//! The ports: traits the domain defines and adapters implement.
//!
//! The cascade worker registers an [`EventHandler`] of
//! [`UserLifecycleEvent`]s on a [`UserLifecycleConsumer`] and never learns
//! that the events come from Redis; the consumer's [`RunOutcome`] says how
//! its run ended.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::entry_id::EntryId;
use crate::event::UserLifecycleEvent;

/// The label under which the user-lifecycle consumer stores its offset. It
/// stays stable when the stream key is renamed by configuration.
pub const USER_LIFECYCLE_LABEL: &str = "user_lifecycle";

/// A boxed, sendable future: what object-safe async port methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a handler could not finish an event. The consumer holds its offset on
/// the event and retries it with back-off.
///
/// A *transient* failure (the handler's dependency is unreachable) says
/// nothing about the event: it is retried for as long as it lasts and never
/// counts towards dead-lettering. Any other failure may be the event's own
/// fault, and counts.
#[derive(Debug)]
pub struct HandlerError {
    message: String,
    source: Option<Box<dyn StdError + Send + Sync>>,
    transient: bool,
}

impl HandlerError {
    /// An error described by `message` alone.
    pub fn msg(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
            transient: false,
        }
    }

    /// An error saying what was being done (`message`) and why it failed.
    pub fn with_source(
        message: impl Into<String>,
        source: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        Self {
            message: message.into(),
            source: Some(source.into()),
            transient: false,
        }
    }

    /// Marks the failure transient: a dependency outage, not the event's
    /// fault.
    pub fn transient(mut self) -> Self {
        self.transient = true;
        self
    }

    /// Whether the failure is a dependency outage rather than the event's
    /// fault.
    pub fn is_transient(&self) -> bool {
        self.transient
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {}", self.message, source),
            None => f.write_str(&self.message),
        }
    }
}

impl StdError for HandlerError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn StdError + 'static))
    }
}

/// Handles decoded events of type `T`: the one handler trait between a
/// stream consumer and the domain. The engine of `lifecycle-streams` calls it
/// for every well-formed entry of a known type; the user-lifecycle consumer
/// port takes it for [`UserLifecycleEvent`]s. Must be idempotent: delivery
/// is at-least-once, so an event can arrive again after a crash.
///
/// A closure `Fn(T) -> impl Future<Output = Result<(), HandlerError>>` is a
/// handler too (it receives a clone of the event).
pub trait EventHandler<T>: Send + Sync {
    /// Applies `event`; an error makes the consumer hold its offset and retry
    /// the same event.
    fn handle<'a>(&'a self, event: &'a T) -> BoxFuture<'a, Result<(), HandlerError>>;
}

impl<T, F, Fut> EventHandler<T> for F
where
    T: Clone,
    F: Fn(T) -> Fut + Send + Sync,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn handle<'a>(&'a self, event: &'a T) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self(event.clone()))
    }
}

/// Why a consumer's `run` ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// Shutdown was requested.
    Cancelled,
    /// Drain mode reached the last entry present at start-up.
    Drained,
}

impl StopReason {
    /// The reason in one word, for logs: `cancelled` or `drained`.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Cancelled => "cancelled",
            StopReason::Drained => "drained",
        }
    }
}

/// How a consumer's `run` ended, when it ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunOutcome {
    /// Why it ended.
    pub reason: StopReason,
    /// The offset stored when it ended (`None`: none is stored).
    pub offset: Option<EntryId>,
    /// Whether the last offset reached could not be saved (the store was
    /// unreachable until the shutdown deadline): the entries after the stored
    /// offset will be handled again.
    pub offset_unsaved: bool,
}

/// A source of user-lifecycle events that dispatches each to one handler,
/// at least once and in stream order.
pub trait UserLifecycleConsumer: Send + Sync {
    /// Why `run` ended other than by shutdown or drain's end.
    type Error: StdError + Send + Sync + 'static;

    /// Installs `handler` as the sole handler; a second call replaces it.
    fn on_event(&self, handler: Arc<dyn EventHandler<UserLifecycleEvent>>);

    /// Consumes until [`shutdown`](Self::shutdown) is called, drain mode
    /// reaches its end or a permanent fault occurs, and says how it ended.
    /// Starting without a handler is an error.
    fn run(&self) -> BoxFuture<'_, Result<RunOutcome, Self::Error>>;

    /// Asks `run` to stop: the blocking read ends at once, the handler call
    /// in flight may finish within a grace period, the offset is saved.
    fn shutdown(&self);
}

/// A failure of a store (offsets, lobby), classified so that the caller knows
/// whether to retry.
#[derive(Debug, thiserror::Error)]
#[error("{action}: {source}")]
pub struct StoreError {
    /// What was being done, such as `save offset of label user_lifecycle`.
    pub action: String,
    /// Whether retrying cannot help (wrong type, authentication, bad data);
    /// transient faults (connection lost, timeouts, loading) are retried.
    pub permanent: bool,
    /// The underlying failure.
    #[source]
    pub source: Box<dyn StdError + Send + Sync>,
}

/// Where a consumer keeps its offset: the id of the last entry whose handling
/// is finished, per label.
pub trait StreamOffsetStore: Send + Sync {
    /// The stored offset of `label`, or `None` when none is stored.
    fn load<'a>(&'a self, label: &'a str) -> BoxFuture<'a, Result<Option<EntryId>, StoreError>>;

    /// Stores `id` for `label` unless a larger id is stored already: the
    /// consumer's own saves never move an offset backwards. With `expected`
    /// (the offset this consumer last stored or loaded), nothing is written
    /// when the stored offset is behind it or gone (an operator rewound it,
    /// or the store lost the save); nor when the store cannot vouch that it
    /// kept every write it acknowledged since this consumer's last load or
    /// save (a Redis restart or failover). The consumer must then replay
    /// every entry after what is stored.
    fn save<'a>(
        &'a self,
        label: &'a str,
        id: EntryId,
        expected: Option<EntryId>,
    ) -> BoxFuture<'a, Result<SaveOutcome, StoreError>>;

    /// Like [`save`](Self::save), and only while `fence` is the fencing
    /// token of the current holder of `label`'s [`ConsumerLease`], checked in
    /// the same atomic step as the write: otherwise nothing is written and
    /// the answer is [`SaveOutcome::Fenced`]. A store that cannot fence
    /// refuses with a permanent error (the default).
    fn save_fenced<'a>(
        &'a self,
        label: &'a str,
        id: EntryId,
        expected: Option<EntryId>,
        fence: FenceToken,
    ) -> BoxFuture<'a, Result<SaveOutcome, StoreError>> {
        let _ = (id, expected, fence);
        Box::pin(async move {
            Err(StoreError {
                action: format!("save the offset of {label} under a lease"),
                permanent: true,
                source: "this offset store cannot check a fencing token".into(),
            })
        })
    }
}

/// A fencing token: grows by one at every change of a lease's holder, so a
/// larger token always belongs to a later holder.
pub type FenceToken = u64;

/// What a lease renewal found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Still ours; extended by the ttl, counted from when the renewal was
    /// sent.
    Renewed,
    /// Ours, but an operator asked for it: stop gracefully (save, release)
    /// and wait as a standby.
    HandoverRequested,
    /// Not ours any more (expired, taken over, or fenced out).
    Lost,
}

/// A lease in the store that lets exactly one consumer of a label consume at
/// a time; each acquisition gets a fresh, larger [`FenceToken`].
pub trait ConsumerLease: Send + Sync {
    /// Takes `label`'s lease for `ttl` if nobody holds it; `None` when held
    /// (this process is then recorded as a standby, seen for a short while).
    fn acquire<'a>(
        &'a self,
        label: &'a str,
        ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<Option<FenceToken>, StoreError>>;

    /// Extends the lease held with `fence` by `ttl`.
    fn renew<'a>(
        &'a self,
        label: &'a str,
        fence: FenceToken,
        ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<Renewal, StoreError>>;

    /// Gives the lease up if `fence` still holds it, so that a standby takes
    /// over at once.
    fn release<'a>(
        &'a self,
        label: &'a str,
        fence: FenceToken,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// What an offset save found in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveOutcome {
    /// The offset was stored.
    Saved,
    /// A larger offset is stored; it was kept.
    Kept(EntryId),
    /// The stored offset (`None`: none) is behind what the saver expected,
    /// or the store may have lost acknowledged writes; nothing was written.
    Behind(Option<EntryId>),
    /// The saver's fencing token is not the current lease holder's: another
    /// process consumes now; nothing was written.
    Fenced,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handler_error_keeps_its_cause_for_whoever_walks_the_chain() {
        let cause = StoreError {
            action: "apply the cascade".into(),
            permanent: true,
            source: "refused".into(),
        };
        let err = HandlerError::with_source("apply the lobby cascade", cause);
        let source = err.source().and_then(|s| s.downcast_ref::<StoreError>());
        assert!(source.is_some_and(|s| s.permanent), "{err:?}");
        assert!(HandlerError::msg("own fault").source().is_none());
    }

    #[test]
    fn stop_reasons_are_named_for_logs() {
        assert_eq!(StopReason::Cancelled.as_str(), "cancelled");
        assert_eq!(StopReason::Drained.as_str(), "drained");
    }
}
