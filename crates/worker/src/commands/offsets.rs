//! `lobby-worker offsets get|set|reset`.

use anyhow::Context;
use lifecycle_redis::RedisOffsetStore;

use crate::cli::{OffsetsAction, OffsetsArgs};
use crate::redis_conn::{connect, with_url, RedisTarget};

/// Prints, overwrites or deletes one label's offset.
pub async fn run(args: OffsetsArgs) -> anyhow::Result<()> {
    let target = RedisTarget::from_args(&args.redis)?;
    let url = &target.url;
    // Fails fast, with advice, when Redis is unreachable.
    drop(connect(&target).await?);
    let store = RedisOffsetStore::new(target.client()?, &args.redis.key_prefix)
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
