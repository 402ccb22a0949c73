//! Redis URLs through the binary: every form the client would misread is an
//! input error (exit status 2) at start-up, however the URL is given (flag,
//! environment, configuration file), and no form ever shows its password;
//! a Unix socket's password (`?pass=`) works and is never shown; a URL that
//! reaches a server that is not Redis is one clear line.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{assert_one_error_line, stderr, stdout, BIN};
use lifecycle_test_support::{RedisServer, RedisServerOptions};

/// How long one run of the binary may take before the test calls it stuck.
const WITHIN: Duration = Duration::from_secs(30);

/// Where the URL comes from.
#[derive(Clone, Copy, Debug)]
enum Source {
    Flag,
    Env,
}

/// Runs the binary with `url` given per `source`, in an environment free of
/// the caller's settings; kills it if it is still running after [`WITHIN`].
fn worker_with(source: Source, url: &str, args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command.args(args);
    for (name, _) in std::env::vars() {
        if name.starts_with("LOBBY_") || name == "REDIS_URL" || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    match source {
        Source::Flag => {
            command.args(["--redis-url", url]);
        }
        Source::Env => {
            command.env("REDIS_URL", url);
        }
    }
    bounded(command)
}

/// Runs `command` to its end, killing it after [`WITHIN`].
fn bounded(mut command: Command) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WITHIN;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let output = child.wait_with_output().unwrap();
            panic!(
                "still running after {WITHIN:?}: {command:?}\nstdout: {}\nstderr: {}",
                stdout(&output),
                stderr(&output)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Asserts that nothing `output` printed holds any of `secrets`.
fn assert_hidden(output: &Output, secrets: &[&str], what: &str) {
    let printed = format!("{}{}", stdout(output), stderr(output));
    for secret in secrets {
        assert!(
            !printed.contains(secret),
            "{what}: {secret:?} printed:\n{printed}"
        );
    }
}

/// The commands that take a URL at start-up: printing the settings, a
/// one-shot command, and a normal run (which would otherwise go on).
const COMMANDS: &[&[&str]] = &[
    &["run", "--print-config"],
    &["status"],
    &["run", "--metrics-addr", "off"],
];

/// Bad URLs, what the error must say, and the parts of the password that
/// must never be printed.
const BAD_URLS: &[(&str, &str, &[&str])] = &[
    (
        "redis://127.0.0.1:6379?password=hunter2",
        "user-info",
        &["hunter2"],
    ),
    (
        "rediss://alice@127.0.0.1:6380/0?pass=hunter2",
        "user-info",
        &["hunter2"],
    ),
    (
        "redis://127.0.0.1:6379?protocol=3&PASSWORD=hunter2",
        "user-info",
        &["hunter2"],
    ),
    (
        "redis://:hun/ter#2x@127.0.0.1:6379",
        "must be percent-encoded",
        &["hun/", "ter#", "hun", "2x"],
    ),
    (
        "redis://alice:hun?ter2@127.0.0.1:6379",
        "must be percent-encoded",
        &["hun", "ter2"],
    ),
    (
        "redis://:hunter2#x@127.0.0.1:6379",
        "must be percent-encoded",
        &["hunter2"],
    ),
    ("redis://:hunter2", "does not parse", &["hunter2"]),
    ("redis://:hunter2@", "does not parse", &["hunter2"]),
    (
        "unix:///tmp/redis.sock?password=hunter2",
        "pass=, not password=",
        &["hunter2"],
    ),
    (
        "redis+unix:///tmp/redis.sock?pass=hun#ter2",
        "no #fragment",
        &["hun#", "ter2"],
    ),
    (
        "redis://127.0.0.1:6379?hunter2",
        "without a name=value form",
        &["hunter2"],
    ),
    (
        "redis://127.0.0.1:6379?timeout=5",
        "unknown query parameter \"timeout\"",
        &[],
    ),
    (
        "redis://127.0.0.1:6379?db=2",
        "unknown query parameter \"db\"",
        &[],
    ),
    ("http://:hunter2@127.0.0.1", "not Redis's", &["hunter2"]),
    ("42", "not a URL", &[]),
    ("hunter2", "not a URL", &["hunter2"]),
];

#[test]
fn every_bad_url_exits_2_in_one_line_without_its_password() {
    for (url, says, secrets) in BAD_URLS {
        for source in [Source::Flag, Source::Env] {
            for args in COMMANDS {
                let what = format!("{url} by {source:?}, {args:?}");
                let output = worker_with(source, url, args);
                assert_eq!(output.status.code(), Some(2), "{what}: {output:?}");
                let line = assert_one_error_line(&output);
                assert!(line.contains("invalid Redis URL"), "{what}: {line}");
                assert!(line.contains(says), "{what}: {line}");
                assert_hidden(&output, secrets, &what);
            }
        }
    }
}

#[test]
fn unusable_certificate_files_exit_2() {
    for args in COMMANDS {
        let mut args = args.to_vec();
        args.extend(["--tls-ca-file", "/nonexistent/ca.pem"]);
        let output = worker_with(Source::Env, "rediss://:hunter2@127.0.0.1:6380", &args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
        let line = assert_one_error_line(&output);
        assert!(line.contains("invalid TLS settings"), "{args:?}: {line}");
        assert_hidden(&output, &["hunter2"], "TLS files");
    }
}

/// A configuration file holding `text`.
fn config_file(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

/// `run --config FILE` plus `args`, with no URL from elsewhere.
fn run_with_config(file: &tempfile::NamedTempFile, args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command
        .args(["run", "--config", file.path().to_str().unwrap()])
        .args(args);
    for (name, _) in std::env::vars() {
        if name.starts_with("LOBBY_") || name == "REDIS_URL" {
            command.env_remove(name);
        }
    }
    bounded(command)
}

#[test]
fn a_bad_redis_url_in_the_configuration_file_exits_2() {
    for (text, secrets) in [
        ("redis_url = 42\n", &[][..]),
        (
            "redis_url = \"redis://127.0.0.1:6379?password=hunter2\"\n",
            &["hunter2"][..],
        ),
        (
            "redis_url = \"redis://:hun/ter2@127.0.0.1:6379\"\n",
            &["hun/", "ter2"][..],
        ),
    ] {
        let file = config_file(text);
        for args in [&["--print-config"][..], &["--metrics-addr", "off"][..]] {
            let output = run_with_config(&file, args);
            assert_eq!(output.status.code(), Some(2), "{text} {args:?}: {output:?}");
            let line = assert_one_error_line(&output);
            assert!(line.contains("invalid Redis URL"), "{text}: {line}");
            assert_hidden(&output, secrets, text);
        }
    }
}

#[test]
fn a_unix_socket_password_works_and_is_never_shown() {
    let password = "unix-hunter2";
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("redis.sock");
    let socket = socket.to_str().unwrap();
    let _server = RedisServer::start_with(RedisServerOptions {
        requirepass: Some(password.into()),
        extra_args: vec![
            "--unixsocket".into(),
            socket.into(),
            "--unixsocketperm".into(),
            "700".into(),
        ],
        ..RedisServerOptions::default()
    });
    let url = format!("redis+unix://{socket}?db=1&pass={password}");
    for source in [Source::Flag, Source::Env] {
        let printed = worker_with(source, &url, &["run", "--print-config"]);
        assert_eq!(printed.status.code(), Some(0), "{printed:?}");
        assert!(
            stdout(&printed).contains(&format!("redis+unix://{socket}?db=1&pass=***")),
            "{}",
            stdout(&printed)
        );
        assert_hidden(&printed, &[password], "print-config");

        let status = worker_with(source, &url, &["status"]);
        assert_eq!(status.status.code(), Some(0), "{status:?}");
        assert_hidden(&status, &[password], "status");

        // The engine's own reading connection authenticates on the socket too.
        let drained = worker_with(source, &url, &["run", "--drain", "--metrics-addr", "off"]);
        assert_eq!(drained.status.code(), Some(0), "{drained:?}");
        assert_hidden(&drained, &[password], "run --drain");

        // A wrong password is refused without showing either.
        let wrong = url.replace(password, "not-it-hunter3");
        let refused = worker_with(source, &wrong, &["status"]);
        assert_eq!(refused.status.code(), Some(1), "{refused:?}");
        assert_one_error_line(&refused);
        assert_hidden(&refused, &[password, "not-it-hunter3"], "wrong password");
    }
}

/// A TCP server that answers every connection with an HTTP error and closes
/// it: not a stand-in for Redis, the wrong kind of server. Returns its port.
fn http_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = stream.read(&mut [0_u8; 4096]);
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    port
}

#[test]
fn a_one_shot_command_against_a_server_that_is_not_redis_exits_1_naming_it() {
    let port = http_server();
    let url = format!("redis://:hunter2@127.0.0.1:{port}");
    for args in [&["status"][..], &["tail"][..], &["offsets", "get"][..]] {
        let output = worker_with(Source::Env, &url, args);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {output:?}");
        let line = assert_one_error_line(&output);
        assert!(
            line.contains(&format!(
                "the server at 127.0.0.1:{port} is not a Redis server (it answered \"HTTP/1.1 400 Bad Request\")"
            )),
            "{args:?}: {line}"
        );
        assert!(line.contains("is this a Redis port?"), "{line}");
        assert_hidden(&output, &["hunter2"], "status");
    }
}

/// `run` against a server that is not Redis ends (exit status 1) with one
/// line saying so, rather than retrying forever: waiting does not turn
/// another kind of server into Redis (see `lifecycle_streams::classify`).
#[test]
fn run_against_a_server_that_is_not_redis_ends_with_one_line() {
    let port = http_server();
    for password in ["", ":hunter2@"] {
        let url = format!("redis://{password}127.0.0.1:{port}");
        let started = Instant::now();
        let output = worker_with(Source::Env, &url, &["run", "--metrics-addr", "off"]);
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        assert!(started.elapsed() < Duration::from_secs(15), "{output:?}");
        let err = stderr(&output);
        let told: Vec<&str> = err
            .lines()
            .filter(|line| line.contains("not a Redis server"))
            .collect();
        assert_eq!(told.len(), 1, "{err}");
        assert!(told[0].starts_with("error: "), "{err}");
        assert!(told[0].contains("Redis port?"), "{err}");
        // The client's parser's own words never reach the log, over
        // several lines or one.
        for line in err.lines() {
            assert!(
                !line.contains("Parse error") && !line.starts_with("Unexpected"),
                "{err}"
            );
        }
        assert!(!err.contains("WARN"), "{err}");
        assert_hidden(&output, &["hunter2"], "run");
    }
}
