"""DMARC (RFC 7489) end to end against records served by a real Knot DNS server: policy
discovery at the From: domain and at its organizational domain, each alignment mode, p / sp /
pct, bad records and DNS failures; reported in Authentication-Results, enforced only for a
sender that requires it. Each case asserts the exact reply and what reached campus mail."""

from __future__ import annotations

import re

import pytest

from gateway.checks.auth_dmarc import RecordError, parse_record, sampled
from tests.auth_helpers import SENDER, example_records, key_record, message, rsa_key, sign
from tests.dns_server import KNOTD, SKIP_REASON, KnotServer, txt, zone_text
from tests.test_auth_smtp import config, deliver, header

pytestmark = pytest.mark.skipif(KNOTD is None, reason=SKIP_REASON)

STRICT = "adkim=s; aspf=s"
DMARC_RECORDS = {
    "acme": "v=DMARC1; p=reject; sp=none",  # the organizational domain's record
    "r.acme": "v=DMARC1; p=reject",
    "s.acme": "v=DMARC1; p=quarantine; adkim=s; aspf=s",
    "pnone.acme": f"v=DMARC1; p=none; {STRICT}",
    "pct0.acme": f"v=DMARC1; p=reject; pct=0; {STRICT}",
    "pct0q.acme": f"v=DMARC1; p=quarantine; pct=0; {STRICT}",
    "pct100.acme": f"v=DMARC1; p=reject; pct=100; {STRICT}",
    "notdmarc.acme": "v=spf1 -all",
    "dup.acme": "v=DMARC1; p=reject; p=none",
    "badp.acme": "v=DMARC1; p=bogus",
    "badprua.acme": f"v=DMARC1; p=bogus; rua=mailto:dmarc@acme.example; {STRICT}",
    "badmode.acme": "v=DMARC1; p=reject; adkim=x",
    "badpct.acme": "v=DMARC1; p=reject; pct=150",
    "huge.acme": "v=DMARC1; p=reject; rua=mailto:" + "a" * 2100 + "@acme.example",
    "spaced.acme": "v = DMARC1 ;P=Reject; ADKIM=S ;",
}


def dmarc_zones() -> dict[str, str]:
    records = example_records()
    records += [(f"_dmarc.{owner}", "TXT", txt(value)) for owner, value in DMARC_RECORDS.items()]
    records += [("_dmarc.multi.acme", "TXT", txt("v=DMARC1; p=reject")),
                ("_dmarc.multi.acme", "TXT", txt("v=DMARC1; p=none")),
                ("rsa2048._domainkey.s.acme", "TXT", txt(key_record(rsa_key(2048)[1]))),
                ("s.acme", "TXT", txt("v=spf1 ip4:127.0.0.1 ip6:::1 -all"))]
    # a zone knot cannot load: every name in it is answered SERVFAIL
    return {"example": zone_text("example", records),
            "tempfail.acme.example": "this is not a zone file\n"}


@pytest.fixture(scope="module")
def knot(tmp_path_factory):
    server = KnotServer(tmp_path_factory.mktemp("knot"), dmarc_zones())
    yield server
    server.stop()


DMARC_SENDER = SENDER.replace('"bounce-*@macro.acme.example"]',
                              '"bounce-*@macro.acme.example", "bounce-*@s.acme.example"]')


@pytest.fixture
def start(gateways, sink, knot):
    def run(sender: str = DMARC_SENDER, **settings):
        return gateways.start(toml=config(knot.address, **settings), senders={"acme": sender},
                              upstream=sink.url)
    return run


_DMARC = re.compile(r'dmarc=(?:[^;"]|"(?:[^"\\]|\\.)*")*')


def dmarc_of(sink, i: int = -1) -> str:
    [ar] = header(sink.messages[i].content, "Authentication-Results")
    [found] = _DMARC.findall(ar)
    return found


