//! The optional TOML configuration file (`--config`), one for every command
//! that talks to Redis: each command takes the settings it has (`status`
//! the Redis URL, stream, key prefix and label; `run` all of them) and
//! leaves the others, which must still be known settings.
//!
//! Precedence: a flag, then its environment variable, then the file, then
//! the default. The file is applied by handing its values to the same
//! command-line parser as extra arguments, for the settings that neither a
//! flag nor the environment gave: every value is checked by the parser and
//! message that check the flag, and nothing is parsed twice differently.

use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory};

use crate::cli::Cli;

/// The keys a file may hold: the settings of `run` (a superset of the other
/// commands'), and the global logging ones, with `_` for `-`.
const KEYS: &[&str] = &[
    "redis_url",
    "stream",
    "key_prefix",
    "key_layout",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "sentinel_password",
    "block_timeout",
    "batch_size",
    "start_from",
    "checkpoint",
    "checkpoint_delay",
    "retry_initial",
    "retry_max",
    "dead_letter_after",
    "dead_letter_stream",
    "shutdown_timeout",
    "lease_ttl",
    "no_lease",
    "max_held_bytes",
    "drain",
    "concurrency",
    "metrics_addr",
    "label",
    "summary_interval",
    "log_level",
    "log_format",
];

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// It cannot be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// It is not valid TOML.
    #[error("the configuration file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// It holds a key that is no setting.
    #[error("unknown setting {key:?} in the configuration file {path}; known settings: {}", KEYS.join(", "))]
    UnknownKey {
        /// The file.
        path: String,
        /// The key.
        key: String,
    },
    /// A value of the wrong kind (a table, an array, a date).
    #[error(
        "setting {key:?} in the configuration file {path} must be a string, a number or a boolean"
    )]
    WrongKind {
        /// The file.
        path: String,
        /// The key.
        key: String,
    },
}

/// The innermost subcommand the command line chose (`["offsets", "set"]`)
/// and its matches, where the settings appended from a file are parsed.
pub fn leaf_subcommand(matches: &ArgMatches) -> (Vec<String>, &ArgMatches) {
    let mut path = Vec::new();
    let mut leaf = matches;
    while let Some((name, sub)) = leaf.subcommand() {
        path.push(name.to_owned());
        leaf = sub;
    }
    (path, leaf)
}

/// The settings (argument ids) the subcommand at `path` takes, its
/// inherited global ones included.
fn settings_of(path: &[String]) -> Vec<String> {
    let mut command = Cli::command();
    command.build();
    let mut leaf = &command;
    for name in path {
        match leaf.find_subcommand(name) {
            Some(sub) => leaf = sub,
            None => return Vec::new(),
        }
    }
    leaf.get_arguments()
        .map(|arg| arg.get_id().to_string())
        .collect()
}

/// Reads `file` and returns the arguments its settings stand for: those of
/// the subcommand at `path` that its matches `leaf` did not get from a flag
/// or the environment.
///
/// # Errors
///
/// [`ConfigFileError`] when the file cannot be read or parsed, or holds an
/// unknown key or a value of the wrong kind.
pub fn arguments_from_file(
    file: &Path,
    path: &[String],
    leaf: &ArgMatches,
) -> Result<Vec<OsString>, ConfigFileError> {
    let shown = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|source| ConfigFileError::Read {
        path: shown.clone(),
        source,
    })?;
    arguments_from_text(&text, &shown, &settings_of(path), leaf)
}

