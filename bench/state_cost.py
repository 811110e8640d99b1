#!/usr/bin/env python3
"""What a relayed message's SQLite state calls cost, this tree against an older one, in one run
(issue #14: fewer pages dirtied a transaction).

    .venv-test/bin/python bench/state_cost.py                  # about half a minute
    .venv-test/bin/python bench/state_cost.py --before TREE    # another checkout as "before"
    .venv-test/bin/python bench/state_cost.py -n 2000 --rounds 5 --recipients 10

Per relayed message the SMTP front makes, on the event loop's own SQLite connection, the rate
look at MAIL (``Store.peek``), the audience update (``Store.count_distinct_and_get``) and the
rate admission (``Store.acquire``). Each tree (this one, and "before": by default the parent of
the commit that introduced the schema's ``user_version`` migrations, extracted with
``git archive`` to a temporary directory) runs in its own process, on its own database file
(WAL, as the gateway opens it), through the real ``SQLiteStore`` methods with a fake clock that
advances 5 ms a message (200 messages a second):

* set-up: 300 other senders' rate keys and 300 other campaigns of 100 members each, then one
  warm-up round; campaigns and recipients are hashes, as the gateway keys them (so a new
  member lands anywhere in its set's B-tree);
* each message: ``peek`` and ``acquire`` with two limits (the sender's, a 1 s window, and its
  recipients', a 60 s window costing ``--recipients``; both too high to bind; or with
  ``--senders N``, N senders in turn, each under 30 a minute, windows of 60 s), then
  ``count_distinct_and_get`` of ``--recipients`` recipients for the campaign, in one of two
  audiences: ``cycle`` (as bench/cost.py sends: one campaign, recipients taken in turn from
  1,000, so each is seen again) or ``fresh`` (every recipient new, campaigns of 1,000 one
  after another);
* and the flag look-up (``flag_lookup``: an opt-out list of 100,000 and a bounce list of
  10,000) and the trace's rows (``set_many``: three a record, as gateway/ops/trace.py keys
  them, in batches of 50 records, beside 100,000 kept; each message counted its share);
* reports process CPU time (``time.process_time``: every thread, so the worker's checkpoints
  too) per call, median over ``--rounds`` rounds of ``-n`` messages, and the write-ahead-log
  frames (pages) each write call appends, counted in an untimed round.

The trees run in turn ``--repeat`` times (so that load from elsewhere drifts over both). It
prints both trees' figures (medians of the runs) and the ratios after / before (the median of
each run's ratio to the run of "before" just before it). No network, no gateway: the
store alone. Exit status 0.
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
WEEK = 7 * 86400.0
CALLS = ("peek", "acquire", "audience", "flags", "trace")
TRACE_BATCH = 50  # records the trace writes in one set_many (200 a second, 0.25 s linger)


def measure(args) -> int:
    """Runs in the child: the store of ``--tree``, one JSON line of figures."""
    sys.path.insert(0, str(Path(args.tree).resolve()))
    import gateway
    from gateway.infra.clock import FakeClock
    from gateway.state import Limit
    from gateway.state.sqlite import SQLiteStore

    if not Path(gateway.__file__).resolve().is_relative_to(Path(args.tree).resolve()):
        sys.exit(f"imported {gateway.__file__}, not the tree {args.tree}")
    db_path = Path(args.db)
    wal = Path(str(db_path) + "-wal")

    async def main() -> dict:
        clock = FakeClock()
        store = SQLiteStore(db_path, clock)

        def now() -> float:
            return clock.now().timestamp()

        def limits(sender: str) -> list[Limit]:
            if args.senders > 1:  # the policy's 30 a minute, each sender well under it
                return [Limit(f"rate:{sender}:60", 30, 60.0),
                        Limit(f"rcpt:{sender}:60", 10**6, 60.0, args.recipients)]
            return [Limit(f"rate:{sender}:1", 10**6, 1.0),
                    Limit(f"rcpt:{sender}:60", 10**6, 60.0, args.recipients)]

        def hashed(name: str, size: int = 20) -> str:  # as the gateway keys them
            return hashlib.sha256(name.encode()).hexdigest()[:size]

        for i in range(300):  # the other senders' and campaigns' rows around ours
            await store.acquire(limits(f"s{i:03d}"), now(), "t")
            await store.count_distinct(f"audience:{hashed(f'c{i}', 32)}:rcpt",
                                       [hashed(f"c{i}-{j}") for j in range(100)], WEEK)
        # recipient flags: an opt-out list of 100,000 and a bounce list of 10,000
        await store.flag_replace("optout", [hashed(f"opt{i}") for i in range(100000)])
        await store.flag_replace("bounce", [hashed(f"bounce{i}") for i in range(10000)])
        senders = [limits(f"bench{i}") for i in range(args.senders)]
        seq = 0
        pending: list[tuple[str, bytes, float]] = []  # the trace's rows not written yet
        record = json.dumps({"pad": "x" * 900}).encode()  # about a decision record's size

        traced = 0
        try:  # the tree's own queue ids: time first (gateway/engine/queue_ids.py)
            from gateway.engine.queue_ids import queue_id

            def new_qid() -> str:
                return queue_id(int(now() * 1000))
        except ImportError:  # a tree from before them: 12 random hex digits
            def new_qid() -> str:
                return hashed(f"q{traced}", 12).upper()

        def trace_rows() -> list[tuple[str, bytes, float]]:
            # as gateway/ops/trace.py keys a record: its queue id (as the tree makes them), the
            # sender's hour, the Message-ID's hash; kept 14 days
            nonlocal traced
            traced += 1
            qid = new_qid()
            hour = time.strftime("%Y%m%d%H", time.gmtime(now()))
            return [(f"trace:q:{qid}", record, 14 * 86400.0),
                    (f"trace:s:bench:{hour}:{qid}", b"", 14 * 86400.0),
                    (f"trace:m:{hashed(f'm{traced}', 24)}:{qid}", b"", 14 * 86400.0)]

        for i in range(100):  # 100,000 records kept already (days of them, in production)
            await store.set_many([row for _ in range(1000) for row in trace_rows()])

        sent = 0  # messages
        # the set-up's log copied into the file and emptied, as a checkpoint does in production
        await store._run(lambda: store._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)"))

        async def trace() -> None:
            pending.extend(trace_rows())
            if len(pending) >= 3 * TRACE_BATCH:
                await store.set_many(pending[:])
                pending.clear()

        def recipients() -> list[str]:
            nonlocal seq
            out = []
            for _ in range(args.recipients):
                seq += 1
                out.append(hashed(f"student{seq % 1000}" if args.audience == "cycle"
                                  else f"fresh{seq}"))
            return out

        async def message(timed: dict[str, float] | None, frames: dict[str, int] | None):
            members = recipients()
            # fresh: a campaign of 1,000 recipients after another (under the 15,000 limit)
            campaign = hashed("bench" if args.audience == "cycle" else f"fresh{seq // 1000}",
                              32)
            nonlocal sent
            sent += 1
            ours = senders[sent % len(senders)]
            calls = (
                ("peek", lambda: store.peek(ours, now())),
                ("acquire", lambda: store.acquire(ours, now(), "t")),
                ("audience", lambda: store.count_distinct_and_get(
                    f"audience:{campaign}:rcpt", members, WEEK, 15000,
                    f"audience:{campaign}:lists")),
                ("flags", lambda: store.flag_lookup(["optout", "bounce"], members)),
                ("trace", trace),
            )
            for name, call in calls:
                if frames is not None:
                    before = wal.stat().st_size if wal.exists() else 0
                    await call()
                    after = wal.stat().st_size
                    header = 32 if before == 0 and after else 0  # the log's own header
                    frames[name] += (after - before - header) // (page_size + 24)
                    continue
                started = time.process_time()
                await call()
                timed[name] += time.process_time() - started
            clock.advance(0.005)

        for _ in range(args.n):  # warm-up: the windows fill, the campaign grows
            await message({c: 0.0 for c in CALLS}, None)
        rounds: dict[str, list[float]] = {c: [] for c in CALLS}
        for _ in range(args.rounds):
            timed = {c: 0.0 for c in CALLS}
            for _ in range(args.n):
                await message(timed, None)
            for c in CALLS:
                rounds[c].append(timed[c] / args.n * 1e6)
        # the pages: no checkpoint in this round, so the log only grows
        page_size = store._conn().execute("PRAGMA page_size").fetchone()[0]
        store.CHECKPOINT_EVERY = 10**12
        await asyncio.gather(*store._background)  # a checkpoint under way
        store._conn().execute("PRAGMA wal_autocheckpoint=0")
        store._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the log starts empty
        frames = {c: 0 for c in CALLS}
        for _ in range(args.n):
            await message(None, frames)
        await store.close()
        return {"us": {c: statistics.median(v) for c, v in rounds.items()},
                "frames": {c: frames[c] / args.n for c in CALLS}}

    print(json.dumps(asyncio.run(main())))
    return 0


def before_commit() -> str:
    """The parent of the commit that introduced the schema's user_version migrations."""
    return before_first("user_version") or "HEAD"  # none yet: the tree against its own commit



