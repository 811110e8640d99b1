"""Sender authentication end to end (policy IV.B.3.c.iii): a real client, the gateway, a real
aiosmtpd upstream, and a real Knot DNS server holding SPF records and DKIM keys. Each case
asserts the exact reply (code and enhanced code) and what arrived, or not, at campus mail."""

from __future__ import annotations

import json
import re

import pytest

from gateway.checks.auth_results import quote
from gateway.ops.cli import main as cli
from tests.auth_helpers import (NOW, RFC8463_MESSAGE, SENDER, auth_zones, message, rsa_key,
                                sign)
from tests.conftest import send
from tests.dns_server import KNOTD, SKIP_REASON, KnotServer, SilentNameserver

pytestmark = pytest.mark.skipif(KNOTD is None, reason=SKIP_REASON)

PASS_FROM = "bounce-1@pass.acme.example"


@pytest.fixture(scope="module")
def knot(tmp_path_factory):
    server = KnotServer(tmp_path_factory.mktemp("knot"), auth_zones())
    yield server
    server.stop()


def config(nameserver: str, extra: str = "", **settings) -> str:
    lines = ["[dns]", f'nameservers = ["{nameserver}"]', "timeout = 2.0", "",
             "[checks.sender_auth]"]
    settings = {"mode": "enforce", "check_helo": False, **settings}
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n" + extra


@pytest.fixture
def start(gateways, sink, knot):
    def run(sender: str = SENDER, nameserver: str | None = None, extra: str = "", **settings):
        return gateways.start(toml=config(nameserver or knot.address, extra, **settings),
                              senders={"acme": sender}, upstream=sink.url)
    return run


def deliver(gw, raw: bytes, mail_from: str = PASS_FROM):
    client, reply = send(gw, mail_from=mail_from, message=raw)
    client.quit()
    return reply


def header(content: bytes, name: str) -> list[str]:
    head = content.partition(b"\r\n\r\n")[0].decode()
    unfolded = re.sub(r"\r\n[ \t]", " ", head)
    return [line.split(":", 1)[1].strip() for line in unfolded.split("\r\n")
            if line.lower().startswith(name.lower() + ":")]


def signed(raw: bytes | None = None, selector: str = "rsa2048", domain: str = "acme.example",
           **kw) -> bytes:
    return sign(raw if raw is not None else message(), selector, domain, **kw)


# --- passing -----------------------------------------------------------------------------

def test_spf_and_dkim_pass_relayed_with_authentication_results(start, sink, logs):
    gw = start()
    raw = signed()
    assert deliver(gw, raw) == (250, b"2.0.0 Ok: queued as SINK1")
    [msg] = sink.messages
    assert msg.content.endswith(raw)  # the message itself is relayed untouched
    b = re.search(rb"b=([^;]+)$", raw.split(b"\r\nFrom:")[0]).group(1)
    b = re.sub(rb"\s+", b"", b)[:12].decode()
    [ar] = header(msg.content, "Authentication-Results")
    assert ar == ("gw.test; spf=pass smtp.mailfrom=pass.acme.example; "
                  f"dkim=pass (2048-bit key) header.d=acme.example header.s=rsa2048 header.b={quote(b)}; "
                  'dmarc=none reason="no DMARC record at _dmarc.acme.example" '
                  "header.from=pass.acme.example; "
                  "x-ecomm-alignment=pass (relaxed alignment, registered domains) "
                  "header.from=pass.acme.example")
    head = msg.content.partition(b"\r\n\r\n")[0]
    assert head.index(b"Received:") < head.index(b"Authentication-Results:") < head.index(
        b"DKIM-Signature:")
    for check, result in (("spf", "pass"), ("dkim", "pass"), ("alignment", "pass")):
        assert gw.metric("gateway_auth_results_total", check=check, result=result,
                         sender="acme") == 1
    assert "Hello, world" not in logs.text()


@pytest.mark.parametrize("selector,algorithm,bits", [
    ("rsa1024", "rsa-sha256", 1024), ("ed", "ed25519-sha256", 0)])
