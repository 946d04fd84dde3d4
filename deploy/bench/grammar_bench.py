"""`moe-serve bench grammar`: what a JSON-schema constraint costs per decode step.

The same batch decodes greedily in-process, unconstrained and with every row constrained by
SCHEMA (records that never finish within the tokens asked, so both take the same steps), in
alternating rounds (medians: this machine's speed drifts); then the llguidance work is timed
alone on the constrained outputs: filling the batch's masks (overlapped with the forward pass in
the engine), applying them to the logits and advancing the matchers.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from moe_serve.cluster.engine_core import EngineConfig, EngineCore
from moe_serve.cluster.grammar import advance
from moe_serve.cluster.params import SamplingParams, StructuredOutput
from moe_serve.cluster.sampler import apply_token_mask
from moe_serve.models.registry import load_model
from moe_serve.models.tokenizer import TextTokenizer

RECORD = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "name": {"type": "string", "maxLength": 12},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "name", "score", "ok"],
    "additionalProperties": False,
}
SCHEMA = {"type": "array", "items": RECORD, "minItems": 1000}


def _decode_ms_per_step(engine: EngineCore, batch: int, tokens: int, structured) -> tuple:
    """ms per step once every sequence has its first token; and the outputs."""
    for i in range(batch):
        params = SamplingParams(
            max_tokens=tokens, temperature=0.0, ignore_eos=True, structured=structured
        )
        engine.add_request(str(i), [1 + i % 50] * 8, params)
    outputs: dict[str, list[int]] = {str(i): [] for i in range(batch)}
    start, steps = None, 0
    while engine.has_unfinished:
        for out in engine.step():
            outputs[out.request_id].extend(out.deltas[0].token_ids)
        steps += start is not None
        if start is None and all(outputs.values()):
            start = time.perf_counter()
    return 1000 * (time.perf_counter() - start) / max(steps, 1), list(outputs.values())


def _mask_ms(engine: EngineCore, spec: StructuredOutput, outputs: list[list[int]]) -> list[float]:
    """ms per step to fill the batch's masks, to apply them to [batch, V] logits and to advance
    the matchers by the sampled tokens."""
    matchers = [engine.grammars.create(spec) for _ in outputs]
    logits = torch.zeros(len(outputs), engine.model.config.vocab_size)
    totals = [0.0, 0.0, 0.0]
    num_steps = min(map(len, outputs))
    for step in range(num_steps):
        marks = [time.perf_counter()]
        mask = engine.masks.submit(matchers).result()
        marks.append(time.perf_counter())
        apply_token_mask(logits.clone(), mask)
        marks.append(time.perf_counter())
        for matcher, output in zip(matchers, outputs, strict=True):
            advance(matcher, output[step])
        marks.append(time.perf_counter())
        totals = [t + b - a for t, a, b in zip(totals, marks[:-1], marks[1:], strict=True)]
    return [1000 * t / num_steps for t in totals]


def bench_grammar(
    checkpoint: str,
    tokenizer_dir: str | None,
    batch: int,
    tokens: int,
    dtype: str | None,
    out: Path | None,
    rounds: int = 5,
) -> dict:
    """`tokenizer_dir`: another tokenizer.json for the checkpoint (one with a realistic
    vocabulary: llguidance's cost grows with it)."""
    model = load_model(checkpoint, dtype=dtype)
    tokenizer = TextTokenizer.from_dir(tokenizer_dir or checkpoint)
    config = EngineConfig(max_model_len=8 + tokens, max_num_seqs=batch)
    engine = EngineCore(model, tokenizer, config)
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    engine.grammars.check(spec)  # NOTE: compiled before timing (a server caches it too)
    free, constrained = [], []
    for _ in range(rounds):
        free.append(_decode_ms_per_step(engine, batch, tokens, None)[0])
        ms, outputs = _decode_ms_per_step(engine, batch, tokens, spec)
        constrained.append(ms)
    fill_ms, apply_ms, advance_ms = _mask_ms(engine, spec, outputs)
    free_ms, constrained_ms = statistics.median(free), statistics.median(constrained)
    extra = statistics.median(c - f for c, f in zip(constrained, free, strict=True))
    report = {
        "checkpoint": checkpoint,
        "tokenizer_vocab": tokenizer.vocab_size,
        "batch": batch,
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "unconstrained_ms_per_step": free_ms,
        "constrained_ms_per_step": constrained_ms,
        "rounds": {"unconstrained": free, "constrained": constrained},
        "extra_ms_per_constrained_token": extra / batch,  # NOTE: median of paired rounds
        "mask_fill_ms_per_step": fill_ms,
        "mask_apply_ms_per_step": apply_ms,
        "advance_ms_per_step": advance_ms,
        "sample_output": tokenizer.decode(outputs[0]),
    }
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report
