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
//! The launcher itself (spawn on a free port, wait for `PING`, quote the log, kill on drop) is
//! the product crate `lifecycle-private-redis`, which `lobby-worker demo` and `bench` use too;
//! this crate adds what only tests want on top of it: methods that panic instead of returning
//! errors, append-only and TLS options, [`RedisServer::cli`], broken persistence, a
//! [`TcpProxy`] and [`free_port`].
//!
//! With [`RedisServerOptions::tls`] set, the server also listens for TLS on a second port
//! ([`RedisServer::tls_url`]); the feature `tls` adds `TlsFiles`, which generates the
//! certificates in-process, and `RedisCluster::start_tls`, a cluster that speaks TLS only.
//!
//! Requires `redis-server` and `redis-cli` on the `PATH`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::ffi::OsString;
use std::fs;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use lifecycle_private_redis::{Error, Options, PrivateRedis};

pub mod cluster;
pub use cluster::RedisCluster;
pub mod proxy;
pub use proxy::TcpProxy;
pub mod sentinel;
pub use sentinel::SentinelGroup;

#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "tls")]
pub use tls::TlsFiles;

/// How long [`RedisServer::break_persistence`] and [`RedisServer::repair_persistence`] wait for a `BGSAVE`.
const BGSAVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between `BGSAVE` status checks.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// The flag that gets the TLS port, the first of the launcher's extra ports.
const TLS_PORT_FLAG: &str = "--tls-port";

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

