//! Integration tests of concurrent handling (`ConsumerConfig::concurrency`)
//! against real, private redis-servers (one per test, never the system Redis
//! on 6379).
//!
//! The rules under test (the wording):
//!
//! - up to `concurrency` events are handled at once; events of the same
//!   `user_id` never concurrently and always in stream order;
//! - `concurrency` 1 keeps strict stream order across users;
//! - the saved offset is the low watermark (the highest id with every earlier
//!   entry finished), so a crash never skips an unfinished entry;
//! - the entries held in memory are bounded and reading pauses at the bound;
//! - a failing entry holds only its own user's later entries; the offset
//!   waits at it;
//! - all of that survives a restart in the middle.
//!
//! Synchronisation is by polling a condition with a deadline
//! ([`wait_until!`]) or by a [`Gate`], never by a fixed sleep. The one
//! bounded observation window (reads pausing) asserts an *absence* and says
//! so where it is used.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

#[macro_use]
mod common;

use common::{join, spawn_run, stop};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lifecycle_domain::{
    BoxFuture, EntryId, EventHandler, EventType, HandlerError, StopReason, StreamOffsetStore,
    UserLifecycleConsumer, UserLifecycleEvent, USER_LIFECYCLE_LABEL,
};
use lifecycle_redis::{
    open_client, RedisOffsetStore, RedisUserLifecycleConsumer, DEFAULT_KEY_PREFIX,
};
use lifecycle_streams::{BackoffPolicy, Checkpoint, ConsumerConfig};
use lifecycle_test_support::RedisServer;
use redis::aio::MultiplexedConnection;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const STREAM: &str = "user:lifecycle_events";
const OFFSET_KEY: &str = "lobby:stream_offsets:user_lifecycle";
/// The default patience of a wait: generous, since a passing test never waits it out.
const PATIENCE: Duration = Duration::from_secs(8);

// ---------------------------------------------------------------------------
// The test handler.
// ---------------------------------------------------------------------------

/// A gate that handler calls wait at until it is opened (for good).
#[derive(Default)]
struct Gate {
    open: AtomicBool,
    notify: Notify,
}

impl Gate {
    /// Returns once the gate is open. The waiter is registered before the
    /// flag is checked, so an `open` in between is never missed.
    async fn pass(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }

    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
}

/// One finished handler call.
#[derive(Clone, Debug)]
struct Call {
    run: usize,
    user: String,
    id: EntryId,
    start: Instant,
    end: Instant,
    ok: bool,
}

/// A handler that records every call, checks that no user has two calls in
/// flight, and misbehaves on demand.
#[derive(Default)]
struct Recorder {
    /// The consumer run (session) calls are attributed to.
    run: AtomicUsize,
    /// Every call, in the order they started: (run, user, id).
    started: Mutex<Vec<(usize, String, EntryId)>>,
    /// Every finished call, in the order they finished.
    calls: Mutex<Vec<Call>>,
    /// Calls in flight per user.
    per_user: Mutex<HashMap<String, usize>>,
    /// A description of every moment a user had two calls in flight.
    overlaps: Mutex<Vec<String>>,
    /// Calls in flight, all users.
    in_flight: AtomicUsize,
    /// The most calls ever in flight at once.
    max_in_flight: AtomicUsize,
    /// Every call sleeps between these many milliseconds (inclusive),
    /// chosen from its id.
    delay_ms: Mutex<Option<(u64, u64)>>,
    /// Calls wait at this gate when `gate_all` is set or their id is gated.
    gate: Gate,
    gate_all: AtomicBool,
    gated: Mutex<HashSet<EntryId>>,
    /// Calls for these ids fail (until removed).
    failing: Mutex<HashSet<EntryId>>,
    /// Cancel this token once this many calls of the current run succeeded.
    cancel_after: Mutex<Option<(usize, CancellationToken)>>,
    /// Calls that started after that token was cancelled.
    started_after_cancel: Mutex<Vec<EntryId>>,
}

