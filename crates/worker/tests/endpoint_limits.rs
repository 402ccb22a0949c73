//! The HTTP endpoints of `run` cannot starve the worker: against a private
//! redis-server, more idle connections than the process has file
//! descriptors leave the cascades and `/readyz` working, and the server
//! closes idle and half-sent connections by itself within seconds.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{get, lock, wait_for, Running, BIN, STREAM};
use lifecycle_test_support::{free_port, RedisServer};

/// The worker's descriptor limit in the flood test: the usual default soft
/// limit, which the incident's unit had.
const WORKER_FD_LIMIT: usize = 1_024;
/// Idle connections held open in the flood test: more than the worker's
/// descriptor limit, as in the incident.
const IDLE: usize = 1_100;
/// The server's cap on connections (`MAX_CONNECTIONS` in src/http.rs).
const MAX_CONNECTIONS: usize = 64;
/// Users whose deletion is published during the flood.
const USERS: usize = 5;
/// How long the server may leave an idle connection open.
const CLOSE_WITHIN: Duration = Duration::from_secs(15);

/// `lobby-worker run` under `ulimit -n` [`WORKER_FD_LIMIT`], its stderr
/// collected as it comes.
struct LimitedWorker {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl LimitedWorker {
    fn start(url: &str, args: &[&str]) -> Self {
        let script = format!("ulimit -n {WORKER_FD_LIMIT} && exec \"$0\" \"$@\"");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(BIN)
            .arg("run")
            .args(args)
            .env("REDIS_URL", url)
            .env("LOBBY_LOG_LEVEL", "info")
            .env("LOBBY_LOG_FORMAT", "text")
            .env_remove("LOBBY_METRICS_ADDR")
            .env_remove("LOBBY_STREAM")
            .env_remove("LOBBY_KEY_PREFIX")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sh -c 'ulimit -n ...; exec lobby-worker run'");
        let log = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut log = lock(&sink);
                log.push_str(&line);
                log.push('\n');
            }
        });
        Self { child, log }
    }

    fn log(&self) -> String {
        lock(&self.log).clone()
    }

    /// The descriptors the worker holds now (`exec` kept the shell's pid).
    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap_or_else(|err| {
                panic!("cannot list the worker's fds ({err}); log:\n{}", self.log())
            })
            .count()
    }

    /// The descriptor limit the worker runs under.
    fn fd_limit(&self) -> usize {
        soft_fd_limit(&format!("/proc/{}/limits", self.child.id()))
    }

    fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the worker exited with {status}; log:\n{}", self.log());
        }
    }
}

impl Drop for LimitedWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The soft "Max open files" limit in a `/proc/<pid>/limits` file.
fn soft_fd_limit(limits: &str) -> usize {
    let text = std::fs::read_to_string(limits).unwrap();
    let line = text
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no open-files line in {limits}:\n{text}"));
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// Makes sure this test process may hold `needed` descriptors, raising its
/// soft limit with `prlimit` (util-linux) when it is lower.
fn ensure_own_fd_limit(needed: usize) {
    if soft_fd_limit("/proc/self/limits") >= needed {
        return;
    }
    let status = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={needed}:"))
        .status()
        .expect("run prlimit (util-linux) to raise this test's fd limit");
    assert!(status.success(), "prlimit --nofile={needed}: failed");
    assert!(
        soft_fd_limit("/proc/self/limits") >= needed,
        "this test needs {needed} file descriptors; raise `ulimit -n`"
    );
}

/// A user in a game they own, with one other member: their deletion
/// cancels the game and leaves the other member alone in it.
fn seed_user(server: &RedisServer, i: usize) {
    let game = format!("lobby:game:g-{i}");
    let user = format!("u-{i}");
    server.cli(&["HSET", &game, "owner_id", &user, "status", "open"]);
    server.cli(&["SADD", &format!("{game}:members"), &user, "other"]);
    server.cli(&[
        "SADD",
        &format!("lobby:user:{user}:games"),
        &format!("g-{i}"),
    ]);
}

fn cascade_applied(server: &RedisServer, i: usize) -> bool {
    let game = format!("lobby:game:g-{i}");
    server.cli(&["HGET", &game, "status"]) == "cancelled"
        && server.cli(&["SMEMBERS", &format!("{game}:members")]) == "other"
}

/// Reads from `stream` until the server closes it (end of file or a reset);
/// returns how long after `idle_since` that was, or panics when it is
/// still open [`CLOSE_WITHIN`] after it.
fn await_close(stream: &mut TcpStream, idle_since: Instant, what: &str) -> Duration {
    let started = idle_since;
    let mut buf = [0_u8; 4096];
    loop {
        let left = CLOSE_WITHIN.saturating_sub(started.elapsed());
        assert!(!left.is_zero(), "{what}: still open after {CLOSE_WITHIN:?}");
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            // A response to the timeout (a 408, say) before the close.
            Ok(_) => {}
            Err(err)
                if matches!(
                    err.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                ) =>
            {
                return started.elapsed()
            }
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: still open after {CLOSE_WITHIN:?}")
            }
            Err(err) => panic!("{what}: {err}"),
        }
    }
}

