"""Incremental text: UTF-8 never split, spaces kept, stop strings across token boundaries."""

from __future__ import annotations

import pytest

from moe_serve.cluster.detokenizer import TextStream
from moe_serve.models.tokenizer import TextTokenizer

TEXT = "Hello there, café 東京 🙂 ok. Stop here please"


@pytest.fixture(scope="module")
def tokenizer(tiny_dirs):
    return TextTokenizer.from_dir(tiny_dirs["olmoe"])


def stream_all(tokenizer, ids, stop=()):
    stream = TextStream(tokenizer.tokenizer, [], stop)
    pieces = []
    for token in ids:
        stopped = stream.add(token)
        pieces.append(stream.delta(is_final=stopped))
        if stopped:
            break
    else:
        pieces.append(stream.delta(is_final=True))
    return pieces, stopped


def test_streaming_reassembles_exactly_without_broken_characters(tokenizer):
    ids = tokenizer.encode(TEXT)
    multibyte = [t for t in ids if "\ufffd" in tokenizer.decode([t])]
    assert multibyte, "the text should split some character across tokens"
    pieces, stopped = stream_all(tokenizer, ids)
    assert "".join(pieces) == TEXT and not stopped
    assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("stop", ["ok. Stop", "k. S", "🙂 o", "please"])
def test_stop_string_is_cut_and_never_streamed(tokenizer, stop):
    pieces, stopped = stream_all(tokenizer, tokenizer.encode(TEXT), stop=(stop, "zzz"))
    assert stopped
    assert "".join(pieces) == TEXT[: TEXT.index(stop)]
    streamed = ""
    for piece in pieces:
        streamed += piece
        assert stop not in streamed


def test_text_that_only_looked_like_a_stop_string_is_released(tokenizer):
    pieces, stopped = stream_all(tokenizer, tokenizer.encode(TEXT), stop=("ok!",))
    assert not stopped and "".join(pieces) == TEXT


class CountingStream(TextStream):
    """Records how much text each stop-string search looks at."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.searched: list[int] = []

    def find_stop(self, text: str, start: int) -> int | None:
        self.searched.append(len(text) - start)
        return super().find_stop(text, start)


def test_a_long_output_is_searched_piece_by_piece_not_again_and_again(tokenizer):
    # NOTE: the beginnings of these occur all along the text, the whole strings never
    stop = ("ok. Stop here please!", "café 東京 🙂 ok!", "Hello there, cafe")
    text = TEXT * 400  # NOTE: ~18k characters
    stream = CountingStream(tokenizer.tokenizer, [], stop)
    pieces, longest_piece = [], 0
    for token in tokenizer.encode(text):
        pending_before = len(stream.pending)
        assert not stream.add(token)
        longest_piece = max(longest_piece, len(stream.pending) - pending_before)
        pieces.append(stream.delta(is_final=False))
        assert len(stream.pending) < stream.longest_stop  # NOTE: only a held-back prefix
    pieces.append(stream.delta(is_final=True))
    assert "".join(pieces) == text
    # NOTE: every search covers the new piece and the longest stop string's length before it
    assert max(stream.searched) <= longest_piece + stream.longest_stop - 1
    assert sum(stream.searched) < len(pieces) * (longest_piece + stream.longest_stop)
