//! Integration tests of the lobby store ([`RedisLobbyStore`]) and its cascade
//! script against real, private redis-servers (one per test, never the
//! system Redis on 6379).
//!
//! The expectations come from the README's section "The lobby and the
//! cascade"; the random test checks that the script and the domain model
//! ([`Game::apply_cascade`]) agree.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

mod common;

use common::connect;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use lifecycle_domain::{
    CascadeOutcome, EntryId, Game, GameStatus, KeyLayout, LobbyStore, UserCascade,
};
use lifecycle_redis::{open_client, open_endpoint, CascadeRecord, RedisLobbyStore};
use lifecycle_test_support::{RedisCluster, RedisServer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::aio::MultiplexedConnection;

const DELETED: &str = "user.deleted";
const BLOCKED: &str = "user.permanently_blocked";
const OCCURRED: i64 = 1_700_000_000_000;

// ---------------------------------------------------------------- helpers

fn store(server: &RedisServer, prefix: &str) -> RedisLobbyStore {
    RedisLobbyStore::new(open_client(&server.url()).unwrap(), prefix).unwrap()
}

fn cascade(user_id: &str, event_type: &str, entry_id: EntryId) -> UserCascade {
    UserCascade {
        user_id: user_id.to_owned(),
        event_type: event_type.to_owned(),
        entry_id,
        occurred_at_ms: OCCURRED,
        trace_id: String::new(),
    }
}

fn traced(user_id: &str, event_type: &str, entry_id: EntryId, trace_id: &str) -> UserCascade {
    UserCascade {
        trace_id: trace_id.to_owned(),
        ..cascade(user_id, event_type, entry_id)
    }
}

fn ids(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|id| (*id).to_owned()).collect()
}

fn applied(games: u64, unknown: &[&str]) -> CascadeOutcome {
    CascadeOutcome::Applied {
        games,
        unknown_status: unknown.iter().map(|id| (*id).to_owned()).collect(),
    }
}

/// The outcome with its unknown-status list sorted (the script reports the
/// games in the index's order, which a set does not fix).
fn sorted(outcome: CascadeOutcome) -> CascadeOutcome {
    match outcome {
        CascadeOutcome::Applied {
            games,
            mut unknown_status,
        } => {
            unknown_status.sort();
            CascadeOutcome::Applied {
                games,
                unknown_status,
            }
        }
        other => other,
    }
}

fn record(event_type: &str, entry_id: &str, games: u64) -> CascadeRecord {
    CascadeRecord {
        event_type: event_type.to_owned(),
        entry_id: entry_id.to_owned(),
        occurred_at_ms: OCCURRED.to_string(),
        games,
        trace_id: None,
        applied_at_ms: None,
    }
}

/// Milliseconds since the Unix epoch by this machine's clock, which the
/// private redis-servers share.
fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// The recorded cascade of `user_id` without its `applied_at_ms` (the one
/// field that depends on when it ran), which must be present and no later
/// than now.
async fn record_of(store: &RedisLobbyStore, user_id: &str) -> Option<CascadeRecord> {
    let mut record = store.cascade_record(user_id).await.unwrap()?;
    let applied = record
        .applied_at_ms
        .take()
        .unwrap_or_else(|| panic!("no applied_at_ms in {record:?}"));
    assert!(
        applied > 1_600_000_000_000 && applied <= now_ms(),
        "applied_at_ms {applied}"
    );
    Some(record)
}

/// `dump` with the records' `applied_at_ms` left out: the one field in which
/// two orders of the same cascades may differ.
fn timeless(dump: &Dump) -> Dump {
    dump.iter()
        .map(|(key, (kind, ttl, contents))| {
            let mut contents = contents.clone();
            if kind == "hash" && key.ends_with(b":cascade") {
                contents = contents
                    .chunks(2)
                    .filter(|pair| pair[0] != b"applied_at_ms")
                    .flatten()
                    .cloned()
                    .collect();
            }
            (key.clone(), (kind.clone(), *ttl, contents))
        })
        .collect()
}

/// Every key of the server: type, PTTL and contents (hash fields and set
/// members sorted, so that two dumps compare by value, not by encoding).
type Dump = BTreeMap<Vec<u8>, (String, i64, Vec<Vec<u8>>)>;

async fn dump(conn: &mut MultiplexedConnection) -> Dump {
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query_async(conn).await.unwrap();
    let mut out = Dump::new();
    for key in keys {
        let key_arg = key.as_slice();
        let kind: String = redis::cmd("TYPE")
            .arg(key_arg)
            .query_async(conn)
            .await
            .unwrap();
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key_arg)
            .query_async(conn)
            .await
            .unwrap();
        let contents: Vec<Vec<u8>> = match kind.as_str() {
            "string" => vec![redis::cmd("GET")
                .arg(key_arg)
                .query_async(conn)
                .await
                .unwrap()],
            "hash" => {
                let flat: Vec<Vec<u8>> = redis::cmd("HGETALL")
                    .arg(key_arg)
                    .query_async(conn)
                    .await
                    .unwrap();
                let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = flat
                    .chunks(2)
                    .map(|pair| (pair[0].clone(), pair[1].clone()))
                    .collect();
                pairs.sort();
                pairs
                    .into_iter()
                    .flat_map(|(field, value)| [field, value])
                    .collect()
            }
            "set" => {
                let mut members: Vec<Vec<u8>> = redis::cmd("SMEMBERS")
                    .arg(key_arg)
                    .query_async(conn)
                    .await
                    .unwrap();
                members.sort();
                members
            }
            "list" => redis::cmd("LRANGE")
                .arg(key_arg)
                .arg(0)
                .arg(-1)
                .query_async(conn)
                .await
                .unwrap(),
            _ => vec![redis::cmd("DUMP")
                .arg(key_arg)
                .query_async(conn)
                .await
                .unwrap()],
        };
        out.insert(key, (kind, ttl, contents));
    }
    out
}

/// The keys of `dump` under `<prefix>:`, with the prefix cut off.
fn under(dump: &Dump, prefix: &str) -> Dump {
    let head = format!("{prefix}:");
    dump.iter()
        .filter_map(|(key, value)| {
            key.strip_prefix(head.as_bytes())
                .map(|rest| (rest.to_vec(), value.clone()))
        })
        .collect()
}

async fn exists(conn: &mut MultiplexedConnection, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(conn)
        .await
        .unwrap()
        == 1
}

async fn put_lobby(store: &RedisLobbyStore, lobby: &BTreeMap<String, Game>) {
    for (game_id, game) in lobby {
        store.put_game(game_id, game).await.unwrap();
    }
}

/// Reads back every game of `lobby` (they all must exist).
async fn read_back(
    store: &RedisLobbyStore,
    lobby: &BTreeMap<String, Game>,
) -> BTreeMap<String, Game> {
    let mut out = BTreeMap::new();
    for game_id in lobby.keys() {
        let game = store
            .get_game(game_id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("game {game_id:?} vanished"));
        out.insert(game_id.clone(), game);
    }
    out
}

/// The domain model of one user's cascade over a whole lobby.
fn model(
    lobby: &BTreeMap<String, Game>,
    user_id: &str,
    event_type: &str,
) -> BTreeMap<String, Game> {
    let mut out = lobby.clone();
    for game in out.values_mut() {
        game.apply_cascade(user_id, event_type);
    }
    out
}

/// Whether `put_game` indexes the game under `user_id` (owner or roster
/// other than `dropped`).
fn indexed(game: &Game, user_id: &str) -> bool {
    game.owner_id == user_id
        || game.members.contains(user_id)
        || game.applicants.contains(user_id)
        || game.invitees.contains(user_id)
}

fn is_unknown(game: &Game) -> bool {
    !matches!(
        game.status,
        Some(GameStatus::Open | GameStatus::Running | GameStatus::Finished | GameStatus::Cancelled)
    )
}

/// The outcome the cascade of `user_id` should report on `lobby`.
fn expected_outcome(lobby: &BTreeMap<String, Game>, user_id: &str) -> CascadeOutcome {
    let touched: Vec<(&String, &Game)> = lobby
        .iter()
        .filter(|(_, game)| indexed(game, user_id))
        .collect();
    let mut unknown_status: Vec<String> = touched
        .iter()
        .filter(|(_, game)| is_unknown(game))
        .map(|(id, _)| (*id).clone())
        .collect();
    unknown_status.sort();
    CascadeOutcome::Applied {
        games: touched.len() as u64,
        unknown_status,
    }
}

fn done(name: &str, started: Instant) {
    println!("{name}: {:?}", started.elapsed());
}

// ------------------------------------------ 1. every status x every role

#[derive(Clone, Copy, Debug)]
enum Role {
    /// Owns the game, on no roster.
    Owner,
    Member,
    Applicant,
    Invitee,
    /// Owner, member, applicant and invitee at once.
    All,
}

