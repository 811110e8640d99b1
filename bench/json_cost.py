#!/usr/bin/env python3
"""The JSON text of a decision line (issue #14): the standard library's ``json.dumps`` (what
structlog's JSONRenderer used) against gateway.infra.jsontext (orjson, with the standard
library's text kept where a reader would see a difference), in one process, alternating.

    .venv-test/bin/python bench/json_cost.py            # a few seconds

The record is shaped as the gateway logs a relayed message (20 fields, 14 check timings); a
second one carries a non-ASCII Message-ID, which jsontext encodes twice (orjson, then the
standard library). Prints CPU time per line, median of the rounds, and the ratios."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.infra.jsontext import dumps  # noqa: E402

RECORD = {
    "event": "message", "session": "S8f3a9b2c", "queue_id": "0J4K5L6M7N8P9Q0R",
    "client_ip": "127.0.0.1", "sender": "bench", "auth": None, "tls": False,
    "mail_from": "bounce-123@em.bench.example", "message_id": "<m123@em.bench.example>",
    "size": 10633, "recipients": ["a1b2c3d4e5f6a7b8c9d0"], "stage": "data",
    "decision": "accept", "reason": "relayed", "decided_by": None, "reply": "250 2.0.0",
    "message_class": "marketing", "checks_ms": {f"check{i}": 0.123 for i in range(14)},
    "monitored": [], "level": "info", "timestamp": "2026-11-29T10:35:04.123456Z"}


def per_call(fn, record, n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        fn(record)
    return (time.process_time() - started) / n * 1e6


def main() -> None:
    n, rounds = 20_000, 7
    for label, record in (("ASCII line", RECORD),
                          ("non-ASCII Message-ID", {**RECORD, "message_id": "<m\u00e9@x>"})):
        old, new = [], []
        for _ in range(rounds):
            old.append(per_call(json.dumps, record, n))
            new.append(per_call(dumps, record, n))
        ratios = [b / a for a, b in zip(old, new)]
        print(f"{label:22s} json.dumps {statistics.median(old):6.2f} us   jsontext "
              f"{statistics.median(new):6.2f} us   {statistics.median(ratios):.3f}x")


if __name__ == "__main__":
    main()
