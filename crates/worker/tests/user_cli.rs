//! `lobby-worker user U` through the real binary against private
//! redis-servers: the cascade record after `run --drain`, the games still
//! indexed with the user's roles, dead letters naming the user, an entry
//! waiting after the offset, an unknown user, the JSON shape and the scan
//! bounds.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

mod common;

use common::{add_event, assert_success, connect, pipelined, stderr, stdout, worker, STREAM};
use lifecycle_test_support::RedisServer;
use serde_json::{json, Value};

const DEAD: &str = "user:lifecycle_events:dead";

/// `user ARGS --json`, which must succeed with one JSON object.
fn user_json(url: &str, args: &[&str]) -> Value {
    let mut all = vec!["user"];
    all.extend_from_slice(args);
    all.push("--json");
    let output = worker(url, &all);
    assert_success(&output);
    let text = stdout(&output);
    assert_eq!(text.lines().count(), 1, "{text}");
    serde_json::from_str(text.trim()).expect("one JSON object")
}

/// `user ARGS` in human form, which must succeed.
fn user_text(url: &str, args: &[&str]) -> String {
    let mut all = vec!["user"];
    all.extend_from_slice(args);
    let output = worker(url, &all);
    assert_success(&output);
    stdout(&output)
}

/// The value of the first `key:` line.
fn row<'a>(text: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}:");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key:?} row in:\n{text}"))
        .trim()
}

/// Every value of `key:` lines.
fn rows<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    let prefix = format!("{key}:");
    text.lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .map(str::trim)
        .collect()
}

fn drain(url: &str, extra: &[&str]) {
    let mut args = vec!["run", "--drain", "--metrics-addr", "off"];
    args.extend_from_slice(extra);
    let output = worker(url, &args);
    assert_success(&output);
}

/// An open game `g-open` owned by `u-owner` with `u-1` a member, and a
/// running game `g-run` owned by `u-other` with `u-1` a member and
/// `u-owner` an applicant; the index of every user on them.
fn seed_lobby(server: &RedisServer) {
    server.cli(&[
        "HSET",
        "lobby:game:g-open",
        "owner_id",
        "u-owner",
        "status",
        "open",
    ]);
    server.cli(&["SADD", "lobby:game:g-open:members", "u-owner", "u-1"]);
    server.cli(&[
        "HSET",
        "lobby:game:g-run",
        "owner_id",
        "u-other",
        "status",
        "running",
    ]);
    server.cli(&["SADD", "lobby:game:g-run:members", "u-other", "u-1"]);
    server.cli(&["SADD", "lobby:game:g-run:applicants", "u-owner"]);
    server.cli(&["SADD", "lobby:user:u-1:games", "g-open", "g-run"]);
    server.cli(&["SADD", "lobby:user:u-owner:games", "g-open", "g-run"]);
    server.cli(&["SADD", "lobby:user:u-other:games", "g-run"]);
}

