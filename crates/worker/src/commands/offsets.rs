//! `lobby-worker offsets get|set|reset`.

use anyhow::Context;
use lifecycle_redis::{open_client, RedisOffsetStore};

use crate::cli::{OffsetsAction, OffsetsArgs};
use crate::redis_conn::{connect, with_url};

/// Prints, overwrites or deletes one label's offset.
pub async fn run(args: OffsetsArgs) -> anyhow::Result<()> {
    let url = &args.redis.redis_url;
    // Fails fast, with advice, when Redis is unreachable.
    drop(connect(url).await?);
    let store = RedisOffsetStore::new(open_client(url)?, &args.redis.key_prefix)
        .context("cannot set up the offset store")?;
    let label = &args.label;
    let key = store.key(label);
    match args.action {
        OffsetsAction::Get => match with_url(store.get(label).await, url)? {
            Some(id) => println!("{id}"),
            None => eprintln!("no offset is stored for label {label:?} (key {key})"),
        },
        OffsetsAction::Set { id } => {
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
