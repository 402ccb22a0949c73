#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]
//! `lobby-worker dead-letters list|show|redrive|purge` through the real
//! binary, against private Redis servers.
//!
//! The poison entry is a user with a game whose member set is a string: the
//! cascade script fails with WRONGTYPE (changing nothing), and with
//! `run --drain --dead-letter-after 1` the entry is dead-lettered at its
//! first failure. Deleting that key repairs it.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use lifecycle_domain::EntryId;
use lifecycle_streams::dead_letter::{marker_field, marker_key};
use lifecycle_test_support::RedisServer;
use serde_json::Value;

mod common;

use common::{
    assert_one_error_line, assert_success, connect, deletion, stderr, stdout, wait_for, worker,
    Running, BIN, STREAM,
};

const DEAD: &str = "user:lifecycle_events:dead";

/// Seeds user `user`: an open game it owns (`<user>-open`, with member
/// `<user>-friend`), a running game it plays in (`<user>-run`), and, when
/// `poisoned`, a game whose member set is a string (`<user>-poison`).
fn seed_user(conn: &mut redis::Connection, user: &str, poisoned: bool) {
    let mut pipe = redis::pipe();
    let games = format!("lobby:user:{user}:games");
    pipe.cmd("SADD")
        .arg(&games)
        .arg(format!("{user}-open"))
        .arg(format!("{user}-run"))
        .cmd("HSET")
        .arg(format!("lobby:game:{user}-open"))
        .arg("owner_id")
        .arg(user)
        .arg("status")
        .arg("open")
        .cmd("SADD")
        .arg(format!("lobby:game:{user}-open:members"))
        .arg(user)
        .arg(format!("{user}-friend"))
        .cmd("HSET")
        .arg(format!("lobby:game:{user}-run"))
        .arg("owner_id")
        .arg("someone-else")
        .arg("status")
        .arg("running")
        .cmd("SADD")
        .arg(format!("lobby:game:{user}-run:members"))
        .arg(user)
        .arg("someone-else");
    if poisoned {
        pipe.cmd("SADD")
            .arg(&games)
            .arg(format!("{user}-poison"))
            .cmd("HSET")
            .arg(format!("lobby:game:{user}-poison"))
            .arg("owner_id")
            .arg("someone-else")
            .arg("status")
            .arg("open")
            .cmd("SET")
            .arg(poison_key(user))
            .arg("not a set");
    }
    pipe.exec(conn).unwrap();
}

/// The wrong-typed key of a poisoned user.
fn poison_key(user: &str) -> String {
    format!("lobby:game:{user}-poison:members")
}

/// Publishes a `user.deleted` of `user` (with a trace id) and returns its id.
fn publish_deletion(conn: &mut redis::Connection, user: &str) -> String {
    let mut xadd = deletion(user, 1_700_000_000_000);
    xadd.arg("trace_id").arg(format!("t-{user}"));
    xadd.query(conn).unwrap()
}

/// `run --drain --dead-letter-after 1`, which must succeed.
fn drain_dead_lettering(url: &str) {
    let output = worker(
        url,
        &[
            "run",
            "--drain",
            "--dead-letter-after",
            "1",
            "--metrics-addr",
            "off",
        ],
    );
    assert_success(&output);
}

/// The dead-letter stream's entries: id and fields, in order.
fn dead_letters(conn: &mut redis::Connection) -> Vec<(String, Vec<(String, String)>)> {
    let reply: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(DEAD)
        .arg("-")
        .arg("+")
        .query(conn)
        .unwrap();
    reply
        .into_iter()
        .map(|(id, flat)| {
            let fields = flat
                .chunks_exact(2)
                .map(|pair| (pair[0].clone(), pair[1].clone()))
                .collect();
            (id, fields)
        })
        .collect()
}

/// The last value of `name` among `fields`.
fn field<'a>(fields: &'a [(String, String)], name: &str) -> &'a str {
    fields
        .iter()
        .rev()
        .find(|(field, _)| field == name)
        .map(|(_, value)| value.as_str())
        .unwrap_or_else(|| panic!("no {name} in {fields:?}"))
}

