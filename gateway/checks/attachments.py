"""Policy IV.B.3.c.v: messages must not directly include attachments; documents, images and
other media reside on other services (a web server) and messages link to them.

The check walks the MIME tree the handler parsed once (stdlib ``email``, compat32); it never
parses again. It refuses, with 550 5.7.1 naming the part (IMAP-style number), its content type
and its file name:

- any part with a ``Content-Disposition`` other than ``inline`` (RFC 2183: an unknown disposition
  is an attachment), or with a file name (``filename`` or ``name`` parameter of
  Content-Disposition or Content-Type, RFC 2231 encoded ones included), whatever its type;
- any leaf whose type is not in ``allowed_types``: images, ``application/*`` (ms-tnef /
  winmail.dat too), audio, video, ``message/rfc822``, ``text/calendar``, ...;
- media embedded in HTML: parts referenced by ``cid:`` and ``data:`` URIs (unless
  ``allow_embedded``, and then their types must still be allowed);
- uuencoded files inside text parts.

MIME that cannot be checked with confidence is refused with 550 5.6.0, never passed: a parser
defect that hides structure (missing or unmatched boundaries, non-header lines in a header block,
an encoded multipart), an unparsable or repeated Content-Type / Content-Disposition /
Content-Transfer-Encoding, an unknown transfer encoding, boundaries that another parser could
confuse (one a prefix of an enclosing one, or an enclosing one's delimiter inside a part),
undecodable base64 HTML, nesting deeper than ``max_depth`` or more than ``max_parts`` parts.
The walk is iterative, so no message can exhaust the stack.
"""

from __future__ import annotations

import codecs
import html
import re
import unicodedata
from dataclasses import dataclass
from email import errors
from email.message import Message, _parseparam  # the splitter the stdlib parse uses
from email.utils import collapse_rfc2231_value
from urllib.parse import unquote

from gateway.checks.base import ACCEPT, Check, Context, Stage, Verdict, reject
from gateway.infra.config import CheckSettings
from gateway.infra.typed import ConfigError

