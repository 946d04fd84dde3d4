"""docs/performance.md rendering: targets judged from the measured numbers, every section."""

from __future__ import annotations

from moe_serve.deploy.bench.report import KEPT, ONE_THREAD, write_markdown
from moe_serve.deploy.bench.report_markdown import render


def _engine_run(speedup: float) -> dict:
    return {
        "speedup": speedup,
        "engine": {"tokens_per_s": 100.0 * speedup, "ms_per_step": 30.0},
        "transformers": {"tokens_per_s": 100.0},
        "identical_outputs": "48/48",
    }


def _level(concurrency: int, tokens_per_s: float) -> dict:
    quantiles = {"p50": 0.5, "p99": 0.9}
    return {
        "concurrency": concurrency,
        "requests_per_s": 1.0,
        "output_tokens_per_s": tokens_per_s,
        "ttft_s": quantiles,
        "tpot_s": quantiles,
        "latency_s": quantiles,
        "errors": 0,
    }


def _steps(ep2_ms: float) -> list[dict]:
    return [
        {"ep": ep, "batch": 16, "ms_per_step": ms, "bytes_per_step": b, "min_bytes_per_step": m}
        for ep, ms, b, m in ((1, 100.0, 0, 0), (2, ep2_ms, 1010, 1000))
    ]


def _markdown(served: float, ep2_ms_runs: tuple[float, ...]) -> str:
    engine = {
        "float32": [_engine_run(x) for x in (3.4, 2.0, 3.1)],
        "bfloat16": [_engine_run(1.5)],
        ONE_THREAD: [_engine_run(1.2)],
    }
    ep2 = {"levels": [_level(16, 100.0 * served)], "transformers": {"output_tokens_per_s": 100.0}}
    online = {"ep2": ep2 | {"speedup": served}, "ep1": ep2, "grpc": ep2}
    prefix = {
        "num_requests": 8,
        "prefix_tokens": 440,
        "suffix_tokens": 16,
        "ttft_cached_ms": 30.0,
        "ttft_cold_ms": 200.0,
        "ratio": 0.15,
        "cached_tokens": [432],
    }
    steps = [_steps(ms) for ms in ep2_ms_runs]
    return render("test machine", engine, steps, online, prefix, 600.0)


def test_targets_are_judged_from_the_numbers():
    text = _markdown(served=3.2, ep2_ms_runs=(150.0, 140.0, 120.0))
    assert "320.0 vs 100.0 tok/s = **3.20x** | yes |" in text
    assert "| **3.10x** | yes |" in text  # the median of 2.0, 3.1, 3.4
    assert "140.0 vs 100.0 ms = **1.40x** (median; runs: 1.20x, 1.40x, 1.50x) | no |" in text
    assert "| 2 | 16 | 140.0 | 1.40x |" in text  # the median run's table
    assert "**1.30x** (median; runs: 1.30x) | yes |" in _markdown(1.0, (130.0,))


def test_every_section_and_the_one_thread_row_are_rendered():
    text = _markdown(served=1.1, ep2_ms_runs=(120.0,))
    assert f"| {ONE_THREAD} | 120.0 | 100.0 | **1.20x** |" in text
    assert "| 2 | 16 | 120.0 | 1.20x | 1010 | 1000 | +1.0% |" in text
    assert text.count("| HTTP, EP=2 | 16 |") == 1 and "| gRPC, EP=2 | 16 |" in text
    assert "Machine: test machine" in text and "the whole run took 10 minutes" in text


def test_prefix_caching_row_shows_both_times_and_the_ratio():
    text = _markdown(served=3.2, ep2_ms_runs=(150.0,))
    assert "| 8 | 440 | 16 | 30 ms | 200 ms | **0.15x** | 432 |" in text


def test_a_new_report_keeps_the_sections_after_the_marker(tmp_path):
    target = tmp_path / "performance.md"
    write_markdown(target, "# Performance\nold\n")
    assert target.read_text() == "# Performance\nold\n"
    target.write_text(f"# Performance\nold\n\n{KEPT}\n## Grammar\nkept\n")
    write_markdown(target, "# Performance\nnew\n")
    assert target.read_text() == f"# Performance\nnew\n\n{KEPT}\n## Grammar\nkept\n"
