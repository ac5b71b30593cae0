#!/usr/bin/env bash
# Shared Redis + RabbitMQ for a test run (used by scripts/test.sh).
#
#   scripts/services.sh start    start both on free 127.0.0.1 ports, wait until
#                                they answer, write $ORCH_SERVICES_DIR/env
#   scripts/services.sh stop     stop exactly the processes `start` started
#                                (Redis, the RabbitMQ node, its epmd); safe to
#                                call twice
#   scripts/services.sh env      print the env file:
#                                  export ORCH_TEST_REDIS_URL=redis://127.0.0.1:P/
#                                  export ORCH_TEST_AMQP_URL=amqp://guest:guest@127.0.0.1:P/%2f
#   scripts/services.sh status   show what runs
#   scripts/services.sh ctl ARGS run rabbitmqctl against the node
#
# State lives in $ORCH_SERVICES_DIR (default /tmp/orch-test-services).
# Nothing system-wide is used or touched: Redis has no persistence, the
# RabbitMQ node has its own name, ports, epmd, cookie, Mnesia dir and config
# (no /etc/rabbitmq, no plugins). Every process started here carries
# ORCH_SERVICES_OWNER=$ORCH_SERVICES_DIR in its environment (inherited by
# the node's helpers), and `stop` signals only processes with that marker.
# The orchestrator-testkit crate (testkit/) starts the same kind of servers
# from Rust; keep the two in step.
set -euo pipefail

DIR=$(realpath -m "${ORCH_SERVICES_DIR:-/tmp/orch-test-services}")
RDIR=$DIR/redis
QDIR=$DIR/rabbitmq
ENV_FILE=$DIR/env
PORTS_FILE=$DIR/ports
RMQ_BIN=/usr/lib/rabbitmq/bin # the real scripts; /usr/sbin/* would `su rabbitmq`
MARK="ORCH_SERVICES_OWNER=$DIR"
RABBIT_TIMEOUT=120
REDIS_TIMEOUT=30

log() { echo "[services] $*" >&2; }
die() {
  log "$*"
  exit 1
}

need() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v redis-cli >/dev/null || missing+=(redis-cli)
  [[ -x $RMQ_BIN/rabbitmq-server ]] || missing+=("$RMQ_BIN/rabbitmq-server")
  command -v epmd >/dev/null || missing+=(epmd)
  command -v ss >/dev/null || missing+=(ss)
  command -v setsid >/dev/null || missing+=(setsid)
  ((${#missing[@]} == 0)) || die "missing ${missing[*]}: run scripts/install-deps.sh"
}

port_in_use() { ss -Hltn "sport = :$1" | grep -q .; }

# Random free ports below the kernel's ephemeral range (32768+), distinct
# from each other. Sets the named variables.
pick_ports() {
  local name p taken=" "
  for name in "$@"; do
    for _ in $(seq 500); do
      p=$((20000 + RANDOM % 12000))
      [[ $taken == *" $p "* ]] && continue
      port_in_use "$p" || break
    done
    port_in_use "$p" && die "no free port found"
    taken+="$p "
    printf -v "$name" '%s' "$p"
  done
}

# alive PID: the process exists and is not a zombie.
alive() {
  local stat
  [[ ${1:-} =~ ^[0-9]+$ ]] || return 1
  read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != [ZX] ]]
}

# ours PID: alive and started by this script for this state dir.
ours() { alive "$1" && grep -qzxF -- "$MARK" "/proc/$1/environ" 2>/dev/null; }

# All live processes carrying our marker.
our_pids() {
  local p pid
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
    if ours "$pid"; then echo "$pid"; fi
  done
}

pid_from() { [[ -s $1 ]] && cat "$1"; }

# Environment shared by rabbitmq-server and rabbitmqctl (same cookie, same
# epmd), with nothing inherited that could point at a system node.
rmq_env() {
  local v
  for v in $(compgen -e); do
    case $v in RABBITMQ_* | ERL_* | NOTIFY_SOCKET) unset "$v" ;; esac
  done
  export HOME=$QDIR/home LC_ALL=C.UTF-8
  export ERL_EPMD_PORT=$EPMD_PORT ERL_EPMD_ADDRESS=127.0.0.1
  export ERL_CRASH_DUMP=$QDIR/log/erl_crash.dump
  # Resolve "localhost" inside Erlang, even where /etc/hosts lacks it.
  export ERL_INETRC=$QDIR/inetrc
  export RABBITMQ_NODENAME=$NODE
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT=$AMQP_PORT
  export RABBITMQ_DIST_PORT=$DIST_PORT
  # Erlang distribution on loopback only (it listens on all interfaces otherwise).
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
  exec "$RMQ_BIN/rabbitmqctl" -n "$NODE" "$@"
); }

