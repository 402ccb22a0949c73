//! The command line: every flag, its environment variable and its help.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use lifecycle_domain::{EntryId, KeyLayout};
use lifecycle_streams::{StartFrom, DEFAULT_CONCURRENCY};

/// A mistake in what the command was given (exit status 2), as opposed to a
/// failure while carrying it out (exit status 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

/// The lobby's user-lifecycle worker: consumes account lifecycle events from a
/// Redis stream and cascades deletions and permanent blocks into the lobby.
#[derive(Debug, Parser)]
#[command(name = "lobby-worker", version, about, long_about = None, after_help = EXIT_STATUS_HELP)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace) or a full filter such as
    /// `info,lifecycle_streams=debug`; overrides RUST_LOG.
    #[arg(long, global = true, env = "LOBBY_LOG_LEVEL")]
    pub log_level: Option<String>,

    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "LOBBY_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// What `--help` says of exit statuses; the README's "Exit status" says the same.
pub const EXIT_STATUS_HELP: &str =
    "Exit status: 0 success (and a closed stdout, as with `| head`); \
2 a mistake in the command line, the environment or the configuration file; \
1 a failure while carrying the command out (Redis refused, a key of the wrong type).";

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// For people.
    Text,
    /// For log collectors.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker: consume the stream and handle each event.
    Run(RunArgs),
    /// Add one well-formed event to the stream and print its id.
    Publish(PublishArgs),
    /// Print decoded entries without handling them or moving the offset.
    Tail(TailArgs),
    /// Inspect or change a stored offset.
    Offsets(OffsetsArgs),
    /// What the lobby knows of one user: the cascade applied, the games
    /// still indexed, the dead letters naming the user, an event waiting.
    User(UserArgs),
    /// Where the worker stands: the stream, the saved offset, the lag, the
    /// dead letters.
    Status(StatusArgs),
    /// The dead letters `run --dead-letter-after` wrote: list, show, send
    /// back through the cascade (redrive) or purge them.
    DeadLetters(DeadLettersArgs),
    /// A self-contained tour: a private Redis, a seeded lobby, a mix of
    /// events, the worker catching up, the lobby before and after.
    Demo(DemoArgs),
    /// Measure throughput and latency against baselines in the same run.
    Bench(BenchArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(CompletionsArgs),
    /// Print the man page (roff), e.g. into
    /// /usr/local/share/man/man1/lobby-worker.1.
    Man,
}

