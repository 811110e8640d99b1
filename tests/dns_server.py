"""A real authoritative DNS server for tests: Knot DNS (``knotd``) on 127.0.0.1 with a free port,
serving zone files that the test writes. A test that needs it uses the fixtures in
``tests/test_auth*.py``; without the binary (Debian package ``knot``) those tests are skipped.

Also :class:`SilentNameserver`, a UDP socket that reads queries and never answers, for the
"server not answering" (temperror) cases.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype

KNOTD = shutil.which("knotd") or ("/usr/sbin/knotd" if Path("/usr/sbin/knotd").exists() else None)
SKIP_REASON = ("knotd (Knot DNS) is not installed: `apt-get install -y knot` provides the "
               "authoritative server the sender-authentication tests query")


def free_udp_tcp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (knot listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


def txt(value: str | bytes) -> str:
    """A TXT RDATA in zone-file syntax, split into character-strings of at most 255 octets."""
    data = value.encode() if isinstance(value, str) else value
    parts = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]

    def quote(b: bytes) -> str:
        out = []
        for c in b:
            if c in (0x22, 0x5C):
                out.append("\\" + chr(c))
            elif 0x20 <= c < 0x7F:
                out.append(chr(c))
            else:
                out.append(f"\\{c:03d}")
        return '"' + "".join(out) + '"'

    return " ".join(quote(p) for p in parts)


def zone_text(origin: str, records: list[tuple[str, str, str]], ttl: int = 300,
              negative_ttl: int = 60) -> str:
    """A zone file: SOA, NS and ``records`` as (owner relative to origin or "@", type, rdata)."""
    origin = origin.rstrip(".") + "."
    lines = [f"$ORIGIN {origin}", f"$TTL {ttl}",
             f"@ SOA ns.{origin} hostmaster.{origin} 1 3600 600 86400 {negative_ttl}",
             f"@ NS ns.{origin}", "ns A 127.0.0.1"]
    lines += [f"{owner} {rtype} {rdata}" for owner, rtype, rdata in records]
    return "\n".join(lines) + "\n"


class KnotServer:
    """knotd serving ``zones`` ({origin: zone file text}) on 127.0.0.1:port, UDP and TCP."""

    def __init__(self, workdir: Path, zones: dict[str, str]) -> None:
        if KNOTD is None:
            raise RuntimeError(SKIP_REASON)
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_udp_tcp_port()
        self.zones = dict(zones)
        for origin, text in zones.items():
            (self.dir / f"{origin.rstrip('.')}.zone").write_text(text)
        zone_list = "\n".join(f"  - domain: {o.rstrip('.')}." for o in zones)
        (self.dir / "knot.conf").write_text(textwrap.dedent(f"""\
            server:
                rundir: "{self.dir}"
                listen: 127.0.0.1@{self.port}
            log:
              - target: stderr
                any: warning
            database:
                storage: "{self.dir}/db"
            template:
              - id: default
                storage: "{self.dir}"
                file: "%s.zone"
                semantic-checks: off
                zonefile-sync: -1
                zonefile-load: whole
                journal-content: none
            zone:
            """) + zone_list + "\n")
        self.log = open(self.dir / "knotd.log", "wb")
        self.proc = subprocess.Popen([KNOTD, "-c", str(self.dir / "knot.conf"),
                                      "-s", str(self.dir / "knot.sock")],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(next(iter(zones)))
        except Exception:
            self.stop()
            raise

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _wait_ready(self, origin: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        query = dns.message.make_query(origin.rstrip(".") + ".", dns.rdatatype.SOA)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"knotd exited with {self.proc.returncode}: "
                                   + (self.dir / "knotd.log").read_text(errors="replace"))
            try:
                reply = dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.2)
                if reply.answer:
                    return
            except (dns.exception.Timeout, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError("knotd did not answer in time: "
                           + (self.dir / "knotd.log").read_text(errors="replace"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


class SilentNameserver:
    """A UDP (and TCP) endpoint on 127.0.0.1 that accepts queries and never answers."""

    def __init__(self) -> None:
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.port = self.udp.getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.udp.close()
