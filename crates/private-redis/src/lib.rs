//! A launcher of private, throw-away `redis-server` processes.
//!
//! `lobby-worker demo` and `lobby-worker bench` need a Redis of their own when no
//! `--redis-url` is given, one they may fill and wipe without touching anybody's data.
//! [`PrivateRedis::start`] runs `redis-server` on a free port on `127.0.0.1`, in its own
//! temporary directory (its log `redis.log`, its captured output, any data files), waits until
//! it answers `PING`, and returns a handle; dropping the handle kills the process and removes
//! the directory. Every failure is an [`Error`] saying what to do about it (install Redis,
//! read the quoted log); nothing here panics.
//!
//! The test tooling (`lifecycle-test-support`) builds its `RedisServer` on this crate, with the
//! rest of the API: a password, extra arguments and ports, [`PrivateRedis::stop`],
//! [`PrivateRedis::kill`] and [`PrivateRedis::restart`] on the same port and directory.
//!
//! ```no_run
//! # fn main() -> Result<(), lifecycle_private_redis::Error> {
//! let redis = lifecycle_private_redis::PrivateRedis::start()?;
//! println!("connect to {}", redis.url());
//! drop(redis); // killed, its directory removed
//! # Ok(())
//! # }
//! ```
//!
//! Unix only: a graceful [`PrivateRedis::stop`] sends SIGTERM with the `kill` command.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

mod probe;

/// How long a spawned server may take to answer `PING` unless [`Options::ready_timeout`] says otherwise.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between readiness probes (and between exit checks).
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How many sets of fresh ports [`PrivateRedis::start_with`] tries while the server exits early.
const START_ATTEMPTS: u32 = 5;
/// How long [`PrivateRedis::restart`] keeps re-spawning on the same port while the server exits early.
const RESTART_BIND_WINDOW: Duration = Duration::from_secs(5);
/// How long [`PrivateRedis::stop`] waits after SIGTERM before falling back to SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of each log file quoted in errors.
const LOG_TAIL_LINES: usize = 40;
/// The server's log file in its directory (`--logfile`).
const LOG_FILE: &str = "redis.log";
/// The server's captured stdout and stderr in its directory: where it reports rejected arguments.
const OUTPUT_FILE: &str = "redis-server.out";
/// The advice given when the program cannot be found.
const INSTALL_ADVICE: &str = "install Redis (Debian/Ubuntu: apt-get install redis-server; \
                              macOS: brew install redis) so that redis-server is on the PATH";

/// Why a private redis-server could not be started, stopped or restarted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The program (normally `redis-server`) is not on the `PATH` or does not exist.
    #[error("{}; {INSTALL_ADVICE}", not_found(program))]
    NotFound {
        /// The program that was looked for.
        program: PathBuf,
    },
    /// The program exists but could not be run (e.g. not executable).
    #[error("cannot run {}: {source}", program.display())]
    Spawn {
        /// The program that was run.
        program: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// The temporary directory, or the output file in it, could not be created.
    #[error("cannot create a temporary directory for redis-server: {0}")]
    TempDir(#[source] io::Error),
    /// No free port could be found on `127.0.0.1`.
    #[error("cannot find a free port on 127.0.0.1: {0}")]
    FreePort(#[source] io::Error),
    /// The server exited before it answered `PING` (a taken port, rejected arguments, unreadable files).
    #[error(
        "redis-server exited before answering PING ({attempts} attempt(s), the last on port {port}: {status})\n{log}"
    )]
    ExitedEarly {
        /// The port of the last attempt.
        port: u16,
        /// How the last attempt ended.
        status: ExitStatus,
        /// How many times it was spawned.
        attempts: u32,
        /// The tail of its log and of its output.
        log: String,
    },
    /// The server kept running but did not answer `PING` in time; it was killed.
    #[error(
        "redis-server on port {port} did not answer PING within {timeout:?}; killed it\n{log}"
    )]
    NotReady {
        /// The port it was told to listen on.
        port: u16,
        /// How long it was given.
        timeout: Duration,
        /// The tail of its log and of its output.
        log: String,
    },
    /// The state of the process could not be read; it was killed.
    #[error("cannot wait for redis-server (pid {pid}): {source}; killed it")]
    Wait {
        /// Its process id.
        pid: u32,
        /// What the operating system said.
        source: io::Error,
    },
    /// SIGTERM could not be sent; the process was killed instead.
    #[error("cannot send SIGTERM to redis-server (pid {pid}): {source}; killed it")]
    Terminate {
        /// Its process id.
        pid: u32,
        /// Why the `kill` command failed.
        source: io::Error,
    },
    /// The server did not exit within its time after SIGTERM; it was killed.
    #[error(
        "redis-server (pid {pid}, port {port}) ignored SIGTERM for {timeout:?}; killed it\n{log}"
    )]
    StopTimedOut {
        /// Its process id.
        pid: u32,
        /// Its port.
        port: u16,
        /// How long it was given.
        timeout: Duration,
        /// The tail of its log and of its output.
        log: String,
    },
}

