#!/usr/bin/env bash
# Runs the micro-benchmarks (benches/micro.rs, criterion, release build) and
# writes a markdown table of this run's figures to
# target/bench-results/micro.md:
#
#   bench/micro.sh                     every benchmark
#   bench/micro.sh redis               only those whose name contains "redis"
#   WARMUP=2 MEASURE=10 bench/micro.sh
#
# The Redis round trips use ORCH_TEST_REDIS_URL when it is set, otherwise a
# private redis-server the benchmark starts itself (scripts/install-deps.sh
# installs one); without either they are skipped with a message.
#
# Settings (environment): WARMUP=1 and MEASURE=3 seconds per benchmark
# (criterion's --warm-up-time and --measurement-time), OUT (default
# target/bench-results/micro.md). The figures are wall-clock times on a
# shared machine: compare runs on the same machine only.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

WARMUP=${WARMUP:-1}
MEASURE=${MEASURE:-3}
OUT=${OUT:-target/bench-results/micro.md}
for v in WARMUP MEASURE; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || {
    echo "bench/micro.sh: $v must be a positive number of seconds, got '${!v}'" >&2
    exit 1
  }
done

mkdir -p "$(dirname "$OUT")" target/criterion
marker=$(mktemp target/criterion/.run-XXXXXX)
trap 'rm -f "$marker"' EXIT

echo "==> cargo bench -p orchestrator --bench micro (warm-up ${WARMUP}s, measurement ${MEASURE}s)"
cargo bench -p orchestrator --bench micro -- \
  --warm-up-time "$WARMUP" --measurement-time "$MEASURE" "$@" 2>&1 | tee target/bench-results/micro.log

# Only the estimates this run wrote (newer than the marker).
python3 - "$marker" "$OUT" "$WARMUP" "$MEASURE" <<'EOF'
import json, os, pathlib, platform, subprocess, sys, time

marker, out, warmup, measure = sys.argv[1:5]
since = os.path.getmtime(marker)
root = pathlib.Path("target/criterion")

def fmt(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"

rows = []
for bench in root.glob("**/new/benchmark.json"):
    estimates = bench.with_name("estimates.json")
    if not estimates.exists() or estimates.stat().st_mtime < since:
        continue
    meta = json.loads(bench.read_text())
    est = json.loads(estimates.read_text())
    # Criterion's headline figure: the slope of time over iterations when
    # it sampled linearly, else the mean.
    mean = est.get("slope") or est["mean"]
    ci = mean["confidence_interval"]
    rows.append((
        meta["full_id"],
        mean["point_estimate"],
        ci["lower_bound"],
        ci["upper_bound"],
        est["median"]["point_estimate"],
    ))
if not rows:
    sys.exit("bench/micro.sh: criterion wrote no estimates")
rows.sort()

def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "?"

lines = [
    "# Micro-benchmarks",
    "",
    f"`bench/micro.sh` (criterion, release build), {time.strftime('%Y-%m-%d %H:%M %Z')}, "
    f"commit {run('git', 'rev-parse', '--short', 'HEAD')}, {run('rustc', '--version')}, "
    f"{os.cpu_count()} cores ({platform.machine()}), warm-up {warmup} s and "
    f"measurement {measure} s per benchmark. Time per operation is criterion's "
    "estimate (the slope of its linear sampling); wall-clock on a shared machine: "
    "compare runs on the same machine only.",
    "",
    "| benchmark | time per operation | 95% interval | median | per second |",
    "|---|---:|---:|---:|---:|",
]
for name, mean, low, high, median in rows:
    lines.append(
        f"| `{name}` | {fmt(mean)} | {fmt(low)} – {fmt(high)} | {fmt(median)} | {1e9 / mean:,.0f} |"
    )
pathlib.Path(out).write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"\nwrote {out}")
EOF
