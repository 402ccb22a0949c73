#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]
//! Dead-lettering exactly once, through the real `lobby-worker` binary: a
//! crash between the dead-letter write and the offset save replays the
//! entry, and the replay (by one worker or by two racing) finds the copy
//! already there and adds none.
//!
//! The poison entry is a user whose open game's member set is a string: the
//! cascade script fails with WRONGTYPE every time, so with
//! `--dead-letter-after 1` the entry is dead-lettered at its first failure.

use std::time::Duration;

use lifecycle_domain::EntryId;
use lifecycle_streams::dead_letter::{append_once, marker_field, marker_key, DeadLetterOutcome};
use lifecycle_test_support::RedisServer;

mod common;

use common::{
    assert_success, connect, deletion, stderr, stored_offset, wait_until, worker, Running,
};

const STREAM: &str = "user:lifecycle_events";
const DEAD: &str = "user:lifecycle_events:dead";
/// The engine's line when it writes a copy.
const DEAD_LETTERED: &str = "entry dead-lettered after repeated handler failures";
/// The engine's line when the copy was already there.
const ALREADY: &str = "entry already in the dead-letter stream";

/// Seeds the poison user and `healthy` others (each in a running game), and
/// publishes the poison event first, then one event per healthy user.
/// Returns the ids, the poison's first.
fn publish_poison_then(conn: &mut redis::Connection, healthy: usize) -> Vec<String> {
    let mut seed = redis::pipe();
    seed.cmd("SADD")
        .arg("lobby:user:u-poison:games")
        .arg("g-poison")
        .cmd("HSET")
        .arg("lobby:game:g-poison")
        .arg("owner_id")
        .arg("o-poison")
        .arg("status")
        .arg("open")
        .cmd("SET")
        .arg("lobby:game:g-poison:members")
        .arg("not a set");
    for i in 0..healthy {
        seed.cmd("SADD")
            .arg(format!("lobby:user:u-{i}:games"))
            .arg(format!("g-{i}"))
            .cmd("HSET")
            .arg(format!("lobby:game:g-{i}"))
            .arg("owner_id")
            .arg(format!("o-{i}"))
            .arg("status")
            .arg("running")
            .cmd("SADD")
            .arg(format!("lobby:game:g-{i}:members"))
            .arg(format!("u-{i}"));
    }
    seed.exec(conn).unwrap();
    let mut publish = redis::pipe();
    let event = |user: String| deletion(&user, 1_700_000_000_000);
    let mut poison = event("u-poison".to_owned());
    poison.arg("trace_id").arg("t-poison");
    publish.add_command(poison);
    for i in 0..healthy {
        publish.add_command(event(format!("u-{i}")));
    }
    publish.query(conn).unwrap()
}

/// The ids of the dead-letter stream's entries.
fn copies(conn: &mut redis::Connection) -> Vec<String> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(DEAD)
        .arg("-")
        .arg("+")
        .query(conn)
        .unwrap();
    reply.ids.into_iter().map(|entry| entry.id).collect()
}

/// How many of `healthy` users have a cascade record.
fn records(conn: &mut redis::Connection, healthy: usize) -> usize {
    let mut pipe = redis::pipe();
    for i in 0..healthy {
        pipe.cmd("EXISTS").arg(format!("lobby:user:u-{i}:cascade"));
    }
    let found: Vec<u8> = pipe.query(conn).unwrap();
    found.iter().filter(|&&exists| exists == 1).count()
}

/// The copy's marker: the id of the copy it names.
fn marker(conn: &mut redis::Connection, entry: &str) -> Option<String> {
    let entry = EntryId::from_bytes(entry.as_bytes()).unwrap();
    redis::cmd("HGET")
        .arg(marker_key(DEAD))
        .arg(marker_field(STREAM, entry))
        .query(conn)
        .unwrap()
}

