"""``gateway arc keygen``: a new ARC signing key in ``[arc] key_file`` and its DNS record."""

from __future__ import annotations

import os
import sys

from gateway.message.arc import dns_record, generate_key
from gateway.ops.cli import audit_cli
from gateway.infra.config import load_config


def cmd_arc_keygen(args) -> int:
    config = load_config(args.config)
    arc = config.arc
    if not arc.domain or not arc.selector:
        print(f"error: {config.file}: arc: set domain and selector first (the DNS record is "
              "published at <selector>._domainkey.<domain>)", file=sys.stderr)
        return 2
    path = config.path(arc.key_file)
    if path.exists() and not args.force:
        print(f"error: {path} exists; --force replaces it (publish the new record first: "
              "seals made with the old key stop verifying)", file=sys.stderr)
        return 1
    pem, public = generate_key(args.bits)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.replace(tmp, path)
    status = audit_cli(config, "arc_keygen", key_file=str(path), selector=arc.selector,
                       domain=arc.domain, bits=args.bits, replaced=bool(args.force))
    print(dns_record(arc.selector, arc.domain, public))
    return status


def add_parser(sub, common) -> None:
    arc = sub.add_parser("arc", parents=[common], help="ARC sealing (RFC 8617)"
                         ).add_subparsers(dest="arc_command", required=True)
    keygen = arc.add_parser("keygen", parents=[common], help="write a new RSA key to [arc] "
                            "key_file and print its DNS TXT record")
    keygen.add_argument("--force", action="store_true", help="replace an existing key file")
    keygen.add_argument("--bits", type=int, default=2048, choices=(2048, 3072, 4096),
                        help="RSA key size in bits (default: %(default)s)")
    keygen.set_defaults(func=cmd_arc_keygen)
