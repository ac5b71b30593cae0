#!/usr/bin/env bash
# Multi-host test: the parts talk over a network and survive losing a host.
#
#   scripts/multihost-test.sh            (as root, from anywhere in the repo)
#
# Builds a small private network out of Linux network namespaces, one per
# "host", all plugged into a bridge that lives in a namespace of its own:
#
#              ┌──────────── orch-mh-<id>-sw: bridge br0 ────────────┐
#              │ p-data          p-api           p-w1          p-w2  │
#              └───┬───────────────┬───────────────┬─────────────┬───┘
#             veth │          veth │          veth │        veth │
#   data  10.213.N.2     api  10.213.N.3    w1 10.213.N.11   w2 10.213.N.12
#   Redis :6379          orchd :50051 gRPC  orch-worker      orch-worker
#   RabbitMQ :5672             :8000 REST   (w1-*)           (w2-*)
#
# then submits sleep jobs, cuts w1's cable (its port on the bridge goes down)
# while w1 runs one of them, and checks that orchd's sweeper records the
# attempt as "worker lost", that the job is retried and completed on w2
# (attempt 2), and that every job ends COMPLETED with exactly one transition
# to COMPLETED in its history.
#
# Only addresses inside these namespaces are used: 10.213.N.0/24 on the
# veths, and each namespace's own loopback (RabbitMQ's epmd and Erlang
# distribution stay on the data namespace's 127.0.0.1). No namespace has a
# default route; the host's interfaces, routes and ports are never touched.
# Every process runs inside a namespace with the marker ORCH_MH_OWNER=<id> in
# its environment; the EXIT trap kills them all by PID, deletes the
# namespaces (and with them the veths and the bridge) and the temp dir, and
# then verifies that nothing of this run is left.
#
# Needs root and network namespaces. Where `ip netns add` is not permitted
# (not root, a restricted container, a user namespace) it prints
# "SKIPPED: multi-host test needs root and network namespaces (<reason>)" and
# exits 0; any other failure exits non-zero.
#
# Environment:
#   ORCH_MH_BIN_DIR=DIR        use DIR/orchd and DIR/orch-worker instead of
#                              `cargo build -p orchestrator-server -p orchestrator-worker`
#   ORCH_MH_KEEP_LOGS=DIR      keep the logs (and the final jobs.json) in DIR
#   ORCH_MH_SIMULATE_NO_NETNS=1  take the SKIPPED path (to test it)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

JOBS=6                 # jobs submitted
JOB_SECONDS=3          # each sleeps this long
LEASE=3s               # worker lease; orchd's sweeper runs every second
HEARTBEAT=500ms        # worker lease renewal (< LEASE)
AMQP_HEARTBEAT=5       # broker-side heartbeat: a cut worker's connection is closed
#                        (and its prefetched messages requeued) after ~2 missed beats
START_TIMEOUT=120      # seconds for RabbitMQ / orchd / workers to come up
RUN_TIMEOUT=90         # seconds for every job to be terminal after the cut
RMQ_BIN=/usr/lib/rabbitmq/bin

T0=${EPOCHREALTIME/./}
elapsed() {
  local us=$((${EPOCHREALTIME/./} - T0))
  printf '%d.%d' $((us / 1000000)) $((us % 1000000 / 100000))
}
log() { echo "[multihost +$(elapsed)s] $*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
skip() {
  echo "SKIPPED: multi-host test needs root and network namespaces ($*)"
  exit 0
}
rand_hex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }

# Nothing here goes through a proxy: every address is inside the namespaces.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY no_proxy NO_PROXY

# ---------------------------------------------------------------------------
# Can we create network namespaces at all?
# ---------------------------------------------------------------------------
[[ -z ${ORCH_MH_SIMULATE_NO_NETNS:-} ]] || skip "ORCH_MH_SIMULATE_NO_NETNS is set"
((EUID == 0)) || skip "not root: uid $EUID"

apt_install() {
  log "installing $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q </dev/null >&2
  apt-get install -y -q --no-install-recommends "$@" </dev/null >&2
}
if ! command -v ip >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 || die "no 'ip' command: install iproute2"
  apt_install iproute2
fi

