"""JSON text for the lines written once a message or more (the decision log, the trace's
records): orjson, several times faster than the standard library's encoder (a decision line
0.16x, bench/json_cost.py), with the standard library's output wherever the two would differ in
what reaches a reader.

The standard library (``ensure_ascii``) writes every character outside printable ASCII as an
escape, so no log line ever carries a raw DEL, C1 control, bidirectional override or line
separator (U+2028) from a client. orjson escapes only what JSON requires (below U+0020, quote,
backslash). So orjson's text is used when it is printable ASCII (almost every line: paths,
queue ids and hashes are ASCII), and otherwise the line is encoded again by the standard
library, as are the objects orjson refuses (an integer wider than 64 bits, a key that is no
string). Datetimes and dataclasses go to ``default`` as they did (orjson would render them
itself)."""

from __future__ import annotations

import json
from typing import Any, Callable

import orjson

_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def _plain(text: bytes) -> bool:
    """Printable ASCII only (JSON's own escapes keep it so: control characters are escaped)."""
    return text.isascii() and b"\x7f" not in text


def dumps_bytes(obj: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """``json.dumps(obj, default=default, separators=(",", ":")).encode()``: the same JSON
    value, and the same text wherever that is not printable ASCII."""
    try:
        text = orjson.dumps(obj, default=default, option=_OPTIONS)
    except (orjson.JSONEncodeError, TypeError):
        text = b""
    if text and _plain(text):
        return text
    return json.dumps(obj, default=default, separators=(",", ":")).encode()


def dumps(obj: Any, default: Callable[[Any], Any] | None = None, **_: Any) -> str:
    """:func:`dumps_bytes` as text (structlog's JSONRenderer serializer: it passes its
    ``default``)."""
    return dumps_bytes(obj, default).decode("ascii")
