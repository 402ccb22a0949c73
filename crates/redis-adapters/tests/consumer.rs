//! Integration tests of the user-lifecycle consumer against real, private
//! redis-servers (one per test, never the system Redis on 6379).
//!
//! Synchronisation is always by polling a condition with a deadline
//! ([`wait_until!`]) or by a `Notify`, never by a fixed sleep.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

#[macro_use]
mod common;

use common::{connect, join, spawn_run, stop};

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lifecycle_domain::{
    BoxFuture, EntryId, EventHandler, EventType, HandlerError, SaveOutcome, StopReason,
    StreamOffsetStore, UserLifecycleConsumer, UserLifecycleEvent, USER_LIFECYCLE_LABEL,
};
use lifecycle_redis::{
    open_client, RedisOffsetStore, RedisUserLifecycleConsumer, DEFAULT_KEY_PREFIX,
};
use lifecycle_streams::{BackoffPolicy, Checkpoint, ConsumerConfig, ConsumerError, StartFrom};
use lifecycle_test_support::{RedisServer, RedisServerOptions, TcpProxy};
use redis::aio::MultiplexedConnection;
use redis::streams::StreamRangeReply;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const STREAM: &str = "user:lifecycle_events";
const DEAD_LETTER_STREAM: &str = "user:lifecycle_events:dead";
const OFFSET_KEY: &str = "lobby:stream_offsets:user_lifecycle";
/// The default patience of a wait: generous, since a passing test never waits it out.
const PATIENCE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// The test handler.
// ---------------------------------------------------------------------------

/// A handler that records every call and every success, and misbehaves on
/// demand.
#[derive(Default)]
struct Recorder {
    /// Every call (attempt), with the moment it started.
    attempts: Mutex<Vec<(EntryId, Instant)>>,
    /// Every event whose handling succeeded, in order.
    handled: Mutex<Vec<UserLifecycleEvent>>,
    /// Sleep this long in every call (a "slow dependency").
    delay: Mutex<Duration>,
    /// Sleep this long in calls for this user.
    slow_user: Mutex<Option<(String, Duration)>>,
    /// Calls for this user wait on `gate` before finishing.
    gated_user: Mutex<Option<String>>,
    gate: Notify,
    /// Calls for these users fail this many more times.
    fail_times: Mutex<HashMap<String, u32>>,
    /// Calls for this user fail until it is cleared.
    failing_user: Mutex<Option<String>>,
    /// Cancel this token once this many events were handled.
    cancel_after: Mutex<Option<(usize, CancellationToken)>>,
}

impl Recorder {
    fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn handled_ids(&self) -> Vec<EntryId> {
        self.handled
            .lock()
            .unwrap()
            .iter()
            .map(|event| event.entry_id)
            .collect()
    }

    fn handled_count(&self) -> usize {
        self.handled.lock().unwrap().len()
    }

    fn attempt_ids(&self) -> Vec<EntryId> {
        self.attempts
            .lock()
            .unwrap()
            .iter()
            .map(|(id, _)| *id)
            .collect()
    }

    fn attempts_at(&self, id: EntryId) -> Vec<Instant> {
        self.attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|(attempt, _)| *attempt == id)
            .map(|(_, at)| *at)
            .collect()
    }

    fn attempted(&self, id: EntryId) -> bool {
        self.attempt_ids().contains(&id)
    }

    async fn call(&self, event: &UserLifecycleEvent) -> Result<(), HandlerError> {
        self.attempts
            .lock()
            .unwrap()
            .push((event.entry_id, Instant::now()));
        let user = event.user_id.as_str();
        let delay = *self.delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let slow = self
            .slow_user
            .lock()
            .unwrap()
            .as_ref()
            .filter(|(slow, _)| slow == user)
            .map(|(_, pause)| *pause);
        if let Some(pause) = slow {
            tokio::time::sleep(pause).await;
        }
        let gated = self.gated_user.lock().unwrap().as_deref() == Some(user);
        if gated {
            self.gate.notified().await;
        }
        if self.failing_user.lock().unwrap().as_deref() == Some(user) {
            return Err(HandlerError::msg(format!(
                "poison pill: cannot handle user {user}"
            )));
        }
        if let Some(left) = self.fail_times.lock().unwrap().get_mut(user) {
            if *left > 0 {
                *left -= 1;
                return Err(HandlerError::msg(format!(
                    "dependency unavailable for user {user} ({left} failures left)"
                )));
            }
        }
        let count = {
            let mut handled = self.handled.lock().unwrap();
            handled.push(event.clone());
            handled.len()
        };
        if let Some((limit, token)) = &*self.cancel_after.lock().unwrap() {
            if count >= *limit {
                token.cancel();
            }
        }
        Ok(())
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
        Self::start_with(RedisServerOptions::default()).await
    }

    async fn start_with(options: RedisServerOptions) -> Self {
        let server = RedisServer::start_with(options);
        let conn = connect(&server).await;
        Self { server, conn }
    }

    /// Replaces the test's connection, e.g. after a server restart.
    async fn reconnect(&mut self) {
        self.conn = connect(&self.server).await;
    }

    fn client(&self) -> redis::Client {
        open_client(&self.server.url()).unwrap()
    }

    fn offset_store(&self) -> RedisOffsetStore {
        RedisOffsetStore::new(self.client(), DEFAULT_KEY_PREFIX).unwrap()
    }

    /// A consumer on this server with `handler` registered.
    fn consumer(
        &self,
        config: ConsumerConfig,
        handler: &Arc<Recorder>,
    ) -> Arc<RedisUserLifecycleConsumer> {
        let consumer = self.consumer_without_handler(config);
        consumer.on_event(Arc::clone(handler) as Arc<dyn EventHandler<UserLifecycleEvent>>);
        consumer
    }

    fn consumer_without_handler(&self, config: ConsumerConfig) -> Arc<RedisUserLifecycleConsumer> {
        let store: Arc<dyn StreamOffsetStore> = Arc::new(self.offset_store());
        Arc::new(RedisUserLifecycleConsumer::new(self.client(), store, config).unwrap())
    }

    /// Adds a well-formed event; returns its id.
    async fn publish(&self, user: &str, event_type: &str) -> EntryId {
        self.publish_fields(&[
            (b"event_type".as_slice(), event_type.as_bytes()),
            (b"user_id", user.as_bytes()),
            (b"occurred_at_ms", b"1700000000000"),
        ])
        .await
    }

    /// Adds an entry with exactly these fields; returns its id.
    async fn publish_fields(&self, fields: &[(&[u8], &[u8])]) -> EntryId {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(STREAM).arg("*");
        for (name, value) in fields {
            cmd.arg(*name).arg(*value);
        }
        let id: String = cmd.query_async(&mut self.conn.clone()).await.unwrap();
        id.parse().unwrap()
    }

    /// Adds `count` well-formed events for users `u0..u6` in one round trip,
    /// alternating the two known types; returns their ids in order.
    async fn publish_many(&self, count: usize) -> Vec<EntryId> {
        let mut pipe = redis::pipe();
        for i in 0..count {
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
                .arg(format!("u{}", i % 7))
                .arg("occurred_at_ms")
                .arg(1_700_000_000_000_i64 + i as i64);
        }
        let ids: Vec<String> = pipe.query_async(&mut self.conn.clone()).await.unwrap();
        ids.iter().map(|id| id.parse().unwrap()).collect()
    }

    /// The stored offset, read with a plain `GET` as an operator would.
    async fn offset(&self) -> Option<EntryId> {
        let raw: Option<String> = redis::cmd("GET")
            .arg(OFFSET_KEY)
            .query_async(&mut self.conn.clone())
            .await
            .unwrap();
        raw.map(|raw| raw.parse().unwrap())
    }

    /// How many clients Redis reports as blocked (e.g. in `XREAD BLOCK`).
    async fn blocked_clients(&self) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("clients")
            .query_async(&mut self.conn.clone())
            .await
            .unwrap();
        info.lines()
            .find_map(|line| line.strip_prefix("blocked_clients:"))
            .map(|count| count.trim().parse().unwrap())
            .unwrap_or(0)
    }
}

