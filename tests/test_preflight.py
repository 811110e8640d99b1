"""`gateway check-config` fails whenever `gateway serve` would, for a path, permission or key
reason, and both name the key and the path (issue #12; #10 item 12). Run as real processes.

Permission cases run the gateway without the capabilities that let root ignore file modes
(setpriv drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), so they test what the service user
meets, whoever runs the suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE_SENDER, free_port

ROOT = Path(__file__).resolve().parent.parent


def gateway(*args, unprivileged=False, timeout=60):
    prefix = []
    if unprivileged and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv is not installed (util-linux)")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    return subprocess.run([*prefix, sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def both(conf: Path, unprivileged=False):
    """check-config and serve on the same configuration: serve must fail as check-config did
    (and so never get as far as listening)."""
    check = gateway("check-config", "--config", str(conf), unprivileged=unprivileged)
    serve = gateway("serve", "--config", str(conf), unprivileged=unprivileged)
    return check, serve


def write_conf(d: Path, extra: str = "", admin: str = "") -> Path:
    (d / "senders").mkdir(parents=True, exist_ok=True)
    (d / "senders" / "acme.toml").write_text(EXAMPLE_SENDER)
    conf = d / "gateway.toml"
    conf.write_text(f"""
[server]
listen = ["127.0.0.1:{free_port()}"]
hostname = "gw.test"
{extra}
[admin]
listen = "127.0.0.1:{free_port()}"
{admin}
[senders]
dir = "senders"
[checks.sender_auth]
mode = "off"
""")
    return conf


def fails_with(proc, *lines: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"error: {line}" for line in lines]


@pytest.fixture
def openssl_pair(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")

    def make(name: str) -> tuple[Path, Path]:
        cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True)
        return cert, key
    return make


def test_missing_tls_certificate(tmp_path, openssl_pair):
    _, key = openssl_pair("gw")
    cert = tmp_path / "missing.crt"
    conf = write_conf(tmp_path / "etc", f'tls_cert = "{cert}"\ntls_key = "{key}"')
    check, serve = both(conf)
    line = f"{conf}: server.tls_cert: {cert}: cannot read: No such file or directory"
    fails_with(check, line)
    fails_with(serve, line)


def test_tls_key_not_matching_the_certificate(tmp_path, openssl_pair):
    cert, _ = openssl_pair("one")
    _, other_key = openssl_pair("two")
    conf = write_conf(tmp_path / "etc", f'tls_cert = "{cert}"\ntls_key = "{other_key}"')
    check, serve = both(conf)
    line = f"{conf}: server.tls_key: {other_key}: does not match the certificate {cert}"
    fails_with(check, line)
    fails_with(serve, line)


def test_tls_files_that_are_not_pem(tmp_path, openssl_pair):
    cert, key = openssl_pair("gw")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    conf = write_conf(tmp_path / "etc", f'tls_cert = "{junk}"\ntls_key = "{key}"')
    check = gateway("check-config", "--config", str(conf))
    assert check.returncode == 2
    assert check.stderr.startswith(f"error: {conf}: server.tls_cert: {junk}: not a PEM certificate")
    conf = write_conf(tmp_path / "etc2", f'tls_cert = "{cert}"\ntls_key = "{junk}"')
    check = gateway("check-config", "--config", str(conf))
    assert check.returncode == 2
    assert check.stderr.startswith(f"error: {conf}: server.tls_key: {junk}: not a usable PEM "
                                   "private key")


def test_unreadable_tls_key(tmp_path, openssl_pair):
    cert, key = openssl_pair("gw")
    key.chmod(0)
    conf = write_conf(tmp_path / "etc", f'tls_cert = "{cert}"\ntls_key = "{key}"')
    check, serve = both(conf, unprivileged=True)
    line = f"{conf}: server.tls_key: {key}: cannot read: Permission denied"
    fails_with(check, line)
    fails_with(serve, line)


def test_good_tls_pair_passes(tmp_path, openssl_pair):
    cert, key = openssl_pair("gw")
    conf = write_conf(tmp_path / "etc", f'tls_cert = "{cert}"\ntls_key = "{key}"')
    check = gateway("check-config", "--config", str(conf))
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith(f"{conf}: OK")


def test_read_only_configuration_directory_as_shipped(tmp_path):
    """The unit's first start before this fix: relative key files and directories under a
    configuration directory the service user cannot write (ProtectSystem=strict). Every path
    serve would need is named, by check-config and by serve alike, before anything listens."""
    etc = tmp_path / "etc"
    conf = write_conf(etc)
    etc.chmod(0o555)
    try:
        check, serve = both(conf, unprivileged=True)
    finally:
        etc.chmod(0o755)
    why = f"does not exist and cannot be created: {etc} is not writable by this user"
    lines = [f"{conf}: upstream.url: {etc / 'var/maildir'}: {why}",
             f"{conf}: state.url: {etc / 'var/state.sqlite3'}: {why}",
             f"{conf}: admin.token_file: {etc / 'var/admin.token'}: {why}",
             f"{conf}: logging.hash_key_file: {etc / 'var/recipient-hash.key'}: {why}",
             f"{conf}: flags.key_file: {etc / 'var/flags.key'}: {why}",
             f"{conf}: logging.audit_file: {etc / 'var/audit.jsonl'}: {why}",
             f"{conf}: quarantine.dir: {etc / 'var/quarantine'}: {why}"]
    fails_with(check, *lines)
    fails_with(serve, *lines)


def test_unreadable_key_files(tmp_path):
    etc = tmp_path / "etc"
    keys = etc / "keys"
    keys.mkdir(parents=True)
    for name in ("admin.token", "hash.key", "flags.key"):
        (keys / name).write_bytes(b"secret")
        (keys / name).chmod(0)
    conf = write_conf(etc, admin=f'token_file = "{keys / "admin.token"}"')
    conf.write_text(conf.read_text() + '[logging]\nhash_key_file = "keys/hash.key"\n'
                    '[flags]\nkey_file = "keys/flags.key"\n')
    check, serve = both(conf, unprivileged=True)
    lines = [f"{conf}: admin.token_file: {keys / 'admin.token'}: cannot read: Permission denied",
             f"{conf}: logging.hash_key_file: {keys / 'hash.key'}: cannot read: Permission denied",
             f"{conf}: flags.key_file: {keys / 'flags.key'}: cannot read: Permission denied"]
    fails_with(check, *lines)
    fails_with(serve, *lines)


def test_unwritable_quarantine_maildir_and_state_directories(tmp_path):
    etc = tmp_path / "etc"
    conf = write_conf(etc)
    lib = tmp_path / "lib"
    for d in ("quarantine", "maildir/new", "state"):
        (lib / d).mkdir(parents=True)
    (lib / "quarantine").chmod(0o555)
    (lib / "maildir" / "new").chmod(0o555)
    (lib / "state").chmod(0o555)
    conf.write_text(conf.read_text() + f"""
