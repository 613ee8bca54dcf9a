"""nextok/chat.py: one rule turns messages into prompt ids on every path, with exactly one BOS where the
tokenizer adds one, and the end-of-turn token as a stop where it is not an EOS."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from nextok.chat import chat_prompt, end_of_turn_token_id
from tests.conftest import default_gguf_path
from tests.models.checkpoints import llama_to_gguf, write_gguf

# A Llama-3-style template that writes the BOS itself: with a tokenizer that also adds one, the
# pre-chat paths produced two.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "user", "content": "Say hi"}]


def test_end_of_turn_token_is_im_end(default_tokenizer):
    assert end_of_turn_token_id(default_tokenizer) == default_tokenizer.backend.token_to_id("<|im_end|>")


def test_end_of_turn_is_a_stop_only_where_it_is_not_an_eos(default_tokenizer):
    im_end = default_tokenizer.backend.token_to_id("<|im_end|>")
    assert chat_prompt(default_tokenizer, MESSAGES, [im_end]).stop_token_ids == []
    assert chat_prompt(default_tokenizer, MESSAGES, [0]).stop_token_ids == [im_end]


def test_ids_are_the_template_text_without_added_specials(default_tokenizer):
    chat = chat_prompt(default_tokenizer, MESSAGES)
    assert chat.text == default_tokenizer.apply_chat_template(MESSAGES)
    assert chat.token_ids == default_tokenizer.encode(chat.text, add_special_tokens=False)


def test_bad_conversations_are_value_errors(default_tokenizer):
    with pytest.raises(ValueError, match="non-empty list"):
        chat_prompt(default_tokenizer, [])
    with pytest.raises(ValueError, match="no tokenizer"):
        chat_prompt(None, MESSAGES)


# ---------------------------------------------------------------------- a GGUF with add_bos_token=true
def _tokenizer_fields(bos_first_in_template: bool) -> dict:
    reader = gguf.GGUFReader(default_gguf_path())
    fields = {}
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id"):
        fields[key] = reader.fields[key].contents()
    fields["tokenizer.ggml.bos_token_id"] = 0  # <|endoftext|>
    fields["tokenizer.ggml.add_bos_token"] = True
    fields["tokenizer.chat_template"] = TEMPLATE if bos_first_in_template else TEMPLATE.replace("{{ bos_token }}", "")
    return fields


def _write_bos_gguf(path: Path, bos_first_in_template: bool) -> Path:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(config).eval()
    plain = path.with_suffix(".plain.gguf")
    llama_to_gguf(model, plain, gguf.GGMLQuantizationType.F32)
    reader = gguf.GGUFReader(plain)
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("llama.") or k == "general.name"}
    meta |= _tokenizer_fields(bos_first_in_template)
    tensors = {t.name: np.array(t.data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
               for t in reader.tensors}
    write_gguf(path, "llama", meta, tensors)
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["template-writes-bos", "template-without-bos"])
def bos_gguf(request, tmp_path_factory) -> Path:
    return _write_bos_gguf(tmp_path_factory.mktemp("bos") / "bos.gguf", request.param)


@pytest.fixture(scope="module")
def bos_llm(bos_gguf):
    from nextok import LLM

    return LLM(str(bos_gguf), dtype="float32", kv_cache_memory=16 << 20)


def _one_bos(ids: list[int]) -> bool:
    return ids[0] == 0 and ids.count(0) == 1


def test_the_tokenizer_adds_a_bos(bos_llm):
    assert bos_llm.tokenizer.add_bos_token and bos_llm.tokenizer.bos_token_id == 0
    assert bos_llm.tokenizer.encode("hi")[0] == 0


def test_llm_chat_has_one_bos(bos_llm):
    out = bos_llm.chat(MESSAGES, _params())
    assert _one_bos(out.prompt_token_ids), out.prompt_token_ids[:4]


def test_generate_chat_has_one_bos(bos_llm, bos_gguf, capsys):
    from nextok.cli import main

    assert main(["generate", "Say hi", "--chat", "--model", str(bos_gguf), "--dtype", "float32", "--max-new-tokens",
                 "2", "--json", "--kv-cache-gb", "0.02"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["prompt"] == chat_prompt(bos_llm.tokenizer, MESSAGES).text
    assert _one_bos(row["prompt_token_ids"]), row["prompt_token_ids"][:4]


def test_batch_messages_have_one_bos(bos_llm):
    from nextok.batch import parse_line, prepare
    from nextok.params import SamplingParams

    item = prepare(parse_line(json.dumps({"id": "a", "messages": MESSAGES}), 1), bos_llm, SamplingParams())
    assert item.error is None and _one_bos(item.prompt_token_ids)
    openai = {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": MESSAGES}}
    item = prepare(parse_line(json.dumps(openai), 2), bos_llm, SamplingParams())
    assert item.error is None and _one_bos(item.prompt_token_ids)


def test_server_chat_has_one_bos(bos_llm):
    from nextok.server.protocol import ChatCompletionRequest
    from nextok.server.settings import ServerSettings
    from nextok.server.translate import ServedModel, chat_work

    (work,) = chat_work(ChatCompletionRequest(messages=MESSAGES, max_tokens=2), ServedModel.from_llm(bos_llm),
                        ServerSettings())
    assert _one_bos(work.prompt_token_ids)


def _params():
    from nextok.params import SamplingParams

    return SamplingParams(max_new_tokens=2)
