"""One stack for the adversarial cases: Envoy as `extproc envoy-config` renders it, the sidecar
on rules only, a router-picked replica (s1, the default model) and an Envoy-balanced one (l1,
also the cluster for forwarded non-LLM paths such as /v1/models)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from extproc.standin import StandIn
from tests.harness import Stack

POLICY = """
version: 1
default_model: small
models:
  small:
    upstream_model: small-8b
    replicas: {static: ["$s1"], envoy: original_dst}
  large: {upstream_model: large-70b}
decisions:
  - {name: code, when: {keyword: [segfault]}, model: large}
"""


@pytest.fixture(scope="package")
def hostile_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(
        tmp_path_factory.mktemp("adversarial"),
        POLICY,
        [StandIn(name="s1"), StandIn(name="l1")],
        envoy_options=lambda fleet: {"cluster_endpoints": {"large": [fleet["l1"].address]}, "default_cluster": "large"},
    ) as stack:
        yield stack
