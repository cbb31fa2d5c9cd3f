#!/usr/bin/env bash
# The MLflow tracking server for softfine-tune: one command, two modes. See mlflow/README.md.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROG="mlflow/server.sh"

usage() {
  cat <<EOF
Usage: $PROG [options]

Starts the MLflow tracking server (UI + REST API + served artifacts).

Default (embedded) mode: SQLite backend store STORE/mlflow.db, artifacts served from
STORE/artifacts (--serve-artifacts --artifacts-destination), one worker, bound to 127.0.0.1.
STORE is mlflow/ beside this script unless --store or \$SOFTFINE_MLFLOW_STORE says otherwise.

Options:
  --port N       port to listen on (default: 5000)
  --host ADDR    address to bind (default: 127.0.0.1; use a private address only, never a public one)
  --store DIR    folder for mlflow.db, artifacts/, server.log, server.pid (default: $HERE)
  --workers N    server worker processes (default: 1 embedded, 4 with --prod)
  --prod         production mode: PostgreSQL backend store from \$MLFLOW_BACKEND_STORE_URI
                 (postgresql://USER@HOST:5432/DB; the password in ~/.pgpass or \$PGPASSWORD,
                 never in the repo), artifacts served from \$MLFLOW_ARTIFACTS_DESTINATION
                 (a folder or s3://bucket/prefix; default STORE/artifacts), 4 workers
  --auth         basic authentication (--app-name basic-auth); needs pip install 'mlflow[auth]',
                 \$MLFLOW_FLASK_SERVER_SECRET_KEY, and on the first start \$MLFLOW_AUTH_ADMIN_PASSWORD;
                 optional \$MLFLOW_AUTH_CONFIG_PATH (an ini file; its users database defaults to
                 STORE/basic_auth.db)
  --daemon       start in the background (log STORE/server.log, pid STORE/server.pid), wait until
                 /health answers, then return; an already running daemon of this STORE is replaced
  --stop         stop the daemon of this STORE and exit
  --timeout S    seconds --daemon waits for /health (default: 120)
  -h, --help     this text

Environment: \$PYTHON (default python3) is the interpreter that has mlflow installed.

Examples:
  $PROG                                   # http://127.0.0.1:5000, stores in mlflow/
  $PROG --port 5001 --store /tmp/mlf      # another port and store
  MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@db.internal:5432/mlflow \\
  MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/mlflow $PROG --prod --host 10.0.1.5
EOF
}

die() { echo "$PROG: $*" >&2; exit 1; }

PORT=5000
HOST=127.0.0.1
STORE="${SOFTFINE_MLFLOW_STORE:-$HERE}"
WORKERS=""
PROD=0
AUTH=0
DAEMON=0
STOP=0
TIMEOUT=120
PYTHON="${PYTHON:-python3}"

need_value() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --port) need_value "$@"; PORT="$2"; shift 2 ;;
    --port=*) PORT="${1#*=}"; shift ;;
    --host) need_value "$@"; HOST="$2"; shift 2 ;;
    --host=*) HOST="${1#*=}"; shift ;;
    --store) need_value "$@"; STORE="$2"; shift 2 ;;
    --store=*) STORE="${1#*=}"; shift ;;
    --workers) need_value "$@"; WORKERS="$2"; shift 2 ;;
    --workers=*) WORKERS="${1#*=}"; shift ;;
    --timeout) need_value "$@"; TIMEOUT="$2"; shift 2 ;;
    --timeout=*) TIMEOUT="${1#*=}"; shift ;;
    --prod) PROD=1; shift ;;
    --auth) AUTH=1; shift ;;
    --daemon) DAEMON=1; shift ;;
    --stop) STOP=1; shift ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

