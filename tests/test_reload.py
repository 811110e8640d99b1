"""Reload (gateway.ops.reload) through the admin API of a gateway listening on loopback: a valid
change applies to new transactions while a transaction in progress finishes under the registry
it began with, no session is dropped; an invalid change is refused whole (file, key, reason;
log event; metric) and the running configuration stays; keys that cannot change live are named
as needing a restart."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tests.conftest import EXAMPLE_SENDER, MESSAGE, send

PROMO_REFUSED = ("550 5.7.1 Message class promotional (no X-Message-Class header) is not "
                 "permitted for sender acme (registered classes: transactional)")


def reload(gw, actor: str | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {gw.gateway.admin_token}"}
    if actor:
        headers["X-Gateway-Actor"] = f"cli:{actor}"
        headers["X-Gateway-OS-User"] = actor
    request = urllib.request.Request(gw.admin_url + "/api/reload", method="POST",
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def sender_file(gateways, name: str = "acme"):
    return gateways.tmp_path / "gw" / "senders" / f"{name}.toml"


def reply(pair) -> str:
    code, text = pair
    return f"{code} {text.decode()}"


def test_a_transaction_in_progress_finishes_under_the_registry_it_began_with(gateways, sink,
                                                                             logs):
    gw = gateways.start(upstream=sink.url)
    before = gw.smtp()  # a session open across the reload
    assert before.mail("bounce-1@em.acme.example")[0] == 250
    assert before.rcpt("alice@example.edu")[0] == 250
    # acme may now send transactional mail only: MESSAGE (promotional) is refused from now on
    sender_file(gateways).write_text(EXAMPLE_SENDER + 'classes = ["transactional"]\n')
    status, result = reload(gw, actor="alice")
    assert status == 200
    assert result == {"applied": True, "generation": 1, "changed": [], "restart_needed": [],
                      "senders": {"added": [], "removed": [], "changed": ["acme"]}}
    # the transaction begun before the reload: decided under the old registry, relayed
    code, text = before.data(MESSAGE)
    assert code == 250 and text.startswith(b"2.0.0 ")
    assert len(sink.messages) == 1 and sink.messages[0].rcpt_tos == ["alice@example.edu"]
    # the same session (not dropped), its next transaction: the new registry
    assert before.mail("bounce-2@em.acme.example")[0] == 250
    assert before.rcpt("bob@example.edu")[0] == 250
    assert reply(before.data(MESSAGE)) == PROMO_REFUSED
    before.quit()
    # a session opened after the reload
    after = gw.smtp()
    after.mail("bounce-3@em.acme.example")
    after.rcpt("carol@example.edu")
    assert reply(after.data(MESSAGE)) == PROMO_REFUSED
    after.quit()
    assert len(sink.messages) == 1
    [event] = logs.events("reload")
    assert (event["actor"], event["result"], event["generation"], event["senders"]["changed"],
            event["level"]) == ("api:cli:alice", "applied", 1, ["acme"], "warning")
    assert gw.metric("gateway_config_reloads_total", result="applied") == 1
    assert gw.metric("gateway_config_generation") == 1
    # an administrative action: one event in the audit trail, with its actor (the token)
    trail = gw.gateway.audit_file.read_text().splitlines()
    [audited] = [json.loads(line) for line in trail if json.loads(line)["action"] == "reload"]
    assert (audited["actor"], audited["os_user"], audited["applied"], audited["generation"],
            audited["senders"]["changed"]) == ("token:admin", "alice", True, 1, ["acme"])


def test_senders_added_and_removed_apply_to_new_transactions(gateways, sink):
    gw = gateways.start(upstream=sink.url)
    events = EXAMPLE_SENDER.replace('"acme"', '"events"').replace("acme", "events")
    sender_file(gateways, "events").write_text(events)
    sender_file(gateways).unlink()
    status, result = reload(gw)
    assert status == 200
    assert result["senders"] == {"added": ["events"], "removed": ["acme"], "changed": []}
    client = gw.smtp()
    assert client.mail("bounce-1@em.acme.example") == (
        550, b"5.7.1 Return-path <bounce-1@em.acme.example> does not carry a registered "
             b"sender identifier; expected bounce-*@em.events.example")
    client.rset()
    assert client.mail("bounce-1@em.events.example")[0] == 250
    client.quit()


def test_an_invalid_change_is_refused_whole_and_the_running_configuration_stays(gateways, sink,
                                                                                 logs):
    gw = gateways.start(upstream=sink.url)
    conf = gateways.tmp_path / "gw" / "gateway.toml"
    good = conf.read_text()
    # a valid sender change together with an invalid gateway.toml: neither applies
    sender_file(gateways).write_text(EXAMPLE_SENDER + 'classes = ["transactional"]\n')
    conf.write_text(good + '\n[limits]\nmax_hold = 900.0\n')
    status, result = reload(gw)
    assert status == 422
    assert result["applied"] is False and result["generation"] == 0
    assert result["error"] == {
        "file": str(conf), "key": "limits.max_hold",
        "reason": "must be between 0 and 300 seconds (well inside the RFC 5321 10-minute DATA "
                  "timeout)",
        "message": f"{conf}: limits.max_hold: must be between 0 and 300 seconds (well inside "
                   "the RFC 5321 10-minute DATA timeout)"}
    # an invalid sender file, the configuration fixed
    conf.write_text(good)
    bad = sender_file(gateways, "broken")
    bad.write_text(EXAMPLE_SENDER.replace('"acme"', '"broken"').replace(
        '"127.0.0.1/32"', '"127.0.0.1/8"'))
    status, result = reload(gw)
    assert status == 422
    assert (result["error"]["file"], result["error"]["key"]) == (str(bad), "networks[0]")
    assert result["error"]["reason"].startswith("bad CIDR: 127.0.0.1/8 has host bits set")
    # the running registry is the one from the start: promotional mail still relays
    client = gw.smtp()
    client.sendmail("bounce-1@em.acme.example", ["alice@example.edu"], MESSAGE)
    client.quit()
    assert len(sink.messages) == 1
    refused = logs.events("reload")
    assert [(e["result"], e["key"], e["level"]) for e in refused] == [
        ("refused", "limits.max_hold", "error"), ("refused", "networks[0]", "error")]
    assert refused[1]["file"] == str(bad) and refused[0]["actor"] == "api"
    assert gw.metric("gateway_config_reloads_total", result="refused") == 2
    assert gw.metric("gateway_config_reloads_total", result="applied") == 0


def test_keys_that_cannot_change_live_are_reported_and_keep_their_running_values(gateways,
                                                                                 sink):
    gw = gateways.start(upstream=sink.url)
    conf = gateways.tmp_path / "gw" / "gateway.toml"
    text = conf.read_text()
    assert 'listen = ["127.0.0.1:0"]' in text
    conf.write_text(text.replace('listen = ["127.0.0.1:0"]', 'listen = ["127.0.0.1:2526"]')
                    .replace(f'url = "{sink.url}"', 'url = "smtp://192.0.2.1:25"')
                    + '\n[limits]\nmax_hold = 2.0\n[logging]\nlevel = "warning"\n')
    status, result = reload(gw)
    assert status == 200
    assert result["changed"] == ["limits.max_hold"]
    assert result["restart_needed"] == ["server.listen", "upstream.url", "logging.level"]
    config = gw.gateway.config
    assert config.limits.max_hold == 2.0
    assert config.server.listen == ("127.0.0.1:0",) and config.upstream.url == sink.url
    client = gw.smtp()  # still relaying to the running upstream
    client.sendmail("bounce-1@em.acme.example", ["alice@example.edu"], MESSAGE)
    client.quit()
    assert len(sink.messages) == 1


def test_reload_needs_the_token(gateways):
    gw = gateways.start()
    request = urllib.request.Request(gw.admin_url + "/api/reload", method="POST")
    try:
        urllib.request.urlopen(request, timeout=10)
        raise AssertionError("no 401")
    except urllib.error.HTTPError as err:
        assert err.code == 401
    assert gw.metric("gateway_config_reloads_total", result="applied") == 0


def test_checks_keep_their_run_time_state_across_a_reload(gateways, sink):
    """The large-audience campaigns seen (status page, gauge) and the SPF memo survive a reload;
    each half of a two-stage control takes over its own half."""
    gw = gateways.start(upstream=sink.url)
    large = MESSAGE.replace(b"Subject: Hello\r\n", b"Subject: Hello\r\nX-Campaign-ID: gala\r\n"
                            b"X-Audience-Size: 20000\r\n")
    client, reply = send(gw, message=large)  # business hours on the tests' clock: deferred
    client.quit()
    assert reply[0] == 451

    def checks():
        return {type(c): c for stage in gw.gateway.pipeline.by_stage.values() for c in stage}

    before = checks()
    status, _ = reload(gw)
    assert status == 200
    after = checks()
    assert set(before) == set(after) and all(after[t] is not before[t] for t in before)
    [audience] = [c for t, c in after.items() if t.__name__ == "LargeAudience"]
    assert audience.largest.active("acme") == [("X-Campaign-ID gala", 20000)]
    [spf] = [c for t, c in after.items() if t.__name__ == "SenderAuth"]
    assert spf._spf_memo is before[type(spf)]._spf_memo
