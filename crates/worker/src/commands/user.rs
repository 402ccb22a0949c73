//! `lobby-worker user U`: what the lobby knows of one user, from Redis alone
//! and with bounded reads: the cascade record, the games still indexed for
//! the user (with the user's role in each), the dead letters that name the
//! user, and whether an event for the user waits after the stored offset.

use lifecycle_domain::KeyLayout;
use lifecycle_streams::RedisConnection;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;

use anyhow::{anyhow, Context};
use lifecycle_domain::EntryId;
use lifecycle_redis::RedisOffsetStore;
use lifecycle_streams::{classify, parse_range_reply, FaultClass, StreamEntry};

use redis::{RedisError, Value};
use serde::Serialize;

use crate::cli::UserArgs;
use crate::redis_conn::{connect, explain, with_url, RedisTarget};
use crate::stream_status::{pairs, successor};

/// Game ids of the user's index shown at most (with their status and role).
pub const GAMES_SHOWN: usize = 20;

/// `SSCAN` calls made at most while collecting the game ids shown.
const SSCAN_CALLS: usize = 50;

/// The `COUNT` hint of each `SSCAN` call.
const SSCAN_COUNT: u64 = 100;

/// Entries looked at at most in each stream (the dead letters, the entries
/// after the offset).
pub const SCAN_LIMIT: u64 = 10_000;

/// Entries per `XRANGE` / `XREVRANGE` page.
const PAGE: u64 = 100;

/// Dead letters naming the user listed at most (all are counted).
pub const DEAD_LETTERS_SHOWN: usize = 20;

/// Characters of a dead letter's error shown in the human output (`--json`
/// has it whole).
const ERROR_CHARS_SHOWN: usize = 200;

/// The cascade record's fields in the order they are shown; any other field
/// the hash holds follows, by name.
const RECORD_FIELDS: [&str; 6] = [
    "event_type",
    "entry_id",
    "occurred_at_ms",
    "games",
    "trace_id",
    "applied_at_ms",
];

/// What `user --json` prints, one object.
#[derive(Debug, Serialize)]
struct Report {
    user_id: String,
    cascade_key: String,
    cascade: Option<Cascade>,
    games: Games,
    dead_letters: DeadLetters,
    waiting: Waiting,
}

/// The cascade record, values as stored.
#[derive(Debug, Serialize)]
struct Cascade {
    event_type: Option<String>,
    entry_id: Option<String>,
    occurred_at_ms: Option<String>,
    games: Option<String>,
    trace_id: Option<String>,
    applied_at_ms: Option<String>,
    other_fields: BTreeMap<String, String>,
}

/// The user's games index.
#[derive(Debug, Serialize)]
struct Games {
    key: String,
    count: u64,
    shown: Vec<GameView>,
    more: bool,
}

/// One game of the index.
#[derive(Debug, Serialize)]
struct GameView {
    game_id: String,
    exists: bool,
    status: Option<String>,
    roles: Vec<&'static str>,
    error: Option<String>,
}

/// The dead letters naming the user.
#[derive(Debug, Serialize)]
struct DeadLetters {
    stream: String,
    looked_at: u64,
    limit_reached: bool,
    count: u64,
    shown: Vec<DeadLetter>,
}

/// One dead letter, newest first; values as stored.
#[derive(Debug, Serialize)]
struct DeadLetter {
    id: String,
    entry_id: Option<String>,
    source_stream: Option<String>,
    event_type: Option<String>,
    occurred_at_ms: Option<String>,
    error: Option<String>,
    attempts: Option<String>,
}

/// Whether an entry for the user waits after the stored offset.
#[derive(Debug, Serialize)]
struct Waiting {
    stream: String,
    label: String,
    offset: Option<String>,
    looked_at: u64,
    limit_reached: bool,
    entry_id: Option<String>,
    event_type: Option<String>,
}