[[ "$PORT" =~ ^[0-9]+$ ]] && [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] || die "--port must be 1..65535, got '$PORT'"
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout must be a whole number of seconds, got '$TIMEOUT'"
[ -z "$WORKERS" ] || [[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer, got '$WORKERS'"
command -v "$PYTHON" >/dev/null 2>&1 || die "no Python interpreter '$PYTHON' (set \$PYTHON)"

mkdir -p "$STORE" || die "cannot create the store folder $STORE"
STORE="$(cd "$STORE" && pwd)"
PIDFILE="$STORE/server.pid"
LOGFILE="$STORE/server.log"

# The daemon runs in its own session: its pid is also its process group, which --stop signals
# (uvicorn's worker processes are in it too).
stop_daemon() {
  [ -f "$PIDFILE" ] || return 1
  local pid
  pid="$(cat "$PIDFILE")"
  rm -f "$PIDFILE"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  return 0
}

if [ "$STOP" = 1 ]; then
  if stop_daemon; then echo "$PROG: stopped the server of $STORE"; else echo "$PROG: no server of $STORE is running"; fi
  exit 0
fi

if [ "$DAEMON" = 1 ]; then
  stop_daemon && echo "$PROG: replaced the running server of $STORE" || true
fi

# A clear error instead of uvicorn's traceback when the address is taken or not ours.
if ! BIND_ERROR="$("$PYTHON" - "$HOST" "$PORT" <<'PY' 2>&1
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
except OSError as e:
    sys.exit(f"cannot resolve --host {host}: {e.strerror or e}")
family, _, _, _, addr = infos[0]
s = socket.socket(family, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(addr)
except OSError as e:
    if e.errno == 98 or "in use" in str(e):
        sys.exit(f"port {port} on {host} is already in use (another server? choose one with --port)")
    sys.exit(f"cannot listen on {host}:{port}: {e.strerror or e}")
finally:
    s.close()
PY
)"; then
  die "${BIND_ERROR##*$'\n'}"
fi

"$PYTHON" -c "import mlflow" 2>/dev/null || die "mlflow is not installed for $PYTHON (pip install mlflow)"

ARGS=(server --host "$HOST" --port "$PORT" --serve-artifacts)
if [ "$PROD" = 1 ]; then
  [ -n "${MLFLOW_BACKEND_STORE_URI:-}" ] || die "--prod needs MLFLOW_BACKEND_STORE_URI (e.g. postgresql://mlflow@db-host:5432/mlflow; password in ~/.pgpass or PGPASSWORD)"
  case "$MLFLOW_BACKEND_STORE_URI" in
    postgresql://*|postgresql+*://*) ;;
    *) die "--prod: MLFLOW_BACKEND_STORE_URI must be a postgresql:// URI, got '${MLFLOW_BACKEND_STORE_URI%%://*}://...'" ;;
  esac
  case "$MLFLOW_BACKEND_STORE_URI" in
    *://*:*@*) echo "$PROG: warning: MLFLOW_BACKEND_STORE_URI holds a password; prefer ~/.pgpass or PGPASSWORD" >&2 ;;
  esac
  "$PYTHON" -c "import psycopg2" 2>/dev/null || "$PYTHON" -c "import psycopg" 2>/dev/null \
    || die "--prod: no PostgreSQL driver for $PYTHON (pip install psycopg2-binary)"
  DEST="${MLFLOW_ARTIFACTS_DESTINATION:-$STORE/artifacts}"
  case "$DEST" in
    s3://*) "$PYTHON" -c "import boto3" 2>/dev/null || die "--prod: artifacts in $DEST need boto3 (pip install boto3)" ;;
    *://*) ;;
    *) mkdir -p "$DEST"; DEST="$(cd "$DEST" && pwd)" ;;
  esac
  ARGS+=(--backend-store-uri "$MLFLOW_BACKEND_STORE_URI" --artifacts-destination "$DEST" --workers "${WORKERS:-4}")
  MODE="prod (PostgreSQL, artifacts in $DEST)"
else
  mkdir -p "$STORE/artifacts"
  ARGS+=(--backend-store-uri "sqlite:///$STORE/mlflow.db" --artifacts-destination "$STORE/artifacts" --workers "${WORKERS:-1}")
  MODE="embedded (SQLite $STORE/mlflow.db, artifacts in $STORE/artifacts)"
fi

if [ "$AUTH" = 1 ]; then
  "$PYTHON" -c "import flask_wtf" 2>/dev/null || die "--auth needs Flask-WTF (pip install 'mlflow[auth]')"
  [ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ] || die "--auth needs MLFLOW_FLASK_SERVER_SECRET_KEY (a random string, the same for every server process)"
  ARGS+=(--app-name basic-auth)
  MODE="$MODE, basic auth"
fi

# MLflow writes nothing into the working directory with these options, except basic auth's
# default users database (sqlite:///basic_auth.db): run from the store folder.
cd "$STORE"
echo "$PROG: $MODE on http://$HOST:$PORT" >&2

if [ "$DAEMON" = 0 ]; then
  exec "$PYTHON" -m mlflow "${ARGS[@]}"
fi

# --daemon: detach into a new session, record its pid, wait for /health.
setsid "$PYTHON" -m mlflow "${ARGS[@]}" >"$LOGFILE" 2>&1 < /dev/null &
PID=$!
echo "$PID" > "$PIDFILE"
URL_HOST="$HOST"
case "$HOST" in 0.0.0.0) URL_HOST=127.0.0.1 ;; ::|'[::]') URL_HOST='[::1]' ;; *:*) URL_HOST="[$HOST]" ;; esac
for _ in $(seq 1 $((TIMEOUT * 2))); do
  if ! kill -0 "$PID" 2>/dev/null; then
    rm -f "$PIDFILE"
    tail -n 20 "$LOGFILE" >&2 || true
    die "the server exited during start-up (log above, in $LOGFILE)"
  fi
  if "$PYTHON" - "http://$URL_HOST:$PORT/health" <<'PY' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
  then
    echo "$PROG: running in the background, pid $PID (log $LOGFILE; stop with: $PROG --stop --store $STORE)" >&2
    exit 0
  fi
  sleep 0.5
done
stop_daemon || true
die "the server did not answer http://$URL_HOST:$PORT/health within ${TIMEOUT}s (log in $LOGFILE)"
