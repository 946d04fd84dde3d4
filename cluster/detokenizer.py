"""Incremental detokenization of one sequence, with stop strings held back until decided."""

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
        self.text = ""
        self.num_emitted = 0

    def add(self, token_id: int) -> bool:
        """Decode one more token; True if the text now contains a stop string (the text is cut
        before it)."""
        piece = self.stream.step(self.tokenizer, token_id)
        if not piece:
            return False
        searched_from = max(0, len(self.text) - self.longest_stop + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, searched_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        for size in range(min(len(self.text), self.longest_stop - 1), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self.stop):
                return size
        return 0

    def delta(self, is_final: bool) -> str:
        """Text not yet returned; withholds a possible stop-string prefix unless final."""
        end = len(self.text) if is_final else len(self.text) - self._held_back()
        piece = self.text[self.num_emitted : max(end, self.num_emitted)]
        self.num_emitted += len(piece)
        return piece
