"""[server] event_loop: "gateway serve" on uvloop relays like on asyncio, and says which loop
it runs on; an unknown value stops the start naming the key."""

from __future__ import annotations

import json
import smtplib
import subprocess
from pathlib import Path

import pytest

from gateway.infra.config import ConfigError, load_config
from tests.conftest import EXAMPLE_SENDER, MESSAGE, free_port, serve_process



def serve(directory: Path, event_loop: str, upstream: str) -> tuple[subprocess.Popen, int]:
    (directory / "senders").mkdir(parents=True)
    (directory / "senders" / "acme.toml").write_text(EXAMPLE_SENDER)
    smtp, admin = free_port(), free_port()
    (directory / "gateway.toml").write_text(f"""
[server]
listen = ["127.0.0.1:{smtp}"]
event_loop = "{event_loop}"
[admin]
listen = "127.0.0.1:{admin}"
[upstream]
url = "{upstream}"
[state]
url = "memory:"
[senders]
dir = "senders"
[logging]
level = "info"
[checks.sender_auth]
mode = "off"
""")
    return serve_process(directory / "gateway.toml", admin, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT), smtp


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop", "auto"])
def test_serve_on_the_configured_event_loop(tmp_path, sink, event_loop):
    """The default, "auto", is uvloop, which the gateway's dependencies install."""
    if event_loop != "asyncio":
        pytest.importorskip("uvloop", reason="uvloop is not installed (a dependency)")
    proc, port = serve(tmp_path / "gw", event_loop, sink.url)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            assert client.sendmail("bounce-1@em.acme.example", ["alice@example.edu"],
                                   MESSAGE) == {}
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert len(sink.messages) == 1
    started = [line for line in map(json.loads, out.decode().splitlines())
               if line.get("event") == "started"]
    assert [line["event_loop"] for line in started] == [
        "uvloop" if event_loop == "auto" else event_loop]
    # the young generation is collected every 10,000 allocations (gateway.infra.event_loop)
    assert [line["gc_threshold"][0] for line in started] == [10_000]
    assert not [line for line in map(json.loads, out.decode().splitlines())
                if line.get("event") == "event_loop_unavailable"]


def test_unknown_event_loop_is_refused(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text('[server]\nevent_loop = "trio"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "server.event_loop" in str(err.value) and \
        'must be "auto", "asyncio" or "uvloop"' in str(err.value)


def test_the_default_event_loop_is_auto(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text("")
    assert load_config(path).server.event_loop == "auto"
