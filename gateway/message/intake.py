"""The first step of the DATA path, before any check: the one canonical form of the message
that every check judges and campus mail receives (plus only the gateway's own fields).

:func:`admit` splits the header block once (:mod:`gateway.message.headers`), refuses what
readers could disagree on (``550 5.6.0``) and mail loops (``554 5.4.6``, RFC 5321 6.3), and
removes Authentication-Results fields claiming the gateway's own name (RFC 8601 5) *before*
the checks run, so that no check judges a field campus mail will not receive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.checks.auth_results import HEADER, claims
from gateway.checks.base import Verdict, reject
from gateway.message.headers import (Field, HeaderBlock, HeaderError, check_body, check_unique,
                                     count, split)


@dataclass(frozen=True)
class Admitted:
    content: bytes  # the message the checks judge and the relay sends
    fields: tuple[Field, ...]  # its header fields, exactly as in ``content``


def refusal(error: HeaderError) -> Verdict:
    return reject(error.code, error.enhanced, error.text, error.reason)


def loop_problem(fields: tuple[Field, ...], max_received: int) -> HeaderError | None:
    return _loop_problem(count((f.name for f in fields), "Received"), max_received)


def _loop_problem(hops: int, max_received: int) -> HeaderError | None:
    if hops >= max_received:
        return HeaderError(f"Too many Received fields ({hops}, at most {max_received - 1}): "
                           "mail loop (RFC 5321 6.3)", "mail_loop", 554, "5.4.6")
    return None


def without(block: HeaderBlock, predicates: list[Callable[[str, str], bool]]) -> HeaderBlock:
    """``block`` without the fields any predicate matches, given (name, unfolded value)."""
    if not predicates:
        return block
    kept = tuple(f for f in block.fields if not any(p(f.name, f.unfolded()) for p in predicates))
    return block if len(kept) == len(block.fields) else HeaderBlock(kept, block.body,
                                                                     block.separated)


def admit(content: bytes, *, hostname: str, max_received: int) -> Admitted | Verdict:
    """The canonical message, or the refusal (a Verdict) when there is none."""
    try:
        block = split(content)
        names = [f.name.lower() for f in block.fields]  # once, for the three looks below
        check_unique(names)
        check_body(block.body)
    except HeaderError as exc:
        return refusal(exc)
    problem = _loop_problem(names.count("received"), max_received)
    if problem is not None:
        return refusal(problem)
    # (a field's unfolded value is made only for an Authentication-Results field)
    kept = without(block, [claims(hostname)]) if HEADER.lower() in names else block
    if kept is block:
        return Admitted(content, block.fields)
    return Admitted(kept.assemble(), kept.fields)