/// Short timings, so the whole file runs quickly.
fn config() -> ConsumerConfig {
    let mut config = ConsumerConfig::new(STREAM, USER_LIFECYCLE_LABEL);
    // These tests pin stream order across users, which is concurrency 1's;
    // tests/concurrency.rs covers the default.
    config.concurrency = 1;
    config.block_timeout = Duration::from_millis(150);
    config.batch_size = 16;
    config.handler_retry = BackoffPolicy {
        initial: Duration::from_millis(20),
        max: Duration::from_secs(10),
    };
    config.redis_retry = BackoffPolicy {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(250),
    };
    config.shutdown_timeout = Duration::from_secs(2);
    config.connect_timeout = Duration::from_secs(1);
    config
}

// ---------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn entries_are_handled_in_exact_stream_order_and_the_offset_ends_at_the_last() {
    let env = Env::start().await;
    let ids = env.publish_many(50).await;
    let recorder = Recorder::new();
    let consumer = env.consumer(config(), &recorder);
    let run = spawn_run(&consumer);

    wait_until!(
        PATIENCE,
        "50 entries are handled",
        recorder.handled_count() >= 50
    );
    let last = *ids.last().unwrap();
    wait_until!(
        PATIENCE,
        "the offset reaches the last id",
        env.offset().await == Some(last)
    );

    let report = stop(&consumer, run).await;
    assert_eq!(report.reason, StopReason::Cancelled);
    assert_eq!(report.offset, Some(last));
    assert_eq!(recorder.handled_ids(), ids, "handled out of stream order");
    assert_eq!(recorder.attempt_ids(), ids, "an entry was handled twice");
    for (i, event) in recorder.handled.lock().unwrap().iter().enumerate() {
        assert_eq!(event.user_id, format!("u{}", i % 7));
        let expected = if i % 2 == 0 {
            EventType::UserDeleted
        } else {
            EventType::UserPermanentlyBlocked
        };
        assert_eq!(event.event_type, expected);
        assert_eq!(event.occurred_at_ms, 1_700_000_000_000 + i as i64);
    }
    let stats = consumer.stats().snapshot();
    assert_eq!(stats.handled, 50);
    assert_eq!(stats.finished(), 50);
    assert_eq!(env.offset().await, Some(last));
}

#[tokio::test]
async fn the_offset_is_saved_only_after_the_handler_succeeded() {
    let env = Env::start().await;
    let first = env.publish("u1", EventType::USER_DELETED).await;
    let second = env.publish("u2", EventType::USER_DELETED).await;
    let third = env.publish("gated", EventType::USER_DELETED).await;
    let fourth = env.publish("u4", EventType::USER_PERMANENTLY_BLOCKED).await;
    let recorder = Recorder::new();
    *recorder.gated_user.lock().unwrap() = Some("gated".into());
    let mut config = config();
    config.checkpoint = Checkpoint::EveryEntry;
    config.batch_size = 1;
    let consumer = env.consumer(config, &recorder);
    let run = spawn_run(&consumer);

    wait_until!(
        PATIENCE,
        "the handler is called for the 3rd entry",
        recorder.attempted(third)
    );
    let while_blocked = env.offset().await;
    assert_eq!(
        while_blocked,
        Some(second),
        "offset while the 3rd entry is in the handler"
    );
    assert!(while_blocked.unwrap() < third);
    assert_eq!(recorder.handled_ids(), vec![first, second]);
    assert!(
        !recorder.attempted(fourth),
        "the 4th entry ran before the 3rd finished"
    );

    recorder.gate.notify_one();
    wait_until!(
        PATIENCE,
        "the offset moves past the 3rd entry",
        env.offset().await >= Some(third)
    );
    wait_until!(
        PATIENCE,
        "the offset reaches the last entry",
        env.offset().await == Some(fourth)
    );

    let report = stop(&consumer, run).await;
    assert_eq!(report.offset, Some(fourth));
    assert_eq!(recorder.handled_ids(), vec![first, second, third, fourth]);
}