const ROLES: [Role; 5] = [
    Role::Owner,
    Role::Member,
    Role::Applicant,
    Role::Invitee,
    Role::All,
];
const STATUSES: [Option<&str>; 6] = [
    Some("open"),
    Some("running"),
    Some("finished"),
    Some("cancelled"),
    Some("paused"),
    None,
];

fn matrix_id(status: Option<&str>, role: Role) -> String {
    format!("{}-{role:?}", status.unwrap_or("none"))
}

/// A game where "u" has `role`, next to other users: owner "o" (when "u" is
/// not the owner), member "m", applicant "x", invitee "y", dropped "z".
fn matrix_game(status: Option<&str>, role: Role) -> Game {
    let mut game = Game {
        status: status.map(GameStatus::parse),
        owner_id: "o".to_owned(),
        cancel_reason: (status == Some("cancelled")).then(|| "owner left".to_owned()),
        members: ids(&["m"]),
        applicants: ids(&["x"]),
        invitees: ids(&["y"]),
        dropped: ids(&["z"]),
    };
    match role {
        Role::Owner => game.owner_id = "u".to_owned(),
        Role::Member => {
            game.members.insert("u".to_owned());
        }
        Role::Applicant => {
            game.applicants.insert("u".to_owned());
        }
        Role::Invitee => {
            game.invitees.insert("u".to_owned());
        }
        Role::All => {
            game.owner_id = "u".to_owned();
            game.members.insert("u".to_owned());
            game.applicants.insert("u".to_owned());
            game.invitees.insert("u".to_owned());
        }
    }
    if game.owner_id == "o" {
        game.members.insert("o".to_owned());
    }
    game
}

/// What the README says the game looks like after the cascade of "u",
/// written out from the text (not through the domain model).
fn matrix_expected(status: Option<&str>, role: Role) -> Game {
    let mut game = matrix_game(status, role);
    let owner = matches!(role, Role::Owner | Role::All);
    let member = matches!(role, Role::Member | Role::All);
    game.applicants = ids(&["x"]);
    game.invitees = ids(&["y"]);
    match status {
        Some("open") => {
            game.members.remove("u");
            if owner {
                game.status = Some(GameStatus::Cancelled);
                game.cancel_reason = Some(DELETED.to_owned());
            }
        }
        Some("cancelled") => {
            game.members.remove("u");
        }
        // A player moves to dropped; an applicant or invitee never played.
        Some("running") if member => {
            game.members.remove("u");
            game.dropped.insert("u".to_owned());
        }
        // running without a seat, finished, unknown, none: the members stay.
        _ => {}
    }
    game
}

#[tokio::test]
async fn every_status_and_every_role_follow_the_design() {
    let started = Instant::now();
    let server = RedisServer::start();
    let lobby = store(&server, "lobby");
    let mut conn = connect(&server).await;

    let mut seeded = BTreeMap::new();
    for status in STATUSES {
        for role in ROLES {
            let id = matrix_id(status, role);
            let game = matrix_game(status, role);
            lobby.put_game(&id, &game).await.unwrap();
            // A field the cascade must leave alone.
            server.cli(&[
                "HSET",
                &format!("lobby:game:{id}"),
                "title",
                &format!("T {id}"),
            ]);
            seeded.insert(id, game);
        }
    }
    let bystander = Game {
        status: Some(GameStatus::Open),
        owner_id: "o".to_owned(),
        members: ids(&["o", "m"]),
        applicants: ids(&["x"]),
        ..Game::default()
    };
    lobby.put_game("bystander", &bystander).await.unwrap();
    assert_eq!(lobby.user_games("u").await.unwrap().len(), 30);
    let before = dump(&mut conn).await;

    let outcome = lobby
        .apply(&cascade("u", DELETED, EntryId::new(100, 0)))
        .await
        .unwrap();
    assert_eq!(
        sorted(outcome),
        applied(
            30,
            &[
                "none-All",
                "none-Applicant",
                "none-Invitee",
                "none-Member",
                "none-Owner",
                "paused-All",
                "paused-Applicant",
                "paused-Invitee",
                "paused-Member",
                "paused-Owner",
            ]
        )
    );

    for status in STATUSES {
        for role in ROLES {
            let id = matrix_id(status, role);
            let game = lobby.get_game(&id).await.unwrap().unwrap();
            assert_eq!(game, matrix_expected(status, role), "game {id}");
            assert_eq!(
                server.cli(&["HGET", &format!("lobby:game:{id}"), "title"]),
                format!("T {id}"),
                "other fields of {id} are untouched"
            );
        }
    }
    // A few cases spelled out.
    let open_owner = lobby.get_game("open-Owner").await.unwrap().unwrap();
    assert_eq!(open_owner.status, Some(GameStatus::Cancelled));
    assert_eq!(open_owner.cancel_reason.as_deref(), Some(DELETED));
    assert_eq!(open_owner.owner_id, "u");
    let open_member = lobby.get_game("open-Member").await.unwrap().unwrap();
    assert_eq!(open_member.status, Some(GameStatus::Open));
    assert_eq!(open_member.cancel_reason, None);
    assert_eq!(open_member.members, ids(&["m", "o"]));
    let running = lobby.get_game("running-All").await.unwrap().unwrap();
    assert_eq!(running.status, Some(GameStatus::Running));
    assert_eq!(running.owner_id, "u");
    assert_eq!(running.members, ids(&["m"]));
    assert_eq!(running.dropped, ids(&["u", "z"]));
    assert_eq!(
        (running.applicants, running.invitees),
        (ids(&["x"]), ids(&["y"]))
    );
    let running_applicant = lobby.get_game("running-Applicant").await.unwrap().unwrap();
    assert_eq!(
        running_applicant.dropped,
        ids(&["z"]),
        "never played: not dropped"
    );
    let cancelled = lobby.get_game("cancelled-All").await.unwrap().unwrap();
    assert_eq!(cancelled.cancel_reason.as_deref(), Some("owner left"));
    assert_eq!(cancelled.members, ids(&["m"]));
    for id in ["finished-All", "paused-All", "none-All"] {
        let game = lobby.get_game(id).await.unwrap().unwrap();
        assert_eq!(game.members, ids(&["m", "u"]), "{id} keeps its history");
        assert_eq!(game.applicants, ids(&["x"]), "{id}");
        assert_eq!(game.invitees, ids(&["y"]), "{id}");
    }
    assert_eq!(
        lobby
            .get_game("paused-Owner")
            .await
            .unwrap()
            .unwrap()
            .status,
        Some(GameStatus::Unknown("paused".to_owned()))
    );
    assert_eq!(
        lobby.get_game("none-Owner").await.unwrap().unwrap().status,
        None
    );
    assert_eq!(
        lobby.get_game("bystander").await.unwrap().unwrap(),
        bystander
    );

    assert!(!exists(&mut conn, "lobby:user:u:games").await);
    assert!(lobby.user_games("u").await.unwrap().is_empty());
    assert_eq!(
        record_of(&lobby, "u").await,
        Some(record(DELETED, "100-0", 30))
    );
    let fields = server.cli(&["HKEYS", "lobby:user:u:cascade"]);
    let mut fields: Vec<&str> = fields.lines().collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "applied_at_ms",
            "entry_id",
            "event_type",
            "games",
            "occurred_at_ms"
        ],
        "no trace id: no trace_id field"
    );

    // Nothing else changed: every key outside the games' hashes and sets and
    // "u"'s own keys (the other users' indexes and records) is as before.
    let after = dump(&mut conn).await;
    let outside = |dump: &Dump| -> Dump {
        dump.iter()
            .filter(|(key, _)| {
                !key.starts_with(b"lobby:game:") && !key.starts_with(b"lobby:user:u:")
            })
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect()
    };
    assert_eq!(outside(&after), outside(&before));
    assert_eq!(
        lobby.user_games("m").await.unwrap().len(),
        31,
        "other users keep their index"
    );
    done("every_status_and_every_role_follow_the_design", started);
}

// ----------------------------------------- 2. Redis equals the domain model

const USERS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

fn random_lobby(rng: &mut StdRng) -> BTreeMap<String, Game> {
    let count = rng.random_range(3..=8);
    let mut lobby = BTreeMap::new();
    for index in 0..count {
        let status = match rng.random_range(0..6) {
            0 => Some(GameStatus::Open),
            1 => Some(GameStatus::Running),
            2 => Some(GameStatus::Finished),
            3 => Some(GameStatus::Cancelled),
            4 => Some(GameStatus::Unknown("paused".to_owned())),
            _ => None,
        };
        let owner = USERS[rng.random_range(0..USERS.len())].to_owned();
        let mut pick = |odds: f64| -> BTreeSet<String> {
            USERS
                .iter()
                .filter(|_| rng.random_bool(odds))
                .map(|user| (*user).to_owned())
                .collect()
        };
        let mut members = pick(0.4);
        let applicants = pick(0.25);
        let invitees = pick(0.25);
        let dropped = pick(0.15);
        if rng.random_bool(0.7) {
            members.insert(owner.clone());
        }
        let cancel_reason = (status == Some(GameStatus::Cancelled) && rng.random_bool(0.5))
            .then(|| "owner left".to_owned());
        lobby.insert(
            format!("g{index}"),
            Game {
                status,
                owner_id: owner,
                cancel_reason,
                members,
                applicants,
                invitees,
                dropped,
            },
        );
    }
    lobby
}

