//! Test tooling: private, throw-away `redis-server` processes for integration tests.
//!
//! Every [`RedisServer`] runs on its own free port on `127.0.0.1`, in its own temporary
//! directory, so tests never share (or clobber) the system Redis on 6379, nor each other.
//! The process is killed and the directory removed when the handle is dropped.
//!
//! ```no_run
//! let server = lifecycle_test_support::RedisServer::start();
//! server.cli(&["SET", "k", "v"]);
//! assert_eq!(server.cli(&["GET", "k"]), "v");
//! let _client_url = server.url();
//! ```
//!
//! With [`RedisServerOptions::tls`] set, the server also listens for TLS on a second port
//! ([`RedisServer::tls_url`]); the feature `tls` adds `TlsFiles`, which generates the
//! certificates in-process.
//!
//! Requires `redis-server` and `redis-cli` on the `PATH`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub mod proxy;
pub use proxy::TcpProxy;

#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "tls")]
pub use tls::TlsFiles;

/// How long a freshly spawned server may take to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between readiness probes (and between exit checks).
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How many fresh ports [`RedisServer::start_with`] tries before giving up.
const START_ATTEMPTS: usize = 5;
/// How long [`RedisServer::restart`] keeps re-spawning on the same port while it exits early.
const RESTART_BIND_WINDOW: Duration = Duration::from_secs(5);
/// How long [`RedisServer::stop`] waits after SIGTERM before falling back to SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket timeouts of one readiness probe.
const PROBE_IO_TIMEOUT: Duration = Duration::from_millis(500);
/// Lines of `redis.log` quoted in panic messages.
const LOG_TAIL_LINES: usize = 40;

/// Options of a private redis-server; `Default` is an in-memory server without a password.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisServerOptions {
    /// Enables the append-only file (`--appendonly yes --appendfsync always`), so data survives `stop`/`kill` + `restart`.
    pub append_only: bool,
    /// Password set with `--requirepass`; [`RedisServer::url`] and [`RedisServer::cli`] use it.
    pub requirepass: Option<String>,
    /// Extra command-line arguments appended verbatim, e.g. `["--maxmemory", "10mb"]`.
    pub extra_args: Vec<String>,
    /// Also listen for TLS on a second free port ([`RedisServer::tls_port`]); the plain port stays.
    pub tls: Option<ServerTls>,
}

/// Server-side TLS settings: PEM files passed to `--tls-cert-file`, `--tls-key-file`, `--tls-ca-cert-file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// The server certificate (`--tls-cert-file`).
    pub cert: PathBuf,
    /// The server's private key (`--tls-key-file`).
    pub key: PathBuf,
    /// The CA certificate client certificates are verified with (`--tls-ca-cert-file`).
    pub ca_cert: PathBuf,
    /// Whether clients must present a certificate signed by `ca_cert` (`--tls-auth-clients yes|no`).
    pub auth_clients: bool,
}

/// A private redis-server on a free `127.0.0.1` port in a temporary directory, killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    /// The running process; `None` after `stop`/`kill`. Behind a mutex so `is_running(&self)` can reap it.
    child: Mutex<Option<Child>>,
    /// The port, kept across restarts.
    port: u16,
    /// The TLS port when [`RedisServerOptions::tls`] is set, kept across restarts.
    tls_port: Option<u16>,
    /// The options it was started with, reused by `restart`.
    options: RedisServerOptions,
    /// Its working directory (AOF, `redis.log`); declared last so it is removed after the process is gone.
    dir: TempDir,
}

/// Why a spawned server did not become ready.
enum NotReady {
    /// The process exited before answering (typically: the port was taken).
    Exited(ExitStatus),
    /// The process kept running but did not answer `PING` within the deadline.
    TimedOut,
}

/// Outcome of one readiness probe.
enum Probe {
    /// Our server answered.
    Ready,
    /// Nothing (or not yet our server) answered; try again.
    NotYet,
}

impl RedisServer {
    /// Starts a server with [`RedisServerOptions::default`] and waits until it answers `PING`.
    pub fn start() -> RedisServer {
        Self::start_with(RedisServerOptions::default())
    }

