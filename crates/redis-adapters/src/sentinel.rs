//! `redis+sentinel://` URLs: the master of a Sentinel-managed group, found
//! through its sentinels.
//!
//! The form is `redis+sentinel://[user:password@]host:port[,host:port...]/MASTER_NAME[/DB]`
//! (`rediss+sentinel://` for TLS to the sentinels and to the master). The
//! credentials are the master's, and also the sentinels' unless a separate
//! sentinel password is given. A port may be left out (26379, Sentinel's
//! own).

use std::time::Duration;

use lifecycle_streams::{SentinelMaster, TlsSettings};
use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, TlsMode};

use crate::connect::{redact_url, ConnectError};

/// Schemes of a Sentinel-managed master (with TLS for the `s` forms).
pub(crate) const SENTINEL_SCHEMES: &[&str] = &["redis+sentinel", "rediss+sentinel"];

/// Sentinel's own port, when a host names none.
const SENTINEL_PORT: u16 = 26379;

/// What a `redis+sentinel://` URL says.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// TLS to the sentinels and the master (`rediss+sentinel://`).
    pub tls: bool,
    /// The user name, for the master and the sentinels.
    pub username: Option<String>,
    /// The password, for the master and (unless one of their own is given)
    /// the sentinels.
    pub password: Option<String>,
    /// The sentinels, `(host, port)`.
    pub sentinels: Vec<(String, u16)>,
    /// The master's name, as the sentinels monitor it.
    pub master: String,
    /// The database selected on the master.
    pub db: i64,
}

impl std::fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelUrl")
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .field("db", &self.db)
            .finish()
    }
}

/// Whether `url` names a Sentinel-managed master.
pub fn is_sentinel_url(url: &str) -> bool {
    url.split_once("://")
        .is_some_and(|(scheme, _)| SENTINEL_SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()))
}

/// Reads a `redis+sentinel://` URL.
///
/// # Errors
///
/// [`ConnectError`], whose message never holds the password, for any part
/// that is missing, malformed, or not of this form (a query, a fragment).
pub fn parse_sentinel_url(url: &str) -> Result<SentinelUrl, ConnectError> {
    let shown = || redact_url(url);
    let form = "write redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]";
    let parsed = parse_hosts_url(
        url,
        &HostsUrlForm {
            schemes: ["redis+sentinel", "rediss+sentinel"],
            what: "Sentinel's",
            host: "a sentinel's",
            path: "the database goes in the path",
            form,
            default_port: SENTINEL_PORT,
        },
    )?;
    let HostsUrl {
        tls,
        username,
        password,
        hosts: sentinels,
        tail,
    } = parsed;
    let mut path = tail.trim_start_matches('/').split('/');
    let master = path.next().unwrap_or_default();
    if master.is_empty() {
        return Err(ConnectError::new(
            shown(),
            format!("the URL names no master (the path's first part); {form}"),
        ));
    }
    let master = decode(master).ok_or_else(|| {
        ConnectError::new(
            shown(),
            "the master's name is not valid percent-encoded UTF-8",
        )
    })?;
    let db = match path.next() {
        None | Some("") => 0,
        Some(db) => db
            .parse::<i64>()
            .ok()
            .filter(|db| *db >= 0)
            .ok_or_else(|| {
                ConnectError::new(
                    shown(),
                    format!(
                        "the path's second part must be a database number, such as /{master}/2"
                    ),
                )
            })?,
    };
    if path.any(|part| !part.is_empty()) {
        return Err(ConnectError::new(
            shown(),
            format!("the path holds more than a master's name and a database; {form}"),
        ));
    }
    Ok(SentinelUrl {
        tls,
        username,
        password,
        sentinels,
        master,
        db,
    })
}

