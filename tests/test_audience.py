"""Policy IV.B.3.c.iv through the real SMTP front: messages to audiences of over 15,000
university addresses are deferred during business hours (Mon-Fri 08:00-17:00 America/Denver)
and relayed after them. Time comes from the fake clock, which starts on Monday 2026-11-02 at
08:00 MST (15:00 UTC); no test sleeps."""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

from gateway.policy.audience import campaign_part, identify, normalized_subject
from gateway.ops.maillog import MailLog
from tests.conftest import EXAMPLE_SENDER

UTC = dt.timezone.utc
SERVER = '[server]\nlisten = ["127.0.0.1:0"]\nhostname = "gw.test"\nmax_recipients = 2000\n'
WIDE = "[limits]\nsessions_per_sender = 200\nsessions_per_ip = 200\n"
HOURS = ("large-audience sends are accepted outside business hours: "
         "Mon-Fri 08:00-17:00 America/Denver")
MONDAY_RETRY = ("retry after Mon 2026-11-02 17:00 MST (accepted until Tue 2026-11-03 "
                "08:00 MST)")


def at(clock, *when):
    """Move the fake clock to a Denver wall time (MST, UTC-7, in November 2026)."""
    clock.set(dt.datetime(*when, tzinfo=UTC) + dt.timedelta(hours=7))


def message(*headers: str, subject: str = "Spring gala",
            sender: str = "Acme News <news@em.acme.example>") -> bytes:
    head = [f"From: {sender}", "To: undisclosed-recipients:;",
            "List-Unsubscribe: <https://em.acme.example/u/1>, <mailto:unsub-1@em.acme.example>",
            "List-Unsubscribe-Post: List-Unsubscribe=One-Click", f"Subject: {subject}",
            "Message-ID: <m1@em.acme.example>", *headers]
    return ("\r\n".join(head) + "\r\n\r\nHello, world.\r\n").encode()


def campaign(name: str) -> str:
    return f"X-Campaign-ID: {name}"


def people(start: int, count: int, domain: str = "example.edu") -> list[str]:
    return [f"student{i}@{domain}" for i in range(start, start + count)]


def send(gw, rcpts: list[str], msg: bytes, mail_from="bounce-1@em.acme.example"):
    """One transaction, the RCPT commands pipelined (the gateway offers PIPELINING); returns
    the reply to the final dot as (code, text)."""
    with gw.smtp() as client:
        assert client.mail(mail_from)[0] == 250
        client.send("".join(f"RCPT TO:<{r}>\r\n" for r in rcpts).encode())
        codes = [client.getreply()[0] for _ in rcpts]
        assert set(codes) == {250}, codes
        return client.data(msg)


def start(gateways, sink, toml: str = "", senders=None):
    return gateways.start(SERVER + WIDE + toml, senders=senders, upstream=sink.url)


def test_declared_large_campaign_deferred_at_10_and_relayed_at_18(gateways, sink, logs):
    gw = start(gateways, sink)
    at(gateways.clock, 2026, 11, 2, 10, 0)
    msg = message(campaign("spring-gala"), "X-Audience-Size: 20000")
    assert send(gw, ["alice@example.edu"], msg) == (451, (
        "4.7.1 Campaign X-Campaign-ID spring-gala has an audience over 15000 university "
        f"addresses (20000 declared in X-Audience-Size); {HOURS}; {MONDAY_RETRY}").encode())
    assert sink.messages == []
    decision = logs.events("message")[-1]
    assert (decision["decision"], decision["reason"], decision["decided_by"]) == (
        "defer", "large_audience", "large_audience")
    at(gateways.clock, 2026, 11, 2, 16, 59)
    assert send(gw, ["alice@example.edu"], msg)[0] == 451
    at(gateways.clock, 2026, 11, 2, 18, 0)  # after hours: the vendor's retry goes through
    assert send(gw, ["alice@example.edu"], msg)[0] == 250
    assert [m.rcpt_tos for m in sink.messages] == [["alice@example.edu"]]
    assert b"X-Audience-Size: 20000" in sink.messages[0].content
    assert gw.metric("gateway_large_audience_deferrals_total", sender="acme", reason="declared",
                     action="defer") == 2
    assert gw.metric("gateway_large_audience_campaigns_total", sender="acme",
                     basis="declared") == 1
    assert gw.metric("gateway_large_audience_max", sender="acme") == 20000
    [crossing] = logs.events("large_audience_crossed")  # once, at the first message
    assert (crossing["sender"], crossing["campaign"], crossing["audience"], crossing["basis"],
            crossing["threshold"], crossing["business_hours"]) == (
        "acme", "X-Campaign-ID spring-gala", 20000, "declared", 15000, True)