/// Counts a call in flight; uncounts it when the call ends or is dropped.
struct InFlight<'a> {
    recorder: &'a Recorder,
    user: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(count) = self.recorder.per_user.lock().unwrap().get_mut(&self.user) {
            *count -= 1;
        }
        self.recorder.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Recorder {
    fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn enter(&self, user: &str, id: EntryId) -> InFlight<'_> {
        {
            let mut per_user = self.per_user.lock().unwrap();
            let count = per_user.entry(user.to_owned()).or_default();
            *count += 1;
            if *count > 1 {
                self.overlaps.lock().unwrap().push(format!(
                    "user {user}: entry {id} started with {} other call(s) of the user in flight",
                    *count - 1
                ));
            }
        }
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight {
            recorder: self,
            user: user.to_owned(),
        }
    }

    async fn call(&self, event: &UserLifecycleEvent) -> Result<(), HandlerError> {
        let run = self.run.load(Ordering::SeqCst);
        let user = event.user_id.clone();
        let id = event.entry_id;
        self.started.lock().unwrap().push((run, user.clone(), id));
        let after_cancel = self
            .cancel_after
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|(_, token)| token.is_cancelled());
        if after_cancel {
            self.started_after_cancel.lock().unwrap().push(id);
        }
        let guard = self.enter(&user, id);
        let start = Instant::now();
        let delay = *self.delay_ms.lock().unwrap();
        if let Some((low, high)) = delay {
            let spread = (id.ms ^ id.seq.wrapping_mul(0x9E37_79B9)) % (high - low + 1);
            tokio::time::sleep(Duration::from_millis(low + spread)).await;
        }
        let gated =
            self.gate_all.load(Ordering::SeqCst) || self.gated.lock().unwrap().contains(&id);
        if gated {
            self.gate.pass().await;
        }
        let ok = !self.failing.lock().unwrap().contains(&id);
        let successes = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Call {
                run,
                user: user.clone(),
                id,
                start,
                end: Instant::now(),
                ok,
            });
            calls
                .iter()
                .filter(|call| call.ok && call.run == run)
                .count()
        };
        drop(guard);
        if !ok {
            return Err(HandlerError::msg(format!(
                "entry {id} of user {user} fails on purpose"
            )));
        }
        if let Some((limit, token)) = &*self.cancel_after.lock().unwrap() {
            if successes >= *limit {
                token.cancel();
            }
        }
        Ok(())
    }

    /// Ids whose handling succeeded, in any run.
    fn succeeded(&self) -> HashSet<EntryId> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|call| call.ok)
            .map(|call| call.id)
            .collect()
    }

    /// Ids whose handling succeeded in `run`, in the order they finished.
    fn succeeded_in(&self, run: usize) -> Vec<EntryId> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|call| call.ok && call.run == run)
            .map(|call| call.id)
            .collect()
    }

    /// Ids of the calls started in `run`, in start order.
    fn started_in(&self, run: usize) -> Vec<EntryId> {
        self.started
            .lock()
            .unwrap()
            .iter()
            .filter(|(started_in, _, _)| *started_in == run)
            .map(|(_, _, id)| *id)
            .collect()
    }

    /// Per user, the ids of the calls started in `run`, in start order.
    fn started_per_user(&self, run: usize) -> BTreeMap<String, Vec<EntryId>> {
        let mut per_user: BTreeMap<String, Vec<EntryId>> = BTreeMap::new();
        for (started_in, user, id) in self.started.lock().unwrap().iter() {
            if *started_in == run {
                per_user.entry(user.clone()).or_default().push(*id);
            }
        }
        per_user
    }

    /// Per user, the ids whose handling succeeded in `run`, in finish order.
    fn succeeded_per_user(&self, run: usize) -> BTreeMap<String, Vec<EntryId>> {
        let mut per_user: BTreeMap<String, Vec<EntryId>> = BTreeMap::new();
        for call in self.calls.lock().unwrap().iter() {
            if call.ok && call.run == run {
                per_user.entry(call.user.clone()).or_default().push(call.id);
            }
        }
        per_user
    }

    fn attempts_of(&self, id: EntryId) -> usize {
        self.started
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, started)| *started == id)
            .count()
    }

    fn attempted(&self, id: EntryId) -> bool {
        self.attempts_of(id) > 0
    }

    fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// No user ever had two calls in flight: by the live counter, and by the
    /// recorded intervals (each call of a user ended before its next began).
    fn assert_same_user_calls_never_overlapped(&self) {
        let overlaps = self.overlaps.lock().unwrap().clone();
        assert!(
            overlaps.is_empty(),
            "calls of one user overlapped: {overlaps:#?}"
        );
        let mut per_user: BTreeMap<String, Vec<Call>> = BTreeMap::new();
        for call in self.calls.lock().unwrap().iter() {
            per_user
                .entry(call.user.clone())
                .or_default()
                .push(call.clone());
        }
        for (user, mut calls) in per_user {
            calls.sort_by_key(|call| call.start);
            for pair in calls.windows(2) {
                assert!(
                    pair[0].end <= pair[1].start,
                    "user {user}: call for {} began before the call for {} ended",
                    pair[1].id,
                    pair[0].id
                );
            }
        }
    }
}

impl EventHandler<UserLifecycleEvent> for Recorder {
    fn handle<'a>(
        &'a self,
        event: &'a UserLifecycleEvent,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self.call(event))
    }
}

// ---------------------------------------------------------------------------
// The environment: a private redis-server and helpers around it.
// ---------------------------------------------------------------------------

struct Env {
    server: RedisServer,
    conn: MultiplexedConnection,
}

