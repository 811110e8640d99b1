"""The early refusal's look at the store, skipped while this process knows there is ample room
(gateway.state.rooms): a sender well within its rate is not looked up at MAIL after its first
admission; near the limit, after a throttle or a reload, once the knowledge is a second old, or
for ``gateway explain``, the MAIL half looks again; room spent meanwhile by another gateway on
the same store only costs receiving the message, which the end of it defers. And skipped while
this process knows there is no room for longer than max_hold: a sender retrying over its rate
is refused from the store's last answer for a second, with the wait that is left. On every
state backend, through a live gateway; the looks are counted on the gateway's real store."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import urllib.request

import pytest

from gateway.engine.transaction import Client
from gateway.state import Admission, Limit, open_store
from gateway.state.rooms import Rooms
from tests.conftest import EXAMPLE_SENDER, MESSAGE
from tests.raw_smtp import RawSMTP
from tests.test_rate_limits import WIDE, send_one
from tests.test_rate_limits_early import upstream_counts
from tests.test_reload import reload, sender_file

RATE10 = {"acme": EXAMPLE_SENDER + 'rate = "10/minute"\n'}


@pytest.fixture(params=["memory", "sqlite", "redis"])
def state(request, tmp_path):
    """(backend, state url) on each backend; Redis: a real redis-server."""
    if request.param == "memory":
        return "memory", "memory:"
    if request.param == "sqlite":
        return "sqlite", f"sqlite:{tmp_path / 'state.sqlite3'}"
    return "redis", request.getfixturevalue("redis_server").url


def start(gateways, sink, state, toml: str = "", senders=None):
    return gateways.start(WIDE + toml + f'[state]\nurl = "{state[1]}"\n', senders=senders,
                          upstream=sink.url)


def count_looks(gw) -> list[list[str]]:
    """Every ``peek`` the gateway's store answers from now on (the keys it was asked about)."""
    store = gw.gateway.store
    real = store.peek
    calls: list[list[str]] = []

    async def peek(limits, now):
        calls.append([limit.key for limit in limits])
        return await real(limits, now)

    store.peek = peek  # the real store's own method, counted
    return calls


def mail_reply(gw) -> bytes:
    """The reply to MAIL, on a raw socket (then QUIT)."""
    with RawSMTP(gw.port) as raw:
        raw.cmd(b"EHLO client.test")
        reply = raw.cmd(b"MAIL FROM:<bounce-9@em.acme.example>")
        raw.cmd(b"QUIT")
    return reply


def spend_elsewhere(gw, state, tmp_path, limit: Limit) -> None:
    """Record ``limit.cost`` events under ``limit.key`` as another gateway would: for SQLite
    and Redis through a store of its own on the same file or server (its own connections, on
    its own event loop); in memory, on the store itself, past this process's rate check."""
    now = gw.gateway.clock.now().timestamp()
    if state[0] == "memory":
        admission = gw.call(gw.gateway.store.acquire([limit], now, "elsewhere"))
    else:
        async def other():
            store = open_store(state[1], gw.gateway.clock, tmp_path)
            try:
                return await store.acquire([limit], now, "elsewhere")
            finally:
                await store.close()

        admission = asyncio.run(other())
    assert admission.wait == 0


def test_ample_room_is_not_looked_up_after_the_first_admission(gateways, sink, state):
    gw = start(gateways, sink, state, 'global_rate = "600/minute"\n')
    looks = count_looks(gw)
    assert [send_one(gw)[0] for _ in range(10)] == [250] * 10
    # the first MAIL looked (nothing known yet); every later one knew the room from the end of
    # the message before it: 30/minute for the sender, 600/minute for the gateway
    assert looks == [["rate:acme:60", "rate:global:60"]]
    assert len(sink.messages) == 10


