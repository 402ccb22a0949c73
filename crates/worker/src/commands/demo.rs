//! `lobby-worker demo`: a tour for someone who just cloned the repository.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use lifecycle_domain::{
    decode_user_lifecycle_event, BoxFuture, CascadeOutcome, EntryId, EventHandler, Game,
    GameStatus, HandlerError, LobbyStore, UserCascade, UserLifecycleConsumer, UserLifecycleEvent,
    USER_LIFECYCLE_LABEL,
};
use lifecycle_private_redis::PrivateRedis;
use lifecycle_redis::{redact_url, RedisLobbyStore, RedisOffsetStore};
use lifecycle_streams::{parse_range_reply, ConsumerConfig};
use redis::Value;

use crate::cli::DemoArgs;
use crate::redis_conn::{connect, delete_matching, explain, RedisTarget};

/// The cascade handler, recording what each entry did for the report.
struct RecordingHandler {
    lobby: RedisLobbyStore,
    outcomes: Mutex<HashMap<EntryId, CascadeOutcome>>,
}

impl EventHandler<UserLifecycleEvent> for RecordingHandler {
    fn handle<'a>(
        &'a self,
        event: &'a UserLifecycleEvent,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let outcome = self
                .lobby
                .apply_cascade(&UserCascade::for_event(event))
                .await
                .map_err(|err| HandlerError::with_source("apply the lobby cascade", err))?;
            self.outcomes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(event.entry_id, outcome);
            Ok(())
        })
    }
}

/// Key prefix used on a Redis the user pointed us at, away from real data.
const SHARED_PREFIX: &str = "lobby-demo";

fn ids(members: &[&str]) -> BTreeSet<String> {
    members.iter().map(|id| (*id).to_owned()).collect()
}

fn game(
    status: &str,
    owner: &str,
    members: &[&str],
    applicants: &[&str],
    invitees: &[&str],
) -> Game {
    Game {
        status: Some(GameStatus::parse(status)),
        owner_id: owner.to_owned(),
        cancel_reason: (status == "cancelled").then(|| "owner left".to_owned()),
        members: ids(members),
        applicants: ids(applicants),
        invitees: ids(invitees),
        dropped: BTreeSet::new(),
    }
}

/// A small lobby: games of each status, alice and bob in every role.
fn demo_lobby() -> Vec<(&'static str, Game)> {
    vec![
        (
            "open-1",
            game("open", "alice", &["alice", "carol"], &["bob"], &["dave"]),
        ),
        (
            "open-2",
            game("open", "erin", &["erin", "bob"], &["alice"], &[]),
        ),
        (
            "open-3",
            game("open", "carol", &["carol"], &[], &["alice", "bob"]),
        ),
        (
            "running-1",
            game("running", "bob", &["bob", "alice", "carol"], &[], &[]),
        ),
        (
            "running-2",
            game("running", "dave", &["dave", "erin", "alice"], &["bob"], &[]),
        ),
        (
            "finished-1",
            game("finished", "alice", &["alice", "bob", "erin"], &[], &[]),
        ),
        (
            "finished-2",
            game("finished", "carol", &["carol", "dave"], &[], &["bob"]),
        ),
        (
            "cancelled-1",
            game("cancelled", "bob", &["bob", "alice"], &["erin"], &[]),
        ),
    ]
}

/// The events published, as field lists; one is malformed, one of an
/// unknown type, one for a user without games.
fn demo_events(now_ms: i64) -> Vec<(&'static str, Vec<(&'static str, String)>)> {
    let event = |event_type: &str, user: &str, offset: i64| {
        vec![
            ("event_type", event_type.to_owned()),
            ("user_id", user.to_owned()),
            ("occurred_at_ms", (now_ms - offset).to_string()),
            ("source", "user-service".to_owned()),
        ]
    };
    vec![
        (
            "alice deleted her account",
            event("user.deleted", "alice", 5_000),
        ),
        (
            "bob was permanently blocked",
            event("user.permanently_blocked", "bob", 4_000),
        ),
        (
            "an entry without user_id",
            vec![
                ("event_type", "user.deleted".to_owned()),
                ("occurred_at_ms", (now_ms - 3_000).to_string()),
            ],
        ),
        (
            "an event type this worker does not act on",
            event("user.renamed", "carol", 2_000),
        ),
        (
            "zed, who has no games, was deleted",
            event("user.deleted", "zed", 1_500),
        ),
    ]
}

fn join(set: &BTreeSet<String>) -> String {
    if set.is_empty() {
        "-".to_owned()
    } else {
        set.iter().cloned().collect::<Vec<_>>().join(",")
    }
}

async fn print_lobby(
    title: &str,
    lobby: &RedisLobbyStore,
    game_ids: &[&str],
) -> anyhow::Result<()> {
    println!("\n== {title}");
    println!(
        "{:<12} {:<10} {:<7} {:<20} {:<11} {:<11} {:<7}",
        "game", "status", "owner", "members", "applicants", "invitees", "dropped"
    );
    for game_id in game_ids {
        let Some(game) = lobby.get_game(game_id).await? else {
            continue;
        };
        let status = match (&game.status, &game.cancel_reason) {
            (Some(GameStatus::Cancelled), Some(reason)) if reason.starts_with("user.") => {
                "cancelled*".to_owned()
            }
            (Some(status), _) => status.as_str().to_owned(),
            (None, _) => "?".to_owned(),
        };
        println!(
            "{:<12} {:<10} {:<7} {:<20} {:<11} {:<11} {}",
            game_id,
            status,
            game.owner_id,
            join(&game.members),
            join(&game.applicants),
            join(&game.invitees),
            join(&game.dropped)
        );
    }
    Ok(())
}