/// The incident: 1,100 idle connections held open against a worker with
/// 1,024 descriptors. The worker accepts at most its cap of them at a time
/// (its descriptor count stays within the cap of its count before), keeps
/// applying cascades and saving the offset, and `/readyz` answers while
/// every one of them is still held by the client.
#[test]
fn idle_connections_beyond_the_fd_limit_starve_neither_cascades_nor_readyz() {
    ensure_own_fd_limit(IDLE + 256);
    let server = RedisServer::start();
    let url = server.url();
    for i in 0..USERS {
        seed_user(&server, i);
    }
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut worker = LimitedWorker::start(
        &url,
        &[
            "--metrics-addr",
            &addr.to_string(),
            "--block-timeout",
            "250ms",
        ],
    );
    wait_for(Duration::from_secs(15), "the worker is ready", || {
        worker.assert_alive();
        get(port, "/readyz").is_some_and(|(code, _)| code == 200)
    });
    assert_eq!(worker.fd_limit(), WORKER_FD_LIMIT);
    assert!(
        IDLE > worker.fd_limit(),
        "the flood must exceed the worker's descriptors"
    );
    let baseline = worker.open_fds();
    // Whatever the server accepts beyond its cap: the one connection that
    // waits for a slot, and some slack for the worker's own reconnects.
    let bound = baseline + MAX_CONNECTIONS + 1 + 8;

    let mut idle = Vec::with_capacity(IDLE);
    let mut most_fds = baseline;
    let started = Instant::now();
    for n in 0..IDLE {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(20))
            .unwrap_or_else(|err| panic!("idle connection {n}: {err}; log:\n{}", worker.log()));
        idle.push(stream);
        if n % 50 == 0 {
            most_fds = most_fds.max(worker.open_fds());
        }
    }
    println!(
        "[flood] {IDLE} idle connections open after {} ms",
        started.elapsed().as_millis()
    );
    worker.assert_alive();

    // With every idle connection still held: cascades go on...
    let mut last_id = String::new();
    for i in 0..USERS {
        last_id = common::add_event(&server, "user.deleted", &format!("u-{i}"), "1700000000000");
    }
    let published = Instant::now();
    wait_for(
        Duration::from_secs(20),
        "the cascades are applied and the offset saved during the flood",
        || {
            worker.assert_alive();
            most_fds = most_fds.max(worker.open_fds());
            (0..USERS).all(|i| cascade_applied(&server, i))
                && server.cli(&["GET", "lobby:stream_offsets:user_lifecycle"]) == last_id
        },
    );
    println!(
        "[flood] cascades applied {} ms after publishing",
        published.elapsed().as_millis()
    );
    // ...and /readyz answers.
    let asked = Instant::now();
    wait_for(
        Duration::from_secs(15),
        "/readyz answers 200 during the flood",
        || {
            worker.assert_alive();
            most_fds = most_fds.max(worker.open_fds());
            get(port, "/readyz").is_some_and(|(code, _)| code == 200)
        },
    );
    println!(
        "[flood] /readyz answered {} ms after asking; the worker held at most {most_fds} fds (baseline {baseline})",
        asked.elapsed().as_millis()
    );
    assert_eq!(idle.len(), IDLE, "the idle connections are still held");
    assert!(
        most_fds <= bound,
        "the worker held {most_fds} fds (baseline {baseline}, bound {bound}); log:\n{}",
        worker.log()
    );
    let log = worker.log();
    assert!(
        log.contains("at their connection cap"),
        "no warning of the cap; log:\n{log}"
    );
    assert!(
        !log.contains("os error 24") && !log.contains("Too many open files"),
        "the worker ran out of descriptors; log:\n{log}"
    );
    assert!(
        log.matches("at their connection cap").count() == 1,
        "the cap warning is not rate-limited; log:\n{log}"
    );
    drop(idle);
    assert_eq!(
        server.cli(&["XLEN", STREAM]),
        USERS.to_string(),
        "the events are all there"
    );
}

