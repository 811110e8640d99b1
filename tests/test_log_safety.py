"""Issue #10 item 8: with ``[logging] format = "json"`` every line the gateway process writes is
one JSON object, aiosmtpd's own log (``mail.log``) and every other standard-library logger
included, and client bytes (CR, ESC, NUL) in them are escaped, never written raw."""

from __future__ import annotations

import json
import logging
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import EXAMPLE_SENDER, MESSAGE, free_port, serve_process
from tests.raw_smtp import RawSMTP



@pytest.fixture
def served_debug(tmp_path):
    """``gateway serve`` as a process, logging JSON at debug level (the most it ever writes)."""
    (tmp_path / "senders").mkdir()
    (tmp_path / "senders" / "acme.toml").write_text(EXAMPLE_SENDER)
    smtp, admin = free_port(), free_port()
    (tmp_path / "gateway.toml").write_text(f"""
[server]
listen = ["127.0.0.1:{smtp}"]
hostname = "gw.test"
[admin]
listen = "127.0.0.1:{admin}"
[senders]
dir = "senders"
[logging]
level = "debug"
format = "json"
[checks.sender_auth]
mode = "off"
""")
    proc = serve_process(tmp_path / "gateway.toml", admin, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    yield smtp, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


HOSTILE = b"\r\x1b[2J\x1b]0;pwned\x07\x00\x7f"


def test_every_line_the_process_writes_is_json_with_client_bytes_escaped(served_debug):
    port, proc = served_debug
    with RawSMTP(port) as c:
        assert c.cmd(b"EHLO client" + HOSTILE).startswith(b"250-gw.test")
        # aiosmtpd logs an unknown command at warning level with the command in it
        assert c.cmd(b"X" + HOSTILE).startswith(b"500 5.5.2 Error: command ")
        assert c.cmd(b"MAIL FROM:<bounce-1@em.acme.example" + HOSTILE + b">").startswith(b"553")
        assert c.cmd(b"MAIL FROM:<bounce-1@em.acme.example>") == b"250 2.1.0 Sender OK\r\n"
        assert c.cmd(b"RCPT TO:<x" + HOSTILE + b"@example.edu>").startswith(b"550 5.7.1")
        assert c.cmd(b"RCPT TO:<alice@example.edu>") == b"250 2.1.5 OK\r\n"
        assert c.cmd(b"DATA").startswith(b"354")
        # the decision line carries the Message-ID, here with an escape sequence in it
        c.send(MESSAGE.replace(b"<m1@", b"<m1\x1b[2J\x1b]0;pwned\x07@") + b".\r\n")
        assert c.reply().startswith(b"250 2.0.0 Ok: delivered as ")
        assert c.cmd(b"QUIT") == b"221 2.0.0 Bye\r\n"
    proc.terminate()
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0
    lines = (out + err).split(b"\n")
    assert lines.pop() == b""  # every line ends with LF, nothing after the last one
    for raw in lines:
        # printable ASCII only: no control character (JSON writes them as \u001b, \r ...),
        # no DEL, nothing beyond ASCII is written raw
        assert all(0x20 <= b < 0x7f for b in raw), raw
        assert isinstance(json.loads(raw), dict), raw
    events = [json.loads(raw) for raw in lines]
    unknown = [e for e in events if e.get("logger") == "mail.log"
               and "unrecognised" in e["event"]]
    assert len(unknown) == 1 and unknown[0]["level"] == "warning"
    assert "\x1b" in unknown[0]["event"] or "\\x1b" in unknown[0]["event"]
    [decision] = [e for e in events if e["event"] == "message" and e["decision"] == "accept"]
    assert decision["message_id"] == "<m1\x1b[2J\x1b]0;pwned\x07@em.acme.example>"
    # aiosmtpd's info/debug lines (each command line, recipients in clear) are not written
    assert not any(b"alice@example.edu" in raw for raw in lines)


def test_stdlib_loggers_render_as_json_fields_in_process(logs):
    """Any library's %-formatted message, with its exception, is one JSON line."""
    logging.getLogger("aiohttp.server").error("bad request %r from %s", b"\r\nX\x1b", "::1")
    try:
        raise ValueError("boom\r\ninjected")
    except ValueError:
        logging.getLogger("asyncio").exception("task failed: %s", "x\x1b[31m")
    text = logs.text()
    assert all(line.isprintable() for line in text.splitlines())
    first, second = logs.lines()[-2:]
    assert first == {"event": "bad request b'\\r\\nX\\x1b' from ::1", "level": "error",
                     "logger": "aiohttp.server", "timestamp": first["timestamp"]}
    assert second["event"] == "task failed: x\x1b[31m" and second["logger"] == "asyncio"
    assert second["exception"].startswith("Traceback") and "boom" in second["exception"]


def test_decision_line_follows_a_new_logging_configuration(logs):
    """The decision line's logger is assembled once per configuration: after the logging is
    configured again (a reopened log file, a reload), its lines go where the new one says."""
    import io

    from gateway.ops.maillog import MailLog, configure_logging

    maillog = MailLog(b"k" * 32)
    maillog.decision(decision="accept", reason="relayed", recipients=["a@example.edu"])
    assert [line["reason"] for line in logs.lines() if line["event"] == "message"] == ["relayed"]
    other = io.StringIO()
    configure_logging("info", "json", stream=other, serving=False)
    try:
        maillog.decision(decision="defer", reason="rate_limited", recipients=[])
    finally:
        configure_logging("debug", "json", stream=logs.stream, serving=False)
    [line] = [json.loads(text) for text in other.getvalue().splitlines()]
    assert (line["event"], line["reason"]) == ("message", "rate_limited")
    assert [line["reason"] for line in logs.lines() if line["event"] == "message"] == ["relayed"]


# --- the JSON text of the decision log and the trace (gateway.infra.jsontext) ---------------

_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
            | st.text())
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


@settings(max_examples=2000, deadline=None)
@given(_values)
def test_json_text_is_the_standard_librarys_for_any_value_without_floats(value):
    """orjson's text where it is printable ASCII, else the standard library's: either way the
    very text ``json.dumps`` writes (compact), so every character outside printable ASCII (DEL,
    C1 controls, U+2028, bidirectional overrides) is escaped; integers wider than 64 bits too."""
    from gateway.infra.jsontext import dumps, dumps_bytes

    expected = json.dumps(value, separators=(",", ":"))
    assert dumps(value) == expected
    assert dumps_bytes(value) == expected.encode()


@settings(max_examples=500, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=5))
def test_json_floats_read_back_the_same(values):
    from gateway.infra.jsontext import dumps

    assert json.loads(dumps(values)) == values


@pytest.mark.parametrize("text, escaped", [
    ("\x7f", "\\u007f"), ("\x85", "\\u0085"), ("\u2028", "\\u2028"), ("\u202e", "\\u202e"),
    ("\x1b[2J", "\\u001b[2J"), ("é", "\\u00e9"),
])
def test_json_text_escapes_what_orjson_would_write_raw(text, escaped):
    from gateway.infra.jsontext import dumps

    assert dumps({"event": text}) == '{"event":"%s"}' % escaped


def test_json_text_gives_unknown_objects_to_default_as_before():
    import dataclasses
    import datetime as dt

    from gateway.infra.jsontext import dumps

    @dataclasses.dataclass
    class Thing:
        x: int

    at = dt.datetime(2026, 11, 29, tzinfo=dt.timezone.utc)
    assert dumps({"a": Thing(1), "b": at, "c": {1: 2}}, default=repr) == json.dumps(
        {"a": Thing(1), "b": at, "c": {1: 2}}, default=repr, separators=(",", ":"))
