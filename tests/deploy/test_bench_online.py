"""`moe-serve bench online` against the test server: closed and open loop, HTTP and gRPC."""

from __future__ import annotations

import json

import pytest

from moe_serve.deploy.bench.workload import Workload
from moe_serve.deploy.cli import main

pytestmark = pytest.mark.slow


ENDPOINTS = {
    "http": lambda server: ["--url", server.http],
    "http unary": lambda server: ["--url", server.http, "--unary"],
    "grpc": lambda server: ["--grpc", server.grpc],
}


@pytest.mark.parametrize("transport", sorted(ENDPOINTS))
def test_online_bench_writes_a_report_and_plots(server, tmp_path, capsys, transport):
    endpoint = ENDPOINTS[transport](server)
    args = [
        "bench",
        "online",
        "--model",
        "olmoe",
        *endpoint,
        "--api-key",
        server.api_key,
        "--num-requests",
        "6",
        "--sweep",
        "1,3",
        "--prompt-len",
        "2-8",
        "--output-len",
        "2-6",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    report = json.loads((tmp_path / "online.json").read_text())
    assert [level["concurrency"] for level in report["levels"]] == [1, 3]
    # NOTE: ignore_eos: each request makes exactly its max_tokens, drawn as the bench draws them
    expected = sum(item.max_tokens for item in Workload(6, 1, (2, 8), (2, 6)).items(500))
    for level in report["levels"]:
        assert level["errors"] == 0 and level["requests"] == 6
        assert level["output_tokens"] == expected and level["ttft_s"]["p50"] > 0
    assert (tmp_path / "throughput.png").stat().st_size > 1000
    assert (tmp_path / "latency_cdf.png").stat().st_size > 1000
    assert "tok/s" in capsys.readouterr().out


def test_open_loop_at_a_request_rate(server, tmp_path):
    args = [
        "bench",
        "online",
        "--model",
        "granite",
        "--url",
        server.http,
        "--api-key",
        server.api_key,
        "--num-requests",
        "5",
        "--request-rate",
        "20",
        "--output-len",
        "3-3",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    level = json.loads((tmp_path / "online.json").read_text())["levels"][0]
    assert level["request_rate"] == 20 and level["errors"] == 0 and level["output_tokens"] == 15
