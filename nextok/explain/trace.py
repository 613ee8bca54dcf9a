"""Trace: a plain, JSON-serialisable record of how one generation chose its tokens.

`trace_request` (in `nextok.explain.recorder`) fills it by running the real engine on the request
and, after each step, describing the logits that step saw; the tokens are the engine's.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from nextok.outputs import Completion


@dataclass
class Candidate:
    """A token a greedy or sampled step could have chosen."""

    token: int
    probs: list[float]  # probability after each stage of Trace.stages (0.0 once cut)


@dataclass
class TokenStep:
    """One step of a greedy or sampled sequence."""

    token: int  # the chosen token
    reason: str  # "argmax" (greedy) or "sampled"
    candidates: list[Candidate]  # ranked by score before the cuts; extras (the chosen token) last
    rest: list[float]  # per stage: probability of all tokens not listed
    kept: list[int]  # per stage: how many tokens keep a non-zero probability


@dataclass
class SampleTrace:
    """The steps of one greedy or sampled sequence (`index`: its num_return_sequences slot)."""

    index: int
    steps: list[TokenStep] = field(default_factory=list)


@dataclass
class BeamCandidate:
    """A continuation of one beam at one step."""

    token: int
    probs: list[float]  # probability after each stage of Trace.stages
    logprob: float  # processed log-probability added to the beam's score (-1e9: banned)
    score: float  # the beam's score plus logprob
    rank: int | None  # rank among all beams' candidates (None: beyond the beams_to_keep best)
    status: str  # "kept" (a running beam next step), "finished" (a hypothesis) or "pruned"
    child: int | None = None  # kept: the beam index it becomes at the next step


@dataclass
class BeamNode:
    """A live beam as a step begins."""

    parent: int  # the beam index at the previous step it continues (-1: the prompt)
    token: int | None  # its last token (None: the prompt)
    score: float  # accumulated log-probability so far
    candidates: list[BeamCandidate]
    rest: list[float]  # per stage: probability of the tokens not listed
    kept: list[int]  # per stage: how many tokens keep a non-zero probability


@dataclass
class BeamStep:
    beams: list[BeamNode]


@dataclass
class Hypothesis:
    """A finished beam hypothesis: the beam at (`step`, `beam`) plus its final `token`."""

    token_ids: list[int]  # generated tokens
    score: float  # length-normalised score (transformers' sequences_scores)
    step: int
    beam: int
    token: int
    final: bool  # still among the num_beams best when the search ended


@dataclass
class BeamTrace:
    num_beams: int
    beams_to_keep: int
    steps: list[BeamStep] = field(default_factory=list)
    hypotheses: list[Hypothesis] = field(default_factory=list)

    def path(self, hypothesis: Hypothesis) -> list[tuple[int, int]]:
        """(step, beam) of each decision that led to the hypothesis, first step first."""
        step, beam = hypothesis.step, hypothesis.beam
        path = [(step, beam)]
        while step > 0:
            beam = self.steps[step].beams[beam].parent
            step -= 1
            path.append((step, beam))
        return path[::-1]


@dataclass
class Trace:
    """How one request was decoded, step by step.

    `outputs` equal what `LLM.generate` returns for the same prompt, params and seed. Greedy and
    sampling fill `samples` (one per returned sequence); beam search fills `beam`.
    """

    prompt: str | None
    prompt_token_ids: list[int]
    params: dict[str, Any]
    seed: int
    strategy: str  # "greedy", "sampling", "beam search" or "beam sampling"
    stages: list[str]  # "model", then "penalties", "temperature", "top_k", "top_p", "min_p", "typical" as used
    outputs: list[Completion]
    samples: list[SampleTrace] = field(default_factory=list)
    beam: BeamTrace | None = None
    vocab: dict[int, str] = field(default_factory=dict)  # text of every token id in the trace
    top: int = 20  # candidates listed per step, ranked (the chosen token and a few others may follow)
    label: str = ""

    @property
    def token_ids(self) -> list[int]:
        """The best (or first) output's generated tokens."""
        return self.outputs[0].token_ids if self.outputs else []

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=indent, allow_nan=False)
