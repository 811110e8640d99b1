"""deploy/prometheus/alerts.yml: `promtool check rules` clean, `promtool test rules` passing with
input series for every alert (alerts.test.yml), each alert with a summary and a runbook line."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

PROMETHEUS = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ISSUE_ALERTS = {"GatewayDown", "GatewayUpstreamDown", "GatewayDeferralRatioHigh",
                "GatewaySenderRefusalsSpiking", "GatewayQuarantineGrowing",
                "GatewayStateStoreDown", "GatewayStateStoreErrors",
                "GatewaySenderRegistrationExpiring", "GatewayDnsFailures"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (.ci/run installs prometheus)")
    return path


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)$", ALERTS.read_text(), re.M)


def test_check_rules():
    proc = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in proc.stdout


def test_every_alert_is_there_with_summary_and_runbook():
    names = alert_names()
    assert set(names) == ISSUE_ALERTS and len(names) == len(set(names))
    blocks = re.split(r"^\s*- alert: ", ALERTS.read_text(), flags=re.M)[1:]
    for block in blocks:
        assert re.search(r"^\s+summary: \S", block, re.M), block
        assert re.search(r"^\s+runbook: \S", block, re.M), block


def test_rule_unit_tests_cover_every_alert_and_pass():
    tests = (PROMETHEUS / "alerts.test.yml").read_text()
    firing = set()
    for case in re.split(r"^\s+- eval_time: ", tests, flags=re.M)[1:]:
        name = re.search(r"alertname: (\w+)", case).group(1)
        if "exp_labels" in case:
            firing.add(name)
    assert firing == set(alert_names())  # every alert fires on its input series
    proc = subprocess.run([promtool(), "test", "rules", "alerts.test.yml"], cwd=PROMETHEUS,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_rule_unit_tests_can_fail(tmp_path):
    """The unit tests are not vacuous: with a threshold moved, promtool test rules fails."""
    shutil.copy(PROMETHEUS / "alerts.test.yml", tmp_path / "alerts.test.yml")
    (tmp_path / "alerts.yml").write_text(
        ALERTS.read_text().replace("delta(gateway_quarantine_messages[1h]) > 20",
                                   "delta(gateway_quarantine_messages[1h]) > 200"))
    proc = subprocess.run([promtool(), "test", "rules", "alerts.test.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "GatewayQuarantineGrowing" in proc.stdout + proc.stderr
