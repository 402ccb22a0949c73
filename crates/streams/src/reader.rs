//! The stream reader: a task that owns the reading connection and the reply
//! in flight.
//!
//! The driver asks for one read at a time over a channel and receives its
//! outcome over another. Receiving happens inside this task, never in a
//! future the driver races in a `select!`, so a handler finishing first can
//! never drop bytes already read off the socket or a deletion probe's
//! answer: the driver only awaits the channel, which is cancellation-safe.
//! The response timeout wraps the receipt of one reply, so a connection
//! stalled mid-reply is cut after that long whatever the driver is doing.
//!
//! Reading ahead: when a request allows it and its reply was full (more
//! entries likely follow), the task sends the next read, after the last
//! entry handed over, as soon as the reply is parsed and before handing it
//! over. Redis then prepares the next batch while the driver decodes and
//! handles this one. The driver's next request takes that reply when it
//! asks for the same read; any other request (a rewind, a smaller count)
//! drops it and reads afresh. The read ahead never blocks, so it never
//! holds a different request back for a blocking read's timeout; an empty
//! answer to it is not handed over where the request would block. The
//! machine allows it only while its byte budget has room for two replies.

use std::time::Duration;

use crate::endpoint::RedisEndpoint;
use lifecycle_domain::EntryId;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::read_conn::{ReadConnection, ReadError, Received};
use crate::tls::TlsSettings;

/// One read the driver asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ReadRequest {
    /// The id to read after.
    pub after: EntryId,
    /// Entries to ask for.
    pub count: usize,
    /// Parsed bytes the reply may hold.
    pub max_bytes: usize,
    /// Entries the driver hands on (the rest, if any, is a look-ahead):
    /// the next read starts after the last of them.
    pub dispatch: usize,
    /// Whether the next read may be sent ahead (see the module doc).
    pub read_ahead: bool,
    /// Whether the deletion probe goes before the read.
    pub probe: bool,
}

impl ReadRequest {
    /// The read that follows this one, answered by `batch`, when it may be
    /// sent ahead: allowed, and the reply full.
    fn next(&self, batch: &crate::resp::Batch) -> Option<Self> {
        if !self.read_ahead || batch.len() < self.count {
            return None;
        }
        let last = batch
            .entry(self.dispatch.min(batch.len()).checked_sub(1)?)?
            .id();
        Some(Self {
            after: last,
            ..*self
        })
    }

    /// Whether a read ahead for `self` may answer `asked` (with or without
    /// a probe: one the driver did not ask for is only more to judge by,
    /// one it asked for comes with the read after).
    fn answers(&self, asked: &Self) -> bool {
        self.after == asked.after
            && self.count == asked.count
            && self.max_bytes == asked.max_bytes
            && self.dispatch == asked.dispatch
    }
}

/// The outcome of one read.
#[derive(Debug)]
pub(crate) enum ReaderEvent {
    /// The reply arrived.
    Batch {
        /// Its entries and the probe's answer.
        received: Received,
        /// Whether a new connection was made for it after a fault.
        reconnected: bool,
    },
    /// The read failed; the connection was dropped.
    Fault(ReadError),
}

/// How the reader connects and reads.
#[derive(Clone, Debug)]
pub(crate) struct ReaderSettings {
    /// Where Redis is: asked again at every new connection, so that a
    /// Sentinel-managed master, or the cluster node that serves the
    /// stream's slot, is followed across failovers.
    pub endpoint: RedisEndpoint,
    /// For `rediss://`: what to trust and present.
    pub tls: Option<TlsSettings>,
    /// The stream key.
    pub stream: String,
    /// How long an `XREAD` blocks; `None` never blocks (drain mode).
    pub block: Option<Duration>,
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// How long one reply may take to arrive whole.
    pub response_timeout: Duration,
}

