"""`moe-serve bench transport`: a decode layer's hand-offs timed through the transport, both
realisations, with shards in processes of their own (what the EP = 2 figures in
docs/performance.md come from)."""

from __future__ import annotations

import json

from moe_serve.deploy.cli import main


def test_transport_bench_times_messages_and_collectives(tmp_path):
    # NOTE: read from --out, not stdout: a Ray driver left by another test prints its
    # workers' log lines to this process's stdout
    out = tmp_path / "transport.json"
    args = ["--ranks", "2", "--batch", "2", "--rounds", "5", "--hidden-size", "8"]
    assert main(["bench", "transport", *args, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(row["ranks"], row["rows"]) for row in report["layers"]] == [(2, 2)]
    assert all(row["messages_ms"] > 0 and row["collectives_ms"] > 0 for row in report["layers"])
    assert (report["rounds"], report["hidden_size"], report["top_k"]) == (5, 8, 4)