/// A connection that sends nothing, one that sends half a request header
/// and a keep-alive connection idle after its request are each closed by
/// the server within seconds, and the server still answers afterwards.
#[test]
fn the_server_closes_idle_and_half_sent_connections() {
    let server = RedisServer::start();
    let url = server.url();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut worker = Running::start(&url, &["--metrics-addr", &addr]);
    wait_for(Duration::from_secs(15), "/healthz answers", || {
        worker.assert_alive();
        get(port, "/healthz").is_some_and(|(code, _)| code == 200)
    });

    let connected = Instant::now();
    let mut silent = TcpStream::connect(&addr).unwrap();
    let mut half = TcpStream::connect(&addr).unwrap();
    half.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n")
        .unwrap();
    let mut kept = TcpStream::connect(&addr).unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0_u8; 1024];
    while !answer.ends_with(b"ok\n") {
        let n = kept.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the answer: {answer:?}");
        answer.extend_from_slice(&buf[..n]);
    }
    let answered = Instant::now();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );

    for (stream, idle_since, what) in [
        (&mut silent, connected, "a connection that sent nothing"),
        (&mut half, connected, "a connection that sent half a header"),
        (&mut kept, answered, "an idle keep-alive connection"),
    ] {
        let took = await_close(stream, idle_since, what);
        println!("[idle] {what}: closed after {} ms", took.as_millis());
    }
    worker.assert_alive();
    assert_eq!(get(port, "/healthz").map(|(code, _)| code), Some(200));
}

/// SIGTERM with an idle connection open: it is closed at once rather than
/// holding the exit until its header timeout or the shutdown deadline.
#[test]
fn stop_does_not_wait_for_idle_connections() {
    let server = RedisServer::start();
    let url = server.url();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut worker = Running::start(
        &url,
        &[
            "--metrics-addr",
            &addr,
            "--block-timeout",
            "250ms",
            "--shutdown-timeout",
            "10s",
        ],
    );
    worker.wait_for_log("consumer started");
    wait_for(Duration::from_secs(15), "/healthz answers", || {
        worker.assert_alive();
        get(port, "/healthz").is_some_and(|(code, _)| code == 200)
    });
    let mut idle = TcpStream::connect(&addr).unwrap();
    let idle_since = Instant::now();
    // The server has it: a request on a later connection is answered.
    assert_eq!(get(port, "/healthz").map(|(code, _)| code), Some(200));
    let signalled = Instant::now();
    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(20));
    let took = signalled.elapsed();
    assert!(status.success(), "exit {status}; log:\n{}", worker.log());
    println!("[stop] exited {} ms after SIGTERM", took.as_millis());
    assert!(
        took < Duration::from_secs(4),
        "the exit took {took:?}; log:\n{}",
        worker.log()
    );
    assert!(
        !worker.log().contains("HTTP requests still running at exit"),
        "{}",
        worker.log()
    );
    let closed = await_close(&mut idle, idle_since, "the idle connection at the stop");
    assert!(
        closed <= took + Duration::from_secs(1),
        "closed after {closed:?}"
    );
}
