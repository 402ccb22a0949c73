//! Dead-lettering exactly once, against private redis-servers: a copy is
//! appended once per entry whatever repeats the write (a second call, a
//! retry after a lost reply, concurrent writers), again only when the copy
//! is gone, with its fields byte for byte, and with its marker in the dead
//! letter stream's Redis Cluster slot.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

use std::time::{Duration, Instant};

use lifecycle_domain::EntryId;
use lifecycle_streams::dead_letter::{
    append_once, marker_field, marker_key, DeadLetterOutcome, MAX_COPIED_FIELDS, MAX_ERROR_BYTES,
};
use lifecycle_streams::{classify, FaultClass};
use lifecycle_test_support::{RedisServer, RedisServerOptions, TcpProxy};
use redis::aio::MultiplexedConnection;

const STREAM: &str = "user:lifecycle_events";
const DEAD: &str = "user:lifecycle_events:dead";

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

async fn connect(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn borrowed(fields: &Fields) -> Vec<(&[u8], &[u8])> {
    fields
        .iter()
        .map(|(name, value)| (name.as_slice(), value.as_slice()))
        .collect()
}

fn event(user: &str) -> Fields {
    vec![
        (b"event_type".to_vec(), b"user.deleted".to_vec()),
        (b"user_id".to_vec(), user.as_bytes().to_vec()),
        (b"occurred_at_ms".to_vec(), b"1700000000000".to_vec()),
    ]
}

/// `append_once` into [`DEAD`] for entry `id` of [`STREAM`].
async fn append(
    conn: &mut MultiplexedConnection,
    id: EntryId,
    fields: &Fields,
) -> DeadLetterOutcome {
    append_once(conn, DEAD, STREAM, id, &borrowed(fields), "boom", 3)
        .await
        .unwrap()
}

/// Every entry of `stream`: its id and its field/value pairs.
async fn copies(conn: &mut MultiplexedConnection, stream: &str) -> Vec<(EntryId, Fields)> {
    let entries: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    entries
        .into_iter()
        .map(|(id, flat)| {
            let fields = flat
                .chunks_exact(2)
                .map(|pair| (pair[0].clone(), pair[1].clone()))
                .collect();
            (parse_id(&id), fields)
        })
        .collect()
}

fn parse_id(id: &str) -> EntryId {
    EntryId::from_bytes(id.as_bytes()).unwrap()
}

/// The copy's `dead_letter_*` fields as text, in order.
fn trailer(fields: &Fields, copied: usize) -> Vec<(String, String)> {
    fields[copied..]
        .iter()
        .map(|(name, value)| {
            (
                String::from_utf8(name.clone()).unwrap(),
                String::from_utf8(value.clone()).unwrap(),
            )
        })
        .collect()
}

async fn marker(conn: &mut MultiplexedConnection, stream: &str, id: EntryId) -> Option<String> {
    redis::cmd("HGET")
        .arg(marker_key(DEAD))
        .arg(marker_field(stream, id))
        .query_async(conn)
        .await
        .unwrap()
}

async fn marker_count(conn: &mut MultiplexedConnection) -> usize {
    redis::cmd("HLEN")
        .arg(marker_key(DEAD))
        .query_async(conn)
        .await
        .unwrap()
}

/// Polls `condition` every few milliseconds until it holds; panics naming
/// `what` after `within`.
async fn wait_until<F, Fut>(within: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_second_call_for_the_same_entry_appends_nothing() {
    let server = RedisServer::start();
    let mut conn = connect(&server.url()).await;
    let entry = EntryId::new(1_700_000_000_000, 7);
    let fields = event("u-1");
    let first = append(&mut conn, entry, &fields).await;
    let DeadLetterOutcome::Appended(copy) = first else {
        panic!("first call: {first:?}");
    };
    for _ in 0..3 {
        assert_eq!(
            append(&mut conn, entry, &fields).await,
            DeadLetterOutcome::AlreadyThere(copy)
        );
    }
    let stored = copies(&mut conn, DEAD).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    let (id, stored_fields) = &stored[0];
    assert_eq!(*id, copy);
    assert_eq!(
        stored_fields[..fields.len()],
        fields[..],
        "original fields first"
    );
    assert_eq!(
        trailer(stored_fields, fields.len()),
        [
            ("dead_letter_entry_id", "1700000000000-7"),
            ("dead_letter_stream", STREAM),
            ("dead_letter_error", "boom"),
            ("dead_letter_attempts", "3"),
        ]
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
    );
    assert_eq!(
        marker(&mut conn, STREAM, entry).await,
        Some(copy.to_string())
    );
    assert_eq!(
        marker_key(DEAD),
        "{user:lifecycle_events:dead}:entries",
        "the marker's key is part of the contract"
    );
}

#[tokio::test]
async fn another_entry_or_the_same_id_of_another_stream_gets_its_own_copy() {
    let server = RedisServer::start();
    let mut conn = connect(&server.url()).await;
    let (a, b) = (EntryId::new(5, 0), EntryId::new(5, 1));
    let copy_a = append(&mut conn, a, &event("u-a")).await;
    let copy_b = append(&mut conn, b, &event("u-b")).await;
    // Another source stream sharing the dead-letter stream, with an entry id
    // equal to one of ours: a different entry.
    let other = append_once(&mut conn, DEAD, "game:events", a, &[], "other", 1)
        .await
        .unwrap();
    for outcome in [copy_a, copy_b, other] {
        assert!(
            matches!(outcome, DeadLetterOutcome::Appended(_)),
            "{outcome:?}"
        );
    }
    assert_ne!(copy_a.id(), copy_b.id());
    assert_eq!(
        append(&mut conn, a, &event("u-a")).await,
        DeadLetterOutcome::AlreadyThere(copy_a.id())
    );
    assert_eq!(
        append_once(&mut conn, DEAD, "game:events", a, &[], "other", 1)
            .await
            .unwrap(),
        DeadLetterOutcome::AlreadyThere(other.id())
    );
    assert_eq!(copies(&mut conn, DEAD).await.len(), 3);
    assert_eq!(marker_count(&mut conn).await, 3);
}

#[tokio::test]
async fn a_copy_an_operator_deleted_is_written_again() {
    let server = RedisServer::start();
    let mut conn = connect(&server.url()).await;
    let (entry, kept) = (EntryId::new(9, 0), EntryId::new(9, 1));
    let fields = event("u-9");
    let first = append(&mut conn, entry, &fields).await.id();
    append(&mut conn, kept, &event("u-kept")).await;

    // XDEL of one copy: that entry is copied again, the marker follows.
    server.cli(&["XDEL", DEAD, &first.to_string()]);
    let again = append(&mut conn, entry, &fields).await;
    let DeadLetterOutcome::Appended(second) = again else {
        panic!("after XDEL: {again:?}");
    };
    assert!(second > first);
    assert_eq!(
        marker(&mut conn, STREAM, entry).await,
        Some(second.to_string())
    );
    assert_eq!(
        append(&mut conn, entry, &fields).await,
        DeadLetterOutcome::AlreadyThere(second)
    );
    assert_eq!(copies(&mut conn, DEAD).await.len(), 2);

    // A marker edited into something that is not an id is stale, not fatal.
    server.cli(&[
        "HSET",
        &marker_key(DEAD),
        &marker_field(STREAM, entry),
        "not an id",
    ]);
    let edited = append(&mut conn, entry, &fields).await;
    assert!(
        matches!(edited, DeadLetterOutcome::Appended(_)),
        "{edited:?}"
    );

    // DEL of the whole stream: every marker was stale, and goes with it.
    server.cli(&["DEL", DEAD]);
    let after_purge = append(&mut conn, entry, &fields).await;
    assert!(
        matches!(after_purge, DeadLetterOutcome::Appended(_)),
        "{after_purge:?}"
    );
    assert_eq!(copies(&mut conn, DEAD).await.len(), 1);
    assert_eq!(marker_count(&mut conn).await, 1, "stale markers were kept");
    assert_eq!(marker(&mut conn, STREAM, kept).await, None);
}

#[tokio::test]
async fn fields_of_any_bytes_and_size_round_trip() {
    let server = RedisServer::start();
    let mut conn = connect(&server.url()).await;
    let every_byte: Vec<u8> = (0..=255).collect();
    let fields: Fields = vec![
        (
            every_byte.clone(),
            every_byte.iter().rev().copied().collect(),
        ),
        (Vec::new(), Vec::new()),
        (b"empty".to_vec(), Vec::new()),
        (Vec::new(), b"no name".to_vec()),
        (b"big".to_vec(), vec![0xa5; 100 * 1024]),
        (b"\xff\xfe not utf-8".to_vec(), b"\r\n$3\r\n*1\r\n".to_vec()),
        (b"user_id".to_vec(), b"\x1b[31mred\x00nul".to_vec()),
        (
            b"user_id".to_vec(),
            b"a repeated name is kept twice".to_vec(),
        ),
    ];
    let entry = EntryId::new(42, 0);
    let copy = append(&mut conn, entry, &fields).await.id();
    assert_eq!(
        append(&mut conn, entry, &fields).await,
        DeadLetterOutcome::AlreadyThere(copy)
    );
    let stored = copies(&mut conn, DEAD).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].1[..fields.len()], fields[..]);
    assert_eq!(stored[0].1.len(), fields.len() + 4);
}

