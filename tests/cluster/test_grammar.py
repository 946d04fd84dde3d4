"""Constrained decoding in the engine: a random model's outputs match their grammar only because
the grammar is enforced; unconstrained rows, n > 1, seeds, logprobs and preemption."""

from __future__ import annotations

import json

import jsonschema
import pytest

from moe_serve.cluster.grammar import GrammarCompiler
from moe_serve.cluster.params import RequestError, SamplingParams, StructuredOutput
from tests.cluster.test_engine_core import greedy, make_engine, run

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
JSON = StructuredOutput("json_schema", json.dumps(SCHEMA))
SEEDS = range(8)
PROMPT = [40, 41, 42, 43]


def is_valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


@pytest.fixture(scope="module")
def olmoe(tiny_dirs):
    return make_engine(tiny_dirs["olmoe"], max_model_len=512)


def sampled(seed: int, structured=JSON, **kw) -> SamplingParams:
    return SamplingParams(
        **dict(max_tokens=64, temperature=1.0, seed=seed) | kw, structured=structured
    )


def test_json_schema_outputs_validate_for_every_seed_and_only_with_the_grammar(olmoe):
    constrained = run(olmoe, {str(s): (PROMPT, sampled(s)) for s in SEEDS})
    for seed in SEEDS:
        result = constrained[str(seed)]
        assert result.finish[0] == "stop" and is_valid(result.text[0]), result.text[0]
    free = run(olmoe, {str(s): (PROMPT, sampled(s, structured=None)) for s in SEEDS})
    assert not all(is_valid(free[str(s)].text[0]) for s in SEEDS)
    assert olmoe.blocks.num_free_blocks == olmoe.blocks.num_blocks


def test_unconstrained_rows_of_a_mixed_batch_are_untouched(olmoe):
    alone = run(olmoe, {"g": (PROMPT, greedy(max_tokens=24))})["g"].token_ids[0]
    batch = {"g": (PROMPT, greedy(max_tokens=24))} | {
        str(s): (PROMPT, sampled(s)) for s in range(4)
    }
    mixed = run(olmoe, batch)
    assert mixed["g"].token_ids[0] == alone
    assert all(is_valid(mixed[str(s)].text[0]) for s in range(4))


def test_n_samples_each_follow_the_grammar_with_consecutive_seeds(olmoe):
    together = run(olmoe, {"n": (PROMPT, sampled(3, n=3))})["n"]
    singles = [run(olmoe, {"s": (PROMPT, sampled(3 + i))})["s"].text[0] for i in range(3)]
    assert [together.text[i] for i in range(3)] == singles
    assert all(is_valid(text) for text in singles) and len(set(singles)) > 1


def test_preemption_and_chunked_prefill_keep_constrained_outputs(tiny_dirs, olmoe):
    requests = {str(s): (PROMPT * 6, sampled(s)) for s in range(6)}
    expected = run(olmoe, requests)
    tight = make_engine(
        tiny_dirs["olmoe"], max_model_len=128, num_kv_blocks=40, max_num_batched_tokens=16
    )
    results = run(tight, requests)
    assert tight.scheduler.num_preemptions > 0
    for seed in range(6):
        assert results[str(seed)].token_ids == expected[str(seed)].token_ids
        assert is_valid(results[str(seed)].text[0])


def test_logprobs_are_the_models_raw_distribution(olmoe):
    free = run(olmoe, {"f": (PROMPT, greedy(max_tokens=1, logprobs=5))})["f"]
    regex = StructuredOutput("regex", "(yes|no)")
    result = run(olmoe, {"c": (PROMPT, greedy(max_tokens=8, logprobs=5, structured=regex))})["c"]
    assert result.text[0] in ("yes", "no") and result.finish[0] == "stop"
    assert result.logprobs[0][0].top == free.logprobs[0][0].top
    assert result.logprobs[0][0].rank > 1  # NOTE: the model's favourite is not "y" nor "n"


def test_stop_strings_and_max_tokens_still_apply(olmoe):
    cut = run(olmoe, {"c": (PROMPT, sampled(0, max_tokens=5))})["c"]
    assert cut.finish[0] == "length" and len(cut.token_ids[0]) == 5
    stopped = run(olmoe, {"s": (PROMPT, sampled(0, stop=('"age"',)))})["s"]
    assert stopped.finish[0] == "stop" and stopped.text[0].startswith('{"name": "')
    assert '"age"' not in stopped.text[0]


def test_bad_grammars_are_rejected_before_any_work(olmoe):
    cases = [
        (StructuredOutput("json_schema", '{"type": "strin"}'), "Invalid type"),
        (StructuredOutput("json_schema", "{not json"), "JSON"),
        (StructuredOutput("regex", "(?<=a)b"), "look-around"),
    ]
    for spec, message in cases:
        with pytest.raises(RequestError, match=message):
            olmoe.add_request("bad", PROMPT, sampled(0, structured=spec))
    assert not olmoe.has_unfinished
    with pytest.raises(RequestError, match="grammar kind"):
        StructuredOutput("xml", "<a/>")


def test_compiled_grammars_are_cached_per_spec(olmoe):
    compiler = GrammarCompiler(olmoe.tokenizer.tokenizer, 600, [0], cache_size=2)
    specs = [StructuredOutput("regex", f"a{{{i}}}") for i in range(3)]
    for spec in (specs[0], specs[0], specs[1], specs[0], specs[2]):
        compiler.create(spec)
    assert list(compiler._cache) == [specs[0], specs[2]]  # NOTE: least recently used went


def test_masks_allow_exactly_the_tokens_the_grammar_allows(olmoe):
    tokenizer = olmoe.tokenizer.tokenizer
    words = ("Hello, world!", "The quick brown fox!")
    matcher = olmoe.grammars.create(
        StructuredOutput("regex", "(Hello, world|The quick brown fox)!")
    )
    mask = olmoe.masks.submit([None, matcher, None]).result()
    assert mask.row_indices == [1] and mask.bias.shape[1] >= olmoe.model.config.vocab_size
    allowed = set((mask.bias[0] == 0).nonzero().flatten().tolist())
    expected = {
        t
        for t in range(tokenizer.get_vocab_size())
        if (text := tokenizer.decode([t])) and any(w.startswith(text) for w in words)
    }
    assert allowed == expected and len(expected) > 3
    assert olmoe.masks.submit([None, None]) is None
