//! `redis+cluster://` URLs: a Redis Cluster, reached through any of its
//! nodes.
//!
//! The form is `redis+cluster://[user:password@]host:port[,host:port...]`
//! (`rediss+cluster://` for TLS to every node). The hosts are seeds: the
//! client learns the rest of the cluster from them. A port may be left out
//! (6379). A cluster has one database, so the URL has no path.

use std::time::Duration;

use lifecycle_streams::{ClusterNodes, TlsSettings};
use redis::cluster::ClusterClientBuilder;
use redis::{IntoConnectionInfo, TlsMode};

use crate::connect::{redact_url, ConnectError};
use crate::sentinel::{parse_hosts_url, HostsUrl, HostsUrlForm};

/// Schemes of a Redis Cluster (with TLS for the `s` form).
pub(crate) const CLUSTER_SCHEMES: &[&str] = &["redis+cluster", "rediss+cluster"];

/// Redis's own port, when a host names none.
const REDIS_PORT: u16 = 6379;

/// How to write a cluster URL, for messages.
const FORM: &str = "write redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]";

/// What a `redis+cluster://` URL says.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterUrl {
    /// TLS to every node (`rediss+cluster://`).
    pub tls: bool,
    /// The user name.
    pub username: Option<String>,
    /// The password.
    pub password: Option<String>,
    /// The seed nodes, `(host, port)`.
    pub nodes: Vec<(String, u16)>,
}

impl std::fmt::Debug for ClusterUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterUrl")
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("nodes", &self.nodes)
            .finish()
    }
}

/// Whether `url` names a Redis Cluster.
pub fn is_cluster_url(url: &str) -> bool {
    url.split_once("://")
        .is_some_and(|(scheme, _)| CLUSTER_SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()))
}

/// Reads a `redis+cluster://` URL.
///
/// # Errors
///
/// [`ConnectError`], whose message never holds the password, for any part
/// that is missing, malformed, or not of this form (a path other than `/`
/// or `/0`, a query, a fragment).
pub fn parse_cluster_url(url: &str) -> Result<ClusterUrl, ConnectError> {
    let HostsUrl {
        tls,
        username,
        password,
        hosts,
        tail,
    } = parse_hosts_url(
        url,
        &HostsUrlForm {
            schemes: ["redis+cluster", "rediss+cluster"],
            what: "Redis Cluster's",
            host: "a node's",
            path: "a cluster has one database",
            form: FORM,
            default_port: REDIS_PORT,
        },
    )?;
    if !matches!(tail.as_str(), "" | "/" | "/0") {
        return Err(ConnectError::new(
            redact_url(url),
            format!("a Redis Cluster has one database (0): the URL takes no path; {FORM}"),
        ));
    }
    Ok(ClusterUrl {
        tls,
        username,
        password,
        nodes: hosts,
    })
}

