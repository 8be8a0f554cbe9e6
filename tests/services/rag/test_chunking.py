from __future__ import annotations

import itertools

import pytest

from services.rag.chunking import chunk, sentences


def test_short_text_is_one_chunk() -> None:
    assert chunk("One sentence. Two sentences.", 100, 20) == ["One sentence. Two sentences."]


def test_chunks_respect_the_size_and_end_on_sentences() -> None:
    text = " ".join(f"Sentence {i} says something short." for i in range(40))
    pieces = chunk(text, 200, 50)
    assert len(pieces) > 5
    assert all(len(piece) <= 200 for piece in pieces)
    assert all(piece.endswith(".") for piece in pieces)
    rejoined = " ".join(pieces)
    assert all(f"Sentence {i} " in rejoined for i in range(40))  # nothing lost


def test_overlap_carries_whole_trailing_sentences() -> None:
    text = " ".join(f"Sentence {i} is here." for i in range(30))
    pieces = chunk(text, 120, 40)
    for before, after in itertools.pairwise(pieces):
        first = after.split(". ")[0] + "."
        assert before.endswith(first) or first in before


def test_a_sentence_longer_than_a_chunk_is_split_between_words() -> None:
    long_sentence = "word " * 100
    pieces = chunk(long_sentence + "End.", 60, 10)
    assert all(len(piece) <= 60 for piece in pieces)
    assert "".join(pieces).replace(" ", "") == (long_sentence + "End.").replace(" ", "")


def test_a_word_longer_than_a_chunk_is_cut() -> None:
    pieces = chunk("x" * 250, 100, 10)
    assert [len(piece) for piece in pieces] == [100, 100, 50]


def test_paragraph_breaks_end_sentences() -> None:
    assert sentences("Heading\n\nBody text without a period") == ["Heading", "Body text without a period"]


@pytest.mark.parametrize(("size", "overlap"), [(0, 0), (100, 100), (100, -1)])
def test_bad_sizes(size: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        chunk("text", size, overlap)
