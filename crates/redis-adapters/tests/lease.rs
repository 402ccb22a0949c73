//! The consumer lease and fenced offset saves against a private
//! redis-server: one holder at a time, tokens that only grow, saves refused
//! to any token but the holder's, handover requests and forced takeovers.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

use std::time::Duration;

use lifecycle_domain::{ConsumerLease, EntryId, Renewal, SaveOutcome, StreamOffsetStore};
use lifecycle_redis::lease::{fence_key, lease_key};
use lifecycle_redis::{open_client, Identity, RedisLease, RedisOffsetStore};
use lifecycle_test_support::RedisServer;

const LABEL: &str = "user_lifecycle";
const TTL: Duration = Duration::from_secs(10);

fn process(name: &str) -> Identity {
    Identity {
        host: name.to_owned(),
        pid: 1,
        nonce: "0".to_owned(),
    }
}

fn lease(server: &RedisServer, name: &str) -> RedisLease {
    let client = open_client(&server.url()).unwrap();
    RedisLease::new(client, "lobby", process(name), Duration::from_secs(3)).unwrap()
}

fn offsets(server: &RedisServer) -> RedisOffsetStore {
    RedisOffsetStore::new(open_client(&server.url()).unwrap(), "lobby").unwrap()
}

fn id(text: &str) -> EntryId {
    text.parse().unwrap()
}

#[tokio::test]
async fn one_holder_at_a_time_with_tokens_that_only_grow() {
    let server = RedisServer::start();
    let (a, b) = (lease(&server, "a"), lease(&server, "b"));
    let first = a.acquire(LABEL, TTL).await.unwrap().expect("free: taken");
    assert_eq!(b.acquire(LABEL, TTL).await.unwrap(), None, "held by a");
    let status = a.status(LABEL).await.unwrap();
    let holder = status.holder.clone().expect("a holder");
    assert_eq!(holder.identity, process("a"));
    assert_eq!(holder.token, first);
    assert!(status.remaining.unwrap() > Duration::from_secs(9));
    assert_eq!(status.standbys.len(), 1, "b waits: {status:?}");
    assert_eq!(status.standbys[0].0, process("b"));

    assert_eq!(a.renew(LABEL, first, TTL).await.unwrap(), Renewal::Renewed);
    assert_eq!(b.renew(LABEL, first + 7, TTL).await.unwrap(), Renewal::Lost);
    a.release(LABEL, first).await.unwrap();
    let second = b
        .acquire(LABEL, TTL)
        .await
        .unwrap()
        .expect("released: taken");
    assert_eq!(second, first + 1);
    assert_eq!(a.renew(LABEL, first, TTL).await.unwrap(), Renewal::Lost);
    // A stale release changes nothing.
    a.release(LABEL, first).await.unwrap();
    assert_eq!(a.status(LABEL).await.unwrap().holder.unwrap().token, second);
    assert_eq!(
        server.cli(&["HGET", &lease_key("lobby", LABEL), "holder"]),
        "b/1/0"
    );
    assert_eq!(server.cli(&["GET", &fence_key("lobby", LABEL)]), "2");
}

#[tokio::test]
async fn an_expired_lease_goes_to_the_next_with_a_larger_token() {
    let server = RedisServer::start();
    let (a, b) = (lease(&server, "a"), lease(&server, "b"));
    let short = Duration::from_millis(300);
    let first = a.acquire(LABEL, short).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = b.acquire(LABEL, TTL).await.unwrap().unwrap();
    assert!(second > first);
    assert_eq!(a.renew(LABEL, first, TTL).await.unwrap(), Renewal::Lost);
}

