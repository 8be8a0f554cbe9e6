"""OpenAI's legacy completions (``POST /v1/completions``): raw text in, raw text out,
read by the local model as it is (no chat template, no memories)."""
