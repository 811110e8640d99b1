"""Recipient flags through the SMTP front (policy IV.C.1.b, IV.C.4.a-b): every rule by message
class, drop and reject modes with several recipients, the upstream restart, what campus mail
received, exact replies, and that no reply or log line names a flag."""

from __future__ import annotations

import re

import pytest

from gateway.policy.flags import (DO_NOT_CONTACT, DO_NOT_EMAIL, FERPA, OPT_OUT, UNSUBSCRIBED, Scope,
                           set_name)
from tests.conftest import EXAMPLE_SENDER, MESSAGE

ALL_CLASSES = EXAMPLE_SENDER + 'classes = ["promotional", "educational", "transactional"]\n'
PROMO_ONLY = EXAMPLE_SENDER  # registered classes: promotional (the default)
OTHER_SENDER = """
id = "other"
organization = "Acme Marketing Cloud"
contact = "ops@other.example"
networks = ["127.0.0.1/32"]
domains = ["em.other.example"]
return_path = ["rp-*@em.other.example"]
expires = 2027-06-30
"""
THIRD_SENDER = """
id = "third"
organization = "Third Events"
contact = "ops@third.example"
networks = ["127.0.0.1/32"]
domains = ["em.third.example"]
return_path = ["rp-*@em.third.example"]
expires = 2027-06-30
"""
FLAG_WORDS = re.compile(r"ferpa|do_not_email|do_not_contact|opt_out|unsubscribed|do not "
                        r"(e-?mail|contact)|privacy flag", re.I)
A, B, C = "alice@example.edu", "bob@example.edu", "carol@example.edu"


def classed(message_class: str | None) -> bytes:
    if message_class is None:
        return MESSAGE
    return f"X-Message-Class: {message_class}\r\n".encode() + MESSAGE


def flag(gw, name: str, *addresses: str) -> None:
    flags = gw.gateway.flags
    gw.call(flags.add(name, [flags.member(a) for a in addresses]))


def transaction(gw, rcpts, message=MESSAGE, mail_from="bounce-1@em.acme.example"):
    """MAIL, every RCPT (whatever its reply), DATA: (the RCPT replies, the DATA reply)."""
    client = gw.smtp()
    assert client.mail(mail_from)[0] == 250
    replies = [client.rcpt(r) for r in rcpts]
    data = client.data(message) if any(code == 250 for code, _ in replies) else None
    client.quit()
    return replies, data


def dropped_lines(logs):
    return [e for e in logs.lines() if e["event"] == "rcpt_dropped"]


# --- drop mode (the default) --------------------------------------------------------------------

def test_drop_relays_to_the_others_after_restarting_upstream(gateways, sink, logs):
    gw = gateways.start(upstream=sink.url)
    flag(gw, FERPA, A)
    flag(gw, DO_NOT_EMAIL, C)
    replies, data = transaction(gw, [A, B, C])
    assert replies == [(250, b"2.1.5 OK")] * 3  # accepted like anyone: nothing told at RCPT
    assert data == (250, b"2.0.0 Ok: queued as SINK1")
    # forwarded live at RCPT, then the transaction restarted with the kept recipient only
    assert sink.handler.rcpt_seen == [A, B, C, B]
    assert sink.handler.rsets == 1
    assert [m.rcpt_tos for m in sink.messages] == [[B]]
    received = sink.messages[0].content
    assert b"for <bob@example.edu>" in received  # Received: names the one recipient left
    keys, maillog = gw.gateway.flags.keys, gw.gateway.maillog
    assert [(e["rcpt"], e["rule"]) for e in dropped_lines(logs)] == [
        (maillog.rcpt_id(A), f"recipient_flags:{keys.rule_id('ferpa')}"),
        (maillog.rcpt_id(C), f"recipient_flags:{keys.rule_id('do_not_email')}")]
    decision = logs.events("message")[-1]
    assert decision["decision"] == "accept" and decision["reason"] == "relayed"
    assert decision["recipients"] == [maillog.rcpt_id(B)]
    assert gw.metric("gateway_recipients_total", sender="acme", decision="drop") == 2
    assert not FLAG_WORDS.search(logs.text())


