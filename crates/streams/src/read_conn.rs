//! The consumer's reading connection: its own socket, `XREAD` commands written
//! by hand and replies scanned in place by [`XreadParser`].
//!
//! It carries nothing but reads, so a blocking `XREAD` never delays another
//! command, and the next read can be sent before the current batch is handled
//! (the server prepares it while we work).

use crate::fault::quote_answer;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use lifecycle_domain::EntryId;
use redis::{ConnectionAddr, ConnectionInfo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::resp::{
    encode_command, parse_probe_reply, Batch, DeletionProbe, Parsed, ProtocolError,
    ServerReplyError, XreadParser, DELETION_PROBE_SCRIPT,
};
use crate::tls::TlsSettings;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 256 * 1024;

/// A transport the connection runs over.
trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The socket failed or closed.
    #[error("connection to Redis failed: {0}")]
    Io(#[from] std::io::Error),
    /// No answer within the response timeout.
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The server answered with an error.
    #[error("Redis answered: {}", .0.message)]
    Server(ServerReplyError),
    /// The server's bytes are not a reply we understand.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The URL asks for a transport the reader does not speak.
    #[error("{0}")]
    Unsupported(String),
    /// The first answer on a fresh connection is not the Redis protocol:
    /// the URL's port belongs to another kind of server.
    #[error("the server is not a Redis server (it answered {answered:?}): is the URL's port a Redis port? (rediss:// for a port that speaks TLS)")]
    NotRedis {
        /// The start of its answer, printable characters only.
        answered: String,
    },
    /// The sentinels could not name a reachable master (a failover under
    /// way, or no sentinel answers).
    #[error("cannot find the master: {0}")]
    Locate(redis::RedisError),
    /// The reply grew past the limit before it was complete; the connection
    /// must be dropped.
    #[error("an XREAD reply exceeded {limit} bytes after {entries} complete entries")]
    ReplyTooLarge {
        /// The limit it exceeded.
        limit: usize,
        /// Entries complete before the limit was reached.
        entries: usize,
        /// The entry that was arriving, if its id had arrived.
        partial_entry_id: Option<EntryId>,
    },
}

/// A connection that only reads the stream.
pub struct ReadConnection {
    io: Box<dyn Transport>,
    buf: BytesMut,
    parser: XreadParser,
    out: Vec<u8>,
    /// Whether a deletion probe precedes the read in flight.
    probe_pending: bool,
    /// Whether this server has the probe's script cached, so that its hash
    /// (`EVALSHA`) is sent rather than its text.
    probe_cached: bool,
    /// The probe's answer once parsed, until its read's reply is complete:
    /// kept here rather than in the receiving future, so that dropping that
    /// future loses nothing.
    probe_seen: Option<DeletionProbe>,
    /// Whether the server has answered in RESP on this connection: until
    /// then, bytes that are not RESP mean another kind of server.
    spoke_resp: bool,
}

/// The first byte of every RESP2 and RESP3 reply.
const RESP_TYPE_BYTES: &[u8] = b"+-:$*_,#!=(%~>|";

/// The start of `buf` when it cannot be the start of a RESP reply, as
/// [`quote_answer`] quotes it.
pub(crate) fn foreign_answer(buf: &[u8]) -> Option<String> {
    let first = *buf.first()?;
    if RESP_TYPE_BYTES.contains(&first) {
        return None;
    }
    Some(quote_answer(buf))
}

/// The SHA1 of the probe's script, computed once for the process.
static PROBE_SHA: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    redis::Script::new(DELETION_PROBE_SCRIPT)
        .get_hash()
        .to_owned()
});

/// A reply to one read: the batch, and what the probe sent just before the
/// read saw (when one was sent).
#[derive(Debug)]
pub struct Received {
    /// The entries read.
    pub batch: Batch,
    /// The stream's deletion markers just before the read.
    pub probe: Option<DeletionProbe>,
}

impl std::fmt::Debug for ReadConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadConnection").finish_non_exhaustive()
    }
}

impl ReadConnection {
    /// Connects per `info` (TCP, TLS over TCP with `tls` or else the
    /// system's trust store, or a Unix socket), authenticates and selects the
    /// database, all within `timeout`.
    ///
    /// # Errors
    ///
    /// [`ReadError`] when the server cannot be reached or refuses.
    pub async fn connect(
        info: &ConnectionInfo,
        tls: Option<&TlsSettings>,
        timeout: Duration,
    ) -> Result<Self, ReadError> {
        tokio::time::timeout(timeout, Self::connect_inner(info, tls))
            .await
            .map_err(|_| ReadError::Timeout(timeout))?
    }

