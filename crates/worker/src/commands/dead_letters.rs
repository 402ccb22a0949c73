//! `lobby-worker dead-letters list|show|redrive|purge`: what an operator does
//! with the entries `run --dead-letter-after N` moved aside.
//!
//! A dead letter (see [`lifecycle_streams::dead_letter`]) is a copy of the
//! failing entry in the dead-letter stream: the entry's own fields, then
//! `dead_letter_entry_id`, `dead_letter_stream`, `dead_letter_error` and
//! `dead_letter_attempts` (and `dead_letter_fields_omitted` for a copy that
//! had to leave fields out). The marker hash `{<dead stream>}:entries` maps
//! `<entry id> <stream>` to the copy's id, so that a replay of the entry finds
//! the copy instead of adding another.
//!
//! # What `redrive` guarantees, and why
//!
//! - **The worker's own path.** The copy's original fields are decoded by
//!   the worker's decoder and applied by the worker's [`CascadeHandler`] on
//!   a [`RedisLobbyStore`] under `--key-prefix`: one atomic script per
//!   cascade, all or nothing.
//! - **Idempotent, and never ahead of a later entry of the same user.** The
//!   cascade script reads the user's record `<prefix>:user:<id>:cascade`
//!   and applies only an entry whose id is greater than the `entry_id`
//!   recorded there, then records it, in one atomic step. So a redriven
//!   entry X of user U changes nothing when `run` (or an earlier redrive)
//!   already applied X or a later entry Y of U (reported as `already
//!   applied` or `superseded`), and when X applies first, Y still applies
//!   after it (Y > X): whichever way a redrive and a running worker
//!   interleave, the record ends at U's newest entry and nothing older is
//!   applied after something newer. Skipping X loses nothing: a deletion or
//!   permanent block takes U out of every game in U's index and deletes the
//!   index, so a later cascade of U already did what X would do (the rules
//!   never read the event type, except to name it as an open game's
//!   `cancel_reason`: the one trace of which of U's events got there
//!   first); and cascades of different users commute (the rules depend only
//!   on the game and the user).
//! - **One by one, in the original order**: sorted by the original entry id
//!   (not by the dead letter's id, which a failed redrive renews), so two
//!   dead letters of one user are applied oldest first.
//! - **Only `--stream`'s dead letters.** Entry ids of different streams
//!   cannot be compared, and the record compares them: others are left for
//!   a redrive with their own `--stream` (and `--key-prefix`).
//! - **Applied means removed.** A dead letter applied (or found already
//!   applied or superseded) is deleted together with its marker, in one
//!   script. The marker is deleted rather than kept: it only stops a second
//!   copy while the copy it names exists (`append_once` writes a new copy
//!   when the named one is gone), so after the removal it would protect
//!   nothing and only grow the hash. A later failure of a replay of the
//!   same entry (after an offset rewind) is therefore dead-lettered again,
//!   as the new failure it is; redriving that finds the entry applied and
//!   removes it. If the removal itself fails, the dead letter stays, and
//!   the next redrive finds it applied and removes it.
//! - **Failed means kept, counted and explained.** Streams are append-only,
//!   so one script appends a replacement (the same fields, the original
//!   entry id kept, `dead_letter_error` the new error, `dead_letter_attempts`
//!   one more), deletes the old copy and points the marker at the
//!   replacement: no reader sees both or neither, and a worker replaying the
//!   entry meanwhile finds the replacement and adds no copy. The replacement
//!   has a new id: the time it shows is the last failure's, which
//!   `purge --older-than` goes by. A failure of Redis itself (unreachable,
//!   refusing writes) is not the entry's fault: as in `run` it is not
//!   counted, the dead letter is left as it is and the redrive stops.
//! - A dead letter that cannot be applied (malformed, of an event type the
//!   worker absorbs, a copy missing fields) is reported and left as it is;
//!   `purge` removes it.

use lifecycle_streams::RedisConnection;
use std::borrow::Cow;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{anyhow, Context};
use lifecycle_domain::{
    decode_user_lifecycle_event, BoxFuture, CascadeHandler, CascadeOutcome, EntryId, EventHandler,
    LobbyStore, StoreError, UserCascade, UserLifecycleEvent,
};
use lifecycle_redis::RedisLobbyStore;
use lifecycle_streams::dead_letter::{
    capped_error, marker_key, ATTEMPTS_FIELD, ENTRY_ID_FIELD, ERROR_FIELD, FIELDS_OMITTED_FIELD,
    STREAM_FIELD,
};
use lifecycle_streams::{parse_range_reply, StreamEntry};

use redis::{Script, Value};
use serde::Serialize;

use crate::cli::{
    DeadLetterChoice, DeadLettersAction, DeadLettersArgs, InputError, PurgeChoice, RedisArgs,
};
use crate::redis_conn::{connect, explain, with_url, RedisTarget};

