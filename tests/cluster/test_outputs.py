"""merge_outputs: a request's outputs as one message, as a reader that fell behind gets them."""

from __future__ import annotations

from moe_serve.cluster.outputs import merge_outputs
from moe_serve.cluster.params import SamplingParams
from tests.cluster.test_engine_core import collect, greedy, make_engine


def test_merged_outputs_carry_what_the_stream_of_outputs_carried(tiny_dirs):
    engine = make_engine(tiny_dirs["olmoe"])
    requests = {
        "greedy": ([5, 6, 7, 8], greedy(12, logprobs=2, prompt_logprobs=1)),
        "sampled": ([9, 10, 11], SamplingParams(max_tokens=9, n=3, seed=4, ignore_eos=True)),
    }
    outputs: dict[str, list] = {request_id: [] for request_id in requests}
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    while engine.has_unfinished:
        for output in engine.step():
            outputs[output.request_id].append(output)

    for request_id, stream in outputs.items():
        assert len(stream) > 3  # NOTE: one per step: the merge has something to do
        streamed, merged = {}, {}
        collect(stream, streamed)
        collect([merge_outputs(stream)], merged)
        assert merged == streamed
        result = merged[request_id]
        for index, token_ids in result.token_ids.items():
            # NOTE: a stream withholds a trailing incomplete UTF-8 sequence (decode: U+FFFD)
            assert result.text[index] == engine.tokenizer.decode(token_ids).rstrip("\ufffd")
            assert result.finish[index] == "length"
        assert result.usage == (
            len(requests[request_id][0]),
            sum(map(len, result.token_ids.values())),
        )
    assert merged_prompt_logprobs_kept(outputs["greedy"])


def merged_prompt_logprobs_kept(stream) -> bool:
    with_prompt = [o for o in stream if o.prompt_logprobs is not None]
    return (
        len(with_prompt) == 1
        and merge_outputs(stream).prompt_logprobs == with_prompt[0].prompt_logprobs
    )