ID=$(rand_hex 3)
MARK="ORCH_MH_OWNER=$ID"
NS_SW=orch-mh-$ID-sw
NS_DATA=orch-mh-$ID-data
NS_API=orch-mh-$ID-api
NS_W1=orch-mh-$ID-w1
NS_W2=orch-mh-$ID-w2
NET=10.213.$((RANDOM % 256))
DATA_IP=$NET.2
API_IP=$NET.3
W1_IP=$NET.11
W2_IP=$NET.12
W1_PREFIX=w1
W2_PREFIX=w2
TMP=
PIDS=()       # every process started, by PID
declare -A PID # and by name
CREATED_NS=()
FAILED_LOGS=1 # print the logs' tails if the run fails

# ---------------------------------------------------------------------------
# Cleanup: always, on success, failure, Ctrl-C or TERM.
# ---------------------------------------------------------------------------
alive() {
  local stat
  [[ ${1:-} =~ ^[0-9]+$ ]] || return 1
  read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != [ZX] ]]
}

# Live processes carrying our marker (everything started in a namespace).
marked_pids() {
  local p pid
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
    grep -qzxF -- "$MARK" "$p/environ" 2>/dev/null && alive "$pid" && echo "$pid"
  done
}

# Live processes of this run: those we started, those inside our namespaces,
# and any carrying our marker.
our_pids() {
  local pid ns
  {
    for pid in "${PIDS[@]}"; do if alive "$pid"; then echo "$pid"; fi; done
    for ns in "${CREATED_NS[@]}"; do ip netns pids "$ns" 2>/dev/null || true; done
    marked_pids
  } | sort -un
}

wait_gone() {
  local tenths=$1 pid any
  shift
  for _ in $(seq "$tenths"); do
    any=
    for pid in "$@"; do alive "$pid" && any=1; done
    [[ -z $any ]] && return 0
    sleep 0.1
  done
  return 1
}