def dkim_signed(sub: str, domain: str = "acme.example") -> bytes:
    """From: news@<sub>.acme.example, DKIM-signed for ``domain`` (relaxed-aligned with it)."""
    return sign(message(from_=f"News <news@{sub}>"), "rsa2048", domain)


FAIL_SPF = "bounce-1@fail.acme.example"


# --- pass / fail / none for each alignment mode and policy --------------------------------

@pytest.mark.parametrize("raw,mail_from,expected", [
    # DKIM d=acme.example, relaxed (adkim default): the same organizational domain
    (lambda: dkim_signed("r.acme.example"), FAIL_SPF,
     "dmarc=pass (p=reject) header.from=r.acme.example"),
    # adkim=s: d=acme.example is not the From: domain; d=s.acme.example is
    (lambda: dkim_signed("s.acme.example"), FAIL_SPF,
     "dmarc=fail (p=quarantine) header.from=s.acme.example"),
    (lambda: dkim_signed("s.acme.example", "s.acme.example"), FAIL_SPF,
     "dmarc=pass (p=quarantine) header.from=s.acme.example"),
    # SPF alone: aspf relaxed passes for pass.acme.example, aspf=s needs the From: domain itself
    (lambda: message(from_="news@r.acme.example"), "bounce-1@pass.acme.example",
     "dmarc=pass (p=reject) header.from=r.acme.example"),
    (lambda: message(from_="news@s.acme.example"), "bounce-1@pass.acme.example",
     "dmarc=fail (p=quarantine) header.from=s.acme.example"),
    (lambda: message(from_="news@s.acme.example"), "bounce-1@s.acme.example",
     "dmarc=pass (p=quarantine) header.from=s.acme.example"),
    # p=none fails too; it only asks for nothing to be done
    (lambda: dkim_signed("pnone.acme.example"), FAIL_SPF,
     "dmarc=fail (p=none) header.from=pnone.acme.example"),
    # the record's tags are case-insensitive and may have spaces around '='
    (lambda: dkim_signed("spaced.acme.example"), FAIL_SPF,
     "dmarc=fail (p=reject) header.from=spaced.acme.example"),
])
def test_result_for_each_alignment_mode_and_policy(start, sink, raw, mail_from, expected):
    gw = start()
    assert deliver(gw, raw(), mail_from) == (250, b"2.0.0 Ok: queued as SINK1")
    assert dmarc_of(sink) == expected


def test_no_record_anywhere_is_none(start, sink, logs):
    """No record: dmarc=none in the results and the count, no log line (most domains)."""
    gw = start()
    raw = sign(message(from_="news@mail.acme-mail.example"), "rsa2048", "acme-mail.example")
    assert deliver(gw, raw, "bounce-1@mail.acme-mail.example")[0] == 250
    assert dmarc_of(sink) == ('dmarc=none reason="no DMARC record at _dmarc.acme-mail.example" '
                              "header.from=mail.acme-mail.example")
    [ar] = header(sink.messages[0].content, "Authentication-Results")
    assert ar.endswith("x-ecomm-alignment=pass (relaxed alignment, registered domains) "
                       "header.from=mail.acme-mail.example")
    assert gw.metric("gateway_auth_results_total", check="dmarc", result="none",
                     sender="acme") == 1
    assert logs.events("dmarc_result") == []


# --- organizational-domain discovery, sp ------------------------------------------------

def test_organizational_domain_record_applies_with_sp_to_a_subdomain(start, sink):
    gw = start()
    assert deliver(gw, dkim_signed("nosub.acme.example"), FAIL_SPF)[0] == 250
    assert dmarc_of(sink) == "dmarc=pass (p=none) header.from=nosub.acme.example"


def test_organizational_domain_itself_uses_p(start, sink):
    gw = start()
    assert deliver(gw, dkim_signed("acme.example"), FAIL_SPF)[0] == 250
    assert dmarc_of(sink) == "dmarc=pass (p=reject) header.from=acme.example"