#[test]
fn before_and_after_a_drained_deletion_the_record_and_the_games_tell() {
    let server = RedisServer::start();
    let url = server.url();
    seed_lobby(&server);

    // Before: no record, two games with the user's role in each.
    let before = user_json(&url, &["u-1"]);
    assert_eq!(before["cascade"], Value::Null);
    assert_eq!(before["games"]["count"], 2);
    assert_eq!(before["games"]["more"], false);
    assert_eq!(
        before["games"]["shown"],
        json!([
            {"game_id": "g-open", "exists": true, "status": "open", "roles": ["member"], "error": null},
            {"game_id": "g-run", "exists": true, "status": "running", "roles": ["member"], "error": null},
        ])
    );
    let owner = user_json(&url, &["u-owner"]);
    assert_eq!(
        owner["games"]["shown"][0]["roles"],
        json!(["owner", "member"])
    );
    assert_eq!(owner["games"]["shown"][1]["roles"], json!(["applicant"]));

    let id = add_event(&server, "user.deleted", "u-1", "1700000000000");
    // Before the drain the deletion waits after (no) offset.
    let waiting = user_json(&url, &["u-1"]);
    assert_eq!(waiting["waiting"]["offset"], Value::Null);
    assert_eq!(waiting["waiting"]["entry_id"], id.as_str());
    assert_eq!(waiting["waiting"]["event_type"], "user.deleted");

    drain(&url, &[]);
    let after = user_json(&url, &["u-1"]);
    assert_eq!(
        after["cascade"],
        json!({
            "event_type": "user.deleted",
            "entry_id": id,
            "occurred_at_ms": "1700000000000",
            "games": "2",
            "trace_id": after["cascade"]["trace_id"],
            "applied_at_ms": after["cascade"]["applied_at_ms"],
            "other_fields": after["cascade"]["other_fields"],
        })
    );
    assert_eq!(after["cascade_key"], "lobby:user:u-1:cascade");
    assert_eq!(after["games"]["count"], 0, "the cascade empties the index");
    assert_eq!(after["games"]["shown"], json!([]));
    assert_eq!(after["waiting"]["offset"], id.as_str());
    assert_eq!(after["waiting"]["entry_id"], Value::Null);
    assert_eq!(after["waiting"]["looked_at"], 0);
    assert_eq!(after["dead_letters"]["count"], 0);

    // Every field the record holds is shown, the newer ones when present.
    server.cli(&[
        "HSET",
        "lobby:user:u-1:cascade",
        "trace_id",
        "t-9",
        "applied_at_ms",
        "1700000000123",
        "note",
        "line\nforged: yes",
    ]);
    let after = user_json(&url, &["u-1"]);
    assert_eq!(after["cascade"]["trace_id"], "t-9");
    assert_eq!(after["cascade"]["applied_at_ms"], "1700000000123");
    assert_eq!(
        after["cascade"]["other_fields"],
        json!({"note": "line\nforged: yes"})
    );
    let text = user_text(&url, &["u-1"]);
    assert_eq!(row(&text, "user"), "u-1");
    assert_eq!(row(&text, "cascade"), "applied (lobby:user:u-1:cascade)");
    assert_eq!(row(&text, "cascade.event_type"), "user.deleted");
    assert_eq!(row(&text, "cascade.entry_id"), id);
    assert_eq!(
        row(&text, "cascade.occurred_at_ms"),
        "1700000000000 (2023-11-14T22:13:20.000Z)"
    );
    assert_eq!(row(&text, "cascade.games"), "2");
    assert_eq!(row(&text, "cascade.trace_id"), "t-9");
    assert_eq!(
        row(&text, "cascade.applied_at_ms"),
        "1700000000123 (2023-11-14T22:13:20.123Z)"
    );
    assert_eq!(row(&text, "cascade.note"), "line\\nforged: yes");
    assert!(!text.contains("\nforged"), "a value forged a line:\n{text}");
    assert!(row(&text, "games_indexed").starts_with("0 "), "{text}");
    assert!(
        row(&text, "waiting").starts_with("none among the next 0 entries"),
        "{text}"
    );

    // The owner keeps the open game (a member left it) and is still an
    // applicant of the running one.
    let owner = user_json(&url, &["u-owner"]);
    assert_eq!(owner["cascade"], Value::Null);
    assert_eq!(owner["games"]["shown"][0]["status"], "open");
    assert_eq!(
        owner["games"]["shown"][0]["roles"],
        json!(["owner", "member"])
    );
    let other = user_text(&url, &["u-other"]);
    assert_eq!(
        rows(&other, "game"),
        ["g-run status=running roles=owner,member"]
    );
}

