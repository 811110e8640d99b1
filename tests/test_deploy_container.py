"""deploy/container: compose.yaml validated by `docker-compose config` (images cannot be pulled
here, so nothing is built or run), its bind mounts exist, the Dockerfile runs a non-root user
with a HEALTHCHECK on /healthz and installs the package from the repository, the image's
configuration loads with absolute paths, and the compose Prometheus configuration passes
`promtool check config` with the alert rules."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.infra.config import load_config, parse_hostport

ROOT = Path(__file__).resolve().parent.parent
CONTAINER = ROOT / "deploy" / "container"


def compose(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (.ci/run installs it)")
    return subprocess.run([tool, "-f", str(CONTAINER / "compose.yaml"), *args],
                          capture_output=True, text=True, timeout=60, cwd=CONTAINER)


def test_compose_config_is_valid_with_the_four_services():
    proc = compose("config", "--quiet")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    services = compose("config", "--services")
    assert sorted(services.stdout.split()) == ["gateway", "grafana", "prometheus", "redis"]


def test_compose_bind_mounts_exist_and_provision_grafana():
    rendered = compose("config").stdout
    mounts = re.findall(r"^\s+- (/[^:\s]+):(/[^:\s]+):ro$", rendered, re.M)
    targets = {target: Path(source) for source, target in mounts}
    for target, source in targets.items():
        assert source.exists(), (target, source)
    assert targets["/var/lib/grafana/dashboards/ecomm-gateway.json"] == \
        ROOT / "deploy/grafana/ecomm-gateway.json"
    assert targets["/etc/prometheus/alerts.yml"] == ROOT / "deploy/prometheus/alerts.yml"
    assert targets["/etc/ecomm-gateway/senders"] == ROOT / "config/senders"
    datasources = (CONTAINER / "grafana/datasources.yaml").read_text()
    assert "type: prometheus" in datasources and "url: http://prometheus:9090" in datasources
    dashboards = (CONTAINER / "grafana/dashboards.yaml").read_text()
    assert "path: /var/lib/grafana/dashboards" in dashboards


def test_compose_fails_on_a_broken_file(tmp_path):
    """The validation can fail: an unknown key in a service is reported."""
    broken = tmp_path / "compose.yaml"
    broken.write_text((CONTAINER / "compose.yaml").read_text().replace(
        "    restart: unless-stopped\n", "    restrat: unless-stopped\n", 1))
    tool = shutil.which("docker-compose") or pytest.skip("docker-compose is not installed")
    proc = subprocess.run([tool, "-f", str(broken), "config", "--quiet"], capture_output=True,
                          text=True, timeout=60, cwd=CONTAINER)
    assert proc.returncode != 0 and "restrat" in proc.stderr


def test_dockerfile_non_root_healthcheck_and_install_from_the_repository():
    text = (CONTAINER / "Dockerfile").read_text()
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user == ["ecomm-gateway:ecomm-gateway"]
    assert re.search(r"useradd --system --uid 10025 ", text)
    health = re.search(r"^HEALTHCHECK .*\n\s+CMD (.*)$", text, re.M)
    assert health and "http://127.0.0.1:9025/healthz" in health.group(1)
    assert "COPY gateway ./gateway" in text and "pip install --no-cache-dir .\n" in text
    assert re.search(r'^ENTRYPOINT \["gateway"\]$', text, re.M)
    assert re.search(r"^EXPOSE 2525 9025$", text, re.M)


def test_image_configuration_matches_the_image():
    config = load_config(CONTAINER / "gateway.toml")
    assert parse_hostport(config.admin.listen)[1] == 9025  # the HEALTHCHECK's port
    assert [parse_hostport(x)[1] for x in config.server.listen] == [2525]
    assert config.state.url == "redis://redis:6379/0"  # the compose service
    for path in (config.admin.token_file, config.logging.hash_key_file, config.flags.key_file,
                 config.quarantine.dir):
        assert path.is_absolute() and str(path).startswith("/var/lib/ecomm-gateway/"), path
    assert config.senders.dir == Path("/etc/ecomm-gateway/senders")


def test_compose_prometheus_configuration(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (.ci/run installs prometheus)")
    # laid out as the compose file mounts them: /etc/prometheus/{prometheus,alerts}.yml
    shutil.copy(CONTAINER / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(ROOT / "deploy/prometheus/alerts.yml", tmp_path / "alerts.yml")
    proc = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 9 rules found" in proc.stdout
    assert 'targets: ["gateway:9025"]' in (CONTAINER / "prometheus.yml").read_text()