POLICY = "policy IV.B.3.c.v"
_MEDIA_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/(?:[a-z0-9!#$&^_.+-]+|\*)\Z")
_TRANSFER_ENCODINGS = frozenset({"7bit", "8bit", "binary", "quoted-printable", "base64"})
# Parser defects after which the tree may not be what a mail client shows, and what to say.
_HIDING_DEFECTS = (
    (errors.NoBoundaryInMultipartDefect, "multipart without a boundary parameter"),
    (errors.StartBoundaryNotFoundDefect, "the multipart boundary never occurs"),
    (errors.CloseBoundaryNotFoundDefect, "the closing multipart boundary is missing"),
    (errors.MultipartInvariantViolationDefect, "a multipart without parts"),
    (errors.MissingHeaderBodySeparatorDefect, "a line in the header block is not a header"),
    (errors.FirstHeaderLineIsContinuationDefect, "the header block starts with a continuation"),
    (errors.InvalidMultipartContentTransferEncodingDefect,
     "a multipart with a transfer encoding other than 7bit, 8bit or binary"),
)
_SINGLE = ("content-type", "content-disposition", "content-transfer-encoding")
_DATA_URI = re.compile(rb"(?i)(?<=[=\"'(,])\s*data:\s*([a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+)?"
                       rb"(?:\s*;\s*[a-z0-9!#$&^_.+-]+(?:=[^,;\s\"'<>]*)?)*\s*,")
_CID_URI = re.compile(rb"(?i)(?<![a-z0-9_.+-])cid:([^\s\"'<>()\\]+)")
# "begin MODE NAME" followed by a uuencoded line (length character, then only ' '..'`').
_UUENCODE = re.compile(rb"(?m)^begin(?:-base64)? +[0-7]{3,4} +([^\r\n]+)\r?\n[!-M][ -`]{4,61}\r?$")
# Character references a browser would turn into a letter of "data:"/"cid:", ':' or a tab or
# newline (which URL parsing drops): only then is the HTML unescaped before the search.
_ENTITY = re.compile(rb"(?i)&(?:colon|tab|newline);|&#(?:0*(?:58|100|97|116|99|105|68|65|84|67"
                     rb"|73|9|10|13)(?![0-9])|x0*(?:3a|64|61|74|63|69|44|41|54|43|49|9|a|d)"
                     rb"(?![0-9a-f]))")
_SHOWN = 60  # characters of a file name or Content-ID quoted in a reply
# An RFC 2231 parameter name: NAME, NAME* (extended), NAME*N or NAME*N* (section N).
_PARAM_NAME = re.compile(r"([^*]*)(?:\*(0|[1-9][0-9]{0,2}))?(\*)?\Z")


@dataclass(frozen=True)
class AttachmentsSettings(CheckSettings):
    # Leaf content types that may be relayed: "type/subtype" or "type/*". Everything else
    # (images, application/*, audio, video, message/rfc822, text/calendar, ...) is refused.
    allowed_types: tuple[str, ...] = ("text/plain", "text/html")
    # Deepest nesting of multipart (and allowed message/*) containers; the top level is 1.
    max_depth: int = 10
    # Most MIME entities in the message, containers and the top level included.
    max_parts: int = 50
    # Media embedded in HTML, parts referenced by cid: and data: URIs: refused when false; when
    # true they are accepted if their types are in allowed_types.
    allow_embedded: bool = False

    def validate(self, file, prefix):
        for i, t in enumerate(self.allowed_types):
            if not _MEDIA_TYPE.match(t) or t.startswith("multipart/"):
                raise ConfigError(file, f"{prefix}.allowed_types[{i}]",
                                  f"{t!r}: expected a lower-case leaf type/subtype or type/*")
        if self.max_depth < 1:
            raise ConfigError(file, f"{prefix}.max_depth", "must be at least 1")
        if self.max_parts < 1:
            raise ConfigError(file, f"{prefix}.max_parts", "must be at least 1")


@dataclass(frozen=True)
class Finding:
    """Why a message is refused."""

    code: int
    enhanced: str
    text: str
    reason: str

    def verdict(self) -> Verdict:
        return reject(self.code, self.enhanced, self.text, self.reason)


@dataclass
class _Entity:
    part: Message
    label: str  # "part 1.2", or "the top-level part"
    ctype: str
    leaf: bool


def _ascii(c: str) -> str:
    if " " <= c <= "~" and c != '"':
        return c
    base = unicodedata.normalize("NFKD", c).encode("ascii", "ignore").decode()
    return base if base and all(" " <= b <= "~" and b != '"' for b in base) else "?"


def _clean(value: object, limit: int = _SHOWN) -> str:
    """A header-derived value made safe to quote in a one-line ASCII SMTP reply (accents
    dropped, other characters outside printable ASCII shown as '?')."""
    text = "".join(_ascii(c) for c in str(value).strip()[:limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."


def _allowed(ctype: str, allowed: tuple[str, ...]) -> bool:
    return ctype in allowed or f"{ctype.partition('/')[0]}/*" in allowed


def _malformed(where: str, what: str) -> Finding:
    return Finding(550, "5.6.0", f"Malformed MIME in {where}: {what}; the message cannot be "
                   f"checked for attachments ({POLICY})", "mime_malformed")


def _file_name(part: Message) -> str | None:
    """The part's file name (filename or name parameter, either header, RFC 2231 decoded);
    "" when the parameter is present but empty; None when there is none."""
    for header in ("content-disposition", "content-type"):
        raw = part.get(header)
        # the stdlib's parameter names are (lower-cased) parts of the value: a value without
        # "name" has neither parameter, and needs no parse (the parse of one that could
        # fail, a parameter both with and without sections, refused earlier: _param_problem)
        if raw is None or "name" not in str(raw).lower():
            continue
        for key, value in part.get_params([], header=header):
            if key in ("filename", "name"):
                return collapse_rfc2231_value(value) if value is not None else ""
    return None


def _describe(entity: _Entity) -> str:
    name = _file_name(entity.part)
    shown = "no file name" if name is None else f'file name "{_clean(name)}"'
    return f"{entity.label} ({entity.ctype}, {shown})"


def _param_problem(value: object) -> str | None:
    """Why a Content-Type or Content-Disposition value's parameters could be read two ways
    (RFC 2231), or None: a parameter given twice, both plain and extended (``boundary`` and
    ``boundary*``), plain or extended next to sections, sections not numbered 0..n-1."""
    forms: dict[str, list[str | None]] = {}
    for item in list(_parseparam(str(value)))[1:]:
        name = item.partition("=")[0].strip().lower()
        if not name:
            continue
        m = _PARAM_NAME.match(name)
        if m is None or not m.group(1):
            return f'unreadable parameter name "{_clean(name)}"'
        forms.setdefault(m.group(1), []).append(m.group(2))
    for name, sections in forms.items():
        numbered = sorted(int(n) for n in sections if n is not None)
        if (len(sections) > 1 and None in sections) or numbered != list(range(len(numbered))):
            return (f'parameter "{_clean(name)}" is given more than once or in more than one '
                    "form (RFC 2231)")
    return None


def _structure_problem(part: Message, ctype: str) -> str | None:
    """Why the entity's headers or parse cannot be trusted, or None."""
    for header in ("content-type", "content-disposition"):
        value = part.get(header)
        problem = None if value is None else _param_problem(value)
        if problem is not None:
            return f"{header.title()}: {problem}"
    for defect in part.defects:
        for kind, text in _HIDING_DEFECTS:
            if isinstance(defect, kind):
                return text
    for name in _SINGLE:
        if len(part.get_all(name, ())) > 1:
            return f"more than one {name.title()} header"
    raw = part.get("content-type")
    if raw is not None and str(raw).split(";", 1)[0].strip().lower() != ctype:
        return f'unparsable Content-Type "{_clean(raw)}"'
    cte = part.get("content-transfer-encoding")
    if cte is not None and str(cte).strip().lower() not in _TRANSFER_ENCODINGS:
        return f'unknown Content-Transfer-Encoding "{_clean(cte)}"'
    if ctype.startswith("multipart/") and not part.is_multipart():
        return "a multipart without parts"
    return None


def _delimiter_in(text: object, boundaries: tuple[str, ...]) -> str | None:
    """An enclosing boundary whose delimiter starts a line of ``text``, if any."""
    if not isinstance(text, str) or "--" not in text:
        return None
    for b in boundaries:
        delimiter = "--" + b
        if text.startswith(delimiter) or ("\n" + delimiter) in text:
            return b
    return None


def _body(part: Message) -> bytes | None:
    """The decoded body of a leaf (stdlib decoding), or None when its base64 is undecodable."""
    body = part.get_payload(decode=True)
    if not isinstance(body, bytes):
        return b""
    if any(isinstance(d, errors.InvalidBase64LengthDefect) for d in part.defects):
        return None
    return body


def _as_ascii_compatible(body: bytes, charset: object) -> bytes:
    """HTML in a charset where ASCII is not ASCII (UTF-16, UTF-32, UTF-7...), transcoded to
    UTF-8 so that byte patterns find ``data:`` and ``cid:`` in it."""
    if not isinstance(charset, str) or not charset:
        return body
    try:
        codec = codecs.lookup(charset.strip().lower())
    except (LookupError, ValueError):
        return body
    try:
        if "data:cid:".encode(codec.name) == b"data:cid:":
            return body
    except (UnicodeError, LookupError):  # pragma: no cover - codec without an encoder
        pass
    return body.decode(codec.name, "replace").encode("utf-8", "replace")


def _html_refs(body: bytes) -> tuple[set[str], list[str]]:
    """The Content-IDs referenced by ``cid:`` and the media types of ``data:`` URIs (""
    for none given) in an HTML body. As a browser would, character references that could spell
    them (&#58; &colon; &Tab;...) are decoded first, and tabs and newlines (which URL parsing
    drops) are ignored."""
    if _ENTITY.search(body):
        body = html.unescape(body.decode("latin-1")).encode("latin-1", "replace")
    body = body.translate(None, b"\t\r\n")
    lower = body.lower()
    cids: set[str] = set()
    data: list[str] = []
    if b"cid:" in lower:
        cids = {unquote(m.group(1).decode("latin-1")).strip().lower()
                for m in _CID_URI.finditer(body)}
    if b"data:" in lower:
        data = [(m.group(1) or b"").decode("latin-1").lower() for m in _DATA_URI.finditer(body)]
    return cids, data


def inspect(message: Message, settings: AttachmentsSettings) -> Finding | None:
    """Judge the parsed MIME tree; the first problem found, or None when it may be relayed."""
    # 1. Structure: walk every entity (iteratively), refuse what cannot be trusted.
    entities: list[_Entity] = []
    stack: list[tuple[Message, str, int, tuple[str, ...]]] = [(message, "", 0, ())]
    while stack:
        part, number, depth, bounds = stack.pop()
        if not isinstance(part, Message):
            return _malformed(f"part {number}", "not a MIME entity")
        label = f"part {number}" if number else "the top-level part"
        if len(entities) >= settings.max_parts:
            return Finding(550, "5.6.0", f"Too many MIME parts: more than {settings.max_parts} "
                           f"({POLICY}); send fewer parts and link to content instead",
                           "mime_too_many_parts")
        ctype = part.get_content_type()
        problem = _structure_problem(part, ctype)
        if problem is not None:
            return _malformed(label, problem)
        maintype = ctype.partition("/")[0]
        container = maintype == "multipart" or (
            maintype == "message" and part.is_multipart() and _allowed(ctype,
                                                                       settings.allowed_types))
        entities.append(_Entity(part, label, ctype, leaf=maintype != "multipart"))
        if not container:
            if part.is_multipart() and maintype != "message":
                return _malformed(label, "a non-multipart part with sub-parts")
            clash = _delimiter_in(part.get_payload(), bounds) if bounds else None
            if clash is not None:
                return _malformed(label, f'a line starts with the delimiter of enclosing '
                                  f'boundary "{_clean(clash)}"')
            continue
        if depth + 1 > settings.max_depth:
            return Finding(550, "5.6.0", f"MIME nesting is deeper than {settings.max_depth} "
                           f"levels at {label} ({ctype}) ({POLICY})", "mime_too_deep")
        if maintype == "multipart":
            boundary = part.get_boundary()
            for outer in bounds:
                if boundary.startswith(outer) or outer.startswith(boundary):
                    return _malformed(label, f'boundary "{_clean(boundary)}" overlaps enclosing '
                                      f'boundary "{_clean(outer)}" (one is a prefix of the other)')
            bounds = (*bounds, boundary)
            for text in (part.preamble, part.epilogue):
                clash = _delimiter_in(text, bounds)
                if clash is not None:
                    return _malformed(label, f'the preamble or epilogue holds the delimiter '
                                      f'of boundary "{_clean(clash)}"')
        children = part.get_payload()
        prefix = f"{number}." if number else ""
        for i in range(len(children), 0, -1):
            stack.append((children[i - 1], f"{prefix}{i}", depth + 1, bounds))

    # 2. Media embedded in HTML: which Content-IDs are referenced, which data: URIs appear.
    referenced: set[str] = set()
    data_uris: list[tuple[_Entity, str]] = []
    content_ids = any(e.part.get("content-id") is not None for e in entities)
    for e in entities:
        if e.ctype != "text/html" or not e.leaf:
            continue
        body = _body(e.part)
        if body is None:
            return _malformed(e.label, "undecodable base64 in HTML")
        charset = e.part.get_param("charset")  # RFC 2231 encoded or not
        body = _as_ascii_compatible(body, None if charset is None
                                    else collapse_rfc2231_value(charset))
        cids, data = _html_refs(body)
        if content_ids:
            referenced |= cids
        data_uris += [(e, t) for t in data]

    # 3. Every entity in document order: disposition, file name, type, embedded files.
    allowed = settings.allowed_types
    for e in entities:
        disposition = e.part.get_content_disposition()
        if disposition is not None and disposition != "inline":
            return Finding(550, "5.7.1", f"Attachments are not accepted ({POLICY}): "
                           f"{_describe(e)} has Content-Disposition: {_clean(disposition or '?')}"
                           "; put the file on a web server and link to it", "attachment")
        if _file_name(e.part) is not None:
            return Finding(550, "5.7.1", f"Attachments are not accepted ({POLICY}): "
                           f"{_describe(e)} carries a file name; put the file on a web server "
                           "and link to it", "attachment_filename")
        if not e.leaf:
            continue
        cid = e.part.get("content-id")
        cid_key = str(cid).strip().strip("<>").strip().lower() if cid is not None else ""
        embedded = bool(cid_key) and cid_key in referenced
        if embedded and (not settings.allow_embedded or not _allowed(e.ctype, allowed)):
            return Finding(550, "5.7.1", f"Embedded media are not accepted ({POLICY}): "
                           f"{_describe(e)} is embedded by cid:{_clean(cid_key)}; put it on a "
                           "web server and link to it", "cid_media")
        if not _allowed(e.ctype, allowed):
            return Finding(550, "5.7.1", f"Content type {e.ctype} is not accepted ({POLICY}): "
                           f"{_describe(e)}; accepted types: {', '.join(allowed)}; put the "
                           "content on a web server and link to it", "media_type")
        if e.ctype == "text/plain":
            body = _body(e.part)
            if body is not None and b"begin" in body:
                m = _UUENCODE.search(body)
                if m is not None:
                    return Finding(550, "5.7.1", f"Attachments are not accepted ({POLICY}): "
                                   f"{_describe(e)} holds a uuencoded file \""
                                   f"{_clean(m.group(1).decode('latin-1'))}\"; put the file "
                                   "on a web server and link to it", "uuencoded_file")
    for e, media in data_uris:
        if not settings.allow_embedded or not _allowed(media or "text/plain", allowed):
            return Finding(550, "5.7.1", f"Embedded media are not accepted ({POLICY}): "
                           f"{_describe(e)} embeds {media or 'content'} in a data: URI; put it "
                           "on a web server and link to it", "data_uri")
    return None


class Attachments(Check):
    name = "attachments"
    stage = Stage.DATA
    description = "no attachments, files or embedded media; only allowed MIME types"
    Settings = AttachmentsSettings

    async def check(self, ctx: Context) -> Verdict:
        if ctx.message is None:
            return _malformed("the message", "no MIME structure").verdict()
        settings = self.settings(ctx)
        try:
            finding = inspect(ctx.message, settings)
        except Exception:  # noqa: BLE001 - a message we cannot analyse is refused, not passed
            finding = Finding(550, "5.6.0", "Malformed MIME: the message structure cannot be "
                              f"analysed; it cannot be checked for attachments ({POLICY})",
                              "mime_unanalysable")
        return ACCEPT if finding is None else finding.verdict()