def test_dkim_alone_passes_with_rsa1024_and_ed25519(start, sink, selector, algorithm, bits):
    gw = start()
    raw = signed(selector=selector, algorithm=algorithm, bits=bits or 2048)
    assert deliver(gw, raw, "bounce-1@fail.acme.example")[0] == 250
    [ar] = header(sink.messages[0].content, "Authentication-Results")
    assert "spf=fail" in ar and "dkim=pass" in ar and f"header.s={selector}" in ar
    assert "x-ecomm-alignment=pass" in ar


def test_spf_alone_passes_when_unsigned(start, sink):
    gw = start()
    assert deliver(gw, message())[0] == 250
    [ar] = header(sink.messages[0].content, "Authentication-Results")
    assert "spf=pass" in ar and "dkim=none" in ar and "x-ecomm-alignment=pass" in ar


def test_rfc8463_example_through_the_gateway(start, sink):
    sender = "\n".join([
        'id = "football"', 'organization = "Football"',
        'contact = "postmaster@football.example.com"', 'networks = ["127.0.0.1/32", "::1/128"]',
        'domains = ["football.example.com"]', 'return_path = ["bounce-*@football.example.com"]',
        "expires = 2027-06-30"])
    # (the example carries no List-Unsubscribe; that control is not under test here)
    gw = start(sender=sender, extra="\n[checks.unsubscribe]\nmode = \"off\"\n")
    assert deliver(gw, RFC8463_MESSAGE, "bounce-8463@football.example.com") == (
        250, b"2.0.0 Ok: queued as SINK1")
    [ar] = header(sink.messages[0].content, "Authentication-Results")
    assert "spf=fail smtp.mailfrom=football.example.com" in ar
    assert ("dkim=pass (256-bit key) header.d=football.example.com header.s=brisbane "
            'header.b="/gCrinpcQOoI"') in ar
    assert ("dkim=pass (1024-bit key) header.d=football.example.com header.s=test "
            "header.b=F45dVWDfMbQD") in ar


# --- failing: reject ---------------------------------------------------------------------

@pytest.mark.parametrize("domain,result", [
    ("fail", "fail"), ("soft", "softfail"), ("neutral", "neutral"), ("none", "none"),
    ("perm", "permerror"), ("void", "permerror")])
def test_spf_failures_without_dkim_are_refused_5726(start, sink, domain, result):
    gw = start()
    code, text = deliver(gw, message(from_=f"news@{domain}.acme.example"),
                         f"bounce-1@{domain}.acme.example")
    assert (code, text.split(b" ")[0]) == (550, b"5.7.26")
    assert text.decode().startswith(
        f"5.7.26 SPF and DKIM authentication both failed: SPF {result} for MAIL FROM domain "
        f"{domain}.acme.example")
    assert "no DKIM signature (policy IV.B.3.c.iii)" in text.decode()
    assert sink.messages == []
    assert gw.metric("gateway_auth_results_total", check="spf", result=result,
                     sender="acme") == 1
    assert gw.metric("gateway_messages_total", sender="acme", decision="reject",
                     reason="spf_dkim_fail") == 1


def test_permerror_names_the_lookup_limit(start):
    gw = start()
    _, text = deliver(gw, message(from_="news@perm.acme.example"), "bounce-1@perm.acme.example")
    assert "Too many DNS lookups" in text.decode()


def test_require_spf_and_dkim_refuses_the_missing_one(start, sink):
    gw = start(require="spf_and_dkim")
    code, text = deliver(gw, signed(message(from_="news@fail.acme.example")),
                         "bounce-1@fail.acme.example")
    assert (code, text.decode()) == (550, "5.7.23 SPF authentication failed: SPF fail for MAIL "
                                          "FROM domain fail.acme.example (policy IV.B.3.c.iii)")
    code, text = deliver(gw, message())
    assert (code, text.decode()) == (550, "5.7.20 No passing DKIM signature: no DKIM signature "
                                          "(policy IV.B.3.c.iii)")
    assert deliver(gw, signed())[0] == 250
    assert len(sink.messages) == 1


