"""llama.cpp the way its own users batch it: one context, many sequences, one llama_decode per step.

This follows llama.cpp's `batched` example through llama-cpp-python's low-level bindings: all prompts
are prefilled together (in batches of n_batch tokens), then every step decodes one token for each
running sequence in one batch, and each sequence samples with its own sampler chain (greedy, or top-k
then temperature then a seeded draw, as the other engines sample). EOS is suppressed with a logit bias,
so every sequence generates exactly its budget. `make bench-peers` installs llama-cpp-python.
"""

from __future__ import annotations

import os

import llama_cpp as L


class LlamaCppBatched:
    def __init__(self, model_path: str, n_ctx: int, n_seq: int, n_batch: int = 512,
                 n_threads: int | None = None, unified: bool = True) -> None:
        L.llama_backend_init()
        model_params = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(model_path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        params = L.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
        params.n_seq_max = n_seq
        params.kv_unified = unified  # one KV cache shared by the sequences, or n_ctx / n_seq for each
        params.n_threads = params.n_threads_batch = n_threads or os.cpu_count() or 1
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create the context")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.eos = L.llama_vocab_eos(self.vocab)
        self.n_batch, self.n_seq = n_batch, n_seq
        self.batch = L.llama_batch_init(max(n_batch, n_seq), 0, n_seq)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        out = (L.llama_token * (len(data) + 8))()
        n = L.llama_tokenize(self.vocab, data, len(data), out, len(out), True, False)
        return list(out[:n])

    def _decode(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(tokens)
        if L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed (is n_ctx large enough?)")

    def _sampler(self, sample: bool, top_k: int, seed: int):
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        bias = (L.llama_logit_bias * 1)(L.llama_logit_bias(self.eos, float("-inf")))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(self.n_vocab, 1, bias))
        if sample:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(top_k))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(1.0))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
        else:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        return chain

    def prefill(self, prompts: list[list[int]]) -> list[int]:
        """Decode every prompt (sequence i = prompt i) in batches of n_batch tokens, their last tokens
        together in the final batch (llama.cpp keeps only the last batch's logits); returns the rows of
        that batch whose logits choose each prompt's first new token."""
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        entries = [(t, pos, seq, False) for seq, p in enumerate(prompts) for pos, t in enumerate(p[:-1])]
        for start in range(0, len(entries), self.n_batch):
            self._decode(entries[start:start + self.n_batch])
        self._decode([(p[-1], len(p) - 1, seq, True) for seq, p in enumerate(prompts)])
        return list(range(len(prompts)))

    def generate(self, prompts: list[list[int]], max_new: list[int], sample: bool, top_k: int = 50,
                 seeds: list[int] | None = None) -> list[list[int]]:
        """max_new[i] tokens for prompt i, all sequences decoded together step by step."""
        if len(prompts) > self.n_seq:
            raise ValueError(f"{len(prompts)} prompts for a context of {self.n_seq} sequences")
        samplers = [self._sampler(sample, top_k, (seeds or range(len(prompts)))[i]) for i in range(len(prompts))]
        rows = self.prefill(prompts)
        out: list[list[int]] = [[] for _ in prompts]
        positions = [len(p) for p in prompts]
        try:
            active = [i for i in range(len(prompts)) if max_new[i] > 0]
            while active:
                step = []
                for i in active:
                    token = L.llama_sampler_sample(samplers[i], self.ctx, rows[i])
                    out[i].append(token)
                    if len(out[i]) < max_new[i]:
                        step.append((token, positions[i], i, True))
                        positions[i] += 1
                active = [i for _, _, i, _ in step]
                if step:
                    self._decode(step)
                    rows = {i: row for row, (_, _, i, _) in enumerate(step)}
        finally:
            for s in samplers:
                L.llama_sampler_free(s)
        return out

    def close(self) -> None:
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


__all__ = ["LlamaCppBatched"]
