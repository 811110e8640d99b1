"""The unsubscribe check's DKIM h= reading (issue #14: read once per message, without a regular
expression) gives exactly the sets the earlier reading gave, for any DKIM-Signature value:
property-tested against that reading, kept here as the reference."""

from __future__ import annotations

import ipaddress
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.checks.base import Context
from gateway.checks.unsubscribe import dkim_signed_headers, signed_sets
from gateway.engine.message import parse_now

PROPS = settings(max_examples=500, deadline=None, derandomize=True, database=None)


def reference(value: str) -> set[str]:
    """gateway.checks.unsubscribe.dkim_signed_headers before issue #14."""
    for tag in value.split(";"):
        name, eq, tag_value = tag.partition("=")
        if eq and name.strip().lower() == "h":
            return {h.strip().lower() for h in re.sub(r"\s+", "", tag_value).split(":") if h}
    return set()


# every kind of white space a str pattern's \s or str.split() could (dis)agree on
SPACE = st.sampled_from([" ", "\t", "\r\n ", "\r\n\t", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e",
                         "\x1f", "\x85", "\xa0", "\u1680", "\u2000", "\u2028", "\u2029",
                         "\u202f", "\u3000", "\u200b", "\ufeff", ""])
NAME = st.sampled_from(["From", "to", "SUBJECT", "List-Unsubscribe", "list-unsubscribe-post",
                        "Date", "x-Ünï", "", "a=b", "İ"])
H_VALUE = st.lists(st.tuples(SPACE, NAME, SPACE), max_size=8).map(
    lambda items: ":".join(a + n + b for a, n, b in items))
TAG = st.one_of(
    st.tuples(SPACE, st.sampled_from(["h", "H", "bh", "v", "d", "hh", ""]), SPACE,
              st.sampled_from(["=", ""]), H_VALUE).map("".join),
    st.text(max_size=12))
VALUE = st.lists(TAG, max_size=6).map(";".join)


@PROPS
@given(VALUE)
def test_h_tag_read_as_the_reference_reads_it(value):
    assert dkim_signed_headers(value) == reference(value)


@PROPS
@given(st.text())
def test_any_text_read_as_the_reference_reads_it(value):
    assert dkim_signed_headers(value) == reference(value)
    assert dkim_signed_headers("h=" + value) == reference("h=" + value)


SIGNED = (b"DKIM-Signature: v=1; d=a.example; s=s1; h=From : To :\r\n"
          b"\tList-Unsubscribe; bh=x; b=y\r\n"
          b"Dkim-Signature: v=1; d=b.example; H=list-unsubscribe:list-unsubscribe-post; b=z\r\n"
          b"From: a@a.example\r\n\r\nbody\r\n")


def test_signed_sets_are_read_once_per_message_and_follow_the_message():
    ctx = Context(client_ip=ipaddress.ip_address("192.0.2.1"))
    ctx.message = parse_now(SIGNED)
    first = signed_sets(ctx, ctx.message)
    assert first == [frozenset({"from", "to", "list-unsubscribe"}),
                     frozenset({"list-unsubscribe", "list-unsubscribe-post"})]
    assert signed_sets(ctx, ctx.message) is first  # the second half reads the first's
    ctx.message = parse_now(b"From: a@a.example\r\n\r\nunsigned\r\n")
    assert signed_sets(ctx, ctx.message) == []  # another message: read again
