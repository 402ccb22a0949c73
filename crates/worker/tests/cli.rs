//! The `lobby-worker` binary driven as an operator would drive it, against
//! private redis-servers.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    add_event, assert_one_error_line, assert_success, stderr, stdout, wait_until, worker, Running,
    BIN,
};
use lifecycle_test_support::{free_port, RedisServer};
use serde_json::{json, Value};

fn publish(url: &str, event_type: &str, user: &str) -> String {
    let output = worker(
        url,
        &["publish", "--event-type", event_type, "--user-id", user],
    );
    assert_success(&output);
    stdout(&output).trim().to_owned()
}

fn tail_json(url: &str, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["tail", "--json"];
    args.extend_from_slice(extra);
    let output = worker(url, &args);
    assert_success(&output);
    stdout(&output)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

#[test]
fn tail_json_has_the_contract_shape_for_every_status() {
    let server = RedisServer::start();
    let url = server.url();
    let output = worker(
        &url,
        &[
            "publish",
            "--event-type",
            "user.deleted",
            "--user-id",
            "  u-1 ",
            "--occurred-at-ms",
            "1700000000000",
            "--source",
            "users",
            "--actor-type",
            "admin",
            "--actor-id",
            "a-7",
            "--reason-code",
            "gdpr",
            "--trace-id",
            "t-1",
        ],
    );
    assert_success(&output);
    let first = stdout(&output).trim().to_owned();
    let output = worker(
        &url,
        &[
            "publish",
            "--event-type",
            "user.renamed",
            "--user-id",
            "u-2",
            "--allow-unknown-type",
        ],
    );
    assert_success(&output);
    let unknown = stdout(&output).trim().to_owned();
    let malformed = server.cli(&[
        "XADD",
        "user:lifecycle_events",
        "*",
        "event_type",
        "user.deleted",
        "occurred_at_ms",
        "5",
    ]);
    let bad_time = server.cli(&[
        "XADD",
        "user:lifecycle_events",
        "*",
        "event_type",
        "user.deleted",
        "user_id",
        "u",
        "occurred_at_ms",
        "1e3",
    ]);

    let lines = tail_json(&url, &[]);
    assert_eq!(lines.len(), 4);
    assert_eq!(
        lines[0],
        json!({
            "entry_id": first,
            "status": "ok",
            "event": {
                "entry_id": first, "event_type": "user.deleted", "user_id": "u-1",
                "occurred_at_ms": 1_700_000_000_000_i64, "source": "users", "actor_type": "admin",
                "actor_id": "a-7", "reason_code": "gdpr", "trace_id": "t-1",
            }
        })
    );
    assert_eq!(lines[1]["status"], "unknown_type");
    assert_eq!(lines[1]["entry_id"], unknown.as_str());
    assert_eq!(lines[1]["event"]["event_type"], "user.renamed");
    assert!(lines[1]["event"]["occurred_at_ms"].is_i64());
    assert_eq!(
        lines[2],
        json!({"entry_id": malformed, "status": "malformed", "error": "missing user_id"})
    );
    assert_eq!(lines[3]["status"], "malformed");
    assert!(lines[3]["error"]
        .as_str()
        .unwrap()
        .starts_with("invalid occurred_at_ms: "));
    assert_eq!(lines[3]["entry_id"], bad_time.as_str());
    // tail never moves the offset.
    assert_eq!(
        server.cli(&["EXISTS", "lobby:stream_offsets:user_lifecycle"]),
        "0"
    );
}

#[test]
fn tail_from_is_inclusive_and_count_stops() {
    let server = RedisServer::start();
    let url = server.url();
    let ids: Vec<String> = (0..7)
        .map(|i| publish(&url, "user.deleted", &format!("u{i}")))
        .collect();
    let lines = tail_json(&url, &["--from", &ids[2], "--count", "3"]);
    let seen: Vec<&str> = lines
        .iter()
        .map(|l| l["entry_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        seen,
        vec![ids[2].as_str(), ids[3].as_str(), ids[4].as_str()]
    );
    // Human output escapes control characters in values.
    server.cli(&[
        "XADD",
        "user:lifecycle_events",
        "*",
        "event_type",
        "user.deleted",
        "user_id",
        "evil\nINFO forged",
        "occurred_at_ms",
        "5",
    ]);
    let output = worker(&url, &["tail", "--from", &ids[6]]);
    assert_success(&output);
    assert_eq!(stdout(&output).lines().count(), 2, "{}", stdout(&output));
}

#[test]
fn tail_follow_prints_new_entries() {
    let server = RedisServer::start();
    let url = server.url();
    let mut child = Command::new(BIN)
        .args(["tail", "--json", "--follow", "--count", "2"])
        .env("REDIS_URL", &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let first = publish(&url, "user.deleted", "a");
    let second = publish(&url, "user.permanently_blocked", "b");
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        lines.push(serde_json::from_str::<Value>(&line.unwrap()).unwrap());
    }
    assert!(child.wait().unwrap().success());
    let seen: Vec<&str> = lines
        .iter()
        .map(|l| l["entry_id"].as_str().unwrap())
        .collect();
    assert_eq!(seen, vec![first.as_str(), second.as_str()]);
}

#[test]
fn offsets_get_set_reset() {
    let server = RedisServer::start();
    let url = server.url();
    let output = worker(&url, &["offsets", "get"]);
    assert_success(&output);
    assert_eq!(stdout(&output), "");
    assert!(stderr(&output).contains("no offset"));

    // Past the end of a stream that does not exist: refused.
    let output = worker(&url, &["offsets", "set", "10-5"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    server.cli(&[
        "XADD",
        "user:lifecycle_events",
        "20-0",
        "event_type",
        "user.deleted",
        "user_id",
        "u",
        "occurred_at_ms",
        "1",
    ]);
    assert_success(&worker(&url, &["offsets", "set", "10-5"]));
    assert_eq!(
        server.cli(&["GET", "lobby:stream_offsets:user_lifecycle"]),
        "10-5"
    );
    // An operator's set may move backwards.
    assert_success(&worker(&url, &["offsets", "set", "9-0"]));
    let output = worker(&url, &["offsets", "get"]);
    assert_eq!(stdout(&output).trim(), "9-0");

    let output = worker(
        &url,
        &[
            "offsets",
            "--key-prefix",
            "other",
            "--label",
            "gm",
            "set",
            "1-1",
        ],
    );
    assert_success(&output);
    assert_eq!(server.cli(&["GET", "other:stream_offsets:gm"]), "1-1");

    // Past the stream's last id: every event until then would be skipped.
    let output = worker(&url, &["offsets", "set", "99999999999999-0"]);
    let line = assert_one_error_line(&output);
    assert_eq!(output.status.code(), Some(2), "{line}");
    assert!(line.contains("20-0") && line.contains("--force"), "{line}");
    assert_eq!(stdout(&worker(&url, &["offsets", "get"])).trim(), "9-0");
    assert_success(&worker(
        &url,
        &["offsets", "set", "99999999999999-0", "--force"],
    ));
    assert_eq!(
        stdout(&worker(&url, &["offsets", "get"])).trim(),
        "99999999999999-0"
    );
    // Blank names are refused, wherever they come from.
    for args in [
        vec!["offsets", "--key-prefix", "", "get"],
        vec!["offsets", "--label", " ", "get"],
        vec!["status", "--stream", ""],
    ] {
        let output = worker(&url, &args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
    }

    assert_success(&worker(&url, &["offsets", "reset"]));
    assert_eq!(
        server.cli(&["EXISTS", "lobby:stream_offsets:user_lifecycle"]),
        "0"
    );

    let output = worker(&url, &["offsets", "set", "x-1"]);
    assert_eq!(output.status.code(), Some(2));
    let first_line = stderr(&output)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(
        first_line.starts_with("error: ") && first_line.contains("not a stream entry id"),
        "{first_line}"
    );
}

#[test]
fn run_drain_handles_the_backlog_saves_and_exits_zero() {
    let server = RedisServer::start();
    let url = server.url();
    for i in 0..25 {
        publish(&url, "user.deleted", &format!("u{i}"));
    }
    server.cli(&["XADD", "user:lifecycle_events", "*", "junk", "1"]);
    let last = publish(&url, "user.permanently_blocked", "final");
    let output = worker(
        &url,
        &[
            "run",
            "--drain",
            "--batch-size",
            "4",
            "--log-level",
            "debug",
        ],
    );
    assert_success(&output);
    assert_eq!(
        server.cli(&["GET", "lobby:stream_offsets:user_lifecycle"]),
        last
    );
    let log = stderr(&output);
    assert_eq!(log.matches("cascade applied").count(), 26, "{log}");
    assert!(log.contains("malformed entry absorbed"), "{log}");

    // A second drain has nothing to do and keeps the offset.
    let output = worker(&url, &["run", "--drain", "--log-level", "debug"]);
    assert_success(&output);
    assert_eq!(stderr(&output).matches("cascade applied").count(), 0);
    assert_eq!(
        server.cli(&["GET", "lobby:stream_offsets:user_lifecycle"]),
        last
    );
}

#[test]
fn sigterm_and_sigint_stop_run_gracefully_with_status_zero() {
    let server = RedisServer::start();
    let url = server.url();
    for signal in ["TERM", "INT"] {
        let mut running = Running::start(&url, &["--block-timeout", "30s", "--log-level", "debug"]);
        running.wait_for_log("consumer started");
        let id = publish(&url, "user.deleted", signal);
        running.wait_for_log(&id);
        running.signal(signal);
        let status = running.wait_exit(Duration::from_secs(5));
        assert_eq!(status.code(), Some(0), "{}", running.log());
        assert_eq!(
            server.cli(&["GET", "lobby:stream_offsets:user_lifecycle"]),
            id
        );
    }
}

#[test]
fn run_keeps_retrying_an_unreachable_redis_and_says_so_once() {
    let port = free_port();
    let url = format!("redis://:topsecret@127.0.0.1:{port}");
    let mut running = Running::start(&url, &["--block-timeout", "1s", "--log-level", "debug"]);
    running.wait_for_log("Redis unavailable; retrying with back-off");
    // The warning says what to do about it, in its own field.
    running.wait_for_log("start Redis or correct the URL");
    // Several retries later it is still running and has not repeated itself.
    wait_until(Duration::from_secs(15), || {
        running.log().matches("Redis still unavailable").count() >= 3
    })
    .unwrap_or_else(|()| panic!("no retries logged:\n{}", running.log()));
    assert!(
        running.child.try_wait().unwrap().is_none(),
        "{}",
        running.log()
    );
    let log = running.log();
    assert_eq!(log.matches("Redis unavailable").count(), 1, "{log}");
    assert!(!log.contains("topsecret"), "{log}");
    running.signal("TERM");
    assert_eq!(running.wait_exit(Duration::from_secs(15)).code(), Some(0));
}

#[test]
fn user_caused_failures_are_one_clear_line() {
    let unreachable = format!("redis://127.0.0.1:{}", free_port());
    for args in [
        vec!["tail"],
        vec!["publish", "--event-type", "user.deleted", "--user-id", "u"],
        vec!["offsets", "get"],
    ] {
        let line = assert_one_error_line(&worker(&unreachable, &args));
        assert!(line.contains("refused"), "{line}");
        assert!(line.contains("--redis-url"), "{line}");
    }
    let line = assert_one_error_line(&worker("redis://:hunter2@", &["tail"]));
    assert!(
        line.contains("invalid Redis URL") && !line.contains("hunter2"),
        "{line}"
    );
    let line = assert_one_error_line(&worker("http://127.0.0.1", &["run"]));
    assert!(line.contains("invalid Redis URL"), "{line}");

    // Settings that contradict each other are input errors too (exit 2),
    // named by their flags; a dead-letter stream equal to the stream
    // whether or not dead-lettering is on.
    for args in [
        vec!["run", "--dead-letter-stream", "user:lifecycle_events"],
        vec![
            "run",
            "--dead-letter-stream",
            "user:lifecycle_events",
            "--dead-letter-after",
            "3",
        ],
        vec!["run", "--retry-initial", "10s", "--retry-max", "1s"],
    ] {
        let output = worker(&unreachable, &args);
        let line = assert_one_error_line(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {line}");
        assert!(line.contains("invalid settings"), "{line}");
    }

    let bad_flags: [&[&str]; 4] = [
        &["run", "--block-timeout", "soon"],
        &["run", "--batch-size", "0"],
        &["run", "--start-from", "latest"],
        &[
            "publish",
            "--event-type",
            "user.deleted",
            "--user-id",
            "u",
            "--occurred-at-ms",
            "0",
        ],
    ];
    for args in bad_flags {
        let output = worker(&unreachable, args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).starts_with("error: "),
            "{}",
            stderr(&output)
        );
    }
    let server = RedisServer::start();
    let output = worker(
        &server.url(),
        &["publish", "--event-type", " ", "--user-id", "u"],
    );
    let line = assert_one_error_line(&output);
    assert!(line.contains("--event-type"), "{line}");
    assert_eq!(output.status.code(), Some(2), "an input error");
}

#[test]
fn publish_refuses_an_event_type_the_worker_would_absorb() {
    let server = RedisServer::start();
    let url = server.url();
    let typo = ["publish", "--event-type", "user.delete", "--user-id", "u1"];
    let output = worker(&url, &typo);
    let line = assert_one_error_line(&output);
    assert_eq!(output.status.code(), Some(2), "{line}");
    assert!(
        line.contains("\"user.delete\"") && line.contains("--allow-unknown-type"),
        "{line}"
    );
    assert_eq!(server.cli(&["XLEN", "user:lifecycle_events"]).trim(), "0");
    let mut allowed = typo.to_vec();
    allowed.push("--allow-unknown-type");
    assert_success(&worker(&url, &allowed));
    assert_eq!(server.cli(&["XLEN", "user:lifecycle_events"]).trim(), "1");
}

#[test]
fn a_log_level_that_names_no_level_is_refused() {
    let unreachable = format!("redis://127.0.0.1:{}/", free_port());
    for (flag, env) in [(Some("wran"), None), (None, Some("verbose"))] {
        let mut command = Command::new(BIN);
        command
            .env("REDIS_URL", &unreachable)
            .env_remove("RUST_LOG");
        match flag {
            Some(level) => command.args(["--log-level", level]),
            None => command.env_remove("LOBBY_LOG_LEVEL"),
        };
        if let Some(level) = env {
            command.env("LOBBY_LOG_LEVEL", level);
        }
        let output = command.arg("status").output().unwrap();
        let line = assert_one_error_line(&output);
        assert_eq!(output.status.code(), Some(2), "{line}");
        assert!(line.contains("names no level"), "{line}");
    }
}

#[test]
fn a_reader_that_closes_stdout_ends_the_command_quietly() {
    let server = RedisServer::start();
    for _ in 0..3 {
        publish(&server.url(), "user.deleted", "u");
    }
    // `demo` prints with `println!`, `tail` through a writer: both meet the
    // closed pipe.
    for (args, url) in [
        (vec!["demo"], None),
        (vec!["tail", "--count", "3"], Some(server.url())),
    ] {
        // The demo's private redis-server lives in a directory under TMPDIR,
        // removed when the server is stopped: not orphaned by the exit.
        let tmp = tempfile::tempdir().unwrap();
        let mut command = Command::new(BIN);
        command
            .args(&args)
            .env_remove("REDIS_URL")
            .env("TMPDIR", tmp.path());
        if let Some(url) = &url {
            command.env("REDIS_URL", url);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Closed before the command prints its first line.
        drop(child.stdout.take());
        let output = child.wait_with_output().unwrap();
        let err = stderr(&output);
        assert!(
            output.status.success(),
            "{args:?}: {:?}: {err}",
            output.status
        );
        assert!(
            !err.contains("panicked") && !err.contains("error"),
            "{args:?}: {err}"
        );
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert!(left.is_empty(), "{args:?}: left behind: {left:?}");
    }
}

#[test]
fn a_stream_key_of_the_wrong_type_ends_run_with_advice() {
    let server = RedisServer::start();
    server.cli(&["SET", "user:lifecycle_events", "oops"]);
    let output = worker(&server.url(), &["run"]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    let last = err.lines().last().unwrap();
    assert!(last.starts_with("error: "), "{err}");
    assert!(
        last.contains("\"user:lifecycle_events\"") && last.contains("not a stream"),
        "{last}"
    );
}

#[test]
fn with_json_logs_the_fatal_error_is_a_json_line_too() {
    let server = RedisServer::start();
    server.cli(&["SET", "user:lifecycle_events", "oops"]);
    let output = worker(&server.url(), &["--log-format", "json", "run"]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    for line in err.lines().filter(|line| !line.trim().is_empty()) {
        let object: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: not JSON: {line}"));
        assert!(object["level"].is_string(), "{line}");
    }
    let last: Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    assert_eq!(last["level"], "ERROR");
    assert!(
        last["err"].as_str().unwrap().contains("not a stream"),
        "{last}"
    );
    // Before the logger exists (a log level that names no level) as well.
    let output = worker(
        &server.url(),
        &["--log-format", "json", "--log-level", "wran", "run"],
    );
    assert_eq!(output.status.code(), Some(2));
    let line: Value = serde_json::from_str(stderr(&output).trim()).unwrap();
    assert_eq!(line["level"], "ERROR");
    assert!(
        line["err"].as_str().unwrap().contains("names no level"),
        "{line}"
    );
}

#[test]
fn log_fields_are_plain_values_and_long_entry_values_are_cut() {
    let server = RedisServer::start();
    let url = server.url();
    let long_type = "t".repeat(120_000);
    let long_user = "u".repeat(100_000);
    for (event_type, user) in [
        (long_type.as_str(), "u1"),
        ("user.deleted", long_user.as_str()),
    ] {
        add_event(&server, event_type, user, "1700000000000");
    }
    let output = worker(
        &url,
        &[
            "--log-format",
            "json",
            "--log-level",
            "info,lifecycle_redis=debug",
            "run",
            "--drain",
            "--metrics-addr",
            "off",
            "--dead-letter-after",
            "3",
        ],
    );
    assert_success(&output);
    let err = stderr(&output);
    assert!(
        err.len() < 32 * 1024,
        "{} bytes of log:\n{}",
        err.len(),
        &err[..2000]
    );
    assert!(
        err.contains("[120000 bytes]"),
        "the unknown type, cut: {err}"
    );
    assert!(err.contains("[100000 bytes]"), "the user id, cut: {err}");
    let lines: Vec<Value> = err
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let field = |message: &str, name: &str| -> Value {
        let line = lines
            .iter()
            .find(|line| line["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line in {err}"));
        line[name].clone()
    };
    assert_eq!(field("lobby-worker starting", "checkpoint"), "every-batch");
    assert_eq!(field("lobby-worker starting", "dead_letter_after"), 3);
    let offset = field("drained", "offset");
    let offset = offset.as_str().unwrap();
    assert!(
        offset
            .split_once('-')
            .is_some_and(|(ms, seq)| { ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok() }),
        "{offset:?}"
    );
}

#[test]
fn demo_tours_a_private_redis_and_exits_zero() {
    let output = Command::new(BIN)
        .arg("demo")
        .env_remove("REDIS_URL")
        .output()
        .unwrap();
    assert_success(&output);
    let out = stdout(&output);
    for expected in [
        "a private redis-server on 127.0.0.1:",
        "user.deleted alice: cascade applied to 7 game(s)",
        "user.permanently_blocked bob: cascade applied to 8 game(s)",
        "absorbed as malformed (missing user_id)",
        "absorbed: unknown type \"user.renamed\"",
        "user.deleted zed: cascade applied to 0 game(s)",
        "user.deleted alice: already applied",
        "open-1       cancelled* alice   carol",
        "running-1    running    bob     carol                -           -           alice,bob",
        "finished-1   finished   alice   alice,bob,erin",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    // The private server is gone with the demo.
    let line = out.lines().next().unwrap();
    let port = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap();
    assert!(std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err());
}

#[test]
fn demo_on_a_given_redis_keeps_to_its_own_keys() {
    let server = RedisServer::start();
    server.cli(&["SET", "lobby:stream_offsets:user_lifecycle", "5-5"]);
    for _ in 0..2 {
        let output = worker(&server.url(), &["demo", "--redis-url", &server.url()]);
        assert_success(&output);
        assert!(stdout(&output).contains("bob: cascade applied to 8 game(s)"));
    }
    assert_eq!(
        server.cli(&["GET", "lobby:stream_offsets:user_lifecycle"]),
        "5-5"
    );
    assert_eq!(server.cli(&["EXISTS", "user:lifecycle_events"]), "0");
    assert_eq!(
        server.cli(&["XLEN", "lobby-demo:user:lifecycle_events"]),
        "5"
    );
}

#[test]
fn demo_and_bench_never_take_redis_from_the_environment() {
    let exported = RedisServer::start();
    // An operator's shell with REDIS_URL exported: the demo still starts
    // its own server and leaves the exported one untouched.
    let output = worker(&exported.url(), &["demo"]);
    assert_success(&output);
    assert!(stdout(&output).contains("a private redis-server on 127.0.0.1:"));
    assert_eq!(exported.cli(&["DBSIZE"]).trim(), "0");
    // bench on a given Redis asks for --yes first, and writes nothing
    // without it.
    let output = worker(&exported.url(), &["bench", "--redis-url", &exported.url()]);
    let line = assert_one_error_line(&output);
    assert_eq!(output.status.code(), Some(2), "{line}");
    assert!(line.contains("--yes"), "{line}");
    assert_eq!(exported.cli(&["DBSIZE"]).trim(), "0");
}

#[test]
fn demo_without_redis_server_says_how_to_install_it() {
    let empty = std::env::temp_dir();
    let output = Command::new(BIN)
        .arg("demo")
        .env_remove("REDIS_URL")
        .env("PATH", empty)
        .output()
        .unwrap();
    let line = assert_one_error_line(&output);
    assert!(
        line.contains("redis-server is not on the PATH") && line.contains("apt-get install"),
        "{line}"
    );
}

#[test]
fn values_from_entries_cannot_forge_or_hide_log_lines() {
    let server = RedisServer::start();
    let url = server.url();
    for (event_type, user) in [
        (
            "user.deleted",
            "evil\n2026-01-01T00:00:00Z  INFO forged line",
        ),
        ("user.deleted", "\u{1b}[8mhidden\u{1b}[0m"),
        ("evil\nERROR forged type", "u1"),
    ] {
        add_event(&server, event_type, user, "5");
    }
    server.cli(&[
        "XADD",
        "user:lifecycle_events",
        "*",
        "event_type",
        "user.deleted",
        "user_id",
        "u",
        "occurred_at_ms",
        "1\n WARN forged reason",
    ]);
    let output = worker(&url, &["run", "--drain", "--log-level", "debug"]);
    assert_success(&output);
    let log = stderr(&output);
    assert!(
        log.contains("forged"),
        "the values were logged at all: {log}"
    );
    for line in log.lines() {
        assert!(
            !line.contains("forged")
                || line.contains("stream_entry_id")
                || line.contains("user_id"),
            "a forged line: {line:?}"
        );
        assert!(
            !line.trim_start().starts_with("2026-01-01"),
            "a forged line: {line:?}"
        );
    }
    assert!(
        !log.contains('\u{1b}'),
        "a raw escape sequence reached the log"
    );
}
