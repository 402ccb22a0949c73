//! The lobby cascade: what a deleted or permanently blocked user's
//! disappearance does to each game, as rules that adapters execute.
//!
//! For every game in the user's index: the user leaves its applicants and
//! invitees; in an `open` or `cancelled` game the user leaves its members, and
//! an `open` game the user owns is cancelled; in a `running` game the user
//! moves from members to `dropped` and ownership stays; a `finished` game
//! keeps its members as history; an unknown status is treated like
//! `finished`. The rules depend only on the game and the user, never on other
//! users, so different users' cascades commute.

use std::collections::BTreeSet;

use crate::entry_id::EntryId;
use crate::event::UserLifecycleEvent;
use crate::ports::{BoxFuture, EventHandler, HandlerError, StoreError};

/// A game's lifecycle status, from the `status` field of its hash.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GameStatus {
    /// Accepting players.
    Open,
    /// Being played.
    Running,
    /// Over; its roster is history.
    Finished,
    /// Called off.
    Cancelled,
    /// Any other value, kept as stored.
    Unknown(String),
}

impl GameStatus {
    /// The statuses the rules name, in a fixed order.
    pub const KNOWN: [GameStatus; 4] = [
        GameStatus::Open,
        GameStatus::Running,
        GameStatus::Finished,
        GameStatus::Cancelled,
    ];

    /// Reads a stored status.
    pub fn parse(text: &str) -> Self {
        match text {
            "open" => Self::Open,
            "running" => Self::Running,
            "finished" => Self::Finished,
            "cancelled" => Self::Cancelled,
            other => Self::Unknown(other.to_owned()),
        }
    }

    /// The stored form.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Open => "open",
            Self::Running => "running",
            Self::Finished => "finished",
            Self::Cancelled => "cancelled",
            Self::Unknown(other) => other,
        }
    }
}

/// What happens to the user's seat among a game's members.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberChange {
    /// Stays: the game's history.
    Keep,
    /// Leaves the members.
    Remove,
    /// Moves from the members to `dropped`.
    MoveToDropped,
}

impl MemberChange {
    /// The name adapters pass to their executors.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Keep => "keep",
            Self::Remove => "remove",
            Self::MoveToDropped => "drop",
        }
    }
}

/// What the cascade does to one game.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GameAction {
    /// The user's seat among the members.
    pub members: MemberChange,
    /// Whether the game is cancelled (status `cancelled`, `cancel_reason` the
    /// event type).
    pub cancel: bool,
}

/// The rule: what the cascade does to a game of `status` that the user owns
/// (`is_owner`) or not. Applicants and invitees always lose the user.
pub fn game_action(status: &GameStatus, is_owner: bool) -> GameAction {
    match status {
        GameStatus::Open => GameAction {
            members: MemberChange::Remove,
            cancel: is_owner,
        },
        GameStatus::Cancelled => GameAction {
            members: MemberChange::Remove,
            cancel: false,
        },
        GameStatus::Running => GameAction {
            members: MemberChange::MoveToDropped,
            cancel: false,
        },
        GameStatus::Finished | GameStatus::Unknown(_) => GameAction {
            members: MemberChange::Keep,
            cancel: false,
        },
    }
}

/// One game as the cascade sees it, for planning and for in-memory stores.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Game {
    /// The game's status (`None`: the hash has no status field).
    pub status: Option<GameStatus>,
    /// The owner's user id.
    pub owner_id: String,
    /// Why it was cancelled, if it was.
    pub cancel_reason: Option<String>,
    /// Players.
    pub members: BTreeSet<String>,
    /// Pending applications.
    pub applicants: BTreeSet<String>,
    /// Pending invitations.
    pub invitees: BTreeSet<String>,
    /// Players removed from the running game by a cascade.
    pub dropped: BTreeSet<String>,
}

impl Game {
    /// Applies the cascade of `user_id` (caused by `event_type`) to this game.
    pub fn apply_cascade(&mut self, user_id: &str, event_type: &str) {
        let status = self
            .status
            .clone()
            .unwrap_or_else(|| GameStatus::Unknown(String::new()));
        let action = game_action(&status, self.owner_id == user_id);
        self.applicants.remove(user_id);
        self.invitees.remove(user_id);
        match action.members {
            MemberChange::Keep => {}
            MemberChange::Remove => {
                self.members.remove(user_id);
            }
            MemberChange::MoveToDropped => {
                if self.members.remove(user_id) {
                    self.dropped.insert(user_id.to_owned());
                }
            }
        }
        if action.cancel {
            self.status = Some(GameStatus::Cancelled);
            self.cancel_reason = Some(event_type.to_owned());
        }
    }
}

/// One user's cascade, as a lobby store applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserCascade {
    /// Whose footprint goes.
    pub user_id: String,
    /// Why (`user.deleted` or `user.permanently_blocked`).
    pub event_type: String,
    /// The stream entry that caused it: the idempotency key.
    pub entry_id: EntryId,
    /// When the event happened.
    pub occurred_at_ms: i64,
    /// The event's distributed-trace id, kept in the cascade's record; empty
    /// when the event had none.
    pub trace_id: String,
}

