"""The mail log: structlog, one JSON line per decision, one method per event.

Never a message body; recipients appear as keyed hashes (HMAC-SHA-256, truncated) unless
``[logging] recipients = "clear"``, so the log can correlate a recipient across lines without
naming them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sys
import threading
from pathlib import Path

import structlog

from gateway.infra import jsontext


def configure_logging(level: str, fmt: str, stream=None, serving: bool | None = None) -> None:
    """structlog for the gateway's own events, and every standard-library logger (aiosmtpd's
    ``mail.log``, aiohttp, asyncio, warnings) through the same renderer onto the same stream:
    with ``format = "json"`` every line is one JSON object. A %-formatted stdlib message is
    rendered first and becomes the ``event`` field, so client bytes in it are JSON-escaped.
    ``serving``: the gateway process (default: when writing to standard output), whose
    uncaught exceptions are logged too; ``stream`` may be a gateway.logfile.LogFile."""
    out = stream or sys.stdout
    renderer = (structlog.processors.JSONRenderer(serializer=jsontext.dumps) if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    threshold = logging.getLevelName(level.upper())
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    handler = _StdlibHandler(out)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
                           stamp],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer]))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)
    # aiosmtpd logs every command line and recipient in clear at info and debug: the decision
    # log says what matters, with recipients hashed; its warnings and errors still come through
    logging.getLogger("mail.log").setLevel(max(threshold, logging.WARNING))
    logging.captureWarnings(True)
    if stream is None if serving is None else serving:
        # the serving process: an uncaught exception is a log line, too
        logging.raiseExceptions = False
        sys.excepthook = _log_uncaught
        threading.excepthook = lambda a: _log_uncaught(a.exc_type, a.exc_value, a.exc_traceback)


def _log_uncaught(exc_type, value, tb) -> None:
    logging.getLogger("gateway").critical("uncaught_exception", exc_info=(exc_type, value, tb))


class _StdlibHandler(logging.Handler):
    """Writes formatted stdlib records through a structlog PrintLogger, so that they share
    its per-stream lock and never interleave with structlog's own lines."""

    def __init__(self, stream) -> None:
        super().__init__()
        self._out = structlog.PrintLogger(stream)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._out.msg(self.format(record))
        except Exception:  # never a traceback on stderr from logging itself
            pass


def _secret_file(path: Path, make) -> bytes:
    """A secret kept in a file, created (0600) with ``make()`` if the file does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = make()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return path.read_bytes()
        with os.fdopen(fd, "wb") as fh:
            fh.write(secret)
        return secret


def load_hash_key(path: Path) -> bytes:
    """The recipient-hashing key, created on first start if the file does not exist."""
    return _secret_file(path, lambda: secrets.token_bytes(32))


def load_token(path: Path) -> str:
    """The admin API bearer token, created on first start; the CLI reads the same file."""
    return _secret_file(path, lambda: secrets.token_urlsafe(32).encode()).decode().strip()


class MailLog:
    def __init__(self, hash_key: bytes, clear_recipients: bool = False,
                 level: str = "info") -> None:
        self.log = structlog.get_logger("gateway.mail")
        # decisions are logged at info: below that level the handler skips building them
        self.enabled = logging.getLevelName(level.upper()) <= logging.INFO
        self.key = hash_key
        self.clear = clear_recipients
        # the decision line's logger, assembled once per logging configuration: the lazy proxy
        # that get_logger returns assembles a new one on every call (a fifth of the line's cost)
        self._bound: tuple[object, object] = (None, None)

    def rcpt_id(self, address: str) -> str:
        if self.clear:
            return address
        return hmac.new(self.key, address.lower().encode(), hashlib.sha256).hexdigest()[:20]

    def connected(self, session_id: str, client_ip: str) -> None:
        self.log.debug("connect", session=session_id, client_ip=client_ip)

    def auth_failed(self, session_id: str | None, client_ip: str, username: str,
                    **details) -> None:
        """A failed SMTP AUTH (never the password), with the throttle's counts and action."""
        self.log.info("auth_failed", session=session_id, client_ip=client_ip, username=username,
                      **details)

    def auth_lockout(self, client_ip: str, failures: int, window: float) -> None:
        self.log.warning("auth_lockout", client_ip=client_ip, failures=failures, window=window)

    def rcpt_refused(self, session_id: str, client_ip: str, sender: str | None, rcpt: str,
                     reply: str, reason: str) -> None:
        self.log.info("rcpt_refused", session=session_id, client_ip=client_ip, sender=sender,
                      rcpt=self.rcpt_id(rcpt), reply=reply, reason=reason)

    def rcpt_dropped(self, session_id: str, queue_id: str, sender: str | None, rcpt: str,
                     rule: str) -> None:
        """A recipient accepted at RCPT but left out of the relay (gateway.policy.flags): the audit
        record, with the recipient hashed and the rule by its opaque name."""
        if not self.enabled:
            return
        self.log.info("rcpt_dropped", session=session_id, queue_id=queue_id, sender=sender,
                      rcpt=self.rcpt_id(rcpt), rule=rule)

    def decision(self, **fields) -> None:
        """One line per message decision: accepted, rejected, deferred, at MAIL or DATA."""
        if "recipients" in fields:
            fields["recipients"] = [self.rcpt_id(r) for r in fields["recipients"]]
        processors = structlog.get_config()["processors"]  # a new list per configure_logging
        configured, bound = self._bound
        if configured is not processors:
            bound = self.log.bind()
            self._bound = (processors, bound)
        bound.info("message", **fields)
