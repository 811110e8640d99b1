"""Signals to a real `gateway serve` process: SIGHUP reloads and never kills it, SIGTERM stops
it cleanly."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.test_preflight import write_conf

ROOT = Path(__file__).resolve().parent.parent


class Served:
    """`gateway serve` with its JSON log on a pipe, read line by line with a deadline."""

    def __init__(self, conf: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config",
                                      str(conf)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        self.buffer = b""

    def next_event(self, name: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                event = json.loads(line)
                if event.get("event") == name:
                    return event
            left = deadline - time.monotonic()
            assert left > 0 and self.selector.select(left), f"no {name!r} log line in time"
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            assert chunk, f"the gateway exited before logging {name!r}: " \
                          f"{self.proc.stderr.read().decode(errors='replace')}"
            self.buffer += chunk

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        finally:
            self.selector.close()
            self.proc.stdout.close()
            self.proc.stderr.close()


def test_sighup_reloads_and_never_kills(tmp_path):
    served = Served(write_conf(tmp_path / "etc"))
    try:
        served.next_event("started")
        for _ in range(2):
            served.proc.send_signal(signal.SIGHUP)
            event = served.next_event("reload")
            assert (event["actor"], event["result"]) == ("signal:SIGHUP", "applied")
        assert served.proc.poll() is None
    finally:
        code = served.stop()
    assert code == 0
