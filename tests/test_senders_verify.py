"""``gateway senders verify ID`` as a real process against a real authoritative DNS server
(Knot, tests/dns_server.py) through the gateway's own resolver: SPF per network, DKIM keys per
selector, the return-path domain, the expiry; one line per problem, non-zero exit if any."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.auth_helpers import ed_key, key_record, rsa_key
from tests.dns_server import KNOTD, SKIP_REASON, KnotServer, txt, zone_text

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def knot(tmp_path_factory):
    if KNOTD is None:
        pytest.skip(SKIP_REASON)
    zones = {
        "good.example": zone_text("good.example", [
            ("mail", "TXT", txt("v=spf1 ip4:192.0.2.0/24 ip4:198.51.100.7 ip6:2001:db8:5::/48 "
                                "-all")),
            ("s1._domainkey.mail", "TXT", txt(key_record(rsa_key(2048)[1]))),
            ("s2._domainkey.mail", "TXT", txt(key_record(ed_key()[1], k="ed25519"))),
            ("bounce.mail", "MX", "10 mx.good.example."),
            ("mx", "A", "192.0.2.25"),
        ]),
        "bad.example": zone_text("bad.example", [
            ("mail", "TXT", txt("v=spf1 ip4:192.0.2.0/24 -all")),
            ("small._domainkey.mail", "TXT", txt(key_record(rsa_key(512)[1]))),
            ("revoked._domainkey.mail", "TXT", txt("v=DKIM1; k=rsa; p=")),
            ("arec.mail", "A", "192.0.2.80"),
        ]),
    }
    server = KnotServer(tmp_path_factory.mktemp("knot"), zones)
    yield server
    server.stop()


def setup(tmp_path: Path, knot, senders: dict[str, str]) -> Path:
    (tmp_path / "senders").mkdir()
    for name, text in senders.items():
        (tmp_path / "senders" / f"{name}.toml").write_text(textwrap.dedent(text))
    conf = tmp_path / "gateway.toml"
    conf.write_text(f'[senders]\ndir = "senders"\n[dns]\nnameservers = ["{knot.address}"]\n'
                    "timeout = 3.0\n")
    return conf


def verify(conf: Path, sender: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "senders", "verify", sender,
                           "--config", str(conf)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_ready_registration_passes(tmp_path, knot):
    conf = setup(tmp_path, knot, {"good": """
        id = "good"
        organization = "Good Co"
        contact = "ops@good.example"
        networks = ["192.0.2.0/24", "198.51.100.7/32", "2001:db8:5::/48"]
        domains = ["mail.good.example"]
        return_path = ["b-*@bounce.mail.good.example"]
        dkim_selectors = ["s1", "s2"]
        expires = 2099-12-31
        """})
    proc = verify(conf, "good")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ("good: ready (SPF of 1 domain(s) for 3 network(s), 2 DKIM "
                           "selector(s), return-path domains, expiry)\n")


def test_every_problem_is_one_line_and_the_exit_is_non_zero(tmp_path, knot):
    soon = dt.datetime.now(dt.timezone.utc).date() + dt.timedelta(days=10)
    conf = setup(tmp_path, knot, {"bad": f"""
        id = "bad"
        organization = "Bad Co"
        contact = "ops@bad.example"
        networks = ["192.0.2.0/24", "203.0.113.0/24"]
        domains = ["mail.bad.example", "nospf.bad.example"]
        return_path = ["b-*@arec.mail.bad.example", "c-*@nowhere.mail.bad.example"]
        dkim_selectors = ["small", "revoked", "absent"]
        expires = {soon.isoformat()}
        """})
    proc = verify(conf, "bad")
    assert proc.returncode == 1
    print(proc.stdout)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("bad: SPF of mail.bad.example does not authorize 203.0.113.0/24 "
                               "(tested 203.0.113.1): fail")
    assert lines[1:] == [
        "bad: SPF of nospf.bad.example does not authorize 192.0.2.0/24 (tested 192.0.2.1): none",
        "bad: SPF of nospf.bad.example does not authorize 203.0.113.0/24 (tested 203.0.113.1): "
        "none",
        "bad: DKIM key small._domainkey.mail.bad.example: RSA key of 512 bits is below the "
        "minimum of 1024",
        "bad: DKIM selector small of nospf.bad.example: no key record at "
        "small._domainkey.nospf.bad.example",
        "bad: DKIM key revoked._domainkey.mail.bad.example: key revoked (empty p=)",
        "bad: DKIM selector revoked of nospf.bad.example: no key record at "
        "revoked._domainkey.nospf.bad.example",
        "bad: DKIM selector absent of mail.bad.example: no key record at "
        "absent._domainkey.mail.bad.example",
        "bad: DKIM selector absent of nospf.bad.example: no key record at "
        "absent._domainkey.nospf.bad.example",
        "bad: return-path domain nowhere.mail.bad.example has no MX, A or AAAA record (bounces "
        "cannot reach it)",
        f"bad: the registration expires on {soon.isoformat()}, in 10 day(s) (less than 30)",
    ]
    unknown = verify(conf, "nobody")
    assert unknown.returncode == 2 and unknown.stderr == "no sender with id 'nobody'\n"
