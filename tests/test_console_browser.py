"""The web console in headless Chromium (Debian's), against the launcher's real stack,
through the gateway: sign in, transcribe the bundled meeting, ask about it while it runs
and after, watch the GPU pass transcription → llm → transcription on the timeline.

The page's content policy forbids eval, so the tests wait with Playwright's locators,
never with page-side predicates; what must be seen *while* it happens (tokens arriving
one by one, the progress bar moving) a MutationObserver records from the page's start.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Request, expect, sync_playwright

from harness import speech
from harness.apt import Unavailable
from harness.browser import OUTPUT, chromium
from harness.launched import LaunchedStack

pytestmark = pytest.mark.slow

QUESTION = "What is the new deadline for the Harbor report?"

RECORDER = """
window.__seen = { progress: [], answers: [] };
new MutationObserver(() => {
  const bar = document.getElementById("job-progress");
  const seen = window.__seen;
  if (bar && !document.getElementById("current-job").hidden && seen.progress.at(-1) !== bar.value) {
    seen.progress.push(bar.value);
  }
  document.querySelectorAll("#messages .assistant").forEach((item, i) => {
    const now = [item.querySelectorAll(".piece").length, item.querySelector(".sources") !== null];
    const answer = (seen.answers[i] ??= []);
    const last = answer.at(-1);
    if (!last || last[0] !== now[0] || last[1] !== now[1]) answer.push(now);
  });
}).observe(document, { subtree: true, childList: true, attributes: true, characterData: true });
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        executable = chromium()
    except Unavailable as exc:
        pytest.skip(str(exc))
    with sync_playwright() as playwright:
        # As root, Chromium runs only without its sandbox.
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


class Console:
    """One tab on the console, with every request it made and every script error."""

    def __init__(self, browser: Browser, stack: LaunchedStack) -> None:
        self.base = stack.url("gateway")
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page: Page = self.context.new_page()
        self.requests: list[Request] = []
        self.errors: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.add_init_script(RECORDER)

    def open(self) -> Page:
        response = self.page.goto(f"{self.base}/console/")
        assert response is not None and response.status == 200
        return self.page

    def seen(self) -> dict[str, Any]:
        return dict(self.page.evaluate("window.__seen"))

    def ask(self, question: str) -> int:
        """Ask through the form; returns the answer's index once it has finished."""
        index = self.page.locator("#messages .assistant").count()
        self.page.fill("#question", question)
        self.page.click("#send")
        answer = self.page.locator("#messages .assistant").nth(index)
        expect(answer).to_have_attribute("data-done", "true", timeout=300_000)
        expect(answer.locator(".error")).to_have_count(0)
        return index

    def bars(self) -> list[tuple[int, str]]:
        found = self.page.eval_on_selector_all(
            "#timeline .bar", "bars => bars.map(b => [b.dataset.fence, b.dataset.holder])"
        )
        return sorted((int(fence), holder) for fence, holder in found)

    def close(self) -> None:
        assert not self.errors, f"errors in the page's scripts: {self.errors}"
        self.context.close()


