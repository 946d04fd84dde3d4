"""The published config.json files (tests/data/hub-configs) as checkpoints users would load:
full width, depth cut to one layer, random weights in the hub layout written by transformers'
`save_pretrained`, the published config.json beside them, and transformers' own logits."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moe_serve.models.tiny import write_tokenizer

HUB_CONFIGS = Path(__file__).parent / "data" / "hub-configs"
# NOTE: named, not globbed: a file that goes missing must fail, never shrink the test set.
NAMES = (
    "allenai__OLMoE-1B-7B-0924",
    "allenai__OLMoE-1B-7B-0125",
    "ibm-granite__granite-3.0-1b-a400m-base",
    "ibm-granite__granite-3.0-3b-a800m-instruct",
    "ibm-granite__granite-3.1-1b-a400m-instruct",
    "ibm-granite__granite-3.1-3b-a800m-instruct",
    "jetmoe__jetmoe-8b",
)
# These repositories store an lm_head.weight although tie_word_embeddings is true.
STORED_TIED_LM_HEAD = (
    "ibm-granite__granite-3.0-1b-a400m-base",
    "ibm-granite__granite-3.0-3b-a800m-instruct",
)
DEPTH_KEYS = ("num_hidden_layers", "num_layers")  # JetMoE-8B carries both
PROMPT_LEN = 12
STD = 0.02


@dataclass(frozen=True)
class HubCheckpoint:
    directory: Path
    prompt_ids: list[int]
    reference_logits: torch.Tensor  # transformers, float32, [PROMPT_LEN, V]


def published(name: str) -> dict[str, Any]:
    return json.loads((HUB_CONFIGS / f"{name}.json").read_text())


def one_layer(hf: dict[str, Any]) -> dict[str, Any]:
    return hf | {key: 1 for key in DEPTH_KEYS if key in hf}


def _stored_dtype(hf: dict[str, Any]) -> torch.dtype:
    # NOTE: a config without a dtype (granite-3.0-1b base) is stored as bf16, like the hub repo.
    return getattr(torch, hf.get("torch_dtype") or "bfloat16")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else STD * noise)


def _add_stored_lm_head(directory: Path, hf: dict[str, Any], seed: int) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(seed + 1)
    shape = (hf["vocab_size"], hf["hidden_size"])
    lm_head = STD * torch.randn(shape, generator=generator)
    tensors["lm_head.weight"] = lm_head.to(_stored_dtype(hf))
    save_file(tensors, path, metadata={"format": "pt"})


def write_hub_checkpoint(name: str, out: Path, seed: int = 0) -> HubCheckpoint:
    """Write `name` as a one-layer random checkpoint in `out`; transformers' logits of a
    random prompt, read back from those files as a user of transformers would."""
    import transformers

    hf = one_layer(published(name))
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(hf))
    config = transformers.AutoConfig.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    model.to(_stored_dtype(hf)).save_pretrained(out)
    del model
    (out / "config.json").write_text(json.dumps(hf, indent=2))  # the published one, not HF's
    if name in STORED_TIED_LM_HEAD:
        _add_stored_lm_head(out, hf, seed)
    write_tokenizer(out, hf["vocab_size"], 512)
    prompt_ids = torch.randint(
        3, hf["vocab_size"], (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)
    ).tolist()
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        logits = reference(torch.tensor([prompt_ids])).logits[0].float()
    return HubCheckpoint(out, prompt_ids, logits)
