"""The engine's loads, in process, with the bundled SmolLM2 (loads in well under a second)."""

from __future__ import annotations

from services.llm.engine import Engine
from shared.presets import resolve


def test_an_offloaded_model_asks_nothing_of_the_card_and_a_loaded_one_keeps_llama_cpps_defaults() -> None:
    # Measured on an H100 (README, GPU section): with llama.cpp's defaults a model with 0
    # layers still kept its KV cache and a compute buffer on the card (1272 MiB against
    # 586 MiB for the CUDA context alone) and sent large batches to it without the lease.
    path, _ = resolve("smollm2-135m-instruct", "llm")
    engine = Engine(path, context_size=256, batch_size=64)
    try:
        engine.load(0)
        params = engine.llama.context_params
        assert (params.offload_kqv, params.op_offload) == (False, False)
        engine.load(99)
        params = engine.llama.context_params
        assert (params.offload_kqv, params.op_offload) == (True, True)
        assert engine.gpu_layers == 99
    finally:
        engine.close()
