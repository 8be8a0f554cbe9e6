#!/bin/sh
# One service's virtual environment in /opt/venv, from the pinned lock (run by docker/Dockerfile).
#   build-venv deps "<extras>"   the dependencies only (extras separated by spaces), and a .pth that makes
#                                /opt/app importable: Baton's source, which the images copy there last, so
#                                that a change of it leaves this layer as it is
# PYTHON_DIST (a build argument) picks the interpreter: "standalone", uv's CPython
# (downloaded; it runs on any base, the CUDA images included), or "system", the base
# image's own python3 (no download; the runtime base must then be the same image).
set -eu

# Behind a proxy that re-signs TLS, its CA bundle comes in as the build secret ca_bundle
# (docker build --secret id=ca_bundle,src=...): used for this step, kept in no layer.
if [ -s /run/secrets/ca_bundle ]; then
  export SSL_CERT_FILE=/run/secrets/ca_bundle
fi

case "${PYTHON_DIST}" in
  standalone) python="${PYTHON_VERSION}" ;;
  system) python=$(command -v python3) || { echo "PYTHON_DIST=system: the base image has no python3" >&2; exit 1; } ;;
  *) echo "PYTHON_DIST must be standalone or system, not ${PYTHON_DIST}" >&2; exit 2 ;;
esac

case "$1" in
  deps)
    if [ "${PYTHON_DIST}" = standalone ]; then uv python install "${PYTHON_VERSION}"; fi
    mkdir -p /opt/python
    uv venv --python "${python}" /opt/venv
    extras=$2
    set --
    for extra in $extras; do set -- "$@" --extra "$extra"; done
    # A prebuilt llama-cpp-python (docker/wheels/) is taken before compiling one.
    if [ -d /wheels ]; then set -- "$@" --find-links /wheels; fi
    # Dependencies of pyproject.toml (and the extra), at the versions of the lock.
    uv pip install --python /opt/venv -c requirements.lock -r pyproject.toml "$@"
    site=$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo /opt/app > "${site}/baton-app.pth"
    ;;
  *)
    echo "usage: build-venv deps <extras>" >&2
    exit 2
    ;;
esac