/// How to run a private redis-server; `Default` is `redis-server` in memory, without a password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The program to run: a name looked up on the `PATH`, or a path; `redis-server` by default.
    pub program: PathBuf,
    /// Password set with `--requirepass`; the readiness probe and [`PrivateRedis::url`] use it.
    pub password: Option<String>,
    /// Flags that each get another free port, passed as `<flag> <port>` (e.g. `--tls-port`); see [`PrivateRedis::extra_ports`].
    pub port_flags: Vec<String>,
    /// Arguments appended after the launcher's own; a setting given twice takes the later value.
    pub args: Vec<OsString>,
    /// A configuration file, passed first (where `redis-server` takes one); a sentinel needs
    /// one it can rewrite (with `--sentinel` among `args`).
    pub config_file: Option<PathBuf>,
    /// How long a spawned server may take to answer `PING` before it is killed.
    pub ready_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            program: PathBuf::from("redis-server"),
            password: None,
            port_flags: Vec::new(),
            args: Vec::new(),
            config_file: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
        }
    }
}

/// A private redis-server on a free `127.0.0.1` port in a temporary directory, killed on drop.
#[derive(Debug)]
pub struct PrivateRedis {
    /// The running process; `None` after `stop`/`kill`. Behind a mutex so `is_running(&self)` can reap it.
    child: Mutex<Option<Child>>,
    /// The port, kept across restarts.
    port: u16,
    /// The ports of [`Options::port_flags`], in that order, kept across restarts.
    extra_ports: Vec<u16>,
    /// The options it was started with, reused by `restart`.
    options: Options,
    /// Its working directory; declared last so it is removed after the process is gone.
    dir: TempDir,
}

/// Why a spawned server did not become ready.
enum NotReady {
    /// The process exited before answering (typically: the port was taken).
    Exited(ExitStatus),
    /// The process kept running but did not answer `PING` within the deadline.
    TimedOut,
    /// The process could not be polled.
    Wait(io::Error),
}

impl PrivateRedis {
    /// Starts `redis-server` with [`Options::default`] and waits until it answers `PING`.
    pub fn start() -> Result<PrivateRedis, Error> {
        Self::start_with(Options::default())
    }

