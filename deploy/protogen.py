"""Regenerate the committed gRPC modules from `protos/moe_serving.proto`:
`python -m deploy.protogen` (with the grpcio-tools version constraints.txt pins)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "protos/moe_serving.proto"


def generate(out_dir: Path, root: Path = ROOT) -> list[Path]:
    """Write moe_serving_pb2{,_grpc}.py and .pyi under out_dir/protos; returns the files."""
    from grpc_tools import protoc

    (out_dir / "protos").mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{root}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        str(root / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return sorted((out_dir / "protos").glob("moe_serving_pb2*"))


if __name__ == "__main__":
    for path in generate(ROOT):
        print(f"wrote {path.relative_to(ROOT)}")
    sys.exit(0)
