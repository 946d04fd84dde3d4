"""config.json -> normalized config: legacy and transformers-5 keys, unsupported values."""

from __future__ import annotations

import json

import pytest

from moe_serve.models.config import ConfigError, RopeConfig
from moe_serve.models.granitemoe import GraniteMoeForCausalLM
from moe_serve.models.jetmoe import JetMoeForCausalLM
from moe_serve.models.olmoe import OlmoeForCausalLM
from moe_serve.models.registry import load_config, model_class
from tests.helpers import write_hf_checkpoint

SMALL = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "eos_token_id": 2,
}


def test_legacy_and_transformers5_keys_agree():
    legacy = SMALL | {
        "rope_theta": 500.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "torch_dtype": "bfloat16",
        "num_attention_heads": 4,
    }
    modern = SMALL | {
        "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
        "dtype": "bfloat16",
        "num_attention_heads": 4,
    }
    for cls in (OlmoeForCausalLM, GraniteMoeForCausalLM):
        a, b = cls.config_from_hf(legacy), cls.config_from_hf(modern)
        assert a == b
        assert a.rope == RopeConfig(500.0, "linear", 2.0, a.max_position_embeddings)
        assert a.dtype == "bfloat16"


def test_saved_config_in_legacy_keys_loads_the_same(tmp_path):
    write_hf_checkpoint(
        "granitemoe",
        tmp_path,
        num_attention_heads=4,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 777.0},
    )
    modern = load_config(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    rope = hf.pop("rope_parameters")
    hf |= {
        "rope_theta": rope.pop("rope_theta"),
        "torch_dtype": hf.pop("dtype"),
        "rope_scaling": {"type": rope["rope_type"], "factor": rope["factor"]},
    }
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert load_config(tmp_path) == modern
    assert modern.rope.scaling_type == "dynamic" and modern.rope.theta == 777.0


def test_architecture_specific_fields():
    granite = GraniteMoeForCausalLM.config_from_hf(
        SMALL
        | {
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "embedding_multiplier": 12.0,
            "attention_multiplier": 0.015625,
            "residual_multiplier": 0.22,
            "logits_scaling": 6.0,
        }
    )
    assert (
        granite.embedding_multiplier,
        granite.scale,
        granite.residual_multiplier,
        granite.logits_scaling,
        granite.num_kv_heads,
    ) == (12.0, 0.015625, 0.22, 6.0, 2)
    jet = JetMoeForCausalLM.config_from_hf(
        SMALL
        | {
            "num_key_value_heads": 2,
            "kv_channels": 8,
            "num_experts_per_tok": 3,
            "num_local_experts": 5,
            "rms_norm_eps": 1e-5,
        }
    )
    assert (jet.num_heads, jet.head_dim, jet.num_attention_experts) == (6, 8, 5)
    assert (jet.layer_norm_eps, jet.rms_norm_eps, jet.tie_word_embeddings) == (1e-6, 1e-5, True)
    olmoe = OlmoeForCausalLM.config_from_hf(
        SMALL | {"num_attention_heads": 4, "clip_qkv": 8.0, "norm_topk_prob": True}
    )
    assert (olmoe.clip_qkv, olmoe.norm_topk_prob, olmoe.is_qk_norm) == (8.0, True, True)
    assert olmoe.scale == pytest.approx(8**-0.5)


def test_eos_ids_merge_config_and_generation_config():
    config = OlmoeForCausalLM.config_from_hf(
        SMALL | {"num_attention_heads": 4}, {"eos_token_id": [2, 7]}
    )
    assert config.eos_token_ids == (2, 7)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
        ({"rope_parameters": {"rope_type": "linear"}}, "needs a 'factor'"),
        (
            {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
            "partial_rotary_factor",
        ),
        ({"hidden_act": "tanh"}, "hidden_act 'tanh'"),
        ({"sliding_window": 128}, "sliding_window"),
        ({"num_experts_per_tok": 9, "num_experts": 8}, "exceeds the number of experts"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"torch_dtype": "float8_e4m3fn"}, "float8_e4m3fn"),
        ({"eos_token_id": 64}, "outside the vocabulary"),
        ({"clip_qkv": -1.0}, "clip_qkv"),
    ],
)
def test_unsupported_values_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        OlmoeForCausalLM.config_from_hf(SMALL | {"num_attention_heads": 4} | overrides)


def test_unknown_architecture_is_rejected():
    with pytest.raises(ConfigError, match="MixtralForCausalLM"):
        model_class({"architectures": ["MixtralForCausalLM"]})
    with pytest.raises(ConfigError, match="'mixtral' is not supported"):
        model_class({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]})


def test_checkpoints_map_by_model_type_with_a_case_blind_cross_check():
    assert model_class({"model_type": "jetmoe", "architectures": ["JetMoEForCausalLM"]}) is (
        JetMoeForCausalLM
    )
    assert model_class({"model_type": "olmoe"}) is OlmoeForCausalLM
    assert model_class({"architectures": ["GRANITEMOEFORCAUSALLM"]}) is GraniteMoeForCausalLM
    with pytest.raises(ConfigError, match="do not match model_type 'olmoe'"):
        model_class({"model_type": "olmoe", "architectures": ["GraniteMoeForCausalLM"]})


JETMOE_MODERN = {
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "intermediate_size": 24,
    "max_position_embeddings": 64,
    "num_hidden_layers": 3,
    "rms_norm_eps": 1e-5,
}
JETMOE_LEGACY = {
    "moe_num_experts": 4,
    "moe_top_k": 2,
    "ffn_hidden_size": 24,
    "n_positions": 64,
    "num_layers": 3,
    "layer_norm_epsilon": 1e-5,
    "glu": True,
    "rotary_percent": 1.0,
}


def test_jetmoe_legacy_keys_read_like_the_transformers_ones():
    base = {"vocab_size": 64, "hidden_size": 32, "kv_channels": 8, "num_key_value_heads": 2}
    modern = JetMoeForCausalLM.config_from_hf(base | JETMOE_MODERN)
    assert JetMoeForCausalLM.config_from_hf(base | JETMOE_LEGACY) == modern
    assert JetMoeForCausalLM.config_from_hf(base | JETMOE_MODERN | JETMOE_LEGACY) == modern
    assert (modern.num_experts, modern.num_layers, modern.max_position_embeddings) == (4, 3, 64)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"moe_num_experts": 8}, "num_local_experts=4 and moe_num_experts=8 disagree"),
        ({"num_layers": 2}, "num_hidden_layers=3 and num_layers=2 disagree"),
        ({"glu": False}, "glu=False is not supported"),
        ({"rotary_percent": 0.5}, "rotary_percent=0.5 is not supported"),
        ({"num_attention_heads": 6}, r"num_attention_heads \(6\) must be"),
    ],
)
def test_jetmoe_keys_that_change_inference_are_checked(overrides, message):
    hf = {"vocab_size": 64, "hidden_size": 32, "kv_channels": 8, "num_key_value_heads": 2}
    with pytest.raises(ConfigError, match=message):
        JetMoeForCausalLM.config_from_hf(hf | JETMOE_MODERN | overrides)


def test_every_supported_activation_is_implemented():
    from moe_serve.models.config import SUPPORTED_ACTIVATIONS
    from moe_serve.models.layers import ACTIVATIONS

    assert set(SUPPORTED_ACTIVATIONS) == set(ACTIVATIONS)
