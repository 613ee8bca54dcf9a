"""trace_request: run one request through the real engine and record every step.

The request runs on a private `LLMEngine` over the given engine's model (its own small KV cache),
which keeps each step's logits (`record_logits`). After each step the recorder describes what that
step saw, with the engine's own processors and the state before the step; the chosen tokens, the
beam search's own ranking (`BeamSearch.last_ranking`) and the hypotheses are read from the engine,
so the trace's tokens are exactly what `generate` gives.
"""

from __future__ import annotations

import torch

from nextok.engine.engine import LLMEngine
from nextok.engine.runner import ModelRunner
from nextok.engine.sequence import Request, Sequence
from nextok.explain.stages import order_stage, row_views, stage_names, stage_scores
from nextok.explain.trace import (
    BeamCandidate,
    BeamNode,
    BeamStep,
    BeamTrace,
    Candidate,
    Hypothesis,
    SampleTrace,
    TokenStep,
    Trace,
)
from nextok.params import SamplingParams
from nextok.sampling.beam import _NEG
from nextok.sampling.selection import row_batch


class _StepLogits:
    """The logits of the last engine step, by sequence."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        engine.record_logits = True

    @property
    def seqs(self) -> list[Sequence]:
        return self.engine.last_step[0] if self.engine.last_step else []

    def rows(self, seqs: list[Sequence]) -> torch.Tensor:
        stepped, logits = self.engine.last_step
        position = {id(s): i for i, s in enumerate(stepped)}
        return logits[torch.tensor([position[id(s)] for s in seqs], device=logits.device)]  # (len(seqs), V)


def trace_request(
    engine: LLMEngine, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None, top: int = 20
) -> Trace:
    """Generate for one prompt on the engine's model, recording `top` candidates per step."""
    tokenizer = engine.tokenizer
    engine = _private_engine(engine, len(prompt_token_ids), params)
    recorder = _StepLogits(engine)
    request = engine.add_request(prompt_token_ids, params, prompt=prompt)
    sampling = params.do_sample
    strategy = ("beam sampling" if sampling else "beam search") if params.is_beam_search else (
        "sampling" if sampling else "greedy")
    names = stage_names(params, sampling)
    trace = Trace(prompt=prompt, prompt_token_ids=list(prompt_token_ids), params=params.to_dict(),
                  seed=request.seed, strategy=strategy, stages=names, outputs=[], top=top)
    steps = _BeamSteps(request, names, top) if request.beam is not None else _TokenSteps(request, names, top)
    while not request.is_finished:
        before = steps.before_step()
        engine.last_step = None
        engine.step()
        if request.error is not None:
            raise RuntimeError(f"explain: generation failed: {request.error}")
        if engine.last_step is not None:  # a step that only prefilled part of the prompt chose nothing
            steps.after_step(recorder, before)
    trace.outputs = engine.output(request).outputs
    steps.fill(trace)
    trace.vocab = _vocab(tokenizer, trace)
    return trace


