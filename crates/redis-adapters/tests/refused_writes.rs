//! The stores when Redis refuses their writes, against private
//! redis-servers: used memory over `maxmemory` with `noeviction` (`OOM`) and
//! a failed save with `stop-writes-on-bgsave-error` (`MISCONF`). An offset
//! save or a cascade refused is a transient [`StoreError`] (and the cascade
//! handler's failure a transient [`HandlerError`], which never counts
//! towards dead-lettering) that changed nothing; the same call succeeds once
//! the limit is lifted.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

mod common;

use std::collections::BTreeMap;

use lifecycle_domain::{
    decode_user_lifecycle_event, CascadeHandler, CascadeOutcome, EntryId, EventHandler, Game,
    GameStatus, HandlerError, StoreError, StreamOffsetStore, UserCascade,
};
use lifecycle_redis::{open_client, RedisLobbyStore, RedisOffsetStore, DEFAULT_KEY_PREFIX};
use lifecycle_test_support::{RedisServer, RedisServerOptions};

const LABEL: &str = "user_lifecycle";
const OFFSET_KEY: &str = "lobby:stream_offsets:user_lifecycle";

/// How Redis is made to refuse writes, and how the refusal is lifted.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    Oom,
    Misconf,
}

impl Refusal {
    fn server(self) -> RedisServer {
        RedisServer::start_with(RedisServerOptions {
            extra_args: vec!["--enable-protected-configs".to_owned(), "yes".to_owned()],
            ..RedisServerOptions::default()
        })
    }

    fn code(self) -> &'static str {
        match self {
            Refusal::Oom => "OOM",
            Refusal::Misconf => "MISCONF",
        }
    }

    fn impose(self, server: &RedisServer) {
        match self {
            Refusal::Oom => {
                let used: u64 = server
                    .cli(&["INFO", "memory"])
                    .lines()
                    .find_map(|line| line.strip_prefix("used_memory:"))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                server.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
                server.cli(&["CONFIG", "SET", "maxmemory", &(used / 2).to_string()]);
            }
            Refusal::Misconf => server.break_persistence(),
        }
    }

    fn lift(self, server: &RedisServer) {
        match self {
            Refusal::Oom => {
                server.cli(&["CONFIG", "SET", "maxmemory", "0"]);
            }
            Refusal::Misconf => server.repair_persistence(),
        }
    }
}

fn assert_refused(err: &StoreError, refusal: Refusal) {
    let text = err.to_string();
    assert!(!err.permanent, "{refusal:?} taken for permanent: {text}");
    assert!(text.contains(refusal.code()), "{refusal:?}: {text}");
}

/// Every key and its contents, for "nothing changed".
fn dump(server: &RedisServer) -> Vec<(String, String)> {
    let keys = server.cli(&["KEYS", "*"]);
    let mut keys: Vec<&str> = keys.lines().filter(|key| !key.is_empty()).collect();
    keys.sort_unstable();
    keys.into_iter()
        .map(|key| {
            let contents = match server.cli(&["TYPE", key]).as_str() {
                "string" => server.cli(&["GET", key]),
                "hash" => server.cli(&["HGETALL", key]),
                "set" => {
                    let members = server.cli(&["SMEMBERS", key]);
                    let mut members: Vec<&str> = members.lines().collect();
                    members.sort_unstable();
                    members.join(",")
                }
                other => format!("<{other}>"),
            };
            (key.to_owned(), contents)
        })
        .collect()
}

async fn offset_save_is_refused_then_passes(refusal: Refusal) {
    let server = refusal.server();
    let offsets =
        RedisOffsetStore::new(open_client(&server.url()).unwrap(), DEFAULT_KEY_PREFIX).unwrap();
    offsets.save(LABEL, EntryId::new(5, 0), None).await.unwrap();
    refusal.impose(&server);
    let err = offsets
        .save(LABEL, EntryId::new(9, 1), None)
        .await
        .unwrap_err();
    assert_refused(&err, refusal);
    assert_eq!(server.cli(&["GET", OFFSET_KEY]), "5-0");
    // Reads are served meanwhile.
    assert_eq!(offsets.get(LABEL).await.unwrap(), Some(EntryId::new(5, 0)));
    refusal.lift(&server);
    offsets.save(LABEL, EntryId::new(9, 1), None).await.unwrap();
    assert_eq!(server.cli(&["GET", OFFSET_KEY]), "9-1");
    println!("[{refusal:?}] offset save: {err}");
}

#[tokio::test]
async fn an_offset_save_refused_for_memory_is_transient_and_passes_when_lifted() {
    offset_save_is_refused_then_passes(Refusal::Oom).await;
}

#[tokio::test]
async fn an_offset_save_refused_for_persistence_is_transient_and_passes_when_lifted() {
    offset_save_is_refused_then_passes(Refusal::Misconf).await;
}

