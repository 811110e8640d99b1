"""The milter front at the protocol level: a raw MTA-side client (tests/milter_client.py)
drives a live gateway where Postfix would not send what a test needs (AUTH identities without
a SASL server, address families, malformed, oversized and unknown packets, aborts, closes and
stalls). Each case asserts the packets the gateway answers, one log line, and that nothing was
spent."""

from __future__ import annotations

import os
import stat

import pytest
import struct
import time

from kilter.protocol import messages as m

from gateway.policy.passwords import hash_password
from tests.conftest import EXAMPLE_SENDER, MESSAGE
from tests.milter_client import MilterClient, connect_packet, raw

FROM = "bounce-1@em.acme.example"


def milter_gateway(gateways, extra: str = "", senders=None, listen: str | None = None):
    listen = listen or "inet:127.0.0.1:0"
    return gateways.start(f'[server]\nlisten = []\nhostname = "gw.test"\n'
                          f'[milter]\nlisten = ["{listen}"]\n' + extra, senders=senders)


def address(gw) -> tuple[str, int]:
    host, port = gw.gateway.milter.addresses[0][5:].rsplit(":", 1)
    return host, int(port)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def reply_text(message) -> str:
    assert isinstance(message, m.ReplyCode), message
    return bytes(message.content).rstrip(b"\0").decode()


def test_negotiation_asks_for_exactly_the_actions_it_uses(gateways):
    gw = milter_gateway(gateways)
    client = MilterClient(address(gw))
    offer = client.open()
    assert offer.version == 6
    assert offer.action_flags == (m.ActionFlags.ADD_HEADERS | m.ActionFlags.CHANGE_HEADERS
                                  | m.ActionFlags.DELETE_RECIPIENT | m.ActionFlags.QUARANTINE)
    assert offer.protocol_flags == (m.ProtocolFlags.NO_UNKNOWN | m.ProtocolFlags.NO_DATA
                                    | m.ProtocolFlags.HEADER_LEADING_SPACE
                                    | m.ProtocolFlags.NR_HEADER | m.ProtocolFlags.NR_BODY
                                    | m.ProtocolFlags.NR_END_OF_HEADERS)
    assert isinstance(client.message(FROM, ["alice@example.edu"], MESSAGE)[-1], m.Continue)
    client.close()


def test_an_mta_without_the_needed_actions_is_refused_with_one_line(gateways, logs):
    gw = milter_gateway(gateways)
    client = MilterClient(address(gw))
    client.send(m.Negotiate(6, m.ActionFlags.ADD_HEADERS, m.ProtocolFlags(0x1FFFFF)))
    assert client.read() is None
    wait_for(lambda: logs.events("milter_session_ended"))
    [line] = logs.events("milter_session_ended")
    assert line["reason"].startswith("bad packet: the MTA does not offer the actions")


AUTH_SENDER = EXAMPLE_SENDER + f"""
[auth]
username = "acme-smtp"
password_hash = "{hash_password("s3cret-pass", ln=4)}"
"""


def test_auth_identity_from_auth_authen(gateways, logs):
    gw = milter_gateway(gateways, senders={"acme": AUTH_SENDER})
    client = MilterClient(address(gw))
    client.open(auth_authen="acme-smtp")
    assert isinstance(client.message(FROM, ["alice@example.edu"], MESSAGE)[-1], m.Continue)
    line = logs.events("message")[-1]
    assert (line["auth"], line["sender"], line["decision"]) == ("acme-smtp", "acme", "accept")
    client.close()


def test_auth_authen_that_is_no_sender_is_refused(gateways):
    gw = milter_gateway(gateways, senders={"acme": AUTH_SENDER})
    client = MilterClient(address(gw))
    client.open(auth_authen="someone-else")
    [answer] = client.message(FROM, ["alice@example.edu"], MESSAGE)
    assert reply_text(answer) == ("550 5.7.1 Authenticated user is not a registered sender; "
                                  "relaying denied")
    client.close()


def test_ipv6_and_ipv4_mapped_clients_are_identified(gateways):
    gw = milter_gateway(gateways)
    for ip in ("::1", "::ffff:127.0.0.1"):
        client = MilterClient(address(gw))
        client.open(ip=ip)
        assert isinstance(client.message(FROM, ["alice@example.edu"], MESSAGE)[-1], m.Continue)
        client.close()
    client = MilterClient(address(gw))
    client.open(ip="192.0.2.7")
    [answer] = client.message(FROM, ["alice@example.edu"], MESSAGE)
    assert reply_text(answer) == ("550 5.7.1 Client host [192.0.2.7] is not a registered "
                                  "sender; relaying denied")
    client.close()


