//! Trace ids carried through: an event's `trace_id` (with its `source` and
//! `actor_type`) names every log line about its cascade and is kept in the
//! cascade record, driven through the real binary against a private
//! redis-server.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

mod common;

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{assert_success, stderr, stdout, worker};
use lifecycle_test_support::RedisServer;
use serde_json::Value;

/// Milliseconds since the Unix epoch by this machine's clock, which the
/// private redis-server shares.
fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// `lobby-worker publish` of a `user.deleted` event of `user` with `extra`
/// arguments; the entry id.
fn publish(url: &str, user: &str, extra: &[&str]) -> String {
    let mut args = vec!["publish", "--event-type", "user.deleted", "--user-id", user];
    args.extend_from_slice(extra);
    let output = worker(url, &args);
    assert_success(&output);
    stdout(&output).trim().to_owned()
}

/// The cascade record of `user` (`HGETALL`).
fn record(server: &RedisServer, user: &str) -> HashMap<String, String> {
    let mut conn = common::connect(&server.url());
    redis::cmd("HGETALL")
        .arg(format!("lobby:user:{user}:cascade"))
        .query(&mut conn)
        .unwrap()
}

#[test]
fn the_trace_id_names_the_cascades_log_lines_and_stays_in_its_record() {
    let server = RedisServer::start();
    let url = server.url();
    // A game the traced user plays in, so that the cascade has work to do.
    server.cli(&["HSET", "lobby:game:g1", "owner_id", "o", "status", "open"]);
    server.cli(&["SADD", "lobby:game:g1:members", "o", "traced"]);
    server.cli(&["SADD", "lobby:user:traced:games", "g1"]);
    let long_trace = "x".repeat(10_000);
    let traced = publish(
        &url,
        "traced",
        &[
            "--trace-id",
            "trace-4bf92f35",
            "--source",
            "accounts",
            "--actor-type",
            "admin",
        ],
    );
    let plain = publish(&url, "plain", &[]);
    let long = publish(&url, "long", &["--trace-id", &long_trace]);

    let before = now_ms();
    // The per-event lines (the store's "cascade applied", the consumer's
    // "user lifecycle event processed") are debug lines.
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
        ],
    );
    let after = now_ms();
    assert_success(&output);
    let log = stderr(&output);
    let lines: Vec<(&str, Value)> = log
        .lines()
        .map(|line| {
            (
                line,
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: not JSON: {line}")),
            )
        })
        .collect();
    // The line with `message` about entry `id`, raw and parsed.
    let line = |message: &str, id: &str| -> &(&str, Value) {
        lines
            .iter()
            .find(|(_, line)| line["message"] == message && line["stream_entry_id"] == id)
            .unwrap_or_else(|| panic!("no {message:?} line about {id} in:\n{log}"))
    };

    for message in ["cascade applied", "user lifecycle event processed"] {
        let (raw, parsed) = line(message, &traced);
        assert!(raw.contains(r#""trace_id":"trace-4bf92f35""#), "{raw}");
        let span = &parsed["span"];
        assert_eq!(span["name"], "lifecycle_event", "{raw}");
        assert_eq!(span["trace_id"], "trace-4bf92f35", "{raw}");
        assert_eq!(span["source"], "accounts", "{raw}");
        assert_eq!(span["actor_type"], "admin", "{raw}");

        // Absent fields are left out, not logged as "".
        let (raw, parsed) = line(message, &plain);
        let span = parsed["span"].as_object().unwrap();
        assert_eq!(span["name"], "lifecycle_event", "{raw}");
        for absent in ["trace_id", "source", "actor_type"] {
            assert!(!span.contains_key(absent), "{absent} in {raw}");
        }

        // A long trace id is cut in the log.
        let (raw, parsed) = line(message, &long);
        let shown = parsed["span"]["trace_id"].as_str().unwrap();
        assert_eq!(shown, format!("{}…[10000 bytes]", "x".repeat(128)), "{raw}");
    }

    // The record keeps the trace id, whole, and when it was applied.
    let traced_record = record(&server, "traced");
    assert_eq!(traced_record["trace_id"], "trace-4bf92f35");
    assert_eq!(traced_record["entry_id"], traced);
    assert_eq!(traced_record["games"], "1");
    let applied: u64 = traced_record["applied_at_ms"].parse().unwrap();
    assert!(
        (before..=after).contains(&applied),
        "applied_at_ms {applied} not within [{before}, {after}]"
    );
    let plain_record = record(&server, "plain");
    assert!(!plain_record.contains_key("trace_id"), "{plain_record:?}");
    assert!(
        plain_record.contains_key("applied_at_ms"),
        "{plain_record:?}"
    );
    assert_eq!(record(&server, "long")["trace_id"], long_trace);
    assert_eq!(server.cli(&["SMEMBERS", "lobby:game:g1:members"]), "o");
}

#[test]
fn the_engines_retry_and_dead_letter_lines_name_the_trace_too() {
    let server = RedisServer::start();
    let url = server.url();
    // A game whose member set has the wrong type: the cascade fails.
    server.cli(&["HSET", "lobby:game:g1", "owner_id", "o", "status", "open"]);
    server.cli(&["SET", "lobby:game:g1:members", "not a set"]);
    server.cli(&["SADD", "lobby:user:poisoned:games", "g1"]);
    let id = publish(&url, "poisoned", &["--trace-id", "trace-dead"]);
    let output = worker(
        &url,
        &[
            "--log-format",
            "json",
            "run",
            "--drain",
            "--dead-letter-after",
            "2",
            "--retry-initial",
            "10ms",
            "--metrics-addr",
            "off",
        ],
    );
    assert_success(&output);
    let log = stderr(&output);
    for message in [
        "handler failed; holding the offset and retrying",
        "entry dead-lettered after repeated handler failures; moving past it",
    ] {
        let line: Value = log
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|line| line["message"] == message && line["stream_entry_id"] == id)
            .unwrap_or_else(|| panic!("no {message:?} line about {id} in:\n{log}"));
        assert_eq!(line["span"]["trace_id"], "trace-dead", "{line}");
    }
}