    /// Starts a server with `options` on free ports (new ones if it exits early) and waits until it answers `PING`.
    pub fn start_with(options: Options) -> Result<PrivateRedis, Error> {
        let dir = tempfile::Builder::new()
            .prefix("private-redis-")
            .tempdir()
            .map_err(Error::TempDir)?;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let ports = free_ports(1 + options.port_flags.len())?;
            let Some((&port, extra_ports)) = ports.split_first() else {
                return Err(Error::FreePort(io::Error::other("no port was returned")));
            };
            let mut child = spawn(&options, port, extra_ports, dir.path())?;
            match wait_ready(&mut child, port, &options) {
                Ok(()) => {
                    return Ok(PrivateRedis {
                        child: Mutex::new(Some(child)),
                        port,
                        extra_ports: extra_ports.to_vec(),
                        options,
                        dir,
                    });
                }
                // Most likely a port was grabbed between `free_ports` and the bind: try other ones.
                Err(NotReady::Exited(_)) if attempts < START_ATTEMPTS => {}
                Err(not_ready) => {
                    return Err(not_ready_error(
                        not_ready,
                        &mut child,
                        port,
                        attempts,
                        &options,
                        dir.path(),
                    ))
                }
            }
        }
    }

    /// The TCP port it listens on (on `127.0.0.1`); unchanged by `restart`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The ports given to [`Options::port_flags`], in that order; unchanged by `restart`.
    pub fn extra_ports(&self) -> &[u16] {
        &self.extra_ports
    }

    /// A client URL: `redis://127.0.0.1:<port>/`, or `redis://:<password>@127.0.0.1:<port>/` with a password.
    pub fn url(&self) -> String {
        match &self.options.password {
            Some(password) => format!(
                "redis://:{}@127.0.0.1:{}/",
                percent_encode_userinfo(password),
                self.port
            ),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    /// Its temporary working directory (`redis.log`, data files), removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of its log and of its captured output, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(self.dir.path())
    }

    /// Whether the process is still running (false after `stop`/`kill` or if it died).
    pub fn is_running(&self) -> bool {
        let mut guard = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        match guard.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops it gracefully (SIGTERM, then waits for the exit, so data files are flushed); idempotent.
    pub fn stop(&mut self) -> Result<(), Error> {
        let Some(mut child) = slot(&mut self.child).take() else {
            return Ok(());
        };
        let pid = child.id();
        match child.try_wait() {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => {}
            Err(source) => {
                reap(&mut child);
                return Err(Error::Wait { pid, source });
            }
        }
        if let Err(source) = terminate(pid) {
            // It may have exited on its own just now; otherwise it cannot be stopped gently.
            if !matches!(child.try_wait(), Ok(Some(_))) {
                reap(&mut child);
                return Err(Error::Terminate { pid, source });
            }
        }
        let started = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if started.elapsed() < STOP_TIMEOUT => thread::sleep(POLL_INTERVAL),
                Ok(None) => {
                    reap(&mut child);
                    return Err(Error::StopTimedOut {
                        pid,
                        port: self.port,
                        timeout: STOP_TIMEOUT,
                        log: self.log_tail(),
                    });
                }
                Err(source) => {
                    reap(&mut child);
                    return Err(Error::Wait { pid, source });
                }
            }
        }
    }

    /// Kills it (SIGKILL) and waits for it to exit; unflushed data is lost; idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = slot(&mut self.child).take() {
            reap(&mut child);
        }
    }

    /// Starts it again on the same port(s) and directory and waits for `PING`; stops it gracefully first if running.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.stop()?;
        let port = self.port;
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut child = spawn(&self.options, port, &self.extra_ports, self.dir.path())?;
            match wait_ready(&mut child, port, &self.options) {
                Ok(()) => {
                    *slot(&mut self.child) = Some(child);
                    return Ok(());
                }
                // The old socket may linger briefly (e.g. TIME_WAIT): keep trying the same port for a while.
                Err(NotReady::Exited(_)) if started.elapsed() < RESTART_BIND_WINDOW => {
                    thread::sleep(POLL_INTERVAL);
                }
                Err(not_ready) => {
                    return Err(not_ready_error(
                        not_ready,
                        &mut child,
                        port,
                        attempts,
                        &self.options,
                        self.dir.path(),
                    ))
                }
            }
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        // `self.dir` (the TempDir) is removed when the fields are dropped, after this.
    }
}

/// Returns `count` distinct, currently free TCP ports on `127.0.0.1` (all bound at once, then released).
fn free_ports(count: usize) -> Result<Vec<u16>, Error> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<io::Result<Vec<_>>>()
        .map_err(Error::FreePort)?;
    listeners
        .iter()
        .map(|listener| listener.local_addr().map(|addr| addr.port()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(Error::FreePort)
}

/// Locks the child slot through `&mut`, ignoring poisoning.
fn slot(child: &mut Mutex<Option<Child>>) -> &mut Option<Child> {
    child.get_mut().unwrap_or_else(PoisonError::into_inner)
}

/// Spawns the server on `port` (and `extra_ports` for the port flags) in `dir`, its output captured there.
fn spawn(options: &Options, port: u16, extra_ports: &[u16], dir: &Path) -> Result<Child, Error> {
    let output = File::create(dir.join(OUTPUT_FILE)).map_err(Error::TempDir)?;
    let errors = output.try_clone().map_err(Error::TempDir)?;
    let mut command = Command::new(&options.program);
    if let Some(config_file) = &options.config_file {
        command.arg(config_file);
    }
    command
        .arg("--port")
        .arg(port.to_string())
        .arg("--bind")
        .arg("127.0.0.1")
        .arg("--dir")
        .arg(dir)
        .arg("--save")
        .arg("")
        .arg("--appendonly")
        .arg("no")
        .arg("--logfile")
        .arg(dir.join(LOG_FILE))
        .arg("--daemonize")
        .arg("no");
    if let Some(password) = &options.password {
        command.arg("--requirepass").arg(password);
    }
    // redis-server binds every listener before serving, and exits if one fails, so the
    // readiness probe on the main port also vouches for these.
    for (flag, extra_port) in options.port_flags.iter().zip(extra_ports) {
        command.arg(flag).arg(extra_port.to_string());
    }
    command
        .args(&options.args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(output))
        .stderr(Stdio::from(errors));
    command.spawn().map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => Error::NotFound {
            program: options.program.clone(),
        },
        _ => Error::Spawn {
            program: options.program.clone(),
            source,
        },
    })
}

