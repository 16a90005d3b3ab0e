"""The ceiling of the active-active transport: frames/s and records/s through one PeerLink
to one LinkServer on 127.0.0.1 (both in this process, one event loop), plain and TLS.

Usage: .venv/bin/python benchmarks/bench_wire.py [--records 1000000] [--batch 256]
       [--size 100] [--in-flight 64] [--uvloop]

Each record is ``size`` random bytes; a batch is one BATCH frame of ``batch`` records,
acknowledged by the server (the application callback only counts). The clock runs from
the first send to the last acknowledgement. The issue's target for replicated writes
(store and oplog included, not measured here) is >= 95,000/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from hypercacheio.replication.link import LinkOptions, PeerLink  # noqa: E402
from hypercacheio.replication.link_server import LinkServer  # noqa: E402
from hypercacheio.replication.wire import Frame, Identity, TlsFiles  # noqa: E402

TOKEN = "bench-token-0123456789"


def make_pki(d: Path) -> tuple[TlsFiles, TlsFiles]:
    """A CA and two node certificates (openssl command line); (server, client) files."""
    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=bench-ca",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    (d / "leaf.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                "extendedKeyUsage=serverAuth,clientAuth\n"
                                "subjectAltName=IP:127.0.0.1\n")
    for name in ("a", "b"):
        ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        ossl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", "leaf.ext")
    files = {n: TlsFiles(str(d / f"{n}.pem"), str(d / f"{n}.key"), str(d / "ca.pem"))
             for n in ("a", "b")}
    return files["b"], files["a"]


async def bench_wire(records: int = 1_000_000, batch: int = 256, size: int = 100,
                     in_flight: int = 64, tls: tuple[TlsFiles, TlsFiles] | None = None
                     ) -> dict[str, Any]:
    """Ship ``records`` records in batches through one link; throughput figures."""
    received = 0

    async def on_frame(peer: str, frame: Frame) -> Any:
        nonlocal received
        received += len(frame["records"])
        return received

    options = LinkOptions(heartbeat_interval=1.0, liveness_timeout=10.0)
    server = LinkServer(Identity("bench", "b", TOKEN), on_frame, options=options,
                        tls=tls[0] if tls else None)
    await server.start()
    done = asyncio.Event()
    batches = -(-records // batch)
    acked = 0

    def on_ack(seq: int, pos: Any) -> None:
        nonlocal acked
        acked += 1
        if acked == batches:
            done.set()

    link = PeerLink("127.0.0.1", server.port, Identity("bench", "a", TOKEN), options=options,
                    tls=tls[1] if tls else None, on_ack=on_ack, max_in_flight=in_flight)
    link.start()
    await link.wait_up(10)
    rng = random.Random(0)
    payload = [rng.randbytes(size) for _ in range(batch)]
    start = time.perf_counter()
    sent = 0
    while sent < records:
        n = min(batch, records - sent)
        await link.send(payload[:n])
        sent += n
    await asyncio.wait_for(done.wait(), 120)
    elapsed = time.perf_counter() - start
    counters = link.counters.as_dict()
    await link.stop()
    await server.close()
    assert received == records, (received, records)
    return {"records": records, "batches": batches, "seconds": elapsed,
            "frames_per_s": batches / elapsed, "records_per_s": records / elapsed,
            "mb_per_s": counters["bytes_out"] / elapsed / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop
        uvloop.install()
    modes: list[tuple[str, tuple[TlsFiles, TlsFiles] | None]] = [("plain", None)]
    tmp = tempfile.mkdtemp(prefix="bench-wire-")
    try:
        if shutil.which("openssl"):
            modes.append(("mutual TLS", make_pki(Path(tmp))))
        else:
            print("openssl not found: TLS not measured", file=sys.stderr)
        print(f"{args.records:,} records of {args.size} bytes, {args.batch} per frame, "
              f"{args.in_flight} frames in flight, loop: "
              f"{'uvloop' if args.uvloop else 'asyncio'}")
        print("| mode | frames/s | records/s | MB/s | target records/s | met? |")
        print("|---|---|---|---|---|---|")
        for name, files in modes:
            r = asyncio.run(bench_wire(args.records, args.batch, args.size, args.in_flight,
                                       files))
            print(f"| {name} | {r['frames_per_s']:,.0f} | {r['records_per_s']:,.0f} | "
                  f"{r['mb_per_s']:,.1f} | >= 95,000 | "
                  f"{'yes' if r['records_per_s'] >= 95_000 else 'no'} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
