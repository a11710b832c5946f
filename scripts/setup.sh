#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine: system packages, the virtualenv, and the
# PostgreSQL / RabbitMQ services (started if they are not running, management plugin enabled).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(postgresql rabbitmq-server dcmtk orthanc docker-compose curl)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  # Debian's orthanc package starts a server on 4242/8042: tests start their own.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  if dpkg -s orthanc >/dev/null 2>&1; then
    $SUDO service orthanc stop >/dev/null 2>&1 || pkill -x Orthanc || true
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python packages"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# Services: start what is missing (the native stack and the tests need both).
.venv/bin/python - <<'PY'
from scripts.native import ensure_postgres, ensure_rabbitmq
ensure_postgres()
ensure_rabbitmq()
print("setup: PostgreSQL and RabbitMQ (with the management dashboard) are up")
PY
