#!/usr/bin/env python3
"""What the hourly purge of expired keys costs the SQLite store once the trace holds its whole
retention, this tree against an older one, in one run (issue #14).

    .venv-test/bin/python bench/kv_purge.py                      # about a minute
    .venv-test/bin/python bench/kv_purge.py --records 300000 --rounds 5
    .venv-test/bin/python bench/kv_purge.py --before TREE|REV

The trace keeps every decision ``[trace] days`` (14) as three kv keys (the record, about 1 KB,
and two index keys), and its retention job calls ``Store.purge_expired`` every hour. Each tree
(this one, and "before": by default the parent of the commit that indexed kv by expiry,
extracted with ``git archive``) runs in its own process, on its own file, with a fake clock:

* fills the store with ``--records`` records spread evenly over the 14 days (so an hour's
  worth, records / 336, expires each hour), written with ``set_many`` as the trace writes
  them, then checkpoints the log;
* ``--rounds`` times: writes the next hour's records (untimed), moves the clock an hour,
  and times ``purge_expired`` (``time.process_time``, every thread).

It prints each tree's CPU per purge, the same per record the hour wrote (what a message pays
for its purge, amortized), and after / before. No network, no gateway. Exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trees import before_first, tree_of  # noqa: E402  (bench/trees.py)

HERE = Path(__file__).resolve().parent.parent
DAYS = 14
HOURS = DAYS * 24


def measure(args) -> int:
    """Runs in the child: the store of ``--tree``, one JSON line of figures."""
    sys.path.insert(0, str(Path(args.tree).resolve()))
    import gateway
    from gateway.infra.clock import FakeClock
    from gateway.state.sqlite import SQLiteStore

    if not Path(gateway.__file__).resolve().is_relative_to(Path(args.tree).resolve()):
        sys.exit(f"imported {gateway.__file__}, not the tree {args.tree}")

    async def main() -> dict:
        clock = FakeClock()
        store = SQLiteStore(Path(args.db), clock)
        record = json.dumps({"pad": "x" * 900}).encode()
        ttl = DAYS * 86400.0
        per_hour = max(1, args.records // HOURS)
        written = 0

        async def hour_of_records() -> None:  # written in the trace's batches of 50
            nonlocal written
            rows = []
            for _ in range(per_hour):
                written += 1
                qid = hashlib.sha256(f"q{written}".encode()).hexdigest()[:12].upper()
                mid = hashlib.sha256(f"m{written}".encode()).hexdigest()[:24]
                rows += [(f"trace:q:{qid}", record, ttl),
                         (f"trace:s:bench:{written // per_hour}:{qid}", b"", ttl),
                         (f"trace:m:{mid}:{qid}", b"", ttl)]
                if len(rows) >= 150:
                    await store.set_many(rows)
                    rows = []
            if rows:
                await store.set_many(rows)

        for _ in range(HOURS):
            await hour_of_records()
            clock.advance(3600)
        await store._run(lambda: store._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)"))
        purges, deleted = [], []
        for _ in range(args.rounds):
            await hour_of_records()
            clock.advance(3600)
            started = time.process_time()
            deleted.append(await store.purge_expired())
            purges.append(time.process_time() - started)
        await store.close()
        purge = statistics.median(purges)
        return {"purge_ms": purge * 1e3, "per_record_us": purge / per_hour * 1e6,
                "deleted": statistics.median(deleted), "per_hour": per_hour}

    print(json.dumps(asyncio.run(main())))
    return 0


def before_commit() -> str:
    """The parent of the commit that indexed kv by expiry."""
    return before_first("kv_expires") or "HEAD"



def run(args) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="kv-purge-"))
    figures: dict[str, dict] = {}
    try:
        spec = args.before or before_commit()
        for name, tree in {"before": tree_of(spec, tmp), "after": HERE}.items():
            cmd = [sys.executable, __file__, "_measure", "--tree", str(tree),
                   "--db", str(tmp / f"{name}.sqlite3"), "--records", str(args.records),
                   "--rounds", str(args.rounds)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, check=False,
                                  env={**os.environ, "PYTHONPATH": ""})
            if done.returncode != 0:
                sys.stderr.write(done.stderr)
                return 2
            figures[name] = json.loads(done.stdout.splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    b, a = figures["before"], figures["after"]
    print(f"Hourly purge_expired with {args.records} trace records kept ({b['per_hour']} an hour, "
          f"{int(b['deleted'])} keys deleted a purge), median of {args.rounds}; before = {spec}")
    for name, f in (("before", b), ("after", a)):
        print(f"{name:8}{f['purge_ms']:>10.1f} ms a purge{f['per_record_us']:>10.1f} us a record")
    print(f"after / before {a['purge_ms'] / b['purge_ms']:.3f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--records", type=int, default=200000,
                        help="trace records kept, spread over 14 days (%(default)s)")
    common.add_argument("--rounds", type=int, default=3, help="hours purged (%(default)s)")
    if argv[:1] == ["_measure"]:
        p = argparse.ArgumentParser(prog="kv_purge.py _measure", parents=[common])
        p.add_argument("--tree", required=True)
        p.add_argument("--db", required=True)
        return measure(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(description=__doc__, parents=[common],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", metavar="TREE|REV",
                   help="the 'before' code: a checkout's directory or a git revision (default: "
                        "the parent of the commit that indexed kv by expiry)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
