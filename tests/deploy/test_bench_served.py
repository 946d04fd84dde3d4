"""`moe-serve bench served`'s arithmetic: a variant's two runs as one, and the table."""

from __future__ import annotations

from moe_serve.deploy.bench.served_bench import VARIANTS, _mean, render


def run(tokens_per_s: float, gateway_ms: float, errors: int = 0) -> dict:
    return {
        "output_tokens_per_s": tokens_per_s,
        "output_tokens": 2568,
        "engine_steps": 206,
        "errors": errors,
        "ttft_s": {"p50": 0.3},
        "cpu_ms_per_token": {"Gateway": gateway_ms},
    }


def test_two_runs_of_a_variant_are_averaged_and_both_are_kept():
    mean = _mean([run(100.0, 1.0, errors=1), run(120.0, 2.0, errors=2)])
    assert mean["output_tokens_per_s"] == 110.0
    assert mean["runs_output_tokens_per_s"] == [100.0, 120.0]
    assert mean["cpu_ms_per_token"] == {"Gateway": 1.5}
    assert mean["errors"] == 3


def test_the_table_has_a_row_per_variant_with_its_ratio_to_the_engine():
    served = {name: run(90.0 + 10 * i, 1.0) for i, name in enumerate(VARIANTS)}
    report = {
        "ep": 1,
        "engine_threads": 1,
        "engine_tokens_per_s": {"before": 100.0, "after": 100.0},
        "served": served,
        "served_vs_engine": {name: served[name]["output_tokens_per_s"] / 100 for name in VARIANTS},
        "grpc_vs_http": 110 / 90,
        "streamed_vs_unary": 90 / 100,
    }
    table = render(report)
    assert "| http streamed | 90.0 | **0.90x** | 0.300 | 12.5 | 0 |" in table
    assert "| grpc streamed | 110.0 | **1.10x** |" in table
    assert "gRPC / HTTP (streamed): 1.22x; HTTP streamed / unary: 0.90x." in table
    assert "| Gateway | 1.00 | 1.00 | 1.00 |" in table
