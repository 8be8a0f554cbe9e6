"""The GPU lease every service uses.

    async with gpu.lease(LeaseRequest("llm", "interactive", wait_s=5)) as lease:
        lease.check()            # raises LeaseLost once the lease cannot be trusted
        ... GPU work, checking between steps ...
        if lease.yield_requested: ...   # or: await lease.wait_yield()

- ``api``: what a service asks for, holds and catches (``LeaseRequest``, ``HeldLease``,
  ``Gpu``, ``LeaseLost``, ``GpuUnavailable``);
- ``client``: ``GpuClient``, the coordinator's client, one per process;
- ``lease``: ``Lease``, one held lease, renewed on its own thread and fenced by its own
  clock: once no renewal has succeeded by (the send time of the last successful one +
  TTL - a margin), it counts as lost, whatever the network says;
- ``standin``: ``NoCoordinator`` and ``NoLease``, for a stack without coordination.

A holder whose GPU work runs in another process registers a listener
(``lease.listen(fn)``): it is called on the thread that learns of a yield request, a
loss or a renewal, so the work can be paused without waiting for the event loop. A
lease also says whether its holder must free its device memory before releasing
(``free_memory``), and the release reports what the holder did (``handover``).
"""

from shared.gpu.api import (
    CUDA_CONTEXT_MB,
    Gpu,
    GpuUnavailable,
    HeldLease,
    LeaseEvent,
    LeaseLost,
    LeaseRequest,
    Listener,
    vram_estimate_mb,
)
from shared.gpu.client import GpuClient
from shared.gpu.lease import Lease
from shared.gpu.standin import NoCoordinator, NoLease
from shared.protocol.coordinator import Handover, Priority

__all__ = [
    "CUDA_CONTEXT_MB",
    "Gpu",
    "GpuClient",
    "GpuUnavailable",
    "Handover",
    "HeldLease",
    "Lease",
    "LeaseEvent",
    "LeaseLost",
    "LeaseRequest",
    "Listener",
    "NoCoordinator",
    "NoLease",
    "Priority",
    "vram_estimate_mb",
]
