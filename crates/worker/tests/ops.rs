//! Operability of the `lobby-worker` binary: the metrics and health
//! endpoints of `run`, `status`, and `run --print-config`, against private
//! redis-servers.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use common::{
    assert_one_error_line, assert_success, get, sample, status_json, stderr, stdout, wait_until,
    worker, Running, BIN,
};
use lifecycle_test_support::{free_port, RedisServer};
use serde_json::Value;

const STREAM: &str = "user:lifecycle_events";
const OFFSET_KEY: &str = "lobby:stream_offsets:user_lifecycle";

fn add_event(server: &RedisServer, event_type: &str, user: &str) {
    common::add_event(server, event_type, user, "1700000000000");
}

#[test]
fn metrics_count_what_run_does_and_readiness_follows_redis() {
    let mut server = RedisServer::start();
    let url = server.url();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut running = Running::start_with_env(
        &url,
        &["--metrics-addr", &addr, "--block-timeout", "250ms"],
        &[],
    );
    running.wait_for_log("consumer started");
    // Ready as soon as it reads, before the first (blocking) read returns.
    wait_until(Duration::from_secs(10), || {
        get(port, "/readyz").is_some_and(|(code, _)| code == 200)
    })
    .unwrap_or_else(|()| panic!("not ready: {:?}", get(port, "/readyz")));
    const N: u64 = 7;
    for i in 0..N {
        add_event(&server, "user.deleted", &format!("secret-user-{i}"));
    }
    add_event(&server, "user.renamed", "secret-user-renamed");
    // Malformed: no user id.
    let last_id = server.cli(&[
        "XADD",
        STREAM,
        "*",
        "event_type",
        "user.deleted",
        "occurred_at_ms",
        "1700000000000",
    ]);

    let mut body = String::new();
    wait_until(Duration::from_secs(15), || {
        body = get(port, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default();
        // The last entry counted, and (a moment later) its offset saved.
        sample(&body, "lobby_entries_total{outcome=\"malformed\"}") == Some(1.0)
            && sample(&body, "lobby_offset_saves_total").is_some_and(|saves| saves >= 1.0)
    })
    .unwrap_or_else(|()| panic!("not all counted:\n{body}\nlog:\n{}", running.log()));
    assert_eq!(
        sample(&body, "lobby_entries_total{outcome=\"handled\"}"),
        Some(N as f64),
        "{body}"
    );
    assert_eq!(
        sample(&body, "lobby_entries_total{outcome=\"unknown_type\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, "lobby_entries_total{outcome=\"dead_lettered\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&body, "lobby_handler_duration_seconds_count"),
        Some(N as f64),
        "{body}"
    );
    assert_eq!(
        sample(&body, "lobby_handler_duration_seconds_bucket{le=\"+Inf\"}"),
        Some(N as f64)
    );
    assert!(sample(&body, "lobby_handler_duration_seconds_sum").unwrap() > 0.0);
    assert_eq!(sample(&body, "lobby_handler_failures_total"), Some(0.0));
    assert_eq!(sample(&body, "lobby_handler_calls_in_flight"), Some(0.0));
    assert!(sample(&body, "lobby_reads_total").unwrap() >= 1.0);
    assert!(sample(&body, "lobby_offset_saves_total").unwrap() >= 1.0);
    assert_eq!(sample(&body, "lobby_ready"), Some(1.0), "{body}");
    for name in [
        "lobby_redis_faults_total",
        "lobby_redis_reconnects_total",
        "lobby_lag_entries",
        "lobby_lag_seconds",
        "lobby_offset_timestamp_seconds",
        "lobby_stream_length",
    ] {
        assert!(sample(&body, name).is_some(), "no {name}:\n{body}");
    }
    // Low cardinality: no user id, event type or error text anywhere.
    for leaked in [
        "secret-user",
        "user.renamed",
        "user.deleted",
        "missing user_id",
    ] {
        assert!(!body.contains(leaked), "{leaked:?} in:\n{body}");
    }
    // Every sample is prefixed.
    for line in body.lines().filter(|line| !line.starts_with('#')) {
        assert!(line.starts_with("lobby_"), "{line}");
    }

    // The lag gauges catch up within their refresh period.
    wait_until(Duration::from_secs(15), || {
        server.cli(&["GET", OFFSET_KEY]) == last_id
    })
    .unwrap_or_else(|()| panic!("offset not saved; log:\n{}", running.log()));
    let saved_ms: f64 = last_id.split('-').next().unwrap().parse().unwrap();
    wait_until(Duration::from_secs(15), || {
        body = get(port, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default();
        sample(&body, "lobby_offset_timestamp_seconds") == Some(saved_ms / 1000.0)
    })
    .unwrap_or_else(|()| panic!("lag gauges not refreshed (offset {last_id}):\n{body}"));
    assert_eq!(sample(&body, "lobby_lag_entries"), Some(0.0), "{body}");
    assert_eq!(sample(&body, "lobby_lag_seconds"), Some(0.0), "{body}");
    assert_eq!(sample(&body, "lobby_stream_length"), Some(N as f64 + 2.0));

    assert_eq!(get(port, "/healthz"), Some((200, "ok\n".to_owned())));
    let (code, text) = get(port, "/readyz").unwrap();
    assert_eq!(code, 200, "{text}");

    // Redis goes away: not ready, with a reason; still alive.
    server.kill();
    let mut readyz = None;
    wait_until(Duration::from_secs(15), || {
        readyz = get(port, "/readyz");
        readyz.as_ref().is_some_and(|(code, _)| *code == 503)
    })
    .unwrap_or_else(|()| panic!("still {readyz:?}; log:\n{}", running.log()));
    let reason = readyz.take().unwrap().1;
    assert!(reason.contains("Redis unavailable"), "{reason}");
    assert_eq!(reason.lines().count(), 1, "{reason}");
    assert_eq!(get(port, "/healthz").unwrap().0, 200);
    let body = get(port, "/metrics").unwrap().1;
    assert_eq!(sample(&body, "lobby_ready"), Some(0.0), "{body}");
    assert!(sample(&body, "lobby_redis_faults_total").unwrap() >= 1.0);

    // And comes back: ready again.
    server.restart();
    wait_until(Duration::from_secs(30), || {
        readyz = get(port, "/readyz");
        readyz.as_ref().is_some_and(|(code, _)| *code == 200)
    })
    .unwrap_or_else(|()| panic!("still {readyz:?}; log:\n{}", running.log()));
    let body = get(port, "/metrics").unwrap().1;
    assert!(
        sample(&body, "lobby_redis_reconnects_total").unwrap() >= 1.0,
        "{body}"
    );

    // The endpoints stop with the worker.
    running.signal("TERM");
    assert_eq!(running.wait_exit(Duration::from_secs(15)).code(), Some(0));
    assert!(get(port, "/healthz").is_none());
}

#[test]
fn metrics_addr_off_starts_no_listener() {
    let server = RedisServer::start();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // The flag wins over the environment.
    let mut running = Running::start_with_env(
        &server.url(),
        &["--metrics-addr", "off", "--block-timeout", "250ms"],
        &[("LOBBY_METRICS_ADDR", &addr)],
    );
    running.wait_for_log("consumer started");
    add_event(&server, "user.deleted", "u-1");
    wait_until(Duration::from_secs(15), || {
        server.cli(&["EXISTS", OFFSET_KEY]) == "1"
    })
    .unwrap();
    assert!(get(port, "/healthz").is_none());
    TcpListener::bind(("127.0.0.1", port)).expect("the port is still free");
    let log = running.log();
    assert!(!log.contains("serving /metrics"), "{log}");
    assert!(log.contains("metrics_addr=off"), "{log}");
    running.signal("TERM");
    assert_eq!(running.wait_exit(Duration::from_secs(15)).code(), Some(0));
}

#[test]
fn a_metrics_addr_that_is_taken_is_one_clear_line() {
    let server = RedisServer::start();
    let taken = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = worker(&server.url(), &["run", "--metrics-addr", &addr]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    let last = err.lines().last().unwrap();
    assert!(last.starts_with("error: "), "{err}");
    assert!(
        last.contains(&addr) && last.contains("--metrics-addr"),
        "{last}"
    );
    let output = worker(&server.url(), &["run", "--metrics-addr", "localhost"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.starts_with("error: ") && err.contains("--metrics-addr"),
        "{err}"
    );
}

#[test]
fn status_of_a_missing_stream_is_empty() {
    let server = RedisServer::start();
    let status = status_json(&server.url(), &[]);
    let expected: Value = serde_json::json!({
        "stream": STREAM,
        "length": 0,
        "first_entry_id": null,
        "last_entry_id": null,
        "offset": null,
        "lag_entries": null,
        "lag_entries_more_than": false,
        "lag_ms": null,
        "trimmed_past_offset": false,
        "offset_past_end": false,
        "dead_letter_stream": "user:lifecycle_events:dead",
        "dead_letter_length": 0,
        "lease": {
            "holder": null,
            "token": null,
            "since_ms": null,
            "remaining_ms": null,
            "last_token": 0,
            "standbys": [],
        },
    });
    assert_eq!(status, expected);
    // An offset without a stream: nothing to do, but a stream that was
    // there is gone (or this is the wrong one): flagged.
    server.cli(&["SET", OFFSET_KEY, "5-0"]);
    let status = status_json(&server.url(), &[]);
    assert_eq!(status["offset"], "5-0");
    assert_eq!(status["lag_entries"], 0);
    assert_eq!(status["lag_ms"], 0);
    assert_eq!(status["trimmed_past_offset"], false);
    assert_eq!(status["offset_past_end"], true);
}

fn add_ids(server: &RedisServer, stream: &str, ms: &[u64]) {
    for ms in ms {
        server.cli(&["XADD", stream, &format!("{ms}-0"), "f", "v"]);
    }
}

#[test]
fn status_reports_the_backlog_behind_the_offset() {
    let server = RedisServer::start();
    let url = server.url();
    let base = 1_700_000_000_000u64;
    add_ids(
        &server,
        STREAM,
        &[base, base + 1_000, base + 2_000, base + 3_000, base + 4_000],
    );
    server.cli(&["SET", OFFSET_KEY, &format!("{}-0", base + 1_000)]);
    let status = status_json(&url, &[]);
    assert_eq!(status["length"], 5);
    assert_eq!(status["first_entry_id"], format!("{base}-0"));
    assert_eq!(status["last_entry_id"], format!("{}-0", base + 4_000));
    assert_eq!(status["offset"], format!("{}-0", base + 1_000));
    assert_eq!(status["lag_entries"], 3);
    assert_eq!(status["lag_entries_more_than"], false);
    assert_eq!(status["lag_ms"], 3_000);
    assert_eq!(status["trimmed_past_offset"], false);

    // Behind every entry: the whole stream.
    server.cli(&["SET", OFFSET_KEY, "1-0"]);
    assert_eq!(status_json(&url, &[])["lag_entries"], 5);
    // Caught up.
    server.cli(&["SET", OFFSET_KEY, &format!("{}-0", base + 4_000)]);
    let status = status_json(&url, &[]);
    assert_eq!(
        (status["lag_entries"].clone(), status["lag_ms"].clone()),
        (0.into(), 0.into())
    );

    // The human form: aligned `key: value` lines.
    server.cli(&["SET", OFFSET_KEY, &format!("{}-0", base + 1_000)]);
    let output = worker(&url, &["status"]);
    assert_success(&output);
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 13, "{text}");
    let column = lines[0].find(STREAM).unwrap();
    for line in &lines {
        let (key, _) = line.split_once(':').unwrap();
        assert!(!key.contains(' '), "{line}");
        assert_eq!(
            line.char_indices()
                .find(|(i, c)| *i > key.len() && !c.is_whitespace())
                .unwrap()
                .0,
            column,
            "not aligned:\n{text}"
        );
    }
    assert!(text.contains("lag_entries:         3\n"), "{text}");
    assert!(text.contains("lag_ms:              3000\n"), "{text}");
    assert!(text.contains("trimmed_past_offset: no\n"), "{text}");
    assert!(text.contains("offset_past_end:     no\n"), "{text}");
    assert!(
        text.contains("lease_holder:        none (last token 0): no worker consumes now\n"),
        "{text}"
    );
}

#[test]
fn status_bounds_the_count_of_a_long_backlog() {
    let server = RedisServer::start();
    server.cli(&[
        "EVAL",
        "for i = 1, tonumber(ARGV[1]) do redis.call('XADD', KEYS[1], i .. '-1', 'f', 'v') end",
        "1",
        STREAM,
        "10003",
    ]);
    // The offset inside the stream: the entries after it are counted.
    server.cli(&["SET", OFFSET_KEY, "1-1"]);
    let status = status_json(&server.url(), &[]);
    assert_eq!(status["length"], 10_003);
    assert_eq!(status["lag_entries"], 10_000);
    assert_eq!(status["lag_entries_more_than"], true);
    assert_eq!(status["lag_ms"], 10_002);
    let output = worker(&server.url(), &["status"]);
    assert!(stdout(&output).contains("lag_entries:         more than 10000\n"));
    // Exactly at the bound: exact.
    server.cli(&["SET", OFFSET_KEY, "3-1"]);
    let status = status_json(&server.url(), &[]);
    assert_eq!(status["lag_entries"], 10_000);
    assert_eq!(status["lag_entries_more_than"], false);
}

#[test]
fn status_tells_when_entries_were_removed_past_the_offset() {
    let server = RedisServer::start();
    let url = server.url();
    for id in ["1-0", "2-0", "2-1", "3-0", "4-0"] {
        server.cli(&["XADD", STREAM, id, "f", "v"]);
    }
    server.cli(&["SET", OFFSET_KEY, "2-0"]);
    // Trimmed, not up to the offset: nothing lost.
    server.cli(&["XTRIM", STREAM, "MAXLEN", "4"]);
    let status = status_json(&url, &[]);
    assert_eq!(status["first_entry_id"], "2-0");
    assert_eq!(status["trimmed_past_offset"], false, "{status}");
    // Up to the entry right after the offset: nothing lost either.
    server.cli(&["XTRIM", STREAM, "MAXLEN", "3"]);
    let status = status_json(&url, &[]);
    assert_eq!(status["first_entry_id"], "2-1");
    assert_eq!(status["trimmed_past_offset"], false, "{status}");
    // Past it: 2-1 was never handled.
    server.cli(&["XTRIM", STREAM, "MAXLEN", "2"]);
    let status = status_json(&url, &[]);
    assert_eq!(status["trimmed_past_offset"], true, "{status}");
    assert_eq!(status["lag_entries"], 2);
    let output = worker(&url, &["status"]);
    assert!(
        stdout(&output).contains("trimmed_past_offset: yes"),
        "{}",
        stdout(&output)
    );
    // Trimmed to nothing.
    server.cli(&["XTRIM", STREAM, "MAXLEN", "0"]);
    let status = status_json(&url, &[]);
    assert_eq!(status["length"], 0);
    assert_eq!(status["first_entry_id"], Value::Null);
    assert_eq!(status["lag_entries"], 0);
    assert_eq!(status["trimmed_past_offset"], true, "{status}");

    // A deletion after the offset, elsewhere.
    let other = "other:events";
    add_ids(&server, other, &[1, 2, 3, 4, 5]);
    server.cli(&["SET", "lobby:stream_offsets:other", "2-0"]);
    let args = ["--stream", other, "--label", "other"];
    assert_eq!(status_json(&url, &args)["trimmed_past_offset"], false);
    server.cli(&["XDEL", other, "1-0"]);
    assert_eq!(status_json(&url, &args)["trimmed_past_offset"], false);
    server.cli(&["XDEL", other, "4-0"]);
    let status = status_json(&url, &args);
    assert_eq!(status["trimmed_past_offset"], true, "{status}");
    assert_eq!(status["lag_entries"], 2);
}

#[test]
fn status_counts_dead_letters_and_refuses_keys_of_the_wrong_type() {
    let server = RedisServer::start();
    let url = server.url();
    let dead = "user:lifecycle_events:dead";
    server.cli(&["XADD", dead, "*", "dead_letter_entry_id", "1-0"]);
    server.cli(&["XADD", dead, "*", "dead_letter_entry_id", "2-0"]);
    let status = status_json(&url, &[]);
    assert_eq!(status["dead_letter_stream"], dead);
    assert_eq!(status["dead_letter_length"], 2);
    // Another dead-letter stream, by flag.
    let status = status_json(&url, &["--dead-letter-stream", "elsewhere"]);
    assert_eq!(status["dead_letter_stream"], "elsewhere");
    assert_eq!(status["dead_letter_length"], 0);

    server.cli(&["SET", STREAM, "oops"]);
    let line = assert_one_error_line(&worker(&url, &["status"]));
    assert!(
        line.contains(STREAM) && line.contains("not a stream") && line.contains("--stream"),
        "{line}"
    );
    server.cli(&["DEL", STREAM]);
    server.cli(&["DEL", dead]);
    server.cli(&["SADD", dead, "x"]);
    let line = assert_one_error_line(&worker(&url, &["status", "--json"]));
    assert!(
        line.contains(dead) && line.contains("--dead-letter-stream"),
        "{line}"
    );
    // Unreachable Redis: the usual advice.
    let unreachable = format!("redis://127.0.0.1:{}", free_port());
    let line = assert_one_error_line(&worker(&unreachable, &["status"]));
    assert!(
        line.contains("refused") && line.contains("--redis-url"),
        "{line}"
    );
}

#[test]
fn print_config_shows_every_setting_with_the_password_redacted() {
    let output = Command::new(BIN)
        .args([
            "run",
            "--print-config",
            "--batch-size",
            "64",
            "--block-timeout",
            "250ms",
        ])
        .env("REDIS_URL", "redis://:s3cret@127.0.0.1:1")
        .env("LOBBY_METRICS_ADDR", "off")
        .output()
        .expect("run lobby-worker");
    assert_success(&output);
    let text = stdout(&output);
    assert!(
        !text.contains("s3cret") && !stderr(&output).contains("s3cret"),
        "{text}"
    );
    for line in [
        "redis_url:          redis://:***@127.0.0.1:1",
        "stream:             user:lifecycle_events",
        "batch_size:         64",
        "block_timeout:      250ms",
        "dead_letter_stream: user:lifecycle_events:dead",
        "metrics_addr:       off",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    for key in [
        "key_prefix",
        "label",
        "offset_key",
        "checkpoint",
        "start_from",
        "retry_initial",
        "retry_max",
        "dead_letter_after",
        "shutdown_timeout",
        "max_held_bytes",
        "drain",
        "concurrency",
        "log_level",
        "log_format",
    ] {
        assert!(text.contains(&format!("\n{key}:")), "no {key} in:\n{text}");
    }
    // Nothing was connected to: port 1 refuses, yet it succeeded.
    let output = Command::new(BIN)
        .args(["run", "--print-config"])
        .env("REDIS_URL", "redis://:s3cret@127.0.0.1:1")
        .env_remove("LOBBY_METRICS_ADDR")
        .output()
        .unwrap();
    assert_success(&output);
    assert!(
        stdout(&output).contains("metrics_addr:       127.0.0.1:9464\n"),
        "{}",
        stdout(&output)
    );
}