/// `completions`' settings.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `bench`'s settings.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Use this Redis instead of starting a private one (keys under `bench`),
    /// with --yes. Only from the command line: never `REDIS_URL`, which may
    /// name a production Redis.
    #[arg(long)]
    pub redis_url: Option<String>,

    /// Confirms that --redis-url may take about a million and a half entries
    /// and have the keys `bench:*` and `bench-*` deleted.
    #[arg(long)]
    pub yes: bool,

    /// Events in the backlog for `raw` and `default`.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,

    /// Events for `reference` (at most --events): it is slow by design.
    #[arg(long, default_value_t = 20_000)]
    pub reference_events: u64,

    /// Events for `cascade_c1` and `cascade_c64` (at most --events).
    #[arg(long, default_value_t = 50_000)]
    pub cascade_events: u64,

    /// Events per second published while measuring latency.
    #[arg(long, default_value_t = 2_000)]
    pub latency_rate: u64,

    /// How long latency is measured.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub latency_duration: Duration,

    /// Backlog of small entries for the `small_1m_*` memory cases (0 skips
    /// every memory case).
    #[arg(long, default_value_t = 1_000_000)]
    pub memory_events: u64,

    /// Which memory cases to run: `all`, `none`, or names separated by
    /// commas (small_1m_c1, small_1m_c64, 900k_one_user_c64,
    /// 900k_2000_users_c64, 5000_fields, 100k_empty_fields).
    #[arg(long, default_value = "all")]
    pub memory_cases: String,

    /// How long one memory case's `run --drain` may take; after that it is
    /// stopped and reported unfinished, with the peak memory reached so far.
    #[arg(long, default_value = "400s", value_parser = parse_duration)]
    pub memory_case_timeout: Duration,

    /// How many times the lease's holder is SIGKILLed while three workers
    /// serve a steady stream (`takeover_gap_*`, at the default --lease-ttl);
    /// 0 skips the takeover case.
    #[arg(long, default_value_t = 5)]
    pub takeover_kills: u32,

    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Certificate files for a rediss:// --redis-url.
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// `demo`'s settings.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Use this Redis instead of starting a private one; the demo then uses
    /// the key prefix `lobby-demo` and the stream `lobby-demo:user:lifecycle_events`,
    /// clears them first and leaves them for inspection. Only from the
    /// command line: never `REDIS_URL`, which may name a production Redis.
    #[arg(long)]
    pub redis_url: Option<String>,

    /// Certificate files for a rediss:// --redis-url.
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// Where Redis is and which keys to use.
#[derive(Debug, Args, Clone)]
pub struct RedisArgs {
    /// Redis URL: redis://[user:password@]host:port[/db] (rediss:// for
    /// TLS), redis+sentinel://[user:password@]host:port[,host:port...]/MASTER[/db]
    /// for a Sentinel-managed master, or redis+cluster://[user:password@]host:port[,host:port...]
    /// for a Redis Cluster. Passwords are never printed.
    #[arg(
        long,
        global = true,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: String,

    /// The stream of user-lifecycle events.
    #[arg(
        long,
        global = true,
        env = "LOBBY_STREAM",
        default_value = "user:lifecycle_events",
        value_parser = non_blank
    )]
    pub stream: String,

    /// Prefix of every lobby key (offsets are at `<prefix>:stream_offsets:<label>`).
    #[arg(long, global = true, env = "LOBBY_KEY_PREFIX", default_value = "lobby", value_parser = non_blank)]
    pub key_prefix: String,

    /// How the lobby's keys are named: plain (`lobby:game:<id>`), or
    /// cluster (`lobby:game:{<id>}`: each id in a hash tag, required on a
    /// Redis Cluster).
    #[arg(long, global = true, env = "LOBBY_KEY_LAYOUT", default_value = "plain", value_parser = parse_key_layout)]
    pub key_layout: KeyLayout,

    /// A TOML file of settings (keys as the flags, with `_` for `-`, such as
    /// `key_prefix = "lobby"`), shared by every command; each takes the
    /// settings it has. Flags and environment variables win over it.
    #[arg(long, global = true, env = "LOBBY_CONFIG")]
    pub config: Option<PathBuf>,

    /// Certificate files for rediss://.
    #[command(flatten)]
    pub tls: TlsArgs,

    /// For redis+sentinel:// URLs: the sentinels' password, when it is not
    /// the URL's (which is the master's). Never printed; prefer the
    /// environment variable or the configuration file to the flag, which
    /// other users of the host can see.
    #[arg(
        long,
        global = true,
        env = "LOBBY_SENTINEL_PASSWORD",
        hide_env_values = true
    )]
    pub sentinel_password: Option<String>,
}

/// Certificate files for `rediss://` URLs.
#[derive(Debug, Args, Clone, Default)]
pub struct TlsArgs {
    /// For rediss://: PEM file of the certificate authorities to trust
    /// (default: the system's trust store).
    #[arg(long, global = true, env = "LOBBY_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,

    /// For rediss:// servers that ask for a client certificate: its PEM
    /// file (with --tls-key-file).
    #[arg(long, global = true, env = "LOBBY_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,

    /// The PEM private key of --tls-cert-file.
    #[arg(long, global = true, env = "LOBBY_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
}

