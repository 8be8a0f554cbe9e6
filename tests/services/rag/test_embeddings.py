"""Our MiniLM function gives Chroma's own vectors, faster."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from chromadb.utils.embedding_functions import ONNXMiniLM_L6_V2

from services.rag.store import MiniLM
from shared.presets import PRESETS

pytestmark = pytest.mark.slow  # the real embedding model and Chroma


def test_same_vectors_as_chromas_own_function() -> None:
    folder = PRESETS["all-minilm-l6-v2"].location()
    stock = ONNXMiniLM_L6_V2(preferred_providers=["CPUExecutionProvider"])
    stock.DOWNLOAD_PATH = folder  # the bundled files, no download
    ours = MiniLM(folder)
    passages = json.loads((Path(__file__).parent / "data" / "labelled.json").read_text())["passages"]
    texts = [*list(passages.values())[:12], "short", "word " * 400, "Ünïcode — ok?"]
    expected = np.array(stock(texts))
    actual = np.array(ours(texts))
    assert actual.shape == (len(texts), 384)
    assert np.abs(actual - expected).max() < 1e-5
