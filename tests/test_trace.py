"""The trace (gateway.ops.trace): decisions of real traffic kept in the state store (SQLite here),
queried with `gateway trace` as a real process through the running gateway's admin API, by queue
id, Message-ID, sender, decision and recipient; recipients only as keyed hashes, never bodies;
expired with [trace] days and purged by the retention job."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import MESSAGE, free_port, send

ROOT = Path(__file__).resolve().parent.parent


def trace_cmd(conf: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "trace", *args, "--config",
                           str(conf)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture
def traced(gateways, sink, logs):
    admin = free_port()
    toml = (f'[admin]\nlisten = "127.0.0.1:{admin}"\n[state]\nurl = "sqlite:state.sqlite3"\n'
            "[trace]\ndays = 14\n")
    gw = gateways.start(toml, upstream=sink.url)
    client, reply = send(gw, rcpts=("alice@example.edu", "bob@example.edu"))
    assert reply[0] == 250
    assert client.mail("nobody@em.acme.example")[0] == 550
    client.rset()
    large = MESSAGE.replace(b"Message-ID: <m1@em.acme.example>", b"Message-ID: <m2@em.acme.example>"
                            ).replace(b"Subject: Hello\r\n", b"Subject: Hi\r\nX-Audience-Size: "
                                      b"20000\r\n")
    client.mail("bounce-2@em.acme.example")
    client.rcpt("carol@example.edu")
    assert client.data(large)[0] == 451
    client.quit()
    gw.call(gw.gateway.trace.flush())
    relayed = [e["queue_id"] for e in logs.events("message") if e["decision"] == "accept"]
    return gw, gateways.tmp_path / "gw" / "gateway.toml", relayed[0]


def test_trace_by_queue_id_message_id_sender_decision_and_recipient(traced):
    gw, conf, queue_id = traced
    one = trace_cmd(conf, "--queue-id", queue_id, "--json")
    assert one.returncode == 0, one.stderr
    [record] = json.loads(one.stdout)
    assert (record["queue_id"], record["sender"], record["decision"], record["reason"],
            record["stage"], record["mail_from"], record["message_id"], record["reply"]) == (
        queue_id, "acme", "accept", "relayed", "data", "bounce-1@em.acme.example",
        "<m1@em.acme.example>", "250 2.0.0")
    assert len(record["recipients"]) == 2 and all(len(r) == 20 for r in record["recipients"])
    assert "alice@example.edu" not in one.stdout
    text = trace_cmd(conf, "--queue-id", queue_id)
    assert text.stdout.splitlines()[0] == (
        f"2026-11-02 15:00:00 UTC  {queue_id}  acme  accept (relayed) at data  from "
        "[127.0.0.1] <bounce-1@em.acme.example>  message-id <m1@em.acme.example>  2 "
        "recipient(s)  reply: 250 2.0.0")
    for mid in ("<m2@em.acme.example>", "m2@em.acme.example"):
        [large] = json.loads(trace_cmd(conf, "--message-id", mid, "--json").stdout)
        assert (large["decision"], large["reason"]) == ("defer", "large_audience")
    everything = json.loads(trace_cmd(conf, "--sender", "acme", "--since", "2h",
                                      "--json").stdout)
    assert sorted((r["decision"], r["reason"]) for r in everything) == [  # (the same second)
        ("accept", "relayed"), ("defer", "large_audience"), ("reject", "return_path_mismatch")]
    [refused] = json.loads(trace_cmd(conf, "--sender", "acme", "--decision", "reject",
                                     "--json").stdout)
    assert refused["stage"] == "mail" and refused["reply"].startswith("550 5.7.1 Return-path")
    to_bob = json.loads(trace_cmd(conf, "--sender", "acme", "--recipient", "BOB@example.edu",
                                  "--json").stdout)
    assert [r["queue_id"] for r in to_bob] == [queue_id]
    none = trace_cmd(conf, "--sender", "acme", "--recipient", "dave@example.edu")
    assert none.returncode == 1 and none.stderr == "no decision found\n"
    # what the store holds: hashes, never addresses or bodies
    data = (conf.parent / "state.sqlite3").read_bytes()
    assert b"alice@example.edu" not in data and b"Hello, world." not in data


def test_retention_expires_and_purges(traced):
    gw, conf, queue_id = traced
    db = conf.parent / "state.sqlite3"

    def rows() -> int:
        with sqlite3.connect(db) as c:
            return c.execute("SELECT count(*) FROM kv WHERE key LIKE 'trace:%'").fetchone()[0]

    # three records with their sender index, two with a Message-ID index (not the MAIL refusal)
    assert rows() == 8
    gw.gateway.clock.advance(13 * 86400)
    assert trace_cmd(conf, "--queue-id", queue_id).returncode == 0
    assert gw.call(gw.gateway.trace.purge()) == 0 or rows() == 8  # (other expired keys only)
    gw.gateway.clock.advance(86400 + 1)  # past [trace] days
    assert trace_cmd(conf, "--queue-id", queue_id).returncode == 1
    purged = gw.call(gw.gateway.trace.purge())  # the retention job's step
    assert purged >= 8 and rows() == 0


def test_trace_api_needs_the_token_and_a_selector(traced):
    gw, _, _ = traced
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(gw.admin_url + "/api/trace?sender=acme", timeout=10)
    assert err.value.code == 401
    request = urllib.request.Request(gw.admin_url + "/api/trace?since=2h", headers={
        "Authorization": f"Bearer {gw.gateway.admin_token}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400
    assert json.loads(err.value.read()) == {
        "error": "bad request: a queue id, a Message-ID or a sender is needed"}


def test_trace_off(gateways):
    admin = free_port()
    gateways.start(f'[admin]\nlisten = "127.0.0.1:{admin}"\n[trace]\ndays = 0\n')
    conf = gateways.tmp_path / "gw" / "gateway.toml"
    proc = trace_cmd(conf, "--sender", "acme")
    assert proc.returncode == 1
    assert proc.stderr == "the running gateway keeps no trace ([trace] days = 0)\n"


class CountingStore:
    """The real store, counting the trace writer's round trips (set_many calls)."""

    def __init__(self, store) -> None:
        self.store, self.batches = store, []

    async def set_many(self, items):
        self.batches.append(len(items))
        await self.store.set_many(items)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_records_are_written_in_batches(gateways, sink, logs):
    """Records queue up and go to the store in batches (one SQLite transaction each), not three
    writes a message; flush() writes what is queued without waiting out the linger."""
    admin = free_port()
    gw = gateways.start(f'[admin]\nlisten = "127.0.0.1:{admin}"\n[state]\n'
                        'url = "sqlite:state.sqlite3"\n[trace]\ndays = 14\n', upstream=sink.url)
    counting = gw.gateway.trace.store = CountingStore(gw.gateway.trace.store)
    client = gw.smtp()
    for i in range(12):
        assert client.mail(f"bounce-{i}@em.acme.example")[0] == 250
        assert client.rcpt("alice@example.edu")[0] == 250
        msg = MESSAGE.replace(b"<m1@em.acme.example>", f"<b{i}@em.acme.example>".encode())
        assert client.data(msg)[0] == 250
    client.quit()
    gw.call(gw.gateway.trace.flush())
    assert sum(counting.batches) == 12 * 3  # record, sender index, Message-ID index
    assert len(counting.batches) < 12
    queue_ids = [e["queue_id"] for e in logs.events("message") if e["decision"] == "accept"]
    assert len(queue_ids) == 12 and len(sink.messages) == 12
    conf = gateways.tmp_path / "gw" / "gateway.toml"
    for qid in queue_ids:
        found = trace_cmd(conf, "--queue-id", qid, "--json")
        assert found.returncode == 0, found.stderr
        assert json.loads(found.stdout)[0]["queue_id"] == qid


def test_hour_index_formatted_once_an_hour_is_the_records_own():
    """The sender index's hour (trace:s:<sender>:<YYYYMMDDHH>:<queue id>) is formatted once an
    hour, not once a record: for any sequence of record times, the hour of each."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from gateway.infra.clock import FakeClock
    from gateway.ops.trace import TraceStore, _hour
    from gateway.state.memory import MemoryStore

    trace = TraceStore(MemoryStore(FakeClock()), b"k" * 32, FakeClock(), days=1)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.floats(min_value=0, max_value=4e9, allow_nan=False), max_size=30))
    def check(times):
        for ts in times:
            assert trace._hour_of(ts) == _hour(ts)

    check()
