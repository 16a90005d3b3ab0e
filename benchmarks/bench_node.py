"""The node API side by side with redis-py, and under wrk next to a bare aiohttp route.

Usage: .venv/bin/python benchmarks/bench_node.py [--n 5000] [--rounds 10] [--wrk-seconds 3]
       [--transport urllib3|fast|both]

Starts, in this run and on 127.0.0.1: a hypercacheio node (TCP and a unix socket), a
redis-server (apt-get install -y redis-server; pip install redis), and a bare aiohttp
hello-world route; then prints p50/p99 per operation and wrk throughput at 32 connections,
with the ratios the issue sets as targets. ``--transport both`` measures RemoteCache over
each of its two transports in the same interleaved run and prints fast/urllib3 ratios.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from hypercacheio import RemoteCache  # noqa: E402

TOKEN = "bench-token-0123456789"
BARE_APP = """
import sys
from aiohttp import web
async def hello(request):
    return web.Response(body=b"hello", content_type="application/octet-stream")
app = web.Application()
app.router.add_get("/hello", hello)
try:  # the same stack as the node: uvloop when it is installed
    import uvloop
    loop = uvloop.new_event_loop()
except ImportError:
    loop = None
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            loop=loop)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answered on port {port}")


def timed(fn: Callable[[int], Any], start: int, n: int) -> list[int]:
    """Nanoseconds of each of ``n`` calls ``fn(start + i)``."""
    samples = []
    clock = time.perf_counter_ns
    for i in range(start, start + n):
        t0 = clock()
        fn(i)
        samples.append(clock() - t0)
    return samples