impl Env {
    async fn start() -> Self {
        let server = RedisServer::start();
        let conn = open_client(&server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        Self { server, conn }
    }

    fn client(&self) -> redis::Client {
        open_client(&self.server.url()).unwrap()
    }

    /// A consumer on this server with `handler` registered.
    fn consumer(
        &self,
        config: ConsumerConfig,
        handler: &Arc<Recorder>,
    ) -> Arc<RedisUserLifecycleConsumer> {
        let store: Arc<dyn StreamOffsetStore> =
            Arc::new(RedisOffsetStore::new(self.client(), DEFAULT_KEY_PREFIX).unwrap());
        let consumer =
            Arc::new(RedisUserLifecycleConsumer::new(self.client(), store, config).unwrap());
        consumer.on_event(Arc::clone(handler) as Arc<dyn EventHandler<UserLifecycleEvent>>);
        consumer
    }

    /// Adds one well-formed event per user, in order and in one round trip,
    /// alternating the two known types; returns their ids.
    async fn publish(&self, users: &[String]) -> Vec<EntryId> {
        let mut pipe = redis::pipe();
        for (i, user) in users.iter().enumerate() {
            let event_type = if i % 2 == 0 {
                EventType::USER_DELETED
            } else {
                EventType::USER_PERMANENTLY_BLOCKED
            };
            pipe.cmd("XADD")
                .arg(STREAM)
                .arg("*")
                .arg("event_type")
                .arg(event_type)
                .arg("user_id")
                .arg(user)
                .arg("occurred_at_ms")
                .arg(1_700_000_000_000_i64 + i as i64);
        }
        let ids: Vec<String> = pipe.query_async(&mut self.conn.clone()).await.unwrap();
        ids.iter().map(|id| id.parse().unwrap()).collect()
    }

    /// Adds an entry with exactly these fields; returns its id.
    async fn publish_fields(&self, fields: &[(&str, &str)]) -> EntryId {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(STREAM).arg("*");
        for (name, value) in fields {
            cmd.arg(*name).arg(*value);
        }
        let id: String = cmd.query_async(&mut self.conn.clone()).await.unwrap();
        id.parse().unwrap()
    }

    /// The stored offset, read with a plain `GET` as an operator would.
    async fn offset(&self) -> Option<EntryId> {
        read_offset(&mut self.conn.clone()).await
    }

    /// One field of `INFO <section>`.
    async fn info_field(&self, section: &str, field: &str) -> Option<String> {
        let info: String = redis::cmd("INFO")
            .arg(section)
            .query_async(&mut self.conn.clone())
            .await
            .unwrap();
        let prefix = format!("{field}:");
        info.lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .map(|value| value.trim().to_owned())
    }

    /// How many `XREAD`s the server has executed (its own count, independent
    /// of the consumer's statistics).
    async fn xread_calls(&self) -> u64 {
        // `cmdstat_xread:calls=3,usec=45,usec_per_call=15.00,...`
        self.info_field("commandstats", "cmdstat_xread")
            .await
            .and_then(|stats| {
                stats
                    .split(',')
                    .find_map(|part| part.strip_prefix("calls="))
                    .map(|calls| calls.parse().unwrap())
            })
            .unwrap_or(0)
    }

    /// How many clients the server reports as blocked (e.g. in `XREAD BLOCK`).
    async fn blocked_clients(&self) -> u64 {
        self.info_field("clients", "blocked_clients")
            .await
            .map_or(0, |count| count.parse().unwrap())
    }
}

async fn read_offset(conn: &mut MultiplexedConnection) -> Option<EntryId> {
    let raw: Option<String> = redis::cmd("GET")
        .arg(OFFSET_KEY)
        .query_async(conn)
        .await
        .unwrap();
    raw.map(|raw| raw.parse().unwrap())
}

/// Short timings, so the whole file runs quickly.
fn config(concurrency: usize) -> ConsumerConfig {
    let mut config = ConsumerConfig::new(STREAM, USER_LIFECYCLE_LABEL);
    config.block_timeout = Duration::from_millis(150);
    config.batch_size = 16;
    config.handler_retry = BackoffPolicy {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(50),
    };
    config.redis_retry = BackoffPolicy {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(250),
    };
    config.shutdown_timeout = Duration::from_secs(2);
    config.connect_timeout = Duration::from_secs(1);
    config.concurrency = concurrency;
    config
}

/// `count` user names out of `u0..u<users>`, scattered deterministically
/// (runs of the same user and long gaps both occur).
fn scattered(count: usize, users: u64, seed: u64) -> Vec<String> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            format!("u{}", (state >> 33) % users)
        })
        .collect()
}

/// Names from a pattern such as `["x", "bad", "x", "y"]`.
fn names(pattern: &[&str]) -> Vec<String> {
    pattern.iter().map(|name| (*name).to_owned()).collect()
}

/// Per user, that user's ids in stream order.
fn per_user(users: &[String], ids: &[EntryId]) -> BTreeMap<String, Vec<EntryId>> {
    let mut per_user: BTreeMap<String, Vec<EntryId>> = BTreeMap::new();
    for (user, id) in users.iter().zip(ids) {
        per_user.entry(user.clone()).or_default().push(*id);
    }
    per_user
}

/// `ids` of `user` only.
fn ids_of(user: &str, users: &[String], ids: &[EntryId]) -> Vec<EntryId> {
    users
        .iter()
        .zip(ids)
        .filter(|(owner, _)| *owner == user)
        .map(|(_, id)| *id)
        .collect()
}

/// `ids` of every user but `user`.
fn ids_not_of(user: &str, users: &[String], ids: &[EntryId]) -> Vec<EntryId> {
    users
        .iter()
        .zip(ids)
        .filter(|(owner, _)| *owner != user)
        .map(|(_, id)| *id)
        .collect()
}

/// Removes consecutive repeats (retries of one entry).
fn dedup(mut ids: Vec<EntryId>) -> Vec<EntryId> {
    ids.dedup();
    ids
}

// ---------------------------------------------------------------------------
// The offset probe: checks the watermark rule on every stored offset it sees.
// ---------------------------------------------------------------------------

struct OffsetProbe {
    stop: CancellationToken,
    task: JoinHandle<ProbeReport>,
}

#[derive(Debug, Default)]
struct ProbeReport {
    samples: usize,
    /// Distinct offsets seen.
    distinct: usize,
    violations: Vec<String>,
}

impl ProbeReport {
    fn assert_clean(&self) {
        assert!(
            self.violations.is_empty(),
            "the stored offset broke the watermark rule ({} samples): {:#?}",
            self.samples,
            self.violations
        );
        assert!(self.samples > 0, "the probe never sampled");
    }
}

