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


def wait_for_line(path: Path, event: str, timeout: float = 20) -> dict:
    """The first log line of ``event`` in the file at ``path`` (written by another process:
    polled, with a deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                if entry.get("event") == event:
                    return entry
        assert time.monotonic() < deadline, f"no {event!r} line in {path}"
        time.sleep(0.05)


def test_log_file_reopened_on_sigusr1(tmp_path):
    """[logging] file: every line JSON in the file; after logrotate's rename, SIGUSR1 makes
    the gateway write to a new file at the same path, and nothing is lost."""
    conf = write_conf(tmp_path / "etc")
    log = tmp_path / "log" / "gateway.log"
    conf.write_text(conf.read_text() + f'[logging]\nfile = "{log}"\n')
    served = Served(conf)
    try:
        wait_for_line(log, "started")
        rotated = log.with_name("gateway.log.1")
        log.rename(rotated)  # logrotate
        served.proc.send_signal(signal.SIGUSR1)
        reopened = wait_for_line(log, "log_reopened")
        assert reopened["path"] == str(log) and reopened["level"] == "info"
        served.proc.send_signal(signal.SIGHUP)  # a reload keeps writing to the new file
        assert wait_for_line(log, "reload")["result"] == "applied"
        assert served.proc.poll() is None
    finally:
        code = served.stop()
    assert code == 0
    old = [json.loads(line)["event"] for line in rotated.read_text().splitlines()]
    new = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert "started" in old and "log_reopened" not in old
    assert new[0] == "log_reopened" and new[-1] == "stopped"
    assert (log.stat().st_mode & 0o777) == 0o640


def test_sigusr1_without_a_log_file_is_harmless(tmp_path):
    served = Served(write_conf(tmp_path / "etc"))
    try:
        served.next_event("started")
        served.proc.send_signal(signal.SIGUSR1)
        assert served.next_event("sigusr1_ignored")["reason"] == "no [logging] file to reopen"
        assert served.proc.poll() is None
    finally:
        assert served.stop() == 0
