//! The worker on a Redis Cluster (three masters, three replicas on
//! loopback): `run` with a `redis+cluster://` URL and the cluster key
//! layout follows a failover of the stream's master without a restart, and
//! every entry the promoted master holds gets its cascade; every command
//! works through the cluster; a cluster URL with the plain layout is
//! refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{connect, deletion, lock, parse_id, pipelined, wait_for, Running, STREAM};
use lifecycle_test_support::RedisCluster;

/// Entries waiting when the worker starts.
const BACKLOG: usize = 10_000;

/// The offset key of the default label.
const OFFSET_KEY: &str = "lobby:stream_offsets:user_lifecycle";

/// A connection to the master that serves `key` now.
fn owner(cluster: &RedisCluster, key: &str) -> redis::Connection {
    connect(&format!(
        "redis://127.0.0.1:{}/",
        cluster.master_of_key(key)
    ))
}

/// The stored offset on the node `conn` reaches; `None` while absent or
/// unreadable.
fn stored_offset(conn: &mut redis::Connection) -> Option<String> {
    redis::cmd("GET")
        .arg(OFFSET_KEY)
        .query::<Option<String>>(conn)
        .ok()
        .flatten()
}

/// The entry id each user's cascade record names, asking every master
/// (each answers for the users of its slots, and MOVED for the others).
fn recorded(cluster: &RedisCluster, users: &[&str]) -> Vec<Option<String>> {
    let mut found: Vec<Option<String>> = vec![None; users.len()];
    for port in cluster.masters() {
        let mut conn = connect(&format!("redis://127.0.0.1:{port}/"));
        for (chunk_index, chunk) in users.chunks(1000).enumerate() {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for user in chunk {
                pipe.cmd("HGET")
                    .arg(format!("lobby:user:{{{user}}}:cascade"))
                    .arg("entry_id");
            }
            let replies: Vec<redis::Value> = pipe.query(&mut conn).unwrap();
            for (offset, reply) in replies.into_iter().enumerate() {
                if let redis::Value::BulkString(id) = reply {
                    found[chunk_index * 1000 + offset] = Some(String::from_utf8(id).unwrap());
                }
            }
        }
    }
    found
}

/// Publishes one event at a time to the stream's master (following
/// `MOVED`) until stopped; keeps the ids Redis acknowledged.
struct Producer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Producer {
    fn start(cluster: &RedisCluster) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let ports = cluster.ports();
        let thread = {
            let (stop, acked) = (Arc::clone(&stop), Arc::clone(&acked));
            thread::spawn(move || {
                let mut sequence = 0usize;
                let mut conn: Option<redis::Connection> = None;
                let mut next_port = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let Some(current) = conn.as_mut() else {
                        // Any node: a replica or another master answers
                        // MOVED to the stream's master.
                        let port = ports[next_port % ports.len()];
                        next_port += 1;
                        conn = node_connection(&format!("127.0.0.1:{port}"));
                        if conn.is_none() {
                            thread::sleep(Duration::from_millis(20));
                        }
                        continue;
                    };
                    // A user per attempt, not per acknowledged entry: an
                    // XADD whose reply a failover cut off may still have
                    // been written, and each entry must name its own user.
                    let user = format!("live-{sequence}");
                    sequence += 1;
                    match deletion(&user, 1_700_000_000_000).query::<String>(current) {
                        Ok(id) => {
                            lock(&acked).push(id);
                            thread::sleep(Duration::from_millis(2));
                        }
                        Err(err) => {
                            conn = err
                                .redirect_node()
                                .and_then(|(address, _)| node_connection(address));
                            if conn.is_none() {
                                thread::sleep(Duration::from_millis(20));
                            }
                        }
                    }
                }
            })
        };
        Self {
            stop,
            acked,
            thread: Some(thread),
        }
    }

    /// Stops it; the ids Redis acknowledged.
    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        std::mem::take(&mut *lock(&self.acked))
    }
}

/// A connection to the node at `address`, when it takes one.
fn node_connection(address: &str) -> Option<redis::Connection> {
    let client = redis::Client::open(format!("redis://{address}/")).ok()?;
    let conn = client
        .get_connection_with_timeout(Duration::from_millis(200))
        .ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    Some(conn)
}

/// The ids and users of the stream's entries on the node `conn` reaches.
fn stream_entries(conn: &mut redis::Connection) -> Vec<(String, String)> {
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(STREAM)
        .arg("-")
        .arg("+")
        .query(conn)
        .unwrap();
    entries
        .into_iter()
        .map(|(id, fields)| {
            let user = fields
                .into_iter()
                .find(|(name, _)| name == "user_id")
                .map(|(_, user)| user)
                .unwrap_or_default();
            (id, user)
        })
        .collect()
}

