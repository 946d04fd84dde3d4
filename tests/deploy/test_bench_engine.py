"""`moe-serve bench engine` on a tiny checkpoint: a report with both sides and equal outputs."""

from __future__ import annotations

import json

import torch

from moe_serve.deploy.cli import main


def test_engine_bench_reports_a_ratio_against_transformers(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "report.json"
    args = "--num-requests 6 --concurrency 3 --prompt-len 2-9 --output-len 3-7".split()
    code = main(
        ["bench", "engine", "--checkpoint", str(tiny_dirs["granitemoe"]), *args, "--out", str(out)]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert report["output_tokens"] > 0 and report["engine"]["steps"] >= 7
    assert report["speedup"] == report["transformers"]["seconds"] / report["engine"]["seconds"]
    assert report["identical_outputs"] == "6/6"


def test_engine_threads_limit_the_engine_side_only(tiny_dirs, tmp_path, capsys):
    before = torch.get_num_threads()
    args = "--num-requests 2 --concurrency 2 --prompt-len 2-4 --output-len 2-3 --no-baseline"
    checkpoint = str(tiny_dirs["olmoe"])
    code = main(
        ["bench", "engine", "--checkpoint", checkpoint, "--engine-threads", "1", *args.split()]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["engine"]["threads"] == 1 and "transformers" not in report
    assert torch.get_num_threads() == before


def test_prefix_bench_reports_cached_tokens_and_a_ratio(tiny_dirs, capsys):
    args = "--prefix-len 37 --suffix-len 3 --num-requests 3 --repeats 1".split()
    code = main(["bench", "prefix", "--checkpoint", str(tiny_dirs["jetmoe"]), *args])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    # NOTE: 37 shared tokens hold two whole blocks of 16; the rest is computed per request
    assert report["cached_tokens"] == [32]
    assert report["ratio"] == report["ttft_cached_ms"] / report["ttft_cold_ms"] > 0
