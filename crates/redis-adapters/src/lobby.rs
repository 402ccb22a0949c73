//! The lobby store on Redis, and the cascade as bounded server-side steps.
//!
//! Keys (prefix `lobby` by default): `<p>:game:<id>` (hash: `owner_id`,
//! `status`, ...), `<p>:game:<id>:{members,applicants,invitees,dropped}`
//! (sets), `<p>:user:<id>:games` (set: the index the cascade walks) and
//! `<p>:user:<id>:cascade` (hash: the record of the cascade applied). In
//! the cluster key layout ([`KeyLayout::Cluster`]) each id is in a hash
//! tag (`<p>:game:{<id>}`, `<p>:user:{<id>}:games`), and since a script
//! may then touch one slot only, each game is its own script call and the
//! finishing call sees only the user's keys.
//!
//! Redis runs a script alone, so a script that walked all of a user's games
//! would stop every other client for as long as the user has games (1.15 s
//! for a user in 100,000). A cascade is therefore applied in steps of at
//! most a page of games ([`DEFAULT_PAGE_GAMES`]) each: a user with no more
//! games than that (the common case) costs one script call, which does
//! everything; a larger index is walked with `SSCAN`, a page of games per
//! script call, and the cascade ends with the same single call once the
//! handled games are out of the index. No reader sees half of one game's
//! change, nor a record before every game is done. When a script meets a
//! key of the wrong type it undoes its own writes before failing (Redis
//! does not roll back a script that fails midway). The scripts do not hold
//! the rules: the domain's rule table ([`lifecycle_domain::game_action`]) is
//! passed in as an argument, so the rules live, and are tested, in one
//! place.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use lifecycle_domain::{
    for_log, game_action, BoxFuture, CascadeOutcome, EntryId, Game, GameStatus, KeyLayout,
    LobbyStore, MemberChange, StoreError, UserCascade,
};
use lifecycle_streams::{RedisConnection, RedisEndpoint};
use redis::{AsyncCommands, Script, Value};
use tracing::{debug, warn};

use crate::connect::lazy_manager;
use crate::store_error;

/// Games one script call handles at most, unless
/// [`RedisLobbyStore::with_page_size`] says otherwise. A game costs Redis 10
/// to 15 µs (a few `SREM`s, a `HMGET`, an `EXISTS`), so a page keeps each
/// call under a millisecond or so, with room for a busy machine below the
/// few milliseconds allowed; and a user with this many games or fewer (the
/// common case is a handful) is handled in one call.
pub const DEFAULT_PAGE_GAMES: usize = 25;

/// Game scripts in flight at once in the cluster layout, where each game is
/// its own call: enough to keep every master busy over one connection each,
/// few enough that the lobby's own commands are not queued behind many.
const GAMES_IN_FLIGHT: usize = 16;

/// A game's sets, in the order [`CASCADE_GAME`] takes them after the hash.
const GAME_SETS: [&str; 4] = ["members", "applicants", "invitees", "dropped"];

/// Walks of a user's index one cascade makes at most: each handles every
/// game it finds, so another walk is needed only for games added meanwhile;
/// past this many the lobby outpaces the cascade, and the event fails (to
/// be retried) rather than holding its worker for ever.
const MAX_WALKS: u32 = 100;

/// Handled games removed from a user's index per `SREM` once a walk is
/// done: a plain command, cheap per member, bounded like the pages.
const REMOVE_BATCH: usize = 1_000;