/// The worker in a backlog with live events when the stream's master is
/// SIGKILLed: it carries on against the promoted replica without a
/// restart, and every entry the new master holds gets its cascade.
#[test]
fn run_follows_a_failover_of_the_streams_master() {
    let mut cluster = RedisCluster::start();
    let old_master = cluster.master_of_key(STREAM);
    let mut direct = connect(&format!("redis://127.0.0.1:{old_master}/"));
    let backlog: Vec<String> = pipelined(
        &mut direct,
        (0..BACKLOG).map(|i| deletion(&format!("backlog-{i}"), 1_700_000_000_000)),
    );
    assert_eq!(backlog.len(), BACKLOG);
    let mut conn = owner(&cluster, OFFSET_KEY);

    let mut worker = Running::start_with_env(
        &cluster.url(),
        &[
            "--metrics-addr",
            "off",
            "--lease-ttl",
            "2s",
            "--key-layout",
            "cluster",
        ],
        &[("LOBBY_LOG_LEVEL", "info")],
    );
    let producer = Producer::start(&cluster);
    wait_for(
        Duration::from_secs(60),
        "the worker to start on the backlog",
        || {
            stored_offset(&mut conn)
                .is_some_and(|offset| parse_id(&offset) >= parse_id(&backlog[BACKLOG / 10]))
        },
    );
    let killed_at = Instant::now();
    cluster.kill(old_master);
    let new_master = cluster.wait_for_failover(old_master, STREAM, Duration::from_secs(60));
    let failover = killed_at.elapsed();
    let mut promoted = connect(&format!("redis://127.0.0.1:{new_master}/"));
    let live_before = stream_entries(&mut promoted).len();
    wait_for(
        Duration::from_secs(30),
        "new events on the promoted master",
        || stream_entries(&mut promoted).len() > live_before + 200,
    );
    let acked = producer.finish();

    // The offset's master now (the failover may have moved it too).
    let mut conn = owner(&cluster, OFFSET_KEY);
    let held = stream_entries(&mut promoted);
    let last = held.last().map(|(id, _)| id.clone()).unwrap();
    let caught_up_at = Instant::now();
    let reached = common::wait_until(Duration::from_secs(120), || {
        stored_offset(&mut conn).as_deref() == Some(last.as_str())
    });
    assert!(
        reached.is_ok(),
        "the offset {:?} did not reach the new master's last entry {last}\n{}",
        stored_offset(&mut conn),
        worker.log()
    );
    let catching_up = caught_up_at.elapsed();
    worker.assert_alive();

    // One user per entry, spread over every master: the record names
    // exactly that entry.
    let users: Vec<&str> = held.iter().map(|(_, user)| user.as_str()).collect();
    let missing: Vec<(String, Option<String>)> = held
        .iter()
        .zip(recorded(&cluster, &users))
        .filter(|((id, _), record)| record.as_deref() != Some(id.as_str()))
        .map(|((id, _), record)| (id.clone(), record))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} entries on the new master have no cascade, first: {:?}\n{}",
        missing.len(),
        held.len(),
        missing.first(),
        worker.log()
    );

    let held_ids: HashSet<&String> = held.iter().map(|(id, _)| id).collect();
    let lost = backlog
        .iter()
        .chain(acked.iter())
        .filter(|id| !held_ids.contains(id))
        .count();
    println!(
        "cluster failover (SIGKILL of the stream's master): {} entries on the new master all handled; {lost} acknowledged entries lost by the old master before replication; the replica took over {:.1} s after the kill; caught up {:.1} s after the producer stopped",
        held.len(),
        failover.as_secs_f64(),
        catching_up.as_secs_f64()
    );
    worker.terminate();
    let status = worker.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}\n{}", worker.log());
}

