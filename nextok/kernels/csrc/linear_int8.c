// int8 weights (the bf16 pair layout, one float32 scale per output) times bfloat16 activations;
// the [bf16] tier only.
//
// The activations are quantized per row to int16 (15 bits, finer than bf16's 8): vpdpwssd adds two
// int16 products into each int32 lane. A chunk of 32 k stays far below int32 overflow
// (32 * 127 * 32767 < 2^31); each chunk's sum goes to a float32 total, as in the float kernels.
// Integer sums are exact and each row is quantized alone, so a row's result never depends on the
// other rows: every product of every size takes this path (AMX would compute another rounding).
#ifdef NEXTOK_BF16
#include "products_bf16.h"

// One step of pairs for MT rows of the quantized activations.
ALWAYS_INLINE void dot_rows_int8(__m512i* a0, __m512i* a1, const int16_t* xq, int64_t K, int64_t p, const int8_t* w0,
                                 const int8_t* w1, int MT) {
  __m512i b0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w0 + p * 32)));
  __m512i b1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w1 + p * 32)));
  for (int m = 0; m < MT; m++) {
    int32_t pair;
    memcpy(&pair, xq + m * K + 2 * p, 4);
    __m512i xv = _mm512_set1_epi32(pair);
    a0[m] = _mm512_dpwssd_epi32(a0[m], b0, xv);
    a1[m] = _mm512_dpwssd_epi32(a1[m], b1, xv);
  }
}

ALWAYS_INLINE void micro_int8(const int16_t* xq, const float* xscale, int64_t K, const int8_t* w0, bf16* y,
                              int64_t N, int64_t n, const float* scale, const bf16* bias, int MT, int KS) {
  int64_t K2 = K / 2;
  const int8_t* w1 = w0 + K2 * 32;
  __m512i a0[4][MAX_MT], a1[4][MAX_MT];
  __m512 t0[MAX_MT], t1[MAX_MT];
  for (int m = 0; m < MT; m++) t0[m] = t1[m] = _mm512_setzero_ps();
  for (int64_t c = 0; c < K2; c += CHUNK / 2) {
    int64_t end = c + CHUNK / 2 < K2 ? c + CHUNK / 2 : K2, p = c;
    for (int s = 0; s < KS; s++)
      for (int m = 0; m < MT; m++) a0[s][m] = a1[s][m] = _mm512_setzero_si512();
    for (; p + KS <= end; p += KS)
      for (int s = 0; s < KS; s++) dot_rows_int8(a0[s], a1[s], xq, K, p + s, w0, w1, MT);
    for (; p < end; p++) dot_rows_int8(a0[0], a1[0], xq, K, p, w0, w1, MT);
    for (int m = 0; m < MT; m++) {
      for (int s = 1; s < KS; s++) {
        a0[0][m] = _mm512_add_epi32(a0[0][m], a0[s][m]);
        a1[0][m] = _mm512_add_epi32(a1[0][m], a1[s][m]);
      }
      t0[m] = _mm512_add_ps(t0[m], _mm512_cvtepi32_ps(a0[0][m]));
      t1[m] = _mm512_add_ps(t1[m], _mm512_cvtepi32_ps(a1[0][m]));
    }
  }
  for (int m = 0; m < MT; m++) {
    __m512 xs = _mm512_set1_ps(xscale[m]);
    store_row_bf16(y + m * N, _mm512_mul_ps(t0[m], xs), scale, bias, n, N);
    store_row_bf16(y + m * N, _mm512_mul_ps(t1[m], xs), scale, bias, n + 16, N);
  }
}

ALWAYS_INLINE void tile_int8(const int16_t* xq, const float* xscale, int64_t K, const int8_t* w, bf16* y, int64_t N,
                             int64_t n, const float* scale, const bf16* bias, int MT) {
  switch (MT) {
    case 1: micro_int8(xq, xscale, K, w, y, N, n, scale, bias, 1, 4); break;  // integer sums: any KS is exact
    case 2: micro_int8(xq, xscale, K, w, y, N, n, scale, bias, 2, 4); break;
    case 3: micro_int8(xq, xscale, K, w, y, N, n, scale, bias, 3, 2); break;
    default: micro_int8(xq, xscale, K, w, y, N, n, scale, bias, 4, 2); break;
  }
}

// Symmetric per-row quantization of bf16 activations to int16: xq = round(x / xscale).
static void quantize_rows(const bf16* x, int16_t* xq, float* xscale, int64_t M, int64_t K) {
  for (int64_t m = 0; m < M; m++) {
    __m512 mx = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16)
      mx = _mm512_max_ps(mx, _mm512_abs_ps(load_bf16x16(x + m * K + k, tail_mask16(K - k))));
    float amax = _mm512_reduce_max_ps(mx);
    xscale[m] = amax > 0 ? amax / 32767.0f : 1.0f;
    __m512 inv = _mm512_set1_ps(1.0f / xscale[m]);
    for (int64_t k = 0; k < K; k += 16) {
      __mmask16 mask = tail_mask16(K - k);
      __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load_bf16x16(x + m * K + k, mask), inv));
      _mm256_mask_storeu_epi16(xq + m * K + k, mask, _mm512_cvtsepi32_epi16(q));
    }
  }
}

int linear_int8(const bf16* x, const int8_t* packed, const float* scale, const bf16* bias, bf16* y, int64_t M,
                int64_t K, int64_t N, int threads) {
  if (K % 2) return NEXTOK_EINVAL;
  int16_t* xq = malloc(sizeof(int16_t) * M * K);
  float* xscale = malloc(sizeof(float) * M);
  if (!xq || !xscale) {
    free(xq);
    free(xscale);
    return NEXTOK_ENOMEM;
  }
  quantize_rows(x, xq, xscale, M, K);
  int64_t pairs = (N + 31) / 32;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < pairs; t++) {
    const int8_t* w = packed + t * 32 * K;
    for (int64_t m0 = 0; m0 < M; m0 += MAX_MT)
      tile_int8(xq + m0 * K, xscale + m0, K, w, y + m0 * N, N, t * 32, scale, bias,
                M - m0 >= MAX_MT ? MAX_MT : (int)(M - m0));
  }
  free(xq);
  free(xscale);
  return NEXTOK_OK;
}
#endif
