#!/usr/bin/env python3
"""ARC sealing cost per message (gateway.message.arc), and what it does to the event loop.

    python bench/arc_bench.py                 # 10 KB, 100 KB and 1 MB messages, 20 seals each
    python bench/arc_bench.py -n 50 --sizes 10000

Per message size: the median CPU time of one seal (dkimpy's arc_sign, RSA-2048: an
ARC-Message-Signature and an ARC-Seal), against the baseline of the compat32 parse the gateway
does for every message anyway; and the longest the event loop waited (a 1 ms ticker's worst
lateness) while seals ran inline on the loop versus in a worker thread (what ArcSealer does).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import dkim  # noqa: E402

INCLUDE = [b"from", b"to", b"subject", b"date", b"message-id", b"list-unsubscribe"]


def key() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.pem"
        subprocess.run(["openssl", "genrsa", "-traditional", "-out", str(path), "2048"],
                       check=True, capture_output=True)
        return path.read_bytes()


def message(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog; sealing in action.\r\n"
    head = (b"Authentication-Results: gw.test; arc=none\r\nFrom: a@acme.example\r\n"
            b"To: b@example.edu\r\nSubject: bench\r\nDate: Mon, 02 Nov 2026 15:00:00 +0000\r\n"
            b"Message-ID: <x@acme.example>\r\nList-Unsubscribe: <mailto:u@acme.example>\r\n\r\n")
    return head + line * (size // len(line) + 1)


def seal(raw: bytes, pem: bytes) -> list[bytes]:
    return dkim.arc_sign(raw, b"arc", b"gw.example", pem, b"gw.test", include_headers=INCLUDE,
                         timestamp=1)


async def worst_lag(work) -> float:
    """The worst lateness (ms) of a 1 ms ticker while ``work()`` runs."""
    worst = 0.0
    done = asyncio.Event()

    async def ticker():
        nonlocal worst
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, (time.perf_counter() - before - 0.001) * 1000)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    await work()
    done.set()
    await task
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    args = ap.parse_args()
    pem = key()
    parser = BytesParser(policy=compat32)
    print(f"{'size':>9} {'parse ms':>9} {'seal ms':>8} {'x parse':>8} "
          f"{'loop wait inline ms':>20} {'in a thread ms':>15}")
    for size in args.sizes:
        raw = message(size)
        parse_t, seal_t = [], []
        for _ in range(args.n):
            t = time.process_time()
            parser.parsebytes(raw)
            parse_t.append(time.process_time() - t)
            t = time.process_time()
            seal(raw, pem)
            seal_t.append(time.process_time() - t)

        async def inline():
            for _ in range(5):
                seal(raw, pem)
                await asyncio.sleep(0)

        async def threaded():
            for _ in range(5):
                await asyncio.to_thread(seal, raw, pem)

        lag_inline = asyncio.run(worst_lag(inline))
        lag_thread = asyncio.run(worst_lag(threaded))
        p, s = statistics.median(parse_t) * 1000, statistics.median(seal_t) * 1000
        print(f"{size:>9} {p:>9.2f} {s:>8.1f} {s / p:>8.1f} {lag_inline:>20.1f} "
              f"{lag_thread:>15.1f}")


if __name__ == "__main__":
    main()
