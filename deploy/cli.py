"""`moe-serve` command line: tiny checkpoints, serving, benchmarks, gRPC client."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from models.tiny import ARCHS, TinySpec, write_tiny


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
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from deploy.config import ConfigFileError, load_config
    from deploy.serving import run

    try:
        config = load_config(args.config) if args.config else None
    except ConfigFileError as exc:
        print(f"moe-serve: {exc}", file=sys.stderr)
        return 2
    return run(config)


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-len", default="8-96", help="uniform range LOW-HIGH (tokens)")
    p.add_argument("--output-len", default="8-96", help="uniform range LOW-HIGH (tokens)")
    p.add_argument("--seed", type=int, default=0)


def _workload(args: argparse.Namespace):
    from deploy.bench.workload import Workload, parse_range

    return Workload(
        args.num_requests,
        args.concurrency,
        parse_range(args.prompt_len),
        parse_range(args.output_len),
        args.seed,
    )


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks, side by side with transformers")
    kinds = bench.add_subparsers(dest="kind", required=True)
    engine = kinds.add_parser("engine", help="the engine in-process vs transformers generate")
    engine.add_argument("--checkpoint", required=True, help="checkpoint directory")
    engine.add_argument("--dtype", default=None, help="float32, bfloat16 (default: checkpoint)")
    engine.add_argument("--no-baseline", action="store_true", help="skip transformers")
    engine.add_argument("--out", type=Path, help="write the JSON report here")
    _add_workload_args(engine)
    engine.set_defaults(func=_run_bench_engine)
    step = kinds.add_parser("step", help="decode step time vs batch for EP sizes, bytes moved")
    step.add_argument("--checkpoint", required=True)
    step.add_argument("--ep", default="1,2,4", help="expert-parallel sizes, comma separated")
    step.add_argument("--batch", default="1,16,64", help="batch sizes, comma separated")
    step.add_argument("--output-tokens", type=int, default=32)
    step.add_argument("--dtype", default=None)
    step.add_argument("--shard-cpus", type=float, default=0.5, help="Ray CPUs per shard actor")
    step.add_argument("--out", type=Path, help="write the JSON rows here")
    step.set_defaults(func=_run_bench_step)


def _run_bench_engine(args: argparse.Namespace) -> int:
    from deploy.bench.engine_bench import bench_engine

    report = bench_engine(
        args.checkpoint, _workload(args), args.dtype, not args.no_baseline, args.out
    )
    print(json.dumps(report, indent=2))
    return 0


def _run_bench_step(args: argparse.Namespace) -> int:
    from deploy.bench.step_bench import measure

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
    from deploy.client import add_client

    add_client(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
