#!/usr/bin/env python3
"""Cross-checks the deployment files against the code they deploy.

docker-compose.yml, k8s/*.yaml, the Dockerfile and .dockerignore name
environment variables, ports, endpoints, timeouts, packages and users that
the Rust code defines. Schema validators cannot see those links; this script
checks them against the source of truth:

* the environment variables set on orchd and orch-worker containers
  (directly, through a ConfigMap/Secret via envFrom or valueFrom) are ones
  the binaries read: `orchd serve --help` and `orch-worker --help` print
  them as `[env: NAME=]`;
* the published/container ports are the binaries' defaults (or the
  addresses configured), and the URLs point at services and ports that exist;
* the probes and health checks hit routes that exist (server/src/rest.rs)
  and the right ports, and liveness does not depend on Redis/RabbitMQ;
* the workers' stop grace period outlasts their drain timeout, cancel grace
  and final report;
* authentication is configured: orchd gets a tokens file (ORCH_TOKENS_FILE)
  that a secret actually provides at that path, or says
  ORCH_INSECURE_NO_AUTH on purpose, and workers get ORCH_TOKEN;
* selectors match pods, references (Secrets, ConfigMaps, keys, HPA targets)
  resolve, every container has requests and limits and meets the
  "restricted" Pod Security Standard enforced on the namespace;
* the Dockerfile builds the packages that own the three binaries with a
  compiler new enough for Cargo.lock, and .dockerignore keeps data and
  secrets out of the context without dropping build inputs.

Usage: check_deploy_names.py --orchd target/debug/orchd --worker target/debug/orch-worker
(run from anywhere; paths are relative to the repository root). Needs PyYAML.
Exits 1 and lists every mismatch when any check fails.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE_KINDS = {"Namespace"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
BINARIES = ("orchd", "orch-worker")
# Which variables a binary cannot do without in a deployment: without them it
# would silently talk to 127.0.0.1 and never become ready.
REQUIRED_ENV = {"orchd": ("REDIS_URL", "AMQP_URL"), "orch-worker": ("ORCH_SERVER", "AMQP_URL")}
# Where the URL variables must point, by role.
URL_VARS = {"REDIS_URL": "redis", "AMQP_URL": "amqp", "ORCH_SERVER": "grpc"}
DEFAULT_SCHEME_PORT = {"redis": 6379, "rediss": 6379, "amqp": 5672, "amqps": 5671}
# Pod Security Standard "restricted": allowed volume types and capabilities.
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
    "persistentVolumeClaim", "projected", "secret",
}
# Probes that follow Redis/RabbitMQ health and so must not decide liveness.
DEPENDENCY_BOUND_PATHS = {"/healthz"}


# --------------------------------------------------------------------------
# Reporting


class Report:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.checked = 0

    def section(self, title: str) -> None:
        print(f"\n-- {title}")

    def ok(self, message: str) -> None:
        self.checked += 1
        print(f"   ok    {message}")

    def fail(self, message: str) -> None:
        self.checked += 1
        self.errors.append(message)
        print(f"   FAIL  {message}")

    def note(self, message: str) -> None:
        print(f"   note  {message}")

    def expect(self, condition: bool, ok: str, fail: str) -> bool:
        (self.ok if condition else self.fail)(ok if condition else fail)
        return condition


# --------------------------------------------------------------------------
# Helpers


DURATION_UNITS = [
    ("ms", 0.001), ("msec", 0.001), ("millis", 0.001), ("us", 1e-6), ("ns", 1e-9),
    ("seconds", 1), ("second", 1), ("secs", 1), ("sec", 1), ("s", 1),
    ("minutes", 60), ("minute", 60), ("mins", 60), ("min", 60), ("m", 60),
    ("hours", 3600), ("hour", 3600), ("hrs", 3600), ("hr", 3600), ("h", 3600),
    ("days", 86400), ("day", 86400), ("d", 86400),
]
_UNIT_RE = "|".join(re.escape(u) for u, _ in sorted(DURATION_UNITS, key=lambda x: -len(x[0])))
_DURATION_TOKEN = re.compile(rf"(\d+(?:\.\d+)?)\s*({_UNIT_RE})")


def parse_duration(text: str) -> float:
    """Seconds of a humantime (`30s`, `2m 30s`) or Go (`1m30s`) duration."""
    text = str(text).strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    pos, total = 0, 0.0
    units = dict(DURATION_UNITS)
    for m in _DURATION_TOKEN.finditer(text):
        if text[pos:m.start()].strip():
            raise ValueError(f"not a duration: {text!r}")
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos == 0 or text[pos:].strip():
        raise ValueError(f"not a duration: {text!r}")
    return total


def fmt_s(seconds: float) -> str:
    return f"{seconds:g}s"


def port_of_addr(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def version_tuple(v: str) -> tuple[int, ...]:
    parts = [int(x) for x in re.findall(r"\d+", v)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def strip_compose_interpolation(value: str) -> str:
    """Replaces ${...} with a placeholder so the result parses as a URL."""
    return re.sub(r"\$\{[^}]*\}", "x", value)


def k8s_refs(value: str) -> list[str]:
    """$(NAME) references Kubernetes expands in env values and args."""
    return re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value or "")


def labels_match(selector: dict | None, labels: dict) -> bool:
    """Whether a LabelSelector (matchLabels/matchExpressions) selects labels;
    an empty or missing selector selects nothing here."""
    if not selector:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values) \
                or (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def binary_of(container: dict) -> str | None:
    words = list(container.get("command") or []) + list(container.get("args") or [])
    if isinstance(container.get("command"), str):
        words = container["command"].split()
    for word in words:
        name = os.path.basename(str(word))
        if name in BINARIES:
            return name
    return None


# --------------------------------------------------------------------------
# The binaries and the source


class Binary:
    """What `--help` of a binary says: its flags' env variables and defaults."""

    OPTION = re.compile(r"^\s{2,6}(?:-\w, )?--([a-z0-9][a-z0-9-]*)")
    ENV = re.compile(r"\[env: ([A-Za-z_][A-Za-z0-9_]*)(?:=[^\]]*)?\]")
    DEFAULT = re.compile(r"\[default: ([^\]]*)\]")

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        clean_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C"}
        out = subprocess.run(argv + ["--help"], capture_output=True, text=True, env=clean_env, check=True)
        self.help = out.stdout
        self.options: dict[str, dict[str, str]] = {}
        current = None
        for line in self.help.splitlines():
            m = self.OPTION.match(line)
            if m:
                current = self.options.setdefault(m.group(1), {})
            if current is None:
                continue
            if (e := self.ENV.search(line)):
                current["env"] = e.group(1)
            if (d := self.DEFAULT.search(line)):
                current["default"] = d.group(1)
        self.env = {o["env"]: flag for flag, o in self.options.items() if "env" in o}
        # The log level comes from RUST_LOG (tracing's EnvFilter), which the
        # help mentions in prose rather than as a flag.
        if "RUST_LOG" in self.help:
            self.env.setdefault("RUST_LOG", "(RUST_LOG, log filter)")

    def default(self, flag: str) -> str | None:
        return self.options.get(flag, {}).get("default")

    def flag_of_env(self, env: str) -> str | None:
        return self.env.get(env)


