#!/usr/bin/env bash
# Benchmark the orchestrator (orchd serve + orch-worker on Redis + RabbitMQ)
# side by side with the Celery reference and the raw broker, on the SAME
# Redis and RabbitMQ, and write BENCHMARKS.md from the figures of this run.
#
#   bench/run.sh                     # everything (~10-15 min on 2 cores, most of it the release build)
#   RUN_CELERY=0 RUN_RAW=0 bench/run.sh
#   N=2000 LATENCY_N=100 OUT=/tmp/b.md bench/run.sh
#   SCENARIOS=grpc-cancel RUN_CELERY=0 RUN_RAW=0 OUT=/tmp/b.md bench/run.sh   # one scenario
#
# Steps: copy the reference benchmark ($REF_SRC, read-only) to $REF; start
# its Redis (127.0.0.1:6390) and RabbitMQ (127.0.0.1:5690) unless they run
# already; build the release binaries; start `orchd serve` and $WORKERS
# `orch-worker`s consuming a fresh queue bench-<random>; run the scenarios
# with `orchctl bench -o json`; record the RSS of orchd and the workers
# during the throughput run; stop them; run Celery (RUN_CELERY=1) and the
# raw lapin client (RUN_RAW=1); write $OUT with bench/report.py (a run
# with fewer SCENARIOS writes a report with those rows "not run"). Every
# process started here is stopped on exit (by PID), the services only if
# this script started them.
#
# Settings (environment):
#   N=10000              jobs per throughput run (Celery gets the same -n)
#   LATENCY_N=500        jobs of the one-at-a-time latency runs
#   CANCEL_N=100         running `sleep` jobs cancelled one at a time (cancellation latency)
#   SCALE_SIZES="1000 10000 100000"  jobs stored before each "scale" measurement
#   SCALE_N=3000 SCALE_LATENCY_N=100 jobs of the scale throughput / latency runs
#   SCENARIOS="grpc-throughput rest-throughput grpc-batch grpc-latency grpc-cancel latency-floor scale"
#                        which scenarios to run (latency-floor: each hop under one job
#                        timed alone by examples/latency_floor.rs, FLOOR_N=1000 samples each)
#   CONCURRENCY=64       submit calls in flight (orchctl bench --concurrency)
#   BATCH=100            jobs per SubmitJobs call in the batch scenario
#   BATCH_CONCURRENCY=8  SubmitJobs calls in flight
#   WARMUP=500           jobs run through before each measurement (as Celery's warm-up)
#   WORKERS=2            orch-worker processes
#   WORKER_CONCURRENCY=128 jobs each worker runs at once (and its prefetch): noop jobs
#                        spend their time waiting on orchd, so more of them overlap; and
#                        workers that keep up leave RabbitMQ's queue near empty, where it
#                        hands messages straight to consumers instead of paging them to
#                        disk (RabbitMQ CPU 69% -> 44% at 32 -> 128, bench/HISTORY.md)
#   WORKER_ARGS=         extra orch-worker flags, e.g. "--cancel-push=false" to
#                        measure cancellation by the heartbeat poll alone
#   REPEAT=3             runs of each scenario measured against the references
#                        (gRPC, REST and batched throughput, one-at-a-time latency),
#                        of each Celery pool and of the raw broker; the report shows
#                        the median of each figure over the runs, as the reference's
#                        own numbers are medians of 3
#   RUN_CELERY=1         also run the Celery reference (threads c=8, prefork c=2)
#   RUN_RAW=1            also run the raw RabbitMQ ceiling (lapin)
#   GRPC_PORT=50551 HTTP_PORT=8551   where orchd listens (loopback)
#   REF_SRC=<repo>/../shared/bench  REF=/tmp/orch-bench-ref
#   BENCH_TMP=/tmp/orch-bench-services   data of the Redis/RabbitMQ started here
#   RESULTS=target/bench-results/<time>  JSON and logs of this run
#   OUT=BENCHMARKS.md
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TS=$(date +%Y%m%d-%H%M%S)
N=${N:-10000}
LATENCY_N=${LATENCY_N:-500}
CANCEL_N=${CANCEL_N:-100}
SCENARIOS=${SCENARIOS:-grpc-throughput rest-throughput grpc-batch grpc-latency grpc-cancel latency-floor scale}
FLOOR_N=${FLOOR_N:-1000}
CONCURRENCY=${CONCURRENCY:-64}
SCALE_SIZES=${SCALE_SIZES:-1000 10000 100000}
SCALE_N=${SCALE_N:-3000}
SCALE_LATENCY_N=${SCALE_LATENCY_N:-100}
BATCH=${BATCH:-100}
BATCH_CONCURRENCY=${BATCH_CONCURRENCY:-8}
WARMUP=${WARMUP:-500}
REPEAT=${REPEAT:-3}
WORKERS=${WORKERS:-2}
WORKER_CONCURRENCY=${WORKER_CONCURRENCY:-128}
WORKER_ARGS=${WORKER_ARGS:-}
read -r -a WORKER_ARGV <<<"$WORKER_ARGS"
RUN_CELERY=${RUN_CELERY:-1}
RUN_RAW=${RUN_RAW:-1}
GRPC_PORT=${GRPC_PORT:-50551}
HTTP_PORT=${HTTP_PORT:-8551}
REF_SRC=${REF_SRC:-$(realpath -m "$ROOT/../shared/bench")}
REF=${REF:-/tmp/orch-bench-ref}
export BENCH_TMP=${BENCH_TMP:-/tmp/orch-bench-services}
RESULTS=${RESULTS:-$ROOT/target/bench-results/$TS}
OUT=${OUT:-$ROOT/BENCHMARKS.md}
PY=${PY:-/tmp/celery-venv/bin/python}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET/release