/// Prints what the lobby knows of user `U`. An unknown user is an answer
/// (everything empty), not an error.
pub async fn run(args: UserArgs) -> anyhow::Result<()> {
    let user = args.user_id.trim().to_owned();
    let target = RedisTarget::from_args(&args.redis)?;
    let url = target.url.as_str();
    let mut conn = connect(&target).await?;
    let prefix = &args.redis.key_prefix;
    let stream = &args.redis.stream;
    let dead_letter_stream = args
        .dead_letter_stream
        .clone()
        .unwrap_or_else(|| format!("{stream}:dead"));

    let layout = target.key_layout;
    let cascade_key = layout.user_key(prefix, &user, "cascade");
    let cascade = read_cascade(&mut conn, url, &cascade_key).await?;
    let games = read_games(&mut conn, url, prefix, layout, &user).await?;
    let dead_letters = read_dead_letters(&mut conn, url, &dead_letter_stream, &user).await?;
    let store = RedisOffsetStore::new(target.endpoint()?, prefix)
        .context("cannot set up the offset store")?;
    let offset = with_url(store.get(&args.label).await, url)?;
    let waiting = read_waiting(&mut conn, url, stream, &args.label, offset, &user).await?;

    let report = Report {
        user_id: user,
        cascade_key,
        cascade,
        games,
        dead_letters,
        waiting,
    };
    if args.json {
        let line = serde_json::to_string(&report).context("cannot encode the report as JSON")?;
        println!("{line}");
        return Ok(());
    }
    let rows = human(&report);
    let rows: Vec<(&str, String)> = rows
        .iter()
        .map(|(key, value)| (key.as_str(), value.clone()))
        .collect();
    crate::commands::print_aligned(&rows).context("cannot print the report")
}

/// A Redis failure on `key` as one line: a key of the wrong type is named,
/// with the flag that chose it; anything else as [`explain`] says it.
fn failed(url: &str, action: &str, key: &str, flag: &str, err: &RedisError) -> anyhow::Error {
    if classify(err) == FaultClass::WrongType {
        return anyhow!(
            "cannot {action}: the key {} holds a value of another type ({err}); check {flag}",
            shown(key)
        );
    }
    explain(url, action, err)
}

/// Reads the cascade record; `None` when there is none.
async fn read_cascade(
    conn: &mut RedisConnection,
    url: &str,
    key: &str,
) -> anyhow::Result<Option<Cascade>> {
    let action = "read the cascade record";
    let reply: Value = redis::cmd("HGETALL")
        .arg(key)
        .query_async(conn)
        .await
        .map_err(|err| failed(url, action, key, "--key-prefix (LOBBY_KEY_PREFIX)", &err))?;
    let mut fields: BTreeMap<String, String> = pairs(reply)
        .into_iter()
        .filter_map(|(name, value)| Some((text(name)?, text(value)?)))
        .collect();
    if fields.is_empty() {
        return Ok(None);
    }
    let mut take = |name: &str| fields.remove(name);
    Ok(Some(Cascade {
        event_type: take("event_type"),
        entry_id: take("entry_id"),
        occurred_at_ms: take("occurred_at_ms"),
        games: take("games"),
        trace_id: take("trace_id"),
        applied_at_ms: take("applied_at_ms"),
        other_fields: fields,
    }))
}

/// Counts the user's games index and shows up to [`GAMES_SHOWN`] of its
/// ids, each with the game's status and the user's roles in it (one
/// pipelined round trip for them all).
async fn read_games(
    conn: &mut RedisConnection,
    url: &str,
    prefix: &str,
    layout: KeyLayout,
    user: &str,
) -> anyhow::Result<Games> {
    let key = layout.user_key(prefix, user, "games");
    let action = "read the user's games index";
    let flag = "--key-prefix (LOBBY_KEY_PREFIX)";
    let count: u64 = redis::cmd("SCARD")
        .arg(&key)
        .query_async(conn)
        .await
        .map_err(|err| failed(url, action, &key, flag, &err))?;
    let mut ids: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut cursor: u64 = 0;
    for _ in 0..SSCAN_CALLS {
        if count == 0 {
            break;
        }
        let (next, page): (u64, Vec<Vec<u8>>) = redis::cmd("SSCAN")
            .arg(&key)
            .arg(cursor)
            .arg("COUNT")
            .arg(SSCAN_COUNT)
            .query_async(conn)
            .await
            .map_err(|err| failed(url, action, &key, flag, &err))?;
        ids.extend(page);
        if next == 0 || ids.len() >= GAMES_SHOWN {
            break;
        }
        cursor = next;
    }
    let ids: Vec<Vec<u8>> = ids.into_iter().take(GAMES_SHOWN).collect();
    let shown = describe_games(conn, url, prefix, layout, user, &ids).await?;
    let more = count > u64::try_from(shown.len()).unwrap_or(u64::MAX);
    Ok(Games {
        key,
        count,
        shown,
        more,
    })
}