impl RedisServerOptions {
    /// The launcher's options: these settings as `redis-server` arguments, `extra_args` last.
    fn launcher_options(&self) -> Options {
        let mut args: Vec<OsString> = Vec::new();
        if self.append_only {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(OsString::from));
        }
        let mut port_flags = Vec::new();
        if let Some(tls) = &self.tls {
            port_flags.push(TLS_PORT_FLAG.to_owned());
            args.extend([
                "--tls-cert-file".into(),
                tls.cert.clone().into(),
                "--tls-key-file".into(),
                tls.key.clone().into(),
                "--tls-ca-cert-file".into(),
                tls.ca_cert.clone().into(),
                "--tls-auth-clients".into(),
                if tls.auth_clients { "yes" } else { "no" }.into(),
            ]);
        }
        args.extend(self.extra_args.iter().map(OsString::from));
        Options {
            password: self.requirepass.clone(),
            port_flags,
            args,
            ..Options::default()
        }
    }
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
    /// The launched server (process, ports, directory); kills it and removes the directory on drop.
    server: PrivateRedis,
    /// The options it was started with.
    options: RedisServerOptions,
    /// Whether its plain port was closed after start ([`RedisServer::close_plain_port`]): then
    /// [`RedisServer::cli`] speaks TLS, and [`RedisServer::restart`] closes the port again.
    tls_only: bool,
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
        match PrivateRedis::start_with(options.launcher_options()) {
            Ok(server) => Ok(RedisServer {
                server,
                options,
                tls_only: false,
            }),
            Err(err @ Error::ExitedEarly { .. }) => Err(format!(
                "{err}\n(redis-server exits early when it rejects its arguments: check extra_args; \
                 with TLS, unreadable certificate or key files also make it exit)"
            )),
            Err(err) => Err(err.to_string()),
        }
    }

    /// The TCP port it listens on (on `127.0.0.1`); unchanged by `restart`.
    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// A client URL: `redis://127.0.0.1:<port>/`, or `redis://:<password>@127.0.0.1:<port>/` with `requirepass`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The TLS port (on `127.0.0.1`) when started with [`RedisServerOptions::tls`]; unchanged by `restart`.
    pub fn tls_port(&self) -> Option<u16> {
        self.options.tls.as_ref()?;
        self.server.extra_ports().first().copied()
    }

    /// A TLS client URL when started with [`RedisServerOptions::tls`]: `rediss://[:<password>@]127.0.0.1:<tls_port>/`.
    pub fn tls_url(&self) -> Option<String> {
        let tls_port = self.tls_port()?;
        // The plain URL is `redis://[<userinfo>@]127.0.0.1:<port>/`: keep the userinfo, swap the rest.
        let url = self.url();
        let userinfo = url
            .strip_prefix("redis://")?
            .strip_suffix(&format!("127.0.0.1:{}/", self.port()))?;
        Some(format!("rediss://{userinfo}127.0.0.1:{tls_port}/"))
    }

    /// Its temporary working directory (append-only files, `redis.log`), removed on drop.
    pub fn dir(&self) -> &Path {
        self.server.dir()
    }

    /// Stops it gracefully (SIGTERM, then waits for exit, so the append-only file is flushed); idempotent.
    pub fn stop(&mut self) {
        self.server
            .stop()
            .unwrap_or_else(|err| panic!("test-support: {err}"));
    }

    /// Kills it (SIGKILL) and waits for it to exit; unflushed data is lost; idempotent.
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Starts it again on the same port(s) and directory (data kept when append-only) and waits for `PING`; stops it gracefully first if running.
    pub fn restart(&mut self) {
        self.server
            .restart()
            .unwrap_or_else(|err| panic!("test-support: cannot restart redis-server: {err}"));
        if self.tls_only {
            self.close_plain_port();
        }
    }

    /// Makes a TLS server (started with [`RedisServerOptions::tls`]) TLS-only: `CONFIG SET port 0`
    /// closes its plain port, which the launcher needs open only to see it answer `PING`. From
    /// then on [`RedisServer::cli`] uses the TLS port (verifying the server with the CA of its
    /// [`ServerTls`]), and [`RedisServer::restart`] closes the plain port again once the server
    /// is up; [`RedisServer::port`] and [`RedisServer::url`] still name the (closed) plain port.
    pub(crate) fn close_plain_port(&mut self) {
        assert!(
            self.options.tls.is_some(),
            "test-support: only a server started with TLS can close its plain port"
        );
        let output = redis_cli(
            self.port(),
            self.options.requirepass.as_deref(),
            &["CONFIG", "SET", "port", "0"],
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || stdout.trim() != "OK" {
            panic!(
                "test-support: `CONFIG SET port 0` on port {} failed with {}\nstderr: {}\nstdout: {}\n{}",
                self.port(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                stdout.trim(),
                self.server.log_tail()
            );
        }
        self.tls_only = true;
    }

    /// The port clients reach it on: the TLS port once the plain port is closed, else the plain port.
    pub(crate) fn client_port(&self) -> u16 {
        match self.tls_port() {
            Some(tls_port) if self.tls_only => tls_port,
            _ => self.port(),
        }
    }

    /// The CA certificate redis-cli verifies it with, when it is TLS-only.
    pub(crate) fn client_ca(&self) -> Option<&Path> {
        let tls = self.options.tls.as_ref().filter(|_| self.tls_only)?;
        Some(&tls.ca_cert)
    }

    /// Whether the process is still running (false after `stop`/`kill` or if it died).
    pub fn is_running(&self) -> bool {
        self.server.is_running()
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
        let gone = self.server.dir().join("persistence-broken");
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
        let dir = self.server.dir().to_string_lossy().into_owned();
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
        let deadline = Instant::now() + BGSAVE_TIMEOUT;
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
                "test-support: no BGSAVE ended with status {status:?} within {BGSAVE_TIMEOUT:?}\n{info}\n{}",
                self.server.log_tail()
            );
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Runs `redis-cli -h 127.0.0.1 -p <port> [-a <pw> --no-auth-warning] <args>` and returns its trimmed stdout; panics on failure.
    ///
    /// On a TLS-only cluster node (`RedisCluster::start_tls`), `redis-cli --tls --cacert <ca>`
    /// on its TLS port instead.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = redis_cli_tls(
            self.client_port(),
            self.options.requirepass.as_deref(),
            self.client_ca(),
            args,
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            panic!(
                "test-support: `redis-cli {}` on port {} failed with {}\nstderr: {}\nstdout: {}",
                args.join(" "),
                self.client_port(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                stdout.trim()
            );
        }
        stdout.trim().to_owned()
    }
}

/// Runs `redis-cli -h 127.0.0.1 -p <port> [-a <password> --no-auth-warning] <args>`; panics
/// only when it cannot run at all.
pub(crate) fn redis_cli(port: u16, password: Option<&str>, args: &[&str]) -> std::process::Output {
    redis_cli_tls(port, password, None, args)
}

/// [`redis_cli`], over TLS (`--tls --cacert <ca_cert>`, no client certificate) when `ca_cert` is given.
pub(crate) fn redis_cli_tls(
    port: u16,
    password: Option<&str>,
    ca_cert: Option<&Path>,
    args: &[&str],
) -> std::process::Output {
    let mut command = Command::new("redis-cli");
    if let Some(ca_cert) = ca_cert {
        command.arg("--tls").arg("--cacert").arg(ca_cert);
    }
    command
        .arg("-h")
        .arg("127.0.0.1")
        .arg("-p")
        .arg(port.to_string());
    if let Some(password) = password {
        command.arg("-a").arg(password).arg("--no-auth-warning");
    }
    command
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| {
            panic!("test-support: cannot run redis-cli (is it on the PATH?): {err}")
        })
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