# stop_pids TENTHS PID...: SIGTERM the live ones, SIGKILL those still alive
# after TENTHS tenths of a second.
stop_pids() {
  local tenths=$1 pid live=()
  shift
  for pid in "$@"; do if alive "$pid"; then live+=("$pid"); fi; done
  ((${#live[@]})) || return 0
  kill -TERM "${live[@]}" 2>/dev/null
  wait_gone "$tenths" "${live[@]}" && return 0
  log "still running $((tenths / 10))s after SIGTERM, killing:" \
    "$(ps -o pid=,args= -p "${live[*]}" | cut -c1-100 | tr -s ' \n' ' ')"
  kill -KILL "${live[@]}" 2>/dev/null
  wait_gone 50 "${live[@]}"
}

show_logs() {
  [[ -n $TMP && -d $TMP/logs ]] || return 0
  local f
  for f in "$TMP"/logs/* "$TMP/rabbitmq/log/${NODE:-none}.log"; do
    [[ -s $f ]] || continue
    echo "----- $(basename "$f") (last 25 lines) -----" >&2
    tail -n 25 "$f" >&2 || true
  done
}

cleanup() {
  local rc=$? pids pid ns left
  set +e
  trap - EXIT INT TERM HUP
  if ((rc != 0)) && [[ -n $FAILED_LOGS ]]; then show_logs; fi
  # Every namespace of this run, including one created just before a signal.
  mapfile -t CREATED_NS < <({
    printf '%s\n' "${CREATED_NS[@]}"
    ip netns list 2>/dev/null | awk '{ print $1 }' | grep -F "orch-mh-$ID-"
  } | grep . | sort -u)
  # The applications first (while Redis and RabbitMQ still answer), then
  # everything else; SIGKILL for whatever ignores SIGTERM for 5 seconds.
  stop_pids 50 "${PID[w1]:-}" "${PID[w2]:-}" "${PID[orchd]:-}"
  mapfile -t pids < <(our_pids)
  stop_pids 50 "${pids[@]}"
  mapfile -t pids < <(our_pids)
  stop_pids 50 "${pids[@]}"
  if [[ -n ${ORCH_MH_KEEP_LOGS:-} && -n $TMP && -d $TMP/logs ]]; then
    mkdir -p "$ORCH_MH_KEEP_LOGS" && cp -r "$TMP"/logs/. "$TMP/rabbitmq/log" "$ORCH_MH_KEEP_LOGS"/ &&
      { [[ ! -s $TMP/jobs.json ]] || cp "$TMP/jobs.json" "$ORCH_MH_KEEP_LOGS"/; } &&
      log "logs copied to $ORCH_MH_KEEP_LOGS"
  fi
  for pid in "${PIDS[@]}"; do alive "$pid" || wait "$pid" 2>/dev/null; done # reap
  for ns in "${CREATED_NS[@]}"; do ip netns del "$ns" 2>/dev/null; done
  [[ -n $TMP ]] && rm -rf "$TMP"
  # Verify.
  left=$(ip netns list 2>/dev/null | grep -F "orch-mh-$ID-" || true)
  if [[ -n $left ]]; then
    log "cleanup left namespaces behind: $left"
    rc=1
  fi
  mapfile -t pids < <(marked_pids)
  if ((${#pids[@]})); then
    log "cleanup left processes behind:"
    ps -o pid=,args= -p "${pids[*]}" >&2
    rc=1
  fi
  if ((${#CREATED_NS[@]})) && [[ -z $left ]] && ((${#pids[@]} == 0)); then
    log "cleaned up: no namespace, process or temp dir of run $ID left"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# The probe: the switch namespace is the first one we need anyway.
if ! err=$(ip netns add "$NS_SW" 2>&1); then
  skip "ip netns add failed: ${err//$'\n'/ }"
fi
CREATED_NS+=("$NS_SW")
if ! err=$(ip netns exec "$NS_SW" true 2>&1); then
  skip "ip netns exec failed: ${err//$'\n'/ }"
fi
log "run $ID: network namespaces work; subnet $NET.0/24"

# ---------------------------------------------------------------------------
# Dependencies and binaries
# ---------------------------------------------------------------------------
TMP=$(mktemp -d "/tmp/orch-mh-$ID.XXXXXX")
mkdir -p "$TMP/logs" "$TMP/redis" "$TMP/rabbitmq"

# run_fg CMD...: run CMD as a child and wait for it. Bash runs a trap only
# once the foreground command has ended; `wait` is interrupted at once, so
# Ctrl-C or TERM during a long step cleans up right away.
run_fg() {
  "$@" &
  local pid=$!
  PIDS+=("$pid")
  wait "$pid"
}

scripts/install-deps.sh
missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
((${#missing[@]} == 0)) || apt_install "${missing[@]}"

if [[ -n ${ORCH_MH_BIN_DIR:-} ]]; then
  ORCHD=$ORCH_MH_BIN_DIR/orchd
  WORKER=$ORCH_MH_BIN_DIR/orch-worker
else
  log "cargo build -p orchestrator-server -p orchestrator-worker"
  run_fg cargo build -q -p orchestrator-server -p orchestrator-worker \
    --message-format=json-render-diagnostics >"$TMP/build.json"
  exe() {
    python3 -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == name and m.get("executable"):
        print(m["executable"])
' "$1" <"$TMP/build.json" | tail -n 1
  }
  ORCHD=$(exe orchd)
  WORKER=$(exe orch-worker)
fi
[[ -x $ORCHD ]] || die "orchd binary not found (${ORCHD:-none})"
[[ -x $WORKER ]] || die "orch-worker binary not found (${WORKER:-none})"
log "binaries: $ORCHD, $WORKER"

# ---------------------------------------------------------------------------
# Topology
# ---------------------------------------------------------------------------
T_NET=${EPOCHREALTIME/./}
for ns in "$NS_DATA" "$NS_API" "$NS_W1" "$NS_W2"; do
  ip netns add "$ns"
  CREATED_NS+=("$ns")
done
ip -n "$NS_SW" link set lo up
ip -n "$NS_SW" link add br0 type bridge
ip -n "$NS_SW" link set br0 up
# plug NAMESPACE SHORTNAME ADDRESS: a veth from the bridge (p-SHORTNAME) to
# eth0 inside NAMESPACE. Created in the switch namespace, its peer moved
# straight into NAMESPACE: neither end ever exists in the host's namespace.
plug() {
  local ns=$1 short=$2 addr=$3
  ip -n "$NS_SW" link add "p-$short" type veth peer name eth0 netns "$ns"
  ip -n "$NS_SW" link set "p-$short" master br0
  ip -n "$NS_SW" link set "p-$short" up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$addr/24" dev eth0
  ip -n "$ns" link set eth0 up
}
plug "$NS_DATA" data "$DATA_IP"
plug "$NS_API" api "$API_IP"
plug "$NS_W1" w1 "$W1_IP"
plug "$NS_W2" w2 "$W2_IP"
log "topology up in $(((${EPOCHREALTIME/./} - T_NET) / 1000))ms: bridge in $NS_SW;" \
  "data=$DATA_IP api=$API_IP w1=$W1_IP w2=$W2_IP"

# nsrun NS CMD...: run CMD in namespace NS, marked as ours.
nsrun() {
  local ns=$1
  shift
  ip netns exec "$ns" env "$MARK" "$@"
}
# start NAME NS CMD...: start CMD in the background in NS, log to logs/NAME.log.
start() {
  local name=$1 ns=$2
  shift 2
  nsrun "$ns" "$@" </dev/null >>"$TMP/logs/$name.log" 2>&1 &
  PIDS+=($!)
  PID[$name]=$!
}
# tcp_open NS ADDR PORT: something accepts connections on ADDR:PORT, seen from NS.
tcp_open() {
  # shellcheck disable=SC2016 # expanded by the inner bash
  ip netns exec "$1" timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$2" "$3" 2>/dev/null
}
# wait_for WHAT PID SECONDS CMD...: poll CMD until it succeeds; fail if PID
# (the process being waited for) exits or time runs out.
wait_for() {
  local what=$1 pid=$2 secs=$3 deadline
  shift 3
  deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    alive "$pid" || die "$what exited during startup"
    ((SECONDS < deadline)) || die "$what not ready after ${secs}s"
    sleep 0.2
  done
}

# ---------------------------------------------------------------------------
# data: Redis and RabbitMQ
# ---------------------------------------------------------------------------
T_SVC=${EPOCHREALTIME/./}
start redis "$NS_DATA" redis-server --port 6379 --bind "$DATA_IP" --protected-mode no \
  --dir "$TMP/redis" --appendonly yes --appendfsync always --save "" \
  --daemonize no --logfile "" --set-proc-title no

QDIR=$TMP/rabbitmq
NODE=orchmh-$ID@localhost
AMQP_PASS=$(rand_hex 12)
AMQP_URL="amqp://orch:$AMQP_PASS@$DATA_IP:5672/%2f"
mkdir -p "$QDIR/home" "$QDIR/mnesia" "$QDIR/log" "$QDIR/conf.d"
rand_hex 24 >"$QDIR/home/.erlang.cookie"
chmod 400 "$QDIR/home/.erlang.cookie"
: >"$QDIR/rabbitmq-env.conf"
echo '[].' >"$QDIR/enabled_plugins"
# "localhost" (the node's host name) resolves to the data namespace's own
# loopback inside Erlang, whatever /etc/hosts says.
printf '%s\n' '{host, {127,0,0,1}, ["localhost"]}.' '{lookup, [file, native]}.' >"$QDIR/inetrc"
# AMQP on the data address only. Our own user instead of guest (guest may
# only log in over loopback). A short heartbeat, so that the broker closes
# the cut worker's connection (requeueing what it had prefetched) quickly.
cat >"$QDIR/rabbitmq.conf" <<CONF
listeners.tcp.default = $DATA_IP:5672
default_user = orch
default_pass = $AMQP_PASS
default_vhost = /
loopback_users = none
heartbeat = $AMQP_HEARTBEAT
disk_free_limit.absolute = 50MB
CONF

# Environment shared by the node and rabbitmqctl, with nothing inherited
# that could point at a system node.
rmq_env() {
  local v
  for v in $(compgen -e); do
    case $v in RABBITMQ_* | ERL_* | NOTIFY_SOCKET) unset "$v" ;; esac
  done
  export HOME=$QDIR/home LC_ALL=C.UTF-8
  export ERL_EPMD_PORT=4369 ERL_EPMD_ADDRESS=127.0.0.1
  export ERL_CRASH_DUMP=$QDIR/log/erl_crash.dump
  export ERL_INETRC=$QDIR/inetrc
  export RABBITMQ_NODENAME=$NODE
  export RABBITMQ_NODE_IP_ADDRESS=$DATA_IP
  export RABBITMQ_NODE_PORT=5672
  export RABBITMQ_DIST_PORT=25672
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  export RABBITMQ_MNESIA_BASE=$QDIR/mnesia
  export RABBITMQ_LOG_BASE=$QDIR/log
  export RABBITMQ_PID_FILE=$QDIR/rabbitmq.pid
  export RABBITMQ_CONFIG_FILE=$QDIR/rabbitmq.conf
  export RABBITMQ_CONFIG_FILES="$QDIR/conf.d/*.conf"
  export RABBITMQ_ADVANCED_CONFIG_FILE=$QDIR/advanced.config
  export RABBITMQ_CONF_ENV_FILE=$QDIR/rabbitmq-env.conf
  export RABBITMQ_ENABLED_PLUGINS_FILE=$QDIR/enabled_plugins
}
ctl() { (
  rmq_env
  cd "$QDIR"
  nsrun "$NS_DATA" "$RMQ_BIN/rabbitmqctl" -n "$NODE" "$@"
); }

# The node's own epmd (on the data namespace's loopback), in the foreground
# so that its PID is ours; then the node, exec'ing the VM (detached=true).
(
  rmq_env
  cd "$QDIR"
  start epmd "$NS_DATA" epmd -port 4369 -address 127.0.0.1
  echo "$!" >"$QDIR/epmd.pid"
)
wait_for epmd "$(<"$QDIR/epmd.pid")" 10 tcp_open "$NS_DATA" 127.0.0.1 4369
(
  rmq_env
  cd "$QDIR"
  export detached=true
  start rabbitmq "$NS_DATA" "$RMQ_BIN/rabbitmq-server"
  echo "$!" >"$QDIR/server.pid"
)
PIDS+=("$(<"$QDIR/epmd.pid")" "$(<"$QDIR/server.pid")")

redis_ready() { [[ $(ip netns exec "$NS_DATA" redis-cli -h "$DATA_IP" -p 6379 ping 2>/dev/null) == PONG ]]; }
wait_for redis "${PID[redis]}" 30 redis_ready
log "redis up on $DATA_IP:6379 (AOF on) in $(((${EPOCHREALTIME/./} - T_SVC) / 1000))ms"

rabbit_ready() {
  tcp_open "$NS_DATA" "$DATA_IP" 5672 && ctl -q --timeout 60 await_startup
}
wait_for rabbitmq "$(<"$QDIR/server.pid")" "$START_TIMEOUT" rabbit_ready
log "rabbitmq up on $DATA_IP:5672, node $NODE, in $(((${EPOCHREALTIME/./} - T_SVC) / 1000))ms"

# ---------------------------------------------------------------------------
# api: orchd; w1, w2: one worker each
# ---------------------------------------------------------------------------
T_APP=${EPOCHREALTIME/./}
# Real credentials, as in production (orchd refuses a non-loopback address
# without them): a client token for this script's calls, a worker token for
# the workers. Tokens travel in the environment, never on a command line.
CLIENT_TOKEN=$("$ORCHD" token new mh-client --role client 2>>"$TMP/tokens")
WORKER_TOKEN=$("$ORCHD" token new mh-worker --role worker 2>>"$TMP/tokens")
export ORCH_TOKEN=$CLIENT_TOKEN
start orchd "$NS_API" env RUST_LOG=info REDIS_URL="redis://$DATA_IP:6379/" AMQP_URL="$AMQP_URL" \
  ORCH_TOKENS_FILE="$TMP/tokens" \
  "$ORCHD" serve --grpc-addr "$API_IP:50051" --http-addr "$API_IP:8000" --lease "$LEASE"
BASE=http://$API_IP:8000
orchd_healthy() {
  [[ $(ip netns exec "$NS_API" curl -s -o /dev/null -w '%{http_code}' --noproxy '*' -m 2 "$BASE/healthz") == 200 ]]
}
wait_for orchd "${PID[orchd]}" "$START_TIMEOUT" orchd_healthy
log "orchd healthy at $BASE (gRPC $API_IP:50051) in $(((${EPOCHREALTIME/./} - T_APP) / 1000))ms"

for w in 1 2; do
  ns_var=NS_W$w prefix_var=W${w}_PREFIX
  start "w$w" "${!ns_var}" env RUST_LOG=info ORCH_TOKEN="$WORKER_TOKEN" "$WORKER" --server "http://$API_IP:50051" \
    --amqp-url "$AMQP_URL" --queues default --concurrency 1 --lease "$LEASE" \
    --heartbeat-interval "$HEARTBEAT" --drain-timeout 2s --worker-id "${!prefix_var}"
done
# Both workers consume (RabbitMQ counts 2 consumers on the queue) before
# any job is submitted, so that both get work.
consumers() {
  ctl -q --no-table-headers list_queues name consumers 2>/dev/null |
    awk '$1 == "orch.q.default.default" { print $2 }'
}
deadline=$((SECONDS + START_TIMEOUT))
until [[ $(consumers) == 2 ]]; do
  alive "${PID[w1]}" || die "worker w1 exited during startup"
  alive "${PID[w2]}" || die "worker w2 exited during startup"
  ((SECONDS < deadline)) || die "the workers did not both consume within ${START_TIMEOUT}s (consumers: $(consumers))"
  sleep 0.3
done
log "workers w1 ($W1_IP) and w2 ($W2_IP) consuming orch.q.default.default in $(((${EPOCHREALTIME/./} - T_APP) / 1000))ms"

# ---------------------------------------------------------------------------
# The scenario
# ---------------------------------------------------------------------------
api_py() { ip netns exec "$NS_API" python3 "$ROOT/scripts/multihost/jobs.py" "$@"; }
ids=()
for _ in $(seq "$JOBS"); do
  body=$(ip netns exec "$NS_API" curl -sS --fail-with-body --noproxy '*' -m 5 -X POST \
    -H 'content-type: application/json' -H "Authorization: Bearer $CLIENT_TOKEN" \
    -d "{\"kind\":\"sleep\",\"payload\":{\"seconds\":$JOB_SECONDS}}" "$BASE/jobs") ||
    die "POST /jobs failed: $body"
  id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])' <<<"$body") ||
    die "no job id in: $body"
  ids+=("$id")
done
log "submitted $JOBS jobs (sleep ${JOB_SECONDS}s each) from the api namespace: ${ids[*]}"

run_fg api_py wait-running "$BASE" "$W1_PREFIX" 60 "${ids[@]}" >"$TMP/victim" ||
  die "no job started on w1"
ip -n "$NS_SW" link set p-w1 down
CUT_EPOCH=$EPOCHREALTIME
read -r VICTIM victim_attempt victim_worker <"$TMP/victim"
log "job $VICTIM RUNNING on $victim_worker (attempt $victim_attempt): cut w1's link (p-w1 down on the bridge)"
read -r st at wk < <(api_py show "$BASE" "$VICTIM") || die "GET /jobs/$VICTIM failed"
log "right after the cut, $VICTIM is $st (attempt $at, worker $wk)"
[[ $st == RUNNING && $wk == "$victim_worker" ]] ||
  die "the job was no longer running on w1 when its link went down (race: job too short?)"

T_RUN=${EPOCHREALTIME/./}
run_fg api_py wait-terminal "$BASE" "$RUN_TIMEOUT" "$TMP/jobs.json" "${ids[@]}" ||
  die "jobs did not all finish within ${RUN_TIMEOUT}s of the cut"
log "all jobs terminal $(((${EPOCHREALTIME/./} - T_RUN) / 1000))ms after the cut"
alive "${PID[w1]}" || log "note: w1's process exited while cut off"

if api_py check "$TMP/jobs.json" "$VICTIM" "$W1_PREFIX" "$W2_PREFIX" "$CUT_EPOCH"; then
  FAILED_LOGS=
  log "multi-host test PASSED in $(elapsed)s (cleanup follows)"
else
  die "multi-host test FAILED"
fi
