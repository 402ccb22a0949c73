#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]
//! Writes refused by Redis, through the real `lobby-worker` binary against
//! private redis-servers: used memory over `maxmemory` with `noeviction`
//! (`OOM`) and a failed save with `stop-writes-on-bgsave-error` (`MISCONF`)
//! imposed in the middle of a backlog, then lifted. The worker keeps
//! running (never exits on them), reports the refusal on `/readyz`, logs it
//! once per write refused, retries with back-off, dead-letters nothing
//! because of it (and holds a dead letter Redis refuses until it can write
//! it), and once the limit is lifted catches up with nothing lost.
//!
//! Synchronisation is by polling a condition against a deadline (the
//! server's own error counters, `/metrics`, `/readyz`, the stored offset).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lifecycle_test_support::{free_port, RedisServer, RedisServerOptions, TcpProxy};

mod common;

use common::{connect, deletion, get, info, parse_id, pipelined, sample, wait_for, Running};

const DEAD_LETTER_STREAM: &str = "user:lifecycle_events:dead";
const OFFSET_KEY: &str = "lobby:stream_offsets:user_lifecycle";
/// Every this many users, one is in no game (see [`Lobby`]).
const HELD_EVERY: usize = 1_500;

/// How many times the server has answered with `code` (`INFO errorstats`).
fn errors_answered(conn: &mut redis::Connection, code: &str) -> u64 {
    info(conn, "errorstats")
        .get(&format!("errorstat_{code}"))
        .and_then(|value| value.strip_prefix("count="))
        .map_or(0, |count| count.parse().unwrap())
}

// ---------------------------------------------------------------------------
// The lobby
// ---------------------------------------------------------------------------

const STATUSES: [&str; 4] = ["open", "running", "finished", "cancelled"];

/// `n` users, each with one `user.deleted` event. User `i` plays in game `i`
/// (status cycling through open, running, finished, cancelled; every fifth
/// one the user owns), except the last of every [`HELD_EVERY`], who is in no
/// game at all:
/// that user's cascade only writes its record, so with `OOM` Redis refuses
/// it (a cascade that first removes the user from a set goes through: Redis
/// refuses only a script's first write that could grow memory).
struct Lobby {
    n: usize,
}

impl Lobby {
    fn user(i: usize) -> String {
        format!("u-{i}")
    }

    fn game(i: usize) -> String {
        format!("lobby:game:g-{i}")
    }

    fn has_games(i: usize) -> bool {
        i % HELD_EVERY != HELD_EVERY - 1
    }

    fn owns(i: usize) -> bool {
        i % 5 == 0
    }