/// The form of a URL that names several hosts (`redis+sentinel://`,
/// `redis+cluster://`), for [`parse_hosts_url`].
pub(crate) struct HostsUrlForm {
    /// The plain and the TLS scheme.
    pub schemes: [&'static str; 2],
    /// Whose schemes they are, in messages ("Sentinel's").
    pub what: &'static str,
    /// What one host is, in messages ("a sentinel's").
    pub host: &'static str,
    /// Where the rest of the settings go instead of a query, in messages.
    pub path: &'static str,
    /// How to write the URL, in messages.
    pub form: &'static str,
    /// The port of a host that names none.
    pub default_port: u16,
}

/// What a URL naming several hosts says, its path aside.
pub(crate) struct HostsUrl {
    /// The TLS scheme.
    pub tls: bool,
    /// The user name.
    pub username: Option<String>,
    /// The password.
    pub password: Option<String>,
    /// The hosts, `(host, port)`.
    pub hosts: Vec<(String, u16)>,
    /// Whatever follows the hosts (the path, starting with `/`, or empty).
    pub tail: String,
}

/// Reads the scheme, user-info and hosts of a URL of `form`.
pub(crate) fn parse_hosts_url(url: &str, form: &HostsUrlForm) -> Result<HostsUrl, ConnectError> {
    let shown = || redact_url(url);
    let HostsUrlForm {
        schemes,
        what,
        host: one_host,
        path: path_advice,
        form,
        default_port,
    } = *form;
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(ConnectError::new(
            "",
            format!("the value is not a URL; {form}"),
        ));
    };
    let lower = scheme.to_ascii_lowercase();
    let tls = if lower == schemes[0] {
        false
    } else if lower == schemes[1] {
        true
    } else {
        return Err(ConnectError::new(
            format!("{scheme}://..."),
            format!("the scheme {scheme}:// is not {what}; {form}"),
        ));
    };
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    if rest.rfind('@').is_some_and(|at| at > authority_len) {
        return Err(ConnectError::new(
            format!("{scheme}://***{}", rest.get(rest.rfind('@').unwrap_or(0)..).unwrap_or_default()),
            "the password or user name holds a character that must be percent-encoded: / as %2F, # as %23, ? as %3F (and @ as %40, : as %3A)",
        ));
    }
    let (authority, tail) = rest.split_at(authority_len);
    if tail.contains('?') {
        return Err(ConnectError::new(
            shown(),
            format!("a {}:// URL takes no query parameters ({path_advice}, the user name and password in the user-info); {form}", schemes[0]),
        ));
    }
    if tail.contains('#') {
        return Err(ConnectError::new(
            shown(),
            "a Redis URL has no #fragment (if the password holds #, percent-encode it as %23)",
        ));
    }
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(userinfo) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((user, password)) => (user, Some(password)),
                None => (userinfo, None),
            };
            let user = decode(user).ok_or_else(|| {
                ConnectError::new(shown(), "the user name is not valid percent-encoded UTF-8")
            })?;
            let password = password
                .map(|password| {
                    decode(password).ok_or_else(|| {
                        ConnectError::new(
                            shown(),
                            "the password is not valid percent-encoded UTF-8",
                        )
                    })
                })
                .transpose()?;
            (
                Some(user).filter(|user| !user.is_empty()),
                password.filter(|password| !password.is_empty()),
            )
        }
    };
    let hosts_text = hosts;
    let mut hosts = Vec::new();
    for host in hosts_text.split(',') {
        hosts.push(parse_host(host, default_port).ok_or_else(|| {
            ConnectError::new(
                shown(),
                format!("{host:?} is not {one_host} HOST:PORT; {form}"),
            )
        })?);
    }
    Ok(HostsUrl {
        tls,
        username,
        password,
        hosts,
        tail: tail.to_owned(),
    })
}

/// `host:port`, `host` (`default_port`), `[v6]:port` or `[v6]`.
fn parse_host(text: &str, default_port: u16) -> Option<(String, u16)> {
    let (host, port) = if let Some(v6) = text.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':')?)),
        }
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    if host.is_empty() || (host.contains(['@', ':', ' ']) && !text.starts_with('[')) {
        return None;
    }
    let port = match port {
        None => default_port,
        Some(port) => port.parse::<u16>().ok().filter(|port| *port > 0)?,
    };
    Some((host.to_owned(), port))
}

