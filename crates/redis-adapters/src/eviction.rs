//! Whether Redis may evict the worker's keys: its `maxmemory-policy`, read
//! from `INFO memory` (which needs no `CONFIG` permission).
//!
//! Under any policy but `noeviction`, Redis short of memory drops keys: an
//! evicted offset or stream loses the worker's place. `run` warns once at
//! start-up; nothing is refused.

use lifecycle_streams::quote_answer;
use redis::aio::ConnectionLike;

/// The `maxmemory-policy` under which Redis never evicts a key.
pub const NO_EVICTION: &str = "noeviction";

/// `maxmemory_policy` from the text of `INFO memory` (or of all of `INFO`),
/// printable ASCII only; `None` when the field is absent or empty.
pub fn parse_maxmemory_policy(info: &str) -> Option<String> {
    info.lines().find_map(|line| {
        let (key, value) = line.trim_end_matches('\r').split_once(':')?;
        if key != "maxmemory_policy" {
            return None;
        }
        let policy = quote_answer(value.trim().as_bytes());
        (!policy.is_empty()).then_some(policy)
    })
}

/// Whether Redis under `policy` may evict keys: any policy but
/// [`NO_EVICTION`].
pub fn policy_evicts(policy: &str) -> bool {
    !policy.eq_ignore_ascii_case(NO_EVICTION)
}

/// The policy in the text of `INFO memory` when it may evict keys; `None`
/// for `noeviction` or when the text names no policy.
pub fn evicting_policy_in(info: &str) -> Option<String> {
    parse_maxmemory_policy(info).filter(|policy| policy_evicts(policy))
}

/// Reads `INFO memory` on `conn` and returns its `maxmemory_policy` when
/// that may evict keys; `at` names the server in the debug log.
///
/// `None` as well when `INFO` fails or is refused (an ACL, a renamed
/// command) or names no policy: logged at debug level only, since the
/// check is advice.
pub async fn read_evicting_policy<C: ConnectionLike + Send>(
    conn: &mut C,
    at: &str,
) -> Option<String> {
    let info = match redis::cmd("INFO")
        .arg("memory")
        .query_async::<String>(conn)
        .await
    {
        Ok(info) => info,
        Err(err) => {
            tracing::debug!(at, err = %err, "INFO memory failed; maxmemory-policy not checked");
            return None;
        }
    };
    let Some(policy) = parse_maxmemory_policy(&info) else {
        tracing::debug!(
            at,
            "INFO memory has no maxmemory_policy; maxmemory-policy not checked"
        );
        return None;
    };
    policy_evicts(&policy).then_some(policy)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    use lifecycle_test_support::{RedisServer, RedisServerOptions};

    /// [`read_evicting_policy`] on a fresh connection; `None` when none.
    async fn evicting_policy(client: &redis::Client) -> Option<String> {
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        read_evicting_policy(&mut conn, "test").await
    }

    fn memory(lines: &[&str]) -> String {
        let mut text = String::from("# Memory\r\nused_memory:1024\r\n");
        for line in lines {
            text.push_str(line);
            text.push_str("\r\n");
        }
        text
    }

    #[test]
    fn the_policy_is_read_from_info_memory() {
        for (lines, policy) in [
            (vec!["maxmemory_policy:noeviction"], Some("noeviction")),
            (vec!["maxmemory_policy:allkeys-lru"], Some("allkeys-lru")),
            (
                vec!["maxmemory:0", "maxmemory_policy:volatile-ttl", "x:y"],
                Some("volatile-ttl"),
            ),
            (vec!["maxmemory_policy: allkeys-lfu "], Some("allkeys-lfu")),
            (vec![], None),
            (vec!["maxmemory_policy:"], None),
            (vec!["maxmemory_policy_x:allkeys-lru"], None),
            (vec!["maxmemory_human:0B"], None),
        ] {
            assert_eq!(
                parse_maxmemory_policy(&memory(&lines)).as_deref(),
                policy,
                "{lines:?}"
            );
        }
        assert_eq!(parse_maxmemory_policy("garbage"), None);
        assert_eq!(parse_maxmemory_policy(""), None);
        // A hostile answer cannot put control characters in the log.
        let quoted = parse_maxmemory_policy("maxmemory_policy:\u{1b}[31mred\r\n").unwrap();
        assert!(!quoted.contains('\u{1b}'), "{quoted}");
    }

    #[test]
    fn every_policy_but_noeviction_evicts() {
        for policy in [
            "allkeys-lru",
            "allkeys-lfu",
            "allkeys-random",
            "volatile-lru",
            "volatile-lfu",
            "volatile-random",
            "volatile-ttl",
            "something-new",
        ] {
            assert!(policy_evicts(policy), "{policy}");
        }
        assert!(!policy_evicts("noeviction"));
        assert!(!policy_evicts("NoEviction"));
        assert_eq!(
            evicting_policy_in(&memory(&["maxmemory_policy:allkeys-lru"])).as_deref(),
            Some("allkeys-lru")
        );
        assert_eq!(
            evicting_policy_in(&memory(&["maxmemory_policy:noeviction"])),
            None
        );
        assert_eq!(evicting_policy_in(&memory(&[])), None);
    }

    #[tokio::test]
    async fn a_real_redis_reports_its_policy() {
        let default = RedisServer::start();
        let client = crate::open_client(&default.url()).unwrap();
        assert_eq!(evicting_policy(&client).await, None);
        let lru = RedisServer::start_with(RedisServerOptions {
            extra_args: vec!["--maxmemory-policy".into(), "allkeys-lru".into()],
            ..RedisServerOptions::default()
        });
        let client = crate::open_client(&lru.url()).unwrap();
        assert_eq!(
            evicting_policy(&client).await.as_deref(),
            Some("allkeys-lru")
        );
    }

    #[tokio::test]
    async fn info_refused_says_nothing() {
        let server = RedisServer::start();
        server.cli(&[
            "ACL", "SETUSER", "noinfo", "on", ">pw", "~*", "+@all", "-info",
        ]);
        let url = server.url().replacen("redis://", "redis://noinfo:pw@", 1);
        let client = crate::open_client(&url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let refused = redis::cmd("INFO")
            .arg("memory")
            .query_async::<String>(&mut conn)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Some("NOPERM"), "{refused}");
        assert_eq!(evicting_policy(&client).await, None);
        server.cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
        assert_eq!(evicting_policy(&client).await, None);
    }

    #[tokio::test]
    async fn a_redis_that_is_not_up_says_nothing() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = crate::open_client(&format!("redis://127.0.0.1:{port}")).unwrap();
        assert_eq!(evicting_policy(&client).await, None);
    }
}
