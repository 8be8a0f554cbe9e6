"""Headless Firefox (Debian's firefox-esr) driven over WebDriver BiDi, the W3C protocol it
speaks natively: no geckodriver and no Playwright build of Firefox, neither of which
can be had here. Just enough of the protocol for the console's test: open a page, run a
script in it, and record its script errors and every request it sends.

The browser is installed with apt when missing and root, as harness/browser.py
does for Chromium.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from harness.apt import Unavailable, command

PREFS = """
user_pref("app.normandy.enabled", false);
user_pref("app.update.disabledForTesting", true);
user_pref("browser.shell.checkDefaultBrowser", false);
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("network.connectivity-service.enabled", false);
user_pref("services.settings.server", "http://127.0.0.1:9/");
user_pref("toolkit.telemetry.enabled", false);
"""
"""A fresh profile that does not try to reach Mozilla's servers."""


def firefox() -> str:
    return command(["firefox-esr", "firefox"], "firefox-esr")


class ScriptError(Exception):
    """A script run in the page threw: the message is what it threw."""


class Firefox:
    def __init__(self) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="baton-firefox-"))
        (self.profile / "user.js").write_text(PREFS)
        self.process = subprocess.Popen(
            [firefox(), "--headless", "--no-remote", "--profile", str(self.profile), "--remote-debugging-port=0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.errors: list[str] = []
        self.requests: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._answers: dict[int, dict[str, Any]] = {}
        self._answered = threading.Condition()
        self.ws = self._connect()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.call("session.new", capabilities={})
        self.call("session.subscribe", events=["log.entryAdded", "network.beforeRequestSent"])
        self.context = self.call("browsingContext.getTree")["contexts"][0]["context"]

    def _connect(self) -> ClientConnection:
        assert self.process.stderr is not None
        for line in self.process.stderr:  # Firefox says where it listens, then keeps talking
            found = re.search(r"WebDriver BiDi listening on (ws://\S+)", line)
            if found:
                threading.Thread(target=self.process.stderr.read, daemon=True).start()
                return connect(found.group(1) + "/session", max_size=None)
        raise Unavailable(f"firefox exited ({self.process.wait()}) before it listened for WebDriver BiDi")

    def _read(self) -> None:
        try:
            for message in self.ws:
                self._dispatch(json.loads(message))
        except ConnectionClosed:
            pass  # the browser went away: close(), or a crash the next call reports

    def _dispatch(self, data: dict[str, Any]) -> None:
        if data.get("type") == "event":
            self._event(data["method"], data["params"])
        elif "id" in data:
            with self._answered:
                self._answers[data["id"]] = data
                self._answered.notify_all()

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "log.entryAdded" and params.get("level") == "error" and params.get("type") == "javascript":
            self.errors.append(str(params.get("text")))
        elif method == "network.beforeRequestSent":
            request = params["request"]
            headers = {h["name"].lower(): h["value"].get("value", "") for h in request.get("headers", [])}
            self.requests.append({"url": request["url"], "method": request["method"], "headers": headers})

    def call(self, method: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        with self._answered:
            if not self._answered.wait_for(lambda: ident in self._answers, timeout):
                raise TimeoutError(f"{method}: no answer in {timeout} s")
            answer = self._answers.pop(ident)
        if answer.get("type") == "error":
            raise RuntimeError(f"{method}: {answer.get('error')}: {answer.get('message')}")
        return dict(answer["result"])

    def open(self, url: str) -> None:
        self.call("browsingContext.navigate", context=self.context, url=url, wait="complete")

    def run(self, script: str) -> Any:
        """An expression (a promise is awaited) in the page; its JSON-able value."""
        answer = self.call(
            "script.evaluate",
            expression=f"(async () => JSON.stringify(await ({script})))()",
            target={"context": self.context},
            awaitPromise=True,
        )
        if answer["type"] == "exception":
            raise ScriptError(answer["exceptionDetails"]["text"])
        value = answer["result"].get("value")
        return None if value is None else json.loads(value)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.call("session.end", timeout=10)
        self.ws.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