#[tokio::test]
async fn redis_agrees_with_the_domain_model_and_cascades_commute() {
    let server = RedisServer::start();
    agrees_with_the_domain_model_and_commutes(&Deployment::Standalone(&server, None)).await;
}

/// The same with a page of one or two games: every user's cascade is
/// walked in pages (`SSCAN`, a script call per page, the handled games
/// removed, the finishing call), and concurrent cascades interleave game by
/// game.
#[tokio::test]
async fn paged_cascades_agree_with_the_domain_model_and_commute() {
    let server = RedisServer::start();
    agrees_with_the_domain_model_and_commutes(&Deployment::Standalone(&server, Some(1))).await;
    agrees_with_the_domain_model_and_commutes(&Deployment::Standalone(&server, Some(2))).await;
}

/// The same on a Redis Cluster of three masters, in the cluster key layout:
/// the games and users lie on every master, each game is its own script
/// call, the finishing call sees only the user's keys.
#[tokio::test]
async fn cascades_on_a_cluster_agree_with_the_domain_model_and_commute() {
    let cluster = RedisCluster::start();
    let masters: BTreeSet<u16> = (0..8)
        .map(|index| KeyLayout::Cluster.game_key("p1", &format!("g{index}")))
        .chain(
            USERS
                .iter()
                .map(|user| KeyLayout::Cluster.user_key("p1", user, "games")),
        )
        .map(|key| cluster.master_of_key(&key))
        .collect();
    assert_eq!(masters.len(), 3, "the lobby's keys lie on every master");
    let deployment = Deployment::Cluster(&cluster);
    agrees_with_the_domain_model_and_commutes(&deployment).await;

    // Ids whose hash tag would be empty cannot keep their keys in one slot:
    // such a user is refused with a permanent error naming why; such a
    // game in an index is skipped, the others handled.
    let store = deployment.store("odd");
    let refused = store
        .apply(&cascade("}u", DELETED, EntryId::new(1, 0)))
        .await
        .unwrap_err();
    assert!(refused.permanent, "{refused}");
    assert!(refused.to_string().contains("starts with '}'"), "{refused}");
    let index = KeyLayout::Cluster.user_key("odd", "u", "games");
    cluster.cluster_cli(&["SADD", &index, "}g", "g1"]);
    let owned = Game {
        status: Some(GameStatus::Open),
        owner_id: "u".to_owned(),
        cancel_reason: None,
        members: BTreeSet::from(["u".to_owned()]),
        applicants: BTreeSet::new(),
        invitees: BTreeSet::new(),
        dropped: BTreeSet::new(),
    };
    store.put_game("g1", &owned).await.unwrap();
    let outcome = store
        .apply(&cascade("u", DELETED, EntryId::new(2, 0)))
        .await
        .unwrap();
    assert_eq!(outcome, applied(1, &[]));
    assert!(store.user_games("u").await.unwrap().is_empty());
    assert_eq!(
        store.get_game("g1").await.unwrap().unwrap().status,
        Some(GameStatus::Cancelled)
    );
}

/// Where a model test runs.
enum Deployment<'a> {
    /// One server, with a page size when not the default.
    Standalone(&'a RedisServer, Option<usize>),
    /// A cluster, in the cluster key layout.
    Cluster(&'a RedisCluster),
}

impl Deployment<'_> {
    fn store(&self, prefix: &str) -> RedisLobbyStore {
        match self {
            Self::Standalone(server, Some(games)) => store(server, prefix).with_page_size(*games),
            Self::Standalone(server, None) => store(server, prefix),
            Self::Cluster(cluster) => {
                RedisLobbyStore::new(open_endpoint(&cluster.url(), None, None).unwrap(), prefix)
                    .unwrap()
                    .with_key_layout(KeyLayout::Cluster)
            }
        }
    }

    fn masters(&self) -> Vec<String> {
        match self {
            Self::Standalone(server, _) => vec![server.url()],
            Self::Cluster(cluster) => cluster
                .masters()
                .iter()
                .map(|port| format!("redis://127.0.0.1:{port}/"))
                .collect(),
        }
    }

    fn flush(&self) {
        match self {
            Self::Standalone(server, _) => {
                server.cli(&["FLUSHALL"]);
            }
            Self::Cluster(cluster) => {
                for port in cluster.masters() {
                    cluster.cli(port, &["FLUSHALL"]);
                }
            }
        }
    }

    /// Every key of every master.
    async fn dump(&self) -> Dump {
        let mut all = Dump::new();
        for url in self.masters() {
            let client = redis::Client::open(url).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            all.extend(dump(&mut conn).await);
        }
        all
    }

    fn describe(&self) -> String {
        match self {
            Self::Standalone(_, page) => format!("page {page:?}"),
            Self::Cluster(_) => "cluster".to_owned(),
        }
    }
}

