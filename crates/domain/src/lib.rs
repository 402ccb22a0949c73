//! The domain of the lobby's user-lifecycle worker: what an event is, how a
//! stream entry decodes into one, and the ports the rest of the system plugs
//! into. Nothing here performs I/O or names Redis.
//!
//! # Layout
//!
//! - [`entry_id`]: stream entry ids (`<ms>-<seq>`), parsed once and compared
//!   numerically.
//! - [`event`]: the user-lifecycle event and its event-type enum.
//! - [`decode`]: the wire contract, a pure function from an entry's fields to
//!   an event or a typed reason why the entry is malformed.
//! - [`keys`]: how the lobby's keys are named, plainly or in the cluster
//!   layout.
//! - [`cascade`]: the lobby cascade's rules, the lobby store port and the
//!   handler that applies a cascade per event.
//! - [`ports`]: the traits adapters implement: the consumer (and how its run
//!   ended), the one handler trait it and the engine dispatch to, the
//!   stream-offset store and the lease that lets one consumer of a label
//!   consume at a time.

pub mod cascade;
pub mod decode;
pub mod entry_id;
pub mod event;
pub mod keys;
pub mod log_text;
pub mod ports;

pub use cascade::{
    game_action, CascadeHandler, CascadeOutcome, Game, GameAction, GameStatus, LobbyStore,
    MemberChange, UserCascade,
};
pub use decode::{decode_user_lifecycle_event, DecodeError, MAX_ENTRY_BYTES};
pub use entry_id::{EntryId, ParseEntryIdError};
pub use event::{EventType, UserLifecycleEvent};
pub use keys::{KeyLayout, ParseKeyLayoutError};
pub use log_text::for_log;
pub use ports::{
    BoxFuture, ConsumerLease, EventHandler, FenceToken, HandlerError, Renewal, RunOutcome,
    SaveOutcome, StopReason, StoreError, StreamOffsetStore, UserLifecycleConsumer,
    USER_LIFECYCLE_LABEL,
};
