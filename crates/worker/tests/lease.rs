//! Several `lobby-worker run` processes on one stream and label, against a
//! private redis-server: the lease lets exactly one consume, a graceful stop
//! hands over at once, a holder paused past its lease is replaced and, once
//! resumed, neither saves nor handles anything.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{connect, deletion, parse_id, pipelined, stored_offset, wait_for, Running};
use lifecycle_test_support::RedisServer;

/// What each handled event logs at debug level.
const PROCESSED: &str = "user lifecycle event processed";

fn start(url: &str, ttl: &str) -> Running {
    start_at(url, ttl, "off")
}

/// [`start`] serving the HTTP endpoints at `metrics_addr`.
fn start_at(url: &str, ttl: &str, metrics_addr: &str) -> Running {
    Running::start_with_env(
        url,
        &["--lease-ttl", ttl, "--metrics-addr", metrics_addr],
        &[("LOBBY_LOG_LEVEL", "debug")],
    )
}

/// The entry ids a worker logged as processed.
fn processed(worker: &Running) -> Vec<String> {
    worker
        .log()
        .lines()
        .filter(|line| line.contains(PROCESSED))
        .filter_map(|line| line.split("stream_entry_id=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// `ids` in stream order (handlers of different users run concurrently).
fn sorted(ids: &[String]) -> Vec<String> {
    let mut ids = ids.to_vec();
    ids.sort_by_key(|id| parse_id(id));
    ids
}

fn publish(conn: &mut redis::Connection, tag: &str, n: usize) -> Vec<String> {
    pipelined(
        conn,
        (0..n).map(|i| deletion(&format!("{tag}-{i}"), 1_700_000_000_000)),
    )
}

fn wait_offset(conn: &mut redis::Connection, last: &str) {
    wait_for(
        Duration::from_secs(20),
        "the offset reaches the last entry",
        || stored_offset(conn).as_deref() == Some(last),
    );
}

#[test]
fn one_of_two_workers_consumes_and_a_sigterm_hands_over_at_once() {
    let server = RedisServer::start();
    let url = server.url();
    let mut conn = connect(&url);
    let mut first = start(&url, "10s");
    first.wait_for_log("lease acquired");
    let port = lifecycle_test_support::free_port();
    let mut second = start_at(&url, "10s", &format!("127.0.0.1:{port}"));
    second.wait_for_log("waiting as a standby");
    // A standby is healthy, not "not ready": it is ready to take over.
    let readyz = || common::get(port, "/readyz");
    let lease_held = || {
        common::get(port, "/metrics")
            .and_then(|(_, body)| common::sample(&body, "lobby_lease_held"))
    };
    wait_for(Duration::from_secs(10), "the standby's /readyz", || {
        readyz().is_some_and(|(status, body)| status == 200 && body.contains("standby"))
    });
    assert_eq!(lease_held(), Some(0.0));
    // `status` names the holder, its token, the time left and the standby.
    let status = common::status_json(&url, &[]);
    let lease = &status["lease"];
    assert_eq!(lease["holder"]["pid"], first.pid(), "{status}");
    assert_eq!(lease["token"], lease["last_token"], "{status}");
    assert!(lease["token"].as_u64().unwrap() >= 1, "{status}");
    let left = lease["remaining_ms"].as_u64().unwrap();
    assert!(left > 0 && left <= 10_000, "{status}");
    let standbys: Vec<u64> = lease["standbys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|standby| standby["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(standbys, [u64::from(second.pid())], "{status}");

    let ids = publish(&mut conn, "a", 50);
    wait_offset(&mut conn, ids.last().unwrap());
    assert_eq!(
        sorted(&processed(&first)),
        ids,
        "the holder handles every entry"
    );
    assert!(processed(&second).is_empty(), "the standby handles none");
    assert_eq!(second.count("consumer started"), 0);

    let stopping = Instant::now();
    first.terminate();
    assert!(first.log().contains("lease released"), "{}", first.log());
    second.wait_for_log("lease acquired");
    let takeover = stopping.elapsed();
    assert!(
        takeover < Duration::from_secs(2),
        "the standby took over after {takeover:?}"
    );
    let more = publish(&mut conn, "b", 20);
    wait_offset(&mut conn, more.last().unwrap());
    assert_eq!(
        sorted(&processed(&second)),
        more,
        "the new holder resumes after the old one's offset"
    );
    assert_eq!(second.count("consumer started"), 1);
    assert_eq!(lease_held(), Some(1.0));
    wait_for(Duration::from_secs(10), "the new holder's /readyz", || {
        readyz().is_some_and(|(status, body)| status == 200 && body.contains("ready"))
    });
    println!("[lease] graceful takeover in {} ms", takeover.as_millis());
    second.terminate();
}

#[test]
fn a_holder_paused_past_its_lease_is_replaced_and_on_waking_saves_and_handles_nothing() {
    let server = RedisServer::start();
    let url = server.url();
    let mut conn = connect(&url);
    let mut first = start(&url, "1s");
    first.wait_for_log("lease acquired");
    let mut second = start(&url, "1s");
    second.wait_for_log("waiting as a standby");
    let ids = publish(&mut conn, "a", 30);
    wait_offset(&mut conn, ids.last().unwrap());
    assert_eq!(processed(&first).len(), 30);

    first.signal("STOP");
    let stopped = Instant::now();
    second.wait_for_log("lease acquired");
    let takeover = stopped.elapsed();
    let handled_by_first = processed(&first);
    let more = publish(&mut conn, "b", 30);
    wait_offset(&mut conn, more.last().unwrap());
    assert_eq!(sorted(&processed(&second)), more);

    // Resumed: the old holder finds its lease gone before doing anything.
    first.signal("CONT");
    let resumed_at = stored_offset(&mut conn).unwrap();
    first.wait_for_log("lease lost");
    first.wait_for_log("waiting as a standby");
    let last = publish(&mut conn, "c", 30);
    let mut previous = parse_id(&resumed_at);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let offset = parse_id(&stored_offset(&mut conn).unwrap());
        assert!(offset >= previous, "the offset moved backwards");
        previous = offset;
        if offset == parse_id(last.last().unwrap()) {
            break;
        }
        assert!(Instant::now() < deadline, "not handled in time");
        std::thread::sleep(Duration::from_millis(2));
    }
    first.assert_alive();
    second.assert_alive();
    assert_eq!(
        processed(&first),
        handled_by_first,
        "the resumed holder started a handler call; log:\n{}",
        first.log()
    );
    let by_second: BTreeSet<String> = processed(&second).into_iter().collect();
    assert!(last.iter().all(|id| by_second.contains(id)));
    assert_eq!(first.count("consumer started"), 1);
    assert_eq!(second.count("consumer started"), 1);
    println!(
        "[lease] takeover after SIGSTOP of a 1s lease in {} ms",
        takeover.as_millis()
    );
    first.terminate();
    second.terminate();
}

/// Runs `lobby-worker offsets ARGS` against `url`; its stdout.
fn offsets(url: &str, args: &[&str]) -> String {
    let mut all = vec!["offsets"];
    all.extend_from_slice(args);
    let output = common::worker(url, &all);
    common::assert_success(&output);
    common::stdout(&output)
}

#[test]
fn a_running_worker_rewound_by_100_entries_handles_exactly_those_again() {
    let server = RedisServer::start();
    let url = server.url();
    let mut conn = connect(&url);
    let mut worker = start(&url, "3s");
    worker.wait_for_log("lease acquired");
    let ids = publish(&mut conn, "a", 300);
    wait_offset(&mut conn, ids.last().unwrap());
    assert_eq!(sorted(&processed(&worker)), ids);

    let began = Instant::now();
    let printed = offsets(&url, &["rewind", "--to", &ids[199]]);
    let waited = began.elapsed();
    assert!(
        printed.starts_with(&format!("{} (was {})", ids[199], ids[299])),
        "{printed}"
    );
    // The worker handed the lease over and resumes after the new offset.
    wait_for(
        Duration::from_secs(20),
        "the rewound entries are handled again",
        || processed(&worker).len() >= 400,
    );
    wait_offset(&mut conn, ids.last().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let handled = processed(&worker);
    assert_eq!(handled.len(), 400, "exactly 100 entries again");
    assert_eq!(sorted(&handled[300..]), &ids[200..], "exactly those");
    assert!(worker.log().contains("handing it over"), "{}", worker.log());
    assert_eq!(worker.count("consumer started"), 2);
    println!(
        "[lease] rewind waited {} ms for the handover",
        waited.as_millis()
    );

    // With --force the holder is fenced out at once rather than asked.
    offsets(&url, &["rewind", "--to", &ids[289], "--force"]);
    wait_for(
        Duration::from_secs(20),
        "the forced rewind is obeyed",
        || processed(&worker).len() >= 410,
    );
    wait_offset(&mut conn, ids.last().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let handled = processed(&worker);
    assert_eq!(sorted(&handled[400..]), &ids[290..]);
    worker.assert_alive();
    worker.terminate();
}

#[test]
fn a_reset_of_a_running_worker_starts_it_again_per_its_start_option() {
    let server = RedisServer::start();
    let url = server.url();
    let mut conn = connect(&url);
    let ids = publish(&mut conn, "a", 100);
    let mut worker = Running::start_with_env(
        &url,
        &[
            "--lease-ttl",
            "3s",
            "--metrics-addr",
            "off",
            // Inclusive: from the 51st entry on.
            "--start-from",
            &ids[50],
        ],
        &[("LOBBY_LOG_LEVEL", "debug")],
    );
    wait_offset(&mut conn, ids.last().unwrap());
    assert_eq!(sorted(&processed(&worker)), &ids[50..]);
    let printed = offsets(&url, &["reset"]);
    assert!(printed.contains("deleted"), "{printed}");
    wait_for(Duration::from_secs(20), "the worker starts over", || {
        processed(&worker).len() >= 100
    });
    wait_offset(&mut conn, ids.last().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let handled = processed(&worker);
    assert_eq!(handled.len(), 100);
    assert_eq!(
        sorted(&handled[50..]),
        &ids[50..],
        "after --start-from again"
    );
    worker.terminate();
}

/// The timestamp (RFC 3339, UTC, fixed width: sorts as text) and entry id of
/// every event a worker logged as processed.
fn processed_at(worker: &Running) -> Vec<(String, String)> {
    worker
        .log()
        .lines()
        .filter(|line| line.contains(PROCESSED))
        .filter_map(|line| {
            let at = line.split_whitespace().next()?.to_owned();
            let id = line
                .split("stream_entry_id=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .to_owned();
            Some((at, id))
        })
        .collect()
}

/// The pid of the lease's holder, as `status` reports it.
fn holder_pid(url: &str) -> Option<u64> {
    common::status_json(url, &[])["lease"]["holder"]["pid"].as_u64()
}

/// Publishes a deletion every few milliseconds until stopped; the ids.
struct Publisher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Publisher {
    fn start(url: &str) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let mut conn = connect(url);
        let thread = std::thread::spawn(move || {
            let mut ids = Vec::new();
            let mut n = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let id: String = deletion(&format!("steady-{}", n % 97), 1_700_000_000_000)
                    .query(&mut conn)
                    .unwrap();
                ids.push(id);
                n += 1;
                // A steady trickle, as the user service sends: the pause is
                // the load's shape, not a synchronisation.
                std::thread::sleep(Duration::from_millis(10));
            }
            ids
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// How long after `since` the stored offset first moved past `at`.
fn progress_after(conn: &mut redis::Connection, at: Option<String>, since: Instant) -> Duration {
    let at = at.map(|id| parse_id(&id));
    wait_for(Duration::from_secs(30), "the offset moves again", || {
        stored_offset(conn).map(|id| parse_id(&id)) > at
    });
    since.elapsed()
}

/// Three workers, a steady stream of events, the holder SIGKILLed five times
/// (a fresh worker started each time) and finally SIGTERMed: every event
/// handled, never two processes handling at once (each process's handling
/// forms one unbroken run in time), the gap without progress at most the
/// ttl plus a second after a kill and at most a second after a SIGTERM.
#[test]
fn three_workers_and_five_killed_holders_lose_nothing_and_never_overlap() {
    let server = RedisServer::start();
    let url = server.url();
    let mut conn = connect(&url);
    let ttl = Duration::from_secs(2);
    let mut workers: Vec<Running> = (0..3).map(|_| start(&url, "2s")).collect();
    let publisher = Publisher::start(&url);
    let mut kill_gaps = Vec::new();
    for _ in 0..5 {
        let before = stored_offset(&mut conn);
        let _ = progress_after(&mut conn, before, Instant::now());
        let pid = holder_pid(&url).expect("a holder");
        let holder = workers
            .iter_mut()
            .find(|worker| u64::from(worker.pid()) == pid)
            .expect("the holder is one of ours");
        let at_kill = stored_offset(&mut conn);
        let killed_at = Instant::now();
        holder.kill9();
        kill_gaps.push(progress_after(&mut conn, at_kill, killed_at));
        workers.push(start(&url, "2s"));
    }
    let pid = holder_pid(&url).expect("a holder");
    let holder = workers
        .iter_mut()
        .find(|worker| u64::from(worker.pid()) == pid)
        .unwrap();
    let at_stop = stored_offset(&mut conn);
    let stopped_at = Instant::now();
    holder.terminate();
    let graceful_gap = progress_after(&mut conn, at_stop, stopped_at);
    let ids = publisher.finish();
    wait_offset(&mut conn, ids.last().unwrap());

    let handled: BTreeSet<String> = workers.iter().flat_map(processed).collect();
    let missing: Vec<&String> = ids.iter().filter(|id| !handled.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} events never handled: {missing:?}",
        missing.len()
    );
    // Each process's handling is one unbroken run: sorted by time, once the
    // handling passes from one process to another it never comes back.
    let mut timeline: Vec<(String, usize)> = workers
        .iter()
        .enumerate()
        .flat_map(|(index, worker)| {
            processed_at(worker)
                .into_iter()
                .map(move |(at, _)| (at, index))
        })
        .collect();
    timeline.sort();
    let mut finished = BTreeSet::new();
    let mut current = None;
    for (at, index) in &timeline {
        if current != Some(*index) {
            assert!(
                !finished.contains(index),
                "worker {index} handled again at {at} after another had taken over"
            );
            if let Some(previous) = current {
                finished.insert(previous);
            }
            current = Some(*index);
        }
    }
    for gap in &kill_gaps {
        assert!(
            *gap <= ttl + Duration::from_secs(1),
            "after a kill: {kill_gaps:?}"
        );
    }
    assert!(
        graceful_gap <= Duration::from_secs(1),
        "after a SIGTERM: {graceful_gap:?}"
    );
    println!(
        "[lease] {} events, gaps after SIGKILL (ttl 2s): {:?} ms; after SIGTERM: {} ms",
        ids.len(),
        kill_gaps
            .iter()
            .map(Duration::as_millis)
            .collect::<Vec<_>>(),
        graceful_gap.as_millis()
    );
    for worker in &mut workers {
        if worker.child.try_wait().unwrap().is_none() {
            worker.terminate();
        }
    }
}

/// Redis restarted without persistence: the lease key vanishes with
/// everything else. A new election follows, and the events published to the
/// new Redis are each handled once.
#[test]
fn a_redis_restarted_empty_holds_a_new_election_without_double_consumption() {
    let mut server = RedisServer::start();
    let url = server.url();
    let mut first = start(&url, "2s");
    first.wait_for_log("lease acquired");
    let mut second = start(&url, "2s");
    second.wait_for_log("waiting as a standby");
    let mut conn = connect(&url);
    let ids = publish(&mut conn, "before", 30);
    wait_offset(&mut conn, ids.last().unwrap());
    let acquired_before = first.count("lease acquired") + second.count("lease acquired");

    server.restart();
    let mut conn = connect(&url);
    wait_for(Duration::from_secs(30), "a new election", || {
        first.count("lease acquired") + second.count("lease acquired") > acquired_before
    });
    let after = publish(&mut conn, "after", 30);
    wait_offset(&mut conn, after.last().unwrap());
    let mut all = processed(&first);
    all.extend(processed(&second));
    for id in &after {
        let times = all.iter().filter(|handled| *handled == id).count();
        assert_eq!(times, 1, "{id} handled {times} times");
    }
    first.terminate();
    second.terminate();
}

/// The holder cut off from Redis (its connections stall) for longer than the
/// ttl stops consuming before its lease can have run out; a standby takes
/// over and handles what follows; the cut-off one handles none of it.
#[test]
fn a_holder_cut_off_longer_than_its_lease_stops_in_time_and_is_replaced() {
    let server = RedisServer::start();
    let url = server.url();
    let proxy = lifecycle_test_support::TcpProxy::start(server.port());
    let ttl = Duration::from_secs(2);
    let mut first = start(&format!("redis://127.0.0.1:{}/", proxy.port()), "2s");
    first.wait_for_log("lease acquired");
    let mut second = start(&url, "2s");
    second.wait_for_log("waiting as a standby");
    let mut conn = connect(&url);
    let ids = publish(&mut conn, "before", 20);
    wait_offset(&mut conn, ids.last().unwrap());

    proxy.pause();
    let cut_at = Instant::now();
    first.wait_for_log("lease lost");
    let stopped_after = cut_at.elapsed();
    assert!(
        stopped_after < ttl,
        "stopped {stopped_after:?} after the cut"
    );
    second.wait_for_log("lease acquired");
    let handled_by_first = processed(&first).len();
    let after = publish(&mut conn, "after", 20);
    wait_offset(&mut conn, after.last().unwrap());
    assert_eq!(sorted(&processed(&second)), after);
    proxy.resume();
    wait_for(
        Duration::from_secs(20),
        "the cut-off one waits again",
        || first.count("waiting as a standby") >= 1,
    );
    assert_eq!(processed(&first).len(), handled_by_first);
    println!(
        "[lease] cut off from Redis: stopped consuming {} ms after the cut (ttl 2s)",
        stopped_after.as_millis()
    );
    first.terminate();
    second.terminate();
}
