// Helpers every kernel file shares: masks, bf16 conversions, exp, and allocation.
#ifndef NEXTOK_COMMON_H
#define NEXTOK_COMMON_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "nextok.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))
// Unroll a loop over a micro-kernel's rows or partial sums completely, so that the accumulator arrays
// it indexes become registers (GCC's own limits leave the larger tiles in memory).
#define UNROLL _Pragma("GCC unroll 16")

ALWAYS_INLINE __mmask16 tail_mask16(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

// 16 bf16 -> 16 float32 (exact).
ALWAYS_INLINE __m512 load_bf16x16(const bf16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

#ifdef NEXTOK_BF16
// 16 float32 -> 16 bf16, round to nearest even.
ALWAYS_INLINE void store_bf16x16(bf16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}
// Round 16 floats to bf16 precision and back (nearest even).
ALWAYS_INLINE __m512 round_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}
#endif

// Activations of either dtype: element i of a float32 (bf16 = 0) or bf16 array.
ALWAYS_INLINE __m512 load_act(const void* p, int64_t i, __mmask16 m, int bf16_act) {
#ifdef NEXTOK_BF16
  if (bf16_act) return load_bf16x16((const bf16*)p + i, m);
#endif
  return _mm512_maskz_loadu_ps(m, (const float*)p + i);
}

ALWAYS_INLINE void store_act(void* p, int64_t i, __m512 v, __mmask16 m, int bf16_act) {
#ifdef NEXTOK_BF16
  if (bf16_act) {
    store_bf16x16((bf16*)p + i, v, m);
    return;
  }
#endif
  _mm512_mask_storeu_ps((float*)p + i, m, v);
}

// exp(x) for 16 floats: x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial for e^r, times 2^n.
// About 1 ulp from expf; inputs below -87 give 0, above 88 saturate.
ALWAYS_INLINE __m512 exp512(__m512 x) {
  x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  __m512 y = _mm512_scalef_ps(p, n);
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ), y);
}

// Allocation inside a parallel region: every thread allocates its own buffer, and if any fails the
// region skips its work and the function returns NEXTOK_ENOMEM.
ALWAYS_INLINE void* alloc_aligned(size_t bytes) {
  return aligned_alloc(64, (bytes + 63) / 64 * 64);
}

#endif
