//! Password and ACL authentication, driven through the binary against a
//! private redis-server started with `requirepass`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use lifecycle_test_support::{RedisServer, RedisServerOptions};

const BIN: &str = env!("CARGO_BIN_EXE_lobby-worker");
const PASSWORD: &str = "s3cret-Pa55";

fn worker(url: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("REDIS_URL", url)
        .env("LOBBY_METRICS_ADDR", "off")
        .env_remove("RUST_LOG")
        .output()
        .expect("run lobby-worker")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn server() -> RedisServer {
    RedisServer::start_with(RedisServerOptions {
        requirepass: Some(PASSWORD.to_owned()),
        ..RedisServerOptions::default()
    })
}

#[test]
fn the_right_password_works_for_every_command() {
    let server = server();
    let url = server.url();
    let published = worker(
        &url,
        &["publish", "--event-type", "user.deleted", "--user-id", "u1"],
    );
    assert!(published.status.success(), "{}", text(&published.stderr));
    let id = text(&published.stdout).trim().to_owned();
    let drained = worker(&url, &["run", "--drain"]);
    assert!(drained.status.success(), "{}", text(&drained.stderr));
    assert!(!text(&drained.stderr).contains(PASSWORD));
    let offset = worker(&url, &["offsets", "get"]);
    assert_eq!(text(&offset.stdout).trim(), id);
    let tail = worker(&url, &["tail", "--json"]);
    assert!(text(&tail.stdout).contains("\"status\":\"ok\""));
}

#[test]
fn an_acl_user_with_its_own_password_works() {
    let server = server();
    server.cli(&[
        "ACL",
        "SETUSER",
        "worker",
        "on",
        ">worker-pw",
        "~*",
        "+@read",
        "+@write",
        "+@scripting",
        "+@connection",
    ]);
    // A game the cascade changes (u1 owns it: it is cancelled and left).
    server.cli(&["HSET", "lobby:game:g1", "owner_id", "u1", "status", "open"]);
    server.cli(&["SADD", "lobby:game:g1:members", "u1", "u2"]);
    server.cli(&["SADD", "lobby:user:u1:games", "g1"]);
    let url = format!("redis://worker:worker-pw@127.0.0.1:{}/", server.port());
    let published = worker(
        &url,
        &["publish", "--event-type", "user.deleted", "--user-id", "u1"],
    );
    assert!(published.status.success(), "{}", text(&published.stderr));
    let id = text(&published.stdout).trim().to_owned();
    let drained = worker(&url, &["run", "--drain"]);
    assert!(drained.status.success(), "{}", text(&drained.stderr));
    assert_eq!(
        server.cli(&["HGET", "lobby:game:g1", "status"]),
        "cancelled"
    );
    assert_eq!(server.cli(&["SMEMBERS", "lobby:game:g1:members"]), "u2");
    for args in [
        &["status", "--json"][..],
        &["tail", "--json"],
        &["offsets", "get"],
    ] {
        let output = worker(&url, args);
        assert!(
            output.status.success(),
            "{args:?}: {}",
            text(&output.stderr)
        );
        assert!(
            text(&output.stdout).contains(&id),
            "{args:?}: {}",
            text(&output.stdout)
        );
    }
}

#[test]
fn a_wrong_password_ends_run_at_once_with_advice_and_no_secret() {
    let server = server();
    for url in [
        format!("redis://:wrong-{PASSWORD}@127.0.0.1:{}/", server.port()),
        format!("redis://127.0.0.1:{}/", server.port()),
    ] {
        let started = Instant::now();
        let output = worker(&url, &["run"]);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}: retried instead of failing",
            started.elapsed()
        );
        assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
        let err = text(&output.stderr);
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with("error: "), "{err}");
        assert!(last.contains("password"), "{last}");
        assert!(!err.contains(PASSWORD), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
