# The Chroma server from the pinned chromadb package, on a local base that has python3:
# what tests/test_compose_stack.py runs where the official chromadb/chroma image (the
# default in compose.yaml) cannot be pulled. Same port, same data folder, not root.
#   docker build -f docker/local/chroma.Dockerfile --build-arg BASE=... --build-arg UV_IMAGE=... .
ARG BASE
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9
FROM ${UV_IMAGE} AS uv

FROM ${BASE}
COPY --from=uv /uv /usr/local/bin/uv
COPY requirements.lock /tmp/requirements.lock
ENV UV_LINK_MODE=copy UV_CACHE_DIR=/var/cache/uv
RUN --mount=type=secret,id=ca_bundle,required=false --mount=type=cache,target=/var/cache/uv \
    if [ -s /run/secrets/ca_bundle ]; then export SSL_CERT_FILE=/run/secrets/ca_bundle; fi \
    && uv venv --python python3 /opt/chroma \
    && uv pip install --python /opt/chroma -c /tmp/requirements.lock chromadb \
    && useradd --uid 10002 --user-group chroma \
    && install -d -o chroma -g chroma /data
USER 10002:10002
EXPOSE 8000
CMD ["/opt/chroma/bin/chroma", "run", "--path", "/data", "--host", "0.0.0.0", "--port", "8000"]