/// Polls the stored offset every 2 ms while the test runs. Whenever it reads
/// an offset `O`, every entry of `ids` up to `O` must already have been
/// handled successfully (the handler records success before returning, and
/// the consumer saves only after the return), and `O` must never move
/// backwards.
fn probe_offsets(env: &Env, ids: Vec<EntryId>, recorder: &Arc<Recorder>) -> OffsetProbe {
    let mut conn = env.conn.clone();
    let recorder = Arc::clone(recorder);
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        let mut report = ProbeReport::default();
        let mut last: Option<EntryId> = None;
        loop {
            let offset = read_offset(&mut conn).await;
            report.samples += 1;
            if let Some(offset) = offset {
                let done = recorder.succeeded();
                for id in ids.iter().filter(|id| **id <= offset) {
                    if !done.contains(id) && report.violations.len() < 20 {
                        report.violations.push(format!(
                            "offset {offset} stored while entry {id} was not handled"
                        ));
                    }
                }
                if last.is_some_and(|last| offset < last) {
                    report
                        .violations
                        .push(format!("offset moved backwards to {offset}"));
                }
                if last != Some(offset) {
                    report.distinct += 1;
                }
                last = Some(offset);
            }
            tokio::select! {
                () = stopped.cancelled() => break,
                () = tokio::time::sleep(Duration::from_millis(2)) => {}
            }
        }
        report
    });
    OffsetProbe { stop, task }
}

