#!/usr/bin/env bash
# Runs the fuzz targets of fuzz/ (REST submit body, AMQP dispatch) briefly:
#
#   scripts/fuzz.sh                      every target, ORCH_FUZZ_SECONDS each
#   scripts/fuzz.sh amqp_dispatch        one target
#
# With a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`), each
# target runs under libFuzzer for ORCH_FUZZ_SECONDS (default 30), built with
# debug assertions and overflow checks, starting from the committed seeds
# (fuzz/seeds/TARGET, never written) and a working corpus kept between runs
# in target/fuzz-corpus/TARGET. Without them (or with
# ORCH_FUZZ_MODE=stable), it says why and runs the fallback instead: the
# same target bodies on stable over the seeds and ORCH_FUZZ_ITERATIONS
# (default 200000) random mutations of them, as the `fuzz_corpus_replays`
# test of tests/wire_decoding.rs.
#
# A crash fails the script (exit 1). libFuzzer saves the input under
# fuzz/artifacts/TARGET/; reproduce it with
#   cargo +nightly fuzz run -s none TARGET fuzz/artifacts/TARGET/crash-...
# and, once fixed, copy it to fuzz/seeds/TARGET/ so the stable replay keeps
# checking it.
#
# Environment: ORCH_FUZZ_SECONDS (per target), ORCH_FUZZ_BUILD (release,
# the default, or dev: unoptimized, a much shorter cold build for brief
# runs, about a sixth of the inputs per second), ORCH_FUZZ_MODE (auto,
# cargo-fuzz: fail when cargo-fuzz cannot run, stable: fallback only),
# ORCH_FUZZ_ITERATIONS and ORCH_FUZZ_SEED (fallback), ORCH_FUZZ_SANITIZER
# (default none: the library forbids unsafe code, so panics and overflows are
# what there is to find, and ASan would double the build and run time).
# Prints one summary line per target and writes them to
# target/fuzz-results.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

TARGETS=(rest_submit_body amqp_dispatch)
SECONDS_PER_TARGET=${ORCH_FUZZ_SECONDS:-30}
MODE=${ORCH_FUZZ_MODE:-auto}
SANITIZER=${ORCH_FUZZ_SANITIZER:-none}
BUILD=${ORCH_FUZZ_BUILD:-release}
ITERATIONS=${ORCH_FUZZ_ITERATIONS:-200000}
RESULTS=target/fuzz-results.md

section() { printf '\n==> %s\n' "$*"; }
die() {
  printf '\nfuzz: FAILED: %s\n' "$*" >&2
  exit 1
}

