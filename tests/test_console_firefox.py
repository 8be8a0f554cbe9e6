"""The web console in headless Firefox (Debian's firefox-esr, over WebDriver BiDi) against
the launcher's stack: the same page works there too. tests/test_console_browser.py
covers the console in depth in Chromium; this is the user's path through it once more,
in the other engine: sign in, drop the meeting and see it done and indexed, ask and get
a streamed answer with sources, see the timeline, no script error, no token in a URL."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.apt import Unavailable
from harness.firefox import Firefox
from harness.launched import LaunchedStack
from harness.servers import wait_until

pytestmark = pytest.mark.slow

MEETING = Path(__file__).resolve().parents[1] / "baton" / "demo" / "speech" / "meeting.ogg"


@pytest.fixture
def firefox() -> Iterator[Firefox]:
    try:
        browser = Firefox()
    except Unavailable as exc:
        pytest.skip(str(exc))
    yield browser
    browser.close()


def until(browser: Firefox, expression: str, timeout_s: float, what: str) -> None:
    wait_until(lambda: browser.run(expression), timeout_s, what, 0.1)


def test_the_console_works_in_firefox(firefox: Firefox, launched: LaunchedStack) -> None:
    base = launched.url("gateway")
    firefox.open(f"{base}/console/")
    assert firefox.run("document.getElementById('who').hidden") is True
    firefox.run("document.getElementById('dev-token').click()")
    until(firefox, "document.getElementById('who-name').textContent === 'dev'", 30, "signing in")

    # Dropped, as a file manager drops it.
    data = json.dumps(base64.b64encode(MEETING.read_bytes()).decode())
    firefox.run(
        f"""(() => {{
            const bytes = Uint8Array.from(atob({data}), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "meeting.ogg", {{ type: "audio/ogg" }}));
            document.getElementById("drop").dispatchEvent(
                new DragEvent("drop", {{ dataTransfer: transfer, bubbles: true, cancelable: true }}));
        }})()"""
    )
    until(firefox, "document.getElementById('job-state').dataset.state === 'done'", 600, "the job to finish")
    until(firefox, "document.getElementById('current-job').dataset.indexed === 'true'", 300, "the transcript indexed")
    assert firefox.run("document.querySelectorAll('#segments li').length") >= 5

    firefox.run(
        """(() => {
            document.getElementById("question").value = "What is the new deadline for the Harbor report?";
            document.getElementById("send").click();
        })()"""
    )
    until(firefox, "document.querySelector('#messages .assistant[data-done]') !== null", 300, "the answer")
    answer = "document.querySelector('#messages .assistant')"
    assert firefox.run(f"{answer}.querySelector('.error')") is None
    assert firefox.run(f"{answer}.querySelectorAll('.piece').length") > 1
    # A transcript of the meeting: this test's upload, or the Chromium test's (the meeting
    # three times over) when it ran first on the same stack and its passage ranks higher.
    source = firefox.run(f"{answer}.querySelector('.source').textContent")
    assert re.search(r"\bmeeting(-x3)?\.ogg at ", source), source

    until(firefox, "document.querySelectorAll('#timeline .bar').length > 0", 30, "the timeline")
    holders = firefox.run("[...document.querySelectorAll('#timeline .lane')].map((l) => l.dataset.holder)")
    assert {"transcription", "llm"} <= set(holders)

    assert not firefox.errors, firefox.errors
    token = launched.info["token"]
    urls = [r["url"] for r in firefox.requests if not r["url"].startswith("data:")]
    assert urls and all(url.startswith(base + "/") and token not in url for url in urls), urls
    api = [r for r in firefox.requests if "/v1/" in r["url"]]
    assert api and all(r["headers"].get("authorization") == f"Bearer {token}" for r in api)