impl UserCascade {
    /// The cascade an event calls for.
    pub fn for_event(event: &UserLifecycleEvent) -> Self {
        Self {
            user_id: event.user_id.clone(),
            event_type: event.event_type.as_str().to_owned(),
            entry_id: event.entry_id,
            occurred_at_ms: event.occurred_at_ms,
            trace_id: event.trace_id.clone(),
        }
    }
}

/// What a lobby store did with a cascade.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CascadeOutcome {
    /// Applied now, touching this many games.
    Applied {
        /// Games in the user's index that exist.
        games: u64,
        /// Games whose status is not one the rules name (left like
        /// `finished`), for the log.
        unknown_status: Vec<String>,
    },
    /// The record already holds this entry or a later one: nothing changed.
    AlreadyApplied {
        /// The entry the record holds.
        recorded: EntryId,
    },
}

/// Where the lobby's rosters live.
pub trait LobbyStore: Send + Sync {
    /// Applies one user's cascade idempotently, each game atomically: no
    /// reader sees half of one game's change (a store may apply the games in
    /// several steps, and a failure midway leaves the games done so far,
    /// which a retry completes), and a cascade whose entry is not newer than
    /// the recorded one changes nothing.
    fn apply_cascade<'a>(
        &'a self,
        cascade: &'a UserCascade,
    ) -> BoxFuture<'a, Result<CascadeOutcome, StoreError>>;
}

/// The worker's handler: each known event becomes its user's cascade.
pub struct CascadeHandler<S> {
    store: S,
}

impl<S: LobbyStore> CascadeHandler<S> {
    /// A handler applying cascades to `store`.
    pub fn new(store: S) -> Self {
        Self { store }
    }
}

impl<S: LobbyStore> EventHandler<UserLifecycleEvent> for CascadeHandler<S> {
    fn handle<'a>(
        &'a self,
        event: &'a UserLifecycleEvent,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let cascade = UserCascade::for_event(event);
            self.store
                .apply_cascade(&cascade)
                .await
                .map(|_| ())
                .map_err(|err| {
                    let permanent = err.permanent;
                    let failure = HandlerError::with_source("apply the lobby cascade", err);
                    if permanent {
                        failure
                    } else {
                        failure.transient()
                    }
                })
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|id| (*id).to_owned()).collect()
    }

    fn game(status: &str, owner: &str, members: &[&str]) -> Game {
        Game {
            status: Some(GameStatus::parse(status)),
            owner_id: owner.into(),
            members: set(members),
            applicants: set(&["u", "x"]),
            invitees: set(&["u", "y"]),
            ..Game::default()
        }
    }

    #[test]
    fn the_rule_table() {
        use MemberChange::*;
        let cases = [
            ("open", false, Remove, false),
            ("open", true, Remove, true),
            ("cancelled", false, Remove, false),
            ("cancelled", true, Remove, false),
            ("running", false, MoveToDropped, false),
            ("running", true, MoveToDropped, false),
            ("finished", false, Keep, false),
            ("finished", true, Keep, false),
            ("paused", true, Keep, false),
        ];
        for (status, owner, members, cancel) in cases {
            assert_eq!(
                game_action(&GameStatus::parse(status), owner),
                GameAction { members, cancel },
                "{status} owner={owner}"
            );
        }
    }

    #[test]
    fn stored_names_round_trip() {
        for name in ["open", "running", "finished", "cancelled", "paused"] {
            assert_eq!(GameStatus::parse(name).as_str(), name);
        }
        // Adapters pass these names to their executors (the Lua cascade
        // reads them): they are part of the stored contract.
        assert_eq!(MemberChange::Keep.as_str(), "keep");
        assert_eq!(MemberChange::Remove.as_str(), "remove");
        assert_eq!(MemberChange::MoveToDropped.as_str(), "drop");
    }

    #[test]
    fn an_owner_leaving_an_open_game_cancels_it() {
        let mut g = game("open", "u", &["u", "m"]);
        g.apply_cascade("u", "user.deleted");
        assert_eq!(g.status, Some(GameStatus::Cancelled));
        assert_eq!(g.cancel_reason.as_deref(), Some("user.deleted"));
        assert_eq!(g.members, set(&["m"]));
        assert_eq!(g.applicants, set(&["x"]));
        assert_eq!(g.invitees, set(&["y"]));
        assert_eq!(g.owner_id, "u");
    }

    #[test]
    fn a_member_leaving_an_open_game_leaves_it_open() {
        let mut g = game("open", "o", &["u", "m"]);
        g.apply_cascade("u", "user.permanently_blocked");
        assert_eq!(g.status, Some(GameStatus::Open));
        assert_eq!(g.cancel_reason, None);
        assert_eq!(g.members, set(&["m"]));
    }

    #[test]
    fn a_running_game_drops_the_player_and_keeps_its_owner() {
        let mut g = game("running", "u", &["u", "m"]);
        g.apply_cascade("u", "user.deleted");
        assert_eq!(g.status, Some(GameStatus::Running));
        assert_eq!(g.members, set(&["m"]));
        assert_eq!(g.dropped, set(&["u"]));
        assert_eq!(g.owner_id, "u");
        // An applicant who never played is not recorded as dropped.
        let mut g = game("running", "o", &["m"]);
        g.apply_cascade("u", "user.deleted");
        assert!(g.dropped.is_empty());
        assert_eq!(g.applicants, set(&["x"]));
    }

    #[test]
    fn finished_and_unknown_games_keep_their_history() {
        for status in ["finished", "archived"] {
            let mut g = game(status, "u", &["u", "m"]);
            g.apply_cascade("u", "user.deleted");
            assert_eq!(g.members, set(&["u", "m"]), "{status}");
            assert_eq!(g.status, Some(GameStatus::parse(status)));
            assert_eq!(
                g.applicants,
                set(&["x"]),
                "pending lists are cleared in {status}"
            );
        }
    }

    #[test]
    fn a_cancelled_game_loses_the_member_and_stays_cancelled() {
        let mut g = game("cancelled", "u", &["u"]);
        g.cancel_reason = Some("owner left".into());
        g.apply_cascade("u", "user.deleted");
        assert!(g.members.is_empty());
        assert_eq!(g.cancel_reason.as_deref(), Some("owner left"));
    }

    #[test]
    fn cascades_are_idempotent_and_commute_across_users() {
        let start = {
            let mut g = game("open", "a", &["a", "b", "c"]);
            g.applicants = set(&["b", "d"]);
            g
        };
        let mut ab = start.clone();
        ab.apply_cascade("a", "user.deleted");
        ab.apply_cascade("b", "user.deleted");
        let mut ba = start.clone();
        ba.apply_cascade("b", "user.deleted");
        ba.apply_cascade("a", "user.deleted");
        assert_eq!(ab, ba);
        let mut twice = ab.clone();
        twice.apply_cascade("a", "user.deleted");
        twice.apply_cascade("b", "user.deleted");
        assert_eq!(twice, ab);
        for status in ["running", "finished", "cancelled"] {
            let start = game(status, "a", &["a", "b"]);
            let mut ab = start.clone();
            ab.apply_cascade("a", "user.deleted");
            ab.apply_cascade("b", "user.deleted");
            let mut ba = start;
            ba.apply_cascade("b", "user.deleted");
            ba.apply_cascade("a", "user.deleted");
            assert_eq!(ab, ba, "{status}");
        }
    }
}