    /// Starts a server with `options` and waits until it answers `PING`; panics (quoting `redis.log`) on failure.
    pub fn start_with(options: RedisServerOptions) -> RedisServer {
        Self::try_start_with(options).unwrap_or_else(|err| panic!("test-support: {err}"))
    }

    /// Starts a server with `options` and waits until it answers `PING`; the error says why it
    /// could not (redis-server missing from the `PATH`, refused to start, did not answer).
    pub fn try_start_with(options: RedisServerOptions) -> Result<RedisServer, String> {
        let dir = tempfile::Builder::new()
            .prefix("redis-test-")
            .tempdir()
            .map_err(|err| {
                format!("cannot create a temporary directory for redis-server: {err}")
            })?;
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let (port, tls_port) = if options.tls.is_some() {
                let (port, tls_port) = free_port_pair();
                (port, Some(tls_port))
            } else {
                (free_port(), None)
            };
            let mut child = spawn_redis(port, tls_port, dir.path(), &options)?;
            match wait_ready(&mut child, port, options.requirepass.as_deref()) {
                Ok(()) => {
                    return Ok(RedisServer {
                        child: Mutex::new(Some(child)),
                        port,
                        tls_port,
                        options,
                        dir,
                    });
                }
                Err(NotReady::Exited(status)) => {
                    // Most likely a port was grabbed between `free_port` and the bind: try other ones.
                    let ports = match tls_port {
                        Some(tls_port) => format!("port {port}, tls port {tls_port}"),
                        None => format!("port {port}"),
                    };
                    failures.push(format!("{ports}: exited early with {status}"));
                }
                Err(NotReady::TimedOut) => {
                    reap(&mut child);
                    return Err(format!(
                        "redis-server on port {port} did not answer PING within {READY_TIMEOUT:?}\n{}",
                        log_tail(dir.path())
                    ));
                }
            }
        }
        Err(format!(
            "redis-server failed to start after {START_ATTEMPTS} attempts ({}); \
             if redis.log is missing, redis-server rejected its arguments (check extra_args); \
             with TLS, unreadable certificate or key files also make it exit (see redis.log)\n{}",
            failures.join("; "),
            log_tail(dir.path())
        ))
    }

    /// The TCP port it listens on (on `127.0.0.1`); unchanged by `restart`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A client URL: `redis://127.0.0.1:<port>/`, or `redis://:<password>@127.0.0.1:<port>/` with `requirepass`.
    pub fn url(&self) -> String {
        match &self.options.requirepass {
            Some(password) => format!(
                "redis://:{}@127.0.0.1:{}/",
                percent_encode_userinfo(password),
                self.port
            ),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    /// The TLS port (on `127.0.0.1`) when started with [`RedisServerOptions::tls`]; unchanged by `restart`.
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// A TLS client URL when started with [`RedisServerOptions::tls`]: `rediss://[:<password>@]127.0.0.1:<tls_port>/`.
    pub fn tls_url(&self) -> Option<String> {
        let tls_port = self.tls_port?;
        Some(match &self.options.requirepass {
            Some(password) => format!(
                "rediss://:{}@127.0.0.1:{tls_port}/",
                percent_encode_userinfo(password)
            ),
            None => format!("rediss://127.0.0.1:{tls_port}/"),
        })
    }

    /// Its temporary working directory (append-only files, `redis.log`), removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops it gracefully (SIGTERM, then waits for exit, so the append-only file is flushed); idempotent.
    pub fn stop(&mut self) {
        let port = self.port;
        let Some(mut child) = lock(&mut self.child).take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = child.id().to_string();
        // A failing `kill` (e.g. the process just exited) is fine: the wait below settles it.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(&pid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL_INTERVAL),
                Ok(None) => {
                    reap(&mut child);
                    panic!(
                        "test-support: redis-server (pid {pid}, port {port}) ignored SIGTERM for {STOP_TIMEOUT:?}; killed it\n{}",
                        log_tail(self.dir.path())
                    );
                }
                Err(err) => panic!("test-support: cannot wait for redis-server (pid {pid}): {err}"),
            }
        }
    }

    /// Kills it (SIGKILL) and waits for it to exit; unflushed data is lost; idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = lock(&mut self.child).take() {
            reap(&mut child);
        }
    }

    /// Starts it again on the same port(s) and directory (data kept when append-only) and waits for `PING`; stops it gracefully first if running.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        let bind_deadline = Instant::now() + RESTART_BIND_WINDOW;
        let mut attempts = 0_u32;
        loop {
            attempts += 1;
            let mut child = spawn_redis(port, self.tls_port, self.dir.path(), &self.options)
                .unwrap_or_else(|err| panic!("test-support: {err}"));
            match wait_ready(&mut child, port, self.options.requirepass.as_deref()) {
                Ok(()) => {
                    *lock(&mut self.child) = Some(child);
                    return;
                }
                // The old socket may linger briefly (e.g. TIME_WAIT): keep trying the same port for a while.
                Err(NotReady::Exited(_)) if Instant::now() < bind_deadline => {
                    thread::sleep(POLL_INTERVAL);
                }
                Err(NotReady::Exited(status)) => panic!(
                    "test-support: redis-server could not be restarted on port {port} within {RESTART_BIND_WINDOW:?} \
                     ({attempts} attempts, last exit: {status})\n{}",
                    log_tail(self.dir.path())
                ),
                Err(NotReady::TimedOut) => {
                    reap(&mut child);
                    panic!(
                        "test-support: restarted redis-server on port {port} did not answer PING within {READY_TIMEOUT:?}\n{}",
                        log_tail(self.dir.path())
                    );
                }
            }
        }
    }

    /// Whether the process is still running (false after `stop`/`kill` or if it died).
    pub fn is_running(&self) -> bool {
        let mut guard = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        match guard.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Makes Redis refuse writes with `MISCONF`, as it does when it cannot persist (a full or broken
    /// disk): points `dir` at a directory that is then removed, turns on a save point and
    /// `stop-writes-on-bgsave-error`, and waits until a `BGSAVE` has failed. Reads still work.
    /// Needs the server started with `extra_args` `--enable-protected-configs yes` (`dir` is a
    /// protected setting); [`RedisServer::repair_persistence`] undoes it.
    pub fn break_persistence(&self) {
        let protected = self.cli(&["CONFIG", "GET", "enable-protected-configs"]);
        assert!(
            protected.ends_with("yes"),
            "test-support: break_persistence needs the server started with extra_args \
             [\"--enable-protected-configs\", \"yes\"] (got {protected:?})"
        );
        let gone = self.dir.path().join("persistence-broken");
        fs::create_dir_all(&gone)
            .expect("test-support: cannot create a directory for redis-server");
        let gone_text = gone.to_string_lossy().into_owned();
        self.cli(&["CONFIG", "SET", "dir", &gone_text]);
        fs::remove_dir(&gone).expect("test-support: cannot remove redis-server's directory");
        self.cli(&["CONFIG", "SET", "save", "3600 1"]);
        self.cli(&["CONFIG", "SET", "stop-writes-on-bgsave-error", "yes"]);
        self.bgsave_until("err");
    }

    /// Undoes [`RedisServer::break_persistence`]: `dir` back to the server's own directory, a
    /// `BGSAVE` that succeeds (after which Redis accepts writes again), no save point.
    pub fn repair_persistence(&self) {
        let dir = self.dir.path().to_string_lossy().into_owned();
        self.cli(&["CONFIG", "SET", "dir", &dir]);
        self.bgsave_until("ok");
        self.cli(&["CONFIG", "SET", "save", ""]);
    }

    /// Starts a `BGSAVE` once none is running, and waits until it ended with `status` (`ok` or `err`).
    fn bgsave_until(&self, status: &str) {
        let field = |info: &str, name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|value| value.trim().to_owned())
                .unwrap_or_default()
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut started = false;
        loop {
            let info = self.cli(&["INFO", "persistence"]);
            let idle = field(&info, "rdb_bgsave_in_progress:") == "0";
            if idle && started && field(&info, "rdb_last_bgsave_status:") == status {
                return;
            }
            if idle && !started {
                started = self
                    .cli(&["BGSAVE"])
                    .starts_with("Background saving started");
            }
            assert!(
                Instant::now() < deadline,
                "test-support: no BGSAVE ended with status {status:?} within {READY_TIMEOUT:?}\n{info}\n{}",
                log_tail(self.dir.path())
            );
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Runs `redis-cli -h 127.0.0.1 -p <port> [-a <pw> --no-auth-warning] <args>` and returns its trimmed stdout; panics on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut command = Command::new("redis-cli");
        command
            .arg("-h")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port.to_string());
        if let Some(password) = &self.options.requirepass {
            command.arg("-a").arg(password).arg("--no-auth-warning");
        }
        command.args(args).stdin(Stdio::null());
        let output = command.output().unwrap_or_else(|err| {
            panic!("test-support: cannot run redis-cli (is it on the PATH?): {err}")
        });
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            panic!(
                "test-support: `redis-cli {}` on port {} failed with {}\nstderr: {}\nstdout: {}",
                args.join(" "),
                self.port,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                stdout.trim()
            );
        }
        stdout.trim().to_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Never panic in drop (we may already be unwinding): kill, reap, ignore errors.
        let mut guard = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(mut child) = guard.take() {
            reap(&mut child);
        }
        // `self.dir` (the TempDir) is removed when the fields are dropped, after this.
    }
}

