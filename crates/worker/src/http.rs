//! The HTTP endpoints of `run`: `/metrics`, `/healthz`, `/readyz`.
//!
//! They must never cost the worker its file descriptors or its time: an
//! idle-connection flood (1,100 connections held open) once exhausted the
//! process's 1,024 descriptors, stalling the cascades and `/readyz` alike.
//! So the server, hyper's HTTP/1 connection builder driven by hand rather
//! than `axum::serve`, bounds everything a client can hold:
//!
//! - at most [`MAX_CONNECTIONS`] connections are served at once; beyond
//!   that nothing more is accepted, so further clients wait in the kernel's
//!   listen backlog and cost the worker no descriptor (one accepted
//!   connection at most waits for a slot);
//! - while a connection waits for a slot, the served connections that are
//!   idle (no request being handled) for at least [`SHED_IDLE_AFTER`] are
//!   closed to make room, so a flood of idle clients drains at once and a
//!   scraper or probe behind it is answered within moments;
//! - a client has [`HEADER_READ_TIMEOUT`] to send a complete request header,
//!   on a new connection and between keep-alive requests alike;
//! - a request is answered within [`REQUEST_TIMEOUT`], and no connection
//!   lives longer than [`CONNECTION_MAX_AGE`].
//!
//! On stop, nothing more is accepted, connections that sent nothing close
//! at once, and requests in progress finish.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use lifecycle_streams::now_ms;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::health::{Health, Readiness};
use crate::metrics::Metrics;

/// What the handlers share.
struct Endpoints {
    metrics: Metrics,
    health: Arc<Health>,
}

const PLAIN_TEXT: &str = "text/plain; charset=utf-8";

async fn metrics_page(State(endpoints): State<Arc<Endpoints>>) -> Response {
    match endpoints.metrics.render() {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            body,
        )
            .into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, PLAIN_TEXT)],
            "cannot encode the metrics\n",
        )
            .into_response(),
    }
}

async fn healthz_page() -> Response {
    ([(header::CONTENT_TYPE, PLAIN_TEXT)], "ok\n").into_response()
}

async fn readyz_page(State(endpoints): State<Arc<Endpoints>>) -> Response {
    match endpoints.health.readiness(now_ms()) {
        Readiness::Ready => ([(header::CONTENT_TYPE, PLAIN_TEXT)], "ready\n").into_response(),
        Readiness::Standby => (
            [(header::CONTENT_TYPE, PLAIN_TEXT)],
            "standby: another process holds the consumer lease\n",
        )
            .into_response(),
        Readiness::NotReady(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, PLAIN_TEXT)],
            format!("{reason}\n"),
        )
            .into_response(),
    }
}

/// Binds `addr`.
///
/// # Errors
///
/// When the address cannot be bound (taken, not local, not permitted),
/// saying so with the address.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|err| {
        anyhow::anyhow!("cannot listen on {addr} for /metrics, /healthz and /readyz ({err})")
    })
}

/// Connections served at once. Each holds a file descriptor, and the
/// descriptors are shared with the worker's Redis connections: a scraper or
/// two and the odd probe need a handful, so 64 leaves ample room for
/// several Prometheus servers while keeping the endpoints' share of a
/// 1,024-descriptor limit small. Clients beyond it wait in the kernel's
/// listen backlog, where they cost the worker nothing.
const MAX_CONNECTIONS: usize = 64;

/// How long a client has to send a complete request header: on a new
/// connection and between requests of a keep-alive one. Scrapers and
/// probes send theirs at once; a client silent for this long only holds a
/// descriptor (a scraper whose interval is longer simply reconnects).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a request may take. The handlers only read memory, so this is
/// a backstop; a request past it is answered 503.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection may live, however busy: keep-alive chains and
/// slow readers of a response end here (gracefully, then within
/// [`REQUEST_TIMEOUT`] at the latest).
const CONNECTION_MAX_AGE: Duration = Duration::from_secs(60);

/// While a client waits for a slot, connections idle this long (no request
/// being handled) are closed to make room. Long enough that a connection
/// whose request is already in the socket gets it read first, short enough
/// that a flood of idle connections drains within seconds.
const SHED_IDLE_AFTER: Duration = Duration::from_millis(250);