#[tokio::test]
async fn only_the_holders_token_saves_an_offset() {
    let server = RedisServer::start();
    let store = offsets(&server);
    let (a, b) = (lease(&server, "a"), lease(&server, "b"));
    let old = a.acquire(LABEL, TTL).await.unwrap().unwrap();
    assert_eq!(
        store
            .save_fenced(LABEL, id("5-0"), None, old)
            .await
            .unwrap(),
        SaveOutcome::Saved
    );
    // The holder's own saves keep today's rules: never backwards.
    assert_eq!(
        store
            .save_fenced(LABEL, id("4-0"), None, old)
            .await
            .unwrap(),
        SaveOutcome::Kept(id("5-0"))
    );
    // b takes over (a's lease was forced away, as after an expiry).
    let new = b.try_acquire(LABEL, TTL, true).await.unwrap().unwrap();
    assert!(new > old);
    // a, resumed, saves with its old token: refused, nothing written,
    // neither forwards nor backwards.
    for offset in ["9-0", "5-0", "1-0"] {
        assert_eq!(
            store
                .save_fenced(LABEL, id(offset), Some(id("5-0")), old)
                .await
                .unwrap(),
            SaveOutcome::Fenced
        );
    }
    assert_eq!(store.get(LABEL).await.unwrap(), Some(id("5-0")));
    assert_eq!(
        store
            .save_fenced(LABEL, id("6-0"), Some(id("5-0")), new)
            .await
            .unwrap(),
        SaveOutcome::Saved
    );
    // No lease at all: every fenced save is refused.
    b.release(LABEL, new).await.unwrap();
    assert_eq!(
        store
            .save_fenced(LABEL, id("7-0"), None, new)
            .await
            .unwrap(),
        SaveOutcome::Fenced
    );
    assert_eq!(store.get(LABEL).await.unwrap(), Some(id("6-0")));
}

#[tokio::test]
async fn a_handover_request_stops_the_holder_and_keeps_standbys_out() {
    let server = RedisServer::start();
    let (worker, standby, operator) = (
        lease(&server, "worker"),
        lease(&server, "standby"),
        lease(&server, "operator"),
    );
    let token = worker.acquire(LABEL, TTL).await.unwrap().unwrap();
    assert!(operator
        .request_handover(LABEL, Duration::from_secs(5))
        .await
        .unwrap());
    assert!(
        !standby
            .request_handover(LABEL, Duration::from_secs(5))
            .await
            .unwrap(),
        "one request at a time"
    );
    assert_eq!(
        worker.renew(LABEL, token, TTL).await.unwrap(),
        Renewal::HandoverRequested
    );
    assert_eq!(operator.try_acquire(LABEL, TTL, false).await.unwrap(), None);
    worker.release(LABEL, token).await.unwrap();
    assert_eq!(
        standby.acquire(LABEL, TTL).await.unwrap(),
        None,
        "the operator's request stands"
    );
    let taken = operator.try_acquire(LABEL, TTL, false).await.unwrap();
    assert_eq!(taken, Some(token + 1));
    operator.give_up(LABEL, taken).await.unwrap();
    assert_eq!(standby.acquire(LABEL, TTL).await.unwrap(), Some(token + 2));
}

#[tokio::test]
async fn an_operators_write_goes_through_with_the_lease_and_only_with_it() {
    let server = RedisServer::start();
    let store = offsets(&server);
    let holder = lease(&server, "operator");
    let token = holder
        .acquire(LABEL, TTL)
        .await
        .unwrap()
        .expect("free: taken");
    store.set(LABEL, id("5-0")).await.unwrap();
    // Overwritten, even backwards: the offset before is reported.
    assert_eq!(
        store
            .write_fenced(LABEL, Some(id("2-0")), token)
            .await
            .unwrap(),
        Ok(Some(id("5-0")))
    );
    assert_eq!(store.load(LABEL).await.unwrap(), Some(id("2-0")));
    // Another token writes nothing.
    assert_eq!(
        store
            .write_fenced(LABEL, Some(id("9-0")), token + 1)
            .await
            .unwrap(),
        Err(())
    );
    assert_eq!(store.load(LABEL).await.unwrap(), Some(id("2-0")));
    // None deletes.
    assert_eq!(
        store.write_fenced(LABEL, None, token).await.unwrap(),
        Ok(Some(id("2-0")))
    );
    assert_eq!(store.load(LABEL).await.unwrap(), None);
    assert_eq!(
        store.write_fenced(LABEL, None, token).await.unwrap(),
        Ok(None)
    );
}