/// The part both cascade scripts share. ARGV 1 to 5: prefix, user id, event
/// type, entry id, then the rule table as one string of ten two-character
/// codes, for the statuses `open`, `running`, `finished`, `cancelled` and
/// any other, each for a user who does not own the game and one who does (a
/// code is the members change, `K` keep, `R` remove, `D` move to dropped,
/// and the cancel flag, `0`/`1`).
///
/// It defines `apply_game(id, key)`, which applies the rules to the game
/// whose hash is `key` (its sets are `key` followed by `:members` and so
/// on, in either key layout) and counts it in `touched` (and in `unknown`
/// when its status is not one the rules name); a game id without a hash is
/// skipped. The guard on the user's record is [`lua_cascade_guard`], for
/// the scripts that see it.
///
/// All or nothing per call: Redis does not roll back a script that fails
/// midway, so each call keeps an undo log of each write that changed
/// something and, when a key turns out to hold the wrong type, replays it
/// backwards before failing. Keys are read only where the rules need their
/// contents (the record, the index, the game hash); set writes go straight
/// to `SREM`/`SADD`, whose replies tell both the type and whether anything
/// changed. Most of a script's cost is per Redis call, so this halves the
/// calls of a check-then-write script. Keys the rules leave alone (the
/// members of a finished game) are not touched. The undo restores contents,
/// not expiry times (lobby keys carry none), and needs `HDEL` besides the
/// commands of the cascade itself (see the README's ACL note).
macro_rules! lua_cascade_prelude {
    () => {
        r"
local prefix, user, event_type, entry_id, rules = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

-- The undo log, flat to spare a table per write: four slots per entry, the
-- undoing command and key, then for a game hash its earlier status and
-- cancel reason (false when absent).
local undo, logged = {}, 0
local function log(command, key, status, reason)
  undo[logged + 1], undo[logged + 2], undo[logged + 3], undo[logged + 4] = command, key, status, reason
  logged = logged + 4
end
local function rollback()
  for i = logged - 3, 1, -4 do
    local command, key = undo[i], undo[i + 1]
    if command == 'HRESTORE' then
      for field, earlier in pairs({ status = undo[i + 2], cancel_reason = undo[i + 3] }) do
        if earlier then redis.call('HSET', key, field, earlier) else redis.call('HDEL', key, field) end
      end
    else
      redis.call(command, key, user)
    end
  end
end
-- Undoes everything and fails: a wrong type names the key; any other error
-- (READONLY after a failover, NOREPLICAS, OOM) keeps its own code, so that
-- the worker retries what can pass.
local function fail(key, reply, what)
  rollback()
  if string.sub(reply.err, 1, 9) == 'WRONGTYPE' then
    error({ err = 'WRONGTYPE lobby key ' .. key .. ' cannot be ' .. what .. ' as expected: ' .. reply.err })
  end
  error(reply)
end
-- A read's reply, or failure.
local function checked(key, reply)
  if type(reply) == 'table' and reply.err then fail(key, reply, 'read') end
  return reply
end
-- A set write's reply, or failure; when it changed the set, log how to
-- undo it.
local function changed(key, reply, undo_command)
  if type(reply) == 'table' and reply.err then fail(key, reply, 'changed') end
  if reply == 1 then log(undo_command, key, false, false) end
  return reply == 1
end

local touched = 0
local unknown
local function apply_game(game_id, game_key)
  local fields = checked(game_key, redis.pcall('HMGET', game_key, 'status', 'owner_id', 'cancel_reason'))
  local status, owner = fields[1], fields[2]
  if not (status or owner or redis.call('EXISTS', game_key) == 1) then return end
  touched = touched + 1
  local index
  if status == 'open' then index = 0
  elseif status == 'running' then index = 1
  elseif status == 'finished' then index = 2
  elseif status == 'cancelled' then index = 3
  else
    index = 4
    unknown = unknown or {}
    unknown[#unknown + 1] = game_id
  end
  local at = index * 4 + ((owner == user) and 3 or 1)
  local op = string.sub(rules, at, at)
  -- Applicant and invitee sets are usually absent: one EXISTS spares
  -- a write to each.
  local applicants, invitees = game_key .. ':applicants', game_key .. ':invitees'
  if redis.call('EXISTS', applicants, invitees) > 0 then
    changed(applicants, redis.pcall('SREM', applicants, user), 'SADD')
    changed(invitees, redis.pcall('SREM', invitees, user), 'SADD')
  end
  if op ~= 'K' then
    local members = game_key .. ':members'
    if changed(members, redis.pcall('SREM', members, user), 'SADD') and op == 'D' then
      local dropped = game_key .. ':dropped'
      changed(dropped, redis.pcall('SADD', dropped, user), 'SREM')
    end
  end
  if string.sub(rules, at + 1, at + 1) == '1' then
    -- The hash was read above, so this write cannot fail.
    redis.call('HSET', game_key, 'status', 'cancelled', 'cancel_reason', event_type)
    log('HRESTORE', game_key, status or false, fields[3] or false)
  end
end
-- The reply of a call that applied: its count, then its games of unknown
-- status.
local function applied(count)
  local reply = { 1, count }
  if unknown then
    for _, game_id in ipairs(unknown) do reply[#reply + 1] = game_id end
  end
  return reply
end
"
    };
}

/// The guard of the scripts that see the user's record (KEYS[1]): when it
/// holds this entry or a later one, the script returns `{0, recorded entry
/// id}` before any write. Follows [`lua_cascade_prelude`].
macro_rules! lua_cascade_guard {
    () => {
        r"
local record_key = KEYS[1]
local recorded = checked(record_key, redis.pcall('HGET', record_key, 'entry_id'))
if recorded and not id_less(recorded, entry_id) then
  return { 0, recorded }
end
"
    };
}

/// The whole cascade when the index is small, and its last step when it is
/// not. KEYS: the user's record, then the user's index. ARGV 1 to 5 as in
/// [`lua_cascade_prelude`], then occurred_at_ms, the
/// event's trace id (empty: none), the time of application
/// (`applied_at_ms`), the page size, and the games counted by the steps
/// before (0 when there were none). Returns `{2, games in the index}`,
/// having written nothing, when the index holds more than a page;
/// otherwise applies the rules to every indexed game, deletes the index,
/// writes the record and returns `{1, games counted in all, unknown-status
/// game ids of this call...}`; `{0, recorded entry id}` when the record
/// already holds this entry or a later one.
///
/// The record (see [`CascadeRecord`]) describes the newest cascade by entry
/// id, rewritten whole when one applies: its `trace_id` is removed when the
/// newer event has none, so it never names an older event's trace.
/// `applied_at_ms` is the worker's clock as it sends the script, not Redis's
/// `TIME`: Redis checks a script's commands against the caller's ACL, `TIME`
/// is in no category the documented grant has (`+@read +@write +@scripting
/// +@connection`, only `@fast`), and a grant that worked before this field
/// existed must not start failing every cascade. (Workers on skewed clocks
/// write skewed times; the entry id, not this time, orders the cascades.) A
/// replay or an older entry returns before any write, so it does not move
/// `applied_at_ms` either: the record stays byte for byte as it was, and
/// says when its entry was first applied. `applied_at_ms` is the one field
/// in which two orders of the same cascades may differ.
const FINISH_CASCADE: &str = concat!(
    lua_id_less!(),
    lua_cascade_prelude!(),
    lua_cascade_guard!(),
    r"
local occurred, trace_id, applied_at = ARGV[6], ARGV[7], ARGV[8]
local page, carried = tonumber(ARGV[9]), tonumber(ARGV[10])
local index_key = KEYS[2]
local count = checked(index_key, redis.pcall('SCARD', index_key))
-- More than a page: the caller walks the index a page per call, and this
-- call writes nothing.
if count > page then
  return { 2, count }
end
local game_ids = checked(index_key, redis.pcall('SMEMBERS', index_key))
for _, game_id in ipairs(game_ids) do apply_game(game_id, prefix .. ':game:' .. game_id) end
-- At most a page of members: deleting them is as cheap as the page.
if #game_ids > 0 then redis.call('DEL', index_key) end
local games = carried + touched
-- The record's key was read above, and this is either the script's first
-- write (refused cleanly, nothing to undo) or comes after one (Redis no
-- longer refuses it), so neither write can fail halfway. HSET goes first:
-- an HDEL first would let the HSET through past maxmemory.
if trace_id ~= '' then
  redis.call('HSET', record_key, 'event_type', event_type, 'entry_id', entry_id,
    'occurred_at_ms', occurred, 'games', games, 'trace_id', trace_id, 'applied_at_ms', applied_at)
else
  redis.call('HSET', record_key, 'event_type', event_type, 'entry_id', entry_id,
    'occurred_at_ms', occurred, 'games', games, 'applied_at_ms', applied_at)
  if recorded then redis.call('HDEL', record_key, 'trace_id') end
end
return applied(games)
"
);

/// One page of a large cascade, in the plain key layout. KEYS: the user's
/// record. ARGV 1 to 5 as in [`lua_cascade_prelude`], then the ids of the games to handle (at most a page, found by the caller
/// with `SSCAN`). Applies the rules to each and returns `{1, games counted,
/// unknown-status game ids...}`, or `{0, recorded entry id}` when the record
/// already holds this entry or a later one (another run finished it). It
/// neither writes the record nor touches the index: a crash after it leaves
/// the index whole, and the replay walks it again, the games already done
/// changing nothing.
const CASCADE_PAGE: &str = concat!(
    lua_id_less!(),
    lua_cascade_prelude!(),
    lua_cascade_guard!(),
    r"
for i = 6, #ARGV do apply_game(ARGV[i], prefix .. ':game:' .. ARGV[i]) end
return applied(touched)
"
);

/// One game of a cascade in the cluster key layout, where a script may
/// touch one slot only: KEYS are the game's hash and its `members`,
/// `applicants`, `invitees` and `dropped` sets (one slot, through the
/// hash tag); ARGV 1 to 5 as in [`lua_cascade_prelude`], then the game id.
/// Applies the rules to the game and returns `{1, games counted (0 or 1),
/// the id again if its status is unknown}`. It cannot see the user's
/// record (another slot): the caller checks the record first, through
/// [`FINISH_CASCADE`], and applying the rules to a game already done
/// changes nothing.
const CASCADE_GAME: &str = concat!(
    lua_id_less!(),
    lua_cascade_prelude!(),
    r"
apply_game(ARGV[6], KEYS[1])
return applied(touched)
"
);

/// The recorded cascade of one user (`<p>:user:<id>:cascade`): the newest
/// applied, by entry id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CascadeRecord {
    /// The event type applied.
    pub event_type: String,
    /// The entry applied.
    pub entry_id: String,
    /// When the event happened.
    pub occurred_at_ms: String,
    /// Games touched.
    pub games: u64,
    /// The event's distributed-trace id; `None` when it had none (or the
    /// record was written before trace ids were kept).
    pub trace_id: Option<String>,
    /// When the cascade was applied, in milliseconds since the Unix epoch by
    /// the applying worker's clock; a replay does not move it. `None` in a
    /// record written before this field was kept.
    pub applied_at_ms: Option<u64>,
}

/// The lobby on Redis.
#[derive(Clone)]
pub struct RedisLobbyStore {
    conn: RedisConnection,
    prefix: String,
    /// [`FINISH_CASCADE`]: the whole cascade of a small index, the last
    /// step of a large one.
    finish: Script,
    /// [`CASCADE_PAGE`]: one page of a large index (plain layout).
    page: Script,
    /// [`CASCADE_GAME`]: one game (cluster layout).
    game: Script,
    /// Games one script call handles at most.
    page_games: usize,
    /// How the lobby's keys are named.
    layout: KeyLayout,
    /// The domain's rule table, encoded once as the scripts' argument.
    rules: String,
}

impl std::fmt::Debug for RedisLobbyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLobbyStore")
            .field("prefix", &self.prefix)
            .field("page_games", &self.page_games)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// The domain's rule table as the script's ten codes, in its order.
fn rule_codes() -> String {
    let unknown = GameStatus::Unknown(String::new());
    GameStatus::KNOWN
        .iter()
        .chain([&unknown])
        .flat_map(|status| [false, true].map(|owner| game_action(status, owner)))
        .map(|action| {
            let members = match action.members {
                MemberChange::Keep => 'K',
                MemberChange::Remove => 'R',
                MemberChange::MoveToDropped => 'D',
            };
            format!("{members}{}", u8::from(action.cancel))
        })
        .collect()
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(raw) => Some(String::from_utf8_lossy(raw).into_owned()),
        Value::SimpleString(text) => Some(text.clone()),
        Value::Int(number) => Some(number.to_string()),
        _ => None,
    }
}