def test_near_the_limit_mail_looks_and_refuses_once_the_room_is_gone(gateways, sink, state):
    gw = start(gateways, sink, state, senders=RATE10)
    looks = count_looks(gw)
    seen = []
    for _ in range(10):
        assert send_one(gw)[0] == 250
        seen.append(len(looks))
    # at 10/minute the margin is 2: after the 7th message 3 are left, after the 8th only 2,
    # so from the 9th on every MAIL looks
    assert seen == [1, 1, 1, 1, 1, 1, 1, 1, 2, 3]
    before = upstream_counts(sink)
    assert mail_reply(gw) == (b"451 4.7.1 Sending rate of sender acme is limited to 10/minute; "
                              b"retry in 60 s\r\n")
    assert len(looks) == 4  # the refusal came from a look
    assert upstream_counts(sink) == before and len(sink.messages) == 10
    assert gw.metric("gateway_rate_deferrals_total", sender="acme", limit="sender") == 1


def test_a_throttle_or_a_reload_lowering_the_rate_applies_at_the_next_mail(gateways, sink,
                                                                             state):
    gw = start(gateways, sink, state)
    looks = count_looks(gw)
    assert [send_one(gw)[0] for _ in range(3)] == [250] * 3
    assert len(looks) == 1  # 27 of 30 left, known at once
    request = urllib.request.Request(
        gw.admin_url + "/api/throttles/acme", method="PUT",
        data=json.dumps({"rate": "3/minute"}).encode(),
        headers={"Authorization": f"Bearer {gw.gateway.admin_token}",
                 "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    # the same instant: what was known of the room was for 30/minute, not for 3/minute
    assert mail_reply(gw) == (b"451 4.7.1 Sending rate of sender acme is limited to 3/minute; "
                              b"retry in 60 s\r\n")
    assert len(looks) == 2
    gw.call(gw.gateway.throttles.clear("acme"))
    assert send_one(gw)[0] == 250  # 30/minute again: looked, then relayed
    assert len(looks) == 3 and len(sink.messages) == 4

    sender_file(gateways).write_text(EXAMPLE_SENDER + 'rate = "4/minute"\n')
    assert reload(gw)[0] == 200
    assert mail_reply(gw) == (b"451 4.7.1 Sending rate of sender acme is limited to 4/minute; "
                              b"retry in 60 s\r\n")
    assert len(looks) == 4 and len(sink.messages) == 4


def test_what_is_known_of_the_room_ages_out_after_a_second(gateways, sink, state):
    gw = start(gateways, sink, state)
    looks = count_looks(gw)
    assert send_one(gw)[0] == 250
    gateways.clock.advance(0.5)
    assert send_one(gw)[0] == 250
    assert len(looks) == 1  # known from the first message's admission, half a second old
    gateways.clock.advance(0.999)
    assert mail_reply(gw).startswith(b"250 ")
    assert len(looks) == 1  # known from the second one's, 0.999 s old
    gateways.clock.advance(0.001)
    assert send_one(gw)[0] == 250
    assert len(looks) == 2  # a second old: looked again
    assert len(sink.messages) == 3


def test_room_spent_by_another_gateway_is_deferred_at_the_end_of_the_message(gateways, sink,
                                                                               state, tmp_path):
    gw = start(gateways, sink, state)
    looks = count_looks(gw)
    assert send_one(gw)[0] == 250  # 29 of 30 left, as far as this gateway knows
    spend_elsewhere(gw, state, tmp_path, Limit("rate:acme:60", 30, 60, 29))
    over = b"4.7.1 Sending rate of sender acme is limited to 30/minute; retry in 60 s"
    with gw.smtp() as client:
        assert client.mail("bounce-1@em.acme.example")[0] == 250  # not looked up
        assert len(looks) == 1
        assert client.rcpt("alice@example.edu")[0] == 250
        assert client.data(MESSAGE) == (451, over)  # the end of the message decides
        # what that admission answered is known now (no room for 60 s): the next MAIL is
        # refused from it, without a look
        assert client.mail("bounce-1@em.acme.example") == (451, over)
        assert len(looks) == 1
    assert len(sink.messages) == 1


def test_a_sender_over_its_rate_is_refused_from_the_last_look_for_a_second(gateways, sink,
                                                                            state):
    """Retries within a second of a look that found no room for longer than max_hold (10 s)
    are refused from it, with the wait that is left then; a second later, or once the room is
    nearer than max_hold, the MAIL half looks again."""
    gw = start(gateways, sink, state, senders=RATE10)
    looks = count_looks(gw)
    assert [send_one(gw)[0] for _ in range(10)] == [250] * 10  # 10/minute spent at once
    gateways.clock.advance(30.5)
    n = len(looks)
    over = b"451 4.7.1 Sending rate of sender acme is limited to 10/minute; retry in %d s\r\n"
    assert mail_reply(gw) == over % 30  # looked: room in 29.5 s
    assert len(looks) == n + 1
    gateways.clock.advance(0.6)
    assert [mail_reply(gw) for _ in range(3)] == [over % 29] * 3  # 28.9 s left: not looked up
    assert len(looks) == n + 1
    assert gw.metric("gateway_rate_deferrals_total", sender="acme", limit="sender") == 4
    gateways.clock.advance(0.4)  # the look is a second old
    assert mail_reply(gw) == over % 29
    assert len(looks) == n + 2
    gateways.clock.advance(18.6)  # 10 s left, no more than max_hold: looked, and taken
    assert mail_reply(gw).startswith(b"250 ")
    assert len(looks) == n + 3
    assert len(sink.messages) == 10


def test_explain_always_looks(gateways, sink, state):
    gw = start(gateways, sink, state)
    looks = count_looks(gw)
    assert send_one(gw)[0] == 250
    client = Client(session_id="explain", ip=ipaddress.ip_address("127.0.0.1"),
                    helo="client.test")
    txn, _, _ = gw.call(gw.gateway.engine.explain(client, "bounce-1@em.acme.example",
                                                  ["alice@example.edu"], MESSAGE))
    assert txn.reply is None
    # the MAIL half looked, though the room was known; (and the DATA half too, spending nothing)
    assert looks == [["rate:acme:60"]] * 3
    assert len(sink.messages) == 1


def test_no_room_is_known_until_its_time_while_fresh_and_bounded():
    rooms = Rooms(size=2)
    a, b, c = ([Limit(f"rate:{name}:60", 10, 60)] for name in "abc")
    rooms.learn(a, Admission(20.0, 0, 10, (0,)), at=5.0, now=1000.0)
    assert rooms.full(a, 5.5, 1000.5) == (19.5, 0)
    assert rooms.full(a, 5.999, 1019.9) == (pytest.approx(0.1), 0)
    assert rooms.full(a, 5.5, 1020.0) is None  # its time has come
    assert rooms.full(a, 6.0, 1001.0) is None  # a second old
    assert rooms.full([Limit("rate:a:60", 11, 60)], 5.5, 1000.5) is None  # another count
    assert rooms.full([Limit("rate:a:60", 10, 60, 2)], 5.5, 1000.5) is None  # another cost
    rooms.learn(a, Admission(0.0, -1, 10, (0,)), at=5.2, now=1000.2)  # admitted: forgotten
    assert rooms.full(a, 5.5, 1000.5) is None
    rooms.learn(a, Admission(20.0, 0, 10, (0,)), at=5.0, now=1000.0)
    rooms.learn(b, Admission(20.0, 0, 10, (0,)), at=5.0, now=1000.0)
    rooms.learn(c, Admission(20.0, 0, 10, (0,)), at=5.0, now=1000.0)  # a goes
    assert [rooms.full(x, 5.5, 1000.5) is not None for x in (a, b, c)] == [False, True, True]
    rooms.learn(b, Admission(20.0, 0, 10, (0,)), at=5.0)  # without now: no wait is learned
    assert rooms.full(b, 5.5, 1000.5) == (19.5, 0)


def test_what_is_known_is_bounded_the_least_recently_learned_forgotten_first():
    rooms = Rooms(size=3)
    limits = {name: [Limit(f"rate:{name}:60", 30, 60)] for name in "abcd"}
    for name in "abc":
        rooms.learn(limits[name], Admission(0.0, -1, 1, (29,)), 0.0)
    rooms.learn(limits["a"], Admission(0.0, -1, 2, (28,)), 0.1)  # a: learned again
    rooms.learn(limits["d"], Admission(0.0, -1, 1, (29,)), 0.2)  # b goes
    assert len(rooms) == 3
    assert [name for name in "abcd" if rooms.ample(limits[name], 0.5)] == ["a", "c", "d"]