/// The roles a user can have in a game, after `owner`: the game's sets.
const ROLE_SETS: [(&str, &str); 4] = [
    ("members", "member"),
    ("applicants", "applicant"),
    ("invitees", "invitee"),
    ("dropped", "dropped"),
];

/// Each game's existence, status and the user's roles, in one pipeline (a
/// pipeline per game on a cluster); a key of the wrong type spoils only its
/// game's line.
async fn describe_games(
    conn: &mut RedisConnection,
    url: &str,
    prefix: &str,
    layout: KeyLayout,
    user: &str,
    ids: &[Vec<u8>],
) -> anyhow::Result<Vec<GameView>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let game_key = |id: &[u8]| layout.game_key_bytes(prefix, id);
    let mut pipes = Vec::new();
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for id in ids {
        // On a cluster each game's keys lie in their own slot: a pipeline
        // per game.
        if layout == KeyLayout::Cluster && pipe.cmd_iter().next().is_some() {
            pipes.push(std::mem::replace(&mut pipe, redis::pipe()));
            pipe.ignore_errors();
        }
        let key = game_key(id);
        pipe.cmd("EXISTS").arg(&key);
        pipe.cmd("HMGET").arg(&key).arg("status").arg("owner_id");
        for (suffix, _) in ROLE_SETS {
            let set = [key.as_slice(), b":", suffix.as_bytes()].concat();
            pipe.cmd("SISMEMBER").arg(set).arg(user);
        }
    }
    pipes.push(pipe);
    let mut replies: Vec<Value> = Vec::new();
    for pipe in pipes {
        let more: Vec<Value> = pipe
            .query_async(conn)
            .await
            .map_err(|err| explain(url, "read the user's games", &err))?;
        replies.extend(more);
    }
    let per_game = 2 + ROLE_SETS.len();
    let mut replies = replies.into_iter();
    let mut games = Vec::with_capacity(ids.len());
    for id in ids {
        let game_id = String::from_utf8_lossy(id).into_owned();
        let mut view = GameView {
            game_id,
            exists: false,
            status: None,
            roles: Vec::new(),
            error: None,
        };
        let mut errors = Vec::new();
        let mut replies_of_game = replies.by_ref().take(per_game);
        match replies_of_game.next() {
            Some(Value::Int(n)) => view.exists = n > 0,
            Some(Value::ServerError(err)) => errors.push(err.to_string()),
            _ => {}
        }
        match replies_of_game.next() {
            Some(Value::Array(fields)) => {
                let mut fields = fields.into_iter();
                view.status = fields.next().and_then(text);
                if fields.next().and_then(text).as_deref() == Some(user) {
                    view.roles.push("owner");
                }
            }
            Some(Value::ServerError(err)) => {
                errors.push(format!("{}: {err}", shown_bytes(&game_key(id))));
            }
            _ => {}
        }
        for (suffix, role) in ROLE_SETS {
            match replies_of_game.next() {
                Some(Value::Int(1)) => view.roles.push(role),
                Some(Value::ServerError(err)) => {
                    errors.push(format!("{}:{suffix}: {err}", shown_bytes(&game_key(id))))
                }
                _ => {}
            }
        }
        if !errors.is_empty() {
            view.error = Some(errors.join("; "));
        }
        games.push(view);
    }
    Ok(games)
}

/// What a stream scan looked at.
#[derive(Clone, Copy, Debug, Default)]
struct Scanned {
    /// Entries looked at.
    looked_at: u64,
    /// Whether it stopped at [`SCAN_LIMIT`] with entries left unread.
    limit_reached: bool,
}

/// Which way a scan goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// Oldest first (`XRANGE`).
    Forward,
    /// Newest first (`XREVRANGE`).
    Backward,
}

