#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]
//! Proof of reliability: the real `lobby-worker` binary against real, private
//! redis-servers, under crashes, Redis restarts, cut and stalled connections,
//! a failing dependency, and two workers on one stream by mistake.
//!
//! Every test prints its figures (`cargo test -p lobby-worker --test
//! reliability -- --nocapture`). Synchronisation is by polling a condition
//! against a deadline; the few fixed waits are bounded observation windows or
//! the length of an injected fault, and say so.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lifecycle_test_support::{RedisServer, RedisServerOptions, TcpProxy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod common;

use common::{
    connect, info, lock, parse_id, pipelined, stored_offset, wait_for, Running as Worker,
};

const STREAM: &str = "user:lifecycle_events";
const DEAD_LETTER_STREAM: &str = "user:lifecycle_events:dead";

/// The engine's warning when a Redis fault starts an outage (read path and
/// offset store), logged once per outage.
const UNAVAILABLE: &str = "Redis unavailable; retrying with back-off, keeping our place";
/// The prefix shared with the command path's warning ("Redis unavailable;
/// retrying with back-off", logged on the first failure of each command).
const UNAVAILABLE_ANY: &str = "Redis unavailable; retrying with back-off";
/// The engine's info line when an outage ends.
const REACHABLE: &str = "Redis reachable again";
/// The engine's warning per failed handler attempt.
const HANDLER_FAILED: &str = "handler failed; holding the offset and retrying";

/// How often conditions are polled.
const POLL: Duration = Duration::from_millis(5);

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

fn secs(duration: Duration) -> String {
    format!("{:.2}s", duration.as_secs_f64())
}

// ---------------------------------------------------------------------------
// Stream ids
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// Redis from the test's side (the synchronous client)
// ---------------------------------------------------------------------------

/// Calls of one command so far (`INFO commandstats`).
fn command_calls(stats: &HashMap<String, String>, command: &str) -> u64 {
    stats
        .get(&format!("cmdstat_{command}"))
        .and_then(|value| {
            value
                .split(',')
                .find_map(|field| field.strip_prefix("calls="))
        })
        .map_or(0, |calls| calls.parse().unwrap())
}

fn connected_clients(conn: &mut redis::Connection) -> u64 {
    info(conn, "clients")["connected_clients"].parse().unwrap()
}

/// Waits until Redis has closed every client connection but ours (after a
/// worker was killed), so every command it had sent has been executed.
fn wait_clients_gone(conn: &mut redis::Connection) {
    wait_for(
        Duration::from_secs(10),
        "Redis dropped the killed worker's connections",
        || connected_clients(conn) == 1,
    );
}

/// Whether some client is blocked in an `XREAD` (the worker idles in its
/// blocking read).
fn a_reader_is_blocked(conn: &mut redis::Connection) -> bool {
    let list: String = redis::cmd("CLIENT").arg("LIST").query(conn).unwrap();
    list.lines().any(|line| {
        let flags = line
            .split(' ')
            .find_map(|field| field.strip_prefix("flags="))
            .unwrap_or_default();
        line.contains("cmd=xread") && flags.contains('b')
    })
}

// ---------------------------------------------------------------------------
// The lobby the tests seed and check
// ---------------------------------------------------------------------------

/// `n` users; user `i` plays in game `i` (whose status cycles through open,
/// running, finished, cancelled; every fifth one the user owns) and has
/// applied to game `i + 1`. Game owners that are not players are never
/// deleted.
#[derive(Clone, Debug)]
struct Lobby {
    tag: &'static str,
    n: usize,
}

const STATUSES: [&str; 4] = ["open", "running", "finished", "cancelled"];

impl Lobby {
    fn user(&self, i: usize) -> String {
        format!("u-{}-{i}", self.tag)
    }

    fn game(&self, i: usize) -> String {
        format!("g-{}-{i}", self.tag)
    }

    fn owns(i: usize) -> bool {
        i % 5 == 0
    }

    fn owner(&self, i: usize) -> String {
        if Self::owns(i) {
            self.user(i)
        } else {
            format!("o-{}-{i}", self.tag)
        }
    }