/// The pause after a failed accept (out of descriptors, most likely), so
/// that the loop does not spin while nothing can be accepted.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// At most one warning of each kind (at the connection cap, failing to
/// accept) per this interval, so that a flood cannot flood the log.
const WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Per-connection read buffer, which bounds a request header (hyper's
/// minimum is 8 KiB); the endpoints' requests need a few hundred bytes.
const MAX_BUFFER_BYTES: usize = 16 * 1024;

/// Serves the endpoints on `listener` until `stop` fires, then lets the
/// requests in progress finish (see the module documentation for the
/// limits on connections).
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    health: Arc<Health>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let endpoints = Arc::new(Endpoints { metrics, health });
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz_page))
        .route("/readyz", get(readyz_page))
        .with_state(endpoints);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // True while an accepted connection waits for a slot.
    let (pressure, pressure_seen) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut cap_warning = RateLimit::default();
    let mut accept_warning = RateLimit::default();
    loop {
        while let Some(ended) = connections.try_join_next() {
            report_connection_task(ended);
        }
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                if accept_warning.due() {
                    warn!(err = %err, "cannot accept a connection to the HTTP endpoints; retrying shortly");
                }
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_RETRY) => continue,
                }
            }
        };
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if cap_warning.due() {
                    warn!(
                        max_connections = MAX_CONNECTIONS,
                        "the HTTP endpoints are at their connection cap; closing idle connections, further clients wait"
                    );
                }
                pressure.send_replace(true);
                let slot = tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    slot = Arc::clone(&slots).acquire_owned() => slot,
                };
                pressure.send_replace(false);
                match slot {
                    Ok(slot) => slot,
                    // The semaphore is never closed.
                    Err(_) => break,
                }
            }
        };
        debug!(peer = %peer, "HTTP connection accepted");
        connections.spawn(serve_connection(Connection {
            stream,
            peer,
            app: app.clone(),
            pressure: pressure_seen.clone(),
            stop: stop.clone(),
            slot,
        }));
    }
    // Accept no more; the connections see `stop` themselves.
    drop(listener);
    pressure.send_replace(false);
    while let Some(ended) = connections.join_next().await {
        report_connection_task(ended);
    }
    Ok(())
}

/// Lets one warning through per [`WARNING_INTERVAL`].
#[derive(Default)]
struct RateLimit {
    last: Option<Instant>,
}

impl RateLimit {
    /// Whether a warning may be logged now (and if so, notes that it was).
    fn due(&mut self) -> bool {
        let due = self.last.is_none_or(|at| at.elapsed() >= WARNING_INTERVAL);
        if due {
            self.last = Some(Instant::now());
        }
        due
    }
}

/// Logs a connection task that panicked (the others end quietly).
fn report_connection_task(ended: Result<(), tokio::task::JoinError>) {
    if let Err(err) = ended {
        if err.is_panic() {
            error!(err = %err, "an HTTP connection's task panicked");
        }
    }
}

/// One accepted connection and what serving it needs.
struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    pressure: watch::Receiver<bool>,
    stop: CancellationToken,
    /// Held until the connection is closed.
    slot: OwnedSemaphorePermit,
}

/// What a connection's task knows of its traffic.
#[derive(Default)]
struct Traffic {
    /// Whether the client has sent anything at all.
    received: AtomicBool,
    /// Whether a request has been handled (or is being handled).
    used: AtomicBool,
    /// Requests being handled now.
    in_flight: AtomicUsize,
    /// Signalled whenever a request ends.
    ended: Notify,
}

/// A request being handled, counted in [`Traffic::in_flight`] until dropped.
struct InFlight(Arc<Traffic>);

impl InFlight {
    fn begin(traffic: Arc<Traffic>) -> Self {
        traffic.used.store(true, Ordering::Relaxed);
        traffic.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(traffic)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.ended.notify_one();
    }
}