REDIS_URL=redis://127.0.0.1:6390/1 # Celery flushes db 0; orchd keeps to db 1
AMQP_URL='amqp://guest:guest@127.0.0.1:5690/%2f'
GRPC=http://127.0.0.1:$GRPC_PORT
REST=http://127.0.0.1:$HTTP_PORT
QUEUE=bench-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')

log() { echo "[bench $(date +%H:%M:%S)] $*" >&2; }
die() {
  log "$*"
  exit 1
}

mkdir -p "$RESULTS"
log "results in $RESULTS"

# --- cleanup: only what this script started --------------------------------
PIDS=()
SAMPLER=
services_started=0
cleanup() {
  local status=$?
  set +e
  [[ -n $SAMPLER ]] && kill "$SAMPLER" 2>/dev/null
  stop_stack
  if [[ $services_started == 1 ]]; then
    log "stopping Redis and RabbitMQ"
    "$REF/services.sh" stop >>"$RESULTS/services.log" 2>&1
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

stop_stack() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  PIDS=()
  return 0
}

# --- the reference benchmark and the services -------------------------------
[[ -d $REF_SRC ]] || die "no reference benchmark at $REF_SRC (set REF_SRC)"
rm -rf "$REF"
cp -r "$REF_SRC" "$REF"
chmod -R u+w "$REF"
if "$REF/services.sh" status 2>/dev/null | grep -q '^rabbitmq running' &&
  "$REF/services.sh" status 2>/dev/null | grep -q '^redis    running'; then
  log "Redis and RabbitMQ already run under $BENCH_TMP; using them"
else
  log "starting Redis 127.0.0.1:6390 and RabbitMQ 127.0.0.1:5690 ($BENCH_TMP)"
  services_started=1
  "$REF/services.sh" start 2>&1 | tee -a "$RESULTS/services.log" >&2
fi

# --- machine ------------------------------------------------------------------
{
  echo "date=$(date -Is)"
  echo "nproc=$(nproc)"
  echo "mem=$(free -h | awk '/^Mem:/ {print $2}')"
  echo "uname=$(uname -srm)"
  echo "cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)"
  echo "rustc=$(rustc --version 2>/dev/null)"
  echo "redis=$(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')"
  echo "rabbitmq=$(dpkg-query -W -f '${Version}' rabbitmq-server 2>/dev/null)"
  echo "erlang=$(dpkg-query -W -f '${Version}' erlang-base 2>/dev/null)"
  echo "commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo '+changes')"
  echo "load_start=$(cut -d' ' -f1-3 /proc/loadavg)"
  echo "n=$N latency_n=$LATENCY_N cancel_n=$CANCEL_N concurrency=$CONCURRENCY batch=$BATCH batch_concurrency=$BATCH_CONCURRENCY warmup=$WARMUP repeat=$REPEAT"
  echo "workers=$WORKERS worker_concurrency=$WORKER_CONCURRENCY"
  echo "worker_args=$WORKER_ARGS"
} >"$RESULTS/machine.env"

