#!/usr/bin/env bash
# Runs the worker without a container or systemd, with the recommended flags.
# Settings come from the environment (REDIS_URL, LOBBY_*), so secrets stay out
# of the command line; see `lobby-worker run --help` for every LOBBY_ variable.
#   REDIS_URL='redis://:password@redis.internal:6379/0' ./deploy/run-lobby-worker.sh
# Over TLS:
#   REDIS_URL='rediss://:password@redis.internal:6380' \
#   LOBBY_TLS_CA_FILE=/etc/lobby-worker/redis-ca.pem ./deploy/run-lobby-worker.sh
set -euo pipefail
bin="${LOBBY_WORKER_BIN:-$(dirname "$0")/../target/release/lobby-worker}"
if [ ! -x "$bin" ]; then
  echo "no binary at $bin: run 'cargo build --release' first, or set LOBBY_WORKER_BIN" >&2
  exit 2
fi
: "${REDIS_URL:?set REDIS_URL, e.g. redis://:password@127.0.0.1:6379/0}"
# The endpoints listen on loopback unless told otherwise: for a Prometheus on
# another host, set LOBBY_METRICS_ADDR to the one interface it reaches (say
# 10.0.0.5:9464) rather than every interface.
export LOBBY_METRICS_ADDR="${LOBBY_METRICS_ADDR:-127.0.0.1:9464}"
export LOBBY_CONCURRENCY="${LOBBY_CONCURRENCY:-16}"
export LOBBY_BATCH_SIZE="${LOBBY_BATCH_SIZE:-1024}"
# Show the effective configuration (password redacted), then run.
"$bin" run --print-config
exec "$bin" --log-format "${LOBBY_LOG_FORMAT:-json}" run
