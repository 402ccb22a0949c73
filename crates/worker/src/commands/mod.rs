//! One module per subcommand.

pub mod bench;
pub mod dead_letters;
pub mod demo;
pub mod offsets;
pub mod publish;
pub mod run;
pub mod status;
pub mod tail;
pub mod takeover;
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

/// Milliseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`, for
/// years 1970 to 9999.
pub fn utc_time(ms: i64) -> Option<String> {
    if !(0..253_402_300_800_000).contains(&ms) {
        return None;
    }
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    Some(format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000
    ))
}

/// Milliseconds since the Unix epoch as UTC, as [`utc_time`] writes them, or
/// the bare count outside the years it covers.
pub fn utc(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(utc_time)
        .unwrap_or_else(|| format!("{ms} ms since 1970"))
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn utc_times_match_known_dates() {
        assert_eq!(utc_time(0).unwrap(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            utc_time(1_700_000_000_123).unwrap(),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            utc_time(951_782_400_000).unwrap(),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(
            utc_time(253_402_300_799_999).unwrap(),
            "9999-12-31T23:59:59.999Z"
        );
        assert_eq!(utc_time(-1), None);
        assert_eq!(utc_time(253_402_300_800_000), None);
        assert_eq!(utc_time(i64::MAX), None);
    }
    #[test]
    fn times_print_as_utc() {
        assert_eq!(utc(u64::MAX), "18446744073709551615 ms since 1970");
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }
}
