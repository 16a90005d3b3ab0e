#!/usr/bin/env bash
# The test command: from nothing to a full run (lint, types, tests). Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
make_venv dev,server,django,flask
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