def test_require_dkim_ignores_spf_and_require_spf_ignores_dkim(start, sink):
    gw = start(require="dkim")
    assert deliver(gw, message())[:1] == (550,)
    assert deliver(gw, signed(message(from_="news@fail.acme.example")),
                   "bounce-1@fail.acme.example")[0] == 250
    gw2 = start(require="spf")
    code, text = deliver(gw2, signed(message(from_="news@fail.acme.example")),
                         "bounce-2@fail.acme.example")
    assert (code, text.split(b" ")[0]) == (550, b"5.7.23")
    assert deliver(gw2, message(), "bounce-2@pass.acme.example")[0] == 250


@pytest.mark.parametrize("name,raw,reason", [
    ("tampered body", lambda: signed().replace(b"Hello, world.", b"Hello, World!"),
     "body hash did not verify"),
    ("tampered signed header", lambda: signed().replace(b"Subject: Hello", b"Subject: Win"),
     "signature did not verify"),
    ("expired", lambda: signed(t=NOW - 172800, x=NOW - 86400),
     "signature expired (x= is in the past)"),
    ("512-bit key", lambda: signed(selector="weak", bits=512),
     "RSA key of 512 bits is below the minimum of 1024"),
])
def test_dkim_failures_are_refused_5720_with_the_reason(start, sink, name, raw, reason):
    gw = start(require="dkim")
    code, text = deliver(gw, raw())
    assert (code, text.split(b" ")[0]) == (550, b"5.7.20"), name
    assert ("5.7.20 No passing DKIM signature: DKIM signature d=acme.example s="
            in text.decode())
    assert f"({reason})" in text.decode()
    assert sink.messages == []


def test_dkim_pass_for_an_unregistered_domain_does_not_count(start, sink):
    gw = start()
    raw = signed(message(from_="news@fail.acme.example"), domain="evil.example")
    code, text = deliver(gw, raw, "bounce-1@fail.acme.example")
    assert (code, text.split(b" ")[0]) == (550, b"5.7.26")
    assert ("DKIM signature d=evil.example s=rsa2048 passes but d= is not a registered domain "
            "of this sender") in text.decode()


def test_unaligned_from_is_refused_even_when_both_pass(start, sink):
    gw = start()
    raw = signed(message(from_="news@mail.acme-mail.example"))
    code, text = deliver(gw, raw, PASS_FROM)
    assert (code, text.split(b" ")[0]) == (550, b"5.7.26")
    assert ("SPF pass for MAIL FROM domain pass.acme.example, not aligned with From: domain "
            "mail.acme-mail.example") in text.decode()
    assert ("DKIM signature d=acme.example s=rsa2048 passes but is not aligned with From: "
            "domain mail.acme-mail.example") in text.decode()
    # aligned with the other registered domain, it passes
    raw = signed(message(from_="news@mail.acme-mail.example"), domain="acme-mail.example")
    assert deliver(gw, raw, "bounce-1@mail.acme-mail.example")[0] == 250


def test_from_domain_must_be_registered(start, sink):
    gw = start()
    code, text = deliver(gw, signed(message(from_="news@other.example")))
    assert (code, text.split(b" ")[0]) == (550, b"5.7.26")
    assert "From: domain other.example is not a registered domain of this sender" in \
        text.decode()


def test_strict_alignment(start, sink):
    gw = start(alignment="strict")
    code, _ = deliver(gw, signed())  # d=acme.example, From: pass.acme.example
    assert code == 250  # SPF: pass.acme.example == pass.acme.example
    code, _ = deliver(gw, signed(message(from_="news@fail.acme.example")),
                      "bounce-1@fail.acme.example")
    assert code == 550  # d=acme.example is not fail.acme.example; SPF fails


@pytest.mark.parametrize("raw,text", [
    # (refused before any check: gateway.message.headers)
    (message(extra=["From: Other <other@pass.acme.example>"]),
     b"5.6.0 The message has 2 From fields; at most one is allowed (RFC 5322 3.6)"),
    (message(from_="a@pass.acme.example, b@pass.acme.example"),
     b"5.7.1 From: must hold exactly one address (found 2); the author must be one registered "
     b"address"),
    (message(from_=None), b"5.7.1 Message has no From: header; the author must be one "
                          b"registered address"),
])
def test_from_header_must_name_one_author(start, sink, raw, text):
    gw = start()
    assert deliver(gw, signed(raw) if b"From:" in raw else raw) == (550, text)
    assert sink.messages == []


