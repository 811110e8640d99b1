"""gateway.message.indexed.IndexedMessage answers every header look-up exactly as the stdlib's
Message does (issue #14: the index by name replaces the scans, never the answers): over
generated field sets (duplicates, names in odd case, folded values, 8-bit bytes as surrogates,
Header objects), after any sequence of the stdlib's mutators and of direct changes to the field
list, after copies and pickling, and for every entity of the messages the engine parses."""

from __future__ import annotations

import copy
import pickle
from email.header import Header
from email.message import Message
from email.parser import BytesParser
from email.policy import SMTP, compat32
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.engine.message import parse_now
from gateway.message.headers import HeaderError, split
from gateway.message.indexed import IndexedMessage

CORPUS = Path(__file__).parent / "corpus"
STDLIB = BytesParser(policy=compat32)
PROPS = settings(max_examples=300, deadline=None, derandomize=True, database=None)

BASE_NAMES = ["Subject", "From", "To", "Content-Type", "Content-Disposition", "DKIM-Signature",
              "List-Unsubscribe", "X-Campaign-ID", "Content-Transfer-Encoding", "X-Ünï"]
NAMES = st.sampled_from(BASE_NAMES).flatmap(
    lambda n: st.sampled_from([n, n.lower(), n.upper(), n.swapcase()]))
VALUES = st.one_of(
    st.sampled_from(["", " ", "text/plain; charset=us-ascii",
                     'attachment; filename="a.pdf"', "multipart/mixed; boundary=XX",
                     "a\r\n\tfolded value", "caf\udcc3\udca9 (8-bit bytes)", "<https://x/u>",
                     "v=1; h=from : to :\r\n subject"]),
    st.text(max_size=20),
    st.builds(lambda s: Header(s), st.text(alphabet="abc xyz", max_size=8)))
FIELDS = st.lists(st.tuples(NAMES, VALUES), max_size=12)
QUERIES = BASE_NAMES + [n.upper() for n in BASE_NAMES] + ["x-absent", "", "SUBJECT "]


def answer(value):
    """A fetched value, comparable across two messages: a Header is a new object each time."""
    return ("Header", str(value)) if isinstance(value, Header) else value


def answers(msg: Message):
    return ([(q, answer(msg.get(q)), answer(msg[q]), msg.get(q, "fail") == "fail",
              [answer(v) for v in msg.get_all(q) or []], msg.get_all(q, "none") == "none",
              q in msg) for q in QUERIES],
            [(k, answer(v)) for k, v in msg.items()], msg.keys())


def pair(fields, policy=compat32):
    plain, indexed = Message(policy=policy), IndexedMessage(policy=policy)
    for name, value in fields:
        plain.set_raw(name, value)
        indexed.set_raw(name, value)
    return plain, indexed


@PROPS
@given(FIELDS)
def test_lookups_answer_as_the_stdlib(fields):
    plain, indexed = pair(fields)
    assert answers(indexed) == answers(plain)
    assert answers(indexed) == answers(plain)  # the second time from the built index


@PROPS
@given(FIELDS)
def test_set_raw_fields_is_set_raw_for_each(fields):
    plain, _ = pair(fields)
    indexed = IndexedMessage(policy=compat32)
    indexed.get("Subject")  # an index built before the fields arrive
    indexed.set_raw_fields(fields)
    assert answers(indexed) == answers(plain)


def test_another_policy_goes_through_its_header_fetch_parse():
    fields = [("Subject", "=?utf-8?q?caf=C3=A9?="), ("To", "a@b.example, c@d.example"),
              ("subject", "second")]
    plain, indexed = pair(fields, policy=SMTP)
    assert [str(v) for v in indexed.get_all("SUBJECT")] == ["café", "second"]
    kinds = {type(indexed.get("to")).__name__, type(plain.get("to")).__name__}
    assert kinds == {"_UniqueAddressHeader"}  # (the registry makes a new class each time)
    assert ([(str(indexed.get(q)), [str(v) for v in indexed.get_all(q, [])]) for q in QUERIES]
            == [(str(plain.get(q)), [str(v) for v in plain.get_all(q, [])]) for q in QUERIES])


# every way the stdlib (or anything else) changes a message's fields
MUTATIONS = st.one_of(
    st.tuples(st.just("setitem"), NAMES, VALUES),
    st.tuples(st.just("delitem"), NAMES),
    st.tuples(st.just("set_raw"), NAMES, VALUES),
    st.tuples(st.just("replace_header"), NAMES, VALUES),
    st.tuples(st.just("add_header"), NAMES, st.sampled_from(["x", "attachment"])),
    st.tuples(st.just("set_param"), st.sampled_from(["charset", "name", "filename"]),
              st.sampled_from(["utf-8", "a.pdf"]),
              st.sampled_from(["content-type", "Content-Disposition"])),
    st.tuples(st.just("del_param"), st.sampled_from(["charset", "name"])),
    st.tuples(st.just("set_type"), st.sampled_from(["text/html", "multipart/mixed"])),
    st.tuples(st.just("set_boundary"), st.sampled_from(["b1", "b2"])),
    st.tuples(st.just("set_charset"), st.sampled_from(["utf-8", "us-ascii", None])),
    st.tuples(st.just("list"), st.sampled_from(["append", "insert", "pop", "setitem", "delitem",
                                                "sort", "reverse", "clear", "iadd", "imul",
                                                "assign", "remove", "extend"]), NAMES, VALUES),
)