impl TlsArgs {
    /// The flags that give these files to another `lobby-worker` process.
    pub fn as_flags(&self) -> Vec<std::ffi::OsString> {
        [
            ("--tls-ca-file", &self.tls_ca_file),
            ("--tls-cert-file", &self.tls_cert_file),
            ("--tls-key-file", &self.tls_key_file),
        ]
        .into_iter()
        .filter_map(|(flag, file)| file.as_ref().map(|file| [flag.into(), file.into()]))
        .flatten()
        .collect()
    }
}

/// When offsets are saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CheckpointArg {
    /// After every entry (the reference's behaviour; one more round trip each).
    EveryEntry,
    /// After every batch: a crash replays at most one batch.
    EveryBatch,
}

/// `run`'s settings.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Redis connection and keys.
    #[command(flatten)]
    pub redis: RedisArgs,

    /// How long one read waits for new entries (e.g. 250ms, 2s).
    #[arg(long, env = "LOBBY_BLOCK_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub block_timeout: Duration,

    /// Entries read per round trip; 1 with --checkpoint every-entry is the
    /// reference's behaviour.
    #[arg(long, env = "LOBBY_BATCH_SIZE", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,

    /// When no offset is stored: `beginning` (0-0), `end` (only new
    /// entries) or an entry id to start at (inclusive).
    #[arg(long, env = "LOBBY_START_FROM", default_value = "beginning", value_parser = parse_start_from)]
    pub start_from: StartFrom,

    /// When the offset is saved.
    #[arg(long, env = "LOBBY_CHECKPOINT", value_enum, default_value_t = CheckpointArg::EveryBatch)]
    pub checkpoint: CheckpointArg,

    /// With every-batch: while the worker is caught up with the stream, how
    /// long an offset save may wait so that one save covers the events that
    /// trickled in meanwhile (a crash replays at most that long's events).
    /// 0s saves after every read. At most 60s.
    #[arg(long, env = "LOBBY_CHECKPOINT_DELAY", default_value = "100ms", value_parser = parse_duration)]
    pub checkpoint_delay: Duration,

    /// First delay before retrying a failing handler (doubles with jitter).
    #[arg(long, env = "LOBBY_RETRY_INITIAL", default_value = "100ms", value_parser = parse_duration)]
    pub retry_initial: Duration,

    /// Longest delay between retries of a failing handler.
    #[arg(long, env = "LOBBY_RETRY_MAX", default_value = "30s", value_parser = parse_duration)]
    pub retry_max: Duration,

    /// After this many failed attempts, copy the entry to the dead-letter
    /// stream and move on. Unset: retry for ever, never skip.
    #[arg(long, env = "LOBBY_DEAD_LETTER_AFTER", value_parser = clap::value_parser!(u32).range(1..))]
    pub dead_letter_after: Option<u32>,

    /// The dead-letter stream (default: `<stream>:dead`).
    #[arg(long, env = "LOBBY_DEAD_LETTER_STREAM")]
    pub dead_letter_stream: Option<String>,

    /// How long the whole stop may take after SIGINT/SIGTERM: handler calls
    /// in flight, the final offset save and any reconnect it needs.
    #[arg(long, alias = "shutdown-grace", env = "LOBBY_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// How long the consumer lease lasts without a renewal: of the `run`
    /// processes on one stream and label, the one holding it consumes, the
    /// others wait. Shorter: a faster takeover after a crash; longer: fewer
    /// needless takeovers when Redis or the network is slow. 500ms to 1h.
    #[arg(long, env = "LOBBY_LEASE_TTL", default_value = "10s", value_parser = parse_duration)]
    pub lease_ttl: Duration,

    /// Consume without the lease, whatever other processes do: every
    /// process so started handles every event, and offset saves are not
    /// fenced. For a Redis user whose ACL cannot write the lease keys
    /// (`{<prefix>:stream_offsets:<label>}:*`). From the environment: 1/0,
    /// true/false, yes/no, on/off.
    #[arg(long, env = "LOBBY_NO_LEASE", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_lease: bool,

    /// The most memory for entries read but not finished (queued, running,
    /// waiting to be dead-lettered), as they cost once read; reading pauses
    /// there. At least 8MiB (e.g. 16MiB, 64MiB).
    #[arg(long, env = "LOBBY_MAX_HELD_BYTES", default_value = "16MiB", value_parser = parse_size)]
    pub max_held_bytes: usize,

    /// Handle the entries present at start-up, save the offset and exit 0.
    /// From the environment: 1/0, true/false, yes/no, on/off.
    #[arg(long, env = "LOBBY_DRAIN", value_parser = clap::builder::BoolishValueParser::new())]
    pub drain: bool,

    /// How many events are handled at once; one user's events never
    /// concurrently and always in stream order. 1 keeps strict stream order
    /// across users too.
    #[arg(long, env = "LOBBY_CONCURRENCY", default_value_t = DEFAULT_CONCURRENCY as u32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,

    /// Where /metrics, /healthz and /readyz are served (`IP:PORT`), or `off`
    /// [default: 127.0.0.1:9464; if that port is taken, the worker runs
    /// without them and says so].
    #[arg(long, env = "LOBBY_METRICS_ADDR", value_parser = parse_metrics_addr)]
    pub metrics_addr: Option<MetricsAddr>,

    /// The consumer label: the offset is saved at
    /// `<key-prefix>:stream_offsets:<label>`. Give each stream its own.
    #[arg(long, env = "LOBBY_LABEL", default_value = DEFAULT_LABEL, value_parser = non_blank)]
    pub label: String,

    /// How often a one-line summary (handled, absorbed, failures, lag) is
    /// logged at info level; 0s turns it off.
    #[arg(long, env = "LOBBY_SUMMARY_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub summary_interval: Duration,

    /// Print the effective configuration (passwords redacted) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// The label of the user-lifecycle consumer's offset.
