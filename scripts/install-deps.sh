#!/usr/bin/env bash
# Install what the test suite needs on Debian/Ubuntu, if it is missing:
#   redis-server      (redis-server, redis-cli)
#   rabbitmq-server   (/usr/lib/rabbitmq/bin/*, Erlang, epmd)
#   util-linux        (setpriv: test servers die with the test process)
#   iproute2          (ss: scripts/services.sh checks ports with it; ip netns
#                     for the multi-host test)
#   curl              (the README test runs the README's curl examples)
#
# Idempotent: does nothing (not even `apt-get update`) when all is present.
# Non-interactive (works as root with no stdin, e.g. in CI; uses `sudo -n`
# otherwise). Never starts a daemon: the packages' init scripts are blocked
# with a temporary policy-rc.d during the install; the tests start their own
# isolated servers.
set -euo pipefail

log() { echo "[install-deps] $*" >&2; }

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
[[ -x /usr/lib/rabbitmq/bin/rabbitmq-server && -x /usr/lib/rabbitmq/bin/rabbitmqctl ]] ||
  missing+=(rabbitmq-server)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
command -v ss >/dev/null 2>&1 || missing+=(iproute2)
command -v curl >/dev/null 2>&1 || missing+=(curl)

if ((${#missing[@]} == 0)); then
  log "all present: redis-server, rabbitmq-server, setpriv, ss, curl"
  exit 0
fi

log "missing packages: ${missing[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
  log "apt-get not found: install ${missing[*]} with your package manager"
  exit 1
fi

SUDO=()
if ((EUID != 0)); then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    log "not root and no password-less sudo: install ${missing[*]} as root"
    exit 1
  fi
fi

# Keep package scripts from starting services (honoured by invoke-rc.d and
# deb-systemd-invoke). Leave an existing policy-rc.d alone; remove ours after.
POLICY=/usr/sbin/policy-rc.d
if [[ ! -e $POLICY ]]; then
  "${SUDO[@]}" sh -c "printf '#!/bin/sh\n# temporary, from scripts/install-deps.sh\nexit 101\n' >'$POLICY' && chmod 755 '$POLICY'"
  trap '"${SUDO[@]}" rm -f "$POLICY"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
apt_opts=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

log "apt-get update"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null
log "apt-get install ${missing[*]}"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" \
  --no-install-recommends "${missing[@]}" </dev/null

# Verify.
command -v redis-server >/dev/null
command -v redis-cli >/dev/null
[[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]]
command -v setpriv >/dev/null
command -v ss >/dev/null
log "done"