fn unexpected(action: String, reply: &Value) -> StoreError {
    StoreError {
        action,
        permanent: true,
        source: format!("unexpected reply from the cascade script: {reply:?}").into(),
    }
}

/// What one cascade script call answered.
enum Step {
    /// Applied: the games counted (by the finishing call: in all), and those
    /// of unknown status.
    Applied {
        games: u64,
        unknown_status: Vec<String>,
    },
    /// The record already holds this entry or a later one.
    Recorded(EntryId),
    /// The index holds this many games, more than a page (the finishing
    /// call only; it wrote nothing).
    TooMany(u64),
}

impl Step {
    /// Reads a script's reply (`finishing`: of [`FINISH_CASCADE`], the one
    /// that may decline); `None` when it is not one that script gives.
    fn read(reply: &Value, finishing: bool) -> Option<Self> {
        let Value::Array(items) = reply else {
            return None;
        };
        match items.as_slice() {
            [Value::Int(1), Value::Int(games), unknown @ ..] => Some(Self::Applied {
                games: u64::try_from(*games).unwrap_or_default(),
                unknown_status: unknown.iter().filter_map(text).collect(),
            }),
            [Value::Int(0), recorded] => text(recorded)
                .and_then(|id| id.parse::<EntryId>().ok())
                .map(Self::Recorded),
            [Value::Int(2), Value::Int(indexed)] if finishing => {
                Some(Self::TooMany(u64::try_from(*indexed).unwrap_or_default()))
            }
            _ => None,
        }
    }
}

