# Flashgate image: multi-stage, non-root, fit for a read-only root filesystem (k8s/ mounts /tmp).
#   docker build -t registry.example.com/flashgate/flashgate:0.1.0 .
# One image for every role: `flashgate gateway`, `flashgate worker`, `flashgate migrate`.

# -- build: wheels for the package and its runtime dependencies (no dev or embedded extras) --
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core core
COPY gateway gateway
COPY workers workers
COPY risk risk
COPY cli cli
COPY lua lua
COPY migrations migrations
RUN pip wheel --wheel-dir /wheels .

# -- runtime ---------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 FLASHGATE_LOG_FORMAT=json
RUN groupadd --system --gid 10001 flashgate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin flashgate
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links /wheels flashgate && rm -rf /wheels
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 9108
ENTRYPOINT []
CMD ["flashgate", "gateway", "--host", "0.0.0.0", "--port", "8000"]