/// What a SIGKILL right after the dead-letter write leaves, made with the
/// function the engine calls: the copy and its marker are in Redis, the
/// offset is still before the poison entry. The replay finds the copy and
/// adds none, and moves past the entry.
#[test]
fn a_dead_letter_written_before_a_crash_is_not_written_again_on_replay() {
    let server = RedisServer::start();
    let url = server.url();
    let mut conn = connect(&url);
    let ids = publish_poison_then(&mut conn, 3);
    let poison = EntryId::from_bytes(ids[0].as_bytes()).unwrap();
    let fields: Vec<(Vec<u8>, Vec<u8>)> = {
        let reply: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
            .arg(STREAM)
            .arg(&ids[0])
            .arg(&ids[0])
            .query(&mut conn)
            .unwrap();
        reply[0]
            .1
            .chunks_exact(2)
            .map(|pair| (pair[0].clone(), pair[1].clone()))
            .collect()
    };
    let borrowed: Vec<(&[u8], &[u8])> = fields
        .iter()
        .map(|(name, value)| (name.as_slice(), value.as_slice()))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let crashed = runtime.block_on(async {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut async_conn = client.get_multiplexed_async_connection().await.unwrap();
        append_once(
            &mut async_conn,
            DEAD,
            STREAM,
            poison,
            &borrowed,
            "WRONGTYPE (the attempt before the crash)",
            1,
        )
        .await
        .unwrap()
    });
    let DeadLetterOutcome::Appended(copy) = crashed else {
        panic!("{crashed:?}");
    };
    assert_eq!(stored_offset(&mut conn), None, "the crash left no offset");

    let output = worker(
        &url,
        &[
            "run",
            "--drain",
            "--dead-letter-after",
            "1",
            "--metrics-addr",
            "off",
        ],
    );
    assert_success(&output);
    let log = stderr(&output);
    assert_eq!(
        copies(&mut conn),
        [copy.to_string()],
        "the replay appended a second copy; log:\n{log}"
    );
    assert_eq!(marker(&mut conn, &ids[0]), Some(copy.to_string()));
    assert_eq!(stored_offset(&mut conn).as_ref(), ids.last(), "log:\n{log}");
    assert_eq!(records(&mut conn, 3), 3);
    assert_eq!(log.matches(ALREADY).count(), 1, "log:\n{log}");
    assert_eq!(log.matches(DEAD_LETTERED).count(), 0, "log:\n{log}");
    assert!(
        log.contains(&copy.to_string()),
        "the copy's id is not logged:\n{log}"
    );
}

/// A real SIGKILL between the dead-letter write and the offset save: the
/// poison entry opens a batch of 3,000 entries, and the offset is saved only
/// after the whole batch, so a kill as soon as the copy appears lands before
/// the save. Then two workers replay the same entries at once: both fail on
/// the poison entry again, both find the copy, and it stays the only one.
#[test]
fn after_a_sigkill_between_the_dead_letter_and_the_save_two_racing_replays_add_no_copy() {
    let server = RedisServer::start();
    let url = server.url();
    let mut conn = connect(&url);
    let healthy = 3000;
    let ids = publish_poison_then(&mut conn, healthy);
    let args = [
        "--dead-letter-after",
        "1",
        "--batch-size",
        "10000",
        "--metrics-addr",
        "off",
    ];
    let mut crashing = Running::start(&url, &args);
    wait_until(Duration::from_secs(30), || {
        crashing.assert_alive();
        !copies(&mut conn).is_empty()
    })
    .unwrap_or_else(|()| panic!("no dead letter; log:\n{}", crashing.log()));
    crashing.kill9();
    let written = copies(&mut conn);
    let before_kill = records(&mut conn, healthy);
    assert_eq!(written.len(), 1);
    assert_eq!(
        stored_offset(&mut conn),
        None,
        "the kill came after the offset save ({before_kill} of {healthy} cascades done): the window was missed"
    );
    // The kill may land between the copy's write and its log line.
    assert!(crashing.count(DEAD_LETTERED) <= 1, "{}", crashing.log());

    // Without the lease, so that the two replays race as a former holder
    // finishing its work and the new holder would.
    let mut drain_args = vec!["--drain", "--no-lease"];
    drain_args.extend(args);
    let mut first = Running::start(&url, &drain_args);
    let mut second = Running::start(&url, &drain_args);
    for replay in [&mut first, &mut second] {
        let status = replay.wait_exit(Duration::from_secs(120));
        assert!(status.success(), "exit {status}; log:\n{}", replay.log());
    }
    let already = first.count(ALREADY) + second.count(ALREADY);
    println!(
        "[dead-letter once] killed after the copy with {before_kill} of {healthy} cascades done and no offset saved; the two replays found the copy {already} times"
    );
    assert_eq!(copies(&mut conn), written, "a replay appended a copy");
    assert_eq!(marker(&mut conn, &ids[0]).as_ref(), written.first());
    assert_eq!(first.count(DEAD_LETTERED) + second.count(DEAD_LETTERED), 0);
    assert_eq!(
        already,
        2,
        "both replays should have met the poison entry\nfirst:\n{}\nsecond:\n{}",
        first.log(),
        second.log()
    );
    assert_eq!(stored_offset(&mut conn).as_ref(), ids.last());
    assert_eq!(records(&mut conn, healthy), healthy);
}