load_ports() {
  [[ -s $PORTS_FILE ]] || return 1
  # shellcheck source=/dev/null
  source "$PORTS_FILE"
}

start_redis() {
  mkdir -p "$RDIR"
  env "$MARK" setsid redis-server --port "$REDIS_PORT" --bind 127.0.0.1 \
    --protected-mode yes --dir "$RDIR" --appendonly no --save "" \
    --daemonize no --set-proc-title no --logfile "$RDIR/redis.log" \
    </dev/null >>"$RDIR/redis.out" 2>&1 &
  local pid=$! deadline=$((SECONDS + REDIS_TIMEOUT))
  until [[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; do
    if ! alive "$pid"; then
      tail -n 20 "$RDIR/redis.log" "$RDIR/redis.out" >&2 || true
      die "redis-server exited during startup"
    fi
    ((SECONDS < deadline)) || die "redis-server did not answer PING in ${REDIS_TIMEOUT}s"
    sleep 0.1
  done
  # The PID that answers (not a wrapper), for `status`.
  redis-cli -p "$REDIS_PORT" info server | sed -n 's/^process_id:\([0-9]*\).*/\1/p' >"$RDIR/redis.pid"
  log "redis up on 127.0.0.1:$REDIS_PORT (pid $(<"$RDIR/redis.pid"))"
}

start_rabbitmq() {
  mkdir -p "$QDIR/home" "$QDIR/mnesia" "$QDIR/log" "$QDIR/conf.d"
  head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$QDIR/home/.erlang.cookie"
  chmod 400 "$QDIR/home/.erlang.cookie"
  : >"$QDIR/rabbitmq-env.conf"
  printf '%s\n' '{host, {127,0,0,1}, ["localhost"]}.' '{lookup, [file, native]}.' >"$QDIR/inetrc"
  echo '[].' >"$QDIR/enabled_plugins"
  cat >"$QDIR/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$AMQP_PORT
disk_free_limit.absolute = 50MB
loopback_users.guest = true
CONF
  local start=$SECONDS
  # The node's own epmd, on a private loopback port, in the foreground so
  # that it is ours to stop.
  (
    rmq_env
    cd "$QDIR"
    exec env "$MARK" setsid epmd -port "$EPMD_PORT" -address 127.0.0.1
  ) </dev/null >>"$QDIR/log/epmd.out" 2>&1 &
  echo $! >"$QDIR/epmd.pid"
  for _ in $(seq 100); do
    port_in_use "$EPMD_PORT" && break
    sleep 0.1
  done
  port_in_use "$EPMD_PORT" || die "epmd did not listen on $EPMD_PORT"

  # detached=true makes the rabbitmq-server script exec the Erlang VM
  # instead of running it under a signal-forwarding shell.
  (
    rmq_env
    cd "$QDIR"
    exec env "$MARK" detached=true setsid "$RMQ_BIN/rabbitmq-server"
  ) </dev/null >>"$QDIR/log/startup.out" 2>&1 &
  local pid=$! deadline=$((SECONDS + RABBIT_TIMEOUT))
  echo "$pid" >"$QDIR/server.pid"
  while :; do
    if ! alive "$pid"; then
      tail -n 40 "$QDIR/log/$NODE.log" "$QDIR/log/startup.out" >&2 || true
      die "RabbitMQ node exited during startup"
    fi
    # The AMQP listener opens last; then confirm with the CLI.
    if port_in_use "$AMQP_PORT" && ctl -q --timeout 60 await_startup >>"$QDIR/log/ctl.out" 2>&1; then
      break
    fi
    if ((SECONDS >= deadline)); then
      tail -n 40 "$QDIR/log/$NODE.log" "$QDIR/log/startup.out" >&2 || true
      die "RabbitMQ node not ready after ${RABBIT_TIMEOUT}s"
    fi
    sleep 0.3
  done
  log "rabbitmq up on 127.0.0.1:$AMQP_PORT, node $NODE (pid $pid, epmd port $EPMD_PORT) in $((SECONDS - start))s"
}

write_env() {
  local tmp=$ENV_FILE.tmp
  {
    echo "# written by scripts/services.sh; source it"
    echo "export ORCH_TEST_REDIS_URL='redis://127.0.0.1:$REDIS_PORT/'"
    echo "export ORCH_TEST_AMQP_URL='amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f'"
  } >"$tmp"
  mv "$tmp" "$ENV_FILE"
}

all_up() {
  load_ports 2>/dev/null || return 1
  [[ -s $ENV_FILE ]] &&
    ours "$(pid_from "$RDIR/redis.pid")" &&
    ours "$(pid_from "$QDIR/server.pid")" &&
    ours "$(pid_from "$QDIR/epmd.pid")" &&
    [[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]] &&
    port_in_use "$AMQP_PORT"
}

cmd_start() {
  need
  if all_up; then
    log "already running ($DIR)"
    return 0
  fi
  cmd_stop # leftovers of an earlier run in the same dir
  mkdir -p "$DIR"
  rm -rf "$RDIR" "$QDIR" "$ENV_FILE" "$PORTS_FILE"
  # On any failure below, leave nothing running.
  trap 'rc=$?; if ((rc != 0)); then log "start failed, cleaning up"; cmd_stop; fi' EXIT
  pick_ports REDIS_PORT AMQP_PORT DIST_PORT EPMD_PORT
  NODE="orchtest-$(head -c 5 /dev/urandom | od -An -tx1 | tr -d ' \n')@localhost"
  printf 'REDIS_PORT=%s\nAMQP_PORT=%s\nDIST_PORT=%s\nEPMD_PORT=%s\nNODE=%s\n' \
    "$REDIS_PORT" "$AMQP_PORT" "$DIST_PORT" "$EPMD_PORT" "$NODE" >"$PORTS_FILE"
  start_redis
  start_rabbitmq
  write_env
  trap - EXIT
  log "env written to $ENV_FILE"
}

# wait_gone SECONDS PID...: true once none of the PIDs is alive.
wait_gone() {
  local t=$1 pid any
  shift
  for _ in $(seq $((t * 10))); do
    any=
    for pid in "$@"; do alive "$pid" && any=1; done
    [[ -z $any ]] && return 0
    sleep 0.1
  done
  return 1
}

cmd_stop() {
  local pid pids
  if load_ports 2>/dev/null; then
    pid=$(pid_from "$QDIR/server.pid" || true)
    if ours "$pid"; then
      log "stopping rabbitmq node $NODE"
      ctl stop >>"$QDIR/log/ctl.out" 2>&1 || log "rabbitmqctl stop failed; will kill"
      wait_gone 60 "$pid" || true
    fi
    pid=$(pid_from "$RDIR/redis.pid" || true)
    if ours "$pid"; then
      log "stopping redis on port $REDIS_PORT"
      redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
      wait_gone 10 "$pid" || true
    fi
  fi
  # Whatever of ours is left (epmd, helpers, anything that did not stop).
  mapfile -t pids < <(our_pids)
  if ((${#pids[@]})); then
    log "terminating ${#pids[@]} remaining process(es): ${pids[*]}"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    if ! wait_gone 10 "${pids[@]}"; then
      mapfile -t pids < <(our_pids)
      ((${#pids[@]} == 0)) || kill -KILL "${pids[@]}" 2>/dev/null || true
      wait_gone 5 "${pids[@]}" || log "processes still alive: ${pids[*]}"
    fi
  fi
  rm -f "$ENV_FILE" "$RDIR/redis.pid" "$QDIR/server.pid" "$QDIR/epmd.pid"
  log "stopped ($DIR)"
}

cmd_status() {
  if ! load_ports 2>/dev/null; then
    echo "not started ($DIR)"
    return 0
  fi
  local pid
  pid=$(pid_from "$RDIR/redis.pid" || true)
  if ours "$pid"; then echo "redis    running pid $pid port $REDIS_PORT"; else echo "redis    stopped"; fi
  pid=$(pid_from "$QDIR/server.pid" || true)
  if ours "$pid"; then echo "rabbitmq running pid $pid port $AMQP_PORT node $NODE"; else echo "rabbitmq stopped"; fi
  pid=$(pid_from "$QDIR/epmd.pid" || true)
  if ours "$pid"; then echo "epmd     running pid $pid port $EPMD_PORT"; else echo "epmd     stopped"; fi
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
env)
  [[ -s $ENV_FILE ]] || die "no $ENV_FILE: run '$0 start' first"
  cat "$ENV_FILE"
  ;;
status) cmd_status ;;
ctl)
  shift
  load_ports || die "not started"
  ctl "$@"
  ;;
*)
  echo "usage: $0 start|stop|env|status|ctl <rabbitmqctl args>" >&2
  exit 2
  ;;
esac
