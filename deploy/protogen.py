"""Regenerate the committed gRPC modules from `protos/moe_serving.proto`:
`python -m moe_serve.deploy.protogen` (with the grpcio-tools version constraints.txt pins).

protoc names imports after the proto's path, so the proto is compiled from a staging tree where
it sits at `moe_serve/protos/`, the package it is installed as."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "protos/moe_serving.proto"
PACKAGE = Path("moe_serve/protos")


def generate(out_dir: Path, root: Path = ROOT) -> list[Path]:
    """Write moe_serving_pb2{,_grpc}.py and .pyi under out_dir/protos; returns the files."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / PACKAGE
        staged.mkdir(parents=True)
        shutil.copy(root / PROTO, staged)
        args = [
            "protoc",
            f"-I{tmp}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--pyi_out={tmp}",
            str(staged / Path(PROTO).name),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        (out_dir / "protos").mkdir(parents=True, exist_ok=True)
        for path in staged.glob("moe_serving_pb2*"):
            shutil.copy(path, out_dir / "protos" / path.name)
    return sorted((out_dir / "protos").glob("moe_serving_pb2*"))


if __name__ == "__main__":
    for path in generate(ROOT):
        print(f"wrote {path.relative_to(ROOT)}")
    sys.exit(0)
