"""Envoy in front of the sidecar: its configuration, rendered from the policy in one place, and
the binary, found and run.

* ``options.py``: EnvoyOptions and the live Envoy settings file (what else the rendering reads);
* ``names.py``: the names and files the configuration, the sidecar and its publisher share;
* ``render/``: pure functions from a policy and options to Envoy's configuration (see its
  docstring for which file renders which part);
* ``dump.py``: the configuration as YAML Envoy reads as meant;
* ``process.py``: the Envoy binary: run it (demo, tests, benchmarks) or validate a config.

The sidecar publishes the rendered resources to its Envoy from extproc/xds.py.
"""