def test_unknown_address_families_are_refused(gateways, logs):
    gw = milter_gateway(gateways)
    for packet in (connect_packet(b"L", "/run/smtp.sock"), connect_packet(b"U")):
        client = MilterClient(address(gw))
        client.ask(m.Negotiate(6, m.ActionFlags(0x1FF), m.ProtocolFlags(0x1FFFFF)))
        refused = "554 5.7.1 Client address family is not IPv4 or IPv6; relaying denied"
        assert reply_text(client.ask(packet)) == refused
        assert reply_text(client.ask(m.Helo("x"))) == refused
        assert reply_text(client.ask(m.EnvelopeFrom(b"<" + FROM.encode() + b">"))) == refused
        client.close()
    assert [e["family"] for e in logs.events("milter_connect_refused")] == ["L", "U"]
    assert logs.events("message") == []


def bad(gw, logs, packet: bytes, reason: str) -> None:
    client = MilterClient(address(gw))
    client.open()
    client.ask(m.EnvelopeFrom(f"<{FROM}>".encode()))
    client.send(packet)
    assert client.read() is None  # the gateway closes; Postfix then applies its default
    client.close()
    wait_for(lambda: logs.events("milter_session_ended"))
    [line] = logs.events("milter_session_ended")
    assert line["reason"] == reason and line["in_transaction"] is True
    logs.stream.truncate(0)
    logs.stream.seek(0)


def test_bad_packets_end_the_session_with_one_line_and_the_gateway_goes_on(gateways, logs):
    gw = milter_gateway(gateways)
    bad(gw, logs, raw(b"Z", b"junk"), "bad packet: unknown command 0x5a")
    bad(gw, logs, struct.pack("!L", 0), "bad packet: empty packet")
    bad(gw, logs, struct.pack("!L", 1 << 30) + b"B",
        "bad packet: packet of 1073741824 bytes (at most 262144)")
    bad(gw, logs, raw(b"L", b"Subject"), "bad packet: malformed packet for command 'L'")
    bad(gw, logs, raw(b"D", b"Mname-without-value\0"),
        "bad packet: macro packet with a name and no value")
    client = MilterClient(address(gw))
    client.open()
    assert isinstance(client.message(FROM, ["alice@example.edu"], MESSAGE)[-1], m.Continue)
    client.close()
    wait_for(lambda: gw.metric("gateway_sessions_active") == 0)


RATE = '[limits]\nsender_rate = "1/minute"\n'


def test_abort_mid_message_spends_nothing(gateways, logs):
    gw = milter_gateway(gateways, RATE)
    client = MilterClient(address(gw))
    client.open()
    client.ask(m.EnvelopeFrom(f"<{FROM}>".encode()))
    client.ask(m.EnvelopeRecipient(b"<alice@example.edu>"))
    client.ask(m.Header("Subject", b" Hello"))
    client.ask(m.EndOfHeaders())
    client.ask(m.Body(b"Hello\r\n"))
    client.send(m.Abort())
    # the same session goes on: this message takes the one message of budget
    assert isinstance(client.message(FROM, ["alice@example.edu"], MESSAGE)[-1], m.Continue)
    [aborted] = logs.events("milter_message_aborted")
    assert aborted["stage"] == "message"
    answers = client.message(FROM, ["alice@example.edu"], MESSAGE)
    assert reply_text(answers[-1]).startswith("451 4.7.1 Sending rate of sender acme is "
                                              "limited to 1/minute")
    assert [e["decision"] for e in logs.events("message")] == ["accept", "defer"]
    client.close()


def test_mta_closing_mid_transaction_is_one_line_and_releases_the_session(gateways, logs):
    gw = milter_gateway(gateways)
    client = MilterClient(address(gw))
    client.open()
    client.ask(m.EnvelopeFrom(f"<{FROM}>".encode()))
    client.ask(m.EnvelopeRecipient(b"<alice@example.edu>"))
    client.ask(m.Header("Subject", b" Hello"))
    wait_for(lambda: gw.metric("gateway_sessions_active") == 1)
    client.close()
    wait_for(lambda: logs.events("milter_session_ended"))
    [line] = logs.events("milter_session_ended")
    assert (line["reason"], line["in_transaction"]) == (
        "the MTA closed the connection mid-transaction", True)
    wait_for(lambda: gw.metric("gateway_sessions_active") == 0)
    assert logs.events("message") == []


