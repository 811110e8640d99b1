"""RFC 8058 section 4 end to end: List-Unsubscribe (and List-Unsubscribe-Post) count as signed
only when a DKIM signature that verified, for one of the sender's registered domains, covers
them. Keys are served by a real Knot DNS server; each case asserts the exact reply and what
reached campus mail."""

from __future__ import annotations

import pytest

from gateway.checks.auth_dkim import DkimResult
from gateway.checks.dkim_once import verified
from tests.auth_helpers import auth_zones, message, rsa_key, sign
from tests.dns_server import KNOTD, SKIP_REASON, KnotServer, SilentNameserver
from tests.test_auth_smtp import config, deliver, header

pytestmark = pytest.mark.skipif(KNOTD is None, reason=SKIP_REASON)

ONE_CLICK = ["List-Unsubscribe-Post: List-Unsubscribe=One-Click"]
HTTPS = "<https://pass.acme.example/u/1>, <mailto:unsub-1@pass.acme.example>"
NOT_COVERING = ["from", "to", "subject", "date", "message-id"]
COVERING = NOT_COVERING + ["list-unsubscribe", "list-unsubscribe-post"]


@pytest.fixture(scope="module")
def knot(tmp_path_factory):
    server = KnotServer(tmp_path_factory.mktemp("knot"), auth_zones())
    yield server
    server.stop()


@pytest.fixture
def start(gateways, sink, knot):
    from tests.auth_helpers import SENDER

    def run(nameserver: str | None = None, extra: str = "", **settings):
        return gateways.start(toml=config(nameserver or knot.address, extra, **settings),
                              senders={"acme": SENDER}, upstream=sink.url)
    return run


def promo() -> bytes:
    return message(unsubscribe=HTTPS, extra=ONE_CLICK)


def two_signatures() -> bytes:
    """An invalid signature (another run's key) that covers the unsubscribe fields, then a valid
    one that does not."""
    bad = sign(promo(), "rsa2048", "acme.example", include=COVERING,
               key=rsa_key(2048, "another run")[0])
    return sign(bad, "rsa2048", "acme.example", include=NOT_COVERING)


REFUSED_TWO = (550, "5.7.1 List-Unsubscribe and List-Unsubscribe-Post must be covered by a "
                    "valid DKIM signature of a registered domain (RFC 8058 section 4): signature "
                    "d=acme.example s=rsa2048 is fail (signature did not verify)")


def test_valid_signature_covering_both_fields_is_relayed(start, sink):
    gw = start()
    raw = sign(promo(), "rsa2048", "acme.example", include=COVERING)
    assert deliver(gw, raw) == (250, b"2.0.0 Ok: queued as SINK1")
    [msg] = sink.messages
    assert msg.content.endswith(raw)


def test_invalid_covering_signature_with_a_valid_other_one_is_refused(start, sink, logs):
    gw = start()
    code, text = deliver(gw, two_signatures())
    assert (code, text.decode()) == REFUSED_TWO
    assert sink.messages == []
    [line] = logs.events("message")
    assert (line["decided_by"], line["reason"]) == ("unsubscribe", "unsubscribe_unsigned")


def test_two_signature_case_is_refused_with_sender_auth_off(start, sink):
    gw = start(mode="off")
    assert deliver(gw, two_signatures()) == (REFUSED_TWO[0], REFUSED_TWO[1].encode())
    assert sink.messages == []


def test_two_signature_case_with_sender_auth_in_monitor_mode(start, sink):
    gw = start(mode="monitor")
    assert deliver(gw, two_signatures()) == (REFUSED_TWO[0], REFUSED_TWO[1].encode())


def test_unsubscribe_monitor_mode_relays_and_counts(start, sink):
    gw = start(extra='\n[checks.unsubscribe]\nmode = "monitor"\n')
    assert deliver(gw, two_signatures())[0] == 250
    assert len(sink.messages) == 1
    assert gw.metric("gateway_check_monitored_total", check="unsubscribe",
                     action="reject") == 1


def test_valid_covering_signature_of_an_unregistered_domain_does_not_count(start, sink):
    gw = start()  # SPF passes for pass.acme.example, so sender_auth accepts
    raw = sign(promo(), "rsa2048", "evil.example", include=COVERING)
    code, text = deliver(gw, raw)
    assert (code, text.decode()) == (
        550, "5.7.1 List-Unsubscribe and List-Unsubscribe-Post must be covered by a valid DKIM "
             "signature of a registered domain (RFC 8058 section 4): signature d=evil.example "
             "s=rsa2048 passes but d= is not a registered domain of this sender")
    assert sink.messages == []


def test_mailto_only_needs_list_unsubscribe_covered(start, sink):
    gw = start()
    raw = sign(message(), "rsa2048", "acme.example",
               include=NOT_COVERING + ["list-unsubscribe"], key=rsa_key(2048, "another run")[0])
    raw = sign(raw, "ed", "acme.example", algorithm="ed25519-sha256", include=NOT_COVERING)
    code, text = deliver(gw, raw)
    assert (code, text.decode()) == (
        550, "5.7.1 List-Unsubscribe must be covered by a valid DKIM signature of a registered "
             "domain (RFC 8058 section 4): signature d=acme.example s=rsa2048 is fail "
             "(signature did not verify)")


def test_covering_signature_whose_key_cannot_be_fetched_defers(start, sink):
    silent = SilentNameserver()
    try:
        gw = start(nameserver=silent.address, mode="off")
        code, text = deliver(gw, sign(promo(), "rsa2048", "acme.example", include=COVERING))
    finally:
        silent.close()
    assert (code, text.decode()) == (
        451, "4.7.5 The DKIM signature covering List-Unsubscribe and List-Unsubscribe-Post could "
             "not be verified for now (key look-up failed); try again later")
    assert sink.messages == []


def test_authentication_failure_is_reported_before_coverage(start, sink):
    gw = start(require="dkim")  # the covering signature is the only one, and it fails
    raw = sign(promo(), "rsa2048", "acme.example", include=COVERING,
               key=rsa_key(2048, "another run")[0])
    code, text = deliver(gw, raw)
    assert (code, text.split(b" ")[0]) == (550, b"5.7.20")


def test_signatures_verified_by_sender_auth_are_reused(start, sink):
    gw = start()
    raw = sign(promo(), "rsa2048", "acme.example", include=COVERING)
    assert deliver(gw, raw)[0] == 250
    [ar] = header(sink.messages[0].content, "Authentication-Results")
    assert ar.count("dkim=pass") == 1


class _CountingVerifier:
    def __init__(self) -> None:
        self.calls = 0

    async def verify(self, raw, opts, fields=()):
        self.calls += 1
        return [DkimResult("pass", "acme.example", "s")]


async def test_verified_runs_the_verifier_once_per_transaction():
    import ipaddress
    from types import SimpleNamespace

    from gateway.checks.base import Context
    from gateway.checks.sender_auth import SenderAuthSettings
    from gateway.infra.clock import FakeClock

    ctx = Context(client_ip=ipaddress.ip_address("127.0.0.1"), raw=b"x")
    deps = SimpleNamespace(clock=FakeClock(), config=SimpleNamespace(
        check_settings=lambda name: SenderAuthSettings()))
    counting = _CountingVerifier()
    first = await verified(ctx, deps, counting)
    second = await verified(ctx, deps, counting)
    assert first is second and counting.calls == 1
