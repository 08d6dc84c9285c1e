# syntax=docker/dockerfile:1
#
# The extproc routing sidecar (the Helm chart's `image`).
#
# NOT BUILT where it was written: there is no container engine in that environment. Build and
# push it yourself, e.g. `docker build -t registry.example.com/extproc:0.1.0 .` at the
# repository root, then set the chart's image.repository and image.tag (or image.digest).
#
# It installs the project the way CI does (.ci/run: pip install of this directory, resolving
# pyproject.toml's dependencies), without the test extra and not editable: the final image holds
# the package and its runtime dependencies only. The encoder model ships inside the package
# (extproc/classifier/model/), so nothing is downloaded when the pod starts.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/extproc
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc ./extproc
RUN /opt/extproc/bin/pip install .
# Fail the build rather than the pod: the model must be in the installed package and load
# (-I: import the installed package, not the source tree in the working directory).
RUN /opt/extproc/bin/python -I -c "from extproc.classifier import Classifier; Classifier.load(None, threads=1)"

FROM ${PYTHON_IMAGE}
# A numeric non-root user, so the kubelet can check runAsNonRoot; the chart's
# podSecurityContext runs both containers as the same ids.
RUN groupadd --system --gid 10001 extproc \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin extproc
# Same base image in both stages, so the venv's interpreter path is valid here.
COPY --from=build /opt/extproc /opt/extproc
ENV PATH=/opt/extproc/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
# 9090: Prometheus /metrics. 9091: the gRPC health port the chart passes as --health-listen.
# ext_proc itself is served on a Unix socket (--uds) or 127.0.0.1 (--listen).
EXPOSE 9090 9091
ENTRYPOINT ["extproc", "serve"]
