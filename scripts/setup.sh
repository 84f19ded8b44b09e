#!/usr/bin/env bash
# Create .venv and install the pinned requirements and the package (idempotent).
#   bash scripts/setup.sh         runtime
#   bash scripts/setup.sh --dev   runtime + test tools
# The default corpus does not depend on what is installed here: its pinned sources are fetched by
# exact version into the data directory on first use (see deepseek_moe/data/pinned.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
req=requirements.txt
[ "${1:-}" = "--dev" ] && req=requirements-dev.txt
"${pip[@]}" -r "$req"
"${pip[@]}" --no-deps --no-build-isolation -e .
