//! Stress: the lost cascade.
//!
//! A cascade-heavy `lobby-worker run --drain` against a private redis-server
//! on append-only persistence that is SIGKILLed and restarted several times
//! during the drain; after each run the lobby is compared with the domain
//! model. Repeats it with `appendfsync always` and `everysec` and says, per
//! mode, how many runs lost a cascade, and why.
//!
//! Run on demand, outside CI (several seconds per run):
//!
//! ```sh
//! cargo build --release -p lobby-worker --bin lobby-worker --example lost_cascade
//! target/release/examples/lost_cascade --runs 30 --fsync both --keep-logs /tmp/lost-cascade
//! ```
//!
//! Each run: a fresh redis-server (`--appendonly yes --appendfsync MODE`) on a
//! free 127.0.0.1 port in a temporary directory; a seeded random lobby
//! (`--users`, `--games`; memberships, applications, invitations, owners, a
//! few index entries of games that no longer exist) and `--events` events
//! (deletions and permanent blocks, some users twice, a few of an unknown
//! type); the release `lobby-worker run --drain --concurrency 64`; `--kills`
//! SIGKILLs of Redis at random points of the drain, each followed by a
//! restart (the worker is started again whenever it exits before the stream
//! is drained). When drained, every key of the lobby is compared with the
//! model built from the domain's own rules ([`Game::apply_cascade`]) over the
//! events up to the final offset.
//!
//! Evidence gathered at every kill, from the outside:
//!
//! - just before the SIGKILL, one pipeline reads every event user's cascade
//!   record, the stored offset and `INFO persistence commandstats`
//!   (`aof_buffer_length`: bytes of executed writes not yet written to the
//!   AOF; `aof_pending_bio_fsync`; `cmdstat_set`: the offset saves executed,
//!   the save script's `SET` being the only one in the lobby). Redis sends
//!   the replies of an event-loop turn after that turn's AOF step (a write,
//!   and with `always` an fsync; with `everysec` the write may be postponed
//!   while a background fsync runs), so what this pipeline sees had been
//!   answered to the writer too;
//! - after the restart, the same reads: a record seen before the kill and
//!   gone after it is an acknowledged write Redis lost;
//! - the worker's log position at the kill: its `cascade applied` lines
//!   (debug level of `lifecycle_redis`, written once Redis answered the
//!   cascade script) since the previous kill are checked against the
//!   restarted Redis, which gives the acknowledged cascades it lost;
//! - after the run, the AOF: a restarted Redis appends to the same file and
//!   starts with a `SELECT`, so the file tells, per Redis process, its offset
//!   saves: the offset each restart reloaded, whether a save Redis had
//!   executed was lost (`cmdstat_set` against the saves in the file), and
//!   which later save moved the offset past the lost cascades;
//! - the lines `redis.log` wrote while reloading the AOF.
//!
//! Options for finding the cause: `--kill-while-fsync-pending` (each kill
//! waits, up to 3 s, for a background fsync in flight with writes buffered
//! behind it), `--disk-noise MIB` (a thread writing and syncing a file beside
//! Redis's directory during the drain, so that fsyncs are slow) and
//! `--restart-worker-with-redis`, the control experiment: the worker is
//! SIGKILLed with Redis and started again once Redis is back, so it resumes
//! from the offset Redis still has, as the engine would if it went back to
//! the stored offset after Redis restarted.
//!
//! With `--keep-logs DIR`, a failing run keeps, in `DIR/<mode>-<run>-seed<S>/`,
//! the worker logs, `redis.log`, the AOF directory, `diff.txt` (lobby versus
//! model), `kills.txt` (the evidence above) and `report.txt`; `--keep-all`
//! keeps passing runs too.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::too_many_lines
)]

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use lifecycle_domain::{EntryId, Game, GameStatus};
use lifecycle_test_support::{RedisServer, RedisServerOptions};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use redis::Value;

const STREAM: &str = "user:lifecycle_events";
const OFFSET_KEY: &str = "lobby:stream_offsets:user_lifecycle";
const STATUSES: [&str; 4] = ["open", "running", "finished", "cancelled"];
/// Commands per pipelined round trip.
const PER_ROUND_TRIP: usize = 4000;
/// How often the driver polls the stored offset and the worker.
const POLL: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum FsyncArg {
    Always,
    Everysec,
    Both,
}

#[derive(Debug, Parser)]
#[command(
    name = "lost_cascade",
    about = "Stress: a cascade-heavy drain while Redis (append-only) is SIGKILLed and restarted; lobby compared with the model after each run"
)]
struct Args {
    /// Runs per fsync mode (with `both`, the modes alternate run by run).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// `appendfsync` of the private redis-server.
    #[arg(long, value_enum, default_value_t = FsyncArg::Both)]
    fsync: FsyncArg,
    /// SIGKILL + restart of Redis per run, at random points of the drain.
    #[arg(long, default_value_t = 4)]
    kills: usize,
    #[arg(long, default_value_t = 20_000)]
    users: usize,
    #[arg(long, default_value_t = 30_000)]
    games: usize,
    #[arg(long, default_value_t = 15_200)]
    events: usize,
    /// The worker's `--concurrency`.
    #[arg(long, default_value_t = 64)]
    concurrency: u32,
    /// Keep the logs, AOF and diff of failing runs under this directory.
    #[arg(long)]
    keep_logs: Option<PathBuf>,
    /// Keep passing runs' logs too (with --keep-logs).
    #[arg(long)]
    keep_all: bool,
    /// Seed of the first run (run i uses seed + i); default from the clock.
    #[arg(long)]
    seed: Option<u64>,
    /// Longest a run may take before it is abandoned (seconds).
    #[arg(long, default_value_t = 240)]
    run_timeout: u64,
    /// The `lobby-worker` binary (default: next to this example's directory,
    /// i.e. target/release/lobby-worker).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// Control experiment: SIGKILL the worker with Redis and start it again
    /// once Redis is back (it resumes from the offset Redis still has).
    #[arg(long)]
    restart_worker_with_redis: bool,
    /// Time each kill for when Redis has a background AOF fsync in flight
    /// and writes in its AOF buffer (`aof_pending_bio_fsync:1`,
    /// `aof_buffer_length` > 0, polled for up to 3 s): the moments an
    /// `everysec` server holds back the AOF write of what it acknowledges.
    #[arg(long)]
    kill_while_fsync_pending: bool,
    /// A noisy neighbour on Redis's disk during the drain: a thread that
    /// writes this many MiB to a file beside Redis's directory and
    /// `fdatasync`s it, over and over (0: none). Slow fsyncs are what make an
    /// `everysec` server hold back its AOF writes.
    #[arg(long, default_value_t = 0)]
    disk_noise: u64,
}

// ---------------------------------------------------------------------------
// The lobby and the events
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Event {
    user: usize,
    event_type: &'static str,
    occurred_at_ms: i64,
}

impl Event {
    fn known(&self) -> bool {
        matches!(self.event_type, "user.deleted" | "user.permanently_blocked")
    }
}

struct Lobby {
    users: Vec<String>,
    /// Seeded games, in id order `g0..`.
    games: Vec<(String, Game)>,
    /// Every user's seeded index (`lobby:user:<u>:games`), dangling ids included.
    index: Vec<BTreeSet<String>>,
    events: Vec<Event>,
    /// Users with at least one event, sorted.
    event_users: Vec<usize>,
}

