//! `lobby-worker offsets get|set|rewind|reset`. The commands that write take
//! the consumer lease for the moment they write (a running worker hands it
//! over, or with `--force` is fenced out), so that the worker obeys them:
//! it resumes from what they wrote.

use lifecycle_streams::RedisConnection;
use std::time::Duration;

use anyhow::Context;
use lifecycle_domain::{EntryId, FenceToken};
use lifecycle_redis::{Identity, RedisLease, RedisOffsetStore};

use crate::cli::{InputError, OffsetsAction, OffsetsArgs};
use crate::redis_conn::{connect, explain, with_url, RedisTarget};

/// The stream's last generated id (`XINFO STREAM`), or an empty string when
/// there is no such stream; only the id crosses the network.
const LAST_GENERATED_ID_SCRIPT: &str = r"
local ok, info = pcall(redis.call, 'XINFO', 'STREAM', KEYS[1])
if not ok then return '' end
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then return info[i + 1] end
end
return ''
";

/// The stream's last generated id; `None` when it does not exist.
async fn last_generated_id(
    conn: &mut RedisConnection,
    url: &str,
    stream: &str,
) -> anyhow::Result<Option<EntryId>> {
    let reply: String = redis::cmd("EVAL")
        .arg(LAST_GENERATED_ID_SCRIPT)
        .arg(1)
        .arg(stream)
        .query_async(conn)
        .await
        .map_err(|err| explain(url, "read the stream's last id", &err))?;
    if reply.is_empty() {
        return Ok(None);
    }
    let id = EntryId::from_bytes(reply.as_bytes())
        .map_err(|err| anyhow::anyhow!("the stream's last id {reply:?}: {err}"))?;
    Ok(Some(id))
}

/// How long an operator's lease lasts if the command dies holding it.
const OPERATOR_LEASE_TTL: Duration = Duration::from_secs(30);

/// How often the command tries to take the lease while the holder hands it
/// over.
const TAKE_EVERY: Duration = Duration::from_millis(100);

/// Takes `label`'s lease for this command: at once with `force` (fencing the
/// holder out), else by asking the holder to hand it over and waiting up to
/// `wait`. Returns the token.
async fn take_lease(
    lease: &RedisLease,
    label: &str,
    force: bool,
    wait: Duration,
    url: &str,
) -> anyhow::Result<FenceToken> {
    if force {
        return with_url(
            lease.try_acquire(label, OPERATOR_LEASE_TTL, true).await,
            url,
        )?
        .ok_or_else(|| anyhow::anyhow!("could not take the lease of label {label:?}"));
    }
    if let Some(token) = with_url(
        lease.try_acquire(label, OPERATOR_LEASE_TTL, false).await,
        url,
    )? {
        return Ok(token);
    }
    if !with_url(
        lease
            .request_handover(label, wait + OPERATOR_LEASE_TTL)
            .await,
        url,
    )? {
        return Err(anyhow::anyhow!(
            "another operator command is waiting for the lease of label {label:?}; try again when it is done, or add --force"
        ));
    }
    eprintln!(
        "waiting up to {} for the worker holding the lease of label {label:?} to hand it over",
        crate::cli::format_duration(wait)
    );
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        tokio::time::sleep(TAKE_EVERY).await;
        if let Some(token) = with_url(
            lease.try_acquire(label, OPERATOR_LEASE_TTL, false).await,
            url,
        )? {
            return Ok(token);
        }
        if tokio::time::Instant::now() >= deadline {
            let holder = lease
                .status(label)
                .await
                .ok()
                .and_then(|status| status.holder)
                .map_or_else(
                    || "a worker".to_owned(),
                    |holder| {
                        format!(
                            "{} (pid {}, token {})",
                            holder.identity.host, holder.identity.pid, holder.token
                        )
                    },
                );
            // Withdraws the request: the worker carries on.
            with_url(lease.give_up(label, None).await, url)?;
            return Err(anyhow::anyhow!(
                "{holder} did not hand the lease of label {label:?} over within {}: is it stuck? Add --force to fence it out and write at once",
                crate::cli::format_duration(wait)
            ));
        }
    }
}

