"""Log mel filterbank features as Kaldi computes them (the input CAM++ was trained on):
25 ms frames every 10 ms, DC removed, pre-emphasis 0.97, Povey window, 512-point power
spectrum, 80 mel bands from 20 Hz to Nyquist, natural log; then each band's mean over
the clip is subtracted. No dither, so the same samples always give the same features."""

from __future__ import annotations

import numpy as np

RATE = 16000
FRAME = 400  # 25 ms
SHIFT = 160  # 10 ms
FFT = 512
BANDS = 80
PREEMPHASIS = 0.97


def _mel(hz: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


def _filters() -> np.ndarray:
    """Triangular filters, equally spaced on the mel scale: (BANDS, FFT // 2 + 1)."""
    edges = np.linspace(_mel(20.0), _mel(RATE / 2), BANDS + 2)
    bins = _mel(np.arange(FFT // 2 + 1) * RATE / FFT)
    rising = (bins[None, :] - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None])
    falling = (edges[2:, None] - bins[None, :]) / (edges[2:, None] - edges[1:-1, None])
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


FILTERS = _filters()
WINDOW = ((0.5 - 0.5 * np.cos(2 * np.pi * np.arange(FRAME) / (FRAME - 1))) ** 0.85).astype(np.float64)
MIN_SAMPLES = FRAME


def fbank(samples: np.ndarray) -> np.ndarray:
    """(frames, 80) float32 features of 16 kHz samples in [-1, 1] (at least 25 ms of them)."""
    if samples.size < FRAME:
        raise ValueError("a clip needs at least 25 ms of audio")
    scaled = samples.astype(np.float64) * 32768.0
    count = 1 + (scaled.size - FRAME) // SHIFT
    frames = scaled[np.arange(FRAME)[None, :] + SHIFT * np.arange(count)[:, None]]
    frames -= frames.mean(axis=1, keepdims=True)
    frames[:, 1:] -= PREEMPHASIS * frames[:, :-1].copy()
    frames[:, 0] *= 1 - PREEMPHASIS
    power = np.abs(np.fft.rfft(frames * WINDOW, FFT)) ** 2
    energies = np.maximum(power.astype(np.float32) @ FILTERS.T, np.finfo(np.float32).eps)
    features = np.log(energies)
    return (features - features.mean(axis=0, keepdims=True)).astype(np.float32)
