"""The strict loader: sharded checkpoints, expert subsets read alone, and each error case."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_serve.models.loader as loader
from moe_serve.models.loader import WeightLoadError
from moe_serve.models.registry import load_model
from tests.helpers import PagedRunner, write_hf_checkpoint

PROMPT = [3, 14, 15, 92, 65, 35]
OVERRIDES = {
    "olmoe": dict(num_attention_heads=4, num_experts=6, num_experts_per_tok=2),
    "jetmoe": dict(
        num_local_experts=6, num_experts_per_tok=2, kv_channels=8, num_key_value_heads=2
    ),
    "granitemoe": dict(num_attention_heads=4, num_local_experts=6, num_experts_per_tok=2),
}


@pytest.fixture(scope="module", params=sorted(OVERRIDES))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    write_hf_checkpoint(request.param, path, **OVERRIDES[request.param])
    return request.param, path


def _rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_sharded_index_loads_like_single_file(checkpoint, tmp_path):
    arch, path = checkpoint
    sharded = tmp_path / "sharded"
    write_hf_checkpoint(arch, sharded, max_shard_size="20KB", **OVERRIDES[arch])
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (sharded / "model.safetensors").exists()
    single, split = PagedRunner(load_model(path)), PagedRunner(load_model(sharded))
    torch.testing.assert_close(
        split.step({"a": PROMPT})["a"], single.step({"a": PROMPT})["a"], atol=0, rtol=0
    )


class _RecordingFile:
    """Wraps a safetensors handle and records which tensor bytes are read."""

    def __init__(self, handle, reads):
        self.handle, self.reads = handle, reads

    def __enter__(self):
        self.inner = self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def keys(self):
        return self.inner.keys()

    def get_tensor(self, key):
        self.reads.append((key, None))
        return self.inner.get_tensor(key)

    def get_slice(self, key):
        return _RecordingSlice(self.inner.get_slice(key), key, self.reads)


class _RecordingSlice:
    def __init__(self, inner, key, reads):
        self.inner, self.key, self.reads = inner, key, reads

    def get_shape(self):
        return self.inner.get_shape()

    def get_dtype(self):
        return self.inner.get_dtype()

    def __getitem__(self, index):
        self.reads.append((self.key, index))
        return self.inner[index]


def test_expert_subset_reads_only_owned_experts(checkpoint, monkeypatch):
    _, path = checkpoint
    full = load_model(path)
    reads: list = []
    real_open = loader.safe_open
    monkeypatch.setattr(
        loader, "safe_open", lambda *a, **k: _RecordingFile(real_open(*a, **k), reads)
    )
    owned = (4, 1)
    part = load_model(
        path,
        expert_ids=owned,
        wanted=lambda name: ".experts." in name and ".self_attn." not in name,
    )
    expert_reads = [(key, index) for key, index in reads if _is_mlp_expert(key)]
    assert expert_reads, "the loader read no expert tensors"
    for key, index in expert_reads:
        if ".experts." in key:  # OLMoE: one tensor per expert
            assert int(key.split(".experts.")[1].split(".")[0]) in owned, key
        else:  # stacked [E, ...]: only owned rows are sliced
            assert isinstance(index, slice), f"{key} was read whole"
            assert set(range(index.start, index.stop)) <= set(owned), (key, index)
    assert not [key for key, _ in reads if not _is_mlp_expert(key)], "dense tensors were read"
    for layer_full, layer_part in zip(full.moe_blocks(), part.moe_blocks(), strict=True):
        assert layer_part.experts.gate_up_proj.shape[0] == len(owned)
        for row, expert in enumerate(owned):
            assert torch.equal(
                layer_part.experts.gate_up_proj[row], layer_full.experts.gate_up_proj[expert]
            )
            assert torch.equal(
                layer_part.experts.down_proj[row], layer_full.experts.down_proj[expert]
            )
    assert part.model.embed_tokens.weight.is_meta


def _is_mlp_expert(key: str) -> bool:
    return ".mlp.experts." in key or key.endswith(
        (
            "mlp.input_linear.weight",
            "mlp.output_linear.weight",
            "block_sparse_moe.input_linear.weight",
            "block_sparse_moe.output_linear.weight",
        )
    )


def test_dtype_is_applied(checkpoint):
    _, path = checkpoint
    model = load_model(path, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype 'float64'"):
        load_model(path, dtype="float64")


def _first_key(tensors, fragment):
    return next(k for k in sorted(tensors) if fragment in k)


@pytest.mark.parametrize("case", ["missing", "unused", "shape", "int", "expert-shape"])
def test_checkpoint_errors_name_the_key(checkpoint, tmp_path, case):
    arch, path = checkpoint
    tensors = load_file(path / "model.safetensors")
    fragment = {
        "missing": "post_attention_layernorm",
        "shape": "embed_tokens",
        "int": "input_layernorm",
        "expert-shape": "down_proj" if arch == "olmoe" else "output_linear",
    }.get(case, "")
    key = _first_key(tensors, fragment) if fragment else "model.layers.0.mystery.weight"

    def edit(t):
        if case == "missing":
            del t[key]
        elif case == "unused":
            t[key] = torch.zeros(3)
        elif case == "shape":
            t[key] = t[key][:, :-1].contiguous()
        elif case == "int":
            t[key] = t[key].to(torch.int32)
        else:
            t[key] = t[key][..., :-1].contiguous()

    broken = _rewrite(path, tmp_path / "broken", edit)
    with pytest.raises(WeightLoadError) as error:
        load_model(broken)
    target = key.replace(".self_attention.", ".self_attn.") if case == "missing" else key
    assert target in str(error.value)


def test_index_must_match_its_files(checkpoint, tmp_path):
    arch, _ = checkpoint
    sharded = tmp_path / "sharded"
    write_hf_checkpoint(arch, sharded, max_shard_size="20KB", **OVERRIDES[arch])
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = list(index["weight_map"].values())
    dropped = next(k for k, f in sorted(index["weight_map"].items()) if files.count(f) > 1)
    owner = index["weight_map"].pop(dropped)
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightLoadError, match="which the index does not list"):
        load_model(sharded)
    index["weight_map"][dropped] = owner
    index["weight_map"]["model.extra.weight"] = "model-99-of-99.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightLoadError, match="does not exist"):
        load_model(sharded)


def test_tied_checkpoint_may_carry_a_redundant_lm_head(tmp_path):
    path = tmp_path / "tied"
    write_hf_checkpoint("jetmoe", path, **OVERRIDES["jetmoe"])
    padded = _rewrite(
        path,
        tmp_path / "padded",
        lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}),
    )
    torch.testing.assert_close(
        PagedRunner(load_model(padded)).step({"a": PROMPT})["a"],
        PagedRunner(load_model(path)).step({"a": PROMPT})["a"],
    )
    untied = tmp_path / "untied"
    write_hf_checkpoint("olmoe", untied, **OVERRIDES["olmoe"])
    with pytest.raises(WeightLoadError, match=r"lm_head\.weight"):
        load_model(_rewrite(untied, tmp_path / "no-head", lambda t: t.pop("lm_head.weight")))


def test_an_expert_id_beyond_the_model_is_an_error(tmp_path):
    path = tmp_path / "olmoe"
    write_hf_checkpoint("olmoe", path, **OVERRIDES["olmoe"])
    key = "model.layers.0.mlp.experts.6.down_proj.weight"  # NOTE: the model has experts 0-5

    def edit(t):
        t[key] = t["model.layers.0.mlp.experts.5.down_proj.weight"].clone()

    with pytest.raises(WeightLoadError, match=r"experts\.6\.down_proj.*names expert 6"):
        load_model(_rewrite(path, tmp_path / "seven", edit))


def test_two_keys_filling_one_parameter_is_an_error(tmp_path):
    path = tmp_path / "jetmoe"
    write_hf_checkpoint("jetmoe", path, **OVERRIDES["jetmoe"])
    original = "model.layers.0.self_attention.kv_proj.weight"
    renamed = "model.layers.0.self_attn.kv_proj.weight"  # NOTE: what `original` is renamed to

    def edit(t):
        t[renamed] = t[original].clone()

    with pytest.raises(WeightLoadError, match="both fill"):
        load_model(_rewrite(path, tmp_path / "twice", edit))