    async fn connect_inner(
        info: &ConnectionInfo,
        tls: Option<&TlsSettings>,
    ) -> Result<Self, ReadError> {
        let io: Box<dyn Transport> = match info.addr() {
            ConnectionAddr::Tcp(host, port) => {
                let stream = TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure,
                ..
            } => {
                if *insecure {
                    return Err(ReadError::Unsupported(
                        "the Redis URL turns certificate checks off (#insecure), which this worker does not do: give the CA that signed the server's certificate (`ca_file`) instead".into(),
                    ));
                }
                let system;
                let settings = match tls {
                    Some(settings) => settings,
                    None => {
                        system = TlsSettings::system()
                            .map_err(|err| ReadError::Unsupported(err.to_string()))?;
                        &system
                    }
                };
                let server_name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|err| {
                        ReadError::Unsupported(format!(
                            "the Redis URL's host {host:?} cannot be checked against a certificate: {err}"
                        ))
                    })?;
                let stream = TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                Box::new(settings.connector().connect(server_name, stream).await?)
            }
            ConnectionAddr::Unix(path) => Box::new(UnixStream::connect(path).await?),
            _ => {
                return Err(ReadError::Unsupported(
                    "the stream reader supports redis://, rediss:// and unix sockets only".into(),
                ))
            }
        };
        let mut conn = Self {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            parser: XreadParser::new(),
            out: Vec::with_capacity(256),
            probe_pending: false,
            probe_cached: false,
            probe_seen: None,
            spoke_resp: false,
        };
        let settings = info.redis_settings();
        if let Some(password) = settings.password() {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = settings.username() {
                args.push(user.as_bytes());
            }
            args.push(password.as_bytes());
            conn.command_ok(&args).await?;
        }
        if settings.db() != 0 {
            let db = settings.db().to_string();
            conn.command_ok(&[b"SELECT", db.as_bytes()]).await?;
        }
        Ok(conn)
    }

    /// Sends one command and expects a simple `+OK`-like answer.
    async fn command_ok(&mut self, args: &[&[u8]]) -> Result<(), ReadError> {
        self.out.clear();
        encode_command(&mut self.out, args);
        self.io.write_all(&self.out).await?;
        // TLS keeps records until flushed; for plain TCP this is free.
        self.io.flush().await?;
        loop {
            if let Some(end) = self.buf.windows(2).position(|pair| pair == b"\r\n") {
                let line = self.buf.split_to(end + 2);
                return match line.first() {
                    Some(b'-') => {
                        let message = String::from_utf8_lossy(line.get(1..end).unwrap_or_default())
                            .into_owned();
                        let code = message.split(' ').next().unwrap_or_default().to_owned();
                        Err(ReadError::Server(ServerReplyError { code, message }))
                    }
                    Some(b'+') => {
                        self.spoke_resp = true;
                        Ok(())
                    }
                    _ => Err(self.protocol_error(
                        &line,
                        ProtocolError("unexpected answer to a setup command".into()),
                    )),
                };
            }
            self.fill().await?;
        }
    }

    /// `err`, or [`ReadError::NotRedis`] when `answer` is the first on this
    /// connection and no RESP reply starts so.
    fn protocol_error(&self, answer: &[u8], err: ProtocolError) -> ReadError {
        match foreign_answer(answer).filter(|_| !self.spoke_resp) {
            Some(answered) => ReadError::NotRedis { answered },
            None => err.into(),
        }
    }

    async fn fill(&mut self) -> Result<(), ReadError> {
        self.buf.reserve(READ_CHUNK);
        // At most a chunk per socket read, whatever the buffer's spare
        // capacity (doubled as it grew, it can be as large as what it holds):
        // a reply growing past its limit is then caught within a chunk of
        // it, not after the socket filled the whole spare capacity.
        let mut chunk = (&mut self.io).take(READ_CHUNK as u64);
        if chunk.read_buf(&mut self.buf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        Ok(())
    }

    /// Sends `XREAD COUNT <count> [BLOCK <block>] STREAMS <stream> <after>`
    /// without waiting for the answer; with `probe`, the deletion probe goes
    /// just before it, so that it sees the stream as the read will.
    ///
    /// # Errors
    ///
    /// [`ReadError::Io`] when the socket fails.
    pub async fn send_xread(
        &mut self,
        stream: &str,
        after: EntryId,
        count: usize,
        block: Option<Duration>,
        probe: bool,
    ) -> Result<(), ReadError> {
        let count = count.to_string();
        let after = after.to_string();
        let block_ms = block.map(|block| block.as_millis().max(1).to_string());
        let mut args: Vec<&[u8]> = vec![b"XREAD", b"COUNT", count.as_bytes()];
        if let Some(block_ms) = &block_ms {
            args.extend([b"BLOCK".as_slice(), block_ms.as_bytes()]);
        }
        args.extend([b"STREAMS".as_slice(), stream.as_bytes(), after.as_bytes()]);
        self.out.clear();
        if probe {
            // The script's text goes once per connection (EVAL caches it);
            // later reads send its hash.
            let (command, script) = if self.probe_cached {
                (b"EVALSHA".as_slice(), PROBE_SHA.as_bytes())
            } else {
                (b"EVAL".as_slice(), DELETION_PROBE_SCRIPT.as_bytes())
            };
            encode_command(&mut self.out, &[command, script, b"1", stream.as_bytes()]);
            self.probe_cached = true;
        }
        encode_command(&mut self.out, &args);
        self.io.write_all(&self.out).await?;
        self.io.flush().await?;
        self.probe_pending = probe;
        Ok(())
    }

    /// Receives the answer to the oldest `XREAD` sent, holding at most
    /// about `limit` bytes of it once parsed (its bytes and the scanner's
    /// records of them).
    ///
    /// # Errors
    ///
    /// [`ReadError`] when the socket fails, the server answers with an
    /// error, the reply is malformed or grows past `limit`.
    /// Cancellation-safe: every byte received and the probe's answer are
    /// kept in the connection, so a call dropped at an await point is
    /// resumed by the next.
    pub async fn receive_batch(&mut self, limit: usize) -> Result<Received, ReadError> {
        while self.probe_pending {
            if self.buf.starts_with(b"-NOSCRIPT") {
                // The script cache was flushed: send the text again next time.
                self.probe_cached = false;
            }
            let parsed =
                parse_probe_reply(&self.buf).map_err(|err| self.protocol_error(&self.buf, err))?;
            match parsed {
                Some((len, seen)) => {
                    self.buf.advance(len);
                    self.probe_pending = false;
                    self.probe_seen = Some(seen);
                    self.spoke_resp = true;
                }
                None => self.fill().await?,
            }
        }
        loop {
            let parsed = self
                .parser
                .parse(&self.buf)
                .map_err(|err| self.protocol_error(&self.buf, err))?;
            self.spoke_resp |= !matches!(parsed, Parsed::Incomplete);
            match parsed {
                Parsed::Incomplete if self.parser.held_bytes(self.buf.len()) > limit => {
                    return Err(ReadError::ReplyTooLarge {
                        limit,
                        entries: self.parser.entries_parsed(),
                        partial_entry_id: self.parser.partial_entry_id(),
                    })
                }
                Parsed::Incomplete => self.fill().await?,
                Parsed::Complete(len) => {
                    let data = self.buf.split_to(len).freeze();
                    return Ok(Received {
                        batch: self.parser.take_batch(data),
                        probe: self.probe_seen.take(),
                    });
                }
                Parsed::Error(len, err) => {
                    self.buf.advance(len);
                    self.parser.reset();
                    self.probe_seen = None;
                    return Err(ReadError::Server(err));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_foreign_answer_is_quoted_and_a_resp_one_is_not() {
        assert_eq!(
            foreign_answer(b"HTTP/1.1 400 Bad Request\r\n\r\n").as_deref(),
            Some("HTTP/1.1 400 Bad Request")
        );
        assert_eq!(
            foreign_answer(b"\x15\x03\x03\x00\x02\x02\x46").as_deref(),
            Some("......F")
        );
        let long = [b'x'; 500];
        assert_eq!(
            foreign_answer(&long).map(|line| line.len()),
            Some(crate::fault::ANSWER_QUOTED)
        );
        for resp in [
            b"+OK\r\n".as_slice(),
            b"-ERR no\r\n",
            b":1\r\n",
            b"$1\r\nx\r\n",
            b"*0\r\n",
            b"_\r\n",
            b"%0\r\n",
            b"",
        ] {
            assert_eq!(foreign_answer(resp), None, "{resp:?}");
        }
    }

    /// A server that answers HTTP to whatever it is sent: the wrong kind of
    /// server, not a stand-in for Redis.
    #[tokio::test]
    async fn the_first_answer_of_another_kind_of_server_is_not_redis() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.read(&mut [0_u8; 1024]).await;
                let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        for url in [
            format!("redis://127.0.0.1:{port}"),
            // AUTH first: its answer is the first.
            format!("redis://:pw@127.0.0.1:{port}"),
        ] {
            let info = redis::IntoConnectionInfo::into_connection_info(url.as_str()).unwrap();
            let timeout = Duration::from_secs(5);
            let err = match ReadConnection::connect(&info, None, timeout).await {
                Err(err) => err,
                Ok(mut conn) => {
                    conn.send_xread("s", EntryId::ZERO, 10, None, true)
                        .await
                        .unwrap();
                    conn.receive_batch(1 << 20).await.unwrap_err()
                }
            };
            match &err {
                ReadError::NotRedis { answered } => {
                    assert_eq!(answered, "HTTP/1.1 400 Bad Request", "{url}");
                }
                other => panic!("{url}: {other:?}"),
            }
            assert_eq!(
                crate::fault::classify_read(&err),
                crate::fault::FaultClass::Permanent
            );
        }
    }
}
