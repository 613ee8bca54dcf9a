"""Text <-> token ids: a `tokenizers.Tokenizer` built from tokenizer.json or from GGUF metadata.

The GGUF conversion follows what transformers does (integrations/gguf/gguf_tokenizer_mapping.py),
because transformers is the reference the tests compare against.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from nextok.errors import ModelLoadError

if TYPE_CHECKING:
    import gguf
    import jinja2

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LETTERS = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+{s}"
            r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*{s}")
_TEKKEN = _LETTERS.replace("{s}", "") + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT4O = (_LETTERS.replace("{s}", "(?i:'s|'t|'re|'ve|'m|'ll|'d)?")
          + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> split regex, as transformers maps them; any other value keeps GPT-2's ByteLevel regex.
_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
    "qwen35": _QWEN35, "tekken": _TEKKEN,
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (bytes_to_unicode)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    for b in range(256):
        table.setdefault(b, chr(256 + len(table) - len(keep)))
    return table


def _read_text(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON ({e})") from None


def _content(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _as_ids(value: Any) -> list[int] | None:
    return None if value is None else [int(v) for v in value] if isinstance(value, list) else [int(value)]


class Tokenizer:
    """A causal LM's tokenizer: encode/decode, special tokens, chat template, incremental decoding."""

    def __init__(self, backend: Backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 unk_token: str | None = None, pad_token: str | None = None, chat_template: str | None = None,
                 eos_token_ids: list[int] | None = None, add_bos_token: bool | None = None,
                 add_eos_token: bool | None = None) -> None:
        self.backend = backend
        self.special_tokens = {"bos_token": bos_token, "eos_token": eos_token,
                               "unk_token": unk_token, "pad_token": pad_token}
        self.chat_template = chat_template
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        vocab = backend.get_vocab(with_added_tokens=True)
        added = {a.content for a in backend.get_added_tokens_decoder().values()}
        missing = [AddedToken(t, special=True, normalized=False) for t in self.special_tokens.values()
                   if t is not None and t in vocab and t not in added]
        backend.add_special_tokens(missing)  # transformers treats named special tokens as special
        self.bos_token_id = self._id(bos_token)
        self.pad_token_id = self._id(pad_token)
        eos_id = self._id(eos_token)
        self.eos_token_ids: list[int] = eos_token_ids or ([] if eos_id is None else [eos_id])
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        if add_bos_token is not None or add_eos_token is not None:
            backend.post_processor = self._template(bool(add_bos_token), bool(add_eos_token))
        self._compiled: jinja2.Template | None = None

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def _template(self, add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
        """The post-processor transformers builds from add_bos_token / add_eos_token."""
        bos, eos = self.special_tokens["bos_token"], self.special_tokens["eos_token"]
        add_bos, add_eos = add_bos and self.bos_token_id is not None, add_eos and self._id(eos) is not None
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        specials = [(bos, self.bos_token_id)] * add_bos + [(eos, self._id(eos))] * add_eos
        return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    # ---- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Tokenizer:
        """Load a Hugging Face model folder: tokenizer.json (or vocab.json + merges.txt) and its configs."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelLoadError(f"{folder}: tokenizer folder does not exist")
        config = _read_text(folder / "tokenizer_config.json")
        if (folder / "tokenizer.json").is_file():
            try:
                backend = Backend.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # tokenizers raises a bare Exception on bad JSON
                raise ModelLoadError(f"{folder / 'tokenizer.json'}: cannot parse ({e})") from None
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            backend = Backend(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
        else:
            raise ModelLoadError(f"{folder / 'tokenizer.json'}: missing (no tokenizer in this folder)")
        specials = _read_text(folder / "special_tokens_map.json")
        tokens = {name: _content(config.get(name, specials.get(name))) for name in _SPECIAL_NAMES}
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        template = template or _read_text(folder / "chat_template.json").get("chat_template")
        eos_ids = next((ids for ids in (
            _as_ids(config.get("eos_token_ids")),
            _as_ids(_read_text(folder / "generation_config.json").get("eos_token_id")),
            _as_ids(_read_text(folder / "config.json").get("eos_token_id"))) if ids), None)
        return cls(backend, **tokens, chat_template=template, eos_token_ids=eos_ids,
                   add_bos_token=config.get("add_bos_token"), add_eos_token=config.get("add_eos_token"))

    @classmethod
    def from_gguf(cls, path: str | Path, reader: gguf.GGUFReader | None = None) -> Tokenizer:
        """Build the tokenizer a GGUF file describes in its `tokenizer.*` metadata ("gpt2" or "llama")."""
        import gguf

        path = Path(path)
        try:
            reader = reader or gguf.GGUFReader(path)
        except Exception as e:  # a damaged file fails in numpy/struct in many ways
            raise ModelLoadError(f"{path}: cannot read GGUF ({e})") from None

        def meta(key: str, default: Any = None) -> Any:
            field = reader.fields.get(f"tokenizer.{key}")
            return default if field is None else field.contents()

        kind, tokens, types = meta("ggml.model"), meta("ggml.tokens"), meta("ggml.token_type") or []
        if kind not in ("gpt2", "llama") or not tokens:
            found = f"tokenizer.ggml.model {kind!r}" if tokens else "no tokenizer.ggml.tokens"
            raise ModelLoadError(f"{path}: unsupported GGUF tokenizer ({found}; supported: 'gpt2', 'llama')")
        merges = meta("ggml.merges")
        if kind == "gpt2":
            alphabet = _byte_alphabet()
            spelled = set(alphabet.values())
            vocab = {t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode()): i
                     for i, t in enumerate(tokens)}
            model = models.BPE(vocab, [tuple(m.split(" ")) for m in merges or []], dropout=None, fuse_unk=False,
                               continuing_subword_prefix="", end_of_word_suffix="")
            backend = Backend(model)
            split = _PRE_SPLITS.get(meta("ggml.pre"))
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else \
                pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            backend.decoder = decoders.ByteLevel()
        else:  # SentencePiece BPE, as transformers' LlamaTokenizer builds it
            vocab = {t: i for i, t in enumerate(tokens)}
            scores = meta("ggml.scores")
            pairs = [tuple(m.split(" ")) for m in merges] if merges else _merges_from_scores(tokens, scores)
            backend = Backend(models.BPE(vocab, pairs, fuse_unk=True, byte_fallback=True, dropout=None))
            backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
            backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                                 decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        ids = {name: meta(f"ggml.{key}") for name, key in (("bos_token", "bos_token_id"), (
            "eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))}
        named = {name: None if i is None or i >= len(tokens) else tokens[i] for name, i in ids.items()}
        control = [t for t, ty in zip(tokens, types) if ty == _CONTROL and t in vocab]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
        eos_ids = [int(i) for i in dict.fromkeys((ids["eos_token"], meta("ggml.eot_token_id"),
                                                  meta("ggml.eom_token_id"))) if i is not None]
        return cls(backend, **named, chat_template=meta("chat_template"), eos_token_ids=eos_ids,
                   add_bos_token=meta("ggml.add_bos_token", kind == "llama"),
                   add_eos_token=meta("ggml.add_eos_token", False))

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json; `from_pretrained(folder)` restores this tokenizer."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens,
                                  "chat_template": self.chat_template}
        if self.add_bos_token is not None:
            config["add_bos_token"] = self.add_bos_token
        if self.add_eos_token is not None:
            config["add_eos_token"] = self.add_eos_token
        if self.eos_token_ids != [self._id(self.special_tokens["eos_token"])]:
            config["eos_token_ids"] = self.eos_token_ids
        text = json.dumps({k: v for k, v in config.items() if v is not None}, indent=2, ensure_ascii=False)
        (folder / "tokenizer_config.json").write_text(text + "\n", encoding="utf-8")

    # ---- encoding and decoding ----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_str(self, token_id: int) -> str:
        """One token as text (special tokens included); a partial UTF-8 character shows as U+FFFD."""
        return self.decode([token_id], skip_special_tokens=False)

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens)

    # ---- chat ---------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_vars: Any) -> str:
        """Render a conversation with the model's Jinja chat template, the way transformers does."""
        if not self.chat_template:
            raise ValueError("this model has no chat template: pass a plain prompt instead of chat messages")
        if self._compiled is None:
            self._compiled = _compile(self.chat_template)
        specials = {k: v for k, v in self.special_tokens.items() if v is not None}
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **specials, **template_vars)


