"""`moe-serve bench grammar` on a tiny checkpoint: both step times, the llguidance work alone,
and constrained outputs that follow the benchmark's schema."""

from __future__ import annotations

import json

from moe_serve.deploy.cli import main


def test_grammar_bench_reports_constrained_and_free_step_times(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "grammar.json"
    checkpoint = str(tiny_dirs["olmoe"])
    args = ["--batch", "3", "--output-tokens", "12", "--rounds", "2", "--out", str(out)]
    assert main(["bench", "grammar", "--checkpoint", checkpoint, *args]) == 0
    report = json.loads(out.read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert len(report["rounds"]["constrained"]) == 2 and report["constrained_ms_per_step"] > 0
    assert all(report[f"{k}_ms_per_step"] > 0 for k in ("mask_fill", "mask_apply", "advance"))
    assert report["sample_output"].startswith('[{"id": ') and report["tokenizer_vocab"] == 512
