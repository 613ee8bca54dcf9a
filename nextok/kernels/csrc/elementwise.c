// Row-wise and element-wise kernels: RMSNorm with the residual add, SwiGLU, rotary embedding with
// the KV-cache write, and the bf16 -> float32 conversion of logits. Each has a float32 and a bf16
// entry point over one always-inline body, compiled once per dtype.
#include "common.h"

// out = x / sqrt(mean(x^2) + eps) * weight, row by row; with `residual`, first residual += x and
// the sum is normalised (the residual stream of a pre-norm transformer).
ALWAYS_INLINE void rms_norm_rows(const void* x, void* residual, const void* weight, void* out, int64_t rows,
                                 int64_t K, float eps, int bf16_act) {
  for (int64_t i = 0; i < rows; i++) {
    __m512 ss = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      __mmask16 m = tail_mask16(K - k);
      __m512 v = load_act(x, i * K + k, m, bf16_act);
      if (residual) {
        v = _mm512_add_ps(v, load_act(residual, i * K + k, m, bf16_act));
        store_act(residual, i * K + k, v, m, bf16_act);
      }
      ss = _mm512_fmadd_ps(v, v, ss);
    }
    float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)K + eps);
    __m512 scale = _mm512_set1_ps(inv);
    for (int64_t k = 0; k < K; k += 16) {
      __mmask16 m = tail_mask16(K - k);
      __m512 v = residual ? load_act(residual, i * K + k, m, bf16_act) : load_act(x, i * K + k, m, bf16_act);
      store_act(out, i * K + k, _mm512_mul_ps(_mm512_mul_ps(v, scale), load_act(weight, k, m, bf16_act)), m,
                bf16_act);
    }
  }
}

int rms_norm_f32(const float* x, float* residual, const float* weight, float* out, int64_t rows, int64_t K,
                 float eps) {
  rms_norm_rows(x, residual, weight, out, rows, K, eps, 0);
  return NEXTOK_OK;
}

ALWAYS_INLINE __m512 silu512(__m512 a) {
  return _mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), a))));
}

// gate_up (rows, 2I) -> out (rows, I) = silu(gate) * up. In bf16 as PyTorch computes it: silu
// rounded to bf16, then the product rounded.
ALWAYS_INLINE void silu_mul_rows(const void* gate_up, void* out, int64_t rows, int64_t inner, int bf16_act) {
  for (int64_t i = 0; i < rows; i++) {
    for (int64_t k = 0; k < inner; k += 16) {
      __mmask16 m = tail_mask16(inner - k);
      __m512 act = silu512(load_act(gate_up, i * 2 * inner + k, m, bf16_act));
#ifdef NEXTOK_BF16
      if (bf16_act) act = round_bf16(act);
#endif
      store_act(out, i * inner + k, _mm512_mul_ps(act, load_act(gate_up, i * 2 * inner + inner + k, m, bf16_act)), m,
                bf16_act);
    }
  }
}

int silu_mul_f32(const float* gate_up, float* out, int64_t rows, int64_t inner) {
  silu_mul_rows(gate_up, out, rows, inner, 0);
  return NEXTOK_OK;
}

// qkv (N, H + 2 Hkv, D): rotates q and k in place (rotate-half convention, cos/sin (N, D) in
// float32) and writes k and v into the paged cache at the flat slot of each token.
ALWAYS_INLINE void rotary_rows(void* qkv, const float* cos, const float* sin, void* k_cache, void* v_cache,
                               const int64_t* slots, int64_t N, int64_t H, int64_t Hkv, int64_t D, int bf16_act) {
  int64_t heads = H + 2 * Hkv, half = D / 2, el = bf16_act ? 2 : 4;
  for (int64_t t = 0; t < N; t++) {
    const float* c = cos + t * D;
    const float* s = sin + t * D;
    int64_t row = t * heads * D;
    for (int64_t h = 0; h < H + Hkv; h++) {
      int64_t v = row + h * D;
      for (int64_t i = 0; i < half; i += 16) {  // as PyTorch: x * cos + rotate_half(x) * sin
        __mmask16 m = tail_mask16(half - i);
        __m512 a = load_act(qkv, v + i, m, bf16_act), b = load_act(qkv, v + i + half, m, bf16_act);
        __m512 c0 = _mm512_maskz_loadu_ps(m, c + i), s0 = _mm512_maskz_loadu_ps(m, s + i);
        __m512 c1 = _mm512_maskz_loadu_ps(m, c + i + half), s1 = _mm512_maskz_loadu_ps(m, s + i + half);
        store_act(qkv, v + i, _mm512_sub_ps(_mm512_mul_ps(a, c0), _mm512_mul_ps(b, s0)), m, bf16_act);
        store_act(qkv, v + i + half, _mm512_add_ps(_mm512_mul_ps(b, c1), _mm512_mul_ps(a, s1)), m, bf16_act);
      }
    }
    if (k_cache) {
      int64_t slot = slots[t];
      memcpy((char*)k_cache + slot * Hkv * D * el, (char*)qkv + (row + H * D) * el, Hkv * D * el);
      memcpy((char*)v_cache + slot * Hkv * D * el, (char*)qkv + (row + (H + Hkv) * D) * el, Hkv * D * el);
    }
  }
}

int rotary_store_f32(float* qkv, const float* cos, const float* sin, float* k_cache, float* v_cache,
                     const int64_t* slots, int64_t N, int64_t H, int64_t Hkv, int64_t D) {
  if (D % 2) return NEXTOK_EINVAL;
  rotary_rows(qkv, cos, sin, k_cache, v_cache, slots, N, H, Hkv, D, 0);
  return NEXTOK_OK;
}

#ifdef NEXTOK_BF16
int rms_norm_bf16(const bf16* x, bf16* residual, const bf16* weight, bf16* out, int64_t rows, int64_t K, float eps) {
  rms_norm_rows(x, residual, weight, out, rows, K, eps, 1);
  return NEXTOK_OK;
}

int silu_mul_bf16(const bf16* gate_up, bf16* out, int64_t rows, int64_t inner) {
  silu_mul_rows(gate_up, out, rows, inner, 1);
  return NEXTOK_OK;
}

int rotary_store_bf16(bf16* qkv, const float* cos, const float* sin, bf16* k_cache, bf16* v_cache,
                      const int64_t* slots, int64_t N, int64_t H, int64_t Hkv, int64_t D) {
  if (D % 2) return NEXTOK_EINVAL;
  rotary_rows(qkv, cos, sin, k_cache, v_cache, slots, N, H, Hkv, D, 1);
  return NEXTOK_OK;
}
#endif

// bf16 -> float32 (exact), split over the threads: a bfloat16 model's logits, which sampling reads
// as float32 (PyTorch converts them on one thread here).
int bf16_to_f32(const bf16* x, float* y, int64_t n, int threads) {
  int64_t chunks = (n + 4095) / 4096;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t c = 0; c < chunks; c++)
    for (int64_t i = c * 4096; i < n && i < (c + 1) * 4096; i += 16) {
      __mmask16 m = tail_mask16(n - i);
      _mm512_mask_storeu_ps(y + i, m, load_bf16x16(x + i, m));
    }
  return NEXTOK_OK;
}
