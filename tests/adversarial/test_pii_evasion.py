"""PII evasions through the real Envoy: the value is split across content parts, hidden with
invisible characters, or written with other Unicode digits and dashes. Each is detected (the
reroute policy sends it to the private model) and redacted where it sits in the original body."""

from __future__ import annotations

import unicodedata

import orjson
import pytest

from extproc.standin import StandIn
from tests.harness import Stack

pytestmark = pytest.mark.e2e

classifier_module = pytest.importorskip("extproc.classifier")

POLICY = """
version: 1
default_model: public
debug: {explain: true}
classifier: {timeout_ms: 60000}  # about what is found, not about deadlines
models:
  public: {replicas: {static: ["$g1"], envoy: original_dst}}
  onprem: {replicas: {static: ["$p1"], envoy: original_dst}}
decisions:
  - name: redacting
    when: {header: {name: x-route, equals: redact}}
    model: public
    pii: {action: redact, types: [US_SSN, CREDIT_CARD, EMAIL_ADDRESS]}
  - name: private-data
    when: {header: {name: x-route, equals: reroute}}
    model: public
    pii: {action: reroute, model: onprem, types: [US_SSN, CREDIT_CARD, EMAIL_ADDRESS]}
"""

# (case, content as sent). Every one of them reads as the SSN 078-05-1120 to a language model.
EVASIONS = [
    (
        "split across two content parts",
        [{"type": "text", "text": "My SSN is 078-05"}, {"type": "text", "text": "-1120, file it."}],
    ),
    ("zero-width space", "My SSN is 078\u200b-05-1120, file it."),
    ("full-width digits", "My SSN is \uff10\uff17\uff18-\uff10\uff15-\uff11\uff11\uff12\uff10, file it."),
    ("word joiner and soft hyphen", "My SSN is 07\u20608-05\u00ad-1120, file it."),
    ("bidi controls", "My SSN is \u202d078-05-1120\u202c, file it."),
    ("Arabic-Indic digits", "My SSN is \u0660\u0667\u0668-\u0660\u0665-\u0661\u0661\u0662\u0660, file it."),
    ("Unicode dashes", "My SSN is 078\u201205\u22121120, file it."),
    ("combining marks", "My SSN is 0\u03037\u03038-05-1120, file it."),
]
IDS = [case for case, _ in EVASIONS]


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory):
    with Stack(
        tmp_path_factory.mktemp("evasion"),
        POLICY,
        [StandIn(name="g1"), StandIn(name="p1")],
        envoy_options={"forward_headers": ("x-route",), "message_timeout": "90s"},
    ) as stack:
        yield stack


def body(content: object) -> dict:
    return {"model": "auto", "messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize("content", [c for _, c in EVASIONS], ids=IDS)
def test_evasion_is_rerouted_to_the_private_model(s: Stack, content: object) -> None:
    response = s.post(body(content), headers={"x-route": "reroute", "x-router-debug": "true"})
    assert response.status == 200
    assert response.headers["x-router-model"] == "onprem"
    signals = orjson.loads(response.headers["x-router-explain"])["signals"]
    assert "US_SSN" in signals["pii"] and signals["classifier"] == "ok"  # found, not failed closed


def digits_of(value: object) -> str:
    text = "".join(p["text"] for p in value) if isinstance(value, list) else str(value)
    return "".join(str(unicodedata.digit(c)) for c in unicodedata.normalize("NFKC", text) if c.isdigit())


@pytest.mark.parametrize("content", [c for _, c in EVASIONS], ids=IDS)
def test_evasion_is_redacted_where_it_sits_in_the_original(s: Stack, content: object) -> None:
    response = s.post(body(content), headers={"x-route": "redact"})
    assert response.status == 200
    forwarded = orjson.loads(s.fleet["g1"].received[-1].body)["messages"][0]["content"]
    # Nothing of the number is left, in any part, in any script; the text around it is intact.
    assert digits_of(forwarded) == "", forwarded
    parts = [p["text"] for p in forwarded] if isinstance(forwarded, list) else [forwarded]
    assert parts[0].startswith("My SSN is ") and parts[-1].endswith(", file it.")
    assert "<US_SSN>" in "".join(parts)


def test_clean_multi_part_message_is_untouched(s: Stack) -> None:
    content = [{"type": "text", "text": "Order 4411-09"}, {"type": "text", "text": " ships on 2024-05-11."}]
    response = s.post(body(content), headers={"x-route": "redact"})
    assert response.status == 200
    forwarded = orjson.loads(s.fleet["g1"].received[-1].body)["messages"][0]["content"]
    assert forwarded == content


def test_an_email_split_across_parts_with_a_zero_width_joiner_is_redacted(s: Stack) -> None:
    content = [{"type": "text", "text": "write to jane.doe"}, {"type": "text", "text": "@exam\u200dple.com today"}]
    response = s.post(body(content), headers={"x-route": "redact"})
    assert response.status == 200
    forwarded = orjson.loads(s.fleet["g1"].received[-1].body)["messages"][0]["content"]
    joined = "".join(p["text"] for p in forwarded)
    assert "jane" not in joined and "exam" not in joined and "<EMAIL_ADDRESS>" in joined
