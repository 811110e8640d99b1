#!/usr/bin/env python3
"""DKIM verification of a message with many unsigned header fields, with and without showing
dkimpy only the fields the signature's h= names (gateway.checks.auth_dkim._verify_all), in one
run. dkimpy canonicalizes every field of the message before picking the signed ones; vendor
mail carries Received chains and X- fields no signature covers.

    .venv-test/bin/python bench/dkim_headers.py          # 30 fields, 7 signed, 10 KB body

CPU is time.process_time() per verification (the key already parsed, as from the cache),
median of --rounds rounds of -n; the ratio is filtered / unfiltered. No network; a few seconds.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dkim  # noqa: E402

from gateway.checks import auth_dkim as ad  # noqa: E402
from gateway.message.headers import split  # noqa: E402

SIGNED = [b"from", b"to", b"subject", b"date", b"message-id", b"list-unsubscribe",
          b"list-unsubscribe-post"]


def message(extra: int) -> bytes:
    head = b"Received: from mta.vendor.example by relay.vendor.example; Sun, 29 Nov 2026 " \
           b"10:00:00 +0000\r\n" * 4
    head += b"".join(b"X-Vendor-%d: a moderately long value %d, folded\r\n\tand continued\r\n"
                     % (i, i) for i in range(extra))
    head += (b"From: News <news@em.bench.example>\r\nTo: s@example.edu\r\nSubject: Hello\r\n"
             b"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@em.bench.example>\r\n"
             b"List-Unsubscribe: <https://u.example/x>\r\n"
             b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\n")
    return head + (b"Hello world. " * 6 + b"\r\n") * 120


def unfiltered(verifier, sigs, keys, opts):
    """What _verify_all did before: dkimpy sees every field."""
    return [s.early if s.early is not None else ad._verify(verifier, s, keys[ad._key_name(s)],
                                                            opts) for s in sigs]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=400)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--extra", type=int, default=19, help="unsigned X- fields (default 19)")
    args = p.parse_args()
    key = subprocess.run(["openssl", "genrsa", "2048"], capture_output=True, check=True).stdout
    pub = subprocess.run(["openssl", "rsa", "-pubout", "-outform", "DER"], input=key,
                         capture_output=True, check=True).stdout
    msg = message(args.extra)
    raw = dkim.sign(msg, b"bench", b"em.bench.example", key,
                    canonicalize=(b"relaxed", b"simple"), include_headers=SIGNED) + msg
    name = "bench._domainkey.em.bench.example"
    keys = {name: ad._parse_key(b"v=DKIM1; k=rsa; p=" + base64.b64encode(pub), name)}
    opts = ad.DkimOptions(now=time.time())
    fields = split(raw).fields
    medians = {}
    for label, verify_all in (("only the signed fields", ad._verify_all),
                              ("every field (before)", unfiltered)):
        times = []
        for _ in range(args.rounds):
            t0 = time.process_time()
            for _ in range(args.n):
                verifier, sigs, _ = ad._prepare(raw, opts, fields)
                [result] = verify_all(verifier, sigs, keys, opts)
                assert result.result == "pass", result
            times.append((time.process_time() - t0) / args.n * 1e6)
        medians[label] = statistics.median(times)
        print(f"{label:24s} {medians[label]:7.1f} us a verification")
    print(f"{len(fields)} fields, {len(SIGNED)} signed: filtered / every field = "
          f"{medians['only the signed fields'] / medians['every field (before)']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
