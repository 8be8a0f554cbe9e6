"""Enrolled voices, per owner: a name and a voiceprint (192 numbers), never the audio.
Kept in Redis, one hash per owner, so that no listing or lookup can reach another's."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any

from redis.asyncio import Redis

MAX_VOICES = 50
"""Enrolled voices per owner (each is compared with every cluster of every recording)."""


@dataclass(frozen=True)
class Voice:
    id: str
    name: str
    created_at: float
    samples: int
    """How many clips the print was made from."""
    vector: list[float]

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "object": "speaker", "name": self.name, "created_at": int(self.created_at),
                "samples": self.samples}  # fmt: skip


class VoiceLimit(Exception):
    """The owner has MAX_VOICES already."""


class Voices:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix

    def _key(self, owner: str) -> str:
        return f"{self._prefix}voices:{owner}"

    async def add(self, owner: str, name: str, vector: list[float], samples: int) -> Voice:
        if await self._redis.hlen(self._key(owner)) >= MAX_VOICES:
            raise VoiceLimit(f"at most {MAX_VOICES} enrolled voices; delete one first")
        voice = Voice(f"spk_{secrets.token_hex(8)}", name, time.time(), samples, [round(x, 6) for x in vector])
        await self._redis.hset(self._key(owner), voice.id, json.dumps(asdict(voice)))
        return voice

    async def all(self, owner: str) -> list[Voice]:
        raw = await self._redis.hvals(self._key(owner))
        return sorted((Voice(**json.loads(v)) for v in raw), key=lambda v: v.created_at)

    async def delete(self, owner: str, voice_id: str) -> bool:
        return bool(await self._redis.hdel(self._key(owner), voice_id))

    async def known(self, owner: str) -> list[tuple[str, list[float]]]:
        """(name, print) of each enrolled voice, oldest first: the names a recording of
        ``owner`` may be labelled with."""
        return [(voice.name, voice.vector) for voice in await self.all(owner)]
