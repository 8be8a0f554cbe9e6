"""faster-whisper in a worker process that the service can pause at any instant.

A thread cannot be stopped in the middle of a CTranslate2 call; a process can. The
service owns its workers (started with ``spawn`` from the event-loop thread) and
talks to each over a pipe: one request at a time, answered by a stream of messages.

- **Pause**: SIGSTOP stops every thread of the worker at once; its memory stays, so
  SIGCONT resumes exactly where it stopped and nothing decoded is lost.
- **Fence**: the worker never runs a request past its lease. The service writes the
  lease's local deadline (monotonic clock, the same in every process) into shared
  memory at each renewal; a watchdog thread in the worker stops the worker itself
  (SIGSTOP) as soon as that deadline passes while a request runs, even if the
  service is stalled and cannot do it. A renewal that comes after all resumes it.
- **Never orphaned**: the worker asks the kernel to SIGKILL it when its parent dies
  (PR_SET_PDEATHSIG, which also kills a stopped process), and exits at once if the
  parent is already gone. The service reaps what it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

import numpy as np

from shared.aio import ThreadInbox

log = logging.getLogger(__name__)

FENCE_CHECK_S = 0.005
"""How often a running worker compares the time with its lease deadline."""
PR_SET_PDEATHSIG = 1
DECODES = ("windows", "transcribe", "voiceprint")
"""The requests that use the device, and so run only before the lease's deadline."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker loads; picklable, sent to the child."""

    path: Path
    device: str
    compute_type: str
    threads: int
    beam_size: int
    chunk_length_s: int
    nice: int = 0
    speaker_model: Path | None = None
    """The speaker-embedding model's folder; None: diarization is not offered."""
    speaker_same: float = 0.75
    speaker_match: float = 0.7


@dataclass
class Work:
    """One unit of work. ``op``: ``windows`` (resumable job decoding), ``transcribe``
    (interactive, with VAD), ``free_device`` or ``to_device``."""

    op: str
    samples: np.ndarray | None = None
    options: dict[str, Any] | None = None


def put_work(conn: Connection, work: Work) -> None:
    """Send ``work``: its samples go as raw bytes straight from the array (a pickle
    would first copy hours of audio, hundreds of MB, inside the service)."""
    samples = None if work.samples is None else np.ascontiguousarray(work.samples, dtype=np.float32)
    conn.send((work.op, work.options, None if samples is None else samples.size))
    if samples is not None:
        conn.send_bytes(samples.data)


def take_work(conn: Connection) -> Work:
    """Receive what ``put_work`` sent, the samples read into one array of their own."""
    op, options, size = conn.recv()
    if size is None:
        return Work(op, None, options)
    samples = np.empty(size, dtype=np.float32)
    conn.recv_bytes_into(samples.data)
    return Work(op, samples, options)


# -- what the worker says (and what the service says in its place) ----------------


@dataclass(frozen=True)
class Ready:
    """The model is loaded."""

    info: dict[str, Any]


@dataclass(frozen=True)
class Decoded:
    """A piece of the answer under way: a ``window`` of a job or a ``piece`` of an upload."""

    kind: str
    body: Any


@dataclass(frozen=True)
class OnDevice:
    """Whether the weights are on the device now (after each request)."""

    on: bool


@dataclass(frozen=True)
class Ended:
    """The request's end, with what it returned."""

    result: Any = None


@dataclass(frozen=True)
class Failed:
    """The request raised inside the worker (the worker lives on)."""

    error: str


@dataclass(frozen=True)
class Died:
    """The worker's pipe closed: it ended (put by the service's reader thread)."""


@dataclass(frozen=True)
class HandedOver:
    """Paused for the lease with this fence (put by the service when a yield came)."""

    fence: int


Message = Ready | Decoded | OnDevice | Ended | Failed | Died | HandedOver
Answer = Ended | Failed | Died
"""How a request ends."""


class WorkerDied(Exception):
    """The worker process ended while it had a request."""


class WorkerFailed(Exception):
    """The request raised inside the worker (the worker lives on)."""


# -- the child --------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)


