"""Content controls (issue 4) end to end: modes, global and per-sender settings, the message
class in the log line and metrics, and the configuration schema of the three checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.infra.config import load_config
from gateway.policy.senders import load_sender
from gateway.infra.typed import ConfigError
from tests.conftest import EXAMPLE_SENDER, send

CORPUS = Path(__file__).parent / "corpus"
ACME_TP = EXAMPLE_SENDER + 'classes = ["transactional", "promotional"]\n'


def corpus(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def test_attachments_monitor_mode_relays_and_records_the_would_be_rejection(gateways, sink,
                                                                            logs):
    gw = gateways.start('[checks.attachments]\nmode = "monitor"\n', upstream=sink.url)
    client, (code, _) = send(gw, message=corpus("pdf-attachment.eml"))
    client.quit()
    assert code == 250 and len(sink.messages) == 1
    [line] = logs.events("message")
    assert line["decision"] == "accept"
    assert line["monitored"] == [{"check": "attachments", "would": "reject",
                                  "reason": "attachment"}]
    assert gw.metric("gateway_check_monitored_total", check="attachments", action="reject") == 1


def test_message_bodies_and_file_contents_are_never_logged(gateways, sink, logs):
    gw = gateways.start(upstream=sink.url)
    for name in ("newsletter-alternative.eml", "disguised-text-attachment.eml",
                 "uuencoded-in-text.eml"):
        client, _ = send(gw, message=corpus(name))
        client.quit()
    text = logs.text()
    assert len(logs.events("message")) == 3
    for body in ("Fall Festival is on November", "Amount due", "M)5!$1BTQ", "Your invoice is"):
        assert body not in text


def test_unsubscribe_off_mode_relays_without_list_unsubscribe(gateways, sink, logs):
    gw = gateways.start('[checks.unsubscribe]\nmode = "off"\n', upstream=sink.url)
    client, (code, _) = send(gw, message=corpus("unsubscribe-missing.eml"))
    client.quit()
    assert code == 250 and len(sink.messages) == 1
    assert "unsubscribe" not in logs.events("message")[0]["checks_ms"]


def test_sender_file_allows_calendar_invites_for_that_sender_only(gateways, sink):
    lenient = EXAMPLE_SENDER + ('\n[checks.attachments]\n'
                                'allowed_types = ["text/plain", "text/html", "text/calendar"]\n')
    other = (EXAMPLE_SENDER.replace('"acme"', '"beta"')
             .replace("bounce-*@em.acme.example", "b-*@em.beta.example")
             .replace('["em.acme.example"]', '["em.beta.example"]'))
    gw = gateways.start("[checks.attachments]\nmax_parts = 20\n",
                        senders={"acme": lenient, "beta": other}, upstream=sink.url)
    invite = corpus("ics-invite.eml")
    client, (code, _) = send(gw, message=invite)
    assert code == 250
    client.quit()
    client, (code, text) = send(gw, mail_from="b-1@em.beta.example", message=invite)
    client.quit()
    assert code == 550 and b"Content type text/calendar is not accepted" in text
    assert len(sink.messages) == 1
    # the sender's table overrides key by key: the global max_parts still applies to acme
    config = load_config(gateways.tmp_path / "gw" / "gateway.toml")
    acme = load_sender(gateways.tmp_path / "gw" / "senders" / "acme.toml", config.checks)
    assert acme.checks["attachments"].max_parts == 20
    assert acme.checks["attachments"].allowed_types[-1] == "text/calendar"


def test_allow_embedded_with_image_types_relays_inline_images(gateways, sink):
    toml = '[checks.attachments]\nallowed_types = ["text/plain", "text/html", "image/*"]\n'
    gw = gateways.start(toml + "allow_embedded = true\n", upstream=sink.url)
    for name in ("related-cid-image.eml", "data-uri-image.eml"):
        client, (code, _) = send(gw, message=corpus(name))
        client.quit()
        assert code == 250, name
    assert len(sink.messages) == 2
    # images allowed but embedding not: the cid: image is still refused
    gw2 = gateways.start(toml, upstream=sink.url)
    client, (code, text) = send(gw2, message=corpus("related-cid-image.eml"))
    client.quit()
    assert code == 550 and text.startswith(b"5.7.1 Embedded media are not accepted")


def test_limits_are_configurable(gateways, sink):
    gw = gateways.start("[checks.attachments]\nmax_depth = 12\nmax_parts = 61\n",
                        upstream=sink.url)
    for name in ("nesting-12-levels.eml", "too-many-parts.eml"):
        client, (code, _) = send(gw, message=corpus(name))
        client.quit()
        assert code == 250, name
    gw2 = gateways.start("[checks.attachments]\nmax_depth = 9\n", upstream=sink.url)
    client, (code, text) = send(gw2, message=corpus("nesting-10-levels.eml"))
    client.quit()
    assert code == 550 and text.startswith(b"5.6.0 MIME nesting is deeper than 9 levels at part ")


def test_message_class_in_log_line_and_metric(gateways, sink, logs):
    gw = gateways.start(senders={"acme": ACME_TP}, upstream=sink.url)
    for name in ("class-transactional.eml", "class-promotional.eml",
                 "class-educational-not-permitted.eml"):
        client, _ = send(gw, message=corpus(name))
        client.quit()
    lines = logs.events("message")
    assert [(ln["message_class"], ln["decision"]) for ln in lines] == [
        ("transactional", "accept"), ("promotional", "accept"), ("educational", "reject")]
    for cls, decision in (("transactional", "accept"), ("promotional", "accept"),
                          ("educational", "reject")):
        assert gw.metric("gateway_message_classes_total", sender="acme", **{"class": cls},
                         decision=decision) == 1
    assert gw.metric("gateway_messages_total", sender="acme", decision="reject",
                     reason="class_not_permitted") == 1


def test_default_sender_classes_are_promotional_only(gateways, sink):
    gw = gateways.start(upstream=sink.url)
    client, (code, text) = send(gw, message=corpus("class-transactional.eml"))
    client.quit()
    assert (code, text.decode()) == (550, "5.7.1 Message class transactional (declared by "
                                     "X-Message-Class) is not permitted for sender acme "
                                     "(registered classes: promotional)")


def test_a_sender_without_promotional_needs_the_header(gateways, sink):
    only_tx = EXAMPLE_SENDER + 'classes = ["transactional"]\n'
    gw = gateways.start(senders={"acme": only_tx}, upstream=sink.url)
    client, (code, text) = send(gw, message=corpus("unsubscribe-one-click.eml"))
    client.quit()
    assert (code, text.decode()) == (550, "5.7.1 Message class promotional (no X-Message-Class "
                                     "header) is not permitted for sender acme (registered "
                                     "classes: transactional)")
    assert sink.messages == []


def test_class_header_name_is_configurable(gateways, sink, logs):
    raw = corpus("class-transactional.eml").replace(b"X-Message-Class:", b"X-Campaign-Type:")
    gw = gateways.start('[checks.message_class]\nheader = "X-Campaign-Type"\n',
                        senders={"acme": ACME_TP}, upstream=sink.url)
    client, (code, _) = send(gw, message=raw)
    client.quit()
    assert code == 250
    assert logs.events("message")[0]["message_class"] == "transactional"


def test_class_still_read_for_unsubscribe_when_message_class_is_off(gateways, sink, logs):
    gw = gateways.start('[checks.message_class]\nmode = "off"\n', upstream=sink.url)
    client, (code, _) = send(gw, message=corpus("class-transactional.eml"))
    client.quit()
    assert code == 250  # transactional: no List-Unsubscribe needed; the class check is off
    assert logs.events("message")[0]["message_class"] == "transactional"


def test_repeated_contradictory_class_headers_are_refused(gateways, sink):
    raw = corpus("class-promotional.eml").replace(
        b"X-Message-Class: Promotional\r\n",
        b"X-Message-Class: Promotional\r\nX-Message-Class: transactional\r\n")
    gw = gateways.start(senders={"acme": ACME_TP}, upstream=sink.url)
    client, (code, text) = send(gw, message=raw)
    client.quit()
    assert (code, text.decode()) == (550, "5.7.1 X-Message-Class appears 2 times with different "
                                     "values; declare one message class (transactional, "
                                     "educational, promotional)")


def test_unsubscribe_options(gateways, sink):
    gw = gateways.start("[checks.unsubscribe]\nrequire_one_click = false\n"
                        "require_signed = false\n", upstream=sink.url)
    for name in ("unsubscribe-https-without-post.eml", "unsubscribe-not-signed.eml"):
        client, (code, _) = send(gw, message=corpus(name))
        client.quit()
        assert code == 250, name


def test_example_configuration_documents_every_key_with_its_default():
    root = Path(__file__).resolve().parent.parent
    config = load_config(root / "gateway.toml")
    from gateway.checks import CHECK_SETTINGS

    for name in ("attachments", "message_class", "unsubscribe"):
        assert config.checks[name] == CHECK_SETTINGS[name]()
    text = (root / "gateway.toml").read_text()
    for name in ("attachments", "message_class", "unsubscribe"):
        table = text.split(f"[checks.{name}]\n", 1)[1].split("\n[", 1)[0]
        keys = {ln.split("=", 1)[0].strip() for ln in table.splitlines()
                if ln and not ln.startswith("#")}
        assert keys == set(CHECK_SETTINGS[name].__dataclass_fields__), name
    vendor = load_sender(root / "config" / "senders" / "example-vendor.toml", config.checks)
    assert vendor.classes == ("promotional",)


@pytest.mark.parametrize("table,key,reason", [
    ('[checks.attachments]\nallowed_types = ["image"]\n', "checks.attachments.allowed_types[0]",
     "expected a lower-case leaf type/subtype or type/*"),
    ('[checks.attachments]\nallowed_types = ["multipart/mixed"]\n',
     "checks.attachments.allowed_types[0]", "expected a lower-case leaf type/subtype"),
    ("[checks.attachments]\nmax_depth = 0\n", "checks.attachments.max_depth", "at least 1"),
    ("[checks.attachments]\nmax_parts = 0\n", "checks.attachments.max_parts", "at least 1"),
    ('[checks.attachments]\nmax_parts = "50"\n', "checks.attachments.max_parts",
     "expected an integer"),
    ('[checks.message_class]\nheader = "X Class:"\n', "checks.message_class.header",
     "is not a header name"),
    ("[checks.unsubscribe]\nrequire_one_click = 1\n", "checks.unsubscribe.require_one_click",
     "expected a boolean"),
    ('[checks.unsubscribe]\nonce = true\n', "checks.unsubscribe.once", "unknown key"),
])
def test_bad_content_settings_name_the_key(tmp_path, table, key, reason):
    path = tmp_path / "gateway.toml"
    path.write_text(table)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key and reason in info.value.reason


@pytest.mark.parametrize("classes,reason", [
    ("[]", "needs at least one message class"),
    ('["promotional", "promotional"]', "more than once"),
    ('["marketing"]', "'marketing' is not one of 'transactional' | 'educational' | "
                      "'promotional'"),
])
def test_bad_sender_classes_name_the_key(tmp_path, classes, reason):
    path = tmp_path / "acme.toml"
    path.write_text(EXAMPLE_SENDER + f"classes = {classes}\n")
    with pytest.raises(ConfigError) as info:
        load_sender(path)
    assert info.value.key.startswith("classes") and reason in info.value.reason


def test_sender_classes_loaded(tmp_path):
    path = tmp_path / "acme.toml"
    path.write_text(EXAMPLE_SENDER + 'classes = ["educational", "transactional"]\n')
    assert load_sender(path).classes == ("educational", "transactional")
    path.write_text(EXAMPLE_SENDER)
    assert load_sender(path).classes == ("promotional",)
