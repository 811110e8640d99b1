"""The milter front behind a real Postfix (issue #11): swaks talks SMTP to a private Postfix
whose smtpd asks a live gateway over the milter protocol; Postfix relays what it accepts to a
sink. Each case asserts the reply swaks gets (Postfix passes the gateway's code, enhanced code
and text), what the sink received, and Postfix's queue (the hold queue for quarantine)."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import MESSAGE, Sink, free_port
from tests.postfix_server import PostfixServer, postfix_installed, saslpasswd2

pytestmark = [
    pytest.mark.skipif(not postfix_installed(), reason="postfix is not installed "
                       "(.ci/run installs it)"),
    pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed "
                       "(.ci/run installs it)"),
    # Postfix's master runs its daemons as mail_owner: starting a private instance takes root
    pytest.mark.skipif(os.geteuid() != 0, reason="a private Postfix needs root (CI runs as root)"),
]

FROM = "bounce-1@em.acme.example"


@pytest.fixture(scope="module")
def relay_sink():
    sink = Sink()
    yield sink
    sink.stop()


@pytest.fixture(scope="module")
def milter_port():
    return free_port()


@pytest.fixture(scope="module")
def postfix(relay_sink, milter_port):
    # not under pytest's tmp_path: Postfix's own user must reach its data directory, and
    # pytest's base directory is private to root
    workdir = Path(tempfile.mkdtemp(prefix="gw-postfix-"))
    workdir.chmod(0o755)
    server = PostfixServer(workdir, free_port(), relay_sink.port, f"inet:127.0.0.1:{milter_port}")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def mta(postfix, relay_sink):
    """The module's Postfix with an empty queue and a fresh sink record."""
    postfix.delete_all()
    relay_sink.handler.__init__()
    return postfix


def milter_toml(port: int, extra: str = "") -> str:
    return (f'[server]\nlisten = []\nhostname = "gw.test"\n'
            f'[milter]\nlisten = ["inet:127.0.0.1:{port}"]\n' + extra)


@pytest.fixture
def start(gateways, milter_port, mta):
    def run(extra: str = "", senders: dict[str, str] | None = None):
        return gateways.start(milter_toml(milter_port, extra), senders=senders)
    return run


def swaks(mta, tmp_path, *, to=("alice@example.edu",), frm=FROM, data: bytes = MESSAGE,
          server: str = "127.0.0.1", auth: tuple[str, str] | None = None) -> dict[str, str]:
    """Send one message through Postfix; the server's reply to each command, by command
    (``"."`` for the end of the data; ``"RCPT <addr>"`` per recipient; ``"AUTH"`` for the
    SMTP AUTH exchange when ``auth`` (login, password) is given, by PLAIN)."""
    path = tmp_path / f"msg-{time.monotonic_ns()}.eml"
    path.write_bytes(data)
    login = ["-a", "PLAIN", "-au", auth[0], "-ap", auth[1]] if auth else []
    out = subprocess.run(["swaks", "--server", server, "--port", str(mta.smtp_port),
                          "--helo", "client.test", "--from", frm, "--to", ",".join(to),
                          "--data", str(path), "--timeout", "60", *login],
                         capture_output=True, text=True, timeout=120).stdout
    replies: dict[str, str] = {}
    command = "greeting"
    for line in out.splitlines():
        if line.startswith(" -> "):
            text = line[4:]
            if text.startswith(("MAIL", "RCPT", "DATA", "QUIT", "EHLO", "AUTH")) or text == ".":
                command = ("RCPT " + text.split(":", 1)[1].strip() if text.startswith("RCPT")
                           else text.split(" ", 1)[0])
        elif line[:4] in ("<-  ", "<** "):
            replies[command] = replies.get(command, "") + line[4:]
    return replies


