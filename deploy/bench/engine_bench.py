"""`moe-serve bench engine`: the engine in-process against transformers `generate`."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from moe_serve.cluster.engine_core import EngineConfig, EngineCore
from moe_serve.cluster.params import SamplingParams
from moe_serve.deploy.bench.baseline import run_transformers
from moe_serve.deploy.bench.workload import WorkItem, Workload
from moe_serve.models.attention import AttentionBackend
from moe_serve.models.registry import load_model, resolve_dtype
from moe_serve.models.tokenizer import TextTokenizer


def run_engine(
    engine: EngineCore, items: list[WorkItem], concurrency: int
) -> tuple[float, list[list[int]], int]:
    """Closed loop: at most `concurrency` requests in flight. Wall seconds, outputs, steps."""
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(items))}
    pending = list(enumerate(items))
    in_flight, steps = 0, 0
    start = time.perf_counter()
    while pending or engine.has_unfinished:
        while pending and in_flight < concurrency:
            index, item = pending.pop(0)
            engine.add_request(
                str(index),
                item.prompt_ids,
                SamplingParams(max_tokens=item.max_tokens, temperature=0.0, ignore_eos=True),
            )
            in_flight += 1
        for out in engine.step():
            outputs[out.request_id].extend(out.deltas[0].token_ids)
            in_flight -= out.finished
        steps += 1
    return time.perf_counter() - start, [outputs[str(i)] for i in range(len(items))], steps


@contextmanager
def _num_threads(num: int | None):
    before = torch.get_num_threads()
    torch.set_num_threads(num or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bench_engine(
    checkpoint: str,
    workload: Workload,
    dtype: str | None,
    baseline: bool,
    out: Path | None,
    engine_threads: int | None = None,
    attention_backend: AttentionBackend = EngineConfig.attention_backend,
) -> dict:
    """`engine_threads` limits the engine side only (the baseline keeps torch's default)."""
    model = load_model(checkpoint, dtype=dtype)
    config = EngineConfig(
        max_model_len=workload.prompt_len[1] + workload.output_len[1],
        max_num_seqs=workload.concurrency,
        attention_backend=attention_backend,
    )
    engine = EngineCore(model, TextTokenizer.from_dir(checkpoint), config)
    items = workload.items(min(model.config.vocab_size, 512))
    num_tokens = sum(item.max_tokens for item in items)
    torch_dtype = resolve_dtype(dtype, model.config)
    with _num_threads(engine_threads):
        threads = torch.get_num_threads()
        seconds, ours, steps = run_engine(engine, items, workload.concurrency)
    report = {
        "workload": asdict(workload),
        "checkpoint": checkpoint,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "attention_backend": attention_backend,
        "output_tokens": num_tokens,
        "engine": {
            "seconds": seconds,
            "tokens_per_s": num_tokens / seconds,
            "steps": steps,
            "ms_per_step": 1000 * seconds / steps,
            "threads": threads,
        },
    }
    if baseline:
        del engine, model
        base_seconds, theirs = run_transformers(
            checkpoint, items, workload.concurrency, torch_dtype
        )
        same = sum(a == b for a, b in zip(ours, theirs, strict=True))
        report["transformers"] = {
            "seconds": base_seconds,
            "tokens_per_s": num_tokens / base_seconds,
        }
        report["speedup"] = base_seconds / seconds
        report["identical_outputs"] = f"{same}/{len(items)}"
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report
