"""`moe-serve bench report`: every benchmark in one run, written to docs/performance.md.

Writes the OLMoE-shaped checkpoint if needed, runs the engine bench (float32 and bfloat16)
against transformers, the decode-step bench for EP = 1, 2, 4, then starts a local Serve app and
sweeps HTTP (and gRPC) load with the transformers baseline in the same run.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from moe_serve.deploy.bench.engine_bench import bench_engine
from moe_serve.deploy.bench.online import Target
from moe_serve.deploy.bench.online_report import bench_online
from moe_serve.deploy.bench.plots import step_plot
from moe_serve.deploy.bench.prefix_bench import bench_prefix
from moe_serve.deploy.bench.report_markdown import median_step_run, render
from moe_serve.deploy.bench.step_bench import measure
from moe_serve.deploy.bench.workload import Workload
from moe_serve.models.source import cache_dir
from moe_serve.models.tiny import TinySpec, write_tiny

SPEC = TinySpec(
    vocab_size=50304,
    hidden_size=512,
    intermediate_size=256,
    num_layers=6,
    num_heads=8,
    num_kv_heads=8,
    num_experts=32,
    top_k=4,
    max_position_embeddings=4096,
)
WORKLOAD = Workload(num_requests=48, concurrency=16, prompt_len=(8, 96), output_len=(8, 96))
HTTP_PORT, GRPC_PORT = 18431, 18432
ONE_THREAD = "float32, engine on 1 thread"  # NOTE: the served engine actor's share of 2 cores
REPEATS = 3  # NOTE: engine runs are short; this VM's speed drifts +-30% between minutes


def checkpoint() -> str:
    path = cache_dir() / "bench" / "olmoe-512"
    if not (path / "model.safetensors").exists():
        write_tiny("olmoe", path, seed=0, spec=SPEC)
    return str(path)


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )


def served_model(name: str, path: str, ep: int) -> dict:
    """The serving config entry of the bench checkpoint at EP = `ep`, on CPU."""
    return {
        "name": name,
        "source": path,
        "device": "cpu",
        "expert_parallel_size": ep,
        "max_model_len": 256,
        "max_num_seqs": 32,
        "resources": {"replica_cpus": 0.5, "shard_cpus": 0.5},
    }


def serve_models(path: str):
    """A local Serve app with the checkpoint at EP = 2 and EP = 1."""
    from ray import serve

    from moe_serve.deploy.config import parse_serve_config
    from moe_serve.deploy.launch import start

    models = [
        served_model(name, path, ep) for name, ep in (("olmoe-512-ep2", 2), ("olmoe-512-ep1", 1))
    ]
    start(
        parse_serve_config(
            {"http": {"port": HTTP_PORT}, "grpc": {"port": GRPC_PORT}, "models": models}
        )
    )
    return serve


def online_section(path: str, out: Path) -> dict:
    import ray

    serve = serve_models(path)
    try:
        url = f"http://127.0.0.1:{HTTP_PORT}"
        ep2 = bench_online(
            Target("olmoe-512-ep2", url),
            WORKLOAD,
            [1, 4, 16],
            500,
            out / "online-ep2",
            baseline_checkpoint=path,
        )
        ep1 = bench_online(Target("olmoe-512-ep1", url), WORKLOAD, [16], 500, out / "online-ep1")
        grpc = bench_online(
            Target("olmoe-512-ep2", grpc_address=f"127.0.0.1:{GRPC_PORT}"),
            WORKLOAD,
            [16],
            500,
            out / "online-grpc",
        )
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"ep2": ep2, "ep1": ep1, "grpc": grpc}


def run_report(docs: Path) -> Path:
    """Run everything; returns the markdown file written."""
    out = docs / "perf"
    out.mkdir(parents=True, exist_ok=True)
    path, started = checkpoint(), time.monotonic()
    engine = {
        dtype: [
            bench_engine(path, WORKLOAD, dtype, True, out / f"engine-{dtype}-{run}.json")
            for run in range(REPEATS)
        ]
        for dtype in ("float32", "bfloat16")
    }
    engine[ONE_THREAD] = [
        bench_engine(path, WORKLOAD, "float32", True, out / "engine-float32-1thread.json", 1)
    ]
    step_runs = [
        [row for ep in (1, 2, 4) for row in measure(path, ep, [1, 16, 64], 32, None, 0.5)]
        for _ in range(REPEATS)
    ]
    import ray

    ray.shutdown()
    step_plot(median_step_run(step_runs), out / "decode_step.png")
    prefix = bench_prefix(path)
    (out / "prefix.json").write_text(json.dumps(prefix, indent=2) + "\n")
    online = online_section(path, out)
    markdown = render(machine(), engine, step_runs, online, prefix, time.monotonic() - started)
    target = docs / "performance.md"
    write_markdown(target, markdown)
    return target


KEPT = "<!-- bench report keeps what follows: sections measured by other benchmarks -->"


def write_markdown(target: Path, markdown: str) -> None:
    """Write the report; what follows KEPT in the file it replaces is kept at its end."""
    previous = target.read_text() if target.exists() else ""
    kept = previous[previous.index(KEPT) :] if KEPT in previous else ""
    target.write_text(f"{markdown.rstrip()}\n\n{kept}" if kept else markdown)
