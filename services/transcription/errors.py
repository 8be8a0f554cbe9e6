"""How transcription answers its domain's errors: the app maps them once
(shared.errors.map_errors), and its streams send the same as error events."""

from __future__ import annotations

from shared.errors import ErrorTable, ServiceUnavailable
from shared.gpu import GpuUnavailable

ERRORS: ErrorTable = {
    GpuUnavailable: lambda exc: ServiceUnavailable(
        f"the GPU was not granted in time ({exc.reason})", retry_after_s=exc.retry_after_s, code="gpu_unavailable"
    ),
}