/// Dead letters fetched per `XRANGE` page (or removed per script call).
const PAGE: usize = 100;

/// `KEYS[1]`: the dead-letter stream; `KEYS[2]`: its marker hash.
/// `ARGV[1]`, `ARGV[2]`: the first and last id of a range (`XRANGE` syntax),
/// `ARGV[3]`: at most how many; `ARGV[4]`: `1` to remove them, `0` to count.
/// Returns `{how many, the last id or ''}`. Each removed dead letter's marker
/// goes with it when it names that dead letter (a marker naming another copy
/// is left alone). Only the ids cross the network.
const RANGE_SCRIPT: &str = r"
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', ARGV[3])
local last = ''
for _, entry in ipairs(entries) do
  local id, fields = entry[1], entry[2]
  last = id
  if ARGV[4] == '1' then
    redis.call('XDEL', KEYS[1], id)
    -- The copy's own dead_letter_* fields come after the entry's fields.
    local meta
    for i = 1, #fields - 1, 2 do
      if fields[i] == 'dead_letter_entry_id' then meta = i end
    end
    if meta then
      for i = meta, #fields - 1, 2 do
        if fields[i] == 'dead_letter_stream' then
          local marker = fields[meta + 1] .. ' ' .. fields[i + 1]
          if redis.call('HGET', KEYS[2], marker) == id then
            redis.call('HDEL', KEYS[2], marker)
          end
        end
      end
    end
  end
