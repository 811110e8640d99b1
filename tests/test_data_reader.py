"""The SMTP front's DATA reader (GatewaySMTP._read_data) against a reference reading of RFC 5321
4.1.1.4 and 4.5.2: the message ends at the first <CRLF>.<CRLF> (the CRLF of the DATA line
counts, so a lone "." line at once is an empty message), leading dots are un-stuffed, and the
bytes after the terminator (a pipelined next command) stay unread. Property-based, over random
bytes rich in CR, LF and dots, fed to a real asyncio.StreamReader in random slices."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.smtp import server
from gateway.smtp.server import GatewaySMTP

TERMINATOR = b"\r\n.\r\n"


def reference(stream: bytes) -> tuple[bytes, bytes] | None:
    """(the un-stuffed message, the bytes after its terminator), or None: not ended."""
    at = (b"\r\n" + stream).find(TERMINATOR)
    if at < 0:
        return None
    # in ``stream``, the terminator starts at ``at - 2``: the message is what precedes it and
    # its CRLF (the message's last line ending), nothing when the stream starts with ".\r\n"
    end = at - 2 + len(TERMINATOR)
    body = stream[:at]
    lines = body.split(b"\r\n")
    unstuffed = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    return unstuffed, stream[end:]


async def read(stream: bytes, cuts: list[int], limit: int | None, window: int):
    reader = asyncio.StreamReader(limit=1001)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for a, b in zip(points, points[1:]):
        reader.feed_data(stream[a:b])
    reader.feed_eof()
    fake = SimpleNamespace(_reader=reader, data_size_limit=limit)
    saved, server.DATA_WINDOW = server.DATA_WINDOW, window
    try:
        content = await GatewaySMTP._read_data(fake)
    finally:
        server.DATA_WINDOW = saved
    return content, await reader.read(), reader._limit


PIECES = st.sampled_from([b"\r\n", b".", b"\r", b"\n", b"a", b"..", b"\r\n.", b".\r\n",
                          b"\r\n.\r\n", b"Hello.", b"x" * 40])


@settings(max_examples=400, deadline=None)
@given(st.lists(PIECES, max_size=30), st.lists(st.integers(0, 2000), max_size=8),
       st.sampled_from([16, 64, 256 * 1024]))
def test_reads_exactly_to_the_first_terminator(pieces, cuts, window):
    stream = b"".join(pieces) + b"\r\n.\r\nNOOP\r\n"  # ended somewhere; then a command
    content, rest, limit = asyncio.run(read(stream, cuts, None, window))
    expected, after = reference(stream)
    assert content == expected
    assert rest == after  # nothing past the terminator was consumed
    assert limit == 1001  # the reader's line limit is given back


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 300))
def test_over_the_size_limit_is_read_to_its_end_and_refused(body, limit):
    """The limit is on the message as sent (dot-stuffed, up to the terminator's dot line)."""
    stream = b"\r\n".join(b"." + line if line.startswith(b".") else line
                          for line in body.replace(b"\r", b"").split(b"\n")) + b"\r\n.\r\nQUIT\r\n"
    expected, after = reference(stream)
    content, rest, _ = asyncio.run(read(stream, [7, 99], limit, 256 * 1024))
    assert rest == after == b"QUIT\r\n"
    if (b"\r\n" + stream).find(TERMINATOR) <= limit:
        assert content == expected
    else:
        assert content is None


class CountingReader(asyncio.StreamReader):
    reads = 0

    async def readexactly(self, n):
        self.reads += 1
        return await super().readexactly(n)

    async def readuntil(self, separator=b"\n"):
        self.reads += 1
        return await super().readuntil(separator)


def test_a_run_of_line_breaks_is_not_read_byte_by_byte():
    """A body of empty lines keeps the reader where a terminator may have begun; it then
    reads the bytes that could finish one (3 or 4), never one at a time, so such a body costs
    an abusive client's session no more reads than a body of "." lines did before."""
    body = b"\r\n" * 20_000

    async def main():
        reader = CountingReader(limit=1001)
        reader.feed_data(body + b".\r\nQUIT\r\n")
        reader.feed_eof()
        fake = SimpleNamespace(_reader=reader, data_size_limit=None)
        saved, server.DATA_WINDOW = server.DATA_WINDOW, 64
        try:
            content = await GatewaySMTP._read_data(fake)
        finally:
            server.DATA_WINDOW = saved
        return content, reader.reads, await reader.read()

    content, reads, rest = asyncio.run(main())
    assert content == body and rest == b"QUIT\r\n"
    assert reads <= len(body) // 3