fn given_elsewhere(leaf: &ArgMatches, key: &str) -> bool {
    matches!(
        leaf.value_source(key),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

fn arguments_from_text(
    text: &str,
    path: &str,
    settings: &[String],
    leaf: &ArgMatches,
) -> Result<Vec<OsString>, ConfigFileError> {
    let table: toml::Table = text.parse().map_err(|err: toml::de::Error| {
        let line = err.span().map(|span| {
            text.get(..span.start)
                .unwrap_or_default()
                .matches('\n')
                .count()
                + 1
        });
        let message = err
            .message()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        ConfigFileError::Syntax {
            path: path.to_owned(),
            message: match line {
                Some(line) => format!("line {line}: {message}"),
                None => message,
            },
        }
    })?;
    let mut args = Vec::new();
    for (key, value) in table {
        if !KEYS.contains(&key.as_str()) {
            return Err(ConfigFileError::UnknownKey {
                path: path.to_owned(),
                key,
            });
        }
        if !settings.contains(&key) || given_elsewhere(leaf, &key) {
            continue;
        }
        let flag = format!("--{}", key.replace('_', "-"));
        match value {
            toml::Value::Boolean(true) => args.push(flag.into()),
            toml::Value::Boolean(false) => {}
            toml::Value::String(text) => args.extend([flag.into(), text.into()]),
            toml::Value::Integer(number) => args.extend([flag.into(), number.to_string().into()]),
            toml::Value::Float(number) => args.extend([flag.into(), number.to_string().into()]),
            _ => {
                return Err(ConfigFileError::WrongKind {
                    path: path.to_owned(),
                    key,
                })
            }
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::{CommandFactory, FromArgMatches};

    fn run_matches(args: &[&str]) -> ArgMatches {
        let matches = Cli::command().try_get_matches_from(args).unwrap();
        matches.subcommand_matches("run").unwrap().clone()
    }

    fn run_settings() -> Vec<String> {
        settings_of(&["run".to_owned()])
    }

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter()
            .map(|arg| arg.into_string().unwrap())
            .collect()
    }

    #[test]
    fn file_values_become_arguments_unless_a_flag_gave_them() {
        let run = run_matches(&["lobby-worker", "run", "--batch-size", "7"]);
        let text = "batch_size = 99\nconcurrency = 4\nblock_timeout = \"2s\"\ndrain = true\n";
        let args = strings(arguments_from_text(text, "f.toml", &run_settings(), &run).unwrap());
        assert_eq!(
            args,
            ["--block-timeout", "2s", "--concurrency", "4", "--drain"]
        );
    }

    #[test]
    fn the_three_layers_resolve_flag_over_file_over_default() {
        let argv = ["lobby-worker", "run", "--batch-size", "7"];
        let run = run_matches(&argv);
        let extra = arguments_from_text(
            "batch_size = 99\nconcurrency = 4\n",
            "f.toml",
            &run_settings(),
            &run,
        )
        .unwrap();
        let mut full: Vec<OsString> = argv.iter().map(OsString::from).collect();
        full.extend(extra);
        let matches = Cli::command().try_get_matches_from(full).unwrap();
        let cli = Cli::from_arg_matches(&matches).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.batch_size, 7, "the flag wins");
        assert_eq!(args.concurrency, 4, "the file beats the default");
        assert_eq!(
            args.retry_initial,
            std::time::Duration::from_millis(100),
            "default"
        );
    }

    #[test]
    fn unknown_keys_and_odd_values_are_rejected_naming_the_setting() {
        let run = run_matches(&["lobby-worker", "run"]);
        let err =
            arguments_from_text("batchsize = 3\n", "f.toml", &run_settings(), &run).unwrap_err();
        assert!(
            err.to_string().contains("unknown setting \"batchsize\""),
            "{err}"
        );
        let err =
            arguments_from_text("stream = [1, 2]\n", "f.toml", &run_settings(), &run).unwrap_err();
        assert!(err.to_string().contains("\"stream\""), "{err}");
        let err = arguments_from_text("stream = \n", "f.toml", &run_settings(), &run).unwrap_err();
        assert!(err.to_string().contains("not valid TOML"), "{err}");
    }

    #[test]
    fn each_command_takes_the_settings_it_has() {
        let text =
            "batch_size = 5\nkey_prefix = \"mine\"\nlabel = \"other\"\nlog_level = \"warn\"\n";
        let argv = ["lobby-worker", "--log-level", "debug", "offsets", "get"];
        let matches = Cli::command().try_get_matches_from(argv).unwrap();
        let (path, leaf) = leaf_subcommand(&matches);
        assert_eq!(path, ["offsets", "get"]);
        let args = strings(arguments_from_text(text, "f.toml", &settings_of(&path), leaf).unwrap());
        assert_eq!(
            args,
            ["--key-prefix", "mine", "--label", "other"],
            "no batch size for offsets; the flag's log level wins"
        );
        let matches = Cli::command()
            .try_get_matches_from(["lobby-worker", "tail"])
            .unwrap();
        let (path, leaf) = leaf_subcommand(&matches);
        let args = strings(arguments_from_text(text, "f.toml", &settings_of(&path), leaf).unwrap());
        assert_eq!(args, ["--key-prefix", "mine", "--log-level", "warn"]);
        let err = arguments_from_text("batchsize = 1\n", "f.toml", &settings_of(&path), leaf)
            .unwrap_err();
        assert!(err.to_string().contains("unknown setting"), "{err}");
    }
}
