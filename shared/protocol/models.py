"""OpenAI's model list, as every service's ``GET /v1/models`` answers it (the gateway
merges them into one)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

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
    def of(cls, task: Task, *ids: str) -> ModelList:
        return cls(data=[ModelCard(id=i, task=task) for i in ids])