#[test]
fn a_dead_lettered_deletion_is_listed_with_its_error() {
    let server = RedisServer::start();
    let url = server.url();
    // The poison: the open game's member set is a string, so the cascade
    // fails with WRONGTYPE every time and is dead-lettered at once.
    server.cli(&["SADD", "lobby:user:u-poison:games", "g-poison"]);
    server.cli(&[
        "HSET",
        "lobby:game:g-poison",
        "owner_id",
        "o-poison",
        "status",
        "open",
    ]);
    server.cli(&["SET", "lobby:game:g-poison:members", "not a set"]);
    let poison = add_event(&server, "user.deleted", "u-poison", "1700000000000");
    add_event(&server, "user.deleted", "u-fine", "1700000000001");
    drain(
        &url,
        &["--dead-letter-after", "1", "--retry-initial", "10ms"],
    );
    assert_eq!(server.cli(&["XLEN", DEAD]), "1");
    // A dead letter written as the engine writes them, for another user.
    server.cli(&[
        "XADD",
        DEAD,
        "*",
        "event_type",
        "user.deleted",
        "user_id",
        "u-else",
        "occurred_at_ms",
        "1700000000002",
        "dead_letter_entry_id",
        "1-1",
        "dead_letter_stream",
        STREAM,
        "dead_letter_error",
        "boom",
        "dead_letter_attempts",
        "3",
    ]);

    let report = user_json(&url, &["u-poison"]);
    assert_eq!(report["cascade"], Value::Null, "nothing applied");
    let dead = &report["dead_letters"];
    assert_eq!(dead["stream"], DEAD);
    assert_eq!(dead["looked_at"], 2);
    assert_eq!(dead["limit_reached"], false);
    assert_eq!(dead["count"], 1);
    let letter = &dead["shown"][0];
    assert_eq!(letter["entry_id"], poison.as_str());
    assert_eq!(letter["source_stream"], STREAM);
    assert_eq!(letter["event_type"], "user.deleted");
    assert_eq!(letter["occurred_at_ms"], "1700000000000");
    assert_eq!(letter["attempts"], "1");
    assert!(
        letter["error"].as_str().unwrap().contains("WRONGTYPE"),
        "{letter}"
    );
    let copy = server.cli(&["XRANGE", DEAD, "-", "+", "COUNT", "1"]);
    assert!(
        copy.starts_with(letter["id"].as_str().unwrap()),
        "{copy} vs {letter}"
    );
    // The game is still indexed; its unreadable member set is named, not
    // fatal.
    assert_eq!(report["games"]["count"], 1);
    let game = &report["games"]["shown"][0];
    assert_eq!(game["status"], "open");
    assert!(
        game["error"]
            .as_str()
            .unwrap()
            .contains("lobby:game:g-poison:members"),
        "{game}"
    );

    let text = user_text(&url, &["u-poison"]);
    assert!(
        row(&text, "dead_letters").starts_with(&format!(
            "1 among the newest 2 entries, all there are ({DEAD})"
        )),
        "{text}"
    );
    let lines = rows(&text, "dead_letter");
    assert_eq!(lines.len(), 1, "{text}");
    assert!(
        lines[0].contains(&format!(
            "entry={poison} event_type=user.deleted attempts=1 error="
        )),
        "{text}"
    );
    assert_eq!(row(&text, "cascade"), "no cascade applied");

    let other = user_json(&url, &["u-else"]);
    assert_eq!(other["dead_letters"]["count"], 1);
    assert_eq!(other["dead_letters"]["shown"][0]["error"], "boom");
    assert_eq!(other["dead_letters"]["shown"][0]["attempts"], "3");
    let fine = user_json(&url, &["u-fine"]);
    assert_eq!(fine["dead_letters"]["count"], 0);
    assert_eq!(fine["cascade"]["event_type"], "user.deleted");
}