/// Returns a currently free TCP port on `127.0.0.1` (binds port 0, reads the port, drops the listener).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .expect("test-support: cannot bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("test-support: cannot read the local address of a bound listener")
        .port()
}

/// Returns two distinct, currently free TCP ports on `127.0.0.1` (both bound at once, then released).
fn free_port_pair() -> (u16, u16) {
    let bind = || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("test-support: cannot bind 127.0.0.1:0 to find a free port")
    };
    let (first, second) = (bind(), bind());
    let port = |listener: &TcpListener| {
        listener
            .local_addr()
            .expect("test-support: cannot read the local address of a bound listener")
            .port()
    };
    (port(&first), port(&second))
}

/// Locks the child slot through `&mut`, ignoring poisoning.
fn lock(child: &mut Mutex<Option<Child>>) -> &mut Option<Child> {
    child.get_mut().unwrap_or_else(PoisonError::into_inner)
}

/// Spawns `redis-server` on `port` (and TLS on `tls_port` when `options.tls` is set) in `dir`.
fn spawn_redis(
    port: u16,
    tls_port: Option<u16>,
    dir: &Path,
    options: &RedisServerOptions,
) -> Result<Child, String> {
    let mut command = Command::new("redis-server");
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
        .arg(if options.append_only { "yes" } else { "no" });
    if options.append_only {
        command.arg("--appendfsync").arg("always");
    }
    command
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .arg("--daemonize")
        .arg("no");
    if let Some(password) = &options.requirepass {
        command.arg("--requirepass").arg(password);
    }
    if let (Some(tls), Some(tls_port)) = (&options.tls, tls_port) {
        // redis-server binds every listener before serving, and exits if one fails, so the
        // readiness probe on the plain port also vouches for the TLS port.
        command
            .arg("--tls-port")
            .arg(tls_port.to_string())
            .arg("--tls-cert-file")
            .arg(&tls.cert)
            .arg("--tls-key-file")
            .arg(&tls.key)
            .arg("--tls-ca-cert-file")
            .arg(&tls.ca_cert)
            .arg("--tls-auth-clients")
            .arg(if tls.auth_clients { "yes" } else { "no" });
    }
    command
        .args(&options.extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command.spawn().map_err(|err| match err.kind() {
        std::io::ErrorKind::NotFound => "redis-server is not on the PATH; install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)".to_owned(),
        _ => format!("cannot spawn redis-server: {err}"),
    })
}

/// Polls every [`POLL_INTERVAL`] until the child answers `PING` on `port`, exits, or [`READY_TIMEOUT`] passes.
fn wait_ready(child: &mut Child, port: u16, password: Option<&str>) -> Result<(), NotReady> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Err(NotReady::Exited(status)),
            Ok(None) => {}
            Err(err) => panic!(
                "test-support: cannot poll redis-server (pid {}): {err}",
                child.id()
            ),
        }
        if let Probe::Ready = probe(port, password, child.id()) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(NotReady::TimedOut);
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// One readiness probe: connects, sends `PING`, expects `+PONG` (or `-NOAUTH` with a password),
/// then checks via `INFO server` that the answering server is our child and not someone else on the port.
fn probe(port: u16, password: Option<&str>, pid: u32) -> Probe {
    match try_probe(port, password, pid) {
        Ok(true) => Probe::Ready,
        Ok(false) | Err(_) => Probe::NotYet,
    }
}