class Facts:
    """What the code says, collected once."""

    def __init__(self, report: Report, orchd: Path, worker: Path) -> None:
        self.orchd = Binary("orchd", [str(orchd), "serve"])
        self.worker = Binary("orch-worker", [str(worker)])
        self.by_binary = {"orchd": self.orchd, "orch-worker": self.worker}
        report.section("What the binaries read (--help)")
        for b in (self.orchd, self.worker):
            report.expect(bool(b.env), f"{b.name}: {len(b.env)} variables: {', '.join(sorted(b.env))}",
                          f"{b.name}: --help lists no [env: ...] variables; is it the right binary?")
        self.http_port = port_of_addr(self.orchd.default("http-addr") or ":0")
        self.grpc_port = port_of_addr(self.orchd.default("grpc-addr") or ":0")
        report.expect(self.http_port > 0 and self.grpc_port > 0,
                      f"orchd defaults: REST port {self.http_port}, gRPC port {self.grpc_port}",
                      "orchd serve --help shows no default for --http-addr/--grpc-addr")
        self.drain = self._worker_duration(report, "drain-timeout")
        self.cancel_grace = self._worker_duration(report, "cancel-grace")
        lib = ROOT / "worker/src/lib.rs"
        m = re.search(r"FINAL_REPORT_TIME:\s*Duration\s*=\s*Duration::from_secs\((\d+)\)",
                      lib.read_text() if lib.exists() else "")
        self.final_report = float(m.group(1)) if m else 0.0
        if m:
            report.ok(f"orch-worker final report allowance: {fmt_s(self.final_report)} (worker/src/lib.rs)")
        else:
            report.note("FINAL_REPORT_TIME not found in worker/src/lib.rs; grace checks leave it out")
        rest = ROOT / "server/src/rest.rs"
        self.routes = set(re.findall(r'\.route\(\s*"([^"]+)"', rest.read_text()))
        report.expect("/healthz" in self.routes, f"REST routes in server/src/rest.rs: {', '.join(sorted(self.routes))}",
                      f"server/src/rest.rs has no .route(\"/healthz\"...) (routes: {sorted(self.routes)})")

    def _worker_duration(self, report: Report, flag: str) -> float:
        raw = self.worker.default(flag)
        if raw is None:
            report.fail(f"orch-worker --help has no default for --{flag}")
            return 0.0
        seconds = parse_duration(raw)
        report.ok(f"orch-worker --{flag} default: {raw}")
        return seconds

    def worker_stop_budget(self, env: dict[str, str]) -> tuple[float, str]:
        """Seconds a worker may take to stop, with the given environment."""
        def value(var: str, default: float) -> float:
            raw = env.get(var)
            if raw is None or "${" in raw:
                return default
            return parse_duration(raw)
        drain = value("ORCH_DRAIN_TIMEOUT", self.drain)
        grace = value("ORCH_CANCEL_GRACE", self.cancel_grace)
        total = drain + grace + self.final_report
        return total, f"drain {fmt_s(drain)} + cancel grace {fmt_s(grace)} + final report {fmt_s(self.final_report)}"


# --------------------------------------------------------------------------
# Environment variables of one container (compose service or k8s container)


def check_env_names(report: Report, facts: Facts, where: str, binary: str,
                    names: dict[str, str], helpers: set[str]) -> None:
    """names: variable -> where it comes from; helpers: variables used only
    to build others ($(NAME) in Kubernetes)."""
    b = facts.by_binary[binary]
    for name, origin in sorted(names.items()):
        if name in b.env:
            report.ok(f"{where}: {name} ({origin}) is read by {binary} ({b.env[name]})")
        elif name in helpers:
            report.ok(f"{where}: {name} ({origin}) only feeds $({name}) in other variables")
        else:
            close = [v for v in b.env if v.replace("_", "") == name.replace("_", "")
                     or name in v or v in name]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            report.fail(f"{where}: {name} ({origin}) is not read by {binary}"
                        f" (it reads {', '.join(sorted(b.env))}){hint}")
    for name in REQUIRED_ENV[binary]:
        report.expect(name in names, f"{where}: sets {name}",
                      f"{where}: does not set {name}, so {binary} would use its 127.0.0.1 default")


# --------------------------------------------------------------------------
# docker-compose.yml


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        out = {}
        for item in env:
            key, _, value = str(item).partition("=")
            out[key] = value
        return out
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


def compose_ports(service: dict) -> list[int]:
    targets = []
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            targets.append(int(p["target"]))
        else:
            spec = str(p).split("/")[0]
            targets.append(int(spec.rsplit(":", 1)[-1]))
    return targets


