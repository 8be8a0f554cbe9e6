"""How a retrieved memory is named in the prompt, whatever its stored metadata says."""

from __future__ import annotations

import pytest

from services.llm.memories import Passage


def segment(**metadata: object) -> Passage:
    return Passage("m1", "the budget is due on Friday", 0.9, {"kind": "segment", "source": "meeting", **metadata})


def test_a_segment_is_named_by_its_recording_its_place_and_its_date() -> None:
    label = segment(start=65, end=71.5, created_at=1_795_380_606, speaker="Ada").label()
    assert label == "Ada, meeting at 1:05-1:11, 2026-11-22 20:50 UTC"
    assert segment(start=65, end=71.5, created_at=1_795_380_606).label().startswith("meeting at 1:05-1:11, 2026")


@pytest.mark.parametrize(
    ("start", "created_at"),
    [
        (1.6e16, 1.6e16),  # stored before segments were bounded; broke every chat retrieving it (fuzzed)
        (0, 2.6e11),  # past the year 9999
        ("soon", "later"),
    ],
)
def test_a_time_no_calendar_has_leaves_the_date_out_instead_of_failing(start: object, created_at: object) -> None:
    label = segment(start=start, created_at=created_at).label()
    assert label.startswith("meeting at ") and "UTC" not in label
