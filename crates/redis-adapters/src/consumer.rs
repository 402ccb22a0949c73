//! The user-lifecycle consumer: the generic engine with the domain's decoder,
//! behind the domain's consumer port.

use std::sync::{Arc, Mutex, PoisonError};

use lifecycle_domain::{
    decode_user_lifecycle_event, for_log, BoxFuture, ConsumerLease, EntryId, EventHandler,
    HandlerError, RunOutcome, StreamOffsetStore, UserLifecycleConsumer, UserLifecycleEvent,
};
use lifecycle_streams::{
    ConsumerConfig, ConsumerError, ConsumerStats, Decoded, EntryDecoder, RedisEndpoint,
    StreamConsumer, TlsSettings,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, Span};

/// Decodes `user:lifecycle_events` entries per the contract.
#[derive(Clone, Copy, Debug, Default)]
pub struct UserLifecycleDecoder;

impl EntryDecoder for UserLifecycleDecoder {
    type Item = UserLifecycleEvent;

    fn decode(&self, id: EntryId, fields: &[(&[u8], &[u8])]) -> Decoded<UserLifecycleEvent> {
        match decode_user_lifecycle_event(id, fields) {
            Ok(event) if event.event_type.is_known() => Decoded::Handle(event),
            Ok(event) => Decoded::UnknownType(event.event_type.as_str().to_owned()),
            Err(err) => Decoded::Malformed(err.to_string()),
        }
    }

    fn event_type<'a>(&self, item: &'a UserLifecycleEvent) -> &'a str {
        item.event_type.as_str()
    }

    fn span(&self, item: &UserLifecycleEvent) -> Span {
        event_span(item)
    }

    fn ordering_key<'a>(&self, item: &'a UserLifecycleEvent) -> &'a str {
        &item.user_id
    }
}

/// The span of one event's handling: where the event came from, as its
/// producer said (`trace_id`, `source`, `actor_type`), so that every line
/// logged while handling it (the store's, the handler's) names its trace.
/// Values are cut for logs; an empty value is left out, not logged as `""`.
/// Recorded as plain strings: JSON logs show `"trace_id":"T"`, text logs
/// quote and escape them.
fn event_span(event: &UserLifecycleEvent) -> Span {
    fn present(value: &str) -> Option<std::borrow::Cow<'_, str>> {
        (!value.is_empty()).then(|| for_log(value))
    }
    let (trace_id, source, actor_type) = (
        present(&event.trace_id),
        present(&event.source),
        present(&event.actor_type),
    );
    info_span!(
        "lifecycle_event",
        trace_id = trace_id.as_deref(),
        source = source.as_deref(),
        actor_type = actor_type.as_deref()
    )
}

/// The registered handler, run in the event's span (see [`event_span`]; the
/// engine enters it for the whole handling, retries included), logging each
/// outcome with the user it concerns (the engine knows entries,
/// not users).
struct LoggedHandler(Arc<dyn EventHandler<UserLifecycleEvent>>);

impl EventHandler<UserLifecycleEvent> for LoggedHandler {
    fn handle<'a>(
        &'a self,
        event: &'a UserLifecycleEvent,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let result = self.0.handle(event).await;
            match &result {
                Ok(()) => debug!(
                    stream_entry_id = %event.entry_id,
                    event_type = event.event_type.as_str(),
                    user_id = ?for_log(&event.user_id),
                    "user lifecycle event processed"
                ),
                // The engine logs the failure with its retry; this names the
                // user, at debug level so one failure is one warning.
                Err(err) => debug!(
                    stream_entry_id = %event.entry_id,
                    event_type = event.event_type.as_str(),
                    user_id = ?for_log(&event.user_id),
                    err = %err,
                    "user lifecycle handler failed"
                ),
            }
            result
        })
    }
}

/// The user-lifecycle consumer on Redis.
pub struct RedisUserLifecycleConsumer {
    engine: StreamConsumer<UserLifecycleDecoder>,
    handler: Mutex<Option<Arc<dyn EventHandler<UserLifecycleEvent>>>>,
    cancel: CancellationToken,
}

impl RedisUserLifecycleConsumer {
    /// A consumer reading from `endpoint` (a `redis::Client`, or a
    /// Sentinel-managed master) per `config`, keeping its offset in
    /// `offsets`.
    ///
    /// # Errors
    ///
    /// [`ConsumerError::Config`] when the settings are inconsistent.
    pub fn new(
        endpoint: impl Into<RedisEndpoint>,
        offsets: Arc<dyn StreamOffsetStore>,
        config: ConsumerConfig,
    ) -> Result<Self, ConsumerError> {
        Ok(Self {
            engine: StreamConsumer::new(endpoint, UserLifecycleDecoder, offsets, config)?,
            handler: Mutex::new(None),
            cancel: CancellationToken::new(),
        })
    }

    /// Uses `tls` for the stream reader's own connection to a `rediss://`
    /// server (the client should come from [`crate::open_tls_client`] with
    /// the same settings); without it, the system's trust store.
    #[must_use]
    pub fn with_tls(self, tls: TlsSettings) -> Self {
        Self {
            engine: self.engine.with_tls(tls),
            ..self
        }
    }

    /// Consumes only while holding `lease`, waiting as a standby otherwise
    /// (see [`StreamConsumer::with_lease`]); the offset store must fence its
    /// saves (as [`crate::RedisOffsetStore`] does).
    #[must_use]
    pub fn with_lease(self, lease: Arc<dyn ConsumerLease>) -> Self {
        Self {
            engine: self.engine.with_lease(lease),
            ..self
        }
    }

    /// The consumer's live counters.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.engine.stats()
    }

    /// A token that stops `run` when cancelled (the same as
    /// [`UserLifecycleConsumer::shutdown`]).
    pub fn cancellation(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

impl UserLifecycleConsumer for RedisUserLifecycleConsumer {
    type Error = ConsumerError;

    fn on_event(&self, handler: Arc<dyn EventHandler<UserLifecycleEvent>>) {
        *self.handler.lock().unwrap_or_else(PoisonError::into_inner) = Some(handler);
    }

    /// Runs until shutdown, drain's end or a permanent fault, reporting how
    /// it ended.
    ///
    /// # Errors
    ///
    /// [`ConsumerError::NoHandler`] without a handler; otherwise permanent
    /// faults.
    fn run(&self) -> BoxFuture<'_, Result<RunOutcome, ConsumerError>> {
        Box::pin(async move {
            let handler = self
                .handler
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
                .ok_or(ConsumerError::NoHandler)?;
            self.engine.run(&LoggedHandler(handler), &self.cancel).await
        })
    }

    fn shutdown(&self) {
        self.cancel.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(pairs: &[(&'a str, &'a str)]) -> Vec<(&'a [u8], &'a [u8])> {
        pairs
            .iter()
            .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
            .collect()
    }

    #[test]
    fn known_unknown_and_malformed_entries_are_told_apart() {
        let decoder = UserLifecycleDecoder;
        let id = EntryId::new(1, 0);
        let base = [("user_id", "u"), ("occurred_at_ms", "5")];
        let mut known = fields(&base);
        known.extend(fields(&[("event_type", "user.deleted")]));
        assert!(matches!(decoder.decode(id, &known), Decoded::Handle(_)));
        let mut unknown = fields(&base);
        unknown.extend(fields(&[("event_type", "user.renamed")]));
        assert_eq!(
            decoder.decode(id, &unknown),
            Decoded::UnknownType("user.renamed".into())
        );
        assert_eq!(
            decoder.decode(id, &fields(&base)),
            Decoded::Malformed("missing event_type".into())
        );
    }
}
