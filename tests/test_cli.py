"""The administrators' command line, run as a real process: check-config, senders, and
`gateway serve` end to end with swaks and smtplib."""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import subprocess
import sys
import time
from dataclasses import dataclass
import urllib.request
from pathlib import Path

import pytest

from gateway.policy.passwords import verify_password
from tests.conftest import EXAMPLE_SENDER, MESSAGE, free_port, serve_process

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = [sys.executable, "-m", "gateway"]


def run(*args, cwd=None, check=False, env=None):
    environ = {k: v for k, v in os.environ.items() if k != "GATEWAY_CONFIG"}
    proc = subprocess.run([*GATEWAY, *args], capture_output=True, text=True, cwd=cwd, timeout=60,
                          env={**environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def confdir(tmp_path):
    (tmp_path / "senders").mkdir()
    (tmp_path / "senders" / "acme.toml").write_text(EXAMPLE_SENDER)
    smtp, admin = free_port(), free_port()
    (tmp_path / "gateway.toml").write_text(f"""
[server]
listen = ["127.0.0.1:{smtp}"]
hostname = "gw.test"
[admin]
listen = "127.0.0.1:{admin}"
[senders]
dir = "senders"
[checks.sender_auth]
mode = "off"  # SPF/DKIM need DNS; tests/test_auth*.py cover them
""")
    return ConfDir(tmp_path, smtp, admin)


@dataclass
class ConfDir:
    """The configuration directory and the ports its gateway.toml names."""

    path: Path
    smtp_port: int
    admin_port: int

    def __truediv__(self, other: str) -> Path:
        return self.path / other


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "gateway"
    assert script.exists(), "pip install -e . provides the `gateway` console script"


def test_check_config_ok_and_error(confdir):
    ok = run("check-config", "--config", str(confdir / "gateway.toml"))
    assert ok.returncode == 0
    assert ok.stdout.strip() == f"{confdir / 'gateway.toml'}: OK (1 registered sender(s) in {confdir / 'senders'})"
    (confdir / "bad.toml").write_text("[server]\nmax_recipients = -1\n")
    bad = run("check-config", "--config", str(confdir / "bad.toml"))
    assert bad.returncode == 2
    assert bad.stderr == f"error: {confdir / 'bad.toml'}: server.max_recipients: must be at least 1\n"


def test_senders_list_show_check(confdir):
    cfg = str(confdir / "gateway.toml")
    listing = run("senders", "list", "--config", cfg, check=True).stdout.splitlines()
    assert listing[0].split() == ["ID", "ORGANIZATION", "EXPIRES", "AUTH", "NETWORKS"]
    assert listing[1].startswith("acme ") and "2027-06-30" in listing[1]
    shown = json.loads(run("senders", "show", "acme", "--config", cfg, check=True).stdout)
    assert shown["return_path"] == ["bounce-*@em.acme.example"] and shown["auth"] is None
    assert run("senders", "show", "nobody", "--config", cfg).returncode == 1
    assert run("senders", "check", "--config", cfg).stdout == f"1 sender(s) in {confdir / 'senders'}: OK\n"
    (confdir / "senders" / "broken.toml").write_text(EXAMPLE_SENDER.replace('"acme"', '"other"'))
    broken = run("senders", "check", "--config", cfg)
    assert broken.returncode == 2
    assert "return_path: 'bounce-*@em.acme.example' can match the same address" in broken.stderr


def test_senders_add_prints_credentials_once_and_remove(confdir):
    cfg = str(confdir / "gateway.toml")
    added = run("senders", "add", "--config", cfg, "--id", "events", "--organization",
                "Events Co", "--contact", "ops@events.example", "--network", "198.51.100.0/24",
                "--network", "2001:db8:1::/48", "--domain", "mail.events.example",
                "--return-path", "rp-*@mail.events.example", "--expires", "2027-03-01",
                "--auth-username", "events-smtp", check=True)
    lines = added.stdout.splitlines()
    assert lines[0] == (f"added sender events ({confdir / 'senders' / 'events.toml'}); no "
                        "running gateway answered; it applies at the next start or reload")
    assert lines[1] == "SMTP AUTH username: events-smtp"
    password = lines[2].removeprefix("SMTP AUTH password: ")
    text = (confdir / "senders" / "events.toml").read_text()
    assert password not in text
    import tomllib

    data = tomllib.loads(text)
    assert verify_password(password, data["auth"]["password_hash"])
    assert data["networks"] == ["198.51.100.0/24", "2001:db8:1::/48"]
    assert run("senders", "check", "--config", cfg).returncode == 0
    again = run("senders", "add", "--config", cfg, "--id", "events", "--organization", "x",
                "--contact", "x", "--network", "10.0.0.0/8", "--domain", "x.example",
                "--return-path", "a@x.example", "--expires", "2027-01-01")
    assert again.returncode == 1 and "already exists" in again.stderr
    removed = run("senders", "remove", "events", "--config", cfg, check=True)
    assert removed.stdout.startswith("removed sender events")
    assert not (confdir / "senders" / "events.toml").exists()


def test_senders_add_refuses_invalid_and_writes_nothing(confdir):
    cfg = str(confdir / "gateway.toml")
    bad = run("senders", "add", "--config", cfg, "--id", "clash", "--organization", "C",
              "--contact", "c@c.example", "--network", "192.0.2.0/24", "--domain",
              "em.acme.example", "--return-path", "*@em.acme.example", "--expires", "2027-01-01")
    assert bad.returncode == 2
    assert "can match the same address" in bad.stderr
    assert sorted(p.name for p in (confdir / "senders").iterdir()) == ["acme.toml"]
    cidr = run("senders", "add", "--config", cfg, "--id", "c2", "--organization", "C",
               "--contact", "c@c.example", "--network", "192.0.2.1/24", "--domain",
               "c.example", "--return-path", "x-*@c.example", "--expires", "2027-01-01")
    assert cidr.returncode == 2 and "networks[0]: bad CIDR" in cidr.stderr


@pytest.fixture
def served(confdir):
    proc = serve_process(confdir / "gateway.toml", confdir.admin_port, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    yield confdir, proc
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)


def test_serve_end_to_end_with_smtplib_maildir_log_and_metrics(served):
    confdir, proc = served
    with smtplib.SMTP("127.0.0.1", confdir.smtp_port, timeout=30) as client:
        refused = client.sendmail("bounce-5@em.acme.example", ["alice@example.edu"], MESSAGE)
    assert refused == {}
    [delivered] = list((confdir / "var" / "maildir" / "new").iterdir())
    assert b"Subject: Hello" in delivered.read_bytes()
    assert (confdir / "var" / "state.sqlite3").exists()
    with urllib.request.urlopen(f"http://127.0.0.1:{confdir.admin_port}/metrics") as r:
        metrics = r.read().decode()
    assert 'gateway_messages_total{decision="accept",reason="relayed",sender="acme"} 1.0' in metrics
    with urllib.request.urlopen(f"http://127.0.0.1:{confdir.admin_port}/healthz") as r:
        assert json.loads(r.read()) == {"status": "ok"}
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    lines = [json.loads(line) for line in out.splitlines()]
    [decision] = [line for line in lines if line["event"] == "message"]
    assert decision["decision"] == "accept" and decision["sender"] == "acme"
    assert decision["recipients"] != ["alice@example.edu"] and len(decision["recipients"][0]) == 20
    assert lines[-1]["event"] == "stopped"


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (.ci/run installs it)")
def test_serve_with_swaks(served):
    confdir, _ = served
    ok = subprocess.run(["swaks", "--server", f"127.0.0.1:{confdir.smtp_port}",
                         "--from", "bounce-6@em.acme.example", "--to", "bob@example.edu",
                         "--h-Subject", "swaks test",
                         "--h-List-Unsubscribe", "<mailto:unsub-6@em.acme.example>"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout
    assert "<-  250 2.0.0 Ok: delivered as " in ok.stdout
    denied = subprocess.run(["swaks", "--server", f"127.0.0.1:{confdir.smtp_port}",
                             "--from", "bounce-6@em.acme.example", "--to", "someone@gmail.com"],
                            capture_output=True, text=True, timeout=60)
    assert denied.returncode != 0
    assert "<** 550 5.7.1 Relaying denied: gmail.com is not a university domain" in denied.stdout
    assert len(list((confdir / "var" / "maildir" / "new").iterdir())) == 1


def test_serve_refuses_to_start_with_one_line_when_the_port_is_taken(confdir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", confdir.smtp_port))
        taken.listen()
        proc = run("serve", "--config", str(confdir / "gateway.toml"))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {confdir / 'gateway.toml'}: cannot start: ")
    assert "address already in use" in proc.stderr and "Traceback" not in proc.stderr


def test_version():
    from gateway import __version__

    proc = run("--version", check=True)
    assert proc.stdout == f"gateway {__version__}\n"


def _walk(parser, path=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                yield (*path, name), "(command)", helps.get(name)
                yield from _walk(child, (*path, name))
        else:
            yield path, "/".join(action.option_strings) or action.dest, action.help


def test_every_command_and_option_has_help():
    import argparse

    from gateway.ops.cli import build_parser

    seen = list(_walk(build_parser()))
    missing = [(" ".join(p), name) for p, name, text in seen
               if not text or (text == argparse.SUPPRESS and name != "--strict")]
    assert missing == []
    commands = {" ".join(p) for p, name, _ in seen if name == "(command)"}
    assert {"serve", "check-config", "senders add", "flags import", "throttle set",
            "quarantine release"} <= commands
    # and argparse renders each (a bad format string in a help text would raise here)
    for path in commands:
        proc = run(*path.split(), "--help", check=True)
        assert proc.stdout.startswith("usage: gateway ")


def test_config_is_found_in_order_and_named(confdir, tmp_path_factory):
    from gateway.ops.cli import locate_config

    listed = run("senders", "list", cwd=confdir.path)  # ./gateway.toml
    assert listed.returncode == 0, listed.stderr
    assert listed.stderr == f"gateway: configuration {confdir / 'gateway.toml'} (from ./gateway.toml)\n"
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    other = elsewhere / "other.toml"
    other.write_text((confdir / "gateway.toml").read_text().replace(
        'dir = "senders"', f'dir = "{confdir / "senders"}"'))
    by_env = run("check-config", cwd=confdir.path, env={"GATEWAY_CONFIG": str(other)})
    assert by_env.returncode == 0, by_env.stderr
    assert by_env.stderr == f"gateway: configuration {other} (from $GATEWAY_CONFIG)\n"
    assert by_env.stdout.startswith(f"{other}: OK")
    given = run("check-config", "--config", str(confdir / "gateway.toml"), cwd=elsewhere,
                env={"GATEWAY_CONFIG": str(other)})
    assert given.stderr == "" and given.stdout.startswith(f"{confdir / 'gateway.toml'}: OK")
    from gateway.infra.typed import ConfigError

    system = elsewhere / "etc-gateway.toml"
    with pytest.raises(ConfigError) as err:
        locate_config(None, {}, cwd=elsewhere, system=system)
    assert err.value.reason == ("no configuration found (looked for --config, $GATEWAY_CONFIG, "
                                f"./gateway.toml, {system})")
    system.write_text("")
    assert locate_config(None, {}, cwd=elsewhere, system=system) == (system, str(system))
    (elsewhere / "gateway.toml").write_text("")
    assert locate_config(None, {}, cwd=elsewhere, system=system) == (
        elsewhere / "gateway.toml", "./gateway.toml")
    if not Path("/etc/ecomm-gateway/gateway.toml").exists():
        empty = tmp_path_factory.mktemp("empty")
        none = run("senders", "list", cwd=empty)
        assert none.returncode == 2
        assert none.stderr == (f"error: {empty / 'gateway.toml'}: no configuration found "
                               "(looked for --config, $GATEWAY_CONFIG, ./gateway.toml, "
                               "/etc/ecomm-gateway/gateway.toml)\n")


def test_serve_logs_which_configuration(served):
    confdir, proc = served
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    lines = [json.loads(line) for line in out.splitlines()]
    [found] = [line for line in lines if line["event"] == "configuration"]
    assert found["file"] == str(confdir / "gateway.toml") and found["found_by"] == "--config"


def test_senders_add_with_class_rates_description_and_selectors(confdir):
    import tomllib

    cfg = str(confdir / "gateway.toml")
    added = run("senders", "add", "--config", cfg, "--id", "events", "--organization", "Events",
                "--contact", "ops@events.example", "--network", "198.51.100.0/24",
                "--domain", "mail.events.example", "--return-path", "rp-*@mail.events.example",
                "--expires", "2027-03-01", "--class", "transactional", "--class", "educational",
                "--rate", "10/minute", "--recipient-rate", "2000/hour", "--description",
                'Ticket "receipts"', "--dkim-selector", "s1", "--dkim-selector", "s2.2026")
    assert added.returncode == 0, added.stderr
    data = tomllib.loads((confdir / "senders" / "events.toml").read_text())
    assert (data["classes"], data["rate"], data["recipient_rate"], data["description"],
            data["dkim_selectors"]) == (["transactional", "educational"], "10/minute",
                                         "2000/hour", 'Ticket "receipts"', ["s1", "s2.2026"])
    shown = json.loads(run("senders", "show", "events", "--config", cfg, check=True).stdout)
    assert shown["classes"] == ["transactional", "educational"] and shown["rate"] == "10/minute"
    fast = run("senders", "add", "--config", cfg, "--id", "fast", "--organization", "F",
               "--contact", "f@f.example", "--network", "192.0.2.0/24", "--domain", "f.example",
               "--return-path", "b-*@f.example", "--expires", "2027-01-01", "--rate", "31/minute")
    assert fast.returncode == 2
    assert fast.stderr == ("error: rate: 31/minute exceeds the policy ceiling [limits] "
                           "sender_rate = 30/minute\n")
    bad = run("senders", "add", "--config", cfg, "--id", "sel", "--organization", "S",
              "--contact", "s@s.example", "--network", "192.0.2.0/24", "--domain", "s.example",
              "--return-path", "b-*@s.example", "--expires", "2027-01-01",
              "--dkim-selector", "no good")
    assert bad.returncode == 2 and "dkim_selectors[0]: 'no good' is not a DKIM selector" in bad.stderr
    wrong = run("senders", "add", "--config", cfg, "--id", "x", "--organization", "S",
                "--contact", "s@s.example", "--network", "192.0.2.0/24", "--domain", "s.example",
                "--return-path", "b-*@s.example", "--expires", "2027-01-01", "--class", "spam")
    assert wrong.returncode == 2 and "invalid choice: 'spam'" in wrong.stderr
    assert sorted(p.name for p in (confdir / "senders").iterdir()) == ["acme.toml", "events.toml"]


def test_sender_rate_above_policy_is_refused_unless_allowed(confdir):
    cfg = confdir / "gateway.toml"
    text = cfg.read_text()
    cfg.write_text(text + '[limits]\nsender_rate = "60/minute"\n')
    refused = run("check-config", "--config", str(cfg))
    assert refused.returncode == 2
    assert refused.stderr == (f"error: {cfg}: limits.sender_rate: 60/minute is above the "
                              "policy's 30/minute (IV.B.3.c.vi); set [limits] "
                              "allow_above_policy = true to mean it\n")
    cfg.write_text(text + '[limits]\nsender_rate = "1/second"\nallow_above_policy = true\n')
    assert run("check-config", "--config", str(cfg)).returncode == 0
    cfg.write_text(text + '[limits]\nsender_rate = "1800/hour"\n')  # the same as 30/minute
    assert run("check-config", "--config", str(cfg)).returncode == 0


def test_above_policy_start_logs_a_warning(gateways, logs):
    gateways.start('[limits]\nsender_rate = "100/minute"\nallow_above_policy = true\n')
    [warning] = logs.events("above_policy")
    assert warning["level"] == "warning" and warning["sender_rate"] == "100/minute"
    assert warning["policy"] == "30/minute"
    gateways.start()
    assert len(logs.events("above_policy")) == 1


def _metric(confdir, line_start: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{confdir.admin_port}/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(line_start):
                return float(line.split()[-1])
    return None


EVENTS_MESSAGE = MESSAGE.replace(b"em.acme.example", b"em.events.example")


def test_reload_senders_and_sighup_against_the_running_gateway(served):
    import signal

    confdir, proc = served
    cfg = str(confdir / "gateway.toml")
    added = run("senders", "add", "--config", cfg, "--id", "events", "--organization", "Events",
                "--contact", "ops@events.example", "--network", "127.0.0.1/32", "--domain",
                "em.events.example", "--return-path", "rp-*@em.events.example",
                "--expires", "2099-01-01")
    assert added.returncode == 0, added.stderr
    assert added.stdout == (f"added sender events ({confdir / 'senders' / 'events.toml'}); "
                            "the running gateway applied it (generation 1)\n")
    with smtplib.SMTP("127.0.0.1", confdir.smtp_port, timeout=30) as client:
        assert client.sendmail("rp-1@em.events.example", ["alice@example.edu"],
                               EVENTS_MESSAGE) == {}
    # an invalid change: refused whole, exit 1, file/key/reason; the gateway keeps running
    (confdir / "senders" / "bad.toml").write_text("id = \"bad\"\nexpires = 2027-01-01\n")
    refused = run("reload", "--config", cfg)
    assert refused.returncode == 1
    assert refused.stderr == ("reload refused, the running configuration stays: "
                              f"{confdir / 'senders' / 'bad.toml'}: organization: required key "
                              "is missing\n")
    (confdir / "senders" / "bad.toml").unlink()
    removed = run("senders", "remove", "events", "--config", cfg)
    assert removed.stdout == (f"removed sender events ({confdir / 'senders' / 'events.toml'}); "
                              "the running gateway applied it (generation 2)\n")
    with smtplib.SMTP("127.0.0.1", confdir.smtp_port, timeout=30) as client:
        client.ehlo("client.test")
        assert client.mail("rp-2@em.events.example") == (
            550, b"5.7.1 Return-path <rp-2@em.events.example> does not carry a registered sender "
                 b"identifier; expected bounce-*@em.acme.example")
    # SIGHUP: the same reload, by signal; the process lives on
    (confdir / "senders" / "acme.toml").write_text(EXAMPLE_SENDER + 'rate = "5/minute"\n')
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while _metric(confdir, "gateway_config_generation ") != 3.0:
        assert proc.poll() is None and time.monotonic() < deadline, "no reload after SIGHUP"
        time.sleep(0.05)
    ok = run("reload", "--config", cfg)
    assert ok.returncode == 0
    assert ok.stdout == "reloaded: generation 4; no sender changed; no key changed\n"
    with smtplib.SMTP("127.0.0.1", confdir.smtp_port, timeout=30) as client:
        assert client.sendmail("bounce-9@em.acme.example", ["bob@example.edu"], MESSAGE) == {}
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    reloads = [json.loads(line) for line in out.splitlines()
               if json.loads(line)["event"] == "reload"]
    user = os.environ.get("USER") or __import__("getpass").getuser()
    assert [(r["actor"], r["result"], r["generation"]) for r in reloads] == [
        (f"api:cli:{user}", "applied", 1), (f"api:cli:{user}", "refused", 1),
        (f"api:cli:{user}", "applied", 2), ("signal:SIGHUP", "applied", 3),
        (f"api:cli:{user}", "applied", 4)]
    assert reloads[3]["senders"] == {"added": [], "removed": [], "changed": ["acme"]}
    assert reloads[1]["file"] == str(confdir / "senders" / "bad.toml")
    assert reloads[1]["key"] == "organization"
    trail = [json.loads(line) for line in (confdir / "var" / "audit.jsonl").read_text().splitlines()]
    assert [(e["actor"], e["applied"]) for e in trail if e["action"] == "reload"] == [
        ("token:admin", True), ("token:admin", False), ("token:admin", True),
        ("signal:SIGHUP", True), ("token:admin", True)]


def test_senders_add_without_a_running_gateway_says_so(confdir):
    added = run("senders", "add", "--config", str(confdir / "gateway.toml"), "--id", "events",
                "--organization", "Events", "--contact", "ops@events.example", "--network",
                "192.0.2.0/24", "--domain", "em.events.example", "--return-path",
                "rp-*@em.events.example", "--expires", "2099-01-01")
    assert added.returncode == 0
    assert added.stdout == (f"added sender events ({confdir / 'senders' / 'events.toml'}); "
                            "no running gateway answered; it applies at the next start or "
                            "reload\n")
