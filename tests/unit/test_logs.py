"""What the decision log may carry."""

from __future__ import annotations

from extproc.logs import loggable_request_id


def test_a_request_id_is_logged_only_in_envoys_form() -> None:
    # Where another proxy passes a client's id on (a gateway in two-round-trip mode).
    assert loggable_request_id("3f2c1a9e-1b2c-4d5e-8f90-0123456789ab") == "3f2c1a9e-1b2c-4d5e-8f90-0123456789ab"
    for chosen in ("078-05-1120-ZEBRAREQID", "", "3F2C1A9E-1B2C-4D5E-8F90-0123456789AB", "x" * 36, "req-1"):
        assert loggable_request_id(chosen) is None