async fn agrees_with_the_domain_model_and_commutes(deployment: &Deployment<'_>) {
    let started = Instant::now();
    let seed: u64 = std::env::var("LOBBY_TEST_SEED")
        .ok()
        .map(|seed| seed.parse().expect("LOBBY_TEST_SEED is a u64"))
        .unwrap_or_else(|| rand::rng().random());
    println!("seed {seed} (rerun with LOBBY_TEST_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let page = deployment.describe();

    let p1 = deployment.store("p1");
    let p2 = deployment.store("p2");
    let p3 = deployment.store("p3");

    for round in 0..30 {
        deployment.flush();
        let lobby = random_lobby(&mut rng);
        let first = USERS[rng.random_range(0..USERS.len())];
        let second = loop {
            let user = USERS[rng.random_range(0..USERS.len())];
            if user != first {
                break user;
            }
        };
        let (first_event, second_event) = if rng.random_bool(0.5) {
            (DELETED, BLOCKED)
        } else {
            (BLOCKED, DELETED)
        };
        let context =
            format!("{page} seed {seed} round {round}: {first} then {second} on {lobby:#?}");
        let first_cascade = cascade(first, first_event, EntryId::new(100, 0));
        let second_cascade = cascade(second, second_event, EntryId::new(200, 0));

        // One user's cascade: Redis == the model.
        put_lobby(&p1, &lobby).await;
        put_lobby(&p2, &lobby).await;
        assert_eq!(
            read_back(&p1, &lobby).await,
            lobby,
            "seeding round-trips; {context}"
        );
        let outcome = p1.apply(&first_cascade).await.unwrap();
        assert_eq!(
            sorted(outcome),
            expected_outcome(&lobby, first),
            "{context}"
        );
        let after_first = model(&lobby, first, first_event);
        assert_eq!(read_back(&p1, &lobby).await, after_first, "{context}");
        assert!(p1.user_games(first).await.unwrap().is_empty(), "{context}");

        // Both orders on two prefixes: the same lobby, equal to the model.
        let outcome = p1.apply(&second_cascade).await.unwrap();
        assert_eq!(
            sorted(outcome),
            expected_outcome(&after_first, second),
            "{context}"
        );
        p2.apply(&second_cascade).await.unwrap();
        p2.apply(&first_cascade).await.unwrap();
        let first_then_second = model(&after_first, second, second_event);
        let second_then_first = model(&model(&lobby, second, second_event), first, first_event);
        assert_eq!(
            first_then_second, second_then_first,
            "model commutes; {context}"
        );
        assert_eq!(read_back(&p1, &lobby).await, first_then_second, "{context}");
        assert_eq!(read_back(&p2, &lobby).await, second_then_first, "{context}");
        let all = deployment.dump().await;
        assert_eq!(
            timeless(&under(&all, "p1")),
            timeless(&under(&all, "p2")),
            "every key (games, indexes, records but for when they were applied) equal in both orders; {context}"
        );

        // Every user at once, concurrently: the model of any sequence.
        put_lobby(&p3, &lobby).await;
        let mut tasks = Vec::new();
        for (index, user) in USERS.iter().enumerate() {
            let p3 = p3.clone();
            let cascade = cascade(user, DELETED, EntryId::new(300 + index as u64, 0));
            tasks.push(tokio::spawn(async move { p3.apply(&cascade).await }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let mut everyone = lobby.clone();
        for user in USERS {
            everyone = model(&everyone, user, DELETED);
        }
        assert_eq!(
            read_back(&p3, &lobby).await,
            everyone,
            "concurrent; {context}"
        );
    }
    done(
        &format!("agrees_with_the_domain_model_and_commutes ({page})"),
        started,
    );
}

// ------------------------------------------------------- 3. idempotency

fn small_lobby() -> BTreeMap<String, Game> {
    BTreeMap::from([
        (
            "g1".to_owned(),
            Game {
                status: Some(GameStatus::Open),
                owner_id: "u".to_owned(),
                members: ids(&["u", "m"]),
                applicants: ids(&["x"]),
                ..Game::default()
            },
        ),
        (
            "g2".to_owned(),
            Game {
                status: Some(GameStatus::Running),
                owner_id: "o".to_owned(),
                members: ids(&["o", "u"]),
                invitees: ids(&["u", "y"]),
                ..Game::default()
            },
        ),
        (
            "g3".to_owned(),
            Game {
                status: Some(GameStatus::Finished),
                owner_id: "o".to_owned(),
                members: ids(&["o", "u"]),
                applicants: ids(&["u"]),
                ..Game::default()
            },
        ),
    ])
}

#[tokio::test]
async fn replays_and_older_entries_change_nothing_newer_ones_apply() {
    let started = Instant::now();
    let server = RedisServer::start();
    let lobby = store(&server, "lobby");
    let mut conn = connect(&server).await;
    let games = small_lobby();
    put_lobby(&lobby, &games).await;

    let first = cascade("u", DELETED, EntryId::new(100, 0));
    assert_eq!(lobby.apply(&first).await.unwrap(), applied(3, &[]));
    let after_first = dump(&mut conn).await;
    assert_eq!(read_back(&lobby, &games).await, model(&games, "u", DELETED));

    // The same entry again.
    assert_eq!(
        lobby.apply(&first).await.unwrap(),
        CascadeOutcome::AlreadyApplied {
            recorded: EntryId::new(100, 0)
        }
    );
    assert_eq!(
        dump(&mut conn).await,
        after_first,
        "a replay changes nothing"
    );

    // An older entry, even with another event type: nothing, record kept.
    let older = cascade("u", BLOCKED, EntryId::new(99, 5));
    assert_eq!(
        lobby.apply(&older).await.unwrap(),
        CascadeOutcome::AlreadyApplied {
            recorded: EntryId::new(100, 0)
        }
    );
    assert_eq!(
        dump(&mut conn).await,
        after_first,
        "an older entry changes nothing"
    );

    // Even with the user back in a game, an old entry does not touch it.
    let rejoined = Game {
        status: Some(GameStatus::Open),
        owner_id: "o".to_owned(),
        members: ids(&["o", "u"]),
        ..Game::default()
    };
    lobby.put_game("g4", &rejoined).await.unwrap();
    let with_g4 = dump(&mut conn).await;
    assert_eq!(
        lobby.apply(&first).await.unwrap(),
        CascadeOutcome::AlreadyApplied {
            recorded: EntryId::new(100, 0)
        }
    );
    assert_eq!(dump(&mut conn).await, with_g4);
    assert_eq!(lobby.user_games("u").await.unwrap(), ids(&["g4"]));

    // A newer entry applies again.
    let newer = cascade("u", BLOCKED, EntryId::new(101, 0));
    assert_eq!(lobby.apply(&newer).await.unwrap(), applied(1, &[]));
    let g4 = lobby.get_game("g4").await.unwrap().unwrap();
    assert_eq!(g4.members, ids(&["o"]));
    assert_eq!(g4.status, Some(GameStatus::Open));
    assert_eq!(
        record_of(&lobby, "u").await,
        Some(record(BLOCKED, "101-0", 1))
    );
    assert!(lobby.user_games("u").await.unwrap().is_empty());
    let after_newer = dump(&mut conn).await;
    assert_eq!(
        lobby.apply(&newer).await.unwrap(),
        CascadeOutcome::AlreadyApplied {
            recorded: EntryId::new(101, 0)
        }
    );
    assert_eq!(dump(&mut conn).await, after_newer);

    // Entry ids compare as numbers, not as text.
    for (recorded, entry, applies) in [
        ("9-0", EntryId::new(10, 0), true),
        ("10-0", EntryId::new(9, 9), false),
        ("10-5", EntryId::new(10, 10), true),
        ("10-10", EntryId::new(10, 5), false),
        ("10-0", EntryId::new(10, 0), false),
        ("99-0", EntryId::new(100, 0), true),
        ("18446744073709551615-0", EntryId::new(u64::MAX, 1), true),
        (
            "18446744073709551615-1",
            EntryId::new(u64::MAX - 1, 9),
            false,
        ),
    ] {
        server.cli(&["FLUSHALL"]);
        let (ms, seq) = recorded.split_once('-').unwrap();
        let recorded_id = EntryId::new(ms.parse().unwrap(), seq.parse().unwrap());
        assert_eq!(
            lobby
                .apply(&cascade("v", DELETED, recorded_id))
                .await
                .unwrap(),
            applied(0, &[])
        );
        assert_eq!(
            server.cli(&["HGET", "lobby:user:v:cascade", "entry_id"]),
            recorded
        );
        lobby.put_game("h", &rejoined_by("v")).await.unwrap();
        let before = dump(&mut conn).await;
        let outcome = lobby.apply(&cascade("v", BLOCKED, entry)).await.unwrap();
        if applies {
            assert_eq!(outcome, applied(1, &[]), "record {recorded}, entry {entry}");
            assert_eq!(
                record_of(&lobby, "v").await,
                Some(record(BLOCKED, &entry.to_string(), 1))
            );
            assert_eq!(
                lobby.get_game("h").await.unwrap().unwrap().members,
                ids(&["o"])
            );
        } else {
            assert_eq!(
                outcome,
                CascadeOutcome::AlreadyApplied {
                    recorded: recorded_id
                },
                "record {recorded}, entry {entry}"
            );
            assert_eq!(
                dump(&mut conn).await,
                before,
                "record {recorded}, entry {entry}"
            );
        }
    }
    done(
        "replays_and_older_entries_change_nothing_newer_ones_apply",
        started,
    );
}

fn rejoined_by(user: &str) -> Game {
    Game {
        status: Some(GameStatus::Open),
        owner_id: "o".to_owned(),
        members: ids(&["o", user]),
        ..Game::default()
    }
}

// ------------------------------------------------ 4. no footprint at all

#[tokio::test]
async fn a_user_without_games_gets_a_record_and_nothing_else() {
    let started = Instant::now();
    let server = RedisServer::start();
    let lobby = store(&server, "lobby");
    let mut conn = connect(&server).await;
    lobby.put_game("g", &rejoined_by("m")).await.unwrap();
    let before = dump(&mut conn).await;

    let outcome = lobby
        .apply(&cascade("nobody", DELETED, EntryId::new(7, 3)))
        .await
        .unwrap();
    assert_eq!(outcome, applied(0, &[]));
    assert_eq!(
        record_of(&lobby, "nobody").await,
        Some(record(DELETED, "7-3", 0))
    );
    let mut after = dump(&mut conn).await;
    assert!(after
        .remove(b"lobby:user:nobody:cascade".as_slice())
        .is_some());
    assert_eq!(after, before, "only the record was written");
    assert_eq!(
        lobby
            .apply(&cascade("nobody", DELETED, EntryId::new(7, 3)))
            .await
            .unwrap(),
        CascadeOutcome::AlreadyApplied {
            recorded: EntryId::new(7, 3)
        }
    );
    done(
        "a_user_without_games_gets_a_record_and_nothing_else",
        started,
    );
}

// ----------------------------------------- 5. index entry without a game

#[tokio::test]
async fn an_indexed_game_without_a_hash_is_skipped() {
    let started = Instant::now();
    let server = RedisServer::start();
    let lobby = store(&server, "lobby");
    let mut conn = connect(&server).await;
    let games = small_lobby();
    put_lobby(&lobby, &games).await;
    server.cli(&["SADD", "lobby:user:u:games", "gone", "also-gone"]);
    // Leftover sets of a game whose hash is gone: skipped with it.
    server.cli(&["SADD", "lobby:game:gone:members", "u", "m"]);
    server.cli(&["SADD", "lobby:game:gone:applicants", "u"]);

    let outcome = lobby
        .apply(&cascade("u", DELETED, EntryId::new(100, 0)))
        .await
        .unwrap();
    assert_eq!(outcome, applied(3, &[]));
    assert_eq!(read_back(&lobby, &games).await, model(&games, "u", DELETED));
    assert_eq!(lobby.get_game("gone").await.unwrap(), None);
    assert_eq!(lobby.get_game("also-gone").await.unwrap(), None);
    assert_eq!(
        server.cli(&["SMEMBERS", "lobby:game:gone:applicants"]),
        "u",
        "a skipped game is not written to"
    );
    assert!(!exists(&mut conn, "lobby:game:also-gone").await);
    assert!(!exists(&mut conn, "lobby:user:u:games").await);
    assert_eq!(
        record_of(&lobby, "u").await,
        Some(record(DELETED, "100-0", 3))
    );
    done("an_indexed_game_without_a_hash_is_skipped", started);
}

// ------------------------------------------- 6. wrong type: all or nothing

#[tokio::test]
async fn a_key_of_the_wrong_type_fails_the_whole_cascade() {
    let started = Instant::now();
    let server = RedisServer::start();
    let lobby = store(&server, "lobby");
    let mut conn = connect(&server).await;
    let games = small_lobby();
    let entry = EntryId::new(100, 0);

    // Each lobby key the cascade writes, broken in turn: those of the
    // running game g2 (members, invitees, and dropped, where the user moves;
    // applicants, which it would leave), the game hash, the index and the
    // record, and the applicants of g3. The script undoes its own writes
    // when it meets a wrong type, so the games it walked before the broken
    // key (in the set's order, which varies from server to server) must be
    // as they were.
    put_lobby(&lobby, &games).await;
    let last = "g2";
    for (broken, how) in [
        (format!("lobby:game:{last}:members"), ["SET", "oops"]),
        (format!("lobby:game:{last}:applicants"), ["SET", "oops"]),
        (format!("lobby:game:{last}:invitees"), ["SET", "oops"]),
        (format!("lobby:game:{last}:dropped"), ["RPUSH", "oops"]),
        (format!("lobby:game:{last}"), ["RPUSH", "oops"]),
        ("lobby:user:u:games".to_owned(), ["SET", "oops"]),
        ("lobby:user:u:cascade".to_owned(), ["SET", "oops"]),
        ("lobby:game:g3:applicants".to_owned(), ["SET", "oops"]),
    ] {
        let broken = broken.as_str();
        server.cli(&["FLUSHALL"]);
        put_lobby(&lobby, &games).await;
        server.cli(&["DEL", broken]);
        server.cli(&[how[0], broken, how[1]]);
        let before = dump(&mut conn).await;

        let err = lobby
            .apply(&cascade("u", DELETED, entry))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains(broken), "{broken}: {text}");
        assert!(text.contains("WRONGTYPE"), "{broken}: {text}");
        assert!(err.permanent, "{broken}: retrying cannot help");
        assert_eq!(dump(&mut conn).await, before, "{broken}: nothing changed");
    }

    // Undone in a known order: a set of integer ids is walked ascending, so
    // game 1 (open, the user's: cancelled first, over an earlier cancel
    // reason or none) is changed before game 2's dropped set turns out to be
    // a list.
    for earlier_reason in [Some("earlier"), None] {
        server.cli(&["FLUSHALL"]);
        let numbered = BTreeMap::from([
            (
                "1".to_owned(),
                Game {
                    status: Some(GameStatus::Open),
                    owner_id: "u".to_owned(),
                    cancel_reason: earlier_reason.map(str::to_owned),
                    members: ids(&["u", "m"]),
                    invitees: ids(&["u"]),
                    ..Game::default()
                },
            ),
            (
                "2".to_owned(),
                Game {
                    status: Some(GameStatus::Running),
                    owner_id: "o".to_owned(),
                    members: ids(&["o", "u"]),
                    ..Game::default()
                },
            ),
        ]);
        put_lobby(&lobby, &numbered).await;
        assert_eq!(server.cli(&["SMEMBERS", "lobby:user:u:games"]), "1\n2");
        server.cli(&["RPUSH", "lobby:game:2:dropped", "oops"]);
        let before = dump(&mut conn).await;
        let err = lobby
            .apply(&cascade("u", DELETED, entry))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("lobby:game:2:dropped"), "{err}");
        assert_eq!(
            dump(&mut conn).await,
            before,
            "game 1 is as it was ({earlier_reason:?})"
        );
    }

    // The brief's case, then the repair.
    server.cli(&["FLUSHALL"]);
    put_lobby(&lobby, &games).await;
    server.cli(&["SET", "lobby:game:g2:members", "oops"]);
    let before = dump(&mut conn).await;
    let err = lobby
        .apply(&cascade("u", DELETED, entry))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("lobby:game:g2:members") && text.contains("WRONGTYPE"),
        "{text}"
    );
    assert_eq!(dump(&mut conn).await, before);
    assert_eq!(
        lobby.user_games("u").await.unwrap(),
        ids(&["g1", "g2", "g3"])
    );
    assert_eq!(record_of(&lobby, "u").await, None);
    assert_eq!(lobby.get_game("g1").await.unwrap().unwrap(), games["g1"]);

    server.cli(&["DEL", "lobby:game:g2:members"]);
    server.cli(&["SADD", "lobby:game:g2:members", "o", "u"]);
    assert_eq!(
        lobby.apply(&cascade("u", DELETED, entry)).await.unwrap(),
        applied(3, &[])
    );
    assert_eq!(read_back(&lobby, &games).await, model(&games, "u", DELETED));
    let g2 = lobby.get_game("g2").await.unwrap().unwrap();
    assert_eq!((g2.members, g2.dropped), (ids(&["o"]), ids(&["u"])));
    assert_eq!(
        record_of(&lobby, "u").await,
        Some(record(DELETED, "100-0", 3))
    );
    assert!(lobby.user_games("u").await.unwrap().is_empty());
    done("a_key_of_the_wrong_type_fails_the_whole_cascade", started);
}

#[tokio::test]
async fn a_refused_write_keeps_its_own_code_changes_nothing_and_can_pass() {
    let started = Instant::now();
    let server = RedisServer::start();
    let lobby = store(&server, "lobby");
    let mut conn = connect(&server).await;
    let games = small_lobby();
    put_lobby(&lobby, &games).await;
    let entry = EntryId::new(100, 0);

    // With no replica to confirm them, Redis refuses writes (NOREPLICAS), as
    // a demoted master does (READONLY): the server's state, not the lobby's.
    server.cli(&["CONFIG", "SET", "min-replicas-to-write", "1"]);
    let before = dump(&mut conn).await;
    let err = lobby
        .apply(&cascade("u", DELETED, entry))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("NOREPLICAS"), "{text}");
    assert!(!text.contains("WRONGTYPE"), "{text}");
    assert!(!err.permanent, "retrying can pass: {text}");
    assert_eq!(dump(&mut conn).await, before);

    server.cli(&["CONFIG", "SET", "min-replicas-to-write", "0"]);
    assert_eq!(
        lobby.apply(&cascade("u", DELETED, entry)).await.unwrap(),
        applied(3, &[])
    );
    assert_eq!(read_back(&lobby, &games).await, model(&games, "u", DELETED));
    done(
        "a_refused_write_keeps_its_own_code_changes_nothing_and_can_pass",
        started,
    );
}