def check_compose(report: Report, facts: Facts, path: Path) -> dict:
    report.section(f"{path.relative_to(ROOT)}")
    doc = yaml.safe_load(path.read_text())
    # Every string value (keys and comments left out): where ${...} counts.
    text = "\n".join(strings_in(doc))
    services = doc.get("services") or {}
    for name in ("api", "worker", "redis", "rabbitmq"):
        report.expect(name in services, f"service {name} exists", f"no service {name}")
    by_binary = {}
    for name, svc in services.items():
        cmd = svc.get("command") or []
        words = cmd.split() if isinstance(cmd, str) else [str(w) for w in cmd]
        binary = next((os.path.basename(w) for w in words if os.path.basename(w) in BINARIES), None)
        if binary:
            by_binary.setdefault(binary, []).append(name)
    report.expect(by_binary.get("orchd") == ["api"], "service api runs orchd serve",
                  f"services running orchd: {by_binary.get('orchd')} (expected [api])")
    report.expect(by_binary.get("orch-worker") == ["worker"], "service worker runs orch-worker",
                  f"services running orch-worker: {by_binary.get('orch-worker')} (expected [worker])")

    # Credentials: no silent fallback to defaults.
    guards: dict[str, set[str]] = {}
    for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}", text):
        if re.search(r"PASS|PASSWORD|USER|TOKEN|SECRET", m.group(1)):
            guards.setdefault(m.group(1), set()).add(m.group(2)[:2])
    for var, kinds in sorted(guards.items()):
        unguarded = [k for k in kinds if not (k.startswith(":?") or k.startswith("?"))]
        report.expect(not unguarded, f"${{{var}}} is always required (${{{var}:?...}}), never defaulted",
                      f"${{{var}}} is used without a :? guard somewhere: compose would start with an empty or default credential")

    # .env.example: what `cp .env.example .env` gives must cover every
    # required variable, and name nothing compose does not use.
    example = path.parent / ".env.example"
    if report.expect(example.exists(), ".env.example exists", ".env.example is missing"):
        listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", example.read_text(), re.M))
        used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
        required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", text))
        report.expect(required <= listed, f".env.example lists the required {', '.join(sorted(required))}",
                      f".env.example lacks required {', '.join(sorted(required - listed))}")
        report.expect(listed <= used, ".env.example names only variables docker-compose.yml uses",
                      f".env.example names {', '.join(sorted(listed - used))}, which docker-compose.yml never uses")

    images = {}
    for svc_name, binary in (("api", "orchd"), ("worker", "orch-worker")):
        svc = services.get(svc_name)
        if not svc:
            continue
        images[svc_name] = svc.get("image")
        env = compose_env(svc)
        check_env_names(report, facts, f"compose {svc_name}", binary,
                        {k: "environment" for k in env}, set())
        if svc.get("env_file"):
            report.fail(f"compose {svc_name}: env_file hides which variables reach {binary}; use environment:")
        check_urls(report, facts, f"compose {svc_name}", env,
                   lambda host: host in services,
                   lambda host, port: port == service_port_compose(facts, host))
    report.expect(images.get("api") and images.get("api") == images.get("worker"),
                  f"api and worker share the image {images.get('api')}",
                  f"api and worker images differ: {images}")

    api = services.get("api") or {}
    env = compose_env(api)
    http = configured_port(env, "ORCH_HTTP_ADDR", facts.http_port)
    grpc = configured_port(env, "ORCH_GRPC_ADDR", facts.grpc_port)
    targets = compose_ports(api)
    report.expect(sorted(targets) == sorted([http, grpc]),
                  f"api publishes container ports {sorted(targets)} = orchd's REST {http} and gRPC {grpc}",
                  f"api publishes container ports {sorted(targets)}, orchd listens on {http} and {grpc}")
    for name, svc in services.items():
        if name != "api":
            report.expect(not svc.get("ports"), f"{name} publishes no ports",
                          f"{name} publishes ports {svc.get('ports')}: only the API should")
    worker = services.get("worker") or {}
    report.expect("container_name" not in worker, "worker has no container_name (--scale works)",
                  "worker has container_name: --scale worker=N would fail")

    # The API's health check.
    hc = api.get("healthcheck") or {}
    test = hc.get("test") or []
    test_text = " ".join(test) if isinstance(test, list) else str(test)
    paths = re.findall(r"GET (\S+) HTTP", test_text) + re.findall(r"https?://[^/\s]+(/[^\s\"']*)", test_text)
    ports = [int(p) for p in re.findall(r"/dev/tcp/[^/\s]+/(\d+)", test_text)]
    ports += [int(p) for p in re.findall(r"https?://[^:/\s]+:(\d+)", test_text)]
    report.expect(bool(paths) and all(p in facts.routes for p in paths),
                  f"api healthcheck requests {paths}, a REST route",
                  f"api healthcheck requests {paths or 'no path'}; routes are {sorted(facts.routes)}")
    report.expect(bool(ports) and all(p == http for p in ports),
                  f"api healthcheck connects to port {ports}, orchd's REST port",
                  f"api healthcheck connects to {ports or 'no port'}, orchd's REST port is {http}")

    # Start order.
    for svc_name, deps in (("api", ("redis", "rabbitmq")), ("worker", ("api", "rabbitmq"))):
        depends = (services.get(svc_name) or {}).get("depends_on") or {}
        for dep in deps:
            cond = depends.get(dep, {}).get("condition") if isinstance(depends, dict) else None
            report.expect(cond == "service_healthy", f"{svc_name} waits for {dep} to be healthy",
                          f"{svc_name}: depends_on {dep} condition is {cond!r}, expected service_healthy")
            report.expect(bool((services.get(dep) or {}).get("healthcheck")),
                          f"{dep} has a healthcheck", f"{dep} has no healthcheck for service_healthy")
    rabbit_test = json.dumps((services.get("rabbitmq") or {}).get("healthcheck", {}).get("test"))
    report.expect("check_port_connectivity" in rabbit_test,
                  "rabbitmq healthcheck uses check_port_connectivity",
                  "rabbitmq healthcheck should be `rabbitmq-diagnostics -q check_port_connectivity` (ping answers before the port listens)")
    redis_cmd = " ".join(str(w) for w in (services.get("redis") or {}).get("command") or [])
    report.expect("--appendonly yes" in redis_cmd and "--requirepass" in redis_cmd,
                  "redis runs with --appendonly yes and --requirepass",
                  f"redis command lacks --appendonly yes or --requirepass: {redis_cmd!r}")

    # Stop grace.
    wenv = compose_env(worker)
    budget, parts = facts.worker_stop_budget(wenv)
    raw = worker.get("stop_grace_period")
    grace = parse_duration(raw) if raw else 10.0
    report.expect(grace > budget, f"worker stop_grace_period {fmt_s(grace)} > {parts} = {fmt_s(budget)}",
                  f"worker stop_grace_period {fmt_s(grace)} is not above {parts} = {fmt_s(budget)}")
    check_auth_compose(report, doc, services)
    return {"image": images.get("api")}


