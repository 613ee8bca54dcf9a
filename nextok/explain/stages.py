"""The distribution after each processing stage, for the explain view.

The stages are the engine's own processors applied in the engine's order (see
`nextok.sampling.selection`): the model's softmax, the penalties, then for sampling rows each
warper that is switched on. Nothing here decides a token; the engine does, and the trace records it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nextok.params import SamplingParams
from nextok.sampling.processors import (
    MinPWarper,
    RowBatch,
    TemperatureWarper,
    TopKWarper,
    TopPWarper,
    TypicalWarper,
    WARPERS,
    apply_penalties,
    processors_change_argmax,
)

STAGE_NAMES = {TemperatureWarper: "temperature", TopKWarper: "top_k", TopPWarper: "top_p",
               MinPWarper: "min_p", TypicalWarper: "typical"}


def stage_names(params: SamplingParams, sampling: bool) -> list[str]:
    """The stages a request with these params goes through, in order."""
    names = ["model"]
    if processors_change_argmax(params):
        names.append("penalties")
    if sampling:
        names += [STAGE_NAMES[cls] for cls in WARPERS if cls.uses(params)]
    return names


def order_stage(names: list[str]) -> int:
    """The stage whose order the candidate lists follow: after the penalties, before the warpers."""
    return names.index("penalties") if "penalties" in names else 0


def stage_scores(
    batch: RowBatch, scores: torch.Tensor, sampling: bool, min_tokens_to_keep: list[int] | None = None
) -> list[torch.Tensor]:
    """(B, V) scores -> the scores after each stage of `stage_names`, the first being `scores`."""
    stages = [scores]
    if any(processors_change_argmax(p) for p in batch.params):
        scores = apply_penalties(scores, batch)
        stages.append(scores)
    if sampling:
        for cls in WARPERS:  # apply_warpers' loop, keeping each stage
            warper = cls.from_batch(batch, min_tokens_to_keep)
            if warper is not None:
                scores = warper(scores)
                stages.append(scores)
    return stages


@dataclass
class RowView:
    """One row's candidates and their probability after every stage."""

    tokens: list[int]  # shown candidates: ranked by the score before any cut, then extras
    probs: list[list[float]]  # per candidate, per stage
    rest: list[float]  # per stage: probability of the tokens not shown
    kept: list[int]  # per stage: how many tokens keep a non-zero probability


def row_views(stages: list[torch.Tensor], top: int, order_stage: int, extra: list[list[int]]) -> list[RowView]:
    """Candidates of each row from its per-stage (B, V) scores.

    Candidates are ordered by the scores of stage `order_stage` (after the penalties, before
    temperature and the cuts, which all keep that order), so a cut is a line in the list. The
    model's own favourites that the penalties pushed out, and the row's `extra` ids (the chosen
    token), are appended when not listed.
    """
    k = min(top, stages[0].shape[-1])
    ranked = torch.topk(stages[order_stage], k, dim=-1).indices.tolist()  # (B, k)
    favourites = torch.topk(stages[0], min(3, k), dim=-1).indices.tolist()  # (B, 3)
    probs = [torch.softmax(s.double(), dim=-1) for s in stages]  # per stage (B, V); float64 so sums are exact
    kept = torch.stack([(s > float("-inf")).sum(dim=-1) for s in stages], dim=1).tolist()  # (B, S)
    views = []
    for row, tokens in enumerate(ranked):
        listed = set(tokens)
        tokens += [t for t in dict.fromkeys(favourites[row] + list(extra[row])) if t not in listed]
        index = torch.tensor(tokens, device=stages[0].device)
        shown = torch.stack([p[row, index] for p in probs], dim=1).cpu()  # (n, S)
        rest = (1.0 - shown.sum(dim=0)).clamp(min=0.0).tolist()  # (S,)
        views.append(RowView(tokens=tokens, probs=shown.tolist(), rest=rest, kept=kept[row]))
    return views