// ------------------------------------------------------- 7. odd bytes

#[tokio::test]
async fn ids_and_prefixes_with_odd_bytes_are_plain_data() {
    let started = Instant::now();
    let server = RedisServer::start();
    let mut conn = connect(&server).await;
    let target = "u* ü\n:🎲'\"]]%d%s..\0end";
    // Would match the target's keys if anything treated its id as a glob or
    // a Lua pattern.
    let twin = "u";
    let twin2 = "u* ü";

    for prefix in ["lobby", "lob by\n*[x]:%1"] {
        server.cli(&["FLUSHALL"]);
        let lobby = store(&server, prefix);
        let games: BTreeMap<String, Game> = [
            (
                "g 1\n:*".to_owned(),
                Game {
                    status: Some(GameStatus::Open),
                    owner_id: target.to_owned(),
                    members: ids(&[target, twin, twin2]),
                    applicants: ids(&["x y"]),
                    ..Game::default()
                },
            ),
            (
                "ĝämé:🎲*".to_owned(),
                Game {
                    status: Some(GameStatus::Running),
                    owner_id: twin.to_owned(),
                    members: ids(&[target, twin]),
                    invitees: ids(&[target, twin2]),
                    ..Game::default()
                },
            ),
            (
                "%d'\"]]--[[".to_owned(),
                Game {
                    status: Some(GameStatus::Finished),
                    owner_id: twin2.to_owned(),
                    members: ids(&[target, twin2]),
                    applicants: ids(&[target, twin]),
                    ..Game::default()
                },
            ),
            (
                "paused\0 ü*".to_owned(),
                Game {
                    status: Some(GameStatus::Unknown("on hold: 🎲*".to_owned())),
                    owner_id: target.to_owned(),
                    members: ids(&[target]),
                    invitees: ids(&[twin]),
                    ..Game::default()
                },
            ),
            (
                "*".to_owned(),
                Game {
                    status: Some(GameStatus::Open),
                    owner_id: twin.to_owned(),
                    members: ids(&[twin, twin2]),
                    ..Game::default()
                },
            ),
        ]
        .into_iter()
        .collect();
        put_lobby(&lobby, &games).await;
        assert_eq!(read_back(&lobby, &games).await, games, "prefix {prefix:?}");
        let twin_index = lobby.user_games(twin).await.unwrap();
        let twin2_index = lobby.user_games(twin2).await.unwrap();

        let outcome = lobby
            .apply(&cascade(target, DELETED, EntryId::new(5, 1)))
            .await
            .unwrap();
        assert_eq!(outcome, applied(4, &["paused\0 ü*"]), "prefix {prefix:?}");
        let expected = model(&games, target, DELETED);
        assert_eq!(
            read_back(&lobby, &games).await,
            expected,
            "prefix {prefix:?}"
        );
        let open = &expected["g 1\n:*"];
        assert_eq!(open.status, Some(GameStatus::Cancelled));
        assert_eq!(open.members, ids(&[twin, twin2]));
        assert_eq!(expected["ĝämé:🎲*"].dropped, ids(&[target]));
        assert_eq!(expected["*"], games["*"]);

        assert!(lobby.user_games(target).await.unwrap().is_empty());
        let index_key = format!("{prefix}:user:{target}:games");
        assert!(!exists(&mut conn, &index_key).await, "prefix {prefix:?}");
        assert_eq!(
            record_of(&lobby, target).await,
            Some(record(DELETED, "5-1", 4))
        );
        assert_eq!(lobby.user_games(twin).await.unwrap(), twin_index);
        assert_eq!(lobby.user_games(twin2).await.unwrap(), twin2_index);
        assert_eq!(record_of(&lobby, twin).await, None);
        assert_eq!(record_of(&lobby, twin2).await, None);

        // Every key is one the layout names, under this prefix.
        let all = dump(&mut conn).await;
        let mut expected_keys: BTreeSet<Vec<u8>> = BTreeSet::new();
        for (game_id, game) in &expected {
            expected_keys.insert(format!("{prefix}:game:{game_id}").into_bytes());
            for (suffix, set) in [
                ("members", &game.members),
                ("applicants", &game.applicants),
                ("invitees", &game.invitees),
                ("dropped", &game.dropped),
            ] {
                // Redis drops a set once it is empty.
                if !set.is_empty() {
                    expected_keys.insert(format!("{prefix}:game:{game_id}:{suffix}").into_bytes());
                }
            }
        }
        for user in [twin, twin2, "x y"] {
            expected_keys.insert(format!("{prefix}:user:{user}:games").into_bytes());
        }
        expected_keys.insert(format!("{prefix}:user:{target}:cascade").into_bytes());
        let keys: BTreeSet<Vec<u8>> = all.keys().cloned().collect();
        assert_eq!(
            keys.iter()
                .map(|key| String::from_utf8_lossy(key).into_owned())
                .collect::<Vec<_>>(),
            expected_keys
                .iter()
                .map(|key| String::from_utf8_lossy(key).into_owned())
                .collect::<Vec<_>>(),
            "prefix {prefix:?}"
        );

        // The twins' own cascades still work on what is left.
        let outcome = lobby
            .apply(&cascade(twin, DELETED, EntryId::new(6, 0)))
            .await
            .unwrap();
        assert_eq!(sorted(outcome), expected_outcome(&expected, twin));
        let expected = model(&expected, twin, DELETED);
        assert_eq!(
            read_back(&lobby, &games).await,
            expected,
            "prefix {prefix:?}"
        );
        assert_eq!(lobby.user_games(twin2).await.unwrap(), twin2_index);
    }
    done("ids_and_prefixes_with_odd_bytes_are_plain_data", started);
}