# --- build ----------------------------------------------------------------------
log "building release binaries (several minutes on 2 cores)"
(cd "$ROOT" && cargo build --release -p orchestrator-server -p orchestrator-worker -p orchestrator-cli &&
  cargo build --release -p orchestrator --example latency_floor) \
  >"$RESULTS/build.log" 2>&1 || {
  tail -30 "$RESULTS/build.log" >&2
  die "release build failed; see $RESULTS/build.log"
}

# --- orchd and the workers ------------------------------------------------------
for port in "$GRPC_PORT" "$HTTP_PORT"; do
  if ss -Hltn "sport = :$port" | grep -q .; then die "port $port is taken; set GRPC_PORT/HTTP_PORT"; fi
done
export RUST_LOG=${RUST_LOG:-warn} # as Celery's --loglevel=warning
# --submit-rate off: the run measures orchd's throughput, not the per-token
# submit limit (1000/s by default, which the batched scenario exceeds).
# Starts orchd (Redis key prefix $1) and the workers.
start_stack() {
  PREFIX=$1
  log "starting orchd serve on $GRPC / $REST (Redis prefix $PREFIX)"
  "$BIN/orchd" serve --grpc-addr "127.0.0.1:$GRPC_PORT" --http-addr "127.0.0.1:$HTTP_PORT" \
    --redis-url "$REDIS_URL" --amqp-url "$AMQP_URL" --redis-prefix "$PREFIX" \
    --submit-rate off \
    >>"$RESULTS/orchd.log" 2>&1 &
  ORCHD=$!
  PIDS+=("$ORCHD")
  for _ in $(seq 1 300); do
    curl -fsS "$REST/healthz" >/dev/null 2>&1 && break
    kill -0 "$ORCHD" 2>/dev/null || die "orchd exited; see $RESULTS/orchd.log"
    sleep 0.2
  done
  curl -fsS "$REST/healthz" >/dev/null || die "orchd not healthy after 60 s; see $RESULTS/orchd.log"

  WORKER_PIDS=()
  for i in $(seq 1 "$WORKERS"); do
    "$BIN/orch-worker" --server "$GRPC" --amqp-url "$AMQP_URL" --queues "$QUEUE" \
      --concurrency "$WORKER_CONCURRENCY" --worker-id "bench-w$i" "${WORKER_ARGV[@]}" \
      >>"$RESULTS/worker-$i.log" 2>&1 &
    WORKER_PIDS+=("$!")
    PIDS+=("$!")
  done
  log "orchd pid $ORCHD, workers ${WORKER_PIDS[*]} on queue $QUEUE (concurrency $WORKER_CONCURRENCY each)"
}
start_stack "orchbench-$TS:"

rss_kib() { ps -o rss= -p "$1" 2>/dev/null | tr -d ' ' || true; }
rss_line() {
  local line pid
  line="$(date +%s.%N) $(rss_kib "$ORCHD")"
  for pid in "${WORKER_PIDS[@]}"; do line+=" $(rss_kib "$pid")"; done
  echo "$line"
}

orchctl() { "$BIN/orchctl" --server "$GRPC" "$@"; }

