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

use std::time::Duration;

use lifecycle_domain::EntryId;
use redis::ConnectionInfo;
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
    /// Where Redis is.
    pub info: ConnectionInfo,
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

/// The reader task: one request at a time, until stopped.
async fn read_loop(
    settings: ReaderSettings,
    mut requests: mpsc::Receiver<ReadRequest>,
    events: mpsc::Sender<ReaderEvent>,
    stop: CancellationToken,
) {
    let mut conn: Option<ReadConnection> = None;
    let mut faulted = false;
    loop {
        let request = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            request = requests.recv() => match request {
                Some(request) => request,
                None => break,
            },
        };
        let outcome = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            outcome = read_once(&settings, &mut conn, request) => outcome,
        };
        let event = match outcome {
            Ok((received, reconnected)) => {
                let reconnected = reconnected && std::mem::take(&mut faulted);
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
        None => conn.insert(
            ReadConnection::connect(
                &settings.info,
                settings.tls.as_ref(),
                settings.connect_timeout,
            )
            .await?,
        ),
    };
    reader
        .send_xread(
            &settings.stream,
            request.after,
            request.count,
            settings.block,
            true,
        )
        .await?;
    let received = tokio::time::timeout(
        settings.response_timeout,
        reader.receive_batch(request.max_bytes),
    )
    .await
    .map_err(|_| ReadError::Timeout(settings.response_timeout))??;
    Ok((received, connected))
}
