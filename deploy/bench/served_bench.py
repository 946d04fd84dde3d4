"""`moe-serve bench served`: what the served stack keeps of what the engine earns. In one run:
the in-process engine on the bench workload (with the served engine actor's torch threads),
then the same requests served at EP = N, 16 in flight: HTTP streamed, HTTP unary and gRPC
streamed, each twice (A B C C B A, after an untimed first run); then the in-process engine
again. This VM's speed drifts between minutes: each variant's two runs bracket the others, and
the served runs are compared with the mean of the two engine runs around them. No profiler."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from moe_serve.deploy.bench.online import Target, run_load, summarize
from moe_serve.deploy.bench.workload import Workload

VARIANTS = ("http streamed", "http unary", "grpc streamed")


def _measured(target: Target, workload: Workload, items: list, url: str) -> dict:
    """One load run: its summary, the engine steps it took, and each Ray process's CPU ms per
    output token (from /proc)."""
    from moe_serve.deploy.bench.profile import CpuMeter, engine_steps

    steps, meter = engine_steps(url), CpuMeter()
    summary = summarize(*asyncio.run(run_load(target, workload, items)))
    used, own, tokens = meter.used(), meter.own_used(), max(1, summary["output_tokens"])
    summary["engine_steps"] = engine_steps(url) - steps  # NOTE: after the CPU is read: it polls
    cpu: dict[str, float] = {"load generator": 1000 * own / tokens}
    for pid, role in meter.roles.items():
        cpu[role] = cpu.get(role, 0.0) + 1000 * used[pid] / tokens
    summary["cpu_ms_per_token"] = dict(sorted(cpu.items(), key=lambda kv: -kv[1]))
    return summary


def _mean(runs: list[dict]) -> dict:
    """Two runs of a variant as one: its first run's summary with tok/s and CPU per token the
    runs' means, and each run's tok/s beside them."""
    mean = dict(runs[0])
    mean["runs_output_tokens_per_s"] = [run["output_tokens_per_s"] for run in runs]
    mean["output_tokens_per_s"] = sum(mean["runs_output_tokens_per_s"]) / len(runs)
    mean["errors"] = sum(run["errors"] for run in runs)
    roles = {role for run in runs for role in run["cpu_ms_per_token"]}
    mean["cpu_ms_per_token"] = {
        role: sum(run["cpu_ms_per_token"].get(role, 0.0) for run in runs) / len(runs)
        for role in roles
    }
    return mean


def _served_runs(ep: int, workload: Workload, items: list) -> dict[str, dict]:
    import ray
    from ray import serve

    from moe_serve.deploy.bench.profile import MODEL, serve_one
    from moe_serve.deploy.bench.report import GRPC_PORT, HTTP_PORT, checkpoint

    serve_one(checkpoint(), ep, HTTP_PORT, GRPC_PORT)
    url, address = f"http://127.0.0.1:{HTTP_PORT}", f"127.0.0.1:{GRPC_PORT}"
    targets = {
        "http streamed": Target(MODEL, url),
        "http unary": Target(MODEL, url, is_streamed=False),
        "grpc streamed": Target(MODEL, grpc_address=address),
    }
    try:
        # NOTE: untimed: the first pass touches the KV cache's pages for the first time
        asyncio.run(run_load(targets["http streamed"], workload, items))
        runs: dict[str, list[dict]] = {name: [] for name in targets}
        for name in [*targets, *reversed(targets)]:  # NOTE: A B C C B A: drift cancels out
            runs[name].append(_measured(targets[name], workload, items, url))
        return {name: _mean(pair) for name, pair in runs.items()}
    finally:
        serve.shutdown()
        ray.shutdown()


def bench_served(ep: int = 1, out: Path | None = None) -> dict:
    """Tokens/s of each served variant, of the engine runs, and the ratios the issue asks for:
    served / engine, gRPC / HTTP, streamed / unary."""
    from moe_serve.cluster.ray_replica import default_engine_threads
    from moe_serve.deploy.bench.engine_bench import bench_engine
    from moe_serve.deploy.bench.profile import VOCAB_LIMIT
    from moe_serve.deploy.bench.report import WORKLOAD, checkpoint

    path, threads = checkpoint(), default_engine_threads()
    items = WORKLOAD.items(VOCAB_LIMIT)
    before = bench_engine(path, WORKLOAD, "float32", False, None, threads)["engine"]
    served = _served_runs(ep, WORKLOAD, items)
    after = bench_engine(path, WORKLOAD, "float32", False, None, threads)["engine"]
    engine_tps = (before["tokens_per_s"] + after["tokens_per_s"]) / 2
    rate = {name: run["output_tokens_per_s"] for name, run in served.items()}
    report = {
        "ep": ep,
        "engine_threads": threads,
        "engine_tokens_per_s": {"before": before["tokens_per_s"], "after": after["tokens_per_s"]},
        "served": served,
        "served_vs_engine": {name: value / engine_tps for name, value in rate.items()},
        "grpc_vs_http": rate["grpc streamed"] / rate["http streamed"],
        "streamed_vs_unary": rate["http streamed"] / rate["http unary"],
    }
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def render(report: dict) -> str:
    """One markdown table: each variant's tok/s and its ratio to the in-process engine."""
    engine = report["engine_tokens_per_s"]
    lines = [
        f"EP = {report['ep']}, 16 in flight; in-process engine on {report['engine_threads']} "
        f"torch thread(s): {engine['before']:.1f} tok/s before the served runs, "
        f"{engine['after']:.1f} after.",
        "",
        "| path | tok/s | / in-process engine | TTFT p50 (s) | tokens / engine step | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in VARIANTS:
        run = report["served"][name]
        lines.append(
            f"| {name} | {run['output_tokens_per_s']:.1f} | "
            f"**{report['served_vs_engine'][name]:.2f}x** | {run['ttft_s']['p50']:.3f} | "
            f"{run['output_tokens'] / max(1, run['engine_steps']):.1f} | {run['errors']} |"
        )
    lines += ["", "CPU ms per output token, by process:", ""]
    lines += ["| process | " + " | ".join(VARIANTS) + " |", "| --- |" + " ---: |" * len(VARIANTS)]
    roles = sorted(
        {role for name in VARIANTS for role in report["served"][name]["cpu_ms_per_token"]},
        key=lambda role: -report["served"][VARIANTS[0]]["cpu_ms_per_token"].get(role, 0.0),
    )
    for role in roles:
        cells = [report["served"][name]["cpu_ms_per_token"].get(role, 0.0) for name in VARIANTS]
        if max(cells) >= 0.05:
            lines.append(f"| {role} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    lines += [
        "",
        f"gRPC / HTTP (streamed): {report['grpc_vs_http']:.2f}x; HTTP streamed / unary: "
        f"{report['streamed_vs_unary']:.2f}x.",
    ]
    return "\n".join(lines) + "\n"
