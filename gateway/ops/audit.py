"""The audit trail: every administrative action, by whom, and what changed.

One JSON object per line, appended to ``[logging] audit_file`` by whoever acts: the ``gateway``
CLI (quarantine release/delete, flags import/replace, senders add/remove; the actor is the OS
user, ``os:NAME``, with ``sudo_user`` when run through sudo) and the running gateway's admin API
(throttle set/clear; the actor is the named bearer token, ``token:NAME``, with the OS user the
CLI says it runs as). Each line is written with one ``write`` to a file opened ``O_APPEND``, so
concurrent writers never interleave, and synced. The gateway also logs each of its own events,
and counts every line of the file, whoever wrote it, in ``gateway_admin_actions_total{action}``
(:class:`AuditCounter`, read in the background by gateway.monitor).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pwd
import re
import threading
from collections import Counter as Tally
from pathlib import Path

import structlog

log = structlog.get_logger("gateway.ops.audit")

ACTIONS = ("throttle_set", "throttle_clear", "quarantine_release", "quarantine_delete",
           "flags_import", "flags_replace", "sender_add", "sender_remove", "reload",
           "arc_keygen")


def os_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def cli_actor() -> dict:
    """The actor fields of an action taken with the CLI: the OS user (and who used sudo)."""
    actor = {"actor": f"os:{os_user()}"}
    if os.environ.get("SUDO_USER"):
        actor["sudo_user"] = os.environ["SUDO_USER"]
    return actor


_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
MIN_TOKEN = 16


def api_tokens(config, main_token: str) -> dict[str, str]:
    """The admin API's named bearer tokens: ``[admin] token_file`` (named by its file name
    without the extension: ``admin``) and every ``NAME.token`` in ``[admin] token_dir``."""
    from gateway.infra.typed import ConfigError

    tokens = {config.admin.token_file.stem: main_token}
    if config.admin.token_dir is None:
        return tokens
    directory = config.path(config.admin.token_dir)
    for path in sorted(directory.glob("*.token")):
        name, token = path.stem, path.read_text().strip()
        if not _NAME.match(name) or name in tokens:
            raise ConfigError(config.file, "admin.token_dir",
                              f"{path}: token names are unique, letters, digits . _ -")
        if len(token) < MIN_TOKEN or any(c.isspace() for c in token):
            raise ConfigError(config.file, "admin.token_dir",
                              f"{path}: a token is one word of at least {MIN_TOKEN} characters")
        tokens[name] = token
    return tokens


def api_actor(token_name: str, claimed_os_user: str | None) -> dict:
    """The actor fields of an API action: the token's name, and the OS user the CLI says it
    runs as (only if it looks like a user name: nothing a client sends is logged raw)."""
    actor = {"actor": f"token:{token_name}"}
    if claimed_os_user and _NAME.match(claimed_os_user):
        actor["os_user"] = claimed_os_user
    return actor


def record(path: Path, action: str, actor: dict, **changed) -> dict:
    """Append one audit event; returns it. Raises OSError if it cannot be written (the caller
    has already acted: it reports the failure, it does not hide it)."""
    assert action in ACTIONS, action
    event = {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
             "event": "audit", "action": action, **actor, **changed}
    line = (json.dumps(event, sort_keys=False, default=str) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return event


class AuditCounter:
    """Counts the audit file's events by action, reading only what was appended since the last
    call (a file that shrank was rotated: it is read again from its start)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.inode: int | None = None
        # read_new runs in worker threads: two at once (the monitor's round and another
        # caller's) would both read from the same offset and count those lines twice
        self._lock = threading.Lock()

    def read_new(self) -> Tally:
        with self._lock:
            return self._read_new()

    def _read_new(self) -> Tally:
        counts: Tally = Tally()
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                if st.st_ino != self.inode or st.st_size < self.offset:
                    self.inode, self.offset = st.st_ino, 0
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return counts
        complete = data.rfind(b"\n") + 1  # a line being written is counted next time
        for line in data[:complete].splitlines():
            try:
                action = json.loads(line).get("action")
            except ValueError:
                continue
            if action in ACTIONS:
                counts[action] += 1
        self.offset += complete
        return counts