/// A random lobby: each game has an owner, up to five players, pending
/// applications and invitations; 1% of the users' indexes name a game that
/// no longer exists. Events: one per chosen user (deleted or blocked), 4%
/// second events of the other type, 1% of an unknown type; shuffled.
fn generate(seed: u64, users: usize, games: usize, events: usize) -> Lobby {
    let mut rng = StdRng::seed_from_u64(seed);
    let user_ids: Vec<String> = (0..users).map(|i| format!("u{i}")).collect();
    let mut index = vec![BTreeSet::new(); users];
    let mut seeded = Vec::with_capacity(games);
    for g in 0..games {
        let id = format!("g{g}");
        let status = STATUSES[rng.random_range(0..STATUSES.len())];
        let owner = rng.random_range(0..users);
        let mut members = BTreeSet::new();
        if rng.random_bool(0.85) {
            members.insert(owner);
        }
        for _ in 0..rng.random_range(0..=4) {
            members.insert(rng.random_range(0..users));
        }
        let mut pending = |count: usize| -> BTreeSet<usize> {
            (0..count)
                .map(|_| rng.random_range(0..users))
                .filter(|user| !members.contains(user))
                .collect()
        };
        let applicants = pending(if status == "open" { 2 } else { 1 });
        let invitees = pending(1);
        for user in members
            .iter()
            .chain(&applicants)
            .chain(&invitees)
            .chain([&owner])
        {
            index[*user].insert(id.clone());
        }
        let names = |set: &BTreeSet<usize>| set.iter().map(|u| user_ids[*u].clone()).collect();
        seeded.push((
            id,
            Game {
                status: Some(GameStatus::parse(status)),
                owner_id: user_ids[owner].clone(),
                cancel_reason: (status == "cancelled").then(|| "owner left".to_owned()),
                members: names(&members),
                applicants: names(&applicants),
                invitees: names(&invitees),
                dropped: BTreeSet::new(),
            },
        ));
    }
    for (user, games) in index.iter_mut().enumerate() {
        if rng.random_bool(0.01) {
            games.insert(format!("gone{user}"));
        }
    }
    let unknown = events / 100;
    let repeats = events / 25;
    let first = (events - unknown - repeats).min(users);
    let mut order: Vec<usize> = (0..users).collect();
    order.shuffle(&mut rng);
    let chosen = &order[..first];
    let mut list: Vec<(usize, &'static str)> = Vec::with_capacity(events);
    for &user in chosen {
        let kind = if rng.random_bool(0.85) {
            "user.deleted"
        } else {
            "user.permanently_blocked"
        };
        list.push((user, kind));
    }
    for _ in 0..repeats.min(first) {
        let user = chosen[rng.random_range(0..first)];
        let kind = if rng.random_bool(0.5) {
            "user.deleted"
        } else {
            "user.permanently_blocked"
        };
        list.push((user, kind));
    }
    for _ in 0..unknown {
        list.push((rng.random_range(0..users), "user.renamed"));
    }
    list.shuffle(&mut rng);
    let events: Vec<Event> = list
        .into_iter()
        .enumerate()
        .map(|(i, (user, event_type))| Event {
            user,
            event_type,
            occurred_at_ms: 1_700_000_000_000 + i as i64,
        })
        .collect();
    let event_users: BTreeSet<usize> = events.iter().map(|event| event.user).collect();
    Lobby {
        users: user_ids,
        games: seeded,
        index,
        events,
        event_users: event_users.into_iter().collect(),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    entry_id: String,
    event_type: String,
    occurred_at_ms: String,
    games: String,
}

/// What the lobby must be once the events up to `ids[..handled]` are done.
struct Expected {
    games: Vec<Game>,
    index: Vec<BTreeSet<String>>,
    records: Vec<Option<Record>>,
}

impl Lobby {
    /// The model: the domain's rules applied, in stream order, for every
    /// known event among the first `handled`.
    fn expected(&self, ids: &[EntryId], handled: usize) -> Expected {
        let position: HashMap<&str, usize> = self
            .games
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (id.as_str(), i))
            .collect();
        let mut games: Vec<Game> = self.games.iter().map(|(_, game)| game.clone()).collect();
        let mut index = self.index.clone();
        let mut records: Vec<Option<Record>> = vec![None; self.users.len()];
        for (event, id) in self.events.iter().zip(ids).take(handled) {
            if !event.known() {
                continue;
            }
            let user = &self.users[event.user];
            let mut touched = 0;
            for game_id in std::mem::take(&mut index[event.user]) {
                if let Some(&at) = position.get(game_id.as_str()) {
                    games[at].apply_cascade(user, event.event_type);
                    touched += 1;
                }
            }
            records[event.user] = Some(Record {
                entry_id: id.to_string(),
                event_type: event.event_type.to_owned(),
                occurred_at_ms: event.occurred_at_ms.to_string(),
                games: touched.to_string(),
            });
        }
        Expected {
            games,
            index,
            records,
        }
    }
}

// ---------------------------------------------------------------------------
// Redis from the driver's side
// ---------------------------------------------------------------------------

fn connect(url: &str) -> Result<redis::Connection> {
    let conn = redis::Client::open(url)?
        .get_connection_with_timeout(Duration::from_secs(2))
        .with_context(|| format!("cannot connect to {url}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    conn.set_write_timeout(Some(Duration::from_secs(30)))?;
    Ok(conn)
}

/// Runs `commands` in pipelines of [`PER_ROUND_TRIP`]; their replies.
fn pipelined<T: redis::FromRedisValue>(
    conn: &mut redis::Connection,
    commands: impl IntoIterator<Item = redis::Cmd>,
) -> Result<Vec<T>> {
    let mut replies = Vec::new();
    let mut pipe = redis::pipe();
    let mut queued = 0;
    for command in commands {
        pipe.add_command(command);
        queued += 1;
        if queued == PER_ROUND_TRIP {
            replies.extend(pipe.query::<Vec<T>>(conn)?);
            pipe = redis::pipe();
            queued = 0;
        }
    }
    if queued > 0 {
        replies.extend(pipe.query::<Vec<T>>(conn)?);
    }
    Ok(replies)
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(raw) => Some(String::from_utf8_lossy(raw).into_owned()),
        Value::SimpleString(text) => Some(text.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(number) => Some(number.to_string()),
        _ => None,
    }
}

fn info_fields(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_owned(), value.trim().to_owned()))
        .collect()
}

/// `calls=` of `cmdstat_<command>` in `INFO commandstats` fields (0 when
/// the command was never called).
fn command_calls(fields: &HashMap<String, String>, command: &str) -> Option<u64> {
    if !fields.keys().any(|name| name.starts_with("cmdstat_")) {
        return None;
    }
    Some(
        fields
            .get(&format!("cmdstat_{command}"))
            .and_then(|value| {
                value
                    .split(',')
                    .find_map(|field| field.strip_prefix("calls="))
            })
            .and_then(|calls| calls.parse().ok())
            .unwrap_or(0),
    )
}

fn parse_id(text: &str) -> Option<EntryId> {
    text.parse().ok()
}

fn seed_lobby(conn: &mut redis::Connection, lobby: &Lobby) -> Result<Vec<EntryId>> {
    let mut commands = Vec::new();
    for (id, game) in &lobby.games {
        let key = format!("lobby:game:{id}");
        let mut hset = redis::cmd("HSET");
        hset.arg(&key).arg("owner_id").arg(&game.owner_id);
        if let Some(status) = &game.status {
            hset.arg("status").arg(status.as_str());
        }
        if let Some(reason) = &game.cancel_reason {
            hset.arg("cancel_reason").arg(reason);
        }
        commands.push(hset);
        for (suffix, set) in [
            ("members", &game.members),
            ("applicants", &game.applicants),
            ("invitees", &game.invitees),
        ] {
            if !set.is_empty() {
                let mut sadd = redis::cmd("SADD");
                sadd.arg(format!("{key}:{suffix}"))
                    .arg(set.iter().collect::<Vec<_>>());
                commands.push(sadd);
            }
        }
    }
    for (user, games) in lobby.users.iter().zip(&lobby.index) {
        if !games.is_empty() {
            let mut sadd = redis::cmd("SADD");
            sadd.arg(format!("lobby:user:{user}:games"))
                .arg(games.iter().collect::<Vec<_>>());
            commands.push(sadd);
        }
    }
    let _: Vec<Value> = pipelined(conn, commands)?;
    let xadds = lobby.events.iter().map(|event| {
        let mut xadd = redis::cmd("XADD");
        xadd.arg(STREAM)
            .arg("*")
            .arg("event_type")
            .arg(event.event_type)
            .arg("user_id")
            .arg(&lobby.users[event.user])
            .arg("occurred_at_ms")
            .arg(event.occurred_at_ms)
            .arg("source")
            .arg("lost_cascade");
        xadd
    });
    let ids: Vec<String> = pipelined(conn, xadds)?;
    ids.iter()
        .map(|id| parse_id(id).with_context(|| format!("XADD returned {id:?}")))
        .collect()
}

/// Waits until every write so far is in the AOF file (nothing buffered, no
/// fsync pending), so that the seed survives the first SIGKILL in either mode.
fn wait_persisted(conn: &mut redis::Connection) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut quiet = 0;
    while quiet < 3 {
        let info: String = redis::cmd("INFO").arg("persistence").query(conn)?;
        let fields = info_fields(&info);
        let settled = fields.get("aof_buffer_length").map(String::as_str) == Some("0")
            && fields.get("aof_pending_bio_fsync").map(String::as_str) == Some("0")
            && fields.get("aof_rewrite_in_progress").map(String::as_str) == Some("0");
        quiet = if settled { quiet + 1 } else { 0 };
        if Instant::now() > deadline {
            bail!("the seed was not persisted within 30s: {info}");
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// What one pipeline sees: the stream's length, every event user's recorded
/// entry, then the offset and `INFO persistence commandstats`.
struct Snapshot {
    offset: Option<EntryId>,
    records: Vec<Option<EntryId>>,
    persistence: HashMap<String, String>,
    xlen: u64,
}

fn snapshot(conn: &mut redis::Connection, lobby: &Lobby) -> Result<Snapshot> {
    let mut pipe = redis::pipe();
    pipe.cmd("XLEN").arg(STREAM);
    for &user in &lobby.event_users {
        pipe.cmd("HGET")
            .arg(format!("lobby:user:{}:cascade", lobby.users[user]))
            .arg("entry_id");
    }
    pipe.cmd("GET").arg(OFFSET_KEY);
    pipe.cmd("INFO").arg("persistence").arg("commandstats");
    let replies: Vec<Value> = pipe.query(conn)?;
    let n = lobby.event_users.len();
    Ok(Snapshot {
        xlen: text(&replies[0])
            .and_then(|len| len.parse().ok())
            .unwrap_or(0),
        records: replies[1..=n]
            .iter()
            .map(|value| text(value).and_then(|id| parse_id(&id)))
            .collect(),
        offset: text(&replies[n + 1]).and_then(|id| parse_id(&id)),
        persistence: info_fields(&text(&replies[n + 2]).unwrap_or_default()),
    })
}

/// The lobby as Redis has it, in the model's shape.
fn read_lobby(conn: &mut redis::Connection, lobby: &Lobby) -> Result<Expected> {
    let game_keys: Vec<String> = lobby
        .games
        .iter()
        .map(|(id, _)| format!("lobby:game:{id}"))
        .collect();
    let hashes: Vec<HashMap<String, String>> = pipelined(
        conn,
        game_keys.iter().map(|key| {
            let mut cmd = redis::cmd("HGETALL");
            cmd.arg(key);
            cmd
        }),
    )?;
    let mut sets: Vec<Vec<BTreeSet<String>>> = Vec::new();
    for suffix in ["members", "applicants", "invitees", "dropped"] {
        sets.push(pipelined(
            conn,
            game_keys.iter().map(|key| {
                let mut cmd = redis::cmd("SMEMBERS");
                cmd.arg(format!("{key}:{suffix}"));
                cmd
            }),
        )?);
    }
    let games = hashes
        .into_iter()
        .enumerate()
        .map(|(i, hash)| Game {
            status: hash.get("status").map(|status| GameStatus::parse(status)),
            owner_id: hash.get("owner_id").cloned().unwrap_or_default(),
            cancel_reason: hash.get("cancel_reason").cloned(),
            members: sets[0][i].clone(),
            applicants: sets[1][i].clone(),
            invitees: sets[2][i].clone(),
            dropped: sets[3][i].clone(),
        })
        .collect();
    let index: Vec<BTreeSet<String>> = pipelined(
        conn,
        lobby.users.iter().map(|user| {
            let mut cmd = redis::cmd("SMEMBERS");
            cmd.arg(format!("lobby:user:{user}:games"));
            cmd
        }),
    )?;
    let hashes: Vec<HashMap<String, String>> = pipelined(
        conn,
        lobby.users.iter().map(|user| {
            let mut cmd = redis::cmd("HGETALL");
            cmd.arg(format!("lobby:user:{user}:cascade"));
            cmd
        }),
    )?;
    let records = hashes
        .into_iter()
        .map(|hash| {
            (!hash.is_empty()).then(|| {
                let field = |name: &str| hash.get(name).cloned().unwrap_or_default();
                Record {
                    entry_id: field("entry_id"),
                    event_type: field("event_type"),
                    occurred_at_ms: field("occurred_at_ms"),
                    games: field("games"),
                }
            })
        })
        .collect();
    Ok(Expected {
        games,
        index,
        records,
    })
}

/// Differences between the lobby and the model, and the users they concern
/// (user index -> what is wrong).
fn compare(
    lobby: &Lobby,
    expected: &Expected,
    actual: &Expected,
) -> (Vec<String>, HashMap<usize, Vec<String>>) {
    let by_name: HashMap<&str, usize> = lobby
        .users
        .iter()
        .enumerate()
        .map(|(i, name)| (name.as_str(), i))
        .collect();
    let mut lines = Vec::new();
    let mut users: HashMap<usize, Vec<String>> = HashMap::new();
    let mut blame = |name: &str, what: String, lines: &mut Vec<String>| {
        lines.push(what.clone());
        if let Some(&user) = by_name.get(name) {
            users.entry(user).or_default().push(what);
        }
    };
    for ((id, _), (want, got)) in lobby
        .games
        .iter()
        .zip(expected.games.iter().zip(&actual.games))
    {
        if want.status != got.status || want.cancel_reason != got.cancel_reason {
            blame(
                &want.owner_id,
                format!(
                    "game {id}: status {:?} cancel_reason {:?}, expected {:?} {:?} (owner {})",
                    got.status.as_ref().map(GameStatus::as_str),
                    got.cancel_reason,
                    want.status.as_ref().map(GameStatus::as_str),
                    want.cancel_reason,
                    want.owner_id
                ),
                &mut lines,
            );
        }
        for (role, w, g) in [
            ("members", &want.members, &got.members),
            ("applicants", &want.applicants, &got.applicants),
            ("invitees", &want.invitees, &got.invitees),
            ("dropped", &want.dropped, &got.dropped),
        ] {
            for user in g.difference(w) {
                blame(
                    user,
                    format!("game {id}: {user} is among the {role}, expected not"),
                    &mut lines,
                );
            }
            for user in w.difference(g) {
                blame(
                    user,
                    format!("game {id}: {user} is not among the {role}, expected to be"),
                    &mut lines,
                );
            }
        }
    }
    for (user, name) in lobby.users.iter().enumerate() {
        if expected.index[user] != actual.index[user] {
            blame(
                name,
                format!(
                    "user {name}: index {:?}, expected {:?}",
                    actual.index[user], expected.index[user]
                ),
                &mut lines,
            );
        }
        if expected.records[user] != actual.records[user] {
            blame(
                name,
                format!(
                    "user {name}: cascade record {:?}, expected {:?}",
                    actual.records[user], expected.records[user]
                ),
                &mut lines,
            );
        }
    }
    (lines, users)
}

// ---------------------------------------------------------------------------
// The AOF: what each Redis process wrote
// ---------------------------------------------------------------------------

/// The offset saves in the append-only file, one list per Redis process:
/// a restarted Redis appends to the same file, and the first write of each
/// process is preceded by a `SELECT`. `None` when the layout is not the
/// simple one (an AOF rewrite made a base with data, or several files).
fn aof_saves(dir: &Path) -> Option<Vec<Vec<EntryId>>> {
    let mut incr = Vec::new();
    for entry in fs::read_dir(dir).ok()? {
        let path = entry.ok()?.path();
        let name = path.file_name()?.to_string_lossy().into_owned();
        if name.ends_with(".incr.aof") {
            incr.push(path);
        } else if name.contains(".base.") && file_len(&path) > 1024 {
            return None;
        }
    }
    let [file] = incr.as_slice() else {
        return None;
    };
    let data = fs::read(file).ok()?;
    let mut segments: Vec<Vec<EntryId>> = Vec::new();
    let mut at = 0;
    while let Some((args, next)) = resp_array(&data, at) {
        at = next;
        match args.as_slice() {
            [name, ..] if name.eq_ignore_ascii_case(b"SELECT") => segments.push(Vec::new()),
            [name, key, value]
                if name.eq_ignore_ascii_case(b"SET") && *key == OFFSET_KEY.as_bytes() =>
            {
                if let Ok(id) = EntryId::from_bytes(value) {
                    if segments.is_empty() {
                        segments.push(Vec::new());
                    }
                    segments.last_mut()?.push(id);
                }
            }
            _ => {}
        }
    }
    Some(segments)
}

/// One RESP array of bulk strings at `at`: its items and where the next
/// starts; `None` at the end or on a truncated tail.
fn resp_array(data: &[u8], at: usize) -> Option<(Vec<&[u8]>, usize)> {
    let line = |from: usize| -> Option<(usize, usize)> {
        let end = from + data.get(from..)?.windows(2).position(|w| w == b"\r\n")?;
        let number = std::str::from_utf8(data.get(from + 1..end)?)
            .ok()?
            .parse()
            .ok()?;
        Some((number, end + 2))
    };
    if data.get(at) != Some(&b'*') {
        return None;
    }
    let (count, mut next) = line(at)?;
    let mut args = Vec::with_capacity(count);
    for _ in 0..count {
        if data.get(next) != Some(&b'$') {
            return None;
        }
        let (len, start) = line(next)?;
        args.push(data.get(start..start + len)?);
        next = start + len + 2;
    }
    Some((args, next))
}

// ---------------------------------------------------------------------------
// A noisy neighbour on the disk
// ---------------------------------------------------------------------------

/// A thread writing and syncing a file until dropped.
struct DiskNoise {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DiskNoise {
    fn start(path: PathBuf, mib: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let chunk = vec![0x5a_u8; 1 << 20];
            while !stopping.load(Ordering::Relaxed) {
                let Ok(mut file) = File::create(&path) else {
                    return;
                };
                for _ in 0..mib {
                    if stopping.load(Ordering::Relaxed) || file.write_all(&chunk).is_err() {
                        break;
                    }
                }
                let _ = file.sync_data();
            }
            let _ = fs::remove_file(&path);
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for DiskNoise {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------
// One run
// ---------------------------------------------------------------------------

/// What one kill of Redis showed.
#[derive(Debug, Default)]
struct Kill {
    number: usize,
    progress: f64,
    wall: String,
    offset_before: Option<EntryId>,
    /// The offset read right after the restart (the worker may already have
    /// saved on the restarted Redis by then).
    offset_after: Option<EntryId>,
    /// From the AOF after the run: the offset the restart reloaded (the last
    /// save in the file up to this kill) and the first save the restarted
    /// Redis executed; `aof_known` false when the AOF was rewritten.
    offset_reloaded: Option<EntryId>,
    first_save_after: Option<EntryId>,
    aof_known: bool,
    /// From the AOF: the first save after the kill that moved the offset past
    /// every cascade lost at it, and after which kill that Redis had been
    /// started (this one, or a later one).
    covering_save: Option<(usize, EntryId)>,
    /// `aof_buffer_length` / `aof_pending_bio_fsync` of the last INFO before
    /// the kill (with --kill-while-fsync-pending, the pending flag of the poll
    /// that triggered it).
    aof_buffer_length: u64,
    aof_pending_bio_fsync: String,
    aof_delayed_fsync: String,
    aof_bytes_on_disk: u64,
    records_before: usize,
    records_after: usize,
    /// Event users whose record the pre-kill pipeline saw and that is gone
    /// (or older) after the restart: (user, seen, after).
    seen_lost: Vec<(usize, EntryId, Option<EntryId>)>,
    /// Cascades the worker logged as applied (it had Redis's reply) since
    /// the previous kill and before this one: how many.
    acked: usize,
    /// Of those, the ones gone (or older) after the restart: (user, entry,
    /// record after).
    acked_lost: Vec<(usize, EntryId, Option<EntryId>)>,
    xlen_after: u64,
    /// Offset saves (the save script's `SET`; nothing else in the lobby is
    /// a `SET`) the killed Redis process had executed, per `INFO
    /// commandstats` a moment before the kill, and how many of its saves its
    /// AOF holds (known after the run).
    saves_executed: Option<u64>,
    saves_in_aof: Option<u64>,
    /// (worker log number, byte length) when the kill happened.
    worker_log_at: (usize, u64),
    redis_log_notes: Vec<String>,
    restart_ms: u128,
}

impl Kill {
    /// The offset Redis kept through the kill: from the AOF when known.
    fn kept(&self) -> Option<EntryId> {
        if self.aof_known {
            self.offset_reloaded
        } else {
            self.offset_after
        }
    }

    /// Whether the offset went back through the kill.
    fn offset_lost(&self) -> bool {
        self.kept() < self.offset_before
    }

    /// Offset saves Redis had executed (and so answered) before the kill
    /// that its AOF does not hold (`None`: unknown).
    fn saves_lost(&self) -> Option<u64> {
        Some(self.saves_executed?.saturating_sub(self.saves_in_aof?))
    }

    fn lost_writes(&self) -> bool {
        !self.seen_lost.is_empty() || !self.acked_lost.is_empty() || self.offset_lost()
    }

    /// Whether a save after the kill moved the offset past every cascade
    /// lost at it (`None`: nothing lost, or the AOF is unknown).
    fn lost_covered(&self) -> Option<bool> {
        self.acked_lost.last()?;
        self.aof_known.then_some(self.covering_save.is_some())
    }

    /// Whether `user`'s cascade was lost at this kill; with the entry.
    fn lost_entry(&self, user: usize) -> Option<(EntryId, Option<EntryId>)> {
        self.acked_lost
            .iter()
            .chain(&self.seen_lost)
            .find(|(lost, _, _)| *lost == user)
            .map(|(_, entry, after)| (*entry, *after))
    }
}

#[derive(Debug, Default)]
struct RunResult {
    kills: Vec<Kill>,
    worker_exits: Vec<String>,
    final_offset: Option<EntryId>,
    last_id: Option<EntryId>,
    handled: usize,
    timed_out: bool,
    /// Users whose cascade differs from the model, with what differs.
    wrong_users: Vec<(usize, Vec<String>)>,
    diff_lines: usize,
    /// Cascades Redis lost at a kill that the worker handled again after
    /// the kill (its log shows the entry applied or already applied).
    replayed: usize,
    elapsed: Duration,
    kept: Option<PathBuf>,
    report: String,
}

impl RunResult {
    fn failed(&self) -> bool {
        self.timed_out || !self.wrong_users.is_empty()
    }
}

fn worker_bin(args: &Args) -> Result<PathBuf> {
    let path = match &args.worker_bin {
        Some(path) => path.clone(),
        None => {
            let exe = std::env::current_exe()?;
            exe.parent()
                .and_then(Path::parent)
                .map(|dir| dir.join("lobby-worker"))
                .context("cannot locate the target directory")?
        }
    };
    if !path.is_file() {
        bail!(
            "{} not found; build it with `cargo build --release -p lobby-worker --bin lobby-worker` or pass --worker-bin",
            path.display()
        );
    }
    Ok(path)
}

fn spawn_worker(bin: &Path, url: &str, concurrency: u32, log: &Path) -> Result<Child> {
    let log = File::create(log)?;
    Command::new(bin)
        .args(["run", "--drain", "--metrics-addr", "off", "--concurrency"])
        .arg(concurrency.to_string())
        .env("REDIS_URL", url)
        .env("LOBBY_LOG_LEVEL", "info,lifecycle_redis=debug")
        .env("LOBBY_LOG_FORMAT", "text")
        .env_remove("LOBBY_METRICS_ADDR")
        .env_remove("LOBBY_STREAM")
        .env_remove("LOBBY_KEY_PREFIX")
        .env_remove("LOBBY_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))
}

fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.metadata().ok())
                .map(|meta| meta.len())
                .sum()
        })
        .unwrap_or(0)
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|meta| meta.len()).unwrap_or(0)
}

/// Lines of `redis.log` from byte `from` on that tell how the AOF was loaded.
fn redis_log_notes(log: &Path, from: u64) -> Vec<String> {
    let text = fs::read(log).unwrap_or_default();
    let tail = String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default()).into_owned();
    tail.lines()
        .filter(|line| {
            [
                "short read",
                "truncated",
                "AOF loaded anyway",
                "!!!",
                "taking too long",
                "DB loaded from",
                "Bad file format",
                "Unexpected end of file",
            ]
            .iter()
            .any(|needle| line.contains(needle))
        })
        .map(|line| line.trim().to_owned())
        .collect()
}

/// UTC `YYYY-MM-DDTHH:MM:SS.ffffffZ`, as the worker's log timestamps.
fn utc_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_micros()
    )
}