/// Visits the entries of `key` from `from` (inclusive; `None`: the end the
/// direction starts at) page by page, at most [`SCAN_LIMIT`] of them, until
/// `visit` breaks. When the limit is reached, one more single-entry read
/// tells whether entries were left unread.
async fn scan(
    conn: &mut RedisConnection,
    key: &str,
    from: Option<EntryId>,
    direction: Direction,
    mut visit: impl FnMut(StreamEntry) -> ControlFlow<()>,
) -> Result<Scanned, ScanError> {
    let (command, open_start, end) = match direction {
        Direction::Forward => ("XRANGE", "-", "+"),
        Direction::Backward => ("XREVRANGE", "+", "-"),
    };
    let mut scanned = Scanned::default();
    let mut next = from.map(|id| id.to_string());
    loop {
        let want = PAGE.min(SCAN_LIMIT.saturating_sub(scanned.looked_at));
        let probing = want == 0;
        let start = next.clone().unwrap_or_else(|| open_start.to_owned());
        let reply: Value = redis::cmd(command)
            .arg(key)
            .arg(&start)
            .arg(end)
            .arg("COUNT")
            .arg(want.max(1))
            .query_async(conn)
            .await
            .map_err(ScanError::Redis)?;
        let entries = parse_range_reply(reply).map_err(|err| ScanError::Reply(err.to_string()))?;
        if probing {
            scanned.limit_reached = !entries.is_empty();
            return Ok(scanned);
        }
        let got = u64::try_from(entries.len()).unwrap_or(u64::MAX);
        let mut last = None;
        for entry in entries {
            scanned.looked_at += 1;
            last = Some(entry.id);
            if visit(entry).is_break() {
                return Ok(scanned);
            }
        }
        let after_last = match (direction, last) {
            (Direction::Forward, Some(id)) => successor(id),
            (Direction::Backward, Some(id)) => id.predecessor(),
            (_, None) => None,
        };
        match after_last {
            Some(id) if got >= want => next = Some(id.to_string()),
            _ => return Ok(scanned),
        }
    }
}

/// Why a scan failed.
#[derive(Debug)]
enum ScanError {
    /// Redis failed.
    Redis(RedisError),
    /// The reply was not a range reply.
    Reply(String),
}

impl ScanError {
    /// One line for a scan of `key` doing `action`.
    fn explain(self, url: &str, action: &str, key: &str, flag: &str) -> anyhow::Error {
        match self {
            ScanError::Redis(err) => failed(url, action, key, flag, &err),
            ScanError::Reply(err) => anyhow!("cannot {action}: {err}"),
        }
    }
}

/// The last value of field `name`, as text.
fn field(entry: &StreamEntry, name: &str) -> Option<String> {
    entry
        .fields
        .iter()
        .rev()
        .find(|(field, _)| field.as_slice() == name.as_bytes())
        .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
}

/// Whether the entry's `user_id` names `user` as the worker reads it: the
/// last `user_id` field, valid UTF-8, trimmed.
fn names_user(entry: &StreamEntry, user: &str) -> bool {
    entry
        .fields
        .iter()
        .rev()
        .find(|(field, _)| field.as_slice() == b"user_id")
        .and_then(|(_, value)| std::str::from_utf8(value).ok())
        .is_some_and(|value| value.trim() == user)
}

/// The dead letters naming `user`, newest first, among the newest
/// [`SCAN_LIMIT`] entries of the dead-letter stream.
async fn read_dead_letters(
    conn: &mut RedisConnection,
    url: &str,
    stream: &str,
    user: &str,
) -> anyhow::Result<DeadLetters> {
    let mut count: u64 = 0;
    let mut shown = Vec::new();
    let scanned = scan(conn, stream, None, Direction::Backward, |entry| {
        if names_user(&entry, user) {
            count += 1;
            if shown.len() < DEAD_LETTERS_SHOWN {
                shown.push(DeadLetter {
                    id: entry.id.to_string(),
                    entry_id: field(&entry, "dead_letter_entry_id"),
                    source_stream: field(&entry, "dead_letter_stream"),
                    event_type: field(&entry, "event_type"),
                    occurred_at_ms: field(&entry, "occurred_at_ms"),
                    error: field(&entry, "dead_letter_error"),
                    attempts: field(&entry, "dead_letter_attempts"),
                });
            }
        }
        ControlFlow::Continue(())
    })
    .await
    .map_err(|err| {
        err.explain(
            url,
            "read the dead-letter stream",
            stream,
            "--dead-letter-stream (LOBBY_DEAD_LETTER_STREAM)",
        )
    })?;
    Ok(DeadLetters {
        stream: stream.to_owned(),
        looked_at: scanned.looked_at,
        limit_reached: scanned.limit_reached,
        count,
        shown,
    })
}