TRUTHY = {"1", "true", "yes", "on", "y", "t"}


def auth_mode(report: Report, where: str, env: dict[str, str]) -> str | None:
    """The tokens file orchd is given, "" when it runs without authentication
    on purpose, None (after a failure) when neither: orchd would refuse to
    listen on 0.0.0.0."""
    tokens = env.get("ORCH_TOKENS_FILE")
    insecure = str(env.get("ORCH_INSECURE_NO_AUTH", "")).strip().lower() in TRUTHY
    if tokens:
        report.ok(f"{where}: authentication on, tokens file {tokens}")
        return tokens
    if insecure:
        report.note(f"{where}: ORCH_INSECURE_NO_AUTH: orchd serves without authentication")
        return ""
    report.fail(f"{where}: neither ORCH_TOKENS_FILE nor ORCH_INSECURE_NO_AUTH is set: "
                "orchd refuses to listen on a non-loopback address without tokens")
    return None


def check_auth_compose(report: Report, doc: dict, services: dict) -> None:
    api = services.get("api") or {}
    tokens = auth_mode(report, "compose api", compose_env(api))
    if not tokens:
        return
    declared = doc.get("secrets") or {}
    provided = []
    for item in api.get("secrets") or []:
        name = item if isinstance(item, str) else item.get("source")
        target = name if isinstance(item, str) else (item.get("target") or name)
        if not str(target).startswith("/"):
            target = f"/run/secrets/{target}"
        if name in declared:
            provided.append(target)
    for vol in api.get("volumes") or []:
        target = vol.get("target") if isinstance(vol, dict) else (str(vol).split(":") + [""])[1]
        if target:
            provided.append(target)
    ok = any(tokens == t or tokens.startswith(t.rstrip("/") + "/") for t in provided)
    report.expect(ok, f"compose api: {tokens} is provided by a declared secret or volume",
                  f"compose api: ORCH_TOKENS_FILE={tokens}, but no declared secret or volume of api provides it ({provided})")
    wenv = compose_env(services.get("worker") or {})
    report.expect("ORCH_TOKEN" in wenv, "compose worker: ORCH_TOKEN is set (orchd checks tokens)",
                  "compose worker: no ORCH_TOKEN although orchd checks tokens: every report would be refused (401)")


def strings_in(node) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings_in(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings_in(v)]
    return [node] if isinstance(node, str) else []


def configured_port(env: dict[str, str], var: str, default: int) -> int:
    value = env.get(var)
    if value and "${" not in value and "$(" not in value:
        return port_of_addr(value)
    return default


def service_port_compose(facts: Facts, host: str) -> int | None:
    return {"api": facts.grpc_port, "redis": 6379, "rabbitmq": 5672}.get(host)


def check_urls(report: Report, facts: Facts, where: str, env: dict[str, str], host_exists, port_ok) -> None:
    for var, role in URL_VARS.items():
        if var not in env:
            continue
        raw = env[var]
        url = urlsplit(re.sub(r"(?<!\$)\$\([A-Za-z_][A-Za-z0-9_]*\)", "x", strip_compose_interpolation(raw)))
        expected_scheme = {"redis": ("redis", "rediss"), "amqp": ("amqp", "amqps"), "grpc": ("http", "https")}[role]
        if url.scheme not in expected_scheme:
            report.fail(f"{where}: {var} has scheme {url.scheme!r}, expected {'/'.join(expected_scheme)}")
            continue
        host = (url.hostname or "").split(".")[0]
        port = url.port or DEFAULT_SCHEME_PORT.get(url.scheme)
        if role == "grpc":
            port = url.port
        if not report.expect(host_exists(host), f"{where}: {var} points at {host}, which exists",
                             f"{where}: {var} points at host {url.hostname!r}, which is not a service here"):
            continue
        report.expect(port_ok(host, port), f"{where}: {var} uses port {port} of {host}",
                      f"{where}: {var} uses port {port}, which {host} does not serve")


# --------------------------------------------------------------------------
# k8s/


class Manifests:
    def __init__(self, report: Report, folder: Path) -> None:
        self.report = report
        self.files = sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml"))
        self.docs: list[tuple[Path, dict]] = []
        for path in self.files:
            for doc in yaml.safe_load_all(path.read_text()):
                if doc:
                    self.docs.append((path, doc))

    def of_kind(self, *kinds: str) -> list[dict]:
        return [d for _, d in self.docs if d.get("kind") in kinds]

    def named(self, kind: str, name: str) -> dict | None:
        return next((d for d in self.of_kind(kind) if d["metadata"]["name"] == name), None)

    def secret_keys(self, name: str) -> set[str] | None:
        s = self.named("Secret", name)
        if s is None:
            return None
        return set((s.get("data") or {}).keys()) | set((s.get("stringData") or {}).keys())

    def configmap_keys(self, name: str) -> set[str] | None:
        c = self.named("ConfigMap", name)
        if c is None:
            return None
        return set((c.get("data") or {}).keys()) | set((c.get("binaryData") or {}).keys())

    def configmap_value(self, name: str, key: str) -> str | None:
        c = self.named("ConfigMap", name)
        return None if c is None else (c.get("data") or {}).get(key)


def pod_spec(workload: dict) -> dict:
    spec = workload["spec"]["template"]["spec"]
    return spec


