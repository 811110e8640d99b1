#!/usr/bin/env python3
"""What one audience-counter update costs the SQLite store, with a small and a large audience,
before and after the kept per-set count (issue #14), measured in one run.

    .venv-test/bin/python bench/audience_cost.py                 # a few seconds
    .venv-test/bin/python bench/audience_cost.py --before TREE   # another checkout as "before"
    .venv-test/bin/python bench/audience_cost.py --large 30000 -n 500 --rounds 5

``Store.count_distinct`` is what the large_audience check calls for every relayed message.
Each tree (this one, and "before": by default the commit before distinct_counts, extracted
with ``git archive`` to a temporary directory) runs in its own process, on its own database
file, and for each audience size:

* fills a SQLite store (its own ``SQLiteStore``, fake clock) with ``--campaigns`` campaigns of
  ``--small`` members each and, for each round, one campaign of ``--large`` members, through
  ``count_distinct``;
* times ``-n`` updates, each of 10 recipients (9 members already counted, 1 new one), as a
  message of a campaign: with the small audience each update goes to the next small campaign
  (so each stays at about ``--small``), with the large one every update of a round goes to
  that round's large campaign (which grows by ``-n``: 500, 3 % of 15,000);
* reports process CPU time (``time.process_time``) per update, median over ``--rounds``.

It prints both trees' microseconds per update and the ratios large / small of each tree,
and after / before for each size. No network, no gateway: the store alone. Exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
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
WEEK = 7 * 86400.0


def measure(args) -> int:
    """Runs in the child: the store of ``--tree``, one JSON line of microseconds per update."""
    sys.path.insert(0, str(Path(args.tree).resolve()))
    import gateway
    from gateway.infra.clock import FakeClock
    from gateway.state.sqlite import SQLiteStore

    if not Path(gateway.__file__).resolve().is_relative_to(Path(args.tree).resolve()):
        sys.exit(f"imported {gateway.__file__}, not the tree {args.tree}")

    async def main() -> dict:
        store = SQLiteStore(Path(args.db), FakeClock())
        small = [f"small{c}" for c in range(args.campaigns)]
        for key in small:
            await store.count_distinct(key, [f"{key}-{i:06d}" for i in range(args.small)], WEEK)
        large = [f"large{r}" for r in range(args.rounds)]  # a fresh one each round
        for key in large:
            for i in range(0, args.large, 1000):
                await store.count_distinct(
                    key, [f"{key}-{j:06d}" for j in range(i, min(i + 1000, args.large))], WEEK)
        out: dict[str, list[float]] = {"small": [], "large": []}
        fresh = 0
        for r in range(args.rounds):
            for size in ("small", "large"):
                started = time.process_time()
                for i in range(args.n):
                    key = small[(r * args.n + i) % len(small)] if size == "small" else large[r]
                    have = args.small if size == "small" else args.large
                    fresh += 1
                    members = [f"{key}-{(i * 9 + j) % have:06d}" for j in range(9)]
                    members.append(f"{key}-new{fresh:08d}")
                    count = await store.count_distinct(key, members, WEEK, args.limit)
                    assert count >= have, (count, have)
                out[size].append((time.process_time() - started) / args.n * 1e6)
        await store.close()
        return {size: statistics.median(v) for size, v in out.items()}

    print(json.dumps(asyncio.run(main())))
    return 0


def before_commit() -> str:
    """The parent of the commit that introduced distinct_counts (the kept per-set count)."""
    found = before_first("distinct_counts")
    if found is None:
        sys.exit("no commit introduces distinct_counts here: pass --before TREE or REV")
    return found



def run(args) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="audience-cost-"))
    try:
        spec = args.before or before_commit()
        trees = {"before": tree_of(spec, tmp), "after": HERE}
        figures: dict[str, dict[str, float]] = {}
        for name, tree in trees.items():
            cmd = [sys.executable, __file__, "_measure", "--tree", str(tree),
                   "--db", str(tmp / f"{name}.sqlite3"), "-n", str(args.n),
                   "--rounds", str(args.rounds), "--small", str(args.small),
                   "--large", str(args.large), "--campaigns", str(args.campaigns)]
            if args.limit is not None:
                cmd += ["--limit", str(args.limit)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, check=False,
                                  env={**os.environ, "PYTHONPATH": ""})
            if done.returncode != 0:
                sys.stderr.write(done.stderr)
                return 2
            figures[name] = json.loads(done.stdout.splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"SQLite count_distinct, CPU per update of 10 recipients (9 known, 1 new), median of "
          f"{args.rounds} rounds of {args.n}; before = {spec}")
    print(f"{'':8}{f'{args.small} live':>14}{f'{args.large} live':>14}{'large / small':>16}")
    for name in ("before", "after"):
        f = figures[name]
        print(f"{name:8}{f['small']:>11.1f} us{f['large']:>11.1f} us"
              f"{f['large'] / f['small']:>15.2f}x")
    b, a = figures["before"], figures["after"]
    print(f"{'after / before':<22}{a['small'] / b['small']:>3.2f}x"
          f"{a['large'] / b['large']:>13.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", type=int, default=500, help="updates a round (%(default)s)")
    common.add_argument("--rounds", type=int, default=3, help="rounds (%(default)s)")
    common.add_argument("--small", type=int, default=100, help="small audience (%(default)s)")
    common.add_argument("--large", type=int, default=15000, help="large audience (%(default)s)")
    common.add_argument("--campaigns", type=int, default=300,
                        help="small campaigns, each updated in turn (%(default)s)")
    common.add_argument("--limit", type=int, default=None,
                        help="count_distinct's limit (default none; the gateway passes "
                             "large_audience, past which nothing new is stored)")
    if argv[:1] == ["_measure"]:
        p = argparse.ArgumentParser(prog="audience_cost.py _measure", parents=[common])
        p.add_argument("--tree", required=True)
        p.add_argument("--db", required=True)
        return measure(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(description=__doc__, parents=[common],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", metavar="TREE|REV",
                   help="the 'before' code: a checkout's directory or a git revision "
                        "(default: the parent of the commit that introduced distinct_counts)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
