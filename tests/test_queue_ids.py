"""Queue ids (gateway.engine.queue_ids): time first, so they sort by time; then random."""

from __future__ import annotations

import base64
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.engine.queue_ids import queue_id
from tests.conftest import send

MS = st.integers(min_value=0, max_value=(1 << 45) - 1)


def millis(qid: str) -> int:
    return int.from_bytes(base64.b32hexdecode(qid), "big") >> 35


@settings(max_examples=2000, deadline=None)
@given(MS, MS)
def test_ids_sort_as_their_times(a, b):
    qa, qb = queue_id(a), queue_id(b)
    assert re.fullmatch(r"[0-9A-V]{16}", qa) and re.fullmatch(r"[0-9A-V]{16}", qb)
    assert (millis(qa), millis(qb)) == (a, b)
    if a < b:
        assert qa < qb


def test_ids_of_one_millisecond_differ():
    ids = {queue_id(1_764_400_000_000) for _ in range(10_000)}
    assert len(ids) == 10_000


def test_decisions_carry_the_time_of_their_mail(gateways, sink, logs):
    gw = gateways.start(upstream=sink.url)
    first_ms = int(gateways.clock.now().timestamp() * 1000)
    for _ in range(3):
        client, (code, _) = send(gw)
        client.quit()
        assert code == 250
        gateways.clock.advance(0.001)
    got = [e["queue_id"] for e in logs.events("message")]
    assert [millis(q) for q in got] == [first_ms, first_ms + 1, first_ms + 2]
    assert got == sorted(got) and len(sink.messages) == 3