def all_containers(spec: dict) -> list[dict]:
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def check_k8s(report: Report, facts: Facts, folder: Path, compose_image: str | None) -> None:
    report.section(f"{folder.relative_to(ROOT)}/")
    kustomizations = [p.name for p in folder.iterdir() if p.name.lower().startswith("kustomization.")]
    report.expect(not kustomizations, "no kustomization file (kubectl apply -f k8s/ applies the plain files)",
                  f"{kustomizations} in {folder.name}/: `kubectl apply -f k8s/` would try to apply it as an object")
    m = Manifests(report, folder)
    namespaces = m.of_kind("Namespace")
    if not report.expect(len(namespaces) == 1, f"one Namespace: {[n['metadata']['name'] for n in namespaces]}",
                         f"expected one Namespace, found {len(namespaces)}"):
        return
    ns = namespaces[0]["metadata"]["name"]
    first_file = m.files[0]
    report.expect(any(d.get("kind") == "Namespace" for p, d in m.docs if p == first_file),
                  f"the Namespace is in {first_file.name}, applied first",
                  f"the Namespace is not in {first_file.name}, the first file applied")
    for path, doc in m.docs:
        kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
        if kind in NAMESPACE_KINDS:
            continue
        report.expect(doc.get("metadata", {}).get("namespace") == ns, f"{kind}/{name} is in {ns}",
                      f"{path.name}: {kind}/{name} has namespace {doc.get('metadata', {}).get('namespace')!r}, expected {ns}")

    services = {s["metadata"]["name"]: s for s in m.of_kind("Service")}
    workloads = m.of_kind(*WORKLOAD_KINDS)
    hpa_targets = {(h["spec"]["scaleTargetRef"]["kind"], h["spec"]["scaleTargetRef"]["name"]): h
                   for h in m.of_kind("HorizontalPodAutoscaler")}
    images = {}

    for w in workloads:
        kind, wname = w["kind"], w["metadata"]["name"]
        spec = pod_spec(w)
        labels = w["spec"]["template"]["metadata"].get("labels") or {}
        report.expect(labels_match(w["spec"].get("selector"), labels),
                      f"{kind}/{wname}: selector matches its pod labels",
                      f"{kind}/{wname}: selector {w['spec'].get('selector')} does not match pod labels {labels}")
        check_restricted(report, f"{kind}/{wname}", spec)
        for c in all_containers(spec):
            where = f"{kind}/{wname} container {c['name']}"
            check_resources(report, where, c)
            env_names, helpers = check_env_refs(report, m, where, c)
            binary = binary_of(c)
            if not binary:
                continue
            images[binary] = c.get("image")
            check_env_names(report, facts, where, binary, env_names, helpers)
            env_values = effective_env(m, c)
            check_urls(report, facts, where, env_values,
                       lambda host: host in services,
                       lambda host, port: port in [p["port"] for p in services[host]["spec"].get("ports", [])])
            sc = c.get("securityContext") or {}
            report.expect(sc.get("readOnlyRootFilesystem") is True, f"{where}: read-only root filesystem",
                          f"{where}: readOnlyRootFilesystem is not true (the binaries write nothing outside /tmp)")
            if binary == "orchd":
                check_api_container(report, facts, where, c, env_values)
            if binary == "orch-worker":
                budget, parts = facts.worker_stop_budget(env_values)
                grace = spec.get("terminationGracePeriodSeconds", 30)
                report.expect(grace > budget,
                              f"{kind}/{wname}: terminationGracePeriodSeconds {grace} > {parts} = {fmt_s(budget)}",
                              f"{kind}/{wname}: terminationGracePeriodSeconds {grace} is not above {parts} = {fmt_s(budget)}")
        if (kind, wname) in hpa_targets:
            report.expect("replicas" not in w["spec"], f"{kind}/{wname}: no replicas field (the HPA owns it)",
                          f"{kind}/{wname}: sets replicas although an HPA scales it: every apply resets the HPA's choice")
        if kind == "StatefulSet":
            svc = w["spec"].get("serviceName")
            report.expect(svc in services and services[svc]["spec"].get("clusterIP") == "None",
                          f"{kind}/{wname}: serviceName {svc} is a headless Service",
                          f"{kind}/{wname}: serviceName {svc!r} is not a headless Service in k8s/")
            report.expect(bool(w["spec"].get("volumeClaimTemplates")), f"{kind}/{wname}: has volumeClaimTemplates",
                          f"{kind}/{wname}: no volumeClaimTemplates: its data would not survive a restart")

    for b in BINARIES:
        report.expect(b in images, f"a container runs {b}", f"no container in k8s/ runs {b}")
    if images.get("orchd") and images.get("orch-worker"):
        report.expect(images["orchd"] == images["orch-worker"] == (compose_image or images["orchd"]),
                      f"api, worker and compose use the image {images['orchd']}",
                      f"images differ: k8s api {images['orchd']}, k8s worker {images['orch-worker']}, compose {compose_image}")

    check_selectors(report, m, workloads, services)
    check_auth_k8s(report, m, workloads)
    redis = m.named("StatefulSet", "redis")
    if redis:
        args = " ".join(str(a) for a in (pod_spec(redis)["containers"][0].get("args") or []))
        report.expect(re.search(r"--appendonly\s+yes", args) is not None, "redis: --appendonly yes",
                      f"redis: AOF not enabled (args {args!r})")


def effective_env(m: Manifests, c: dict) -> dict[str, str]:
    """Literal values a container sees (envFrom ConfigMaps, then env values)."""
    out: dict[str, str] = {}
    for src in c.get("envFrom") or []:
        if "configMapRef" in src:
            cm = m.named("ConfigMap", src["configMapRef"]["name"])
            for k, v in ((cm or {}).get("data") or {}).items():
                out[src.get("prefix", "") + k] = str(v)
    for e in c.get("env") or []:
        if "value" in e:
            out[e["name"]] = str(e["value"])
        elif "configMapKeyRef" in (e.get("valueFrom") or {}):
            ref = e["valueFrom"]["configMapKeyRef"]
            v = m.configmap_value(ref["name"], ref["key"])
            if v is not None:
                out[e["name"]] = str(v)
    return out