# --- temporary errors ----------------------------------------------------------------------

def test_dns_not_answering_defers_451_4724(start, sink):
    silent = SilentNameserver()
    try:
        gw = start(nameserver=silent.address)
        code, text = deliver(gw, signed())
    finally:
        silent.close()
    assert (code, text.split(b" ")[0]) == (451, b"4.7.24")
    assert text.decode().startswith("4.7.24 Sender authentication could not be completed: "
                                    "SPF temperror for MAIL FROM domain pass.acme.example")
    assert "try again later" in text.decode()
    assert sink.messages == []


def test_dkim_key_temperror_alone_defers_4_7_5(start, sink, knot):
    silent = SilentNameserver()
    try:
        gw = start(nameserver=silent.address, require="dkim")
        code, text = deliver(gw, signed())
    finally:
        silent.close()
    assert (code, text.split(b" ")[0]) == (451, b"4.7.5")


def test_spf_temperror_does_not_matter_when_dkim_passes(start, sink):
    gw = start()
    raw = signed(message(from_="news@temp.acme.example"))
    assert deliver(gw, raw, "bounce-1@temp.acme.example")[0] == 250
    [ar] = header(sink.messages[0].content, "Authentication-Results")
    assert ar.startswith('gw.test; spf=temperror reason="SPF Temporary Error: DNS look-up of '
                         'spf.refused.test TXT failed: REFUSED from every nameserver" '
                         "smtp.mailfrom=temp.acme.example; dkim=pass")


def test_temperror_treated_as_failure_when_configured(start, sink):
    gw = start(on_temperror="fail")
    code, text = deliver(gw, message(from_="news@temp.acme.example"),
                         "bounce-1@temp.acme.example")
    assert (code, text.split(b" ")[0]) == (550, b"5.7.26")


# --- on_fail: quarantine, tag; monitor; per-sender --------------------------------------

