"""Session-wide fixtures: tiny checkpoints of every architecture, one local Ray instance."""

from __future__ import annotations

import shutil

import pytest
import torch

from moe_serve.models.tiny import ARCHS, write_tiny


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where the device-aware tests run models and shards (default cpu; cuda: the "
        "CUDA and NCCL paths, see docs/gpu.md)",
    )


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device of the device-aware tests (`--device`); cuda without a GPU is an error."""
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: torch sees no CUDA device here")
    return torch.device(name)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """arch -> directory of a deterministic tiny checkpoint (hub format)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny(arch, root / arch, seed=1) for arch in ARCHS}


# NOTE: the deploy tests' gateway reads its API key from the environment of its own process, as
# in production; the Ray processes inherit it from this one's when the instance starts
GATEWAY_API_KEY = "test-key-0123456789"


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole session (logical CPUs: shards ask for fractions),
    with Serve's ingress set up as `moe-serve run` sets up its own (deploy/ingress.py)."""
    import ray

    from moe_serve.deploy.config import API_KEY_ENV
    from moe_serve.deploy.ingress import instance_dir, private_instance_env

    files = instance_dir()
    env = {API_KEY_ENV: GATEWAY_API_KEY} | private_instance_env(files)
    # NOTE: only Ray's processes keep it (`moe-serve run` subprocesses must not)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        ray.init(
            address="local",
            num_cpus=16,
            include_dashboard=False,
            logging_level="warning",
            configure_logging=False,
        )
    yield ray
    ray.shutdown()
    shutil.rmtree(files, ignore_errors=True)


@pytest.fixture(scope="session")
def hub_checkpoint(tmp_path_factory):
    """name -> the published config `name` as a one-layer random checkpoint with transformers'
    reference logits (tests/hub_checkpoints.py), written once per session."""
    from tests.hub_checkpoints import write_hub_checkpoint

    root = tmp_path_factory.mktemp("hub")
    written = {}

    def get(name: str):
        if name not in written:
            written[name] = write_hub_checkpoint(name, root / name)
        return written[name]

    return get