/// `host:port`, with brackets around an IPv6 host.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The cluster `url` names, its nodes reached with `tls` (for
/// `rediss+cluster://`), opening a connection or finding a slot's owner
/// taking `timeout` at most. Nothing is connected yet.
///
/// # Errors
///
/// [`ConnectError`] when the URL cannot be used, or TLS files are given for
/// a plain `redis+cluster://` URL.
pub fn open_cluster(
    url: &str,
    tls: Option<&TlsSettings>,
    timeout: Duration,
) -> Result<ClusterNodes, ConnectError> {
    let parsed = parse_cluster_url(url)?;
    if tls.is_some() && !parsed.tls {
        return Err(ConnectError::new(
            redact_url(url),
            "TLS certificate files are given but the URL does not ask for TLS; use rediss+cluster://",
        ));
    }
    let failed = |err: redis::RedisError| {
        ConnectError::new(redact_url(url), err.to_string().replace('\n', " "))
    };
    // Each seed as a one-server URL, the user-info as written (still
    // percent-encoded), for the client to read.
    let (scheme, rest) = url.split_once("://").unwrap_or_default();
    let authority = rest.split('/').next().unwrap_or_default();
    let userinfo = authority
        .rsplit_once('@')
        .map(|(userinfo, _)| format!("{userinfo}@"))
        .unwrap_or_default();
    let node_scheme = if scheme.to_ascii_lowercase().starts_with("rediss") {
        "rediss"
    } else {
        "redis"
    };
    let mut seeds = Vec::with_capacity(parsed.nodes.len());
    for (host, port) in &parsed.nodes {
        let node_url = format!("{node_scheme}://{userinfo}{}", host_port(host, *port));
        let info = match tls {
            Some(tls) => redis::Client::build_with_tls(node_url, tls.redis_certificates())
                .map(|client| client.get_connection_info().clone()),
            None => node_url.as_str().into_connection_info(),
        }
        .map_err(failed)?;
        seeds.push(info);
    }
    let Some(first) = seeds.first().cloned() else {
        return Err(ConnectError::new(
            redact_url(url),
            format!("the URL names no node; {FORM}"),
        ));
    };
    let mut builder = ClusterClientBuilder::new(seeds)
        .connection_timeout(timeout)
        .response_timeout(timeout)
        // A failover's redirections and reconnections are retried here a
        // few times; past that, the caller's back-off decides.
        .retries(4)
        .min_retry_wait(50)
        .max_retry_wait(1_000);
    if let Some(user) = &parsed.username {
        builder = builder.username(user);
    }
    if let Some(password) = &parsed.password {
        builder = builder.password(password);
    }
    if parsed.tls {
        builder = builder.tls(TlsMode::Secure);
        if let Some(tls) = tls {
            builder = builder.certs(tls.redis_certificates());
        }
    }
    let client = builder.build().map_err(failed)?;
    let shown = parsed
        .nodes
        .iter()
        .map(|(host, port)| host_port(host, *port))
        .collect::<Vec<_>>()
        .join(",");
    Ok(ClusterNodes::new(client, first, shown, timeout))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_forms_parse() {
        let url =
            parse_cluster_url("redis+cluster://worker:s%40cret@10.0.0.1:7000,10.0.0.2,[::1]:7002")
                .unwrap();
        assert_eq!(
            url,
            ClusterUrl {
                tls: false,
                username: Some("worker".into()),
                password: Some("s@cret".into()),
                nodes: vec![
                    ("10.0.0.1".into(), 7000),
                    ("10.0.0.2".into(), 6379),
                    ("::1".into(), 7002)
                ],
            }
        );
        let tls = parse_cluster_url("rediss+cluster://:pw@node:7000/").unwrap();
        assert!(tls.tls);
        assert_eq!(tls.username, None);
        assert_eq!(tls.password.as_deref(), Some("pw"));
        assert!(parse_cluster_url("redis+cluster://node:7000/0").is_ok());
        assert!(is_cluster_url("REDIS+CLUSTER://node"));
        assert!(!is_cluster_url("redis://node"));
    }

    #[test]
    fn malformed_urls_are_refused_without_their_password() {
        for (url, reason) in [
            ("redis+cluster://:secret@node:7000/2", "one database"),
            ("redis+cluster://:secret@node:7000?db=1", "no query"),
            (
                "redis+cluster://:secret@node:notaport",
                "is not a node's HOST:PORT",
            ),
            (
                "redis+cluster://:secret@node:7000,",
                "is not a node's HOST:PORT",
            ),
            ("redis+sentinel://:secret@node/m", "is not Redis Cluster's"),
        ] {
            let err = parse_cluster_url(url).unwrap_err().to_string();
            assert!(err.contains(reason), "{url}: {err}");
            assert!(!err.contains("secret"), "{url}: {err}");
        }
    }

    #[test]
    fn a_cluster_opens_without_connecting_and_takes_tls_files_only_for_rediss() {
        let nodes = open_cluster(
            "redis+cluster://:pw@127.0.0.1:1,127.0.0.1:2",
            None,
            Duration::from_secs(1),
        );
        assert!(nodes.is_ok());
        assert_eq!(host_port("::1", 7000), "[::1]:7000");
    }
}