pub const DEFAULT_LABEL: &str = lifecycle_domain::USER_LIFECYCLE_LABEL;

/// The metrics address used when none is given.
pub const DEFAULT_METRICS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);

/// Where the HTTP endpoints listen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    /// No HTTP listener.
    Off,
    /// This address.
    At(SocketAddr),
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsAddr::Off => f.write_str("off"),
            MetricsAddr::At(addr) => addr.fmt(f),
        }
    }
}

/// `status`'s settings.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Redis connection and keys.
    #[command(flatten)]
    pub redis: RedisArgs,

    /// The consumer label whose offset to use.
    #[arg(long, env = "LOBBY_LABEL", default_value = DEFAULT_LABEL, value_parser = non_blank)]
    pub label: String,

    /// The dead-letter stream (default: `<stream>:dead`).
    #[arg(long, env = "LOBBY_DEAD_LETTER_STREAM")]
    pub dead_letter_stream: Option<String>,

    /// One JSON object instead of `key: value` lines.
    #[arg(long)]
    pub json: bool,
}

/// `user`'s settings.
#[derive(Debug, Args)]
pub struct UserArgs {
    /// Redis connection and keys.
    #[command(flatten)]
    pub redis: RedisArgs,

    /// The user id, as in the events' `user_id` (trimmed, as the worker
    /// reads it).
    #[arg(value_parser = non_blank)]
    pub user_id: String,

    /// The consumer label whose offset to use.
    #[arg(long, env = "LOBBY_LABEL", default_value = DEFAULT_LABEL, value_parser = non_blank)]
    pub label: String,

    /// The dead-letter stream (default: `<stream>:dead`).
    #[arg(long, env = "LOBBY_DEAD_LETTER_STREAM", value_parser = non_blank)]
    pub dead_letter_stream: Option<String>,

    /// One JSON object instead of `key: value` lines.
    #[arg(long)]
    pub json: bool,
}