/// The store behind the domain's port behaves like `apply`.
#[tokio::test]
async fn the_lobby_store_port_applies_cascades() {
    let started = Instant::now();
    let server = RedisServer::start();
    let lobby = store(&server, "lobby");
    let games = small_lobby();
    put_lobby(&lobby, &games).await;
    let port: &dyn LobbyStore = &lobby;
    let first = cascade("u", DELETED, EntryId::new(100, 0));
    assert_eq!(port.apply_cascade(&first).await.unwrap(), applied(3, &[]));
    assert_eq!(
        port.apply_cascade(&first).await.unwrap(),
        CascadeOutcome::AlreadyApplied {
            recorded: EntryId::new(100, 0)
        }
    );
    assert_eq!(read_back(&lobby, &games).await, model(&games, "u", DELETED));
    done("the_lobby_store_port_applies_cascades", started);
}

#[tokio::test]
async fn a_broken_key_the_rules_leave_alone_does_not_block_the_cascade() {
    let server = RedisServer::start();
    let lobby = store(&server, "lobby");
    put_lobby(&lobby, &small_lobby()).await;
    // g3 is finished: its members are history the cascade never touches.
    server.cli(&["DEL", "lobby:game:g3:members"]);
    server.cli(&["SET", "lobby:game:g3:members", "oops"]);
    let outcome = lobby
        .apply(&cascade("u", DELETED, EntryId::new(7, 0)))
        .await
        .unwrap();
    assert!(
        matches!(outcome, CascadeOutcome::Applied { games: 3, .. }),
        "{outcome:?}"
    );
    assert_eq!(server.cli(&["GET", "lobby:game:g3:members"]), "oops");
    assert_eq!(
        server.cli(&["SISMEMBER", "lobby:game:g3:applicants", "u"]),
        "0"
    );
}

// ------------------------------------- 9. trace id and time of application

