# Flashgate image: multi-stage, non-root, fit for a read-only root filesystem (k8s/ mounts /tmp).
#   docker build -t registry.example.com/flashgate/flashgate:0.1.0 .
# One image for every role: `flashgate gateway`, `flashgate worker`, `flashgate migrate`.
#
# Reproducible inputs (tests/test_dockerfile.py holds them):
# - the base image is pinned by digest (python:3.11-slim-bookworm, multi-arch index). Refresh:
#     docker buildx imagetools inspect python:3.11-slim-bookworm --format '{{json .Manifest.Digest}}'
#   and put the digest on both FROM lines (a Renovate/Dependabot "docker" rule can do it);
# - every Python package comes from requirements-runtime.lock (the runtime part of
#   requirements.lock, same versions, sha256 of every file; `make lock` writes both), installed
#   with --require-hashes --no-deps --only-binary: a changed or unexpected file fails the build,
#   nothing is compiled, nothing is resolved at build time;
# - Flashgate's own wheel is built with the hatchling of requirements-build.lock (hashed too).

# -- build: a virtual environment with the pinned runtime and Flashgate ------------------------
FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements-runtime.lock requirements-build.lock ./
# /opt/build: pip and the pinned hatchling, for this stage only. /opt/flashgate: created without
# pip (nor the old setuptools ensurepip would add), filled by the build venv's pip (--python).
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes --no-deps --only-binary=:all: \
      -r requirements-build.lock \
 && python -m venv --without-pip /opt/flashgate \
 && /opt/build/bin/pip --python /opt/flashgate/bin/python install \
      --require-hashes --no-deps --only-binary=:all: -r requirements-runtime.lock
COPY pyproject.toml README.md ./
COPY core core
COPY gateway gateway
COPY workers workers
COPY risk risk
COPY cli cli
COPY lua lua
COPY migrations migrations
# The wheel goes to a throw-away directory of this stage; only /opt/flashgate is copied on.
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/dist . \
 && /opt/build/bin/pip --python /opt/flashgate/bin/python install --no-deps --no-index \
      /tmp/dist/flashgate-*.whl

# -- runtime: the same base, the virtual environment and nothing else --------------------------
FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 FLASHGATE_LOG_FORMAT=json \
    PATH=/opt/flashgate/bin:$PATH
RUN groupadd --system --gid 10001 flashgate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin flashgate
COPY --from=build /opt/flashgate /opt/flashgate
USER 10001:10001
WORKDIR /tmp
# 8000: the API; 9100: the gateway's /metrics (FLASHGATE_METRICS_PORT); 9108: a worker's
# (FLASHGATE_WORKER_METRICS_PORT).
EXPOSE 8000 9100 9108
ENTRYPOINT []
CMD ["flashgate", "gateway", "--host", "0.0.0.0", "--port", "8000"]
