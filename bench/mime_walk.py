"""Benchmark: CPU cost of the attachments check's MIME walk on a 100 KB newsletter.

The handler parses each message once (stdlib ``BytesParser``, compat32); the attachments check
then walks that tree without parsing again. This measures both, separately, in the same run: the
parse is the baseline (about 1.8 ms per 100 KB on the reference machine), the walk has a budget
of 2 ms of CPU per 100 KB. The message_class and unsubscribe header checks are timed too.

    .venv-test/bin/python bench/mime_walk.py [--size 102400] [--rounds 300] [--check]

With ``--check`` the exit status is 1 when the walk exceeds its budget. Figures are CPU time
(``time.process_time``) per message, median and 90th percentile over the rounds, and scaled to
100 KB.
"""

from __future__ import annotations

import argparse
import ipaddress
import quopri
import statistics
import sys
import time
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.checks.attachments import AttachmentsSettings, inspect  # noqa: E402
from gateway.checks.base import Context  # noqa: E402
from gateway.checks.message_class import declared_class  # noqa: E402
from gateway.checks.unsubscribe import Unsubscribe  # noqa: E402

BUDGET_MS = 2.0  # CPU per 100 KB for the walk

HEAD = (
    "From: Acme University Events <events@em.acme.example>\r\n"
    "To: Alice Student <alice@example.edu>\r\n"
    "Subject: Fall events newsletter\r\n"
    "Date: Mon, 02 Nov 2026 15:00:00 +0000\r\n"
    "Message-ID: <bench-1@em.acme.example>\r\n"
    "MIME-Version: 1.0\r\n"
    "X-Message-Class: promotional\r\n"
    "List-Unsubscribe: <https://em.acme.example/u/Zx81kq0f>, <mailto:unsub@em.acme.example>\r\n"
    "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=em.acme.example; s=s1;\r\n"
    " h=from:to:subject:date:message-id:list-unsubscribe:list-unsubscribe-post;\r\n"
    " bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=c2lnbmF0dXJl\r\n"
    "Content-Type: multipart/alternative; boundary=\"=_bench_alt_01\"\r\n"
    "\r\n")

ARTICLE_HTML = (
    "<tr><td class=\"article\" style=\"padding:16px 24px;font-family:Arial,Helvetica,sans-serif;"
    "font-size:15px;line-height:22px;color:#222222\"><h2 style=\"margin:0 0 8px 0\">Event {i}: "
    "Lecture series &amp; reception</h2><p style=\"margin:0 0 12px 0\">Join us on the Quad for "
    "the {i}th gathering of the season. There&#8217;s food, music and a talk by a visiting "
    "professor &mdash; everyone is welcome.</p><p><a href=\"https://em.acme.example/c/{i}?"
    "utm_source=newsletter&amp;utm_medium=email&amp;utm_campaign=fall26\" style=\"color:#0a58"
    "ca\">Read more</a> &nbsp;|&nbsp; <a href=\"https://events.example.edu/e/{i}\">Add to your "
    "calendar</a></p><img src=\"https://img.em.acme.example/fall26/e{i}.jpg\" width=\"552\" "
    "height=\"200\" alt=\"Event {i}\" style=\"display:block;border:0\"></td></tr>\n")
ARTICLE_TEXT = ("Event {i}: Lecture series and reception\n"
                "Join us on the Quad for the {i}th gathering of the season. There's food, music "
                "and a talk by a visiting professor - everyone is welcome.\n"
                "Read more: https://em.acme.example/c/{i}?utm_source=newsletter\n\n")


def newsletter(size: int) -> bytes:
    """A multipart/alternative newsletter (quoted-printable text and HTML) of about ``size``."""
    html, text, i = [], [], 0
    while True:
        i += 1
        html.append(ARTICLE_HTML.format(i=i))
        text.append(ARTICLE_TEXT.format(i=i))
        body = _assemble(html, text)
        if len(body) >= size:
            return body


def _assemble(html: list[str], text: list[str]) -> bytes:
    page = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"></head><body><table width=\"100%\""
            " role=\"presentation\">\n" + "".join(html) + "</table></body></html>\n")

    def qp(s: str) -> str:
        return quopri.encodestring(s.encode()).decode().replace("\n", "\r\n")

    return (HEAD + "--=_bench_alt_01\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: quoted-printable\r\n\r\n" + qp("".join(text)) +
            "\r\n--=_bench_alt_01\r\nContent-Type: text/html; charset=utf-8\r\n"
            "Content-Transfer-Encoding: quoted-printable\r\n\r\n" + qp(page) +
            "\r\n--=_bench_alt_01--\r\n").encode()


class _Deps:
    class config:  # noqa: N801 - stands in for gateway.config.Config
        @staticmethod
        def check_settings(name):
            from gateway.checks import CHECK_SETTINGS

            return CHECK_SETTINGS[name]()


def _cpu(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.process_time_ns()
        fn()
        out.append((time.process_time_ns() - t0) / 1e6)
    return out


def _line(name: str, samples: list[float], scale: float) -> str:
    median = statistics.median(samples)
    p90 = statistics.quantiles(samples, n=10)[-1]
    return (f"{name:<22} median {median:7.3f} ms  p90 {p90:7.3f} ms  "
            f"= {median * scale:6.3f} ms CPU per 100 KB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=100 * 1024, help="message size in bytes")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--check", action="store_true", help="exit 1 when the walk is over budget")
    args = ap.parse_args(argv)

    raw = newsletter(args.size)
    parser = BytesParser(policy=compat32)
    settings = AttachmentsSettings()
    message = parser.parsebytes(raw)
    assert inspect(message, settings) is None, "the benchmark newsletter must pass the check"
    unsubscribe = Unsubscribe(_Deps)

    def headers():
        declared_class(message, "X-Message-Class")
        ctx = Context(client_ip=ipaddress.ip_address("127.0.0.1"), message=message)
        coro = unsubscribe.check(ctx)
        try:
            coro.send(None)
        except StopIteration:
            pass

    for _ in range(20):  # warm up
        parser.parsebytes(raw)
        inspect(message, settings)
    parse = _cpu(lambda: parser.parsebytes(raw), args.rounds)
    walk = _cpu(lambda: inspect(message, settings), args.rounds)
    head = _cpu(headers, args.rounds)
    scale = 100 * 1024 / len(raw)
    print(f"message: {len(raw)} bytes, multipart/alternative (QP text + QP HTML), "
          f"{args.rounds} rounds, Python {sys.version.split()[0]}")
    print(_line("parse (baseline)", parse, scale))
    print(_line("attachments walk", walk, scale))
    print(_line("class + unsubscribe", head, scale))
    ratio = statistics.median(walk) / statistics.median(parse)
    over = statistics.median(walk) * scale > BUDGET_MS
    print(f"walk / parse = {ratio:.2f}; budget {BUDGET_MS} ms CPU per 100 KB: "
          f"{'OVER' if over else 'ok'}")
    return 1 if over and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