/// `publish`'s fields.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Redis connection and keys.
    #[command(flatten)]
    pub redis: RedisArgs,

    /// `user.deleted` or `user.permanently_blocked` (another type only with
    /// --allow-unknown-type).
    #[arg(long)]
    pub event_type: String,

    /// Publish an --event-type the worker does not act on (it absorbs such
    /// events): for testing consumers, never for a real deletion.
    #[arg(long)]
    pub allow_unknown_type: bool,

    /// The account the event is about.
    #[arg(long, value_parser = non_blank)]
    pub user_id: String,

    /// When it happened, milliseconds since the Unix epoch (default: now).
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    pub occurred_at_ms: Option<i64>,

    /// Producing system.
    #[arg(long)]
    pub source: Option<String>,

    /// Kind of actor that caused the event.
    #[arg(long)]
    pub actor_type: Option<String>,

    /// Id of that actor.
    #[arg(long)]
    pub actor_id: Option<String>,

    /// Machine-readable reason.
    #[arg(long)]
    pub reason_code: Option<String>,

    /// Distributed-trace id.
    #[arg(long)]
    pub trace_id: Option<String>,
}

/// `tail`'s settings.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// Redis connection and keys.
    #[command(flatten)]
    pub redis: RedisArgs,

    /// One JSON object per line and entry.
    #[arg(long)]
    pub json: bool,

    /// Start at this entry id (inclusive); default: the stream's first entry.
    #[arg(long, value_parser = parse_entry_id)]
    pub from: Option<EntryId>,

    /// Stop after this many entries.
    #[arg(long)]
    pub count: Option<u64>,

    /// Keep waiting for new entries (stop with Ctrl-C).
    #[arg(long)]
    pub follow: bool,
}

/// `offsets`' settings.
#[derive(Debug, Args)]
pub struct OffsetsArgs {
    /// Redis connection and keys.
    #[command(flatten)]
    pub redis: RedisArgs,

    /// The consumer label whose offset to use.
    #[arg(long, global = true, env = "LOBBY_LABEL", default_value = DEFAULT_LABEL, value_parser = non_blank)]
    pub label: String,

    /// What to do with it.
    #[command(subcommand)]
    pub action: OffsetsAction,
}

/// What `offsets` does.
#[derive(Debug, Subcommand)]
pub enum OffsetsAction {
    /// Print the stored offset.
    Get,
    /// Overwrite it with exactly ID, even backwards (a deliberate rewind or
    /// skip); an ID past the stream's last generated id only with --force.
    /// Takes the consumer lease for the write: a running worker hands it
    /// over, then resumes after ID.
    Set {
        /// The entry id, `<ms>-<seq>`.
        #[arg(value_parser = parse_entry_id)]
        id: EntryId,
        /// Store an ID past the stream's last generated id (or on a stream
        /// that does not exist): every event added until the stream's ids
        /// pass it would be skipped. Also takes the lease at once, like
        /// `rewind --force`.
        #[arg(long)]
        force: bool,
        /// How long to wait for a running worker to hand the lease over.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        wait: Duration,
    },
    /// Move it back to ID (at or before the stored offset): every entry
    /// after ID is handled again. Takes the consumer lease for the write: a
    /// running worker hands it over, then resumes after ID.
    Rewind {
        /// The entry id to resume after, `<ms>-<seq>`.
        #[arg(long, value_parser = parse_entry_id)]
        to: EntryId,
        /// Take the lease at once, fencing out the worker holding it (it
        /// drops what it read, unsaved) rather than waiting for it to hand
        /// the lease over.
        #[arg(long)]
        force: bool,
        /// How long to wait for a running worker to hand the lease over.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        wait: Duration,
    },
    /// Delete it: the worker (a running one hands the lease over first)
    /// starts again per --start-from.
    Reset {
        /// Take the lease at once, fencing out the worker holding it.
        #[arg(long)]
        force: bool,
        /// How long to wait for a running worker to hand the lease over.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        wait: Duration,
    },
}