def test_every_recipient_dropped_is_250_and_nothing_relayed(gateways, sink, logs):
    gw = gateways.start(upstream=sink.url)
    flag(gw, FERPA, A)
    flag(gw, DO_NOT_CONTACT, B)
    replies, (code, text) = transaction(gw, [A, B])
    assert replies == [(250, b"2.1.5 OK")] * 2
    decision = logs.events("message")[-1]
    assert (code, text) == (250, f"2.0.0 Ok: queued as {decision['queue_id']}".encode())
    assert re.fullmatch(r"[0-9A-V]{16}", decision["queue_id"])
    assert sink.messages == []
    assert sink.handler.rcpt_seen == [A, B]  # forwarded at RCPT, then the upstream aborted
    assert decision["decision"] == "accept" and decision["reason"] == "recipients_dropped"
    assert len(dropped_lines(logs)) == 2
    # the connection went back to the pool: the next message is relayed
    assert transaction(gw, [C])[1] == (250, b"2.0.0 Ok: queued as SINK1")


def test_nothing_dropped_means_no_restart(gateways, sink):
    gw = gateways.start(upstream=sink.url)
    flag(gw, FERPA, "zed@example.edu")
    assert transaction(gw, [A, B])[1] == (250, b"2.0.0 Ok: queued as SINK1")
    assert sink.handler.rcpt_seen == [A, B] and sink.handler.rsets == 0


@pytest.mark.parametrize("name", [FERPA, DO_NOT_EMAIL, DO_NOT_CONTACT, OPT_OUT, UNSUBSCRIBED])
@pytest.mark.parametrize("message_class,delivered", [
    ("promotional", False), (None, False),  # no header: promotional
    ("educational", True), ("transactional", True)])
def test_every_rule_by_class(gateways, sink, name, message_class, delivered):
    gw = gateways.start(senders={"acme": ALL_CLASSES}, upstream=sink.url)
    flag(gw, name, A)
    replies, data = transaction(gw, [A, B], classed(message_class))
    assert data == (250, b"2.0.0 Ok: queued as SINK1")
    assert sink.messages[0].rcpt_tos == ([A, B] if delivered else [B])


def test_rules_are_configurable_per_class(gateways, sink):
    gw = gateways.start('[checks.recipient_flags]\ndo_not_contact = []\n'
                        'do_not_email = ["transactional"]\n',
                        senders={"acme": ALL_CLASSES}, upstream=sink.url)
    flag(gw, DO_NOT_CONTACT, A)
    flag(gw, DO_NOT_EMAIL, B)
    transaction(gw, [A, B, C], classed("transactional"))
    transaction(gw, [A, B, C], classed("educational"))
    assert [m.rcpt_tos for m in sink.messages] == [[B, C], [C]]


def test_several_flags_all_must_allow(gateways, sink):
    gw = gateways.start('[checks.recipient_flags]\ndo_not_email = ["educational"]\n',
                        senders={"acme": ALL_CLASSES}, upstream=sink.url)
    flag(gw, FERPA, A)  # educational, transactional
    flag(gw, DO_NOT_EMAIL, A)  # educational
    transaction(gw, [A, B], classed("transactional"))
    transaction(gw, [A, B], classed("educational"))
    assert [m.rcpt_tos for m in sink.messages] == [[B], [A, B]]