end
return { #entries, last }
";

/// `KEYS[1]`: the dead-letter stream; `KEYS[2]`: its marker hash. `ARGV[1]`:
/// the dead letter's id; `ARGV[2]`: the new error; `ARGV[3]`: the new
/// attempts. Appends a replacement (the same fields, those two updated),
/// deletes the old copy and points the marker at the replacement, unless the
/// marker names another copy. Returns `{1, new id}`, `{0}` when the dead
/// letter is gone, `{-1}` when it has no `dead_letter_entry_id` (not a copy
/// this format describes). An entry with a given id never changes, so the
/// fields the caller read to compute the attempts are still these.
const REPLACE_SCRIPT: &str = r"
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return { 0 } end
local fields = found[1][2]
local meta
for i = 1, #fields - 1, 2 do
  if fields[i] == 'dead_letter_entry_id' then meta = i end
end
if not meta then return { -1 } end
local error_at, attempts_at, stream
for i = meta, #fields - 1, 2 do
  if fields[i] == 'dead_letter_error' then error_at = i + 1
  elseif fields[i] == 'dead_letter_attempts' then attempts_at = i + 1
  elseif fields[i] == 'dead_letter_stream' then stream = fields[i + 1] end
end
if error_at then fields[error_at] = ARGV[2] else
  fields[#fields + 1] = 'dead_letter_error'
  fields[#fields + 1] = ARGV[2]
end
if attempts_at then fields[attempts_at] = ARGV[3] else
  fields[#fields + 1] = 'dead_letter_attempts'
  fields[#fields + 1] = ARGV[3]
end
-- XADD first: Redis refuses a script's first write that may grow memory
-- when over maxmemory, and only that one, so nothing is deleted then.
local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('XDEL', KEYS[1], ARGV[1])
if stream then
  local marker = fields[meta + 1] .. ' ' .. stream
  local named = redis.call('HGET', KEYS[2], marker)
  if not named or named == ARGV[1] then
    redis.call('HSET', KEYS[2], marker, id)
  end
end
return { 1, id }
";

/// Runs one `dead-letters` action.
pub async fn run(args: DeadLettersArgs) -> anyhow::Result<()> {
    let dead = args
        .dead_letter_stream
        .clone()
        .unwrap_or_else(|| format!("{}:dead", args.redis.stream));
    if dead == args.redis.stream {
        return Err(InputError(format!(
            "--dead-letter-stream must not be the stream itself ({dead:?})"
        ))
        .into());
    }
    let target = RedisTarget::from_args(&args.redis)?;
    let conn = connect(&target).await?;
    let mut ctx = Ctx {
        url: target.url.clone(),
        conn,
        dead,
    };
    ctx.check_type().await?;
    match args.action {
        DeadLettersAction::List { json, count, from } => list(&mut ctx, json, count, from).await,
        DeadLettersAction::Show { id, json } => show(&mut ctx, id, json).await,
        DeadLettersAction::Redrive {
            which,
            dry_run,
            json,
        } => redrive(&mut ctx, &target, &args.redis, which, dry_run, json).await,
        DeadLettersAction::Purge { which, yes, json } => purge(&mut ctx, which, yes, json).await,
    }
}

/// The connection and the dead-letter stream every action works on.
struct Ctx {
    url: String,
    conn: RedisConnection,
    dead: String,
}

impl Ctx {
    /// Fails with a line naming the flag when the dead-letter key holds
    /// something other than a stream (a missing key is an empty stream).
    async fn check_type(&mut self) -> anyhow::Result<()> {
        let kind: String = redis::cmd("TYPE")
            .arg(&self.dead)
            .query_async(&mut self.conn)
            .await
            .map_err(|err| explain(&self.url, "inspect the dead-letter stream", &err))?;
        match kind.as_str() {
            "none" | "stream" => Ok(()),
            other => Err(anyhow!(
                "the key {:?} holds a {other}, not a stream; check --dead-letter-stream (LOBBY_DEAD_LETTER_STREAM) and --stream",
                self.dead
            )),
        }
    }

    /// Up to `count` dead letters from `start` to `end` (`XRANGE` syntax).
    async fn range(
        &mut self,
        start: &str,
        end: &str,
        count: usize,
    ) -> anyhow::Result<Vec<StreamEntry>> {
        let reply: Value = redis::cmd("XRANGE")
            .arg(&self.dead)
            .arg(start)
            .arg(end)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn)
            .await
            .map_err(|err| explain(&self.url, "read the dead-letter stream", &err))?;
        Ok(parse_range_reply(reply)?)
    }

    /// The dead letter `id`, if it is there.
    async fn get(&mut self, id: EntryId) -> anyhow::Result<Option<StreamEntry>> {
        let id = id.to_string();
        Ok(self.range(&id, &id, 1).await?.into_iter().next())
    }

    /// The dead letter `id`, or an error saying it is not there.
    async fn get_or_fail(&mut self, id: EntryId) -> anyhow::Result<StreamEntry> {
        self.get(id)
            .await?
            .ok_or_else(|| anyhow!("no dead letter {id} in {:?}", self.dead))
    }

    /// The dead-letter stream's last id, `None` when it is empty.
    async fn last_id(&mut self) -> anyhow::Result<Option<EntryId>> {
        let reply: Value = redis::cmd("XREVRANGE")
            .arg(&self.dead)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn)
            .await
            .map_err(|err| explain(&self.url, "read the dead-letter stream", &err))?;
        Ok(parse_range_reply(reply)?.first().map(|entry| entry.id))
    }

    /// Runs [`RANGE_SCRIPT`] once: counts or removes up to `count` dead
    /// letters from `start` to `end`; returns how many and the last id.
    async fn range_script(
        &mut self,
        start: &str,
        end: &str,
        count: usize,
        remove: bool,
    ) -> anyhow::Result<(usize, Option<EntryId>)> {
        static SCRIPT: std::sync::LazyLock<Script> =
            std::sync::LazyLock::new(|| Script::new(RANGE_SCRIPT));
        let action = if remove {
            "remove dead letters"
        } else {
            "count dead letters"
        };
        let (n, last): (usize, String) = SCRIPT
            .key(&self.dead)
            .key(marker_key(&self.dead))
            .arg(start)
            .arg(end)
            .arg(count)
            .arg(if remove { "1" } else { "0" })
            .invoke_async(&mut self.conn)
            .await
            .map_err(|err| explain(&self.url, action, &err))?;
        let last = if last.is_empty() {
            None
        } else {
            Some(
                EntryId::from_bytes(last.as_bytes())
                    .map_err(|err| anyhow!("unexpected reply to the {action} script: {err}"))?,
            )
        };
        Ok((n, last))
    }

    /// Removes the dead letter `id` and its marker; whether it was there.
    async fn remove(&mut self, id: EntryId) -> anyhow::Result<bool> {
        let id = id.to_string();
        let (removed, _) = self.range_script(&id, &id, 1, true).await?;
        Ok(removed > 0)
    }

    /// Counts (or removes) every dead letter from `start` to `end`, a page
    /// at a time.
    async fn sweep(&mut self, start: &str, end: &str, remove: bool) -> anyhow::Result<u64> {
        let mut total: u64 = 0;
        let mut from = start.to_owned();
        loop {
            let (n, last) = self.range_script(&from, end, PAGE, remove).await?;
            total = total.saturating_add(n as u64);
            match last {
                Some(last) if n == PAGE => from = format!("({last}"),
                _ => return Ok(total),
            }
        }
    }

    /// Replaces the dead letter `id` after a failed redrive: the new error,
    /// `attempts`. `Ok(None)` when it is gone.
    async fn replace(
        &mut self,
        id: EntryId,
        error: &str,
        attempts: u64,
    ) -> anyhow::Result<Option<EntryId>> {
        static SCRIPT: std::sync::LazyLock<Script> =
            std::sync::LazyLock::new(|| Script::new(REPLACE_SCRIPT));
        let reply: Value = SCRIPT
            .key(&self.dead)
            .key(marker_key(&self.dead))
            .arg(id.to_string())
            .arg(capped_error(error).as_ref())
            .arg(attempts)
            .invoke_async(&mut self.conn)
            .await
            .map_err(|err| explain(&self.url, "update the dead letter", &err))?;
        let unexpected = || anyhow!("unexpected reply to the dead-letter update: {reply:?}");
        let Value::Array(items) = &reply else {
            return Err(unexpected());
        };
        match items.as_slice() {
            [Value::Int(1), Value::BulkString(new)] => {
                Ok(Some(EntryId::from_bytes(new).map_err(|_| unexpected())?))
            }
            [Value::Int(0)] => Ok(None),
            [Value::Int(-1)] => Err(anyhow!(
                "the dead letter {id} has no {ENTRY_ID_FIELD} field; it was left as it is"
            )),
            _ => Err(unexpected()),
        }
    }

    /// Redis's clock, in milliseconds: the clock of the dead letters' ids.
    async fn now_ms(&mut self) -> anyhow::Result<u64> {
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut self.conn)
            .await
            .map_err(|err| explain(&self.url, "read the server's clock", &err))?;
        Ok(secs.saturating_mul(1000).saturating_add(micros / 1000))
    }
}

/// What a dead letter says about itself and its entry, lossily decoded.
#[derive(Debug, Default, Serialize)]
struct Summary {
    /// The dead letter's id.
    id: String,
    /// When it was written: its id's milliseconds.
    dead_lettered_at_ms: u64,
    /// The same, as UTC.
    dead_lettered_at: String,
    /// The original entry's id.
    entry_id: Option<String>,
    /// The stream the entry came from.
    stream: Option<String>,
    /// The entry's `user_id`.
    user_id: Option<String>,
    /// The entry's `event_type`.
    event_type: Option<String>,
    /// Failed attempts so far.
    attempts: Option<u64>,
    /// The last failure.
    error: Option<String>,
    /// How many of the entry's fields the copy left out, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    fields_omitted: Option<u64>,
}

/// A dead letter split into the entry's own fields and the copy's
/// `dead_letter_*` ones.
struct Parts<'a> {
    /// The entry's fields, in order.
    original: &'a [(Vec<u8>, Vec<u8>)],
    /// The copy's fields (empty when it has no `dead_letter_entry_id`).
    meta: &'a [(Vec<u8>, Vec<u8>)],
}

impl<'a> Parts<'a> {
    /// Splits at the last `dead_letter_entry_id`: the copy's fields come
    /// after all of the entry's, which may hold a field of that name too.
    fn of(fields: &'a [(Vec<u8>, Vec<u8>)]) -> Self {
        let at = fields
            .iter()
            .rposition(|(name, _)| name.as_slice() == ENTRY_ID_FIELD.as_bytes())
            .unwrap_or(fields.len());
        let (original, meta) = fields.split_at(at);
        Self { original, meta }
    }

    /// The copy's field `name`, lossily decoded.
    fn meta(&self, name: &str) -> Option<String> {
        last(self.meta, name)
    }

    /// The original entry's id.
    fn entry_id(&self) -> Option<EntryId> {
        self.meta(ENTRY_ID_FIELD)?.parse().ok()
    }
}

/// The value of the last field `name` in `fields`, lossily decoded.
fn last(fields: &[(Vec<u8>, Vec<u8>)], name: &str) -> Option<String> {
    fields
        .iter()
        .rev()
        .find(|(field, _)| field.as_slice() == name.as_bytes())
        .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
}

/// The summary of `entry`.
fn summarize(entry: &StreamEntry) -> Summary {
    let parts = Parts::of(&entry.fields);
    Summary {
        id: entry.id.to_string(),
        dead_lettered_at_ms: entry.id.ms,
        dead_lettered_at: crate::commands::utc(entry.id.ms),
        entry_id: parts.meta(ENTRY_ID_FIELD),
        stream: parts.meta(STREAM_FIELD),
        user_id: last(parts.original, "user_id"),
        event_type: last(parts.original, "event_type"),
        attempts: parts
            .meta(ATTEMPTS_FIELD)
            .and_then(|attempts| attempts.parse().ok()),
        error: parts.meta(ERROR_FIELD),
        fields_omitted: parts
            .meta(FIELDS_OMITTED_FIELD)
            .and_then(|omitted| omitted.parse().ok()),
    }
}

/// `text`, escaped when it holds a control character, so that no value can
/// forge or hide a line.
fn safe(text: &str) -> Cow<'_, str> {
    if text.chars().any(char::is_control) {
        Cow::Owned(text.escape_debug().to_string())
    } else {
        Cow::Borrowed(text)
    }
}

