"""A private Postfix for the milter tests: its own config, queue and data directories under a
temporary directory, loopback only, its smtpd on an unprivileged port, everything relayed to a
sink on loopback, and ``smtpd_milters`` pointing at the gateway. Its main.cf ends with exactly
the shipped ``deploy/postfix/main.cf`` snippet (only the milter's address is set after it)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

SASL_REALM = "mta.test"  # myhostname: the realm of every sasldb entry
SNIPPET = Path(__file__).resolve().parent.parent / "deploy" / "postfix" / "main.cf"

MASTER_CF = """\
{smtp_port} inet n - n - - smtpd
  -o syslog_name=postfix-test/smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def saslpasswd2() -> str | None:
    """Cyrus SASL's saslpasswd2 (Debian: sasl2-bin), or None."""
    return shutil.which("saslpasswd2") or next(
        (c for c in ("/usr/sbin/saslpasswd2",) if Path(c).exists()), None)


def postfix_installed() -> bool:
    return all(shutil.which(c) or Path(f"/usr/sbin/{c}").exists()
               for c in ("postfix", "postqueue", "postsuper"))


class PostfixServer:
    def __init__(self, workdir: Path, smtp_port: int, relay_port: int, milter: str | None,
                 sasl_users: dict[str, str] | None = None) -> None:
        """``milter`` None: no milter (Postfix as campus mail). ``sasl_users`` (login:
        password) turns on SMTP AUTH (PLAIN, LOGIN) in smtpd, checked by Cyrus SASL against a
        sasldb of the instance's own (needs saslpasswd2)."""
        self.dir = workdir
        self.conf = workdir / "etc"
        self.smtp_port, self.relay_port, self.milter = smtp_port, relay_port, milter
        self.sasl_users = sasl_users
        self.log = workdir / "maillog"

    def main_cf(self) -> str:
        d = self.dir
        return "\n".join([
            "compatibility_level = 3.6",
            f"queue_directory = {d / 'spool'}",
            f"data_directory = {d / 'data'}",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            f"maillog_file = {self.log}",
            f"maillog_file_prefixes = {d}",
            "inet_interfaces = 127.0.0.1, [::1]",
            "inet_protocols = all",
            "myhostname = mta.test",
            "mydomain = mta.test",
            "mydestination =",
            "local_transport = error:no local delivery",
            "alias_maps =",
            "alias_database =",
            "mynetworks = 127.0.0.0/8 [::1]/128",
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
            f"relayhost = [127.0.0.1]:{self.relay_port}",
            "smtp_tls_security_level = none",
            "smtpd_tls_security_level = none",
            "smtp_dns_support_level = disabled",
            "disable_dns_lookups = yes",
            "smtpd_peername_lookup = no",
            "biff = no",
            "smtputf8_enable = no",
            "queue_run_delay = 1s",
            "minimal_backoff_time = 1s",
            "maximal_backoff_time = 2s",
            "",
            "# --- deploy/postfix/main.cf, verbatim ---",
            SNIPPET.read_text(),
            "# --- the test's milter address (none: Postfix as campus mail) ---",
            f"smtpd_milters = {self.milter or ''}",
            *self.sasl_cf(),
            "",
        ])

    def sasl_cf(self) -> list[str]:
        if self.sasl_users is None:
            return []
        return ["# --- the test's SMTP AUTH: Cyrus SASL, sasldb ---",
                "smtpd_sasl_auth_enable = yes",
                "smtpd_sasl_type = cyrus",
                "smtpd_sasl_path = smtpd",
                # (Debian's Postfix reads <config_directory>/sasl/smtpd.conf, whatever
                # this says: both name the same directory)
                f"cyrus_sasl_config_path = {self.conf / 'sasl'}",
                # empty: Cyrus looks the login up in the realm of myhostname (SASL_REALM) and
                # Postfix hands the bare login to the milter as {auth_authen}, which is what
                # a sender's [auth] username is (with a realm here it would be login@realm)
                "smtpd_sasl_local_domain =",
                "smtpd_sasl_security_options = noanonymous",
                # no TLS here (loopback test): plaintext mechanisms allowed
                "smtpd_tls_auth_only = no",
                "broken_sasl_auth_clients = no"]

    def write_sasldb(self) -> None:
        """``sasl/smtpd.conf`` and ``sasl/sasldb2`` (one entry per user in the realm),
        readable by Postfix's group (smtpd runs as mail_owner)."""
        sasl = self.conf / "sasl"
        sasl.mkdir(exist_ok=True)
        db = sasl / "sasldb2"
        (sasl / "smtpd.conf").write_text("pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
                                         f"mech_list: PLAIN LOGIN\nsasldb_path: {db}\n")
        for user, password in (self.sasl_users or {}).items():
            subprocess.run([saslpasswd2() or "saslpasswd2", "-f", str(db), "-p", "-c",
                            "-u", SASL_REALM, user], input=password.encode(), check=True,
                           capture_output=True, timeout=30)
        shutil.chown(db, "root", "postfix")  # root's, as postfix check wants in etc/
        db.chmod(0o640)

    def start(self) -> None:
        self.conf.mkdir(parents=True, exist_ok=True)
        (self.conf / "main.cf").write_text(self.main_cf())
        (self.conf / "master.cf").write_text(MASTER_CF.format(smtp_port=self.smtp_port))
        for sub in ("spool", "data"):
            (self.dir / sub).mkdir(exist_ok=True)
        shutil.chown(self.dir / "data", "postfix", "postfix")
        self.log.touch()
        if self.sasl_users is not None:
            self.write_sasldb()
        subprocess.run(["postfix", "-c", str(self.conf), "check"], check=True,
                       capture_output=True, timeout=60)
        subprocess.run(["postfix", "-c", str(self.conf), "start"], check=True,
                       capture_output=True, timeout=60)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.smtp_port), 0.5) as s:
                    if s.recv(64).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"postfix did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True,
                       timeout=60)

    def queue(self) -> list[dict]:
        """The queue as ``postqueue -j`` reports it (one JSON object per message)."""
        out = subprocess.run(["postqueue", "-c", str(self.conf), "-j"], check=True,
                             capture_output=True, text=True, timeout=30).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def flush(self) -> None:
        subprocess.run(["postqueue", "-c", str(self.conf), "-f"], check=True,
                       capture_output=True, timeout=30)

    def release_held(self) -> None:
        subprocess.run(["postsuper", "-c", str(self.conf), "-H", "ALL"], check=True,
                       capture_output=True, timeout=30)

    def delete_all(self) -> None:
        subprocess.run(["postsuper", "-c", str(self.conf), "-d", "ALL"], check=True,
                       capture_output=True, timeout=30)
