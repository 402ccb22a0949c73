//! Opening Redis clients, checking their URLs, and keeping passwords out of
//! output.
//!
//! The `redis` crate (1.x) reads these parts of a URL, and the checks here
//! allow exactly those:
//!
//! - `redis://`, `rediss://` (and `valkey://`, `valkeys://`): user name and
//!   password in the user-info, the database as the path (`/2`), and the
//!   query parameter `protocol` (`2`, `3`, `resp2`, `resp3`); `#insecure`
//!   turns certificate checks off, which is refused here.
//! - `redis+unix://`, `unix://` (and `valkey+unix://`): the socket's path,
//!   and the query parameters `db`, `user`, `pass` (the only way the crate
//!   takes a Unix socket's password) and `protocol`.
//!
//! Everything else is refused by name rather than silently ignored: a
//! `?password=` on a TCP URL, which the crate would ignore and every log
//! line would print, and a password holding an unencoded `/`, `#` or `?`,
//! which ends the URL's user-info early and leaves the password in the
//! host, path or fragment.

use std::time::Duration;

use lifecycle_streams::TlsSettings;
use lifecycle_streams::{ConnectionTimeouts, RedisConnection, RedisEndpoint};

use crate::cluster::{is_cluster_url, open_cluster, parse_cluster_url, CLUSTER_SCHEMES};
use crate::sentinel::{
    is_sentinel_url, open_sentinel_master, parse_sentinel_url, SENTINEL_SCHEMES,
};
use redis::ConnectionAddr;

/// Schemes of a server over TCP (with TLS for the `s` forms).
const TCP_SCHEMES: &[&str] = &["redis", "rediss", "valkey", "valkeys"];
/// Schemes of a server on a Unix socket.
const UNIX_SCHEMES: &[&str] = &["unix", "redis+unix", "valkey+unix"];
/// The query parameters the `redis` crate reads from a TCP URL.
const TCP_PARAMS: &[&str] = &["protocol"];
/// The query parameters the `redis` crate reads from a Unix-socket URL.
const UNIX_PARAMS: &[&str] = &["db", "user", "pass", "protocol"];
/// Query parameters whose value is a password.
const SECRET_PARAMS: &[&str] = &["pass", "password"];
/// Parameter names that end a secret value when redacting (`...&db=`):
/// those the crate reads, and `password`.
const KNOWN_PARAMS: &[&str] = &["db", "user", "pass", "password", "protocol"];
/// The characters that end a URL's authority.
const AUTHORITY_END: [char; 3] = ['/', '?', '#'];

/// Where a password goes, for messages that refuse it elsewhere.
const USERINFO_ADVICE: &str = "put it in the URL's user-info instead, redis://:PASSWORD@host:6379 or redis://USER:PASSWORD@host:6379, percent-encoding / # ? @ : in it (%2F %23 %3F %40 %3A)";

/// A Redis URL that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid Redis URL{}: {reason}", leading_space(.url))]
pub struct ConnectError {
    /// The URL with its password redacted, or less of it when even that
    /// cannot be told apart (empty: nothing can be shown).
    pub url: String,
    /// What is wrong with it, and what to do.
    pub reason: String,
}

impl ConnectError {
    pub(crate) fn new(url: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            reason: reason.into(),
        }
    }
}

fn leading_space(text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!(" {text}")
    }
}

