"""The attachments check's cheaper header reading (issue #14) judges every message as before:
a file name looked up only in a Content-Type / Content-Disposition value that could hold one,
repeated MIME fields counted through the indexed look-up. Property-tested: inspect() with the
new helpers against inspect() with the earlier ones (kept here as the reference), on generated
MIME messages (parameters in every RFC 2231 form, odd case, quoting, bare names, parameters
the stdlib cannot parse, repeated fields, nested parts), parsed as the engine parses them and
by the stdlib parser."""

from __future__ import annotations

from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from email.utils import collapse_rfc2231_value

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.checks import attachments
from gateway.checks.attachments import AttachmentsSettings, inspect
from gateway.engine.message import parse_now

STDLIB = BytesParser(policy=compat32)
PROPS = settings(max_examples=400, deadline=None, derandomize=True, database=None)


def reference_file_name(part: Message) -> str | None:
    """gateway.checks.attachments._file_name before issue #14."""
    for header in ("content-disposition", "content-type"):
        params = [] if part.get(header) is None else part.get_params([], header=header)
        for key, value in params:
            if key in ("filename", "name"):
                return collapse_rfc2231_value(value) if value is not None else ""
    return None


def reference_structure_problem(part: Message, ctype: str) -> str | None:
    """gateway.checks.attachments._structure_problem before issue #14."""
    for header in ("content-type", "content-disposition"):
        value = part.get(header)
        problem = None if value is None else attachments._param_problem(value)
        if problem is not None:
            return f"{header.title()}: {problem}"
    for defect in part.defects:
        for kind, text in attachments._HIDING_DEFECTS:
            if isinstance(defect, kind):
                return text
    seen = [k.lower() for k in part.keys()]
    for name in attachments._SINGLE:
        if seen.count(name) > 1:
            return f"more than one {name.title()} header"
    raw = part.get("content-type")
    if raw is not None and str(raw).split(";", 1)[0].strip().lower() != ctype:
        return f'unparsable Content-Type "{attachments._clean(raw)}"'
    cte = part.get("content-transfer-encoding")
    if cte is not None and str(cte).strip().lower() not in attachments._TRANSFER_ENCODINGS:
        return f'unknown Content-Transfer-Encoding "{attachments._clean(cte)}"'
    if ctype.startswith("multipart/") and not part.is_multipart():
        return "a multipart without parts"
    return None


PARAMS = st.sampled_from([
    "charset=us-ascii", "NAME=a.txt", "name", "Name", "name=", 'name=""', "filename=a.pdf",
    "FileName*=utf-8''caf%C3%A9.txt", "name*0=a; name*1=b.txt", "name*=x", "name*0*=''a%20b",
    "filename*0=a; filename*1=b", "foo*=x; foo*0=y", "foo*0=a; foo*2=c", "foo=1; foo=2",
    "fİlename=x", "x-name=y", 'x="a;name=b"', "x=\"name\\\";y\"", "surname=z", "nAmE*=''q",
    "format=flowed", "delsp=yes", "a*0*=us-ascii'en'%41; a*1=b", "=v", "*=v", "n\u00e4me=v"])
TYPES = st.sampled_from(["text/plain", "TEXT/Plain", "text/html", "application/pdf",
                         "image/png", "name", "text/plain name", ""])
DISPOSITIONS = st.sampled_from(["inline", "attachment", "INLINE", "name", "filename", ""])


def with_params(base: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.tuples(base, st.lists(PARAMS, max_size=3)).map(
        lambda t: "; ".join([t[0], *t[1]]))


ENTITY_FIELDS = st.lists(st.one_of(
    with_params(TYPES).map(lambda v: f"Content-Type: {v}"),
    with_params(DISPOSITIONS).map(lambda v: f"Content-Disposition: {v}"),
    st.sampled_from(["Content-Transfer-Encoding: 7bit", "Content-Transfer-Encoding: base64",
                     "content-type: text/plain", "Content-ID: <c1>", "X-Other: name=x"])),
    max_size=4)
BODIES = st.sampled_from(["hello", "begin 644 a.txt\r\nM86)C\r\n`\r\nend",
                          '<img src="cid:c1">', "aGVsbG8=", ""])


def entity(fields: list[str], body: str) -> str:
    return "".join(f + "\r\n" for f in fields) + "\r\n" + body + "\r\n"


MESSAGES = st.one_of(
    st.tuples(ENTITY_FIELDS, BODIES).map(lambda t: "From: a@b.example\r\n" + entity(*t)),
    st.tuples(st.lists(st.tuples(ENTITY_FIELDS, BODIES), min_size=1, max_size=3),
              st.sampled_from(["multipart/mixed", "multipart/alternative"])).map(
        lambda t: "From: a@b.example\r\nMIME-Version: 1.0\r\n"
                  f"Content-Type: {t[1]}; boundary=XX\r\n\r\n"
                  + "".join("--XX\r\n" + entity(*p) for p in t[0]) + "--XX--\r\n"))


def judged(message: Message):
    try:
        return inspect(message, AttachmentsSettings())
    except Exception as exc:  # noqa: BLE001 - the check refuses these (mime_unanalysable)
        return type(exc).__name__




@PROPS
@given(MESSAGES)
def test_messages_are_judged_as_before(message):
    content = message.encode("utf-8", "surrogateescape")
    engine, stdlib = parse_now(content), STDLIB.parsebytes(content)
    new = (judged(engine), judged(stdlib))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attachments, "_file_name", reference_file_name)
        mp.setattr(attachments, "_structure_problem", reference_structure_problem)
        old = (judged(parse_now(content)), judged(STDLIB.parsebytes(content)))
    assert new == old
    assert new[0] == new[1]


@PROPS
@given(ENTITY_FIELDS)
def test_file_name_of_a_well_formed_entity_is_as_before(fields):
    """Wherever the structure check lets a part through, its file name is read as before."""
    part = parse_now(entity(fields, "x").encode("utf-8", "surrogateescape"))
    if attachments._structure_problem(part, part.get_content_type()) is not None:
        return
    try:
        expected = reference_file_name(part)
    except Exception as exc:  # noqa: BLE001
        expected = type(exc).__name__
    assert attachments._file_name(part) == expected
