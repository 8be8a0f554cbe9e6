"""Where the stack is and how to talk to it, for the command-line client.

URLs and the token come from flags, else ``BATON_*`` environment variables, else
the running stack's ``.run/stack.json``. Every failure becomes one clear sentence.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

SERVICES = ("llm", "coordinator", "transcription", "rag", "gateway")

PATIENCE_S = 60.0
"""How long, in all, one read waits out the stack's rate limit (429 with Retry-After)."""


class _Patient(httpx.HTTPTransport):
    """Reads (GET) that are refused for rate wait as long as the service asks, then go again.

    A refused request did nothing (limits are checked before any work), but only reads
    are retried: an upload's body is a file already read."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        give_up = time.monotonic() + PATIENCE_S
        while True:
            response = super().handle_request(request)
            if request.method != "GET" or response.status_code != 429:
                return response
            try:
                wait_s = float(response.headers.get("retry-after", "1"))
            except ValueError:
                wait_s = 1.0
            if time.monotonic() + wait_s > give_up:
                return response
            response.close()
            time.sleep(max(0.0, wait_s))


class StackError(Exception):
    """Something the user can fix: the message says what."""


@dataclass
class Stack:
    urls: dict[str, str]
    token: str

    @classmethod
    def find(cls, run_dir: Path, token: str | None = None, **urls: str | None) -> Stack:
        stack_file = run_dir / "stack.json"
        saved: dict[str, Any] = {}
        if stack_file.exists():
            try:
                saved = json.loads(stack_file.read_text())
            except (OSError, ValueError):
                saved = {}
        found = {}
        for name in SERVICES:
            url = urls.get(name) or os.environ.get(f"BATON_{name.upper()}_URL") or saved.get("services", {}).get(name)
            if url:
                found[name] = str(url).rstrip("/")
        token = token or os.environ.get("BATON_TOKEN") or saved.get("token")
        if not found or not token:
            raise StackError(
                f"no running stack found ({stack_file} is missing): start one with `baton up`, "
                "or give the URLs and a token (--token, BATON_TOKEN, BATON_LLM_URL, ...)"
            )
        return cls(found, str(token))

    def url(self, service: str) -> str:
        if service not in self.urls:
            raise StackError(f"no URL for the {service} service (set BATON_{service.upper()}_URL)")
        return self.urls[service]

    @contextmanager
    def client(self, service: str, timeout_s: float = 30) -> Iterator[httpx.Client]:
        with httpx.Client(
            base_url=self.url(service),
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=timeout_s,
            transport=_Patient(),
        ) as http:
            try:
                yield http
            except httpx.ConnectError:
                raise StackError(
                    f"cannot reach the {service} service at {self.url(service)}: is the stack running? (`baton up`)"
                ) from None
            except httpx.TimeoutException:
                raise StackError(f"the {service} service at {self.url(service)} did not answer in time") from None


def check(response: httpx.Response, service: str) -> httpx.Response:
    """The response if it succeeded, else a StackError with the service's own message."""
    if response.is_success:
        return response
    message = _error_message(response)
    if response.status_code == 401:
        raise StackError(
            f"the {service} service refused the token ({message}); get a fresh one with `baton token --from-stack`"
        )
    if response.status_code == 403:
        raise StackError(f"the token is not allowed to do this on the {service} service ({message})")
    raise StackError(f"the {service} service answered {response.status_code}: {message}")


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase
