//! The start-up warning about a Redis whose `maxmemory-policy` may evict
//! the worker's keys, driven through the binary against private
//! redis-servers.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::{assert_success, stderr, worker};
use lifecycle_test_support::{RedisServer, RedisServerOptions};

/// The start of the warning.
const WARNING: &str = "Redis may evict keys under memory pressure";

fn drain(url: &str) -> String {
    let output = worker(url, &["run", "--drain", "--metrics-addr", "off"]);
    assert_success(&output);
    stderr(&output)
}

#[test]
fn an_evicting_policy_is_warned_of_once() {
    let server = RedisServer::start_with(RedisServerOptions {
        extra_args: vec!["--maxmemory-policy".into(), "allkeys-lru".into()],
        ..Default::default()
    });
    let log = drain(&server.url());
    let warnings: Vec<&str> = log.lines().filter(|line| line.contains(WARNING)).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("WARN"), "{log}");
    assert!(warnings[0].contains("allkeys-lru"), "{log}");
    assert!(
        warnings[0].contains("set maxmemory-policy noeviction"),
        "{log}"
    );
}

#[test]
fn noeviction_is_not_warned_of() {
    let server = RedisServer::start();
    let log = drain(&server.url());
    assert!(!log.contains(WARNING), "{log}");
    assert!(!log.contains("maxmemory_policy"), "{log}");
}