def check_env_refs(report: Report, m: Manifests, where: str, c: dict) -> tuple[dict[str, str], set[str]]:
    """Resolves every env source of a container; returns variable -> origin
    and the variables used only through $(NAME)."""
    names: dict[str, str] = {}
    for src in c.get("envFrom") or []:
        for kind, ref_key, keys_of in (("ConfigMap", "configMapRef", m.configmap_keys),
                                       ("Secret", "secretRef", m.secret_keys)):
            if ref_key not in src:
                continue
            ref = src[ref_key]
            keys = keys_of(ref["name"])
            if keys is None:
                if not ref.get("optional"):
                    report.fail(f"{where}: envFrom {kind} {ref['name']} is not defined in k8s/")
                continue
            report.ok(f"{where}: envFrom {kind} {ref['name']} exists ({len(keys)} keys)")
            for k in keys:
                names[src.get("prefix", "") + k] = f"{kind} {ref['name']}"
    defined_before: set[str] = set(names)
    referenced: set[str] = set()
    for e in c.get("env") or []:
        vf = e.get("valueFrom") or {}
        origin = "value"
        for kind, ref_key, keys_of in (("ConfigMap", "configMapKeyRef", m.configmap_keys),
                                       ("Secret", "secretKeyRef", m.secret_keys)):
            if ref_key in vf:
                ref = vf[ref_key]
                keys = keys_of(ref["name"])
                origin = f"{kind} {ref['name']}/{ref['key']}"
                if keys is None or ref["key"] not in keys:
                    if not ref.get("optional"):
                        report.fail(f"{where}: {e['name']} reads {origin}, which is not defined in k8s/")
                else:
                    report.ok(f"{where}: {e['name']} <- {origin} exists")
        for ref in k8s_refs(str(e.get("value", ""))):
            referenced.add(ref)
            report.expect(ref in defined_before,
                          f"{where}: {e['name']} uses $({ref}), defined before it",
                          f"{where}: {e['name']} uses $({ref}), which is not defined earlier in env/envFrom: "
                          "Kubernetes would leave it as literal text")
        names[e["name"]] = origin
        defined_before.add(e["name"])
    for word in list(c.get("command") or []) + list(c.get("args") or []):
        for ref in k8s_refs(str(word)):
            referenced.add(ref)
            report.expect(ref in defined_before, f"{where}: argument uses $({ref}), defined in env",
                          f"{where}: argument uses $({ref}), which is not defined in env")
    helpers = {n for n in referenced if n in names}
    return names, helpers


def check_api_container(report: Report, facts: Facts, where: str, c: dict, env: dict[str, str]) -> None:
    http = configured_port(env, "ORCH_HTTP_ADDR", facts.http_port)
    grpc = configured_port(env, "ORCH_GRPC_ADDR", facts.grpc_port)
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
    report.expect(sorted(ports.values()) == sorted([http, grpc]),
                  f"{where}: containerPorts {ports} = orchd's REST {http} and gRPC {grpc}",
                  f"{where}: containerPorts {ports}, orchd listens on REST {http} and gRPC {grpc}")

    def resolve(port):
        return ports.get(port) if isinstance(port, str) else port

    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = c.get(kind)
        if not probe:
            continue
        if "httpGet" in probe:
            path = probe["httpGet"].get("path", "/")
            port = resolve(probe["httpGet"].get("port"))
            report.expect(path in facts.routes, f"{where}: {kind} GET {path} is a REST route",
                          f"{where}: {kind} GET {path} is not a route of server/src/rest.rs ({sorted(facts.routes)})")
            report.expect(port == http, f"{where}: {kind} httpGet port {port} is the REST port",
                          f"{where}: {kind} httpGet port {probe['httpGet'].get('port')} ({port}) is not the REST port {http}")
            bound = path in DEPENDENCY_BOUND_PATHS
        elif "grpc" in probe:
            port = probe["grpc"].get("port")
            report.expect(port == grpc, f"{where}: {kind} grpc port {port} is the gRPC port (grpc.health.v1)",
                          f"{where}: {kind} grpc port {port} is not the gRPC port {grpc}")
            bound = True  # the whole server's status follows Redis and RabbitMQ
        elif "tcpSocket" in probe:
            port = resolve(probe["tcpSocket"].get("port"))
            report.expect(port in (http, grpc), f"{where}: {kind} tcpSocket port {port} is served",
                          f"{where}: {kind} tcpSocket port {port} is neither {http} nor {grpc}")
            bound = False
        else:
            bound = False
        if kind == "livenessProbe":
            report.expect(not bound, f"{where}: liveness does not depend on Redis/RabbitMQ",
                          f"{where}: liveness follows Redis/RabbitMQ health: an outage would restart every replica")
        if kind == "readinessProbe":
            report.expect(bound, f"{where}: readiness follows Redis/RabbitMQ health",
                          f"{where}: readiness does not follow dependency health (use grpc or /healthz)")
    report.expect(bool(c.get("readinessProbe")) and bool(c.get("livenessProbe")),
                  f"{where}: has readiness and liveness probes", f"{where}: lacks a readiness or liveness probe")


def check_resources(report: Report, where: str, c: dict) -> None:
    res = c.get("resources") or {}
    missing = [f"{k}.{r}" for k in ("requests", "limits") for r in ("cpu", "memory") if r not in (res.get(k) or {})]
    report.expect(not missing, f"{where}: requests and limits for cpu and memory",
                  f"{where}: missing resources {', '.join(missing)}")


def check_restricted(report: Report, where: str, spec: dict) -> None:
    """The Pod Security Standard "restricted" profile, as enforced on the
    namespace: a pod that fails it would be refused at admission."""
    problems = []
    psc = spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(f"{key}")
    for v in spec.get("volumes") or []:
        types = [k for k in v if k != "name"]
        if not set(types) <= RESTRICTED_VOLUMES:
            problems.append(f"volume {v['name']} of type {types}")
    if psc.get("runAsUser") == 0:
        problems.append("pod runAsUser 0")
    for c in all_containers(spec):
        sc = c.get("securityContext") or {}
        name = c["name"]
        if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
            problems.append(f"{name}: runAsNonRoot not true")
        if sc.get("runAsUser") == 0:
            problems.append(f"{name}: runAsUser 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation not false")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{name}: capabilities.drop lacks ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {caps.get('add')}")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile {seccomp!r}")
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                problems.append(f"{name}: hostPort {p['hostPort']}")
    report.expect(not problems, f"{where}: meets the restricted Pod Security Standard",
                  f"{where}: violates the restricted Pod Security Standard: {'; '.join(problems)}")