/// The outcome of a cascade whose entry the record already holds (or a
/// later one), logged.
fn already(cascade: &UserCascade, recorded: EntryId) -> CascadeOutcome {
    debug!(
        stream_entry_id = %cascade.entry_id,
        user_id = ?for_log(&cascade.user_id),
        recorded = %recorded,
        "cascade already applied; nothing changed"
    );
    CascadeOutcome::AlreadyApplied { recorded }
}

/// The next cursor and the members of an `SSCAN` reply, as bytes (ids are
/// passed back to Redis exactly as stored).
fn scan_reply(reply: &Value) -> Option<(&[u8], Vec<&[u8]>)> {
    let Value::Array(parts) = reply else {
        return None;
    };
    let [Value::BulkString(cursor), Value::Array(members)] = parts.as_slice() else {
        return None;
    };
    let ids = members
        .iter()
        .map(|member| match member {
            Value::BulkString(id) => Some(id.as_slice()),
            _ => None,
        })
        .collect::<Option<Vec<&[u8]>>>()?;
    Some((cursor.as_slice(), ids))
}

impl RedisLobbyStore {
    /// A store under `prefix`; it connects on first use and reconnects after
    /// faults.
    ///
    /// # Errors
    ///
    /// When the client's settings cannot make a connection manager.
    pub fn new(
        endpoint: impl Into<RedisEndpoint>,
        prefix: &str,
    ) -> Result<Self, redis::RedisError> {
        Ok(Self {
            conn: lazy_manager(endpoint, Duration::from_secs(5))?,
            prefix: prefix.to_owned(),
            finish: Script::new(FINISH_CASCADE),
            page: Script::new(CASCADE_PAGE),
            game: Script::new(CASCADE_GAME),
            page_games: DEFAULT_PAGE_GAMES,
            layout: KeyLayout::Plain,
            rules: rule_codes(),
        })
    }