/// An optional value for a text line: quoted and escaped, or `-`.
fn quoted(value: Option<&str>) -> String {
    value.map_or_else(|| "-".to_owned(), |value| format!("{value:?}"))
}

/// One line of `list` and the line of `show` before the fields.
fn list_line(summary: &Summary) -> String {
    let mut line = format!(
        "{} entry={} user={} type={} attempts={} at={} error={}",
        summary.id,
        summary.entry_id.as_deref().map_or(Cow::Borrowed("-"), safe),
        quoted(summary.user_id.as_deref()),
        quoted(summary.event_type.as_deref()),
        summary
            .attempts
            .map_or_else(|| "-".to_owned(), |attempts| attempts.to_string()),
        summary.dead_lettered_at,
        quoted(summary.error.as_deref()),
    );
    if let Some(omitted) = summary.fields_omitted {
        line.push_str(&format!(" fields_omitted={omitted}"));
    }
    line
}

/// Prints one line per dead letter from `--from` (or the first) on.
async fn list(
    ctx: &mut Ctx,
    json: bool,
    count: Option<u64>,
    from: Option<EntryId>,
) -> anyhow::Result<()> {
    use std::io::Write;
    let limit = count.unwrap_or(u64::MAX);
    let mut printed: u64 = 0;
    let mut start = from.map_or_else(|| "-".to_owned(), |id| id.to_string());
    let mut out = std::io::stdout().lock();
    while printed < limit {
        let page = usize::try_from((limit - printed).min(PAGE as u64)).unwrap_or(PAGE);
        let entries = ctx.range(&start, "+", page).await?;
        let Some(last) = entries.last().map(|entry| entry.id) else {
            break;
        };
        for entry in &entries {
            let summary = summarize(entry);
            let line = if json {
                serde_json::to_string(&summary).context("cannot encode a dead letter as JSON")?
            } else {
                list_line(&summary)
            };
            writeln!(out, "{line}")?;
            printed += 1;
        }
        start = format!("({last}");
    }
    out.flush()?;
    if printed == 0 && !json && from.is_none() {
        eprintln!("no dead letters in {:?}", ctx.dead);
    }
    Ok(())
}

