"""What the sidecar publishes to Envoy, without Envoy: resources, versions, files, live settings.
(tests/e2e/test_live_envoy.py runs the same against the real Envoy.)"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from extproc.cli import main
from extproc.envoy.options import EnvoyOptions, SettingsError, parse_settings
from extproc.envoy.render.bootstrap import render_bootstrap
from extproc.envoy.render.resources import render_resources
from extproc.policy.load import parse_policy
from extproc.xds import Publisher, documents, merged

POLICY = """
version: 1
default_model: small
models:
  small: {replicas: {static: ["10.0.0.1:8000"], envoy: override_host}}
  large: {replicas: {static: ["10.0.0.2:8000"], envoy: hash}}
"""


def resources(text: str = POLICY, **options):
    return render_resources(parse_policy(text), EnvoyOptions(**options))


def route_names(r) -> list[str]:
    return [route["name"] for route in r.routes["virtual_hosts"][0]["routes"]]


def test_a_removed_clusters_route_stays_until_the_break_step_and_the_new_ones_win() -> None:
    old = resources()
    new = resources(POLICY.replace('  large: {replicas: {static: ["10.0.0.2:8000"], envoy: hash}}\n', ""))
    both = merged(old, new)
    assert [c["name"] for c in both.clusters] == ["small", "large"]
    names = route_names(both)
    assert names.index("llm-large") == names.index("llm-small") + 1 < names.index("llm-no-decision")
    assert merged(new, old) == old  # nothing only the old one has: just the new resources
    assert both.listener == new.listener


def test_versions_are_the_content_and_each_type_has_its_own() -> None:
    first, again = documents(resources()), documents(resources())
    assert first == again
    changed = documents(resources(upstream_timeout="120s"))
    assert changed["rds"]["version_info"] != first["rds"]["version_info"]
    assert (changed["cds"], changed["lds"]) == (first["cds"], first["lds"])  # a route setting touches routes only


def test_the_bootstrap_subscribes_to_the_files_the_publisher_writes(tmp_path: Path) -> None:
    options = EnvoyOptions(xds_dir=str(tmp_path))
    bootstrap = render_bootstrap(options)
    paths = [bootstrap["dynamic_resources"][k]["path_config_source"] for k in ("lds_config", "cds_config")]
    publisher = Publisher(tmp_path, settle=0)
    asyncio.run(publisher.publish(render_resources(parse_policy(POLICY), options), grace=0))
    listener = json.loads((tmp_path / "lds" / "listeners.json").read_text())["resources"][0]
    rds = listener["filter_chains"][0]["filters"][0]["typed_config"]["rds"]["config_source"]["path_config_source"]
    for source in (*paths, rds):
        assert Path(source["path"]).is_file()
        assert Path(source["path"]).parent == Path(source["watched_directory"]["path"])
    assert not list(tmp_path.rglob(".*.tmp"))  # written by rename, nothing left behind


def test_an_unchanged_type_is_not_rewritten_and_a_restarted_sidecar_starts_from_the_files(tmp_path: Path) -> None:
    first = Publisher(tmp_path, settle=0)
    asyncio.run(first.publish(resources(), grace=0))
    inodes = {p: p.stat().st_ino for p in tmp_path.rglob("*.json")}
    restarted = Publisher(tmp_path, settle=0)
    assert restarted.published == first.published
    asyncio.run(restarted.publish(resources(forward_paths=("/v1/models", "/health")), grace=0))
    after = {p: p.stat().st_ino for p in tmp_path.rglob("*.json")}
    assert [p.parent.name for p in after if after[p] != inodes[p]] == ["rds"]


def test_live_settings_are_checked_and_converted() -> None:
    settings = parse_settings(
        {"forward_headers": ["x-org"], "cluster_endpoints": {"a": ["b.svc:80"]}, "default_cluster": ""}
    )
    assert settings == {
        "forward_headers": ("x-org",),
        "cluster_endpoints": {"a": ("b.svc:80",)},
        "default_cluster": None,
    }
    with pytest.raises(SettingsError) as error:
        parse_settings({"upstream_timout": "1s", "usage": "yes", "forward_paths": ["v1/models"], "listen_port": 1})
    message = str(error.value)
    assert "did you mean 'upstream_timeout'" in message
    assert "usage: 'yes' is not true or false" in message
    assert "forward_paths: 'v1/models' is not a path" in message
    assert "listen_port: unknown setting" in message  # fixed for the pod's life: not a live setting


def test_envoy_config_writes_the_bootstrap_and_resources_an_envoy_starts_from(tmp_path: Path, capsys) -> None:
    settings = tmp_path / "envoy.yaml"
    settings.write_text("cluster_endpoints: {private: ['127.0.0.1:18301']}\n")
    assert main(["envoy-config", "--envoy-settings", str(settings), "--xds-dir", str(tmp_path / "xds")]) == 0
    written = sorted(str(p.relative_to(tmp_path / "xds")) for p in (tmp_path / "xds").rglob("*.json"))
    assert written == ["bootstrap.json", "cds/clusters.json", "lds/listeners.json", "rds/routes.json"]
    clusters = json.loads((tmp_path / "xds" / "cds" / "clusters.json").read_text())["resources"]
    assert "private" in {c["name"] for c in clusters}
    capsys.readouterr()
    settings.write_text("upstream_timeout: soon\n")
    assert main(["envoy-config", "--envoy-settings", str(settings)]) == 1
    assert "upstream_timeout: 'soon' is not a duration" in capsys.readouterr().err