def check_auth_k8s(report: Report, m: Manifests, workloads: list[dict]) -> None:
    secured = False
    workers = []
    for w in workloads:
        spec = pod_spec(w)
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for c in all_containers(spec):
            where = f"{w['kind']}/{w['metadata']['name']} container {c['name']}"
            binary = binary_of(c)
            if binary == "orch-worker":
                workers.append((where, c))
            if binary != "orchd":
                continue
            tokens = auth_mode(report, where, effective_env(m, c))
            if not tokens:
                continue
            secured = True
            found = None
            for mount in c.get("volumeMounts") or []:
                base = mount["mountPath"].rstrip("/")
                if tokens.startswith(base + "/"):
                    found = (mount, volumes.get(mount["name"]), tokens[len(base) + 1:])
            if not report.expect(found is not None, f"{where}: {tokens} is under a volumeMount",
                                 f"{where}: ORCH_TOKENS_FILE={tokens} is under no volumeMount"):
                continue
            mount, volume, rel = found
            secret = (volume or {}).get("secret")
            if not report.expect(secret is not None, f"{where}: {tokens} comes from a Secret volume",
                                 f"{where}: the volume {mount['name']} holding {tokens} is not a Secret"):
                continue
            keys = m.secret_keys(secret.get("secretName", "")) or set()
            paths = {i["path"]: i["key"] for i in secret.get("items") or []} or {k: k for k in keys}
            report.expect(paths.get(rel) in keys,
                          f"{where}: {tokens} is key {paths.get(rel)!r} of Secret {secret.get('secretName')}",
                          f"{where}: Secret {secret.get('secretName')} provides no key at {rel!r} ({paths})")
    if secured:
        for where, c in workers:
            names = {e["name"] for e in c.get("env") or []}
            names |= {k for src in c.get("envFrom") or [] if "secretRef" in src
                      for k in (m.secret_keys(src["secretRef"]["name"]) or set())}
            report.expect("ORCH_TOKEN" in names, f"{where}: ORCH_TOKEN is set (orchd checks tokens)",
                          f"{where}: no ORCH_TOKEN although orchd checks tokens: every report would be refused (401)")


def check_selectors(report: Report, m: Manifests, workloads: list[dict], services: dict[str, dict]) -> None:
    def matching(selector):
        return [w for w in workloads if labels_match(selector, w["spec"]["template"]["metadata"].get("labels") or {})]

    for name, svc in services.items():
        sel = svc["spec"].get("selector")
        targets = matching({"matchLabels": sel}) if sel else []
        if not report.expect(bool(targets), f"Service/{name} selects {[w['metadata']['name'] for w in targets]}",
                             f"Service/{name}: selector {sel} matches no pod template: it would have no endpoints"):
            continue
        containers = [c for w in targets for c in all_containers(pod_spec(w))]
        named = {p.get("name"): p["containerPort"] for c in containers for p in c.get("ports") or []}
        numbers = set(named.values())
        for p in svc["spec"].get("ports", []):
            tp = p.get("targetPort", p["port"])
            ok = tp in named if isinstance(tp, str) else tp in numbers
            report.expect(ok, f"Service/{name} port {p['port']} -> {tp} exists in its pods",
                          f"Service/{name} port {p['port']}: targetPort {tp!r} is not a containerPort of its pods ({named})")
    for pdb in m.of_kind("PodDisruptionBudget"):
        targets = matching(pdb["spec"].get("selector"))
        report.expect(bool(targets), f"PodDisruptionBudget/{pdb['metadata']['name']} covers {[w['metadata']['name'] for w in targets]}",
                      f"PodDisruptionBudget/{pdb['metadata']['name']}: selector matches no pods")
    for np in m.of_kind("NetworkPolicy"):
        targets = matching(np["spec"].get("podSelector"))
        nname = np["metadata"]["name"]
        if not report.expect(bool(targets), f"NetworkPolicy/{nname} applies to {[w['metadata']['name'] for w in targets]}",
                             f"NetworkPolicy/{nname}: podSelector matches no pods"):
            continue
        cports = {p["containerPort"] for w in targets for c in all_containers(pod_spec(w)) for p in c.get("ports") or []}
        for rule in np["spec"].get("ingress") or []:
            for peer in rule.get("from") or []:
                if "podSelector" in peer:
                    report.expect(bool(matching(peer["podSelector"])),
                                  f"NetworkPolicy/{nname}: allowed peer {peer['podSelector'].get('matchLabels')} exists",
                                  f"NetworkPolicy/{nname}: peer {peer['podSelector']} matches no pods")
            for p in rule.get("ports") or []:
                report.expect(p.get("port") in cports, f"NetworkPolicy/{nname}: port {p.get('port')} is served",
                              f"NetworkPolicy/{nname}: port {p.get('port')} is not a containerPort of {nname} ({sorted(cports)})")
    for hpa in m.of_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = m.named(ref["kind"], ref["name"])
        if not report.expect(target is not None, f"HorizontalPodAutoscaler/{hpa['metadata']['name']} scales {ref['kind']}/{ref['name']}",
                             f"HorizontalPodAutoscaler/{hpa['metadata']['name']}: {ref['kind']}/{ref['name']} is not defined"):
            continue
        uses_cpu = any(mt.get("resource", {}).get("name") == "cpu" for mt in hpa["spec"].get("metrics", []))
        if uses_cpu:
            ok = all("cpu" in ((c.get("resources") or {}).get("requests") or {}) for c in pod_spec(target)["containers"])
            report.expect(ok, f"HorizontalPodAutoscaler/{hpa['metadata']['name']}: its pods request cpu",
                          f"HorizontalPodAutoscaler/{hpa['metadata']['name']}: CPU utilization needs cpu requests on every container")


