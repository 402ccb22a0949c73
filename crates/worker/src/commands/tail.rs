//! `lobby-worker tail`: decode entries without handling them or moving the
//! offset.

use lifecycle_streams::RedisConnection;
use std::io::Write;

use anyhow::Context;
use lifecycle_domain::{decode_user_lifecycle_event, EntryId, UserLifecycleEvent};
use lifecycle_streams::{parse_range_reply, parse_xread_reply, StreamEntry};

use redis::Value;
use serde::Serialize;

use crate::cli::TailArgs;
use crate::redis_conn::{connect, explain, RedisTarget};

/// Entries fetched per `XRANGE` page.
const PAGE: u64 = 500;

/// How long one `--follow` read waits before asking again.
const FOLLOW_BLOCK_MS: u64 = 5_000;

/// The `event` object of `tail --json`.
#[derive(Serialize)]
struct JsonEvent<'a> {
    entry_id: String,
    event_type: &'a str,
    user_id: &'a str,
    occurred_at_ms: i64,
    source: &'a str,
    actor_type: &'a str,
    actor_id: &'a str,
    reason_code: &'a str,
    trace_id: &'a str,
}

impl<'a> From<&'a UserLifecycleEvent> for JsonEvent<'a> {
    fn from(event: &'a UserLifecycleEvent) -> Self {
        Self {
            entry_id: event.entry_id.to_string(),
            event_type: event.event_type.as_str(),
            user_id: &event.user_id,
            occurred_at_ms: event.occurred_at_ms,
            source: &event.source,
            actor_type: &event.actor_type,
            actor_id: &event.actor_id,
            reason_code: &event.reason_code,
            trace_id: &event.trace_id,
        }
    }
}

/// One line of `tail --json`.
#[derive(Serialize)]
struct JsonLine<'a> {
    entry_id: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<JsonEvent<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Formats one entry as `tail` prints it.
fn render(entry: &StreamEntry, json: bool) -> anyhow::Result<String> {
    let decoded = decode_user_lifecycle_event(entry.id, &entry.fields);
    if json {
        let line = match &decoded {
            Ok(event) => JsonLine {
                entry_id: entry.id.to_string(),
                status: if event.event_type.is_known() {
                    "ok"
                } else {
                    "unknown_type"
                },
                event: Some(JsonEvent::from(event)),
                error: None,
            },
            Err(err) => JsonLine {
                entry_id: entry.id.to_string(),
                status: "malformed",
                event: None,
                error: Some(err.to_string()),
            },
        };
        return serde_json::to_string(&line).context("cannot encode an entry as JSON");
    }
    // Values are quoted with Rust's escaping: a newline or an escape sequence
    // in an entry cannot forge or hide a line.
    Ok(match decoded {
        Ok(event) => format!(
            "{} {} {:?} user_id={:?} occurred_at_ms={} source={:?} actor_type={:?} actor_id={:?} reason_code={:?} trace_id={:?}",
            event.entry_id,
            if event.event_type.is_known() { "ok" } else { "unknown_type" },
            event.event_type.as_str(),
            event.user_id,
            event.occurred_at_ms,
            event.source,
            event.actor_type,
            event.actor_id,
            event.reason_code,
            event.trace_id,
        ),
        Err(err) => format!("{} malformed {:?}", entry.id, err.to_string()),
    })
}

/// Prints entries from `--from` (or the first) on, until `--count` or the
/// end of the stream; with `--follow`, waits for more.
pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    let target = RedisTarget::from_args(&args.redis)?;
    let url = target.url.clone();
    let mut conn = connect(&target).await?;
    let mut printed: u64 = 0;
    let limit = args.count.unwrap_or(u64::MAX);
    let mut out = std::io::stdout().lock();
    // `None`: nothing read yet, start at `--from` (inclusive) or the start.
    let mut last: Option<EntryId> = None;
    let stream = &args.redis.stream;
    while printed < limit {
        let start = match last {
            Some(id) => format!("({id}"),
            None => args
                .from
                .map_or_else(|| "-".to_owned(), |id| id.to_string()),
        };
        let page = PAGE.min(limit - printed);
        let reply: Value = redis::cmd("XRANGE")
            .arg(stream)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(page)
            .query_async(&mut conn)
            .await
            .map_err(|err| explain(&url, "read the stream", &err))?;
        let entries = parse_range_reply(reply)?;
        if entries.is_empty() {
            break;
        }
        for entry in &entries {
            writeln!(out, "{}", render(entry, args.json)?)?;
            printed += 1;
            last = Some(entry.id);
        }
    }
    out.flush()?;
    drop(out);
    if args.follow && printed < limit {
        let after = last.unwrap_or_else(|| {
            args.from
                .and_then(EntryId::predecessor)
                .unwrap_or(EntryId::ZERO)
        });
        follow(&mut conn, &url, stream, after, limit - printed, args.json).await?;
    }
    Ok(())
}

async fn follow(
    conn: &mut RedisConnection,
    url: &str,
    stream: &str,
    mut after: EntryId,
    mut remaining: u64,
    json: bool,
) -> anyhow::Result<()> {
    let stop = crate::commands::shutdown_signal();
    tokio::pin!(stop);
    while remaining > 0 {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(PAGE.min(remaining))
            .arg("BLOCK")
            .arg(FOLLOW_BLOCK_MS)
            .arg("STREAMS")
            .arg(stream)
            .arg(after.to_string());
        let read = cmd.query_async::<Value>(conn);
        let reply = tokio::select! {
            () = &mut stop => return Ok(()),
            reply = read => reply.map_err(|err| explain(url, "follow the stream", &err))?,
        };
        let mut out = std::io::stdout().lock();
        for entry in parse_xread_reply(reply)? {
            writeln!(out, "{}", render(&entry, json)?)?;
            after = entry.id;
            remaining -= 1;
        }
        out.flush()?;
    }
    Ok(())
}
