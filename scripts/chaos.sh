#!/usr/bin/env bash
# Long runs of the cluster fault suite (issue 11), reproducible by seed:
#   scripts/chaos.sh --minutes M --seed S [--mode ps|aa] [--nodes N] [--clients C] [--out DIR]
# --mode ps: one primary and N-1 secondaries (issue 9); --mode aa: N active-active nodes
# (issue 10), a fault proxy per directed pair of replication links, anti-entropy every 2 s.
# Starts a cluster of real nodes with a fault proxy on every replication link, runs clients on
# every host while a nemesis draws faults from the seed (kill -9, SIGSTOP, partitions, slow
# links, lost answers, a full disk when root, a wiped node, clock skew: a node restarted with
# a test-only clock offset of 0.5-1.5 s either way), heals, waits for quiescence and
# checks the history. Writes report.txt, timeline.png and history.jsonl into a directory it
# prints (--out, or a new one under $TMPDIR). Exit status 0: the mode kept its guarantees.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
make_venv dev,server
PYTHONPATH=tests exec .venv/bin/python -m cluster.run "$@"
