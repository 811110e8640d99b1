"""gateway.toml and sender files: every bad input stops the start with one line naming file,
key and reason; the shipped files are valid as they are."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.infra.config import load_config
from gateway.policy.senders import Registry, globs_intersect, load_registry, load_sender
from gateway.infra.typed import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "gateway.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_configuration_and_example_sender_are_valid():
    config = load_config(ROOT / "gateway.toml")
    registry = load_registry(config.path(config.senders.dir), config.checks,
                             config.limits.ceiling)
    assert config.server.listen == ("127.0.0.1:2525",)
    assert config.upstream.url == "maildir:var/maildir"
    assert config.state.url == "sqlite:var/state.sqlite3"
    assert config.admin.listen == "127.0.0.1:9025"
    assert [s.id for s in registry.senders] == ["example-vendor"]


def test_empty_file_means_all_defaults(tmp_path):
    config = load_config(write(tmp_path, ""))
    assert config.server.max_message_size == 10 * 1024 * 1024
    assert config.check_settings("return_path").mode == "enforce"
    assert config.path("var/x") == tmp_path / "var/x"


@pytest.mark.parametrize("text, key, reason", [
    ("[server]\nlisten = \"127.0.0.1:25\"\n", "server.listen", "expected a list, got str"),
    ("[server]\nlisten = [\"localhost\"]\n", "server.listen[0]", "'localhost' is not host:port"),
    ("[server]\nmax_message_size = \"10M\"\n", "server.max_message_size", "expected an integer, got '10M'"),
    ("[server]\nmax_recipients = 0\n", "server.max_recipients", "must be at least 1"),
    ("[server]\nrequire_tls = true\n", "server.require_tls", "needs tls_cert and tls_key"),
    ("[server]\ntls_cert = \"c.pem\"\n", "server.tls_key", "tls_cert and tls_key go together"),
    ("[server]\nlisten_on = []\n", "server.listen_on", "unknown key (known keys: event_loop, hostname, listen,"),
    ("[upstream]\nurl = \"lmtp://x\"\n", "upstream.url", "expected smtp://host:port, smtps://host:port or maildir:PATH"),
    ("[upstream]\nstarttls = \"sometimes\"\n", "upstream.starttls", "'sometimes' is not one of 'required' | 'opportunistic' | 'off'"),
    ("[upstream]\nhosts = [\"smtp://b:25\"]\n", "upstream.hosts", "failover hosts need an smtp(s):// url"),
    ("[state]\nurl = \"postgres://x\"\n", "state.url", "expected sqlite:PATH, redis://host:port/db or memory:"),
    ("[state]\non_error = \"ignore\"\n", "state.on_error", "'ignore' is not one of 'defer' | 'local'"),
    ("[limits]\nsender_rate = \"fast\"\n", "limits.sender_rate", "is not a rate such as"),
    ("[limits]\nadaptive = true\n", "limits.adaptive", "needs global_rate"),
    ("[limits]\nmax_hold = 900.0\n", "limits.max_hold", "must be between 0 and 300 seconds"),
    ("[university]\ndomains = [\"not a domain\"]\n", "university.domains[0]", "is not a domain or *.domain"),
    ("[logging]\nformat = \"xml\"\n", "logging.format", "'xml' is not one of 'json' | 'console'"),
    ("[checks.spam]\nmode = \"off\"\n", "checks.spam", "unknown check (known checks: "),
    ("[checks.return_path]\nmode = \"loud\"\n", "checks.return_path.mode", "'loud' is not one of 'enforce' | 'monitor' | 'off'"),
    ("[server]\nlisten = []\n", "server.listen", "needs at least one host:port (or [milter] listen"),
    ("[milter]\nlisten = [\"127.0.0.1:8891\"]\n", "milter.listen[0]", "expected inet:host:port or unix:/path"),
    ("[milter]\nlisten = [\"unix:run/m.sock\"]\n", "milter.listen[0]", "expected unix:/absolute/path"),
    ("[milter]\nlisten = [\"inet:localhost\"]\n", "milter.listen[0]", "is not host:port"),
    ("[milter]\nsocket_mode = \"rw\"\n", "milter.socket_mode", "expected an octal mode"),
    ("[milter]\ntimeout = 0\n", "milter.timeout", "must be positive"),
    ("[servr]\n", "servr", "unknown section"),
    ("server = 1\n", "server", "expected a [server] table"),
])
def test_bad_configuration_names_file_key_and_reason(tmp_path, text, key, reason):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == key
    assert reason in err.value.reason
    assert str(err.value).startswith(f"{path}: {key}: ")
    assert "\n" not in str(err.value)


def test_milter_only_needs_no_smtp_listener(tmp_path):
    config = load_config(write(tmp_path, '[server]\nlisten = []\n[milter]\nlisten = '
                                         '["inet:127.0.0.1:8891", "unix:/run/g/m.sock"]\n'))
    assert config.server.listen == ()
    assert config.milter.listen == ("inet:127.0.0.1:8891", "unix:/run/g/m.sock")
    assert (config.milter.socket_mode, config.milter.timeout) == ("0660", 600.0)


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"gateway.toml: not valid TOML"):
        load_config(write(tmp_path, "[server\n"))
    with pytest.raises(ConfigError, match=r"nope.toml: file not found"):
        load_config(tmp_path / "nope.toml")


SENDER = """
id = "acme"
organization = "Acme"
contact = "ops@acme.example"
networks = ["192.0.2.0/24", "2001:db8::/32"]
domains = ["em.acme.example"]
return_path = ["bounce-*@em.acme.example"]
expires = 2027-01-31
"""


@pytest.mark.parametrize("change, key, reason", [
    (("192.0.2.0/24", "192.0.2.1/24"), "networks[0]", "bad CIDR"),
    (("192.0.2.0/24", "300.0.0.0/8"), "networks[0]", "bad CIDR"),
    (('["192.0.2.0/24", "2001:db8::/32"]', "[]"), "networks", "needs at least one CIDR"),
    (("bounce-*@em.acme.example", "bounce-*@other.example"), "return_path[0]", "is not one of this sender's domains"),
    (("bounce-*@em.acme.example", "bounce@*.acme.example"), "return_path[0]", "'*' only in the local part"),
    (("expires = 2027-01-31", 'expires = "2027-01-31"'), "expires", "expected a date"),
    (('id = "acme"', 'id = "Acme Corp"'), "id", "use lower-case letters"),
    (('contact = "ops@acme.example"', ''), "contact", "required key is missing"),
    (('contact = "ops@acme.example"', 'contact = "ops@acme.example"\ncolour = "red"'), "colour", "unknown key"),
])
def test_bad_sender_file_names_key(tmp_path, change, key, reason):
    path = write(tmp_path, SENDER.replace(*change), "acme.toml")
    with pytest.raises(ConfigError) as err:
        load_sender(path)
    assert (err.value.file, err.value.key) == (str(path), key)
    assert reason in err.value.reason


def test_bad_password_hash_is_refused(tmp_path):
    path = write(tmp_path, SENDER + '[auth]\nusername = "acme"\npassword_hash = "plaintext"\n', "a.toml")
    with pytest.raises(ConfigError) as err:
        load_sender(path)
    assert err.value.key == "auth.password_hash"


def test_duplicate_ids_refused(tmp_path):
    d = tmp_path / "senders"
    d.mkdir()
    write(d, SENDER, "a.toml")
    write(d, SENDER.replace("bounce-*", "other-*"), "b.toml")
    with pytest.raises(ConfigError, match="duplicate sender id 'acme'"):
        load_registry(d)


@pytest.mark.parametrize("mine, theirs", [
    ("bounce-*@em.acme.example", "bounce-*@em.acme.example"),
    ("bounce-*@em.acme.example", "*-x@em.acme.example"),
    ("*@em.acme.example", "news@em.acme.example"),
    ("b*e@em.acme.example", "bo*@em.acme.example"),
])
def test_overlapping_return_paths_refused(tmp_path, mine, theirs):
    d = tmp_path / "senders"
    d.mkdir()
    write(d, SENDER.replace("bounce-*@em.acme.example", mine), "a.toml")
    other = SENDER.replace('"acme"', '"other"').replace("bounce-*@em.acme.example", theirs)
    write(d, other, "b.toml")
    with pytest.raises(ConfigError) as err:
        load_registry(d)
    assert err.value.key == "return_path"
    assert "the return-path must identify one sender" in err.value.reason


def test_disjoint_return_paths_accepted(tmp_path):
    d = tmp_path / "senders"
    d.mkdir()
    write(d, SENDER, "a.toml")
    write(d, SENDER.replace('"acme"', '"other"').replace("bounce-*", "rp-*"), "b.toml")
    registry = load_registry(d)
    assert [s.id for s in registry.senders] == ["acme", "other"]
    assert registry.by_id["acme"].matches_return_path("BOUNCE-7@em.acme.example")
    assert not registry.by_id["acme"].matches_return_path("bounce-7@em.acme.example.evil")
    assert not registry.by_id["other"].matches_return_path("bounce-7@em.acme.example")


@pytest.mark.parametrize("a, b, expected", [
    ("abc", "abc", True), ("abc", "abd", False), ("a*", "*c", True), ("a*b", "a*c", False),
    ("*", "", True), ("x*y", "*z", False), ("x*y*z", "*q*", True), ("x*y*z", "x*", True), ("a?c", "a*", True),
])
def test_globs_intersect(a, b, expected):
    assert globs_intersect(a, b) is expected
    assert globs_intersect(b, a) is expected


def test_ipv4_mapped_ipv6_client_matches_ipv4_network(tmp_path):
    import ipaddress

    sender = load_sender(write(tmp_path, SENDER, "a.toml"))
    assert sender.has_ip(ipaddress.ip_address("::ffff:192.0.2.7"))
    assert sender.has_ip(ipaddress.ip_address("2001:db8::1"))
    assert not sender.has_ip(ipaddress.ip_address("198.51.100.1"))
    assert Registry([sender]).for_ip(ipaddress.ip_address("192.0.2.9")) == (sender,)


def test_sender_check_override_applies_only_given_keys(tmp_path):
    config = load_config(write(tmp_path, '[checks.return_path]\nmode = "monitor"\n'))
    path = write(tmp_path, SENDER + '[checks.identity]\nmode = "off"\n', "a.toml")
    sender = load_sender(path, config.checks)
    assert sender.checks["identity"].mode == "off"
    assert "return_path" not in sender.checks