def test_opt_out_scopes_sender_organization_global(gateways, sink):
    gw = gateways.start(senders={"acme": PROMO_ONLY, "other": OTHER_SENDER,
                                 "third": THIRD_SENDER}, upstream=sink.url)
    flag(gw, set_name(OPT_OUT, Scope("sender", "acme")), A)
    flag(gw, set_name(UNSUBSCRIBED, Scope.of(organization="acme   MARKETING cloud")), B)
    flag(gw, OPT_OUT, C)
    rcpts = [A, B, C, "dave@example.edu"]
    transaction(gw, rcpts)  # acme
    transaction(gw, rcpts, mail_from="rp-1@em.other.example")  # same organization as acme
    transaction(gw, rcpts, mail_from="rp-1@em.third.example")
    assert [m.rcpt_tos for m in sink.messages] == [
        ["dave@example.edu"], [A, "dave@example.edu"], [A, B, "dave@example.edu"]]


def test_address_forms_cannot_step_round_a_flag(gateways, sink):
    gw = gateways.start(upstream=sink.url)
    flag(gw, FERPA, A)
    transaction(gw, ["Alice@EXAMPLE.edu", "alice+news@example.edu", B])
    assert [m.rcpt_tos for m in sink.messages] == [[B]]


def test_drop_with_maildir_upstream(gateways, tmp_path):
    gw = gateways.start()  # maildir:maildir
    flag(gw, FERPA, A)
    assert transaction(gw, [A, B])[1][0] == 250
    files = list((gateways.tmp_path / "gw" / "maildir" / "new").iterdir())
    assert len(files) == 1
    head = files[0].read_bytes().split(b"\n\n", 1)[0]
    assert [ln for ln in head.split(b"\n") if ln.startswith(b"Delivered-To:")] == [
        b"Delivered-To: bob@example.edu"]


def test_restart_refused_defers_rather_than_lose_anyone(gateways, sink, logs):
    gw = gateways.start(upstream=sink.url)
    flag(gw, FERPA, A)
    client = gw.smtp()
    client.mail("bounce-1@em.acme.example")
    assert client.rcpt(A) == (250, b"2.1.5 OK") and client.rcpt(B) == (250, b"2.1.5 OK")
    sink.handler.refuse_rcpt[B] = "452 4.2.2 Mailbox full"  # accepted before, refused on restart
    assert client.data(MESSAGE) == (451, b"4.3.0 Temporary problem relaying to campus mail; "
                                         b"try again later")
    client.quit()
    assert sink.messages == []
    decision = logs.events("message")[-1]
    assert (decision["decision"], decision["reason"], decision["reply"]) == (
        "defer", "upstream_restart", "451 4.3.0")


def test_monitor_mode_drops_nothing_and_says_what_it_would_do(gateways, sink, logs):
    gw = gateways.start('[checks.recipient_flags]\nmode = "monitor"\non_flagged = "reject"\n',
                        upstream=sink.url)
    flag(gw, FERPA, A)
    replies, data = transaction(gw, [A, B])
    assert replies == [(250, b"2.1.5 OK")] * 2 and data[0] == 250
    assert sink.messages[0].rcpt_tos == [A, B]
    monitored = logs.events("message")[-1]["monitored"]
    rule = gw.gateway.flags.keys.rule_id("ferpa")
    assert monitored == [
        {"check": "recipient_flags", "would": "reject", "reason": f"recipient_refused:{rule}"},
        {"check": "recipient_flags", "would": "accept", "reason": "recipients_dropped"}]
    assert not FLAG_WORDS.search(logs.text())


def test_off_mode_ignores_flags(gateways, sink):
    gw = gateways.start('[checks.recipient_flags]\nmode = "off"\n', upstream=sink.url)
    flag(gw, FERPA, A)
    transaction(gw, [A])
    assert sink.messages[0].rcpt_tos == [A]


# --- reject mode --------------------------------------------------------------------------------

REJECT = '[checks.recipient_flags]\non_flagged = "reject"\n'


