// A whole step in one call: the decoder layers of a Llama-family model for the new tokens of a batch
// (one per sequence when decoding, chunks of prompts when prefilling, both mixed). The same kernels in
// the same order as the per-op path (nextok/models/llama.py), without returning to Python between them. Activations are float32 (float32 weights) or bf16 (bf16
// or int8 weights); a linear with a scale is int8.
#include "common.h"

static int run_linear(const Linear* L, const void* x, void* y, int64_t M, int64_t K, int use_bf16, int threads) {
#ifdef NEXTOK_BF16
  if (L->scale)
    return linear_int8(x, L->packed, L->scale, L->bias, y, M, K, L->n, threads);
  if (use_bf16) return linear_bf16(x, L->packed, (int)L->format, L->bias, y, M, K, L->n, threads);
#endif
  if (L->scale || use_bf16) return NEXTOK_EINVAL;
  return linear_f32(x, L->packed, (int)L->format, L->bias, y, M, K, L->n, threads);
}

static int run_norm(const void* x, void* residual, const void* w, void* out, int64_t B, int64_t K, float eps,
                    int use_bf16) {
#ifdef NEXTOK_BF16
  if (use_bf16) return rms_norm_bf16(x, residual, w, out, B, K, eps);
#endif
  return rms_norm_f32(x, residual, w, out, B, K, eps);
}

// Attention of the step: rotate q and k, write k and v to the cache, attend.
static int run_attention(const DecoderLayer* L, void* qkv, void* attn, const float* cos, const float* sin,
                         const int64_t* slots, const int64_t* block_tables, int64_t max_blocks,
                         const int64_t* query_start, const int64_t* context_lens, int64_t N, int64_t B, int64_t H,
                         int64_t Hkv, int64_t D, int64_t block_size, float scale, int use_bf16, int threads) {
  int64_t heads = H + 2 * Hkv;
#ifdef NEXTOK_BF16
  if (use_bf16) {
    int status = rotary_store_bf16(qkv, cos, sin, L->k_cache, L->v_cache, slots, N, H, Hkv, D);
    return status ? status : paged_attention_bf16(qkv, heads * D, L->k_cache, L->v_cache, block_tables, max_blocks,
                                                  query_start, context_lens, attn, B, H, Hkv, D, block_size, scale,
                                                  threads);
  }
#endif
  int status = rotary_store_f32(qkv, cos, sin, L->k_cache, L->v_cache, slots, N, H, Hkv, D);
  return status ? status : paged_attention_f32(qkv, heads * D, L->k_cache, L->v_cache, block_tables, max_blocks,
                                               query_start, context_lens, attn, B, H, Hkv, D, block_size, scale,
                                               threads);
}

static int silu(const void* gate_up, void* act, int64_t B, int64_t inner, int use_bf16) {
#ifdef NEXTOK_BF16
  if (use_bf16) return silu_mul_bf16(gate_up, act, B, inner);
#endif
  return silu_mul_f32(gate_up, act, B, inner);
}

int forward_layers(const DecoderLayer* layers, int64_t n_layers, const void* final_norm, void* x, const float* cos,
                   const float* sin, const int64_t* slots, const int64_t* block_tables, int64_t max_blocks,
                   const int64_t* query_start, const int64_t* context_lens, int64_t N, int64_t B, int64_t hidden,
                   int64_t inner, int64_t H, int64_t Hkv, int64_t D, int64_t block_size, float eps, float scale,
                   int use_bf16, int threads) {
#ifndef NEXTOK_BF16
  if (use_bf16) return NEXTOK_EINVAL;
#endif
  if (n_layers < 1 || N < 0 || B < 1) return NEXTOK_EINVAL;
  if (N == 0) return NEXTOK_OK;
  size_t el = use_bf16 ? 2 : 4;
  int64_t heads = H + 2 * Hkv;
  char* h = malloc(el * N * hidden);
  char* delta = malloc(el * N * hidden);
  char* qkv = malloc(el * N * heads * D);
  char* attn = malloc(el * N * H * D);
  char* gate_up = malloc(el * N * 2 * inner);
  char* act = malloc(el * N * inner);
  int status = h && delta && qkv && attn && gate_up && act ? NEXTOK_OK : NEXTOK_ENOMEM;
  for (int64_t l = 0; l < n_layers && status == NEXTOK_OK; l++) {
    const DecoderLayer* L = layers + l;
    status = run_norm(l == 0 ? x : delta, l == 0 ? NULL : x, L->input_norm, h, N, hidden, eps, use_bf16);
    if (!status) status = run_linear(&L->qkv, h, qkv, N, hidden, use_bf16, threads);
    if (!status)
      status = run_attention(L, qkv, attn, cos, sin, slots, block_tables, max_blocks, query_start, context_lens, N, B,
                             H, Hkv, D, block_size, scale, use_bf16, threads);
    if (!status) status = run_linear(&L->o, attn, delta, N, H * D, use_bf16, threads);
    if (!status) status = run_norm(delta, x, L->post_norm, h, N, hidden, eps, use_bf16);
    if (!status) status = run_linear(&L->gate_up, h, gate_up, N, hidden, use_bf16, threads);
    if (!status) status = silu(gate_up, act, N, inner, use_bf16);
    if (!status) status = run_linear(&L->down, act, delta, N, inner, use_bf16, threads);
  }
  if (!status) status = run_norm(delta, x, final_norm, h, N, hidden, eps, use_bf16);
  if (!status) memcpy(x, h, el * N * hidden);
  free(h);
  free(delta);
  free(qkv);
  free(attn);
  free(gate_up);
  free(act);
  return status;
}