#[tokio::test]
async fn an_entry_with_more_fields_than_one_call_takes_keeps_the_first_ones() {
    let server = RedisServer::start();
    let mut conn = connect(&server.url()).await;
    let total = 10_000;
    let fields: Fields = (0..total)
        .map(|i| (format!("f{i}").into_bytes(), format!("v{i}").into_bytes()))
        .collect();
    let entry = EntryId::new(43, 0);
    let copy = append(&mut conn, entry, &fields).await.id();
    assert_eq!(
        append(&mut conn, entry, &fields).await,
        DeadLetterOutcome::AlreadyThere(copy)
    );
    let stored = copies(&mut conn, DEAD).await;
    assert_eq!(stored.len(), 1);
    let stored = &stored[0].1;
    assert_eq!(stored[..MAX_COPIED_FIELDS], fields[..MAX_COPIED_FIELDS]);
    let trailer = trailer(stored, MAX_COPIED_FIELDS);
    assert_eq!(
        trailer.last(),
        Some(&(
            "dead_letter_fields_omitted".to_owned(),
            (total - MAX_COPIED_FIELDS).to_string()
        ))
    );
    assert_eq!(trailer.len(), 5, "{trailer:?}");
}

#[tokio::test]
async fn a_huge_error_is_stored_cut_on_a_character_boundary() {
    let server = RedisServer::start();
    let mut conn = connect(&server.url()).await;
    let error = "é€".repeat(200_000);
    append_once(&mut conn, DEAD, STREAM, EntryId::new(1, 0), &[], &error, 2)
        .await
        .unwrap();
    let stored = copies(&mut conn, DEAD).await;
    let (_, value) = stored[0]
        .1
        .iter()
        .find(|(name, _)| name == b"dead_letter_error")
        .unwrap();
    assert!(
        value.len() <= MAX_ERROR_BYTES,
        "{} bytes stored",
        value.len()
    );
    let text = std::str::from_utf8(value).expect("cut inside a character");
    let kept = text.split(" [... cut").next().unwrap();
    assert!(error.starts_with(kept) && kept.len() > MAX_ERROR_BYTES / 2);
    assert!(text.ends_with(&format!("{} bytes in all]", error.len())));
}

