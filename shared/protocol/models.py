"""OpenAI's model list and model, as every service's ``GET /v1/models`` and
``GET /v1/models/{id}`` answer them (the gateway merges the lists into one). ``created``
is when the model's file was written (its modification time), never a made-up 0."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from shared.errors import NotFound

Task = Literal["chat", "transcription", "embeddings"]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "baton"
    task: Task | None = Field(default=None, description="What the model does here (Baton's own field).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

    @classmethod
    def of(cls, task: Task, *ids: str, created: int = 0) -> ModelList:
        return cls(data=[ModelCard(id=i, task=task, created=created) for i in ids])

    def card(self, model_id: str) -> ModelCard | None:
        return next((card for card in self.data if card.id == model_id), None)


def found_model(models: ModelList, model_id: str) -> ModelCard:
    """``GET /v1/models/{id}``: the model, or 404 ``model_not_found``."""
    card = models.card(model_id)
    if card is None:
        raise NotFound(f"the model {model_id!r} does not exist", param="model", code="model_not_found")
    return card


def created_at(path: Path | None) -> int:
    """When a model's file (or folder's newest file) was written, in Unix seconds."""
    if path is None:
        return 0
    try:
        if path.is_dir():
            return int(max((f.stat().st_mtime for f in path.iterdir() if f.is_file()), default=path.stat().st_mtime))
        return int(path.stat().st_mtime)
    except OSError:
        return 0