/// The first entry naming `user` after `offset` (from the stream's start
/// when none is stored), among the next [`SCAN_LIMIT`] entries.
async fn read_waiting(
    conn: &mut RedisConnection,
    url: &str,
    stream: &str,
    label: &str,
    offset: Option<EntryId>,
    user: &str,
) -> anyhow::Result<Waiting> {
    let mut found: Option<(String, Option<String>)> = None;
    let scanned = match offset {
        // Nothing can come after the last possible id.
        Some(offset) if successor(offset).is_none() => Scanned::default(),
        _ => scan(
            conn,
            stream,
            offset.and_then(successor),
            Direction::Forward,
            |entry| {
                if names_user(&entry, user) {
                    found = Some((entry.id.to_string(), field(&entry, "event_type")));
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            },
        )
        .await
        .map_err(|err| {
            err.explain(
                url,
                "read the stream after the offset",
                stream,
                "--stream (LOBBY_STREAM)",
            )
        })?,
    };
    let (entry_id, event_type) = found.map_or((None, None), |(id, kind)| (Some(id), kind));
    Ok(Waiting {
        stream: stream.to_owned(),
        label: label.to_owned(),
        offset: offset.map(|id| id.to_string()),
        looked_at: scanned.looked_at,
        limit_reached: scanned.limit_reached,
        entry_id,
        event_type,
    })
}

/// The `key: value` rows of the human output (keys from Redis escaped here,
/// values by [`crate::commands::print_aligned`]).
fn human(report: &Report) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = vec![("user".into(), report.user_id.clone())];
    match &report.cascade {
        None => rows.push(("cascade".into(), "no cascade applied".into())),
        Some(cascade) => {
            rows.push((
                "cascade".into(),
                format!("applied ({})", report.cascade_key),
            ));
            let known = [
                &cascade.event_type,
                &cascade.entry_id,
                &cascade.occurred_at_ms,
                &cascade.games,
                &cascade.trace_id,
                &cascade.applied_at_ms,
            ];
            for (name, value) in RECORD_FIELDS.iter().zip(known) {
                if let Some(value) = value {
                    rows.push((format!("cascade.{name}"), with_time(name, value)));
                }
            }
            for (name, value) in &cascade.other_fields {
                rows.push((format!("cascade.{}", shown(name)), value.clone()));
            }
        }
    }
    let games = &report.games;
    rows.push((
        "games_indexed".into(),
        if games.more {
            format!(
                "{} ({}; {} shown)",
                games.count,
                games.key,
                games.shown.len()
            )
        } else {
            format!("{} ({})", games.count, games.key)
        },
    ));
    for game in &games.shown {
        rows.push(("game".into(), describe_game(game)));
    }
    let dead = &report.dead_letters;
    rows.push((
        "dead_letters".into(),
        format!(
            "{} among {} ({})",
            dead.count,
            looked_at_text(dead.looked_at, dead.limit_reached, "newest"),
            dead.stream
        ),
    ));
    for letter in &dead.shown {
        rows.push(("dead_letter".into(), describe_dead_letter(letter)));
    }
    let waiting = &report.waiting;
    rows.push((
        "offset".into(),
        match &waiting.offset {
            Some(offset) => format!("{offset} (label {:?})", waiting.label),
            None => format!(
                "none stored for label {:?}; looked from the stream's start",
                waiting.label
            ),
        },
    ));
    rows.push((
        "waiting".into(),
        match &waiting.entry_id {
            Some(id) => format!(
                "{id} {} ({})",
                waiting.event_type.as_deref().unwrap_or("(no event_type)"),
                waiting.stream
            ),
            None => format!(
                "none among {} ({})",
                looked_at_text(waiting.looked_at, waiting.limit_reached, "next"),
                waiting.stream
            ),
        },
    ));
    rows
}