/// [`probe`] with I/O errors; `Ok(true)` means our server answered.
fn try_probe(port: u16, password: Option<&str>, pid: u32) -> std::io::Result<bool> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect_timeout(&addr, PROBE_IO_TIMEOUT)?;
    stream.set_read_timeout(Some(PROBE_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(PROBE_IO_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);

    writer.write_all(b"*1\r\n$4\r\nPING\r\n")?;
    let reply = read_line(&mut reader)?;
    let pong = reply.starts_with("+PONG");
    let noauth = password.is_some() && reply.starts_with("-NOAUTH");
    if !(pong || noauth) {
        // E.g. `-LOADING` while the append-only file is replayed.
        return Ok(false);
    }

    if let Some(password) = password {
        writer.write_all(&resp_command(&["AUTH", password]))?;
        if !read_line(&mut reader)?.starts_with("+OK") {
            // Someone else's server with another password.
            return Ok(false);
        }
    }
    writer.write_all(&resp_command(&["INFO", "server"]))?;
    let header = read_line(&mut reader)?;
    let Some(len) = header
        .strip_prefix('$')
        .and_then(|n| n.parse::<usize>().ok())
    else {
        // INFO unavailable (e.g. renamed through extra_args): trust the PING, our child is still alive.
        return Ok(true);
    };
    let mut body = vec![0_u8; len + 2];
    reader.read_exact(&mut body)?;
    let body = String::from_utf8_lossy(&body);
    let answering_pid = body
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|value| value.trim().parse::<u32>().ok());
    Ok(answering_pid.is_none_or(|answering| answering == pid))
}

