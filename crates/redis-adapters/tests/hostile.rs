//! Stream entries built to hurt, through the real consumer on a private Redis:
//! megabyte values, thousands of fields, empty and non-UTF-8 names and
//! values, entries larger than a whole reply may be, ids near the limits.
//! Nothing panics, memory stays bounded, every entry is absorbed or handled
//! per the contract, and the offset reaches the end.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

mod common;

use common::connect;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lifecycle_domain::{
    BoxFuture, EntryId, EventHandler, HandlerError, RunOutcome, StopReason, StreamOffsetStore,
    UserLifecycleConsumer, UserLifecycleEvent, USER_LIFECYCLE_LABEL,
};
use lifecycle_redis::{open_client, RedisOffsetStore, RedisUserLifecycleConsumer};
use lifecycle_streams::{ConsumerConfig, StatsSnapshot};
use lifecycle_test_support::RedisServer;
use redis::aio::MultiplexedConnection;

const STREAM: &str = "user:lifecycle_events";

/// Records the events handled.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<UserLifecycleEvent>>,
}

impl EventHandler<UserLifecycleEvent> for Recorder {
    fn handle<'a>(
        &'a self,
        event: &'a UserLifecycleEvent,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        self.events.lock().unwrap().push(event.clone());
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Adds one entry with exactly these fields, optionally at an explicit id.
async fn add(conn: &mut MultiplexedConnection, id: &str, fields: &[(Vec<u8>, Vec<u8>)]) -> EntryId {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(STREAM).arg(id);
    for (name, value) in fields {
        cmd.arg(name.as_slice()).arg(value.as_slice());
    }
    let id: String = cmd.query_async(conn).await.unwrap();
    id.parse().unwrap()
}

fn event(user: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    vec![
        (b"event_type".to_vec(), b"user.deleted".to_vec()),
        (b"user_id".to_vec(), user.as_bytes().to_vec()),
        (b"occurred_at_ms".to_vec(), b"1700000000000".to_vec()),
    ]
}

fn with(
    mut fields: Vec<(Vec<u8>, Vec<u8>)>,
    name: &[u8],
    value: Vec<u8>,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    fields.push((name.to_vec(), value));
    fields
}

/// Drains the stream with `config`; the report, the stats and the events.
async fn drain(
    server: &RedisServer,
    mut config: ConsumerConfig,
) -> (RunOutcome, StatsSnapshot, Vec<UserLifecycleEvent>) {
    config.drain = true;
    let client = open_client(&server.url()).unwrap();
    let offsets: Arc<dyn StreamOffsetStore> =
        Arc::new(RedisOffsetStore::new(client.clone(), "lobby").unwrap());
    let consumer = RedisUserLifecycleConsumer::new(client, offsets, config).unwrap();
    let recorder = Arc::new(Recorder::default());
    consumer.on_event(recorder.clone());
    let report = tokio::time::timeout(Duration::from_secs(30), consumer.run())
        .await
        .expect("the drain did not finish")
        .expect("the drain failed");
    let events = recorder.events.lock().unwrap().clone();
    (report, consumer.stats().snapshot(), events)
}

#[tokio::test]
async fn entries_built_to_hurt_are_absorbed_or_handled_per_the_contract() {
    let server = RedisServer::start();
    let mut conn = connect(&server).await;
    let mut handled = Vec::new();

    // Just under the decoding limit: handled, the value intact.
    let big = vec![b'v'; 900 * 1024];
    handled.push(
        add(
            &mut conn,
            "*",
            &with(event("big"), b"trace_id", big.clone()),
        )
        .await,
    );
    // Over it: absorbed as malformed.
    add(
        &mut conn,
        "*",
        &with(event("huge"), b"trace_id", vec![b'h'; 1536 * 1024]),
    )
    .await;
    // Thousands of fields, most ignored.
    let mut many = event("many");
    many.extend((0..5000).map(|n| (format!("f{n}").into_bytes(), b"x".to_vec())));
    handled.push(add(&mut conn, "*", &many).await);
    // Empty names and values.
    let empty = with(
        with(event("empty"), b"", b"".to_vec()),
        b"source",
        Vec::new(),
    );
    handled.push(add(&mut conn, "*", &empty).await);
    // Non-UTF-8 in a required field: malformed; in an optional one and in
    // names: decoded lossily, or ignored.
    let mut bad_user = event("x");
    bad_user[1].1 = vec![0xff, 0xfe, b'u'];
    add(&mut conn, "*", &bad_user).await;
    let odd = with(
        with(event("odd"), &[0xc3, 0x28], vec![0x80]),
        b"actor_id",
        vec![b'a', 0xff],
    );
    handled.push(add(&mut conn, "*", &odd).await);
    // Control characters and escape sequences in values.
    handled.push(add(&mut conn, "*", &event("line\nbreak\u{1b}[31m")).await);
    // Nothing but junk.
    add(&mut conn, "*", &[(vec![0u8; 3], vec![0xffu8; 100])]).await;
    let last = add(&mut conn, "*", &event("last")).await;
    handled.push(last);

    let mut config = ConsumerConfig::new(STREAM, USER_LIFECYCLE_LABEL);
    config.batch_size = 4;
    let (report, stats, events) = drain(&server, config).await;
    assert_eq!(report.reason, StopReason::Drained);
    assert_eq!(report.offset, Some(last));
    let ids: Vec<EntryId> = events.iter().map(|event| event.entry_id).collect();
    assert_eq!(ids, handled);
    assert_eq!(events[0].trace_id.len(), big.len());
    assert_eq!(events[3].actor_id, "a\u{fffd}");
    assert_eq!(events[4].user_id, "line\nbreak\u{1b}[31m");
    assert_eq!(stats.malformed, 3, "{stats:?}");
    assert_eq!(stats.handled, handled.len() as u64);
}

#[tokio::test]
async fn an_entry_larger_than_a_whole_reply_is_absorbed_unread() {
    let server = RedisServer::start();
    let mut conn = connect(&server).await;
    let first = add(&mut conn, "*", &event("a")).await;
    let too_big = add(
        &mut conn,
        "*",
        &with(event("b"), b"trace_id", vec![b'z'; 300 * 1024]),
    )
    .await;
    let second = add(&mut conn, "*", &event("c")).await;
    add(
        &mut conn,
        "*",
        &with(event("d"), b"trace_id", vec![b'z'; 300 * 1024]),
    )
    .await;
    let last = add(&mut conn, "*", &event("e")).await;

    let mut config = ConsumerConfig::new(STREAM, USER_LIFECYCLE_LABEL);
    config.max_reply_bytes = 64 * 1024;
    let (report, stats, events) = drain(&server, config).await;
    let ids: Vec<EntryId> = events.iter().map(|event| event.entry_id).collect();
    assert_eq!(ids, vec![first, second, last]);
    assert_eq!(stats.malformed, 2, "{stats:?}");
    assert_eq!(report.offset, Some(last));
    assert!(too_big > first);
}

#[tokio::test]
async fn a_backlog_of_large_entries_is_read_a_few_at_a_time() {
    let server = RedisServer::start();
    let mut conn = connect(&server).await;
    let mut ids = Vec::new();
    for n in 0..60 {
        let fields = with(event(&format!("u{n}")), b"trace_id", vec![b'p'; 100 * 1024]);
        ids.push(add(&mut conn, "*", &fields).await);
    }
    let mut config = ConsumerConfig::new(STREAM, USER_LIFECYCLE_LABEL);
    config.batch_size = 1024;
    // Replies are sized to about a quarter of this: ~2 entries per read.
    config.max_reply_bytes = 1024 * 1024;
    let (report, stats, events) = drain(&server, config).await;
    assert_eq!(events.len(), 60);
    assert_eq!(report.offset, ids.last().copied());
    assert_eq!(stats.malformed, 0);
    // One oversized first read, then reads of a few entries each.
    assert!(stats.reads >= 20, "{stats:?}");
}

#[tokio::test]
async fn ids_near_the_limits_are_handled_and_saved() {
    let server = RedisServer::start();
    let mut conn = connect(&server).await;
    let low = add(&mut conn, "0-1", &event("low")).await;
    let high = add(&mut conn, "18446744073709551614-7", &event("high")).await;
    let max = add(
        &mut conn,
        "18446744073709551615-18446744073709551615",
        &event("max"),
    )
    .await;
    assert_eq!(max, EntryId::MAX);
    let config = ConsumerConfig::new(STREAM, USER_LIFECYCLE_LABEL);
    let (report, _, events) = drain(&server, config.clone()).await;
    let ids: Vec<EntryId> = events.iter().map(|event| event.entry_id).collect();
    assert_eq!(ids, vec![low, high, max]);
    assert_eq!(report.offset, Some(EntryId::MAX));
    assert_eq!(
        server.cli(&["GET", "lobby:stream_offsets:user_lifecycle"]),
        "18446744073709551615-18446744073709551615"
    );
    // A second drain starts after the largest id and finds nothing.
    let (report, stats, events) = drain(&server, config).await;
    assert!(events.is_empty());
    assert_eq!(stats.finished(), 0);
    assert_eq!(report.offset, Some(EntryId::MAX));
}
