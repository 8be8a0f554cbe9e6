"""Baton's four services: llm (Gemma), transcription, rag, coordinator."""