/// Percent-decodes `text`; `None` when the result is not UTF-8 or an escape
/// is broken.
pub(crate) fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while let Some(&byte) = bytes.get(index) {
        if byte == b'%' {
            let hex = text.get(index + 1..index + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            out.push(byte);
            index += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The master `url` names, found through its sentinels with `tls` (for
/// `rediss+sentinel://`), `sentinel_password` (when the sentinels have a
/// password of their own), finding it taking `timeout` at most. Nothing is
/// connected yet.
///
/// # Errors
///
/// [`ConnectError`] when the URL cannot be used, or TLS files are given
/// for a plain `redis+sentinel://` URL.
pub fn open_sentinel_master(
    url: &str,
    tls: Option<&TlsSettings>,
    sentinel_password: Option<&str>,
    timeout: Duration,
) -> Result<SentinelMaster, ConnectError> {
    let parsed = parse_sentinel_url(url)?;
    if tls.is_some() && !parsed.tls {
        return Err(ConnectError::new(
            redact_url(url),
            "TLS certificate files are given but the URL does not ask for TLS; use rediss+sentinel://",
        ));
    }
    let addresses: Vec<ConnectionAddr> = parsed
        .sentinels
        .iter()
        .map(|(host, port)| {
            if parsed.tls {
                ConnectionAddr::TcpTls {
                    host: host.clone(),
                    port: *port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                ConnectionAddr::Tcp(host.clone(), *port)
            }
        })
        .collect();
    let shown = parsed
        .sentinels
        .iter()
        .map(|(host, port)| format!("{host}:{port}"))
        .collect::<Vec<_>>()
        .join(",");
    let failed = |err: redis::RedisError| {
        ConnectError::new(redact_url(url), err.to_string().replace('\n', " "))
    };
    let mut builder =
        SentinelClientBuilder::new(addresses, &parsed.master, SentinelServerType::Master)
            .map_err(failed)?
            .set_client_to_redis_db(parsed.db);
    if let Some(user) = &parsed.username {
        builder = builder
            .set_client_to_redis_username(user)
            .set_client_to_sentinel_username(user);
    }
    if let Some(password) = &parsed.password {
        builder = builder.set_client_to_redis_password(password);
    }
    if let Some(password) = sentinel_password.or(parsed.password.as_deref()) {
        builder = builder.set_client_to_sentinel_password(password);
    }
    if parsed.tls {
        builder = builder
            .set_client_to_redis_tls_mode(TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(TlsMode::Secure);
        if let Some(tls) = tls {
            builder = builder
                .set_client_to_redis_certificates(tls.redis_certificates())
                .set_client_to_sentinel_certificates(tls.redis_certificates());
        }
    }
    let client = builder.build().map_err(failed)?;
    Ok(SentinelMaster::new(
        client,
        parsed.master,
        shown,
        parsed.db,
        timeout,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_forms_parse() {
        let url = parse_sentinel_url(
            "redis+sentinel://worker:s%40cret@10.0.0.1:26379,10.0.0.2:26380,sentinel-3/lobby/2",
        )
        .unwrap();
        assert_eq!(
            url,
            SentinelUrl {
                tls: false,
                username: Some("worker".into()),
                password: Some("s@cret".into()),
                sentinels: vec![
                    ("10.0.0.1".into(), 26379),
                    ("10.0.0.2".into(), 26380),
                    ("sentinel-3".into(), 26379),
                ],
                master: "lobby".into(),
                db: 2,
            }
        );
        let url = parse_sentinel_url("rediss+sentinel://:pw@[::1]:5000/mymaster").unwrap();
        assert!(url.tls);
        assert_eq!(url.username, None);
        assert_eq!(url.password.as_deref(), Some("pw"));
        assert_eq!(url.sentinels, vec![("::1".to_owned(), 5000)]);
        assert_eq!((url.master.as_str(), url.db), ("mymaster", 0));
        assert!(format!("{url:?}").contains("***") && !format!("{url:?}").contains("pw"));
    }

    #[test]
    fn bad_forms_are_refused_without_the_password() {
        for (url, says) in [
            ("redis+sentinel://:secret@h:26379", "names no master"),
            ("redis+sentinel://:secret@h:26379/", "names no master"),
            (
                "redis+sentinel://:secret@h:port/m",
                "is not a sentinel's HOST:PORT",
            ),
            (
                "redis+sentinel://:secret@h:0/m",
                "is not a sentinel's HOST:PORT",
            ),
            (
                "redis+sentinel://:secret@h:1,,h:2/m",
                "is not a sentinel's HOST:PORT",
            ),
            ("redis+sentinel://:secret@h:1/m/x", "database number"),
            ("redis+sentinel://:secret@h:1/m/2/3", "more than"),
            ("redis+sentinel://:secret@h:1/m?protocol=3", "no query"),
            ("redis+sentinel://:secret@h:1/m#insecure", "#fragment"),
            ("redis+sentinel://:sec/ret@h:1/m", "percent-encoded"),
            ("redis+sentinel://:%zzsecret@h:1/m", "percent-encoded"),
        ] {
            let err = parse_sentinel_url(url).unwrap_err().to_string();
            assert!(err.contains(says), "{url}: {err}");
            assert!(
                !err.contains("secret") && !err.contains("ret@"),
                "{url}: {err}"
            );
        }
    }

    #[test]
    fn tls_files_need_the_tls_scheme() {
        let tls = TlsSettings::load(&lifecycle_streams::TlsFiles::default()).unwrap();
        let err = open_sentinel_master(
            "redis+sentinel://h:1/m",
            Some(&tls),
            None,
            Duration::from_secs(1),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("rediss+sentinel://"), "{err}");
        assert!(open_sentinel_master(
            "rediss+sentinel://h:1/m",
            Some(&tls),
            None,
            Duration::from_secs(1)
        )
        .is_ok());
        assert!(open_sentinel_master(
            "redis+sentinel://u:p@h:1,h:2/m/3",
            None,
            Some("other"),
            Duration::from_secs(1)
        )
        .is_ok());
    }
}
