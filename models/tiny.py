"""Deterministic small checkpoints in the hub's on-disk format (`moe-serve tiny`).

Writes config.json (the hub's legacy keys: `rope_theta`, `torch_dtype`), generation_config.json,
model.safetensors with each architecture's hub tensor names, and a byte-level BPE tokenizer
with a chat template. transformers loads the result with no missing or unexpected keys.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ARCHS = ("olmoe", "jetmoe", "granitemoe")
TOKENIZER_VOCAB = 512  # NOTE: a larger model vocabulary is padding, as in real checkpoints
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (  # NOTE: tools and tool messages rendered as JSON, as instruct templates do
    "{% if tools %}<|system|>\nTools: {{ tools | tojson }}<|end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['tool_calls'] is defined %}{{ message['tool_calls'] | tojson }}{% endif %}"
    "<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = """Mixture-of-experts language models route every token to a few experts.
The router picks the top experts; the experts run on shards; the results come back.
Serving many requests at once needs continuous batching and a paged key-value cache.
Hello, world! How are you today? I am fine, thank you. What is the weather like?
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < >
Café, naïve, jalapeño, über, façade; 東京, 北京, 서울; Привет мир; مرحبا; 🙂 🚀 ✨ ∑ ∞ ≈
"""


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a generated checkpoint; the defaults are the demo's tiny models."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    max_position_embeddings: int = 2048
    dtype: str = "float32"


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on a fixed corpus: any UTF-8 text encodes, output is stable."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([CORPUS] * 4, trainer=trainer)
    return tokenizer


def _attention(prefix: str, hidden: int, kv: int) -> dict[str, tuple[int, ...]]:
    """q/k/v/o projections of grouped-query attention (OLMoE, Granite)."""
    return {
        prefix + "q_proj.weight": (hidden, hidden),
        prefix + "k_proj.weight": (kv, hidden),
        prefix + "v_proj.weight": (kv, hidden),
        prefix + "o_proj.weight": (hidden, hidden),
    }


def _olmoe(spec: TinySpec, config: dict[str, Any]):
    config |= {
        "model_type": "olmoe",
        "architectures": ["OlmoeForCausalLM"],
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "hidden_act": "silu",
        "num_experts": spec.num_experts,
        "clip_qkv": None,
        "norm_topk_prob": False,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    head_dim = spec.hidden_size // spec.num_heads
    h, i, kv = spec.hidden_size, spec.intermediate_size, spec.num_kv_heads * head_dim
    shapes = {"lm_head.weight": (spec.vocab_size, h)}
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        shapes |= _attention(p + "self_attn.", h, kv) | {
            p + "self_attn.q_norm.weight": (h,),
            p + "self_attn.k_norm.weight": (kv,),
            p + "mlp.gate.weight": (spec.num_experts, h),
        }
        for e in range(spec.num_experts):
            shapes |= {
                p + f"mlp.experts.{e}.gate_proj.weight": (i, h),
                p + f"mlp.experts.{e}.up_proj.weight": (i, h),
                p + f"mlp.experts.{e}.down_proj.weight": (h, i),
            }
    return shapes


def _granitemoe(spec: TinySpec, config: dict[str, Any]):
    config |= {
        "model_type": "granitemoe",
        "architectures": ["GraniteMoeForCausalLM"],
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "hidden_act": "silu",
        "num_local_experts": spec.num_experts,
        "embedding_multiplier": 2.0,
        "attention_multiplier": 0.25,
        "residual_multiplier": 0.5,
        "logits_scaling": 2.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    }
    head_dim = spec.hidden_size // spec.num_heads
    h, i, kv, e = (
        spec.hidden_size,
        spec.intermediate_size,
        spec.num_kv_heads * head_dim,
        spec.num_experts,
    )
    shapes = {}
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        shapes |= _attention(p + "self_attn.", h, kv) | {
            p + "block_sparse_moe.router.layer.weight": (e, h),
            p + "block_sparse_moe.input_linear.weight": (e, 2 * i, h),
            p + "block_sparse_moe.output_linear.weight": (e, h, i),
        }
    return shapes


def _jetmoe(spec: TinySpec, config: dict[str, Any]):
    head_dim = spec.hidden_size // spec.num_heads
    config |= {
        "model_type": "jetmoe",
        "architectures": ["JetMoeForCausalLM"],
        "num_key_value_heads": spec.num_kv_heads,
        "kv_channels": head_dim,
        "activation_function": "silu",
        "num_local_experts": spec.num_experts,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    }
    h, i, e = spec.hidden_size, spec.intermediate_size, spec.num_experts
    kv = spec.num_kv_heads * head_dim
    shapes = {}
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        a = p + "self_attention."
        shapes |= {
            a + "kv_proj.weight": (2 * kv, h),
            a + "experts.router.layer.weight": (e, h),
            a + "experts.input_linear.weight": (e, kv, h),
            a + "experts.output_linear.weight": (e, h, kv),
            a + "experts.bias": (h,),
            p + "mlp.router.layer.weight": (e, h),
            p + "mlp.bias": (h,),
            p + "mlp.input_linear.weight": (e, 2 * i, h),
            p + "mlp.output_linear.weight": (e, h, i),
        }
    return shapes


LAYOUTS: dict[str, Callable[[TinySpec, dict[str, Any]], dict[str, tuple[int, ...]]]] = {
    "olmoe": _olmoe,
    "jetmoe": _jetmoe,
    "granitemoe": _granitemoe,
}


def _common_shapes(spec: TinySpec) -> dict[str, tuple[int, ...]]:
    shapes = {
        "model.embed_tokens.weight": (spec.vocab_size, spec.hidden_size),
        "model.norm.weight": (spec.hidden_size,),
    }
    for n in range(spec.num_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"model.layers.{n}.{norm}.weight"] = (spec.hidden_size,)
    return shapes


def _init(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if key.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if key.endswith("bias"):
        return 0.1 * torch.randn(shape, generator=generator)
    std = 1.0 if "embed_tokens" in key else shape[-1] ** -0.5
    return std * torch.randn(shape, generator=generator)


def write_tokenizer(out: Path, vocab_size: int, max_length: int) -> Tokenizer:
    """The tiny byte-level BPE tokenizer (at most `vocab_size` ids) and its config, in `out`."""
    tokenizer = build_tokenizer(min(vocab_size, TOKENIZER_VOCAB))
    if vocab_size < tokenizer.get_vocab_size():
        raise ValueError(
            f"vocab_size must be at least {tokenizer.get_vocab_size()} (the "
            f"tokenizer's), got {vocab_size}"
        )
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return tokenizer


def write_tiny(arch: str, out: str | Path, seed: int = 0, spec: TinySpec | None = None) -> Path:
    """Write a deterministic random checkpoint of `arch` to `out`; returns the directory."""
    if arch not in LAYOUTS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = spec or TinySpec()
    tokenizer = write_tokenizer(out, spec.vocab_size, spec.max_position_embeddings)
    eos, pad = tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|pad|>")
    config: dict[str, Any] = {
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_experts_per_tok": spec.top_k,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": spec.dtype,
        "use_cache": True,
    }
    shapes = _common_shapes(spec) | LAYOUTS[arch](spec, config)
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, spec.dtype)
    tensors = {k: _init(k, shapes[k], generator).to(dtype).contiguous() for k in sorted(shapes)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
    generation = {
        "bos_token_id": eos,
        "eos_token_id": [eos, tokenizer.token_to_id("<|end|>")],
        "pad_token_id": pad,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "moe_serve_tiny.json").write_text(
        json.dumps({"arch": arch, "seed": seed, "spec": asdict(spec)}, indent=2) + "\n"
    )
    return out
