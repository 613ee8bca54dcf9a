"""SamplingParams: what to generate and how, with transformers' names and defaults."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Literal

EarlyStopping = bool | Literal["never"]


@dataclass
class SamplingParams:
    """Decoding parameters of one request.

    Names and defaults follow ``transformers.GenerationConfig`` (``top_k=50`` applies whenever
    ``do_sample=True``); ``stop``, ``stop_token_ids``, ``ignore_eos``, ``seed``, ``logprobs``,
    ``presence_penalty`` and ``frequency_penalty`` are what a service needs on top.
    Invalid values raise ``ValueError`` naming the field, the value and the fix.
    """

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: list[list[int]] | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False
    num_return_sequences: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = _as_list(self, "stop", self.stop, "give a string or a list of strings")
        self.stop_token_ids = _as_list(self, "stop_token_ids", self.stop_token_ids, "give a list of token ids")
        if self.bad_words_ids is not None:
            words = _as_list(self, "bad_words_ids", self.bad_words_ids, "give a list of lists of token ids")
            if not all(isinstance(w, (list, tuple)) for w in words):
                _fail("bad_words_ids", self.bad_words_ids, "give a list of lists of token ids, e.g. [[12], [7, 8]]")
            self.bad_words_ids = [list(w) for w in words]
        self._validate()

    # ------------------------------------------------------------------ derived
    @property
    def is_beam_search(self) -> bool:
        return self.num_beams > 1

    @property
    def uses_top_k(self) -> bool:
        return self.do_sample and self.top_k is not None and self.top_k > 0

    @property
    def uses_min_p(self) -> bool:
        return self.do_sample and self.min_p is not None and self.min_p > 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamplingParams:
        """Build from a mapping, rejecting unknown keys with a suggestion."""
        _reject_unknown(values)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> SamplingParams:
        _reject_unknown(changes)
        return dataclasses.replace(self, **changes)

    def with_model_defaults(self, generation_config: dict[str, Any] | None) -> SamplingParams:
        """Fill the fields left at their defaults from a model's generation_config.json.

        As in transformers, a value the caller leaves at the library default is taken from the
        model's generation config; a value the caller changed wins.
        """
        if not generation_config:
            return self
        defaults = SamplingParams.__new__(SamplingParams)
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(defaults, f.name, default)
        changes = {}
        for name in _MODEL_DEFAULT_FIELDS:
            if name in generation_config and getattr(self, name) == getattr(defaults, name):
                value = generation_config[name]
                if value is not None or name in ("top_k", "min_p"):
                    changes[name] = value
        return dataclasses.replace(self, **changes) if changes else self

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        _check_int(self, "max_new_tokens", minimum=0)
        _check_int(self, "min_new_tokens", minimum=0)
        _check_int(self, "num_beams", minimum=1)
        _check_int(self, "num_return_sequences", minimum=1)
        _check_int(self, "no_repeat_ngram_size", minimum=0)
        if self.top_k is not None:
            _check_int(self, "top_k", minimum=0, fix="use 0 or None to turn top-k off")
        if self.logprobs is not None:
            _check_int(self, "logprobs", minimum=0, maximum=20, fix="ask for at most 20 alternatives")
        if self.seed is not None:
            _check_int(self, "seed", minimum=0)
        if not isinstance(self.do_sample, bool):
            _fail("do_sample", self.do_sample, "use True (sampling) or False (greedy / beam search)")
        if not isinstance(self.ignore_eos, bool):
            _fail("ignore_eos", self.ignore_eos, "use True or False")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            _fail("early_stopping", self.early_stopping, 'use True, False or "never"')

        _check_float(self, "temperature")
        if self.temperature < 0:
            _fail("temperature", self.temperature, "use a value >= 0; 0 means greedy decoding (do_sample=False)")
        if 0 < self.temperature < MIN_TEMPERATURE:  # logits / temperature would overflow to inf
            _fail("temperature", self.temperature,
                  f"use at least {MIN_TEMPERATURE}, or do_sample=False for greedy decoding")
        if self.temperature > MAX_TEMPERATURE:  # it becomes inf in float32, and -inf / inf is NaN
            _fail("temperature", self.temperature, f"use at most {MAX_TEMPERATURE:g}")
        if self.do_sample and self.temperature == 0:
            _fail("temperature", self.temperature,
                  "a temperature of 0 cannot sample; set do_sample=False for greedy decoding or use a value > 0")
        _check_float(self, "top_p")
        if not 0 < self.top_p <= 1:
            _fail("top_p", self.top_p, "use a value in (0, 1]; 1.0 turns top-p off")
        if self.min_p is not None:
            _check_float(self, "min_p")
            if not 0 <= self.min_p <= 1:
                _fail("min_p", self.min_p, "use a value in [0, 1]; 0 or None turns min-p off")
        _check_float(self, "typical_p")
        if not 0 < self.typical_p <= 1:
            _fail("typical_p", self.typical_p, "use a value in (0, 1]; 1.0 turns typical sampling off")
        _check_float(self, "repetition_penalty")
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            _fail("repetition_penalty", self.repetition_penalty,
                  f"use a value in (0, {MAX_REPETITION_PENALTY:g}]; 1.0 means no penalty")
        _check_float(self, "length_penalty")
        # Beam scores are divided by length ** length_penalty: it must stay a finite float32 number.
        exponent = abs(self.length_penalty) * math.log(max(self.max_new_tokens, 2))
        if exponent > MAX_LENGTH_EXPONENT:
            limit = MAX_LENGTH_EXPONENT / math.log(max(self.max_new_tokens, 2))
            _fail("length_penalty", self.length_penalty,
                  f"with max_new_tokens={self.max_new_tokens}, length ** length_penalty overflows; use a value "
                  f"in [-{limit:.1f}, {limit:.1f}]")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_float(self, name)
            if not -2 <= getattr(self, name) <= 2:
                _fail(name, getattr(self, name), "use a value in [-2, 2] as in the OpenAI API")

        if self.min_new_tokens > self.max_new_tokens:
            _fail("min_new_tokens", self.min_new_tokens,
                  f"use a value <= max_new_tokens ({self.max_new_tokens})")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            _fail("num_return_sequences", self.num_return_sequences,
                  f"beam search returns at most num_beams ({self.num_beams}) sequences; "
                  "raise num_beams or lower num_return_sequences")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            _fail("num_return_sequences", self.num_return_sequences,
                  "greedy decoding gives one sequence; use do_sample=True or num_beams > 1")
        if not all(isinstance(s, str) and s for s in self.stop):
            _fail("stop", self.stop, "give non-empty strings")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            _fail("stop_token_ids", self.stop_token_ids, "give non-negative token ids")
        if self.bad_words_ids is not None and not all(
            w and all(isinstance(t, int) and t >= 0 for t in w) for w in self.bad_words_ids
        ):
            _fail("bad_words_ids", self.bad_words_ids, "give a list of non-empty lists of token ids")


MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 1e4
MAX_REPETITION_PENALTY = 1e4
MAX_LENGTH_EXPONENT = 80.0  # e ** 80 ~ 5.5e34, well inside float32

# Fields a model's generation_config.json may set (transformers applies the same ones).
_MODEL_DEFAULT_FIELDS = (
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
    "typical_p", "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "num_beams",
    "length_penalty", "early_stopping", "num_return_sequences",
)


def _fail(name: str, value: Any, fix: str) -> None:
    raise ValueError(f"SamplingParams.{name}={value!r} is invalid: {fix}.")


def _check_int(p: SamplingParams, name: str, minimum: int, maximum: int | None = None, fix: str | None = None) -> None:
    value = getattr(p, name)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, "use a whole number")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        _fail(name, value, fix or f"use a whole number {bound}")


def _as_list(p: SamplingParams, name: str, value: Any, fix: str) -> list:
    """A list-valued field as a list; anything that is not a list (or tuple) of items is a ValueError."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
        _fail(name, value, fix)
    return list(value)


def _check_float(p: SamplingParams, name: str) -> None:
    value = getattr(p, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(name, value, "use a finite number")


def _reject_unknown(values: dict[str, Any]) -> None:
    known = SamplingParams.field_names()
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(known)}"
            raise ValueError(f"SamplingParams has no field {key!r}: {hint}")


_dataclass_init = SamplingParams.__init__


def _init_rejecting_unknown(self: SamplingParams, *args: Any, **kwargs: Any) -> None:
    _reject_unknown(kwargs)
    _dataclass_init(self, *args, **kwargs)


# Unknown keyword arguments get the same helpful ValueError as from_dict, not a bare TypeError.
SamplingParams.__init__ = _init_rejecting_unknown  # type: ignore[method-assign]
