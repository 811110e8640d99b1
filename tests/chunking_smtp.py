"""aiosmtpd with BDAT (RFC 3030 CHUNKING), as campus mail's Postfix has: aiosmtpd itself has
only DATA. The suite's sink (tests/conftest.py) and the benchmarks' sink (bench/throughput.py)
run on it; their handlers offer CHUNKING in their EHLO hook."""

from __future__ import annotations

import asyncio
import re

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, syntax

# RFC 3030 2: bdat-cmd = "BDAT" SP chunk-size [ SP end-marker ] CR LF; chunk-size = 1*DIGIT
_BDAT = re.compile(r"([0-9]{1,9})(?: (LAST))?", re.IGNORECASE)


class ChunkingSMTP(SMTP):
    """A BDAT chunk is read whole, then answered; the LAST one hands the message (its chunks
    joined, exactly as sent: no dot-stuffing) to the handler's ``handle_DATA``, as DATA does.
    A chunk outside a transaction (no MAIL or RCPT) is read and refused with 503 5.5.1, as RFC
    3030 2 says; a malformed BDAT line cannot be skipped (its length is unknown), so it is
    refused with 501 5.5.4 and the connection closed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._chunks: list[bytes] = []

    def _set_post_data_state(self) -> None:  # also after RSET
        super()._set_post_data_state()
        self._chunks = []

    @syntax("BDAT chunk-size [LAST]")
    async def smtp_BDAT(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        match = _BDAT.fullmatch(arg or "")
        if match is None:
            await self.push("501 5.5.4 Syntax: BDAT chunk-size [LAST]")
            self.transport.close()
            return
        try:
            chunk = await self._reader.readexactly(int(match.group(1)))
        except asyncio.IncompleteReadError:
            return  # the client went away mid-chunk: no message
        envelope = self.envelope
        if envelope.mail_from is None or not envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need MAIL and RCPT before BDAT")
            return
        self._chunks.append(chunk)
        if match.group(2) is None:
            await self.push(f"250 2.0.0 {len(chunk)} octets received")
            return
        content = b"".join(self._chunks)
        envelope.chunks = len(self._chunks)  # (0 after DATA: aiosmtpd's Envelope has no such field)
        envelope.original_content = content
        envelope.content = (content.decode("utf-8", errors="surrogateescape")
                            if self._decode_data else content)
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)


class ChunkingController(Controller):
    def factory(self) -> ChunkingSMTP:
        return ChunkingSMTP(self.handler, **self.SMTP_kwargs)