def test_reject_at_rcpt_when_every_class_of_the_sender_is_forbidden(gateways, sink, logs):
    gw = gateways.start(REJECT, upstream=sink.url)  # acme: promotional only
    flag(gw, FERPA, A)
    flag(gw, OPT_OUT, C)
    replies, data = transaction(gw, [A, B, C])
    assert replies == [(550, b"5.7.1 recipient does not accept this message"),
                       (250, b"2.1.5 OK"),
                       (550, b"5.7.1 recipient does not accept this message")]
    assert data == (250, b"2.0.0 Ok: queued as SINK1")
    assert sink.handler.rcpt_seen == [B]  # the refused ones never reached campus mail
    assert sink.handler.rsets == 0
    assert sink.messages[0].rcpt_tos == [B]
    refused = logs.events("rcpt_refused")
    keys, maillog = gw.gateway.flags.keys, gw.gateway.maillog
    assert [(e["rcpt"], e["reply"], e["reason"]) for e in refused] == [
        (maillog.rcpt_id(A), "550 5.7.1 recipient does not accept this message",
         f"recipient_refused:{keys.rule_id('ferpa')}"),
        (maillog.rcpt_id(C), "550 5.7.1 recipient does not accept this message",
         f"recipient_refused:{keys.rule_id('opt_out')}")]
    assert not FLAG_WORDS.search(logs.text())


def test_reject_mode_uncertain_at_rcpt_is_dropped_at_data(gateways, sink, logs):
    sender = EXAMPLE_SENDER + 'classes = ["promotional", "educational"]\n'
    gw = gateways.start(REJECT, senders={"acme": sender}, upstream=sink.url)
    flag(gw, FERPA, A)  # educational may reach A: not certain at RCPT
    flag(gw, DO_NOT_CONTACT, C)
    replies, data = transaction(gw, [A, B, C])  # promotional
    assert replies == [(250, b"2.1.5 OK")] * 3
    assert data == (250, b"2.0.0 Ok: queued as SINK1")
    assert sink.handler.rcpt_seen == [A, B, C, B]
    assert sink.messages[0].rcpt_tos == [B]
    replies, data = transaction(gw, [A, B, C], classed("educational"))
    assert sink.messages[1].rcpt_tos == [A, B, C]
    assert len(dropped_lines(logs)) == 2


def test_reject_mode_lookups_are_not_repeated_at_data(gateways, sink):
    gw = gateways.start(REJECT, upstream=sink.url)
    flag(gw, FERPA, A)
    store = gw.gateway.store
    calls = []
    original = store.flag_lookup

    async def counting(names, members):
        calls.append(len(members))
        return await original(names, members)

    store.flag_lookup = counting
    transaction(gw, [A, B, C])
    assert calls == [1, 1, 1]  # one per RCPT, none left for DATA


def test_drop_mode_looks_up_once_per_message(gateways, sink):
    gw = gateways.start(upstream=sink.url)
    store = gw.gateway.store
    calls = []
    original = store.flag_lookup

    async def counting(names, members):
        calls.append(sorted(members))
        return await original(names, members)

    store.flag_lookup = counting
    rcpts = [f"user{i}@example.edu" for i in range(20)]
    assert transaction(gw, rcpts)[1][0] == 250
    assert len(calls) == 1 and len(calls[0]) == 20


# --- the state store ------------------------------------------------------------------------------

def test_unreachable_store_defers(gateways, sink):
    gw = gateways.start('[checks.rate_limit]\nmode = "off"\n' + REJECT, upstream=sink.url)
    store = gw.gateway.store

    async def broken(names, members):
        from gateway.state import StoreError

        raise StoreError("down")

    store.flag_lookup = broken
    client = gw.smtp()
    client.mail("bounce-1@em.acme.example")
    assert client.rcpt(A) == (451, b"4.3.0 Temporary local problem; try again later")
    client.quit()
    gw2 = gateways.start('[checks.rate_limit]\nmode = "off"\n', upstream=sink.url)
    gw2.gateway.store.flag_lookup = broken
    assert transaction(gw2, [A])[1] == (451, b"4.3.0 Temporary local problem; try again later")
    assert sink.messages == []