/// `dead-letters`' settings.
#[derive(Debug, Args)]
pub struct DeadLettersArgs {
    /// Redis connection and keys.
    #[command(flatten)]
    pub redis: RedisArgs,

    /// The dead-letter stream (default: `<stream>:dead`).
    #[arg(long, global = true, env = "LOBBY_DEAD_LETTER_STREAM", value_parser = non_blank)]
    pub dead_letter_stream: Option<String>,

    /// What to do with them.
    #[command(subcommand)]
    pub action: DeadLettersAction,
}

/// What `dead-letters` does.
#[derive(Debug, Subcommand)]
pub enum DeadLettersAction {
    /// One line per dead letter: its id, the original entry, the user, the
    /// event type, the attempts, when and the error.
    List {
        /// One JSON object per line and dead letter.
        #[arg(long)]
        json: bool,
        /// Stop after this many.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        /// Start at this dead letter id (inclusive); default: the first.
        #[arg(long, value_parser = parse_entry_id)]
        from: Option<EntryId>,
    },
    /// One dead letter whole: every field, in order.
    Show {
        /// The dead letter's id (as `list` prints it).
        #[arg(value_parser = parse_entry_id)]
        id: EntryId,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back through the cascade, oldest original entry
    /// first; each that applies (or was superseded) is removed, each that
    /// fails stays with its attempts counted and its error updated.
    Redrive {
        /// Which ones.
        #[command(flatten)]
        which: DeadLetterChoice,
        /// Say what would be done, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// One JSON object per line and dead letter.
        #[arg(long)]
        json: bool,
    },
    /// Remove dead letters for good (with --yes when more than one).
    Purge {
        /// Which ones.
        #[command(flatten)]
        which: PurgeChoice,
        /// Confirms removing more than one.
        #[arg(long)]
        yes: bool,
        /// One JSON object instead of a line.
        #[arg(long)]
        json: bool,
    },
}

/// The dead letters `redrive` takes: one, or all.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct DeadLetterChoice {
    /// The dead letter with this id.
    #[arg(long, value_parser = parse_entry_id)]
    pub id: Option<EntryId>,
    /// Every dead letter of --stream.
    #[arg(long)]
    pub all: bool,
}

/// The dead letters `purge` removes: one, all, or the old ones.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct PurgeChoice {
    /// The dead letter with this id.
    #[arg(long, value_parser = parse_entry_id)]
    pub id: Option<EntryId>,
    /// Every dead letter.
    #[arg(long)]
    pub all: bool,
    /// Those written (or last failed a redrive) longer ago than this, such
    /// as 7d, 12h, 30m or 1d12h.
    #[arg(long, value_parser = parse_age)]
    pub older_than: Option<Duration>,
}

/// Parses an age: what [`parse_duration`] takes, optionally after a number of
/// days (`7d`, `1d12h`).
pub fn parse_age(text: &str) -> Result<Duration, String> {
    let invalid =
        || format!("{text:?} is not an age: use a number with a unit, like 7d, 12h, 30m or 1d12h");
    let trimmed = text.trim();
    let Some((days, rest)) = trimmed.split_once('d') else {
        return parse_duration(trimmed).map_err(|_| invalid());
    };
    if days.is_empty() || !days.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(invalid());
    }
    let days: u64 = days.parse().map_err(|_| invalid())?;
    let rest = if rest.is_empty() {
        Duration::ZERO
    } else {
        parse_duration(rest).map_err(|_| invalid())?
    };
    Ok(Duration::from_secs(days.saturating_mul(86_400)).saturating_add(rest))
}

/// A key layout's name: `plain` or `cluster`.
pub fn parse_key_layout(text: &str) -> Result<KeyLayout, String> {
    text.parse()
        .map_err(|err: lifecycle_domain::ParseKeyLayoutError| err.to_string())
}

/// A name that is not empty or blank (a stream, a key prefix, a label).
pub fn non_blank(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Err("must not be empty or blank".into());
    }
    Ok(text.to_owned())
}