/// The marker of original entry `entry`: the dead letter it names.
fn marker(conn: &mut redis::Connection, entry: &str) -> Option<String> {
    let entry = EntryId::from_bytes(entry.as_bytes()).unwrap();
    redis::cmd("HGET")
        .arg(marker_key(DEAD))
        .arg(marker_field(STREAM, entry))
        .query(conn)
        .unwrap()
}

fn hash(conn: &mut redis::Connection, key: &str) -> HashMap<String, String> {
    redis::cmd("HGETALL").arg(key).query(conn).unwrap()
}

fn members(conn: &mut redis::Connection, key: &str) -> Vec<String> {
    let mut members: Vec<String> = redis::cmd("SMEMBERS").arg(key).query(conn).unwrap();
    members.sort();
    members
}

/// Parses each line of `text` as a JSON object.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line:?}")))
        .collect()
}

/// One poisoned user's deletion, dead-lettered: returns the server, the
/// original entry's id and the dead letter's id.
fn one_dead_letter() -> (RedisServer, String, String) {
    let server = RedisServer::start();
    let mut conn = connect(&server.url());
    seed_user(&mut conn, "u-poison", true);
    let entry = publish_deletion(&mut conn, "u-poison");
    drain_dead_lettering(&server.url());
    let letters = dead_letters(&mut conn);
    assert_eq!(letters.len(), 1, "{letters:?}");
    let id = letters[0].0.clone();
    (server, entry, id)
}

