"""Onboarding preflight (``gateway senders verify ID``): before a vendor goes live, check its
registration against DNS as the gateway will see it (the gateway's own resolver, ``[dns]``).

- each of its ``domains`` has SPF that authorizes each registered network (pyspf, through the
  same code the ``sender_auth`` check runs, with one address of each network);
- each of its ``dkim_selectors`` publishes, for each domain, a key the gateway accepts (RSA of
  ``min_rsa_bits`` or more, at least 1024, or Ed25519; not revoked);
- the domain of each ``return_path`` pattern resolves (MX, else A or AAAA), so bounces and
  the receiving side's sender checks work;
- the registration does not expire within ``EXPIRY_WARNING_DAYS``.

Each problem is one line naming the sender, what was checked and what was found.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import time
from typing import TYPE_CHECKING

from gateway.checks.auth_dkim import _parse_key  # the key parsing the DKIM check applies
from gateway.checks.auth_spf import check_spf, printable
from gateway.infra.dns import DnsNameError, DnsTempError

if TYPE_CHECKING:
    from gateway.infra.dns import Resolver
    from gateway.policy.senders import Sender

EXPIRY_WARNING_DAYS = 30
MIN_RSA_BITS = 1024  # RFC 8301


def probe_address(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """One address of ``network`` to test SPF with: its first host (the address itself for a
    /32 or /128)."""
    if network.num_addresses <= 2:
        return str(network.network_address)
    return str(network.network_address + 1)


async def _spf(sender: Sender, resolver: Resolver, receiver: str, time_limit: float
               ) -> list[str]:
    problems = []
    for domain in sender.domains:
        for cidr, net in zip(sender.networks, sender.nets):
            ip = probe_address(net)
            result = await check_spf(resolver, ip, f"postmaster@{domain}", domain, "mailfrom",
                                     receiver, time.time(), time_limit)
            if result.result != "pass":
                why = f" ({result.explanation})" if result.explanation else ""
                problems.append(f"{sender.id}: SPF of {domain} does not authorize {cidr} "
                                f"(tested {ip}): {result.result}{why}")
    return problems


async def _dkim(sender: Sender, resolver: Resolver, min_bits: int) -> list[str]:
    problems = []
    for selector in sender.dkim_selectors:
        for domain in sender.domains:
            name = f"{selector}._domainkey.{domain}"
            try:
                records = await resolver.txt(name)
            except DnsTempError as exc:
                problems.append(f"{sender.id}: DKIM key {name}: look-up failed: {exc}")
                continue
            except DnsNameError:
                records = []
            records = [r for r in records if b"p=" in r or b"v=DKIM1" in r] or records
            if not records:
                problems.append(f"{sender.id}: DKIM selector {selector} of {domain}: no key "
                                f"record at {name}")
                continue
            if len(records) > 1:
                problems.append(f"{sender.id}: DKIM key {name}: {len(records)} records; "
                                "verifiers need exactly one")
                continue
            key = _parse_key(records[0], name)
            if key.error is not None:
                problems.append(f"{sender.id}: DKIM key {name}: {printable(key.error.reason)}")
            elif key.ktag == b"rsa" and key.bits < min_bits:
                problems.append(f"{sender.id}: DKIM key {name}: RSA key of {key.bits} bits is "
                                f"below the minimum of {min_bits}")
            elif key.ktag not in (b"rsa", b"ed25519"):
                problems.append(f"{sender.id}: DKIM key {name}: key type "
                                f"{key.ktag.decode(errors='replace')} is not rsa or ed25519")
    return problems


async def _return_path(sender: Sender, resolver: Resolver) -> list[str]:
    problems = []
    for domain in dict.fromkeys(p.rpartition("@")[2] for p in sender.patterns):
        try:
            for rdtype in ("MX", "A", "AAAA"):
                answer = await resolver.query(domain, rdtype)
                if not answer.void:
                    break
            else:
                problems.append(f"{sender.id}: return-path domain {domain} has no MX, A or AAAA "
                                "record (bounces cannot reach it)")
        except DnsTempError as exc:
            problems.append(f"{sender.id}: return-path domain {domain}: look-up failed: {exc}")
        except DnsNameError:
            problems.append(f"{sender.id}: return-path domain {domain} is not a valid DNS name")
    return problems


def expiry_problems(sender: Sender, today: dt.date) -> list[str]:
    left = (sender.expires - today).days
    if left < 0:
        return [f"{sender.id}: the registration expired on {sender.expires.isoformat()}"]
    if left < EXPIRY_WARNING_DAYS:
        return [f"{sender.id}: the registration expires on {sender.expires.isoformat()}, in "
                f"{left} day(s) (less than {EXPIRY_WARNING_DAYS})"]
    return []


async def verify(sender: Sender, resolver: Resolver, *, today: dt.date, receiver: str,
                 min_rsa_bits: int = MIN_RSA_BITS, spf_time_limit: float = 20.0) -> list[str]:
    """Every problem of ``sender``'s registration, one line each; [] when it is ready."""
    spf, dkim, rp = await asyncio.gather(
        _spf(sender, resolver, receiver, spf_time_limit),
        _dkim(sender, resolver, max(MIN_RSA_BITS, min_rsa_bits)),
        _return_path(sender, resolver))
    return [*spf, *dkim, *rp, *expiry_problems(sender, today)]
