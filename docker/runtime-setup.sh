#!/bin/sh
# The runtime part every service image shares (run by docker/Dockerfile as root, once):
# the libraries the wheels need, the interpreter when PYTHON_DIST=system, and the
# unprivileged user `baton` (uid 10001) that owns /data, the only place it writes.
set -eu
packages="libgomp1 ca-certificates"
if [ "${PYTHON_DIST}" = system ]; then packages="${packages} python3"; fi
# A base that has them already (a local one made for tests) needs no package index.
# shellcheck disable=SC2086
if ! dpkg -s ${packages} >/dev/null 2>&1; then
  apt-get update
  apt-get install -y --no-install-recommends ${packages}
  rm -rf /var/lib/apt/lists/*
fi
useradd --create-home --uid 10001 --user-group baton
install -d -o baton -g baton /data
