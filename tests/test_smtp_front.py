"""The SMTP front: what EHLO offers and every identification / relay-control reply, exactly."""

from __future__ import annotations

import base64
import smtplib
import ssl

import pytest

from gateway.policy.passwords import hash_password
from tests.conftest import EXAMPLE_SENDER, MESSAGE, send

FAST_HASH = hash_password("s3cret-pass", ln=4)

AUTH_SENDER = EXAMPLE_SENDER + f"""
[auth]
username = "acme-smtp"
password_hash = "{FAST_HASH}"
"""

ELSEWHERE_SENDER = """
id = "elsewhere"
organization = "Elsewhere Events"
contact = "ops@events.example"
networks = ["192.0.2.0/24"]
domains = ["mail.events.example"]
return_path = ["rp-*@mail.events.example"]
expires = 2027-01-01
[auth]
username = "elsewhere-smtp"
password_hash = "%s"
""" % FAST_HASH


def tls_toml(tls_files, extra: str = "") -> str:
    cert, key = tls_files
    return f"""
    [server]
    listen = ["127.0.0.1:0"]
    hostname = "gw.test"
    tls_cert = "{cert}"
    tls_key = "{key}"
    {extra}
    """


def _client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_ehlo_advertises_extensions_without_tls(gateways):
    gw = gateways.start()
    client = gw.smtp()
    for ext in ("size", "8bitmime", "pipelining", "enhancedstatuscodes"):
        assert client.has_extn(ext), ext
    assert client.esmtp_features["size"] == str(10 * 1024 * 1024)
    assert not client.has_extn("starttls")
    assert not client.has_extn("auth")
    client.quit()


def test_starttls_offered_with_certificate_and_auth_only_after_it(gateways, tls_files):
    gw = gateways.start(tls_toml(tls_files), senders={"acme": AUTH_SENDER})
    client = gw.smtp()
    assert client.has_extn("starttls")
    assert not client.has_extn("auth")
    code, text = client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0acme-smtp\0s3cret-pass").decode())
    assert (code, text) == (538, b"5.7.11 Encryption required for requested authentication mechanism")
    client.starttls(context=_client_tls())
    client.ehlo("client.test")
    assert client.has_extn("auth")
    assert set(client.esmtp_features["auth"].split()) == {"LOGIN", "PLAIN"}
    client.quit()


def test_auth_success_identifies_sender_and_relays(gateways, tls_files, sink, logs):
    gw = gateways.start(tls_toml(tls_files), senders={"acme": AUTH_SENDER}, upstream=sink.url)
    client = gw.smtp()
    client.starttls(context=_client_tls())
    client.ehlo("client.test")
    assert client.login("acme-smtp", "s3cret-pass") == (235, b"2.7.0 Authentication successful")
    client.sendmail("bounce-9@em.acme.example", ["alice@example.edu"], MESSAGE)
    client.quit()
    [msg] = sink.messages
    assert b"with ESMTPSA id" in msg.content
    [line] = logs.events("message")
    assert line["auth"] == "acme-smtp" and line["sender"] == "acme" and line["tls"] is True


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_failure_is_535_5_7_8(gateways, tls_files, mechanism, logs):
    gw = gateways.start(tls_toml(tls_files), senders={"acme": AUTH_SENDER})
    client = gw.smtp()
    client.starttls(context=_client_tls())
    client.ehlo("client.test")
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        if mechanism == "PLAIN":
            client.auth("PLAIN", lambda challenge=None: "\0acme-smtp\0wrong", initial_response_ok=True)
        else:
            client.user, client.password = "acme-smtp", "wrong"
            client.auth("LOGIN", client.auth_login, initial_response_ok=False)
    assert err.value.smtp_code == 535
    assert err.value.smtp_error == b"5.7.8 Authentication credentials invalid"
    [event] = logs.events("auth_failed")
    assert event["username"] == "acme-smtp" and "wrong" not in logs.text()