/// What `show --json` prints.
#[derive(Serialize)]
struct Shown {
    /// What `list` says of it.
    #[serde(flatten)]
    summary: Summary,
    /// Every field, in order, as `[name, value]` (duplicates kept).
    fields: Vec<[String; 2]>,
}

/// Prints one dead letter whole.
async fn show(ctx: &mut Ctx, id: EntryId, json: bool) -> anyhow::Result<()> {
    let entry = ctx.get_or_fail(id).await?;
    let summary = summarize(&entry);
    let fields: Vec<[String; 2]> = entry
        .fields
        .iter()
        .map(|(name, value)| {
            [
                String::from_utf8_lossy(name).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            ]
        })
        .collect();
    if json {
        let line = serde_json::to_string(&Shown { summary, fields })
            .context("cannot encode the dead letter as JSON")?;
        println!("{line}");
        return Ok(());
    }
    let mut rows: Vec<(String, String)> = vec![
        ("id".to_owned(), summary.id.clone()),
        (
            "dead_lettered_at".to_owned(),
            summary.dead_lettered_at.clone(),
        ),
    ];
    rows.extend(
        fields
            .into_iter()
            .map(|[name, value]| (safe(&name).into_owned(), value)),
    );
    let rows: Vec<(&str, String)> = rows
        .iter()
        .map(|(name, value)| (name.as_str(), value.clone()))
        .collect();
    crate::commands::print_aligned(&rows).context("cannot print the dead letter")
}

/// A lobby store that remembers what the last cascade did, so that the
/// worker's own handler can be used and its outcome still reported.
struct Observed {
    store: RedisLobbyStore,
    last: Arc<Mutex<Option<CascadeOutcome>>>,
}

impl LobbyStore for Observed {
    fn apply_cascade<'a>(
        &'a self,
        cascade: &'a UserCascade,
    ) -> BoxFuture<'a, Result<CascadeOutcome, StoreError>> {
        Box::pin(async move {
            let outcome = self.store.apply_cascade(cascade).await?;
            *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(outcome.clone());
            Ok(outcome)
        })
    }
}

/// What became of one dead letter in a redrive.
#[derive(Debug, Serialize)]
struct Redriven {
    /// The dead letter's id.
    id: String,
    /// The original entry's id.
    entry_id: Option<String>,
    /// Its user.
    user_id: Option<String>,
    /// Its event type.
    event_type: Option<String>,
    /// `applied`, `already_applied`, `superseded`, `failed`,
    /// `cannot_redrive`, `other_stream`, `gone`; with --dry-run
    /// `would_apply`, `would_skip`.
    outcome: &'static str,
    /// Games the cascade touched (`applied`).
    #[serde(skip_serializing_if = "Option::is_none")]
    games: Option<u64>,
    /// The entry id the user's cascade record holds (`already_applied`,
    /// `superseded`, `would_skip`).
    #[serde(skip_serializing_if = "Option::is_none")]
    recorded: Option<String>,
    /// Why it failed or cannot be redriven.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// The id of its replacement (`failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    new_id: Option<String>,
    /// Its failed attempts now (`failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<u64>,
    /// The stream it came from (`other_stream`).
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<String>,
}