/// Parses `250ms`, `2s`, `1m`, `1h` or `1m30s`.
/// Parses a size in bytes: a number with an optional unit (`B`, `KiB`,
/// `MiB`, `GiB`), such as `16MiB`; at least 8 MiB, so that an entry of
/// 1 MiB still fits in one read.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let invalid =
        || format!("{text:?} is not a size: use a number with a unit, like 16MiB or 512KiB");
    let trimmed = text.trim();
    let digits = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits);
    let value: usize = number.parse().map_err(|_| invalid())?;
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(invalid()),
    };
    let bytes = value.checked_mul(scale).ok_or_else(invalid)?;
    if bytes < MIN_HELD_BYTES {
        return Err(format!("{text:?} is too small: at least 8MiB"));
    }
    Ok(bytes)
}

/// The smallest `--max-held-bytes`.
pub const MIN_HELD_BYTES: usize = 8 << 20;

/// Parses a duration such as `250ms`, `2s`, `1m30s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || {
        format!("{text:?} is not a duration: use a number with a unit, like 250ms, 2s, 1m or 1h")
    };
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(invalid)?;
        let (number, after) = rest.split_at(digits);
        let value: u64 = number.parse().map_err(|_| invalid())?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let part = match unit {
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value.saturating_mul(60)),
            "h" => Duration::from_secs(value.saturating_mul(3600)),
            _ => return Err(invalid()),
        };
        total = total.saturating_add(part);
        rest = next;
    }
    Ok(total)
}

fn parse_metrics_addr(text: &str) -> Result<MetricsAddr, String> {
    if text.trim().eq_ignore_ascii_case("off") {
        return Ok(MetricsAddr::Off);
    }
    text.trim().parse().map(MetricsAddr::At).map_err(|_| {
        format!("{text:?} is not an address like 127.0.0.1:9464 or [::1]:9464, nor `off`")
    })
}

/// Formats a duration the way [`parse_duration`] reads it back.
pub fn format_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms % 1000 != 0 || ms == 0 {
        return format!("{ms}ms");
    }
    let secs = ms / 1000;
    if secs % 3600 == 0 {
        format!("{}h", secs / 3600)
    } else if secs % 60 == 0 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

fn parse_entry_id(text: &str) -> Result<EntryId, String> {
    text.parse()
        .map_err(|err: lifecycle_domain::ParseEntryIdError| err.to_string())
}

fn parse_start_from(text: &str) -> Result<StartFrom, String> {
    match text {
        "beginning" => Ok(StartFrom::Beginning),
        "end" => Ok(StartFrom::End),
        other => other.parse().map(StartFrom::Id).map_err(|_| {
            format!("{other:?} is not `beginning`, `end` or an entry id like 1700000000000-0")
        }),
    }
}

/// The settings the libraries' messages name (in backticks, as
/// `` `batch_size` ``) and the flags that set them: the libraries know no
/// flags, and every error the binary prints is put in its own terms by
/// [`in_flag_terms`].
const SETTING_FLAGS: &[(&str, &str)] = &[
    ("`stream`", "--stream"),
    ("`batch_size`", "--batch-size"),
    ("`checkpoint_delay`", "--checkpoint-delay"),
    ("`block_timeout`", "--block-timeout"),
    ("`concurrency`", "--concurrency"),
    ("`dead_letter_after`", "--dead-letter-after"),
    ("`dead_letter_stream`", "--dead-letter-stream"),
    ("`handler_retry.initial`", "--retry-initial"),
    ("`handler_retry.max`", "--retry-max"),
    ("`max_held_bytes`", "--max-held-bytes"),
    ("`max_reply_bytes`", "a quarter of --max-held-bytes"),
    ("`shutdown_timeout`", "--shutdown-timeout"),
    ("`lease_ttl`", "--lease-ttl"),
    ("`ca_file`", "--tls-ca-file"),
    ("`cert_file`", "--tls-cert-file"),
    ("`key_file`", "--tls-key-file"),
];

