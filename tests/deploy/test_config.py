"""The serving config file: defaults, strictness (unknown keys name key and file), mapping; the
checks every model passes before anything is deployed; where Ray runs."""

from __future__ import annotations

import json
import shutil
import socket

import pytest

from moe_serve.deploy.cli import ray_address
from moe_serve.deploy.config import (
    API_KEY_ENV,
    ConfigFileError,
    api_key_from_environment,
    load_serve_config,
    parse_serve_config,
)
from moe_serve.deploy.validate import ModelCheckError, check_address, check_models

MINIMAL = """
models:
  - name: olmoe
    source: allenai/OLMoE-1B-7B-0924
"""


def write(tmp_path, text):
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    return path


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    config = load_serve_config(write(tmp_path, MINIMAL))
    assert (config.http.host, config.http.port, config.grpc.port) == ("127.0.0.1", 8000, 9000)
    model = config.models[0]
    assert (model.dtype, model.device, model.expert_parallel_size) == ("auto", "auto", 1)
    assert (model.autoscaling.min_replicas, model.autoscaling.max_replicas) == (1, 1)
    assert config.api_key is None and api_key_from_environment() is None
    assert config.grpc.max_message_bytes == 4 << 20 and not config.metrics.require_api_key
    assert (config.limits.max_stop_strings, config.limits.max_stop_token_ids) == (16, 64)
    assert (model.max_rebuild_failures, model.rebuild_backoff_s) == (3, 2.0)
    monkeypatch.setenv(API_KEY_ENV, "from-the-environment")
    assert api_key_from_environment() == "from-the-environment"


def test_unknown_keys_are_errors_naming_the_key_and_file(tmp_path):
    path = write(tmp_path, MINIMAL + "    expert_paralel_size: 2\n")
    with pytest.raises(ConfigFileError) as error:
        load_serve_config(path)
    assert f"{path}: models.0.expert_paralel_size: unknown key" in str(error.value)
    with pytest.raises(ConfigFileError, match=r"autoscaling\.max_replica: unknown key"):
        load_serve_config(write(tmp_path, MINIMAL + "    autoscaling: {max_replica: 3}\n"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("    expert_parallel_size: 0\n", "expert_parallel_size: Input should be greater"),
        ("    autoscaling: {min_replicas: 3, max_replicas: 2}\n", "exceeds max_replicas"),
        ("    dtype: float64\n", "models.0.dtype"),
        ("    kv_cache_blocks: 10\n    kv_cache_memory_gb: 1\n", "not both"),
        ("  - name: olmoe\n    source: x\n", "unique"),
        ("    name: bad name\n", None),
        ("    autoscaling: {max_replicas: 2, initial_replicas: 3}\n", r"initial_replicas \(3\)"),
        ("  - name: a.b\n    source: x\n  - name: a-b\n    source: x\n", "deployment names"),
    ],
)
def test_invalid_values(tmp_path, extra, message):
    with pytest.raises(ConfigFileError, match=message):
        load_serve_config(write(tmp_path, MINIMAL + extra))


def test_file_and_yaml_errors(tmp_path):
    with pytest.raises(ConfigFileError, match="no such config file"):
        load_serve_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigFileError, match="not valid YAML"):
        load_serve_config(write(tmp_path, "models: [\n"))
    with pytest.raises(ConfigFileError, match="models: Field required"):
        parse_serve_config({"http": {"port": 8000}})


def test_replica_config_mapping():
    config = parse_serve_config(
        {
            "models": [
                {
                    "name": "m",
                    "source": "tiny:olmoe",
                    "dtype": "bfloat16",
                    "expert_parallel_size": 3,
                    "max_model_len": 1024,
                    "kv_cache_memory_gb": 0.5,
                    "placement": "round_robin",
                    "attention_backend": "sdpa",
                    "eplb": {"mode": "periodic", "window_steps": 50},
                    "overlap": {"mode": "on", "min_tokens": 32},
                }
            ]
        }
    )
    replica = config.models[0].replica_config("/ckpt")
    assert (replica.checkpoint, replica.dtype, replica.expert_parallel_size) == (
        "/ckpt",
        "bfloat16",
        3,
    )
    assert replica.placement == "round_robin" and replica.engine.max_model_len == 1024
    assert replica.engine.kv_cache_bytes == 1 << 29
    assert replica.engine.attention_backend == "sdpa"
    assert (replica.eplb.mode, replica.eplb.window_steps) == ("periodic", 50)
    assert replica.eplb.num_redundant_experts is None  # one copy per shard, by the default
    assert (replica.overlap.mode, replica.overlap.min_tokens) == ("on", 32)
    with pytest.raises(ConfigFileError, match="eplb balances expert shards"):
        parse_serve_config(
            {"models": [{"name": "m", "source": "tiny:olmoe", "eplb": {"mode": "static"}}]}
        )


