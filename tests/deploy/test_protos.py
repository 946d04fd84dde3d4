"""The committed gRPC modules are exactly what the .proto generates."""

from __future__ import annotations

from moe_serve.deploy.protogen import ROOT, generate


def test_generated_modules_match_the_proto(tmp_path):
    fresh = generate(tmp_path)
    assert [p.name for p in fresh] == [
        "moe_serving_pb2.py",
        "moe_serving_pb2.pyi",
        "moe_serving_pb2_grpc.py",
    ]
    for path in fresh:
        committed = ROOT / "protos" / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale: run `python -m moe_serve.deploy.protogen`"
        )
