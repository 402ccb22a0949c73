//! What the engine is generic over: how an entry decodes. Who handles what
//! it decodes to is the domain's [`EventHandler`] (re-exported at the crate
//! root): one handler trait from the engine to the domain, no bridge.
//!
//! [`EventHandler`]: lifecycle_domain::EventHandler

use lifecycle_domain::EntryId;

/// What one stream entry decodes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded<T> {
    /// A well-formed entry of a known type: dispatch it to the handler.
    Handle(T),
    /// A malformed entry: logged as a warning and absorbed (the offset moves
    /// past it).
    Malformed(String),
    /// A well-formed entry of a type this consumer does not act on: logged and
    /// absorbed.
    UnknownType(String),
}

/// Decodes the entries of one stream. A second stream is a second decoder and
/// a label, not a copy of the consumer loop.
pub trait EntryDecoder: Send + Sync + 'static {
    /// What a well-formed entry becomes.
    type Item: Send + Sync + 'static;

    /// Decodes one entry from its field/value pairs. Must not panic on any
    /// input.
    fn decode(&self, id: EntryId, fields: &[(&[u8], &[u8])]) -> Decoded<Self::Item>;

    /// The item's type name, for logs (`event_type`).
    fn event_type<'a>(&self, item: &'a Self::Item) -> &'a str;

    /// The key whose items must be handled one at a time, in stream order
    /// (the user id for user-lifecycle events). Items of different keys may
    /// be handled concurrently.
    fn ordering_key<'a>(&self, item: &'a Self::Item) -> &'a str;

    /// The span the item's whole handling runs in: every handler call, retry
    /// and dead-letter line about it carries the span's fields (a trace id,
    /// for instance). None by default.
    fn span(&self, _item: &Self::Item) -> tracing::Span {
        tracing::Span::none()
    }
}
