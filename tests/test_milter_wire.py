"""Property tests for the milter packet reader (gateway/milter/wire.py): whatever bytes an MTA
sends, the reader yields events or raises BadPacket (or the stream's own end-of-data), never
anything else; and what kilter.protocol packs reads back as the same event."""

from __future__ import annotations

import asyncio
import ipaddress
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from kilter.protocol import messages as m

from gateway.milter import wire
from tests.milter_client import connect_packet, macro_packet

FRAMES = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda cmd, data: struct.pack("!L", len(data) + 1) + cmd + data,
              st.sampled_from(list(b"ACDEHLMNOQRTUBZ\x00\xff")).map(lambda c: bytes([c])),
              st.binary(max_size=64)),
)


async def read_all(data: bytes) -> list:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    events = []
    while (event := await wire.read_event(reader, 5)) is not None:
        events.append(event)
    return events


@settings(max_examples=300, deadline=None)
@given(st.lists(FRAMES, max_size=4).map(b"".join))
def test_any_bytes_give_events_or_bad_packet(data):
    try:
        asyncio.run(read_all(data))
    except (wire.BadPacket, asyncio.IncompleteReadError):
        pass


TEXT = st.text(st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters=":"),
               min_size=1, max_size=20)
VALUE = st.binary(max_size=40).map(lambda b: b.replace(b"\0", b""))


@settings(max_examples=200, deadline=None)
@given(st.one_of(
    st.builds(m.EnvelopeFrom, VALUE.map(lambda v: b"<" + v + b">"),
              st.lists(VALUE.filter(bool), max_size=3)),
    st.builds(m.EnvelopeRecipient, VALUE.map(lambda v: b"<" + v + b">"),
              st.lists(VALUE.filter(bool), max_size=3)),
    st.builds(m.Header, TEXT, VALUE),
    st.builds(m.Body, st.binary(max_size=200)),
    st.builds(m.EndOfMessage, st.binary(max_size=200)),
))
def test_what_kilter_packs_reads_back(message):
    [event] = asyncio.run(read_all(wire.encode(message)))
    assert type(event) is type(message)
    assert event == message


@given(st.ip_addresses(), st.integers(0, 65535), st.binary(max_size=30).map(
    lambda b: b.replace(b"\0", b"")))
def test_connect_keeps_the_address_and_any_host_name(ip, port, hostname):
    family = b"4" if ip.version == 4 else b"6"
    [event] = asyncio.run(read_all(connect_packet(family, str(ip), port, hostname)))
    assert event.address == ipaddress.ip_address(str(ip)) and event.family == family.decode()


@given(st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"")))
def test_helo_is_kept_as_given(helo):
    [event] = asyncio.run(read_all(struct.pack("!L", len(helo) + 2) + b"H" + helo + b"\0"))
    assert event.hostname == helo.decode("utf-8", "replace")  # never IDNA-decoded


def test_macros_with_utf8_values_are_read():
    [event] = asyncio.run(read_all(macro_packet(b"M", **{"{auth_authen}": "jürgen"})))
    assert event.values == {"auth_authen": "jürgen"}
