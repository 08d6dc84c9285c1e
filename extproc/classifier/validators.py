"""Checksums and syntax checks that confirm what the tagger proposes for structured PII.

Each validator first turns down text longer than any value of its type, so one call costs a
bounded amount whatever it is handed (a candidate shape can be as long as a hostile prompt).
"""

from __future__ import annotations

import ipaddress
import re

_EMAIL = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)
_IBAN_LENGTHS = {  # country -> total length, per the ISO 13616 registry
    "AD": 24,
    "AE": 23,
    "AL": 28,
    "AT": 20,
    "AZ": 28,
    "BA": 20,
    "BE": 16,
    "BG": 22,
    "BH": 22,
    "BR": 29,
    "BY": 28,
    "CH": 21,
    "CR": 22,
    "CY": 28,
    "CZ": 24,
    "DE": 22,
    "DK": 18,
    "DO": 28,
    "EE": 20,
    "EG": 29,
    "ES": 24,
    "FI": 18,
    "FO": 18,
    "FR": 27,
    "GB": 22,
    "GE": 22,
    "GI": 23,
    "GL": 18,
    "GR": 27,
    "GT": 28,
    "HR": 21,
    "HU": 28,
    "IE": 22,
    "IL": 23,
    "IQ": 23,
    "IS": 26,
    "IT": 27,
    "JO": 30,
    "KW": 30,
    "KZ": 20,
    "LB": 28,
    "LC": 32,
    "LI": 21,
    "LT": 20,
    "LU": 20,
    "LV": 21,
    "MC": 27,
    "MD": 24,
    "ME": 22,
    "MK": 19,
    "MR": 27,
    "MT": 31,
    "MU": 30,
    "NL": 18,
    "NO": 15,
    "PK": 24,
    "PL": 28,
    "PS": 29,
    "PT": 25,
    "QA": 29,
    "RO": 24,
    "RS": 22,
    "SA": 24,
    "SC": 31,
    "SE": 24,
    "SI": 19,
    "SK": 24,
    "SM": 27,
    "ST": 25,
    "SV": 28,
    "TL": 23,
    "TN": 24,
    "TR": 26,
    "UA": 29,
    "VA": 22,
    "VG": 24,
    "XK": 20,
}


def digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def luhn_valid(text: str) -> bool:
    """Payment card number: 13-19 digits (spaces and dashes allowed) with a valid Luhn sum."""
    if len(text) > 64 or re.search(r"[^\d \-]", text.strip()):
        return False
    d = digits(text)
    if not 13 <= len(d) <= 19 or len(set(d)) == 1:
        return False
    total = 0
    for i, c in enumerate(reversed(d)):
        n = int(c)
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    """IBAN: known country length and the ISO 7064 mod-97 check."""
    if len(text) > 64:
        return False
    s = re.sub(r"[\s-]", "", text).upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{8,30}", s):
        return False
    if _IBAN_LENGTHS.get(s[:2], len(s)) != len(s):
        return False
    rotated = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rotated)) % 97 == 1


def ip_valid(text: str) -> bool:
    """A routable-looking IPv4 or IPv6 address (loopback, unspecified and masks are not PII)."""
    if len(text) > 64:
        return False
    try:
        ip = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_unspecified or str(ip).startswith("255."))


def email_valid(text: str) -> bool:
    return len(text) <= 254 and _EMAIL.match(text.strip()) is not None


def ssn_valid(text: str) -> bool:
    """US SSN shape: 9 digits as AAA-GG-SSSS (or spaced/contiguous), no all-zero group, no 666/9xx."""
    s = text.strip()
    if len(s) > 11 or not re.fullmatch(r"\d{3}([- ]?)\d{2}\1\d{4}", s):
        return False
    d = digits(s)
    area, group, serial = d[:3], d[3:5], d[5:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def phone_plausible(text: str) -> bool:
    """7-15 digits (E.164 allows at most 15) and only phone punctuation."""
    s = text.strip()
    if len(s) > 40:
        return False
    return bool(re.fullmatch(r"[+(]?[\d()\s./-]+", s)) and 7 <= len(digits(s)) <= 15


VALIDATORS = {
    "CREDIT_CARD": luhn_valid,
    "IBAN_CODE": iban_valid,
    "IP_ADDRESS": ip_valid,
    "EMAIL_ADDRESS": email_valid,
    "US_SSN": ssn_valid,
    "PHONE_NUMBER": phone_plausible,
}
