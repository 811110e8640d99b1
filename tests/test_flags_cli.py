"""``gateway flags`` as a real process against the state store a gateway uses: CSV imports (bad
rows by line number, columns, BOM, delimiters), atomic replace while a gateway relays, check,
list, remove, export of recorded opt-outs, and the safety checks (empty or shrunken imports, a
different key file)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.infra.config import load_config
from gateway.policy.flags import FlagKeyMismatch, Scope, open_flags
from gateway.policy.senders import load_registry
from gateway.state import open_store
from gateway.infra.clock import FakeClock
from tests.conftest import MESSAGE, free_port
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
SQLITE = '[state]\nurl = "sqlite:state.sqlite3"\n'
NO_RATE = '[checks.rate_limit]\nmode = "off"\n'


def flags_cmd(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "flags", *args, "--config",
                           str(config)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture
def conf(gateways):
    """A configuration with SQLite state, written where a gateway of the test would read it."""
    return gateways.write(SQLITE)


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_import_reports_bad_rows_by_line(conf, tmp_path):
    csv = write(tmp_path / "ferpa.csv", "alice@example.edu\nBob+x@Example.EDU\n\nbob\n"
                                        "\"x@example.edu\",y@example.edu\n<carol@example.edu>\n")
    proc = flags_cmd(conf, "import", "--flag", "ferpa", str(csv))
    assert proc.returncode == 1  # the whole file is checked first: nothing imported
    assert proc.stderr.splitlines() == [
        f"{csv}:4: 'bob' is not an address: address must be local-part@domain",
        f"{csv}:5: 2 values; expected one address a row (--column NAME reads one column of a "
        "wider file)",
        "not imported: 2 bad row(s); fix them, or --skip-bad to import the others"]
    assert proc.stdout == ""
    assert flags_cmd(conf, "check", "alice@example.edu").stdout == "alice@example.edu: no flags\n"
    proc = flags_cmd(conf, "import", "--flag", "ferpa", "--skip-bad", str(csv))
    assert proc.returncode == 0  # imported: never exit 1 after changing the store
    assert proc.stdout.splitlines() == ["ferpa: 3 added, 0 already present",
                                        "2 bad row(s) left out (listed above, --skip-bad)"]
    check = flags_cmd(conf, "check", "BOB@example.edu")
    assert check.returncode == 0
    rule = check.stdout.split("rule ")[1].split(";")[0]
    assert check.stdout.splitlines() == [
        "BOB@example.edu:",
        f"  {'ferpa':<48} rule {rule}; receives educational, transactional"]
    assert flags_cmd(conf, "check", "dave@example.edu").stdout == "dave@example.edu: no flags\n"
    assert flags_cmd(conf, "check", "nobody").returncode == 2


def test_import_column_bom_delimiter_and_strict(conf, tmp_path):
    csv = write(tmp_path / "dne.csv", b"\xef\xbb\xbfId;E-mail;Name\r\n1;alice@example.edu;A\r\n"
                                      b"2;\"bob@example.edu\";\"B; b\"\r\n3;;C\r\n")
    strict = flags_cmd(conf, "import", "--flag", "do_not_email", "--column", "e-mail",
                       "--delimiter", ";", str(csv))
    assert strict.returncode == 1
    assert strict.stderr.splitlines() == [
        f"{csv}:4: no value in column 'e-mail'",
        "not imported: 1 bad row(s); fix them, or --skip-bad to import the others"]
    assert "no flags" in flags_cmd(conf, "check", "alice@example.edu").stdout
    ok = flags_cmd(conf, "import", "--flag", "do_not_email", "--column", "e-mail",
                   "--delimiter", ";", "--skip-bad", str(csv))
    assert ok.returncode == 0 and ok.stdout.startswith("do_not_email: 2 added")
    assert "do_not_email" in flags_cmd(conf, "check", "bob@example.edu").stdout
    missing = flags_cmd(conf, "import", "--flag", "ferpa", "--column", "mail", str(csv))
    assert missing.returncode == 2
    assert missing.stderr == (f"error: {csv}: line 1: no column 'mail' in the header "
                              "(id;e-mail;name)\n")


def test_header_row_is_recognised_without_column(conf, tmp_path):
    single = write(tmp_path / "single.csv", "Email\r\nalice@example.edu\r\nbob@example.edu\r\n")
    proc = flags_cmd(conf, "import", "--flag", "ferpa", str(single))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["ferpa: 2 added, 0 already present",
                                        "line 1 read as the header row (email)"]
    wide = write(tmp_path / "wide.csv", "id,name,E-Mail\n1,Carol,carol@example.edu\n")
    proc = flags_cmd(conf, "import", "--flag", "ferpa", str(wide))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["ferpa: 1 added, 0 already present",
                                        "line 1 read as the header row (e-mail)"]
    assert "ferpa" in flags_cmd(conf, "check", "carol@example.edu").stdout
    unknown = write(tmp_path / "unknown.csv", "id,name\n1,x@example.edu\n")
    proc = flags_cmd(conf, "import", "--flag", "ferpa", str(unknown))
    assert proc.returncode == 2
    assert proc.stderr == (f"error: {unknown}: line 1: a header row (id, name) without an "
                           "address column (email, e-mail, email address, email_address, mail, "
                           "address); --column NAME names it\n")


def test_replace_and_its_safety_checks(conf, tmp_path):
    big = write(tmp_path / "big.csv", "".join(f"s{i}@example.edu\n" for i in range(100)))
    small = write(tmp_path / "small.csv", "s1@example.edu\ns200@example.edu\n")
    empty = write(tmp_path / "empty.csv", "\n")
    assert flags_cmd(conf, "import", "--flag", "ferpa", str(big)).returncode == 0
    shrink = flags_cmd(conf, "import", "--flag", "ferpa", "--replace", str(small))
    assert shrink.returncode == 1
    assert shrink.stderr == ("not imported: ferpa would shrink from 100 to 2 members, more than "
                             "--max-shrink 50% (a truncated export?); --force to mean it\n")
    forced = flags_cmd(conf, "import", "--flag", "ferpa", "--replace", "--force", str(small))
    assert forced.stdout == "ferpa: replaced; 2 member(s) (was 100)\n"
    assert "no flags" in flags_cmd(conf, "check", "s2@example.edu").stdout
    assert "ferpa" in flags_cmd(conf, "check", "s200@example.edu").stdout
    refused = flags_cmd(conf, "import", "--flag", "ferpa", "--replace", str(empty))
    assert refused.returncode == 1 and "--allow-empty" in refused.stderr
    emptied = flags_cmd(conf, "import", "--flag", "ferpa", "--replace", "--allow-empty",
                        "--force", str(empty))
    assert emptied.returncode == 0
    assert "no flags" in flags_cmd(conf, "check", "s200@example.edu").stdout


def test_scoped_opt_outs_list_and_remove(conf, tmp_path):
    csv = write(tmp_path / "o.csv", "alice@example.edu\n")
    assert flags_cmd(conf, "import", "--flag", "opt_out", "--sender", "acme",
                     str(csv)).returncode == 0
    assert flags_cmd(conf, "import", "--flag", "opt_out", "--organization", "Acme  Marketing "
                     "Cloud", str(csv)).returncode == 0
    unknown = flags_cmd(conf, "import", "--flag", "opt_out", "--sender", "nobody", str(csv))
    assert unknown.returncode == 1 and unknown.stderr == "error: no registered sender 'nobody'\n"
    scoped = flags_cmd(conf, "import", "--flag", "ferpa", "--sender", "acme", str(csv))
    assert scoped.stderr == "error: --sender and --organization apply to opt_out and " \
                            "unsubscribed only\n"
    listing = flags_cmd(conf, "list").stdout.splitlines()
    assert listing[0] == "rules (log lines name them by id only):"
    assert [ln.split()[1] for ln in listing[1:5]] == ["ferpa", "do_not_email",
                                                       "do_not_contact", "opt_out"]
    assert listing[5:] == [
        "sets:",
        f"  {'opt_out (organization ' + repr('acme marketing cloud') + ')':<56} {1:>9}",
        f"  {'opt_out (sender acme)':<56} {1:>9}"]
    removed = flags_cmd(conf, "remove", "--flag", "opt_out", "--sender", "acme",
                        "alice@example.edu", "bob@example.edu")
    assert removed.stdout.splitlines() == [
        "alice@example.edu: removed from opt_out (sender acme)",
        "bob@example.edu: was not in opt_out (sender acme)"]


def test_export_optouts_recorded_by_the_gateway(conf, tmp_path):
    config = load_config(conf)

    async def record():
        flags = open_flags(config, open_store(config.state.url, FakeClock(), config.base_dir))
        at = dt.datetime(2026, 11, 2, 15, 30, tzinfo=dt.timezone.utc)
        await flags.record_optout("Alice@example.edu", Scope("sender", "acme"), sender="acme",
                                  organization="Acme Marketing Cloud", at=at)
        await flags.record_optout("bob@example.edu", Scope(), sender="acme",
                                  organization="Acme, Inc.", at=at + dt.timedelta(minutes=1))
        await flags.store.close()

    asyncio.run(record())
    proc = flags_cmd(conf, "export-optouts")
    assert proc.returncode == 0
    assert proc.stdout == (
        "address,scope,sender,organization,recorded_at,source\n"
        "alice@example.edu,sender,acme,Acme Marketing Cloud,2026-11-02T15:30:00+00:00,"
        "unsubscribe\n"
        "bob@example.edu,global,acme,\"Acme, Inc.\",2026-11-02T15:31:00+00:00,unsubscribe\n")
    out = tmp_path / "export.csv"
    assert flags_cmd(conf, "export-optouts", "--output", str(out)).returncode == 0
    assert out.read_text() == proc.stdout
    assert "unsubscribed (sender acme)" in flags_cmd(conf, "check", "alice@example.edu").stdout
    forgotten = flags_cmd(conf, "remove", "--flag", "unsubscribed", "--sender", "acme",
                          "alice@example.edu")
    assert forgotten.stdout == "alice@example.edu: removed from unsubscribed (sender acme)\n"
    assert "alice" not in flags_cmd(conf, "export-optouts").stdout


def test_memory_store_is_refused(gateways, tmp_path):
    conf = gateways.write()  # memory:
    proc = flags_cmd(conf, "list")
    assert proc.returncode == 1 and "flags need a lasting store" in proc.stderr


def test_another_key_file_is_refused_by_the_cli_and_the_gateway(conf, tmp_path):
    write(tmp_path / "f.csv", "alice@example.edu\n")
    assert flags_cmd(conf, "import", "--flag", "ferpa", str(tmp_path / "f.csv")).returncode == 0
    key = conf.parent / "var" / "flags.key"
    assert key.stat().st_mode & 0o777 == 0o600
    key.unlink()  # lost: a new one would silently void every flag
    proc = flags_cmd(conf, "check", "alice@example.edu")
    assert proc.returncode == 2 and "is not the key the flags in the state store" in proc.stderr
    config = load_config(conf)
    gateway = Gateway(config, load_registry(config.path(config.senders.dir), config.checks,
                                            config.limits.ceiling), clock=FakeClock())

    async def start():
        try:
            await gateway.start()
        finally:
            await gateway.stop()

    with pytest.raises(FlagKeyMismatch):
        asyncio.run(start())
    serve = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(conf)],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert serve.returncode == 2
    assert serve.stderr.startswith(f"error: {conf}: flags.key_file: {key}: the flags key file is "
                                   "not the key")


def test_replace_while_the_gateway_relays(gateways, sink, tmp_path):
    """A nightly --replace swaps the whole FERPA set while mail flows: alice is flagged in the
    old and the new file, and not one message reaches her in between."""
    gw = gateways.start(SQLITE + NO_RATE, upstream=sink.url)
    conf = gateways.tmp_path / "gw" / "gateway.toml"
    files = []
    for n, prefix in enumerate("ab"):
        files.append(write(tmp_path / f"{prefix}.csv", "alice@example.edu\n" + "".join(
            f"{prefix}{i}@example.edu\n" for i in range(40000))))
    assert flags_cmd(conf, "import", "--flag", "ferpa", str(files[0])).returncode == 0
    stop = threading.Event()
    codes = []

    def traffic():
        client = gw.smtp()
        while not stop.is_set():
            client.mail("bounce-1@em.acme.example")
            client.rcpt("alice@example.edu")
            client.rcpt("bob@example.edu")
            codes.append(client.data(MESSAGE)[0])
        client.quit()

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        for f in (files[1], files[0], files[1]):
            proc = flags_cmd(conf, "import", "--flag", "ferpa", "--replace", str(f))
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.startswith("ferpa: replaced; 40001 member(s)")
    finally:
        stop.set()
        thread.join(60)
    assert len(codes) > 10 and set(codes) == {250}
    assert all(m.rcpt_tos == ["bob@example.edu"] for m in sink.messages)
    assert "b1@example.edu" not in flags_cmd(conf, "check", "a1@example.edu").stdout


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_import_into_redis_is_what_the_gateway_applies(gateways, sink, tmp_path):
    server = RedisServer(tmp_path, free_port())
    server.start()
    try:
        toml = f'[state]\nurl = "{server.url}"\n'
        conf = gateways.write(toml)
        write(tmp_path / "f.csv", "alice@example.edu\n")
        assert flags_cmd(conf, "import", "--flag", "do_not_contact", "--replace",
                         str(tmp_path / "f.csv")).returncode == 0
        gw = gateways.start(toml, upstream=sink.url)
        client = gw.smtp()
        client.mail("bounce-1@em.acme.example")
        client.rcpt("alice@example.edu")
        client.rcpt("bob@example.edu")
        assert client.data(MESSAGE)[0] == 250
        client.quit()
        assert sink.messages[0].rcpt_tos == ["bob@example.edu"]
    finally:
        for g in gateways.running:
            g.stop()
        gateways.running.clear()
        server.stop()