/// How long finding a Sentinel-managed master, or a cluster slot's owner,
/// may take.
pub const SENTINEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where `url` points: one server (`redis://`, `rediss://`, a Unix socket),
/// a Redis Cluster (`redis+cluster://`, `rediss+cluster://`), or the master
/// of a Sentinel-managed group (`redis+sentinel://`, `rediss+sentinel://`),
/// whose sentinels take `sentinel_password` when
/// given and the URL's otherwise. `tls` holds the certificate files, for
/// the TLS schemes only. Nothing is connected yet.
///
/// # Errors
///
/// [`ConnectError`] as [`open_client`], [`open_tls_client`] and
/// [`open_sentinel_master`] say.
pub fn open_endpoint(
    url: &str,
    tls: Option<&TlsSettings>,
    sentinel_password: Option<&str>,
) -> Result<RedisEndpoint, ConnectError> {
    if is_sentinel_url(url) {
        return open_sentinel_master(url, tls, sentinel_password, SENTINEL_TIMEOUT).map(Into::into);
    }
    if is_cluster_url(url) {
        return open_cluster(url, tls, SENTINEL_TIMEOUT).map(Into::into);
    }
    match tls {
        Some(tls) => open_tls_client(url, tls),
        None => open_client(url),
    }
    .map(Into::into)
}

/// Parses `url` into a client; nothing is connected yet.
///
/// # Errors
///
/// [`ConnectError`] when the URL is malformed or holds a part the client
/// would ignore (see [`check_url`]); the message never holds the password.
pub fn open_client(url: &str) -> Result<redis::Client, ConnectError> {
    check_url(url)?;
    let client = redis::Client::open(url).map_err(|err| client_error(url, &err))?;
    refuse_insecure(url, &client)?;
    Ok(client)
}

/// Parses a `rediss://` `url` into a client that trusts and presents what
/// `tls` says; nothing is connected yet.
///
/// # Errors
///
/// [`ConnectError`] when the URL is malformed or does not ask for TLS.
pub fn open_tls_client(url: &str, tls: &TlsSettings) -> Result<redis::Client, ConnectError> {
    // Parsed plainly first, so that a redis:// URL gets a message of its own.
    let plain = open_client(url)?;
    if !matches!(
        plain.get_connection_info().addr(),
        ConnectionAddr::TcpTls { .. }
    ) {
        return Err(ConnectError::new(
            redact_url(url),
            "TLS certificate files are given but the URL does not ask for TLS; use rediss://",
        ));
    }
    redis::Client::build_with_tls(url, tls.redis_certificates())
        .map_err(|err| client_error(url, &err))
}

