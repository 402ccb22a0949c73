//! `lobby-worker publish`: the producer side, one event at a time.

use anyhow::bail;
use lifecycle_domain::EventType;
use redis::Value;

use crate::cli::{InputError, PublishArgs};
use crate::redis_conn::{connect, explain, RedisTarget};

/// Adds one event and prints its id.
pub async fn run(args: PublishArgs) -> anyhow::Result<()> {
    if args.event_type.trim().is_empty() {
        return Err(InputError("--event-type must not be blank".into()).into());
    }
    if args.user_id.trim().is_empty() {
        return Err(InputError("--user-id must not be blank".into()).into());
    }
    if !EventType::from_wire(&args.event_type).is_known() && !args.allow_unknown_type {
        // A typo here would be absorbed by the worker: the user never
        // deleted.
        return Err(InputError(format!(
            "--event-type {:?} is not one the worker acts on ({} or {}); add --allow-unknown-type to publish it anyway",
            args.event_type,
            EventType::USER_DELETED,
            EventType::USER_PERMANENTLY_BLOCKED
        ))
        .into());
    }
    let occurred_at_ms = match args.occurred_at_ms {
        Some(ms) => ms,
        // A clock before 1970 still publishes a valid (positive) time.
        None => i64::try_from(lifecycle_streams::now_ms())
            .unwrap_or(i64::MAX)
            .max(1),
    };
    let mut cmd = redis::cmd("XADD");
    cmd.arg(&args.redis.stream)
        .arg("*")
        .arg("event_type")
        .arg(&args.event_type)
        .arg("user_id")
        .arg(&args.user_id)
        .arg("occurred_at_ms")
        .arg(occurred_at_ms);
    for (name, value) in [
        ("source", &args.source),
        ("actor_type", &args.actor_type),
        ("actor_id", &args.actor_id),
        ("reason_code", &args.reason_code),
        ("trace_id", &args.trace_id),
    ] {
        if let Some(value) = value {
            cmd.arg(name).arg(value);
        }
    }
    let target = RedisTarget::from_args(&args.redis)?;
    let url = &target.url;
    let mut conn = connect(&target).await?;
    let id: Value = cmd
        .query_async(&mut conn)
        .await
        .map_err(|err| explain(url, "publish", &err))?;
    match id {
        Value::BulkString(raw) => println!("{}", String::from_utf8_lossy(&raw)),
        Value::SimpleString(text) => println!("{text}"),
        other => bail!("Redis answered XADD with {other:?} instead of an entry id"),
    }
    Ok(())
}
