"""`moe-serve bench context`: decode step time at a short and a long context, for each attention
implementation (in-process engine). The implementations alternate, the order reversed in the
second round, so that drift in the machine's speed weighs on both alike."""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

from moe_serve.cluster.engine_core import EngineConfig, EngineCore
from moe_serve.cluster.params import SamplingParams
from moe_serve.deploy.bench.engine_bench import _num_threads
from moe_serve.models.registry import load_model
from moe_serve.models.tokenizer import TextTokenizer

BACKENDS = ("sdpa", "flex")


def _run(engine: EngineCore, context: int, batch: int, output_tokens: int):
    """Seconds until every sequence has its first token (the prompts' prefill), and seconds of
    each later step in which all `batch` sequences decode."""
    rng = random.Random(context)
    vocab = min(engine.model.config.vocab_size, 512)
    params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    for index in range(batch):
        engine.add_request(str(index), [rng.randrange(vocab) for _ in range(context)], params)
    started: set[str] = set()
    prefill, seconds = 0.0, []
    while engine.has_unfinished:
        was_decoding = len(started) == batch
        start = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - start
        started.update(out.request_id for out in outputs)
        if not was_decoding:
            prefill += elapsed
        elif len(outputs) == batch:
            seconds.append(elapsed)
    return prefill, seconds


def bench_context(
    checkpoint: str,
    contexts: list[int],
    batch: int,
    output_tokens: int,
    dtype: str | None,
    rounds: int,
    engine_threads: int | None,
    out: Path | None,
) -> dict:
    """Median decode step (ms) per backend and context, and each backend's ratio of the longest
    context's step to the shortest's."""
    model = load_model(checkpoint, dtype=dtype)
    tokenizer = TextTokenizer.from_dir(checkpoint)
    engines = {
        backend: EngineCore(
            model,
            tokenizer,
            EngineConfig(
                max_model_len=max(contexts) + output_tokens,
                max_num_seqs=batch,
                enable_prefix_caching=False,
                attention_backend=backend,
            ),
        )
        for backend in BACKENDS
    }
    keys = [(b, c) for b in BACKENDS for c in contexts]
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in keys}
    prefills: dict[tuple[str, int], list[float]] = {key: [] for key in keys}
    with _num_threads(engine_threads):
        for backend in BACKENDS:  # NOTE: untimed: compiles the flex kernels
            _run(engines[backend], min(contexts), batch, 4)
        for round_index in range(rounds):
            order = BACKENDS if round_index % 2 == 0 else BACKENDS[::-1]
            for backend in order:
                for context in contexts:
                    prefill, steps = _run(engines[backend], context, batch, output_tokens)
                    prefills[backend, context].append(prefill)
                    samples[backend, context].extend(steps)
    ms = {key: 1000 * statistics.median(samples[key]) for key in keys}
    short, long = min(contexts), max(contexts)
    report = {
        "checkpoint": checkpoint,
        "batch": batch,
        "rounds": rounds,
        "decode_ms": {b: {str(c): ms[b, c] for c in contexts} for b in BACKENDS},
        "long_over_short": {b: ms[b, long] / ms[b, short] for b in BACKENDS},
        "flex_over_sdpa": {str(c): ms["flex", c] / ms["sdpa", c] for c in contexts},
        "prefill_s": {
            b: {str(c): statistics.mean(prefills[b, c]) for c in contexts} for b in BACKENDS
        },
        "steps_measured": {f"{b}@{c}": len(samples[b, c]) for b, c in keys},
    }
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report
