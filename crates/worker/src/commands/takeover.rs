//! `bench`'s takeover case: three `run` processes serve a steady stream
//! under the consumer lease (default settings); the holder is SIGKILLed
//! again and again, then SIGTERMed, and each time the gap is measured from
//! the signal to the stored offset's next move, which only a new holder
//! makes.

use lifecycle_streams::RedisConnection;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use lifecycle_domain::EntryId;
use lifecycle_redis::lease::lease_key;
use lifecycle_redis::Identity;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::cli::{TlsArgs, DEFAULT_LABEL};

/// How long one takeover may take before the case gives up (well above the
/// default lease ttl of 10 s).
const TAKEOVER_LIMIT: Duration = Duration::from_secs(60);

/// How often the offset and the lease are looked at.
const POLL: Duration = Duration::from_millis(5);

/// Workers serving the stream at once.
const WORKERS: usize = 3;

/// The gaps measured: one per kill, and the graceful one.
pub struct Takeovers {
    /// From each SIGKILL of the holder to the offset's next move.
    pub after_kill: Vec<Duration>,
    /// From a SIGTERM of the holder to the offset's next move.
    pub after_sigterm: Duration,
}

/// A `run` process of the case.
struct Worker {
    child: Child,
    pid: u32,
}

/// Starts `lobby-worker run` on `stream` under `prefix`, with default
/// settings otherwise.
fn start(url: &str, tls: &TlsArgs, stream: &str, prefix: &str) -> anyhow::Result<Worker> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let mut command = Command::new(exe);
    command.args(["run", "--metrics-addr", "off", "--log-level", "error"]);
    command.args(tls.as_flags());
    let child = command
        .args(["--stream", stream, "--key-prefix", prefix])
        .args(["--key-layout", crate::redis_conn::layout_of(url).as_str()])
        .env("REDIS_URL", url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start `lobby-worker run`")?;
    let pid = child.id().context("a worker exited at once")?;
    Ok(Worker { child, pid })
}

/// The stored offset.
async fn offset(conn: &mut RedisConnection, key: &str) -> anyhow::Result<Option<EntryId>> {
    let text: Option<String> = redis::cmd("GET").arg(key).query_async(conn).await?;
    Ok(text.and_then(|text| text.parse().ok()))
}

/// The pid of the lease's holder, once one holds it.
async fn holder(conn: &mut RedisConnection, key: &str) -> anyhow::Result<u32> {
    let started = Instant::now();
    loop {
        let holder: Option<String> = redis::cmd("HGET")
            .arg(key)
            .arg("holder")
            .query_async(conn)
            .await?;
        if let Some(identity) = holder.as_deref().and_then(Identity::parse) {
            return Ok(identity.pid);
        }
        anyhow::ensure!(
            started.elapsed() < TAKEOVER_LIMIT,
            "no worker took the lease within {TAKEOVER_LIMIT:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// How long after `since` the offset at `key` moved past `from`.
async fn next_move(
    conn: &mut RedisConnection,
    key: &str,
    from: Option<EntryId>,
    since: Instant,
) -> anyhow::Result<Duration> {
    loop {
        if offset(conn, key).await? > from {
            return Ok(since.elapsed());
        }
        anyhow::ensure!(
            since.elapsed() < TAKEOVER_LIMIT,
            "the offset did not move within {TAKEOVER_LIMIT:?} of the signal"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Runs the case on `url` under keys `<prefix>*`, killing the holder
/// `kills` times.
///
/// # Errors
///
/// Redis failures, a worker that cannot be started, a takeover that does
/// not come within a minute.
pub async fn measure(
    url: &str,
    tls: &TlsArgs,
    conn: &mut RedisConnection,
    prefix: &str,
    kills: u32,
) -> anyhow::Result<Takeovers> {
    let stream = format!("{prefix}:events");
    let offset_key = format!("{prefix}:stream_offsets:{DEFAULT_LABEL}");
    let lease = lease_key(prefix, DEFAULT_LABEL);
    let mut workers = (0..WORKERS)
        .map(|_| start(url, tls, &stream, prefix))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // A steady trickle of deletions, as the user service sends them.
    let mut publisher_conn = conn.clone();
    let publishing_stream = stream.clone();
    let publisher = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_millis(2));
        for n in 0u64.. {
            ticks.tick().await;
            let added: Result<String, _> = redis::cmd("XADD")
                .arg(&publishing_stream)
                .arg("*")
                .arg("event_type")
                .arg("user.deleted")
                .arg("user_id")
                .arg(format!("takeover-{}", n % 1000))
                .arg("occurred_at_ms")
                .arg(1_700_000_000_000u64)
                .query_async(&mut publisher_conn)
                .await;
            if added.is_err() {
                return;
            }
        }
    });
    let result = async {
        let mut after_kill = Vec::new();
        for _ in 0..kills {
            // The holder is consuming: the offset moves.
            let before = offset(conn, &offset_key).await?;
            next_move(conn, &offset_key, before, Instant::now()).await?;
            let pid = holder(conn, &lease).await?;
            let at_kill = offset(conn, &offset_key).await?;
            let index = workers
                .iter()
                .position(|worker| worker.pid == pid)
                .context("the lease's holder is not one of the case's workers")?;
            let mut killed = workers.swap_remove(index);
            let killed_at = Instant::now();
            killed
                .child
                .start_kill()
                .context("cannot SIGKILL the holder")?;
            after_kill.push(next_move(conn, &offset_key, at_kill, killed_at).await?);
            drop(killed.child.wait().await);
            workers.push(start(url, tls, &stream, prefix)?);
        }
        let before = offset(conn, &offset_key).await?;
        next_move(conn, &offset_key, before, Instant::now()).await?;
        let pid = holder(conn, &lease).await?;
        let at_stop = offset(conn, &offset_key).await?;
        let stopped_at = Instant::now();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("cannot run kill")?;
        anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
        let after_sigterm = next_move(conn, &offset_key, at_stop, stopped_at).await?;
        Ok(Takeovers {
            after_kill,
            after_sigterm,
        })
    }
    .await;
    publisher.abort();
    for mut worker in workers {
        drop(worker.child.start_kill());
        drop(worker.child.wait().await);
    }
    result
}