    fn status(i: usize) -> &'static str {
        STATUSES[i % STATUSES.len()]
    }

    fn seed(&self, conn: &mut redis::Connection) {
        let mut commands = Vec::new();
        for i in (0..self.n).filter(|i| Self::has_games(*i)) {
            let owner = if Self::owns(i) {
                Self::user(i)
            } else {
                format!("o-{i}")
            };
            let mut hset = redis::cmd("HSET");
            hset.arg(Self::game(i))
                .arg("owner_id")
                .arg(&owner)
                .arg("status")
                .arg(Self::status(i));
            let mut members = redis::cmd("SADD");
            members
                .arg(format!("{}:members", Self::game(i)))
                .arg(Self::user(i));
            let mut index = redis::cmd("SADD");
            index
                .arg(format!("lobby:user:{}:games", Self::user(i)))
                .arg(format!("g-{i}"));
            commands.extend([hset, members, index]);
        }
        let _: Vec<redis::Value> = pipelined(conn, commands);
    }

    /// Publishes every user's event; returns the ids.
    fn publish(&self, conn: &mut redis::Connection) -> Vec<String> {
        pipelined(
            conn,
            (0..self.n).map(|i| deletion(&Self::user(i), 1_700_000_000_000 + i as u64)),
        )
    }

    /// The entry id recorded in every user's cascade record.
    fn recorded(&self, conn: &mut redis::Connection) -> Vec<Option<String>> {
        pipelined(
            conn,
            (0..self.n).map(|i| {
                let mut hget = redis::cmd("HGET");
                hget.arg(format!("lobby:user:{}:cascade", Self::user(i)))
                    .arg("entry_id");
                hget
            }),
        )
    }

    fn records(&self, conn: &mut redis::Connection) -> usize {
        self.recorded(conn).iter().flatten().count()
    }

    /// Checks that every user's cascade was applied by their entry, exactly
    /// as the rules say; the `poison` user's not at all.
    fn verify(&self, conn: &mut redis::Connection, ids: &[String], poison: Option<usize>) {
        let on_games =
            |command: &'static str, suffix: &'static str, field: Option<&'static str>| {
                (0..self.n).map(move |i| {
                    let mut cmd = redis::cmd(command);
                    cmd.arg(format!("{}{suffix}", Self::game(i)));
                    if let Some(field) = field {
                        cmd.arg(field);
                    }
                    cmd
                })
            };
        let recorded = self.recorded(conn);
        let games: Vec<Option<String>> = pipelined(
            conn,
            (0..self.n).map(|i| {
                let mut hget = redis::cmd("HGET");
                hget.arg(format!("lobby:user:{}:cascade", Self::user(i)))
                    .arg("games");
                hget
            }),
        );
        let status: Vec<Option<String>> = pipelined(conn, on_games("HGET", "", Some("status")));
        let reason: Vec<Option<String>> =
            pipelined(conn, on_games("HGET", "", Some("cancel_reason")));
        let members: Vec<Vec<String>> = pipelined(conn, on_games("SMEMBERS", ":members", None));
        let dropped: Vec<Vec<String>> = pipelined(conn, on_games("SMEMBERS", ":dropped", None));
        let indexes: Vec<u64> = pipelined(
            conn,
            (0..self.n).map(|i| {
                let mut exists = redis::cmd("EXISTS");
                exists.arg(format!("lobby:user:{}:games", Self::user(i)));
                exists
            }),
        );
        let mut wrong = Vec::new();
        for i in 0..self.n {
            let user = Self::user(i);
            let mut check = |what: &str, actual: String, expected: String| {
                if actual != expected {
                    wrong.push(format!("user {i}: {what} is {actual}, expected {expected}"));
                }
            };
            if poison == Some(i) {
                check("record entry", format!("{:?}", recorded[i]), "None".into());
                check("index exists", indexes[i].to_string(), "1".to_owned());
                continue;
            }
            check(
                "record entry",
                format!("{:?}", recorded[i]),
                format!("{:?}", Some(&ids[i])),
            );
            check("index exists", indexes[i].to_string(), "0".to_owned());
            if !Self::has_games(i) {
                check(
                    "record games",
                    format!("{:?}", games[i]),
                    "Some(\"0\")".into(),
                );
                continue;
            }
            check(
                "record games",
                format!("{:?}", games[i]),
                "Some(\"1\")".into(),
            );
            let st = Self::status(i);
            let cancels = st == "open" && Self::owns(i);
            check(
                "status",
                format!("{:?}", status[i].as_deref()),
                format!("{:?}", Some(if cancels { "cancelled" } else { st })),
            );
            check(
                "cancel reason",
                format!("{:?}", reason[i].as_deref()),
                format!("{:?}", cancels.then_some("user.deleted")),
            );
            let kept = if st == "finished" {
                vec![user.clone()]
            } else {
                vec![]
            };
            check("members", format!("{:?}", members[i]), format!("{kept:?}"));
            let moved = if st == "running" { vec![user] } else { vec![] };
            check("dropped", format!("{:?}", dropped[i]), format!("{moved:?}"));
        }
        assert!(
            wrong.is_empty(),
            "{} differences from the rules, first ones:\n{}",
            wrong.len(),
            wrong[..wrong.len().min(15)].join("\n")
        );
    }
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

/// How Redis is made to refuse writes, and how the refusal is lifted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// `maxmemory` set below the memory used, policy `noeviction`.
    Oom,
    /// A failed `BGSAVE` with `stop-writes-on-bgsave-error yes`.
    Misconf,
}