/// Reads one RESP line (without the CRLF); an empty read is an error.
fn read_line(reader: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line.trim_end().to_owned())
}

/// Encodes `args` as a RESP array of bulk strings.
fn resp_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Kills (SIGKILL) and reaps a child, ignoring errors (it may already have exited).
fn reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The last [`LOG_TAIL_LINES`] lines of `<dir>/redis.log`, for panic messages.
fn log_tail(dir: &Path) -> String {
    let path = dir.join("redis.log");
    match fs::read_to_string(&path) {
        Ok(log) => {
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines
                .get(lines.len().saturating_sub(LOG_TAIL_LINES)..)
                .unwrap_or_default();
            format!("--- tail of {} ---\n{}", path.display(), tail.join("\n"))
        }
        Err(err) => format!("--- {} unreadable: {err} ---", path.display()),
    }
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

    fn append_only() -> RedisServerOptions {
        RedisServerOptions {
            append_only: true,
            ..RedisServerOptions::default()
        }
    }

    #[test]
    fn set_then_get() {
        let server = RedisServer::start();
        assert!(server.is_running());
        assert_eq!(server.cli(&["SET", "k", "v"]), "OK");
        assert_eq!(server.cli(&["GET", "k"]), "v");
        assert_eq!(
            server.url(),
            format!("redis://127.0.0.1:{}/", server.port())
        );
        assert!(server.dir().join("redis.log").is_file());
        assert_eq!(server.tls_port(), None);
        assert_eq!(server.tls_url(), None);
    }

    #[test]
    fn append_only_data_survives_stop_and_restart() {
        let mut server = RedisServer::start_with(append_only());
        let port = server.port();
        let dir = server.dir().to_path_buf();
        server.cli(&["SET", "k", "v"]);
        server.stop();
        assert!(!server.is_running());
        server.stop(); // idempotent
        server.restart();
        assert!(server.is_running());
        assert_eq!(server.port(), port);
        assert_eq!(server.dir(), dir.as_path());
        assert_eq!(server.cli(&["GET", "k"]), "v");
    }

    #[test]
    fn append_only_data_survives_kill_and_restart() {
        let mut server = RedisServer::start_with(append_only());
        server.cli(&["RPUSH", "list", "a", "b"]);
        server.kill();
        server.restart();
        assert_eq!(server.cli(&["LRANGE", "list", "0", "-1"]), "a\nb");
    }

    #[test]
    fn kill_stops_the_process_idempotently() {
        let mut server = RedisServer::start();
        server.kill();
        assert!(!server.is_running());
        server.kill();
        server.stop();
        assert!(!server.is_running());
    }

    #[test]
    fn restart_without_append_only_starts_empty() {
        let mut server = RedisServer::start();
        server.cli(&["SET", "k", "v"]);
        server.restart(); // stops the running server first
        assert!(server.is_running());
        assert_eq!(server.cli(&["EXISTS", "k"]), "0");
    }

    #[test]
    fn two_servers_get_different_ports_and_separate_data() {
        let first = RedisServer::start();
        let second = RedisServer::start();
        assert_ne!(first.port(), second.port());
        assert_ne!(first.dir(), second.dir());
        first.cli(&["SET", "k", "first"]);
        assert_eq!(second.cli(&["EXISTS", "k"]), "0");
    }

    #[test]
    fn requirepass_server_works_through_cli_and_url() {
        let mut server = RedisServer::start_with(RedisServerOptions {
            requirepass: Some("s3cret/pw".to_owned()),
            ..RedisServerOptions::default()
        });
        assert_eq!(server.cli(&["SET", "k", "v"]), "OK");
        assert_eq!(server.cli(&["GET", "k"]), "v");
        assert_eq!(
            server.url(),
            format!("redis://:s3cret%2Fpw@127.0.0.1:{}/", server.port())
        );
        server.restart();
        assert_eq!(server.cli(&["PING"]), "PONG");
    }

    #[test]
    fn extra_args_are_passed_through() {
        let server = RedisServer::start_with(RedisServerOptions {
            extra_args: vec!["--maxmemory".to_owned(), "12345678".to_owned()],
            ..RedisServerOptions::default()
        });
        assert_eq!(
            server.cli(&["CONFIG", "GET", "maxmemory"]),
            "maxmemory\n12345678"
        );
    }

    #[test]
    fn broken_persistence_refuses_writes_until_repaired() {
        let server = RedisServer::start_with(RedisServerOptions {
            extra_args: vec!["--enable-protected-configs".to_owned(), "yes".to_owned()],
            ..RedisServerOptions::default()
        });
        server.cli(&["SET", "k", "v"]);
        server.break_persistence();
        assert!(
            server.cli(&["SET", "k", "w"]).starts_with("MISCONF "),
            "writes are refused"
        );
        assert_eq!(server.cli(&["GET", "k"]), "v", "reads are served");
        server.repair_persistence();
        assert_eq!(server.cli(&["SET", "k", "w"]), "OK");
        assert_eq!(server.cli(&["CONFIG", "GET", "save"]), "save");
    }

    #[test]
    fn drop_kills_the_process_and_removes_the_directory() {
        let server = RedisServer::start();
        let info = server.cli(&["INFO", "server"]);
        let pid = info
            .lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .expect("INFO server reports process_id")
            .trim()
            .to_owned();
        let dir = server.dir().to_path_buf();
        assert!(Path::new("/proc").join(&pid).exists());
        drop(server);
        assert!(!dir.exists());
        assert!(!Path::new("/proc").join(&pid).exists());
    }

    #[test]
    #[should_panic(expected = "failed")]
    fn cli_panics_on_failure() {
        let mut server = RedisServer::start();
        server.kill();
        server.cli(&["PING"]);
    }

    #[test]
    fn free_port_is_bindable() {
        let port = free_port();
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("free port should be bindable");
    }
}