def test_mta_closing_while_the_answer_is_held_cancels_it_and_spends_nothing(gateways, logs):
    clock = gateways.clock
    gw = milter_gateway(gateways, RATE)
    first = MilterClient(address(gw))
    first.open()
    assert isinstance(first.message(FROM, ["alice@example.edu"], MESSAGE)[-1], m.Continue)
    clock.advance(55)  # budget frees in 5 s: within max_hold (10 s), so the answer is held
    second = MilterClient(address(gw))
    second.open()
    head, _, body = MESSAGE.partition(b"\r\n\r\n")
    fields = [m.Header(n.decode(), v) for n, _, v in (f.partition(b":")
                                                       for f in head.split(b"\r\n"))]
    for packet in (m.EnvelopeFrom(f"<{FROM}>".encode()),
                   m.EnvelopeRecipient(b"<alice@example.edu>"), *fields, m.EndOfHeaders()):
        assert isinstance(second.ask(packet), m.Continue)
    second.send(m.EndOfMessage(body))
    wait_for(lambda: clock.sleeping == 1)
    second.close()  # Postfix gave up waiting
    wait_for(lambda: logs.events("milter_session_ended"))
    [line] = logs.events("milter_session_ended")
    assert (line["reason"], line["in_transaction"]) == (
        "the MTA closed the connection while the message was being decided", True)
    wait_for(lambda: clock.sleeping == 0)
    clock.advance(10)  # 65 s after the first: its budget is free again, and nothing else took it
    assert isinstance(first.message(FROM, ["alice@example.edu"], MESSAGE)[-1], m.Continue)
    assert [e["decision"] for e in logs.events("message")] == ["accept", "accept"]
    first.close()


def test_a_stalled_mta_is_timed_out(gateways, logs):
    gw = milter_gateway(gateways, "timeout = 0.3\n")
    client = MilterClient(address(gw))
    client.open()
    client.ask(m.EnvelopeFrom(f"<{FROM}>".encode()))
    assert client.read() is None  # closed by the gateway after 0.3 s without a packet
    [line] = logs.events("milter_session_ended")
    assert (line["reason"], line["in_transaction"]) == ("no packet from the MTA for 0.3 s", True)
    client.close()


@pytest.mark.parametrize("answers_each_chunk", [False, True])
def test_body_over_max_message_size_is_refused_552(gateways, logs, answers_each_chunk):
    gw = gateways.start('[server]\nlisten = []\nhostname = "gw.test"\nmax_message_size = 4096\n'
                        '[milter]\nlisten = ["inet:127.0.0.1:0"]\n')
    client = MilterClient(address(gw))
    # an MTA that offers no "no reply" flags gets the refusal at the chunk that passes the
    # limit; otherwise it comes at the end of the message
    client.open(protocol=m.ProtocolFlags(0x1FFFFF & ~0xC0080) if answers_each_chunk
                else m.ProtocolFlags(0x1FFFFF))
    assert bool(client.no_reply) is not answers_each_chunk
    answers = client.message(FROM, ["alice@example.edu"], MESSAGE + b"x" * 5000, chunk=1000)
    assert reply_text(answers[-1]) == "552 5.3.4 Error: Too much mail data"
    assert logs.events("milter_message_too_big")[0]["limit"] == 4096
    assert logs.events("message") == []
    client.close()


def test_unix_socket_with_its_mode(gateways, tmp_path):
    path = tmp_path / "milter.sock"
    gw = milter_gateway(gateways, 'socket_mode = "0600"\n', listen=f"unix:{path}")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    client = MilterClient(str(path))
    client.open()
    assert isinstance(client.message(FROM, ["alice@example.edu"], MESSAGE)[-1], m.Continue)
    client.close()
    gw.stop()
    gateways.running.remove(gw)
    assert not path.exists()


