"""Envoy configuration as YAML text, in a form Envoy's YAML reader takes as meant."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml


class _Dumper(yaml.SafeDumper):
    """Quotes the YAML 1.1 booleans PyYAML leaves bare (y, n) but Envoy's YAML reader does not."""


_Dumper.add_representer(
    str,
    lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:str", value, style="'" if value in ("y", "Y", "n", "N") else None
    ),
)


def dump(config: Mapping[str, Any]) -> str:
    return yaml.dump(dict(config), Dumper=_Dumper, sort_keys=False, width=120)
