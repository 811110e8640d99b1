"""Storage of the trace (gateway.ops.trace) per message: writes N typical decision records (two
recipients, a Message-ID, the per-check times of a relayed message) into a fresh SQLite state
store and reports the file size per message and per million messages.

    .venv-test/bin/python bench/trace_size.py [N]
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import tempfile
from pathlib import Path

from gateway.infra.clock import FakeClock
from gateway.state import open_store
from gateway.ops.trace import TraceStore

CHECKS = ["identity", "registration", "return_path", "message_class", "unsubscribe",
          "attachments", "sender_auth", "large_audience", "recipient_flags", "rate_limit"]


def record(i: int, at: float) -> dict:
    return {"at": at + i * 0.01, "queue_id": secrets.token_hex(6).upper(),
            "session": secrets.token_hex(4), "sender": "example-vendor",
            "client_ip": "192.0.2.25", "auth": None, "tls": True,
            "mail_from": f"bounce-{secrets.token_hex(8)}@em.vendor.example",
            "message_id": f"<{secrets.token_hex(12)}@em.vendor.example>", "size": 48213,
            "recipients": [secrets.token_hex(10), secrets.token_hex(10)], "stage": "data",
            "decision": "accept", "reason": "relayed", "decided_by": None,
            "reply": "250 2.0.0", "message_class": "promotional",
            "checks_ms": {c: 0.123 for c in CHECKS}, "monitored": []}


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        clock = FakeClock()
        store = open_store("sqlite:trace.sqlite3", clock, Path(d))
        trace = TraceStore(store, b"k" * 32, clock, 14)
        await store.ping()
        empty = (Path(d) / "trace.sqlite3").stat().st_size
        at = clock.now().timestamp()
        for i in range(n):
            await trace.put(record(i, at))
        await store.close()
        size = (Path(d) / "trace.sqlite3").stat().st_size - empty
    print(f"{n} records: {size / n:.0f} bytes per message in SQLite, "
          f"{size / n * 1e6 / 2**30:.2f} GiB per million messages")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000))
