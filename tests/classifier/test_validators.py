import pytest

from extproc.classifier.validators import (
    email_valid,
    iban_valid,
    ip_valid,
    luhn_valid,
    phone_plausible,
    ssn_valid,
)


@pytest.mark.parametrize(
    "number", ["4111 1111 1111 1111", "4111-1111-1111-1111", "378282246310005", "6011111111111117", "5555555555554444"]
)
def test_luhn_accepts_valid_card_numbers(number):
    assert luhn_valid(number)


@pytest.mark.parametrize(
    "number",
    [
        "4111 1111 1111 1112",
        "1234567890123",
        "0000000000000000",
        "41111111111",
        "4111 1111 1111 1111 1111",
        "4111a1111b1111c1111",
    ],
)
def test_luhn_rejects_bad_checksum_length_or_characters(number):
    assert not luhn_valid(number)


@pytest.mark.parametrize(
    "iban",
    ["DE89370400440532013000", "DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", "fr1420041010050500013m02606"],
)
def test_iban_accepts_valid_mod97(iban):
    assert iban_valid(iban)


@pytest.mark.parametrize(
    "iban",
    [
        "DE89370400440532013001",
        "GB82WEST1234569876543",  # checksum, length
        "XX00",
        "DE8937040044053201300A",
    ],
)
def test_iban_rejects_bad_checksum_or_length(iban):
    assert not iban_valid(iban)


@pytest.mark.parametrize("ip", ["106.31.73.20", "8.8.8.8", "6e40:4041:c617:e898:c11:40d2:c669:2eb4", "fe80::1"])
def test_ip_accepts_addresses(ip):
    assert ip_valid(ip)


@pytest.mark.parametrize("ip", ["256.1.1.1", "1.2.3", "127.0.0.1", "0.0.0.0", "255.255.255.0", "v1.2.3.4", "::1"])
def test_ip_rejects_non_addresses_loopback_and_masks(ip):
    assert not ip_valid(ip)


@pytest.mark.parametrize("email", ["UtaKortig@jourrapide.com", "a.b+tag@mail.example.co.uk"])
def test_email_syntax_accepts(email):
    assert email_valid(email)


@pytest.mark.parametrize("email", ["user@localhost", "@example.com", "a@b", "a..b@example.com", "a b@example.com"])
def test_email_syntax_rejects(email):
    assert not email_valid(email)


def test_ssn_shape_and_reserved_groups():
    assert ssn_valid("460-89-9847") and ssn_valid("460 89 9847") and ssn_valid("460899847")
    assert not ssn_valid("000-12-3456")
    assert not ssn_valid("666-12-3456")
    assert not ssn_valid("912-12-3456")
    assert not ssn_valid("123-00-4567")
    assert not ssn_valid("123-45-67890")
    assert not ssn_valid("123-45 6789")  # mixed separators


def test_phone_needs_seven_to_fifteen_digits():
    assert phone_plausible("+41 (0)69 979 80 58") and phone_plausible("618-226-1460")
    assert not phone_plausible("12-34")
    assert not phone_plausible("call 618-226-1460")