def test_the_application_never_carries_the_api_key(tiny_dirs, monkeypatch):
    from ray import cloudpickle

    from moe_serve.deploy.app import build_app

    models = [{"name": "m", "source": str(tiny_dirs["olmoe"])}]
    with pytest.raises(ConfigFileError, match=r"api_key: refused.*\$MOE_SERVE_API_KEY"):
        build_app({"api_key": "in-the-args-0123", "models": models})
    monkeypatch.setenv(API_KEY_ENV, "from-the-environment")
    app = build_app({"models": models})
    # NOTE: everything Serve is given: every deployment's options (runtime_env...) and args
    assert b"from-the-environment" not in cloudpickle.dumps(app)


def _checkpoint(tiny_dirs, tmp_path, name: str, **changes) -> str:
    """A copy of the tiny OLMoE checkpoint with config.json keys changed."""
    directory = tmp_path / name
    shutil.copytree(tiny_dirs["olmoe"], directory)
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    return str(directory)


def test_model_checks_report_every_problem_in_one_line_each(tiny_dirs, tmp_path):
    good = str(tiny_dirs["olmoe"])
    no_tokenizer = _checkpoint(tiny_dirs, tmp_path, "no-tokenizer")
    (tmp_path / "no-tokenizer" / "tokenizer.json").unlink()
    models = [
        {"name": "ok", "source": good, "expert_parallel_size": 8},
        {"name": "foo", "source": _checkpoint(tiny_dirs, tmp_path, "foo", model_type="foo")},
        {"name": "gone", "source": str(tmp_path / "absent")},
        {"name": "wide", "source": good, "expert_parallel_size": 100},
        {"name": "empty", "source": str(tmp_path)},
        {"name": "no-tok", "source": no_tokenizer},
    ]
    problems = check_models(parse_serve_config({"models": models}))
    foo_config = tmp_path / "foo" / "config.json"
    assert problems[0].startswith(f"model 'foo': {foo_config}: model_type 'foo'")
    assert problems[1].startswith(f"model 'gone': model source '{tmp_path / 'absent'}'")
    assert problems[2] == (
        "model 'wide': expert_parallel_size 100 exceeds the model's 8 experts "
        f"({tiny_dirs['olmoe'] / 'config.json'}: num_experts)"
    )
    assert problems[3] == f"model 'empty': {tmp_path}: no config.json (not a checkpoint directory)"
    assert problems[4] == f"model 'no-tok': {no_tokenizer}: no tokenizer.json"
    assert len(problems) == 5 and all("\n" not in p for p in problems)


def test_gpu_needs_are_checked_only_against_a_local_machine(tiny_dirs):
    model = {"name": "g", "source": str(tiny_dirs["olmoe"]), "device": "cuda"}
    config = parse_serve_config({"models": [model | {"expert_parallel_size": 2}]})
    assert check_models(config) == []  # NOTE: a joined cluster's GPUs are elsewhere
    assert check_models(config, local_gpus=3) == []
    (problem,) = check_models(config, local_gpus=2)
    assert problem.startswith("model 'g': device cuda with expert_parallel_size 2 needs 3 GPUs")
    assert check_models(parse_serve_config({"models": [model]}), local_gpus=1) == []


def test_the_application_builder_refuses_models_that_fail_the_checks(tiny_dirs, tmp_path):
    from moe_serve.deploy.app import build_app

    models = [
        {"name": "wide", "source": str(tiny_dirs["olmoe"]), "expert_parallel_size": 9},
        {"name": "gone", "source": str(tmp_path / "absent")},
    ]
    with pytest.raises(ModelCheckError) as error:
        build_app({"models": models})
    assert [line.split(":")[0] for line in str(error.value).splitlines()] == [
        "model 'wide'",
        "model 'gone'",
    ]


def test_ray_address_flag_then_environment_else_a_private_instance(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(None) is None
    assert ray_address("10.0.0.1:6379") == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert ray_address(None) == "10.0.0.2:6379"
    assert ray_address("10.0.0.1:6379") == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert ray_address(None) is None


def test_a_cluster_address_must_answer():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        assert check_address(address) == []
    (problem,) = check_address(address)
    assert problem.startswith(f"no Ray cluster answers at {address}")
    assert check_address("ray://head:10001") == check_address("auto") == []


def test_a_config_file_api_key_cannot_go_to_a_joined_cluster(tiny_dirs, tmp_path, capsys):
    from moe_serve.deploy.cli import main

    models = [{"name": "m", "source": str(tiny_dirs["olmoe"])}]
    path = tmp_path / "serve.yaml"
    path.write_text(json.dumps({"api_key": "0123456789abcdef", "models": models}))
    with socket.socket() as listener:  # NOTE: something answers at the address
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        assert main(["run", "--config", str(path), "--address", address]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"moe-serve: {path}: api_key: a joined cluster's gateway cannot")
    assert "$MOE_SERVE_API_KEY in the environment of the cluster's Ray nodes" in line
