#!/usr/bin/env bash
# The main job on the embedded default: install into .venv, create the store in ./hypercacheio-data,
# and run the node daemon in the foreground on 127.0.0.1 (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
make_venv server
export HYPERCACHEIO_SQLITE_PATH=${HYPERCACHEIO_SQLITE_PATH:-$PWD/hypercacheio-data}
.venv/bin/hypercacheio install
exec .venv/bin/hypercacheio node run "$@"