/// Checks `url` the way a person needs: everything the `redis` crate would
/// ignore, or read differently from what was meant, is refused with what to
/// do instead; nothing is connected. [`open_client`] runs it first.
///
/// # Errors
///
/// [`ConnectError`], whose message never holds the password: no scheme,
/// a scheme other than Redis's, a password in a TCP URL's query
/// (`?password=`), a password or user name holding an unencoded `/`, `#`
/// or `?`, a URL that does not parse, a fragment other than `#insecure`
/// (refused too), an unknown or repeated query parameter.
pub fn check_url(url: &str) -> Result<(), ConnectError> {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Never echoed: a value without a scheme may be anything, a
        // password among them.
        return Err(ConnectError::new(
            "",
            "the value is not a URL (it has no scheme://); write redis://HOST:PORT, rediss://HOST:PORT for TLS, or redis+unix:///PATH for a Unix socket",
        ));
    };
    let scheme_ok = !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return Err(ConnectError::new(
            "",
            "the value is not a URL (what precedes :// is no scheme); write redis://HOST:PORT, rediss://HOST:PORT for TLS, or redis+unix:///PATH for a Unix socket",
        ));
    }
    let lower = scheme.to_ascii_lowercase();
    if SENTINEL_SCHEMES.contains(&lower.as_str()) {
        return parse_sentinel_url(url).map(drop);
    }
    if CLUSTER_SCHEMES.contains(&lower.as_str()) {
        return parse_cluster_url(url).map(drop);
    }
    let unix = UNIX_SCHEMES.contains(&lower.as_str());
    if !unix && !TCP_SCHEMES.contains(&lower.as_str()) {
        return Err(ConnectError::new(
            format!("{scheme}://..."),
            format!("the scheme {scheme}:// is not Redis's; use redis://, rediss:// (TLS), redis+sentinel:// (a Sentinel-managed master), redis+cluster:// (a Redis Cluster) or redis+unix:// (a Unix socket)"),
        ));
    }
    if !unix {
        if secret_param_at(rest).is_some() {
            return Err(ConnectError::new(
                redact_url(url),
                format!("a password in the query (?password= or ?pass=) is ignored by the Redis client of a {scheme}:// URL, and would be shown wherever the URL is; {USERINFO_ADVICE}"),
            ));
        }
        // Redis URLs hold no `@` past the authority (a database number, a
        // `protocol` value, `#insecure`): one there means the user-info
        // ended early, at an unencoded `/`, `#` or `?` in the password.
        let authority_len = rest.find(AUTHORITY_END).unwrap_or(rest.len());
        if let Some(at) = rest.rfind('@').filter(|at| *at > authority_len) {
            return Err(ConnectError::new(
                format!("{scheme}://***{}", rest.get(at..).unwrap_or_default()),
                "the password or user name holds a character that must be percent-encoded: / as %2F, # as %23, ? as %3F (and @ as %40, : as %3A)",
            ));
        }
    }
    let Some(parsed) = redis::parse_redis_url(url) else {
        return Err(ConnectError::new(
            redact_url(url),
            "it does not parse as a URL: check the host and port, and percent-encode / # ? @ : in a user name or password (%2F %23 %3F %40 %3A)",
        ));
    };
    match parsed.fragment() {
        None => {}
        Some("insecure") if matches!(lower.as_str(), "rediss" | "valkeys") => {
            return Err(ConnectError::new(redact_url(url), INSECURE_REASON));
        }
        Some(_) => {
            return Err(ConnectError::new(
                format!(
                    "{}#...",
                    redact_url(url.split('#').next().unwrap_or_default())
                ),
                "a Redis URL has no #fragment (if the password holds #, percent-encode it as %23)",
            ));
        }
    }
    let pairs: Vec<(String, String)> = parsed
        .query_pairs()
        .map(|(name, value)| (name.into_owned(), value.into_owned()))
        .collect();
    check_query(
        scheme,
        unix,
        parsed.query().unwrap_or_default(),
        &pairs,
        url,
    )?;
    let db = if unix {
        pairs
            .iter()
            .find(|(name, _)| name == "db")
            .map(|(_, value)| value.as_str())
    } else {
        Some(parsed.path().trim_matches('/')).filter(|path| !path.is_empty())
    };
    if db.is_some_and(|db| db.parse::<i64>().is_err()) {
        return Err(ConnectError::new(
            redact_url(url),
            if unix {
                "the database (db=) must be a number, such as db=2"
            } else {
                "the path must be a database number, such as redis://host:6379/2"
            },
        ));
    }
    let protocol = pairs.iter().find(|(name, _)| name == "protocol");
    if let Some((_, value)) = protocol.filter(|(_, value)| !PROTOCOLS.contains(&value.as_str())) {
        return Err(ConnectError::new(
            redact_url(url),
            format!("protocol={value:?} names no protocol the client speaks: use 2 (or resp2) or 3 (or resp3)"),
        ));
    }
    Ok(())
}

/// The values of `protocol` the client reads.
const PROTOCOLS: &[&str] = &["2", "3", "resp2", "resp3"];