/// Handles one request with the router, within [`REQUEST_TIMEOUT`].
async fn handle(
    mut app: Router,
    traffic: Arc<Traffic>,
    request: Request<hyper::body::Incoming>,
) -> Result<Response, Infallible> {
    let _in_flight = InFlight::begin(traffic);
    let path = request.uri().path().to_owned();
    match tokio::time::timeout(
        REQUEST_TIMEOUT,
        tower_service::Service::call(&mut app, request),
    )
    .await
    {
        Ok(response) => response,
        Err(_) => {
            warn!(path = %path, timeout_ms = REQUEST_TIMEOUT.as_millis(), "an HTTP request timed out");
            Ok((
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::CONTENT_TYPE, PLAIN_TEXT)],
                "request timed out\n",
            )
                .into_response())
        }
    }
}

/// How a connection's task ended, for the log.
#[derive(Debug, Clone, Copy)]
enum Closed {
    /// hyper finished with it (the client closed, a timeout, an error).
    Done,
    /// Dropped at stop: the client had sent nothing.
    Stopped,
    /// Dropped to make room for a waiting client: idle.
    Shed,
    /// Dropped after its graceful end took too long.
    Overdue,
}

/// Serves one connection until it ends, `stop` fires, it is idle while a
/// client waits for a slot, or it has lived too long.
async fn serve_connection(connection: Connection) {
    let Connection {
        stream,
        peer,
        app,
        mut pressure,
        stop,
        slot,
    } = connection;
    let opened = Instant::now();
    let traffic = Arc::new(Traffic::default());
    let service = {
        let traffic = Arc::clone(&traffic);
        hyper::service::service_fn(move |request| {
            handle(app.clone(), Arc::clone(&traffic), request)
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUFFER_BYTES);
    let io = TokioIo::new(Tracked {
        stream,
        traffic: Arc::clone(&traffic),
    });
    let mut conn = Box::pin(builder.serve_connection(io, service));
    let shed_from = opened + SHED_IDLE_AFTER;
    let mut sheddable = false;
    let mut pressure_open = true;
    // Set once the connection is asked to end gracefully: the time by which
    // it is dropped regardless.
    let mut close_by: Option<Instant> = None;
    let closed = loop {
        tokio::select! {
            biased;
            result = conn.as_mut() => {
                if let Err(err) = result {
                    debug!(peer = %peer, err = %err, "HTTP connection ended with an error");
                }
                break Closed::Done;
            }
            () = stop.cancelled(), if close_by.is_none() => {
                if !traffic.received.load(Ordering::Relaxed) && traffic.in_flight.load(Ordering::Acquire) == 0 {
                    break Closed::Stopped;
                }
                conn.as_mut().graceful_shutdown();
                close_by = Some(Instant::now() + REQUEST_TIMEOUT);
            }
            () = sleep_until_some(close_by) => break Closed::Overdue,
            () = tokio::time::sleep_until(opened + CONNECTION_MAX_AGE), if close_by.is_none() => {
                debug!(peer = %peer, max_age_ms = CONNECTION_MAX_AGE.as_millis(), "HTTP connection at its maximum age; closing it");
                conn.as_mut().graceful_shutdown();
                close_by = Some(Instant::now() + REQUEST_TIMEOUT);
            }
            changed = pressure.changed(), if pressure_open && close_by.is_none() => {
                pressure_open = changed.is_ok();
            }
            () = tokio::time::sleep_until(shed_from), if !sheddable => sheddable = true,
            () = traffic.ended.notified(), if close_by.is_none() => {}
        }
        let idle = traffic.in_flight.load(Ordering::Acquire) == 0;
        if close_by.is_none() && sheddable && idle && *pressure.borrow() {
            if !traffic.used.load(Ordering::Relaxed) {
                break Closed::Shed;
            }
            // hyper closes an idle keep-alive connection at once, and one
            // still writing its last response once that is written.
            conn.as_mut().graceful_shutdown();
            close_by = Some(Instant::now() + REQUEST_TIMEOUT);
        }
    };
    // The socket closes before the slot is given back.
    drop(conn);
    drop(slot);
    debug!(peer = %peer, closed = ?closed, open_ms = opened.elapsed().as_millis(), "HTTP connection closed");
}

/// Completes at `deadline`, or never when there is none.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The TCP stream of a connection, noting in [`Traffic::received`] that the
/// client has sent something.
struct Tracked {
    stream: TcpStream,
    traffic: Arc<Traffic>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.traffic.received.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
