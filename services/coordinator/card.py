"""The card's memory: from the setting, else from NVML, else unknown (0).

NVML is read through ctypes from the driver's own library, so the coordinator needs
no extra package; on a machine without an NVIDIA driver the library is missing and
the size is unknown, which means no holder ever has to free its memory.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def nvml_memory_mb(index: int = 0) -> int:
    """Total memory of GPU ``index`` in MB, or 0 when NVML cannot tell."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return 0
    try:
        if nvml.nvmlInit_v2() != 0:
            return 0
        handle = ctypes.c_void_p()
        memory = _Memory()
        if nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
            return 0
        if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0:
            return 0
        return int(memory.total // 1_048_576)
    except AttributeError:  # a library without these symbols
        return 0
    finally:
        shutdown = getattr(nvml, "nvmlShutdown", None)
        if shutdown is not None:
            shutdown()


def card_memory_mb(setting: int | None) -> int:
    if setting is not None:
        return setting
    found = nvml_memory_mb()
    log.info("card memory", extra={"card_mb": found, "source": "nvml" if found else "none (no card found)"})
    return found
