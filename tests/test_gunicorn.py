"""examples/django_project under real gunicorn with 4 worker processes and 2,000 requests.

Every worker has its own L1 and its own connection; they share only the store. The counter
made with ``incr`` and the counter updated under ``cache.lock`` must both end at exactly
2,000, every ``incr`` must have returned a distinct value, and no two workers may ever have
been inside the locked section at once.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gunicorn")
pytest.importorskip("django")

REPO = Path(__file__).resolve().parent.parent
PROJECT = REPO / "examples" / "django_project"
WORKERS = 4
REQUESTS = 2000
CLIENT_THREADS = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(port: int, path: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise AssertionError(f"GET {path}: {response.status} {body[:500]!r}")
        return json.loads(body)  # type: ignore[no-any-return]
    finally:
        conn.close()


def wait_until_serving(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gunicorn exited ({proc.returncode}):\n{log.read_text()}")
        try:
            get_json(port, "/health")
            return
        except (OSError, AssertionError):
            time.sleep(0.1)
    raise AssertionError(f"gunicorn did not answer within 60 s:\n{log.read_text()}")


@pytest.mark.timeout(600)
def test_four_gunicorn_workers_share_counters_and_locks(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERCACHEIO_")}
    env.update(
        DEMO_CACHE_DIR=str(tmp_path / "store"),
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(PROJECT)]),
        DJANGO_SETTINGS_MODULE="demo.settings",
    )
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "demo.wsgi:application",
             "--workers", str(WORKERS), "--bind", f"127.0.0.1:{port}",
             "--timeout", "120", "--graceful-timeout", "10", "--backlog", "2048"],
            cwd=PROJECT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(proc, port, log)
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            answers = list(pool.map(lambda _: get_json(port, "/hit"), range(REQUESTS)))
        totals = get_json(port, "/totals")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    assert len(answers) == REQUESTS
    assert sorted(a["hits"] for a in answers) == list(range(1, REQUESTS + 1))
    assert totals == {"hits": REQUESTS, "locked_counter": REQUESTS, "overlaps": 0}
    pids = {a["pid"] for a in answers}
    assert 2 <= len(pids) <= WORKERS, pids  # several worker processes really served
    assert proc.returncode == 0, log.read_text()

    # The app's management command reads the same store from CACHES.
    stats = subprocess.run(
        [sys.executable, "manage.py", "hypercacheio", "stats", "--json"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=120, check=True)
    figures = json.loads(stats.stdout)
    assert figures["entries"] == 2  # hits and locked_counter (the marker was deleted)
    assert figures["locks"] == 0
