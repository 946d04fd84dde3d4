"""`moe-serve tiny`: deterministic hub-format checkpoints that transformers loads unchanged."""

from __future__ import annotations

import pytest
import torch

from moe_serve.deploy.cli import main
from moe_serve.models.registry import load_model
from moe_serve.models.tiny import ARCHS
from moe_serve.models.tokenizer import ChatTemplateError, TextTokenizer
from tests.helpers import PagedRunner, hf_logits

TEXT = "Hello, world! Café 東京 🙂 naïve"


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    assert main(["tiny", "--arch", request.param, "--out", str(out), "--seed", "3"]) == 0
    return request.param, out


def test_transformers_loads_it_with_no_missing_or_unexpected_keys(tiny):
    from transformers import AutoModelForCausalLM

    _, path = tiny
    reference, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    tokenizer = TextTokenizer.from_dir(path)
    ids = tokenizer.encode(TEXT)
    actual = PagedRunner(load_model(path)).step({"a": ids})["a"]
    torch.testing.assert_close(actual, hf_logits(reference.eval(), ids), atol=1e-4, rtol=0)


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path):
    arch, path = tiny
    main(["tiny", "--arch", arch, "--out", str(tmp_path / "again"), "--seed", "3"])
    main(["tiny", "--arch", arch, "--out", str(tmp_path / "other"), "--seed", "4"])
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (path / name).read_bytes(), name
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != (
        path / "model.safetensors"
    ).read_bytes()


def test_tokenizer_and_chat_template_match_transformers(tiny):
    from transformers import AutoTokenizer

    _, path = tiny
    ours, theirs = TextTokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)
    assert ours.encode(TEXT) == theirs(TEXT)["input_ids"]
    assert ours.decode(ours.encode(TEXT)) == TEXT
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert ours.render_chat(messages) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    with pytest.raises(ChatTemplateError, match="unknown role: robot"):
        ours.render_chat([{"role": "robot", "content": "beep"}])


def test_tools_and_tool_messages_render_as_in_transformers(tiny):
    from transformers import AutoTokenizer

    _, path = tiny
    ours, theirs = TextTokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    function = {"name": "get_weather", "arguments": {"city": "Paris"}}
    call = {"id": "call_1", "type": "function", "function": function}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [call],
        },
        {"role": "tool", "content": "18 C", "tool_call_id": "call_1"},
    ]
    rendered = ours.render_chat(messages, tools=tools)
    assert rendered == theirs.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert '"get_weather"' in rendered and "<|tool|>\n18 C" in rendered and '"Paris"' in rendered


def test_sizes_can_be_chosen(tmp_path):
    main(
        [
            "tiny",
            "--arch",
            "olmoe",
            "--out",
            str(tmp_path),
            "--hidden-size",
            "48",
            "--num-experts",
            "5",
            "--top-k",
            "3",
            "--num-layers",
            "1",
            "--dtype",
            "bfloat16",
        ]
    )
    model = load_model(tmp_path)
    assert model.config.hidden_size == 48 and model.config.num_experts == 5
    assert model.config.num_experts_per_tok == 3 and model.config.num_layers == 1
    assert next(model.parameters()).dtype == torch.bfloat16


def test_a_chat_template_file_wins_and_renders_as_in_transformers(tiny, tmp_path):
    from transformers import AutoTokenizer

    _, path = tiny
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}={{ m | tojson(sort_keys=True) }};{% endfor %}"
        "{{ bos_token }}{{ strftime_now('%Y') }}"
    )
    ours, theirs = TextTokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "Hi ü", "name": "a"}]
    rendered = ours.render_chat(messages)
    assert rendered.startswith('user={"content": "Hi ü", "name": "a", "role": "user"};')
    assert rendered == theirs.apply_chat_template(messages, tokenize=False)
