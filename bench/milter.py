#!/usr/bin/env python3
"""Milter front versus SMTP front, in one run, on loopback only (issue #11).

    python bench/milter.py                       # N=2000, C=20, 10 KB, every check on, 3 rounds
    python bench/milter.py --dkim rsa2048 -n 1000

The same 10 KB messages (every check on; with --dkim, DKIM-signed so that the signature is
verified) are sent by Postfix's ``smtp-source`` with C sessions that keep their connections:

* "smtp front": straight at the gateway's SMTP front, which relays each message before-queue
  to the sink (the aiosmtpd sink of bench/throughput.py, which also answers the gateway's DNS);
* "milter": at a private Postfix (tests/postfix_server.py: its own directories, loopback only,
  deploy/postfix/main.cf verbatim) whose smtpd asks a milter-only gateway; Postfix queues what
  it accepts and relays it to the same sink.

Per round and front: messages per second, from smtp-source's start to its last reply (for the
milter front that is Postfix's 250 after the gateway's answer; Postfix's own delivery to the
sink is then awaited, untimed, before the next phase), and the gateway process's CPU per
message (from /proc). The report gives both as milter / smtp ratios. Needs root (it starts
Postfix) and Postfix's smtp-source; every child process and directory is removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import throughput as tp  # noqa: E402  (the sink, gateway start-up and smtp-source driver)

from tests.postfix_server import PostfixServer, postfix_installed  # noqa: E402


def milter_only(config: Path, milter_port: int) -> None:
    """The bench's gateway configuration made milter-only: no SMTP listener, no upstream."""
    text = config.read_text()
    head, _, rest = text.partition("[server]\n")
    listen, _, rest = rest.partition("\n")
    assert listen.startswith("listen = "), listen
    config.write_text(f'{head}[server]\nlisten = []\n{rest}\n[milter]\n'
                      f'listen = ["inet:{tp.HOST}:{milter_port}"]\n')


def drained(postfix: PostfixServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while postfix.queue():
        if time.monotonic() > deadline:
            raise RuntimeError("Postfix did not deliver its queue to the sink in time")
        postfix.flush()
        time.sleep(0.2)


def run(args) -> int:
    if not postfix_installed() or not shutil.which("smtp-source"):
        print("error: needs Postfix (postfix, postqueue, postsuper, smtp-source)", file=sys.stderr)
        return 2
    children = tp.Children()
    tmp = Path(tempfile.mkdtemp(prefix="gw-milter-bench-"))
    tmp.chmod(0o755)  # Postfix's own user reaches its data directory through it
    postfix = None
    timer = threading.Timer(args.time_limit, lambda: (print("error: time limit", file=sys.stderr),
                                                       children.stop_all()))
    timer.daemon = True
    timer.start()
    args.deadline = time.monotonic() + args.time_limit
    results: dict[str, list[tp.Result]] = {"smtp front": [], "milter": []}
    try:
        features = tp.gateway_features()
        first = tp.make_message(args.size, 0)
        dkim_record = None
        if args.dkim != "none":
            first = tp.prepare_dkim(args, tmp)
            dkim_record = tmp / "dkim-record.txt"
        args.message_file = tmp / "message.txt"
        args.message_file.write_bytes(first.replace(b"\r\n", b"\n"))
        sink, sink_port, args.dns_port = tp.start_sink(children, True, tmp, dkim_record)
        smtp_cfg, smtp_port, smtp_admin = tp.write_gateway_config(
            tmp / "gw-smtp", sink_port, args.log_level, args, features)
        smtp_gw = tp.start_gateway(children, smtp_cfg, smtp_admin, tmp / "gw-smtp" / "log", None)
        milter_cfg, _, milter_admin = tp.write_gateway_config(
            tmp / "gw-milter", sink_port, args.log_level, args, features)
        milter_port = tp.free_port()
        milter_only(milter_cfg, milter_port)
        milter_gw = tp.start_gateway(children, milter_cfg, milter_admin,
                                     tmp / "gw-milter" / "log", None)
        postfix = PostfixServer(tmp / "postfix", tp.free_port(), sink_port,
                                f"inet:{tp.HOST}:{milter_port}")
        (tmp / "postfix").mkdir()
        postfix.start()
        print(f"N={args.n} messages, C={args.c} sessions, {len(first)} bytes each, every check "
              f"on, DKIM {args.dkim}, {args.rounds} round(s), smtp-source", flush=True)
        for r in range(args.rounds):
            res = tp.drive_smtp_source(children, smtp_port, args, "smtp front",
                                       {"gateway": smtp_gw.pid})
            results["smtp front"].append(res)
            print(f"  round {r + 1}: smtp front {res.rate:8.0f} msgs/s", flush=True)
            res = tp.drive_smtp_source(children, postfix.smtp_port, args, "milter",
                                       {"gateway": milter_gw.pid})
            results["milter"].append(res)
            drained(postfix, max(60.0, args.deadline - time.monotonic() - 5))
            print(f"  round {r + 1}: milter     {res.rate:8.0f} msgs/s", flush=True)
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        timer.cancel()
        if postfix is not None:
            postfix.stop()
        children.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return report(results)


def report(results: dict[str, list[tp.Result]]) -> int:
    failed = sum(r.failed for runs in results.values() for r in runs)
    rate = {k: statistics.median(r.rate for r in runs) for k, runs in results.items()}
    cpu = {k: sum(r.cpu["gateway"] for r in runs) / max(1, sum(r.msgs for r in runs)) * 1e6
           for k, runs in results.items()}
    print()
    print(f"{'':<12} {'msgs/s':>8} {'gateway CPU µs/msg':>19}")
    for k in results:
        print(f"{k:<12} {rate[k]:8.0f} {cpu[k]:19.0f}")
    ratios = [m.rate / s.rate for m, s in zip(results["milter"], results["smtp front"]) if s.rate]
    print(f"\nmilter / smtp front: throughput {statistics.median(ratios):.2f} "
          f"(median of per-round ratios), gateway CPU per message "
          f"{cpu['milter'] / cpu['smtp front']:.2f}")
    if failed:
        print(f"error: {failed} messages failed", file=sys.stderr)
        for runs in results.values():
            for r in runs:
                for e in r.errors[:1]:
                    print(f"    {r.label}: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--messages", dest="n", type=int, default=2000)
    p.add_argument("-c", "--concurrency", dest="c", type=int, default=20)
    p.add_argument("--size", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dkim", choices=["none", "rsa2048", "ed25519"], default="none")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--time-limit", type=float, default=600.0)
    args = p.parse_args(argv)
    args.checks, args.check_modes, args.warmup = "all", {}, 1
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
