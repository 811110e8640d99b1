"""The engine's end-of-message result as milter responses (what Postfix then does)."""

from __future__ import annotations

from kilter.protocol import messages as m

from gateway.engine import Result
from gateway.message.replies import Reply


def reply_code(reply: Reply) -> m.ReplyCode:
    """SMFIR_REPLYCODE: the same code, enhanced code and text as the SMTP front's reply."""
    return m.ReplyCode(str(reply).encode("utf-8", "replace") + b"\0")


def header_value(value: str, leading_space: bool) -> bytes:
    # folded with LF + whitespace, as milter header values are; the MTA writes CRLF
    value = value.replace("\r\n", "\n")
    return ((" " if leading_space else "") + value).encode("utf-8", "replace")


def edits(result: Result, rcpt_forms: dict[str, list[bytes]], leading_space: bool,
          top: int = 0) -> list[m.Message]:
    """Header removals (SMFIR_CHGHEADER with an empty value, highest index first, so that the
    lower indexes still name the same fields), then the added fields inserted in order from
    header position ``top`` (SMFIR_INSHEADER), then the dropped recipients (SMFIR_DELRCPT, each
    as the MTA gave it)."""
    out: list[m.Message] = []
    for name, index in sorted(result.removals(), key=lambda p: (p[0].lower(), -p[1])):
        out.append(m.ChangeHeader(index, name, b""))
    for i, (name, value) in enumerate(result.headers):
        out.append(m.InsertHeader(top + i, name, header_value(value, leading_space)))
    for rcpt in result.dropped:
        for form in rcpt_forms.get(rcpt, ()):
            out.append(m.RemoveRecipient(form.decode("utf-8", "replace")))
    return out
