"""`moe-serve` command line: tiny checkpoints, serving, benchmarks, gRPC client."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from moe_serve.models.tiny import ARCHS, TinySpec, write_tiny

LOG_LEVELS = ("debug", "info", "warning", "error")


def _add_tiny(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny", help="write a small random checkpoint in the hub format")
    p.add_argument("--arch", required=True, choices=ARCHS)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    defaults = TinySpec()
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "num_experts",
        "top_k",
        "max_position_embeddings",
    ):
        p.add_argument("--" + field.replace("_", "-"), type=int, default=getattr(defaults, field))
    p.add_argument("--dtype", default=defaults.dtype, choices=("float32", "bfloat16", "float16"))
    p.set_defaults(func=_run_tiny)


def _run_tiny(args: argparse.Namespace) -> int:
    fields = {k: getattr(args, k) for k in TinySpec.__dataclass_fields__}
    out = write_tiny(args.arch, args.out, seed=args.seed, spec=TinySpec(**fields))
    print(f"wrote {args.arch} checkpoint to {out}")
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="serve the models of a config file (default: the demo)")
    p.add_argument("--config", help="YAML config file")
    p.add_argument(
        "--address",
        help="join the Ray cluster at this address (default: $RAY_ADDRESS; neither: start a "
        "private local Ray instance)",
    )
    p.add_argument(
        "--log-level",
        default="warning",
        choices=LOG_LEVELS,
        help="Ray's and Serve's own logs (default: warning); access lines are always printed",
    )
    p.set_defaults(func=_run_serve)


def ray_address(flag: str | None) -> str | None:
    """The cluster to join: `--address`, else $RAY_ADDRESS; None: a private local instance."""
    return flag or os.environ.get("RAY_ADDRESS") or None


def _run_serve(args: argparse.Namespace) -> int:
    """Every model is checked before Ray starts: each problem is one line, exit status 2."""
    from moe_serve.deploy.config import ConfigFileError, demo_config, load_serve_config
    from moe_serve.deploy.validate import check_address, check_models

    try:
        config = load_serve_config(args.config) if args.config else demo_config()
    except ConfigFileError as exc:
        return _fail(str(exc).splitlines())
    address = ray_address(args.address)
    problems = check_address(address) if address else []
    if address and config.api_key is not None:
        problems.append(
            f"{args.config}: api_key: a joined cluster's gateway cannot be given it (it would "
            "travel in the Serve config); set $MOE_SERVE_API_KEY in the environment of the "
            "cluster's Ray nodes instead"
        )
    problems += check_models(config, local_gpus=None if address else _local_gpus())
    if problems:
        return _fail(problems)
    # NOTE: before Ray is imported: the driver prints the replicas' lines (access lines,
    # warnings) as they are, without Ray's "(ServeReplica:... pid=...)" prefix
    os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
    from moe_serve.deploy.launch import run

    return run(config, address, args.log_level)


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _fail(problems: list[str]) -> int:
    for problem in problems:
        print(f"moe-serve: {problem}", file=sys.stderr)
    return 2


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-len", default="8-96", help="uniform range LOW-HIGH (tokens)")
    p.add_argument("--output-len", default="8-96", help="uniform range LOW-HIGH (tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="open loop: Poisson arrivals per second (online bench only)",
    )


def _workload(args: argparse.Namespace):
    from moe_serve.deploy.bench.workload import Workload, parse_range

    return Workload(
        args.num_requests,
        args.concurrency,
        parse_range(args.prompt_len),
        parse_range(args.output_len),
        args.seed,
        args.request_rate,
    )


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks, side by side with transformers")
    kinds = bench.add_subparsers(dest="kind", required=True)
    engine = kinds.add_parser("engine", help="the engine in-process vs transformers generate")
    engine.add_argument("--checkpoint", required=True, help="checkpoint directory")
    engine.add_argument("--dtype", default=None, help="float32, bfloat16 (default: checkpoint)")
    engine.add_argument("--no-baseline", action="store_true", help="skip transformers")
    engine.add_argument(
        "--engine-threads",
        type=_positive_int,
        default=None,
        help="torch threads for the engine side only (default: torch's)",
    )
    engine.add_argument("--out", type=Path, help="write the JSON report here")
    _add_workload_args(engine)
    engine.set_defaults(func=_run_bench_engine)
    online = kinds.add_parser("online", help="load a running server (HTTP or gRPC)")
    online.add_argument("--model", required=True, help="served model name")
    online.add_argument("--url", default="http://127.0.0.1:8000", help="HTTP base URL")
    online.add_argument("--grpc", help="host:port: use gRPC instead of HTTP")
    online.add_argument("--api-key", default=None)
    online.add_argument("--sweep", default=None, help="concurrency levels, e.g. 1,4,16")
    online.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    online.add_argument("--vocab-limit", type=int, default=500, help="prompt ids below this")
    online.add_argument("--baseline-checkpoint", help="also run transformers on this checkpoint")
    online.add_argument("--baseline-dtype", default="float32")
    online.add_argument("--out", type=Path, default=Path("bench-results"))
    _add_workload_args(online)
    online.set_defaults(func=_run_bench_online)
    report = kinds.add_parser("report", help="run every benchmark, write performance.md")
    report.add_argument("--out", type=Path, default=Path("docs"))
    report.set_defaults(func=_run_bench_report)
    prefix = kinds.add_parser("prefix", help="TTFT with a shared prompt prefix cached vs cold")
    prefix.add_argument("--checkpoint", required=True)
    prefix.add_argument("--prefix-len", type=_positive_int, default=440)
    prefix.add_argument("--suffix-len", type=_positive_int, default=16)
    prefix.add_argument("--num-requests", type=_positive_int, default=8)
    prefix.add_argument("--repeats", type=_positive_int, default=3)
    prefix.add_argument("--dtype", default=None)
    prefix.set_defaults(func=_run_bench_prefix)
    step = kinds.add_parser("step", help="decode step time vs batch for EP sizes, bytes moved")
    step.add_argument("--checkpoint", required=True)
    step.add_argument("--ep", default="1,2,4", help="expert-parallel sizes, comma separated")
    step.add_argument("--batch", default="1,16,64", help="batch sizes, comma separated")
    step.add_argument("--output-tokens", type=int, default=32)
    step.add_argument("--dtype", default=None)
    step.add_argument("--shard-cpus", type=float, default=0.5, help="Ray CPUs per shard actor")
    step.add_argument("--out", type=Path, help="write the JSON rows here")
    step.set_defaults(func=_run_bench_step)
    grammar = kinds.add_parser("grammar", help="decode step cost of a JSON-schema constraint")
    grammar.add_argument("--checkpoint", required=True)
    grammar.add_argument("--tokenizer", default=None, help="a directory with another tokenizer")
    grammar.add_argument("--batch", type=_positive_int, default=16)
    grammar.add_argument("--output-tokens", type=_positive_int, default=64)
    grammar.add_argument("--dtype", default=None)
    grammar.add_argument("--rounds", type=_positive_int, default=5)
    grammar.add_argument("--out", type=Path, help="write the JSON report here")
    grammar.set_defaults(func=_run_bench_grammar)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _run_bench_engine(args: argparse.Namespace) -> int:
    from moe_serve.deploy.bench.engine_bench import bench_engine

    report = bench_engine(
        args.checkpoint,
        _workload(args),
        args.dtype,
        not args.no_baseline,
        args.out,
        args.engine_threads,
    )
    print(json.dumps(report, indent=2))
    return 0


def _run_bench_online(args: argparse.Namespace) -> int:
    from moe_serve.deploy.bench.online import Target
    from moe_serve.deploy.bench.online_report import bench_online, print_table

    workload = _workload(args)
    levels = [int(c) for c in args.sweep.split(",")] if args.sweep else [workload.concurrency]
    target = Target(args.model, args.url, args.grpc, args.api_key, args.temperature)
    report = bench_online(
        target,
        workload,
        levels,
        args.vocab_limit,
        args.out,
        args.baseline_checkpoint,
        args.baseline_dtype,
    )
    print_table(report)
    print(f"wrote {args.out}/online.json and plots")
    return 0


def _run_bench_report(args: argparse.Namespace) -> int:
    from moe_serve.deploy.bench.report import run_report

    print(f"wrote {run_report(args.out)}")
    return 0


def _run_bench_prefix(args: argparse.Namespace) -> int:
    from moe_serve.deploy.bench.prefix_bench import bench_prefix

    report = bench_prefix(
        args.checkpoint,
        args.prefix_len,
        args.suffix_len,
        args.num_requests,
        args.repeats,
        args.dtype,
    )
    print(json.dumps(report, indent=2))
    return 0


def _run_bench_grammar(args: argparse.Namespace) -> int:
    from moe_serve.deploy.bench.grammar_bench import bench_grammar

    report = bench_grammar(
        args.checkpoint,
        args.tokenizer,
        args.batch,
        args.output_tokens,
        args.dtype,
        args.out,
        args.rounds,
    )
    print(json.dumps(report, indent=2))
    return 0


def _run_bench_step(args: argparse.Namespace) -> int:
    from moe_serve.deploy.bench.step_bench import measure

    batches = [int(b) for b in args.batch.split(",")]
    print(f"{'ep':>3} {'batch':>6} {'ms/step':>9} {'bytes/step':>12} {'min bytes':>12}", flush=True)
    rows = []
    for ep in (int(e) for e in args.ep.split(",")):
        for r in measure(
            args.checkpoint, ep, batches, args.output_tokens, args.dtype, args.shard_cpus
        ):
            rows.append(r)
            print(
                f"{r['ep']:>3} {r['batch']:>6} {r['ms_per_step']:>9.2f} "
                f"{r['bytes_per_step']:>12.0f} {r['min_bytes_per_step']:>12.0f}",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tiny(sub)
    _add_run(sub)
    _add_bench(sub)
    from moe_serve.deploy.client import add_client

    add_client(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