def test_friday_afternoon_retry_after_17_accepted_until_monday(gateways, sink):
    gw = start(gateways, sink)
    at(gateways.clock, 2026, 11, 6, 16, 30)
    code, text = send(gw, ["alice@example.edu"], message(campaign("c1"),
                                                         "X-Audience-Size: 15001"))
    assert code == 451 and text.endswith(
        b"; retry after Fri 2026-11-06 17:00 MST (accepted until Mon 2026-11-09 08:00 MST)")
    at(gateways.clock, 2026, 11, 7, 11, 0)  # Saturday
    assert send(gw, ["alice@example.edu"], message(campaign("c1"),
                                                   "X-Audience-Size: 15001"))[0] == 250
    # 15,000 is not over 15,000
    at(gateways.clock, 2026, 11, 9, 9, 0)
    assert send(gw, ["alice@example.edu"], message(campaign("c2"),
                                                   "X-Audience-Size: 15000"))[0] == 250
    assert len(sink.messages) == 2


def test_campaign_crossing_15000_observed_recipients_through_the_front(gateways, sink, logs):
    """The real threshold: 16 messages of 1000 recipients each, one campaign."""
    gw = start(gateways, sink)
    at(gateways.clock, 2026, 11, 2, 10, 0)
    msg = message('Feedback-ID: fall24:acme-cust-7:newsletter:acme')
    started = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:  # four vendor connections at once
        assert set(pool.map(lambda n: send(gw, people(n * 1000, 1000), msg)[0], range(15))) == {
            250}
    assert not logs.events("large_audience_crossed")
    assert send(gw, people(15000, 1000), msg) == (451, (
        "4.7.1 Campaign Feedback-ID fall24:acme-cust-7:newsletter has an audience over 15000 "
        f"university addresses (at least 15001 distinct recipients); {HOURS}; {MONDAY_RETRY}"
    ).encode())  # (the count stops just past the threshold: it only needs to know it crossed)
    assert time.perf_counter() - started < 30
    assert len(sink.messages) == 15
    assert sorted(r for m in sink.messages for r in m.rcpt_tos) == sorted(people(0, 15000))
    [crossing] = logs.events("large_audience_crossed")
    assert (crossing["audience"], crossing["individuals"], crossing["basis"],
            crossing["campaign_source"]) == (15001, 15001, "observed", "Feedback-ID")
    assert gw.metric("gateway_large_audience_campaigns_total", sender="acme",
                     basis="observed") == 1
    # from that message on: even a message to recipients already counted is deferred ...
    assert send(gw, people(0, 1), msg)[0] == 451
    # ... a retry of the deferred message adds no one (recipients are counted once) ...
    assert send(gw, people(15000, 1000), msg)[1].startswith(
        b"4.7.1 Campaign Feedback-ID fall24:acme-cust-7:newsletter has an audience over 15000 "
        b"university addresses (at least 15001 distinct")
    # ... another campaign of the same sender is not affected ...
    assert send(gw, people(0, 10), message('Feedback-ID: winter:acme-cust-7:newsletter:acme'))[
        0] == 250
    # ... and after 17:00 the retry is relayed
    at(gateways.clock, 2026, 11, 2, 17, 0)
    assert send(gw, people(15000, 1000), msg)[0] == 250
    assert len(sink.messages) == 17
    assert gw.metric("gateway_large_audience_deferrals_total", sender="acme", reason="observed",
                     action="defer") == 3
    assert gw.metric("gateway_large_audience_campaigns_total", sender="acme",
                     basis="observed") == 1
    # the audience is remembered for the window: the next business day it is still large
    at(gateways.clock, 2026, 11, 3, 9, 0)
    assert send(gw, people(0, 1), msg)[0] == 451


def test_crossing_after_hours_defers_the_campaign_next_morning(gateways, sink, logs):
    gw = start(gateways, sink, "[business_hours]\nlarge_audience = 1500\n")
    at(gateways.clock, 2026, 11, 2, 20, 0)
    msg = message(campaign("evening"))
    for n in range(2):
        assert send(gw, people(n * 1000, 1000), msg)[0] == 250  # after hours: all relayed
    [crossing] = logs.events("large_audience_crossed")
    assert crossing["business_hours"] is False and crossing["audience"] == 1501
    at(gateways.clock, 2026, 11, 3, 8, 0)
    code, text = send(gw, people(5000, 1), msg)
    assert code == 451 and b"over 1500 university addresses (at least 1501 distinct recipients)" in text
    assert b"retry after Tue 2026-11-03 17:00 MST" in text
    assert len(sink.messages) == 2