    /// The same store, its keys named by `layout` ([`KeyLayout::Plain`]
    /// unless set). In the cluster layout each game is its own script call
    /// (a script may touch one slot), several in flight at once.
    #[must_use]
    pub fn with_key_layout(mut self, layout: KeyLayout) -> Self {
        self.layout = layout;
        self
    }

    /// The same store, handling at most `games` games per script call (at
    /// least one): a smaller page blocks Redis for less time per call and
    /// costs more calls. [`DEFAULT_PAGE_GAMES`] unless set.
    #[must_use]
    pub fn with_page_size(mut self, games: usize) -> Self {
        self.page_games = games.max(1);
        self
    }

    fn game_key(&self, game_id: &str) -> String {
        self.layout.game_key(&self.prefix, game_id)
    }

    fn user_key(&self, user_id: &str, what: &str) -> String {
        self.layout.user_key(&self.prefix, user_id, what)
    }

    /// An invocation of `script` with `keys` and the arguments the cascade
    /// scripts start with.
    fn invocation<'a>(
        &self,
        script: &'a Script,
        keys: &[&[u8]],
        cascade: &UserCascade,
    ) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        invocation
            .arg(&self.prefix)
            .arg(&cascade.user_id)
            .arg(&cascade.event_type)
            .arg(cascade.entry_id.to_string())
            .arg(&self.rules);
        invocation
    }

    /// Sends one step. Sent once, not again at once on a dropped connection
    /// (unlike the idempotent store commands): a dropped connection may be
    /// a Redis that restarted and lost acknowledged writes, and the
    /// consumer must check that (it replays from the stored offset) before
    /// any cascade reaches the new server, or a user's later event could be
    /// applied before the replay of an earlier one. The failure is
    /// transient: the consumer checks, then retries the event, which redoes
    /// only what is not yet done.
    async fn step(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
        finishing: bool,
        action: impl Fn() -> String,
    ) -> Result<Step, StoreError> {
        let reply: Value = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|err| store_error(action(), err))?;
        Step::read(&reply, finishing).ok_or_else(|| unexpected(action(), &reply))
    }

    /// Applies one cascade; see [`LobbyStore::apply_cascade`].
    ///
    /// A user with at most a page of games is one script call. A larger
    /// index is walked a page per call (see [`Self::walk`]); then the
    /// finishing call handles whatever was added to the index meanwhile,
    /// deletes it and writes the record, or, when more than a page was
    /// added, another walk follows. A failure in the middle leaves the
    /// games done so far changed, and the index and record as they were:
    /// retrying the event completes it.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails or a lobby key has the wrong type
    /// (then the call that met it changed nothing).
    pub async fn apply(&self, cascade: &UserCascade) -> Result<CascadeOutcome, StoreError> {
        let action = || format!("apply the cascade of entry {}", cascade.entry_id);
        if !self.layout.holds_id(cascade.user_id.as_bytes()) {
            return Err(StoreError {
                action: action(),
                permanent: true,
                source: format!(
                    "user id {:?} starts with '}}': in the cluster key layout its index and record (lobby:user:{{<id>}}:...) cannot lie in one slot",
                    for_log(&cascade.user_id)
                )
                .into(),
            });
        }
        let mut counted = 0_u64;
        let mut unknown_status = Vec::new();
        let mut calls = 0_u64;
        let mut indexed = 0_u64;
        let record_key = self.user_key(&cascade.user_id, "cascade");
        let index_key = self.user_key(&cascade.user_id, "games");
        // In the cluster layout the finishing call sees the user's keys
        // only (one slot), so it applies no game: every game is its own call.
        let finish_page = match self.layout {
            KeyLayout::Plain => self.page_games,
            KeyLayout::Cluster => 0,
        };
        // Each round finishes the cascade or walks the index once more.
        for round in 0..=MAX_WALKS {
            let mut invocation = self.invocation(
                &self.finish,
                &[record_key.as_bytes(), index_key.as_bytes()],
                cascade,
            );
            invocation
                .arg(cascade.occurred_at_ms)
                .arg(&cascade.trace_id)
                .arg(lifecycle_streams::now_ms())
                .arg(finish_page)
                .arg(counted);
            calls = calls.saturating_add(1);
            indexed = match self.step(&invocation, true, action).await? {
                Step::Applied {
                    games,
                    unknown_status: last,
                } => {
                    unknown_status.extend(last);
                    return Ok(self.applied(cascade, games, unknown_status, calls));
                }
                Step::Recorded(recorded) => return Ok(already(cascade, recorded)),
                Step::TooMany(indexed) => indexed,
            };
            if round == MAX_WALKS {
                break;
            }
            debug!(
                stream_entry_id = %cascade.entry_id,
                user_id = ?for_log(&cascade.user_id),
                indexed,
                page = self.page_games,
                "cascade of a large index: walking it a page per call"
            );
            if let Some(recorded) = self
                .walk(cascade, &mut counted, &mut unknown_status, &mut calls)
                .await?
            {
                return Ok(already(cascade, recorded));
            }
        }
        Err(StoreError {
            action: action(),
            permanent: false,
            source: format!(
                "the index of user {:?} still holds {indexed} games after {MAX_WALKS} walks of it: games are added to it faster than the cascade removes them",
                for_log(&cascade.user_id)
            )
            .into(),
        })
    }

    /// One walk of a large index: `SSCAN` pages of it, and for each page a
    /// script call applying the rules to its games (in the cluster layout,
    /// a call per game, [`GAMES_IN_FLIGHT`] at once), each id once, however
    /// often the scan returns it; then, every game found being done, the
    /// handled games removed from the index in bounded `SREM`s. A game added
    /// meanwhile that the scan missed stays in the index for the finishing
    /// call (or the next walk). Returns the recorded entry when a page found
    /// the record already at this entry or a later one. The handled ids are
    /// held here until removed (a few MiB for 100,000 games): the index
    /// must not lose them before every game is done.
    async fn walk(
        &self,
        cascade: &UserCascade,
        counted: &mut u64,
        unknown_status: &mut Vec<String>,
        calls: &mut u64,
    ) -> Result<Option<EntryId>, StoreError> {
        let index_key = self.user_key(&cascade.user_id, "games");
        let scan_action = || format!("scan the games of user {:?}", for_log(&cascade.user_id));
        let page_action = || format!("apply a page of the cascade of entry {}", cascade.entry_id);
        let mut conn = self.conn.clone();
        let mut handled: HashSet<Vec<u8>> = HashSet::new();
        let mut cursor = b"0".to_vec();
        loop {
            let reply: Value = redis::cmd("SSCAN")
                .arg(&index_key)
                .arg(&cursor)
                .arg("COUNT")
                .arg(self.page_games)
                .query_async(&mut conn)
                .await
                .map_err(|err| store_error(scan_action(), err))?;
            let (next, ids) =
                scan_reply(&reply).ok_or_else(|| unexpected(scan_action(), &reply))?;
            let mut fresh: Vec<&[u8]> = ids
                .into_iter()
                .filter(|id| handled.insert(id.to_vec()))
                .collect();
            if self.layout == KeyLayout::Cluster {
                let (games, unknown) = self.apply_each(cascade, &fresh).await?;
                *calls = calls.saturating_add(u64::try_from(fresh.len()).unwrap_or(u64::MAX));
                *counted = counted.saturating_add(games);
                unknown_status.extend(unknown);
                fresh.clear();
            }
            // A scan may return more than COUNT (a small set comes whole):
            // the pages are cut here, so that no call exceeds one.
            let record_key = self.user_key(&cascade.user_id, "cascade");
            for page in fresh.chunks(self.page_games) {
                let mut invocation = self.invocation(&self.page, &[record_key.as_bytes()], cascade);
                for game_id in page {
                    invocation.arg(*game_id);
                }
                *calls = calls.saturating_add(1);
                match self.step(&invocation, false, page_action).await? {
                    Step::Applied {
                        games,
                        unknown_status: unknown,
                    } => {
                        *counted = counted.saturating_add(games);
                        unknown_status.extend(unknown);
                    }
                    Step::Recorded(recorded) => return Ok(Some(recorded)),
                    // Not read from a page's reply.
                    Step::TooMany(_) => {}
                }
            }
            if next == b"0" {
                break;
            }
            cursor = next.to_vec();
        }
        let handled: Vec<Vec<u8>> = handled.into_iter().collect();
        for batch in handled.chunks(REMOVE_BATCH) {
            *calls = calls.saturating_add(1);
            redis::cmd("SREM")
                .arg(&index_key)
                .arg(batch)
                .query_async::<()>(&mut conn)
                .await
                .map_err(|err| {
                    store_error(
                        format!(
                            "remove handled games from the index of user {}",
                            cascade.user_id
                        ),
                        err,
                    )
                })?;
        }
        Ok(None)
    }

    /// Applies the rules to each of `game_ids` with a [`CASCADE_GAME`] call
    /// per game (cluster layout), [`GAMES_IN_FLIGHT`] at once; returns the
    /// games counted and those of unknown status. An id that cannot be a
    /// game in this layout (empty) is skipped, as a game without a hash is.
    async fn apply_each(
        &self,
        cascade: &UserCascade,
        game_ids: &[&[u8]],
    ) -> Result<(u64, Vec<String>), StoreError> {
        let action = || format!("apply a game of the cascade of entry {}", cascade.entry_id);
        let prefix = self.prefix.as_str();
        let layout = self.layout;
        // Collected first: a stream over the iterator's closures would not
        // be `Send` for every lifetime, as the port's future must be.
        let (held, skipped): (Vec<&[u8]>, Vec<&[u8]>) =
            game_ids.iter().partition(|id| layout.holds_id(id));
        for game_id in skipped {
            warn!(
                game_id = ?for_log(&String::from_utf8_lossy(game_id)),
                user_id = ?for_log(&cascade.user_id),
                stream_entry_id = %cascade.entry_id,
                "game id skipped: in the cluster key layout an empty id or one starting with '}}' cannot keep a game's keys in one slot"
            );
        }
        let calls: Vec<BoxFuture<'_, Result<Step, StoreError>>> = held
            .into_iter()
            .map(|game_id| -> BoxFuture<'_, Result<Step, StoreError>> {
                let game_key = layout.game_key_bytes(prefix, game_id);
                let sets =
                    GAME_SETS.map(|set| [game_key.as_slice(), b":", set.as_bytes()].concat());
                let mut keys: Vec<&[u8]> = vec![&game_key];
                keys.extend(sets.iter().map(Vec::as_slice));
                let mut invocation = self.invocation(&self.game, &keys, cascade);
                invocation.arg(game_id);
                Box::pin(async move { self.step(&invocation, false, action).await })
            })
            .collect();
        let mut steps = stream::iter(calls).buffer_unordered(GAMES_IN_FLIGHT);
        let mut games = 0_u64;
        let mut unknown = Vec::new();
        while let Some(step) = steps.next().await {
            match step? {
                Step::Applied {
                    games: counted,
                    unknown_status,
                } => {
                    games = games.saturating_add(counted);
                    unknown.extend(unknown_status);
                }
                // Not given by a game's script.
                Step::Recorded(_) | Step::TooMany(_) => {}
            }
        }
        Ok((games, unknown))
    }

    /// The outcome of a cascade applied, logged.
    fn applied(
        &self,
        cascade: &UserCascade,
        games: u64,
        unknown_status: Vec<String>,
        calls: u64,
    ) -> CascadeOutcome {
        for game_id in &unknown_status {
            warn!(
                game_id = ?for_log(game_id),
                user_id = ?for_log(&cascade.user_id),
                stream_entry_id = %cascade.entry_id,
                "game with an unknown status left like a finished one"
            );
        }
        debug!(
            stream_entry_id = %cascade.entry_id,
            event_type = ?cascade.event_type,
            user_id = ?for_log(&cascade.user_id),
            games,
            calls,
            page = self.page_games,
            "cascade applied"
        );
        CascadeOutcome::Applied {
            games,
            unknown_status,
        }
    }

    /// Writes `game` under `game_id` (replacing its sets) and adds it to the
    /// index of its owner and of every user on its roster: what the lobby
    /// does when users create and join games. For seeding demos, benchmarks
    /// and tests.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails.
    pub async fn put_game(&self, game_id: &str, game: &Game) -> Result<(), StoreError> {
        let key = self.game_key(game_id);
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut fields = vec![("owner_id", game.owner_id.clone())];
        if let Some(status) = &game.status {
            fields.push(("status", status.as_str().to_owned()));
        }
        if let Some(reason) = &game.cancel_reason {
            fields.push(("cancel_reason", reason.clone()));
        }
        pipe.del(&key).ignore();
        pipe.hset_multiple(&key, &fields).ignore();
        let mut users: BTreeSet<&str> = BTreeSet::new();
        users.insert(&game.owner_id);
        for (suffix, set) in [
            ("members", &game.members),
            ("applicants", &game.applicants),
            ("invitees", &game.invitees),
            ("dropped", &game.dropped),
        ] {
            let set_key = format!("{key}:{suffix}");
            pipe.del(&set_key).ignore();
            if !set.is_empty() {
                pipe.sadd(&set_key, set.iter().collect::<Vec<_>>()).ignore();
            }
            if suffix != "dropped" {
                users.extend(set.iter().map(String::as_str));
            }
        }
        let fail = |err| store_error(format!("write game {game_id}"), err);
        let mut conn = self.conn.clone();
        match self.layout {
            KeyLayout::Plain => {
                for user in users {
                    pipe.sadd(self.user_key(user, "games"), game_id).ignore();
                }
                pipe.query_async::<()>(&mut conn).await.map_err(fail)
            }
            // The indexes lie in other slots than the game: one
            // transaction for the game, then one command per index.
            KeyLayout::Cluster => {
                pipe.query_async::<()>(&mut conn).await.map_err(fail)?;
                for user in users {
                    conn.sadd::<_, _, ()>(self.user_key(user, "games"), game_id)
                        .await
                        .map_err(fail)?;
                }
                Ok(())
            }
        }
    }

    /// Reads one game; `None` when its hash does not exist.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails.
    pub async fn get_game(&self, game_id: &str) -> Result<Option<Game>, StoreError> {
        let key = self.game_key(game_id);
        let mut conn = self.conn.clone();
        let fail = |err| store_error(format!("read game {game_id}"), err);
        let hash: std::collections::HashMap<String, String> =
            conn.hgetall(&key).await.map_err(fail)?;
        if hash.is_empty() {
            return Ok(None);
        }
        let mut sets: Vec<BTreeSet<String>> = Vec::with_capacity(4);
        for suffix in ["members", "applicants", "invitees", "dropped"] {
            sets.push(
                conn.smembers(format!("{key}:{suffix}"))
                    .await
                    .map_err(fail)?,
            );
        }
        let mut sets = sets.into_iter();
        let mut next = || sets.next().unwrap_or_default();
        Ok(Some(Game {
            status: hash.get("status").map(|status| GameStatus::parse(status)),
            owner_id: hash.get("owner_id").cloned().unwrap_or_default(),
            cancel_reason: hash.get("cancel_reason").cloned(),
            members: next(),
            applicants: next(),
            invitees: next(),
            dropped: next(),
        }))
    }

    /// The games in a user's index.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails.
    pub async fn user_games(&self, user_id: &str) -> Result<BTreeSet<String>, StoreError> {
        self.conn
            .clone()
            .smembers(self.user_key(user_id, "games"))
            .await
            .map_err(|err| store_error(format!("read the games of user {user_id}"), err))
    }

    /// The recorded cascade of a user, if any.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis fails.
    pub async fn cascade_record(&self, user_id: &str) -> Result<Option<CascadeRecord>, StoreError> {
        let hash: std::collections::HashMap<String, String> = self
            .conn
            .clone()
            .hgetall(self.user_key(user_id, "cascade"))
            .await
            .map_err(|err| {
                store_error(format!("read the cascade record of user {user_id}"), err)
            })?;
        if hash.is_empty() {
            return Ok(None);
        }
        let field = |name: &str| hash.get(name).cloned().unwrap_or_default();
        Ok(Some(CascadeRecord {
            event_type: field("event_type"),
            entry_id: field("entry_id"),
            occurred_at_ms: field("occurred_at_ms"),
            games: field("games").parse().unwrap_or_default(),
            trace_id: hash.get("trace_id").cloned(),
            applied_at_ms: hash.get("applied_at_ms").and_then(|ms| ms.parse().ok()),
        }))
    }
}

