"""Free another process's GPU memory without ending it: the CUDA driver's checkpoint API.

``cuCheckpointProcessLock`` blocks the target's CUDA calls and waits for its submitted
work; ``cuCheckpointProcessCheckpoint`` copies its device memory to host memory and
releases the GPU; ``cuCheckpointProcessRestore`` and ``cuCheckpointProcessUnlock``
bring it back. They are meant for a controller process (here: the service, for its
worker), and need a driver that has them (550 or newer). They are called through
ctypes on the driver's own library, so no package is needed; where the library or the
functions are missing, ``available()`` is False and callers end the worker instead.

The same four calls ran on an H100 (driver 580) from ``benchmarks.gpu_direct`` on a
process holding a model: checkpointed to 0 MiB of VRAM in under a second, restored in
about 0.4 s, its generation unchanged (docs/benchmarks.md, Measured on a GPU). This module's own path ran
there too: ``benchmarks.stack`` on a card declared too small for both models suspended
the transcription worker 28 times (0.7 s each), every transcript equal to its
unpreempted one. Every failure is reported as CheckpointFailed, and callers fall back
to ending the worker.
"""

from __future__ import annotations

import ctypes
import functools
import logging

log = logging.getLogger(__name__)

_FUNCTIONS = (
    "cuCheckpointProcessLock",
    "cuCheckpointProcessCheckpoint",
    "cuCheckpointProcessRestore",
    "cuCheckpointProcessUnlock",
)


class CheckpointFailed(Exception):
    """The driver refused; the message carries its CUresult."""


@functools.cache
def _driver() -> ctypes.CDLL | None:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    if not all(hasattr(cuda, name) for name in _FUNCTIONS):
        return None
    if cuda.cuInit(0) != 0:
        return None
    return cuda


def available() -> bool:
    return _driver() is not None


def _call(name: str, pid: int) -> None:
    cuda = _driver()
    if cuda is None:
        raise CheckpointFailed("the CUDA driver's checkpoint API is not available")
    result = getattr(cuda, name)(ctypes.c_int(pid), None)  # NULL: the default arguments
    if result != 0:
        raise CheckpointFailed(f"{name}({pid}) returned CUresult {result}")


def suspend(pid: int) -> None:
    """Lock the process and move its device memory to the host. It must be running
    (not SIGSTOPped): the driver's thread inside it does part of the work."""
    _call("cuCheckpointProcessLock", pid)
    try:
        _call("cuCheckpointProcessCheckpoint", pid)
    except CheckpointFailed:
        _call("cuCheckpointProcessUnlock", pid)
        raise


def restore(pid: int) -> None:
    """Bring the device memory back and let the process make CUDA calls again."""
    _call("cuCheckpointProcessRestore", pid)
    _call("cuCheckpointProcessUnlock", pid)
