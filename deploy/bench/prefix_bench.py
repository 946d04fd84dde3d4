"""`moe-serve bench prefix`: time to first token of requests sharing a long prompt prefix, with
the prefix cached (one request computed it first) against cold (prefix caching off), in-process.
"""

from __future__ import annotations

import random
import statistics
import time

from moe_serve.cluster.engine_core import EngineConfig, EngineCore
from moe_serve.cluster.params import SamplingParams
from moe_serve.models.registry import load_model, resolve_dtype
from moe_serve.models.tokenizer import TextTokenizer

PARAMS = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def first_outputs(engine: EngineCore, prompts: list[list[int]]) -> tuple[list[float], list[int]]:
    """All prompts added at once: seconds to each one's first output, and its cached tokens."""
    start = time.perf_counter()
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, PARAMS)
    first: dict[str, float] = {}
    cached: dict[str, int] = {}
    while engine.has_unfinished:
        for out in engine.step():
            first.setdefault(out.request_id, time.perf_counter() - start)
            cached[out.request_id] = out.num_cached_tokens
    keys = [str(i) for i in range(len(prompts))]
    return [first[k] for k in keys], [cached[k] for k in keys]


def bench_prefix(
    checkpoint: str,
    prefix_len: int = 440,
    suffix_len: int = 16,
    num_requests: int = 8,
    repeats: int = 3,
    dtype: str | None = None,
    seed: int = 0,
) -> dict:
    """Median over `repeats` (each with a fresh prefix) of the mean TTFT, cached vs cold."""
    model = load_model(checkpoint, dtype=dtype)
    tokenizer = TextTokenizer.from_dir(checkpoint)
    rng = random.Random(seed)
    vocab = min(model.config.vocab_size, 512)
    tokens = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    config = dict(max_model_len=prefix_len + suffix_len + 8, max_num_seqs=num_requests)
    warm = EngineCore(model, tokenizer, EngineConfig(**config))
    cold = EngineCore(model, tokenizer, EngineConfig(enable_prefix_caching=False, **config))
    cached_ms, cold_ms, cached_tokens = [], [], set()
    for repeat in range(repeats + 1):  # NOTE: the first round warms allocator and kernels up
        prefix = tokens(prefix_len)
        first_outputs(warm, [prefix + tokens(suffix_len)])
        seconds, cached = first_outputs(
            warm, [prefix + tokens(suffix_len) for _ in range(num_requests)]
        )
        cold_seconds, _ = first_outputs(
            cold, [prefix + tokens(suffix_len) for _ in range(num_requests)]
        )
        if repeat:
            cached_ms.append(1e3 * statistics.mean(seconds))
            cold_ms.append(1e3 * statistics.mean(cold_seconds))
            cached_tokens.update(cached)
    return {
        "checkpoint": checkpoint,
        "dtype": str(resolve_dtype(dtype, model.config)).removeprefix("torch."),
        "prefix_tokens": prefix_len,
        "suffix_tokens": suffix_len,
        "num_requests": num_requests,
        "repeats": repeats,
        "ttft_cached_ms": statistics.median(cached_ms),
        "ttft_cold_ms": statistics.median(cold_ms),
        "ratio": statistics.median(cached_ms) / statistics.median(cold_ms),
        "cached_tokens": sorted(cached_tokens),
    }