/// "the next 12 entries", saying whether more were left unread.
fn looked_at_text(looked_at: u64, limit_reached: bool, which: &str) -> String {
    let noun = if looked_at == 1 { "entry" } else { "entries" };
    if limit_reached {
        format!("the {which} {looked_at} {noun}, the most looked at; more not looked at")
    } else {
        format!("the {which} {looked_at} {noun}, all there are")
    }
}

/// One game's line: id, status, roles, trouble.
fn describe_game(game: &GameView) -> String {
    let status = match (&game.status, game.exists) {
        (Some(status), _) => status.clone(),
        (None, true) => "(no status)".to_owned(),
        (None, false) => "(no such game)".to_owned(),
    };
    let roles = if game.roles.is_empty() {
        "no role".to_owned()
    } else {
        game.roles.join(",")
    };
    let mut line = format!("{} status={status} roles={roles}", game.game_id);
    if let Some(error) = &game.error {
        line.push_str(&format!(" error={error}"));
    }
    line
}

/// One dead letter's line.
fn describe_dead_letter(letter: &DeadLetter) -> String {
    let or_dash = |value: &Option<String>| value.clone().unwrap_or_else(|| "-".to_owned());
    let error = letter.error.as_deref().map_or_else(
        || "-".to_owned(),
        |error| {
            if error.chars().count() > ERROR_CHARS_SHOWN {
                let cut: String = error.chars().take(ERROR_CHARS_SHOWN).collect();
                format!("{cut}... (--json has it whole)")
            } else {
                error.to_owned()
            }
        },
    );
    format!(
        "{} entry={} event_type={} attempts={} error={error}",
        letter.id,
        or_dash(&letter.entry_id),
        or_dash(&letter.event_type),
        or_dash(&letter.attempts),
    )
}

/// A millisecond field's value with its UTC time, when it is one.
fn with_time(name: &str, value: &str) -> String {
    if !name.ends_with("_ms") {
        return value.to_owned();
    }
    match value
        .parse::<i64>()
        .ok()
        .and_then(crate::commands::utc_time)
    {
        Some(time) => format!("{value} ({time})"),
        None => value.to_owned(),
    }
}

/// `text` as it may be printed: escaped when it holds a control character.
fn shown(text: &str) -> String {
    if text.chars().any(char::is_control) {
        text.escape_debug().to_string()
    } else {
        text.to_owned()
    }
}

/// Raw key bytes as they may be printed.
fn shown_bytes(raw: &[u8]) -> String {
    shown(&String::from_utf8_lossy(raw))
}

/// A reply value as text (lossily decoded); `None` for nil and the like.
fn text(value: Value) -> Option<String> {
    match value {
        Value::BulkString(raw) => Some(String::from_utf8_lossy(&raw).into_owned()),
        Value::SimpleString(text) => Some(text),
        Value::Int(number) => Some(number.to_string()),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn millisecond_fields_get_a_time_and_others_do_not() {
        assert_eq!(
            with_time("occurred_at_ms", "1700000000000"),
            "1700000000000 (2023-11-14T22:13:20.000Z)"
        );
        assert_eq!(with_time("occurred_at_ms", "soon"), "soon");
        assert_eq!(with_time("games", "1700000000000"), "1700000000000");
    }

    #[test]
    fn the_user_is_the_last_user_id_trimmed() {
        let entry = |fields: &[(&str, &[u8])]| StreamEntry {
            id: EntryId::new(1, 0),
            fields: fields
                .iter()
                .map(|(name, value)| (name.as_bytes().to_vec(), value.to_vec()))
                .collect(),
        };
        assert!(names_user(&entry(&[("user_id", b" u-1\t")]), "u-1"));
        assert!(names_user(
            &entry(&[("user_id", b"u-2"), ("user_id", b"u-1")]),
            "u-1"
        ));
        assert!(!names_user(
            &entry(&[("user_id", b"u-1"), ("user_id", b"u-2")]),
            "u-1"
        ));
        assert!(!names_user(&entry(&[("user_id", b"u-1\xff")]), "u-1"));
        assert!(!names_user(&entry(&[("actor_id", b"u-1")]), "u-1"));
    }

    #[test]
    fn names_from_redis_are_escaped() {
        assert_eq!(shown("plain"), "plain");
        assert_eq!(shown("a\nb"), "a\\nb");
        assert_eq!(shown("\u{1b}[31m"), "\\u{1b}[31m");
    }
}