impl Redriven {
    /// An outcome for `summary`'s dead letter, details to fill in.
    fn new(summary: &Summary, outcome: &'static str) -> Self {
        Self {
            id: summary.id.clone(),
            entry_id: summary.entry_id.clone(),
            user_id: summary.user_id.clone(),
            event_type: summary.event_type.clone(),
            outcome,
            games: None,
            recorded: None,
            error: None,
            new_id: None,
            attempts: None,
            stream: None,
        }
    }

    /// Whether the dead letter was not redriven and needs a person.
    fn is_failure(&self) -> bool {
        matches!(self.outcome, "failed" | "cannot_redrive")
    }

    /// The text line.
    fn line(&self) -> String {
        let head = format!(
            "{} entry={} user={}",
            self.id,
            self.entry_id.as_deref().map_or(Cow::Borrowed("-"), safe),
            quoted(self.user_id.as_deref())
        );
        let recorded = self.recorded.as_deref().map_or(Cow::Borrowed("-"), safe);
        let error = quoted(self.error.as_deref());
        let what = match self.outcome {
            "applied" => format!(
                "applied ({} games); removed",
                self.games.unwrap_or_default()
            ),
            "already_applied" => "already applied; removed".to_owned(),
            "superseded" => {
                format!("superseded: the user's later entry {recorded} is applied; removed")
            }
            "failed" => format!(
                "failed: {error}; kept as {} with attempts={}",
                self.new_id.as_deref().map_or(Cow::Borrowed("-"), safe),
                self.attempts.unwrap_or_default()
            ),
            "cannot_redrive" => format!("cannot be redriven: {error}; left as it is"),
            "other_stream" => format!(
                "of stream {}, not --stream; left as it is",
                quoted(self.stream.as_deref())
            ),
            "gone" => "gone (removed meanwhile)".to_owned(),
            "would_apply" => "would apply, then be removed".to_owned(),
            "would_skip" => {
                format!("would be skipped (the record holds {recorded}), then removed")
            }
            other => other.to_owned(),
        };
        format!("{head} {what}")
    }
}

/// Sends dead letters back through the cascade, oldest original entry
/// first; see the module's documentation.
async fn redrive(
    ctx: &mut Ctx,
    target: &RedisTarget,
    redis_args: &RedisArgs,
    which: DeadLetterChoice,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    let stream = redis_args.stream.as_str();
    let candidates = match which.id {
        Some(id) => {
            let entry = ctx.get_or_fail(id).await?;
            let parts = Parts::of(&entry.fields);
            if let Some(other) = parts.meta(STREAM_FIELD).filter(|other| other != stream) {
                return Err(InputError(format!(
                    "the dead letter {id} is of stream {other:?}, not --stream {stream:?}: redrive it with --stream {other:?} and that stream's --key-prefix"
                ))
                .into());
            }
            vec![(parts.entry_id(), id)]
        }
        None => all_candidates(ctx).await?,
    };
    if candidates.is_empty() {
        if !json {
            println!("no dead letters in {:?}", ctx.dead);
        }
        return Ok(());
    }
    let store = target.lobby_store(&redis_args.key_prefix)?;
    let last = Arc::new(Mutex::new(None));
    let handler = CascadeHandler::new(Observed {
        store: store.clone(),
        last: Arc::clone(&last),
    });
    let (mut done, mut failures) = (0_usize, 0_usize);
    for (_, id) in candidates {
        let Some(entry) = ctx.get(id).await? else {
            report(
                &Redriven::new(&summarize(&StreamEntry { id, fields: vec![] }), "gone"),
                json,
            )?;
            continue;
        };
        let summary = summarize(&entry);
        let event = match redrivable(&entry, stream) {
            Ok(event) => event,
            Err(Unfit::OtherStream(other)) => {
                let mut result = Redriven::new(&summary, "other_stream");
                result.stream = Some(other);
                report(&result, json)?;
                continue;
            }
            Err(Unfit::Cannot(why)) => {
                let mut result = Redriven::new(&summary, "cannot_redrive");
                result.error = Some(why);
                failures += 1;
                report(&result, json)?;
                continue;
            }
        };
        let result = if dry_run {
            predict(&store, &summary, &event, &ctx.url).await?
        } else {
            *last.lock().unwrap_or_else(PoisonError::into_inner) = None;
            match handler.handle(&event).await {
                Ok(()) => {
                    let outcome = last.lock().unwrap_or_else(PoisonError::into_inner).take();
                    let result = applied(&summary, &event, outcome);
                    ctx.remove(id).await.with_context(|| {
                        format!(
                            "the cascade of the dead letter {id} is applied, but the dead letter could not be removed (a later redrive finds it applied and removes it)"
                        )
                    })?;
                    result
                }
                Err(err) if err.is_transient() => {
                    report_done(done, failures, dry_run, json);
                    return Err(anyhow!(
                        "cannot redrive the dead letter {id}: Redis failed ({err}); it and the dead letters after it are left as they are (not counted as attempts); redrive again once Redis answers"
                    ));
                }
                Err(err) => {
                    let error = err.to_string();
                    let attempts = summary.attempts.unwrap_or(0).saturating_add(1);
                    let mut result = Redriven::new(&summary, "failed");
                    match ctx.replace(id, &error, attempts).await? {
                        Some(new_id) => {
                            result.new_id = Some(new_id.to_string());
                            result.attempts = Some(attempts);
                        }
                        None => result.outcome = "gone",
                    }
                    result.error = Some(error);
                    result
                }
            }
        };
        if result.is_failure() {
            failures += 1;
        } else {
            done += 1;
        }
        report(&result, json)?;
    }
    report_done(done, failures, dry_run, json);
    if failures > 0 {
        return Err(anyhow!(
            "{failures} dead letter(s) not redriven; they are still in {:?} (see above)",
            ctx.dead
        ));
    }
    Ok(())
}

