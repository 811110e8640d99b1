"""``[logging] file``: the log written to a file that is reopened on SIGUSR1, so logrotate can
move it away (``deploy/logrotate/ecomm-gateway``) and the next line starts the new file. Lines
are appended (``O_APPEND``) whole, under one lock shared with the reopening."""

from __future__ import annotations

import os
import threading
from pathlib import Path


class LogFile:
    """A file-like object for structlog's PrintLogger and the stdlib handler: ``write`` and
    ``flush`` go to the file open now; ``reopen`` swaps in the file at the same path."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fh = self._open()

    def _open(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")

    def write(self, text: str) -> int:
        with self._lock:
            return self._fh.write(text)

    def flush(self) -> None:
        with self._lock:
            self._fh.flush()

    def reopen(self) -> None:
        """After logrotate renamed the file: open (create) the path again, close the old one."""
        new = self._open()
        with self._lock:
            old, self._fh = self._fh, new
        old.close()

    def close(self) -> None:
        with self._lock:
            self._fh.close()