/// The driver's handle on the reader task.
#[derive(Debug)]
pub(crate) struct Reader {
    requests: mpsc::Sender<ReadRequest>,
    events: mpsc::Receiver<ReaderEvent>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Reader {
    /// Starts the reader task; it stops when `stop` is cancelled or the
    /// handle is dropped.
    pub(crate) fn spawn(settings: ReaderSettings, stop: CancellationToken) -> Self {
        let (requests, request_rx) = mpsc::channel(1);
        let (event_tx, events) = mpsc::channel(1);
        let task = tokio::spawn(read_loop(settings, request_rx, event_tx, stop.clone()));
        Self {
            requests,
            events,
            stop,
            task,
        }
    }

    /// Asks for a read. `false` if the reader is gone.
    pub(crate) fn request(&self, request: ReadRequest) -> bool {
        self.requests.try_send(request).is_ok()
    }

    /// The next outcome; `None` once the reader has stopped.
    /// Cancellation-safe.
    pub(crate) async fn next(&mut self) -> Option<ReaderEvent> {
        self.events.recv().await
    }

    /// Stops the task and closes its connection.
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

/// A read sent ahead of its request, and its answer once received.
struct ReadAhead {
    request: ReadRequest,
    outcome: Option<Result<Received, ReadError>>,
}

/// The reader task: one request at a time, until stopped.
async fn read_loop(
    settings: ReaderSettings,
    mut requests: mpsc::Receiver<ReadRequest>,
    events: mpsc::Sender<ReaderEvent>,
    stop: CancellationToken,
) {
    let mut conn: Option<ReadConnection> = None;
    let mut faulted = false;
    let mut ahead: Option<ReadAhead> = None;
    loop {
        // Receive the read sent ahead while the driver works.
        if let (Some(read), Some(reader)) = (
            ahead.as_mut().filter(|read| read.outcome.is_none()),
            conn.as_mut(),
        ) {
            let outcome = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                outcome = receive(&settings, reader, read.request) => outcome,
            };
            if outcome.is_err() {
                conn = None;
                faulted = true;
            }
            read.outcome = Some(outcome);
        }
        let request = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            request = requests.recv() => match request {
                Some(request) => request,
                None => break,
            },
        };
        let taken = ahead.take().and_then(|read| {
            let outcome = read.outcome?;
            let blocking_and_empty = settings.block.is_some()
                && outcome
                    .as_ref()
                    .is_ok_and(|received| received.batch.is_empty());
            (read.request.answers(&request) && !blocking_and_empty).then_some(outcome)
        });
        let outcome = match taken {
            Some(Ok(received)) => Ok((received, false)),
            Some(Err(err)) => Err(err),
            None => tokio::select! {
                biased;
                () = stop.cancelled() => break,
                outcome = read_once(&settings, &mut conn, request) => outcome,
            },
        };
        let event = match outcome {
            Ok((received, reconnected)) => {
                let reconnected = reconnected && std::mem::take(&mut faulted);
                if let (Some(next), Some(reader)) = (request.next(&received.batch), conn.as_mut()) {
                    let sent = tokio::select! {
                        biased;
                        () = stop.cancelled() => break,
                        sent = send(&settings, reader, next, None) => sent,
                    };
                    match sent {
                        Ok(()) => {
                            ahead = Some(ReadAhead {
                                request: next,
                                outcome: None,
                            });
                        }
                        Err(_) => {
                            // Reported, if it lasts, by the next read.
                            conn = None;
                            faulted = true;
                        }
                    }
                }
                ReaderEvent::Batch {
                    received,
                    reconnected,
                }
            }
            Err(err) => {
                conn = None;
                faulted = true;
                ReaderEvent::Fault(err)
            }
        };
        let sent = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            sent = events.send(event) => sent,
        };
        if sent.is_err() {
            break;
        }
    }
}