/// Checks the query's parameters: each one the crate reads for the scheme,
/// at most once.
/// `pairs` are the decoded parts of `query`, in order.
fn check_query(
    scheme: &str,
    unix: bool,
    query: &str,
    pairs: &[(String, String)],
    url: &str,
) -> Result<(), ConnectError> {
    let allowed = if unix { UNIX_PARAMS } else { TCP_PARAMS };
    let takes = if unix {
        "db, user, pass and protocol"
    } else {
        "only protocol (2 or 3); the database goes in the path (/2), the user name and password in the user-info"
    };
    let raw_parts = query.split('&').filter(|part| !part.is_empty());
    let mut seen: Vec<&str> = Vec::new();
    // `query_pairs` yields one decoded pair per non-empty `&` part, in order.
    for (raw, (name, _)) in raw_parts.zip(pairs) {
        if !raw.contains('=') {
            // A bare word may be a misplaced password: not echoed.
            return Err(ConnectError::new(
                format!("{}?...", redact_url(url.split('?').next().unwrap_or_default())),
                format!("the query holds a part without a name=value form; a {scheme}:// URL takes {takes}"),
            ));
        }
        let name = name.as_str();
        if !unix && SECRET_PARAMS.contains(&name) {
            return Err(ConnectError::new(
                redact_url(url),
                format!("a password in the query (?{name}=) is ignored by the Redis client of a {scheme}:// URL, and would be shown wherever the URL is; {USERINFO_ADVICE}"),
            ));
        }
        if unix && name == "password" {
            return Err(ConnectError::new(
                redact_url(url),
                "a Unix-socket URL takes its password as pass=, not password= (redis+unix:///PATH?user=USER&pass=PASSWORD)",
            ));
        }
        if !allowed.contains(&name) {
            return Err(ConnectError::new(
                redact_url(url),
                format!("unknown query parameter {name:?}: a {scheme}:// URL takes {takes}"),
            ));
        }
        if seen.contains(&name) {
            return Err(ConnectError::new(
                redact_url(url),
                format!("the query parameter {name:?} is given more than once"),
            ));
        }
        seen.push(name);
    }
    Ok(())
}

/// `rest` (a URL past its `://`, without user-info) with a "port" that is
/// no number hidden: `redis://:secret` is a password written without its
/// `@host`, which a URL parser reads as an empty host and a port.
fn hide_port_like_password(rest: &str) -> String {
    let authority_len = rest.find(AUTHORITY_END).unwrap_or(rest.len());
    let authority = rest.get(..authority_len).unwrap_or_default();
    let ipv6_literal = authority.starts_with('[') && authority.ends_with(']');
    match authority.rsplit_once(':') {
        Some((host, port)) if !ipv6_literal && !port.chars().all(|c| c.is_ascii_digit()) => {
            format!(
                "{host}:***{}",
                rest.get(authority_len..).unwrap_or_default()
            )
        }
        _ => rest.to_owned(),
    }
}

const INSECURE_REASON: &str = "#insecure turns certificate checks off, which this worker does not do; give the CA that signed the server's certificate (`ca_file`) instead";

fn client_error(url: &str, err: &redis::RedisError) -> ConnectError {
    let text = err.to_string();
    ConnectError::new(
        redact_url(url),
        // The client's message could quote the URL; then only its category.
        if text.contains(url) {
            err.category().to_owned()
        } else {
            text.replace('\n', " ")
        },
    )
}

/// Certificate checks stay on: `rediss://...#insecure` is refused.
fn refuse_insecure(url: &str, client: &redis::Client) -> Result<(), ConnectError> {
    match client.get_connection_info().addr() {
        ConnectionAddr::TcpTls { insecure: true, .. } => {
            Err(ConnectError::new(redact_url(url), INSECURE_REASON))
        }
        _ => Ok(()),
    }
}

/// A connection that reconnects after a fault (to a Sentinel-managed
/// master: to the one the sentinels name then); the call that met the fault
/// still fails, and the caller decides when to retry.
pub fn lazy_manager(
    endpoint: impl Into<RedisEndpoint>,
    response_timeout: Duration,
) -> Result<RedisConnection, redis::RedisError> {
    endpoint.into().connection(ConnectionTimeouts {
        connect: Duration::from_secs(5),
        response: response_timeout,
        min_reconnect_delay: Some(Duration::from_millis(50)),
    })
}

/// Where `client` connects, without credentials: `host:port`, or the
/// socket's path; for messages about the server.
pub fn server_address(client: &redis::Client) -> String {
    client.get_connection_info().addr().to_string()
}

