"""The service's worker processes for one model.

One request per worker at a time. A job's worker that is paused mid-request stays
out of the pool, so a second worker lets an interactive upload run while a job is
paused (two by default). Workers are started and ended on the event loop's thread
(see worker.Worker); a worker that died is replaced by a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from services.transcription.worker import Ended, Work, Worker, WorkerDied, WorkerSpec

log = logging.getLogger(__name__)


class WorkerPool:
    def __init__(self, spec: WorkerSpec, size: int) -> None:
        self.spec = spec
        self.size = size
        self._idle: asyncio.Queue[Worker] = asyncio.Queue()
        self.workers: set[Worker] = set()
        self.info: dict[str, Any] = {}

    async def start(self) -> None:
        started = [self._spawn() for _ in range(self.size)]
        for worker in started:
            self.info = await worker.ready()
            self._idle.put_nowait(worker)
        log.info("whisper workers ready", extra={"workers": [w.pid for w in started]})

    def _spawn(self) -> Worker:
        worker = Worker(self.spec)
        self.workers.add(worker)
        return worker

    async def take(self) -> Worker:
        """An idle worker (waits while all are busy or paused)."""
        worker = await self._idle.get()
        if not worker.alive:
            return await self.replace(worker)
        await worker.ready()
        return worker

    def give(self, worker: Worker) -> None:
        """Back to the pool after a request ended (a paused or dead one is replaced)."""
        if worker.alive and not worker.paused:
            self._idle.put_nowait(worker)
            return
        self._retire(worker)
        self._idle.put_nowait(self._spawn())

    async def replace(self, worker: Worker) -> Worker:
        """End ``worker`` (whatever its state) and return a ready new one, not in the pool."""
        self._retire(worker)
        fresh = self._spawn()
        try:
            await fresh.ready()
        except WorkerDied:
            self._retire(fresh)
            raise
        return fresh

    def _retire(self, worker: Worker) -> None:
        worker.kill()
        self.workers.discard(worker)

    def end_paused(self, keep: Worker | None = None) -> int:
        """End every paused worker but ``keep`` (to free their device memory); their
        requests start again from their checkpoints on new workers. Returns how many."""
        ended = 0
        for worker in list(self.workers):
            if worker is not keep and worker.paused:
                worker.kill()  # its request sees it died, and replaces it once it holds the lease again
                ended += 1
        return ended

    async def free_idle(self) -> None:
        """Move the weights of every idle worker off the device."""
        idle: list[Worker] = []
        while not self._idle.empty():
            idle.append(self._idle.get_nowait())
        try:
            for worker in idle:
                if worker.alive:
                    answer = await worker.call(Work("free_device"))
                    if not isinstance(answer, Ended):
                        log.warning("an idle worker could not free the device", extra={"answer": str(answer)})
        finally:
            for worker in idle:
                self.give(worker)

    async def close(self) -> None:
        for worker in list(self.workers):
            with contextlib.suppress(Exception):
                worker.kill()
        self.workers.clear()
