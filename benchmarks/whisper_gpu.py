"""faster-whisper on CUDA vs on the CPU: real-time factor, one run, same audio.

    python -m benchmarks.whisper_gpu --model models/faster-whisper-tiny.en [--audio meeting.npy]

Real-time factor = seconds spent transcribing / seconds of audio (lower is faster).
The CPU runs int8 on every core, the card float16. If CTranslate2 cannot use the card,
the exact error is reported. ``--cublas-shim DIR`` is an experiment for a machine whose
CUDA libraries are newer than the ones the CTranslate2 wheel was built for: DIR gets a
``libcublas.so.12`` that points at the cuBLAS found beside it (reported as such).

The audio is the demo meeting (``baton/demo/speech/meeting.ogg``), or a float32 16 kHz
``.npy`` of it where PyAV is not installed (``--save-npy`` writes one); each transcript's
word error rate against ``meeting.txt`` is reported beside its speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

MEETING = Path(__file__).resolve().parents[1] / "baton" / "demo" / "speech" / "meeting.ogg"
REFERENCE = MEETING.with_suffix(".txt")
RATE = 16_000


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("harbour", "harbor")).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance over the reference's length (case and punctuation ignored)."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, said in enumerate(ref, 1):
        previous, row[0] = row[:], i
        for j, heard in enumerate(hyp, 1):
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (said != heard))
    return row[-1] / max(1, len(ref))


def audio(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path).astype(np.float32)
    from faster_whisper import decode_audio

    return decode_audio(str(path), sampling_rate=RATE)


def _without_pyav() -> None:
    # faster_whisper imports PyAV at import time, only to decode files; arrays need none.
    if importlib.util.find_spec("av") is None:
        sys.modules["av"] = types.ModuleType("av")


def transcribe(model_dir: Path, samples: np.ndarray, device: str) -> dict[str, Any]:
    _without_pyav()
    from faster_whisper import WhisperModel

    compute = "float16" if device == "cuda" else "int8"
    started = time.perf_counter()
    model = WhisperModel(str(model_dir), device=device, compute_type=compute, cpu_threads=os.cpu_count() or 1)
    load_s = time.perf_counter() - started
    warm, _ = model.transcribe(samples[: 5 * RATE], beam_size=1, language="en")
    list(warm)
    started = time.perf_counter()
    segments, _ = model.transcribe(samples, beam_size=1, language="en", condition_on_previous_text=False)
    text = " ".join(s.text.strip() for s in segments)
    seconds = time.perf_counter() - started
    duration = len(samples) / RATE
    return {
        "device": device,
        "compute_type": compute,
        "load_s": round(load_s, 3),
        "transcribe_s": round(seconds, 3),
        "audio_s": round(duration, 1),
        "rtf": round(seconds / duration, 4),
        "wer_vs_meeting_txt": round(word_error_rate(REFERENCE.read_text(), text), 3),
        "text": text,
    }


def one(model_dir: Path, audio_path: Path, device: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One device in a child process, so that a failure to load CUDA is contained and quoted."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.whisper_gpu",
            "--model",
            str(model_dir),
            "--audio",
            str(audio_path),
            "--device",
            device,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=500,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return dict(json.loads(lines[-1]))
    return {"device": device, "error": (done.stderr.strip().splitlines() or ["(no output)"])[-1]}


def cublas_shim(directory: Path) -> dict[str, str] | None:
    """A directory holding libcublas.so.12 -> the cuBLAS installed with NVIDIA's wheels."""
    spec = importlib.util.find_spec("nvidia")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    found = sorted(lib for root in roots for lib in root.glob("**/libcublas.so.*"))
    if not found:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    link = directory / "libcublas.so.12"
    link.unlink(missing_ok=True)
    link.symlink_to(found[0])
    path = f"{directory}:{found[0].parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"
    return {"LD_LIBRARY_PATH": path, "_target": str(found[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--audio", type=Path, default=MEETING)
    parser.add_argument("--device", choices=["cpu", "cuda"], help="run one device here (used by the parent)")
    parser.add_argument("--cublas-shim", type=Path, default=None)
    parser.add_argument("--save-npy", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.save_npy:
        np.save(args.save_npy, audio(args.audio))
        return
    if args.device:
        print(json.dumps(transcribe(args.model, audio(args.audio), args.device)))
        return

    import ctranslate2

    results: dict[str, Any] = {
        "ctranslate2": ctranslate2.__version__,
        "cuda_devices_seen": ctranslate2.get_cuda_device_count(),
    }
    results["cpu"] = one(args.model, args.audio, "cpu")
    results["cuda"] = one(args.model, args.audio, "cuda")
    if "error" in results["cuda"] and args.cublas_shim:
        shim = cublas_shim(args.cublas_shim)
        if shim:
            target = shim.pop("_target")
            results["cuda_with_shim"] = {"libcublas.so.12 ->": target, **one(args.model, args.audio, "cuda", shim)}
    for key in ("cpu", "cuda", "cuda_with_shim"):
        if key in results:
            row = {k: v for k, v in results[key].items() if k != "text"}
            print(f"{key}: {json.dumps(row)}")
    gpu = results.get("cuda_with_shim") if "error" in results["cuda"] else results["cuda"]
    if gpu and "rtf" in gpu and "rtf" in results["cpu"]:
        print(
            f"real-time factor: GPU {gpu['rtf']}, CPU {results['cpu']['rtf']} "
            f"({results['cpu']['rtf'] / gpu['rtf']:.1f}x faster); same text: {gpu['text'] == results['cpu']['text']}"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