def percentiles(samples: list[int]) -> tuple[float, float]:
    """p50 and p99 in microseconds."""
    samples = sorted(samples)
    return samples[len(samples) // 2] / 1000, samples[int(len(samples) * 0.99)] / 1000


def measure_all(clients: dict[str, dict[str, Callable[[int], Any]]], n: int, rounds: int
                ) -> dict[str, dict[str, tuple[float, float]]]:
    """Every (client, op) measured in ``rounds`` interleaved slices, so that a noisy moment
    of the machine falls on all of them alike rather than on one."""
    samples: dict[tuple[str, str], list[int]] = {}
    per_round = max(1, n // rounds)
    for r in range(rounds):
        for name, ops in clients.items():
            for op, fn in ops.items():
                if r == 0:
                    timed(fn, 10_000_000, 200)  # warm-up: connections, caches
                samples.setdefault((name, op), []).extend(timed(fn, r * per_round, per_round))
    return {name: {op: percentiles(samples[(name, op)]) for op in ops}
            for name, ops in clients.items()}


def remote_ops(rc: RemoteCache, tag: str) -> dict[str, Callable[[int], Any]]:
    rc.set("hot", b"x" * 100)
    lock = rc.lock(f"bench-lock-{tag}", ttl=10)

    def lock_unlock(i: int) -> None:
        assert lock.acquire(blocking=False)
        lock.release()

    return {
        "GET": lambda i: rc.get("hot"),
        "SET": lambda i: rc.set(f"set-{tag}-{i % 1000}", b"x" * 100),
        "ADD": lambda i: rc.add(f"add-{tag}-{i}", b"x" * 100),
        "INCR": lambda i: rc.incr(f"counter-{tag}"),
        "LOCK+UNLOCK": lock_unlock,
    }


def redis_ops(r: Any) -> dict[str, Callable[[int], Any]]:
    r.set("hot", b"x" * 100)
    lock = r.lock("bench-lock", timeout=10)

    def lock_unlock(i: int) -> None:
        assert lock.acquire(blocking=False)
        lock.release()

    return {
        "GET": lambda i: r.get("hot"),
        "SET": lambda i: r.set(f"set-{i % 1000}", b"x" * 100),
        "ADD": lambda i: r.set(f"add-{i}", b"x" * 100, nx=True),
        "INCR": lambda i: r.incr("counter"),
        "LOCK+UNLOCK": lock_unlock,
    }


def run_wrk(url: str, seconds: int, headers: dict[str, str] | None = None) -> float:
    cmd = ["wrk", "-t2", "-c32", f"-d{seconds}s", "--latency"]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw {errors.group(1)} error responses from {url}")
    assert match, out
    return float(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5000, help="timed calls per operation")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved latency slices")
    parser.add_argument("--wrk-seconds", type=int, default=3)
    parser.add_argument("--wrk-rounds", type=int, default=3)
    parser.add_argument("--transport", choices=["urllib3", "fast", "both"], default=None,
                        help="RemoteCache transport(s) to measure (default: the one "
                             "RemoteCache picks); 'both' prints them side by side")
    parser.add_argument("--pin", action="store_true",
                        help="servers (node, redis, bare route) on CPU 0, clients and wrk on "
                             "CPU 1: every server gets the same placement (on 2 cores the "
                             "scheduler's placement otherwise moves p50 by ~2x)")
    args = parser.parse_args()
    server_cpu: Callable[[], None] | None = None
    if args.pin:
        if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
            parser.error("--pin needs Linux and at least 2 CPUs")

        def server_cpu() -> None:
            os.sched_setaffinity(0, {0})

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} CPUs)")
    procs: list[subprocess.Popen[bytes]] = []
    tmp = tempfile.mkdtemp(prefix="hypercacheio-bench-")
    try:
        port = free_port()
        sock_path = os.path.join(tmp, "node.sock")
        env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERCACHEIO_")}
        env.update(HYPERCACHEIO_SQLITE_PATH=os.path.join(tmp, "data"),
                   HYPERCACHEIO_NODE_PORT=str(port), HYPERCACHEIO_API_TOKEN=TOKEN,
                   HYPERCACHEIO_NODE_SOCKET=sock_path,
                   HYPERCACHEIO_NODE_LOG_FILE=os.path.join(tmp, "node.log"))
        procs.append(subprocess.Popen([sys.executable, "-m", "hypercacheio.cli", "node", "run",
                                       "--quiet"], env=env, preexec_fn=server_cpu))
        bare_port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-c", BARE_APP, str(bare_port)],
                                      preexec_fn=server_cpu))
        redis_port = free_port()
        redis_bin = shutil.which("redis-server")
        if redis_bin:
            procs.append(subprocess.Popen([redis_bin, "--port", str(redis_port), "--save", "",
                                           "--appendonly", "no", "--bind", "127.0.0.1"],
                                          stdout=subprocess.DEVNULL, preexec_fn=server_cpu))
        if args.pin:
            os.sched_setaffinity(0, {1})  # this process (the clients) and wrk on CPU 1
        wait_port(port)
        wait_port(bare_port)
        url = f"http://127.0.0.1:{port}"
        clients: dict[str, dict[str, Callable[[int], Any]]] = {}
        kinds = ["fast", "urllib3"] if args.transport == "both" else [args.transport]
        for kind in kinds:
            suffix = f" {kind}" if args.transport == "both" else ""
            tcp = RemoteCache(url, TOKEN, transport=kind)
            unix = RemoteCache("http://localhost", TOKEN, unix_socket=sock_path, transport=kind)
            clients[f"RemoteCache tcp{suffix}"] = remote_ops(tcp, f"tcp{suffix}")
            clients[f"RemoteCache unix{suffix}"] = remote_ops(unix, f"unix{suffix}")
        if redis_bin:
            import redis
            wait_port(redis_port)
            clients["redis-py"] = redis_ops(redis.Redis(port=redis_port))
        else:
            print("redis-server not found (apt-get install -y redis-server): no redis column")
        results = measure_all(clients, args.n, args.rounds)

        ops = ["GET", "SET", "ADD", "INCR", "LOCK+UNLOCK"]
        columns = list(results)
        placement = "servers on CPU 0, client on CPU 1" if args.pin else "unpinned"
        print(f"\nlatency, microseconds, p50 / p99 ({args.n} calls each in {args.rounds} "
              f"interleaved slices, one client, 127.0.0.1, {placement})")
        print(f"{'op':<12}" + "".join(f"{c:>27}" for c in columns)
              + ("   tcp/redis p50" if "redis-py" in results else ""))
        for op in ops:
            row = f"{op:<12}"
            for c in columns:
                p50, p99 = results[c][op]
                row += f"{p50:>16.0f} / {p99:>6.0f}  "
            if "redis-py" in results:
                row += f"{results[columns[0]][op][0] / results['redis-py'][op][0]:>14.2f}x"
            print(row)

        if args.transport == "both":
            print("\ntransports side by side, p50 (and p99) ratio fast / urllib3 "
                  "(below 1: fast is faster)")
            print(f"{'op':<12}{'tcp p50':>10}{'tcp p99':>10}{'unix p50':>10}{'unix p99':>10}")
            for op in ops:
                row = f"{op:<12}"
                for where in ("tcp", "unix"):
                    fast = results[f"RemoteCache {where} fast"][op]
                    slow = results[f"RemoteCache {where} urllib3"][op]
                    row += f"{fast[0] / slow[0]:>10.2f}{fast[1] / slow[1]:>10.2f}"
                print(row)

        if args.wrk_rounds > 0 and shutil.which("wrk"):
            node_runs, bare_runs = [], []
            for _ in range(args.wrk_rounds):  # interleaved, medians: the machine is shared
                node_runs.append(run_wrk(f"{url}/api/hypercacheio/cache/hot", args.wrk_seconds,
                                         {"X-Hypercacheio-Token": TOKEN}))
                bare_runs.append(run_wrk(f"http://127.0.0.1:{bare_port}/hello",
                                         args.wrk_seconds))
            node_rps, bare_rps = statistics.median(node_runs), statistics.median(bare_runs)
            print(f"\nwrk -t2 -c32 -d{args.wrk_seconds}s, requests/s "
                  f"(median of {args.wrk_rounds} interleaved runs)")
            print(f"{'node GET /cache/hot':<28}{node_rps:>10.0f}   "
                  + " ".join(f"{x:.0f}" for x in node_runs))
            print(f"{'bare aiohttp route':<28}{bare_rps:>10.0f}   "
                  + " ".join(f"{x:.0f}" for x in bare_runs))
            print(f"{'ratio (target >= 0.8)':<28}{node_rps / bare_rps:>10.2f}")
        else:
            print("wrk not found (apt-get install -y wrk): no throughput rows")

        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        tcp_get = results[columns[0]]["GET"]
        print("\ntargets:")
        if "redis-py" in results:
            ratio = tcp_get[0] / results["redis-py"]["GET"][0]
            print(f"  GET p50 <= 3x redis-py: {ratio:.2f}x  {'ok' if ratio <= 3 else 'MISSED'}")
        print(f"  GET p99 < 1 ms: {tcp_get[1]:.0f} us  {'ok' if tcp_get[1] < 1000 else 'MISSED'}")
        return 0
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