impl Refusal {
    fn code(self) -> &'static str {
        match self {
            Refusal::Oom => "OOM",
            Refusal::Misconf => "MISCONF",
        }
    }

    fn server(self) -> RedisServer {
        RedisServer::start_with(RedisServerOptions {
            extra_args: vec!["--enable-protected-configs".to_owned(), "yes".to_owned()],
            ..RedisServerOptions::default()
        })
    }

    fn impose(self, server: &RedisServer, conn: &mut redis::Connection) {
        match self {
            Refusal::Oom => {
                let used: u64 = info(conn, "memory")["used_memory"].parse().unwrap();
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

/// The worker's `/metrics` counter `series`.
fn metric(port: u16, series: &str) -> f64 {
    get(port, "/metrics")
        .and_then(|(_, body)| sample(&body, series))
        .unwrap_or_default()
}

/// Lines of `worker`'s log at level `level` that mention `code`.
fn lines_with(worker: &Running, level: &str, code: &str) -> Vec<String> {
    worker
        .log()
        .lines()
        .filter(|line| line.contains(level) && line.contains(code))
        .map(str::to_owned)
        .collect()
}

/// A worker in the middle of a backlog, with everything a test needs to
/// watch it.
struct Scene {
    refusal: Refusal,
    server: RedisServer,
    /// Between the worker and Redis, so that the worker can be stopped in
    /// its tracks while the refusal is imposed: then what it does next is
    /// refused.
    proxy: TcpProxy,
    /// The test's own connection, straight to Redis.
    conn: redis::Connection,
    lobby: Lobby,
    ids: Vec<String>,
    /// The worker's `/metrics` and `/readyz` port.
    port: u16,
    worker: Running,
    began: Instant,
}

impl Scene {
    /// Seeds the lobby, makes user `poison`'s game unusable (its members
    /// key a string: the cascade fails with `WRONGTYPE`), publishes the
    /// backlog and starts `run ARGS` on it.
    fn start(refusal: Refusal, args: &[&str], poison: Option<usize>) -> Self {
        let began = Instant::now();
        let server = refusal.server();
        let proxy = TcpProxy::start(server.port());
        let mut conn = connect(&server.url());
        let lobby = Lobby { n: 3_000 };
        lobby.seed(&mut conn);
        if let Some(i) = poison {
            let members = format!("{}:members", Lobby::game(i));
            server.cli(&["DEL", &members]);
            server.cli(&["SET", &members, "not a set"]);
        }
        let ids = lobby.publish(&mut conn);
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut all = vec![
            "--metrics-addr",
            &addr,
            "--block-timeout",
            "500ms",
            "--retry-initial",
            "20ms",
            "--retry-max",
            "200ms",
            "--batch-size",
            "64",
            // Where the worker is held is exact at concurrency 1 (one
            // cascade at a time, in stream order).
            "--concurrency",
            "1",
        ];
        all.extend_from_slice(args);
        let worker = Running::start(&format!("redis://127.0.0.1:{}/", proxy.port()), &all);
        Self {
            refusal,
            server,
            proxy,
            conn,
            lobby,
            ids,
            port,
            worker,
            began,
        }
    }

    /// Waits until the worker is past user 100, then imposes the refusal
    /// with the worker stopped in its tracks. Returns the users handled by
    /// then.
    fn impose_mid_backlog(&mut self) -> usize {
        let hundredth = format!("lobby:user:{}:cascade", Lobby::user(100));
        let Self { worker, conn, .. } = self;
        wait_for(
            Duration::from_secs(30),
            "the worker is in the middle of the backlog",
            || {
                worker.assert_alive();
                redis::cmd("EXISTS")
                    .arg(&hundredth)
                    .query::<bool>(conn)
                    .unwrap()
            },
        );
        self.proxy.pause();
        self.refusal.impose(&self.server, &mut self.conn);
        let handled = self.lobby.records(&mut self.conn);
        self.proxy.resume();
        handled
    }

    fn metric(&self, series: &str) -> f64 {
        metric(self.port, series)
    }

    /// Waits until `/readyz` tells the refusal (and `condition` holds);
    /// returns its reason.
    fn wait_refusal_told(
        &mut self,
        what: &str,
        mut condition: impl FnMut(&mut Self) -> bool,
    ) -> String {
        let told = format!("Redis refuses writes ({})", self.refusal.code());
        let mut readyz = None;
        wait_for(Duration::from_secs(30), what, || {
            self.worker.assert_alive();
            readyz = get(self.port, "/readyz");
            condition(self)
                && readyz
                    .as_ref()
                    .is_some_and(|(code, reason)| *code == 503 && reason.contains(&told))
        });
        let (_, reason) = readyz.take().unwrap();
        assert_eq!(reason.lines().count(), 1, "{reason}");
        assert_eq!(
            self.metric("lobby_ready"),
            0.0,
            "lobby_ready disagrees with /readyz"
        );
        reason.trim().to_owned()
    }

    /// Lifts the refusal and waits until the worker's offset is at the last
    /// entry and `/readyz` is ready again. Returns how long catching up
    /// took.
    fn lift_and_catch_up(&mut self) -> Duration {
        self.worker.assert_alive();
        self.refusal.lift(&self.server);
        let lifted = Instant::now();
        let last = parse_id(self.ids.last().unwrap());
        let Self { worker, conn, .. } = self;
        wait_for(
            Duration::from_secs(60),
            "the worker catches up after the refusal is lifted",
            || {
                worker.assert_alive();
                let offset: Option<String> = redis::cmd("GET").arg(OFFSET_KEY).query(conn).unwrap();
                offset.is_some_and(|offset| parse_id(&offset) >= last)
            },
        );
        let caught_up = lifted.elapsed();
        let port = self.port;
        wait_for(Duration::from_secs(15), "/readyz is ready again", || {
            get(port, "/readyz").is_some_and(|(code, _)| code == 200)
        });
        caught_up
    }

    /// The dead letters: each one's fields.
    fn dead_letters(&mut self) -> Vec<HashMap<String, String>> {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(DEAD_LETTER_STREAM)
            .arg("-")
            .arg("+")
            .query(&mut self.conn)
            .unwrap();
        reply
            .ids
            .iter()
            .map(|entry| {
                entry
                    .map
                    .iter()
                    .map(|(name, value)| {
                        (
                            name.clone(),
                            redis::from_redis_value_ref::<String>(value).unwrap(),
                        )
                    })
                    .collect()
            })
            .collect()
    }

    /// Stops the worker (SIGTERM: exit 0) and returns its warnings naming
    /// the refusal's code, after checking none was logged as an error.
    fn stop(&mut self) -> Vec<String> {
        self.worker.terminate();
        if std::env::var_os("LOBBY_TEST_LOGS").is_some() {
            println!("{}", self.worker.log());
        }
        let code = self.refusal.code();
        let errors = lines_with(&self.worker, "ERROR", code);
        assert!(errors.is_empty(), "refusals logged as errors: {errors:#?}");
        lines_with(&self.worker, "WARN", code)
    }
}

/// Warnings among `warned` about `action`.
fn about(warned: &[String], action: &str) -> usize {
    warned.iter().filter(|line| line.contains(action)).count()
}

/// A backlog; the refusal imposed in its middle; the worker held while it
/// lasts: it keeps running, says so on `/readyz`, retries the refused
/// cascade more times than `--dead-letter-after` allows; lifted: every event
/// applied, the offset at the last entry, nothing dead-lettered; the
/// refusal logged once per write refused.
fn refused_mid_backlog(refusal: Refusal, dead_letter_after: Option<&str>) {
    let args: Vec<&str> = dead_letter_after
        .map(|limit| vec!["--dead-letter-after", limit])
        .unwrap_or_default();
    let mut scene = Scene::start(refusal, &args, None);
    let at_imposition = scene.impose_mid_backlog();
    let imposed = Instant::now();
    assert!(
        at_imposition < HELD_EVERY - 1,
        "the worker was past the first user it would be held at ({at_imposition} handled)"
    );

    // Held, not ended: the refused cascade is retried (more often than
    // the dead-letter limit) and /readyz says why it is not ready.
    let failures_before = scene.metric("lobby_handler_failures_total");
    let reason = scene.wait_refusal_told(
        "the worker retries the refused cascade and /readyz reports the refusal",
        |scene| scene.metric("lobby_handler_failures_total") >= failures_before + 4.0,
    );
    let refused_answers = errors_answered(&mut scene.conn, refusal.code());
    // With OOM, Redis still takes the cascades that start by removing the
    // user from a set: the worker goes on up to the first it refuses. With
    // MISCONF, it refuses every write: the worker stops where it was.
    let held_at = scene.lobby.records(&mut scene.conn);
    let expected_hold = match refusal {
        Refusal::Oom => HELD_EVERY - 1,
        Refusal::Misconf => at_imposition,
    };
    assert_eq!(held_at, expected_hold, "held at the wrong place");
    assert_eq!(
        scene.metric("lobby_entries_total{outcome=\"dead_lettered\"}"),
        0.0,
        "refused cascades were dead-lettered"
    );
    let refused_for = imposed.elapsed();

    let caught_up = scene.lift_and_catch_up();
    scene.lobby.verify(&mut scene.conn, &scene.ids, None);
    let dead = scene.dead_letters();
    assert!(dead.is_empty(), "entries were dead-lettered: {dead:?}");
    let warned = scene.stop();
    println!(
        "[{refusal:?}, dead-letter-after {dead_letter_after:?}] imposed at {at_imposition} handled, held at {held_at} of {}; Redis answered {} {refused_answers} times; /readyz said {reason:?}; caught up {} ms after the lift ({} ms refused); total {} ms\n  warnings naming {}: {warned:#?}",
        scene.lobby.n,
        refusal.code(),
        caught_up.as_millis(),
        refused_for.as_millis(),
        scene.began.elapsed().as_millis(),
        refusal.code(),
    );
    // Once per episode and path: the first refused offset save, and the
    // first refusal of the cascade held (its retries are debug lines).
    let saves = about(&warned, "save the offset");
    let cascades = about(&warned, "apply the cascade");
    assert!(saves <= 1, "refused offset saves logged {saves} times");
    assert_eq!(
        cascades, 1,
        "the held cascade's refusal logged {cascades} times"
    );
    assert_eq!(
        warned.len(),
        saves + cascades,
        "other warnings: {warned:#?}"
    );
}

#[test]
fn oom_mid_backlog_holds_the_worker_until_lifted_and_nothing_is_lost() {
    refused_mid_backlog(Refusal::Oom, None);
}

#[test]
fn oom_mid_backlog_dead_letters_nothing_and_nothing_is_lost() {
    refused_mid_backlog(Refusal::Oom, Some("2"));
}

#[test]
fn misconf_mid_backlog_dead_letters_nothing_and_nothing_is_lost() {
    refused_mid_backlog(Refusal::Misconf, Some("2"));
}

/// A poison entry (its cascade fails with `WRONGTYPE`, the entry's own
/// fault) reached while Redis refuses writes with `OOM`: after its two
/// attempts its dead letter is refused too, and retried with back-off,
/// holding the worker, until the limit is lifted; then it is written once,
/// and the rest of the backlog handled.
#[test]
fn oom_holds_a_dead_letter_until_lifted_then_it_is_written_once() {
    const POISON: usize = 1_000;
    let mut scene = Scene::start(Refusal::Oom, &["--dead-letter-after", "2"], Some(POISON));
    let at_imposition = scene.impose_mid_backlog();
    assert!(
        at_imposition < POISON,
        "the worker was past the poison entry"
    );
    let refusal_logged = |scene: &Scene| {
        lines_with(&scene.worker, "WARN", "OOM")
            .iter()
            .any(|line| line.contains("add to the dead-letter stream"))
    };
    wait_for(
        Duration::from_secs(30),
        "the dead letter is refused",
        || {
            scene.worker.assert_alive();
            refusal_logged(&scene)
        },
    );
    // Retried: Redis refuses it twice more.
    let answered = errors_answered(&mut scene.conn, "OOM");
    let reason = scene.wait_refusal_told("the dead letter is retried", |scene| {
        errors_answered(&mut scene.conn, "OOM") >= answered + 2
    });
    assert_eq!(
        scene.lobby.records(&mut scene.conn),
        POISON,
        "held at the poison"
    );
    assert!(scene.dead_letters().is_empty());

    scene.lift_and_catch_up();
    let dead = scene.dead_letters();
    assert_eq!(dead.len(), 1, "dead letters: {dead:?}");
    let letter = &dead[0];
    assert_eq!(letter["dead_letter_entry_id"], scene.ids[POISON]);
    assert_eq!(letter["user_id"], Lobby::user(POISON));
    assert_eq!(letter["dead_letter_attempts"], "2");
    assert!(
        letter["dead_letter_error"].contains("WRONGTYPE"),
        "{letter:?}"
    );
    // The failed cascade changed nothing; repaired only so that the lobby
    // can be read as sets.
    let members = format!("{}:members", Lobby::game(POISON));
    assert_eq!(scene.server.cli(&["GET", &members]), "not a set");
    scene.server.cli(&["DEL", &members]);
    scene
        .lobby
        .verify(&mut scene.conn, &scene.ids, Some(POISON));
    let warned = scene.stop();
    println!(
        "[dead letter under OOM] imposed at {at_imposition} handled; /readyz said {reason:?}; dead letter {letter:?}; warnings naming OOM: {warned:#?}"
    );
    let letters = about(&warned, "add to the dead-letter stream");
    assert_eq!(letters, 1, "the refused dead letter logged {letters} times");
    assert!(about(&warned, "save the offset") <= 1);
    assert_eq!(
        warned.len(),
        letters + about(&warned, "save the offset"),
        "other warnings: {warned:#?}"
    );
}
