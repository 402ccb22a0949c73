//! `lobby-worker`: wires configuration, telemetry and signals onto the
//! consumer, and turns every failure into one line on stderr and a non-zero
//! exit status.

mod cli;
mod commands;
mod config_file;
mod handler_metrics;
mod health;
mod http;
mod metrics;
mod outcome;
mod redis_conn;
mod stream_status;
mod telemetry;
mod watch;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use std::ffi::OsString;

use clap::{CommandFactory, FromArgMatches};

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    exit_quietly_when_stdout_closes();
    let cli = match parse_command_line() {
        Ok(cli) => cli,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    // The demo's own output is its story; its log shows only problems.
    let default_level = match cli.command {
        Command::Demo(_) | Command::Bench(_) => "error",
        _ => "info",
    };
    let format = cli.log_format;
    if let Err(err) = telemetry::init(cli.log_level.as_deref(), default_level, format) {
        report_fatal(format, &err, false);
        return ExitCode::from(2);
    }
    // One thread: the work is waiting on Redis, and on a small machine the
    // other core is better left to Redis than spent on cross-thread wake-ups.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let logging = commands::run::Logging {
        level: cli.log_level.as_deref(),
        format: cli.log_format,
    };
    // A `println!` into a closed pipe panics; unwinding (rather than exiting
    // from the panic hook) drops what the command holds, such as the private
    // redis-server of `demo | head`, which is then stopped, not orphaned.
    let run_command = std::panic::AssertUnwindSafe(|| {
        runtime.block_on(async {
            match cli.command {
                Command::Run(args) => commands::run::run(args, logging).await,
                Command::Publish(args) => commands::publish::run(args).await,
                Command::Tail(args) => commands::tail::run(args).await,
                Command::Offsets(args) => commands::offsets::run(args).await,
                Command::Status(args) => commands::status::run(args).await,
                Command::User(args) => commands::user::run(args).await,
                Command::DeadLetters(args) => commands::dead_letters::run(args).await,
                Command::Demo(args) => commands::demo::run(args).await,
                Command::Bench(args) => commands::bench::run(args).await,
                Command::Completions(args) => commands::completions(args.shell),
                Command::Man => commands::man_page(),
            }
        })
    });
    let result = match std::panic::catch_unwind(run_command) {
        Ok(result) => result,
        Err(_) if STDOUT_CLOSED.load(Ordering::SeqCst) => return ExitCode::SUCCESS,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Whoever reads the output stopped reading (`| head`): done.
        Err(err) if stdout_closed(&err) => ExitCode::SUCCESS,
        Err(err) => {
            report_fatal(format, &one_line(&err), true);
            if err.downcast_ref::<cli::InputError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Prints the error that ends the process: `error: ...` on one line, or with
/// `--log-format json` one JSON object like every other line (through the
/// logger once it is installed, so that it has the same fields).
fn report_fatal(format: cli::LogFormat, line: &str, logger_installed: bool) {
    match format {
        cli::LogFormat::Text => eprintln!("error: {line}"),
        cli::LogFormat::Json if logger_installed => tracing::error!(err = %line, "fatal"),
        cli::LogFormat::Json => eprintln!(
            "{}",
            serde_json::json!({"level": "ERROR", "message": "fatal", "err": line})
        ),
    }
}

/// Whether `err` is a write to a closed pipe.
fn stdout_closed(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Set when a `println!` found stdout closed.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Makes `println!` into a closed pipe end the command quietly with status
/// 0, as a write error does, rather than print a panic and a backtrace: the
/// panic is noted and unwinds to `main` (see [`STDOUT_CLOSED`]).
fn exit_quietly_when_stdout_closes() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            STDOUT_CLOSED.store(true, Ordering::SeqCst);
            return;
        }
        default(info);
    }));
}

/// The error and its causes on one line, in the command line's terms: the
/// settings the libraries name become the flags that set them.
fn one_line(err: &anyhow::Error) -> String {
    cli::in_flag_terms(&chain_line(err))
}

/// Parses the command line and, with `--config FILE` (any command), the
/// file's settings that the command has and that no flag or environment
/// variable gave. Usage errors on the command line itself exit here, as clap
/// does.
fn parse_command_line() -> Result<Cli, String> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let matches = Cli::command().get_matches_from(&argv);
    let (path, leaf) = config_file::leaf_subcommand(&matches);
    // `demo`, `bench` and the like have no `--config`: never a file's Redis.
    let file = leaf
        .try_get_one::<std::path::PathBuf>("config")
        .ok()
        .flatten()
        .map(|file| (file.clone(), leaf));
    let matches = match file {
        None => matches,
        Some((file, leaf)) => {
            let extra = config_file::arguments_from_file(&file, &path, leaf)
                .map_err(|err| err.to_string())?;
            let mut full = argv;
            full.extend(extra);
            Cli::command().try_get_matches_from(full).map_err(|err| {
                let text = err.to_string();
                let first = text.lines().next().unwrap_or_default();
                format!(
                    "in the configuration file {}: {}",
                    file.display(),
                    first.trim_start_matches("error: ")
                )
            })?
        }
    };
    Cli::from_arg_matches(&matches).map_err(|err| err.to_string())
}

/// The error and its causes on one line, leaving out a cause whose text the
/// line already holds (most errors here quote their source).
fn chain_line(err: &anyhow::Error) -> String {
    let mut line = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line.replace('\n', " ")
}