    fn status(i: usize) -> &'static str {
        STATUSES[i % STATUSES.len()]
    }

    fn event_type(i: usize) -> &'static str {
        if i % 7 == 3 {
            "user.permanently_blocked"
        } else {
            "user.deleted"
        }
    }

    fn occurred_at_ms(i: usize) -> u64 {
        1_700_000_000_000 + i as u64
    }

    /// Writes the lobby with pipelines (the layout `RedisLobbyStore::put_game`
    /// writes, without its per-game round trips).
    fn seed(&self, conn: &mut redis::Connection) {
        let mut commands = Vec::with_capacity(self.n * 5);
        for i in 0..self.n {
            let game = format!("lobby:game:{}", self.game(i));
            let mut hset = redis::cmd("HSET");
            hset.arg(&game)
                .arg("owner_id")
                .arg(self.owner(i))
                .arg("status")
                .arg(Self::status(i));
            commands.push(hset);
            let mut members = redis::cmd("SADD");
            members.arg(format!("{game}:members")).arg(self.user(i));
            commands.push(members);
            let mut index = redis::cmd("SADD");
            index
                .arg(format!("lobby:user:{}:games", self.user(i)))
                .arg(self.game(i));
            if i + 1 < self.n {
                index.arg(self.game(i + 1));
                let mut applicants = redis::cmd("SADD");
                applicants
                    .arg(format!("lobby:game:{}:applicants", self.game(i + 1)))
                    .arg(self.user(i));
                commands.push(applicants);
            }
            commands.push(index);
            if !Self::owns(i) {
                let mut owner_index = redis::cmd("SADD");
                owner_index
                    .arg(format!("lobby:user:{}:games", self.owner(i)))
                    .arg(self.game(i));
                commands.push(owner_index);
            }
        }
        let _: Vec<redis::Value> = pipelined(conn, commands);
    }

    /// The `XADD` of user `i`'s event.
    fn xadd(&self, i: usize) -> redis::Cmd {
        let mut xadd = redis::cmd("XADD");
        xadd.arg(STREAM)
            .arg("*")
            .arg("event_type")
            .arg(Self::event_type(i))
            .arg("user_id")
            .arg(self.user(i))
            .arg("occurred_at_ms")
            .arg(Self::occurred_at_ms(i));
        xadd
    }

    /// Publishes the events of users `range` (pipelined) and returns their ids.
    fn publish(&self, conn: &mut redis::Connection, range: std::ops::Range<usize>) -> Vec<String> {
        pipelined(conn, range.map(|i| self.xadd(i)))
    }

    /// The `entry_id` of every user's cascade record (`None`: no record).
    fn recorded_entries(&self, conn: &mut redis::Connection) -> Vec<Option<String>> {
        pipelined(
            conn,
            (0..self.n).map(|i| {
                let mut hget = redis::cmd("HGET");
                hget.arg(format!("lobby:user:{}:cascade", self.user(i)))
                    .arg("entry_id");
                hget
            }),
        )
    }

    /// How many users have a cascade record.
    fn records(&self, conn: &mut redis::Connection) -> usize {
        self.recorded_entries(conn).iter().flatten().count()
    }

    /// Checks the whole lobby against the rules, given which users were
    /// deleted and by which entry (`deleted[i]`: user `i`'s entry id, `None`
    /// for a user with no event handled). Panics listing the differences.
    fn verify(&self, conn: &mut redis::Connection, deleted: &[Option<String>]) {
        self.verify_with_duplicates(conn, deleted, &HashSet::new());
    }

    /// [`Lobby::verify`] when the users in `duplicated` had more than one
    /// event in the stream (a producer retry whose first attempt was stored
    /// but not acknowledged): their last cascade found nothing left to do, so
    /// its record counts 0 games.
    fn verify_with_duplicates(
        &self,
        conn: &mut redis::Connection,
        deleted: &[Option<String>],
        duplicated: &HashSet<usize>,
    ) {
        let games: Vec<String> = (0..self.n)
            .map(|i| format!("lobby:game:{}", self.game(i)))
            .collect();
        let hget = |field: &'static str| {
            games.iter().map(move |game| {
                let mut cmd = redis::cmd("HGET");
                cmd.arg(game).arg(field);
                cmd
            })
        };
        let on_sets = |name: &'static str, suffix: &'static str| {
            games.iter().map(move |game| {
                let mut cmd = redis::cmd(name);
                cmd.arg(format!("{game}:{suffix}"));
                cmd
            })
        };
        let status: Vec<Option<String>> = pipelined(conn, hget("status"));
        let cancel_reason: Vec<Option<String>> = pipelined(conn, hget("cancel_reason"));
        let members: Vec<Vec<String>> = pipelined(conn, on_sets("SMEMBERS", "members"));
        let dropped: Vec<Vec<String>> = pipelined(conn, on_sets("SMEMBERS", "dropped"));
        let applicants: Vec<u64> = pipelined(conn, on_sets("SCARD", "applicants"));
        let index_exists: Vec<u64> = pipelined(
            conn,
            (0..self.n).map(|i| {
                let mut cmd = redis::cmd("EXISTS");
                cmd.arg(format!("lobby:user:{}:games", self.user(i)));
                cmd
            }),
        );
        let records: Vec<HashMap<String, String>> = pipelined(
            conn,
            (0..self.n).map(|i| {
                let mut cmd = redis::cmd("HGETALL");
                cmd.arg(format!("lobby:user:{}:cascade", self.user(i)));
                cmd
            }),
        );
        let mut wrong = Vec::new();
        let mut check = |i: usize, what: &str, actual: String, expected: String| {
            if actual != expected {
                wrong.push(format!(
                    "user {i} ({}): {what} is {actual}, expected {expected}",
                    Self::status(i)
                ));
            }
        };
        for i in 0..self.n {
            let applied_before = i > 0 && deleted.get(i - 1).is_some_and(Option::is_some);
            let expected_applicants = u64::from(i > 0 && !applied_before);
            check(
                i,
                "applicants",
                applicants[i].to_string(),
                expected_applicants.to_string(),
            );
            let Some(entry_id) = deleted.get(i).cloned().flatten() else {
                check(i, "record", format!("{:?}", records[i]), "{}".to_owned());
                continue;
            };
            let user = self.user(i);
            let st = Self::status(i);
            let cancels = st == "open" && Self::owns(i);
            check(
                i,
                "status",
                format!("{:?}", status[i]),
                format!("{:?}", Some(if cancels { "cancelled" } else { st })),
            );
            check(
                i,
                "cancel_reason",
                format!("{:?}", cancel_reason[i]),
                format!("{:?}", cancels.then(|| Self::event_type(i))),
            );
            let expect_members: Vec<String> = if st == "finished" {
                vec![user.clone()]
            } else {
                vec![]
            };
            check(
                i,
                "members",
                format!("{:?}", members[i]),
                format!("{expect_members:?}"),
            );
            let expect_dropped: Vec<String> = if st == "running" {
                vec![user.clone()]
            } else {
                vec![]
            };
            check(
                i,
                "dropped",
                format!("{:?}", dropped[i]),
                format!("{expect_dropped:?}"),
            );
            check(i, "index exists", index_exists[i].to_string(), "0".into());
            let record = &records[i];
            let field = |name: &str| record.get(name).cloned().unwrap_or_default();
            check(i, "record entry_id", field("entry_id"), entry_id);
            check(
                i,
                "record event_type",
                field("event_type"),
                Self::event_type(i).into(),
            );
            check(
                i,
                "record occurred_at_ms",
                field("occurred_at_ms"),
                Self::occurred_at_ms(i).to_string(),
            );
            let games = if duplicated.contains(&i) {
                0
            } else if i + 1 < self.n {
                2
            } else {
                1
            };
            check(i, "record games", field("games"), games.to_string());
        }
        assert!(
            wrong.is_empty(),
            "{} differences from the rules, first ones:\n{}",
            wrong.len(),
            wrong
                .iter()
                .take(15)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// `deleted` argument of [`Lobby::verify`] for the users `0..ids.len()`.
fn deleted_by(ids: &[String]) -> Vec<Option<String>> {
    ids.iter().cloned().map(Some).collect()
}

// ---------------------------------------------------------------------------
// The worker process
// ---------------------------------------------------------------------------

/// `lobby-worker run ARGS` at `log_level`.
fn start_worker(url: &str, log_level: &str, args: &[&str]) -> Worker {
    // A short lease: a worker restarted after a SIGKILL waits for the dead
    // one's lease to run out.
    Worker::start_with_env(
        url,
        args,
        &[("LOBBY_LOG_LEVEL", log_level), ("LOBBY_LEASE_TTL", "2s")],
    )
}

/// CPU time `worker` used so far (user + system), from `/proc/<pid>/stat`.
fn cpu_time(worker: &Worker) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", worker.pid())).unwrap();
    // Fields after the command name (which may hold spaces) start with
    // the state (field 3); utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second() as f64)
}

fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .unwrap_or(100)
}

// ---------------------------------------------------------------------------
// A producer that keeps publishing through outages
// ---------------------------------------------------------------------------

/// Publishes the lobby's events in user order from a thread, one every
/// `interval`, retrying each (on a fresh connection) while Redis is down.
/// `ids()[i]` is the id of user `i`'s event as acknowledged by Redis.
struct Publisher {
    shared: Arc<PublisherShared>,
    thread: Option<JoinHandle<()>>,
}

struct PublisherShared {
    url: String,
    lobby: Lobby,
    interval: Duration,
    /// Held while an event is published; [`Publisher::pause`] takes it to
    /// know no publish is in flight.
    state: Mutex<PublisherState>,
    paused: AtomicBool,
    stop: AtomicBool,
    /// Failed attempts (Redis down).
    retries: AtomicU64,
}

struct PublisherState {
    conn: Option<redis::Connection>,
    ids: Vec<String>,
}

