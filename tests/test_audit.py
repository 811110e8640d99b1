"""The audit trail: every administrative action writes one JSON event to [logging] audit_file
with its actor (the OS user for the CLI, a named token for the API) and what changed, and the
running gateway counts them in gateway_admin_actions_total{action}."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from gateway.policy.quarantine import Item, Quarantine
from tests.conftest import MESSAGE

ROOT = Path(__file__).resolve().parent.parent
ME = f"os:{pwd.getpwuid(os.getuid()).pw_name}"


def cli(conf: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "--config", str(conf), *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def events(conf: Path) -> list[dict]:
    path = conf.parent / "var" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sender_add_and_remove_are_audited_and_counted(gateways):
    conf = gateways.write()
    add = cli(conf, "senders", "add", "--id", "events", "--organization", "Events Co",
              "--contact", "ops@events.example", "--network", "198.51.100.0/24",
              "--domain", "mail.events.example", "--return-path", "rp-*@mail.events.example",
              "--expires", "2027-06-30", env={"SUDO_USER": "alice"})
    assert add.returncode == 0, add.stderr
    remove = cli(conf, "senders", "remove", "events")
    assert remove.returncode == 0, remove.stderr
    first, second = events(conf)
    assert first["event"] == "audit" and first["action"] == "sender_add"
    assert (first["actor"], first["sudo_user"]) == (ME, "alice")
    assert first["sender"] == "events" and first["file"].endswith("senders/events.toml")
    assert first["networks"] == ["198.51.100.0/24"] and first["expires"] == "2027-06-30"
    assert (second["action"], second["actor"], second["sender"]) == ("sender_remove", ME, "events")
    assert "sudo_user" not in second
    gw = gateways.start()
    gw.call(gw.gateway.monitor.tick())
    assert gw.metric("gateway_admin_actions_total", action="sender_add") == 1
    assert gw.metric("gateway_admin_actions_total", action="sender_remove") == 1
    assert gw.metric("gateway_admin_actions_total", action="throttle_set") == 0


def test_quarantine_release_and_delete_are_audited(gateways):
    conf = gateways.write()
    quarantine = Quarantine(conf.parent / "var" / "quarantine")
    for n in range(2):
        item = Item(id=f"Q{n}", stored_at="2026-11-02T15:00:00+00:00",
                    mail_from="bounce-1@em.acme.example", recipients=["alice@example.edu"],
                    sender="acme", client_ip="127.0.0.1", helo="c", reason="sender_auth",
                    detail="SPF and DKIM failed")
        quarantine._store(item, MESSAGE)
    assert cli(conf, "quarantine", "delete", "Q0").returncode == 0
    released = cli(conf, "quarantine", "release", "Q1")
    assert released.returncode == 0, released.stderr
    assert cli(conf, "quarantine", "delete", "NOPE").returncode == 1  # nothing done: no event
    deleted, release = events(conf)
    assert (deleted["action"], deleted["actor"], deleted["id"]) == ("quarantine_delete", ME, "Q0")
    assert (deleted["sender"], deleted["reason"]) == ("acme", "sender_auth")
    assert (release["action"], release["id"], release["reply"][:3]) == (
        "quarantine_release", "Q1", "250")
    assert "alice@example.edu" not in json.dumps([deleted, release])  # recipients never in clear


def test_flags_import_and_replace_are_audited(gateways, tmp_path):
    conf = gateways.write('[state]\nurl = "sqlite:state.sqlite3"\n')
    csv = tmp_path / "ferpa.csv"
    csv.write_text("alice@example.edu\nbob@example.edu\n")
    assert cli(conf, "flags", "import", "--flag", "ferpa", str(csv)).returncode == 0
    csv.write_text("alice@example.edu\n")
    replaced = cli(conf, "flags", "import", "--flag", "ferpa", "--replace", "--force", str(csv))
    assert replaced.returncode == 0, replaced.stderr
    imported, replace = events(conf)
    assert imported["action"] == "flags_import" and imported["actor"] == ME
    assert (imported["set"], imported["added"], imported["rows"]) == ("ferpa", 2, 2)
    assert (replace["action"], replace["set"], replace["size"], replace["was"]) == (
        "flags_replace", "ferpa", 1, 2)
    assert "example.edu" not in json.dumps([imported, replace])  # no address, not even hashed


def api(gw, method: str, path: str, token: str, body: dict | None = None, headers=None):
    request = urllib.request.Request(
        gw.admin_url + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                 **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_api_actions_name_the_token(gateways, logs):
    base = gateways.tmp_path / "gw"
    (base / "tokens").mkdir(parents=True)
    (base / "tokens" / "alice.token").write_text("alice-secret-token-0123456789\n")
    (base / "tokens" / "ci-bot.token").write_text("ci-bot-secret-token-0123456789\n")
    gw = gateways.start('[admin]\nlisten = "127.0.0.1:0"\ntoken_dir = "tokens"\n')
    assert api(gw, "PUT", "/api/throttles/acme", "alice-secret-token-0123456789",
               {"rate": "10/minute", "for": "2h"}, {"X-Gateway-OS-User": "alice"})[0] == 200
    assert api(gw, "DELETE", "/api/throttles/acme", "ci-bot-secret-token-0123456789")[0] == 200
    assert api(gw, "PUT", "/api/throttles/global", gw.gateway.admin_token,
               {"rate": "100/minute"})[0] == 200
    assert api(gw, "DELETE", "/api/throttles/acme", "wrong")[0] == 401  # no event
    audit = events(base / "gateway.toml")
    assert [(e["action"], e["actor"]) for e in audit] == [
        ("throttle_set", "token:alice"), ("throttle_clear", "token:ci-bot"),
        ("throttle_set", "token:admin")]
    assert audit[0]["os_user"] == "alice" and audit[0]["target"] == "acme"
    assert (audit[0]["rate"], audit[0]["seconds"]) == ("10/minute", 7200.0)
    assert (audit[1]["target"], audit[1]["cleared"]) == ("acme", True)
    logged = logs.events("audit")  # the gateway's own log has them too
    assert [e["actor"] for e in logged] == ["token:alice", "token:ci-bot", "token:admin"]
    gw.call(gw.gateway.monitor.tick())
    assert gw.metric("gateway_admin_actions_total", action="throttle_set") == 2
    assert gw.metric("gateway_admin_actions_total", action="throttle_clear") == 1


def test_cli_throttle_says_which_os_user(gateways):
    gw = gateways.start()
    conf = gateways.tmp_path / "gw" / "gateway.toml"
    # the CLI reaches the gateway at its [admin] listen: point it at the running one
    host, port = gw.gateway.admin_address
    conf.write_text(conf.read_text().replace('listen = "127.0.0.1:0"',
                                             f'listen = "{host}:{port}"', 1))
    done = cli(conf, "throttle", "set", "acme", "5/minute")
    assert done.returncode == 0, done.stderr
    (event,) = events(conf)
    assert (event["action"], event["actor"], event["os_user"]) == (
        "throttle_set", "token:admin", ME.removeprefix("os:"))


def test_audit_counter_counts_each_line_once_when_read_from_several_threads(tmp_path):
    """The monitor reads the trail in a worker thread; two rounds at once (its own and
    another caller's) must not count the same lines twice."""
    import threading

    from gateway.ops.audit import AuditCounter

    path = tmp_path / "audit.jsonl"
    line = json.dumps({"event": "audit", "action": "sender_add", "sender": "x" * 200}) + "\n"
    path.write_text(line * 50_000)
    counter = AuditCounter(path)
    totals, start = [], threading.Barrier(4)

    def read() -> None:
        start.wait()
        totals.append(counter.read_new()["sender_add"])

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(totals) == 50_000 and sorted(totals)[-1] == 50_000
    path.write_text(line * 50_000 + line)  # (appended: only the new line is counted)
    assert counter.read_new()["sender_add"] == 1
