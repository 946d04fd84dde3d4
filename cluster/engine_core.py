"""The engine core: scheduler, model runner, KV cache and sampling; add requests, step
(schedule -> execute -> update), abort.

Synchronous and single-threaded; a `ReplicaEngine` drives it one step at a time.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import get_args

import torch

from moe_serve.cluster.block_manager import BlockManager
from moe_serve.cluster.detokenizer import TextStream
from moe_serve.cluster.grammar import GrammarCompiler, MaskWorker, advance
from moe_serve.cluster.outputs import RequestOutput, RequestState
from moe_serve.cluster.params import RequestError, RequestLimits, SamplingParams
from moe_serve.cluster.runner import ModelRunner, StepLogits, kv_cache_bytes_per_block
from moe_serve.cluster.sampler import SamplingRow, TokenLogprobs, sample, token_logprobs
from moe_serve.cluster.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from moe_serve.cluster.sequence import Sequence
from moe_serve.cluster.stats import EngineStats
from moe_serve.models.attention import AttentionBackend
from moe_serve.models.base import MoeForCausalLM
from moe_serve.models.tokenizer import TextTokenizer

DEFAULT_KV_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class EngineConfig:
    """Capacity and batching limits of one replica."""

    # NOTE: the batching defaults are the scheduler's, which applies them (one place each)
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = SchedulerConfig.max_num_seqs
    max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens
    block_size: int = 16
    num_kv_blocks: int | None = None  # wins over kv_cache_bytes
    kv_cache_bytes: int | None = None  # default: DEFAULT_KV_CACHE_BYTES, capped at what
    # max_num_seqs sequences of max_model_len tokens can use
    enable_chunked_prefill: bool = SchedulerConfig.enable_chunked_prefill
    enable_prefix_caching: bool = True  # reuse computed KV blocks of a prompt's cached prefix
    # "flex": attention reads the paged cache in place (compiled flex_attention); "sdpa":
    # each step gathers the context it reads into contiguous copies (the baseline)
    attention_backend: AttentionBackend = "flex"

    def __post_init__(self) -> None:
        if self.block_size < 1 or (self.num_kv_blocks is not None and self.num_kv_blocks < 1):
            raise ValueError("block_size and num_kv_blocks must be positive")
        if self.attention_backend not in get_args(AttentionBackend):
            raise ValueError(
                f"attention_backend must be one of {get_args(AttentionBackend)}, "
                f"not {self.attention_backend!r}"
            )


def _num_blocks(config: EngineConfig, model: MoeForCausalLM, max_model_len: int) -> int:
    if config.num_kv_blocks is not None:
        blocks = config.num_kv_blocks
    else:
        per_block = kv_cache_bytes_per_block(model, config.block_size)
        budget = config.kv_cache_bytes or DEFAULT_KV_CACHE_BYTES
        most = config.max_num_seqs * -(-max_model_len // config.block_size)
        blocks = min(budget // per_block, most)
    if blocks * config.block_size < max_model_len:
        raise ValueError(
            f"KV cache of {blocks} blocks x {config.block_size} cannot hold one "
            f"sequence of max_model_len={max_model_len} tokens"
        )
    return blocks


def _max_cacheable_len(model: MoeForCausalLM) -> int | None:
    rope = model.config.rope
    return rope.original_max_position if rope.scaling_type == "dynamic" else None


def _random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1


class EngineCore:
    """One model's requests, advanced one step at a time (what vLLM calls the engine core)."""

    def __init__(
        self, model: MoeForCausalLM, tokenizer: TextTokenizer, config: EngineConfig | None = None
    ) -> None:
        config = config or EngineConfig()
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill, max_num_batched_tokens "
                f"({config.max_num_batched_tokens}) must be at least max_model_len "
                f"({self.max_model_len}): a longer prompt could never be scheduled"
            )
        num_blocks = _num_blocks(config, model, self.max_model_len)
        self.blocks = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching, _max_cacheable_len(model)
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_seqs,
                max(config.max_num_batched_tokens, config.max_num_seqs),
                config.enable_chunked_prefill,
            ),
            self.blocks,
        )
        self.runner = ModelRunner(model, num_blocks, config.block_size, config.attention_backend)
        self.requests: dict[str, RequestState] = {}
        self.owner: dict[int, tuple[RequestState, int]] = {}  # seq_id -> (request, index)
        # seq_id of a request's first sample -> its other samples, queued once the first has
        # computed the prompt, so that they take its blocks from the prefix cache
        self.held: dict[int, list[Sequence]] = {}
        self.seq_ids = itertools.count()
        self.eos_ids = frozenset(model.config.eos_token_ids)
        self.limits = RequestLimits(model.config.vocab_size, self.max_model_len)
        self.grammars = GrammarCompiler(tokenizer.tokenizer, model.config.vocab_size, self.eos_ids)
        self.masks = MaskWorker(self.grammars.vocab_size)
        self.num_steps = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Check a request before any work; returns its resolved max_tokens."""
        return self.limits.check(prompt_ids, params)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request (validated first; raises RequestError)."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        max_tokens = self.validate(prompt_ids, params)
        # NOTE: compiled once per distinct grammar (cached), then copied per sample
        matchers = [
            self.grammars.create(params.structured) if params.structured else None
            for _ in range(params.n)
        ]
        seqs = [
            Sequence(next(self.seq_ids), list(prompt_ids), len(prompt_ids), max_tokens)
            for _ in range(params.n)
        ]
        device = self.runner.device
        rows = [
            SamplingRow(
                params,
                seq.token_ids,
                len(prompt_ids),
                torch.Generator(device).manual_seed(
                    _random_seed() if params.seed is None else params.seed + i
                ),
            )
            for i, seq in enumerate(seqs)
        ]
        streams = [
            TextStream(
                self.tokenizer.tokenizer, prompt_ids, params.stop, params.skip_special_tokens
            )
            for _ in seqs
        ]
        # NOTE: the first sample computes the prompt logprobs: it must compute its whole prompt
        seqs[0].can_hit_cache = params.prompt_logprobs is None
        state = RequestState(request_id, list(prompt_ids), params, seqs, rows, streams, matchers)
        self.requests[request_id] = state
        for index, seq in enumerate(seqs):
            self.owner[seq.seq_id] = (state, index)
        self.scheduler.add(seqs[0])
        if self._is_prompt_shareable(len(prompt_ids)):
            self.held[seqs[0].seq_id] = seqs[1:]
        else:
            for seq in seqs[1:]:
                self.scheduler.add(seq)

    def _is_prompt_shareable(self, num_prompt_tokens: int) -> bool:
        """Whether a later sample would find a full block of the prompt cached."""
        return num_prompt_tokens > self.config.block_size and self.blocks.is_cacheable(
            num_prompt_tokens
        )

    def _release_held(self, seq: Sequence) -> None:
        for held in reversed(self.held.pop(seq.seq_id, [])):
            self.scheduler.add(held, is_first_in_line=True)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its cache blocks; its last output (or None if unknown)."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        self._release_held(state.seqs[0])
        unfinished = {i for i, seq in enumerate(state.seqs) if not seq.is_finished}
        for i in unfinished:
            self.scheduler.finish(state.seqs[i], "abort")
        return self._retire(state, unfinished)

    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, run the model, sample, stream out what changed."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        self.num_steps += 1
        sampling = [item.seq for item in out.scheduled if item.is_sampling]
        owners = [self.owner[seq.seq_id] for seq in sampling]
        # NOTE: the grammar masks are computed on a worker thread during the forward pass
        masks = self.masks.submit([state.matchers[index] for state, index in owners])
        logits = self.runner.execute(out.scheduled, self._prompt_logprob_ids(out))
        rows = [state.rows[index] for state, index in owners]
        tokens, logprobs = sample(logits.sampling, rows, masks.result() if masks else None)
        self._record_prompt_logprobs(out, logits)
        self.scheduler.update(out, {s.seq_id: t for s, t in zip(sampling, tokens, strict=True)})
        changed: dict[str, set[int]] = {}
        for seq, lp in zip(sampling, logprobs, strict=True):
            self._release_held(seq)
            state, index = self.owner[seq.seq_id]
            self._on_token(state, index, seq, lp)
            changed.setdefault(state.request_id, set()).add(index)
        return [self._emit(self.requests[rid], indices) for rid, indices in changed.items()]

    def _on_token(
        self, state: RequestState, index: int, seq: Sequence, logprobs: TokenLogprobs | None
    ) -> None:
        token = seq.token_ids[-1]
        state.pending_tokens[index].append(token)
        if logprobs is not None:
            state.pending_logprobs[index].append(logprobs)
        is_stop_string = state.streams[index].add(token)
        matcher = state.matchers[index]
        is_grammar_complete = matcher is not None and advance(matcher, token)
        params = state.params
        if (
            (token in self.eos_ids and not params.ignore_eos)
            or token in params.stop_token_ids
            or is_stop_string
            or is_grammar_complete
        ):
            self.scheduler.finish(seq, "stop")
        elif seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            self.scheduler.finish(seq, "length")

    def _emit(self, state: RequestState, indices: set[int]) -> RequestOutput:
        return self._retire(state, indices) if state.is_finished else state.take_output(indices)

    def _retire(self, state: RequestState, indices: set[int]) -> RequestOutput:
        output = state.take_output(indices)
        if state.is_finished:
            del self.requests[state.request_id]
            for seq in state.seqs:
                self.owner.pop(seq.seq_id, None)
        return output

    def _prompt_logprob_ids(self, out: SchedulerOutput) -> set[int]:
        ids = set()
        for item in out.scheduled:
            state, index = self.owner[item.seq.seq_id]
            if (
                index == 0
                and state.params.prompt_logprobs is not None
                and not state.is_prompt_logprobs_sent
            ):
                ids.add(item.seq.seq_id)
        return ids

    def _record_prompt_logprobs(self, out: SchedulerOutput, logits: StepLogits) -> None:
        for item in out.scheduled:
            rows = logits.prompt.get(item.seq.seq_id)
            if rows is None:
                continue
            state = self.owner[item.seq.seq_id][0]
            logprobs = torch.log_softmax(rows, dim=-1)
            for j in range(item.num_tokens):
                position = item.start + j + 1  # NOTE: row j predicts the next position
                if position < len(state.prompt_ids):
                    token = torch.tensor(state.prompt_ids[position])
                    state.prompt_logprobs[position] = token_logprobs(
                        logprobs[j], token, state.params.prompt_logprobs
                    )

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_usage=self.blocks.usage,
            num_free_blocks=self.blocks.num_free_blocks,
            num_blocks=self.blocks.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps,
            prefix_cache_queries=self.scheduler.num_queried_tokens,
            prefix_cache_hits=self.scheduler.num_hit_tokens,
        )
