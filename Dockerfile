# oidc-gateway container image.
#
#   docker build -t oidc-gateway:0.1.0 .
#   docker run --rm -p 4180:4180 -v "$PWD/gateway.yaml:/etc/oidc-gateway/config.yaml:ro" \
#       -e OIDC_CLIENT_SECRET -e SESSION_KEY oidc-gateway:0.1.0
#
# Two stages: "build" turns this project into a wheel and installs it, with its dependencies,
# into the venv /opt/venv; the final stage copies only that venv onto a fresh slim base, so no
# sources, wheels, pip caches or build tools reach the image (the slim base has no compiler, and
# every dependency ships manylinux wheels for amd64 and arm64, so none is needed in either stage).
#
# No Docker engine runs in CI: tests/integration/test_packaging.py lints this file with hadolint
# and runs the build stage's RUN commands in a fresh venv (paths moved under a temp dir), then
# the image's ENTRYPOINT + CMD and HEALTHCHECK against that venv. Keep the RUN commands plain
# shell that works outside Docker too.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps everything else out of the context).
COPY pyproject.toml README.md ./
COPY gateway/ gateway/
# The venv gets no pip of its own (--without-pip): the base image's pip installs into it through
# --python, so the final image carries no installer in /opt/venv.
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python -m venv --without-pip /opt/venv \
    && python -m pip --python /opt/venv/bin/python install --no-cache-dir /wheels/oidc_gateway-*.whl

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="oidc-gateway" \
      org.opencontainers.image.description="Reverse-proxy OpenID Connect authentication gateway" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it and deploy/ can name it.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin gateway
# Same path as in the build stage: the venv's scripts carry /opt/venv/bin/python in their shebang.
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 4180
# No curl in the slim image: the standard library asks /ping (liveness), bypassing any
# HTTP(S)_PROXY from the environment. HEALTHCHECK_URL overrides the address when the config
# listens elsewhere than port 4180.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-I", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(os.environ.get('HEALTHCHECK_URL', 'http://127.0.0.1:4180/ping'), timeout=3).close()"]
ENTRYPOINT ["oidc-gateway"]
CMD ["run", "-c", "/etc/oidc-gateway/config.yaml"]
