"""Every published config (tests/data/hub-configs), as a one-layer random checkpoint, served by
`moe-serve run` at EP = 2: its prompt logprobs match transformers' within 2e-3."""

from __future__ import annotations

import httpx
import pytest
import torch
import yaml

from tests.deploy.conftest import free_port
from tests.deploy.process import served
from tests.hub_checkpoints import NAMES

pytestmark = pytest.mark.slow
TOL = 2e-3


def _model(name: str, directory) -> dict:
    return {
        "name": name,
        "source": str(directory),
        "dtype": "float32",
        "device": "cpu",
        "expert_parallel_size": 2,
        "max_model_len": 64,
        "max_num_seqs": 2,
        "kv_cache_blocks": 16,
        "resources": {"replica_cpus": 0.25, "shard_cpus": 0.25},
    }


def _reference_prompt_logprobs(checkpoint) -> list[float]:
    logprobs = torch.log_softmax(checkpoint.reference_logits[:-1].double(), dim=-1)
    targets = torch.tensor(checkpoint.prompt_ids[1:])
    return logprobs.gather(1, targets[:, None])[:, 0].tolist()


def test_every_published_config_serves_at_ep2_like_transformers(hub_checkpoint, tmp_path):
    checkpoints = {name: hub_checkpoint(name) for name in NAMES}
    http_port, grpc_port = free_port(), free_port()
    config = tmp_path / "serve.yaml"
    models = [_model(name, c.directory) for name, c in checkpoints.items()]
    config.write_text(
        yaml.safe_dump({"http": {"port": http_port}, "grpc": {"port": grpc_port}, "models": models})
    )
    with served(config, timeout_s=600):
        for name, checkpoint in checkpoints.items():
            body = {
                "model": name,
                "prompt": checkpoint.prompt_ids,
                "max_tokens": 1,
                "echo": True,
                "logprobs": 0,
                "temperature": 0,
            }
            reply = httpx.post(
                f"http://127.0.0.1:{http_port}/v1/completions", json=body, timeout=120
            )
            assert reply.status_code == 200, reply.text
            got = reply.json()["choices"][0]["logprobs"]["token_logprobs"]
            assert got[0] is None  # NOTE: the first prompt token has no logprob
            want = _reference_prompt_logprobs(checkpoint)
            torch.testing.assert_close(
                torch.tensor(got[1 : len(want) + 1], dtype=torch.float64),
                torch.tensor(want, dtype=torch.float64),
                rtol=0,
                atol=TOL,
                msg=lambda m, name=name: f"{name}: {m}",
            )
