"""The transformers baseline: the same workload through `generate` in static batches.

Batches of `concurrency` requests, left-padded, greedy, each batch decoding until its longest
request is done (that is what static batching costs); only each request's own tokens count.
"""

from __future__ import annotations

import time

import torch

from moe_serve.deploy.bench.workload import WorkItem


def run_transformers(
    path: str, items: list[WorkItem], batch_size: int, dtype: torch.dtype
) -> tuple[float, list[list[int]]]:
    """Wall seconds and each request's greedy output ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    outputs: list[list[int]] = []
    start = time.perf_counter()
    for first in range(0, len(items), batch_size):
        batch = items[first : first + batch_size]
        width = max(len(item.prompt_ids) for item in batch)
        ids = torch.tensor([[0] * (width - len(i.prompt_ids)) + i.prompt_ids for i in batch])
        mask = torch.tensor(
            [[0] * (width - len(i.prompt_ids)) + [1] * len(i.prompt_ids) for i in batch]
        )
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=mask,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
                max_new_tokens=max(i.max_tokens for i in batch),
            )
        outputs.extend(
            row[width : width + item.max_tokens].tolist()
            for row, item in zip(out, batch, strict=True)
        )
    return time.perf_counter() - start, outputs
