// bfloat16 products on AVX-512 (vdpbf16ps) where the CPU has no AMX, on AMX tiles (amx.c) where it has.
//
// Either way every row adds in the same order whatever the number of rows, so a request's output
// never depends on what else is in its batch: here two partial sums per 32-step chunk (even and odd
// pairs of k) for every tile of up to 4 rows; on AMX, each row's products in tile order.
#ifdef NEXTOK_BF16
#include "products_bf16.h"

bf16* wide_buffer(int format, int64_t K, int* failed) {
  if (format == FORMAT_DENSE) return NULL;
  bf16* wide = alloc_aligned((32 * K > 2048 ? 32 * K : 2048) * sizeof(bf16));
  if (!wide) *failed = 1;
  return wide;
}

const bf16* pair_weights_bf16(const void* packed, int format, int64_t t, int64_t K, bf16* wide) {
  if (format == FORMAT_DENSE) return (const bf16*)packed + t * 32 * K;
  const char* w = (const char*)packed + t * 2 * block_stride_f32(K, format);
  for (int64_t g = 0; g < K / CHUNK; g++) {
    widen_group_bf16(w, g, format, wide + g * 512);
    widen_group_bf16(w + block_stride_f32(K, format), g, format, wide + 16 * K + g * 512);
  }
  return wide;
}

// One step of pairs for MT rows: a0[m] += b0 . x[m, 2p..2p+1], a1[m] += b1 . x[m, 2p..2p+1].
ALWAYS_INLINE void dot_rows_bf16(__m512* a0, __m512* a1, const bf16* x, int64_t K, int64_t p, const bf16* w0,
                                 const bf16* w1, int MT) {
  __m512bh b0 = (__m512bh)_mm512_loadu_si512(w0 + p * 32);
  __m512bh b1 = (__m512bh)_mm512_loadu_si512(w1 + p * 32);
  for (int m = 0; m < MT; m++) {
    int32_t pair;
    memcpy(&pair, x + m * K + 2 * p, 4);
    __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
    a0[m] = _mm512_dpbf16_ps(a0[m], b0, xv);
    a1[m] = _mm512_dpbf16_ps(a1[m], b1, xv);
  }
}

// w0: two adjacent column blocks of bf16 pairs. KS partial sums, restarting every CHUNK steps of k.
ALWAYS_INLINE void micro_bf16(const bf16* x, int64_t K, const bf16* w0, bf16* y, int64_t N, int64_t n,
                              const float* scale, const bf16* bias, int MT, int KS) {
  int64_t K2 = K / 2;
  const bf16* w1 = w0 + K2 * 32;
  __m512 a0[4][MAX_MT], a1[4][MAX_MT], t0[MAX_MT], t1[MAX_MT];
  for (int m = 0; m < MT; m++) t0[m] = t1[m] = _mm512_setzero_ps();
  for (int64_t c = 0; c < K2; c += CHUNK / 2) {
    int64_t end = c + CHUNK / 2 < K2 ? c + CHUNK / 2 : K2, p = c;
    for (int s = 0; s < KS; s++)
      for (int m = 0; m < MT; m++) a0[s][m] = a1[s][m] = _mm512_setzero_ps();
    for (; p + KS <= end; p += KS)
      for (int s = 0; s < KS; s++) dot_rows_bf16(a0[s], a1[s], x, K, p + s, w0, w1, MT);
    for (; p < end; p++) dot_rows_bf16(a0[0], a1[0], x, K, p, w0, w1, MT);
    for (int m = 0; m < MT; m++)
      for (int s = 0; s < KS; s++) {
        t0[m] = _mm512_add_ps(t0[m], a0[s][m]);
        t1[m] = _mm512_add_ps(t1[m], a1[s][m]);
      }
  }
  for (int m = 0; m < MT; m++) {
    store_row_bf16(y + m * N, t0[m], scale, bias, n, N);
    store_row_bf16(y + m * N, t1[m], scale, bias, n + 16, N);
  }
}

ALWAYS_INLINE void tile_bf16(const bf16* x, int64_t K, const bf16* w, bf16* y, int64_t N, int64_t n,
                             const bf16* bias, int MT) {
  switch (MT) {  // constant rows, so the accumulators stay in registers; the same 2 partial sums for all
    case 1: micro_bf16(x, K, w, y, N, n, NULL, bias, 1, 2); break;
    case 2: micro_bf16(x, K, w, y, N, n, NULL, bias, 2, 2); break;
    case 3: micro_bf16(x, K, w, y, N, n, NULL, bias, 3, 2); break;
    default: micro_bf16(x, K, w, y, N, n, NULL, bias, 4, 2); break;
  }
}

int linear_bf16(const bf16* x, const void* packed, int format, const bf16* bias, bf16* y, int64_t M, int64_t K,
                int64_t N, int threads) {
  if (!known_format(format) || K % 2 || (format != FORMAT_DENSE && K % (super_blocks(format) ? 8 * CHUNK : CHUNK)))
    return NEXTOK_EINVAL;
  if (use_amx(M, K, 1)) return linear_amx(x, packed, format, NULL, bias, y, M, K, N, threads);
  int64_t pairs = (N + 31) / 32;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    bf16* wide = wide_buffer(format, K, &failed);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < pairs; t++) {
      if (failed) continue;
      const bf16* w = pair_weights_bf16(packed, format, t, K, wide);
      for (int64_t m0 = 0; m0 < M; m0 += MAX_MT)
        tile_bf16(x + m0 * K, K, w, y + m0 * N, N, t * 32, bias, M - m0 >= MAX_MT ? MAX_MT : (int)(M - m0));
    }
    free(wide);
  }
  return failed ? NEXTOK_ENOMEM : NEXTOK_OK;
}
#endif
