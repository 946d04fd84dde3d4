"""Grammar-constrained decoding with llguidance (see the README for why not xgrammar).

`GrammarCompiler` compiles a `StructuredOutput` for one tokenizer, each distinct grammar once
(an LRU cache of pristine matchers, copied for every sequence); `MaskWorker` computes a step's
next-token masks (llguidance's bitmasks, unpacked to a logits bias) on a worker thread while the
model's forward pass runs (llguidance releases the GIL). Shapes: R constrained rows,
W = ceil(V / 32) bitmask words.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import llguidance.numpy
import numpy as np
import torch
from tokenizers import Tokenizer

from moe_serve.cluster.params import RequestError, StructuredOutput
from moe_serve.cluster.sampler import TokenMask

log = logging.getLogger(__name__)

# NOTE: JSON as json.dumps writes it: no free whitespace, so a model cannot pad forever
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
LIMITS = llguidance.LLParserLimits(verbose_errors=False)  # NOTE: errors name no parser state
BIAS = np.array([-np.inf, 0.0], dtype=np.float32)  # forbidden, allowed


def grammar_text(spec: StructuredOutput) -> str:
    """The llguidance grammar of `spec` (not yet checked: compiling it does that)."""
    if spec.kind == "json_schema":
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(spec.text, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise RequestError(f"invalid JSON schema: {exc}") from None
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.text)
    return llguidance.LLMatcher.grammar_from_lark(spec.text)


class GrammarCompiler:
    """Grammars for one tokenizer and vocabulary (V: the model's logits width)."""

    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int, eos_ids: Sequence[int], cache_size: int = 256
    ) -> None:
        self.tokenizer, self.eos_ids, self.cache_size = tokenizer, list(eos_ids), cache_size
        self.vocab_size = max(vocab_size, tokenizer.get_vocab_size(with_added_tokens=True))
        self._cache: OrderedDict[StructuredOutput, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    @functools.cached_property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        # NOTE: built on first use (~0.2 s for a 50k vocabulary); EOS is allowed once complete
        return llguidance.LLTokenizer(
            self.tokenizer.to_str(), n_vocab=self.vocab_size, eos_token=self.eos_ids or None
        )

    def check(self, spec: StructuredOutput) -> None:
        """Raise RequestError naming the problem if `spec` does not compile."""
        self._compiled(spec)

    def create(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        """A fresh matcher for one sequence (raises RequestError like `check`)."""
        return self._compiled(spec).deep_copy()

    def _compiled(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        with self._lock:
            matcher = self._cache.get(spec)
            if matcher is not None:
                self._cache.move_to_end(spec)
                return matcher
        matcher = llguidance.LLMatcher(
            self.lltokenizer, grammar_text(spec), log_level=0, limits=LIMITS
        )
        if matcher.is_error():
            raise RequestError(f"the {spec.kind} grammar does not compile: {matcher.get_error()}")
        with self._lock:
            self._cache[spec] = matcher
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return matcher


def advance(matcher: llguidance.LLMatcher, token_id: int) -> bool:
    """Feed a sampled token; True once the grammar is complete (nothing but EOS may follow)."""
    if not matcher.consume_token(token_id):
        log.error("a sampled token broke its grammar: %s", matcher.get_error())
    return matcher.is_stopped()  # NOTE: also true in the error state: the sequence ends


class MaskWorker:
    """Computes next-token bitmasks on one worker thread (started on first use)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._thread: ThreadPoolExecutor | None = None
        self._executor: llguidance.LLExecutor | None = None

    def submit(self, matchers: Sequence[llguidance.LLMatcher | None]) -> Future[TokenMask] | None:
        """Start the masks of the rows that have a matcher; None (no work) when none has."""
        indices = [i for i, m in enumerate(matchers) if m is not None]
        if not indices:
            return None
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
            self._executor = llguidance.LLExecutor()
        return self._thread.submit(self._fill, [matchers[i] for i in indices], indices)

    def _fill(self, matchers: list[llguidance.LLMatcher], indices: list[int]) -> TokenMask:
        bits = llguidance.numpy.allocate_token_bitmask(len(matchers), self.vocab_size)  # [R, W]
        llguidance.numpy.fill_next_token_bitmask_par(
            self._executor, [(m, i) for i, m in enumerate(matchers)], bits
        )
        # NOTE: bit j of word w allows token 32 w + j; words are little-endian, so the bytes'
        # bits in little order are the tokens in order
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")  # [R, 32 W]
        return TokenMask(indices, torch.from_numpy(np.take(BIAS, allowed)))