# One scenario: `orchctl -o json bench ARGS` into $RESULTS/NAME$RUN.json; a
# failed check is reported but does not stop the other scenarios. Scenarios
# not in $SCENARIOS are skipped.
RUN=
wanted() { [[ " $SCENARIOS " == *" $1 "* ]]; }
scenario() {
  local name=$1
  shift
  wanted "$name" || {
    log "scenario $name skipped (not in SCENARIOS)"
    return 0
  }
  log "scenario $name$RUN: orchctl bench $*"
  local rc=0 file=$RESULTS/$name$RUN
  orchctl -o json bench --queue "$QUEUE" "$@" >"$file.json" 2>"$file.err" || rc=$?
  [[ $rc == 0 ]] || log "scenario $name$RUN exited $rc: $(tail -1 "$file.err")"
  python3 - "$file.json" <<'PY' >&2 || true
import json, sys
r = json.load(open(sys.argv[1]))
if r["mode"] == "cancel":
    lat = r.get("cancel_latency_ms") or {}
    print(f"  cancelled {r['cancelled']}/{r['jobs']} exactly_once={r['exactly_once']} "
          f"cancel p50 {lat.get('p50', float('nan')):.2f} p99 {lat.get('p99', float('nan')):.2f} "
          f"max {lat.get('max', float('nan')):.2f} ms")
    sys.exit(0)
lat = r.get("client_latency_ms") or r.get("latency_ms") or {}
print(f"  completed {r['completed']}/{r['jobs']} exactly_once={r['exactly_once']} "
      f"submit {r['submit_rate']:.0f}/s e2e {r['e2e_rate']:.0f}/s "
      f"p50 {lat.get('p50', float('nan')):.2f} p99 {lat.get('p99', float('nan')):.2f} ms")
PY
}

# $REPEAT runs of one scenario, into NAME-run1.json, NAME-run2.json, ...
repeated() {
  local r
  for r in $(seq 1 "$REPEAT"); do
    RUN=-run$r scenario "$@"
  done
}

# Warm the queue and the connections once (the scenarios warm up again).
orchctl bench --queue "$QUEUE" -n 50 --timeout 60s >/dev/null 2>"$RESULTS/first.err" ||
  die "the first jobs did not complete: $(tail -1 "$RESULTS/first.err")"
rss_line >"$RESULTS/rss-idle.txt"

if wanted grpc-throughput; then
  rss_line >"$RESULTS/rss-throughput.txt"
  (while sleep 0.25; do rss_line; done) >>"$RESULTS/rss-throughput.txt" &
  SAMPLER=$!
fi
repeated grpc-throughput -n "$N" --concurrency "$CONCURRENCY" --warmup "$WARMUP"
if [[ -n $SAMPLER ]]; then
  kill "$SAMPLER" 2>/dev/null || true
  wait "$SAMPLER" 2>/dev/null || true
  SAMPLER=
fi

repeated rest-throughput -n "$N" --concurrency "$CONCURRENCY" --warmup "$WARMUP" --rest "$REST"
repeated grpc-batch -n "$N" --batch "$BATCH" --concurrency "$BATCH_CONCURRENCY" --warmup "$WARMUP"
repeated grpc-latency --latency "$LATENCY_N" --warmup 50
# Running `sleep` jobs (300 s) cancelled one at a time: CancelJob -> CANCELLED.
scenario grpc-cancel --cancel "$CANCEL_N" --warmup 5
# The hops under one job, each timed alone on the same servers and orchd.
if wanted latency-floor; then
  log "latency floor: RabbitMQ publish -> delivery, gRPC and Redis round trips ($FLOOR_N each)"
  AMQP_URL=$AMQP_URL REDIS_URL=$REDIS_URL ORCH_SERVER=$GRPC N=$FLOOR_N "$BIN/examples/latency_floor" \
    >"$RESULTS/latency-floor.json" 2>"$RESULTS/latency-floor.err" ||
    log "latency floor failed: $(tail -1 "$RESULTS/latency-floor.err")"
fi