def test_a_distribution_list_counts_as_its_members(gateways, sink):
    lists = ('[university]\ndomains = ["example.edu", "*.example.edu"]\n'
             '[[university.lists]]\naddress = "all-students@lists.example.edu"\nmembers = 20000\n'
             '[[university.lists]]\naddress = "staff@example.edu"\nmembers = 9000\n'
             '[[university.lists]]\naddress = "faculty@example.edu"\nmembers = 7000\n')
    gw = start(gateways, sink, lists)
    at(gateways.clock, 2026, 11, 2, 10, 0)
    assert send(gw, ["All-Students@lists.example.edu", "alice@example.edu", "bob@example.edu"],
                message(campaign("welcome"))) == (451, (
        "4.7.1 Campaign X-Campaign-ID welcome has an audience over 15000 university addresses "
        "(20002 reached: 2 recipients and 20000 distribution-list members); "
        f"{HOURS}; {MONDAY_RETRY}").encode())
    # two lists of one campaign, in two messages: 9000, then 9000 + 7000 = 16000
    msg = message(campaign("benefits"))
    assert send(gw, ["staff@example.edu"], msg)[0] == 250
    assert send(gw, ["staff@example.edu"], msg)[0] == 250  # the same list again: still 9000
    code, text = send(gw, ["faculty@example.edu"], msg)
    assert code == 451 and b"(16000 reached: 0 recipients and 16000 distribution-list" in text
    assert [m.rcpt_tos for m in sink.messages] == [["staff@example.edu"]] * 2
    assert gw.metric("gateway_large_audience_deferrals_total", sender="acme", reason="lists",
                     action="defer") == 2


def test_campaign_by_fingerprint_of_sender_and_normalized_subject(gateways, sink):
    gw = start(gateways, sink, "[business_hours]\nlarge_audience = 5\n")
    at(gateways.clock, 2026, 11, 2, 10, 0)
    assert send(gw, people(0, 3), message(subject="Spring  Gala"))[0] == 250
    # the same subject, re-encoded and re-cased, with a reply prefix: the same campaign
    code, text = send(gw, people(3, 3), message(subject="RE: =?utf-8?q?spring_GALA?="))
    assert code == 451 and re.match(
        rb"4\.7\.1 Campaign fingerprint [0-9a-f]{12} has an audience over 5 university "
        rb"addresses \(at least 6 distinct recipients\)", text)
    # another subject, or the same subject from another From: address, is another campaign
    assert send(gw, people(3, 3), message(subject="Autumn gala"))[0] == 250
    assert send(gw, people(3, 3), message(sender="events@em.acme.example"))[0] == 250
    # a campaign header takes precedence over the fingerprint
    assert send(gw, people(3, 3), message(campaign("gala-2026")))[0] == 250
    assert len(sink.messages) == 4


def test_campaign_headers_in_order_and_feedback_id_parts():
    assert campaign_part("Feedback-ID", "fall24:cust7:promo:acme") == "fall24:cust7:promo"
    assert campaign_part("Feedback-ID", "fall24:acme") == "fall24"
    assert campaign_part("Feedback-ID", "acme") == ""  # a SenderId alone names no campaign
    assert campaign_part("Feedback-ID", "::acme") == ""
    assert campaign_part("List-Id", 'Campus "News" <News.Campus.example.edu>') == \
        "news.campus.example.edu"
    assert normalized_subject(_msg("Subject: Fwd: Re:  =?utf-8?b?U3ByaW5nIEdhbGE=?=")) == \
        "spring gala"
    headers = ("Feedback-ID", "X-Campaign-ID", "List-Id")
    key = b"k" * 32
    only_sender_id = identify(_msg("Feedback-ID: acme", "X-Campaign-ID: c9",
                                   "List-Id: <l.example.edu>"), "acme", headers, key)
    assert (only_sender_id.source, only_sender_id.label) == ("X-Campaign-ID",
                                                             "X-Campaign-ID c9")
    by_list = identify(_msg("List-Id: News <l.example.edu>"), "acme", headers, key)
    assert (by_list.source, by_list.label) == ("List-Id", "List-Id l.example.edu")
    # campaigns are per sender
    assert identify(_msg("X-Campaign-ID: c9"), "other", headers, key).key != only_sender_id.key


def _msg(*headers: str):
    from email.parser import BytesParser
    from email.policy import compat32

    return BytesParser(policy=compat32).parsebytes(("\r\n".join(headers) + "\r\n\r\n").encode())