/// Runs the tour and prints it.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let (server, url, prefix) = match &args.redis_url {
        Some(url) => (None, url.clone(), SHARED_PREFIX),
        None => {
            let server = tokio::task::spawn_blocking(PrivateRedis::start)
                .await
                .context("cannot start a private redis-server")?
                .map_err(|err| anyhow::anyhow!("cannot start a private redis-server: {err}"))?;
            let url = server.url();
            (Some(server), url, "lobby")
        }
    };
    let stream = format!("{prefix}:user:lifecycle_events");
    let stream = if server.is_some() {
        "user:lifecycle_events".to_owned()
    } else {
        stream
    };
    match &server {
        Some(server) => println!(
            "lobby-worker demo: a private redis-server on 127.0.0.1:{} (in {}), removed when the demo ends",
            server.port(),
            server.dir().display()
        ),
        None => println!(
            "lobby-worker demo: using Redis at {} with keys {prefix}:* and stream {stream}",
            redact_url(&url)
        ),
    }

    // Certificate files with the private (plain) server are refused here.
    let target = RedisTarget::new(&url, &args.tls)?;
    let mut conn = connect(&target).await?;
    if server.is_none() {
        // A shared Redis: start clean, from the demo's own keys only.
        delete_matching(&target, &format!("{prefix}:*"), "clear the demo's keys").await?;
    }
    let client = target.endpoint()?;
    let lobby = target.lobby_store(prefix)?;
    let games = demo_lobby();
    for (game_id, game) in &games {
        lobby.put_game(game_id, game).await?;
    }
    let game_ids: Vec<&str> = games.iter().map(|(id, _)| *id).collect();
    print_lobby("The lobby before", &lobby, &game_ids).await?;

    let now_ms = i64::try_from(lifecycle_streams::now_ms()).unwrap_or(i64::MAX);
    println!("\n== Events published to {stream}");
    for (story, fields) in demo_events(now_ms) {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&stream).arg("*");
        for (name, value) in &fields {
            cmd.arg(*name).arg(value);
        }
        let id: String = cmd
            .query_async(&mut conn)
            .await
            .map_err(|err| explain(&url, "publish", &err))?;
        println!("{id}  {story}");
    }

    let offsets =
        RedisOffsetStore::new(client.clone(), prefix).context("cannot set up the offset store")?;
    let handler = Arc::new(RecordingHandler {
        lobby: lobby.clone(),
        outcomes: Mutex::new(HashMap::new()),
    });
    let mut config = ConsumerConfig::new(stream.clone(), USER_LIFECYCLE_LABEL);
    config.drain = true;
    let consumer = target.consumer(Arc::new(offsets.clone()), config.clone())?;
    consumer.on_event(handler.clone());
    let report = consumer.run().await?;
    let stats = consumer.stats().snapshot();
    println!("\n== What the worker did with each entry (`lobby-worker run --drain`)");
    print_outcomes(&mut conn, &url, &stream, &handler).await?;
    print_lobby(
        "The lobby after (cancelled* = cancelled by a cascade)",
        &lobby,
        &game_ids,
    )
    .await?;
    println!(
        "\nOffset {} saved at {prefix}:stream_offsets:{USER_LIFECYCLE_LABEL}: {} handled, {} malformed, {} unknown type.",
        report.offset.map_or_else(|| "-".to_owned(), |id| id.to_string()),
        stats.handled,
        stats.malformed,
        stats.unknown_type,
    );

    // Delivery is at-least-once: after a crash before the offset was saved,
    // entries come again. Show that a replay changes nothing.
    offsets.set(USER_LIFECYCLE_LABEL, EntryId::ZERO).await?;
    handler
        .outcomes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clear();
    let replay = target.consumer(Arc::new(offsets), config)?;
    replay.on_event(handler.clone());
    replay.run().await?;
    println!("\n== The whole stream again, as after a crash before the offset was saved (offset rewound to 0-0)");
    print_outcomes(&mut conn, &url, &stream, &handler).await?;
    print_lobby("The lobby after the replay: unchanged", &lobby, &game_ids).await?;
    println!("\nDemo finished in {} ms.", started.elapsed().as_millis());
    println!("Next: `lobby-worker run --redis-url redis://HOST:PORT` against your Redis; `lobby-worker --help` for more.");
    drop(server);
    Ok(())
}

/// Prints what became of each entry of the stream.
async fn print_outcomes(
    conn: &mut lifecycle_streams::RedisConnection,
    url: &str,
    stream: &str,
    handler: &RecordingHandler,
) -> anyhow::Result<()> {
    let reply: Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .map_err(|err| explain(url, "read the stream", &err))?;
    let outcomes = handler
        .outcomes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    for entry in parse_range_reply(reply)? {
        let outcome = match decode_user_lifecycle_event(entry.id, &entry.fields) {
            Err(err) => format!("absorbed as malformed ({err})"),
            Ok(event) if !event.event_type.is_known() => {
                format!("absorbed: unknown type {:?}", event.event_type.as_str())
            }
            Ok(event) => {
                let what = format!("{} {}", event.event_type.as_str(), event.user_id);
                match outcomes.get(&entry.id) {
                    Some(CascadeOutcome::Applied { games, .. }) => {
                        format!("{what}: cascade applied to {games} game(s)")
                    }
                    Some(CascadeOutcome::AlreadyApplied { recorded }) => {
                        format!("{what}: already applied (entry {recorded}), nothing changed")
                    }
                    None => format!("{what}: not handled"),
                }
            }
        };
        println!("{}  {outcome}", entry.id);
    }
    Ok(())
}
