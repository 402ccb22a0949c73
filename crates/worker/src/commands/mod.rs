//! One module per subcommand.

pub mod bench;
pub mod dead_letters;
pub mod demo;
pub mod offsets;
pub mod publish;
pub mod run;
pub mod status;
pub mod tail;
pub mod user;

use clap::CommandFactory;

use crate::cli::{Cli, EXIT_STATUS_HELP};

/// Prints the completion script for `shell`.
///
/// # Errors
///
/// When stdout cannot be written.
pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "lobby-worker", &mut script);
    write_stdout(&script)
}

/// Prints the man page, `lobby-worker(1)` in roff: the top-level page, then
/// one section per subcommand with its options, and the exit statuses.
///
/// # Errors
///
/// When the page cannot be rendered or stdout cannot be written.
pub fn man_page() -> anyhow::Result<()> {
    let mut command = Cli::command();
    command.build();
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut page)?;
    for sub in command.get_subcommands() {
        let name = format!("lobby-worker {}", sub.get_name());
        page.extend_from_slice(format!(".SH \"{}\"\n", name.to_uppercase()).as_bytes());
        let man = clap_mangen::Man::new(sub.clone().bin_name(name));
        man.render_description_section(&mut page)?;
        man.render_options_section(&mut page)?;
    }
    page.extend_from_slice(
        format!(
            ".SH \"EXIT STATUS\"\n{}\n",
            EXIT_STATUS_HELP.replace('`', "")
        )
        .as_bytes(),
    );
    write_stdout(&page)
}

/// Writes `bytes` to stdout and flushes.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()?;
    Ok(())
}

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