def _private_engine(shared: LLMEngine, num_prompt_tokens: int, params: SamplingParams) -> LLMEngine:
    """An engine over the shared engine's model with a KV cache just big enough for this one request."""
    block_size = shared.blocks.block_size
    total = min(num_prompt_tokens + params.max_new_tokens, shared.max_model_len)
    per_seq = -(-total // block_size) + 1
    num_blocks = max(params.num_beams, params.num_return_sequences) * per_seq + 2
    per_block = ModelRunner.bytes_per_block(shared.model, block_size, torch.float32)  # an upper bound
    return LLMEngine(shared.model, shared.eos_token_ids, tokenizer=shared.tokenizer,
                     kv_cache_memory=num_blocks * per_block, block_size=block_size, device=shared.runner.device)


def _vocab(tokenizer, trace: Trace) -> dict[int, str]:
    ids = set(trace.prompt_token_ids)
    for c in trace.outputs:
        ids.update(c.token_ids)
    for sample in trace.samples:
        for step in sample.steps:
            ids.update(c.token for c in step.candidates)
    if trace.beam is not None:
        for step in trace.beam.steps:
            for node in step.beams:
                ids.update(c.token for c in node.candidates)
    if tokenizer is None:
        return {i: f"<{i}>" for i in sorted(ids)}
    return {i: tokenizer.token_to_str(i) for i in sorted(ids)}


# ---------------------------------------------------------------------- greedy and sampling
class _TokenSteps:
    """Greedy and sampled sequences: the engine fans the prompt out into num_return_sequences
    samples on the first step; each sample's state before step t is its prompt and first t tokens."""

    def __init__(self, request: Request, names: list[str], top: int) -> None:
        self.request = request
        self.names, self.top, self.order = names, top, order_stage(names)
        self.samples = [SampleTrace(index=i) for i in range(request.num_samples)]

    def before_step(self) -> None:
        return None

    def after_step(self, recorder: _StepLogits, before: None) -> None:
        request = self.request
        seqs = sorted(request.seqs + request.finished_seqs, key=lambda s: s.sample_index)
        fresh = [s for s in seqs if s.num_output_tokens == len(self.samples[s.sample_index].steps) + 1]
        if not fresh:
            return
        # Before the fan-out every sample read the prompt's row; afterwards each its own.
        in_batch = {id(s) for s in recorder.seqs}
        rows = recorder.rows([s if id(s) in in_batch else recorder.seqs[0] for s in fresh])  # (n, V)
        batch = row_batch(fresh)
        batch.token_ids = [s.token_ids[:-1] for s in fresh]  # the state the step saw
        stages = stage_scores(batch, rows, request.params.do_sample)
        views = row_views(stages, self.top, self.order, [[s.token_ids[-1]] for s in fresh])
        for seq, view in zip(fresh, views):
            chosen = seq.token_ids[-1]
            candidates = [Candidate(token=tok, probs=p) for tok, p in zip(view.tokens, view.probs)]
            self.samples[seq.sample_index].steps.append(TokenStep(
                token=chosen, reason="sampled" if request.params.do_sample else "argmax",
                candidates=candidates, rest=view.rest, kept=view.kept))

    def fill(self, trace: Trace) -> None:
        trace.samples = self.samples


# ---------------------------------------------------------------------- beam search
class _BeamSteps:
    """Beam search: every live beam's candidates, which the search kept, finished or pruned, as the
    engine's BeamSearch ranked them (its `last_ranking`)."""

    def __init__(self, request: Request, names: list[str], top: int) -> None:
        self.request = request
        self.names, self.top, self.order = names, top, order_stage(names)
        beam = request.beam
        self.trace = BeamTrace(num_beams=beam.num_beams, beams_to_keep=beam.beams_to_keep)
        self.hypothesis_of: dict[int, int] = {}  # id(token list in BeamSearch) -> index in trace.hypotheses
        self.token_lists: list[list[int]] = []  # keeps those lists alive so their ids stay unique

    def before_step(self) -> dict:
        beam = self.request.beam
        return {"live": list(self.request.seqs), "num_generated": beam.num_generated,
                "finished": list(beam.finished_tokens)}

    def after_step(self, recorder: _StepLogits, before: dict) -> None:
        request, beam = self.request, self.request.beam
        params, nb = request.params, beam.num_beams
        live: list[Sequence] = before["live"]
        t = before["num_generated"]
        if beam.num_generated == t:  # the beams did not step (a chunk of the prompt)
            return
        ranking = beam.last_ranking
        logits = recorder.rows(live)  # (n_live, V)
        num_eos = len(request.eos_token_ids)
        logprobs = ranking.logprobs  # (n_live, V): what the search ranked
        accumulated = logprobs + ranking.running_scores[: len(live), None].to(logprobs.device)  # (n_live, V)
        status = {}  # (parent, token) -> (rank, status, child)
        for rank, (p, tok, end) in enumerate(zip(ranking.parents, ranking.tokens, ranking.ends)):
            status[(p, tok)] = (rank, "finished" if end and rank < nb else "pruned", None)
        if not beam.done:
            for child, rank in enumerate(ranking.kept):
                status[(ranking.parents[rank], ranking.tokens[rank])] = (rank, "kept", child)

        stages = stage_scores(row_batch(live), torch.log_softmax(logits, dim=-1), params.do_sample,
                              [num_eos + 1 if num_eos else 2] * len(live))
        ranked = [[tok for (p, tok) in status if p == b] for b in range(len(live))]  # always listed
        views = row_views(stages, self.top, self.order, ranked)
        nodes = []
        for b, (seq, view) in enumerate(zip(live, views)):
            index = torch.tensor(view.tokens, device=logprobs.device)
            candidates = []
            # A banned token's -inf becomes BeamSearch's "impossible" score, so the trace stays strict JSON.
            lps = logprobs[b, index].clamp(min=_NEG).tolist()
            totals = accumulated[b, index].clamp(min=_NEG).tolist()
            for tok, probs, lp, score in zip(view.tokens, view.probs, lps, totals):
                rank, state, child = status.get((b, tok), (None, "pruned", None))
                candidates.append(BeamCandidate(token=tok, probs=probs, logprob=lp, score=score, rank=rank,
                                                status=state, child=child))
            nodes.append(BeamNode(parent=seq.sample_index if t > 0 else -1, token=seq.token_ids[-1] if t > 0 else None,
                                  score=float(ranking.running_scores[b]), candidates=candidates, rest=view.rest,
                                  kept=view.kept))
        self.trace.steps.append(BeamStep(beams=nodes))
        self._record_hypotheses(before["finished"], live, t, status)

    def _record_hypotheses(self, finished_before: list, live: list[Sequence], t: int, status: dict) -> None:
        beam = self.request.beam
        old = {id(x) for x in finished_before if x is not None}
        finishing = sorted(((rank, p, tok) for (p, tok), (rank, state, _) in status.items() if state == "finished"))
        used: set[int] = set()
        for tokens, score in zip(beam.finished_tokens, beam.finished_scores.tolist()):
            if tokens is None or id(tokens) in old or id(tokens) in self.hypothesis_of:
                continue
            for rank, p, tok in finishing:
                if rank not in used and tokens == live[p].output_token_ids + [tok]:
                    used.add(rank)
                    self.hypothesis_of[id(tokens)] = len(self.trace.hypotheses)
                    self.token_lists.append(tokens)
                    self.trace.hypotheses.append(Hypothesis(token_ids=list(tokens), score=score, step=t, beam=p,
                                                            token=tok, final=False))
                    break

    def fill(self, trace: Trace) -> None:
        beam = self.request.beam
        for tokens, flag in zip(beam.finished_tokens, beam.finished_flags.tolist()):
            if flag and tokens is not None and id(tokens) in self.hypothesis_of:
                self.trace.hypotheses[self.hypothesis_of[id(tokens)]].final = True
        self.trace.hypotheses.sort(key=lambda h: (not h.final, -h.score))
        trace.beam = self.trace