#[tokio::test]
async fn concurrent_writers_of_one_entry_leave_one_copy() {
    let server = RedisServer::start();
    let url = server.url();
    let entry = EntryId::new(77, 0);
    let mut writers = Vec::new();
    for _ in 0..8 {
        let url = url.clone();
        writers.push(tokio::spawn(async move {
            let mut conn = connect(&url).await;
            append(&mut conn, entry, &event("u-77")).await
        }));
    }
    let mut outcomes = Vec::new();
    for writer in writers {
        outcomes.push(writer.await.unwrap());
    }
    let appended = outcomes
        .iter()
        .filter(|outcome| matches!(outcome, DeadLetterOutcome::Appended(_)))
        .count();
    assert_eq!(appended, 1, "{outcomes:?}");
    assert!(outcomes
        .iter()
        .all(|outcome| outcome.id() == outcomes[0].id()));
    let mut conn = connect(&url).await;
    assert_eq!(copies(&mut conn, DEAD).await.len(), 1);
}

/// The write reaches Redis and runs; its reply is swallowed by the proxy and
/// the connection cut, so the caller sees a transient failure, as after any
/// lost reply. Its retry, on a fresh connection, finds the copy and adds
/// nothing.
#[tokio::test]
async fn a_write_whose_reply_was_lost_is_retried_without_a_second_copy() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.port());
    let proxied = format!("redis://127.0.0.1:{}/", proxy.port());
    let mut direct = connect(&server.url()).await;
    let mut conn = connect(&proxied).await;
    // Loads the script (another dead-letter stream), so that the call below
    // is one EVALSHA whose reply is the script's.
    append_once(
        &mut conn,
        "warm-up:dead",
        STREAM,
        EntryId::new(1, 0),
        &[],
        "x",
        1,
    )
    .await
    .unwrap();

    let entry = EntryId::new(1_700_000_000_000, 3);
    proxy.swallow_replies();
    let swallowed_before = proxy.swallowed_bytes();
    let lost = tokio::spawn(async move {
        let fields = event("u-lost");
        append_once(
            &mut conn,
            DEAD,
            STREAM,
            entry,
            &borrowed(&fields),
            "boom",
            3,
        )
        .await
    });
    wait_until(
        Duration::from_secs(10),
        "the script ran and its reply was swallowed",
        || {
            let mut direct = direct.clone();
            let proxy = &proxy;
            async move {
                marker(&mut direct, STREAM, entry).await.is_some()
                    && proxy.swallowed_bytes() > swallowed_before
            }
        },
    )
    .await;
    assert_eq!(proxy.cut(), 1);
    let err = lost
        .await
        .unwrap()
        .expect_err("the caller heard a reply that was swallowed");
    assert_eq!(classify(&err), FaultClass::Transient, "{err}");

    proxy.forward_replies();
    let written = marker(&mut direct, STREAM, entry).await.unwrap();
    let mut retry = connect(&proxied).await;
    let outcome = append_once(
        &mut retry,
        DEAD,
        STREAM,
        entry,
        &borrowed(&event("u-lost")),
        "boom",
        3,
    )
    .await
    .unwrap();
    assert_eq!(
        outcome,
        DeadLetterOutcome::AlreadyThere(parse_id(&written)),
        "the retry appended again"
    );
    let stored = copies(&mut direct, DEAD).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
}

