//! Logging: structured `tracing` events to stderr, as text or JSON.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// The levels a filter may name.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks that every directive of `filter` names a level: `warn`, or
/// `target=warn`. The filter syntax would take a bare word such as `wran` as
/// a target to log at every level, which silences everything else.
fn check_levels(filter: &str) -> Result<(), String> {
    for directive in filter.split(',').map(str::trim) {
        let level = directive
            .rsplit_once('=')
            .map_or(directive, |(_, level)| level);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "invalid log level {filter:?} (--log-level, LOBBY_LOG_LEVEL): {directive:?} names no level (one of {}, or target=level)",
                LEVELS.join(", ")
            ));
        }
    }
    Ok(())
}

/// Whether `NO_COLOR` asks for no colours (set and not empty: no-color.org).
fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty())
}

/// Installs the global subscriber. The level comes from `--log-level`, else
/// `RUST_LOG`, else `default_level`.
pub fn init(level: Option<&str>, default_level: &str, format: LogFormat) -> Result<(), String> {
    let filter = match level {
        Some(level) => {
            check_levels(level)?;
            EnvFilter::try_new(level)
                .map_err(|err| format!("invalid --log-level {level:?}: {err}"))?
        }
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
    };
    // The redis crate's own log lines (a cluster client's every reconnect
    // attempt) would repeat what the worker reports once, with advice;
    // they show when a filter names them (`redis=debug`).
    let named = level
        .map(str::to_owned)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .is_some_and(|text| text.contains("redis"));
    let filter = if named {
        filter
    } else {
        filter.add_directive(
            "redis=off"
                .parse()
                .map_err(|err| format!("cannot quiet the Redis client's log: {err}"))?,
        )
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && !no_color())
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    installed.map_err(|err| format!("cannot install the logger: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_directive_must_name_a_level() {
        for good in [
            "warn",
            "INFO",
            "info,lifecycle_streams=debug",
            "off",
            "a=trace, b=error",
        ] {
            assert_eq!(check_levels(good), Ok(()), "{good}");
        }
        for bad in [
            "wran",
            "verbose",
            "info,lifecycle_streams",
            "",
            "info,",
            "x=loud",
        ] {
            assert!(check_levels(bad).is_err(), "{bad}");
        }
    }
}
