#!/usr/bin/env python3
"""Write BENCHMARKS.md (on stdout) from the results of one bench/run.sh run.

  python3 bench/report.py target/bench-results/<time> > BENCHMARKS.md

Every figure comes from the JSON and text files in that directory:
  machine.env                     the machine and the settings of the run
  grpc-throughput.json ...        `orchctl -o json bench` reports; a scenario run
                                  several times is NAME-run1.json, NAME-run2.json, ...
                                  and is reported by the median of each figure
  rss-idle.txt rss-throughput.txt RSS samples (KiB): time orchd worker...
  celery-<pool>-c<n>.json         the reference's run_bench.py output
  amqp-lapin.json                 the reference's raw/amqp_rate_rs output
  latency-floor.json              examples/latency_floor.rs: each hop under one job, timed alone
Nothing is typed in by hand: rerun bench/run.sh to refresh the file.
"""
import json
import math
import statistics
import sys
from pathlib import Path

results = Path(sys.argv[1])


def load(name):
    path = results / name
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def env():
    out = {}
    for line in (results / "machine.env").read_text().splitlines():
        for part in line.split(" ") if line.startswith(("n=", "workers=")) else [line]:
            if "=" in part:
                k, v = part.split("=", 1)
                out[k] = v
    return out


def fmt(x, digits=0):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def rss(name):
    path = results / name
    if not path.exists():
        return None
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        return None
    cols = max(len(r) for r in rows)
    peaks = []
    for c in range(1, cols):
        vals = [int(r[c]) for r in rows if len(r) > c and r[c].isdigit()]
        peaks.append(max(vals) / 1024 if vals else None)
    return peaks, len(rows)


def runs_of(name):
    """The reports of one scenario: NAME.json, or its runs NAME-run<i>.json in order."""
    single = load(f"{name}.json")
    if single is not None:
        return [single]
    found = sorted(results.glob(f"{name}-run*.json"), key=lambda f: int(f.stem.rsplit("-run", 1)[1]))
    return [r for r in (load(f.name) for f in found) if r is not None]