#[tokio::test]
async fn malformed_and_unknown_type_entries_are_absorbed() {
    let env = Env::start().await;
    let good = env.publish("alice", EventType::USER_DELETED).await;
    let mut bad = vec![
        env.publish_fields(&[
            (b"event_type".as_slice(), b"user.deleted".as_slice()),
            (b"occurred_at_ms", b"1700000000000"),
        ])
        .await,
        env.publish_fields(&[
            (b"event_type".as_slice(), b"user.deleted".as_slice()),
            (b"user_id", b"carol"),
            (b"occurred_at_ms", b"17000x"),
        ])
        .await,
        env.publish_fields(&[
            (b"event_type".as_slice(), b"user.deleted".as_slice()),
            (b"user_id", b"dave"),
            (b"occurred_at_ms", b"0"),
        ])
        .await,
        env.publish_fields(&[
            (b"event_type".as_slice(), b"user.deleted".as_slice()),
            (b"user_id", &[0xff, 0xfe, b'x']),
            (b"occurred_at_ms", b"1700000000000"),
        ])
        .await,
    ];
    let unknown = env.publish("erin", "user.renamed").await;
    let also_good = env
        .publish_fields(&[
            (
                b"event_type".as_slice(),
                b"user.permanently_blocked".as_slice(),
            ),
            (b"user_id", b"  bob \t"),
            (b"occurred_at_ms", b"+1700000000001"),
            (b"source", b"admin-console"),
        ])
        .await;
    bad.push(
        env.publish_fields(&[(b"user_id".as_slice(), b"frank".as_slice())])
            .await,
    );
    let last = *bad.last().unwrap();

    let recorder = Recorder::new();
    let consumer = env.consumer(config(), &recorder);
    let run = spawn_run(&consumer);
    wait_until!(
        PATIENCE,
        "all 8 entries are finished",
        consumer.stats().snapshot().finished() >= 8
    );
    wait_until!(
        PATIENCE,
        "the offset reaches the last id",
        env.offset().await == Some(last)
    );
    let report = stop(&consumer, run).await;

    assert_eq!(recorder.handled_ids(), vec![good, also_good]);
    assert_eq!(recorder.attempt_ids(), vec![good, also_good]);
    let handled = recorder.handled.lock().unwrap().clone();
    assert_eq!(handled[0].user_id, "alice");
    assert_eq!(handled[1].user_id, "bob", "user_id is stored trimmed");
    assert_eq!(handled[1].occurred_at_ms, 1_700_000_000_001);
    assert_eq!(handled[1].source, "admin-console");
    assert!(!recorder.attempted(unknown));
    let stats = consumer.stats().snapshot();
    assert_eq!(stats.malformed, 5, "{stats:?}");
    assert_eq!(stats.unknown_type, 1, "{stats:?}");
    assert_eq!(stats.handled, 2, "{stats:?}");
    assert_eq!(stats.handler_failures, 0, "{stats:?}");
    assert_eq!(report.offset, Some(last));
}

#[tokio::test]
async fn a_failing_handler_is_retried_with_growing_delays_holding_the_offset() {
    let env = Env::start().await;
    let before = env.publish("steady", EventType::USER_DELETED).await;
    let flaky = env.publish("flaky", EventType::USER_DELETED).await;
    let after = vec![
        env.publish("later1", EventType::USER_DELETED).await,
        env.publish("later2", EventType::USER_PERMANENTLY_BLOCKED)
            .await,
    ];
    let recorder = Recorder::new();
    recorder
        .fail_times
        .lock()
        .unwrap()
        .insert("flaky".into(), 4);
    let mut config = config();
    config.checkpoint = Checkpoint::EveryEntry;
    let consumer = env.consumer(config, &recorder);
    let run = spawn_run(&consumer);

    wait_until!(
        PATIENCE,
        "the flaky entry failed twice",
        recorder.attempts_at(flaky).len() >= 2
    );
    let held = env.offset().await;
    assert_eq!(
        held,
        Some(before),
        "offset while the flaky entry keeps failing"
    );
    assert_eq!(recorder.handled_ids(), vec![before]);

    wait_until!(
        PATIENCE,
        "the flaky entry is handled",
        recorder.handled_ids().contains(&flaky)
    );
    let last = *after.last().unwrap();
    wait_until!(
        PATIENCE,
        "the offset reaches the last id",
        env.offset().await == Some(last)
    );
    stop(&consumer, run).await;

    let attempts = recorder.attempts_at(flaky);
    assert_eq!(attempts.len(), 5, "4 failures and 1 success");
    // The delays' growth is pinned in virtual time by the engine's unit
    // tests; here, only what load cannot make false: no hot loop (each delay
    // is at least half its ceiling, 20 ms doubling: 10 + 20 + 40 + 80 ms).
    let gaps: Vec<Duration> = attempts.windows(2).map(|pair| pair[1] - pair[0]).collect();
    assert!(
        gaps[0] >= Duration::from_millis(10),
        "first retry too early: {gaps:?}"
    );
    assert!(
        attempts[4] - attempts[0] >= Duration::from_millis(150),
        "retries came too fast: {gaps:?}"
    );
    let mut expected = vec![before, flaky, flaky, flaky, flaky, flaky];
    expected.extend(&after);
    assert_eq!(
        recorder.attempt_ids(),
        expected,
        "a later entry ran before the flaky one"
    );
    let mut handled = vec![before, flaky];
    handled.extend(&after);
    assert_eq!(recorder.handled_ids(), handled);
    let stats = consumer.stats().snapshot();
    assert_eq!(stats.handler_failures, 4);
    assert_eq!(stats.handled, 4);
    assert_eq!(stats.dead_lettered, 0);
}

#[tokio::test]
async fn an_entry_failing_n_times_is_dead_lettered_and_the_rest_is_handled() {
    let env = Env::start().await;
    let first = env.publish("alice", EventType::USER_DELETED).await;
    let poison = env
        .publish_fields(&[
            (b"event_type".as_slice(), b"user.deleted".as_slice()),
            (b"user_id", b"poison"),
            (b"occurred_at_ms", b"1700000000123"),
            (b"source", b"billing"),
            (b"trace_id", b"trace-42"),
        ])
        .await;
    let rest = vec![
        env.publish("bob", EventType::USER_PERMANENTLY_BLOCKED)
            .await,
        env.publish("carol", EventType::USER_DELETED).await,
    ];
    let last = *rest.last().unwrap();
    let recorder = Recorder::new();
    *recorder.failing_user.lock().unwrap() = Some("poison".into());
    let mut config = config();
    config.dead_letter_after = Some(3);
    let consumer = env.consumer(config, &recorder);
    let run = spawn_run(&consumer);

    wait_until!(
        PATIENCE,
        "the offset reaches the last id",
        env.offset().await == Some(last)
    );
    let report = stop(&consumer, run).await;
    assert_eq!(report.offset, Some(last));

    let mut handled = vec![first];
    handled.extend(&rest);
    assert_eq!(recorder.handled_ids(), handled);
    assert_eq!(recorder.attempts_at(poison).len(), 3);
    let stats = consumer.stats().snapshot();
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");
    assert_eq!(stats.handler_failures, 3, "{stats:?}");
    assert_eq!(stats.handled, 3, "{stats:?}");

    let reply: StreamRangeReply = redis::cmd("XRANGE")
        .arg(DEAD_LETTER_STREAM)
        .arg("-")
        .arg("+")
        .query_async(&mut env.conn.clone())
        .await
        .unwrap();
    assert_eq!(reply.ids.len(), 1, "exactly one dead letter");
    let dead = &reply.ids[0];
    let field = |name: &str| -> String {
        dead.get(name)
            .unwrap_or_else(|| panic!("dead letter lacks {name}: {:?}", dead.map))
    };
    assert_eq!(field("event_type"), "user.deleted");
    assert_eq!(field("user_id"), "poison");
    assert_eq!(field("occurred_at_ms"), "1700000000123");
    assert_eq!(field("source"), "billing");
    assert_eq!(field("trace_id"), "trace-42");
    assert_eq!(field("dead_letter_entry_id"), poison.to_string());
    assert_eq!(field("dead_letter_attempts"), "3");
    assert_eq!(field("dead_letter_stream"), STREAM);
    let error = field("dead_letter_error");
    assert!(
        error.contains("poison pill: cannot handle user poison"),
        "{error}"
    );
}