#[cfg(test)]
mod handler_tests {
    use super::*;
    use crate::entry_id::EntryId;
    use crate::event::EventType;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    /// A store that fails as told.
    struct FailingStore {
        permanent: bool,
    }

    impl LobbyStore for FailingStore {
        fn apply_cascade<'a>(
            &'a self,
            _cascade: &'a UserCascade,
        ) -> BoxFuture<'a, Result<CascadeOutcome, StoreError>> {
            let permanent = self.permanent;
            Box::pin(async move {
                Err(StoreError {
                    action: "apply".into(),
                    permanent,
                    source: "boom".into(),
                })
            })
        }
    }

    fn poll_once<T>(future: impl Future<Output = T>) -> T {
        let mut future = pin!(future);
        match future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(value) => value,
            Poll::Pending => panic!("the store answers at once"),
        }
    }

    #[test]
    fn a_cascade_carries_its_events_trace_id() {
        let mut event = UserLifecycleEvent {
            entry_id: EntryId::new(7, 1),
            event_type: EventType::UserPermanentlyBlocked,
            user_id: "u".into(),
            occurred_at_ms: 5,
            source: "accounts".into(),
            actor_type: "admin".into(),
            actor_id: "a".into(),
            reason_code: "r".into(),
            trace_id: "trace-1".into(),
        };
        assert_eq!(
            UserCascade::for_event(&event),
            UserCascade {
                user_id: "u".into(),
                event_type: "user.permanently_blocked".into(),
                entry_id: EntryId::new(7, 1),
                occurred_at_ms: 5,
                trace_id: "trace-1".into(),
            }
        );
        event.trace_id.clear();
        assert_eq!(UserCascade::for_event(&event).trace_id, "");
    }

    #[test]
    fn store_outages_are_transient_handler_failures() {
        let event = UserLifecycleEvent {
            entry_id: EntryId::new(1, 0),
            event_type: EventType::UserDeleted,
            user_id: "u".into(),
            occurred_at_ms: 1,
            source: String::new(),
            actor_type: String::new(),
            actor_id: String::new(),
            reason_code: String::new(),
            trace_id: String::new(),
        };
        for (permanent, transient) in [(false, true), (true, false)] {
            let handler = CascadeHandler::new(FailingStore { permanent });
            let err = poll_once(handler.handle(&event)).unwrap_err();
            assert_eq!(
                err.is_transient(),
                transient,
                "permanent store error: {permanent}"
            );
            assert!(err.to_string().contains("boom"), "{err}");
        }
    }
}
