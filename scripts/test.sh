#!/usr/bin/env bash
# The project's test command (also what CI runs, through .ci/run):
#
#   ./scripts/test.sh                      fmt check, clippy, all tests
#   ./scripts/test.sh -p orchestrator      extra arguments go to `cargo test`
#   ./scripts/test.sh -- --nocapture       (test binary args after --)
#   ORCH_TEST_SKIP_LINT=1 ./scripts/test.sh -p orchestrator-server
#
# Steps: install missing system packages (scripts/install-deps.sh), start a
# shared Redis and RabbitMQ on free loopback ports (scripts/services.sh; they
# are always stopped on exit, including on failure and Ctrl-C), export their
# URLs (ORCH_TEST_REDIS_URL, ORCH_TEST_AMQP_URL) for the tests, then run
# `cargo fmt --all -- --check`, `cargo clippy --workspace --all-targets -- -D
# warnings` and `cargo test`. Exits with the status of the first failing step
# (cargo's status).
#
# A full run (no package selection) then validates the deployment files
# with scripts/check-deploy.sh, runs scripts/multihost-test.sh (orchd,
# workers, Redis and RabbitMQ on separate network namespaces) and runs the
# fuzz targets briefly with scripts/fuzz.sh (cargo-fuzz when a nightly
# toolchain and cargo-fuzz are there, otherwise its stable fallback).
#
# Environment: ORCH_TEST_SKIP_LINT=1 skips fmt and clippy;
# ORCH_TEST_SKIP_DEPLOY=1 skips the deployment checks;
# ORCH_TEST_SKIP_MULTIHOST=1 skips the network-namespace test;
# ORCH_TEST_SKIP_FUZZ=1 skips the fuzzing (ORCH_FUZZ_SECONDS, default 15 here,
# ORCH_FUZZ_BUILD, default dev here, and ORCH_FUZZ_MODE reach
# scripts/fuzz.sh); ORCH_SERVICES_DIR
# sets the services' state directory (default /tmp/orch-test-services; two
# concurrent runs need different ones).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

section() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }
[[ -t 2 ]] || section() { printf '\n==> %s\n' "$*" >&2; }

export ORCH_SERVICES_DIR=${ORCH_SERVICES_DIR:-/tmp/orch-test-services}

section "Installing system dependencies (scripts/install-deps.sh)"
scripts/install-deps.sh

# One run per services directory at a time.
mkdir -p "$(dirname "$ORCH_SERVICES_DIR")"
exec 9>"$ORCH_SERVICES_DIR.lock"
if ! flock -n 9; then
  echo "another scripts/test.sh run is using $ORCH_SERVICES_DIR;" \
    "wait for it or set ORCH_SERVICES_DIR to another directory" >&2
  exit 1
fi

stopped=
# shellcheck disable=SC2317 # invoked by the EXIT trap
stop_services() {
  [[ -n $stopped ]] && return 0
  stopped=1
  section "Stopping Redis and RabbitMQ"
  scripts/services.sh stop || true
}
trap stop_services EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

section "Starting Redis and RabbitMQ (scripts/services.sh start)"
scripts/services.sh start
# shellcheck source=/dev/null
source "$ORCH_SERVICES_DIR/env"
echo "ORCH_TEST_REDIS_URL=$ORCH_TEST_REDIS_URL" >&2
echo "ORCH_TEST_AMQP_URL=$ORCH_TEST_AMQP_URL" >&2

if [[ ${ORCH_TEST_SKIP_LINT:-0} =~ ^(1|true|yes)$ ]]; then
  section "Skipping fmt and clippy (ORCH_TEST_SKIP_LINT=1)"
else
  # CI may have a minimal toolchain: add the components when rustup can.
  if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1; then
      section "Adding rustfmt and clippy (rustup component add)"
      rustup component add rustfmt clippy
    fi
  fi
  section "cargo fmt --all -- --check"
  cargo fmt --all -- --check
  section "cargo clippy --workspace --all-targets -- -D warnings"
  cargo clippy --workspace --all-targets -- -D warnings
fi

# `--workspace` would override a package selection (-p/--package), so add it
# only when the caller did not choose packages.
scope=(--workspace)
for arg in "$@"; do
  [[ $arg == -- ]] && break
  case $arg in
  -p | -p* | --package | --package=*) scope=() ;;
  esac
done

section "cargo test ${scope[*]} $*"
status=0
cargo test "${scope[@]}" "$@" || status=$?

# The deployment files (Dockerfile, compose, k8s) cannot run here; they are
# validated offline instead. Only on a full run: a package selection means
# someone is iterating on code.
if ((status == 0)) && ((${#scope[@]} > 0)) && [[ ! ${ORCH_TEST_SKIP_DEPLOY:-0} =~ ^(1|true|yes)$ ]]; then
  section "Deployment checks (scripts/check-deploy.sh)"
  scripts/check-deploy.sh || status=$?
fi
# Several hosts on one machine: network namespaces joined by veth pairs;
# skipped with a message where the machine does not allow them.
if ((status == 0)) && ((${#scope[@]} > 0)) && [[ ! ${ORCH_TEST_SKIP_MULTIHOST:-0} =~ ^(1|true|yes)$ ]]; then
  section "Multi-host test: network namespaces (scripts/multihost-test.sh)"
  scripts/multihost-test.sh || status=$?
fi
# The fuzz targets, briefly: a crash fails the run.
if ((status == 0)) && ((${#scope[@]} > 0)) && [[ ! ${ORCH_TEST_SKIP_FUZZ:-0} =~ ^(1|true|yes)$ ]]; then
  section "Fuzzing (scripts/fuzz.sh)"
  # A dev build: its cold build is ~4 CPU-minutes (about 2 min on 2 cores),
  # an optimized one several times that; 15 s per target at ~12k inputs/s.
  ORCH_FUZZ_SECONDS=${ORCH_FUZZ_SECONDS:-15} ORCH_FUZZ_BUILD=${ORCH_FUZZ_BUILD:-dev} \
    scripts/fuzz.sh || status=$?
fi
if ((status == 0)); then
  section "All tests passed"
else
  section "cargo test failed (exit status $status)"
fi
exit "$status"