def _merges_from_scores(tokens: list[str], scores: list[float] | None) -> list[tuple[str, str]]:
    """SentencePiece files may omit merges: every split of a token into two tokens, best score first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    scored = []
    for token, score in zip(tokens, scores or [0.0] * len(tokens)):
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        scored += [(left, right, score) for left, right in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    scored.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in scored]


def _compile(template: str) -> jinja2.Template:
    """A sandboxed Jinja environment with the options and helpers transformers gives chat templates."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):  # `{% generation %}...{% endgeneration %}` only marks assistant text
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


class IncrementalDetokenizer:
    """Turns generated ids into text deltas, decoding only a short window of recent tokens.

    Keeps two offsets into the ids (as vLLM and TGI do): text before `read` has been emitted, and
    decoding from `prefix` (a little earlier) gives the context a tokenizer needs to space the new
    text correctly. Text is held back while it ends in an incomplete UTF-8 character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._decode = tokenizer.backend.decode
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = self._read = 0
        self.text = ""

    def _delta(self, final: bool) -> str:
        before = self._decode(self._ids[self._prefix:self._read], skip_special_tokens=self._skip)
        after = self._decode(self._ids[self._prefix:], skip_special_tokens=self._skip)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        self.text += after[len(before):]
        return after[len(before):]

    def push(self, token_ids: int | Sequence[int]) -> str:
        """Add tokens; return the text they complete (possibly "")."""
        self._ids.extend([int(token_ids)] if isinstance(token_ids, Integral) else [int(t) for t in token_ids])
        return self._delta(final=False)

    def flush(self) -> str:
        """Return the text still held back (an incomplete character shows as U+FFFD)."""
        return self._delta(final=True)