def run(args) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="state-cost-"))
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    try:
        spec = args.before or before_commit()
        trees = {"before": tree_of(spec, tmp), "after": HERE}
        for rep in range(args.repeat):  # the trees in turn, so that drifting load hits both
            for name, tree in trees.items():
                db = tmp / f"{name}{rep}.sqlite3"
                cmd = [sys.executable, __file__, "_measure", "--tree", str(tree),
                       "--db", str(db), "-n", str(args.n),
                       "--rounds", str(args.rounds), "--recipients", str(args.recipients),
                       "--audience", args.audience, "--senders", str(args.senders)]
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp,
                                      check=False, env={**os.environ, "PYTHONPATH": ""})
                if done.returncode != 0:
                    sys.stderr.write(done.stderr)
                    return 2
                runs[name].append(json.loads(done.stdout.splitlines()[-1]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def median(name: str, what: str, call: str) -> float:
        return statistics.median(r[what][call] for r in runs[name])

    def ratio(call: str | None) -> float:  # the median of the runs' after / before
        def total(r):
            return sum(r["us"].values()) if call is None else r["us"][call]
        return statistics.median(total(a) / total(b)
                                 for a, b in zip(runs["after"], runs["before"]))

    print(f"SQLite state calls a message ({args.recipients} recipient(s), audience "
          f"{args.audience}): CPU per call (median of {args.repeat} runs of {args.rounds} "
          f"rounds of {args.n}) and WAL frames a call; before = {spec}")
    print(f"{'':16}" + "".join(f"{c:>10}" for c in CALLS) + f"{'total':>10}")
    for name in ("before", "after"):
        us = {c: median(name, "us", c) for c in CALLS}
        print(f"{name + ' us':16}" + "".join(f"{us[c]:>10.1f}" for c in CALLS)
              + f"{sum(us.values()):>10.1f}")
    for name in ("before", "after"):
        fr = {c: median(name, "frames", c) for c in CALLS}
        print(f"{name + ' frames':16}" + "".join(f"{fr[c]:>10.2f}" for c in CALLS)
              + f"{sum(fr.values()):>10.2f}")
    print(f"{'after / before':16}" + "".join(f"{ratio(c):>9.3f}x" for c in CALLS)
          + f"{ratio(None):>9.3f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", type=int, default=2000, help="messages a round (%(default)s)")
    common.add_argument("--rounds", type=int, default=3, help="rounds (%(default)s)")
    common.add_argument("--recipients", type=int, default=1,
                        help="recipients a message: the audience update's members and the "
                             "recipient limit's cost (%(default)s)")
    common.add_argument("--audience", choices=("cycle", "fresh"), default="cycle",
                        help="recipients seen again in turn from 1,000 (bench/cost.py's), "
                             "or each new (%(default)s)")
    common.add_argument("--senders", type=int, default=1,
                        help="senders the messages come from in turn (%(default)s: one at a "
                             "rate that never binds, with a 1 s and a 60 s window, as "
                             "bench/cost.py; more: each at most 30 a minute, windows of 60 s)")
    if argv[:1] == ["_measure"]:
        p = argparse.ArgumentParser(prog="state_cost.py _measure", parents=[common])
        p.add_argument("--tree", required=True)
        p.add_argument("--db", required=True)
        return measure(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(description=__doc__, parents=[common],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of each tree, in turn; ratios are the median of the runs' "
                        "(%(default)s)")
    p.add_argument("--before", metavar="TREE|REV",
                   help="the 'before' code: a checkout's directory or a git revision (default: "
                        "the parent of the commit that introduced user_version migrations)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