/// Waits until this machine's clock has passed `ms`, so that a later write
/// would carry a later time.
fn clock_past(ms: u64) {
    while now_ms() <= ms {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[tokio::test]
async fn the_record_keeps_the_trace_id_and_when_the_cascade_was_applied() {
    let started = Instant::now();
    let server = RedisServer::start();
    let lobby = store(&server, "lobby");
    let mut conn = connect(&server).await;
    let games = small_lobby();
    put_lobby(&lobby, &games).await;
    // Odd bytes and a long value are plain data, stored whole.
    let trace = format!("00-4bf92f35-\n\"ü🎲%d'{}", "t".repeat(300));

    let before = now_ms();
    let first = traced("u", DELETED, EntryId::new(100, 0), &trace);
    assert_eq!(lobby.apply(&first).await.unwrap(), applied(3, &[]));
    let after = now_ms();
    let stored = lobby.cascade_record("u").await.unwrap().unwrap();
    let applied_at = stored.applied_at_ms.unwrap();
    assert!(
        (before..=after).contains(&applied_at),
        "applied_at_ms {applied_at} not within [{before}, {after}]"
    );
    assert_eq!(
        stored,
        CascadeRecord {
            trace_id: Some(trace.clone()),
            applied_at_ms: Some(applied_at),
            ..record(DELETED, "100-0", 3)
        }
    );
    assert_eq!(read_back(&lobby, &games).await, model(&games, "u", DELETED));

    // A replay, even with another trace id and later: nothing changes, not
    // even applied_at_ms (the record says when its entry was first applied).
    clock_past(applied_at);
    let settled = dump(&mut conn).await;
    for replay in [
        first.clone(),
        traced("u", DELETED, EntryId::new(100, 0), "another"),
        cascade("u", BLOCKED, EntryId::new(99, 0)),
    ] {
        assert_eq!(
            lobby.apply(&replay).await.unwrap(),
            CascadeOutcome::AlreadyApplied {
                recorded: EntryId::new(100, 0)
            }
        );
        assert_eq!(dump(&mut conn).await, settled, "{replay:?}");
    }

    // A newer entry without a trace id: the record describes it alone, with
    // no trace_id left from the older one, and a later applied_at_ms.
    lobby.put_game("g4", &rejoined_by("u")).await.unwrap();
    let before = now_ms();
    let newer = cascade("u", BLOCKED, EntryId::new(101, 0));
    assert_eq!(lobby.apply(&newer).await.unwrap(), applied(1, &[]));
    let after = now_ms();
    let stored = lobby.cascade_record("u").await.unwrap().unwrap();
    let applied_again = stored.applied_at_ms.unwrap();
    assert!(
        applied_again > applied_at && (before..=after).contains(&applied_again),
        "applied_at_ms {applied_again}: not after {applied_at} within [{before}, {after}]"
    );
    assert_eq!(
        stored,
        CascadeRecord {
            applied_at_ms: Some(applied_again),
            ..record(BLOCKED, "101-0", 1)
        }
    );
    assert_eq!(
        server.cli(&["HEXISTS", "lobby:user:u:cascade", "trace_id"]),
        "0"
    );

    // And a newer one with a trace id again.
    let newest = traced("u", DELETED, EntryId::new(102, 0), "t-3");
    assert_eq!(lobby.apply(&newest).await.unwrap(), applied(0, &[]));
    assert_eq!(
        server.cli(&["HGET", "lobby:user:u:cascade", "trace_id"]),
        "t-3"
    );

    // A user without games and an event without a trace id: no trace_id.
    lobby
        .apply(&cascade("v", DELETED, EntryId::new(5, 0)))
        .await
        .unwrap();
    let fields = server.cli(&["HKEYS", "lobby:user:v:cascade"]);
    assert!(!fields.lines().any(|field| field == "trace_id"), "{fields}");
    assert!(
        fields.lines().any(|field| field == "applied_at_ms"),
        "{fields}"
    );
    done(
        "the_record_keeps_the_trace_id_and_when_the_cascade_was_applied",
        started,
    );
}

/// A record written before trace ids and application times were kept reads
/// as one without them, keeps older entries out, and is replaced whole by a
/// newer cascade.
#[tokio::test]
async fn a_record_written_before_trace_ids_still_reads_and_guards() {
    let server = RedisServer::start();
    let lobby = store(&server, "lobby");
    let mut conn = connect(&server).await;
    server.cli(&[
        "HSET",
        "lobby:user:u:cascade",
        "event_type",
        DELETED,
        "entry_id",
        "100-0",
        "occurred_at_ms",
        &OCCURRED.to_string(),
        "games",
        "2",
    ]);
    assert_eq!(
        lobby.cascade_record("u").await.unwrap(),
        Some(record(DELETED, "100-0", 2)),
        "trace_id and applied_at_ms absent"
    );
    let before = dump(&mut conn).await;
    assert_eq!(
        lobby
            .apply(&traced("u", BLOCKED, EntryId::new(100, 0), "t"))
            .await
            .unwrap(),
        CascadeOutcome::AlreadyApplied {
            recorded: EntryId::new(100, 0)
        }
    );
    assert_eq!(
        dump(&mut conn).await,
        before,
        "an old record is not touched"
    );
    lobby
        .apply(&traced("u", BLOCKED, EntryId::new(100, 1), "t"))
        .await
        .unwrap();
    assert_eq!(
        record_of(&lobby, "u").await,
        Some(CascadeRecord {
            trace_id: Some("t".to_owned()),
            ..record(BLOCKED, "100-1", 0)
        })
    );
}

/// The grant the README documents (no `@fast`, so no `TIME`) is enough to
/// record a traced cascade and when it was applied: the time comes from the
/// worker, not from a command the grant lacks.
#[tokio::test]
async fn the_documented_acl_grant_records_a_traced_cascade() {
    let server = RedisServer::start();
    server.cli(&[
        "ACL",
        "SETUSER",
        "worker",
        "on",
        ">worker-pw",
        "~*",
        "+@read",
        "+@write",
        "+@scripting",
        "+@connection",
    ]);
    let url = format!("redis://worker:worker-pw@127.0.0.1:{}/", server.port());
    // Seeded as the default user: `put_game` (for tests and demos) uses
    // MULTI, which the grant lacks.
    store(&server, "lobby")
        .put_game("g", &rejoined_by("u"))
        .await
        .unwrap();
    let lobby = RedisLobbyStore::new(open_client(&url).unwrap(), "lobby").unwrap();
    let first = traced("u", DELETED, EntryId::new(1, 0), "t-1");
    assert_eq!(lobby.apply(&first).await.unwrap(), applied(1, &[]));
    // And a newer one without a trace id, which removes the older one's.
    let second = cascade("u", DELETED, EntryId::new(2, 0));
    assert_eq!(lobby.apply(&second).await.unwrap(), applied(0, &[]));
    assert_eq!(
        record_of(&lobby, "u").await,
        Some(record(DELETED, "2-0", 0))
    );
}

// ------------------------------------------------------ 10. bounded steps

/// `count` games in each of which "u" has a part: every status and every
/// role of the matrix in turn, other users beside.
fn big_lobby(count: usize) -> BTreeMap<String, Game> {
    (0..count)
        .map(|index| {
            let status = STATUSES[index % STATUSES.len()];
            let role = ROLES[(index / STATUSES.len()) % ROLES.len()];
            (format!("g{index}"), matrix_game(status, role))
        })
        .collect()
}

/// `put_lobby`, many games at a time.
async fn put_many(store: &RedisLobbyStore, lobby: &BTreeMap<String, Game>) {
    let games: Vec<(String, Game)> = lobby.clone().into_iter().collect();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in games.chunks(500) {
        let store = store.clone();
        let chunk = chunk.to_vec();
        tasks.spawn(async move {
            for (game_id, game) in chunk {
                store.put_game(&game_id, &game).await.unwrap();
            }
        });
    }
    while let Some(task) = tasks.join_next().await {
        task.unwrap();
    }
}

/// `read_back`, many games at a time.
async fn read_many(
    store: &RedisLobbyStore,
    lobby: &BTreeMap<String, Game>,
) -> BTreeMap<String, Game> {
    let game_ids: Vec<String> = lobby.keys().cloned().collect();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in game_ids.chunks(500) {
        let store = store.clone();
        let chunk = chunk.to_vec();
        tasks.spawn(async move {
            let mut out = Vec::new();
            for game_id in chunk {
                let game = store
                    .get_game(&game_id)
                    .await
                    .unwrap()
                    .unwrap_or_else(|| panic!("game {game_id:?} vanished"));
                out.push((game_id, game));
            }
            out
        });
    }
    let mut out = BTreeMap::new();
    while let Some(task) = tasks.join_next().await {
        out.extend(task.unwrap());
    }
    out
}

/// How many times Redis has run `command` (`INFO commandstats`, lower
/// case).
async fn calls(conn: &mut MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    let head = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(head.as_str()))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap())
}

/// The durations, in microseconds, of the script calls (`EVAL`, `EVALSHA`,
/// `FCALL`) in the slow log.
async fn script_durations(conn: &mut MultiplexedConnection) -> Vec<u64> {
    // Redis 7 logs the commands a script runs as well: tens of thousands of
    // entries to read.
    conn.set_response_timeout(std::time::Duration::from_secs(60));
    let entries: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query_async(conn)
        .await
        .unwrap();
    entries
        .iter()
        .filter_map(|entry| {
            let redis::Value::Array(fields) = entry else {
                return None;
            };
            let (Some(redis::Value::Int(micros)), Some(redis::Value::Array(args))) =
                (fields.get(2), fields.get(3))
            else {
                return None;
            };
            let Some(redis::Value::BulkString(name)) = args.first() else {
                return None;
            };
            let name = String::from_utf8_lossy(name).to_ascii_uppercase();
            matches!(name.as_str(), "EVAL" | "EVALSHA" | "FCALL").then(|| *micros as u64)
        })
        .collect()
}

/// The issue's case, scaled down: one script over a user's 20,000 games
/// holds Redis for about 200 ms; in pages, no script call comes near that,
/// and the lobby ends as the domain model says.
#[tokio::test]
async fn a_user_in_20000_games_never_holds_redis_for_long() {
    let started = Instant::now();
    let server = RedisServer::start();
    let lobby = store(&server, "lobby");
    let mut conn = connect(&server).await;
    let games = big_lobby(20_000);
    put_many(&lobby, &games).await;
    assert_eq!(lobby.user_games("u").await.unwrap().len(), 20_000);
    server.cli(&["CONFIG", "SET", "slowlog-max-len", "1000000"]);
    server.cli(&["CONFIG", "SET", "slowlog-log-slower-than", "0"]);
    server.cli(&["SLOWLOG", "RESET"]);

    let cascaded = Instant::now();
    let outcome = lobby
        .apply(&cascade("u", DELETED, EntryId::new(100, 0)))
        .await
        .unwrap();
    let took = cascaded.elapsed();
    let scripts = script_durations(&mut conn).await;
    server.cli(&["CONFIG", "SET", "slowlog-log-slower-than", "10000"]);
    let mut sorted_scripts = scripts.clone();
    sorted_scripts.sort_unstable();
    let at =
        |quantile: f64| sorted_scripts[((sorted_scripts.len() - 1) as f64 * quantile) as usize];
    let longest = sorted_scripts.last().copied().unwrap_or_default();
    println!(
        "{} script calls in {took:?} ({} µs in scripts): median {} µs, p99 {} µs, the longest {longest} µs",
        scripts.len(),
        scripts.iter().sum::<u64>(),
        at(0.5),
        at(0.99),
    );
    assert!(
        longest < 50_000,
        "a script call held Redis for {longest} µs"
    );
    assert!(
        scripts.len() >= 20_000 / lifecycle_redis::lobby::DEFAULT_PAGE_GAMES,
        "walked a page per call: {} calls",
        scripts.len()
    );

    assert_eq!(sorted(outcome), expected_outcome(&games, "u"));
    assert_eq!(read_many(&lobby, &games).await, model(&games, "u", DELETED));
    assert!(!exists(&mut conn, "lobby:user:u:games").await);
    assert_eq!(
        record_of(&lobby, "u").await,
        Some(record(DELETED, "100-0", 20_000))
    );
    done("a_user_in_20000_games_never_holds_redis_for_long", started);
}