/// On a Redis Cluster node, a script may only touch keys of one slot (and
/// the node says `CROSSSLOT` otherwise): the marker hash is in the dead
/// letter stream's slot, for the default name and for names with braces.
#[tokio::test]
async fn on_a_cluster_node_the_marker_is_in_the_streams_slot() {
    let server = RedisServer::start_with(RedisServerOptions {
        extra_args: [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
        ]
        .map(str::to_owned)
        .to_vec(),
        ..RedisServerOptions::default()
    });
    server.cli(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
    let mut conn = connect(&server.url()).await;
    wait_until(
        Duration::from_secs(10),
        "the one-node cluster is up",
        || {
            let info = server.cli(&["CLUSTER", "INFO"]);
            async move { info.contains("cluster_state:ok") }
        },
    )
    .await;
    // The node does check: two keys of different slots are refused.
    let refused = redis::cmd("EVAL")
        .arg("return 1")
        .arg(2)
        .arg("a")
        .arg("b")
        .query_async::<i64>(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("CROSSSLOT"), "{refused}");

    for name in [
        DEAD,
        "{lobby}:dead",
        "dead {letters}",
        "a{b",
        "a}b",
        "a{}b",
        "}{x}",
        "{}",
    ] {
        let key = marker_key(name);
        assert_eq!(
            server.cli(&["CLUSTER", "KEYSLOT", &key]),
            server.cli(&["CLUSTER", "KEYSLOT", name]),
            "{name:?} and its marker {key:?}"
        );
        let entry = EntryId::new(1, 0);
        let first = append_once(&mut conn, name, STREAM, entry, &[], "boom", 1)
            .await
            .unwrap_or_else(|err| panic!("{name:?}: {err}"));
        let second = append_once(&mut conn, name, STREAM, entry, &[], "boom", 1)
            .await
            .unwrap();
        assert_eq!(
            second,
            DeadLetterOutcome::AlreadyThere(first.id()),
            "{name:?}"
        );
    }
}
