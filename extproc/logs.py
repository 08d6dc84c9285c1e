"""Structured logs. One JSON line per routed request, with no prompt text or header values.

Privacy rule for every logger in the package: prompts, messages, PII values and client header
values are never logged at any level; only names, counts, labels and timings.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from extproc.router import Routed

decision_log = logging.getLogger("extproc.decision")

# The form of the ids Envoy generates. The shipped Envoy config drops a client's x-request-id and
# makes its own; where another proxy passes a client's value on, it is logged only in this form,
# so an id can never carry prompt text, PII or another value a client typed.
_REQUEST_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def loggable_request_id(value: str) -> str | None:
    return value if _REQUEST_ID.match(value) else None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if fields is not None:
            line.update(fields)
        else:
            line["msg"] = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None:
            # Exception type only: messages of library errors can quote the data they choked on.
            line["error"] = record.exc_info[0].__name__
        return orjson.dumps(line).decode()


def setup(level: str = "info", json_lines: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and urllib3 can log request details at debug; they stay at warning.
    for noisy in ("grpc", "urllib3", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def complexity_bucket(value: float | None) -> str | None:
    if value is None:
        return None
    return "low" if value < 1 / 3 else "medium" if value < 2 / 3 else "high"


def log_decision(
    request_id: str,
    api: str,
    routed: Routed | None,
    status: int,
    error_code: str | None,
    stages: dict[str, float] | None = None,
) -> None:
    if not decision_log.isEnabledFor(logging.INFO):
        return
    fields: dict[str, Any] = {
        "event": "decision",
        "request_id": loggable_request_id(request_id),
        "api": api,
        "status": status,
    }
    if routed is not None:
        signals = routed.signals
        topic = signals.topic if signals else None
        fields.update(
            model=routed.model or None,
            upstream_model=routed.upstream_model if routed.model else None,  # passthrough: client text
            decision=routed.decision,
            domain=topic.domain if topic else None,
            complexity=complexity_bucket(topic.complexity if topic else None),
            pii=signals.pii_types() if signals and signals.pii else [],
            pii_action=routed.pii_action or None,
            replica=routed.endpoints[0] if routed.endpoints else None,
            cluster=routed.cluster,
        )
        stages = routed.stages
    if error_code:
        fields["error"] = error_code
    if stages:
        fields["ms"] = {k: round(v * 1000, 3) for k, v in stages.items()}
    decision_log.info("decision", extra={"fields": fields, "ts_unix": time.time()})
