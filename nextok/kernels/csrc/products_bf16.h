// What the bfloat16 and int8 products share (linear_bf16.c, linear_int8.c, amx.c); the [bf16] tier only.
//
// Their weights are packed with k in pairs: W[16b + j, 2p + i] at packed[((b * K2 + p) * 16 + j) * 2 + i],
// K2 = K / 2, which is also AMX's B-tile layout (16 consecutive pairs of a column block are one 1 KiB
// tile with rows 64 bytes apart). bfloat16 weights may also be in the block formats: their values are
// the float32 block values rounded to bf16, as casting the dense float32 matrix rounds them.
#ifndef NEXTOK_PRODUCTS_BF16_H
#define NEXTOK_PRODUCTS_BF16_H

#include "blocks.h"

#define MAX_MT 4
#define HIDDEN __attribute__((visibility("hidden")))

ALWAYS_INLINE void store_row_bf16(bf16* y, __m512 v, const float* scale, const bf16* bias, int64_t n, int64_t N) {
  __mmask16 m = n >= N ? 0 : tail_mask16(N - n);
  if (scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, scale + n));
  if (bias) v = _mm512_add_ps(round_bf16(v), load_bf16x16(bias + n, m));
  store_bf16x16(y + n, v, m);
}

// Group g of a column block in a block format of bfloat16 values, widened into the pair layout
// (dst: 16 pairs x 16 columns x 2). Each group's q bytes are ordered so that the widened vectors fall
// straight into it: lo holds columns 0-7 and hi columns 8-15, lane i being column i / 2 at step
// 2p + i % 2, so one cvtne2ps (round to nearest even; block values are never denormal) gives pair p.
ALWAYS_INLINE void widen_group_bf16(const char* w, int64_t g, int F, bf16* dst) {
  const __m512i first = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  prefetch_ahead(w + g * group_bytes(F), F);
  for (int h = 0; h < 2; h++) {  // pairs 0-7 are steps 0-15 (Q8X: the first scales and minimums), 8-15 the rest
    __m512 scale, min, lo, hi;
    const char* q = group_f32(w, g, h, F, &scale, &min);
    __m512 scale_lo = _mm512_permutexvar_ps(first, scale), min_lo = _mm512_permutexvar_ps(first, min);
    __m512 scale_hi = _mm512_permutexvar_ps(second, scale), min_hi = _mm512_permutexvar_ps(second, min);
    for (int p = h * CHUNK / 4; p < (h + 1) * CHUNK / 4; p++) {
      widen_pair(q, p, F, scale_lo, min_lo, scale_hi, min_hi, &lo, &hi);
      _mm512_store_si512(dst + p * 32, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
}

// A thread's buffer for widened weights: a whole pair (2 x K x 16 values), or two pairs of tiles;
// NULL where the weights are bf16 already (*failed is set where an allocation fails).
HIDDEN bf16* wide_buffer(int format, int64_t K, int* failed);
// Column-block pair t in the bf16 pair layout (2 x K x 16 values): in place where the weights are
// bf16 already, else widened from their block format into `wide`.
HIDDEN const bf16* pair_weights_bf16(const void* packed, int format, int64_t t, int64_t K, bf16* wide);
// Whether a product of M rows runs on the tile unit: AMX granted, at least min_rows rows, K % 32 == 0.
HIDDEN int use_amx(int64_t M, int64_t K, int64_t min_rows);
// The AMX product over all column-block pairs (format as pair_weights_bf16; scale: per output, or NULL).
HIDDEN int linear_amx(const bf16* x, const void* packed, int format, const float* scale, const bf16* bias, bf16* y,
                      int64_t M, int64_t K, int64_t N, int threads);

#endif