#[test]
fn every_command_works_through_the_cluster() {
    let cluster = RedisCluster::start();
    let url = cluster.url();
    let layout = ["--key-layout", "cluster"];
    let with_layout = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(layout.iter())
            .map(|arg| (*arg).to_owned())
            .collect()
    };
    let run = |args: &[&str]| {
        let args = with_layout(args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        common::worker(&url, &args)
    };
    let mut ids = Vec::new();
    for user in ["u-1", "u-2", "u-3"] {
        let published = run(&["publish", "--event-type", "user.deleted", "--user-id", user]);
        common::assert_success(&published);
        ids.push(common::stdout(&published).trim().to_owned());
    }
    let stream_master = cluster.master_of_key(STREAM);
    let mut master = connect(&format!("redis://127.0.0.1:{stream_master}/"));
    let held: Vec<String> = stream_entries(&mut master)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(held, ids);

    let tail = run(&["tail", "--json"]);
    common::assert_success(&tail);
    for user in ["u-1", "u-2", "u-3"] {
        assert!(
            common::stdout(&tail).contains(&format!(r#""user_id":"{user}""#)),
            "{}",
            common::stdout(&tail)
        );
    }

    let drained = run(&["run", "--drain", "--metrics-addr", "off"]);
    common::assert_success(&drained);
    let last = ids.last().unwrap().clone();
    assert_eq!(
        stored_offset(&mut owner(&cluster, OFFSET_KEY)),
        Some(last.clone())
    );
    let records = recorded(&cluster, &["u-1", "u-2", "u-3"]);
    let expected: Vec<Option<String>> = ids.iter().cloned().map(Some).collect();
    assert_eq!(records, expected);
    let offset = run(&["offsets", "get"]);
    common::assert_success(&offset);
    assert_eq!(common::stdout(&offset).trim(), last);
    let status = common::status_json(&url, &layout);
    assert_eq!(status["offset"], last.as_str(), "{status}");
    let user = run(&["user", "u-2", "--json"]);
    common::assert_success(&user);
    assert!(
        common::stdout(&user).contains(&ids[1]),
        "{}",
        common::stdout(&user)
    );

    // One node named as a standalone server: refused at once with one
    // line, by the worker and by a command alike.
    let node = format!("redis://127.0.0.1:{stream_master}");
    for args in [
        &["run", "--drain", "--metrics-addr", "off"][..],
        &["status"][..],
    ] {
        let output = common::worker(&node, args);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{args:?}: {}",
            common::stderr(&output)
        );
        let line = common::assert_one_error_line(&output);
        assert!(line.contains("is a node of a Redis Cluster"), "{line}");
    }
}

#[test]
fn a_cluster_url_needs_the_cluster_key_layout() {
    let url = "redis+cluster://:hunter2@127.0.0.1:1,127.0.0.1:2";
    for args in [&["status"][..], &["run", "--drain"][..]] {
        let output = common::worker(url, args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            common::stderr(&output)
        );
        let line = common::assert_one_error_line(&output);
        assert!(line.contains("--key-layout cluster"), "{line}");
        assert!(!line.contains("hunter2"), "{line}");
    }
    // The layout from the environment is enough; the URL is then checked
    // like any other (here: no node answers).
    let output = std::process::Command::new(common::BIN)
        .args(["status"])
        .env("REDIS_URL", url)
        .env("LOBBY_KEY_LAYOUT", "cluster")
        .env_remove("LOBBY_METRICS_ADDR")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", common::stderr(&output));
    let line = common::assert_one_error_line(&output);
    assert!(!line.contains("--key-layout"), "{line}");
    assert!(!line.contains("hunter2"), "{line}");
    let bad = common::worker(url, &["status", "--key-layout", "sharded"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        common::stderr(&bad).contains("use plain or cluster"),
        "{}",
        common::stderr(&bad)
    );
}

/// A TLS-only cluster (`rediss+cluster://`, the CA from `--tls-ca-file`):
/// publish, the drain with its cascades spread over the masters, the
/// stored offset, and the reader's own socket to the stream's master over
/// TLS.
#[test]
fn a_tls_cluster_is_served_over_rediss_cluster() {
    let files = lifecycle_test_support::TlsFiles::generate();
    let cluster = RedisCluster::start_tls(&files);
    let url = cluster.url();
    assert!(url.starts_with("rediss+cluster://"), "{url}");
    let ca = cluster.ca_file().unwrap().to_str().unwrap().to_owned();
    let flags = ["--key-layout", "cluster", "--tls-ca-file", ca.as_str()];
    let run = |args: &[&str]| {
        let args: Vec<&str> = args.iter().chain(flags.iter()).copied().collect();
        common::worker(&url, &args)
    };
    let users: Vec<String> = (0..12).map(|i| format!("tls-{i}")).collect();
    let mut ids = Vec::new();
    for user in &users {
        let published = run(&["publish", "--event-type", "user.deleted", "--user-id", user]);
        common::assert_success(&published);
        ids.push(common::stdout(&published).trim().to_owned());
    }
    let drained = run(&["run", "--drain", "--metrics-addr", "off"]);
    common::assert_success(&drained);
    let offset_port = cluster.master_of_key(OFFSET_KEY);
    assert_eq!(
        cluster.cli(offset_port, &["GET", OFFSET_KEY]).trim(),
        ids.last().unwrap()
    );
    let mut masters_used = HashSet::new();
    for (user, id) in users.iter().zip(&ids) {
        let key = format!("lobby:user:{{{user}}}:cascade");
        let port = cluster.master_of_key(&key);
        masters_used.insert(port);
        assert_eq!(
            cluster.cli(port, &["HGET", &key, "entry_id"]).trim(),
            id,
            "{user}"
        );
    }
    assert!(masters_used.len() > 1, "records on one master only");
    // Without the CA, the handshake is refused with one line.
    let refused = common::worker(&url, &["status", "--key-layout", "cluster"]);
    assert_eq!(
        refused.status.code(),
        Some(1),
        "{}",
        common::stderr(&refused)
    );
    common::assert_one_error_line(&refused);
}

/// `demo` on a cluster: its keys in the cluster layout, cleared on every
/// master before a second run, the tour the same both times.
#[test]
fn demo_tours_a_cluster() {
    let cluster = RedisCluster::start();
    let url = cluster.url();
    for _ in 0..2 {
        let output = common::worker(&url, &["demo", "--redis-url", &url]);
        common::assert_success(&output);
        let out = common::stdout(&output);
        for expected in [
            "user.deleted alice: cascade applied to 7 game(s)",
            "user.permanently_blocked bob: cascade applied to 8 game(s)",
            "user.deleted alice: already applied",
        ] {
            assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
        }
    }
    let key = "lobby-demo:game:{open-1}";
    assert_eq!(
        cluster
            .cli(cluster.master_of_key(key), &["HGET", key, "status"])
            .trim(),
        "cancelled"
    );
}
