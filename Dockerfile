# syntax=docker/dockerfile:1
#
# The extproc routing sidecar (the Helm chart's `image`):
#   docker build -t registry.example.com/extproc:0.1.0 --build-arg REVISION=$(git rev-parse HEAD) .
# then set the chart's image.repository and image.tag (or image.digest).
#
# Reproducible: the dependencies come from deploy/image/requirements.lock (exact versions and
# wheel hashes, no source builds; `python deploy/image/lock.py` rewrites it), installed before
# the source is copied, so a code edit rebuilds only the last layers. The encoder model ships
# inside the package (extproc/classifier/model/): nothing is downloaded when the pod starts.
# tests/helm/test_dockerfile.py checks this file; tests/helm/test_image.py builds and runs it
# where buildah is installed.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
# Only for the build, and only when given: a package mirror, and the CA of a TLS-inspecting
# proxy (mounted into the build, e.g. buildah bud -v /etc/ssl/certs/ca.crt:/etc/pip-ca.crt:ro).
ARG PIP_INDEX_URL
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/extproc && python3 -m venv /opt/build
COPY deploy/image/requirements.lock deploy/image/build-requirements.lock /tmp/lock/
RUN /opt/extproc/bin/pip install --no-deps --require-hashes --only-binary=:all: -r /tmp/lock/requirements.lock \
 && /opt/build/bin/pip install --no-deps --require-hashes --only-binary=:all: -r /tmp/lock/build-requirements.lock
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc ./extproc
# The package itself, without its dependencies (they are the lock's); then the venv loses pip
# and setuptools, which the sidecar never runs.
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/wheel . \
 && /opt/extproc/bin/pip install --no-deps /tmp/wheel/extproc-*.whl \
 && /opt/extproc/bin/pip uninstall --yes pip setuptools
# Fail the build rather than the pod: every module imports and the model loads (-I: the
# installed package, not the source tree in the working directory).
RUN /opt/extproc/bin/python -I -c "import extproc.app, extproc.cli, extproc.replicas.kubernetes; \
from extproc.classifier import Classifier; Classifier.load(None, threads=1)"

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=""
ARG CREATED=""
LABEL org.opencontainers.image.title="extproc" \
      org.opencontainers.image.description="LLM routing sidecar for Envoy: picks the model and the replica for every OpenAI-style request" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0"
# A numeric non-root user, so the kubelet can check runAsNonRoot; the chart's
# podSecurityContext runs both containers as the same ids.
RUN groupadd --system --gid 10001 extproc \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin extproc
# Same base image in both stages, so the venv's interpreter path is valid here.
COPY --from=build /opt/extproc /opt/extproc
ENV PATH=/opt/extproc/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EXTPROC_CONFIG=/etc/extproc/policy.yaml
USER 10001:10001
# 9090: Prometheus /metrics. 9091: the gRPC health port the chart passes as --health-listen.
# ext_proc itself is served on a Unix socket (--uds) or 127.0.0.1 (--listen).
EXPOSE 9090 9091
# Serves the policy mounted at /etc/extproc/policy.yaml (where the chart mounts its ConfigMap)
# and fails at once without one; the bundled demo policy only when asked for:
# --config /opt/extproc/lib/python3.11/site-packages/extproc/policy/default.yaml
ENTRYPOINT ["extproc", "serve"]