/// A library's message in terms of the flags that set the settings it
/// names; a setting without a flag keeps its name.
pub fn in_flag_terms(message: &str) -> String {
    SETTING_FLAGS
        .iter()
        .fold(message.to_owned(), |text, (setting, flag)| {
            text.replace(setting, flag)
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn library_setting_names_become_flags() {
        assert_eq!(
            in_flag_terms("`handler_retry.initial` must not be larger than `handler_retry.max`"),
            "--retry-initial must not be larger than --retry-max"
        );
        assert_eq!(
            in_flag_terms("`batch_size` must be at least 1"),
            "--batch-size must be at least 1"
        );
        assert_eq!(
            in_flag_terms("not a stream: set `stream` to a stream key (`ca_file`, `label`)"),
            "not a stream: set --stream to a stream key (--tls-ca-file, `label`)"
        );
    }

    #[test]
    fn every_mapped_flag_exists() {
        let command = Cli::command();
        let longs: Vec<String> = command
            .get_subcommands()
            .flat_map(|sub| sub.get_arguments())
            .chain(command.get_arguments())
            .filter_map(|arg| arg.get_long().map(|long| format!("--{long}")))
            .collect();
        for (setting, flags) in SETTING_FLAGS {
            let named: Vec<&str> = flags
                .split_whitespace()
                .filter(|word| word.starts_with("--"))
                .collect();
            assert!(!named.is_empty(), "{setting} maps to no flag");
            for flag in named {
                assert!(
                    longs.iter().any(|long| long == flag),
                    "{setting}: no {flag}"
                );
            }
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_parse_with_binary_units_and_a_floor() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("8388608"), Ok(8 << 20));
        assert_eq!(parse_size("9000KiB"), Ok(9000 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("8388607").is_err(), "below the floor");
        assert!(parse_size("4MiB").is_err());
        assert!(parse_size("16MB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        for bad in ["", "5", "s", "1.5s", "-1s", "2 s", "1d", "ms5"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ages_parse_with_days_too() {
        assert_eq!(parse_age("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(parse_age("1d12h").unwrap(), Duration::from_secs(36 * 3600));
        assert_eq!(parse_age("12h").unwrap(), Duration::from_secs(12 * 3600));
        assert_eq!(parse_age("30m").unwrap(), Duration::from_secs(1800));
        for bad in [
            "", "d", "7", "-1d", "1.5d", "7dd", "1d2", "d7", "7 d", "1h1d",
        ] {
            assert!(parse_age(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn metrics_addresses_parse_or_turn_off() {
        assert_eq!(parse_metrics_addr("off").unwrap(), MetricsAddr::Off);
        assert_eq!(
            parse_metrics_addr("127.0.0.1:9464").unwrap(),
            MetricsAddr::At(DEFAULT_METRICS_ADDR)
        );
        assert_eq!(
            parse_metrics_addr("[::1]:80").unwrap().to_string(),
            "[::1]:80"
        );
        for bad in ["", "9464", "localhost:9464", "127.0.0.1", "on"] {
            assert!(parse_metrics_addr(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_print_as_they_parse() {
        for text in ["250ms", "5s", "90s", "1m", "2h", "0ms", "1500ms"] {
            let duration = parse_duration(text).unwrap();
            assert_eq!(format_duration(duration), text);
            assert_eq!(
                parse_duration(&format_duration(duration)).unwrap(),
                duration
            );
        }
    }

    #[test]
    fn start_from_takes_words_or_ids() {
        assert_eq!(parse_start_from("end").unwrap(), StartFrom::End);
        assert_eq!(
            parse_start_from("5-1").unwrap(),
            StartFrom::Id(EntryId::new(5, 1))
        );
        assert!(parse_start_from("latest").is_err());
    }
}