def _fence(deadline: Synchronized[float], busy: threading.Event) -> None:
    """Stop this process when a request runs past its lease's deadline. The service
    resumes it (SIGCONT) after writing a new deadline, once it holds a lease again."""
    while True:
        busy.wait()
        if time.monotonic() >= deadline.value:
            os.kill(os.getpid(), signal.SIGSTOP)
            continue
        time.sleep(FENCE_CHECK_S)


def _child(conn: Connection, spec: WorkerSpec, deadline: Synchronized[float], parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the service's to handle
    if spec.nice:
        with contextlib.suppress(OSError):
            os.nice(spec.nice)
    import ctranslate2

    from services.transcription.speakers.labeller import Diarizers, JobLabeller, Labeller
    from services.transcription.whisper import Transcriber

    transcriber = Transcriber(
        spec.path,
        device=spec.device,
        compute_type=spec.compute_type,
        threads=spec.threads,
        beam_size=spec.beam_size,
        chunk_length_s=spec.chunk_length_s,
    )
    diarizers = Diarizers()
    busy = threading.Event()
    threading.Thread(target=_fence, args=(deadline, busy), name="fence", daemon=True).start()
    conn.send(Ready({"multilingual": transcriber.multilingual, "pid": os.getpid()}))
    while True:
        try:
            request = take_work(conn)
        except (EOFError, OSError):
            return
        if request.op in DECODES:
            busy.set()  # fenced: only decoding runs under a lease; freeing memory never waits for one
        answer: Ended | Failed
        try:
            options = request.options or {}
            samples = request.samples if request.samples is not None else np.zeros(0, dtype=np.float32)
            if request.op == "windows":
                speakers = options.pop("speakers", None)  # the voices of the checkpoint: diarized
                if speakers is not None:
                    options["words"] = True
                windows = transcriber.windows(samples, **options)
                if speakers is not None:
                    job = JobLabeller(diarizers.get(spec), samples, speakers, options["first_id"])
                    windows = job.windows(windows)
                for window in windows:
                    conn.send(Decoded("window", window))
                answer = Ended()
            elif request.op == "transcribe":
                # The temperature fallback samples: a fixed seed makes a rerun (after the
                # worker was ended to free memory) give the same text as the first run.
                ctranslate2.set_random_seed(0)
                send = lambda piece: conn.send(Decoded("piece", piece))  # noqa: E731
                speakers = options.pop("speakers", None)
                if speakers is not None:  # diarized: pieces go out in labelled stretches
                    labeller = Labeller(diarizers.get(spec), samples, speakers, send)
                    send = labeller.add
                    options["words"] = True
                _, info = transcriber.transcribe(samples, on_piece=send, **options)
                if speakers is not None:
                    labeller.flush()
                answer = Ended(info)
            elif request.op == "voiceprint":  # an enrolment: clips of one voice, one after another
                clips = np.split(samples, np.cumsum(options["lengths"])[:-1])
                answer = Ended(diarizers.get(spec).enrolment(clips))
            elif request.op == "free_device":
                answer = Ended(transcriber.free_device())
            elif request.op == "to_device":
                answer = Ended(transcriber.to_device())
            else:
                answer = Failed(f"unknown op {request.op!r}")
        except (BrokenPipeError, EOFError):
            return
        except Exception as exc:
            answer = Failed(f"{type(exc).__name__}: {exc}")
        finally:
            busy.clear()
        try:
            conn.send(OnDevice(transcriber.on_device))
            conn.send(answer)
        except (BrokenPipeError, EOFError):
            return


# -- the parent's handle ------------------------------------------------------------


def process_state(pid: int) -> str | None:
    """The kernel's state letter for ``pid`` (R, S, T, Z...), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


class Worker:
    """One worker process. Messages arrive through a reader thread into an asyncio
    queue; ``pause``/``resume`` are safe from any thread."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self._context = multiprocessing.get_context("spawn")
        self._deadline: Synchronized[float] = self._context.Value("d", 0.0, lock=False)
        self._inbox: ThreadInbox[Message] = ThreadInbox()
        self._state_lock = threading.Lock()
        self.paused = False
        self._sending = False
        self._pending: int | None = None  # a hand-over asked for while a request was being sent
        self.checkpointed = False
        """Its device memory is in host memory (CUDA checkpoint API) until restored."""
        self.armed: object | None = None
        """The lease whose signals may pause this worker now (placement.Placement)."""
        self.on_device = True
        """Whether its weights are on the device, as it last reported (they load at start)."""
        self.info: dict[str, Any] = {}
        parent, child = self._context.Pipe()
        self._conn = parent
        # Started on the calling thread, which must be the event loop's: the parent-death
        # signal fires when the thread that started a child ends.
        self.process = self._context.Process(
            target=_child, args=(child, spec, self._deadline, os.getpid()), name="whisper-worker", daemon=True
        )
        self.process.start()
        child.close()
        self.pid: int = self.process.pid or 0
        threading.Thread(target=self._read, name=f"whisper-worker-{self.pid}", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):  # the worker ended (its reaping is kill()'s)
                self._inbox.put(Died())
                return
            self._inbox.put(message)

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    async def ready(self) -> dict[str, Any]:
        """Wait until the model is loaded (at once if it already was)."""
        if not self.info:
            message = await self._inbox.get()
            if not isinstance(message, Ready):
                raise WorkerDied(f"the worker did not start ({message})")
            self.info = message.info
        return self.info

    def post(self, message: Message) -> None:
        """Put a message of the service's own into this worker's inbox (any thread)."""
        self._inbox.put(message)

    # -- the fence and pausing --------------------------------------------------------

    def set_deadline(self, monotonic_deadline: float) -> None:
        self._deadline.value = monotonic_deadline

    def extend(self, monotonic_deadline: float) -> None:
        """A renewal moved the deadline: write it, and undo a stop the worker's own fence
        made meanwhile (a renewal answered after the old deadline; or the fence read the
        old deadline an instant before ``resume``). A pause of the service's stays."""
        with self._state_lock:
            self._deadline.value = monotonic_deadline
            if not self.paused and self.alive:
                os.kill(self.pid, signal.SIGCONT)

    def pause(self) -> bool:
        """SIGSTOP; True if this call paused it."""
        with self._state_lock:
            if self.paused or not self.alive:
                return False
            os.kill(self.pid, signal.SIGSTOP)
            self.paused = True
            return True

    def hand_over(self, fence: int) -> None:
        """Pause now and tell the request's loop (``handover`` message). While a request
        is being sent, wait for the send to end: a stopped worker cannot read its pipe."""
        with self._state_lock:
            if self._sending:
                self._pending = fence
                return
        self.pause()
        self.post(HandedOver(fence))

    def resume(self) -> None:
        """SIGCONT (also undoes a stop the worker's own fence made)."""
        with self._state_lock:
            self.paused = False
            if self.alive:
                os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL (it also ends a stopped process) and reap."""
        with self._state_lock:
            if self.process.is_alive():
                os.kill(self.pid, signal.SIGKILL)
            self.paused = False
        self.process.join(timeout=10)
        self._conn.close()

    # -- requests ------------------------------------------------------------------

    async def send(self, request: Work, before: Callable[[], None] | None = None) -> None:
        """Send ``request``. ``before`` runs once the send has begun (arming the lease): a
        hand-over it asks for waits for the send to end, since a stopped worker cannot
        read its pipe. Arming before the send paused the worker first, and the send then
        waited for ever (the red team's stalled job)."""
        # A long recording is megabytes of samples: copy them into the pipe off the loop.
        with self._state_lock:
            self._sending = True
        try:
            if before is not None:
                before()
            await asyncio.to_thread(put_work, self._conn, request)
        finally:
            with self._state_lock:
                self._sending = False
                pending, self._pending = self._pending, None
            if pending is not None:
                self.hand_over(pending)

    async def receive(self) -> Message:
        """The next message; the worker's OnDevice reports are taken in here."""
        while True:
            message = await self._inbox.get()
            if not isinstance(message, OnDevice):
                return message
            self.on_device = message.on

    async def call(self, request: Work) -> Answer:
        """Send a short request (free_device, to_device) and return how it ended,
        skipping the service's own signals."""
        await self.ready()
        await self.send(request)
        while True:
            message = await self.receive()
            if isinstance(message, Ended | Failed | Died):
                return message