def test_reject_action_per_sender(gateways, sink):
    strict = EXAMPLE_SENDER + '\n[checks.large_audience]\naction = "reject"\n'
    gw = start(gateways, sink, senders={"acme": strict})
    at(gateways.clock, 2026, 11, 2, 10, 0)
    assert send(gw, ["alice@example.edu"], message(campaign("c"), "X-Audience-Size: 20000")) == (
        550, b"5.7.1 Campaign X-Campaign-ID c has an audience over 15000 university addresses "
             b"(20000 declared in X-Audience-Size); large-audience sends may not be sent during "
             b"business hours: Mon-Fri 08:00-17:00 America/Denver; send it after Mon 2026-11-02 "
             b"17:00 MST")
    assert gw.metric("gateway_large_audience_deferrals_total", sender="acme", reason="declared",
                     action="reject") == 1
    assert sink.messages == []


def test_monitor_mode_relays_and_counts_what_it_would_have_deferred(gateways, sink, logs):
    gw = start(gateways, sink, '[checks.large_audience]\nmode = "monitor"\n')
    at(gateways.clock, 2026, 11, 2, 10, 0)
    assert send(gw, ["alice@example.edu"], message(campaign("c"), "X-Audience-Size: 20000"))[
        0] == 250
    assert len(sink.messages) == 1
    assert gw.metric("gateway_check_monitored_total", check="large_audience",
                     action="defer") == 1
    assert logs.events("message")[-1]["monitored"] == [
        {"check": "large_audience", "would": "defer", "reason": "large_audience"}]


def test_holiday_and_other_configured_hours(gateways, sink):
    gw = start(gateways, sink, '[business_hours]\ntimezone = "America/New_York"\n'
                               'days = ["Mon", "Tue", "Wed", "Thu"]\nstart = "09:00"\n'
                               'end = "18:00"\nholidays = [2026-11-03]\n'
                               'large_audience = 100\n')
    msg = message(campaign("c"), "X-Audience-Size: 101")
    gateways.clock.set(dt.datetime(2026, 11, 2, 22, 59, tzinfo=UTC))  # Mon 17:59 EST
    assert send(gw, ["alice@example.edu"], msg)[1].endswith(
        b"outside business hours: Mon-Thu 09:00-18:00 America/New_York; retry after Mon "
        b"2026-11-02 18:00 EST (accepted until Wed 2026-11-04 09:00 EST)")  # Tuesday: holiday
    gateways.clock.set(dt.datetime(2026, 11, 3, 15, 0, tzinfo=UTC))  # the holiday, 10:00
    assert send(gw, ["alice@example.edu"], msg)[0] == 250


def test_largest_campaign_gauge_per_sender_ages_out(gateways, sink):
    gw = start(gateways, sink)
    at(gateways.clock, 2026, 11, 2, 10, 0)
    send(gw, people(0, 3), message(campaign("small")))
    send(gw, people(0, 7), message(campaign("bigger")))
    send(gw, people(0, 2), message(campaign("small")))
    assert gw.metric("gateway_large_audience_max", sender="acme") == 7
    gateways.clock.advance(7 * 86400)
    assert gw.metric("gateway_large_audience_max", sender="acme") == 0


def test_state_holds_keyed_hashes_only(gateways, sink, logs):
    gw = start(gateways, sink, '[state]\nurl = "sqlite:state.sqlite3"\n'
                               "[business_hours]\nlarge_audience = 50\n")
    at(gateways.clock, 2026, 11, 2, 10, 0)
    rcpts = people(0, 40) + ["Mixed.Case@Example.edu"]
    assert send(gw, rcpts, message(subject="Alice's private subject"))[0] == 250
    assert send(gw, people(100, 20), message(subject="Alice's private subject"))[0] == 451
    gw.stop()
    gateways.running.remove(gw)
    path = gateways.tmp_path / "gw" / "state.sqlite3"
    db = sqlite3.connect(path)
    rows = db.execute("SELECT key, member FROM distinct_members").fetchall()
    assert len(rows) == 51  # capped: large_audience + 1
    assert all(re.fullmatch(r"audience:[0-9a-f]{32}:rcpt", k) for k, _ in rows)
    assert all(re.fullmatch(r"[0-9a-f]{20}", m) for _, m in rows)
    everything = b"".join(
        repr(row).encode() for table in ("kv", "distinct_members")
        for row in db.execute(f"SELECT * FROM {table}"))
    db.close()
    for clear in (b"example.edu", b"student", b"mixed", b"private subject"):
        assert clear not in everything.lower()
    for f in path.parent.glob("state.sqlite3*"):  # and not in the files (WAL included)
        assert b"example.edu" not in f.read_bytes().lower()
    # the hashes are the mail log's: an operator can find a recipient's line, not its address
    key = (gateways.tmp_path / "gw" / "var" / "recipient-hash.key").read_bytes()
    members = {m for _, m in rows}
    assert MailLog(key).rcpt_id("mixed.case@example.edu") in members
    logged = logs.events("message")[0]["recipients"]
    assert MailLog(key).rcpt_id("Mixed.Case@Example.edu") in logged