#[test]
fn an_entry_published_after_the_drain_is_reported_waiting() {
    let server = RedisServer::start();
    let url = server.url();
    add_event(&server, "user.deleted", "u-early", "1700000000000");
    drain(&url, &[]);
    let offset = server.cli(&["GET", "lobby:stream_offsets:user_lifecycle"]);
    add_event(&server, "user.deleted", "u-someone", "1700000000001");
    let late = add_event(
        &server,
        "user.permanently_blocked",
        " u-late ",
        "1700000000002",
    );
    add_event(&server, "user.deleted", "u-late", "1700000000003");

    let report = user_json(&url, &["u-late"]);
    assert_eq!(
        report["waiting"],
        json!({
            "stream": STREAM,
            "label": "user_lifecycle",
            "offset": offset,
            "looked_at": 2,
            "limit_reached": false,
            "entry_id": late,
            "event_type": "user.permanently_blocked",
        })
    );
    let text = user_text(&url, &["u-late"]);
    assert_eq!(
        row(&text, "waiting"),
        format!("{late} user.permanently_blocked ({STREAM})")
    );
    assert_eq!(
        row(&text, "offset"),
        format!("{offset} (label \"user_lifecycle\")")
    );
    // The user already handled has nothing waiting among the three after
    // the offset.
    let early = user_json(&url, &["u-early"]);
    assert_eq!(early["waiting"]["entry_id"], Value::Null);
    assert_eq!(early["waiting"]["looked_at"], 3);
    let text = user_text(&url, &["u-early"]);
    assert_eq!(
        row(&text, "waiting"),
        format!("none among the next 3 entries, all there are ({STREAM})")
    );
    // Another label has no offset: the stream is looked at from its start.
    let other = user_json(&url, &["u-early", "--label", "elsewhere"]);
    assert_eq!(other["waiting"]["offset"], Value::Null);
    assert_eq!(other["waiting"]["label"], "elsewhere");
    assert_eq!(other["waiting"]["looked_at"], 1);
}

#[test]
fn an_unknown_user_is_an_answer_with_everything_empty() {
    let server = RedisServer::start();
    let url = server.url();
    let report = user_json(&url, &["nobody"]);
    assert_eq!(
        report,
        json!({
            "user_id": "nobody",
            "cascade_key": "lobby:user:nobody:cascade",
            "cascade": null,
            "games": {"key": "lobby:user:nobody:games", "count": 0, "shown": [], "more": false},
            "dead_letters": {
                "stream": DEAD,
                "looked_at": 0,
                "limit_reached": false,
                "count": 0,
                "shown": [],
            },
            "waiting": {
                "stream": STREAM,
                "label": "user_lifecycle",
                "offset": null,
                "looked_at": 0,
                "limit_reached": false,
                "entry_id": null,
                "event_type": null,
            },
        })
    );
    let text = user_text(&url, &["nobody"]);
    assert_eq!(row(&text, "cascade"), "no cascade applied");
    assert_eq!(row(&text, "games_indexed"), "0 (lobby:user:nobody:games)");
    assert!(rows(&text, "game").is_empty());
    assert!(rows(&text, "dead_letter").is_empty());
    // The keys follow --key-prefix, --stream and --dead-letter-stream.
    let report = user_json(
        &url,
        &[
            " nobody ",
            "--key-prefix",
            "lob",
            "--stream",
            "s",
            "--dead-letter-stream",
            "s:graveyard",
        ],
    );
    assert_eq!(
        report["user_id"], "nobody",
        "trimmed as the worker reads it"
    );
    assert_eq!(report["cascade_key"], "lob:user:nobody:cascade");
    assert_eq!(report["games"]["key"], "lob:user:nobody:games");
    assert_eq!(report["dead_letters"]["stream"], "s:graveyard");
    assert_eq!(report["waiting"]["stream"], "s");
}

