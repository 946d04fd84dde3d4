"""Incremental detokenization of one sequence, with stop strings held back until decided.

Linear in the output: only text not yet returned is kept (what `delta` holds back is shorter
than the longest stop string), and each new piece is searched together with at most the
longest stop string's length of text before it, never the whole output again.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

PROMPT_CONTEXT = 8  # prompt tokens fed first so the first piece gets its leading space right


class TextStream:
    """Turns tokens into text pieces: multi-byte characters are never split, and text that
    might be the start of a stop string is withheld until it is known not to be one."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        stop: Sequence[str],
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stream = DecodeStream(list(prompt_ids[-PROMPT_CONTEXT:]), skip_special_tokens)
        self.stop = tuple(stop)
        self.longest_stop = max(map(len, self.stop), default=0)
        self.first_chars = frozenset(s[0] for s in self.stop)
        # NOTE: decoded text not yet returned by `delta`. A stop string can only begin in it:
        # text returned never ends with the beginning of one (that is what is held back).
        self.pending = ""

    def add(self, token_id: int) -> bool:
        """Decode one more token; True if the text now contains a stop string (the text is cut
        before it)."""
        piece = self.stream.step(self.tokenizer, token_id)
        if not piece:
            return False
        self.pending += piece
        if not self.stop:
            return False
        start = max(0, len(self.pending) - len(piece) - self.longest_stop + 1)
        cut = self.find_stop(self.pending, start)
        if cut is None:
            return False
        self.pending = self.pending[:cut]
        return True

    def find_stop(self, text: str, start: int) -> int | None:
        """Where the first stop string in text[start:] begins (a match ending in the new piece
        begins at most longest_stop - 1 characters before it)."""
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        text = self.pending
        for size in range(min(len(text), self.longest_stop - 1), 0, -1):
            if text[-size] in self.first_chars:
                tail = text[-size:]
                if any(s.startswith(tail) for s in self.stop):
                    return size
        return 0

    def delta(self, is_final: bool) -> str:
        """Text not yet returned; withholds a possible stop-string prefix unless final."""
        end = len(self.pending) if is_final else len(self.pending) - self._held_back()
        piece, self.pending = self.pending[:end], self.pending[end:]
        return piece
