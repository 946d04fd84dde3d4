"""Every published config.json (tests/data/hub-configs) loads as users load it, and a one-layer
full-width checkpoint of it matches transformers' logits (float32, 1e-4)."""

from __future__ import annotations

import shutil

import pytest
import torch

from moe_serve.models.registry import load_config, load_model
from tests.helpers import PagedRunner
from tests.hub_checkpoints import HUB_CONFIGS, NAMES

TOL = 1e-4
# What each repository's model card and weights say (layers, experts, top-k, expert width,
# context, stored dtype), written out by hand: the expectation does not come from the loader.
PUBLISHED = {
    "allenai__OLMoE-1B-7B-0924": (16, 64, 8, 1024, 4096, "bfloat16"),
    "allenai__OLMoE-1B-7B-0125": (16, 64, 8, 1024, 4096, "float32"),
    "ibm-granite__granite-3.0-1b-a400m-base": (24, 32, 8, 512, 4096, "float32"),
    "ibm-granite__granite-3.0-3b-a800m-instruct": (32, 40, 8, 512, 4096, "bfloat16"),
    "ibm-granite__granite-3.1-1b-a400m-instruct": (24, 32, 8, 512, 131072, "bfloat16"),
    "ibm-granite__granite-3.1-3b-a800m-instruct": (32, 40, 8, 512, 131072, "bfloat16"),
    "jetmoe__jetmoe-8b": (24, 8, 2, 5632, 4096, "float32"),
}


def test_every_published_file_is_tested():
    assert sorted(p.stem for p in HUB_CONFIGS.glob("*.json")) == sorted(NAMES) == sorted(PUBLISHED)


@pytest.mark.parametrize("name", NAMES)
def test_published_config_loads(name, tmp_path):
    shutil.copy(HUB_CONFIGS / f"{name}.json", tmp_path / "config.json")
    config = load_config(tmp_path)  # NOTE: no weights: a config without a dtype reads float32
    got = (
        config.num_layers,
        config.num_experts,
        config.num_experts_per_tok,
        config.intermediate_size,
        config.max_position_embeddings,
        config.dtype,
    )
    assert got == PUBLISHED[name]


@pytest.mark.parametrize("name", NAMES)
def test_one_layer_checkpoint_matches_transformers(name, hub_checkpoint):
    checkpoint = hub_checkpoint(name)
    model = load_model(checkpoint.directory, dtype="float32")
    ours = PagedRunner(model).step({"a": checkpoint.prompt_ids})["a"]
    reference = checkpoint.reference_logits
    assert ours.shape == reference.shape
    assert reference.std() > 0.1  # NOTE: random weights that actually move the logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=TOL)


def test_a_config_without_dtype_takes_the_stored_one(hub_checkpoint):
    # granite-3.0-1b-a400m-base names no torch_dtype; its weights are bf16 (transformers'
    # dtype="auto" loads bf16 too).
    checkpoint = hub_checkpoint("ibm-granite__granite-3.0-1b-a400m-base")
    assert load_config(checkpoint.directory).dtype == "bfloat16"
