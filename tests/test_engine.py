"""The front-independent engine (gateway.engine): what both fronts drive, and the dry run a
later ``gateway explain`` uses."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from gateway.checks.base import strip_header_fields
from gateway.engine import Client
from gateway.engine.edits import field_positions
from tests.conftest import MESSAGE


def test_explain_runs_the_real_pipeline_and_leaves_no_trace(gateways, sink, logs):
    gw = gateways.start(upstream=sink.url)
    engine = gw.gateway.engine
    client = Client(session_id="explain", ip=ipaddress.ip_address("127.0.0.1"), helo="c.test")
    txn, rcpts, result = gw.call(engine.explain(
        client, "bounce-1@em.acme.example", ["alice@example.edu", "bob@elsewhere.test"],
        MESSAGE))
    assert txn.reply is None and txn.ctx.sender.id == "acme" and txn.ctx.dry_run
    assert rcpts["alice@example.edu"].reply is None
    refused = rcpts["bob@elsewhere.test"]
    assert (refused.reply.code, refused.reply.enhanced, refused.reason) == \
        (550, "5.7.1", "relay_denied")
    assert result.kind == "relay" and result.reply is None
    ran = {(r.name, r.mode): r for r in txn.outcome.trace}
    assert ran[("identity", "enforce")].verdict.action == "accept"
    assert ran[("sender_auth", "off")].verdict is None
    assert ran[("rate_limit", "enforce")].ms is not None
    assert logs.events("message") == [] and logs.events("rcpt_refused") == []
    assert sink.messages == []
    assert gw.metric("gateway_messages_total", sender="acme", decision="accept",
                     reason="relayed") == 0


def test_explain_reports_a_refusal_at_mail(gateways):
    gw = gateways.start()
    client = Client(session_id="x", ip=ipaddress.ip_address("192.0.2.9"))
    txn, rcpts, result = gw.call(gw.gateway.engine.explain(
        client, "bounce-1@em.acme.example", ["alice@example.edu"], MESSAGE))
    assert (txn.reply.code, txn.reply.enhanced) == (550, "5.7.1") and result is None
    assert txn.outcome.trace[0].verdict.reason == "unregistered_ip"


NAMES = st.sampled_from(["Authentication-Results", "authentication-results", "Subject", "X-A"])
VALUES = st.text(alphabet="abc ;=.", max_size=12)


@given(st.lists(st.tuples(NAMES, VALUES, st.booleans()), max_size=8))
def test_field_positions_name_exactly_what_strip_removes(fields):
    """The milter front removes by (name, index among that name); removing those fields gives
    the same bytes the SMTP front relays."""
    raw = "".join(f"{n}: {v}\r\n" + ("\tmore\r\n" if fold else "")
                  for n, v, fold in fields).encode() + b"\r\nbody\r\n"

    def pred(name, value):
        return name.lower() == "authentication-results" and "a" in value

    positions = field_positions(raw, [pred])
    seen: dict[str, int] = {}
    kept = []
    for n, v, fold in fields:
        seen[n.lower()] = seen.get(n.lower(), 0) + 1
        if (n, seen[n.lower()]) not in positions:
            kept.append(f"{n}: {v}\r\n" + ("\tmore\r\n" if fold else ""))
    assert "".join(kept).encode() + b"\r\nbody\r\n" == strip_header_fields(raw, [pred])