def median_of(reports):
    """One report from several runs of a scenario: the median of every number,
    each dict merged the same way, and a flag true only when true in every run."""
    if not reports:
        return None
    if len(reports) == 1:
        return reports[0]
    out = {}
    for key in reports[0]:
        values = [r.get(key) for r in reports]
        if all(isinstance(v, bool) for v in values):
            out[key] = all(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = statistics.median(values)
        elif all(isinstance(v, dict) for v in values):
            out[key] = median_of(values)
        else:
            out[key] = values[0]
    return out


def per_run(reports, pick, digits=0):
    """The figure `pick` of each run, "a / b / c", for showing the spread."""
    return " / ".join(fmt(pick(r), digits) for r in reports)


m = env()
SCENARIO_NAMES = ("grpc-throughput", "rest-throughput", "grpc-batch", "grpc-latency", "grpc-cancel")
our_runs = {k: runs_of(k) for k in SCENARIO_NAMES}
ours = {k: median_of(v) for k, v in our_runs.items()}
repeat = m.get("repeat", "1")
celery = {k: load(f"celery-{k}.json") for k in ("threads-c8", "prefork-c2")}
amqp = load("amqp-lapin.json")


def celery_fig(c):
    """submit, e2e, e2e_seen, latency dict of one Celery result (median of its runs)."""
    s = c.get("summary", {})
    lat = c.get("latency_runs") or []
    worst = max((r["max_ms"] for r in lat), default=None)
    return {
        "submit": s.get("median_submit_rate"),
        "e2e": s.get("median_e2e_rate"),
        "seen": s.get("median_e2e_seen_rate"),
        "p50": s.get("median_p50_ms"),
        "p90": s.get("median_p90_ms"),
        "p99": s.get("median_p99_ms"),
        "mean": s.get("median_mean_ms"),
        "max": worst,
    }


cel = {k: celery_fig(v) for k, v in celery.items() if v}
best_name = max(cel, key=lambda k: cel[k]["e2e"] or 0) if cel else None
best = cel.get(best_name) if best_name else None
ceiling = (amqp or {}).get("summary", {})

g = ours["grpc-throughput"]
b = ours["grpc-batch"]
lat = ours["grpc-latency"]
lat_client = (lat or {}).get("client_latency_ms") or {}
cancel = ours["grpc-cancel"]
cancel_client = (cancel or {}).get("cancel_latency_ms") or {}
cancel_server = (cancel or {}).get("cancel_server_latency_ms") or {}
# Issue 6's targets for cancelling a running job (CancelJob -> CANCELLED).
CANCEL_TARGETS = {"p50": 50, "p99": 200}


def against(value, target):
    if value is None:
        return "not run"
    return f"**{fmt(value, 2)}** {'✓' if value <= target else '✗'} target ≤ {target}"

p = print
p("# Benchmarks")
p()
root = Path(__file__).resolve().parent.parent
where = results.resolve()
where = where.relative_to(root) if where.is_relative_to(root) else where
p(f"Generated by `bench/run.sh` on {m.get('date', '?')} from the files in `{where}`; "
  "every number below comes from that run (`bench/report.py` writes this file). "
  "Do not edit the figures by hand: rerun `bench/run.sh`.")
p()
runs_said = ("each figure is one run" if repeat == "1" else
             f"each figure compared with the references is the median of {repeat} runs (Celery's and the "
             "broker's too), the runs one after the other")
p(f"**Noise.** The machine is shared with other sessions (compiles, test suites); {runs_said}; "
  f"load average {m.get('load_start', '?')} at the start and {m.get('load_end', '?')} at the end. "
  "Expect ±10–30 % between single runs; compare ratios measured in the same run rather than absolute numbers.")
p()
p("## Machine and setup")
p()
p(f"- {m.get('nproc', '?')} CPUs ({m.get('cpu') or 'unknown model'}), {m.get('mem', '?')} RAM, {m.get('uname', '?')}")
p(f"- Redis {m.get('redis', '?')} (no persistence) on 127.0.0.1:6390 and RabbitMQ {m.get('rabbitmq', '?')} "
  f"(Erlang {m.get('erlang', '?')}, no plugins) on 127.0.0.1:5690: the reference benchmark's `services.sh`, "
  "**the same servers for every stack** (orchd uses Redis db 1, Celery db 0)")
p(f"- this project at commit {m.get('commit', '?')}, release build, {m.get('rustc', '')}; "
  f"`orchd serve` and {m.get('workers', '?')} × `orch-worker --concurrency {m.get('worker_concurrency', '?')}"
  f"{' ' + m['worker_args'] if m.get('worker_args') else ''}` "
  "on one fresh queue, `RUST_LOG=warn`, all on the same host as the clients")
p(f"- `noop` jobs; throughput runs: {m.get('n', '?')} jobs after a {m.get('warmup', '?')}-job warm-up; "
  f"latency runs: {m.get('latency_n', '?')} jobs one at a time; cancellation: {m.get('cancel_n', '?')} running "
  f"`sleep` jobs cancelled one at a time; Celery: `run_bench.py -n {m.get('n', '?')} "
  f"--latency-n {m.get('latency_n', '?')} --repeat {repeat}` (threads c=8 and prefork c=2, acks late, prefetch 4 × concurrency)")
p()
p("## Summary")
p()
p("Ratios are *this project ÷ reference*: above 1× is faster for rates, below 1× is faster for latencies.")
p()
p("| metric | Celery best" + (f" ({best_name.replace('-c', ' c=')})" if best_name else "") +
  " | broker ceiling (lapin) | this project | ÷ Celery | ÷ ceiling |")
p("| --- | --- | --- | --- | --- | --- |")
ceil_pipe = ceiling.get("median_pipeline_rate")
ceil_pub = ceiling.get("median_publish_rate")
gr = lambda r, k: (r or {}).get(k)  # noqa: E731
p(f"| end-to-end throughput, jobs/s | {fmt(gr(best, 'e2e'))} | {fmt(ceil_pipe)} (publish+consume pipeline) "
  f"| **{fmt(gr(g, 'e2e_rate'))}** (gRPC, c={gr(g, 'concurrency') or '?'}) | {ratio(gr(g, 'e2e_rate'), gr(best, 'e2e'))} "
  f"| {ratio(gr(g, 'e2e_rate'), ceil_pipe)} |")
p(f"| submit rate, jobs/s | {fmt(gr(best, 'submit'))} | {fmt(ceil_pub)} (publish, confirms) "
  f"| **{fmt(gr(g, 'submit_rate'))}** (gRPC, one job per call) | {ratio(gr(g, 'submit_rate'), gr(best, 'submit'))} "
  f"| {ratio(gr(g, 'submit_rate'), ceil_pub)} |")
p(f"| submit rate, batched, jobs/s | {fmt(gr(best, 'submit'))} | {fmt(ceil_pub)} "
  f"| **{fmt(gr(b, 'submit_rate'))}** (SubmitJobs × {gr(b, 'batch') or '?'}) | {ratio(gr(b, 'submit_rate'), gr(best, 'submit'))} "
  f"| {ratio(gr(b, 'submit_rate'), ceil_pub)} |")
for q in ("p50", "p90", "p99"):
    p(f"| latency {q}, ms (one job at a time) | {fmt(gr(best, q), 2)} | – | **{fmt(lat_client.get(q), 2)}** "
      f"| {ratio(lat_client.get(q), gr(best, q))} | – |")
for q, target in CANCEL_TARGETS.items():
    p(f"| cancellation latency {q}, ms (running job → CANCELLED) | – | – | {against(cancel_client.get(q), target)} "
      "| – | – |")
p()
spread = []
if len(our_runs["grpc-throughput"]) > 1:
    spread.append("end to end " + per_run(our_runs["grpc-throughput"], lambda r: r.get("e2e_rate")) + " jobs/s")
if len(our_runs["grpc-latency"]) > 1:
    spread.append("latency p50 " + per_run(our_runs["grpc-latency"],
                                            lambda r: (r.get("client_latency_ms") or {}).get("p50"), 2) +
                  " ms, p99 " + per_run(our_runs["grpc-latency"],
                                         lambda r: (r.get("client_latency_ms") or {}).get("p99"), 2) + " ms")
if spread:
    p(f"This project's runs one by one: {'; '.join(spread)}.")
    p()
p("Latency is measured the same way on both sides: from the submit call to the moment the client has "
  "the result (Celery: `apply_async` → `AsyncResult.get()` over Redis pub/sub; here: `SubmitJob` → "
  "`WatchJob` streams the job COMPLETED).")
p()

p("What was tried for these figures, the profile that led to each change and what it bought: "
  "[bench/HISTORY.md](bench/HISTORY.md).")
p()
p("## This project, every scenario")
p()
if repeat != "1":
    p(f"Each scenario but cancellation ran {repeat} times; its row shows the median of each figure, and "
      "*exactly once* holds only if it held in every run.")
    p()
p("| scenario | jobs | exactly once | submit /s | end-to-end /s | server latency p50 / p90 / p99 / max, ms |")
p("| --- | --- | --- | --- | --- | --- |")
names = {
    "grpc-throughput": "gRPC, SubmitJob, c={c}",
    "rest-throughput": "REST `POST /jobs`, c={c}",
    "grpc-batch": "gRPC, SubmitJobs × {b}, c={c}",
    "grpc-latency": "gRPC, one at a time",
    "grpc-cancel": "gRPC, cancel a running `sleep`, one at a time",
}
for key, label in names.items():
    r = ours[key]
    if not r:
        p(f"| {label.format(c='?', b='?')} | not run | | | | |")
        continue
    is_cancel = r["mode"] == "cancel"
    sl = (r.get("cancel_server_latency_ms") if is_cancel else r.get("latency_ms")) or {}
    ok = "yes" if r["exactly_once"] else (f"**NO**: {r['completed']} COMPLETED, {r['failed']} FAILED, "
                                          f"{r['cancelled']} CANCELLED, {r['unfinished']} unfinished, {r['missing']} missing")
    done = r["cancelled"] if is_cancel else r["completed"]
    rates = "– | –" if is_cancel else f"{fmt(r['submit_rate'])} | {fmt(r['e2e_rate'])}"
    p(f"| {label.format(c=r['concurrency'], b=r.get('batch'))} | {done}/{r['jobs']} | {ok} "
      f"| {rates} "
      f"| {fmt(sl.get('p50'))} / {fmt(sl.get('p90'))} / {fmt(sl.get('p99'))} / {fmt(sl.get('max'))} |")
p()
if lat:
    p(f"One at a time ({lat['completed']} jobs), client side (submit call → COMPLETED on the WatchJob stream): "
      f"p50 {fmt(lat_client.get('p50'), 2)}, p90 {fmt(lat_client.get('p90'), 2)}, p99 {fmt(lat_client.get('p99'), 2)}, "
      f"max {fmt(lat_client.get('max'), 2)}, mean {fmt(lat_client.get('mean'), 2)} ms; the same jobs by their own "
      f"timestamps (`createdAt → finishedAt`): p50 {fmt((lat.get('latency_ms') or {}).get('p50'))} ms, so "
      f"{fmt(lat_client.get('p50', math.nan) - (lat.get('latency_ms') or {}).get('p50', math.nan), 1)} ms of the "
      "median is spent outside the job's recorded lifetime (the submit answer, the watch call, the stream).")
    p()
if cancel:
    p(f"Cancellation ({cancel['cancelled']} of {cancel['jobs']} running `sleep` jobs CANCELLED), client side (`CancelJob` "
      f"call → CANCELLED on the job's WatchJob stream): p50 {fmt(cancel_client.get('p50'), 2)}, "
      f"p90 {fmt(cancel_client.get('p90'), 2)}, p99 {fmt(cancel_client.get('p99'), 2)}, "
      f"max {fmt(cancel_client.get('max'), 2)} ms (targets: p50 ≤ {CANCEL_TARGETS['p50']} ms, "
      f"p99 ≤ {CANCEL_TARGETS['p99']} ms); by the job's own timestamps (`updatedAt` when the cancel was recorded → "
      f"`finishedAt`): p50 {fmt(cancel_server.get('p50'))}, p99 {fmt(cancel_server.get('p99'))} ms. orchd pushes the "
      "cancel to the worker that runs the job (its control queue on RabbitMQ); the worker's 1 s heartbeat poll "
      "is only the fallback.")
    p()
p("*exactly once*: every submitted job is COMPLETED (cancellation scenario: CANCELLED) and its history holds "
  "exactly one transition to that state (checked by `orchctl bench` over every job of the run). *submit /s*: jobs ÷ (first submit sent → "
  "last submit answered). *end-to-end /s*: jobs ÷ (first submit sent → latest `finishedAt`). *server latency*: "
  "each job's `createdAt → finishedAt` (orchd's clock, millisecond resolution), i.e. mostly queueing time "
  "under load; for the cancellation scenario, `updatedAt` when the cancel was recorded → `finishedAt`.")
p()

floor = load("latency-floor.json")
if floor:
    hops = (
        ("amqp_publish_to_delivery_ms", "RabbitMQ: a persistent message published with confirms to a durable "
                                        "queue → delivered to a consumer on another connection"),
        ("grpc_round_trip_ms", "gRPC round trip to orchd (`Health/Check`, no store behind it)"),
        ("redis_round_trip_ms", "Redis round trip (`PING`, multiplexed connection)"),
    )
    p("## Latency floor: the hops under one job")
    p()
    p("Each hop a job crosses, timed alone and one at a time on the same servers and the same orchd right after "
      f"the latency runs (`examples/latency_floor.rs`, {floor['redis_round_trip_ms']['samples']} samples each).")
    p()
    p("| hop | p50 | p90 | p99 | max, ms |")
    p("| --- | --- | --- | --- | --- |")
    for key, label in hops:
        h = floor.get(key) or {}
        p(f"| {label} | {fmt(h.get('p50'), 3)} | {fmt(h.get('p90'), 3)} | {fmt(h.get('p99'), 3)} "
          f"| {fmt(h.get('max'), 3)} |")
    p()
    f50 = {k: (floor.get(k) or {}).get("p50", math.nan) for k, _ in hops}
    least = f50["amqp_publish_to_delivery_ms"] + 2.5 * f50["grpc_round_trip_ms"] + 3 * f50["redis_round_trip_ms"]
    goal = 0.6 * gr(best, "p50") if best and gr(best, "p50") else math.nan
    p("From its submit to COMPLETED on the client's stream, a job crosses at least one broker hop, two and a half "
      "gRPC round trips (SubmitJob to orchd; StartAttempt there and back; FinishAttempt to orchd; the watch "
      "stream back to the client) and three Redis round trips (the job created, the attempt started, the "
      "attempt finished), each waiting for the one before: its store write is what makes the next step safe. "
      f"At the p50s above that is **{fmt(least, 2)} ms** before any work is done (the scripts, the encoding, "
      f"the processes waking up), against this project's measured p50 of {fmt(lat_client.get('p50'), 2)} ms "
      f"and 0.6 × Celery's best p50 = {fmt(goal, 2)} ms.")
    p()

scale_sizes = sorted(int(f.stem.split("-")[1]) for f in results.glob("scale-*-list.json"))
if scale_sizes:
    p("## How cost grows with the jobs stored")
    p()
    p("The store grown to each size with SubmitJobs (jobs left CREATED on a queue no worker consumes), then "
      "a short gRPC throughput run, a one-at-a-time latency run, and ListJobs pages of 100 over REST "
      "(median of 20 calls; the newest jobs, the newest CREATED, the newest of the stored queue).")
    p()
    p("| jobs stored | end-to-end /s | latency p50 / p99, ms | ListJobs newest / CREATED / by queue, median ms |")
    p("| --- | --- | --- | --- |")
    for size in scale_sizes:
        t = load(f"scale-{size}-throughput.json") or {}
        l = load(f"scale-{size}-latency.json") or {}
        lst = load(f"scale-{size}-list.json") or {}
        lat = l.get("client_latency_ms") or l.get("latency_ms") or {}
        lists = " / ".join(fmt((lst.get(k) or {}).get("median_ms"), 1) for k in ("newest", "created", "queue"))
        p(f"| {lst.get('stored', size):,} | {fmt(t.get('e2e_rate'))} | {fmt(lat.get('p50'), 2)} / "
          f"{fmt(lat.get('p99'), 2)} | {lists} |")
    p()
    p("Every request reads an index in order from its newest end (sorted sets by creation time, per "
      "namespace, per state, kind and queue) and stops at the page size, so no request scans the jobs stored.")
    p()

p("## Celery reference (same run, same servers)")
p()
if cel:
    p("| pool | submit /s | end-to-end /s | results seen /s | latency p50 / p90 / p99 / max, ms |")
    p("| --- | --- | --- | --- | --- |")
    for k, c in cel.items():
        p(f"| {k.replace('-c', ' c=')} | {fmt(c['submit'])} | {fmt(c['e2e'])} | {fmt(c['seen'])} "
          f"| {fmt(c['p50'], 2)} / {fmt(c['p90'], 2)} / {fmt(c['p99'], 2)} / {fmt(c['max'], 1)} |")
else:
    p("Not run in this run (`RUN_CELERY=0`).")
p()
p("## Broker ceiling: raw RabbitMQ with lapin (same run, same server)")
p()
if ceiling:
    p("| publish, confirms (window 1000) /s | publish, one confirm at a time /s | consume, ack each /s | pipeline publish + consume /s |")
    p("| --- | --- | --- | --- |")
    p(f"| {fmt(ceiling.get('median_publish_rate'))} | {fmt(ceiling.get('median_publish_sync_rate'))} "
      f"| {fmt(ceiling.get('median_consume_rate'))} | {fmt(ceiling.get('median_pipeline_rate'))} |")
    p()
    p("Persistent 100-byte messages on a durable classic queue, publisher confirms, one `basic.ack` per "
      "message: the most a platform that sends every job through this RabbitMQ once can reach.")
else:
    p("Not run in this run (`RUN_RAW=0`).")
p()

p("## Memory")
p()
idle = rss("rss-idle.txt")
busy = rss("rss-throughput.txt")
if busy:
    peaks, samples = busy
    idle_peaks = idle[0] if idle else [None] * len(peaks)
    p(f"Resident set size (`ps -o rss`), sampled every 0.25 s during the gRPC throughput runs ({samples} samples).")
    p()
    p("| process | idle, MiB | peak during the run, MiB |")
    p("| --- | --- | --- |")
    for i, peak in enumerate(peaks):
        name = "orchd" if i == 0 else f"orch-worker {i}"
        p(f"| {name} | {fmt(idle_peaks[i] if i < len(idle_peaks) else None, 1)} | {fmt(peak, 1)} |")
else:
    p("No RSS samples in this run.")
p()

p("## Reproduce")
p()
p("```sh")
p("bench/run.sh                           # Celery and the raw broker included (RUN_CELERY=0 RUN_RAW=0 to skip)")
p("N=2000 LATENCY_N=100 bench/run.sh      # shorter")
p("```")
p()
p("`bench/run.sh` copies the reference benchmark (`../shared/bench`) to `/tmp/orch-bench-ref`, starts its "
  "Redis and RabbitMQ, builds the release binaries, starts `orchd serve` and the workers on a fresh queue, runs "
  "`orchctl bench` (throughput over gRPC and REST, SubmitJobs batches, one-at-a-time latency, cancellation "
  "latency), then Celery and the "
  "lapin client on the same servers, stops everything and writes this file. By hand, against any orchd:")
p()
p("```sh")
p("orch-worker --queues default,bench-1 &                 # workers must consume the bench queue")
p("orchctl bench --queue bench-1 -n 10000 --concurrency 64")
p("orchctl bench --queue bench-1 --latency 500")
p("orchctl bench --queue bench-1 --cancel 100                # running sleep jobs, cancelled one at a time")
p("orchctl bench --queue bench-1 --batch 100 --rest http://127.0.0.1:8000 -o json")
p("```")
