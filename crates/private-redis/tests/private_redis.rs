//! The launcher against a real `redis-server` (needs `redis-server` and `redis-cli` on the `PATH`).
#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lifecycle_private_redis::{Error, Options, PrivateRedis};

/// Runs `redis-cli -p <port> [-a <password>] <args>`; `None` when it fails (e.g. nothing listens).
fn cli(port: u16, password: Option<&str>, args: &[&str]) -> Option<String> {
    let mut command = Command::new("redis-cli");
    command.arg("-p").arg(port.to_string());
    if let Some(password) = password {
        command.arg("-a").arg(password).arg("--no-auth-warning");
    }
    let output = command.args(args).output().expect("redis-cli runs");
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    (output.status.success() && !stdout.starts_with("Could not connect")).then_some(stdout)
}

/// The process id the server on `port` reports.
fn pid(port: u16, password: Option<&str>) -> String {
    let info = cli(port, password, &["INFO", "server"]).expect("INFO server");
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .expect("INFO server reports process_id")
        .trim()
        .to_owned()
}

fn gone(pid: &str) -> bool {
    !Path::new("/proc").join(pid).exists()
}

#[test]
fn starts_answers_and_is_killed_with_its_directory_on_drop() {
    let redis = PrivateRedis::start().expect("redis-server starts");
    let port = redis.port();
    assert_ne!(port, 0);
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}/"));
    assert!(redis.is_running());
    assert_eq!(cli(port, None, &["PING"]).as_deref(), Some("PONG"));
    assert_eq!(cli(port, None, &["SET", "k", "v"]).as_deref(), Some("OK"));
    assert_eq!(cli(port, None, &["GET", "k"]).as_deref(), Some("v"));
    // In memory only: no snapshots, no append-only file.
    assert_eq!(
        cli(port, None, &["CONFIG", "GET", "appendonly"]).as_deref(),
        Some("appendonly\nno")
    );
    assert_eq!(
        cli(port, None, &["CONFIG", "GET", "save"]).as_deref(),
        Some("save")
    );
    let dir = redis.dir().to_path_buf();
    assert!(dir.join("redis.log").is_file());
    assert!(redis.log_tail().contains("Ready to accept connections"));
    let pid = pid(port, None);

    drop(redis);
    assert!(gone(&pid), "the process is killed");
    assert!(!dir.exists(), "the directory is removed");
    assert_eq!(cli(port, None, &["PING"]), None);
}

#[test]
fn two_servers_have_their_own_ports_and_directories() {
    let first = PrivateRedis::start().expect("first starts");
    let second = PrivateRedis::start().expect("second starts");
    assert_ne!(first.port(), second.port());
    assert_ne!(first.dir(), second.dir());
    cli(first.port(), None, &["SET", "k", "first"]);
    assert_eq!(
        cli(second.port(), None, &["EXISTS", "k"]).as_deref(),
        Some("0")
    );
}

#[test]
fn a_missing_program_is_a_typed_error_with_advice() {
    let program = PathBuf::from("/nonexistent/bin/redis-server");
    let err = PrivateRedis::start_with(Options {
        program: program.clone(),
        ..Options::default()
    })
    .expect_err("no such program");
    assert!(
        matches!(&err, Error::NotFound { program: p } if *p == program),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("/nonexistent/bin/redis-server does not exist"),
        "{message}"
    );
    assert!(
        message.contains("apt-get install redis-server"),
        "{message}"
    );
}

#[test]
fn a_program_missing_from_the_path_says_so() {
    let err = PrivateRedis::start_with(Options {
        program: PathBuf::from("no-such-redis-server-program"),
        ..Options::default()
    })
    .expect_err("not on the PATH");
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with("no-such-redis-server-program is not on the PATH; install Redis"),
        "{message}"
    );
}

#[test]
fn rejected_arguments_exit_early_with_the_output_quoted() {
    let started = Instant::now();
    let err = PrivateRedis::start_with(Options {
        args: vec!["--no-such-directive".into(), "1".into()],
        ..Options::default()
    })
    .expect_err("redis-server refuses the argument");
    let Error::ExitedEarly { attempts, log, .. } = &err else {
        panic!("expected ExitedEarly, got {err:?}");
    };
    assert!(*attempts > 1, "retried on other ports");
    assert!(log.contains("no-such-directive"), "{log}");
    assert!(err.to_string().contains("exited before answering PING"));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_server_that_never_answers_times_out_and_is_killed() {
    // A password the launcher does not know: every PING gets -NOAUTH, so it never looks ready.
    let err = PrivateRedis::start_with(Options {
        args: vec!["--requirepass".into(), "unknown".into()],
        ready_timeout: Duration::from_millis(300),
        ..Options::default()
    })
    .expect_err("never ready");
    let Error::NotReady { port, timeout, log } = &err else {
        panic!("expected NotReady, got {err:?}");
    };
    assert_eq!(*timeout, Duration::from_millis(300));
    assert!(log.contains("redis.log"), "{log}");
    assert_eq!(cli(*port, Some("unknown"), &["PING"]), None, "killed");
}

#[test]
fn password_extra_ports_and_arguments_are_applied() {
    let redis = PrivateRedis::start_with(Options {
        password: Some("s3cret/pw".to_owned()),
        port_flags: vec!["--replica-announce-port".to_owned()],
        args: vec!["--maxmemory".into(), "12345678".into()],
        ..Options::default()
    })
    .expect("starts");
    let port = redis.port();
    assert_eq!(
        redis.url(),
        format!("redis://:s3cret%2Fpw@127.0.0.1:{port}/")
    );
    let pw = Some("s3cret/pw");
    assert_eq!(
        cli(port, pw, &["CONFIG", "GET", "maxmemory"]).as_deref(),
        Some("maxmemory\n12345678")
    );
    let [extra] = redis.extra_ports() else {
        panic!("one extra port: {:?}", redis.extra_ports());
    };
    assert_ne!(*extra, port);
    assert_eq!(
        cli(port, pw, &["CONFIG", "GET", "replica-announce-port"]),
        Some(format!("replica-announce-port\n{extra}"))
    );
}

#[test]
fn stop_kill_and_restart_keep_the_port_and_directory() {
    let mut redis = PrivateRedis::start_with(Options {
        args: ["--appendonly", "yes", "--appendfsync", "always"]
            .map(Into::into)
            .to_vec(),
        ..Options::default()
    })
    .expect("starts");
    let port = redis.port();
    let dir = redis.dir().to_path_buf();
    cli(port, None, &["SET", "k", "v"]);

    redis.stop().expect("stops");
    assert!(!redis.is_running());
    redis.stop().expect("stop is idempotent");
    redis.restart().expect("restarts");
    assert!(redis.is_running());
    assert_eq!(redis.port(), port);
    assert_eq!(redis.dir(), dir.as_path());
    assert_eq!(cli(port, None, &["GET", "k"]).as_deref(), Some("v"));

    redis.kill();
    assert!(!redis.is_running());
    redis.kill();
    redis.restart().expect("restarts after kill");
    assert_eq!(cli(port, None, &["GET", "k"]).as_deref(), Some("v"));

    // Restarting a running server stops it first.
    let before = pid(port, None);
    redis.restart().expect("restarts while running");
    assert!(gone(&before));
    assert_eq!(cli(port, None, &["GET", "k"]).as_deref(), Some("v"));
}