struct RunSettings<'a> {
    args: &'a Args,
    bin: &'a Path,
    mode: &'static str,
    number: usize,
    seed: u64,
}

fn run_once(settings: &RunSettings<'_>) -> Result<RunResult> {
    let RunSettings {
        args,
        bin,
        mode,
        number,
        seed,
    } = *settings;
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x005e_ed0f_c1a5);
    let lobby = generate(seed, args.users, args.games, args.events);
    let mut server = RedisServer::try_start_with(RedisServerOptions {
        extra_args: ["--appendonly", "yes", "--appendfsync", mode]
            .map(str::to_owned)
            .to_vec(),
        ..RedisServerOptions::default()
    })
    .map_err(|err| anyhow::anyhow!(err))?;
    let url = server.url();
    let scratch = tempfile::Builder::new().prefix("lost-cascade-").tempdir()?;
    let mut conn = connect(&url)?;
    let fsync: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendfsync")
        .query(&mut conn)?;
    if fsync.get(1).map(String::as_str) != Some(mode) {
        bail!("redis-server runs with appendfsync {fsync:?}, wanted {mode}");
    }
    let ids = seed_lobby(&mut conn, &lobby)?;
    wait_persisted(&mut conn)?;
    let last_id = ids.last().copied();
    let mut result = RunResult {
        last_id,
        ..RunResult::default()
    };

    // Kill points: fractions of the stream behind the stored offset, each
    // followed by a random delay so that kills do not line up with saves.
    let mut targets: Vec<f64> = (0..args.kills)
        .map(|_| rng.random_range(0.03..0.85))
        .collect();
    targets.sort_by(f64::total_cmp);

    let redis_log = server.dir().join("redis.log");
    let aof_dir = server.dir().join("appendonlydir");
    let mut logs: Vec<PathBuf> = Vec::new();
    let start_worker = |logs: &mut Vec<PathBuf>| -> Result<Child> {
        let log = scratch
            .path()
            .join(format!("worker-{}.log", logs.len() + 1));
        let child = spawn_worker(bin, &url, args.concurrency, &log)?;
        logs.push(log);
        Ok(child)
    };
    let noise = (args.disk_noise > 0)
        .then(|| DiskNoise::start(scratch.path().join("noise"), args.disk_noise));
    let mut worker = start_worker(&mut logs)?;
    let mut previous_kill_at = (1, 0);
    let deadline = started + Duration::from_secs(args.run_timeout);
    let offset_of = |conn: &mut redis::Connection| -> Option<EntryId> {
        redis::cmd("GET")
            .arg(OFFSET_KEY)
            .query::<Option<String>>(conn)
            .ok()
            .flatten()
            .and_then(|id| parse_id(&id))
    };
    let progress = |offset: Option<EntryId>| -> f64 {
        offset.map_or(0.0, |offset| {
            ids.partition_point(|id| *id <= offset) as f64 / ids.len().max(1) as f64
        })
    };
    loop {
        if Instant::now() > deadline {
            result.timed_out = true;
            let _ = worker.kill();
            let _ = worker.wait();
            break;
        }
        if let Some(status) = worker.try_wait()? {
            let offset = offset_of(&mut conn);
            if status.success() && offset == last_id {
                break;
            }
            result.worker_exits.push(format!(
                "worker {} exited with {} at offset {:?}; started again",
                logs.len(),
                describe(status),
                offset.map(|id| id.to_string())
            ));
            worker = start_worker(&mut logs)?;
            continue;
        }
        let kills_done = result.kills.len();
        if kills_done < args.kills && progress(offset_of(&mut conn)) >= targets[kills_done] {
            thread::sleep(Duration::from_millis(rng.random_range(0..250)));
            if worker.try_wait()?.is_some() {
                continue;
            }
            let mut kill = Kill {
                number: kills_done + 1,
                ..Kill::default()
            };
            let before = snapshot(&mut conn, &lobby)?;
            let mut pending_seen = None;
            let mut last_info: Option<HashMap<String, String>> = None;
            if args.kill_while_fsync_pending {
                // The snapshot takes a few milliseconds: poll after it, and
                // kill as soon as a background fsync is in flight with
                // writes waiting behind it.
                let until = Instant::now() + Duration::from_secs(3);
                let mut seen = None;
                while seen.is_none() && Instant::now() < until {
                    let info: String = redis::cmd("INFO")
                        .arg("persistence")
                        .arg("commandstats")
                        .query(&mut conn)?;
                    let fields = info_fields(&info);
                    last_info = Some(fields.clone());
                    let buffered: u64 = fields
                        .get("aof_buffer_length")
                        .and_then(|len| len.parse().ok())
                        .unwrap_or(0);
                    if fields.get("aof_pending_bio_fsync").map(String::as_str) == Some("1")
                        && buffered > 0
                    {
                        seen = Some(buffered);
                    } else {
                        thread::sleep(Duration::from_millis(1));
                    }
                }
                pending_seen = Some(seen);
            }
            // SIGKILL at once after the reply: what the pipeline saw had
            // been acknowledged.
            server.kill();
            kill.wall = utc_now();
            let log_len = file_len(logs.last().unwrap());
            kill.worker_log_at = (logs.len(), log_len);
            if args.restart_worker_with_redis {
                let _ = worker.kill();
                let _ = worker.wait();
            }
            kill.progress = progress(before.offset);
            kill.offset_before = before.offset;
            kill.aof_buffer_length = match pending_seen {
                Some(seen) => seen.unwrap_or(0),
                None => before
                    .persistence
                    .get("aof_buffer_length")
                    .and_then(|len| len.parse().ok())
                    .unwrap_or(0),
            };
            kill.aof_pending_bio_fsync = match pending_seen {
                Some(seen) => u8::from(seen.is_some()).to_string(),
                None => before
                    .persistence
                    .get("aof_pending_bio_fsync")
                    .cloned()
                    .unwrap_or_default(),
            };
            kill.aof_delayed_fsync = before
                .persistence
                .get("aof_delayed_fsync")
                .cloned()
                .unwrap_or_default();
            kill.aof_bytes_on_disk = dir_bytes(&aof_dir);
            kill.saves_executed =
                command_calls(last_info.as_ref().unwrap_or(&before.persistence), "set");
            kill.records_before = before.records.iter().flatten().count();
            let log_from = file_len(&redis_log);
            let restarting = Instant::now();
            server.restart();
            kill.restart_ms = restarting.elapsed().as_millis();
            conn = connect(&url)?;
            let after = snapshot(&mut conn, &lobby)?;
            kill.offset_after = after.offset;
            kill.records_after = after.records.iter().flatten().count();
            kill.xlen_after = after.xlen;
            for (at, (seen, now)) in before.records.iter().zip(&after.records).enumerate() {
                if let Some(seen) = seen {
                    if now.is_none_or(|now| now < *seen) {
                        kill.seen_lost.push((lobby.event_users[at], *seen, *now));
                    }
                }
            }
            kill.redis_log_notes = redis_log_notes(&redis_log, log_from);
            let applied = applied_between(&logs, previous_kill_at, kill.worker_log_at);
            kill.acked = applied.len();
            let mut latest: HashMap<usize, EntryId> = HashMap::new();
            for (user, entry) in applied {
                let slot = latest.entry(user).or_insert(entry);
                *slot = (*slot).max(entry);
            }
            for (user, entry) in latest {
                let now = lobby
                    .event_users
                    .binary_search(&user)
                    .ok()
                    .and_then(|at| after.records[at]);
                if now.is_none_or(|now| now < entry) {
                    kill.acked_lost.push((user, entry, now));
                }
            }
            kill.acked_lost.sort_by_key(|(_, entry, _)| *entry);
            previous_kill_at = kill.worker_log_at;
            result.kills.push(kill);
            if args.restart_worker_with_redis {
                worker = start_worker(&mut logs)?;
            }
            continue;
        }
        thread::sleep(POLL);
    }

    drop(noise);
    if let Some(segments) = aof_saves(&aof_dir) {
        for kill in &mut result.kills {
            kill.aof_known = true;
            kill.offset_reloaded = segments
                .iter()
                .take(kill.number)
                .flatten()
                .next_back()
                .copied();
            kill.first_save_after = segments
                .get(kill.number)
                .and_then(|saves| saves.first())
                .copied();
            kill.saves_in_aof = segments
                .get(kill.number - 1)
                .map(|saves| saves.len() as u64);
            if let Some(&(_, last_lost, _)) = kill.acked_lost.last() {
                kill.covering_save =
                    segments
                        .iter()
                        .enumerate()
                        .skip(kill.number)
                        .find_map(|(at, saves)| {
                            saves
                                .iter()
                                .find(|save| **save >= last_lost)
                                .map(|save| (at, *save))
                        });
            }
        }
    }
    // The verdict: the lobby against the model up to the final offset.
    result.final_offset = offset_of(&mut conn);
    let handled = result
        .final_offset
        .map_or(0, |offset| ids.partition_point(|id| *id <= offset));
    result.handled = handled;
    let expected = lobby.expected(&ids, handled);
    let actual = read_lobby(&mut conn, &lobby)?;
    let (diff, wrong) = compare(&lobby, &expected, &actual);
    result.diff_lines = diff.len();
    let mut wrong: Vec<(usize, Vec<String>)> = wrong.into_iter().collect();
    wrong.sort_by_key(|(user, _)| *user);
    result.wrong_users = wrong;
    // A lost cascade was replayed when the worker handled its entry again
    // after the kill (applied, or found already applied).
    let mut replayed = BTreeSet::new();
    for kill in &result.kills {
        let handled_after = handled_since(&logs, kill.worker_log_at);
        for (user, entry, _) in kill.acked_lost.iter().chain(&kill.seen_lost) {
            if handled_after.contains(&(*user, *entry)) {
                replayed.insert((*user, *entry));
            }
        }
    }
    result.replayed = replayed.len();
    let xlen: u64 = redis::cmd("XLEN").arg(STREAM).query(&mut conn)?;

    result.report = evidence(&result, &lobby, &ids, &logs, xlen);
    result.elapsed = started.elapsed();
    if let Some(keep) = &args.keep_logs {
        if result.failed() || args.keep_all {
            let dir = keep.join(format!("{mode}-{number:03}-seed{seed}"));
            fs::create_dir_all(&dir)?;
            for log in &logs {
                fs::copy(log, dir.join(log.file_name().unwrap()))?;
            }
            fs::copy(&redis_log, dir.join("redis.log"))?;
            copy_dir(&aof_dir, &dir.join("appendonlydir"))?;
            let mut text = String::new();
            for line in &diff {
                let _ = writeln!(text, "{line}");
            }
            fs::write(dir.join("diff.txt"), text)?;
            fs::write(dir.join("kills.txt"), kills_text(&result, &lobby))?;
            fs::write(dir.join("report.txt"), &result.report)?;
            result.kept = Some(dir);
        }
    }
    drop(conn);
    server.kill();
    Ok(result)
}

