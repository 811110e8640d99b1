"""Header edits as a front applies them: the SMTP front rewrites the bytes it relays
(:func:`gateway.checks.base.strip_header_fields`); the milter front names each field to remove
by its name and its index among the fields of that name, as SMFIR_CHGHEADER does."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from gateway.checks.base import header_fields


def field_positions(raw: bytes, predicates: list[Callable[[str, str], bool]]
                    ) -> list[tuple[str, int]]:
    """(name, 1-based index among the fields of that name, case-insensitively) of each field
    of ``raw``'s header block that any predicate matches, given (name, unfolded value)."""
    if not predicates:
        return []
    seen: Counter[str] = Counter()
    out = []
    for name, value, _ in header_fields(raw):
        key = name.strip().lower()
        seen[key] += 1
        if any(p(name, value) for p in predicates):
            out.append((name.strip(), seen[key]))
    return out
