//! The user-lifecycle event.

use crate::entry_id::EntryId;

/// What happened to an account. Two types are known; any other non-blank
/// type decodes fine and is carried as [`EventType::Unknown`], so a newer
/// producer cannot stall this consumer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    /// `user.deleted`: the account is gone.
    UserDeleted,
    /// `user.permanently_blocked`: the account may never play again.
    UserPermanentlyBlocked,
    /// Any other type, kept exactly as sent.
    Unknown(String),
}

impl EventType {
    /// Wire name of `user.deleted`.
    pub const USER_DELETED: &'static str = "user.deleted";
    /// Wire name of `user.permanently_blocked`.
    pub const USER_PERMANENTLY_BLOCKED: &'static str = "user.permanently_blocked";

    /// Maps a wire name to its type; the match is exact (no trimming, no
    /// case folding), as in the reference.
    pub fn from_wire(name: &str) -> Self {
        match name {
            Self::USER_DELETED => Self::UserDeleted,
            Self::USER_PERMANENTLY_BLOCKED => Self::UserPermanentlyBlocked,
            other => Self::Unknown(other.to_owned()),
        }
    }

    /// The type's wire name, exactly as it was sent.
    pub fn as_str(&self) -> &str {
        match self {
            Self::UserDeleted => Self::USER_DELETED,
            Self::UserPermanentlyBlocked => Self::USER_PERMANENTLY_BLOCKED,
            Self::Unknown(name) => name,
        }
    }

    /// Whether this consumer acts on the type; unknown types are absorbed.
    pub fn is_known(&self) -> bool {
        !matches!(self, Self::Unknown(_))
    }
}

/// One decoded entry of the user-lifecycle stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserLifecycleEvent {
    /// Id of the stream entry the event came from.
    pub entry_id: EntryId,
    /// What happened.
    pub event_type: EventType,
    /// The account it happened to, trimmed of white space.
    pub user_id: String,
    /// When it happened, in milliseconds since the Unix epoch (UTC); always > 0.
    pub occurred_at_ms: i64,
    /// Producing system, as sent; empty when absent.
    pub source: String,
    /// Kind of actor that caused the event, as sent; empty when absent.
    pub actor_type: String,
    /// Id of that actor, as sent; empty when absent.
    pub actor_id: String,
    /// Machine-readable reason, as sent; empty when absent.
    pub reason_code: String,
    /// Distributed-trace id, as sent; empty when absent.
    pub trace_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_types_match_exactly() {
        assert_eq!(EventType::from_wire("user.deleted"), EventType::UserDeleted);
        assert!(EventType::from_wire("user.permanently_blocked").is_known());
        for other in [
            "User.Deleted",
            " user.deleted",
            "user.deleted ",
            "user.created",
        ] {
            let kind = EventType::from_wire(other);
            assert!(!kind.is_known(), "{other:?} is known");
            assert_eq!(kind.as_str(), other);
        }
    }
}