def test_edits_for_forged_results_come_before_the_insertions(gateways):
    gw = milter_gateway(gateways)
    client = MilterClient(address(gw))
    client.open()
    raw_message = MESSAGE.replace(b"Subject: Hello\r\n", b"Authentication-Results: gw.test; x\r\n"
                                  b"Subject: Hello\r\nAuthentication-Results: other; y\r\n"
                                  b"Authentication-Results: GW.TEST; z\r\n")
    answers = client.message(FROM, ["alice@example.edu"], raw_message)
    assert answers[:-1] == [m.ChangeHeader(3, "Authentication-Results", b""),
                            m.ChangeHeader(1, "Authentication-Results", b"")]
    assert isinstance(answers[-1], m.Continue)
    client.close()


def test_both_fronts_in_one_process_share_state_and_metrics(gateways, logs):
    gw = gateways.start('[server]\nlisten = ["127.0.0.1:0"]\nhostname = "gw.test"\n'
                        '[milter]\nlisten = ["inet:127.0.0.1:0"]\n'
                        '[limits]\nsender_rate = "2/minute"\n')
    with gw.smtp() as smtp:
        assert smtp.sendmail(FROM, ["alice@example.edu"], MESSAGE) == {}
    client = MilterClient(address(gw))
    client.open()
    assert isinstance(client.message(FROM, ["alice@example.edu"], MESSAGE)[-1], m.Continue)
    # one budget for the sender across both fronts: the third message is deferred by either
    answers = client.message(FROM, ["alice@example.edu"], MESSAGE)
    assert reply_text(answers[-1]).startswith("451 4.7.1 Sending rate of sender acme is "
                                              "limited to 2/minute")
    client.close()
    assert gw.metric("gateway_messages_total", sender="acme", decision="accept",
                     reason="relayed") == 2
    assert [e["decision"] for e in logs.events("message")] == ["accept", "accept", "defer"]


def test_gateway_serve_runs_a_milter_only_gateway(tmp_path):
    import json
    import subprocess
    from pathlib import Path

    from tests.conftest import free_port, serve_process

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "senders").mkdir()
    (tmp_path / "senders" / "acme.toml").write_text(EXAMPLE_SENDER)
    milter, admin = free_port(), free_port()
    (tmp_path / "gateway.toml").write_text(
        f'[server]\nlisten = []\nhostname = "gw.test"\n'
        f'[milter]\nlisten = ["inet:127.0.0.1:{milter}"]\n'
        f'[admin]\nlisten = "127.0.0.1:{admin}"\n[senders]\ndir = "senders"\n'
        '[checks.sender_auth]\nmode = "off"\n')
    proc = serve_process(tmp_path / "gateway.toml", admin, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    try:
        client = MilterClient(("127.0.0.1", milter))
        client.open()
        assert isinstance(client.message(FROM, ["alice@example.edu"], MESSAGE)[-1], m.Continue)
        client.close()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    lines = [json.loads(line) for line in out.splitlines()]
    [started] = [line for line in lines if line["event"] == "started"]
    assert (started["smtp"], started["milter"], started["upstream"]) == (
        [], [f"inet:127.0.0.1:{milter}"], None)
    assert [line["decision"] for line in lines if line["event"] == "message"] == ["accept"]
    assert not (tmp_path / "var" / "maildir").exists()  # no upstream opened
    assert lines[-1]["event"] == "stopped"


def test_sessions_per_ip_is_shared_with_the_smtp_front(gateways):
    gw = gateways.start('[server]\nlisten = ["127.0.0.1:0"]\nhostname = "gw.test"\n'
                        '[milter]\nlisten = ["inet:127.0.0.1:0"]\n'
                        '[limits]\nsessions_per_ip = 1\n')
    smtp = gw.smtp()  # one SMTP session from 127.0.0.1
    client = MilterClient(address(gw))
    client.ask(m.Negotiate(6, m.ActionFlags(0x1FF), m.ProtocolFlags(0x1FFFFF)))
    assert reply_text(client.ask(connect_packet(b"4", "127.0.0.1"))) == (
        "421 4.7.0 Too many sessions from [127.0.0.1] (at most 1); try again later")
    client.close()
    smtp.quit()
    wait_for(lambda: gw.metric("gateway_sessions_active") == 0)
    client = MilterClient(address(gw))
    client.open()  # counted again from zero
    client.close()
    assert gw.metric("gateway_sessions_refused_total", cap="ip") == 1