impl OffsetProbe {
    async fn finish(self) -> ProbeReport {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}

// ---------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------

/// Concurrency 8, 200 events over 10 users (scattered, so one user's entries
/// often queue behind each other): no user ever has two calls in flight,
/// each user's calls start in stream order, different users do overlap
/// (more than one call in flight), never more than 8; every entry handled
/// exactly once; the offset ends at the last id and never passed an
/// unfinished entry on the way.
#[tokio::test]
async fn same_user_entries_never_overlap_and_keep_stream_order_while_users_overlap() {
    let began = Instant::now();
    let env = Env::start().await;
    let users = scattered(200, 10, 1);
    let ids = env.publish(&users).await;
    let last = *ids.last().unwrap();
    let recorder = Recorder::new();
    *recorder.delay_ms.lock().unwrap() = Some((2, 5));
    let consumer = env.consumer(config(8), &recorder);
    let probe = probe_offsets(&env, ids.clone(), &recorder);
    let run = spawn_run(&consumer);

    wait_until!(
        PATIENCE,
        "all 200 entries are handled",
        recorder.succeeded().len() == 200
    );
    wait_until!(
        PATIENCE,
        "the offset reaches the last id",
        env.offset().await == Some(last)
    );
    let report = stop(&consumer, run).await;
    let probe = probe.finish().await;

    assert_eq!(report.reason, StopReason::Cancelled);
    assert_eq!(report.offset, Some(last));
    recorder.assert_same_user_calls_never_overlapped();
    let max = recorder.max_in_flight();
    assert!(
        max > 1,
        "never more than one call in flight: not concurrent"
    );
    assert!(max <= 8, "{max} calls in flight with concurrency 8");
    let expected = per_user(&users, &ids);
    assert_eq!(
        recorder.started_per_user(0),
        expected,
        "a user's entries started out of stream order"
    );
    assert_eq!(
        recorder.succeeded_per_user(0),
        expected,
        "a user's entries finished out of stream order"
    );
    assert_eq!(
        recorder.started_in(0).len(),
        200,
        "an entry was handled twice"
    );
    assert_eq!(consumer.stats().snapshot().handled, 200);
    probe.assert_clean();
    eprintln!(
        "concurrency 8: max in flight {max}, {} offsets seen by the probe, {:?}",
        probe.distinct,
        began.elapsed()
    );
}

/// Concurrency 4, offsets saved after every entry: while user a's first
/// entry is blocked in the handler, the other users' later entries (and an
/// absorbed malformed and unknown-type entry) all finish, yet the stored
/// offset stays at the entry before a's: the low watermark. a's later
/// entries wait. Once released, the offset reaches the last id.
#[tokio::test]
async fn the_saved_offset_is_the_low_watermark_behind_a_blocked_entry() {
    let env = Env::start().await;
    let head_users = names(&["b", "a", "b", "c", "d"]);
    let mut users = head_users.clone();
    let mut ids = env.publish(&head_users).await;
    let before = ids[0];
    let blocked = ids[1];
    let malformed = env
        .publish_fields(&[
            ("event_type", EventType::USER_DELETED),
            ("occurred_at_ms", "1700000000000"),
        ])
        .await;
    let unknown = env
        .publish_fields(&[
            ("event_type", "user.renamed"),
            ("user_id", "c"),
            ("occurred_at_ms", "1700000000000"),
        ])
        .await;
    let tail_users = names(&["a", "b", "c", "d", "a", "b", "c", "d", "a", "c"]);
    let tail = env.publish(&tail_users).await;
    let last = *tail.last().unwrap();
    users.extend(tail_users.iter().cloned());
    ids.extend(tail.iter().copied());

    let recorder = Recorder::new();
    recorder.gated.lock().unwrap().insert(blocked);
    let mut config = config(4);
    config.checkpoint = Checkpoint::EveryEntry;
    let consumer = env.consumer(config, &recorder);
    let probe = probe_offsets(&env, ids.clone(), &recorder);
    let run = spawn_run(&consumer);

    let others = ids_not_of("a", &users, &ids);
    let a_ids = ids_of("a", &users, &ids);
    wait_until!(
        PATIENCE,
        "a's first entry is in the handler and every other user's entry is handled",
        recorder.attempted(blocked) && {
            let done = recorder.succeeded();
            others.iter().all(|id| done.contains(id))
        }
    );
    let stats = consumer.stats().snapshot();
    assert_eq!(
        (stats.malformed, stats.unknown_type),
        (1, 1),
        "the absorbed entries after the blocked one are settled"
    );
    wait_until!(
        PATIENCE,
        "the entry before the blocked one is stored",
        env.offset().await == Some(before)
    );
    let while_blocked = env.offset().await;
    assert!(
        while_blocked < Some(blocked),
        "offset {while_blocked:?} at or past the unfinished entry {blocked}"
    );
    for id in &a_ids[1..] {
        assert!(
            !recorder.attempted(*id),
            "a's entry {id} started while a's first entry was in the handler"
        );
    }
    assert!(
        malformed > blocked && unknown > blocked,
        "test setup: absorbed entries come after the blocked one"
    );

    recorder.gate.open();
    wait_until!(
        PATIENCE,
        "a's entries are handled",
        a_ids.iter().all(|id| recorder.succeeded().contains(id))
    );
    wait_until!(
        PATIENCE,
        "the offset reaches the last id",
        env.offset().await == Some(last)
    );
    let report = stop(&consumer, run).await;
    let probe = probe.finish().await;

    assert_eq!(report.offset, Some(last));
    recorder.assert_same_user_calls_never_overlapped();
    assert_eq!(recorder.started_per_user(0), per_user(&users, &ids));
    assert!(recorder.max_in_flight() <= 4);
    probe.assert_clean();
}

/// Concurrency 4: user "bad"'s first entry fails until a flag flips. Every
/// other user's entries are handled meanwhile, "bad"'s later entries are not
/// started, and the stored offset waits just before the failing entry. After
/// the flip, everything is handled, "bad"'s entries in order, and the offset
/// reaches the last id.
#[tokio::test]
async fn a_failing_entry_holds_only_its_own_users_later_entries() {
    let env = Env::start().await;
    let mut users = names(&["x", "bad"]);
    for _ in 0..9 {
        users.extend(names(&["x", "y", "z", "bad"]));
    }
    let ids = env.publish(&users).await;
    let (before, failing) = (ids[0], ids[1]);
    let last = *ids.last().unwrap();
    let recorder = Recorder::new();
    recorder.failing.lock().unwrap().insert(failing);
    let mut config = config(4);
    // Everything fits in the held bytes (16 MiB by default), so the cap is
    // not what stops the other users here.
    config.batch_size = 64;
    let consumer = env.consumer(config, &recorder);
    let probe = probe_offsets(&env, ids.clone(), &recorder);
    let run = spawn_run(&consumer);

    let others = ids_not_of("bad", &users, &ids);
    let bad = ids_of("bad", &users, &ids);
    wait_until!(
        PATIENCE,
        "the other users' entries are handled while bad's first fails repeatedly",
        recorder.attempts_of(failing) >= 3 && {
            let done = recorder.succeeded();
            others.iter().all(|id| done.contains(id))
        }
    );
    for id in &bad[1..] {
        assert!(
            !recorder.attempted(*id),
            "bad's entry {id} started while bad's first entry was failing"
        );
    }
    assert!(!recorder.succeeded().contains(&failing));
    wait_until!(
        PATIENCE,
        "the progress up to the failing entry is stored",
        env.offset().await == Some(before)
    );
    let held = env.offset().await;
    assert!(
        held < Some(failing),
        "offset {held:?} at or past the failing entry {failing}"
    );
    assert!(consumer.stats().snapshot().handler_failures >= 3);

    recorder.failing.lock().unwrap().clear();
    wait_until!(
        PATIENCE,
        "every entry is handled",
        recorder.succeeded().len() == ids.len()
    );
    wait_until!(
        PATIENCE,
        "the offset reaches the last id",
        env.offset().await == Some(last)
    );
    let report = stop(&consumer, run).await;
    let probe = probe.finish().await;

    assert_eq!(report.offset, Some(last));
    recorder.assert_same_user_calls_never_overlapped();
    let started = recorder.started_per_user(0);
    assert_eq!(
        dedup(started["bad"].clone()),
        bad,
        "bad's entries started out of order (retries aside)"
    );
    assert_eq!(recorder.succeeded_per_user(0)["bad"], bad);
    assert_eq!(
        recorder.succeeded_per_user(0),
        per_user(&users, &ids),
        "an entry was handled twice or out of its user's order"
    );
    probe.assert_clean();
}

/// Concurrency 8, 300 events over 30 users, a slow-ish handler: the first
/// consumer is shut down after about 120 entries. Every id up to the stored
/// offset was handled (nothing skipped); a new consumer starts right after
/// the stored offset, handles exactly the rest, each user in order; the two
/// runs together cover all 300. The entries handled twice are at most the
/// held window.
#[tokio::test]
async fn a_restart_in_the_middle_neither_skips_nor_reorders() {
    let began = Instant::now();
    let env = Env::start().await;
    let users = scattered(300, 30, 7);
    let ids = env.publish(&users).await;
    let last = *ids.last().unwrap();
    let all = per_user(&users, &ids);
    let recorder = Recorder::new();
    *recorder.delay_ms.lock().unwrap() = Some((2, 6));
    let config = config(8);
    let probe = probe_offsets(&env, ids.clone(), &recorder);

    // First run: stops itself after 120 successes.
    let first = env.consumer(config.clone(), &recorder);
    *recorder.cancel_after.lock().unwrap() = Some((120, first.cancellation()));
    let report = join(spawn_run(&first), PATIENCE)
        .await
        .expect("first run failed");
    assert_eq!(report.reason, StopReason::Cancelled);
    let stored = env.offset().await.expect("the first run stored no offset");
    assert_eq!(report.offset, Some(stored));
    assert!(
        !report.offset_unsaved,
        "the final offset of the first run was not saved"
    );
    let first_done: HashSet<EntryId> = recorder.succeeded_in(0).into_iter().collect();
    assert!(first_done.len() >= 120, "{}", first_done.len());
    assert!(first_done.len() < 300, "the first run consumed everything");
    let skipped: Vec<EntryId> = ids
        .iter()
        .filter(|id| **id <= stored && !first_done.contains(id))
        .copied()
        .collect();
    assert!(
        skipped.is_empty(),
        "stored offset {stored} is past unhandled entries {skipped:?}"
    );
    let smallest_unfinished = ids.iter().find(|id| !first_done.contains(id)).copied();
    assert!(
        Some(stored) < smallest_unfinished,
        "offset {stored} not below the first unfinished entry {smallest_unfinished:?}"
    );
    let ahead = first_done.iter().filter(|id| **id > stored).count();
    let peak = first.stats().snapshot().held_bytes_peak;
    assert!(
        peak <= config.max_held_bytes as u64,
        "{peak} bytes held, more than the cap of {}",
        config.max_held_bytes
    );
    for (user, started) in recorder.started_per_user(0) {
        assert_eq!(
            started,
            all[&user][..started.len()],
            "first run: user {user}'s entries started out of order or with a gap"
        );
    }

    // Second run: a new consumer with a healthy handler.
    recorder.run.store(1, Ordering::SeqCst);
    *recorder.cancel_after.lock().unwrap() = None;
    let second = env.consumer(config, &recorder);
    let run = spawn_run(&second);
    wait_until!(
        PATIENCE,
        "the two runs together handled every entry",
        recorder.succeeded().len() == 300
    );
    wait_until!(
        PATIENCE,
        "the offset reaches the last id",
        env.offset().await == Some(last)
    );
    let report = stop(&second, run).await;
    let probe = probe.finish().await;
    assert_eq!(report.offset, Some(last));

    let rest: Vec<EntryId> = ids.iter().filter(|id| **id > stored).copied().collect();
    let mut second_started = recorder.started_in(1);
    assert_eq!(
        second_started.len(),
        rest.len(),
        "the second run did not handle exactly the entries after the stored offset once each"
    );
    second_started.sort();
    assert_eq!(
        second_started, rest,
        "the second run did not resume right after the stored offset"
    );
    let rest_users: Vec<String> = users
        .iter()
        .zip(&ids)
        .filter(|(_, id)| **id > stored)
        .map(|(user, _)| user.clone())
        .collect();
    assert_eq!(
        recorder.started_per_user(1),
        per_user(&rest_users, &rest),
        "second run: a user's entries started out of order"
    );
    let union = recorder.succeeded();
    assert!(ids.iter().all(|id| union.contains(id)));
    let twice = recorder
        .succeeded_in(1)
        .iter()
        .filter(|id| first_done.contains(id))
        .count();
    assert_eq!(twice, ahead);
    recorder.assert_same_user_calls_never_overlapped();
    assert!(recorder.max_in_flight() <= 8);
    probe.assert_clean();
    eprintln!(
        "restart: first run handled {}, {} call(s) began after its shutdown was requested, \
         stored offset at index {}, {twice} handled twice, {:?}",
        first_done.len(),
        recorder.started_after_cancel.lock().unwrap().len(),
        ids.iter().position(|id| *id == stored).unwrap(),
        began.elapsed()
    );
}

/// The smallest byte budget: replies of 64 KiB, 128 KiB held.
fn small_budget(config: &mut ConsumerConfig) {
    config.max_reply_bytes = 64 * 1024;
    config.max_held_bytes = 128 * 1024;
}

/// Reading pauses at the byte cap, measured by the engine's own accounting:
/// concurrency 2, two users alternating, every call blocked. Both users'
/// first entries run; the rest queue behind them until the held bytes leave
/// no room for another reply, then no read is sent, however many entries
/// wait in the stream. Once the calls are released, everything is handled.
#[tokio::test]
async fn reading_pauses_when_the_held_bytes_reach_the_cap() {
    let env = Env::start().await;
    let users: Vec<String> = (0..2000)
        .map(|i| if i % 2 == 0 { "left" } else { "right" }.to_owned())
        .collect();
    let ids = env.publish(&users).await;
    let last = *ids.last().unwrap();
    let recorder = Recorder::new();
    recorder.gate_all.store(true, Ordering::SeqCst);
    let mut config = config(2);
    config.batch_size = 10;
    small_budget(&mut config);
    let cap = config.max_held_bytes as u64;
    let room_for_a_read = (config.max_held_bytes - config.max_reply_bytes) as u64;
    let consumer = env.consumer(config, &recorder);
    let stats = consumer.stats();
    let run = spawn_run(&consumer);

    wait_until!(
        PATIENCE,
        "two handler calls are in flight",
        recorder.in_flight.load(Ordering::SeqCst) == 2
    );
    wait_until!(
        PATIENCE,
        "reading stops: the held bytes leave no room for another reply",
        env.xread_calls().await == stats.snapshot().reads
            && env.blocked_clients().await == 0
            && stats.snapshot().held_bytes + 256 * 10 > room_for_a_read
    );
    let paused = stats.snapshot();
    assert!(
        paused.held_bytes <= cap,
        "{} bytes held over the cap {cap}",
        paused.held_bytes
    );
    assert!(
        (paused.held_entries as usize) < ids.len(),
        "everything was read although the cap was reached"
    );
    // A bounded observation window, acceptable only because it asserts an
    // absence (no further reads): a consumer that kept reading would reach
    // far beyond within milliseconds, since 2000 entries are ready.
    let window = Instant::now() + Duration::from_millis(300);
    while Instant::now() < window {
        assert_eq!(
            stats.snapshot().reads,
            paused.reads,
            "a read was sent at the cap"
        );
        assert_eq!(env.xread_calls().await, paused.reads);
        assert_eq!(recorder.started_in(0).len(), 2, "a third call started");
        tokio::time::sleep(common::POLL).await;
    }
    assert!(recorder.max_in_flight() <= 2);

    recorder.gate.open();
    wait_until!(
        PATIENCE,
        "all 2000 entries are handled",
        recorder.succeeded().len() == 2000
    );
    wait_until!(
        PATIENCE,
        "the offset reaches the last id",
        env.offset().await == Some(last)
    );
    let report = stop(&consumer, run).await;
    assert_eq!(report.offset, Some(last));
    let end = stats.snapshot();
    assert!(
        end.held_bytes_peak <= cap,
        "peak {} over the cap {cap}",
        end.held_bytes_peak
    );
    recorder.assert_same_user_calls_never_overlapped();
    assert_eq!(recorder.started_per_user(0), per_user(&users, &ids));
    eprintln!(
        "cap {cap}: paused after {} reads holding {} entries, {} bytes; peak {}",
        paused.reads, paused.held_entries, paused.held_bytes, end.held_bytes_peak
    );
}

/// Concurrency 1 keeps strict global stream order across users: calls start
/// and finish in exactly stream order, one at a time.
#[tokio::test]
async fn concurrency_one_keeps_strict_stream_order_across_users() {
    let env = Env::start().await;
    let users = scattered(60, 5, 3);
    let ids = env.publish(&users).await;
    let last = *ids.last().unwrap();
    let recorder = Recorder::new();
    *recorder.delay_ms.lock().unwrap() = Some((0, 2));
    let config = config(1);
    let consumer = env.consumer(config, &recorder);
    let run = spawn_run(&consumer);

    wait_until!(
        PATIENCE,
        "all 60 entries are handled",
        recorder.succeeded().len() == 60
    );
    wait_until!(
        PATIENCE,
        "the offset reaches the last id",
        env.offset().await == Some(last)
    );
    let report = stop(&consumer, run).await;
    assert_eq!(report.offset, Some(last));
    assert_eq!(
        recorder.started_in(0),
        ids,
        "calls started out of stream order"
    );
    assert_eq!(
        recorder.succeeded_in(0),
        ids,
        "calls finished out of stream order"
    );
    assert_eq!(recorder.max_in_flight(), 1);
}

/// Failures and a restart together: with concurrency 4, user "bad"'s first
/// entry fails; the others are handled; shutting down stores the offset
/// just before the failing entry. A new consumer (the dependency healthy
/// again) starts at the failing entry: it is handled, then bad's later
/// entries in order, and the others' entries after it are replayed (at
/// least once), none skipped.
#[tokio::test]
async fn a_restart_while_an_entry_fails_resumes_at_the_failing_entry() {
    let env = Env::start().await;
    let mut users = names(&["x", "bad"]);
    for _ in 0..5 {
        users.extend(names(&["x", "y", "bad"]));
    }
    let ids = env.publish(&users).await;
    let (before, failing) = (ids[0], ids[1]);
    let last = *ids.last().unwrap();
    let recorder = Recorder::new();
    recorder.failing.lock().unwrap().insert(failing);
    let config = config(4);
    let probe = probe_offsets(&env, ids.clone(), &recorder);

    let first = env.consumer(config.clone(), &recorder);
    let run = spawn_run(&first);
    let others = ids_not_of("bad", &users, &ids);
    wait_until!(
        PATIENCE,
        "the other users' entries are handled while bad's first fails",
        recorder.attempts_of(failing) >= 2 && {
            let done = recorder.succeeded();
            others.iter().all(|id| done.contains(id))
        }
    );
    let report = stop(&first, run).await;
    assert_eq!(
        report.offset,
        Some(before),
        "shutdown stored an offset other than the one just before the failing entry"
    );
    assert_eq!(env.offset().await, Some(before));

    recorder.failing.lock().unwrap().clear();
    recorder.run.store(1, Ordering::SeqCst);
    let second = env.consumer(config, &recorder);
    let run = spawn_run(&second);
    wait_until!(
        PATIENCE,
        "the second run handles everything from the failing entry on",
        recorder.succeeded_in(1).len() == ids.len() - 1
    );
    wait_until!(
        PATIENCE,
        "the offset reaches the last id",
        env.offset().await == Some(last)
    );
    let report = stop(&second, run).await;
    let probe = probe.finish().await;
    assert_eq!(report.offset, Some(last));
    assert_eq!(
        recorder.succeeded_per_user(1),
        per_user(&users[1..], &ids[1..]),
        "the second run skipped, repeated or reordered entries"
    );
    assert_eq!(
        recorder.attempts_of(ids[0]),
        1,
        "the entry before the offset was replayed"
    );
    recorder.assert_same_user_calls_never_overlapped();
    probe.assert_clean();
}

/// Shutdown with concurrency 4 starts no new handler call: the calls in
/// flight may finish, but entries dispatched and not yet begun stay for the
/// next run (as with concurrency 1, see `tests/consumer.rs`,
/// `a_slow_handler_call_finishes_within_the_shutdown_grace`). The handler
/// requests the shutdown itself, on its first success.
#[tokio::test]
async fn no_handler_call_starts_after_shutdown_was_requested() {
    let env = Env::start().await;
    let users = names(&["a", "b", "c", "d", "e", "f"]);
    let ids = env.publish(&users).await;
    let recorder = Recorder::new();
    let consumer = env.consumer(config(4), &recorder);
    *recorder.cancel_after.lock().unwrap() = Some((1, consumer.cancellation()));
    let report = join(spawn_run(&consumer), PATIENCE)
        .await
        .expect("run failed");
    assert_eq!(report.reason, StopReason::Cancelled);
    let late = recorder.started_after_cancel.lock().unwrap().clone();
    let done = recorder.succeeded_in(0);
    // Whatever was handled, nothing is skipped.
    let stored = env.offset().await;
    assert!(ids
        .iter()
        .filter(|id| Some(**id) <= stored)
        .all(|id| done.contains(id)));
    assert!(
        late.is_empty(),
        "{} handler call(s) started after shutdown was requested: {late:?} (handled: {done:?})",
        late.len()
    );
}

/// The byte cap applies with a failing entry too: "bad"'s first entry fails;
/// the other users go on only while the entries held (the failing one and
/// those after it, finished but behind the watermark) leave room for a
/// reply, then reading and handling pause while the failing entry is
/// retried. After the fix, everything is handled.
#[tokio::test]
async fn with_a_failing_entry_the_others_go_on_only_up_to_the_byte_cap() {
    let env = Env::start().await;
    let mut users = names(&["bad"]);
    for i in 0..3000 {
        users.push(if i % 2 == 0 { "x" } else { "y" }.to_owned());
    }
    let ids = env.publish(&users).await;
    let failing = ids[0];
    let last = *ids.last().unwrap();
    let recorder = Recorder::new();
    recorder.failing.lock().unwrap().insert(failing);
    let mut config = config(2);
    config.batch_size = 10;
    small_budget(&mut config);
    let cap = config.max_held_bytes as u64;
    let room_for_a_read = (config.max_held_bytes - config.max_reply_bytes) as u64;
    let consumer = env.consumer(config, &recorder);
    let stats = consumer.stats();
    let run = spawn_run(&consumer);

    wait_until!(
        PATIENCE,
        "the failing entry is retried and the others stop at the cap",
        recorder.attempts_of(failing) >= 3
            && stats.snapshot().held_bytes + 256 * 10 > room_for_a_read
            && recorder.in_flight.load(Ordering::SeqCst) <= 1
    );
    let handled = recorder.succeeded().len();
    let attempts = recorder.attempts_of(failing);
    wait_until!(
        PATIENCE,
        "the failing entry is retried three more times",
        recorder.attempts_of(failing) >= attempts + 3
    );
    assert_eq!(
        recorder.succeeded().len(),
        handled,
        "entries were handled while the cap was reached"
    );
    assert!(handled > 10, "only {handled} others handled before the cap");
    assert!(
        !recorder.attempted(last),
        "the last entry ran while the first failed"
    );
    assert!(stats.snapshot().held_bytes <= cap);
    assert_eq!(
        env.offset().await,
        None,
        "offset stored past the failing entry"
    );

    recorder.failing.lock().unwrap().clear();
    wait_until!(
        PATIENCE,
        "every entry is handled",
        recorder.succeeded().len() == ids.len()
    );
    wait_until!(
        PATIENCE,
        "the offset reaches the last id",
        env.offset().await == Some(last)
    );
    let report = stop(&consumer, run).await;
    assert_eq!(report.offset, Some(last));
    assert!(stats.snapshot().held_bytes_peak <= cap);
    recorder.assert_same_user_calls_never_overlapped();
    assert_eq!(recorder.succeeded_per_user(0), per_user(&users, &ids));
}

/// Entries trimmed past the position while a backlog drains at concurrency
/// 64 are reported, every time: the engine reads one entry beyond what it
/// dispatches, and finding that entry gone proves the loss. Twenty
/// repetitions, each on a fresh server: calls are held at a gate so that
/// reading pauses at the byte cap, the stream is trimmed well past what was
/// read, then the calls are released.
#[tokio::test]
async fn a_trim_past_the_position_during_a_concurrent_drain_is_reported_every_time() {
    for repetition in 0..20 {
        let env = Env::start().await;
        let users = scattered(3000, 100, repetition);
        let ids = env.publish(&users).await;
        let last = *ids.last().unwrap();
        let recorder = Recorder::new();
        recorder.gate_all.store(true, Ordering::SeqCst);
        let mut config = config(64);
        small_budget(&mut config);
        let room_for_a_read = (config.max_held_bytes - config.max_reply_bytes) as u64;
        let consumer = env.consumer(config, &recorder);
        let stats = consumer.stats();
        let run = spawn_run(&consumer);
        wait_until!(
            PATIENCE,
            "reading pauses at the byte cap",
            stats.snapshot().held_bytes + 256 * 10 > room_for_a_read
                && env.xread_calls().await == stats.snapshot().reads
                && env.blocked_clients().await == 0
        );
        let read = stats.snapshot().held_entries as usize;
        assert!(
            read + 600 < ids.len(),
            "{read} entries read before the pause"
        );
        let kept_from = read + 500;
        env.server
            .cli(&["XTRIM", STREAM, "MINID", &ids[kept_from].to_string()]);
        recorder.gate.open();
        wait_until!(
            PATIENCE,
            "the offset reaches the last id",
            env.offset().await == Some(last)
        );
        let report = stop(&consumer, run).await;
        assert_eq!(report.offset, Some(last));
        let snapshot = stats.snapshot();
        assert_eq!(
            snapshot.trimmed, 1,
            "repetition {repetition}: the trim past the position was not reported ({} read before it)",
            read
        );
        let succeeded = recorder.succeeded();
        assert!(ids[..read].iter().all(|id| succeeded.contains(id)));
        assert!(ids[read..kept_from]
            .iter()
            .all(|id| !succeeded.contains(id)));
        assert!(ids[kept_from..].iter().all(|id| succeeded.contains(id)));
        recorder.assert_same_user_calls_never_overlapped();
    }
}
