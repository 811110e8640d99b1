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

from gateway.passwords import verify_password
from tests.conftest import EXAMPLE_SENDER, MESSAGE, free_port

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = [sys.executable, "-m", "gateway"]


def run(*args, cwd=None, check=False):
    proc = subprocess.run([*GATEWAY, *args], capture_output=True, text=True, cwd=cwd, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
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
    assert lines[0] == f"added sender events ({confdir / 'senders' / 'events.toml'})"
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
    proc = subprocess.Popen([*GATEWAY, "serve", "--config", str(confdir / "gateway.toml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{confdir.admin_port}/readyz", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"gateway did not start: {proc.communicate()[1]}")
            time.sleep(0.1)
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
