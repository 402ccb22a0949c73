//! One module per subcommand.

pub mod bench;
pub mod demo;
pub mod offsets;
pub mod publish;
pub mod run;
pub mod tail;

/// Resolves on SIGINT or SIGTERM. If a handler cannot be installed, it never
/// resolves: the process can still be killed, and the failure is logged.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => Some(stream),
        Err(err) => {
            tracing::error!(err = %err, "cannot listen for SIGTERM");
            None
        }
    };
    let term = async {
        match terminate.as_mut() {
            Some(stream) => {
                stream.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        result = tokio::signal::ctrl_c() => {
            if let Err(err) = result {
                tracing::error!(err = %err, "cannot listen for SIGINT");
                std::future::pending::<()>().await;
            }
        }
        () = term => {}
    }
}