[[ $SECONDS_PER_TARGET =~ ^[1-9][0-9]*$ ]] || die "ORCH_FUZZ_SECONDS must be a positive number of seconds, got '$SECONDS_PER_TARGET'"
[[ $ITERATIONS =~ ^[0-9]+$ ]] || die "ORCH_FUZZ_ITERATIONS must be a number, got '$ITERATIONS'"
case $MODE in auto | cargo-fuzz | stable) ;; *) die "ORCH_FUZZ_MODE must be auto, cargo-fuzz or stable, got '$MODE'" ;; esac
case $BUILD in release | dev) ;; *) die "ORCH_FUZZ_BUILD must be release or dev, got '$BUILD'" ;; esac
if (($# > 0)); then
  for t in "$@"; do
    [[ " ${TARGETS[*]} " == *" $t "* ]] || die "unknown target '$t' (one of: ${TARGETS[*]})"
  done
  TARGETS=("$@")
fi

# Sets CARGO_NIGHTLY to the cargo that runs cargo-fuzz, or REASON to why
# there is none.
CARGO_NIGHTLY=()
REASON=
detect_cargo_fuzz() {
  if [[ $(rustc --version 2>/dev/null) == *nightly* ]]; then
    CARGO_NIGHTLY=(cargo)
  elif command -v rustup >/dev/null && rustup run nightly rustc --version >/dev/null 2>&1; then
    CARGO_NIGHTLY=(cargo +nightly)
  else
    REASON="no nightly toolchain (libFuzzer's instrumentation needs one: rustup toolchain install nightly)"
    return
  fi
  if ! "${CARGO_NIGHTLY[@]}" fuzz --version >/dev/null 2>&1; then
    REASON="cargo-fuzz is not installed (cargo install cargo-fuzz)"
  fi
}

mkdir -p target
printf '| target | engine | inputs run | time | result |\n|---|---|---|---|---|\n' >"$RESULTS"

run_stable() {
  section "Fallback: the target bodies on stable, seeds + $ITERATIONS mutations per target"
  local log=target/fuzz-stable.log status=0
  ORCH_FUZZ_ITERATIONS=$ITERATIONS cargo test -p orchestrator --test wire_decoding \
    fuzz_corpus_replays -- --exact --nocapture 2>&1 | tee "$log" || status=$?
  local result=passed
  ((status == 0)) || result=FAILED
  for t in "${TARGETS[@]}"; do
    local line seeds="" secs=""
    line=$(grep -E "^$t: [0-9]+ seeds and" "$log" | tail -1 || true)
    if [[ -n $line ]]; then
      seeds=$(sed -E 's/^[^:]+: ([0-9]+) seeds.*/\1/' <<<"$line")
      secs=$(sed -E 's/.* in ([0-9.]+)s .*/\1/' <<<"$line")
    fi
    printf '| %s | stable replay | %s seeds + %s mutations | %ss | %s |\n' \
      "$t" "${seeds:-?}" "$ITERATIONS" "${secs:-?}" "$result" >>"$RESULTS"
  done
  ((status == 0)) || die "the stable replay found a failing input (see $log)"
}

[[ $MODE == stable ]] || detect_cargo_fuzz
if [[ $MODE == stable ]]; then
  echo "ORCH_FUZZ_MODE=stable: skipping cargo-fuzz"
  run_stable
elif [[ -n $REASON ]]; then
  [[ $MODE == cargo-fuzz ]] && die "ORCH_FUZZ_MODE=cargo-fuzz but $REASON"
  echo "Skipping cargo-fuzz: $REASON."
  run_stable
else
  FLAGS=(-s "$SANITIZER" --codegen-units 16)
  [[ $BUILD == dev ]] && FLAGS+=(--dev)
  section "Building the fuzz targets (${CARGO_NIGHTLY[*]} fuzz build ${FLAGS[*]})"
  "${CARGO_NIGHTLY[@]}" fuzz build "${FLAGS[@]}"
  failed=()
  for t in "${TARGETS[@]}"; do
    section "Fuzzing $t for ${SECONDS_PER_TARGET}s"
    corpus=target/fuzz-corpus/$t
    log=target/fuzz-$t.log
    mkdir -p "$corpus"
    status=0
    # libFuzzer writes new inputs to the first corpus directory only.
    "${CARGO_NIGHTLY[@]}" fuzz run "${FLAGS[@]}" "$t" "$ROOT/$corpus" "$ROOT/fuzz/seeds/$t" -- \
      -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
      -max_len=8192 -dict="$ROOT/fuzz/dicts/$t.dict" -print_final_stats=1 \
      </dev/null >"$log" 2>&1 || status=$?
    runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1 || true)
    secs=$(grep -oE 'Done [0-9]+ runs in [0-9]+ second' "$log" | grep -oE 'in [0-9]+' | grep -oE '[0-9]+' || true)
    tail -n 4 "$log"
    if ((status == 0)); then
      result="no crash; corpus $(find "$corpus" -type f | wc -l) inputs"
    else
      result="CRASH (exit $status), see $log and fuzz/artifacts/$t/"
      failed+=("$t")
    fi
    printf '| %s | cargo-fuzz (libFuzzer) | %s | %ss | %s |\n' \
      "$t" "${runs:-?}" "${secs:-$SECONDS_PER_TARGET}" "$result" >>"$RESULTS"
  done
  if ((${#failed[@]} > 0)); then
    cat "$RESULTS"
    die "crash in ${failed[*]}"
  fi
fi

section "Fuzzing summary ($RESULTS)"
cat "$RESULTS"