/// Writes (`Some`) or deletes (`None`) `label`'s offset under the lease,
/// then releases it; the offset stored before.
async fn write_under_lease(
    target: &RedisTarget,
    args: &OffsetsArgs,
    id: Option<EntryId>,
    force: bool,
    wait: Duration,
) -> anyhow::Result<Option<EntryId>> {
    let url = &target.url;
    let label = &args.label;
    let store = RedisOffsetStore::new(target.endpoint()?, &args.redis.key_prefix)
        .context("cannot set up the offset store")?;
    let lease = RedisLease::new(
        target.endpoint()?,
        &args.redis.key_prefix,
        Identity::of_this_process(),
        Duration::from_secs(1),
    )
    .context("cannot set up the lease")?;
    let token = take_lease(&lease, label, force, wait, url).await?;
    let written = with_url(store.write_fenced(label, id, token).await, url);
    // Released whatever the write came to: a worker waits for it.
    let released = with_url(lease.give_up(label, Some(token)).await, url);
    let previous = written?.map_err(|()| {
        anyhow::anyhow!("the lease of label {label:?} was taken from this command before it wrote; nothing was written: try again")
    })?;
    released?;
    Ok(previous)
}

/// Prints, overwrites or deletes one label's offset.
pub async fn run(args: OffsetsArgs) -> anyhow::Result<()> {
    let target = RedisTarget::from_args(&args.redis)?;
    let url = &target.url;
    // Fails fast, with advice, when Redis is unreachable.
    let mut conn = connect(&target).await?;
    let store = RedisOffsetStore::new(target.endpoint()?, &args.redis.key_prefix)
        .context("cannot set up the offset store")?;
    let label = &args.label;
    let key = store.key(label);
    match args.action {
        OffsetsAction::Get => match with_url(store.get(label).await, url)? {
            Some(id) => println!("{id}"),
            None => eprintln!("no offset is stored for label {label:?} (key {key})"),
        },
        OffsetsAction::Set { id, force, wait } => {
            let stream = &args.redis.stream;
            let last = last_generated_id(&mut conn, url, stream).await?;
            if !force && id > EntryId::ZERO && last.is_none_or(|last| id > last) {
                let last = last.map_or_else(
                    || format!("the stream {stream:?} does not exist"),
                    |last| format!("the last id of {stream:?} is {last}"),
                );
                return Err(InputError(format!(
                    "{id} is past the stream's end ({last}): a worker would skip every event added until the stream's ids pass it; add --force if that is what you want"
                ))
                .into());
            }
            match write_under_lease(&target, &args, Some(id), force, wait).await? {
                Some(previous) => println!("{id} (was {previous})"),
                None => println!("{id} (none was stored)"),
            }
        }
        OffsetsAction::Rewind { to, force, wait } => {
            let stored = with_url(store.get(label).await, url)?;
            match stored {
                Some(stored) if to > stored => {
                    return Err(InputError(format!(
                        "{to} is after the stored offset {stored}: a rewind moves back; to skip forward use `offsets set`"
                    ))
                    .into())
                }
                None => {
                    return Err(InputError(format!(
                        "no offset is stored for label {label:?} (key {key}): nothing to rewind; use `offsets set` to store one"
                    ))
                    .into())
                }
                Some(_) => {}
            }
            match write_under_lease(&target, &args, Some(to), force, wait).await? {
                Some(previous) => println!("{to} (was {previous})"),
                None => println!("{to} (none was stored)"),
            }
        }
        OffsetsAction::Reset { force, wait } => {
            if write_under_lease(&target, &args, None, force, wait)
                .await?
                .is_some()
            {
                println!("offset of label {label:?} deleted (key {key})");
            } else {
                println!("no offset was stored for label {label:?} (key {key})");
            }
        }
    }
    Ok(())
}
