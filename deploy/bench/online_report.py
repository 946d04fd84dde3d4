"""`moe-serve bench online`: sweep concurrency against a server, optionally run the same
workload through transformers in this process, write JSON and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moe_serve.deploy.bench.baseline import run_transformers
from moe_serve.deploy.bench.online import Target, sweep
from moe_serve.deploy.bench.plots import latency_cdf, throughput_plot
from moe_serve.deploy.bench.workload import Workload


def bench_online(
    target: Target,
    workload: Workload,
    concurrencies: list[int],
    vocab_limit: int,
    out_dir: Path,
    baseline_checkpoint: str | None = None,
    baseline_dtype: str = "float32",
) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = sweep(target, workload, concurrencies, vocab_limit)
    report: dict = {
        "target": {"model": target.model, "url": target.url, "grpc": target.grpc_address},
        "workload": workload.__dict__,
        "levels": rows,
    }
    baseline = None
    if baseline_checkpoint:
        items = workload.items(vocab_limit)
        seconds, _ = run_transformers(
            baseline_checkpoint, items, workload.concurrency, getattr(torch, baseline_dtype)
        )
        tokens = sum(item.max_tokens for item in items)
        baseline = tokens / seconds
        ours = next((r for r in rows if r["concurrency"] == workload.concurrency), rows[-1])
        report["transformers"] = {
            "seconds": seconds,
            "output_tokens_per_s": baseline,
            "batch_size": workload.concurrency,
        }
        report["speedup"] = ours["output_tokens_per_s"] / baseline
    title = f"{target.model} over {'gRPC' if target.grpc_address else 'HTTP'}"
    report["plots"] = [
        str(throughput_plot(rows, baseline, title, out_dir / "throughput.png")),
        str(latency_cdf(rows, title, out_dir / "latency_cdf.png")),
    ]
    (out_dir / "online.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_table(report: dict) -> None:
    print(
        f"{'conc':>5} {'req/s':>7} {'tok/s':>8} {'ttft p50':>9} {'ttft p99':>9} "
        f"{'tpot p50':>9} {'e2e p50':>8} {'e2e p99':>8} {'err':>4}"
    )
    for r in report["levels"]:
        print(
            f"{r['concurrency']:>5} {r['requests_per_s']:>7.2f} "
            f"{r['output_tokens_per_s']:>8.1f} {r['ttft_s']['p50']:>9.3f} "
            f"{r['ttft_s']['p99']:>9.3f} {r['tpot_s']['p50']:>9.4f} "
            f"{r['latency_s']['p50']:>8.2f} {r['latency_s']['p99']:>8.2f} {r['errors']:>4}"
        )
    if "speedup" in report:
        print(
            f"transformers generate: {report['transformers']['output_tokens_per_s']:.1f} "
            f"tok/s; moe-serve / transformers = {report['speedup']:.2f}x"
        )
