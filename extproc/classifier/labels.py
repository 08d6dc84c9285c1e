"""Label sets in head order; one definition used by training, export and runtime."""

DOMAINS: tuple[str, ...] = (
    "biology",
    "business",
    "chemistry",
    "computer science",
    "economics",
    "engineering",
    "health",
    "history",
    "law",
    "math",
    "other",
    "philosophy",
    "physics",
    "psychology",
)

PII_TYPES: tuple[str, ...] = (
    "PERSON",
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "CREDIT_CARD",
    "US_SSN",
    "IP_ADDRESS",
    "IBAN_CODE",
    "STREET_ADDRESS",
)

# BIO tags: "O", then B-/I- per type, in PII_TYPES order.
PII_TAGS: tuple[str, ...] = ("O", *(f"{p}-{t}" for t in PII_TYPES for p in ("B", "I")))
