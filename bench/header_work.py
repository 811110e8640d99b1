#!/usr/bin/env python3
"""What a message's header work costs in the DATA path, this tree against an older one, in one
run (issue #14: header look-ups and the checks' small parsers).

    .venv-test/bin/python bench/header_work.py                 # about half a minute
    .venv-test/bin/python bench/header_work.py --before TREE   # another checkout as "before"
    .venv-test/bin/python bench/header_work.py -n 5000 --repeat 7

The message is bench/throughput.py's (10 KB, one text/plain part, one-click List-Unsubscribe,
no campaign header), DKIM-signed with a fresh RSA-2048 key (the ``openssl`` command). Each
message, through the real functions, without DNS, state or network: the intake (split, the
repeated-field, loop and forged Authentication-Results checks), the parse, and what the
checks read of the headers: the message class, the display name, the campaign (fingerprint:
From: address and Subject), the declared size, the attachments walk, both halves of the
unsubscribe check (the second up to the DKIM verification, which it reaches without a
resolver), the author domain, and the Message-ID twice (decision line and trace).

Each tree (this one, and "before": by default the parent of the commit that indexed the
parsed message's header look-ups, extracted with ``git archive`` to a temporary directory)
runs in its own process, in turn, ``--repeat`` times (so that load from elsewhere drifts over
both). Figures are process CPU time (``time.process_time``) per message; printed: each tree's
median, and after / before (the median of each run's ratio to the run of "before" just before
it). Exit status 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
CAMPAIGN_HEADERS = ("Feedback-ID", "X-Campaign-ID", "List-Id")


def measure(tree: str, message_file: str, n: int) -> None:
    """Runs in the child: the header work of ``tree`` on the message, one figure (us)."""
    sys.path.insert(0, str(Path(tree).resolve()))
    import gateway.checks.unsubscribe as unsubscribe
    from gateway.checks.attachments import AttachmentsSettings, inspect
    from gateway.checks.auth_alignment import author_domain
    from gateway.checks.base import Context
    from gateway.checks.display_name import DisplayName
    from gateway.checks.message_class import declared_class
    from gateway.engine.message import message_id, parse_now
    from gateway.message.intake import admit
    from gateway.policy.audience import declared_size, identify

    assert unsubscribe.__file__.startswith(str(Path(tree).resolve())), unsubscribe.__file__
    raw = Path(message_file).read_bytes()
    attachments = AttachmentsSettings()

    class Config:
        def check_settings(self, name):
            return unsubscribe.UnsubscribeSettings()

    deps = types.SimpleNamespace(config=Config(), dns=None)
    first, second = unsubscribe.Unsubscribe(deps), unsubscribe.UnsubscribeCoverage(deps)
    display = DisplayName(deps)
    ip = ipaddress.ip_address("192.0.2.1")

    def run(coroutine):  # the checks here finish without awaiting anything
        try:
            coroutine.send(None)
        except StopIteration as stop:
            return stop.value
        raise AssertionError("a check awaited")

    def one() -> None:
        admitted = admit(raw, hostname="gw.bench.example", max_received=30)
        ctx = Context(client_ip=ip, raw=admitted.content, header_fields=admitted.fields,
                      message_class="promotional")
        message = ctx.message = parse_now(admitted.content, admitted.fields)
        declared_class(message, "X-Message-Class")
        run(display.check(ctx))
        identify(message, "bench", CAMPAIGN_HEADERS, b"k" * 32)
        declared_size(message, "X-Audience-Size")
        inspect(message, attachments)
        run(first.check(ctx))
        author_domain(message)
        run(second.check(ctx))
        message_id(ctx)
        message_id(ctx)

    for _ in range(max(100, n // 10)):
        one()
    start = time.process_time()
    for _ in range(n):
        one()
    print(f"{(time.process_time() - start) / n * 1e6:.3f}")


def default_before() -> str:
    first = subprocess.run(
        ["git", "-C", str(HERE), "log", "--format=%H", "-1", "--grep",
         "header look-ups answered from an index by name"],
        check=True, capture_output=True, text=True).stdout.strip()
    if not first:
        sys.exit("bench/header_work.py: no commit to compare with; give --before TREE")
    return first + "^"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=3000, help="messages a run (3000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each tree (5)")
    parser.add_argument("--before", help="a checkout to compare with (default: see above)")
    parser.add_argument("--_child", nargs=2, metavar=("TREE", "MESSAGE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        measure(args._child[0], args._child[1], args.n)
        return 0
    sys.path.insert(0, str(HERE / "bench"))
    import throughput

    with tempfile.TemporaryDirectory(prefix="header-work-") as tmp:
        work = Path(tmp)
        if args.before:
            before = Path(args.before)
        else:
            before = work / "before"
            before.mkdir()
            archive = subprocess.run(["git", "-C", str(HERE), "archive", default_before(),
                                      "gateway"], check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
        key, _ = throughput.make_dkim_key("rsa2048", work)
        message = work / "message.eml"
        message.write_bytes(throughput.dkim_sign(throughput.make_message(10_000, 1), key,
                                                 "rsa2048"))

        def child(tree: Path) -> float:
            out = subprocess.run([sys.executable, __file__, "-n", str(args.n), "--_child",
                                  str(tree), str(message)], check=True, capture_output=True,
                                 text=True).stdout
            return float(out.strip())

        runs = [(child(before), child(HERE)) for _ in range(args.repeat)]
        shutil.rmtree(work / "before", ignore_errors=True)
    b = statistics.median(r[0] for r in runs)
    a = statistics.median(r[1] for r in runs)
    ratio = statistics.median(r[1] / r[0] for r in runs)
    print(f"header work a message: before {b:.1f} us, after {a:.1f} us; "
          f"after / before {ratio:.3f} (median of {args.repeat} runs of {args.n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
