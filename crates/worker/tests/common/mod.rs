//! Helpers shared by the binary's integration tests: running `lobby-worker`
//! once or in the background (its log collected as it comes), and polling
//! with a deadline.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_lobby-worker");

pub fn worker(url: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("REDIS_URL", url)
        .env("LOBBY_LOG_LEVEL", "info")
        .env_remove("LOBBY_METRICS_ADDR")
        .output()
        .expect("run lobby-worker")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status,
        stdout(output),
        stderr(output)
    );
}

/// Asserts the process failed with exactly one line on stderr, an error.
pub fn assert_one_error_line(output: &Output) -> String {
    assert!(!output.status.success(), "succeeded: {}", stdout(output));
    let err = stderr(output);
    let lines: Vec<&str> = err.lines().filter(|line| !line.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one line: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    lines[0].to_owned()
}

/// A running `lobby-worker run` whose stderr is collected as it comes.
pub struct Running {
    /// The process.
    pub child: Child,
    log: Arc<Mutex<String>>,
    /// The thread collecting stderr; joined once the process has exited, so
    /// that the log is complete.
    reader: Option<JoinHandle<()>>,
}

/// Locks `mutex`, poisoned or not.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Running {
    /// Starts `lobby-worker run ARGS` against `url`.
    pub fn start(url: &str, args: &[&str]) -> Self {
        Self::start_with_env(url, args, &[])
    }

    /// Starts `lobby-worker run ARGS` against `url` with extra environment
    /// (which wins over the defaults: info level, text logs).
    pub fn start_with_env(url: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(BIN)
            .arg("run")
            .args(args)
            .env("REDIS_URL", url)
            .env("LOBBY_LOG_LEVEL", "info")
            .env("LOBBY_LOG_FORMAT", "text")
            .env_remove("LOBBY_METRICS_ADDR")
            .env_remove("LOBBY_STREAM")
            .env_remove("LOBBY_KEY_PREFIX")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lobby-worker run");
        let log = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut log = lock(&sink);
                log.push_str(&line);
                log.push('\n');
            }
        });
        Self {
            child,
            log,
            reader: Some(reader),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far.
    pub fn log(&self) -> String {
        lock(&self.log).clone()
    }

    /// Lines of the log containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        lock(&self.log)
            .lines()
            .filter(|line| line.contains(needle))
            .count()
    }

    pub fn wait_for_log(&self, needle: &str) {
        wait_until(Duration::from_secs(15), || self.log().contains(needle))
            .unwrap_or_else(|()| panic!("no {needle:?} in the log:\n{}", self.log()));
    }

    /// Panics (with the log) unless the process is still running.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the worker exited with {status}; log:\n{}", self.log());
        }
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// SIGKILL, then waits for the process and its stderr to end.
    pub fn kill9(&mut self) {
        self.signal("KILL");
        self.child.wait().unwrap();
        self.finish_log();
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(&mut self) {
        self.signal("TERM");
        let status = self.wait_exit(Duration::from_secs(20));
        assert!(
            status.success(),
            "exit {status} after SIGTERM; log:\n{}",
            self.log()
        );
    }

    /// Waits for the process to exit by itself; the log is then complete.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.finish_log();
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {within:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn finish_log(&mut self) {
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_until(within: Duration, mut condition: impl FnMut() -> bool) -> Result<(), ()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if condition() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if condition() {
        Ok(())
    } else {
        Err(())
    }
}

/// One HTTP/1.1 GET: the status code and the body, or `None` when nothing
/// answers.
pub fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// The value of the sample named exactly `series` (name and labels).
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
}

// ---------------------------------------------------------------------------
// Redis from the test's side (the synchronous client)
// ---------------------------------------------------------------------------

/// How often [`wait_for`] polls.
const POLL: Duration = Duration::from_millis(5);
/// The offset key of the default label and prefix.
const OFFSET_KEY: &str = "lobby:stream_offsets:user_lifecycle";

/// Polls `condition` every [`POLL`] until it holds; panics naming `what` when
/// `within` passes first.
pub fn wait_for(within: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if condition() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting until {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// `<ms>-<seq>` as a pair that orders numerically.
pub fn parse_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id
        .split_once('-')
        .unwrap_or_else(|| panic!("not a stream id: {id:?}"));
    (ms.parse().unwrap(), seq.parse().unwrap())
}

pub fn connect(url: &str) -> redis::Connection {
    let conn = redis::Client::open(url)
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap_or_else(|err| panic!("cannot connect to {url}: {err}"));
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn
}

pub fn stored_offset(conn: &mut redis::Connection) -> Option<String> {
    redis::cmd("GET").arg(OFFSET_KEY).query(conn).unwrap()
}

/// Runs `commands` in pipelines of a few thousand and returns their replies.
pub fn pipelined<T: redis::FromRedisValue>(
    conn: &mut redis::Connection,
    commands: impl IntoIterator<Item = redis::Cmd>,
) -> Vec<T> {
    const PER_ROUND_TRIP: usize = 4000;
    let mut replies = Vec::new();
    let mut pipe = redis::pipe();
    let mut queued = 0;
    for command in commands {
        pipe.add_command(command);
        queued += 1;
        if queued == PER_ROUND_TRIP {
            replies.extend(pipe.query::<Vec<T>>(conn).unwrap());
            pipe = redis::pipe();
            queued = 0;
        }
    }
    if queued > 0 {
        replies.extend(pipe.query::<Vec<T>>(conn).unwrap());
    }
    replies
}

/// `INFO <section>` as a map of `name:value` lines.
pub fn info(conn: &mut redis::Connection, section: &str) -> HashMap<String, String> {
    let text: String = redis::cmd("INFO").arg(section).query(conn).unwrap();
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_owned(), value.trim().to_owned()))
        .collect()
}

/// The stream the worker reads by default.
pub const STREAM: &str = "user:lifecycle_events";

/// The `XADD` of a `user.deleted` event of `user` to [`STREAM`].
pub fn deletion(user: &str, occurred_at_ms: u64) -> redis::Cmd {
    let mut xadd = redis::cmd("XADD");
    xadd.arg(STREAM)
        .arg("*")
        .arg("event_type")
        .arg("user.deleted")
        .arg("user_id")
        .arg(user)
        .arg("occurred_at_ms")
        .arg(occurred_at_ms);
    xadd
}

/// Adds an entry of `event_type` for `user` to [`STREAM`] through
/// `redis-cli`, as sent: no check, any bytes a test wants.
pub fn add_event(
    server: &lifecycle_test_support::RedisServer,
    event_type: &str,
    user: &str,
    occurred_at_ms: &str,
) -> String {
    server.cli(&[
        "XADD",
        STREAM,
        "*",
        "event_type",
        event_type,
        "user_id",
        user,
        "occurred_at_ms",
        occurred_at_ms,
    ])
}

/// `lobby-worker status --json EXTRA` against `url`: its one JSON object.
pub fn status_json(url: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["status", "--json"];
    args.extend_from_slice(extra);
    let output = worker(url, &args);
    assert_success(&output);
    let text = stdout(&output);
    assert_eq!(text.lines().count(), 1, "{text}");
    serde_json::from_str(text.trim()).expect("one JSON object")
}