/// Polls every [`POLL_INTERVAL`] until the child answers `PING` on `port`, exits, or the ready timeout passes.
fn wait_ready(child: &mut Child, port: u16, options: &Options) -> Result<(), NotReady> {
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Err(NotReady::Exited(status)),
            Ok(None) => {}
            Err(err) => return Err(NotReady::Wait(err)),
        }
        if probe::answers(port, options.password.as_deref(), child.id()) {
            return Ok(());
        }
        if started.elapsed() >= options.ready_timeout {
            return Err(NotReady::TimedOut);
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// The [`Error`] for a server that did not become ready; kills it first if it still runs.
fn not_ready_error(
    not_ready: NotReady,
    child: &mut Child,
    port: u16,
    attempts: u32,
    options: &Options,
    dir: &Path,
) -> Error {
    reap(child);
    match not_ready {
        NotReady::Exited(status) => Error::ExitedEarly {
            port,
            status,
            attempts,
            log: log_tail(dir),
        },
        NotReady::TimedOut => Error::NotReady {
            port,
            timeout: options.ready_timeout,
            log: log_tail(dir),
        },
        NotReady::Wait(source) => Error::Wait {
            pid: child.id(),
            source,
        },
    }
}

/// Sends SIGTERM to `pid` with the `kill` command.
fn terminate(pid: u32) -> io::Result<()> {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "`kill -TERM {pid}` ended with {status}"
        )))
    }
}

/// What [`Error::NotFound`] says of `program`: a bare name is looked up on the `PATH`, a path is not.
fn not_found(program: &Path) -> String {
    if program.components().count() > 1 {
        format!("{} does not exist", program.display())
    } else {
        format!("{} is not on the PATH", program.display())
    }
}

/// Kills (SIGKILL) and reaps a child, ignoring errors (it may already have exited).
fn reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The last [`LOG_TAIL_LINES`] lines of `<dir>/redis.log`, and of the captured output if there is any.
fn log_tail(dir: &Path) -> String {
    let log = dir.join(LOG_FILE);
    let mut out = match fs::read_to_string(&log) {
        Ok(text) => format!("--- last lines of {} ---\n{}", log.display(), tail(&text)),
        Err(err) => format!("--- {} unreadable: {err} ---", log.display()),
    };
    let output = dir.join(OUTPUT_FILE);
    if let Ok(text) = fs::read_to_string(&output) {
        if !text.trim().is_empty() {
            out.push_str(&format!(
                "\n--- last lines of its output ({}) ---\n{}",
                output.display(),
                tail(&text)
            ));
        }
    }
    out
}

/// The last [`LOG_TAIL_LINES`] lines of `text`.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(LOG_TAIL_LINES);
    lines.into_iter().skip(skip).collect::<Vec<_>>().join("\n")
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for the userinfo part of a URL.
fn percent_encode_userinfo(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for byte in raw.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        let text: String = (1..=50).map(|n| format!("line {n}\n")).collect();
        let kept = tail(&text);
        assert!(kept.starts_with("line 11\n"));
        assert!(kept.ends_with("line 50"));
        assert_eq!(tail("a\nb"), "a\nb");
        assert_eq!(tail(""), "");
    }

    #[test]
    fn userinfo_is_percent_encoded() {
        assert_eq!(percent_encode_userinfo("s3cret/pw:@"), "s3cret%2Fpw%3A%40");
        assert_eq!(percent_encode_userinfo("a-b.c_d~"), "a-b.c_d~");
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(3).unwrap_or_default();
        assert_eq!(ports.len(), 3);
        assert!(ports.iter().all(|&port| port != 0));
        assert!(ports.first() != ports.get(1) && ports.get(1) != ports.get(2));
    }
}