/// Prints one redrive result.
fn report(result: &Redriven, json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let line = if json {
        serde_json::to_string(result).context("cannot encode a redrive result as JSON")?
    } else {
        result.line()
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// The closing line of a redrive in text mode.
fn report_done(done: usize, failures: usize, dry_run: bool, json: bool) {
    if json {
        return;
    }
    if dry_run {
        println!("dry run: {done} would be redriven, {failures} cannot be; nothing was changed");
    } else {
        println!("redrive: {done} done, {failures} not redriven");
    }
}

/// Every dead letter there now, as (original entry id, dead letter id),
/// sorted by the original entry (those without one last, by their own id).
/// Dead letters added after this (new ones, the replacements of this
/// redrive's failures) are not taken.
async fn all_candidates(ctx: &mut Ctx) -> anyhow::Result<Vec<(Option<EntryId>, EntryId)>> {
    let Some(end) = ctx.last_id().await? else {
        return Ok(Vec::new());
    };
    let end = end.to_string();
    let mut candidates = Vec::new();
    let mut start = "-".to_owned();
    loop {
        let entries = ctx.range(&start, &end, PAGE).await?;
        let Some(last) = entries.last().map(|entry| entry.id) else {
            break;
        };
        candidates.extend(
            entries
                .iter()
                .map(|entry| (Parts::of(&entry.fields).entry_id(), entry.id)),
        );
        if entries.len() < PAGE {
            break;
        }
        start = format!("({last}");
    }
    candidates.sort_by_key(|&(entry, id)| (entry.is_none(), entry, id));
    Ok(candidates)
}

/// Why a dead letter is not redriven.
enum Unfit {
    /// It came from another stream.
    OtherStream(String),
    /// It cannot be applied: why.
    Cannot(String),
}

/// The event a dead letter of `stream` carries, if it can be applied.
fn redrivable(entry: &StreamEntry, stream: &str) -> Result<UserLifecycleEvent, Unfit> {
    let parts = Parts::of(&entry.fields);
    let Some(entry_id) = parts.entry_id() else {
        return Err(Unfit::Cannot(format!(
            "no valid {ENTRY_ID_FIELD}: not a dead letter the worker wrote"
        )));
    };
    match parts.meta(STREAM_FIELD) {
        Some(other) if other != stream => return Err(Unfit::OtherStream(other)),
        Some(_) => {}
        None => {
            return Err(Unfit::Cannot(format!(
                "no {STREAM_FIELD}: not a dead letter the worker wrote"
            )))
        }
    }
    if let Some(omitted) = parts.meta(FIELDS_OMITTED_FIELD) {
        return Err(Unfit::Cannot(format!(
            "the copy left out {omitted} of the entry's fields, so it may not decode as the entry did"
        )));
    }
    let event = decode_user_lifecycle_event(entry_id, parts.original)
        .map_err(|err| Unfit::Cannot(format!("malformed: {err}")))?;
    if !event.event_type.is_known() {
        return Err(Unfit::Cannot(format!(
            "the event type {:?} is not one the worker acts on",
            event.event_type.as_str()
        )));
    }
    Ok(event)
}

/// The result of a cascade that succeeded.
fn applied(
    summary: &Summary,
    event: &UserLifecycleEvent,
    outcome: Option<CascadeOutcome>,
) -> Redriven {
    match outcome {
        Some(CascadeOutcome::AlreadyApplied { recorded }) => {
            let mut result = Redriven::new(
                summary,
                if recorded == event.entry_id {
                    "already_applied"
                } else {
                    "superseded"
                },
            );
            result.recorded = Some(recorded.to_string());
            result
        }
        Some(CascadeOutcome::Applied { games, .. }) => {
            let mut result = Redriven::new(summary, "applied");
            result.games = Some(games);
            result
        }
        None => Redriven::new(summary, "applied"),
    }
}

/// What a redrive would do with `event`, from the user's cascade record.
async fn predict(
    store: &RedisLobbyStore,
    summary: &Summary,
    event: &UserLifecycleEvent,
    url: &str,
) -> anyhow::Result<Redriven> {
    let record = with_url(store.cascade_record(&event.user_id).await, url)?;
    let recorded = record.and_then(|record| record.entry_id.parse::<EntryId>().ok());
    Ok(match recorded {
        Some(recorded) if recorded >= event.entry_id => {
            let mut result = Redriven::new(summary, "would_skip");
            result.recorded = Some(recorded.to_string());
            result
        }
        _ => Redriven::new(summary, "would_apply"),
    })
}

/// What `purge --json` prints.
#[derive(Serialize)]
struct Purged<'a> {
    /// The dead-letter stream.
    dead_letter_stream: &'a str,
    /// How many were removed.
    removed: u64,
}

/// Removes dead letters: one, all, or those older than an age.
async fn purge(ctx: &mut Ctx, which: PurgeChoice, yes: bool, json: bool) -> anyhow::Result<()> {
    let removed = if let Some(id) = which.id {
        if !ctx.remove(id).await? {
            return Err(anyhow!("no dead letter {id} in {:?}", ctx.dead));
        }
        1
    } else {
        // The range is fixed before counting: dead letters added meanwhile
        // have later ids and are neither counted nor removed.
        let end = if which.all {
            ctx.last_id().await?.map(|last| last.to_string())
        } else {
            let age = which.older_than.unwrap_or(Duration::ZERO);
            let now = ctx.now_ms().await?;
            let cutoff = now.saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
            (cutoff > 0).then(|| format!("({cutoff}-0"))
        };
        match end {
            None => 0,
            Some(end) => {
                let count = ctx.sweep("-", &end, false).await?;
                if count > 1 && !yes {
                    return Err(InputError(format!(
                        "this would remove {count} dead letters from {:?}; add --yes to remove them",
                        ctx.dead
                    ))
                    .into());
                }
                if count == 0 {
                    0
                } else {
                    ctx.sweep("-", &end, true).await?
                }
            }
        }
    };
    if json {
        let line = serde_json::to_string(&Purged {
            dead_letter_stream: &ctx.dead,
            removed,
        })
        .context("cannot encode the result as JSON")?;
        println!("{line}");
    } else {
        println!("removed {removed} dead letter(s) from {:?}", ctx.dead);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        items
            .iter()
            .map(|(name, value)| (name.as_bytes().to_vec(), value.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn the_copys_fields_are_the_last_ones() {
        let fields = pairs(&[
            ("event_type", "user.deleted"),
            ("dead_letter_entry_id", "forged"),
            ("user_id", "u"),
            ("occurred_at_ms", "1"),
            (ENTRY_ID_FIELD, "5-1"),
            (STREAM_FIELD, "s"),
            (ERROR_FIELD, "boom\nline"),
            (ATTEMPTS_FIELD, "3"),
        ]);
        let entry = StreamEntry {
            id: EntryId::new(1_700_000_000_000, 0),
            fields,
        };
        let parts = Parts::of(&entry.fields);
        assert_eq!(parts.original.len(), 4);
        assert_eq!(parts.entry_id(), Some(EntryId::new(5, 1)));
        let summary = summarize(&entry);
        assert_eq!(summary.user_id.as_deref(), Some("u"));
        assert_eq!(summary.attempts, Some(3));
        assert!(list_line(&summary).contains(r#"error="boom\nline""#));
        let event = redrivable(&entry, "s").ok().unwrap();
        assert_eq!(event.entry_id, EntryId::new(5, 1));
        assert!(matches!(
            redrivable(&entry, "other"),
            Err(Unfit::OtherStream(_))
        ));
    }

    #[test]
    fn a_copy_without_its_fields_cannot_be_redriven() {
        let entry = StreamEntry {
            id: EntryId::new(1, 0),
            fields: pairs(&[("user_id", "u")]),
        };
        assert!(matches!(redrivable(&entry, "s"), Err(Unfit::Cannot(_))));
        let entry = StreamEntry {
            id: EntryId::new(1, 0),
            fields: pairs(&[
                ("event_type", "user.created"),
                ("user_id", "u"),
                ("occurred_at_ms", "1"),
                (ENTRY_ID_FIELD, "5-1"),
                (STREAM_FIELD, "s"),
            ]),
        };
        assert!(
            matches!(redrivable(&entry, "s"), Err(Unfit::Cannot(why)) if why.contains("user.created"))
        );
    }
}