def test_organizational_record_fails_an_unaligned_subdomain(start, sink, logs):
    gw = start(mode="monitor")  # sender_auth itself refuses it; monitor relays with the results
    raw = dkim_signed("nosub.acme.example", "acme-mail.example")
    assert deliver(gw, raw, FAIL_SPF)[0] == 250
    assert dmarc_of(sink) == "dmarc=fail (p=none) header.from=nosub.acme.example"
    assert gw.metric("gateway_auth_results_total", check="dmarc", result="fail",
                     sender="acme") == 1
    [line] = logs.events("dmarc_result")
    assert (line["domain"], line["result"], line["policy"], line["disposition"]) == (
        "nosub.acme.example", "fail", "none", "none")
    assert line["reason"] == "DKIM d=acme-mail.example not aligned (relaxed)"


def test_a_txt_record_that_is_not_dmarc_is_ignored(start, sink):
    gw = start()
    assert deliver(gw, dkim_signed("notdmarc.acme.example"), FAIL_SPF)[0] == 250
    assert dmarc_of(sink) == "dmarc=pass (p=none) header.from=notdmarc.acme.example"


def test_several_records_mean_no_policy_and_no_fallback(start, sink):
    gw = start()
    assert deliver(gw, dkim_signed("multi.acme.example"), FAIL_SPF)[0] == 250
    assert dmarc_of(sink) == ('dmarc=none reason="2 DMARC records at _dmarc.multi.acme.example; '
                              'none applies" header.from=multi.acme.example')


# --- pct ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sub,expected", [
    ("pct0", "dmarc=fail (p=reject pct=0 dis=quarantine)"),
    ("pct0q", "dmarc=fail (p=quarantine pct=0 dis=none)"),
    ("pct100", "dmarc=fail (p=reject)"),
])
def test_pct_softens_the_policy_outside_the_sample(start, sink, sub, expected):
    gw = start()
    assert deliver(gw, dkim_signed(f"{sub}.acme.example"), FAIL_SPF)[0] == 250
    assert dmarc_of(sink) == f"{expected} header.from={sub}.acme.example"


def test_pct_sample_is_stable_and_proportional():
    messages = [f"message {i}".encode() for i in range(2000)]
    chosen = sum(sampled(m, 30) for m in messages)
    assert 500 <= chosen <= 700
    assert [sampled(m, 30) for m in messages[:50]] == [sampled(m, 30) for m in messages[:50]]
    assert not any(sampled(m, 0) for m in messages) and all(sampled(m, 100) for m in messages)


# --- bad records, DNS failures ----------------------------------------------------------

@pytest.mark.parametrize("sub,reason", [
    ("dup", "malformed DMARC record at _dmarc.dup.acme.example: tag p appears twice"),
    ("badp", "malformed DMARC record at _dmarc.badp.acme.example: p=bogus is not a policy"),
    ("badmode", "malformed DMARC record at _dmarc.badmode.acme.example: adkim=x is not r or s"),
    ("badpct", "malformed DMARC record at _dmarc.badpct.acme.example: pct=150 is not 0 to 100"),
    ("huge", "DMARC record at _dmarc.huge.acme.example is longer than 2048 octets"),
])
def test_malformed_or_oversized_records_are_permerror(start, sink, sub, reason):
    gw = start()
    assert deliver(gw, dkim_signed(f"{sub}.acme.example"), FAIL_SPF)[0] == 250
    assert dmarc_of(sink) == f'dmarc=permerror reason="{reason}" header.from={sub}.acme.example'
    assert gw.metric("gateway_auth_results_total", check="dmarc", result="permerror",
                     sender="acme") == 1


def test_invalid_p_with_a_report_address_is_read_as_none(start, sink):
    gw = start()
    assert deliver(gw, dkim_signed("badprua.acme.example"), FAIL_SPF)[0] == 250
    assert dmarc_of(sink) == "dmarc=fail (p=none) header.from=badprua.acme.example"


