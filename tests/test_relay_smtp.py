"""The accept path end to end: client -> gateway -> aiosmtpd upstream, before-queue."""

from __future__ import annotations

import smtplib

from tests.conftest import MESSAGE, send


def test_accepted_message_arrives_upstream_and_reply_is_upstreams(gateways, sink, logs):
    gw = gateways.start(upstream=sink.url)
    client, (code, text) = send(gw, rcpts=("alice@example.edu", "bob@dept.example.edu"))
    client.quit()
    assert code == 250
    assert text == b"2.0.0 Ok: queued as SINK1"
    [msg] = sink.messages
    assert msg.mail_from == "bounce-1@em.acme.example"
    assert msg.rcpt_tos == ["alice@example.edu", "bob@dept.example.edu"]
    head, _, body = msg.content.partition(b"\r\n\r\n")
    assert head.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby gw.test "
                           b"(ecomm-gateway) with ESMTP id ")
    assert body == b"Hello, world.\r\n"
    [line] = logs.events("message")
    assert line["decision"] == "accept" and line["sender"] == "acme"
    assert line["message_id"] == "<m1@em.acme.example>"
    assert "alice@example.edu" not in logs.text()
    assert gw.metric("gateway_messages_total", sender="acme", decision="accept",
                     reason="relayed") == 1