#[tokio::test]
async fn a_new_consumer_resumes_from_the_saved_offset() {
    let env = Env::start().await;
    let ids = env.publish_many(100).await;
    let mut config = config();
    config.batch_size = 10;

    let first_recorder = Recorder::new();
    let first_consumer = env.consumer(config.clone(), &first_recorder);
    *first_recorder.cancel_after.lock().unwrap() = Some((35, first_consumer.cancellation()));
    let run = spawn_run(&first_consumer);
    let report = join(run, PATIENCE).await.expect("first run failed");
    assert_eq!(report.reason, StopReason::Cancelled);
    let first = first_recorder.handled_ids();
    assert!(first.len() >= 35, "{}", first.len());
    assert!(first.len() < 100, "the first run consumed everything");
    assert_eq!(first, ids[..first.len()], "first run out of order");
    let saved = env.offset().await;
    assert_eq!(
        saved,
        first.last().copied(),
        "shutdown persists the offset of the last handled entry"
    );
    assert_eq!(report.offset, saved);

    let second_recorder = Recorder::new();
    let second_consumer = env.consumer(config, &second_recorder);
    let run = spawn_run(&second_consumer);
    let last = *ids.last().unwrap();
    wait_until!(
        PATIENCE,
        "the second consumer reaches the last entry",
        second_recorder.handled_ids().contains(&last)
    );
    stop(&second_consumer, run).await;

    let second = second_recorder.handled_ids();
    let union: HashSet<EntryId> = first.iter().chain(&second).copied().collect();
    for id in &ids {
        assert!(union.contains(id), "{id} was never handled");
    }
    let first_set: HashSet<EntryId> = first.iter().copied().collect();
    let twice = second.iter().filter(|id| first_set.contains(id)).count();
    assert!(
        twice <= 10,
        "{twice} entries handled twice, more than one batch"
    );
    let resumed_at = ids.iter().position(|id| *id == second[0]).unwrap();
    assert_eq!(
        second,
        ids[resumed_at..],
        "the second run skipped or reordered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_rides_out_a_redis_kill_and_restart() {
    let mut env = Env::start_with(RedisServerOptions {
        append_only: true,
        ..RedisServerOptions::default()
    })
    .await;
    let mut ids = env.publish_many(200).await;
    let recorder = Recorder::new();
    *recorder.delay.lock().unwrap() = Duration::from_millis(1);
    let mut config = config();
    config.batch_size = 20;
    let consumer = env.consumer(config, &recorder);
    let run = spawn_run(&consumer);

    wait_until!(
        PATIENCE,
        "50 entries are handled",
        recorder.handled_count() >= 50
    );
    tokio::task::block_in_place(|| env.server.kill());
    wait_until!(
        PATIENCE,
        "the consumer notices the outage",
        consumer.stats().snapshot().redis_faults >= 1
    );
    assert!(!run.is_finished(), "run ended while Redis was down");
    tokio::task::block_in_place(|| env.server.restart());
    env.reconnect().await;
    ids.extend(env.publish_many(50).await);
    assert_eq!(ids.len(), 250);

    let expected: HashSet<EntryId> = ids.iter().copied().collect();
    wait_until!(
        Duration::from_secs(20),
        "all 250 entries are handled",
        recorder.handled_ids().into_iter().collect::<HashSet<_>>() == expected
    );
    let last = *ids.last().unwrap();
    wait_until!(
        PATIENCE,
        "the offset reaches the last id",
        env.offset().await == Some(last)
    );
    let report = stop(&consumer, run).await;
    assert_eq!(report.offset, Some(last));
    let stats = consumer.stats().snapshot();
    assert!(stats.redis_faults >= 1, "{stats:?}");
    assert!(stats.reconnects >= 1, "{stats:?}");
    let handled = recorder.handled_ids();
    // Replays after the outage are allowed; the first time each entry is seen
    // must still follow stream order.
    let mut seen = HashSet::new();
    let firsts: Vec<EntryId> = handled.into_iter().filter(|id| seen.insert(*id)).collect();
    assert_eq!(
        firsts, ids,
        "entries were first handled out of stream order"
    );
}

#[tokio::test]
async fn cancellation_interrupts_a_long_blocking_read_promptly() {
    let env = Env::start().await;
    let recorder = Recorder::new();
    let mut config = config();
    config.block_timeout = Duration::from_secs(30);
    let consumer = env.consumer(config, &recorder);
    let run = spawn_run(&consumer);

    wait_until!(
        PATIENCE,
        "the first read is sent",
        consumer.stats().snapshot().reads >= 1
    );
    wait_until!(
        PATIENCE,
        "Redis reports the consumer blocked in XREAD",
        env.blocked_clients().await >= 1
    );
    let cancelled_at = Instant::now();
    consumer.cancellation().cancel();
    let report = tokio::time::timeout(Duration::from_secs(2), run)
        .await
        .expect("run did not return within 2 s of cancellation")
        .expect("the run task panicked")
        .expect("run ended with an error");
    assert_eq!(report.reason, StopReason::Cancelled);
    assert!(cancelled_at.elapsed() < Duration::from_secs(2));
    assert_eq!(report.offset, None);
    assert_eq!(consumer.stats().snapshot().reads, 1);
}

#[tokio::test]
async fn a_stream_key_of_another_type_ends_run_with_a_clear_error() {
    let env = Env::start().await;
    let _: () = redis::cmd("SET")
        .arg(STREAM)
        .arg("not a stream")
        .query_async(&mut env.conn.clone())
        .await
        .unwrap();
    let recorder = Recorder::new();
    let consumer = env.consumer(config(), &recorder);
    let result = join(spawn_run(&consumer), PATIENCE).await;
    let err = result.expect_err("run must fail on a WRONGTYPE stream key");
    match &err {
        ConsumerError::WrongType { key } => assert_eq!(key, STREAM),
        other => panic!("expected WrongType, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains(STREAM), "{message}");
    assert!(message.contains("not a stream"), "{message}");
    assert_eq!(recorder.attempt_ids(), vec![]);
}

#[tokio::test]
async fn running_without_a_handler_is_an_error() {
    let env = Env::start().await;
    env.publish("alice", EventType::USER_DELETED).await;
    let consumer = env.consumer_without_handler(config());
    let result = join(spawn_run(&consumer), PATIENCE).await;
    assert!(
        matches!(result, Err(ConsumerError::NoHandler)),
        "{result:?}"
    );
    let via_port = UserLifecycleConsumer::run(consumer.as_ref()).await;
    assert!(
        matches!(via_port, Err(ConsumerError::NoHandler)),
        "{via_port:?}"
    );
    assert_eq!(consumer.stats().snapshot().reads, 0, "nothing may be read");
    assert_eq!(env.offset().await, None);
}

#[tokio::test]
async fn offset_saves_compare_ids_numerically_and_never_move_backwards() {
    let env = Env::start().await;
    let store = env.offset_store();
    let label = USER_LIFECYCLE_LABEL;
    let id = |text: &str| -> EntryId { text.parse().unwrap() };
    assert_eq!(store.key(label), OFFSET_KEY);
    assert_eq!(store.get(label).await.unwrap(), None);

    assert!(store.save_if_larger(label, id("9-0")).await.unwrap());
    assert!(
        store.save_if_larger(label, id("10-0")).await.unwrap(),
        "10-0 is after 9-0 (a string comparison would say otherwise)"
    );
    assert_eq!(env.offset().await, Some(id("10-0")));
    assert!(
        !store.save_if_larger(label, id("9-999")).await.unwrap(),
        "smaller"
    );
    assert!(
        !store.save_if_larger(label, id("10-0")).await.unwrap(),
        "equal"
    );
    assert_eq!(env.offset().await, Some(id("10-0")));

    assert!(store.save_if_larger(label, id("10-9")).await.unwrap());
    assert!(
        store.save_if_larger(label, id("10-10")).await.unwrap(),
        "10-10 is after 10-9"
    );
    assert!(!store.save_if_larger(label, id("10-9")).await.unwrap());
    assert_eq!(env.offset().await, Some(id("10-10")));
    let other = "other_label";
    assert!(store.save_if_larger(other, id("5-9")).await.unwrap());
    assert!(
        store.save_if_larger(other, id("5-10")).await.unwrap(),
        "5-10 is after 5-9"
    );
    assert!(!store.save_if_larger(other, id("5-9")).await.unwrap());
    assert_eq!(store.get(other).await.unwrap(), Some(id("5-10")));
    assert_eq!(
        store.get(label).await.unwrap(),
        Some(id("10-10")),
        "labels are separate"
    );

    // Sequences beyond 2^53 (where Lua's doubles lose precision) and u64::MAX.
    assert!(store
        .save_if_larger(label, id("10-9007199254740992"))
        .await
        .unwrap());
    assert!(store
        .save_if_larger(label, id("10-9007199254740993"))
        .await
        .unwrap());
    assert!(!store
        .save_if_larger(label, id("10-9007199254740992"))
        .await
        .unwrap());
    let max_seq = EntryId::new(10, u64::MAX);
    assert!(store.save_if_larger(label, max_seq).await.unwrap());
    assert!(!store
        .save_if_larger(label, EntryId::new(10, u64::MAX - 1))
        .await
        .unwrap());
    assert_eq!(store.get(label).await.unwrap(), Some(max_seq));
    assert!(store.save_if_larger(label, id("11-0")).await.unwrap());
    assert!(store.save_if_larger(label, EntryId::MAX).await.unwrap());
    assert!(!store.save_if_larger(label, id("11-0")).await.unwrap());
    assert_eq!(store.get(label).await.unwrap(), Some(EntryId::MAX));

    // The port's save keeps the larger id too.
    assert_eq!(
        StreamOffsetStore::save(&store, label, id("5-0"), None)
            .await
            .unwrap(),
        SaveOutcome::Kept(EntryId::MAX)
    );
    assert_eq!(
        StreamOffsetStore::load(&store, label).await.unwrap(),
        Some(EntryId::MAX)
    );
    // A store behind what the saver expects (it lost writes, or an operator
    // rewound it) is not written, and says what it holds.
    store.set(label, id("3-0")).await.unwrap();
    assert_eq!(
        store
            .save_checked(label, id("6-0"), Some(id("5-0")))
            .await
            .unwrap(),
        SaveOutcome::Behind(Some(id("3-0")))
    );
    assert_eq!(env.offset().await, Some(id("3-0")));
    assert_eq!(
        store
            .save_checked(label, id("6-0"), Some(id("3-0")))
            .await
            .unwrap(),
        SaveOutcome::Saved
    );
    store.reset(label).await.unwrap();
    assert_eq!(
        store
            .save_checked(label, id("7-0"), Some(id("6-0")))
            .await
            .unwrap(),
        SaveOutcome::Behind(None)
    );
    assert_eq!(env.offset().await, None);
    store.set(label, EntryId::MAX).await.unwrap();

    // An operator's `set` may rewind; `reset` deletes.
    store.set(label, id("1-0")).await.unwrap();
    assert_eq!(env.offset().await, Some(id("1-0")));
    assert!(store.save_if_larger(label, id("2-0")).await.unwrap());
    assert!(store.reset(label).await.unwrap());
    let exists: i64 = redis::cmd("EXISTS")
        .arg(OFFSET_KEY)
        .query_async(&mut env.conn.clone())
        .await
        .unwrap();
    assert_eq!(exists, 0);
    assert_eq!(store.get(label).await.unwrap(), None);
    assert!(!store.reset(label).await.unwrap(), "nothing left to reset");
    assert!(
        store.save_if_larger(label, id("1-0")).await.unwrap(),
        "saves after a reset"
    );
}

#[tokio::test]
async fn drain_mode_stops_at_the_last_entry_present_at_start() {
    let env = Env::start().await;
    let mut ids = vec![env.publish("gatekeeper", EventType::USER_DELETED).await];
    ids.extend(env.publish_many(29).await);
    let last = *ids.last().unwrap();
    let recorder = Recorder::new();
    *recorder.gated_user.lock().unwrap() = Some("gatekeeper".into());
    let mut config = config();
    config.drain = true;
    config.batch_size = 8;
    let consumer = env.consumer(config, &recorder);
    let run = spawn_run(&consumer);

    // Once the first entry is in the handler, the drain target is fixed:
    // what is added now lies beyond it.
    wait_until!(
        PATIENCE,
        "the first entry is in the handler",
        recorder.attempted(ids[0])
    );
    let late = env.publish_many(5).await;
    recorder.gate.notify_one();

    let report = join(run, PATIENCE).await.expect("drain failed");
    assert_eq!(report.reason, StopReason::Drained);
    assert_eq!(report.offset, Some(last));
    assert_eq!(env.offset().await, Some(last));
    assert_eq!(recorder.handled_ids(), ids);
    for id in late {
        assert!(
            !recorder.attempted(id),
            "{id}, added after start, was handled"
        );
    }
}

#[tokio::test]
async fn start_from_end_skips_existing_entries_and_saves_its_position_at_once() {
    let env = Env::start().await;
    let existing = env.publish_many(5).await;
    let recorder = Recorder::new();
    let mut config = config();
    config.start_from = StartFrom::End;
    // Long enough that a save at the end of the first (empty) read would
    // come far too late for the wait below.
    config.block_timeout = Duration::from_secs(10);
    let consumer = env.consumer(config, &recorder);
    let run = spawn_run(&consumer);

    let existing_last = *existing.last().unwrap();
    wait_until!(
        Duration::from_secs(3),
        "the resolved start position is stored",
        env.offset().await == Some(existing_last)
    );
    let fresh = vec![
        env.publish("new1", EventType::USER_DELETED).await,
        env.publish("new2", EventType::USER_PERMANENTLY_BLOCKED)
            .await,
    ];
    wait_until!(
        PATIENCE,
        "the new entries are handled",
        recorder.handled_count() >= 2
    );
    wait_until!(
        PATIENCE,
        "the offset reaches the last new entry",
        env.offset().await == Some(fresh[1])
    );
    let report = stop(&consumer, run).await;
    assert_eq!(report.offset, Some(fresh[1]));
    assert_eq!(recorder.handled_ids(), fresh);
    for id in existing {
        assert!(!recorder.attempted(id), "existing entry {id} was handled");
    }
}

#[tokio::test]
async fn a_slow_handler_call_finishes_within_the_shutdown_grace() {
    let env = Env::start().await;
    let first = env.publish("alice", EventType::USER_DELETED).await;
    let slow = env.publish("slowpoke", EventType::USER_DELETED).await;
    let after = vec![
        env.publish("bob", EventType::USER_DELETED).await,
        env.publish("carol", EventType::USER_DELETED).await,
    ];
    let recorder = Recorder::new();
    *recorder.slow_user.lock().unwrap() = Some(("slowpoke".into(), Duration::from_millis(300)));
    let mut config = config();
    config.shutdown_timeout = Duration::from_secs(2);
    let consumer = env.consumer(config, &recorder);
    let run = spawn_run(&consumer);

    wait_until!(
        PATIENCE,
        "the slow call is in flight",
        recorder.attempted(slow)
    );
    let cancelled_at = Instant::now();
    consumer.shutdown();
    let report = join(run, Duration::from_secs(3))
        .await
        .expect("run ended with an error");
    let took = cancelled_at.elapsed();
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    assert_eq!(report.reason, StopReason::Cancelled);
    assert_eq!(
        report.offset,
        Some(slow),
        "the finished slow entry is included"
    );
    assert_eq!(env.offset().await, Some(slow));
    assert_eq!(recorder.handled_ids(), vec![first, slow]);
    for id in after {
        assert!(
            !recorder.attempted(id),
            "{id}: a handler call started after shutdown was requested"
        );
    }
}

/// Trimmed while no worker ran: the stream now begins after the stored
/// offset. Redis keeps no record of what the trim removed, so the worker
/// cannot prove entries lay in between: it reports a *possible* trim (a
/// warning and its own counter), not a loss.
#[tokio::test]
async fn a_stream_beginning_after_the_stored_offset_is_a_possible_trim() {
    let env = Env::start().await;
    let ids = env.publish_many(10).await;
    env.offset_store()
        .set(USER_LIFECYCLE_LABEL, ids[2])
        .await
        .unwrap();
    env.server
        .cli(&["XTRIM", "user:lifecycle_events", "MAXLEN", "4"]);
    let recorder = Recorder::new();
    let mut config = config();
    config.drain = true;
    let consumer = env.consumer(config, &recorder);
    let report = join(spawn_run(&consumer), PATIENCE).await.unwrap();
    assert_eq!(report.offset, Some(ids[9]));
    assert_eq!(recorder.handled_ids(), ids[6..].to_vec());
    let stats = consumer.stats().snapshot();
    assert_eq!((stats.trimmed, stats.trims_suspected), (0, 1));
}

/// A trim that stops exactly at the first unhandled entry (`MINID` of the
/// entry right after the offset) removed nothing unhandled: no loss, not
/// even a possible one.
#[tokio::test]
async fn a_trim_exactly_at_the_offset_is_not_reported() {
    let env = Env::start().await;
    for seq in 1..=6 {
        env.server.cli(&[
            "XADD",
            STREAM,
            &format!("5-{seq}"),
            "event_type",
            "user.deleted",
            "user_id",
            "u",
            "occurred_at_ms",
            "17",
        ]);
    }
    env.offset_store()
        .set(USER_LIFECYCLE_LABEL, EntryId::new(5, 3))
        .await
        .unwrap();
    env.server.cli(&["XTRIM", STREAM, "MINID", "5-4"]);
    let recorder = Recorder::new();
    let mut config = config();
    config.drain = true;
    let consumer = env.consumer(config, &recorder);
    let report = join(spawn_run(&consumer), PATIENCE).await.unwrap();
    assert_eq!(report.offset, Some(EntryId::new(5, 6)));
    assert_eq!(recorder.handled_count(), 3);
    let stats = consumer.stats().snapshot();
    assert_eq!((stats.trimmed, stats.trims_suspected), (0, 0));
}

/// The stream deleted and re-created with ids below the stored offset: every
/// new entry would be skipped. The worker reports it (an error and the trim
/// counter) rather than saying nothing.
#[tokio::test]
async fn a_stream_recreated_below_the_offset_is_reported() {
    let env = Env::start().await;
    env.offset_store()
        .set(USER_LIFECYCLE_LABEL, EntryId::new(9_000_000_000_000, 0))
        .await
        .unwrap();
    env.publish("u1", EventType::USER_DELETED).await;
    let recorder = Recorder::new();
    let consumer = env.consumer(config(), &recorder);
    let stats = consumer.stats();
    let run = spawn_run(&consumer);
    wait_until!(
        PATIENCE,
        "the stream behind the offset is reported",
        stats.snapshot().trimmed == 1
    );
    let report = stop(&consumer, run).await;
    assert_eq!(report.offset, Some(EntryId::new(9_000_000_000_000, 0)));
    assert_eq!(recorder.handled_count(), 0);
}

#[tokio::test]
async fn trimming_behind_the_offset_is_not_a_loss() {
    let env = Env::start().await;
    let ids = env.publish_many(10).await;
    env.offset_store()
        .set(USER_LIFECYCLE_LABEL, ids[5])
        .await
        .unwrap();
    // Only entries already handled are trimmed away.
    env.server
        .cli(&["XTRIM", "user:lifecycle_events", "MAXLEN", "5"]);
    let recorder = Recorder::new();
    let mut config = config();
    config.drain = true;
    let consumer = env.consumer(config, &recorder);
    join(spawn_run(&consumer), PATIENCE).await.unwrap();
    assert_eq!(recorder.handled_ids(), ids[6..].to_vec());
    assert_eq!(consumer.stats().snapshot().trimmed, 0);
}

#[tokio::test]
async fn entries_deleted_ahead_of_the_offset_are_noticed() {
    let env = Env::start().await;
    let ids = env.publish_many(10).await;
    env.offset_store()
        .set(USER_LIFECYCLE_LABEL, ids[2])
        .await
        .unwrap();
    env.server
        .cli(&["XDEL", "user:lifecycle_events", &ids[4].to_string()]);
    let recorder = Recorder::new();
    let mut config = config();
    config.drain = true;
    let consumer = env.consumer(config, &recorder);
    join(spawn_run(&consumer), PATIENCE).await.unwrap();
    let mut expected = vec![ids[3]];
    expected.extend_from_slice(&ids[5..]);
    assert_eq!(recorder.handled_ids(), expected);
    assert_eq!(consumer.stats().snapshot().trimmed, 1);
}

/// A live consumer, caught up, takes the deletion probe along only once a
/// second: an entry deleted before it was read is still reported, by the
/// next probe, and the entries after it are handled.
#[tokio::test]
async fn an_entry_deleted_unread_while_caught_up_is_reported_by_the_next_probe() {
    let env = Env::start().await;
    let before = env.publish_many(3).await;
    let recorder = Recorder::new();
    let consumer = env.consumer(config(), &recorder);
    let run = spawn_run(&consumer);
    wait_until!(
        PATIENCE,
        "the backlog is handled",
        recorder.handled_ids() == before
    );
    // Two entries added and the first deleted in one transaction: the
    // blocked read is served after it, with the second entry only.
    let reply = env.server.cli(&[
        "EVAL",
        "local gone = redis.call('XADD', KEYS[1], '*', 'event_type', 'user.deleted', 'user_id', 'gone', 'occurred_at_ms', '1700000000000') \
         local kept = redis.call('XADD', KEYS[1], '*', 'event_type', 'user.deleted', 'user_id', 'kept', 'occurred_at_ms', '1700000000000') \
         redis.call('XDEL', KEYS[1], gone) return kept",
        "1",
        "user:lifecycle_events",
    ]);
    let kept: EntryId = reply.trim().parse().unwrap();
    wait_until!(
        PATIENCE,
        "the entry after the deleted one is handled",
        recorder.handled_ids().last() == Some(&kept)
    );
    wait_until!(
        PATIENCE,
        "the next probe reports the deleted entry",
        consumer.stats().snapshot().trimmed == 1
    );
    consumer.shutdown();
    join(run, PATIENCE).await.unwrap();
    let mut expected = before;
    expected.push(kept);
    assert_eq!(recorder.handled_ids(), expected);
}

/// Fails the first `transient` calls as a dependency outage, then succeeds.
struct Outage {
    remaining: Mutex<u32>,
    handled: Mutex<Vec<EntryId>>,
}

impl EventHandler<UserLifecycleEvent> for Outage {
    fn handle<'a>(
        &'a self,
        event: &'a UserLifecycleEvent,
    ) -> lifecycle_domain::BoxFuture<'a, Result<(), HandlerError>> {
        let mut remaining = self.remaining.lock().unwrap();
        let result = if *remaining > 0 {
            *remaining -= 1;
            Err(HandlerError::msg("lobby store unreachable").transient())
        } else {
            self.handled.lock().unwrap().push(event.entry_id);
            Ok(())
        };
        Box::pin(std::future::ready(result))
    }
}

#[tokio::test]
async fn a_dependency_outage_never_dead_letters_an_entry() {
    let env = Env::start().await;
    let ids = env.publish_many(3).await;
    let handler = Arc::new(Outage {
        remaining: Mutex::new(6),
        handled: Mutex::new(Vec::new()),
    });
    let mut config = config();
    config.drain = true;
    config.dead_letter_after = Some(2);
    config.redis_retry = BackoffPolicy {
        initial: Duration::from_millis(5),
        max: Duration::from_millis(20),
    };
    let consumer = env.consumer_without_handler(config);
    consumer.on_event(handler.clone());
    let report = join(spawn_run(&consumer), PATIENCE).await.unwrap();
    assert_eq!(report.offset, ids.last().copied());
    assert_eq!(*handler.handled.lock().unwrap(), ids);
    let stats = consumer.stats().snapshot();
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    assert_eq!(stats.handler_failures, 6);
    assert_eq!(env.server.cli(&["EXISTS", DEAD_LETTER_STREAM]), "0");
}

#[tokio::test]
async fn start_from_an_id_starts_at_that_entry_inclusive_and_only_without_an_offset() {
    let env = Env::start().await;
    let ids = env.publish_many(6).await;
    let recorder = Recorder::new();
    let mut config = config();
    config.drain = true;
    config.start_from = StartFrom::Id(ids[3]);
    let consumer = env.consumer(config.clone(), &recorder);
    join(spawn_run(&consumer), PATIENCE).await.unwrap();
    assert_eq!(recorder.handled_ids(), ids[3..].to_vec());
    assert_eq!(env.offset().await, Some(ids[5]));

    // With an offset stored, the start option is ignored.
    let more = env.publish_many(2).await;
    let again = Recorder::new();
    config.start_from = StartFrom::Id(ids[0]);
    let consumer = env.consumer(config, &again);
    join(spawn_run(&consumer), PATIENCE).await.unwrap();
    assert_eq!(again.handled_ids(), more);
}

/// The deletion probe goes by its hash after the first read; when the
/// server's script cache is flushed it is sent whole again, and a deletion
/// made while a blocking read waited is still noticed by a later probe.
#[tokio::test]
async fn deletions_are_noticed_after_the_script_cache_is_flushed() {
    let env = Env::start().await;
    let recorder = Recorder::new();
    let consumer = env.consumer(config(), &recorder);
    let stats = consumer.stats();
    let run = spawn_run(&consumer);
    wait_until!(
        PATIENCE,
        "a read blocks on the empty stream",
        env.blocked_clients().await == 1
    );
    env.server.cli(&["SCRIPT", "FLUSH"]);
    // Three entries and the middle one's deletion, at once: the blocked read
    // wakes to the first and the last.
    let mut pipe = redis::pipe();
    pipe.atomic();
    for (id, user) in [("7-1", "a"), ("7-2", "b"), ("7-3", "c")] {
        pipe.cmd("XADD")
            .arg(STREAM)
            .arg(id)
            .arg("event_type")
            .arg("user.deleted")
            .arg("user_id")
            .arg(user)
            .arg("occurred_at_ms")
            .arg(17)
            .ignore();
    }
    pipe.cmd("XDEL").arg(STREAM).arg("7-2").ignore();
    pipe.query_async::<()>(&mut env.conn.clone()).await.unwrap();
    wait_until!(
        PATIENCE,
        "the deletion is noticed",
        stats.snapshot().trimmed == 1
    );
    stop(&consumer, run).await;
    assert_eq!(
        recorder.handled_ids(),
        vec![EntryId::new(7, 1), EntryId::new(7, 3)]
    );
}

/// The response timeout measures one reply, not one pass of the loop: with
/// the reader's connection stalled (through a proxy that stops forwarding)
/// while handlers keep completing the entries already held, the stalled read
/// is cut within the configured response timeout, and once the connection
/// flows again everything is handled.
#[tokio::test]
async fn a_read_stalled_mid_reply_is_cut_within_the_response_timeout_while_handlers_complete() {
    let env = Env::start().await;
    let ids = env.publish_many(800).await;
    let proxy = TcpProxy::start(env.server.port());
    let recorder = Recorder::new();
    // Slow handling paces reading at the byte cap, so reads keep being sent
    // while held entries are still being handled, for longer than the
    // response timeout (about 160 entries held, 15 ms each).
    *recorder.delay.lock().unwrap() = Duration::from_millis(15);
    let mut config = config();
    config.max_reply_bytes = 64 * 1024;
    config.max_held_bytes = 128 * 1024;
    let timeout = config.read_response_timeout();
    // The reader (and the engine's own commands) go through the proxy; the
    // offsets go straight to the server.
    let client = open_client(&format!("redis://127.0.0.1:{}/", proxy.port())).unwrap();
    let store: Arc<dyn StreamOffsetStore> = Arc::new(env.offset_store());
    let consumer = Arc::new(RedisUserLifecycleConsumer::new(client, store, config).unwrap());
    consumer.on_event(Arc::clone(&recorder) as Arc<dyn EventHandler<UserLifecycleEvent>>);
    let stats = consumer.stats();
    let run = spawn_run(&consumer);
    wait_until!(
        PATIENCE,
        "some entries are handled",
        recorder.handled_count() >= 50
    );

    proxy.pause();
    let stalled_at = Instant::now();
    let handled_at_stall = recorder.handled_count();
    wait_until!(
        timeout + Duration::from_secs(5),
        "the stalled read is given up",
        stats.snapshot().redis_faults >= 1
    );
    let cut_after = stalled_at.elapsed();
    let handled_meanwhile = recorder.handled_count() - handled_at_stall;
    assert!(
        cut_after <= timeout + Duration::from_secs(1),
        "the stalled read was cut after {cut_after:?}, the response timeout is {timeout:?}"
    );
    assert!(
        handled_meanwhile >= 10,
        "only {handled_meanwhile} entries were handled during the stall: the test did not keep handlers busy"
    );

    proxy.resume();
    wait_until!(
        Duration::from_secs(60),
        "every entry is handled",
        recorder.handled_count() >= ids.len()
    );
    wait_until!(
        PATIENCE,
        "the offset reaches the last entry",
        env.offset().await == ids.last().copied()
    );
    stop(&consumer, run).await;
    let mut handled = recorder.handled_ids();
    handled.dedup();
    assert_eq!(handled, ids, "an entry was skipped or reordered");
    eprintln!("stalled read cut after {cut_after:?} (timeout {timeout:?}); {handled_meanwhile} handled meanwhile");
}

/// A save on a server other than the one the store last spoke to (Redis
/// restarted, or failed over) reports the store behind even though the
/// offset itself survived: Redis may have lost the handler's writes since.
/// The next save, on the same server, passes.
#[tokio::test]
async fn a_save_after_a_redis_restart_reports_the_store_behind() {
    let mut env = Env::start_with(RedisServerOptions {
        append_only: true,
        ..RedisServerOptions::default()
    })
    .await;
    let store = env.offset_store();
    let label = USER_LIFECYCLE_LABEL;
    let id = |text: &str| -> EntryId { text.parse().unwrap() };
    store.set(label, id("5-0")).await.unwrap();
    assert_eq!(store.load_tracked(label).await.unwrap(), Some(id("5-0")));
    assert_eq!(
        store
            .save_checked(label, id("6-0"), Some(id("5-0")))
            .await
            .unwrap(),
        SaveOutcome::Saved
    );
    env.server.restart();
    env.reconnect().await;
    assert_eq!(env.offset().await, Some(id("6-0")), "the offset survived");
    assert_eq!(
        store
            .save_checked(label, id("7-0"), Some(id("6-0")))
            .await
            .unwrap(),
        SaveOutcome::Behind(Some(id("6-0")))
    );
    assert_eq!(env.offset().await, Some(id("6-0")), "nothing was written");
    assert_eq!(
        store
            .save_checked(label, id("7-0"), Some(id("6-0")))
            .await
            .unwrap(),
        SaveOutcome::Saved
    );
}
