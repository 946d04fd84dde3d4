"""The serving config file: defaults, strictness (unknown keys name key and file), mapping."""

from __future__ import annotations

import pytest

from deploy.config import API_KEY_ENV, ConfigFileError, load_config, parse_config

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
    config = load_config(write(tmp_path, MINIMAL))
    assert (config.http.host, config.http.port, config.grpc.port) == ("127.0.0.1", 8000, 9000)
    model = config.models[0]
    assert (model.dtype, model.device, model.expert_parallel_size) == ("auto", "auto", 1)
    assert (model.autoscaling.min_replicas, model.autoscaling.max_replicas) == (1, 1)
    assert config.resolved_api_key() is None
    monkeypatch.setenv(API_KEY_ENV, "from-the-environment")
    assert config.resolved_api_key() == "from-the-environment"


def test_unknown_keys_are_errors_naming_the_key_and_file(tmp_path):
    path = write(tmp_path, MINIMAL + "    expert_paralel_size: 2\n")
    with pytest.raises(ConfigFileError) as error:
        load_config(path)
    assert f"{path}: models.0.expert_paralel_size: unknown key" in str(error.value)
    with pytest.raises(ConfigFileError, match=r"autoscaling\.max_replica: unknown key"):
        load_config(write(tmp_path, MINIMAL + "    autoscaling: {max_replica: 3}\n"))


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
        load_config(write(tmp_path, MINIMAL + extra))


def test_file_and_yaml_errors(tmp_path):
    with pytest.raises(ConfigFileError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigFileError, match="not valid YAML"):
        load_config(write(tmp_path, "models: [\n"))
    with pytest.raises(ConfigFileError, match="models: Field required"):
        parse_config({"http": {"port": 8000}})


def test_replica_config_mapping():
    config = parse_config(
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


def test_the_builders_api_key_reaches_the_gateway(monkeypatch):
    from deploy.app import _gateway

    config = parse_config({"models": [{"name": "m", "source": "x"}]})
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert "runtime_env" not in _gateway(config).ray_actor_options
    monkeypatch.setenv(API_KEY_ENV, "from-the-environment")
    options = _gateway(config).ray_actor_options
    assert options["runtime_env"]["env_vars"] == {API_KEY_ENV: "from-the-environment"}
    assert options["num_cpus"] == 0
