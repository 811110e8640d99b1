"""deploy/grafana/ecomm-gateway.json and deploy/prometheus/alerts.yml against a real Prometheus:
it scrapes a live gateway that has accepted, refused and deferred mail (rate limit, large
audience, campus mail's 451), and every panel query and every alert expression must parse and
return at least one series (an alert's condition is asked with `bool`, so that a quiet alert
still shows that the series it watches exist). No panel may watch a metric that does not exist."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import MESSAGE, free_port, send
from tests.test_monitoring import traffic

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "ecomm-gateway.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")


def with_bool(expr: str) -> str:
    """``A > 5`` -> ``A > bool 5``: the top-level comparison of an alert returns 0 or 1 for
    every series of A instead of filtering them out."""
    depth, quote, i = 0, None, 0
    found = None
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            op = next((o for o in COMPARISONS if expr.startswith(o, i)), None)
            if op and not (op == "=" or expr.startswith("=~", i)):
                found = (i, op)
                i += len(op)
                continue
        i += 1
    assert found, f"no top-level comparison in {expr!r}"
    at, op = found
    return f"{expr[:at]}{op} bool{expr[at + len(op):]}"


def test_with_bool():
    assert with_bool('up{job="x"} == 0') == 'up{job="x"} == bool 0'
    assert with_bool('sum by (a) (rate(m{l=~"a>b"}[5m])) / clamp_min(x, 1) > 0.5') == \
        'sum by (a) (rate(m{l=~"a>b"}[5m])) / clamp_min(x, 1) > bool 0.5'


class Prometheus:
    def __init__(self, binary: str, tmp: Path, target: str) -> None:
        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "ecomm-gateway",
                                "static_configs": [{"targets": [target]}]}]}))
        self.log = open(tmp / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def wait(self, what, deadline: float):
        """Poll until ``what()`` is true (Prometheus is another process: no event to wait on)."""
        while True:
            try:
                if what():
                    return
            except OSError:
                pass
            assert self.proc.poll() is None, "prometheus exited"
            assert time.monotonic() < deadline, "prometheus did not get there in time"
            time.sleep(0.2)

    def query(self, expr: str) -> list:
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "30s").replace("$sender", ".*")
            out.append((panel["title"], expr))
    return out


def test_dashboard_and_alerts_against_a_real_prometheus(gateways, sink, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (.ci/run installs it)")
    gw = gateways.start(f"""
[upstream]
url = "{sink.url}"
probe = true
timeout = 5.0
pool_wait = 5.0
[limits]
sender_rate = "3/minute"
max_hold = 0
""")
    traffic(gw, sink)  # accepted, refused at DATA and RCPT, deferred by campus mail (451)
    big = MESSAGE.replace(b"Subject: Hello\r\n", b"Subject: Gala\r\nX-Audience-Size: 20000\r\n")
    client, reply = send(gw, message=big)  # Monday 08:00 in Denver: business hours
    assert reply[0] == 451 and b"business hours" in reply[1]
    client.quit()
    client, reply = send(gw)  # the third of the sender's 3/minute
    assert reply[0] == 250
    client.quit()
    client, reply = send(gw)  # over the rate: refused early, at MAIL
    assert reply[0] == 451 and reply[1].startswith(b"4.7.1")
    client.quit()
    host, port = gw.gateway.admin_address
    prom = Prometheus(binary, tmp_path, f"{host}:{port}")
    try:
        deadline = time.monotonic() + 60  # a bound, not a speed target: usually 3 s
        prom.wait(lambda: prom.query('count_over_time(up{job="ecomm-gateway"}[1m]) >= 3'),
                  deadline)
        assert prom.query('up{job="ecomm-gateway"}')[0]["value"][1] == "1"
        # the alert rules loaded, and each one's expression
        prom.wait(lambda: prom.api("rules")["data"]["groups"], deadline)
        rules = [r for g in prom.api("rules")["data"]["groups"] for r in g["rules"]]
        assert {r["name"] for r in rules} >= {"GatewayDown", "GatewayDnsFailures"}
        empty = []
        for rule in rules:
            assert rule["health"] in ("ok", "unknown"), rule
            prom.query(rule["query"])  # parses
            if not prom.query(with_bool(rule["query"])):
                empty.append(f"alert {rule['name']}: {rule['query']}")
        for title, expr in panel_queries():
            if not prom.query(expr):
                empty.append(f"panel {title!r}: {expr}")
        assert empty == [], "queries without a series:\n" + "\n".join(empty)
    finally:
        prom.stop()


def test_dashboard_has_the_panels_ops_need_and_a_sender_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    assert titles >= {"Decisions by reason", "Sender rate use against its limit",
                      "Deferrals (451) by reason", "Upstream replies",
                      "Upstream latency (DATA to reply)", "Check latency p95", "Quarantine",
                      "Large-audience campaigns", "Recipients left out by flags", "DNS cache"}
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["sender"]["includeAll"] and variables["sender"]["allValue"] == ".*"
    assert "label_values(" in variables["sender"]["definition"]
    rate_use = next(p for p in dashboard["panels"]
                    if p["title"] == "Sender rate use against its limit")
    exprs = " ".join(t["expr"] for t in rate_use["targets"])
    assert 'sender=~"$sender"' in exprs and "gateway_rate_effective_per_second" in exprs
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
