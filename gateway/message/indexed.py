"""A stdlib ``email.message.Message`` whose header look-ups use an index by field name.

The stdlib's ``get``, ``get_all`` and ``in`` scan every field and lower-case every name on each
call; the checks and the stdlib's own MIME accessors (``get_content_type``, ``get_params``,
``get_payload``...) call them some thirty times a message. :class:`IndexedMessage` answers them
from a dict of the fields by lower-cased name, built at the first look-up, and returns exactly
what the stdlib returns: the policy's ``header_fetch_parse`` of the first (every) matching field,
in order; under compat32, whose ``header_fetch_parse`` returns a ``str`` value without
surrogates as it is, that value itself without the call (tests/test_indexed_message.py compares
them over generated field sets, mutations included).

The index belongs to the field list itself (:class:`_Fields`, the message's ``_headers``): every
change to the list drops it, and any list assigned to ``_headers`` (as ``__init__``,
``__delitem__``, ``set_boundary`` and the parser do) becomes a :class:`_Fields`, so a message
changed by any of the stdlib's mutators, or by anything else that goes through ``_headers``, is
never answered from a stale index.
"""

from __future__ import annotations

from collections.abc import Iterable
from email.message import Message
from email.policy import compat32
from email.utils import _has_surrogates  # what compat32's header_fetch_parse tests
from typing import Any

# lower-cased name -> [(name, value, plain)] in field order; ``plain``: a str without
# surrogates, which compat32's header_fetch_parse returns unchanged
_Index = dict[str, list[tuple[Any, Any, bool]]]


class _Fields(list):
    """A message's ``_headers``: (name, value) pairs, with the index by lower-cased name that
    :class:`IndexedMessage` reads (``by_name``: None until built, and after any change)."""

    by_name: _Index | None = None

    def build(self) -> _Index:
        by_name: _Index = {}
        for k, v in self:  # as the stdlib iterates them (the same errors for a bad pair)
            entry = (k, v, isinstance(v, str) and (v.isascii() or not _has_surrogates(v)))
            found = by_name.get(k.lower())
            if found is None:
                by_name[k.lower()] = [entry]
            else:
                found.append(entry)
        self.by_name = by_name
        return by_name

    # every mutator of list drops the index
    def append(self, item: Any) -> None:
        self.by_name = None
        list.append(self, item)

    def extend(self, items: Any) -> None:
        self.by_name = None
        list.extend(self, items)

    def insert(self, i: Any, item: Any) -> None:
        self.by_name = None
        list.insert(self, i, item)

    def pop(self, *args: Any) -> Any:
        self.by_name = None
        return list.pop(self, *args)

    def remove(self, item: Any) -> None:
        self.by_name = None
        list.remove(self, item)

    def clear(self) -> None:
        self.by_name = None
        list.clear(self)

    def sort(self, *args: Any, **kwargs: Any) -> None:
        self.by_name = None
        list.sort(self, *args, **kwargs)

    def reverse(self) -> None:
        self.by_name = None
        list.reverse(self)

    def __setitem__(self, i: Any, item: Any) -> None:
        self.by_name = None
        list.__setitem__(self, i, item)

    def __delitem__(self, i: Any) -> None:
        self.by_name = None
        list.__delitem__(self, i)

    def __iadd__(self, items: Any) -> _Fields:
        self.by_name = None
        return list.__iadd__(self, items)

    def __imul__(self, n: Any) -> _Fields:
        self.by_name = None
        return list.__imul__(self, n)


class _FieldsSlot:
    """The ``_headers`` attribute: whatever list is assigned is kept as a :class:`_Fields`.
    No ``__get__``: reading ``_headers`` stays a plain instance-dict read."""

    def __set__(self, obj: Message, value: Any) -> None:
        obj.__dict__["_headers"] = value if type(value) is _Fields else _Fields(value)

    def __delete__(self, obj: Message) -> None:
        del obj.__dict__["_headers"]


class IndexedMessage(Message):
    """``email.message.Message`` (any policy; the gateway's is compat32) with indexed
    ``get``, ``get_all`` and ``in``; everything else is the stdlib's."""

    _headers = _FieldsSlot()

    def set_raw_fields(self, pairs: Iterable[tuple[str, Any]]) -> None:
        """``set_raw(name, value)`` for each pair, in order (a parser's API, as set_raw)."""
        self._headers.extend(pairs)

    def get(self, name: str, failobj: Any = None) -> Any:
        by_name = self._headers.by_name
        if by_name is None:
            by_name = self._headers.build()
        found = by_name.get(name.lower())
        if found is None:
            return failobj
        k, v, plain = found[0]
        policy = self.policy
        return v if plain and policy is compat32 else policy.header_fetch_parse(k, v)

    def get_all(self, name: str, failobj: Any = None) -> Any:
        by_name = self._headers.by_name
        if by_name is None:
            by_name = self._headers.build()
        found = by_name.get(name.lower())
        if found is None:
            return failobj
        policy = self.policy
        if policy is compat32:
            return [v if plain else policy.header_fetch_parse(k, v) for k, v, plain in found]
        return [policy.header_fetch_parse(k, v) for k, v, _ in found]

    def __contains__(self, name: object) -> bool:
        by_name = self._headers.by_name
        if by_name is None:
            by_name = self._headers.build()
        return name.lower() in by_name  # type: ignore[attr-defined]