fn describe(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("status {code}"),
        None => "a signal".to_owned(),
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

fn show(id: Option<EntryId>) -> String {
    id.map_or_else(|| "none".to_owned(), |id| id.to_string())
}

fn kills_text(result: &RunResult, lobby: &Lobby) -> String {
    let mut out = String::new();
    for kill in &result.kills {
        let _ = writeln!(
            out,
            "kill {} at {} ({:.0}% of the stream behind the offset): offset {} just before the kill, {} in the AOF (reloaded), {} read after the restart, \
             {} first saved by the restarted Redis; {} cascades acknowledged to the worker since the previous kill, {} of them gone after the restart; \
             records seen by the pre-kill pipeline {} ({} gone after the restart), {} after; \
             INFO persistence at the kill: aof_buffer_length {} B, aof_pending_bio_fsync {}, aof_delayed_fsync {}; \
             AOF on disk {} B; XLEN after {}; restart {} ms; worker log {} at byte {}",
            kill.number,
            kill.wall,
            kill.progress * 100.0,
            show(kill.offset_before),
            if kill.aof_known {
                show(kill.offset_reloaded)
            } else {
                "unknown".to_owned()
            },
            show(kill.offset_after),
            if kill.aof_known {
                show(kill.first_save_after)
            } else {
                "unknown".to_owned()
            },
            kill.acked,
            kill.acked_lost.len(),
            kill.records_before,
            kill.seen_lost.len(),
            kill.records_after,
            kill.aof_buffer_length,
            kill.aof_pending_bio_fsync,
            kill.aof_delayed_fsync,
            kill.aof_bytes_on_disk,
            kill.xlen_after,
            kill.restart_ms,
            kill.worker_log_at.0,
            kill.worker_log_at.1,
        );
        if let Some(line) = lost_range(kill) {
            let _ = writeln!(out, "    {line}");
        }
        if let Some(line) = saves_line(kill) {
            let _ = writeln!(out, "    {line}");
        }
        for note in &kill.redis_log_notes {
            let _ = writeln!(out, "    redis.log: {note}");
        }
        for (user, entry, after) in &kill.acked_lost {
            let _ = writeln!(
                out,
                "    acknowledged and lost: {} entry {} (record after the restart: {})",
                lobby.users[*user],
                entry,
                show(*after)
            );
        }
        for (user, seen, after) in &kill.seen_lost {
            let _ = writeln!(
                out,
                "    seen and lost: {} record {} before the kill, {} after",
                lobby.users[*user],
                seen,
                show(*after)
            );
        }
    }
    for exit in &result.worker_exits {
        let _ = writeln!(out, "{exit}");
    }
    out
}

/// What `INFO commandstats` and the AOF say of the kill's offset saves.
fn saves_line(kill: &Kill) -> Option<String> {
    let lost = kill.saves_lost()?;
    Some(format!(
        "offset saves: {} executed by the killed Redis (INFO commandstats just before the kill), {} in its AOF: {}",
        kill.saves_executed?,
        kill.saves_in_aof?,
        if lost == 0 {
            "no save it had executed (and answered) was lost".to_owned()
        } else {
            format!("{lost} save(s) it had executed (and answered) were lost")
        }
    ))
}

/// Where a kill's acknowledged-and-lost cascades lie relative to the offset
/// Redis kept.
fn lost_range(kill: &Kill) -> Option<String> {
    let first = kill.acked_lost.first()?.1;
    let last = kill.acked_lost.last()?.1;
    let after_offset = kill
        .acked_lost
        .iter()
        .all(|(_, entry, _)| kill.kept().is_none_or(|offset| *entry > offset));
    let first_save = match kill.covering_save {
        Some((after_kill, save)) if after_kill == kill.number => format!(
            "; the worker's save of {save} on the restarted Redis moved the offset past all of them"
        ),
        Some((after_kill, save)) => format!(
            "; the worker's save of {save} on the Redis restarted after kill {after_kill} moved the offset past all of them"
        ),
        None if kill.aof_known => "; no later save moved the offset past them all".to_owned(),
        None => String::new(),
    };
    Some(format!(
        "lost entries {first} ..= {last}; the offset Redis kept ({}) is {} all of them{first_save}",
        show(kill.kept()),
        if after_offset { "before" } else { "NOT before" }
    ))
}

/// The `cascade applied` lines the worker wrote between two log positions
/// ((log number from 1, byte)): (user, entry). The worker writes such a
/// line only once Redis's reply to the cascade script arrived.
fn applied_between(
    logs: &[PathBuf],
    from: (usize, u64),
    to: (usize, u64),
) -> Vec<(usize, EntryId)> {
    let mut applied = Vec::new();
    for number in from.0..=to.0 {
        let Some(log) = logs.get(number.wrapping_sub(1)) else {
            continue;
        };
        let raw = fs::read(log).unwrap_or_default();
        let start = if number == from.0 { from.1 } else { 0 } as usize;
        let end = if number == to.0 {
            (to.1 as usize).min(raw.len())
        } else {
            raw.len()
        };
        let text = String::from_utf8_lossy(raw.get(start..end).unwrap_or_default()).into_owned();
        for line in text.lines() {
            if let Some(found) = parse_applied(line) {
                applied.push(found);
            }
        }
    }
    applied
}

/// `(user, entry)` of a `cascade applied stream_entry_id=<id> ... user_id="u<n>"` line.
fn parse_applied(line: &str) -> Option<(usize, EntryId)> {
    let rest = line.split("cascade applied stream_entry_id=").nth(1)?;
    user_and_entry(rest)
}

/// `(user, entry)` from the fields `stream_entry_id=<id>` and `user_id="u<n>"`.
fn user_and_entry(fields: &str) -> Option<(usize, EntryId)> {
    let entry = fields
        .split("stream_entry_id=")
        .last()?
        .split_whitespace()
        .next()
        .and_then(parse_id)?;
    let user = fields.split("user_id=\"u").nth(1)?.split('"').next()?;
    Some((user.parse().ok()?, entry))
}

/// Every (user, entry) the worker logged as applied or as already applied
/// from a log position on (that log and the later ones).
fn handled_since(logs: &[PathBuf], from: (usize, u64)) -> BTreeSet<(usize, EntryId)> {
    let mut handled = BTreeSet::new();
    for (at, log) in logs.iter().enumerate().skip(from.0.saturating_sub(1)) {
        let raw = fs::read(log).unwrap_or_default();
        let start = if at + 1 == from.0 { from.1 as usize } else { 0 };
        let text = String::from_utf8_lossy(raw.get(start..).unwrap_or_default()).into_owned();
        for line in text.lines() {
            if line.contains("cascade applied") || line.contains("cascade already applied") {
                if let Some(found) = user_and_entry(line) {
                    handled.insert(found);
                }
            }
        }
    }
    handled
}

/// `cascade` lines of the worker logs for one user, and the outage lines:
/// (log number, byte position, line).
fn worker_lines(logs: &[PathBuf], user: &str) -> Vec<(usize, u64, String)> {
    let needle = format!("user_id=\"{user}\"");
    let mut found = Vec::new();
    for (n, log) in logs.iter().enumerate() {
        let text = fs::read_to_string(log).unwrap_or_default();
        let mut at = 0u64;
        for line in text.lines() {
            if line.contains(&needle) && line.contains("cascade") {
                found.push((n + 1, at, line.to_owned()));
            }
            at += line.len() as u64 + 1;
        }
    }
    found
}

/// The worker's first log line at or after a position that contains `needle`.
fn first_after(logs: &[PathBuf], at: (usize, u64), needle: &str) -> Option<String> {
    let log = logs.get(at.0.wrapping_sub(1))?;
    let raw = fs::read(log).ok()?;
    let text = String::from_utf8_lossy(raw.get(at.1 as usize..)?).into_owned();
    text.lines()
        .find(|line| line.contains(needle))
        .map(str::to_owned)
}

/// The evidence of a run, for the console and `report.txt`.
fn evidence(
    result: &RunResult,
    lobby: &Lobby,
    ids: &[EntryId],
    logs: &[PathBuf],
    xlen: u64,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "final offset {} (last entry {}), {} of {} entries at or before it, XLEN {}",
        show(result.final_offset),
        show(result.last_id),
        result.handled,
        ids.len(),
        xlen
    );
    if result.timed_out {
        let _ = writeln!(out, "TIMED OUT before the drain ended");
    }
    if result.wrong_users.is_empty() {
        return out;
    }
    let explained = result
        .wrong_users
        .iter()
        .filter(|(user, _)| {
            result
                .kills
                .iter()
                .any(|kill| kill.lost_entry(*user).is_some())
        })
        .count();
    let _ = writeln!(
        out,
        "{} user(s) differ from the model; {} of them had a cascade Redis acknowledged and then lost at a kill",
        result.wrong_users.len(),
        explained
    );
    for kill in result.kills.iter().filter(|kill| kill.lost_writes()) {
        let _ = writeln!(
            out,
            "kill {} at {}: {} acknowledged cascades lost (of {} acknowledged since the previous kill), offset {} just before the kill, {} kept, aof_buffer_length {} B, aof_pending_bio_fsync {}",
            kill.number,
            kill.wall,
            kill.acked_lost.len(),
            kill.acked,
            show(kill.offset_before),
            show(kill.kept()),
            kill.aof_buffer_length,
            kill.aof_pending_bio_fsync
        );
        if let Some(line) = lost_range(kill) {
            let _ = writeln!(out, "  {line}");
        }
        if let Some(line) = saves_line(kill) {
            let _ = writeln!(out, "  {line}");
        }
        let notes: Vec<&String> = kill
            .redis_log_notes
            .iter()
            .filter(|note| !note.contains("DB loaded from"))
            .collect();
        let _ = writeln!(
            out,
            "  redis.log on restart: {}",
            if notes.is_empty() {
                "a clean load (no short read, no truncation warning)".to_owned()
            } else {
                notes
                    .iter()
                    .map(|note| note.as_str())
                    .collect::<Vec<_>>()
                    .join(" | ")
            }
        );
        for needle in ["Redis unavailable", "Redis reachable again"] {
            if let Some(line) = first_after(logs, kill.worker_log_at, needle) {
                let _ = writeln!(out, "  worker after the kill: {line}");
            }
        }
    }
    for (user, what) in &result.wrong_users {
        let name = &lobby.users[*user];
        let entries: Vec<String> = lobby
            .events
            .iter()
            .zip(ids)
            .filter(|(event, _)| event.user == *user && event.known())
            .map(|(event, id)| format!("{id} ({})", event.event_type))
            .collect();
        let _ = writeln!(
            out,
            "LOST CASCADE: user {name}, entries {}; {} difference(s), first: {}",
            entries.join(", "),
            what.len(),
            what.first().cloned().unwrap_or_default()
        );
        for kill in &result.kills {
            if let Some((entry, after)) = kill.lost_entry(*user) {
                let _ = writeln!(
                    out,
                    "  lost at kill {}: entry {entry} applied and acknowledged before the kill, record after the restart {}; offset Redis kept {}, final offset {}",
                    kill.number,
                    show(after),
                    show(kill.kept()),
                    show(result.final_offset)
                );
            }
        }
        for (log, at, line) in worker_lines(logs, name) {
            let place = result
                .kills
                .iter()
                .find(|kill| (log, at) < kill.worker_log_at)
                .map_or_else(
                    || "after the last kill".to_owned(),
                    |kill| format!("before kill {}", kill.number),
                );
            let _ = writeln!(out, "  worker log {log} ({place}): {line}");
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Runs and the summary
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    runs: usize,
    failed: usize,
    timed_out: usize,
    lost_users: usize,
    explained: usize,
    kills: usize,
    kills_losing_writes: usize,
    offset_rollbacks: usize,
    acked: usize,
    acked_lost: usize,
    seen_lost: usize,
    replayed: usize,
    buffered_at_kill: usize,
    /// Kills with a background fsync in flight at the kill, and how many of
    /// them lost acknowledged writes; kills without one that lost any.
    pending_fsync_kills: usize,
    pending_fsync_losses: usize,
    losses_without_pending_fsync: usize,
    /// Kills that lost cascades: with no offset save lost that Redis had
    /// executed before the kill (commandstats against the AOF), and with one.
    losses_without_save_lost: usize,
    losses_with_save_lost: usize,
    /// Kills that lost cascades where the worker's first save on the
    /// restarted Redis moved the offset past all of them, or not.
    first_save_covered: usize,
    first_save_not_covered: usize,
    worker_restarts: usize,
    failures: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bin = worker_bin(&args)?;
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|since| since.as_secs())
            .unwrap_or(0)
    });
    let modes: &[&'static str] = match args.fsync {
        FsyncArg::Always => &["always"],
        FsyncArg::Everysec => &["everysec"],
        FsyncArg::Both => &["always", "everysec"],
    };
    if let Some(dir) = &args.keep_logs {
        fs::create_dir_all(dir)?;
    }
    let control = if args.restart_worker_with_redis {
        ", the worker killed with Redis and started again after it"
    } else {
        ""
    };
    println!(
        "lost_cascade: {} run(s) per mode {:?}, {} users, {} games, {} events, concurrency {}, {} Redis kill(s) per run{control}, first seed {seed}, worker {}",
        args.runs,
        modes,
        args.users,
        args.games,
        args.events,
        args.concurrency,
        args.kills,
        bin.display()
    );
    println!("per run: per kill, cascades acknowledged to the worker and gone after the restart (+offset: the offset went back; buf: aof_buffer_length at the kill)");
    let mut tallies: HashMap<&'static str, Tally> = HashMap::new();
    let started = Instant::now();
    let mut number = 0;
    for round in 0..args.runs {
        for &mode in modes {
            number += 1;
            let run_seed = seed.wrapping_add(round as u64);
            let result = run_once(&RunSettings {
                args: &args,
                bin: &bin,
                mode,
                number,
                seed: run_seed,
            })
            .with_context(|| format!("run {number} ({mode}, seed {run_seed})"))?;
            let tally = tallies.entry(mode).or_default();
            tally.runs += 1;
            tally.kills += result.kills.len();
            for kill in &result.kills {
                tally.kills_losing_writes += usize::from(kill.lost_writes());
                tally.offset_rollbacks += usize::from(kill.offset_lost());
                match kill.lost_covered() {
                    Some(true) => tally.first_save_covered += 1,
                    Some(false) => tally.first_save_not_covered += 1,
                    None => {}
                }
                tally.acked += kill.acked;
                tally.acked_lost += kill.acked_lost.len();
                tally.seen_lost += kill.seen_lost.len();
                tally.buffered_at_kill += usize::from(kill.aof_buffer_length > 0);
                if kill.aof_pending_bio_fsync == "1" {
                    tally.pending_fsync_kills += 1;
                    tally.pending_fsync_losses += usize::from(kill.lost_writes());
                } else {
                    tally.losses_without_pending_fsync += usize::from(kill.lost_writes());
                }
                if !kill.acked_lost.is_empty() {
                    match kill.saves_lost() {
                        Some(0) => tally.losses_without_save_lost += 1,
                        Some(_) => tally.losses_with_save_lost += 1,
                        None => {}
                    }
                }
            }
            tally.replayed += result.replayed;
            tally.worker_restarts += result.worker_exits.len();
            let kills: Vec<String> = result
                .kills
                .iter()
                .map(|k| {
                    format!(
                        "{}{}{}",
                        k.acked_lost.len(),
                        if k.offset_lost() { "+offset" } else { "" },
                        if k.aof_buffer_length > 0 {
                            format!("(buf {}B)", k.aof_buffer_length)
                        } else {
                            String::new()
                        }
                    )
                })
                .collect();
            println!(
                "[{mode:>8} run {number:>3} seed {run_seed}] {:>5.1}s, kills {} lost [{}], replayed {}, worker restarts {}, {}",
                result.elapsed.as_secs_f64(),
                result.kills.len(),
                kills.join(" "),
                result.replayed,
                result.worker_exits.len(),
                if result.failed() {
                    format!(
                        "FAILED: {} user(s) differ from the model{}",
                        result.wrong_users.len(),
                        result
                            .kept
                            .as_ref()
                            .map(|dir| format!(", logs in {}", dir.display()))
                            .unwrap_or_default()
                    )
                } else {
                    "lobby = model".to_owned()
                }
            );
            if result.failed() {
                tally.failed += 1;
                tally.timed_out += usize::from(result.timed_out);
                tally.lost_users += result.wrong_users.len();
                tally.explained += result
                    .wrong_users
                    .iter()
                    .filter(|(user, _)| {
                        result
                            .kills
                            .iter()
                            .any(|kill| kill.lost_entry(*user).is_some())
                    })
                    .count();
                let short = brief(&result.report, 12);
                print!("{}", indent(&short));
                tally.failures.push(format!(
                    "run {number} seed {run_seed}: {} user(s) lost{}",
                    result.wrong_users.len(),
                    result
                        .kept
                        .as_ref()
                        .map(|dir| format!(" (logs: {})", dir.display()))
                        .unwrap_or_default(),
                ));
            }
        }
    }
    println!(
        "\nsummary after {:.0}s ({} users, {} games, {} events, concurrency {}, {} kills per run{control}):",
        started.elapsed().as_secs_f64(),
        args.users,
        args.games,
        args.events,
        args.concurrency,
        args.kills,
    );
    for &mode in modes {
        let Some(t) = tallies.get(mode) else { continue };
        println!(
            "  appendfsync {mode}: runs {}, failed {} ({} timed out); users with a lost cascade {} ({} of them lost by Redis at a kill after it acknowledged them)\n\
             \x20   kills {}: {} lost acknowledged writes ({} with the offset going back, {} with a non-empty AOF buffer at the kill); \
             cascades acknowledged to the worker {} of which lost by Redis {} (and {} records seen by a reader, then lost), handled again after the kill {}; worker restarts {}",
            t.runs,
            t.failed,
            t.timed_out,
            t.lost_users,
            t.explained,
            t.kills,
            t.kills_losing_writes,
            t.offset_rollbacks,
            t.buffered_at_kill,
            t.acked,
            t.acked_lost,
            t.seen_lost,
            t.replayed,
            t.worker_restarts
        );
        println!(
            "    AOF: at {} of the kills that lost acknowledged cascades, a later save of the worker on the restarted Redis moved the offset past all of them ({} not)",
            t.first_save_covered, t.first_save_not_covered
        );
        println!(
            "    background AOF fsync in flight (aof_pending_bio_fsync:1) at {} kill(s), {} of which lost acknowledged writes; kills without one that lost any: {}",
            t.pending_fsync_kills, t.pending_fsync_losses, t.losses_without_pending_fsync
        );
        println!(
            "    offset saves: of the kills that lost acknowledged cascades, {} lost no save Redis had executed (the offset it kept was the worker's last save), {} lost one too",
            t.losses_without_save_lost, t.losses_with_save_lost
        );
        for failure in &t.failures {
            println!("    {failure}");
        }
    }
    Ok(())
}

/// The first lines of a report, and how many more there are.
fn brief(report: &str, lines: usize) -> String {
    let all: Vec<&str> = report.lines().collect();
    let mut out: String = all
        .iter()
        .take(lines)
        .map(|line| format!("{line}\n"))
        .collect();
    if all.len() > lines {
        let _ = writeln!(out, "... {} more line(s) in report.txt", all.len() - lines);
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("    {line}\n")).collect()
}
