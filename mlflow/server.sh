#!/usr/bin/env bash
# The MLflow tracking server for softfine-tune: `mlflow server` plus what it lacks (store defaults,
# --daemon/--stop, a /health wait, --prod and --auth conveniences). See mlflow/README.md.
set -euo pipefail
# Everything this script or the server creates (SQLite databases, artifacts, log, pid file, the users
# database) is readable by its owner only: runs, artifacts and password hashes are nobody else's.
umask 077

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROG="mlflow/server.sh"

usage() {
  cat <<EOF
Usage: $PROG [options] [mlflow server options]

Starts the MLflow tracking server (UI + REST API + served artifacts) with this project's defaults.
Every option not listed below goes to \`mlflow server\` unchanged, which validates it
(\`$PROG --port 5001 --workers 2 --x-frame-options DENY\`; see \`mlflow server --help\`).
The server listens on 127.0.0.1:5000 unless --host/--port (or \$MLFLOW_HOST/\$MLFLOW_PORT) say otherwise.

Default (embedded) mode: SQLite backend store STORE/mlflow.db, artifacts served from STORE/artifacts
(or \$MLFLOW_ARTIFACTS_DESTINATION), one worker (\`--backend-store-uri\`, \`--artifacts-destination\`,
\`--workers\` given here override them).

STORE is mlflow/ beside this script unless --store or \$SOFTFINE_MLFLOW_STORE says otherwise; it is
made private (mode 700) on every start, and the server runs in it.

Artifacts are always served (--serve-artifacts): clients read and write them through this server, as
mlflow-artifacts:/ URIs. An s3://bucket/prefix destination needs boto3, and AWS credentials for this
server only, taken the way AWS tools take them (AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
the instance's IAM role; AWS_ENDPOINT_URL or MLFLOW_S3_ENDPOINT_URL for a store other than AWS's);
the bucket is listed once before the server starts.

Options of this script:
  --store DIR    folder for mlflow.db, artifacts/, server.log, server.pid, basic_auth.* (default: $HERE)
  --prod         production mode: PostgreSQL backend store from \$MLFLOW_BACKEND_STORE_URI
                 (postgresql://USER@HOST:5432/DB; the password in ~/.pgpass or \$PGPASSWORD,
                 never in the repo), 4 workers
  --auth         basic authentication (--app-name basic-auth; pip install -e '.[auth]'); needs
                 \$MLFLOW_FLASK_SERVER_SECRET_KEY, and on the first start \$MLFLOW_AUTH_ADMIN_PASSWORD;
                 its settings are STORE/basic_auth.ini (written once, users in STORE/basic_auth.db)
                 unless \$MLFLOW_AUTH_CONFIG_PATH names another ini file.
                 Required for any --host other than 127.0.0.1, ::1 or localhost.
  --daemon       start in the background (log STORE/server.log, pid STORE/server.pid), wait until
                 /health answers, then return; a running daemon of this STORE is replaced
  --stop         stop the daemon of this STORE (only the very process its pid file recorded); exits 1
                 when none was running or the pid file was stale (then removed)
  --timeout S    seconds --daemon waits for /health (default: 120)
  -h, --help     this text (mlflow's own -h, --host, is spelled --host here)

Environment: \$PYTHON (default python3) is the interpreter that has mlflow installed.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true turns MLflow's job runner (GenAI jobs) on; it is off here.

Examples:
  $PROG                                   # http://127.0.0.1:5000, stores in mlflow/
  $PROG --port 5001 --store /tmp/mlf      # another port and store
  $PROG --artifacts-destination s3://my-bucket/softfine/mlflow   # artifacts in S3, served to clients
  MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@db.internal:5432/mlflow \\
  MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/mlflow $PROG --prod --auth --host 10.0.1.5
EOF
}

die() { echo "$PROG: $*" >&2; exit 1; }
note() { echo "$PROG: $*" >&2; }

STORE="${SOFTFINE_MLFLOW_STORE:-$HERE}"
PROD=0
AUTH=0
DAEMON=0
STOP=0
TIMEOUT=120
PYTHON="${PYTHON:-python3}"
PASS=()  # every option this script does not own, for `mlflow server` as given

need_value() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --store) need_value "$@"; STORE="$2"; shift 2 ;;
    --store=*) need_value --store "${1#*=}"; STORE="${1#*=}"; shift ;;
    --timeout) need_value "$@"; TIMEOUT="$2"; shift 2 ;;
    --timeout=*) TIMEOUT="${1#*=}"; shift ;;
    --prod) PROD=1; shift ;;
    --auth) AUTH=1; shift ;;
    --daemon) DAEMON=1; shift ;;
    --stop) STOP=1; shift ;;
    *) PASS+=("$1"); shift ;;
  esac
done

# --- Checks of this script's own options (mlflow server checks the rest itself). ---------------------

[[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a whole number of seconds (at least 1), got '$TIMEOUT'"
[ ! -e "$STORE" ] || [ -d "$STORE" ] || die "--store $STORE is not a folder"
if [ "$STOP" = 1 ]; then
  [ "$DAEMON" = 0 ] || die "--stop and --daemon cannot be combined (--daemon alone replaces a running daemon)"
  [ ${#PASS[@]} = 0 ] || die "--stop takes only --store, not '${PASS[0]}' (it stops the daemon of the store)"
fi

# --- The pid file: which process --stop and --daemon may signal. ---------------------------------------
# It holds three lines: the daemon's pid, its start time (field 22 of /proc/PID/stat, clock ticks since
# boot) and its command line. Pids are reused, pid + start time is not: a pid file that outlived its
# server (a crash, a reboot, a store copied from elsewhere) never makes this script signal a stranger.

proc_field() {  # PID N: field N of /proc/PID/stat
  local stat f
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  read -ra f <<< "${stat##*) }"  # the fields after "PID (COMM) ", field 3 first: COMM may hold spaces
  echo "${f[$(($2 - 3))]}"
}
proc_start_time() { proc_field "$1" 22; }
proc_pgrp() { proc_field "$1" 5; }
proc_running() { local state; state="$(proc_field "$1" 3)" && [ "$state" != Z ]; }  # zombies are gone
proc_cmdline() { { tr '\0\n' '  ' < "/proc/$1/cmdline"; } 2>/dev/null; }

# Sets OWNED_PID to the daemon the pid file names if that very process still runs; else returns 1
# with STALE saying why.
check_pidfile() {
  local pid="" start="" cmd=""
  OWNED_PID=""
  { IFS= read -r pid; IFS= read -r start; IFS= read -r cmd; } < "$PIDFILE" || true
  if ! [[ "$pid" =~ ^[1-9][0-9]*$ && "$start" =~ ^[0-9]+$ ]]; then
    STALE="it does not record a pid, start time and command line"; return 1
  fi
  if [ "$(proc_start_time "$pid")" != "$start" ]; then
    STALE="pid $pid has exited, or is another process now"; return 1
  fi
  if [ "$(proc_cmdline "$pid")" != "$cmd" ]; then
    STALE="pid $pid now runs another command"; return 1
  fi
  OWNED_PID="$pid"
}

write_pidfile() {  # PID
  printf '%s\n%s\n%s\n' "$1" "$(proc_start_time "$1")" "$(proc_cmdline "$1")" > "$PIDFILE.tmp"
  mv -f "$PIDFILE.tmp" "$PIDFILE"
}

# TERM the daemon's process group (uvicorn and MLflow's job runners are in it: setsid made the daemon
# its leader), KILL what is left after 10 s. Only called on a pid check_pidfile vouched for, or the one
# this run started.
stop_pid() {
  local pid="$1" start
  start="$(proc_start_time "$pid")" || return 0
  if [ "$(proc_pgrp "$pid")" != "$pid" ]; then  # not a group leader: only ever signal that process
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
      proc_running "$pid" && [ "$(proc_start_time "$pid")" = "$start" ] || return 0
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    return 0
  fi
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    proc_running "$pid" || break
    sleep 0.1
  done
  # A group's id is not reused while any member lives: this sweep reaches only the daemon's processes.
  for _ in $(seq 1 20); do
    kill -0 -- "-$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
}

# The daemon this store's pid file names: stopped if it is ours ("replaced"), else the stale file goes.
clear_pidfile() {
  [ -f "$PIDFILE" ] || return 0
  if check_pidfile; then
    stop_pid "$OWNED_PID"
    rm -f "$PIDFILE"
    note "replaced the running server of $STORE (pid $OWNED_PID)"
  else
    rm -f "$PIDFILE"
    note "removed the stale $PIDFILE ($STALE); no process was signalled"
  fi
}

stop_command() {
  [ -d "$STORE" ] || die "--stop: no server of $STORE is running (no such folder)"
  STORE="$(cd "$STORE" && pwd)"
  PIDFILE="$STORE/server.pid"
  [ -f "$PIDFILE" ] || die "--stop: no server of $STORE is running (no $PIDFILE)"
  if ! check_pidfile; then
    rm -f "$PIDFILE"
    die "--stop: $PIDFILE is stale ($STALE): removed it, stopped nothing"
  fi
  stop_pid "$OWNED_PID"
  rm -f "$PIDFILE"
  echo "$PROG: stopped the server of $STORE (pid $OWNED_PID)"
  exit 0
}

[ "$STOP" = 0 ] || stop_command

# --- The environment --prod and --auth need (cheap checks first: no Python yet). -----------------------

command -v "$PYTHON" >/dev/null 2>&1 || die "no Python interpreter '$PYTHON' (set \$PYTHON to the one that has mlflow)"
if [ "$DAEMON" = 1 ]; then
  command -v setsid >/dev/null 2>&1 && [ -r /proc/self/stat ] || die "--daemon needs setsid and /proc (Linux); run in the foreground instead"
fi

mkdir -p "$STORE" 2>/dev/null || die "--store $STORE: cannot create the folder"
STORE="$(cd "$STORE" && pwd)"
chmod 700 "$STORE" 2>/dev/null || die "--store $STORE: cannot make it private (chmod 700): are you its owner?"
PIDFILE="$STORE/server.pid"
LOGFILE="$STORE/server.log"

prod_checks() {
  [ -n "${MLFLOW_BACKEND_STORE_URI:-}" ] || die "--prod needs MLFLOW_BACKEND_STORE_URI (e.g. postgresql://mlflow@db-host:5432/mlflow; password in ~/.pgpass or PGPASSWORD)"
  case "$MLFLOW_BACKEND_STORE_URI" in
    postgresql://*|postgresql+*://*) ;;
    *) die "--prod: MLFLOW_BACKEND_STORE_URI must be a postgresql:// URI, got '${MLFLOW_BACKEND_STORE_URI%%://*}://...'" ;;
  esac
  case "$MLFLOW_BACKEND_STORE_URI" in
    *://*:*@*) note "warning: MLFLOW_BACKEND_STORE_URI holds a password; prefer ~/.pgpass or PGPASSWORD" ;;
  esac
}

# MLflow's own basic_auth.ini, plus a cache of checked credentials: without it every request pays a
# PBKDF2 hash (seconds on a small CPU), and a search logs thousands of requests. The users database
# path is relative: the server runs in STORE, so a store copied elsewhere keeps its users.
AUTH_INI='# Written by mlflow/server.sh --auth when absent; edit freely (see mlflow/README.md).
[mlflow]
default_permission = READ
database_uri = sqlite:///basic_auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# Checked credentials are trusted for this many seconds per worker (a changed password too).
auth_cache_ttl_seconds = 60'

auth_checks() {
  [ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ] || die "--auth needs MLFLOW_FLASK_SERVER_SECRET_KEY (a random string, the same for every server process)"
  if [ -n "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then
    [ -f "$MLFLOW_AUTH_CONFIG_PATH" ] || die "--auth: MLFLOW_AUTH_CONFIG_PATH $MLFLOW_AUTH_CONFIG_PATH is not a file"
    # The server runs in STORE: a relative path would no longer lead there.
    MLFLOW_AUTH_CONFIG_PATH="$(cd "$(dirname "$MLFLOW_AUTH_CONFIG_PATH")" && pwd)/$(basename "$MLFLOW_AUTH_CONFIG_PATH")"
  else
    [ -f "$STORE/basic_auth.ini" ] || printf '%s\n' "$AUTH_INI" > "$STORE/basic_auth.ini"
    MLFLOW_AUTH_CONFIG_PATH="$STORE/basic_auth.ini"
    # MLflow has no default admin password: the first start must be given one.
    if [ ! -f "$STORE/basic_auth.db" ] && [ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] \
       && grep -qx 'database_uri = sqlite:///basic_auth.db' "$STORE/basic_auth.ini" \
       && ! grep -q '^admin_password *= *[^ ]' "$STORE/basic_auth.ini"; then
      die "--auth: the first start creates the admin user: set MLFLOW_AUTH_ADMIN_PASSWORD"
    fi
  fi
  export MLFLOW_AUTH_CONFIG_PATH
}

# Where the served artifacts go: $MLFLOW_ARTIFACTS_DESTINATION (a folder, relative to where this script
# was started, or a URI such as s3://bucket/prefix), else STORE/artifacts; an --artifacts-destination
# given to this script wins over both (it comes last, below). The folder is created once the options
# are checked.
DEST="${MLFLOW_ARTIFACTS_DESTINATION:-$STORE/artifacts}"
case "$DEST" in
  *://*|/*) ;;
  *) DEST="$PWD/$DEST" ;;
esac
ARGS=(server --serve-artifacts)
# MLflow's job runner (six huey consumer processes, each a Python with mlflow loaded, for GenAI jobs
# such as trace roll-ups and prompt optimisation) serves nothing a search logs: off unless asked for.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
if [ "$PROD" = 1 ]; then
  prod_checks
  ARGS+=(--backend-store-uri "$MLFLOW_BACKEND_STORE_URI" --artifacts-destination "$DEST" --workers 4)
  MODE="prod (PostgreSQL"
else
  ARGS+=(--backend-store-uri "sqlite:///$STORE/mlflow.db" --artifacts-destination "$DEST" --workers 1)
  MODE="embedded (SQLite $STORE/mlflow.db"
fi
if [ "$AUTH" = 1 ]; then
  auth_checks
  ARGS+=(--app-name basic-auth)
fi
# The caller's options come last: for an option given twice, mlflow server (click) keeps the last.
ARGS+=(${PASS[@]+"${PASS[@]}"})

# --- Python checks: mlflow server's own validation of the options, then the address. ------------------

# Runs Python code ($1) on the arguments after it and prints its stdout. Exit 3 is a refusal: its
# stdout is one line, this script's error. Any other failure shows the last line of its stderr.
py() {
  local code="$1" out err rc=0
  shift
  err="$(mktemp)"
  out="$("$PYTHON" -c "$code" "$@" 2>"$err")" || rc=$?
  if [ "$rc" = 0 ]; then rm -f "$err"; printf '%s\n' "$out"; return 0; fi
  [ "$rc" = 3 ] || out="$PYTHON failed: $(grep -v '^[[:space:]]*$' "$err" | tail -n 1 | cut -c1-300)"
  rm -f "$err"
  die "$out"
}

# Parses the final argument list with mlflow server's own click command (types, ranges, unknown
# options: the same verdicts as mlflow server, in one line, before anything starts); prints the host,
# port and interpreter the server will use.
CHECK_OPTIONS="$(cat <<'PY'
import re
import sys

def refuse(message):
    print(message)
    sys.exit(3)

try:
    import click
    from mlflow.cli import server
except ImportError as e:
    refuse(f"mlflow is not installed for {sys.executable} ({e}): pip install -e '.[tune]' (or set $PYTHON)")
try:
    params = server.make_context("mlflow server", sys.argv[2:]).params
except click.ClickException as e:
    refuse(f"mlflow server refused the options: {e.format_message()} (see mlflow server --help)")
# Values click takes as any text, which mlflow server would only trip over once running (in a log,
# or never): an empty one, a worker count that is no count, a store URI of no scheme MLflow knows.
for param in server.params:
    if params.get(param.name) == "":
        refuse(f"{param.opts[0]} '': empty; give a value or leave the option out (see mlflow server --help)")
workers = params.get("workers")
if workers is not None and not (workers.isdigit() and int(workers) >= 1):
    refuse(f"--workers must be a whole number of at least 1, got '{workers}'")
from mlflow.tracking._tracking_service.utils import _tracking_store_registry
from mlflow.tracking._model_registry.utils import _get_store_registry
for name, registry in (("backend_store_uri", _tracking_store_registry), ("registry_store_uri", _get_store_registry())):
    uri = params.get(name)
    if uri:
        try:
            registry.get_store_builder(uri)  # by the URI's scheme; nothing is opened
        except Exception as e:
            masked = lambda text: re.sub(r"(://[^/:@]*):[^/@]*@", r"\1:***@", text)  # no password in the line
            refuse(f"--{name.replace('_', '-')} {masked(uri)}: not a store MLflow can use "
                   f"({masked(str(e).strip().splitlines()[0])[:200]})")
frame = params.get("x_frame_options")
if frame is not None and frame.upper() not in ("SAMEORIGIN", "DENY", "NONE"):
    refuse(f"--x-frame-options must be SAMEORIGIN, DENY or NONE, got '{frame}'")
host, port = params["host"], params["port"]
if not 0 < port < 65536:
    refuse(f"--port must be 1..65535, got '{port}'")
auth = params.get("app_name") == "basic-auth"
# Anything but loopback serves other machines: runs, artifacts and models need a password then.
if host not in ("127.0.0.1", "::1", "[::1]", "localhost") and not auth:
    refuse(f"--host {host} is not a loopback address: add --auth (basic authentication) to serve other machines, or use --host 127.0.0.1")
if auth:
    try:
        import flask_wtf  # noqa: F401  (the basic-auth app refuses to start without it)
    except ImportError:
        refuse("--auth needs Flask-WTF for MLflow's basic-auth app: pip install -e '.[auth]' (or 'mlflow[auth]')")
if sys.argv[1] == "prod":
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            refuse(f"--prod: no PostgreSQL driver for {sys.executable}: pip install psycopg2-binary")

dest = params.get("artifacts_destination") or ""


def check_s3(dest):
    """The bucket answers a listing of the prefix with the credentials and endpoint this server will
    use (boto3's own chain: environment, profile, instance role; AWS_ENDPOINT_URL, or
    MLFLOW_S3_ENDPOINT_URL as MLflow's S3 client takes it). Nothing is written; no secret is printed."""
    import os
    from urllib.parse import urlparse

    try:
        import boto3
        import botocore.config
        import botocore.exceptions
    except ImportError:
        refuse(f"--artifacts-destination {dest} needs boto3 for {sys.executable}: pip install boto3")
    parsed = urlparse(dest)
    bucket, prefix = parsed.netloc, parsed.path.lstrip("/")
    if not bucket:
        refuse(f"--artifacts-destination {dest}: no bucket (give s3://BUCKET/PREFIX)")
    session = boto3.Session()
    if session.get_credentials() is None:
        refuse(f"--artifacts-destination {dest}: no AWS credentials for this server: give them the way AWS "
               "tools take them (AWS_PROFILE, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the instance's "
               "IAM role), never in a file of this repository")
    config = botocore.config.Config(connect_timeout=5, read_timeout=15, retries={"max_attempts": 2})
    client = session.client("s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None,
                            verify=False if os.environ.get("MLFLOW_S3_IGNORE_TLS", "").lower() == "true" else None,
                            config=config)
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except botocore.exceptions.ClientError as e:
        error = e.response.get("Error", {})
        refuse(f"--artifacts-destination {dest}: S3 refused to list it ({error.get('Code', '?')}: "
               f"{str(error.get('Message', '')).strip()[:200]})")
    except botocore.exceptions.BotoCoreError as e:
        refuse(f"--artifacts-destination {dest}: S3 cannot be reached ({str(e)[:200]})")


if dest.startswith("s3://"):
    check_s3(dest)
print(host)
print(port)
print(sys.executable)
print(dest)
PY
)"

# A clear error instead of uvicorn's traceback when the address is taken or not ours.
CHECK_BIND="$(cat <<'PY'
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
except OSError as e:
    print(f"cannot resolve --host {host}: {e.strerror or e}")
    sys.exit(3)
family, _, _, _, addr = infos[0]
s = socket.socket(family, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(addr)
except OSError as e:
    if e.errno == 98 or "in use" in str(e):
        print(f"port {port} on {host} is already in use (another server? choose one with --port)")
    else:
        print(f"cannot listen on --host {host} --port {port}: {e.strerror or e}")
    sys.exit(3)
finally:
    s.close()
PY
)"

CHECKED="$(py "$CHECK_OPTIONS" "$([ "$PROD" = 1 ] && echo prod || echo embedded)" "${ARGS[@]:1}")"
{ read -r HOST; read -r PORT; read -r PYBIN; read -r DEST; } <<< "$CHECKED"
# A folder destination (the default STORE/artifacts) is made here (a relative one in STORE, where the
# server runs), private like the store.
case "$DEST" in
  *://*) ;;
  *) (cd "$STORE" && mkdir -p "$DEST") 2>/dev/null || die "--artifacts-destination $DEST: cannot create the folder" ;;
esac
MODE="$MODE, artifacts in $DEST"
[ "$AUTH" = 0 ] || MODE="$MODE, basic auth"
MODE="$MODE)"
# Named in the start-up line, with any password in a URI masked (the line goes to logs).
[ ${#PASS[@]} = 0 ] || MODE="$MODE, with $(sed -E 's#(://[^/:@]*):[^/@]*@#\1:***@#g' <<< "${PASS[*]}")"

[ "$DAEMON" = 0 ] || clear_pidfile   # frees the port when the old daemon of this store used it
py "$CHECK_BIND" "$HOST" "$PORT" >/dev/null

# MLflow writes into the working directory only what is relative in its configuration (basic auth's
# users database, a relative --backend-store-uri): run in the store folder.
cd "$STORE"
URL_HOST="$HOST"
case "$HOST" in 0.0.0.0) URL_HOST=127.0.0.1 ;; ::|'[::]') URL_HOST='[::1]' ;; \[*) ;; *:*) URL_HOST="[$HOST]" ;; esac

if [ "$DAEMON" = 0 ]; then
  note "$MODE on http://$URL_HOST:$PORT"
  exec "$PYTHON" -m mlflow "${ARGS[@]}"
fi

# --- --daemon: a new session, its pid file, then the wait for /health. --------------------------------

# The daemon runs $PYTHON's own interpreter (sys.executable), not a wrapper or shim that would exec
# it: its command line then is the one recorded in the pid file.
start_daemon() {
  local expected
  setsid "$PYBIN" -m mlflow "${ARGS[@]}" > "$LOGFILE" 2>&1 < /dev/null &
  DAEMON_PID=$!
  # setsid execs the interpreter in this very process (it is no group leader): wait for that exec,
  # so that the pid file records the command line --stop will find.
  expected="$(printf '%s ' "$PYBIN" -m mlflow "${ARGS[@]}")"
  for _ in $(seq 1 100); do
    [ "$(proc_cmdline "$DAEMON_PID")" != "$expected" ] || break
    sleep 0.02
  done
  proc_running "$DAEMON_PID" || die "the server exited at once: $(last_log_line) (log $LOGFILE)"
  write_pidfile "$DAEMON_PID"
}

last_log_line() { grep -v '^[[:space:]]*$' "$LOGFILE" 2>/dev/null | tail -n 1 | cut -c1-300; }

healthy() {  # straight to the server, past any $http_proxy
  "$PYBIN" -c '
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
' "http://$URL_HOST:$PORT/health" 2>/dev/null
}

start_daemon
DEADLINE=$((SECONDS + TIMEOUT))
while [ "$SECONDS" -lt "$DEADLINE" ]; do
  if ! proc_running "$DAEMON_PID"; then
    rm -f "$PIDFILE"
    die "the server exited during start-up: $(last_log_line) (log $LOGFILE)"
  fi
  if healthy; then
    note "$MODE, running in the background on http://$URL_HOST:$PORT, pid $DAEMON_PID (log $LOGFILE; stop with: $PROG --stop --store $STORE)"
    exit 0
  fi
  sleep 0.5
done
stop_pid "$DAEMON_PID"
rm -f "$PIDFILE"
die "--timeout $TIMEOUT: the server did not answer http://$URL_HOST:$PORT/health within ${TIMEOUT}s, stopped it (log $LOGFILE)"
