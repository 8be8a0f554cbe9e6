#!/bin/sh
# As the official image does: `redis-server <flags>` without a config file gets
# --protected-mode no, so the other containers may connect.
set -eu
if [ "${1:-}" = redis-server ]; then
  shift
  exec redis-server --protected-mode no "$@"
fi
exec "$@"