#[test]
fn a_blank_or_missing_user_id_is_an_input_error() {
    let server = RedisServer::start();
    let url = server.url();
    for args in [vec!["user", ""], vec!["user", "   "], vec!["user"]] {
        let output = worker(&url, &args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(stdout(&output).is_empty());
        let err = stderr(&output);
        assert!(err.starts_with("error: "), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        if args.len() == 2 {
            assert!(err.contains("must not be empty or blank"), "{err}");
        }
    }
}

#[test]
fn a_key_of_the_wrong_type_is_a_runtime_failure_naming_it() {
    let server = RedisServer::start();
    let url = server.url();
    server.cli(&["SET", "lobby:user:u-1:games", "not a set"]);
    let output = worker(&url, &["user", "u-1"]);
    assert_eq!(output.status.code(), Some(1));
    let line = common::assert_one_error_line(&output);
    assert!(line.contains("lobby:user:u-1:games"), "{line}");
    assert!(line.contains("--key-prefix"), "{line}");
}

#[test]
fn scans_stop_at_their_bound_and_say_so() {
    let server = RedisServer::start();
    let url = server.url();
    let mut conn = connect(&url);
    add_event(&server, "user.deleted", "u-first", "1700000000000");
    drain(&url, &[]);
    // 10,001 entries after the offset and 10,001 dead letters, none of
    // them the user's but the oldest.
    let entries = (0..10_001).map(|i| {
        let mut xadd = redis::cmd("XADD");
        let user = if i == 0 {
            "u-1".to_owned()
        } else {
            format!("x-{i}")
        };
        xadd.arg(STREAM)
            .arg("*")
            .arg("event_type")
            .arg("user.deleted")
            .arg("user_id")
            .arg(&user)
            .arg("occurred_at_ms")
            .arg(1_700_000_000_000_u64);
        let mut dead = redis::cmd("XADD");
        dead.arg("graveyard")
            .arg("*")
            .arg("user_id")
            .arg(&user)
            .arg("dead_letter_error")
            .arg("boom");
        [xadd, dead]
    });
    let _: Vec<String> = pipelined(&mut conn, entries.flatten());

    let report = user_json(&url, &["u-2", "--dead-letter-stream", "graveyard"]);
    assert_eq!(report["waiting"]["looked_at"], 10_000);
    assert_eq!(report["waiting"]["limit_reached"], true);
    assert_eq!(report["waiting"]["entry_id"], Value::Null);
    assert_eq!(report["dead_letters"]["looked_at"], 10_000);
    assert_eq!(report["dead_letters"]["limit_reached"], true);
    let text = user_text(&url, &["u-2", "--dead-letter-stream", "graveyard"]);
    assert_eq!(
        row(&text, "waiting"),
        format!(
            "none among the next 10000 entries, the most looked at; more not looked at ({STREAM})"
        )
    );
    assert_eq!(
        row(&text, "dead_letters"),
        "0 among the newest 10000 entries, the most looked at; more not looked at (graveyard)"
    );
    // The user's entry is the first after the offset: found at once. Their
    // dead letter is the oldest, past the bound: not found.
    let report = user_json(&url, &["u-1", "--dead-letter-stream", "graveyard"]);
    assert_eq!(report["waiting"]["looked_at"], 1);
    assert_eq!(report["waiting"]["event_type"], "user.deleted");
    assert_eq!(report["dead_letters"]["count"], 0);
    assert_eq!(report["dead_letters"]["limit_reached"], true);
}

#[test]
fn a_large_index_shows_a_bounded_number_of_games() {
    let server = RedisServer::start();
    let url = server.url();
    let mut conn = connect(&url);
    let adds = (0..500).map(|i| {
        let mut sadd = redis::cmd("SADD");
        sadd.arg("lobby:user:u-many:games").arg(format!("g-{i:03}"));
        sadd
    });
    let _: Vec<i64> = pipelined(&mut conn, adds);
    let report = user_json(&url, &["u-many"]);
    assert_eq!(report["games"]["count"], 500);
    assert_eq!(report["games"]["more"], true);
    let shown = report["games"]["shown"].as_array().unwrap();
    assert_eq!(shown.len(), 20);
    assert!(shown.iter().all(|game| game["exists"] == false
        && game["status"].is_null()
        && game["roles"] == json!([])));
    let text = user_text(&url, &["u-many"]);
    assert_eq!(
        row(&text, "games_indexed"),
        "500 (lobby:user:u-many:games; 20 shown)"
    );
    assert_eq!(rows(&text, "game").len(), 20);
    assert!(
        rows(&text, "game")[0].ends_with("status=(no such game) roles=no role"),
        "{text}"
    );
}
