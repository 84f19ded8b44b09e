#!/usr/bin/env bash
# Create .venv and install the pinned requirements and the package (idempotent).
#   bash scripts/setup.sh         runtime
#   bash scripts/setup.sh --dev   runtime + test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
req=requirements.txt
[ "${1:-}" = "--dev" ] && req=requirements-dev.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$req"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
