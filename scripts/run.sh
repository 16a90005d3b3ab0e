#!/usr/bin/env bash
# The main job: install into .venv (skipped when nothing changed), create the store and run
# the node daemon in the foreground on 127.0.0.1 (Ctrl-C stops it).
# The store is where every other command looks too: HYPERCACHEIO_SQLITE_PATH if set, else
# $XDG_CACHE_HOME/hypercacheio (~/.cache/hypercacheio); `install` prints it as its first line.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
make_venv server
.venv/bin/hypercacheio install
exec .venv/bin/hypercacheio node run "$@"