impl LobbyStore for RedisLobbyStore {
    fn apply_cascade<'a>(
        &'a self,
        cascade: &'a UserCascade,
    ) -> BoxFuture<'a, Result<CascadeOutcome, StoreError>> {
        Box::pin(self.apply(cascade))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_table_is_encoded_in_the_scripts_order() {
        // open, running, finished, cancelled, other; each not owner, owner.
        assert_eq!(rule_codes(), "R0R1D0D0K0K0R0R0K0K0");
    }

    #[test]
    fn script_replies_are_read_by_their_shape() {
        let applied = Value::Array(vec![
            Value::Int(1),
            Value::Int(3),
            Value::BulkString(b"g-1".to_vec()),
            Value::SimpleString("g-2".into()),
            Value::Int(7),
            Value::Nil,
        ]);
        match Step::read(&applied, false) {
            Some(Step::Applied {
                games,
                unknown_status,
            }) => {
                assert_eq!(games, 3);
                assert_eq!(unknown_status, ["g-1", "g-2", "7"]);
            }
            _ => panic!("not read as applied"),
        }
        let recorded = Value::Array(vec![Value::Int(0), Value::BulkString(b"5-1".to_vec())]);
        assert!(matches!(
            Step::read(&recorded, true),
            Some(Step::Recorded(id)) if id == EntryId::new(5, 1)
        ));
        let too_many = Value::Array(vec![Value::Int(2), Value::Int(40)]);
        assert!(matches!(
            Step::read(&too_many, true),
            Some(Step::TooMany(40))
        ));
        // Only the finishing script declines a user with too many games.
        assert!(Step::read(&too_many, false).is_none());
        for junk in [
            Value::Nil,
            Value::Int(1),
            Value::Array(vec![]),
            Value::Array(vec![
                Value::Int(0),
                Value::BulkString(b"not an id".to_vec()),
            ]),
            Value::Array(vec![Value::Int(9), Value::Int(1)]),
        ] {
            assert!(Step::read(&junk, true).is_none(), "{junk:?}");
        }
    }

    #[tokio::test]
    async fn debug_shows_the_settings_and_a_page_holds_a_game_at_least() {
        let client = redis::Client::open("redis://127.0.0.1:1/").unwrap();
        let store = RedisLobbyStore::new(client, "lobby").unwrap();
        let shown = format!("{:?}", store.with_page_size(7));
        assert!(shown.starts_with("RedisLobbyStore {"), "{shown}");
        assert!(shown.contains(r#"prefix: "lobby""#), "{shown}");
        assert!(shown.contains("page_games: 7"), "{shown}");
        let client = redis::Client::open("redis://127.0.0.1:1/").unwrap();
        let store = RedisLobbyStore::new(client, "lobby").unwrap();
        assert_eq!(store.with_page_size(0).page_games, 1);
    }
}
