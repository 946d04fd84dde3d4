"""`moe-serve bench ...`: the benchmark subcommands. Each imports its benchmark only when run."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
from pathlib import Path


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def positive_int_list(text: str) -> list[int]:
    return [positive_int(part) for part in text.split(",")]


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


def workload_of(args: argparse.Namespace):
    from moe_serve.deploy.bench.workload import Workload, parse_range

    return Workload(
        args.num_requests,
        args.concurrency,
        parse_range(args.prompt_len),
        parse_range(args.output_len),
        args.seed,
        args.request_rate,
    )


def _json_report(module: str, function: str):
    """A subcommand that calls `moe_serve.deploy.bench.<module>.<function>` with the parsed
    arguments of its parameters' names (`workload` built from the workload flags) and prints
    the report it returns as JSON."""

    def run(args: argparse.Namespace) -> int:
        bench = getattr(importlib.import_module(f"moe_serve.deploy.bench.{module}"), function)
        names = inspect.signature(bench).parameters
        values = vars(args) | ({"workload": workload_of(args)} if "workload" in names else {})
        print(json.dumps(bench(**{n: values[n] for n in names if n in values}), indent=2))
        return 0

    return run


def _add_engine(kinds) -> None:
    engine = kinds.add_parser("engine", help="the engine in-process vs transformers generate")
    engine.add_argument("--checkpoint", required=True, help="checkpoint directory")
    engine.add_argument("--dtype", default=None, help="float32, bfloat16 (default: checkpoint)")
    engine.add_argument(
        "--no-baseline", dest="baseline", action="store_false", help="skip transformers"
    )
    engine.add_argument(
        "--engine-threads",
        type=positive_int,
        default=None,
        help="torch threads for the engine side only (default: torch's)",
    )
    engine.add_argument("--attention-backend", choices=("flex", "sdpa"), default="flex")
    engine.add_argument("--out", type=Path, help="write the JSON report here")
    _add_workload_args(engine)
    engine.set_defaults(func=_json_report("engine_bench", "bench_engine"))


def _add_online(kinds) -> None:
    online = kinds.add_parser("online", help="load a running server (HTTP or gRPC)")
    online.add_argument("--model", required=True, help="served model name")
    online.add_argument("--url", default="http://127.0.0.1:8000", help="HTTP base URL")
    online.add_argument("--grpc", help="host:port: use gRPC instead of HTTP")
    online.add_argument("--api-key", default=None)
    online.add_argument("--sweep", default=None, help="concurrency levels, e.g. 1,4,16")
    online.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    online.add_argument(
        "--unary", action="store_true", help="HTTP: non-streamed requests (one JSON body each)"
    )
    online.add_argument("--vocab-limit", type=int, default=500, help="prompt ids below this")
    online.add_argument("--baseline-checkpoint", help="also run transformers on this checkpoint")
    online.add_argument("--baseline-dtype", default="float32")
    online.add_argument("--out", type=Path, default=Path("bench-results"))
    _add_workload_args(online)
    online.set_defaults(func=_run_online)


def _add_others(kinds) -> None:
    report = kinds.add_parser("report", help="run every benchmark, write performance.md")
    report.add_argument("--out", type=Path, default=Path("docs"))
    report.set_defaults(func=_run_report)
    prefix = kinds.add_parser("prefix", help="TTFT with a shared prompt prefix cached vs cold")
    prefix.add_argument("--checkpoint", required=True)
    prefix.add_argument("--prefix-len", type=positive_int, default=440)
    prefix.add_argument("--suffix-len", type=positive_int, default=16)
    prefix.add_argument("--num-requests", type=positive_int, default=8)
    prefix.add_argument("--repeats", type=positive_int, default=3)
    prefix.add_argument("--dtype", default=None)
    prefix.set_defaults(func=_json_report("prefix_bench", "bench_prefix"))
    step = kinds.add_parser("step", help="decode step time vs batch for EP sizes, bytes moved")
    step.add_argument("--checkpoint", required=True)
    step.add_argument("--ep", default="1,2,4", help="expert-parallel sizes, comma separated")
    step.add_argument("--batch", default="1,16,64", help="batch sizes, comma separated")
    step.add_argument("--output-tokens", type=int, default=32)
    step.add_argument("--dtype", default=None)
    step.add_argument("--shard-cpus", type=float, default=0.5, help="Ray CPUs per shard actor")
    step.add_argument(
        "--max-fixed-dispatch-tokens",
        type=int,
        default=None,
        help="steps up to this many tokens dispatch in fixed-capacity mode (0: all exact)",
    )
    step.add_argument(
        "--overlap",
        choices=("auto", "on", "off"),
        default=None,
        help="two micro-batches in ping-pong: measured per step size (auto), always, never",
    )
    step.add_argument("--out", type=Path, help="write the JSON rows here")
    step.set_defaults(func=_run_step)
    eplb = kinds.add_parser("eplb", help="skewed routing: shard balance and step, EPLB off/on")
    eplb.add_argument("--checkpoint", help="default: the skewed benchmark checkpoint")
    eplb.add_argument("--ep", type=positive_int, default=2)
    eplb.add_argument("--batch", type=positive_int, default=16)
    eplb.add_argument("--output-tokens", type=positive_int, default=32)
    eplb.add_argument("--rounds", type=positive_int, default=2)
    eplb.add_argument("--shard-cpus", type=float, default=0.5, help="Ray CPUs per shard actor")
    eplb.set_defaults(func=_run_eplb)
    grammar = kinds.add_parser("grammar", help="decode step cost of a JSON-schema constraint")
    grammar.add_argument("--checkpoint", required=True)
    grammar.add_argument(
        "--tokenizer", dest="tokenizer_dir", help="a directory with another tokenizer"
    )
    grammar.add_argument("--batch", type=positive_int, default=16)
    grammar.add_argument("--output-tokens", dest="tokens", type=positive_int, default=64)
    grammar.add_argument("--dtype", default=None)
    grammar.add_argument("--rounds", type=positive_int, default=5)
    grammar.add_argument("--out", type=Path, help="write the JSON report here")
    grammar.set_defaults(func=_json_report("grammar_bench", "bench_grammar"))
    profile = kinds.add_parser(
        "profile", help="served vs in-process engine, and every process's CPU per token"
    )
    profile.add_argument("--ep", type=positive_int, default=1, help="expert-parallel size")
    profile.add_argument("--out", type=Path, default=Path("bench-results/profile"))
    profile.set_defaults(func=_run_profile)
    served = kinds.add_parser(
        "served", help="served HTTP/gRPC, streamed and unary, vs the in-process engine"
    )
    served.add_argument("--ep", type=positive_int, default=1, help="expert-parallel size")
    served.add_argument("--out", type=Path, help="write the JSON report here")
    served.set_defaults(func=_run_served)


def _add_context(kinds) -> None:
    context = kinds.add_parser(
        "context", help="decode step at a short and a long context, per attention backend"
    )
    context.add_argument("--checkpoint", required=True)
    context.add_argument("--contexts", type=positive_int_list, default=[100, 2000])
    context.add_argument("--batch", type=positive_int, default=16)
    context.add_argument("--output-tokens", type=positive_int, default=48)
    context.add_argument("--rounds", type=positive_int, default=2)
    context.add_argument("--dtype", default=None)
    context.add_argument("--engine-threads", type=positive_int, default=None)
    context.add_argument("--out", type=Path, help="write the JSON report here")
    context.set_defaults(func=_json_report("context_bench", "bench_context"))


def _add_transport(kinds) -> None:
    transport = kinds.add_parser(
        "transport", help="a decode layer's hand-offs: gloo messages vs gloo collectives"
    )
    transport.add_argument("--ranks", type=positive_int_list, default=[2, 3])
    transport.add_argument("--batch", type=positive_int_list, default=[1, 16, 64])
    transport.add_argument("--rounds", type=positive_int, default=500)
    transport.add_argument("--hidden-size", type=positive_int, default=512)
    transport.add_argument("--top-k", type=positive_int, default=4)
    transport.add_argument("--out", type=Path, help="write the JSON report here")
    transport.set_defaults(func=_json_report("transport_bench", "bench_transport"))


def add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks, side by side with transformers")
    kinds = bench.add_subparsers(dest="kind", required=True)
    _add_engine(kinds)
    _add_online(kinds)
    _add_others(kinds)
    _add_context(kinds)
    _add_transport(kinds)


def _run_online(args: argparse.Namespace) -> int:
    from moe_serve.deploy.bench.online import Target
    from moe_serve.deploy.bench.online_report import bench_online, print_table

    workload = workload_of(args)
    levels = [int(c) for c in args.sweep.split(",")] if args.sweep else [workload.concurrency]
    target = Target(args.model, args.url, args.grpc, args.api_key, args.temperature, not args.unary)
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


def _run_report(args: argparse.Namespace) -> int:
    from moe_serve.deploy.bench.report import run_report

    print(f"wrote {run_report(args.out)}")
    return 0


def _run_profile(args: argparse.Namespace) -> int:
    from moe_serve.deploy.bench.profile import render, run_profile

    print(render(run_profile(args.out, args.ep)))
    return 0


def _run_served(args: argparse.Namespace) -> int:
    from moe_serve.deploy.bench.served_bench import bench_served, render

    print(render(bench_served(args.ep, args.out)))
    return 0


def _run_eplb(args: argparse.Namespace) -> int:
    from moe_serve.deploy.bench.eplb_bench import measure, render, skewed_checkpoint

    checkpoint = args.checkpoint or skewed_checkpoint()
    rows = measure(
        checkpoint, args.ep, args.batch, args.output_tokens, args.rounds, args.shard_cpus
    )
    print(render(rows))
    return 0


def _run_step(args: argparse.Namespace) -> int:
    from moe_serve.deploy.bench.step_bench import measure

    batches = [int(b) for b in args.batch.split(",")]
    fixed = {}
    for name in ("max_fixed_dispatch_tokens", "overlap"):
        if getattr(args, name) is not None:
            fixed[name] = getattr(args, name)
    print(
        f"{'ep':>3} {'batch':>6} {'ms/step':>9} {'bytes/step':>12} {'min bytes':>12} "
        f"{'collectives':>11} {'fixed':>6}",
        flush=True,
    )
    rows = []
    for ep in (int(e) for e in args.ep.split(",")):
        for r in measure(
            args.checkpoint, ep, batches, args.output_tokens, args.dtype, args.shard_cpus, **fixed
        ):
            rows.append(r)
            print(
                f"{r['ep']:>3} {r['batch']:>6} {r['ms_per_step']:>9.2f} "
                f"{r['bytes_per_step']:>12.0f} {r['min_bytes_per_step']:>12.0f} "
                f"{r['collectives_per_step']:>11.1f} {r['fixed_capacity_steps']:>6.0%}",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0