fn lobby() -> BTreeMap<String, Game> {
    let set = |ids: &[&str]| ids.iter().map(|id| (*id).to_owned()).collect();
    BTreeMap::from([
        (
            "g1".to_owned(),
            Game {
                status: Some(GameStatus::Open),
                owner_id: "u".to_owned(),
                members: set(&["u", "m"]),
                ..Game::default()
            },
        ),
        (
            "g2".to_owned(),
            Game {
                status: Some(GameStatus::Running),
                owner_id: "o".to_owned(),
                members: set(&["o", "u"]),
                ..Game::default()
            },
        ),
    ])
}

/// The cascade of `user` for entry `id`, through the domain's handler.
async fn handle(store: &RedisLobbyStore, user: &str, id: EntryId) -> Result<(), HandlerError> {
    let fields: [(&[u8], &[u8]); 3] = [
        (b"event_type", b"user.deleted"),
        (b"user_id", user.as_bytes()),
        (b"occurred_at_ms", b"1700000000000"),
    ];
    let event = decode_user_lifecycle_event(id, &fields).unwrap();
    CascadeHandler::new(store.clone()).handle(&event).await
}

/// A cascade whose first write is refused: with `OOM`, that is one that
/// only writes (the record of a user without games: Redis lets a script
/// that has written once go on past `maxmemory`, so a cascade that starts
/// by removing the user from a set is not refused); with `MISCONF`, any.
async fn cascade_is_refused_then_passes(refusal: Refusal, user: &str, games: u64) {
    cascade_with_pages_is_refused_then_passes(refusal, user, games, None).await;
}

/// The same with the store's page size set to `page` games, if any.
async fn cascade_with_pages_is_refused_then_passes(
    refusal: Refusal,
    user: &str,
    games: u64,
    page: Option<usize>,
) {
    let server = refusal.server();
    let mut store = RedisLobbyStore::new(open_client(&server.url()).unwrap(), "lobby").unwrap();
    if let Some(page) = page {
        store = store.with_page_size(page);
    }
    for (id, game) in lobby() {
        store.put_game(&id, &game).await.unwrap();
    }
    let entry = EntryId::new(100, 0);
    let cascade = UserCascade {
        user_id: user.to_owned(),
        event_type: "user.deleted".to_owned(),
        entry_id: entry,
        occurred_at_ms: 1_700_000_000_000,
        trace_id: String::new(),
    };
    refusal.impose(&server);
    let before = dump(&server);
    let err = store.apply(&cascade).await.unwrap_err();
    assert_refused(&err, refusal);
    let failure = handle(&store, user, entry).await.unwrap_err();
    assert!(
        failure.is_transient(),
        "{refusal:?}: the handler's failure would count towards dead-lettering: {failure}"
    );
    assert_eq!(
        dump(&server),
        before,
        "{refusal:?}: a refused cascade changed the lobby"
    );
    refusal.lift(&server);
    handle(&store, user, entry).await.unwrap();
    assert_eq!(
        store.apply(&cascade).await.unwrap(),
        CascadeOutcome::AlreadyApplied { recorded: entry }
    );
    let record = store.cascade_record(user).await.unwrap().unwrap();
    assert_eq!((record.entry_id.as_str(), record.games), ("100-0", games));
    println!("[{refusal:?}] cascade of {user}: {err}; handler: {failure}");
}

#[tokio::test]
async fn a_cascade_refused_for_memory_is_a_transient_failure_and_passes_when_lifted() {
    cascade_is_refused_then_passes(Refusal::Oom, "no-games", 0).await;
}

#[tokio::test]
async fn a_cascade_refused_for_persistence_is_a_transient_failure_and_passes_when_lifted() {
    cascade_is_refused_then_passes(Refusal::Misconf, "u", 2).await;
}

/// A cascade walked a game per call: its first page is refused at its
/// first write, changing nothing, and the retry completes the cascade.
#[tokio::test]
async fn a_paged_cascade_refused_for_persistence_is_transient_and_passes_when_lifted() {
    cascade_with_pages_is_refused_then_passes(Refusal::Misconf, "u", 2, Some(1)).await;
}

/// Redis refuses only a script's first write that could grow memory: once
/// the cascade has removed the user from a set, it goes on, record
/// included, past `maxmemory`. (The offset save, whose first write is its
/// `SET`, is refused.)
#[tokio::test]
async fn under_oom_a_cascade_that_starts_by_removing_the_user_goes_through() {
    let server = Refusal::Oom.server();
    let store = RedisLobbyStore::new(open_client(&server.url()).unwrap(), "lobby").unwrap();
    for (id, game) in lobby() {
        store.put_game(&id, &game).await.unwrap();
    }
    Refusal::Oom.impose(&server);
    handle(&store, "u", EntryId::new(100, 0)).await.unwrap();
    let record = store.cascade_record("u").await.unwrap().unwrap();
    assert_eq!((record.entry_id.as_str(), record.games), ("100-0", 2));
    assert!(server.cli(&["SET", "k", "v"]).starts_with("OOM "));
}
