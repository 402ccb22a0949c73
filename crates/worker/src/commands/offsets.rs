//! `lobby-worker offsets get|set|reset`.

use anyhow::Context;
use lifecycle_domain::EntryId;
use lifecycle_redis::RedisOffsetStore;
use redis::aio::MultiplexedConnection;

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
    conn: &mut MultiplexedConnection,
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

/// Prints, overwrites or deletes one label's offset.
pub async fn run(args: OffsetsArgs) -> anyhow::Result<()> {
    let target = RedisTarget::from_args(&args.redis)?;
    let url = &target.url;
    // Fails fast, with advice, when Redis is unreachable.
    let mut conn = connect(&target).await?;
    let store = RedisOffsetStore::new(target.client()?, &args.redis.key_prefix)
        .context("cannot set up the offset store")?;
    let label = &args.label;
    let key = store.key(label);
    match args.action {
        OffsetsAction::Get => match with_url(store.get(label).await, url)? {
            Some(id) => println!("{id}"),
            None => eprintln!("no offset is stored for label {label:?} (key {key})"),
        },
        OffsetsAction::Set { id, force } => {
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
            let previous = with_url(store.get(label).await, url).ok().flatten();
            with_url(store.set(label, id).await, url)?;
            match previous {
                Some(previous) => println!("{id} (was {previous})"),
                None => println!("{id} (none was stored)"),
            }
        }
        OffsetsAction::Reset => {
            if with_url(store.reset(label).await, url)? {
                println!("offset of label {label:?} deleted (key {key})");
            } else {
                println!("no offset was stored for label {label:?} (key {key})");
            }
        }
    }
    Ok(())
}
