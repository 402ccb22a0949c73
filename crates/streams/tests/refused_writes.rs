//! What Redis 7 answers when it refuses a write, as the `redis` client hands
//! it over, against private redis-servers: `OOM` (maxmemory reached with
//! `noeviction`), `MISCONF` (it cannot persist), `NOREPLICAS`, `READONLY`
//! (a replica) and `BUSY` (a script past its time limit), to a command, to a
//! script whose write was refused, and inside a transaction or pipeline.
//! Every one is [`FaultClass::Transient`]: the same write succeeds once the
//! condition is lifted.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lifecycle_streams::{classify, write_refusal, FaultClass};
use lifecycle_test_support::{RedisServer, RedisServerOptions};
use redis::aio::MultiplexedConnection;
use redis::{RedisError, Script};

/// The offset save's shape: a read, then the first write.
const READ_THEN_WRITE: &str =
    "redis.call('GET', KEYS[1]) redis.call('SET', KEYS[1], ARGV[1]) return 1";
/// The cascade's shape: the refused write's error table, raised as it is.
const PCALL_RAISED: &str =
    "local reply = redis.pcall('SET', KEYS[1], ARGV[1]) if type(reply) == 'table' and reply.err then error(reply) end return 1";

async fn connect(server: &RedisServer) -> MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The ways the worker writes, each expected to be refused with `code` and
/// classified transient. Returns the errors' texts.
async fn refused_everywhere(conn: &mut MultiplexedConnection, code: &str) -> Vec<String> {
    let mut texts = Vec::new();
    let mut check = |what: &str, result: Result<redis::Value, RedisError>| {
        let err = result.expect_err(what);
        assert_eq!(classify(&err), FaultClass::Transient, "{what}: {err:?}");
        assert_eq!(err.code(), Some(code), "{what}: {err:?}");
        assert_eq!(write_refusal(&err), Some(code), "{what}: {err:?}");
        texts.push(format!("{what}: {err}"));
    };
    check(
        "SET",
        redis::cmd("SET").arg("k").arg("v").query_async(conn).await,
    );
    check(
        "XADD",
        redis::cmd("XADD")
            .arg("dead")
            .arg("*")
            .arg("f")
            .arg("v")
            .query_async(conn)
            .await,
    );
    // EVALSHA, loaded on NOSCRIPT and sent again, as the stores do.
    check(
        "script, redis.call",
        Script::new(READ_THEN_WRITE)
            .key("offset")
            .arg("1-0")
            .invoke_async(conn)
            .await,
    );
    check(
        "script, redis.pcall raised",
        Script::new(PCALL_RAISED)
            .key("record")
            .arg("x")
            .invoke_async(conn)
            .await,
    );
    texts
}

/// A transaction with a refused command, and pipelines: the errors inside
/// decide.
async fn transactions_and_pipelines_under_oom(conn: &mut MultiplexedConnection) {
    let mut atomic = redis::pipe();
    atomic
        .atomic()
        .set("a", "1")
        .ignore()
        .set("b", "2")
        .ignore();
    let err = atomic.query_async::<()>(conn).await.unwrap_err();
    assert_eq!(err.code(), Some("EXECABORT"), "{err:?}");
    assert_eq!(classify(&err), FaultClass::Transient, "{err:?}");
    assert_eq!(write_refusal(&err), Some("OOM"), "{err:?}");

    let mut pipeline = redis::pipe();
    pipeline.set("a", "1").set("b", "2");
    let err = pipeline.query_async::<()>(conn).await.unwrap_err();
    assert_eq!(classify(&err), FaultClass::Transient, "{err:?}");

    // A refused write next to a key of the wrong type: the wrong type needs
    // a person, whatever comes first.
    let mut mixed = redis::pipe();
    mixed.set("a", "1").get("a-set");
    let err = mixed.query_async::<()>(conn).await.unwrap_err();
    assert_eq!(classify(&err), FaultClass::WrongType, "{err:?}");
}

