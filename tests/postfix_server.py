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


def postfix_installed() -> bool:
    return all(shutil.which(c) or Path(f"/usr/sbin/{c}").exists()
               for c in ("postfix", "postqueue", "postsuper"))


class PostfixServer:
    def __init__(self, workdir: Path, smtp_port: int, relay_port: int, milter: str) -> None:
        self.dir = workdir
        self.conf = workdir / "etc"
        self.smtp_port, self.relay_port, self.milter = smtp_port, relay_port, milter
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
            "# --- the test's milter address ---",
            f"smtpd_milters = {self.milter}",
            "",
        ])

    def start(self) -> None:
        self.conf.mkdir(parents=True, exist_ok=True)
        (self.conf / "main.cf").write_text(self.main_cf())
        (self.conf / "master.cf").write_text(MASTER_CF.format(smtp_port=self.smtp_port))
        for sub in ("spool", "data"):
            (self.dir / sub).mkdir(exist_ok=True)
        shutil.chown(self.dir / "data", "postfix", "postfix")
        self.log.touch()
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