[upstream]
url = "maildir:{lib / 'maildir'}"
[state]
url = "sqlite:{lib / 'state' / 'state.sqlite3'}"
[quarantine]
dir = "{lib / 'quarantine'}"
""")
    check, serve = both(conf, unprivileged=True)
    lines = [f"{conf}: upstream.url: {lib / 'maildir'}: {lib / 'maildir/new'} is not writable by "
             "this user",
             f"{conf}: state.url: {lib / 'state/state.sqlite3'}: does not exist and cannot be "
             f"created: {lib / 'state'} is not writable by this user",
             f"{conf}: quarantine.dir: {lib / 'quarantine'}: {lib / 'quarantine'} is not "
             "writable by this user"]
    fails_with(check, *lines)
    fails_with(serve, *lines)


def test_path_that_is_a_file_not_a_directory(tmp_path):
    etc = tmp_path / "etc"
    conf = write_conf(etc)
    (etc / "q").write_text("")
    conf.write_text(conf.read_text() + '[quarantine]\ndir = "q"\n')
    check = gateway("check-config", "--config", str(conf))
    fails_with(check, f"{conf}: quarantine.dir: {etc / 'q'}: exists and is not a directory")


def test_flags_key_other_than_the_stores(tmp_path):
    """serve refuses a flags key other than the one the flags were built with; check-config
    says so first."""
    etc = tmp_path / "etc"
    conf = write_conf(etc)
    imported = gateway("flags", "import", "--flag", "ferpa", "--config", str(conf),
                       str(_csv(tmp_path)))
    assert imported.returncode == 0, imported.stderr
    assert gateway("check-config", "--config", str(conf)).returncode == 0
    key = etc / "var" / "flags.key"
    key.write_bytes(os.urandom(32))
    check, serve = both(conf)
    line = (f"{conf}: flags.key_file: {key}: the flags key file is not the key the flags in the "
            "state store were built with (restore the key file, or re-import every flag list "
            "with this key)")
    fails_with(check, line)
    fails_with(serve, line)
    key.unlink()
    check = gateway("check-config", "--config", str(conf))
    fails_with(check, f"{conf}: flags.key_file: {key}: does not exist, and the flags in the state "
                      "store were built with a key (restore the key file)")


def _csv(tmp_path: Path) -> Path:
    path = tmp_path / "ferpa.csv"
    path.write_text("alice@example.edu\n")
    return path


def test_milter_socket_directory_not_writable(tmp_path):
    etc = tmp_path / "etc"
    conf = write_conf(etc)
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    conf.write_text(conf.read_text() + f'[milter]\nlisten = ["unix:{run}/milter.sock"]\n')
    check, serve = both(conf, unprivileged=True)
    line = f"{conf}: milter.listen[0]: {run / 'milter.sock'}: {run} is not writable by this user"
    fails_with(check, line)
    fails_with(serve, line)


def test_log_file_audit_file_and_token_dir(tmp_path):
    etc = tmp_path / "etc"
    logs = tmp_path / "log"
    logs.mkdir()
    (logs / "audit.jsonl").write_text("")
    (logs / "audit.jsonl").chmod(0o444)
    logs.chmod(0o555)
    tokens = etc / "tokens"
    tokens.mkdir(parents=True)
    (tokens / "alice.token").write_text("alice-secret-token-0123456789\n")
    (tokens / "alice.token").chmod(0)
    conf = write_conf(etc, admin='token_dir = "tokens"')
    conf.write_text(conf.read_text() + f'[logging]\nfile = "{logs / "gateway.log"}"\n'
                    f'audit_file = "{logs / "audit.jsonl"}"\n')
    check, serve = both(conf, unprivileged=True)
    lines = [f"{conf}: logging.file: {logs / 'gateway.log'}: does not exist and cannot be "
             f"created: {logs} is not writable by this user",
             f"{conf}: logging.audit_file: {logs / 'audit.jsonl'}: is not writable by this user",
             f"{conf}: admin.token_dir: {tokens}: alice.token: cannot read: Permission denied"]
    fails_with(check, *lines)
    fails_with(serve, *lines)


def test_arc_key_missing_when_sealing_is_on(tmp_path):
    etc = tmp_path / "etc"
    conf = write_conf(etc)
    conf.write_text(conf.read_text() + '[arc]\ndomain = "gw.example.edu"\nselector = "arc2026"\n'
                    'key_file = "arc.key"\n')
    check, serve = both(conf)
    line = f"{conf}: arc.key_file: {etc / 'arc.key'}: cannot read: No such file or directory"
    fails_with(check, line)
    fails_with(serve, line)
