"""Bad values fail `helm template` (so `helm install`) with a message naming the field, and the
chart's model schema stays the serving config's (deploy/config.py)."""

from __future__ import annotations

import json

import pytest
import yaml

from moe_serve.deploy.config import (
    AutoscalingConfig,
    EplbSettings,
    MetricsConfig,
    OverlapSettings,
    ResourcesConfig,
    ServedModelConfig,
)
from moe_serve.deploy.limits import LimitsConfig
from tests.helm.helm_tool import CHART, render_error

MODEL = {"name": "m", "source": "allenai/OLMoE-1B-7B-0924", "device": "cuda"}


def _models(*overrides: dict) -> dict:
    return {"serve": {"models": [{**MODEL, **o} for o in overrides]}}


SCHEMA_ERRORS = {
    "unknown model key": (_models({"expert_parallel": 2}), ["/serve/models/0", "expert_parallel"]),
    "expert_parallel_size 0": (
        _models({"expert_parallel_size": 0}),
        ["/serve/models/0/expert_parallel_size", "minimum"],
    ),
    "missing source": (
        {"serve": {"models": [{"name": "m"}]}},
        ["/serve/models/0", "missing property 'source'"],
    ),
    "unknown dtype": (_models({"dtype": "fp8"}), ["/serve/models/0/dtype"]),
    "unknown autoscaling key": (
        _models({"autoscaling": {"max_replica": 2}}),
        ["/serve/models/0/autoscaling", "max_replica"],
    ),
    "no models": ({"serve": {"models": []}}, ["/serve/models"]),
    "api key in plain text": ({"serve": {"api_key": "s3cret-key"}}, ["/serve", "api_key"]),
    "unknown top-level key": ({"workers": {"gpus": 2}}, ["workers"]),
    "negative gpus": ({"worker": {"gpus": -1}}, ["/worker/gpus"]),
    "decimal cpu quantity": (
        {"head": {"resources": {"requests": {"cpu": 0.5}}}},
        ["/head/resources/requests/cpu"],
    ),
    "rayStartParams value not a scalar": (
        {"head": {"rayStartParams": {"num-cpus": {"n": 1}}}},
        ["/head/rayStartParams/num-cpus"],
    ),
    "unknown service type": ({"service": {"type": "Ingress"}}, ["/service/type"]),
    "unknown limit": ({"serve": {"limits": {"max_stops": 2}}}, ["/serve/limits", "max_stops"]),
}

TEMPLATE_ERRORS = {
    "duplicate model names": (_models({}, {"source": "other"}), ['"m" is used twice']),
    "cuda without GPUs": ({"worker": {"gpus": 0}}, ["device cuda needs GPU workers"]),
    "device auto on GPU workers": (_models({"device": "auto"}), ["serve.models[m]: set device"]),
    "gang larger than a pod": (
        _models({"expert_parallel_size": 4}),
        ["serve.models[m]", "gang of 5 GPUs (expert_parallel_size + 1)", "worker.gpus is 4"],
    ),
    "autoscaling bounds": (
        _models({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}),
        ["min_replicas (3) exceeds max_replicas (2)"],
    ),
    "worker replica bounds": (
        {"worker": {"minReplicas": 2, "replicas": 1}},
        ["minReplicas (2) <= replicas (1)"],
    ),
    "same port twice": ({"serve": {"grpcPort": 8000}}, ["httpPort and grpcPort must differ"]),
}


@pytest.mark.parametrize("case", sorted({**SCHEMA_ERRORS, **TEMPLATE_ERRORS}))
def test_bad_values_are_rejected(helm, tmp_path, case):
    values, expected = {**SCHEMA_ERRORS, **TEMPLATE_ERRORS}[case]
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    message = render_error(values=[path])
    if case in SCHEMA_ERRORS:
        assert "don't meet the specifications of the schema" in message
    for fragment in expected:
        assert fragment in message, message


CONSTRAINT_KEYS = (
    "type",
    "enum",
    "pattern",
    "minLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
)


def _constraints(prop: dict) -> list[dict]:
    return [
        {key: variant[key] for key in CONSTRAINT_KEYS if key in variant}
        for variant in prop.get("anyOf", [prop])
    ]


@pytest.mark.parametrize(
    ("config_class", "definition", "path"),
    [
        (ServedModelConfig, "model", ()),
        (AutoscalingConfig, "model", ("autoscaling",)),
        (ResourcesConfig, "model", ("resources",)),
        (EplbSettings, "model", ("eplb",)),
        (OverlapSettings, "model", ("overlap",)),
        (LimitsConfig, "limits", ()),
        (MetricsConfig, "metrics", ()),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_model_schema_matches_serving_config(config_class, definition, path):
    chart = json.loads((CHART / "values.schema.json").read_text())["definitions"][definition]
    for key in path:
        chart = chart["properties"][key]
    assert chart["additionalProperties"] is False
    ours = config_class.model_json_schema()
    assert set(chart["properties"]) == set(ours["properties"])
    assert set(chart.get("required", [])) == set(ours.get("required", []))
    for name, prop in ours["properties"].items():
        if "$ref" in prop:
            continue  # a nested config: compared on its own
        assert _constraints(chart["properties"][name]) == _constraints(prop), name