impl PublisherShared {
    /// Runs `command` until Redis acknowledges it.
    fn acknowledged<T: redis::FromRedisValue>(
        &self,
        state: &mut PublisherState,
        command: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> T {
        loop {
            if state.conn.is_none() {
                state.conn = redis::Client::open(self.url.as_str())
                    .unwrap()
                    .get_connection_with_timeout(Duration::from_millis(500))
                    .ok();
                if let Some(conn) = &state.conn {
                    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    conn.set_write_timeout(Some(Duration::from_secs(2)))
                        .unwrap();
                }
            }
            if let Some(conn) = state.conn.as_mut() {
                match command(conn) {
                    Ok(value) => return value,
                    Err(_) => state.conn = None,
                }
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            // Pacing of a producer's retries while Redis is down.
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Publisher {
    fn start(url: &str, lobby: Lobby, interval: Duration) -> Self {
        let shared = Arc::new(PublisherShared {
            url: url.to_owned(),
            lobby,
            interval,
            state: Mutex::new(PublisherState {
                conn: None,
                ids: Vec::new(),
            }),
            paused: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            retries: AtomicU64::new(0),
        });
        let publishing = Arc::clone(&shared);
        let thread = thread::spawn(move || {
            let shared = publishing;
            while !shared.stop.load(Ordering::SeqCst) {
                if !shared.paused.load(Ordering::SeqCst) {
                    let mut state = lock(&shared.state);
                    let next = state.ids.len();
                    if shared.paused.load(Ordering::SeqCst) || next >= shared.lobby.n {
                        drop(state);
                        thread::sleep(shared.interval);
                        continue;
                    }
                    let xadd = shared.lobby.xadd(next);
                    let id: String =
                        shared.acknowledged(&mut state, |conn| xadd.query::<String>(conn));
                    state.ids.push(id);
                }
                // The producer's rate, not synchronisation.
                thread::sleep(shared.interval);
            }
        });
        Self {
            shared,
            thread: Some(thread),
        }
    }

    /// Stops publishing; returns once no publish is in flight.
    fn pause(&self) {
        self.shared.paused.store(true, Ordering::SeqCst);
        drop(lock(&self.shared.state));
    }

    fn resume(&self) {
        self.shared.paused.store(false, Ordering::SeqCst);
    }

    /// Waits until `count` events have been published (the producer must be
    /// running).
    fn wait_published(&self, count: usize) {
        assert!(
            count <= self.shared.lobby.n,
            "the lobby has only {} users to publish events for",
            self.shared.lobby.n
        );
        wait_for(
            Duration::from_secs(20),
            &format!("the producer has published {count} events"),
            || self.published() >= count,
        );
    }

    fn is_paused(&self) -> bool {
        self.shared.paused.load(Ordering::SeqCst)
    }

    /// While paused (and Redis is up): publishes the next `count` events at
    /// once, pipelined on a fresh connection (the producer's own may be stale
    /// after an outage).
    fn burst(&self, count: usize) -> std::ops::Range<usize> {
        assert!(self.is_paused());
        let mut state = lock(&self.shared.state);
        let from = state.ids.len();
        let range = from..(from + count).min(self.shared.lobby.n);
        assert!(
            !range.is_empty(),
            "the lobby has no users left to publish for"
        );
        let ids = self
            .shared
            .lobby
            .publish(&mut connect(&self.shared.url), range.clone());
        state.ids.extend(ids);
        range
    }

    fn ids(&self) -> Vec<String> {
        lock(&self.shared.state).ids.clone()
    }

    fn published(&self) -> usize {
        lock(&self.shared.state).ids.len()
    }

    fn retries(&self) -> u64 {
        self.shared.retries.load(Ordering::Relaxed)
    }

    /// Stops the thread; returns every acknowledged id.
    fn stop(mut self) -> Vec<String> {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        self.ids()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

/// Waits (asserting the worker stays alive) until the stored offset is at
/// least `id`.
fn wait_offset_reaches(url: &str, worker: &mut Worker, id: &str, within: Duration, what: &str) {
    let target = parse_id(id);
    let mut conn = connect(url);
    wait_for(within, what, || {
        worker.assert_alive();
        stored_offset(&mut conn).is_some_and(|offset| parse_id(&offset) >= target)
    });
}

fn seed_from_env_or_clock() -> u64 {
    match std::env::var("LOBBY_TEST_SEED") {
        Ok(seed) => seed.parse().expect("LOBBY_TEST_SEED is a u64"),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

// ---------------------------------------------------------------------------
// 1. Crash anywhere
// ---------------------------------------------------------------------------

const CRASH_USERS: usize = 20_000;
const CRASH_KILLS: usize = 25;
const CRASH_BATCH: usize = 256;

/// SIGKILL at random moments, restart, repeat: after every kill no entry is
/// skipped (the entries handled are exactly a prefix of the stream and the
/// stored offset never lies beyond it, nor moves back), at most one batch is
/// handled but not yet covered by the stored offset (what the next run
/// replays), and a final drain leaves the lobby exactly as the rules say.
#[test]
fn sigkill_at_random_moments_replays_at_most_one_batch_and_skips_nothing() {
    let began = Instant::now();
    let seed = seed_from_env_or_clock();
    println!("[crash] seed {seed} (rerun with LOBBY_TEST_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let server = RedisServer::start();
    let url = server.url();
    let mut conn = connect(&url);
    let lobby = Lobby {
        tag: "crash",
        n: CRASH_USERS,
    };
    lobby.seed(&mut conn);
    let ids = lobby.publish(&mut conn, 0..lobby.n);
    let last = ids.last().unwrap().clone();
    let position: HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    println!(
        "[crash] seeded {} users and published {} events in {}",
        lobby.n,
        ids.len(),
        secs(began.elapsed())
    );

    let batch = CRASH_BATCH.to_string();
    // The one-batch bound and the first-gap check below are concurrency 1's
    // (at higher concurrency the bound is the entries held, and entries of
    // other users finish past a gap: see tests/concurrency.rs).
    let args = [
        "--batch-size",
        batch.as_str(),
        "--concurrency",
        "1",
        "--log-level",
        "warn",
    ];
    let mut covered_before = 0_usize;
    let mut replays = Vec::new();
    let mut mid_backlog = 0;
    for kill in 1..=CRASH_KILLS {
        let offset_before = stored_offset(&mut conn);
        let mut worker = start_worker(&url, "warn", &args);
        let spawned = Instant::now();
        // Most kills come 20-150 ms after the run has visibly started
        // handling (its first save); some come 0-60 ms after spawning, while
        // it may still be connecting or loading its offset. The random delay
        // is the crash moment, not synchronisation.
        let early = rng.random_bool(0.2);
        let delay = if early {
            Duration::from_millis(rng.random_range(0..=60))
        } else {
            wait_for(
                Duration::from_secs(20),
                "the restarted worker saves progress",
                || {
                    worker.assert_alive();
                    let now = stored_offset(&mut conn);
                    now != offset_before || now.as_deref() == Some(last.as_str())
                },
            );
            Duration::from_millis(rng.random_range(20..=150))
        };
        thread::sleep(delay);
        worker.kill9();
        let lived = spawned.elapsed();
        wait_clients_gone(&mut conn);

        let recorded = lobby.recorded_entries(&mut conn);
        let handled = recorded.iter().take_while(|entry| entry.is_some()).count();
        let stray = recorded[handled..].iter().flatten().count();
        assert_eq!(
            stray, 0,
            "kill {kill}: {stray} users after the first unhandled one ({handled}) have records: an entry was skipped"
        );
        for (i, entry) in recorded.iter().take(handled).enumerate() {
            assert_eq!(entry.as_deref(), Some(ids[i].as_str()), "user {i}");
        }
        let offset = stored_offset(&mut conn);
        let covered = offset.as_deref().map_or(0, |offset| {
            position
                .get(offset)
                .map(|i| i + 1)
                .unwrap_or_else(|| panic!("offset {offset} is not an entry id"))
        });
        assert!(
            covered >= covered_before,
            "kill {kill}: the offset moved backwards ({covered} < {covered_before})"
        );
        assert!(
            covered <= handled,
            "kill {kill}: the offset covers {covered} entries but only {handled} were handled: entries skipped"
        );
        let replay = handled - covered;
        assert!(
            replay <= CRASH_BATCH,
            "kill {kill}: {replay} entries handled past the stored offset (more than one batch of {CRASH_BATCH})"
        );
        if handled < lobby.n {
            mid_backlog += 1;
        }
        println!(
            "[crash] kill {kill:2}: {} after {:>4} ms (lived {:>4} ms): offset covers {covered:5}, handled {handled:5}, to replay {replay:3}",
            if early { "early" } else { "late " },
            delay.as_millis(),
            lived.as_millis()
        );
        replays.push(replay);
        covered_before = covered;
    }

    let drain_began = Instant::now();
    let mut drain = start_worker(
        &url,
        "warn",
        &["--drain", "--batch-size", &batch, "--concurrency", "1"],
    );
    let status = drain.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "drain: {status}\n{}", drain.log());
    let drain_took = drain_began.elapsed();
    assert_eq!(stored_offset(&mut conn).as_deref(), Some(last.as_str()));
    lobby.verify(&mut conn, &deleted_by(&ids));
    let max_replay = replays.iter().copied().max().unwrap_or(0);
    let mean = replays.iter().sum::<usize>() as f64 / replays.len() as f64;
    println!(
        "[crash] {CRASH_KILLS} kills ({mid_backlog} mid-backlog), {} runs; replay after a kill: max {max_replay}, mean {mean:.1} (bound {CRASH_BATCH}); drain of the rest {}; total {}",
        CRASH_KILLS + 1,
        secs(drain_took),
        secs(began.elapsed())
    );
}

// ---------------------------------------------------------------------------
// 2. Redis restarts
// ---------------------------------------------------------------------------

/// How long each injected Redis outage lasts: the fault's length, not
/// synchronisation (every wait around it polls a condition).
const OUTAGE: Duration = Duration::from_millis(1500);

/// A server that keeps its data across `stop` + `restart`. The append-only
/// file is synced every second rather than after every write: a graceful
/// stop (what the tests do) syncs it anyway, and a sync per cascade would
/// make the tests slow on a shared disk without testing anything more.
fn append_only() -> RedisServerOptions {
    RedisServerOptions {
        append_only: true,
        extra_args: vec!["--appendfsync".to_owned(), "everysec".to_owned()],
        ..RedisServerOptions::default()
    }
}

/// Log lines the engine writes about Redis faults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct FaultLines {
    /// "Redis unavailable; retrying with back-off, keeping our place".
    unavailable: usize,
    /// "Redis unavailable; retrying with back-off" without the rest (a
    /// command of the engine's own: dead letters, the stream's last id).
    command_unavailable: usize,
    reachable: usize,
    handler_failed: usize,
}

impl FaultLines {
    fn of(worker: &Worker) -> Self {
        let unavailable = worker.count(UNAVAILABLE);
        Self {
            unavailable,
            command_unavailable: worker.count(UNAVAILABLE_ANY) - unavailable,
            reachable: worker.count(REACHABLE),
            handler_failed: worker.count(HANDLER_FAILED),
        }
    }

    /// Whether the worker has logged any fault since `before`.
    fn noticed_since(&self, before: &Self) -> bool {
        self.unavailable > before.unavailable
            || self.command_unavailable > before.command_unavailable
            || self.handler_failed > before.handler_failed
    }
}

/// Stops Redis gracefully (with the append-only file, nothing acknowledged
/// is lost), waits until the worker has noticed, keeps it down for
/// [`OUTAGE`] and restarts it. Returns when the outage began.
fn outage(server: &mut RedisServer, worker: &mut Worker, name: &str) -> Instant {
    let before = FaultLines::of(worker);
    let began = Instant::now();
    server.stop();
    wait_for(
        Duration::from_secs(15),
        &format!("the worker notices outage {name:?}"),
        || {
            worker.assert_alive();
            FaultLines::of(worker).noticed_since(&before)
        },
    );
    let noticed = began.elapsed();
    if let Some(rest) = OUTAGE.checked_sub(began.elapsed()) {
        thread::sleep(rest);
    }
    worker.assert_alive();
    server.restart();
    println!(
        "[outage] {name:<11}: noticed after {:>4} ms, Redis down {:>4} ms",
        noticed.as_millis(),
        began.elapsed().as_millis()
    );
    began
}

/// Publishes one more event (at once when the producer is paused, else its
/// next one) and waits until the worker has handled it: proof that it is
/// back, after everything before it. Returns how long that took.
fn wait_handles_next(
    url: &str,
    worker: &mut Worker,
    publisher: &Publisher,
    what: &str,
) -> Duration {
    let began = Instant::now();
    let id = if publisher.is_paused() {
        let one = publisher.burst(1);
        publisher.ids()[one.start].clone()
    } else {
        let next = publisher.published();
        publisher.wait_published(next + 1);
        publisher.ids()[next].clone()
    };
    wait_offset_reaches(url, worker, &id, Duration::from_secs(60), what);
    began.elapsed()
}

/// Redis stopped and restarted three times under a live worker: while events
/// are being published, while the worker idles in its blocking read, and in
/// the middle of a 5000-event backlog. The producer retries through every
/// outage. The worker never exits, handles every acknowledged event, and
/// says "Redis unavailable" about once per outage, not once per retry.
#[test]
fn redis_restarts_lose_nothing_and_are_logged_once_per_outage() {
    let began = Instant::now();
    let mut server = RedisServer::start_with(append_only());
    let url = server.url();
    let lobby = Lobby {
        tag: "restart",
        n: 12_000,
    };
    lobby.seed(&mut connect(&url));
    let mut worker = start_worker(&url, "info", &["--block-timeout", "1s"]);
    let publisher = Publisher::start(&url, lobby.clone(), Duration::from_millis(2));
    publisher.wait_published(200);

    // 1. While events are being published.
    let down = outage(&mut server, &mut worker, "publishing");
    let back = wait_handles_next(
        &url,
        &mut worker,
        &publisher,
        "the worker is back after outage 1",
    );
    println!(
        "[restarts]   handling again {} ms after the restart ({} ms after the outage began)",
        back.as_millis(),
        down.elapsed().as_millis()
    );

    // 2. While the worker sits in its blocking read, nothing published.
    publisher.pause();
    let ids = publisher.ids();
    wait_offset_reaches(
        &url,
        &mut worker,
        ids.last().unwrap(),
        Duration::from_secs(30),
        "the worker catches up before the idle outage",
    );
    let mut conn = connect(&url);
    wait_for(
        Duration::from_secs(10),
        "the worker blocks in XREAD",
        || a_reader_is_blocked(&mut conn),
    );
    drop(conn);
    let idle_before = FaultLines::of(&worker);
    outage(&mut server, &mut worker, "idle");
    let idle = FaultLines::of(&worker);
    let back = wait_handles_next(
        &url,
        &mut worker,
        &publisher,
        "the worker is back after outage 2",
    );
    publisher.resume();
    println!(
        "[restarts]   handling again {} ms after the restart",
        back.as_millis()
    );

    // 3. In the middle of a backlog of 5000.
    publisher.pause();
    let burst = publisher.burst(5_000);
    let first_of_burst = lobby.user(burst.start);
    let mut conn = connect(&url);
    wait_for(
        Duration::from_secs(30),
        "the worker starts on the backlog",
        || {
            worker.assert_alive();
            redis::cmd("EXISTS")
                .arg(format!("lobby:user:{first_of_burst}:cascade"))
                .query::<bool>(&mut conn)
                .unwrap()
        },
    );
    drop(conn);
    outage(&mut server, &mut worker, "mid-backlog");
    let mut conn = connect(&url);
    let handled_at_restart = lobby.records(&mut conn);
    let back = wait_handles_next(
        &url,
        &mut worker,
        &publisher,
        "the worker drains the backlog after outage 3",
    );
    publisher.resume();
    println!(
        "[restarts]   backlog {}..{}: {} handled when Redis came back; all of it and the next event handled {} ms after the restart",
        burst.start,
        burst.end,
        handled_at_restart.saturating_sub(burst.start),
        back.as_millis()
    );
    publisher.wait_published(burst.end + 200);

    let retries = publisher.retries();
    let ids = publisher.stop();
    wait_offset_reaches(
        &url,
        &mut worker,
        ids.last().unwrap(),
        Duration::from_secs(60),
        "the worker handles everything published",
    );
    worker.assert_alive();
    let duplicated = audit_stream(&mut conn, &lobby, &ids);
    lobby.verify_with_duplicates(&mut conn, &deleted_by(&ids), &duplicated);
    let lines = FaultLines::of(&worker);
    worker.terminate();
    println!(
        "[restarts] {} events stored twice by producer retries (first reply lost to the outage): users {:?}",
        duplicated.len(),
        duplicated
    );
    if std::env::var_os("LOBBY_TEST_LOGS").is_some() {
        println!("[restarts] worker log:\n{}", worker.log());
    }
    println!(
        "[restarts] {} events published ({retries} producer retries while Redis was down), all handled; log: {} x {UNAVAILABLE:?}, {} x command-path unavailable, {} x {REACHABLE:?}, {} x {HANDLER_FAILED:?}; total {}",
        ids.len(),
        lines.unavailable,
        lines.command_unavailable,
        lines.reachable,
        lines.handler_failed,
        secs(began.elapsed())
    );
    let outages = 3;
    assert!(
        idle.unavailable > idle_before.unavailable,
        "the idle outage was not reported as Redis unavailable"
    );
    assert!(
        lines.unavailable <= 2 * outages,
        "{} {UNAVAILABLE:?} lines for {outages} outages: not once per outage",
        lines.unavailable
    );
    assert!(
        lines.command_unavailable <= outages,
        "{} command-path unavailable lines for {outages} outages",
        lines.command_unavailable
    );
    assert!(lines.reachable >= outages);
}

/// Reads the whole stream and checks it against what the producer saw
/// acknowledged: every acknowledged id is there and is its user's last
/// entry. Returns the users with more than one entry (a publish retried after
/// its first attempt was stored but its reply lost to the outage).
fn audit_stream(conn: &mut redis::Connection, lobby: &Lobby, ids: &[String]) -> HashSet<usize> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(STREAM)
        .arg("-")
        .arg("+")
        .query(conn)
        .unwrap();
    let index: HashMap<String, usize> = (0..ids.len()).map(|i| (lobby.user(i), i)).collect();
    let mut entries: HashMap<usize, Vec<String>> = HashMap::new();
    for entry in &reply.ids {
        let user: String = redis::from_redis_value_ref(&entry.map["user_id"]).unwrap();
        let i = index[&user];
        entries.entry(i).or_default().push(entry.id.clone());
    }
    for (i, id) in ids.iter().enumerate() {
        let of_user = &entries[&i];
        assert_eq!(
            of_user.last(),
            Some(id),
            "user {i}: acknowledged {id}, stream has {of_user:?}"
        );
    }
    entries
        .into_iter()
        .filter(|(_, of_user)| of_user.len() > 1)
        .map(|(i, _)| i)
        .collect()
}

// ---------------------------------------------------------------------------
// 2b. Connection loss and stalls (through a proxy)
// ---------------------------------------------------------------------------

fn proxy_url(proxy: &TcpProxy) -> String {
    format!("redis://127.0.0.1:{}/", proxy.port())
}

/// The worker reaches Redis through a proxy whose connections are cut three
/// times (idle in the blocking read, in the middle of a backlog, while events
/// are published with added latency) and stalled once for less than the read
/// timeout. Nothing is lost, the process stays up, and each cut is followed
/// by a reconnect that the log reports.
#[test]
fn cut_connections_lose_nothing_and_reconnect() {
    let began = Instant::now();
    let server = RedisServer::start();
    let url = server.url();
    let proxy = TcpProxy::start(server.port());
    let lobby = Lobby {
        tag: "cut",
        n: 12_000,
    };
    lobby.seed(&mut connect(&url));
    let mut worker = start_worker(
        &proxy_url(&proxy),
        "info",
        &["--block-timeout", "500ms", "--batch-size", "256"],
    );
    // Events go to Redis directly, not through the proxy.
    let publisher = Publisher::start(&url, lobby.clone(), Duration::from_millis(2));
    let mut conn = connect(&url);
    // Cuts every connection, then waits until the worker has reconnected and
    // handled an event published after the cut.
    let cut = |worker: &mut Worker, name: &str| {
        let accepted = proxy.accepted();
        let closed = proxy.cut();
        let at = Instant::now();
        assert!(closed >= 1, "nothing to cut");
        let back = wait_handles_next(
            &url,
            worker,
            &publisher,
            &format!("the worker handles an event published after cut {name:?}"),
        );
        assert!(proxy.accepted() > accepted);
        println!(
            "[cuts] cut {name:<11}: {closed} connections closed; {} new ones; an event published after it handled within {:>4} ms",
            proxy.accepted() - accepted,
            back.max(at.elapsed()).as_millis()
        );
    };

    // 1. Idle in the blocking read.
    publisher.pause();
    publisher.burst(300);
    wait_offset_reaches(
        &url,
        &mut worker,
        publisher.ids().last().unwrap(),
        Duration::from_secs(30),
        "the worker catches up",
    );
    wait_for(
        Duration::from_secs(10),
        "the worker blocks in XREAD",
        || a_reader_is_blocked(&mut conn),
    );
    cut(&mut worker, "idle");

    // 2. In the middle of a backlog.
    let burst = publisher.burst(3_000);
    let first = format!("lobby:user:{}:cascade", lobby.user(burst.start));
    wait_for(
        Duration::from_secs(20),
        "the worker starts on the backlog",
        || {
            redis::cmd("EXISTS")
                .arg(&first)
                .query::<bool>(&mut conn)
                .unwrap()
        },
    );
    cut(&mut worker, "mid-backlog");

    // 3. While events are published, each chunk forwarded 1 ms late.
    proxy.set_delay(Duration::from_millis(1));
    publisher.resume();
    publisher.wait_published(publisher.published() + 300);
    cut(&mut worker, "publishing");
    publisher.wait_published(publisher.published() + 300);
    proxy.set_delay(Duration::ZERO);

    // A stall shorter than the read's response timeout (500 ms block + 250
    // ms + 2 s): everything waits, then flows on. The stall's length is the
    // injected fault, not synchronisation.
    let before_stall = FaultLines::of(&worker);
    let accepted = proxy.accepted();
    proxy.pause();
    thread::sleep(Duration::from_secs(2));
    proxy.resume();
    let back = wait_handles_next(
        &url,
        &mut worker,
        &publisher,
        "the worker handles an event published after the stall",
    );
    let after_stall = FaultLines::of(&worker);
    println!(
        "[cuts] stall of 2 s: next event handled {} ms after it; {} new connections; lines: {} unavailable, {} handler failed",
        back.as_millis(),
        proxy.accepted() - accepted,
        after_stall.unavailable - before_stall.unavailable,
        after_stall.handler_failed - before_stall.handler_failed
    );

    let ids = publisher.stop();
    wait_offset_reaches(
        &url,
        &mut worker,
        ids.last().unwrap(),
        Duration::from_secs(60),
        "the worker handles everything published",
    );
    lobby.verify(&mut conn, &deleted_by(&ids));
    let lines = FaultLines::of(&worker);
    worker.terminate();
    println!(
        "[cuts] {} events, all handled; {} connections accepted by the proxy; log: {} unavailable, {} reachable again, {} handler failed; total {}",
        ids.len(),
        proxy.accepted(),
        lines.unavailable,
        lines.reachable,
        lines.handler_failed,
        secs(began.elapsed())
    );
    assert!(lines.unavailable >= 3 && lines.reachable >= 3);
}

/// A connection that goes silent (no reset, no close: a stalled network)
/// while the worker waits in its blocking read. With `--block-timeout 500ms`
/// the read's response timeout is 500 + 250 ms + 2 s = 2.75 s, so within a
/// 4 s stall the worker must give up on the silent connection, say so, and
/// connect again; afterwards everything published meanwhile is handled.
#[test]
fn a_silent_connection_times_out_and_the_worker_reconnects() {
    let began = Instant::now();
    let server = RedisServer::start();
    let url = server.url();
    let proxy = TcpProxy::start(server.port());
    let lobby = Lobby {
        tag: "stall",
        n: 400,
    };
    let mut conn = connect(&url);
    lobby.seed(&mut conn);
    // A lease longer than the stall: what is watched is the read's own
    // timeout, not the lease running out (which stops consuming too).
    let mut worker = start_worker(
        &proxy_url(&proxy),
        "info",
        &["--block-timeout", "500ms", "--lease-ttl", "10s"],
    );
    let mut ids = lobby.publish(&mut conn, 0..200);
    wait_offset_reaches(
        &url,
        &mut worker,
        ids.last().unwrap(),
        Duration::from_secs(20),
        "the worker catches up",
    );
    wait_for(
        Duration::from_secs(10),
        "the worker blocks in XREAD",
        || a_reader_is_blocked(&mut conn),
    );
    let before = FaultLines::of(&worker);
    let accepted = proxy.accepted();
    let stall = Duration::from_secs(4);
    proxy.pause();
    let paused_at = Instant::now();
    ids.extend(lobby.publish(&mut conn, 200..400));
    // Polls for the reaction within the stall; the stall itself is the
    // injected fault and lasts its full length either way.
    let mut noticed = None;
    while paused_at.elapsed() < stall {
        worker.assert_alive();
        if noticed.is_none() && FaultLines::of(&worker).noticed_since(&before) {
            noticed = Some(paused_at.elapsed());
        }
        thread::sleep(POLL);
    }
    let reconnects_during_stall = proxy.accepted() - accepted;
    proxy.resume();
    wait_offset_reaches(
        &url,
        &mut worker,
        ids.last().unwrap(),
        Duration::from_secs(20),
        "the worker handles what was published during the stall",
    );
    lobby.verify(&mut conn, &deleted_by(&ids));
    let after = FaultLines::of(&worker);
    println!(
        "[stall] 4 s stall: fault noticed after {:?}, {reconnects_during_stall} new connections during the stall; lines since: {} unavailable, {} reachable again, {} handler failed; all {} events handled after resuming; total {}",
        noticed.map(|at| at.as_millis()),
        after.unavailable - before.unavailable,
        after.reachable - before.reachable,
        after.handler_failed - before.handler_failed,
        ids.len(),
        secs(began.elapsed())
    );
    worker.terminate();
    assert!(
        noticed.is_some() && reconnects_during_stall >= 1,
        "the worker sat on a silent connection for the whole {stall:?} stall (its read response timeout is 2.75 s): no fault logged, {reconnects_during_stall} new connections"
    );
}

// ---------------------------------------------------------------------------
// 3. No spin while a dependency fails
// ---------------------------------------------------------------------------

/// A lobby of 51 users whose first user's cascade fails: the members of its
/// open game are a string (WRONGTYPE), so the cascade script fails before
/// writing anything. Its event is published first, then the 50 others.
/// Returns the ids.
fn poison_lobby(conn: &mut redis::Connection, lobby: &Lobby) -> Vec<String> {
    lobby.seed(conn);
    let members = format!("lobby:game:{}:members", lobby.game(0));
    redis::cmd("DEL").arg(&members).exec(conn).unwrap();
    redis::cmd("SET")
        .arg(&members)
        .arg("not a set")
        .exec(conn)
        .unwrap();
    let mut first = lobby.xadd(0);
    first
        .arg("source")
        .arg("users")
        .arg("trace_id")
        .arg("t-poison")
        .arg("x_extra")
        .arg("kept as sent");
    let mut ids = vec![first.query::<String>(conn).unwrap()];
    ids.extend(lobby.publish(conn, 1..lobby.n));
    ids
}

/// Calls of the commands a failing worker could spin on.
fn spin_commands(conn: &mut redis::Connection) -> (u64, u64, u64) {
    let stats = info(conn, "commandstats");
    (
        command_calls(&stats, "evalsha"),
        command_calls(&stats, "eval"),
        command_calls(&stats, "xread"),
    )
}

/// A cascade that keeps failing (a lobby key of the wrong type) is retried
/// with growing back-off: once the delay has grown, Redis sees only a few
/// calls a second and the worker uses next to no CPU. The offset holds on the
/// failing entry (nothing after it is handled out of order), and once the key
/// is repaired the whole backlog drains.
#[test]
fn a_failing_cascade_backs_off_without_spinning_and_drains_once_repaired() {
    let began = Instant::now();
    let server = RedisServer::start();
    let url = server.url();
    let mut conn = connect(&url);
    let lobby = Lobby { tag: "spin", n: 51 };
    let ids = poison_lobby(&mut conn, &lobby);
    // Concurrency 1: nothing after the failing entry may be handled.
    let mut worker = start_worker(
        &url,
        "info",
        &[
            "--retry-initial",
            "50ms",
            "--retry-max",
            "1s",
            "--concurrency",
            "1",
        ],
    );
    wait_for(
        Duration::from_secs(20),
        "the worker has failed 5 times",
        || {
            worker.assert_alive();
            worker.count(HANDLER_FAILED) >= 5
        },
    );
    let failures_before = worker.count(HANDLER_FAILED);
    let (evalsha0, eval0, xread0) = spin_commands(&mut conn);
    let cpu0 = cpu_time(&worker);
    let t0 = Instant::now();
    // Observation window: asserts that something (a hot loop) does NOT
    // happen, so it has a fixed length.
    thread::sleep(Duration::from_secs(3));
    let (evalsha1, eval1, xread1) = spin_commands(&mut conn);
    let cpu1 = cpu_time(&worker);
    let window = t0.elapsed().as_secs_f64();
    worker.assert_alive();
    let failures = worker.count(HANDLER_FAILED) - failures_before;
    let calls = (evalsha1 - evalsha0) + (eval1 - eval0) + (xread1 - xread0);
    let calls_per_second = calls as f64 / window;
    let cpu_share = (cpu1 - cpu0).as_secs_f64() / window;
    println!(
        "[spin] after {failures_before} failures, over {window:.2} s: {} EVALSHA, {} EVAL, {} XREAD ({calls_per_second:.1} calls/s), {failures} more failures, worker CPU {:.1}% of a core",
        evalsha1 - evalsha0,
        eval1 - eval0,
        xread1 - xread0,
        cpu_share * 100.0
    );
    assert!(
        calls_per_second <= 10.0,
        "{calls_per_second:.1} script/read calls per second while a cascade keeps failing"
    );
    assert!(
        cpu_share < 0.10,
        "the worker used {:.1}% of a core while waiting to retry",
        cpu_share * 100.0
    );
    assert!(failures >= 1, "no retry during the window");
    let offset = stored_offset(&mut conn);
    assert!(
        offset
            .as_deref()
            .is_none_or(|offset| parse_id(offset) < parse_id(&ids[0])),
        "the offset {offset:?} moved past the failing entry {}",
        ids[0]
    );
    assert_eq!(
        lobby.records(&mut conn),
        0,
        "an entry after the failing one was handled"
    );

    let repaired = Instant::now();
    let members = format!("lobby:game:{}:members", lobby.game(0));
    redis::pipe()
        .atomic()
        .cmd("DEL")
        .arg(&members)
        .cmd("SADD")
        .arg(&members)
        .arg(lobby.user(0))
        .exec(&mut conn)
        .unwrap();
    wait_offset_reaches(
        &url,
        &mut worker,
        ids.last().unwrap(),
        Duration::from_secs(20),
        "the backlog drains once the key is repaired",
    );
    lobby.verify(&mut conn, &deleted_by(&ids));
    worker.terminate();
    println!(
        "[spin] repaired: all {} events handled {} ms later; total {}",
        ids.len(),
        repaired.elapsed().as_millis(),
        secs(began.elapsed())
    );
}

/// With `--dead-letter-after 3` the failing entry is copied, with its
/// original fields and why it failed, to the dead-letter stream after its
/// third attempt, and the rest of the stream is handled.
#[test]
fn a_poison_entry_is_dead_lettered_after_three_attempts_and_the_rest_is_handled() {
    let began = Instant::now();
    let server = RedisServer::start();
    let url = server.url();
    let mut conn = connect(&url);
    let lobby = Lobby { tag: "dead", n: 51 };
    let ids = poison_lobby(&mut conn, &lobby);
    let mut worker = start_worker(
        &url,
        "info",
        &[
            "--dead-letter-after",
            "3",
            "--retry-initial",
            "50ms",
            "--retry-max",
            "1s",
        ],
    );
    wait_offset_reaches(
        &url,
        &mut worker,
        ids.last().unwrap(),
        Duration::from_secs(20),
        "the worker moves past the poison entry and handles the rest",
    );
    let dead: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(DEAD_LETTER_STREAM)
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .unwrap();
    assert_eq!(dead.ids.len(), 1, "dead letters: {:?}", dead.ids);
    let fields: HashMap<String, String> = dead.ids[0]
        .map
        .iter()
        .map(|(name, value)| {
            (
                name.clone(),
                redis::from_redis_value_ref::<String>(value).unwrap(),
            )
        })
        .collect();
    let expected_original = [
        ("event_type", Lobby::event_type(0).to_owned()),
        ("user_id", lobby.user(0)),
        ("occurred_at_ms", Lobby::occurred_at_ms(0).to_string()),
        ("source", "users".to_owned()),
        ("trace_id", "t-poison".to_owned()),
        ("x_extra", "kept as sent".to_owned()),
        ("dead_letter_entry_id", ids[0].clone()),
        ("dead_letter_stream", STREAM.to_owned()),
        ("dead_letter_attempts", "3".to_owned()),
    ];
    for (name, value) in &expected_original {
        assert_eq!(fields.get(*name), Some(value), "field {name} of {fields:?}");
    }
    let error = &fields["dead_letter_error"];
    assert!(error.contains("WRONGTYPE"), "dead_letter_error: {error}");
    let members_key = format!("lobby:game:{}:members", lobby.game(0));
    let members: String = redis::cmd("GET")
        .arg(&members_key)
        .query(&mut conn)
        .unwrap();
    assert_eq!(members, "not a set", "the failed cascade changed its key");
    // Repaired (with its member) only so that the lobby can be read as sets.
    redis::cmd("DEL").arg(&members_key).exec(&mut conn).unwrap();
    redis::cmd("SADD")
        .arg(&members_key)
        .arg(lobby.user(0))
        .exec(&mut conn)
        .unwrap();
    let mut deleted = deleted_by(&ids);
    deleted[0] = None;
    lobby.verify(&mut conn, &deleted);
    let index: Vec<String> = redis::cmd("SMEMBERS")
        .arg(format!("lobby:user:{}:games", lobby.user(0)))
        .query(&mut conn)
        .unwrap();
    assert_eq!(
        index.len(),
        2,
        "the poison user's index was changed: {index:?}"
    );
    let failures = worker.count(HANDLER_FAILED);
    let dead_lettered = worker.count("dead-lettered");
    worker.terminate();
    println!(
        "[dead-letter] poison {} dead-lettered after 3 attempts ({failures} retry warnings, {dead_lettered} dead-letter line) with fields {:?}; the other {} handled; total {}",
        ids[0],
        fields.keys().collect::<std::collections::BTreeSet<_>>(),
        ids.len() - 1,
        secs(began.elapsed())
    );
    assert_eq!(dead_lettered, 1);
}

/// Dead-lettering is for entries the handler cannot handle, not for Redis
/// being away: with `--dead-letter-after 3`, a Redis outage in the middle of
/// a backlog (the cascade in flight fails three times on a refused
/// connection) must not send a healthy entry to the dead-letter stream; once
/// Redis is back every cascade is applied.
#[test]
fn a_redis_outage_does_not_dead_letter_healthy_entries() {
    let began = Instant::now();
    let mut server = RedisServer::start_with(append_only());
    let url = server.url();
    let mut conn = connect(&url);
    let lobby = Lobby {
        tag: "dlout",
        n: 3_000,
    };
    lobby.seed(&mut conn);
    let ids = lobby.publish(&mut conn, 0..lobby.n);
    let mut worker = start_worker(
        &url,
        "info",
        &[
            "--dead-letter-after",
            "3",
            "--retry-initial",
            "50ms",
            "--retry-max",
            "1s",
        ],
    );
    wait_for(
        Duration::from_secs(20),
        "the worker is in the middle of the backlog",
        || {
            worker.assert_alive();
            lobby.records(&mut conn) >= 100
        },
    );
    drop(conn);
    let down = outage(&mut server, &mut worker, "dead-letter");
    let mut conn = connect(&url);
    wait_offset_reaches(
        &url,
        &mut worker,
        ids.last().unwrap(),
        Duration::from_secs(30),
        "the worker finishes the backlog",
    );
    let dead: Vec<String> = {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(DEAD_LETTER_STREAM)
            .arg("-")
            .arg("+")
            .query(&mut conn)
            .unwrap();
        reply
            .ids
            .iter()
            .map(|entry| {
                let field = |name: &str| {
                    entry
                        .map
                        .get(name)
                        .map(|value| redis::from_redis_value_ref::<String>(value).unwrap())
                        .unwrap_or_default()
                };
                format!(
                    "{} (user {}) after {} attempts: {}",
                    field("dead_letter_entry_id"),
                    field("user_id"),
                    field("dead_letter_attempts"),
                    field("dead_letter_error")
                )
            })
            .collect()
    };
    let records = lobby.records(&mut conn);
    let lines = FaultLines::of(&worker);
    worker.terminate();
    println!(
        "[outage+dead-letter] {} of {} cascades applied, {} dead letters {dead:?}; {} handler failures logged; total {} (outage began {} ms before the end)",
        records,
        lobby.n,
        dead.len(),
        lines.handler_failed,
        secs(began.elapsed()),
        down.elapsed().as_millis()
    );
    assert!(
        dead.is_empty(),
        "a Redis outage dead-lettered healthy entries: {dead:?}"
    );
    lobby.verify(&mut conn, &deleted_by(&ids));
}

// ---------------------------------------------------------------------------
// 6. Two workers by mistake
// ---------------------------------------------------------------------------

/// Two `lobby-worker run` processes on the same stream and label over a
/// 5000-event backlog, with different batch sizes so their saves interleave.
/// Polled every few milliseconds, the stored offset never moves backwards;
/// in the end every cascade is applied (idempotently, whoever came first)
/// and the offset is the last entry.
#[test]
fn two_workers_by_mistake_never_move_the_offset_backwards() {
    let began = Instant::now();
    let server = RedisServer::start();
    let url = server.url();
    let mut conn = connect(&url);
    let lobby = Lobby {
        tag: "two",
        n: 5_000,
    };
    lobby.seed(&mut conn);
    let ids = lobby.publish(&mut conn, 0..lobby.n);
    let last = parse_id(ids.last().unwrap());
    let mut first = start_worker(&url, "info", &["--batch-size", "256"]);
    let mut second = start_worker(&url, "info", &["--batch-size", "100"]);
    let mut observations = 0_u64;
    let mut changes = 0_u64;
    let mut previous: Option<(u64, u64)> = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        first.assert_alive();
        second.assert_alive();
        if let Some(offset) = stored_offset(&mut conn) {
            let offset = parse_id(&offset);
            observations += 1;
            if let Some(previous) = previous {
                assert!(
                    offset >= previous,
                    "the offset moved backwards: {offset:?} after {previous:?}"
                );
                if offset > previous {
                    changes += 1;
                }
            }
            previous = Some(offset);
            if offset == last {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the backlog was not handled in time"
        );
        thread::sleep(Duration::from_millis(2));
    }
    let reached = began.elapsed();
    lobby.verify(&mut conn, &deleted_by(&ids));
    let (evalsha, _, xread) = spin_commands(&mut conn);
    first.terminate();
    second.terminate();
    assert_eq!(stored_offset(&mut conn).map(|id| parse_id(&id)), Some(last));
    let handled = |worker: &Worker| {
        worker
            .log()
            .lines()
            .find(|line| line.contains("stopped") && line.contains("handled="))
            .and_then(|line| line.split("handled=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("?")
            .to_owned()
    };
    println!(
        "[two workers] offset polled {observations} times, moved forward {changes} times, never backwards; last entry reached after {}; handled (cascade calls, applied or already applied): first {}, second {}; Redis saw {evalsha} EVALSHA and {xread} XREAD; total {}",
        secs(reached),
        handled(&first),
        handled(&second),
        secs(began.elapsed())
    );
}

// ---------------------------------------------------------------------------
// Redis losing acknowledged writes
// ---------------------------------------------------------------------------

/// How long the lost-writes test waits for a condition.
const LOST_WRITES_PATIENCE: Duration = Duration::from_secs(20);

/// Redis loses writes it had acknowledged (here: killed and restarted from an
/// older snapshot, as an `appendfsync everysec` crash or a failover to a
/// lagging replica does): the cascades applied after the snapshot and the
/// offset saves covering them are gone, while their entries remain. The
/// running worker notices when it next saves (the stored offset is behind
/// what it saved; it checks after every reconnect) and handles those entries
/// again, so no cascade stays lost, even when a new entry then moves the
/// offset on.
#[test]
#[allow(clippy::indexing_slicing)]
fn cascades_redis_lost_after_acknowledging_them_are_applied_again() {
    let mut server = RedisServer::start();
    let url = server.url();
    let mut conn = connect(&url);
    let lobby = Lobby { tag: "lost", n: 40 };
    lobby.seed(&mut conn);
    let first = lobby.publish(&mut conn, 0..20);
    let drained = common::worker(&url, &["run", "--drain", "--metrics-addr", "off"]);
    common::assert_success(&drained);
    assert_eq!(stored_offset(&mut conn).as_ref(), first.last());
    let rest = lobby.publish(&mut conn, 20..40);
    // The snapshot Redis will come back from: every entry, the first 20
    // cascades, the offset of the 20th.
    let _: () = redis::cmd("SAVE").query(&mut conn).unwrap();

    let mut running = Worker::start(&url, &["--metrics-addr", "off", "--block-timeout", "200ms"]);
    wait_for(
        LOST_WRITES_PATIENCE,
        "the last 20 entries are handled",
        || stored_offset(&mut conn).as_ref() == rest.last(),
    );
    assert!(lobby
        .recorded_entries(&mut conn)
        .iter()
        .all(Option::is_some));

    server.kill();
    server.restart();
    let mut conn = connect(&url);
    assert_eq!(
        stored_offset(&mut conn).as_ref(),
        first.last(),
        "the restart did not lose the later writes"
    );
    let lost: Vec<Option<String>> = lobby.recorded_entries(&mut conn).split_off(20);
    assert!(
        lost.iter().all(Option::is_none),
        "cascades survived: {lost:?}"
    );
    // A new entry after the loss: saving it must not cover the lost ones.
    let extra = Lobby { tag: "later", n: 1 };
    let later = extra.publish(&mut conn, 0..1);
    wait_for(
        LOST_WRITES_PATIENCE,
        "every cascade is applied again",
        || {
            stored_offset(&mut conn).as_ref() == later.last()
                && lobby
                    .recorded_entries(&mut conn)
                    .iter()
                    .all(Option::is_some)
        },
    );
    let recorded = lobby.recorded_entries(&mut conn);
    for (i, id) in rest.iter().enumerate() {
        assert_eq!(recorded[20 + i].as_ref(), Some(id), "user {}", 20 + i);
    }
    // Found by the offset save's check, or (the lease's key lost too) by
    // the lease's renewal or the fenced save: either way once, and the
    // worker replays from what is stored.
    assert_eq!(
        running.count("the stored offset is behind what this worker saved")
            + running.count("lease lost")
            + running.count("the offset save was refused"),
        1,
        "{}",
        running.log()
    );
    running.terminate();
    assert!(
        running.wait_exit(LOST_WRITES_PATIENCE).success(),
        "{}",
        running.log()
    );
}

/// The loss `appendfsync everysec` usually causes: Redis restarts having
/// kept the worker's last offset save but lost cascades it acknowledged
/// after it (simulated here exactly: the test removes those cascades' records
/// and restores the users' game indexes, then restarts Redis, whose `run_id`
/// changes). The stored offset is not behind anything, so only the server's
/// identity tells: the worker's next save is refused, and it handles every
/// entry after the stored offset again.
#[test]
#[allow(clippy::indexing_slicing)]
fn cascades_lost_behind_a_kept_offset_are_applied_again_after_a_restart() {
    let mut server = RedisServer::start_with(RedisServerOptions {
        append_only: true,
        ..RedisServerOptions::default()
    });
    let url = server.url();
    let mut conn = connect(&url);
    let lobby = Lobby { tag: "kept", n: 40 };
    lobby.seed(&mut conn);
    let first = lobby.publish(&mut conn, 0..20);
    let drained = common::worker(&url, &["run", "--drain", "--metrics-addr", "off"]);
    common::assert_success(&drained);
    // User 20's open game has a member "set" that is a string: its cascade
    // fails (WRONGTYPE) until repaired, holding the offset on entry 19 while
    // the later users' cascades are applied.
    let poisoned = format!("lobby:game:{}:members", lobby.game(20));
    let _: () = redis::cmd("SET")
        .arg(&poisoned)
        .arg("not a set")
        .query(&mut conn)
        .unwrap();
    let rest = lobby.publish(&mut conn, 20..40);
    let mut running = Worker::start(
        &url,
        &[
            "--metrics-addr",
            "off",
            "--block-timeout",
            "200ms",
            "--concurrency",
            "8",
            "--retry-initial",
            "20ms",
            "--retry-max",
            "200ms",
        ],
    );
    wait_for(LOST_WRITES_PATIENCE, "users 21 to 39 are handled", || {
        lobby.recorded_entries(&mut conn)[21..]
            .iter()
            .all(Option::is_some)
    });
    assert_eq!(stored_offset(&mut conn).as_ref(), first.last());

    // Redis "loses" the cascades of users 21 to 39, keeps the offset, and
    // restarts.
    for i in 21..40 {
        let _: () = redis::cmd("DEL")
            .arg(format!("lobby:user:{}:cascade", lobby.user(i)))
            .query(&mut conn)
            .unwrap();
        let mut index = redis::cmd("SADD");
        index
            .arg(format!("lobby:user:{}:games", lobby.user(i)))
            .arg(lobby.game(i));
        if i + 1 < lobby.n {
            index.arg(lobby.game(i + 1));
        }
        let _: () = index.query(&mut conn).unwrap();
    }
    server.restart();
    let mut conn = connect(&url);
    assert_eq!(stored_offset(&mut conn).as_ref(), first.last());
    // Repaired: the held entry passes, and the watermark could jump to the
    // last entry.
    let _: () = redis::cmd("DEL").arg(&poisoned).query(&mut conn).unwrap();
    wait_for(
        LOST_WRITES_PATIENCE,
        "every cascade is applied again",
        || {
            stored_offset(&mut conn).as_ref() == rest.last()
                && lobby.recorded_entries(&mut conn)[20..]
                    .iter()
                    .all(Option::is_some)
        },
    );
    let recorded = lobby.recorded_entries(&mut conn);
    for (i, id) in rest.iter().enumerate() {
        assert_eq!(recorded[20 + i].as_ref(), Some(id), "user {}", 20 + i);
    }
    assert!(
        running.count("the stored offset is behind what this worker saved") >= 1,
        "{}",
        running.log()
    );
    running.terminate();
    assert!(
        running.wait_exit(LOST_WRITES_PATIENCE).success(),
        "{}",
        running.log()
    );
}