/// `url` with every password replaced by `***`, for logs, errors and
/// printed configuration; for any text, not only a valid URL (a text that
/// is no URL at all is `***` whole).
///
/// Redacted: the user-info's password (`redis://user:***@host`), a lone
/// user-info (`redis://***@host`: the client takes it as a user name, but it
/// is mostly a password put there), and the values of `pass` and `password`
/// query parameters (`redis+unix:///run/redis.sock?pass=***`). A password
/// holding an unencoded `/`, `#`, `?` or `&` is hidden whole too: the
/// user-info runs to the last `@` (for TCP and unknown schemes), and a query
/// password runs to the next parameter the client knows or the end.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Not a URL: it may be anything, a password among them.
        return "***".to_owned();
    };
    let unix = UNIX_SCHEMES.contains(&scheme.to_ascii_lowercase().as_str());
    let query_secret = secret_param_at(rest).unwrap_or(rest.len());
    let (head, tail) = rest.split_at(query_secret);
    // A Unix socket's path may hold an `@`: only its (normally empty)
    // authority can hold user-info.
    let userinfo_zone = if unix {
        head.get(..head.find(AUTHORITY_END).unwrap_or(head.len()))
            .unwrap_or_default()
    } else {
        head
    };
    let head = match userinfo_zone.rfind('@') {
        None => hide_port_like_password(head),
        Some(at) => {
            let userinfo = head.get(..at).unwrap_or_default();
            let after = head.get(at..).unwrap_or_default();
            match userinfo.split_once(':') {
                Some((user, _password)) => format!("{user}:***{after}"),
                None if userinfo.is_empty() => head.to_owned(),
                None => format!("***{after}"),
            }
        }
    };
    format!("{scheme}://{head}{}", redact_query_secrets(tail))
}

/// Where the first `pass` or `password` query parameter of `rest` (a URL
/// past its `://`) starts: at its `?` or `&`.
fn secret_param_at(rest: &str) -> Option<usize> {
    param_starts(rest)
        .filter(|(_, name)| is_secret(name))
        .map(|(at, _)| at)
        .next()
}

/// Each `?name=` or `&name=` of `text` whose name the client knows (or is
/// `password`), with its position (at the `?` or `&`) and name.
fn param_starts(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.match_indices(['?', '&']).filter_map(move |(at, _)| {
        let after = text.get(at + 1..)?;
        let name = after.get(..after.find('=')?)?;
        let decoded = percent_decoded(name);
        KNOWN_PARAMS
            .iter()
            .any(|known| decoded.eq_ignore_ascii_case(known))
            .then_some((at, name))
    })
}