def wait_for(condition, timeout: float = 20.0):
    """Wait until ``condition()`` holds (Postfix delivers asynchronously after its 250)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def delivered(sink, count: int = 1):
    wait_for(lambda: len(sink.messages) >= count)
    return sink.messages


def header(content: bytes, name: str) -> list[str]:
    head = content.partition(b"\r\n\r\n")[0].decode()
    unfolded = re.sub(r"\r\n[ \t]", " ", head)
    return [line.split(":", 1)[1].strip() for line in unfolded.split("\r\n")
            if line.lower().startswith(name.lower() + ":")]


# --- identification, return-path, relay control --------------------------------------------

def test_registered_ip_is_relayed_and_logged_once(start, mta, relay_sink, tmp_path, logs):
    gw = start()
    replies = swaks(mta, tmp_path)
    assert replies["."].startswith("250 2.0.0 Ok: queued as ")
    [msg] = delivered(relay_sink)
    assert (msg.mail_from, msg.rcpt_tos) == (FROM, ["alice@example.edu"])
    assert msg.content.startswith(b"Received: from client.test (")  # Postfix's own
    head, body = MESSAGE.split(b"\r\n\r\n")
    assert head in msg.content and msg.content.rstrip().endswith(body.rstrip())
    [line] = logs.events("message")
    assert (line["decision"], line["reason"], line["sender"]) == ("accept", "relayed", "acme")
    assert gw.metric("gateway_messages_total", sender="acme", decision="accept",
                     reason="relayed") == 1


def test_ipv6_client_is_identified(start, mta, relay_sink, tmp_path):
    start(senders={"acme": EXAMPLE_V6_ONLY})
    # (swaks needs IO::Socket::INET6 for IPv6, which Debian's swaks does not pull in: smtplib)
    with smtplib.SMTP("::1", mta.smtp_port, timeout=60) as client:
        client.ehlo("client.test")
        assert client.mail(FROM)[0] == 250
        assert client.rcpt("alice@example.edu")[0] == 250
        code, text = client.data(MESSAGE)
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ")
    [msg] = delivered(relay_sink)
    assert msg.content.startswith(b"Received: from client.test (unknown [IPv6:::1])")
    replies = swaks(mta, tmp_path, server="127.0.0.1")
    assert replies["MAIL"] == ("550 5.7.1 Client host [127.0.0.1] is not a registered sender; "
                               "relaying denied")


EXAMPLE_V6_ONLY = """
id = "acme"
organization = "Acme Marketing Cloud"
contact = "postmaster@acme.example"
networks = ["::1/128"]
domains = ["em.acme.example"]
return_path = ["bounce-*@em.acme.example"]
expires = 2027-06-30
"""


def test_return_path_mismatch_is_refused_at_mail(start, mta, relay_sink, tmp_path):
    start()
    replies = swaks(mta, tmp_path, frm="news@em.acme.example")
    assert replies["MAIL"].startswith("550 5.7.1 ")
    assert "bounce-*@em.acme.example" in replies["MAIL"]
    assert mta.queue() == [] and relay_sink.messages == []


def test_relay_denied_per_recipient(start, mta, relay_sink, tmp_path, logs):
    start()
    replies = swaks(mta, tmp_path, to=("alice@example.edu", "bob@elsewhere.test"))
    assert replies["RCPT <bob@elsewhere.test>"] == (
        "550 5.7.1 Relaying denied: elsewhere.test is not a university domain")
    assert replies["RCPT <alice@example.edu>"].startswith("250 2.1.5")
    assert replies["."].startswith("250 2.0.0")
    [msg] = delivered(relay_sink)
    assert msg.rcpt_tos == ["alice@example.edu"]
    assert [e["reason"] for e in logs.events("rcpt_refused")] == ["relay_denied"]


# --- content --------------------------------------------------------------------------------

ATTACHMENT = (b"From: Acme News <news@em.acme.example>\r\nTo: alice@example.edu\r\n"
              b"List-Unsubscribe: <https://em.acme.example/u/1>\r\n"
              b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
              b"Subject: with a file\r\nMessage-ID: <a1@em.acme.example>\r\nMIME-Version: 1.0\r\n"
              b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
              b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
              b"--b\r\nContent-Type: application/pdf\r\n"
              b'Content-Disposition: attachment; filename="a.pdf"\r\n'
              b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b--\r\n")


def test_attachment_is_refused_at_end_of_data(start, mta, relay_sink, tmp_path):
    start()
    replies = swaks(mta, tmp_path, data=ATTACHMENT)
    assert replies["."].startswith("550 5.7.1 ") and "a.pdf" in replies["."]
    assert mta.queue() == [] and relay_sink.messages == []


def test_missing_unsubscribe_is_refused(start, mta, relay_sink, tmp_path):
    start()
    raw = re.sub(rb"List-Unsubscribe[^\r]*\r\n", b"", MESSAGE)
    replies = swaks(mta, tmp_path, data=raw)
    assert replies["."].startswith("550 5.7.1 ") and "nsubscribe" in replies["."]
    assert mta.queue() == [] and relay_sink.messages == []


def test_forged_authentication_results_are_removed(start, mta, relay_sink, tmp_path):
    start()
    raw = MESSAGE.replace(b"Subject: Hello\r\n", b"Authentication-Results: gw.test; spf=pass "
                          b"smtp.mailfrom=evil.example\r\nSubject: Hello\r\n"
                          b"Authentication-Results: other.test; spf=pass\r\n"
                          b"Authentication-Results: (c) GW.TEST;\r\n\tdkim=pass\r\n")
    assert swaks(mta, tmp_path, data=raw)["."].startswith("250 2.0.0")
    [msg] = delivered(relay_sink)
    assert header(msg.content, "Authentication-Results") == ["other.test; spf=pass"]
    assert b"evil.example" not in msg.content


def test_too_big_with_small_limit(gateways, milter_port, mta, relay_sink, tmp_path):
    gateways.start(f'[server]\nlisten = []\nhostname = "gw.test"\nmax_message_size = 2048\n'
                   f'[milter]\nlisten = ["inet:127.0.0.1:{milter_port}"]\n')
    big = MESSAGE + (b"y" * 76 + b"\r\n") * 40
    replies = swaks(mta, tmp_path, data=big)
    assert replies["."] == "552 5.3.4 Error: Too much mail data"
    assert mta.queue() == [] and relay_sink.messages == []


# --- rate, quarantine, gateway down ---------------------------------------------------------

def test_rate_deferral_451(start, mta, relay_sink, tmp_path):
    start('[limits]\nsender_rate = "1/hour"\nmax_hold = 0\n')
    assert swaks(mta, tmp_path)["."].startswith("250 2.0.0")
    replies = swaks(mta, tmp_path)
    # the engine's early refusal: over the rate, MAIL is refused before the body is sent
    assert replies["MAIL"].startswith("451 4.7.1 Sending rate of sender acme is limited to "
                                      "1/hour; retry in ")
    assert "." not in replies
    delivered(relay_sink)
    assert len(relay_sink.messages) == 1


def test_gateway_down_postfix_tempfails(mta, relay_sink, tmp_path):
    replies = swaks(mta, tmp_path)  # nothing listens on the milter port
    assert replies["MAIL"] == "451 4.7.1 Service unavailable - try again later"
    assert mta.queue() == [] and relay_sink.messages == []



# --- sender authentication (a real DNS server): refusal, tag, quarantine ---------------------

@pytest.fixture(scope="module")
def knot(tmp_path_factory):
    from tests.auth_helpers import auth_zones
    from tests.dns_server import KNOTD, SKIP_REASON, KnotServer

    if KNOTD is None:
        pytest.skip(SKIP_REASON)
    server = KnotServer(tmp_path_factory.mktemp("knot"), auth_zones())
    yield server
    server.stop()


@pytest.fixture
def start_auth(start, knot):
    from tests.auth_helpers import SENDER

    def run(**settings):
        lines = ["[dns]", f'nameservers = ["{knot.address}"]', "timeout = 2.0", "",
                 "[checks.sender_auth]", 'mode = "enforce"', "check_helo = false"]
        lines += [f'{key} = "{value}"' for key, value in settings.items()]
        return start("\n".join(lines) + "\n", senders={"acme": SENDER})
    return run


def test_spf_and_dkim_failure_is_refused_5726(start_auth, mta, relay_sink, tmp_path):
    from tests.auth_helpers import message

    start_auth()
    replies = swaks(mta, tmp_path, frm="bounce-1@fail.acme.example",
                    data=message(from_="news@fail.acme.example"))
    assert replies["."].startswith("550 5.7.26 SPF and DKIM authentication both failed")
    assert mta.queue() == [] and relay_sink.messages == []


def test_passing_message_gets_authentication_results_at_the_top(start_auth, mta, relay_sink,
                                                                 tmp_path):
    from tests.auth_helpers import message, sign

    start_auth()
    raw = sign(message(), "rsa2048", "acme.example")
    assert swaks(mta, tmp_path, frm="bounce-1@pass.acme.example",
                 data=raw)["."].startswith("250 2.0.0")
    [msg] = delivered(relay_sink)
    fields = re.sub(rb"\r\n[ \t]+", b" ", msg.content.partition(b"\r\n\r\n")[0]).split(b"\r\n")
    names = [f.split(b":", 1)[0] for f in fields]
    # Postfix's Received, then the gateway's field, then the message as sent (signed)
    assert names[:3] == [b"Received", b"Authentication-Results", b"DKIM-Signature"]
    assert fields[1].startswith(b"Authentication-Results: gw.test; spf=pass "
                                b"smtp.mailfrom=pass.acme.example; dkim=pass (2048-bit key)")


def test_tag_adds_the_junk_header(start_auth, mta, relay_sink, tmp_path):
    from tests.auth_helpers import message

    start_auth(on_fail="tag", junk_header="X-Campus-Junk", junk_value="auth-failed")
    assert swaks(mta, tmp_path, frm="bounce-1@fail.acme.example",
                 data=message(from_="news@fail.acme.example"))["."].startswith("250 2.0.0")
    [msg] = delivered(relay_sink)
    assert header(msg.content, "X-Campus-Junk") == ["auth-failed"]
    assert header(msg.content, "Authentication-Results")[0].startswith("gw.test; spf=fail")


def test_quarantine_holds_in_postfix_and_release_delivers(start_auth, mta, relay_sink,
                                                          tmp_path, logs):
    from tests.auth_helpers import message

    gw = start_auth(on_fail="quarantine")
    raw = message(from_="news@fail.acme.example", subject="Hold me")
    replies = swaks(mta, tmp_path, frm="bounce-7@fail.acme.example",
                    to=("alice@example.edu", "bob@example.edu"), data=raw)
    assert replies["."].startswith("250 2.0.0 Ok: queued as ")
    [held] = mta.queue()
    assert held["queue_name"] == "hold"
    assert sorted(r["address"] for r in held["recipients"]) == ["alice@example.edu",
                                                                "bob@example.edu"]
    [hold] = [ln for ln in mta.log.read_text().splitlines()
              if f"{held['queue_id']}: milter-hold: END-OF-MESSAGE" in ln]
    assert "milter triggers HOLD action" in hold  # (Postfix logs no reason: the gateway does)
    [line] = logs.events("message")
    assert (line["decision"], line["reason"], line["decided_by"]) == (
        "quarantine", "spf_dkim_fail", "sender_auth")
    [ids] = logs.events("milter_queue_id")
    assert (ids["queue_id"], ids["mta_queue_id"]) == (line["queue_id"], held["queue_id"])
    assert gw.metric("gateway_messages_total", sender="acme", decision="quarantine",
                     reason="spf_dkim_fail") == 1
    assert relay_sink.messages == []

    mta.release_held()
    mta.flush()
    [msg] = delivered(relay_sink)
    assert sorted(msg.rcpt_tos) == ["alice@example.edu", "bob@example.edu"]
    assert header(msg.content, "Authentication-Results")[0].startswith("gw.test; spf=fail")


# --- recipient flags, the unsubscribe rewrite, large audiences --------------------------------

def flag(gw, name: str, *addresses: str) -> None:
    flags = gw.gateway.flags
    gw.call(flags.add(name, [flags.member(a) for a in addresses]))


def test_flagged_recipients_are_deleted_and_the_rest_delivered(start, mta, relay_sink, tmp_path,
                                                               logs):
    from gateway.policy.flags import DO_NOT_EMAIL, FERPA

    gw = start()
    flag(gw, FERPA, "alice@example.edu")
    flag(gw, DO_NOT_EMAIL, "carol@example.edu")
    replies = swaks(mta, tmp_path, to=("alice@example.edu", "bob@example.edu",
                                       "carol@example.edu"))
    assert [replies[f"RCPT <{r}@example.edu>"][:9] for r in ("alice", "bob", "carol")] == \
        ["250 2.1.5"] * 3  # nothing told at RCPT
    assert replies["."].startswith("250 2.0.0 Ok: queued as ")
    [msg] = delivered(relay_sink)
    assert msg.rcpt_tos == ["bob@example.edu"]
    maillog = gw.gateway.maillog
    assert sorted(e["rcpt"] for e in logs.events("rcpt_dropped")) == sorted(
        [maillog.rcpt_id("alice@example.edu"), maillog.rcpt_id("carol@example.edu")])
    assert logs.events("message")[-1]["recipients"] == [maillog.rcpt_id("bob@example.edu")]
    assert gw.metric("gateway_recipients_total", sender="acme", decision="drop") == 2


def test_every_recipient_flagged_is_accepted_and_discarded(start, mta, relay_sink, tmp_path,
                                                           logs):
    from gateway.policy.flags import FERPA

    gw = start()
    flag(gw, FERPA, "alice@example.edu", "bob@example.edu")
    replies = swaks(mta, tmp_path, to=("alice@example.edu", "bob@example.edu"))
    assert replies["."].startswith("250 2.0.0 Ok: queued as ")
    assert mta.queue() == [] and relay_sink.messages == []
    assert "milter-discard: END-OF-MESSAGE" in mta.log.read_text()
    decision = logs.events("message")[-1]
    assert (decision["decision"], decision["reason"]) == ("accept", "recipients_dropped")
    assert gw.metric("gateway_recipients_total", sender="acme", decision="drop") == 2


def test_one_click_unsubscribe_is_rewritten_in_place(start, mta, relay_sink, tmp_path):
    start('[flags]\nunsubscribe_base_url = "https://unsub.example.edu"\n')
    assert swaks(mta, tmp_path)["."].startswith("250 2.0.0")
    [msg] = delivered(relay_sink)
    [link] = header(msg.content, "List-Unsubscribe")
    assert re.fullmatch(r"<https://unsub\.example\.edu/u/[A-Za-z0-9_-]+>, "
                        r"<mailto:unsub-1@em\.acme\.example>", link), link
    assert header(msg.content, "List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]
    assert b"em.acme.example/u/1" not in msg.content


def test_large_audience_is_deferred_in_business_hours(start, mta, relay_sink, tmp_path):
    start()  # the clock: Monday 2026-11-02 08:00 in Denver
    raw = MESSAGE.replace(b"Subject: Hello\r\n", b"Subject: Hello\r\nX-Campaign-ID: gala\r\n"
                          b"X-Audience-Size: 20000\r\n")
    replies = swaks(mta, tmp_path, data=raw)
    assert replies["."].startswith("451 4.7.1 Campaign X-Campaign-ID gala has an audience over "
                                   "15000 university addresses (20000 declared in "
                                   "X-Audience-Size)")
    assert mta.queue() == [] and relay_sink.messages == []


def test_the_canonical_header_check_judges_the_fields_postfix_hands_over(start, mta, relay_sink,
                                                                        tmp_path):
    start()
    raw = MESSAGE.replace(b"To: Alice", b"From: Other <other@em.acme.example>\r\nTo: Alice")
    replies = swaks(mta, tmp_path, data=raw)
    assert replies["."] == ("550 5.6.0 The message has 2 From fields; at most one is allowed "
                            "(RFC 5322 3.6)")
    assert mta.queue() == [] and relay_sink.messages == []


def test_sessions_per_sender_counts_postfix_sessions_and_releases_them(start, mta):
    start("[limits]\nsessions_per_sender = 1\n")

    def session():
        client = smtplib.SMTP("127.0.0.1", mta.smtp_port, timeout=60)
        client.ehlo("client.test")
        return client

    first = session()
    assert first.mail(FROM)[0] == 250
    second = session()
    assert second.mail(FROM) == (421, b"4.7.0 Too many concurrent sessions for sender acme "
                                      b"(at most 1); try again later")
    second.close()
    first.quit()  # the first session ends: its count is released
    wait_for(lambda: _mail_code(session()) == 250)


def _mail_code(client) -> int:
    try:
        return client.mail(FROM)[0]
    finally:
        client.close()


def test_rate_hold_delays_postfix_answer_within_max_hold(start, gateways, mta, relay_sink,
                                                        tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    gw = start('[limits]\nsender_rate = "1/minute"\nmax_hold = 10\n')
    clock = gateways.clock
    assert swaks(mta, tmp_path)["."].startswith("250 2.0.0")
    clock.advance(55)  # budget frees in 5 s: within max_hold, so the answer is held
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(swaks, mta, tmp_path)
        wait_for(lambda: clock.sleeping == 1)
        assert not pending.done()  # Postfix is waiting for the gateway's answer
        clock.advance(5)
        assert pending.result(60)["."].startswith("250 2.0.0 Ok: queued as ")
    assert len(delivered(relay_sink, 2)) == 2
    assert gw.metric("gateway_rate_holds_total", sender="acme") == 1


# --- SMTP AUTH at Postfix: the gateway identifies the sender by {auth_authen} ----------------

SASL_LOGIN, SASL_PASSWORD = "acme-smtp", "s3cret-pass"
INTRUDER = ("intruder", "other-pass")  # a valid SASL login at Postfix, no registered sender


def auth_sender(networks: str = '["127.0.0.1/32", "::1/128"]') -> str:
    """The sender authentication tests' sender, registered for SMTP AUTH as SASL_LOGIN
    (the gateway's own password hash is for its SMTP front; Postfix checks the sasldb)."""
    from gateway.policy.passwords import hash_password
    from tests.auth_helpers import SENDER

    body = SENDER.replace('networks = ["127.0.0.1/32", "::1/128"]', f"networks = {networks}")
    assert body != SENDER or networks == '["127.0.0.1/32", "::1/128"]'
    return body + (f'\n[auth]\nusername = "{SASL_LOGIN}"\n'
                   f'password_hash = "{hash_password(SASL_PASSWORD, ln=4)}"\n')


@pytest.fixture(scope="module")
def sasl_postfix(relay_sink, milter_port):
    """A second private Postfix, the same but with SMTP AUTH on (Cyrus SASL, sasldb): the
    other tests keep a Postfix that offers no AUTH."""
    if saslpasswd2() is None:
        pytest.skip("saslpasswd2 is not installed (.ci/run installs sasl2-bin, "
                    "libsasl2-modules, libsasl2-modules-db)")
    workdir = Path(tempfile.mkdtemp(prefix="gw-postfix-sasl-"))
    workdir.chmod(0o755)
    server = PostfixServer(workdir, free_port(), relay_sink.port, f"inet:127.0.0.1:{milter_port}",
                           sasl_users={SASL_LOGIN: SASL_PASSWORD, INTRUDER[0]: INTRUDER[1]})
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def sasl_mta(sasl_postfix, relay_sink):
    sasl_postfix.delete_all()
    relay_sink.handler.__init__()
    return sasl_postfix


@pytest.fixture
def start_sasl(gateways, milter_port, knot, sasl_mta):
    def run(sender: str):
        toml = milter_toml(milter_port, "\n".join([
            "[dns]", f'nameservers = ["{knot.address}"]', "timeout = 2.0", "",
            "[checks.sender_auth]", 'mode = "enforce"', "check_helo = false", ""]))
        return gateways.start(toml, senders={"acme": sender})
    return run


def test_sasl_login_identifies_the_sender_through_postfix(start_sasl, sasl_mta, relay_sink,
                                                          tmp_path, logs):
    from tests.auth_helpers import message, sign

    gw = start_sasl(auth_sender())
    raw = sign(message(), "rsa2048", "acme.example")
    replies = swaks(sasl_mta, tmp_path, frm="bounce-1@pass.acme.example", data=raw,
                    auth=(SASL_LOGIN, SASL_PASSWORD))
    assert replies["AUTH"] == "235 2.7.0 Authentication successful"
    assert replies["MAIL"] == "250 2.1.0 Ok"
    assert replies["RCPT <alice@example.edu>"] == "250 2.1.5 Ok"
    assert replies["."].startswith("250 2.0.0 Ok: queued as ")
    [msg] = delivered(relay_sink)
    assert (msg.mail_from, msg.rcpt_tos) == ("bounce-1@pass.acme.example", ["alice@example.edu"])
    fields = re.sub(rb"\r\n[ \t]+", b" ", msg.content.partition(b"\r\n\r\n")[0]).split(b"\r\n")
    assert [f.split(b":", 1)[0] for f in fields[:3]] == [
        b"Received", b"Authentication-Results", b"DKIM-Signature"]
    assert b" with ESMTPA id " in fields[0]  # Postfix's own: the client authenticated
    assert fields[1].startswith(b"Authentication-Results: gw.test; spf=pass "
                                b"smtp.mailfrom=pass.acme.example; dkim=pass (2048-bit key)")
    assert header(msg.content, "From") == ["Acme News <news@pass.acme.example>"]
    assert msg.content.rstrip().endswith(b"\r\n\r\nHello, world.")
    [line] = logs.events("message")
    assert (line["auth"], line["sender"], line["decision"], line["reason"]) == (
        SASL_LOGIN, "acme", "accept", "relayed")
    assert gw.metric("gateway_messages_total", sender="acme", decision="accept",
                     reason="relayed") == 1


def test_sasl_login_whose_sender_networks_lack_the_ip_is_refused(start_sasl, sasl_mta,
                                                                  relay_sink, tmp_path):
    # identity comes from the login, not the IP: the IP path would say "not a registered
    # sender"; the AUTH path names the sender whose networks do not hold the client
    start_sasl(auth_sender('["192.0.2.0/24"]'))
    replies = swaks(sasl_mta, tmp_path, frm="bounce-1@pass.acme.example",
                    auth=(SASL_LOGIN, SASL_PASSWORD))
    assert replies["AUTH"] == "235 2.7.0 Authentication successful"
    assert replies["MAIL"] == ("550 5.7.1 Client host [127.0.0.1] is not in the registered "
                               "networks of sender acme")
    assert "." not in replies
    assert sasl_mta.queue() == [] and relay_sink.messages == []


def test_sasl_login_that_is_no_registered_sender_is_refused(start_sasl, sasl_mta, relay_sink,
                                                            tmp_path, logs):
    start_sasl(auth_sender())
    replies = swaks(sasl_mta, tmp_path, frm="bounce-1@pass.acme.example", auth=INTRUDER)
    assert replies["AUTH"] == "235 2.7.0 Authentication successful"  # Postfix's own check
    assert replies["MAIL"] == ("550 5.7.1 Authenticated user is not a registered sender; "
                               "relaying denied")
    assert "." not in replies
    assert sasl_mta.queue() == [] and relay_sink.messages == []
    assert len(logs.events("milter_auth_not_a_sender")) == 1
    assert logs.events("message") == []
