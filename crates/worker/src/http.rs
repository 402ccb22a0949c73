//! The HTTP endpoints of `run`: `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use lifecycle_streams::now_ms;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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

/// Serves the endpoints on `listener` until `stop` fires, then lets the
/// requests in progress finish.
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
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}
