"""Voiceprints made on a thread beside the decoder, in batches.

The decoder hands its pieces over a stretch at a time; their prints are made meanwhile,
on the core the decoder leaves idle for part of each stretch, and everything waiting
goes through the encoder in one call (13 clips of 3 s one call each cost 2.5 times what
one call for all 13 did, on this project's 2-core CPU). One thread, so prints come in
the order asked for; in the worker's process, so a pause (SIGSTOP) stops it with the
decoder. What a clip is batched with never changes its print (encoder.py)."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from services.transcription.speakers.encoder import VoiceEncoder


class Beside:
    def __init__(self, encoder: VoiceEncoder) -> None:
        self._encoder = encoder
        self._lock = threading.Lock()
        self._waiting: list[tuple[list[np.ndarray], Future[np.ndarray]]] = []
        self._draining = False
        self._thread: ThreadPoolExecutor | None = None

    def embed(self, clips: list[np.ndarray]) -> Future[np.ndarray]:
        """The prints of ``clips``, soon: (len(clips), dim), or (0, 0) for none."""
        future: Future[np.ndarray] = Future()
        with self._lock:
            self._waiting.append((clips, future))
            if self._draining:
                return future
            self._draining = True
            if self._thread is None:
                self._thread = ThreadPoolExecutor(1, thread_name_prefix="voiceprints")
        self._thread.submit(self._drain)
        return future

    def _drain(self) -> None:
        while True:
            with self._lock:
                batch, self._waiting = self._waiting, []
                if not batch:
                    self._draining = False
                    return
            clips = [clip for part, _ in batch for clip in part]
            try:
                prints = self._encoder.embed(clips) if clips else np.zeros((0, 0), dtype=np.float32)
            except Exception as exc:  # each waiter gets it, as from the call itself
                for _, future in batch:
                    future.set_exception(exc)
                continue
            at = 0
            for part, future in batch:
                future.set_result(prints[at : at + len(part)] if part else np.zeros((0, 0), dtype=np.float32))
                at += len(part)
