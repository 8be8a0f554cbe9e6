# Redis from Debian's redis-server, on a local Debian base: what tests/test_compose_stack.py
# runs where the official redis image (the default in compose.yaml) cannot be pulled.
# Like the official image, data lives in /data and a command line without a config file
# listens on the network (protected mode off: the compose network is the boundary).
ARG BASE
FROM ${BASE}
# The user first, with a fixed id (the package would pick one): USER needs a number.
RUN useradd --system --uid 10003 --user-group --home-dir /var/lib/redis --shell /usr/sbin/nologin redis \
    && apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o redis -g redis /data
COPY docker/local/redis-entrypoint.sh /usr/local/bin/redis-entrypoint
WORKDIR /data
USER 10003:10003
EXPOSE 6379
ENTRYPOINT ["redis-entrypoint"]
CMD ["redis-server"]
