"""deploy/systemd: the unit passes `systemd-analyze verify` and rates 2.0 or better in
`systemd-analyze security`; sysusers.d and tmpfiles.d create the user and directories (run for
real, into a scratch root); the example /etc/ecomm-gateway/gateway.toml has only absolute paths
in the unit's directories, and a gateway started from it (moved into a scratch root) passes
check-config and serves /healthz."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from gateway.infra.config import load_config
from tests.conftest import EXAMPLE_SENDER, free_port

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "ecomm-gateway.service"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs systemd)")
    return path


@pytest.fixture
def unit_root(tmp_path):
    """A scratch root holding the unit, systemd's own units and the commands the unit runs, so
    verify checks our unit against this systemd without installing anything on the host."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir()
    shutil.copy(shutil.which("kill") or "/usr/bin/kill", root / "usr/bin/kill")
    os.symlink("usr/bin", root / "bin")
    os.symlink("usr/lib", root / "lib")
    gateway = root / "opt/ecomm-gateway/venv/bin/gateway"  # what README "Deploy" installs
    gateway.parent.mkdir(parents=True)
    gateway.write_text("#!/bin/sh\n")
    gateway.chmod(0o755)
    return root


def test_unit_verifies_clean(unit_root):
    tool = need("systemd-analyze")
    proc = subprocess.run([tool, "verify", f"--root={unit_root}", UNIT.name],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""  # no warning either (unknown keys, values)


def test_unit_verify_catches_a_bad_setting(unit_root):
    """The check above can fail: the same run on a unit with a typo reports it."""
    tool = need("systemd-analyze")
    installed = unit_root / "etc/systemd/system" / UNIT.name
    installed.write_text(installed.read_text().replace("ProtectSystem=strict",
                                                       "ProtectSystem=strickt"))
    proc = subprocess.run([tool, "verify", f"--root={unit_root}", UNIT.name],
                          capture_output=True, text=True, timeout=60)
    assert "Failed to parse protect system value" in proc.stderr


def test_unit_security_exposure_at_most_2(unit_root):
    tool = need("systemd-analyze")
    proc = subprocess.run([tool, "security", "--offline=true", f"--root={unit_root}",
                           "--threshold=20", "--no-pager", UNIT.name],
                          capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for ecomm-gateway\.service: (\d+\.\d+)",
                      proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 2.0, proc.stdout
    assert proc.returncode == 0, proc.stderr


def test_unit_runs_check_config_then_serve_with_the_example_configuration():
    text = UNIT.read_text()
    conf = "--config /etc/ecomm-gateway/gateway.toml"
    assert f"ExecStartPre=/opt/ecomm-gateway/venv/bin/gateway check-config {conf}\n" in text
    assert f"ExecStart=/opt/ecomm-gateway/venv/bin/gateway serve {conf}\n" in text
    for line in ("User=ecomm-gateway", "StateDirectory=ecomm-gateway",
                 "RuntimeDirectory=ecomm-gateway", "ProtectSystem=strict",
                 "ExecReload=/bin/kill -HUP $MAINPID"):
        assert f"\n{line}\n" in text


def test_sysusers_and_tmpfiles_create_the_user_and_directories(tmp_path):
    sysusers, tmpfiles = need("systemd-sysusers"), need("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run([sysusers, f"--root={root}", str(SYSTEMD / "sysusers.d/ecomm-gateway.conf")],
                   check=True, capture_output=True, timeout=60)
    user = [line.split(":") for line in (root / "etc/passwd").read_text().splitlines()
            if line.startswith("ecomm-gateway:")]
    assert len(user) == 1
    _, _, uid, gid, _, home, shell = user[0]
    assert (home, shell) == ("/var/lib/ecomm-gateway", "/usr/sbin/nologin")
    assert f"ecomm-gateway:x:{gid}:" in (root / "etc/group").read_text()
    proc = subprocess.run([tmpfiles, f"--root={root}", "--create",
                           str(SYSTEMD / "tmpfiles.d/ecomm-gateway.conf")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    expect = {"etc/ecomm-gateway": (0, int(gid)), "etc/ecomm-gateway/senders": (0, int(gid)),
              "var/lib/ecomm-gateway": (int(uid), int(gid)),
              "var/lib/ecomm-gateway/quarantine": (int(uid), int(gid)),
              "run/ecomm-gateway": (int(uid), int(gid)),
              "var/log/ecomm-gateway": (int(uid), int(gid))}
    for path, owner in expect.items():
        st = (root / path).stat()
        assert ((st.st_uid, st.st_gid), st.st_mode & 0o777) == (owner, 0o750), path
    # the audit trail exists and is the service's before root's CLI first appends to it (else the
    # file root creates would stop the service's check-config: "is not writable by this user")
    st = (root / "var/lib/ecomm-gateway/audit.jsonl").stat()
    assert ((st.st_uid, st.st_gid), st.st_mode & 0o777) == ((int(uid), int(gid)), 0o640)


def _paths(obj, prefix=""):
    """Every Path-valued setting of a config dataclass, with its dotted key."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if isinstance(value, Path):
            yield key, value
        elif dataclasses.is_dataclass(value):
            yield from _paths(value, key + ".")


def test_example_configuration_paths_are_absolute_and_in_the_units_directories():
    config = load_config(SYSTEMD / "gateway.toml")
    paths = dict(_paths(config))
    paths.pop("file")
    paths["state.url"] = Path(config.state.url.removeprefix("sqlite:"))
    assert config.state.url.startswith("sqlite:")
    homes = ("/etc/ecomm-gateway/", "/var/lib/ecomm-gateway/", "/run/ecomm-gateway/",
             "/var/log/ecomm-gateway/")
    for key, path in paths.items():
        assert path.is_absolute() and str(path).startswith(homes), (key, path)
    assert paths["senders.dir"] == Path("/etc/ecomm-gateway/senders")
    for key in ("admin.token_file", "logging.hash_key_file", "flags.key_file", "quarantine.dir",
                "state.url"):
        assert str(paths[key]).startswith("/var/lib/ecomm-gateway/"), key  # writable there


def test_example_configuration_starts_in_a_scratch_root(tmp_path):
    """The example, moved into a scratch root laid out by tmpfiles.d, with the configuration
    directory read-only as under ProtectSystem=strict: check-config passes and serve answers
    /healthz (nothing is written outside the state directory)."""
    from tests.test_signals import Served
    from tests.test_preflight import gateway

    root = tmp_path / "root"
    for d in ("etc/ecomm-gateway/senders", "var/lib/ecomm-gateway/quarantine",
              "run/ecomm-gateway", "var/log/ecomm-gateway"):
        (root / d).mkdir(parents=True)
    (root / "etc/ecomm-gateway/senders/acme.toml").write_text(EXAMPLE_SENDER)
    admin = free_port()
    text = (SYSTEMD / "gateway.toml").read_text()
    for d in ("/etc/ecomm-gateway", "/var/lib/ecomm-gateway", "/run/ecomm-gateway",
              "/var/log/ecomm-gateway"):
        text = text.replace(d, f"{root}{d}")
    text = text.replace('listen = ["*:25"]', f'listen = ["127.0.0.1:{free_port()}"]')
    text = text.replace('listen = "127.0.0.1:9025"', f'listen = "127.0.0.1:{admin}"')
    conf = root / "etc/ecomm-gateway/gateway.toml"
    conf.write_text(text)
    for d in ("etc/ecomm-gateway/senders", "etc/ecomm-gateway"):
        (root / d).chmod(0o555)
    try:
        check = gateway("check-config", "--config", str(conf), unprivileged=True)
        assert check.returncode == 0, check.stderr
        served = Served(conf)
        try:
            served.next_event("started")
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=10) as r:
                assert r.status == 200
        finally:
            assert served.stop() == 0
    finally:
        for d in ("etc/ecomm-gateway", "etc/ecomm-gateway/senders"):
            (root / d).chmod(0o755)
    made = {p.name for p in (root / "var/lib/ecomm-gateway").iterdir()}
    assert made - {"state.sqlite3-shm", "state.sqlite3-wal"} == {
        "admin.token", "flags.key", "quarantine", "recipient-hash.key", "state.sqlite3"}


def test_host_prometheus_configuration(tmp_path):
    """README "Deploy" step 6: deploy/prometheus/prometheus.yml next to the alerts installed as
    /etc/prometheus/ecomm-gateway-alerts.yml passes promtool check config."""
    promtool = need("promtool")
    prometheus = ROOT / "deploy" / "prometheus"
    shutil.copy(prometheus / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(prometheus / "alerts.yml", tmp_path / "ecomm-gateway-alerts.yml")
    proc = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 9 rules found" in proc.stdout
    text = (prometheus / "prometheus.yml").read_text()
    assert "job_name: ecomm-gateway" in text and 'targets: ["127.0.0.1:9025"]' in text
    example = load_config(SYSTEMD / "gateway.toml")
    assert example.admin.listen == "127.0.0.1:9025"  # what the scrape job targets


def test_logrotate_signals_the_gateway_to_reopen_its_file():
    text = (ROOT / "deploy" / "logrotate" / "ecomm-gateway").read_text()
    assert text.startswith("# /etc/logrotate.d/ecomm-gateway")
    assert "/var/log/ecomm-gateway/*.log {" in text
    assert "systemctl kill --signal=USR1 --kill-whom=main ecomm-gateway.service" in text
    assert "copytruncate" not in text  # the gateway reopens: nothing copied, nothing lost
    assert "LogsDirectory=ecomm-gateway\n" in UNIT.read_text()