fn used_memory(server: &RedisServer) -> u64 {
    server
        .cli(&["INFO", "memory"])
        .lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn oom_is_transient_in_every_shape_and_passes_when_lifted() {
    let server = RedisServer::start();
    server.cli(&["SADD", "a-set", "m"]);
    let mut conn = connect(&server).await;
    let below = (used_memory(&server) / 2).to_string();
    server.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    server.cli(&["CONFIG", "SET", "maxmemory", &below]);
    let texts = refused_everywhere(&mut conn, "OOM").await;
    transactions_and_pipelines_under_oom(&mut conn).await;
    // The dead-letter script too, into a stream that does not exist yet (its
    // first write must be the append, or Redis would let the copy through).
    let err = lifecycle_streams::dead_letter::append_once(
        &mut conn,
        "fresh:dead",
        "fresh",
        lifecycle_domain::EntryId::new(1, 0),
        &[(b"f".as_slice(), b"v".as_slice())],
        "boom",
        1,
    )
    .await
    .expect_err("a dead letter under OOM");
    assert_eq!(write_refusal(&err), Some("OOM"), "{err:?}");
    assert_eq!(server.cli(&["EXISTS", "fresh:dead"]), "0");
    // Reads and shrinking writes are served.
    let _: Option<String> = redis::cmd("GET")
        .arg("k")
        .query_async(&mut conn)
        .await
        .unwrap();
    server.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    let wrote: i64 = Script::new(READ_THEN_WRITE)
        .key("offset")
        .arg("1-0")
        .invoke_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(wrote, 1);
    println!("[oom] {texts:#?}");
}

#[tokio::test]
async fn misconf_is_transient_and_passes_when_lifted() {
    let server = RedisServer::start_with(RedisServerOptions {
        extra_args: vec!["--enable-protected-configs".to_owned(), "yes".to_owned()],
        ..RedisServerOptions::default()
    });
    let mut conn = connect(&server).await;
    server.break_persistence();
    let texts = refused_everywhere(&mut conn, "MISCONF").await;
    // Under MISCONF every write is refused, even one that frees memory.
    let err = redis::cmd("DEL")
        .arg("k")
        .query_async::<i64>(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(classify(&err), FaultClass::Transient, "{err:?}");
    server.repair_persistence();
    let () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut conn)
        .await
        .unwrap();
    println!("[misconf] {texts:#?}");
}

#[tokio::test]
async fn noreplicas_is_transient_and_passes_when_lifted() {
    let server = RedisServer::start();
    let mut conn = connect(&server).await;
    server.cli(&["CONFIG", "SET", "min-replicas-to-write", "1"]);
    let texts = refused_everywhere(&mut conn, "NOREPLICAS").await;
    server.cli(&["CONFIG", "SET", "min-replicas-to-write", "0"]);
    let () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut conn)
        .await
        .unwrap();
    println!("[noreplicas] {texts:#?}");
}

#[tokio::test]
async fn readonly_is_transient_and_passes_once_promoted() {
    let master = RedisServer::start();
    let server = RedisServer::start();
    let mut conn = connect(&server).await;
    server.cli(&["REPLICAOF", "127.0.0.1", &master.port().to_string()]);
    let texts = refused_everywhere(&mut conn, "READONLY").await;
    server.cli(&["REPLICAOF", "NO", "ONE"]);
    let () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut conn)
        .await
        .unwrap();
    println!("[readonly] {texts:#?}");
}

#[tokio::test]
async fn busy_is_transient_and_passes_once_the_script_is_killed() {
    let server = RedisServer::start();
    let mut conn = connect(&server).await;
    server.cli(&["CONFIG", "SET", "busy-reply-threshold", "50"]);
    // A script that never ends, from another client; it ends when killed.
    let mut endless = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &server.port().to_string()])
        .args(["EVAL", "while true do end", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match redis::cmd("SET")
            .arg("k")
            .arg("v")
            .query_async::<()>(&mut conn)
            .await
        {
            Err(err) if err.code() == Some("BUSY") => break err,
            _ => {
                assert!(Instant::now() < deadline, "Redis never answered BUSY");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    assert_eq!(classify(&err), FaultClass::Transient, "{err:?}");
    server.cli(&["SCRIPT", "KILL"]);
    endless.wait().unwrap();
    let () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut conn)
        .await
        .unwrap();
    println!("[busy] {err}");
}