def test_auth_identity_whose_networks_lack_the_ip_is_refused_at_mail(gateways, tls_files):
    gw = gateways.start(tls_toml(tls_files),
                        senders={"acme": EXAMPLE_SENDER, "elsewhere": ELSEWHERE_SENDER})
    client = gw.smtp()
    client.starttls(context=_client_tls())
    client.ehlo("client.test")
    assert client.login("elsewhere-smtp", "s3cret-pass")[0] == 235
    assert client.mail("rp-1@mail.events.example") == (
        550, b"5.7.1 Client host [127.0.0.1] is not in the registered networks of sender elsewhere")
    client.quit()


def test_require_tls_refuses_mail_before_starttls(gateways, tls_files, sink):
    gw = gateways.start(tls_toml(tls_files, "require_tls = true"), upstream=sink.url)
    client = gw.smtp()
    assert client.mail("bounce-1@em.acme.example") == (
        530, b"5.7.0 Must issue a STARTTLS command first")
    client.starttls(context=_client_tls())
    client.ehlo("client.test")
    assert client.mail("bounce-1@em.acme.example") == (250, b"2.1.0 Sender OK")
    client.quit()


def test_unregistered_client_ip_is_refused_before_data(gateways, sink):
    gw = gateways.start(senders={"elsewhere": ELSEWHERE_SENDER}, upstream=sink.url)
    client = gw.smtp()
    assert client.mail("rp-1@mail.events.example") == (
        550, b"5.7.1 Client host [127.0.0.1] is not a registered sender; relaying denied")
    client.quit()
    assert sink.messages == [] and sink.handler.ehlos == 0


def test_ipv6_client_identified_by_ipv6_network(gateways, sink):
    v6_only = EXAMPLE_SENDER.replace('["127.0.0.1/32", "::1/128"]', '["2001:db8::/32", "::1/128"]')
    gw = gateways.start('[server]\nlisten = ["[::1]:0"]\nhostname = "gw.test"\n',
                        senders={"acme": v6_only}, upstream=sink.url)
    client = smtplib.SMTP("::1", gw.port, timeout=30)
    client.sendmail("bounce-1@em.acme.example", ["alice@example.edu"], MESSAGE)
    client.quit()
    assert b"([::1])" in sink.messages[0].content


def test_return_path_not_matching_names_expected_form(gateways):
    gw = gateways.start()
    client = gw.smtp()
    assert client.mail("news@em.acme.example") == (
        550, b"5.7.1 Return-path <news@em.acme.example> does not carry a registered sender "
             b"identifier; expected bounce-*@em.acme.example")
    client.quit()


def test_null_reverse_path_refused(gateways):
    gw = gateways.start()
    client = gw.smtp()
    assert client.mail("<>") == (
        550, b"5.7.1 Null reverse-path <> is not accepted; use the registered return-path "
             b"(bounce-*@em.acme.example)")
    client.quit()


def test_malformed_mail_from_is_553_5_1_7(gateways):
    gw = gateways.start()
    client = gw.smtp()
    code, text = client.docmd("MAIL", "FROM:<bounce-1@[127.0.0.1]>")
    assert (code, text) == (553, b"5.1.7 Bad sender address <bounce-1@[127.0.0.1]>: "
                                  b"address literals are not accepted")
    client.quit()


def test_expired_registration_is_refused_naming_the_date(gateways):
    gateways.clock.set(gateways.clock.now().replace(year=2027, month=7, day=1))
    gw = gateways.start()
    client = gw.smtp()
    assert client.mail("bounce-1@em.acme.example") == (
        550, b"5.7.1 Registration of sender acme expired on 2027-06-30; renew the policy exception")
    client.quit()


def test_registration_valid_through_its_last_day(gateways):
    gateways.clock.set(gateways.clock.now().replace(year=2027, month=6, day=30, hour=23))
    gw = gateways.start()
    client = gw.smtp()
    assert client.mail("bounce-1@em.acme.example") == (250, b"2.1.0 Sender OK")
    client.quit()