def test_unreachable_store_with_on_error_local_relays_and_counts(gateways, sink, logs):
    gw = gateways.start('[state]\nurl = "memory:"\non_error = "local"\n', upstream=sink.url)

    async def broken(names, members):
        from gateway.state import StoreError

        raise StoreError("down")

    gw.gateway.store.flag_lookup = broken
    assert transaction(gw, [A])[1][0] == 250
    assert gw.metric("gateway_flags_unchecked_total") == 1
    assert logs.events("state_unavailable_unchecked")


def test_no_flag_name_in_any_reply_or_log_line(gateways, sink, logs):
    texts = []
    for toml in ("", REJECT):
        gw = gateways.start(toml, senders={"acme": PROMO_ONLY}, upstream=sink.url)
        for i, name in enumerate([FERPA, DO_NOT_EMAIL, DO_NOT_CONTACT, OPT_OUT, UNSUBSCRIBED]):
            flag(gw, name, f"flagged{i}@example.edu")
        for rcpts in ([f"flagged{i}@example.edu" for i in range(5)],
                      ["flagged0@example.edu", B]):
            replies, data = transaction(gw, rcpts)
            texts += [t.decode() for _, t in replies] + ([data[1].decode()] if data else [])
    assert texts and not any(FLAG_WORDS.search(t) for t in texts)
    assert not FLAG_WORDS.search(logs.text())


def test_quarantine_keeps_only_the_recipients_not_dropped(gateways, sink):
    """A later check that quarantines (e.g. sender_auth) stores the message for the recipients
    the flags left in, and a message left with none is not kept at all."""
    from gateway.checks.base import Check, Stage, Verdict
    from gateway.infra.config import CheckSettings
    from gateway.message.replies import Reply

    class Quarantining(Check):
        name = "stand_in"
        stage = Stage.DATA

        def settings(self, ctx):
            return CheckSettings()

        async def check(self, ctx):
            return Verdict("quarantine", Reply(550, "5.7.1", "held"), "held")

    gw = gateways.start(upstream=sink.url)
    gw.gateway.pipeline.by_stage[Stage.DATA].append(Quarantining(gw.gateway.pipeline.deps))
    flag(gw, FERPA, A)
    replies, (code, _) = transaction(gw, [A, B])
    assert code == 250
    (item,) = gw.gateway.quarantine.list()
    assert item.recipients == [B]
    replies, (code, _) = transaction(gw, [A])
    assert code == 250 and len(gw.gateway.quarantine.list()) == 1
    assert sink.messages == []


def test_uniform_replies_hide_whether_campus_mail_took_it(gateways, sink, logs):
    gw = gateways.start("[flags]\nuniform_replies = true\n", upstream=sink.url)
    flag(gw, FERPA, A)
    replies = [transaction(gw, [r])[1] for r in (A, B)]
    ids = [e["queue_id"] for e in logs.events("message")]
    assert replies == [(250, f"2.0.0 Ok: queued as {i}".encode()) for i in ids]
    assert [m.rcpt_tos for m in sink.messages] == [[B]]
    assert logs.events("message")[-1]["reply"] == "250 2.0.0"  # campus mail's, as codes


def test_a_message_with_every_recipient_dropped_spends_no_rate_budget(gateways, sink):
    gw = gateways.start('[limits]\nsender_rate = "2/minute"\n', upstream=sink.url)
    flag(gw, DO_NOT_EMAIL, A)
    for _ in range(3):  # not relayed, so not counted against the 2/minute
        assert transaction(gw, [A])[1][0] == 250
    assert sink.messages == []
    assert [transaction(gw, [B])[1][0] for _ in range(2)] == [250, 250]
    with gw.smtp() as client:  # the budget is spent now: refused at MAIL already
        assert client.mail("bounce-1@em.acme.example") == (
            451, b"4.7.1 Sending rate of sender acme is limited to 2/minute; retry in 60 s")
    assert len(sink.messages) == 2