@pytest.fixture(scope="module")
def long_meeting(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The meeting three times over (about three and a half minutes): still running when
    a question comes, or when cancelled."""
    return speech.long_meeting(tmp_path_factory.mktemp("audio"), 3)[0]


@pytest.fixture
def console(browser: Browser, launched: LaunchedStack) -> Iterator[Console]:
    tab = Console(browser, launched)
    yield tab
    tab.close()


def test_a_user_transcribes_the_meeting_asks_about_it_and_sees_the_gpu_change_hands(
    console: Console, launched: LaunchedStack, long_meeting: Path
) -> None:
    page = console.open()
    # The page loads without a token, and asks for one.
    expect(page.locator("#signin")).to_be_visible()
    expect(page.locator("#who")).to_be_hidden()

    page.click("#dev-token")
    expect(page.locator("#who-name")).to_have_text("dev")
    expect(page.locator("#signin")).to_be_hidden()
    with launched.client("coordinator") as http:
        before = max((grant["fence"] for grant in http.get("/v1/history", params={"limit": 1}).json()), default=0)

    # The meeting (three times over: the bundled one alone, about 5 s of decoding here, was
    # once done before the question below reached the LLM), chosen in the drop zone's file field.
    page.set_input_files("#file", str(long_meeting))
    expect(page.locator("#job-name")).to_have_text(long_meeting.name)
    expect(page.locator("#segments li").first).to_be_visible(timeout=300_000)

    # A question while it runs: the LLM takes the card from the transcription.
    console.ask(QUESTION)

    expect(page.locator("#job-state")).to_have_attribute("data-state", "done", timeout=600_000)
    expect(page.locator("#job-progress")).to_have_attribute("value", "1")
    expect(page.locator("#current-job")).to_have_attribute("data-indexed", "true", timeout=300_000)
    progress = [float(v) for v in console.seen()["progress"]]
    assert any(0 < v < 1 for v in progress), f"the bar never showed the job part-way: {progress}"
    assert progress[-1] == 1 and progress == sorted(progress), progress
    assert page.locator("#segments li").count() >= 5
    job = page.get_attribute("#current-job", "data-job")
    expect(page.locator(f'#jobs tr[data-job="{job}"]')).to_contain_text("indexed")

    # Who spoke: the first voice heard is named, and the transcript and its memories follow.
    expect(page.locator("#job-speakers")).to_be_visible()
    first = page.locator("#segments li .speaker").first.inner_text()
    assert first == "A", first
    page.fill('#speaker-names input[name="A"]', "Alice")
    page.click("#job-speakers button[type=submit]")
    expect(page.locator("#segments li .speaker").first).to_have_text("Alice")
    assert "A" not in page.locator("#segments li .speaker").all_inner_texts()
    expect(page.locator("#current-job")).to_have_attribute("data-indexed", "true", timeout=300_000)
    with launched.client("transcription") as http:
        assert "Alice" in http.get(f"/v1/jobs/{job}").json()["speakers"]
    with launched.client("rag") as http:
        found = http.post("/v1/query", json={"query": "the meeting", "filter": {"speaker": "Alice"}}).json()["results"]
    assert found and {r["metadata"]["speaker"] for r in found} == {"Alice"}, found

    # Asked again now that the meeting is a memory: tokens stream in, then the sources.
    index = console.ask(QUESTION)
    answer = page.locator("#messages .assistant").nth(index)
    snapshots = console.seen()["answers"][index]
    pieces = [count for count, _ in snapshots]
    assert pieces[-1] > 1, snapshots
    assert any(0 < count < pieces[-1] and not sources for count, sources in snapshots), (
        f"the answer did not arrive piece by piece before its sources: {snapshots}"
    )
    assert snapshots[-1][1], snapshots
    expect(answer.locator(".source").first).to_contain_text(f"{long_meeting.name} at ")
    expect(answer.locator(".sources")).to_contain_text("score")

    # The timeline: transcription, then the LLM, then the transcription again, fences rising.
    page.click("[data-span='600']")
    expect(page.locator("#timeline")).to_have_attribute("data-mode", "bars")
    bars = [bar for bar in console.bars() if bar[0] > before]
    holders = [holder for _, holder in bars]
    handed = [i for i in range(1, len(bars) - 1) if holders[i - 1 : i + 2] == ["transcription", "llm", "transcription"]]
    assert handed, f"no transcription → llm → transcription on the timeline: {bars}"
    fences = [fence for fence, _ in bars]
    assert fences == sorted(set(fences))
    llm_fence = bars[handed[0]][0]

    # Details on hover (of the newest grant: at 600 s a bar's few pixels can lie under the
    # next grant's, as the batching LLM's hand-overs come a second apart), and the arrow
    # keys move along the grants from the LLM's.
    newest, holder = bars[-1]
    page.locator(f'#timeline .bar[data-fence="{newest}"]').hover()
    expect(page.locator("#gpu-detail")).to_contain_text(f"fence {newest}")
    expect(page.locator("#gpu-detail")).to_contain_text(holder)
    page.mouse.move(0, 0)  # off the bars: a redraw under the pointer would inspect that bar again
    llm_bar = page.locator(f'#timeline .bar[data-fence="{llm_fence}"]')
    llm_bar.focus()
    expect(page.locator("#gpu-detail")).to_contain_text(f"fence {llm_fence}")
    expect(page.locator("#gpu-detail")).to_contain_text("llm (interactive)")
    page.keyboard.press("ArrowRight")
    expect(page.locator(f'#timeline .bar[data-fence="{bars[handed[0] + 1][0]}"]')).to_be_focused()
    expect(page.locator("#gpu-detail")).to_contain_text("transcription (batch)")

    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.click("#live")
    page.click("[data-span='60']")
    page.screenshot(path=str(OUTPUT / "console.png"), full_page=True)

    # No token in any URL; every API call carried it in its header; nothing from elsewhere.
    token = launched.info["token"]
    urls = [request.url for request in console.requests]
    assert all(token not in url for url in urls)
    assert all(url.startswith(console.base + "/") for url in urls), [u for u in urls if not u.startswith(console.base)]
    api = [request for request in console.requests if "/v1/" in request.url]
    assert {request.url.split("?")[0].removeprefix(console.base) for request in api} >= {
        "/v1/models",
        "/v1/events",
        "/v1/history",
        "/v1/jobs",
        "/v1/chat/completions",
    }
    assert all(request.headers.get("authorization") == f"Bearer {token}" for request in api)


def test_a_pasted_token_signs_in_by_keyboard_alone_and_a_refused_one_does_not(
    console: Console, launched: LaunchedStack
) -> None:
    minted = launched.baton("token", "--sub", "alice", "--scope", "chat", "--scope", "rag:read", "--scope", "rag:write")
    assert minted.returncode == 0, minted.stderr
    alice = minted.stdout.strip()
    page = console.open()

    def tab_to(selector: str) -> None:
        for _ in range(60):
            page.keyboard.press("Tab")
            if page.locator(f"{selector}:focus").count():
                return
        raise AssertionError(f"Tab never reached {selector}")

    tab_to("#token")
    page.keyboard.type("not-a-token")
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_contain_text("refused")
    expect(page.locator("#who")).to_be_hidden()

    tab_to("#token")
    page.keyboard.type(alice)
    page.keyboard.press("Enter")
    expect(page.locator("#who-name")).to_have_text("alice")
    assert page.evaluate("sessionStorage.getItem('baton.token')") == alice
    # Alice may chat and use her memories; the GPU's state is not hers to read.
    expect(page.locator("#gpu-now")).to_contain_text("needs a token with scope gpu or admin")

    tab_to("#doc-title")
    page.keyboard.type("alice's note")
    tab_to("#doc-text")
    page.keyboard.type("The lighthouse keeper's cat is called Biscuit.")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_contain_text("Stored alice's note")
    tab_to("#query")
    page.keyboard.type("what is the cat called")
    page.keyboard.press("Enter")
    result = page.locator("#results .result").first
    expect(result).to_contain_text("Biscuit")
    expect(result).to_contain_text("recency")
    # Only her own memory: the meeting transcribed by `dev` is not in her results.
    expect(page.locator("#results")).not_to_contain_text("meeting")
    # Delete it by keyboard: its button is the next stop after the result's text.
    result.locator("button").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_contain_text("Deleted")
    with launched.client("rag") as http:
        http.headers["Authorization"] = f"Bearer {alice}"
        left = http.post("/v1/query", json={"query": "what is the cat called", "top_k": 5}).json()["results"]
    assert not any("Biscuit" in r["text"] for r in left)

    # A conversation of her own: started, asked in, and read back from the service.
    tab_to("#question")
    page.keyboard.type("Say hello.")
    tab_to("#new-conversation")
    page.keyboard.press("Enter")
    expect(page.locator("#conversation option")).to_have_count(2)
    conversation = page.locator("#conversation").input_value()
    assert conversation
    tab_to("#question")
    page.keyboard.press("Control+Enter")
    expect(page.locator("#messages .assistant").first).to_have_attribute("data-done", "true", timeout=300_000)
    page.select_option("#conversation", "")
    expect(page.locator("#messages .message")).to_have_count(0)
    page.select_option("#conversation", conversation)
    expect(page.locator("#messages .message.user")).to_have_text(["YouSay hello."])
    expect(page.locator("#messages .message.assistant")).to_have_count(1)
    assert all(alice not in request.url for request in console.requests)


def test_the_timeline_stays_readable_with_ten_thousand_grants(console: Console, launched: LaunchedStack) -> None:
    """The history is the console's to window: 10,000 grants (made up here, served in
    place of the coordinator's) become at most a few hundred elements at any zoom."""
    now = time.time()
    holders = ("transcription", "llm")
    history = [
        {
            "fence": 10_001 - i,
            "holder": holders[i % 2],
            "priority": "interactive" if i % 2 else "batch",
            "requested_at": now - 3.0 * i - 2.9,
            "granted_at": now - 3.0 * i - 2.8,
            "ended_at": now - 3.0 * i - 0.2,
            "end": "released",
            "handover": "pause" if i % 2 == 0 else "offload",
            "handover_ms": 12.5,
        }
        for i in range(1, 10_001)
    ]
    console.page.route("**/v1/history?limit=10000", lambda route: route.fulfill(json=history))
    page = console.open()
    page.click("#dev-token")
    label = page.locator("#window-label")
    expect(label).to_contain_text(re.compile(r" of 1\d{4} grants"), timeout=60_000)  # these and the stack's

    page.click("[data-span='60']")
    expect(page.locator("#timeline")).to_have_attribute("data-mode", "bars")
    made_up = page.eval_on_selector_all("#timeline .bar", "bars => bars.filter(b => +b.dataset.fence <= 10000).length")
    assert 15 <= made_up <= 25, made_up  # a minute of 3-second grants

    page.click("[data-span='all']")
    expect(page.locator("#timeline")).to_have_attribute("data-mode", "slices")
    assert page.locator("#timeline .bar").count() == 0
    assert 0 < page.locator("#timeline .slice").count() <= 2 * 200 + 10

    # Back to a minute, then to the oldest grant with the keyboard: the window follows.
    page.click("[data-span='60']")
    page.locator("#timeline .bar").last.focus()
    page.keyboard.press("Home")
    expect(page.locator('#timeline .bar[data-fence="1"]')).to_be_focused()
    expect(page.locator("#gpu-detail")).to_contain_text("fence 1 ")
    expect(page.locator("#gpu-detail")).to_contain_text("hand-over: pause")
    expect(page.locator("#live")).to_have_attribute("aria-pressed", "false")


def test_a_recording_dropped_on_the_page_becomes_a_job_that_can_be_cancelled(
    console: Console, long_meeting: Path
) -> None:
    page = console.open()
    page.click("#dev-token")
    expect(page.locator("#who-name")).to_have_text("dev")
    # A drop, as a file manager makes one: a DataTransfer holding the file.
    data = base64.b64encode(long_meeting.read_bytes()).decode()
    dropped = page.evaluate_handle(
        """(data) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "long-meeting.ogg", { type: "audio/ogg" }));
            return transfer;
        }""",
        data,
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    expect(page.locator("#job-name")).to_have_text("long-meeting.ogg")
    job = page.get_attribute("#current-job", "data-job")
    row = page.locator(f'#jobs tr[data-job="{job}"]')
    row.get_by_role("button", name="Cancel long-meeting.ogg").click()
    expect(page.locator("#job-state")).to_have_attribute("data-state", "cancelled", timeout=120_000)
    expect(row).to_have_attribute("data-state", "cancelled")
    expect(row.get_by_role("button")).to_have_count(0)