def test_dns_failure_is_temperror_and_relayed_when_not_required(start, sink):
    gw = start()
    assert deliver(gw, dkim_signed("x.tempfail.acme.example"), FAIL_SPF) == (
        250, b"2.0.0 Ok: queued as SINK1")
    assert dmarc_of(sink) == (
        'dmarc=temperror reason="DMARC record look-up failed: DNS look-up of '
        '_dmarc.x.tempfail.acme.example TXT failed: SERVFAIL from every nameserver" '
        "header.from=x.tempfail.acme.example")


@pytest.mark.parametrize("text,error", [
    ("p=reject; p=none", "tag p appears twice"), ("", "no valid p= tag"),
    ("p=reject; aspf=relaxed", "aspf=relaxed is not r or s"),
    ("p=reject; pct=-1", "pct=-1 is not 0 to 100"), ("p=reject; junk", "malformed tag 'junk'"),
])
def test_record_grammar(text, error):
    with pytest.raises(RecordError, match=re.escape(error)):
        parse_record(text, "acme.example")


def test_record_defaults_and_unknown_tags():
    p = parse_record("; p=Quarantine; rua=mailto:a@acme.example; future=1;", "acme.example")
    assert (p.p, p.sp, p.adkim, p.aspf, p.pct) == ("quarantine", None, "r", "r", 100)


# --- required: dmarc = "pass" ------------------------------------------------------------

def test_required_dmarc_passes(start, sink):
    gw = start(dmarc="pass")
    assert deliver(gw, dkim_signed("r.acme.example"), FAIL_SPF) == (
        250, b"2.0.0 Ok: queued as SINK1")


@pytest.mark.parametrize("sub,domain,reply,reason", [
    ("s.acme.example", "acme.example",
     "550 5.7.26 DMARC failed for From: domain s.acme.example (p=quarantine): DKIM "
     "d=acme.example not aligned (strict) (RFC 7489)", "dmarc_fail"),
    ("mail.acme-mail.example", "acme-mail.example",
     "550 5.7.1 DMARC is required for this sender and From: domain mail.acme-mail.example has "
     "none that applies: no DMARC record at _dmarc.acme-mail.example (RFC 7489)", "dmarc_none"),
    ("dup.acme.example", "acme.example",
     "550 5.7.1 DMARC is required for this sender and From: domain dup.acme.example has none "
     "that applies: malformed DMARC record at _dmarc.dup.acme.example: tag p appears twice "
     "(RFC 7489)", "dmarc_permerror"),
    ("x.tempfail.acme.example", "acme.example",
     "451 4.7.0 DMARC could not be evaluated for From: domain x.tempfail.acme.example: DMARC "
     "record look-up failed: DNS look-up of _dmarc.x.tempfail.acme.example TXT failed: SERVFAIL "
     "from every nameserver; try again later", "dmarc_temperror"),
])
def test_required_dmarc_refuses_what_does_not_pass(start, sink, logs, sub, domain, reply,
                                                   reason):
    gw = start(dmarc="pass")
    code, text = deliver(gw, dkim_signed(sub, domain), FAIL_SPF)
    assert f"{code} {text.decode()}" == reply
    assert sink.messages == []
    [line] = logs.events("message")
    assert (line["decided_by"], line["reason"]) == ("sender_auth", reason)


def test_required_by_the_senders_own_file(start, sink):
    gw = start(sender=DMARC_SENDER + '\n[checks.sender_auth]\ndmarc = "pass"\n')
    code, text = deliver(gw, dkim_signed("s.acme.example"), FAIL_SPF)
    assert (code, text.split(b" ")[0]) == (550, b"5.7.26")
    assert sink.messages == []


def test_required_dmarc_failure_follows_on_fail(start, sink):
    gw = start(dmarc="pass", on_fail="tag")
    assert deliver(gw, dkim_signed("s.acme.example"), FAIL_SPF)[0] == 250
    assert header(sink.messages[0].content, "X-Ecomm-Junk") == ["yes"]
    assert dmarc_of(sink) == "dmarc=fail (p=quarantine) header.from=s.acme.example"
