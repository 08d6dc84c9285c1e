"""A structured value labelled by its JSON key (tool-call arguments: {"ssn": "078-05-1120"}) is
that type on its validator and the label; a shape under another key, or inside a longer string,
is not labelled (the tagger decides, as for any text)."""

import pytest

from extproc.classifier.pii import named_by_key

LABELLED = [
    ('{"ssn":"078-05-1120"}', "078-05-1120", "US_SSN"),
    ('{"ssn": "078-05-1120", "x": 1}', "078-05-1120", "US_SSN"),
    ('{"customer_ssn":"078-05-1120"}', "078-05-1120", "US_SSN"),
    ('{"socialSecurityNumber": "078051120"}', "078051120", "US_SSN"),
    ('{"ip":"10.1.2.3"}', "10.1.2.3", "IP_ADDRESS"),
    ('{"phone": 4155550132}', "4155550132", "PHONE_NUMBER"),
    ('{"contactEmail":"a@b.io"}', "a@b.io", "EMAIL_ADDRESS"),
    ('{"card_number": "4111 1111 1111 1111"}', "4111 1111 1111 1111", "CREDIT_CARD"),
    ('[{"iban": "DE89370400440532013000"}]', "DE89370400440532013000", "IBAN_CODE"),
]
NOT_LABELLED = [
    ('{"id":"078-05-1120"}', "078-05-1120", "US_SSN"),
    ('{"order_id": 78051120}', "78051120", "US_SSN"),
    ('{"ssn":"see 078-05-1120"}', "078-05-1120", "US_SSN"),
    ('{"ssn":"078-05-1120 later"}', "078-05-1120", "US_SSN"),
    ('{"zip":"078051120"}', "078051120", "US_SSN"),
    ('{"recipient":"10.1.2.3"}', "10.1.2.3", "IP_ADDRESS"),
    ('{"telemetry_id": "4155550132"}', "4155550132", "PHONE_NUMBER"),
    ('{"ssn":"078-05-1120"      and prose', "078-05-1120", "US_SSN"),
    ("the ssn: 078-05-1120", "078-05-1120", "US_SSN"),  # prose: words around it, the tagger reads
    ('{"ssn": "078-05-1120"}', "078-05-1120", "EMAIL_ADDRESS"),  # the key names another type
]


def _check(text: str, value: str, typ: str) -> bool:
    start = text.index(value)
    return named_by_key(text, start, start + len(value), typ)


@pytest.mark.parametrize(("text", "value", "typ"), LABELLED)
def test_a_value_under_a_key_naming_its_type_is_labelled(text: str, value: str, typ: str) -> None:
    assert _check(text, value, typ)


@pytest.mark.parametrize(("text", "value", "typ"), NOT_LABELLED)
def test_a_value_under_another_key_or_inside_a_string_is_not(text: str, value: str, typ: str) -> None:
    assert not _check(text, value, typ)


def test_the_label_is_read_from_a_bounded_window() -> None:
    text = '{"ssn": ' + " " * 100_000 + '"078-05-1120"}'
    assert not _check(text, "078-05-1120", "US_SSN")  # (and it returns at once)
