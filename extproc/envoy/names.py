"""Names the rendered configuration, the sidecar and its publisher (extproc/xds.py) share: Envoy's
node, its static clusters and listeners, the sidecar's default socket, and the file each xDS
resource type is published in, with Envoy's subscription to it."""

from __future__ import annotations

from typing import Any

EXT_PROC_CLUSTER = "extproc"
ADMIN_CLUSTER = "envoy_admin"  # the readiness and stats listeners' route to the admin interface on loopback
RESERVED_CLUSTERS = (EXT_PROC_CLUSTER, ADMIN_CLUSTER)  # static in the bootstrap: CDS cannot replace them
LISTENER = "llm"  # the client listener's name, its HCM's stat prefix and its route configuration's name
READINESS_LISTENER = "readiness"
STATS_LISTENER = "stats"  # GET /stats/prometheus only, for Prometheus
NODE = {"id": "extproc", "cluster": "extproc"}
SOCKET = "/tmp/extproc/extproc.sock"  # where the sidecar serves ext_proc and Envoy finds it, by default

# Where each resource type lives under the xDS directory: its own subdirectory, watched for
# renames into it (Envoy's watched_directory), so publishing routes never makes Envoy re-read the
# listener or the clusters.
XDS_FILES = {"lds": "lds/listeners.json", "cds": "cds/clusters.json", "rds": "rds/routes.json"}
BOOTSTRAP_FILE = "bootstrap.json"


def config_source(xds_dir: str, kind: str) -> dict[str, Any]:
    """A filesystem subscription to one resource type the sidecar publishes."""
    path = f"{xds_dir.rstrip('/')}/{XDS_FILES[kind]}"
    return {
        "path_config_source": {"path": path, "watched_directory": {"path": path.rsplit("/", 1)[0]}},
        "resource_api_version": "V3",
    }