def test_quarantine_stores_replies_250_and_release_relays(start, sink, capsys, logs):
    gw = start(on_fail="quarantine")
    raw = message(from_="news@fail.acme.example", subject="Quarantine me")
    client, (code, text) = send(gw, mail_from="bounce-7@fail.acme.example",
                                rcpts=("alice@example.edu", "bob@example.edu"), message=raw)
    client.quit()
    assert code == 250
    queue_id = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-V]{16})", text).group(1).decode()
    assert sink.messages == []
    assert sink.handler.rcpt_seen == ["alice@example.edu", "bob@example.edu"]  # then aborted
    [line] = logs.events("message")
    assert (line["decision"], line["reason"], line["decided_by"], line["queue_id"]) == (
        "quarantine", "spf_dkim_fail", "sender_auth", queue_id)
    assert gw.metric("gateway_messages_total", sender="acme", decision="quarantine",
                     reason="spf_dkim_fail") == 1

    cfg = str(gw.gateway.config.file)
    assert cli(["quarantine", "list", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert queue_id in out and "spf_dkim_fail" in out and "Quarantine me" in out
    assert cli(["quarantine", "show", queue_id, "--config", cfg]) == 0
    shown = capsys.readouterr().out
    meta = json.loads(shown.split("\n\n")[0])
    assert (meta["mail_from"], meta["recipients"], meta["sender"]) == (
        "bounce-7@fail.acme.example", ["alice@example.edu", "bob@example.edu"], "acme")
    assert meta["detail"].startswith("SPF and DKIM authentication both failed: SPF fail")
    assert "Authentication-Results: gw.test;" in shown and "Hello, world" not in shown

    assert cli(["quarantine", "release", queue_id.lower(), "--config", cfg]) == 0
    assert capsys.readouterr().out.startswith(f"released {queue_id.lower()}: 250 2.0.0")
    [msg] = sink.messages
    assert (msg.mail_from, msg.rcpt_tos) == ("bounce-7@fail.acme.example",
                                             ["alice@example.edu", "bob@example.edu"])
    assert msg.content.endswith(raw)
    assert header(msg.content, "Authentication-Results")[0].startswith("gw.test; spf=fail")
    assert cli(["quarantine", "list", "--config", cfg]) == 0
    assert capsys.readouterr().out == "the quarantine is empty\n"
    assert cli(["quarantine", "release", queue_id, "--config", cfg]) == 1
    assert f"no quarantined message {queue_id}" in capsys.readouterr().err


def test_quarantine_delete(start, sink, capsys):
    gw = start(on_fail="quarantine")
    _, text = deliver(gw, message(from_="news@fail.acme.example"), "bounce-1@fail.acme.example")
    queue_id = text.decode().rsplit(" ", 1)[1]
    cfg = str(gw.gateway.config.file)
    assert cli(["quarantine", "delete", queue_id, "--config", cfg]) == 0
    assert capsys.readouterr().out == f"deleted {queue_id}\n"
    assert cli(["quarantine", "show", queue_id, "--config", cfg]) == 1
    assert cli(["quarantine", "show", "../etc", "--config", cfg]) == 1
    assert sink.messages == []


def test_tag_relays_with_the_junk_header(start, sink):
    gw = start(on_fail="tag", junk_header="X-Campus-Junk", junk_value="auth-failed")
    raw = message(from_="news@fail.acme.example")
    assert deliver(gw, raw, "bounce-1@fail.acme.example") == (250, b"2.0.0 Ok: queued as SINK1")
    [msg] = sink.messages
    assert header(msg.content, "X-Campus-Junk") == ["auth-failed"]
    assert header(msg.content, "Authentication-Results")[0].startswith("gw.test; spf=fail")
    assert gw.metric("gateway_messages_total", sender="acme", decision="accept",
                     reason="relayed") == 1
    assert deliver(gw, signed())[0] == 250  # a passing message is not tagged
    assert header(sink.messages[1].content, "X-Campus-Junk") == []


def test_monitor_mode_relays_and_counts(start, sink):
    gw = start(mode="monitor")
    assert deliver(gw, message(from_="news@fail.acme.example"),
                   "bounce-1@fail.acme.example")[0] == 250
    assert len(sink.messages) == 1
    assert header(sink.messages[0].content, "X-Ecomm-Junk") == []
    assert gw.metric("gateway_check_monitored_total", check="sender_auth", action="reject") == 1
    # what the check found is still recorded for campus mail
    [ar] = header(sink.messages[0].content, "Authentication-Results")
    assert ar.startswith("gw.test; spf=fail")


def test_sender_file_overrides_on_fail(start, sink):
    gw = start(sender=SENDER + '\n[checks.sender_auth]\non_fail = "tag"\n')
    assert deliver(gw, message(from_="news@fail.acme.example"),
                   "bounce-1@fail.acme.example")[0] == 250
    assert header(sink.messages[0].content, "X-Ecomm-Junk") == ["yes"]


# --- Authentication-Results hygiene, HELO, caching ---------------------------------------

def test_forged_authentication_results_are_removed(start, sink):
    gw = start()
    forged = ["Authentication-Results: gw.test; spf=pass smtp.mailfrom=evil.example",
              "Authentication-Results: (comment) GW.TEST;\r\n\tdkim=pass header.d=evil.example",
              "Authentication-Results: mx.other.test; spf=pass"]
    raw = message(extra=forged)
    assert deliver(gw, raw)[0] == 250
    content = sink.messages[0].content
    ars = header(content, "Authentication-Results")
    assert len(ars) == 2
    assert ars[0].startswith("gw.test; spf=pass smtp.mailfrom=pass.acme.example")
    assert ars[1] == "mx.other.test; spf=pass"
    assert b"evil.example" not in content


def test_helo_is_checked_and_reported(start, sink):
    gw = start(check_helo=True)
    assert deliver(gw, message())[0] == 250
    [ar] = header(sink.messages[0].content, "Authentication-Results")
    assert "spf=temperror" in ar and "smtp.helo=client.test" in ar  # client.test: no zone


def test_dns_answers_are_cached_across_messages(start, sink):
    gw = start()
    for _ in range(3):
        assert deliver(gw, signed())[0] == 250
    hits = gw.metric("gateway_dns_cache_lookups_total", outcome="hit")
    misses = gw.metric("gateway_dns_cache_lookups_total", outcome="miss")
    # TXT pass.acme.example, TXT rsa2048._domainkey.acme.example, and DMARC's
    # _dmarc.pass.acme.example then _dmarc.acme.example (NXDOMAIN, cached negatively)
    assert misses == 4
    assert hits == 6  # the key and both DMARC names, twice; the SPF result itself is
    # remembered (no macros)
    assert gw.metric("gateway_dns_query_seconds_count", qtype="TXT", outcome="ok") == 2
    assert gw.metric("gateway_dns_query_seconds_count", qtype="TXT", outcome="nxdomain") == 2


def test_body_length_signature_counts_only_when_allowed(start, sink):
    raw = signed(length=True) + b"Appended.\r\n"
    gw = start(require="dkim")
    code, text = deliver(gw, raw)
    assert (code, text.split(b" ")[0]) == (550, b"5.7.20")
    assert "(l= signs only part of the body)" in text.decode()
    gw2 = start(require="dkim", allow_body_length=True)
    assert deliver(gw2, raw)[0] == 250


def test_key_of_another_run_is_not_confused(start, sink):
    # a signature made with a different 2048-bit key than the one published fails
    other = rsa_key(2048, "other")[0]
    gw = start(require="dkim")
    code, text = deliver(gw, signed(key=other))
    assert (code, text.split(b" ")[0]) == (550, b"5.7.20")
    assert "(signature did not verify)" in text.decode()


def test_forged_authentication_results_are_removed_even_with_the_check_off(gateways, sink):
    gw = gateways.start(upstream=sink.url)  # [checks.sender_auth] mode = "off" (conftest)
    raw = message(from_="news@em.acme.example",
                  extra=["Authentication-Results: gw.test; dkim=pass header.d=evil.example"])
    assert deliver(gw, raw, "bounce-1@em.acme.example")[0] == 250
    assert header(sink.messages[0].content, "Authentication-Results") == []


def test_quarantine_write_failure_defers(start, sink, logs):
    gw = start(on_fail="quarantine")

    def broken(item, content):
        raise OSError(28, "No space left on device")

    gw.gateway.quarantine._store = broken
    code, text = deliver(gw, message(from_="news@fail.acme.example"), "bounce-1@fail.acme.example")
    assert (code, text) == (451, b"4.3.0 Temporary local problem; try again later")
    assert sink.messages == []
    [line] = logs.events("message")
    assert (line["decision"], line["reason"]) == ("defer", "spf_dkim_fail")
    assert logs.events("quarantine_failed")


def test_spf_is_evaluated_once_per_client_and_domain(start, sink, monkeypatch):
    import smtplib

    import gateway.checks.sender_auth as sender_auth

    calls = []
    real = sender_auth.check_spf

    async def counting(resolver, ip, mail_from, helo, identity, *args):
        calls.append(identity)
        return await real(resolver, ip, mail_from, helo, identity, *args)

    monkeypatch.setattr(sender_auth, "check_spf", counting)
    gw = start(check_helo=True)
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as client:
        client.ehlo("pass.acme.example")
        for _ in range(3):
            assert client.sendmail(PASS_FROM, ["alice@example.edu"], message()) == {}
    # one HELO evaluation per client and name; the MAIL FROM domain's record has no macro,
    # so its result is remembered too
    assert calls.count("mailfrom") == 1 and calls.count("helo") == 1
    for received in sink.messages:
        [ar] = header(received.content, "Authentication-Results")
        assert "smtp.helo=pass.acme.example" in ar


def test_spf_result_that_depends_on_the_local_part_is_not_remembered(start, sink):
    gw = start()
    assert deliver(gw, message(), "bounce-ok@macro.acme.example")[0] == 250
    code, text = deliver(gw, message(), "bounce-no@macro.acme.example")
    assert code == 550 and b"SPF" in text
    assert len(sink.messages) == 1
