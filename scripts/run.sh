#!/usr/bin/env bash
# The main job on the embedded default: install into .venv, create the store in ./hypercacheio-data,
# and run the node daemon in the foreground on 127.0.0.1 (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[server]'
export HYPERCACHEIO_SQLITE_PATH=${HYPERCACHEIO_SQLITE_PATH:-$PWD/hypercacheio-data}
.venv/bin/hypercacheio install
exec .venv/bin/hypercacheio node run "$@"