/// Sends `request`'s read with its probe, blocking for `block` if given,
/// within the response timeout (a server that stopped reading fills the
/// socket's buffer).
async fn send(
    settings: &ReaderSettings,
    reader: &mut ReadConnection,
    request: ReadRequest,
    block: Option<Duration>,
) -> Result<(), ReadError> {
    tokio::time::timeout(
        settings.response_timeout,
        reader.send_xread(
            &settings.stream,
            request.after,
            request.count,
            block,
            request.probe,
        ),
    )
    .await
    .map_err(|_| ReadError::Timeout(settings.response_timeout))?
}

/// Receives the reply to the oldest read sent, within the response timeout.
async fn receive(
    settings: &ReaderSettings,
    reader: &mut ReadConnection,
    request: ReadRequest,
) -> Result<Received, ReadError> {
    tokio::time::timeout(
        settings.response_timeout,
        reader.receive_batch(request.max_bytes),
    )
    .await
    .map_err(|_| ReadError::Timeout(settings.response_timeout))?
}

/// Connects if needed, sends the read with its probe and receives the reply
/// within the response timeout. The flag says whether it connected.
async fn read_once(
    settings: &ReaderSettings,
    conn: &mut Option<ReadConnection>,
    request: ReadRequest,
) -> Result<(Received, bool), ReadError> {
    let connected = conn.is_none();
    let reader = match conn {
        Some(reader) => reader,
        None => {
            let client = settings
                .endpoint
                .client_for_key(settings.stream.as_bytes())
                .await
                .map_err(ReadError::Locate)?;
            conn.insert(
                ReadConnection::connect(
                    client.get_connection_info(),
                    settings.tls.as_ref(),
                    settings.connect_timeout,
                )
                .await?,
            )
        }
    };
    send(settings, reader, request, settings.block).await?;
    let received = receive(settings, reader, request).await?;
    Ok((received, connected))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::resp::test_replies::{parse_all, reply};

    fn request(count: usize, dispatch: usize, read_ahead: bool) -> ReadRequest {
        ReadRequest {
            after: EntryId::new(1, 0),
            count,
            max_bytes: 4096,
            dispatch,
            read_ahead,
            probe: true,
        }
    }

    fn batch(ids: &[&str]) -> crate::resp::Batch {
        let entries: Vec<(&str, &[&[u8]])> = ids.iter().map(|id| (*id, &[][..])).collect();
        parse_all(&reply(&entries)).1
    }

    #[test]
    fn a_full_reply_is_followed_by_a_read_after_its_last_dispatched_entry() {
        let full = batch(&["2-0", "3-0", "4-0"]);
        let next = request(3, 2, true).next(&full).unwrap();
        assert_eq!(
            next.after,
            EntryId::new(3, 0),
            "the look-ahead entry is read again"
        );
        assert_eq!((next.count, next.dispatch, next.max_bytes), (3, 2, 4096));
        let without_look_ahead = request(3, 3, true).next(&full).unwrap();
        assert_eq!(without_look_ahead.after, EntryId::new(4, 0));
    }

    #[test]
    fn no_read_ahead_unless_allowed_and_the_reply_was_full() {
        let full = batch(&["2-0", "3-0", "4-0"]);
        assert_eq!(request(3, 2, false).next(&full), None);
        assert_eq!(request(4, 3, true).next(&full), None, "caught up");
        assert_eq!(request(1, 1, true).next(&batch(&[])).map(|r| r.after), None);
    }

    #[test]
    fn a_read_ahead_answers_only_the_same_read() {
        let ahead = request(3, 2, true);
        assert!(
            ahead.answers(&request(3, 2, false)),
            "the next permission aside"
        );
        assert!(!ahead.answers(&request(2, 2, true)), "a smaller count");
        assert!(!ahead.answers(&request(3, 3, true)));
        let rewound = ReadRequest {
            after: EntryId::ZERO,
            ..ahead
        };
        assert!(!ahead.answers(&rewound));
        let smaller = ReadRequest {
            max_bytes: 1024,
            ..ahead
        };
        assert!(!ahead.answers(&smaller));
    }
}
