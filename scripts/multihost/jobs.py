#!/usr/bin/env python3
"""REST helper of scripts/multihost-test.sh (stdlib only).

It runs inside the test's `api` network namespace (through `ip netns exec`)
and talks only to the orchd address it is given. Subcommands:

  wait-running BASE PREFIX TIMEOUT ID...
      Poll the jobs until one is RUNNING on a worker whose id starts with
      PREFIX-; print "ID ATTEMPT WORKER_ID" and exit 0 (exit 1 on timeout).
  show BASE ID
      Print "STATE ATTEMPT WORKER_ID" of one job.
  wait-terminal BASE TIMEOUT OUT ID...
      Poll until every job is COMPLETED, FAILED or CANCELLED; write the jobs
      as a JSON list to OUT (also on timeout, then exit 1).
  check OUT VICTIM W1_PREFIX W2_PREFIX CUT_EPOCH
      Check the scenario's outcome; print a report; exit 0 on PASS, 1 on FAIL.

Proxies from the environment are ignored: every address is inside the test's
namespaces.
"""

import json
import re
import sys
import os
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED"}
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def request(method, url, body=None, timeout=5.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    token = os.environ.get("ORCH_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with OPENER.open(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def get_job(base, job_id):
    return request("GET", f"{base}/jobs/{job_id}")


def state(job):
    # proto3 JSON enum names; tolerate a "STATE_" prefix should it appear.
    s = str(job.get("state", ""))
    return s[len("STATE_"):] if s.startswith("STATE_") else s


def norm(s):
    s = str(s or "")
    return s[len("STATE_"):] if s.startswith("STATE_") else s


def has_prefix(worker_id, prefix):
    return str(worker_id or "").startswith(prefix + "-")


def rfc3339(ts):
    """Seconds since the epoch of an RFC 3339 timestamp (nanoseconds ok)."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", ts or "")
    if not m:
        return None
    base = datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(3) == "Z" else m.group(3)))
    frac = float("0." + m.group(2)) if m.group(2) else 0.0
    return base.astimezone(timezone.utc).timestamp() + frac


def poll(base, ids):
    """The jobs, or None for those that could not be read this time."""
    out = {}
    for job_id in ids:
        try:
            out[job_id] = get_job(base, job_id)
        except (urllib.error.URLError, OSError, ValueError) as e:
            print(f"  (GET /jobs/{job_id}: {e})", file=sys.stderr)
            out[job_id] = None
    return out


def cmd_wait_running(base, prefix, timeout, ids):
    deadline = time.monotonic() + float(timeout)
    jobs = {}
    while time.monotonic() < deadline:
        jobs = poll(base, ids)
        for job_id in ids:
            job = jobs[job_id]
            if job and state(job) == "RUNNING" and has_prefix(job.get("workerId"), prefix):
                print(job_id, job.get("attempt", 0), job.get("workerId"))
                return 0
        time.sleep(0.05)
    print(f"no job RUNNING on a worker {prefix}-* within {timeout}s:", file=sys.stderr)
    for job_id in ids:
        job = jobs.get(job_id) or {}
        print(f"  {job_id} {state(job)} {job.get('workerId', '')}", file=sys.stderr)
    return 1


def cmd_show(base, job_id):
    job = get_job(base, job_id)
    print(state(job), job.get("attempt", 0), job.get("workerId", "") or "-")
    return 0


def cmd_wait_terminal(base, timeout, out, ids):
    start = time.monotonic()
    deadline = start + float(timeout)
    last_report = 0.0
    jobs = {}
    while True:
        got = poll(base, ids)
        jobs.update({k: v for k, v in got.items() if v is not None})
        states = [state(jobs[i]) if i in jobs else "?" for i in ids]
        done = all(s in TERMINAL for s in states)
        now = time.monotonic()
        if done or now >= deadline or now - last_report >= 5:
            counts = {}
            for s in states:
                counts[s] = counts.get(s, 0) + 1
            summary = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            print(f"  after {now - start:4.1f}s: {summary}", file=sys.stderr, flush=True)
            last_report = now
        if done or now >= deadline:
            break
        time.sleep(0.2)
    with open(out, "w") as f:
        json.dump([jobs.get(i, {"id": i}) for i in ids], f, indent=1)
    if not done:
        print(f"not every job is terminal after {timeout}s", file=sys.stderr)
        return 1
    return 0


def cmd_check(out, victim, w1, w2, cut_epoch):
    with open(out) as f:
        jobs = json.load(f)
    cut = float(cut_epoch)
    problems = []
    lines = []
    for job in jobs:
        job_id = job.get("id", "?")
        hist = job.get("history", []) or []
        path = [norm(hist[0].get("from"))] if hist else []
        path = [p for p in path if p and p != "UNSPECIFIED"]
        path += [norm(h.get("to")) for h in hist]
        final = state(job)
        worker = job.get("workerId", "") or "-"
        mark = "*" if job_id == victim else " "
        lines.append(f" {mark} {job_id}  {final:<9} attempt {job.get('attempt', 0)}  "
                     f"worker {worker}\n      {' -> '.join(path)}")
        if final != "COMPLETED":
            problems.append(f"{job_id}: ended {final or '(unknown)'}, not COMPLETED "
                            f"(error: {job.get('error', '')!r})")
        completions = [h for h in hist if norm(h.get("to")) == "COMPLETED"]
        if len(completions) != 1:
            problems.append(f"{job_id}: {len(completions)} transitions to COMPLETED in its history, "
                            "expected exactly 1")
        if final == "COMPLETED" and not (has_prefix(worker, w1) or has_prefix(worker, w2)):
            problems.append(f"{job_id}: completed by unknown worker {worker!r}")

    timings = []
    v = next((j for j in jobs if j.get("id") == victim), None)
    if v is None:
        problems.append(f"victim {victim} missing from the results")
    else:
        hist = v.get("history", []) or []
        lost = [h for h in hist
                if norm(h.get("from")) == "RUNNING" and norm(h.get("to")) == "RETRYING"
                and "worker lost" in str(h.get("reason", ""))]
        if not lost:
            problems.append(f"victim {victim}: no RUNNING -> RETRYING transition with "
                            f"'worker lost' in its history: {json.dumps(hist)}")
        else:
            h = lost[0]
            timings.append(f"history: RUNNING -> RETRYING, attempt {h.get('attempt')}, "
                           f"reason {h.get('reason', '')!r}")
            if h.get("attempt") != 1:
                problems.append(f"victim {victim}: 'worker lost' on attempt {h.get('attempt')}, expected 1")
            who = f"{h.get('workerId', '')} {h.get('reason', '')}"
            if w1 + "-" not in who:
                problems.append(f"victim {victim}: the 'worker lost' entry does not name {w1}-*: {h}")
            t = rfc3339(h.get("at"))
            if t is not None:
                timings.append(f"worker lost recorded {t - cut:.1f}s after the cut")
        starts = [h for h in hist if norm(h.get("to")) == "RUNNING"]
        if not starts or not has_prefix(starts[0].get("workerId"), w1):
            problems.append(f"victim {victim}: its first attempt did not run on {w1}-*")
        if len(starts) >= 2:
            t = rfc3339(starts[1].get("at"))
            if t is not None:
                timings.append(f"retry started on {starts[1].get('workerId')} {t - cut:.1f}s after the cut")
        if v.get("attempt") != 2:
            problems.append(f"victim {victim}: ended on attempt {v.get('attempt')}, expected 2")
        if not has_prefix(v.get("workerId"), w2):
            problems.append(f"victim {victim}: completed by {v.get('workerId')!r}, expected {w2}-*")
        done = [h for h in hist if norm(h.get("to")) == "COMPLETED"]
        if done:
            h = done[-1]
            if h.get("attempt") != 2:
                problems.append(f"victim {victim}: COMPLETED on attempt {h.get('attempt')}, expected 2")
            if not has_prefix(h.get("workerId"), w2):
                problems.append(f"victim {victim}: COMPLETED entry names {h.get('workerId')!r}, expected {w2}-*")
            t = rfc3339(h.get("at"))
            if t is not None:
                timings.append(f"completed on {w2} {t - cut:.1f}s after the cut")

    per_worker = {}
    for job in jobs:
        if state(job) == "COMPLETED":
            w = str(job.get("workerId", "")).split("-")[0]
            per_worker[w] = per_worker.get(w, 0) + 1
    print("jobs (* = the one running on %s when its link was cut):" % w1)
    print("\n".join(lines))
    print("completed per worker: " + ", ".join(f"{k}={n}" for k, n in sorted(per_worker.items())))
    for t in timings:
        print("victim: " + t)
    if problems:
        print("FAIL:")
        for p in problems:
            print("  - " + p)
        return 1
    print(f"PASS: {len(jobs)} jobs COMPLETED exactly once; the job cut off on {w1} "
          f"was recovered as 'worker lost' and completed on {w2} (attempt 2)")
    return 0


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "wait-running" and len(args) >= 4:
        return cmd_wait_running(args[0], args[1], args[2], args[3:])
    if cmd == "show" and len(args) == 2:
        return cmd_show(*args)
    if cmd == "wait-terminal" and len(args) >= 4:
        return cmd_wait_terminal(args[0], args[1], args[2], args[3:])
    if cmd == "check" and len(args) == 5:
        return cmd_check(*args)
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