# --------------------------------------------------------------------------
# Dockerfile and .dockerignore


def check_dockerfile(report: Report, path: Path, cargo: str) -> None:
    report.section(f"{path.relative_to(ROOT)} and .dockerignore")
    text = path.read_text()
    joined = re.sub(r"\\\n", " ", text)
    meta = json.loads(subprocess.run([cargo, "metadata", "--format-version", "1"], cwd=ROOT,
                                     capture_output=True, text=True, check=True).stdout)
    members = set(meta["workspace_members"])
    owners = {}
    for pkg in meta["packages"]:
        if pkg["id"] in members:
            for t in pkg["targets"]:
                if "bin" in t["kind"]:
                    owners[t["name"]] = pkg["name"]
    steps = [line for line in joined.splitlines() if re.search(r"cargo (chef cook|build)", line)]
    for binary in ("orchd", "orch-worker", "orchctl"):
        pkg = owners.get(binary)
        if not report.expect(pkg is not None, f"{binary} is a bin of workspace package {pkg}",
                             f"no workspace package has a bin named {binary}"):
            continue
        for step in steps:
            kind = "cook" if "chef cook" in step else "build"
            report.expect(re.search(rf"(-p|--package)[\s=]+{re.escape(pkg)}(\s|$)", step) is not None
                          or "--workspace" in step,
                          f"Dockerfile {kind} step builds {pkg}",
                          f"Dockerfile {kind} step does not build {pkg} (for {binary})")
        report.expect(f"target/release/{binary}" in joined, f"Dockerfile copies target/release/{binary}",
                      f"Dockerfile does not copy target/release/{binary}")

    m = re.search(r"^ARG RUST_VERSION=(\S+)", text, re.M)
    needed = max((p.get("rust_version") or "0" for p in meta["packages"]), key=version_tuple)
    needers = [p["name"] for p in meta["packages"] if (p.get("rust_version") or "0") == needed]
    if report.expect(m is not None, f"Dockerfile pins ARG RUST_VERSION={m.group(1) if m else ''}",
                     "Dockerfile has no `ARG RUST_VERSION=...`"):
        report.expect(version_tuple(m.group(1)) >= version_tuple(needed),
                      f"RUST_VERSION {m.group(1)} >= {needed}, the newest rust-version in the workspace and Cargo.lock",
                      f"RUST_VERSION {m.group(1)} is older than {needed}, needed by {', '.join(needers[:5])}")
    stages = re.findall(r"^FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    names = {alias.lower() for _, alias in stages if alias}
    froms = [image for image, _ in stages if image.lower() not in names]
    report.expect(bool(froms) and all("bookworm" in f for f in froms),
                  f"every stage is Debian bookworm ({', '.join(froms)}): builder and runtime glibc match",
                  f"stages {froms}: builder and runtime must both be bookworm (glibc)")
    report.expect(froms and froms[-1] == "debian:bookworm-slim", "the final image is debian:bookworm-slim",
                  f"the final image is {froms[-1] if froms else None}")
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    uid = user[-1].split(":")[0] if user else ""
    report.expect(uid.isdigit() and int(uid) != 0, f"runs as numeric non-root USER {user[-1] if user else ''}",
                  f"USER {user} must be a numeric non-root uid (Kubernetes runAsNonRoot needs it numeric)")
    k8s_uids = set()
    for p in sorted((ROOT / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(p.read_text()):
            if doc and doc.get("kind") in WORKLOAD_KINDS:
                spec = pod_spec(doc)
                for c in spec.get("containers", []):
                    if binary_of(c):
                        k8s_uids.add((c.get("securityContext") or {}).get("runAsUser",
                                     (spec.get("securityContext") or {}).get("runAsUser")))
    report.expect(k8s_uids == {int(uid)} if uid.isdigit() else False,
                  f"k8s runs api/worker as the image's uid {uid}",
                  f"k8s runAsUser {k8s_uids} differs from the Dockerfile's USER {uid}")

    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]

    def ignored(name: str) -> bool:
        result = False
        for pat in ignore:
            neg = pat.startswith("!")
            pat = pat.lstrip("!").rstrip("/")
            for candidate in (pat, pat.removeprefix("**/")):
                if fnmatch.fnmatch(name, candidate):
                    result = not neg
        return result

    for name in ("target", ".orch", ".git", ".env"):
        report.expect(ignored(name), f".dockerignore keeps {name} out", f".dockerignore does not exclude {name}")
    inputs = {"Cargo.toml", "Cargo.lock", "build.rs", "proto"}
    for pkg in meta["packages"]:
        if pkg["id"] in members:
            rel = Path(pkg["manifest_path"]).parent.relative_to(ROOT)
            inputs.add(str(rel).split("/")[0] if str(rel) != "." else "src")
    inputs.discard(".")
    dropped = sorted(n for n in inputs if ignored(n))
    report.expect(not dropped, f".dockerignore keeps the build inputs: {', '.join(sorted(inputs))}",
                  f".dockerignore excludes build inputs: {dropped}")


# --------------------------------------------------------------------------


def main() -> int:
    global ROOT
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orchd", default="target/debug/orchd")
    parser.add_argument("--worker", default="target/debug/orch-worker")
    parser.add_argument("--cargo", default=os.environ.get("CARGO", "cargo"))
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="repository root holding the deployment files (default: this script's)")
    args = parser.parse_args()
    ROOT = args.root.resolve()
    report = Report()
    facts = Facts(report, (ROOT / args.orchd) if not os.path.isabs(args.orchd) else Path(args.orchd),
                  (ROOT / args.worker) if not os.path.isabs(args.worker) else Path(args.worker))
    compose = check_compose(report, facts, ROOT / "docker-compose.yml")
    check_k8s(report, facts, ROOT / "k8s", compose.get("image"))
    check_dockerfile(report, ROOT / "Dockerfile", args.cargo)
    print()
    if report.errors:
        print(f"names check: {len(report.errors)} of {report.checked} checks FAILED:", file=sys.stderr)
        for e in report.errors:
            print(f"  - {e}", file=sys.stderr)
        return 1
    print(f"names check: all {report.checked} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