@pytest.mark.parametrize("rcpt, reason", [
    ("<someone@gmail.com>", b"gmail.com is not a university domain"),
    ("<someone@example.edu.attacker.example>", b"example.edu.attacker.example is not a university domain"),
    ("<@relay.example:bob@example.edu>", b"source routes are not accepted"),
    ("<@a.example,@b.example:bob@example.edu>", b"source routes are not accepted"),
    ("<bob%gmail.com@example.edu>", b"'%' routing is not accepted"),
    ("<gmail.com!bob@example.edu>", b"'!' (UUCP) paths are not accepted"),
    ('<"bob@gmail.com"@example.edu>', b"quoted local parts containing routing characters are not accepted"),
    ("<bob@[192.0.2.1]>", b"address literals are not accepted"),
    ("<bob@[IPv6:::1]>", b"address literals are not accepted"),
    ("<bob>", b"address must be local-part@domain"),
    ("<>", b"empty recipient"),
])
def test_open_relay_probes_are_denied(gateways, sink, rcpt, reason):
    gw = gateways.start(upstream=sink.url)
    client = gw.smtp()
    assert client.mail("bounce-1@em.acme.example")[0] == 250
    code, text = client.docmd("RCPT", f"TO:{rcpt}")
    assert (code, text) == (550, b"5.7.1 Relaying denied: " + reason)
    client.quit()
    assert sink.handler.rcpt_seen == []


def test_wildcard_university_subdomain_is_accepted(gateways, sink):
    gw = gateways.start(upstream=sink.url)
    client, (code, _) = send(gw, rcpts=("prof@cs.example.edu",))
    client.quit()
    assert code == 250 and sink.messages[0].rcpt_tos == ["prof@cs.example.edu"]


def test_more_than_max_recipients_is_452_4_5_3(gateways, sink):
    gw = gateways.start('[server]\nlisten = ["127.0.0.1:0"]\nmax_recipients = 2\n',
                        upstream=sink.url)
    client = gw.smtp()
    client.mail("bounce-1@em.acme.example")
    assert client.rcpt("a@example.edu")[0] == 250
    assert client.rcpt("b@example.edu")[0] == 250
    assert client.rcpt("c@example.edu") == (452, b"4.5.3 Too many recipients")
    assert client.data(MESSAGE)[0] == 250
    client.quit()
    assert sink.messages[0].rcpt_tos == ["a@example.edu", "b@example.edu"]


def test_size_parameter_over_limit_is_552_5_3_4(gateways):
    gw = gateways.start('[server]\nlisten = ["127.0.0.1:0"]\nmax_message_size = 2048\n')
    client = gw.smtp()
    assert client.esmtp_features["size"] == "2048"
    code, text = client.docmd("MAIL", "FROM:<bounce-1@em.acme.example> SIZE=4096")
    assert (code, text) == (552, b"5.3.4 Error: message size exceeds fixed maximum message size")
    client.quit()


def test_data_over_limit_is_552_5_3_4_and_not_relayed(gateways, sink, logs):
    gw = gateways.start('[server]\nlisten = ["127.0.0.1:0"]\nmax_message_size = 2048\n',
                        upstream=sink.url)
    client = gw.smtp()
    client.mail("bounce-1@em.acme.example")
    client.rcpt("alice@example.edu")
    code, text = client.data(MESSAGE + (b"x" * 70 + b"\r\n") * 40)
    assert (code, text) == (552, b"5.3.4 Error: Too much mail data")
    # the session goes on: the next message is relayed, on the same upstream connection
    client.sendmail("bounce-1@em.acme.example", ["alice@example.edu"], MESSAGE)
    client.quit()
    assert len(sink.messages) == 1
    assert sink.handler.rsets >= 1


def test_unknown_command_replies_carry_enhanced_codes(gateways):
    gw = gateways.start()
    client = gw.smtp()
    assert client.docmd("RCPT", "TO:<a@example.edu>") == (503, b"5.5.1 Error: need MAIL command")
    assert client.docmd("FOO") == (500, b'5.5.2 Error: command "FOO" not recognized')
    assert client.docmd("NOOP") == (250, b"2.0.0 OK")
    client.quit()