/// The common case stays one call: a user with at most a page of games is
/// handled by one script call, no scan; one more game and the index is
/// walked.
#[tokio::test]
async fn a_user_with_at_most_a_page_of_games_costs_one_script_call() {
    let server = RedisServer::start();
    let lobby = store(&server, "lobby").with_page_size(3);
    let mut conn = connect(&server).await;
    let games = small_lobby();
    put_lobby(&lobby, &games).await;
    // Loads the script, so that the count below is the cascade's alone.
    lobby
        .apply(&cascade("nobody", DELETED, EntryId::new(1, 0)))
        .await
        .unwrap();
    server.cli(&["CONFIG", "RESETSTAT"]);
    assert_eq!(
        lobby
            .apply(&cascade("u", DELETED, EntryId::new(100, 0)))
            .await
            .unwrap(),
        applied(3, &[])
    );
    assert_eq!(calls(&mut conn, "evalsha").await, 1);
    assert_eq!(calls(&mut conn, "sscan").await, 0);
    assert_eq!(read_back(&lobby, &games).await, model(&games, "u", DELETED));

    // A page and one more: the finishing call declines, the index is
    // walked, the finishing call ends it.
    server.cli(&["FLUSHALL"]);
    let mut four = small_lobby();
    four.insert("g4".to_owned(), rejoined_by("u"));
    put_lobby(&lobby, &four).await;
    server.cli(&["CONFIG", "RESETSTAT"]);
    assert_eq!(
        lobby
            .apply(&cascade("u", DELETED, EntryId::new(100, 0)))
            .await
            .unwrap(),
        applied(4, &[])
    );
    assert!(calls(&mut conn, "sscan").await >= 1);
    assert!(
        calls(&mut conn, "evalsha").await >= 4,
        "finish, 2 pages, finish"
    );
    assert_eq!(read_back(&lobby, &four).await, model(&four, "u", DELETED));
    assert!(!exists(&mut conn, "lobby:user:u:games").await);
    assert_eq!(
        record_of(&lobby, "u").await,
        Some(record(DELETED, "100-0", 4))
    );
}

/// Adds game `ARGV[1]` (open, owned by "o", "u" a member) to the lobby and
/// to "u"'s index in one atomic step, unless "u"'s cascade is recorded
/// (then 0): a lobby adding games while the cascade runs, every game it
/// adds added before the cascade ended.
const ADD_UNLESS_RECORDED: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[2], 'owner_id', 'o', 'status', 'open')
redis.call('SADD', KEYS[3], 'o', 'u')
redis.call('SADD', KEYS[4], ARGV[1])
return 1
";

#[tokio::test]
async fn games_added_while_a_cascade_runs_are_handled_too() {
    let started = Instant::now();
    let server = RedisServer::start();
    let lobby = store(&server, "lobby").with_page_size(25);
    let mut conn = connect(&server).await;
    let games = big_lobby(3_000);
    put_many(&lobby, &games).await;

    let adder = {
        let mut conn = connect(&server).await;
        tokio::spawn(async move {
            let script = redis::Script::new(ADD_UNLESS_RECORDED);
            let mut added = Vec::new();
            // At most a game a millisecond, fewer than the cascade handles,
            // so that it ends.
            for index in 0..5_000 {
                let id = format!("new{index}");
                let done: i64 = script
                    .key("lobby:user:u:cascade")
                    .key(format!("lobby:game:{id}"))
                    .key(format!("lobby:game:{id}:members"))
                    .key("lobby:user:u:games")
                    .arg(&id)
                    .invoke_async(&mut conn)
                    .await
                    .unwrap();
                if done == 0 {
                    break;
                }
                added.push(id);
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            added
        })
    };
    let outcome = lobby
        .apply(&cascade("u", DELETED, EntryId::new(100, 0)))
        .await
        .unwrap();
    let added = adder.await.unwrap();
    println!(
        "{} games added while the cascade ran; {} SSCANs, {} script calls",
        added.len(),
        calls(&mut conn, "sscan").await,
        calls(&mut conn, "evalsha").await
    );
    assert!(!added.is_empty() && added.len() < 5_000);

    for game_id in &added {
        let game = lobby.get_game(game_id).await.unwrap().unwrap();
        assert_eq!(game.members, ids(&["o"]), "{game_id} left behind");
        assert_eq!(game.status, Some(GameStatus::Open));
    }
    assert_eq!(read_many(&lobby, &games).await, model(&games, "u", DELETED));
    // Every game added went in before the record: none is left indexed.
    assert!(!exists(&mut conn, "lobby:user:u:games").await);
    let total = 3_000 + added.len() as u64;
    let CascadeOutcome::Applied { games: counted, .. } = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(counted, total);
    assert_eq!(
        record_of(&lobby, "u").await,
        Some(record(DELETED, "100-0", total))
    );
    done("games_added_while_a_cascade_runs_are_handled_too", started);
}

/// A crash in the middle of a large cascade (here: the cascade's task
/// dropped after a few pages) leaves the games done so far done, the index
/// whole and no record; the replay of the event completes it.
#[tokio::test]
async fn a_cascade_cut_off_midway_is_completed_by_its_replay() {
    let started = Instant::now();
    let server = RedisServer::start();
    let lobby = store(&server, "lobby").with_page_size(10);
    let mut conn = connect(&server).await;
    let games = big_lobby(2_000);
    put_many(&lobby, &games).await;
    let expected = model(&games, "u", DELETED);
    let entry = EntryId::new(100, 0);
    server.cli(&["CONFIG", "RESETSTAT"]);

    let task = {
        let lobby = lobby.clone();
        tokio::spawn(async move { lobby.apply(&cascade("u", DELETED, entry)).await })
    };
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while calls(&mut conn, "evalsha").await < 5 {
        assert!(Instant::now() < deadline, "no page applied");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    task.abort();
    assert!(task.await.is_err(), "cut off before it ended");
    // The call in flight, if any, runs to its end on Redis.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;

    assert_eq!(record_of(&lobby, "u").await, None);
    assert_eq!(
        lobby.user_games("u").await.unwrap().len(),
        2_000,
        "the index is whole until every game is done"
    );
    let partial = read_many(&lobby, &games).await;
    let changed = partial
        .iter()
        .filter(|(game_id, game)| **game != games[*game_id])
        .count();
    assert!(changed > 0, "some games were done");
    assert_ne!(partial, expected, "not all of them");
    for (game_id, game) in &partial {
        assert!(
            *game == games[game_id] || *game == expected[game_id],
            "{game_id} is half done: {game:?}"
        );
    }

    let outcome = lobby.apply(&cascade("u", DELETED, entry)).await.unwrap();
    assert_eq!(sorted(outcome), expected_outcome(&games, "u"));
    assert_eq!(read_many(&lobby, &games).await, expected);
    assert!(!exists(&mut conn, "lobby:user:u:games").await);
    assert_eq!(
        record_of(&lobby, "u").await,
        Some(record(DELETED, "100-0", 2_000))
    );
    assert_eq!(
        lobby.apply(&cascade("u", DELETED, entry)).await.unwrap(),
        CascadeOutcome::AlreadyApplied { recorded: entry }
    );
    done(
        "a_cascade_cut_off_midway_is_completed_by_its_replay",
        started,
    );
}

/// In a walked cascade a key of the wrong type fails the page that meets
/// it, undone; the pages before stay done, the index whole and the record
/// unwritten, so the retry after the repair completes the cascade.
#[tokio::test]
async fn a_key_of_the_wrong_type_stops_a_paged_cascade_until_repaired() {
    let server = RedisServer::start();
    let lobby = store(&server, "lobby").with_page_size(1);
    let mut conn = connect(&server).await;
    let games = small_lobby();
    put_lobby(&lobby, &games).await;
    server.cli(&["SET", "lobby:game:g2:members", "oops"]);
    let entry = EntryId::new(100, 0);

    let err = lobby
        .apply(&cascade("u", DELETED, entry))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("lobby:game:g2:members") && text.contains("WRONGTYPE"),
        "{text}"
    );
    assert!(err.permanent, "{text}");
    assert_eq!(
        server.cli(&["SISMEMBER", "lobby:game:g2:invitees", "u"]),
        "1",
        "the failing page is undone"
    );
    assert_eq!(
        lobby.user_games("u").await.unwrap(),
        ids(&["g1", "g2", "g3"])
    );
    assert_eq!(record_of(&lobby, "u").await, None);

    server.cli(&["DEL", "lobby:game:g2:members"]);
    server.cli(&["SADD", "lobby:game:g2:members", "o", "u"]);
    assert_eq!(
        lobby.apply(&cascade("u", DELETED, entry)).await.unwrap(),
        applied(3, &[])
    );
    assert_eq!(read_back(&lobby, &games).await, model(&games, "u", DELETED));
    assert!(!exists(&mut conn, "lobby:user:u:games").await);
    assert_eq!(
        record_of(&lobby, "u").await,
        Some(record(DELETED, "100-0", 3))
    );
}
