"""`gateway explain`: the real pipeline on a message without relaying it. Every message of the
test corpus gets the decision and reply the SMTP front gives it (tests/test_content_corpus.py);
the command, as a real process, prints every check, exits 0/1/2, decides business hours at
--at, and spends no rate budget and writes no audience."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.infra.config import load_config
from gateway.ops.explain import explain, read_message
from gateway.policy.senders import load_registry
from tests.conftest import EXAMPLE_SENDER, MESSAGE, send
from tests.test_content_corpus import CORPUS, EXPECTED, SENDERS

ROOT = Path(__file__).resolve().parent.parent


def explain_cmd(conf: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "explain", *args, "--config",
                           str(conf)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_every_corpus_message_is_explained_as_the_gateway_decides_it(gateways):
    config = load_config(gateways.write(senders=SENDERS))
    registry = load_registry(config.path(config.senders.dir), config.checks)

    async def run_all():
        out = {}
        for name, (mail_from, *_rest) in sorted(EXPECTED.items()):
            out[name] = await explain(config, registry, message=read_message(CORPUS / name),
                                      client_ip="127.0.0.1", mail_from=mail_from,
                                      recipients=["alice@example.edu"], helo="client.test")
        return out

    results = asyncio.run(run_all())
    for name, (_, code, enhanced, text, check, reason) in EXPECTED.items():
        got = results[name]
        if code == 250:
            assert got.decision == "relay", (name, got.reply)
            assert all(c["verdict"] in ("accept", "skipped", "inactive") for c in got.checks)
        else:
            assert (got.decision, got.reply) == ("reject", f"{code} {enhanced} {text}"), name
            [deciding] = [c for c in got.checks if c["verdict"] == "reject"]
            assert (deciding["check"], deciding["reason"]) == (check, reason), name
            assert deciding["reply"] == got.reply
    stages = [c["stage"] for c in results["newsletter-plain-text.eml"].checks]
    assert stages == sorted(stages, key=["mail", "rcpt", "data"].index)  # in pipeline order


def test_explain_command_output_and_exit_codes(gateways, tmp_path):
    conf = gateways.write()
    eml = tmp_path / "m.eml"
    eml.write_bytes(MESSAGE.replace(b"\r\n", b"\n"))  # as saved by a mail client
    ok = explain_cmd(conf, str(eml), "--client-ip", "127.0.0.1", "--mail-from",
                     "bounce-1@em.acme.example", "--rcpt", "alice@example.edu", "--rcpt",
                     "bob@gmail.com")
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0].split() == ["STAGE", "CHECK", "MODE", "VERDICT", "MS", "REASON"]
    assert lines[1].split()[:4] == ["mail", "identity", "enforce", "accept"]
    assert any(line.split()[:4] == ["data", "sender_auth", "off", "skipped"] for line in lines)
    assert lines[-4:] == [
        "recipient alice@example.edu: passes policy (campus mail decides)",
        "recipient bob@gmail.com: refused (relay_denied): 550 5.7.1 Relaying denied: gmail.com "
        "is not a university domain",
        "decision: relay",
        "reply: campus mail's reply to the message, relayed to 1 recipient(s)"]
    refused = explain_cmd(conf, str(eml), "--client-ip", "192.0.2.9", "--mail-from",
                          "bounce-1@em.acme.example", "--rcpt", "alice@example.edu", "--json")
    assert refused.returncode == 1
    result = json.loads(refused.stdout)
    assert (result["decision"], result["reply"]) == (
        "reject", "550 5.7.1 Client host [192.0.2.9] is not a registered sender; relaying denied")
    assert result["checks"][0]["check"] == "identity"
    assert result["checks"][0]["verdict"] == "reject"
    for bad in (["--client-ip", "not-an-ip"], ["--at", "yesterday"]):
        args = ["--client-ip", "127.0.0.1", "--mail-from", "bounce-1@em.acme.example",
                "--rcpt", "alice@example.edu", *bad]
        proc = explain_cmd(conf, str(eml), *args)
        assert proc.returncode == 2 and proc.stderr.startswith("error: --")
    missing = explain_cmd(conf, str(tmp_path / "nope.eml"), "--client-ip", "127.0.0.1",
                          "--mail-from", "x@y.example", "--rcpt", "alice@example.edu")
    assert missing.returncode == 2 and "No such file or directory" in missing.stderr


def test_explain_decides_at_the_time_given_and_spends_nothing(gateways, sink, tmp_path):
    state = '[state]\nurl = "sqlite:state.sqlite3"\n'
    senders = {"acme": EXAMPLE_SENDER + 'rate = "1/minute"\n'}
    conf = gateways.write(state, senders=senders)
    eml = tmp_path / "large.eml"
    eml.write_bytes(MESSAGE.replace(b"Subject: Hello\r\n",
                                    b"Subject: Hello\r\nX-Audience-Size: 20000\r\n"))
    base = ["--client-ip", "127.0.0.1", "--mail-from", "bounce-1@em.acme.example", "--rcpt",
            "alice@example.edu", "--json"]
    # Monday 2026-11-02 09:00 in Denver: business hours, a large audience waits
    busy = explain_cmd(conf, str(eml), *base, "--at", "2026-11-02T09:00:00-07:00")
    assert busy.returncode == 1
    result = json.loads(busy.stdout)
    assert result["decision"] == "defer" and result["reply"].startswith("451 4.7.1 Campaign ")
    after = explain_cmd(conf, str(eml), *base, "--at", "2026-11-02T18:30:00-07:00")
    assert after.returncode == 0, after.stdout
    plain = tmp_path / "plain.eml"
    plain.write_bytes(MESSAGE)
    at = ["--at", "2026-11-02T15:00:05Z"]  # the gateway's (fake) clock: 15:00:00 UTC
    for _ in range(3):  # a rate of 1/minute, explained three times: nothing spent
        assert explain_cmd(conf, str(plain), *base, *at).returncode == 0
    with sqlite3.connect(conf.parent / "state.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM window_events").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM distinct_members").fetchone() == (0,)
    gw = gateways.start(state, senders=senders, upstream=sink.url)
    client, reply = send(gw)  # the real one spends the minute's budget
    client.quit()
    assert reply[0] == 250
    spent = explain_cmd(conf, str(plain), *base, *at)
    assert spent.returncode == 1
    assert json.loads(spent.stdout)["reply"] == (
        "451 4.7.1 Sending rate of sender acme is limited to 1/minute; retry in 55 s")