#[test]
fn a_dead_letter_is_listed_and_shown_in_text_and_json() {
    let (server, entry, id) = one_dead_letter();
    let url = server.url();
    let mut conn = connect(&url);
    let fields = dead_letters(&mut conn)[0].1.clone();
    let ms = id.split('-').next().unwrap().to_owned();

    let output = worker(&url, &["dead-letters", "list"]);
    assert_success(&output);
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let line = lines[0];
    assert!(line.starts_with(&format!("{id} entry={entry} ")), "{line}");
    for part in [
        "user=\"u-poison\"",
        "type=\"user.deleted\"",
        "attempts=1",
        " at=20",
        "error=\"",
        "WRONGTYPE",
        "u-poison-poison:members",
    ] {
        assert!(line.contains(part), "no {part:?} in {line}");
    }

    let output = worker(&url, &["dead-letters", "list", "--json"]);
    assert_success(&output);
    let objects = json_lines(&stdout(&output));
    assert_eq!(objects.len(), 1);
    let object = &objects[0];
    assert_eq!(object["id"], id.as_str());
    assert_eq!(object["entry_id"], entry.as_str());
    assert_eq!(object["stream"], STREAM);
    assert_eq!(object["user_id"], "u-poison");
    assert_eq!(object["event_type"], "user.deleted");
    assert_eq!(object["attempts"], 1);
    assert_eq!(object["dead_lettered_at_ms"].to_string(), ms);
    assert!(
        object["error"].as_str().unwrap().contains("WRONGTYPE"),
        "{object}"
    );

    // `--count` and `--from`: a second dead letter, listed from its id.
    let mut second = deletion("u-other", 1_700_000_000_000);
    second.arg("trace_id").arg("line one\nline two\u{1b}[31m");
    let _: String = second.query(&mut conn).unwrap();
    seed_user(&mut conn, "u-other", true);
    drain_dead_lettering(&url);
    let letters = dead_letters(&mut conn);
    assert_eq!(letters.len(), 2);
    let output = worker(&url, &["dead-letters", "list", "--count", "1"]);
    assert_success(&output);
    assert_eq!(stdout(&output).lines().count(), 1);
    assert!(stdout(&output).starts_with(&id));
    let output = worker(&url, &["dead-letters", "list", "--from", &letters[1].0]);
    assert_success(&output);
    assert_eq!(stdout(&output).lines().count(), 1);
    assert!(stdout(&output).starts_with(&letters[1].0));

    let output = worker(&url, &["dead-letters", "show", &id]);
    assert_success(&output);
    let text = stdout(&output);
    assert!(text.starts_with("id:"), "{text}");
    assert!(text.contains(&id) && text.contains("dead_lettered_at:"));
    for (name, value) in &fields {
        let line = text
            .lines()
            .find(|line| line.starts_with(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in {text}"));
        assert!(line.ends_with(value.as_str()), "{line} vs {value}");
    }
    // A value with control characters is escaped: it cannot forge a line.
    let output = worker(&url, &["dead-letters", "show", &letters[1].0]);
    assert_success(&output);
    let text = stdout(&output);
    assert!(text.contains(r"line one\nline two\u{1b}[31m"), "{text}");
    assert!(!text.contains('\u{1b}'));

    let output = worker(&url, &["dead-letters", "show", &id, "--json"]);
    assert_success(&output);
    let objects = json_lines(&stdout(&output));
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0]["id"], id.as_str());
    assert_eq!(objects[0]["entry_id"], entry.as_str());
    let shown: Vec<(String, String)> = objects[0]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| {
            (
                pair[0].as_str().unwrap().to_owned(),
                pair[1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(shown, fields, "every field, in order");

    let output = worker(&url, &["dead-letters", "show", "1-1"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let line = assert_one_error_line(&output);
    assert!(line.contains("no dead letter 1-1"), "{line}");
    let output = worker(&url, &["dead-letters", "show", "not-an-id"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
}

#[test]
fn a_failing_redrive_keeps_the_dead_letter_and_a_repaired_one_applies_it() {
    let (server, entry, id) = one_dead_letter();
    let url = server.url();
    let mut conn = connect(&url);
    let first = dead_letters(&mut conn)[0].1.clone();
    assert_eq!(marker(&mut conn, &entry).as_deref(), Some(id.as_str()));

    // A repair that breaks another key: the redrive fails with a new error.
    let _: () = redis::cmd("DEL")
        .arg(poison_key("u-poison"))
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("lobby:game:u-poison-open:applicants")
        .arg("not a set either")
        .query(&mut conn)
        .unwrap();
    let output = worker(&url, &["dead-letters", "redrive", "--all"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let line = assert_one_error_line(&output);
    assert!(line.contains("1 dead letter(s) not redriven"), "{line}");
    assert!(stdout(&output).contains("failed:"), "{}", stdout(&output));
    let letters = dead_letters(&mut conn);
    assert_eq!(letters.len(), 1, "{letters:?}");
    let (replacement, fields) = &letters[0];
    assert_ne!(replacement, &id, "the failed dead letter was replaced");
    assert_eq!(field(fields, "dead_letter_entry_id"), entry);
    assert_eq!(field(fields, "dead_letter_stream"), STREAM);
    assert_eq!(field(fields, "dead_letter_attempts"), "2");
    let error = field(fields, "dead_letter_error");
    assert!(
        error.contains("u-poison-open:applicants") && !error.contains("poison:members"),
        "the error is the new one: {error}"
    );
    assert_eq!(
        fields[..fields.len() - 4],
        first[..first.len() - 4],
        "the entry's own fields are kept"
    );
    assert_eq!(
        marker(&mut conn, &entry).as_ref(),
        Some(replacement),
        "the marker follows the replacement"
    );
    assert!(
        hash(&mut conn, "lobby:user:u-poison:cascade").is_empty(),
        "nothing was applied"
    );

    // The dry run says what would happen and changes nothing.
    let _: () = redis::cmd("DEL")
        .arg("lobby:game:u-poison-open:applicants")
        .query(&mut conn)
        .unwrap();
    let output = worker(&url, &["dead-letters", "redrive", "--all", "--dry-run"]);
    assert_success(&output);
    assert!(
        stdout(&output).contains("would apply"),
        "{}",
        stdout(&output)
    );
    assert_eq!(dead_letters(&mut conn), letters);

    // Repaired: the redrive applies it and empties the dead-letter stream.
    let output = worker(&url, &["dead-letters", "redrive", "--all", "--json"]);
    assert_success(&output);
    let results = json_lines(&stdout(&output));
    assert_eq!(results.len(), 1, "{}", stdout(&output));
    assert_eq!(results[0]["outcome"], "applied");
    assert_eq!(results[0]["games"], 3);
    assert_eq!(results[0]["entry_id"], entry.as_str());
    assert!(dead_letters(&mut conn).is_empty());
    assert_eq!(marker(&mut conn, &entry), None, "the marker went with it");
    let record = hash(&mut conn, "lobby:user:u-poison:cascade");
    assert_eq!(record["entry_id"], entry);
    assert_eq!(record["event_type"], "user.deleted");
    let open = hash(&mut conn, "lobby:game:u-poison-open");
    assert_eq!(open["status"], "cancelled");
    assert_eq!(open["cancel_reason"], "user.deleted");
    assert_eq!(
        members(&mut conn, "lobby:game:u-poison-open:members"),
        ["u-poison-friend"]
    );
    assert_eq!(
        members(&mut conn, "lobby:game:u-poison-run:members"),
        ["someone-else"]
    );
    assert_eq!(
        members(&mut conn, "lobby:game:u-poison-run:dropped"),
        ["u-poison"]
    );
    let games: i64 = redis::cmd("EXISTS")
        .arg("lobby:user:u-poison:games")
        .query(&mut conn)
        .unwrap();
    assert_eq!(games, 0);

    // Nothing left: a second redrive has nothing to do.
    let output = worker(&url, &["dead-letters", "redrive", "--all"]);
    assert_success(&output);
    let output = worker(&url, &["dead-letters", "redrive", "--id", &id]);
    assert_eq!(output.status.code(), Some(1));
    assert!(assert_one_error_line(&output).contains("no dead letter"));
}

#[test]
fn what_a_redrive_cannot_apply_is_reported_and_left() {
    let server = RedisServer::start();
    let url = server.url();
    let mut conn = connect(&url);
    let copy = |conn: &mut redis::Connection, own: &[(&str, &str)], entry: &str, stream: &str| {
        let mut xadd = redis::cmd("XADD");
        xadd.arg(DEAD).arg("*");
        for (name, value) in own {
            xadd.arg(*name).arg(*value);
        }
        xadd.arg("dead_letter_entry_id")
            .arg(entry)
            .arg("dead_letter_stream")
            .arg(stream)
            .arg("dead_letter_error")
            .arg("boom")
            .arg("dead_letter_attempts")
            .arg(3);
        let id: String = xadd.query(conn).unwrap();
        id
    };
    let malformed = copy(&mut conn, &[("event_type", "user.deleted")], "5-0", STREAM);
    let unknown = copy(
        &mut conn,
        &[
            ("event_type", "user.renamed"),
            ("user_id", "u"),
            ("occurred_at_ms", "1"),
        ],
        "6-0",
        STREAM,
    );
    let other = copy(
        &mut conn,
        &[
            ("event_type", "user.deleted"),
            ("user_id", "u"),
            ("occurred_at_ms", "1"),
        ],
        "7-0",
        "another:stream",
    );
    let before = dead_letters(&mut conn);

    let output = worker(&url, &["dead-letters", "redrive", "--all", "--json"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(assert_one_error_line(&output).contains("2 dead letter(s) not redriven"));
    let results = json_lines(&stdout(&output));
    let outcome = |id: &str| {
        results
            .iter()
            .find(|result| result["id"] == id)
            .map(|result| result["outcome"].as_str().unwrap().to_owned())
    };
    assert_eq!(outcome(&malformed).as_deref(), Some("cannot_redrive"));
    assert_eq!(outcome(&unknown).as_deref(), Some("cannot_redrive"));
    assert_eq!(outcome(&other).as_deref(), Some("other_stream"));
    assert_eq!(dead_letters(&mut conn), before, "all left as they were");
    assert!(hash(&mut conn, "lobby:user:u:cascade").is_empty());

    let output = worker(&url, &["dead-letters", "redrive", "--id", &other]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(assert_one_error_line(&output).contains("another:stream"));
}

#[test]
fn a_redrive_racing_a_running_worker_applies_each_users_newest_entry_once() {
    const USERS: usize = 200;
    let server = RedisServer::start();
    let url = server.url();
    let mut conn = connect(&url);
    let users: Vec<String> = (0..USERS).map(|i| format!("u-{i}")).collect();
    let mut entries = HashMap::new();
    for user in &users {
        seed_user(&mut conn, user, true);
        entries.insert(user.clone(), publish_deletion(&mut conn, user));
    }
    drain_dead_lettering(&url);
    assert_eq!(dead_letters(&mut conn).len(), USERS);
    for user in &users {
        let _: () = redis::cmd("DEL")
            .arg(poison_key(user))
            .query(&mut conn)
            .unwrap();
    }

    let mut running = Running::start(&url, &["--metrics-addr", "off"]);
    running.wait_for_log("lobby-worker starting");
    // The redrive, and meanwhile each user's later event.
    let redrive = Command::new(BIN)
        .args(["dead-letters", "redrive", "--all", "--json"])
        .env("REDIS_URL", &url)
        .env_remove("LOBBY_STREAM")
        .env_remove("LOBBY_KEY_PREFIX")
        .env_remove("LOBBY_DEAD_LETTER_STREAM")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the redrive is under way (it goes oldest entry first, u-0 on),
    // the later events come newest user first, so that the two meet.
    wait_for(Duration::from_secs(30), "the redrive started", || {
        let length: usize = redis::cmd("XLEN").arg(DEAD).query(&mut conn).unwrap();
        length < USERS
    });
    let mut later = HashMap::new();
    for user in users.iter().rev() {
        let mut xadd = redis::cmd("XADD");
        xadd.arg(STREAM)
            .arg("*")
            .arg("event_type")
            .arg("user.permanently_blocked")
            .arg("user_id")
            .arg(user)
            .arg("occurred_at_ms")
            .arg(1_700_000_000_001_u64);
        let id: String = xadd.query(&mut conn).unwrap();
        later.insert(user.clone(), id);
    }
    let output = redrive.wait_with_output().unwrap();
    assert_success(&output);
    wait_for(
        Duration::from_secs(30),
        "the worker applied every later event",
        || {
            users.iter().all(|user| {
                hash(&mut conn, &format!("lobby:user:{user}:cascade"))
                    .get("entry_id")
                    .is_some_and(|id| id == &later[user])
            })
        },
    );
    running.assert_alive();

    let results = json_lines(&stdout(&output));
    assert_eq!(results.len(), USERS, "{}", stdout(&output));
    let (mut applied, mut superseded) = (0, 0);
    for result in &results {
        let user = result["user_id"].as_str().unwrap();
        assert_eq!(result["entry_id"], entries[user].as_str());
        let record = hash(&mut conn, &format!("lobby:user:{user}:cascade"));
        let open = hash(&mut conn, &format!("lobby:game:{user}-open"));
        assert_eq!(
            record["entry_id"], later[user],
            "the newest entry is recorded"
        );
        assert_eq!(record["event_type"], "user.permanently_blocked");
        assert_eq!(open["status"], "cancelled");
        // Exactly one cascade reached the games: the redriven one (and the
        // later event then found no games) or the later one (and the
        // redrive changed nothing).
        match result["outcome"].as_str().unwrap() {
            "applied" => {
                applied += 1;
                assert_eq!(result["games"], 3);
                assert_eq!(open["cancel_reason"], "user.deleted", "{user}");
                assert_eq!(record["games"], "0", "{user}");
            }
            "superseded" => {
                superseded += 1;
                assert_eq!(result["recorded"], later[user].as_str());
                assert_eq!(open["cancel_reason"], "user.permanently_blocked", "{user}");
                assert_eq!(record["games"], "3", "{user}");
            }
            other => panic!("{user}: {other}"),
        }
        assert_eq!(
            members(&mut conn, &format!("lobby:game:{user}-open:members")),
            [format!("{user}-friend")]
        );
        assert_eq!(
            members(&mut conn, &format!("lobby:game:{user}-run:dropped")),
            [user.to_owned()]
        );
    }
    println!("[redrive race] {applied} redriven first, {superseded} superseded by the worker");
    assert!(applied > 0, "the redrive had begun before the later events");
    assert!(dead_letters(&mut conn).is_empty());
    assert_eq!(running.count("handler failed"), 0, "{}", running.log());
    running.terminate();
}

#[test]
fn purge_removes_only_the_old_ones_and_asks_for_yes_before_removing_several() {
    let server = RedisServer::start();
    let url = server.url();
    let mut conn = connect(&url);
    let (now_s, _): (u64, u64) = redis::cmd("TIME").query(&mut conn).unwrap();
    let day_ago = format!("{}-0", (now_s - 86_400) * 1000);
    // Dead letters with explicit ids (two ancient, one a day old), then one
    // written now; each with its marker, as the worker writes them.
    let ids: Vec<String> = ["1000-0", "2000-0", day_ago.as_str(), "*"]
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let entry = format!("{}-0", i + 1);
            let id: String = redis::cmd("XADD")
                .arg(DEAD)
                .arg(*id)
                .arg("event_type")
                .arg("user.deleted")
                .arg("user_id")
                .arg(format!("u-{i}"))
                .arg("occurred_at_ms")
                .arg(1)
                .arg("dead_letter_entry_id")
                .arg(&entry)
                .arg("dead_letter_stream")
                .arg(STREAM)
                .arg("dead_letter_error")
                .arg("boom")
                .arg("dead_letter_attempts")
                .arg(1)
                .query(&mut conn)
                .unwrap();
            let _: () = redis::cmd("HSET")
                .arg(marker_key(DEAD))
                .arg(marker_field(STREAM, entry.parse().unwrap()))
                .arg(&id)
                .query(&mut conn)
                .unwrap();
            id
        })
        .collect();
    let remaining = |conn: &mut redis::Connection| -> Vec<String> {
        dead_letters(conn).into_iter().map(|(id, _)| id).collect()
    };

    let output = worker(&url, &["dead-letters", "purge", "--older-than", "7d"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let line = assert_one_error_line(&output);
    assert!(
        line.contains("would remove 2 dead letters") && line.contains("--yes"),
        "{line}"
    );
    assert_eq!(remaining(&mut conn), ids, "nothing removed without --yes");

    let output = worker(
        &url,
        &[
            "dead-letters",
            "purge",
            "--older-than",
            "7d",
            "--yes",
            "--json",
        ],
    );
    assert_success(&output);
    assert_eq!(json_lines(&stdout(&output))[0]["removed"], 2);
    assert_eq!(remaining(&mut conn), ids[2..]);
    assert_eq!(marker(&mut conn, "1-0"), None);
    assert_eq!(marker(&mut conn, "2-0"), None);
    assert_eq!(marker(&mut conn, "3-0").as_ref(), Some(&ids[2]));

    // Nothing is older than 2d now; one is older than 12h: no --yes needed.
    let output = worker(&url, &["dead-letters", "purge", "--older-than", "2d"]);
    assert_success(&output);
    assert!(stdout(&output).contains("removed 0"), "{}", stdout(&output));
    let output = worker(&url, &["dead-letters", "purge", "--older-than", "12h"]);
    assert_success(&output);
    assert!(stdout(&output).contains("removed 1"), "{}", stdout(&output));
    assert_eq!(remaining(&mut conn), ids[3..]);

    // --all asks for --yes when several would go.
    let id: String = redis::cmd("XADD")
        .arg(DEAD)
        .arg("*")
        .arg("user_id")
        .arg("u-late")
        .query(&mut conn)
        .unwrap();
    let output = worker(&url, &["dead-letters", "purge", "--all"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(assert_one_error_line(&output).contains("would remove 2 dead letters"));
    assert_eq!(remaining(&mut conn), [ids[3].clone(), id.clone()]);

    // One by id needs no --yes; an unknown id is an error.
    let output = worker(&url, &["dead-letters", "purge", "--id", &id]);
    assert_success(&output);
    assert_eq!(remaining(&mut conn), ids[3..]);
    let output = worker(&url, &["dead-letters", "purge", "--id", &id]);
    assert_eq!(output.status.code(), Some(1));
    assert!(assert_one_error_line(&output).contains("no dead letter"));

    let output = worker(&url, &["dead-letters", "purge", "--all", "--yes"]);
    assert_success(&output);
    assert!(remaining(&mut conn).is_empty());
    assert_eq!(marker(&mut conn, "4-0"), None);
}