def mutate(msg: Message, op: tuple) -> None:
    kind = op[0]
    try:
        if kind == "setitem":
            msg[op[1]] = op[2]
        elif kind == "delitem":
            del msg[op[1]]
        elif kind == "set_raw":
            msg.set_raw(op[1], op[2])
        elif kind == "replace_header":
            msg.replace_header(op[1], op[2])
        elif kind == "add_header":
            msg.add_header(op[1], op[2], filename="f.txt")
        elif kind == "set_param":
            msg.set_param(op[1], op[2], header=op[3])
        elif kind == "del_param":
            msg.del_param(op[1])
        elif kind == "set_type":
            msg.set_type(op[1])
        elif kind == "set_boundary":
            msg.set_boundary(op[1])
        elif kind == "set_charset":
            msg.set_charset(op[1])
        else:
            fields, what, name, value = msg._headers, op[1], op[2], op[3]
            if what == "append":
                fields.append((name, value))
            elif what == "insert":
                fields.insert(0, (name, value))
            elif what == "pop" and fields:
                fields.pop()
            elif what == "setitem" and fields:
                fields[0] = (name, value)
            elif what == "delitem" and fields:
                del fields[-1]
            elif what == "sort":
                fields.sort(key=lambda f: f[0].lower())
            elif what == "reverse":
                fields.reverse()
            elif what == "clear":
                fields.clear()
            elif what == "iadd":
                msg._headers += [(name, value)]
            elif what == "imul":
                msg._headers *= 2
            elif what == "assign":
                msg._headers = [(name, value), *fields]
            elif what == "remove" and fields:
                fields.remove(fields[0])
            elif what == "extend":
                fields.extend([(name, value)])
    except Exception as e:  # noqa: BLE001 - both messages must fail alike; compared below
        return type(e).__name__
    return None


@PROPS
@given(FIELDS, st.lists(MUTATIONS, max_size=8))
def test_lookups_stay_exact_after_any_mutation(fields, ops):
    plain, indexed = pair(fields)
    assert answers(indexed) == answers(plain)
    for op in ops:
        assert mutate(indexed, op) == mutate(plain, op)
        assert answers(indexed) == answers(plain), op
    assert list(indexed.raw_items()) == list(plain.raw_items())


@PROPS
@given(FIELDS)
def test_copies_and_pickles_answer_as_the_original(fields):
    plain, indexed = pair(fields)
    indexed.get("Subject")  # built index travels along
    for twin in (copy.deepcopy(indexed), copy.copy(indexed), pickle.loads(pickle.dumps(indexed))):
        assert type(twin) is IndexedMessage
        assert answers(twin) == answers(plain)
    twin = copy.deepcopy(indexed)
    twin["X-Campaign-ID"] = "only in the copy"
    assert twin.get("x-campaign-id") is not None or plain.get("x-campaign-id") is not None
    assert answers(indexed) == answers(plain)  # the original is untouched


def entities(msg: Message):
    yield msg
    payload = msg.get_payload()
    if isinstance(payload, list):
        for part in payload:
            yield from entities(part)


def mime_answers(msg: Message):
    """What the checks read of each entity through the stdlib's accessors (which call get)."""
    out = []
    for e in entities(msg):
        out.append((type(e).__name__ == "IndexedMessage", answers(e)[0], e.get_content_type(),
                    e.get_params(), e.get_params(header="content-disposition"),
                    e.get_filename(), e.get_boundary(), e.get_content_charset(),
                    e.get_content_disposition(), e.is_multipart(),
                    e.get_payload(decode=True) if not e.is_multipart() else None))
    return out


def test_every_parsed_entity_is_indexed_and_answers_as_the_stdlib():
    files = sorted(CORPUS.glob("*.eml"))
    assert len(files) > 20
    for path in files:
        content = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        expected = [(False, *a[1:]) for a in mime_answers(STDLIB.parsebytes(content))]
        got = mime_answers(parse_now(content))
        assert [a[0] for a in got] == [True] * len(got), path.name
        assert [(False, *a[1:]) for a in got] == expected, path.name
        try:
            fields = split(content).fields
        except HeaderError:
            continue
        got = mime_answers(parse_now(content, fields))
        assert [(False, *a[1:]) for a in got] == expected, path.name
