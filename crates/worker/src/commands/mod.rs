//! One module per subcommand.

pub mod bench;
pub mod demo;
pub mod offsets;
pub mod publish;
pub mod run;
pub mod status;
pub mod tail;

/// Prints `key: value` lines with the values aligned. A value holding a
/// control character is printed escaped, so none can forge a line.
///
/// # Errors
///
/// When stdout cannot be written.
pub fn print_aligned(rows: &[(&str, String)]) -> std::io::Result<()> {
    use std::io::Write;
    let width = rows.iter().map(|(key, _)| key.len()).max().unwrap_or(0) + 1;
    let mut out = std::io::stdout().lock();
    for (key, value) in rows {
        let key = format!("{key}:");
        if value.chars().any(char::is_control) {
            writeln!(out, "{key:<width$} {}", value.escape_debug())?;
        } else {
            writeln!(out, "{key:<width$} {value}")?;
        }
    }
    out.flush()
}

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
