"""`moe-serve` command line: tiny checkpoints, serving, benchmarks, gRPC client."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from moe_serve.deploy.bench.cli import add_bench
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tiny(sub)
    _add_run(sub)
    add_bench(sub)
    from moe_serve.deploy.client import add_client

    add_client(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