/// `text` with its `%XX` escapes decoded (as the client decodes a query's
/// names), for comparing names; anything else is kept as it is.
fn percent_decoded(text: &str) -> String {
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, after)) = rest.split_first() {
        let escaped = (byte == b'%')
            .then(|| after.get(..2))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(value) => {
                out.push(value);
                rest = after.get(2..).unwrap_or_default();
            }
            None => {
                out.push(byte);
                rest = after;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the raw query parameter name `name` decodes to a secret one.
fn is_secret(name: &str) -> bool {
    let decoded = percent_decoded(name);
    SECRET_PARAMS
        .iter()
        .any(|secret| decoded.eq_ignore_ascii_case(secret))
}

/// `tail` (from the first secret parameter on) with the value of every
/// `pass` and `password` parameter replaced by `***`; a value runs to the
/// next parameter the client knows, or the end.
fn redact_query_secrets(tail: &str) -> String {
    let starts: Vec<(usize, &str)> = param_starts(tail).collect();
    let mut out = String::with_capacity(tail.len());
    for (index, (at, name)) in starts.iter().enumerate() {
        let end = starts.get(index + 1).map_or(tail.len(), |(next, _)| *next);
        if is_secret(name) {
            out.push_str(tail.get(*at..=*at + name.len()).unwrap_or_default());
            out.push_str("=***");
        } else {
            out.push_str(tail.get(*at..end).unwrap_or_default());
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The secret every form below hides.
    const SECRET: &str = "s3cr";

    #[test]
    fn redacts_passwords_and_only_them() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
            ("redis://alice:s3cret@host", "redis://alice:***@host"),
            (
                "rediss://alice:p@ss:w@rd@host/2",
                "rediss://alice:***@host/2",
            ),
            ("redis://s3cret@host", "redis://***@host"),
            ("redis://host/0?password=x", "redis://host/0?password=***"),
            (
                "redis://host:6379?protocol=3&pass=x",
                "redis://host:6379?protocol=3&pass=***",
            ),
            (
                "redis+unix:///run/redis.sock?db=1&user=u&pass=secret",
                "redis+unix:///run/redis.sock?db=1&user=u&pass=***",
            ),
            (
                "unix:///run/redis.sock?pass=se&cr#et&db=2",
                "unix:///run/redis.sock?pass=***&db=2",
            ),
            ("unix:///run/a@b.sock", "unix:///run/a@b.sock"),
            ("redis://:se/cr#et@host:6379", "redis://:***@host:6379"),
            ("redis://@host", "redis://@host"),
            ("not a url", "***"),
            ("secret@host", "***"),
            ("redis://:secret", "redis://:***"),
            ("redis://host:secret/0", "redis://host:***/0"),
            ("redis://[::1]:6379", "redis://[::1]:6379"),
            ("redis://[::1]", "redis://[::1]"),
            ("42", "***"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    /// Every way a password can be written, right or wrong.
    fn password_forms() -> Vec<String> {
        [
            "redis://:{s}@host:6379",
            "redis://user:{s}@host:6379/0",
            "rediss://user:{s}@host:6380",
            "redis://{s}@host",
            "redis://host:6379?password={s}",
            "redis://host:6379?pass={s}",
            "redis://host:6379/0?protocol=3&password={s}",
            "rediss://host:6379?PASSWORD={s}",
            "redis://host:6379?password={s}@x",
            "redis://host:6379?pa%73sword={s}",
            "redis+unix:///run/redis.sock?db=1&user=u&pass={s}",
            "unix:///run/redis.sock?pass={s}",
            "unix:///run/redis.sock?password={s}",
            "unix:///run/redis.sock?pass={s}#x&y",
            "unix:///run/redis.sock?pass=a#{s}",
            "unix:///run/redis.sock?pass=a&{s}",
            "redis://:se/{s}@host:6379",
            "redis://:{s}/x@host:6379",
            "redis://:{s}#x@host:6379",
            "redis://:{s}?x@host:6379",
            "redis://u:{s}/#?@host:6379/2",
            "redis://{s}/x@host",
            "redis://:{s}@",
            "redis://:{s}",
            "redis://:{s}@host:6379#frag",
            "redis://:{s}:x@host",
            "http://:{s}@host",
            "{s}",
            "{s}@host",
        ]
        .iter()
        .map(|form| form.replace("{s}", SECRET))
        .collect()
    }

    #[test]
    fn no_form_of_password_is_ever_shown() {
        for url in password_forms() {
            let shown = redact_url(&url);
            assert!(!shown.contains(SECRET), "{url} shown as {shown}");
            if let Err(err) = open_client(&url) {
                let err = err.to_string();
                assert!(!err.contains(SECRET), "{url}: {err}");
                assert!(!err.contains('\n'), "{url}: {err}");
            }
        }
    }

    #[test]
    fn a_word_alone_in_the_query_is_not_echoed() {
        for url in ["redis://host:6379?{s}", "redis://host:6379?protocol=3&{s}"] {
            let url = url.replace("{s}", SECRET);
            let err = open_client(&url).unwrap_err().to_string();
            assert!(!err.contains(SECRET), "{url}: {err}");
            assert!(err.contains("without a name=value form"), "{url}: {err}");
        }
    }

    #[test]
    fn urls_the_client_reads_as_meant_are_accepted() {
        for url in [
            "redis://127.0.0.1:6379",
            "redis://127.0.0.1",
            "redis://localhost:6379/2",
            "redis://:pw@host:6379",
            "redis://user:pw@host:6379/0",
            "redis://user:p%2Fw%23x%3Fy%40z%3A@host:6379",
            "redis://:p@ss:word@host",
            "redis://host:6379/?protocol=3",
            "redis://host:6379?protocol=resp2",
            "REDIS://HOST:6379",
            "rediss://user:pw@host:6380",
            "valkey://host:6379",
            "valkeys://host:6380/1",
            "redis+unix:///run/redis.sock",
            "redis+unix:///run/redis.sock?db=1&user=u&pass=secret",
            "unix:///run/redis.sock?pass=secret&protocol=3",
            "valkey+unix:///run/valkey.sock?db=3",
        ] {
            if let Err(err) = open_client(url) {
                panic!("{url}: {err}");
            }
        }
    }

    #[test]
    fn urls_the_client_would_misread_are_refused_saying_why() {
        for (url, says) in [
            ("42", "not a URL"),
            ("", "not a URL"),
            ("localhost:6379", "not a URL"),
            ("a b://host", "not a URL"),
            ("http://127.0.0.1", "scheme http:// is not Redis's"),
            ("redis://host:6379?password=x", "user-info"),
            ("rediss://host:6379?pass=x", "user-info"),
            ("redis://host:6379?pa%73s=x", "user-info"),
            ("redis://:se/cr#et@host:6379", "must be percent-encoded"),
            ("redis://:se?cret@host:6379", "must be percent-encoded"),
            ("redis://:secret@", "does not parse"),
            ("redis://:secret", "does not parse"),
            ("redis://host:6379?db=2", "unknown query parameter \"db\""),
            (
                "redis://host:6379?user=u",
                "unknown query parameter \"user\"",
            ),
            (
                "redis://host:6379?timeout=5",
                "unknown query parameter \"timeout\"",
            ),
            ("redis://host:6379?word", "without a name=value form"),
            ("redis+unix:///s.sock?password=x", "pass=, not password="),
            ("unix:///s.sock?tls=1", "unknown query parameter \"tls\""),
            ("unix:///s.sock?db=1&db=2", "more than once"),
            ("unix:///s.sock?pass=a#b", "no #fragment"),
            ("redis://host:6379#x", "no #fragment"),
            ("rediss://host:6379#insecure", "#insecure"),
            ("redis://host:6379/x", "must be a database number"),
            ("unix:///s.sock?db=x", "must be a number"),
            ("redis://host:6379?protocol=4", "names no protocol"),
            ("redis://0.0.0.0:6379", "wildcard"),
        ] {
            let err = open_client(url).err().map(|err| err.to_string());
            let err = err.unwrap_or_else(|| panic!("{url} accepted"));
            assert!(err.starts_with("invalid Redis URL"), "{url}: {err}");
            assert!(err.contains(says), "{url}: {err}");
        }
    }

    #[test]
    fn a_bad_url_is_an_error_without_the_password() {
        let err = open_client("redis://:hunter2@").unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let err = open_client("http://:hunter2@host").unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.starts_with("invalid Redis URL"), "{err}");
        // An unencoded `/` leaves the host shown, not the password.
        let err = open_client("redis://:se/cr#et@host:6379")
            .unwrap_err()
            .to_string();
        assert!(err.contains("redis://***@host:6379"), "{err}");
    }

    #[test]
    fn the_server_address_has_no_credentials() {
        let client = open_client("redis://u:pw@example.com:6380/1").unwrap();
        assert_eq!(server_address(&client), "example.com:6380");
        let client = open_client("redis+unix:///run/r.sock?pass=pw").unwrap();
        assert_eq!(server_address(&client), "/run/r.sock");
    }
}