# --- How cost grows with what is stored -----------------------------------------
# Grow the store to each of $SCALE_SIZES jobs (SubmitJobs batches of 1000 on
# a queue no worker consumes, so they stay CREATED), wait until the
# dispatcher has published them all, then run a short throughput and
# latency scenario and time ListJobs pages (the newest 100; the newest 100
# CREATED; the newest 100 of the stored queue), median of 20 calls each.
STORED_QUEUE=$QUEUE-stored
batch_body() {
  python3 -c "import json,sys; print(json.dumps({'jobs': [{'kind': 'noop', 'queue': sys.argv[1]}] * 1000}))" "$STORED_QUEUE"
}
stored=0
if wanted scale; then
  # A fresh key prefix, so that "stored" counts only what is grown here.
  stop_stack
  start_stack "orchbench-$TS-scale:"
  body=$(batch_body)
  for size in $SCALE_SIZES; do
    log "scale: growing the store to $size jobs"
    while ((stored + 1000 <= size)); do
      curl -fsS -o /dev/null -X POST "$REST/jobs:batchSubmit" -H 'content-type: application/json' -d "$body" ||
        die "batch submit failed while growing the store"
      stored=$((stored + 1000))
    done
    for _ in $(seq 1 600); do
      due=$(redis-cli -p 6390 -n 1 ZCARD "${PREFIX}due" 2>/dev/null || echo 0)
      [[ $due == 0 ]] && break
      sleep 0.5
    done
    SCENARIOS="$SCENARIOS scale-$size-throughput scale-$size-latency"
    scenario "scale-$size-throughput" -n "$SCALE_N" --concurrency "$CONCURRENCY" --warmup 200
    scenario "scale-$size-latency" --latency "$SCALE_LATENCY_N" --warmup 20
    python3 - "$REST" "$STORED_QUEUE" "$stored" >"$RESULTS/scale-$size-list.json" <<'PY' || log "list timing failed"
import json, statistics, sys, time, urllib.request
rest, queue, stored = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = {"stored": stored}
for name, path in (("newest", "/jobs?pageSize=100"), ("created", "/jobs?state=CREATED&pageSize=100"),
                   ("queue", f"/jobs?queue={queue}&pageSize=100")):
    times = []
    for _ in range(20):
        t = time.perf_counter()
        with urllib.request.urlopen(rest + path) as r:
            n = len(json.load(r)["jobs"])
        times.append((time.perf_counter() - t) * 1000)
    out[name] = {"jobs": n, "median_ms": statistics.median(times), "max_ms": max(times)}
print(json.dumps(out))
PY
  done
fi
rss_line >"$RESULTS/rss-end.txt"
log "stopping orchd and the workers"
stop_stack

# --- Celery and the raw broker, same Redis and RabbitMQ -------------------------
celery_filter() { grep -v -e SecurityWarning -e superuser -e 'uid option' -e '^$' || true; }
if [[ $RUN_CELERY == 1 ]]; then
  if [[ ! -x $PY ]]; then
    log "creating the Celery venv $(dirname "$(dirname "$PY")") from $REF/requirements.txt"
    python3 -m venv "$(dirname "$(dirname "$PY")")"
    "$PY" -m pip install -q -r "$REF/requirements.txt"
  fi
  for pool in "threads 8" "prefork 2"; do
    read -r kind conc <<<"$pool"
    log "Celery $kind c=$conc (-n $N, latency $LATENCY_N, $REPEAT runs)"
    (cd "$REF/celery" && "$PY" run_bench.py --pool "$kind" --concurrency "$conc" -n "$N" \
      --latency-n "$LATENCY_N" --repeat "$REPEAT" --skip-drain \
      --out "$RESULTS/celery-$kind-c$conc.json") 2>&1 | celery_filter | tee -a "$RESULTS/celery.log" >&2 ||
      log "Celery $kind run failed"
  done
fi
if [[ $RUN_RAW == 1 ]]; then
  export CARGO_TARGET_DIR=/tmp/amqp-rate-rs-target
  log "raw RabbitMQ with lapin ($REPEAT runs)"
  if (cd "$REF/raw/amqp_rate_rs" && cargo build --release -q) >"$RESULTS/amqp-build.log" 2>&1; then
    "$CARGO_TARGET_DIR/release/amqp_rate_rs" --url "$AMQP_URL" --repeat "$REPEAT" \
      --out "$RESULTS/amqp-lapin.json" 2>&1 | tee -a "$RESULTS/amqp.log" >&2 ||
      log "raw AMQP run failed"
  else
    log "cannot build the lapin client; see $RESULTS/amqp-build.log"
  fi
  unset CARGO_TARGET_DIR
fi
echo "load_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$RESULTS/machine.env"
echo "date_end=$(date -Is)" >>"$RESULTS/machine.env"

python3 "$ROOT/bench/report.py" "$RESULTS" >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
log "wrote $OUT"
