// float32 products: y (M, N) = x (M, K) @ W^T (+ bias), W dense or in a block format (blocks.h).
//
// A decode step multiplies a few activation rows by every weight matrix: the work is bound by
// streaming the weights. W is packed with its output columns in blocks of 16, each block's weights
// contiguous and k-major (block b holds W[16b + j, k] at packed[(b * K + k) * 16 + j]), so one vector
// load feeds 16 outputs and no horizontal sums are needed. A micro-kernel keeps 2 column blocks x MT
// rows of accumulators in registers; threads take whole pairs of column blocks, so each streams its
// own contiguous part of W. N is padded with zero rows to a multiple of 32; column tails are masked.
#include "blocks.h"

#define MAX_MT 4
// Up to 8 rows in one pass (5-8 with one partial sum each and the totals in memory), so that a
// block-format matrix is widened once for a beam search's or a small batch's rows.
#define MAX_MT_F32 8

ALWAYS_INLINE void store_row_f32(float* y, __m512 v, const float* bias, int64_t n, int64_t N) {
  __mmask16 m = n >= N ? 0 : tail_mask16(N - n);
  if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + n));
  _mm512_mask_storeu_ps(y + n, m, v);
}

// One step of k for MT rows: a0[m] += b0 * x[m, kk], a1[m] += b1 * x[m, kk].
ALWAYS_INLINE void fma_rows(__m512* a0, __m512* a1, const float* x, int64_t K, int64_t kk, __m512 b0, __m512 b1,
                            int MT) {
  for (int m = 0; m < MT; m++) {
    __m512 xv = _mm512_set1_ps(x[m * K + kk]);
    a0[m] = _mm512_fmadd_ps(b0, xv, a0[m]);
    a1[m] = _mm512_fmadd_ps(b1, xv, a1[m]);
  }
}

// Columns n..n+31 of MT rows over k in [k0, k1). KS independent partial sums hide the FMA latency
// when MT is small; they restart every CHUNK steps of k and are added into a total, so rounding
// grows with CHUNK + K / CHUNK additions instead of K. The totals stay in registers where
// totals == NULL (at most 4 rows), else in memory (MT x 32 floats), updated once a chunk: the
// same additions in the same order either way. finish: add the bias and store the rows in y.
// chunk: the weights are one chunk widened to the dense layout (32 k x 16 floats a block), the
// chunk at k0, which pair_f32 widens once for all the rows of a block-format product.
ALWAYS_INLINE void micro_f32(const float* x, int64_t K, const void* w0v, float* y, int64_t N, int64_t n,
                             const float* bias, int MT, int KS, int F, int64_t k0, int64_t k1, float* totals,
                             int chunk, int finish) {
  const char* w0 = (const char*)w0v;
  const char* w1 = w0 + (chunk ? CHUNK * 16 * 4 : block_stride_f32(K, F));
  __m512 a0[4][MAX_MT_F32], a1[4][MAX_MT_F32], t0[MAX_MT_F32], t1[MAX_MT_F32];
  if (!totals)
    for (int m = 0; m < MT; m++) t0[m] = t1[m] = _mm512_setzero_ps();
  for (int64_t c = k0; c < k1; c += CHUNK) {
    int64_t end = c + CHUNK < K ? c + CHUNK : K, k = c;
    for (int s = 0; s < KS; s++)
      for (int m = 0; m < MT; m++) a0[s][m] = a1[s][m] = _mm512_setzero_ps();
    if (F == FORMAT_DENSE) {
      const float *d0 = (const float*)w0, *d1 = (const float*)w1;
      int64_t first = chunk ? k0 : 0;  // the k of the weights' first row
      for (; k + KS <= end; k += KS)
        for (int s = 0; s < KS; s++)
          fma_rows(a0[s], a1[s], x, K, k + s, _mm512_loadu_ps(d0 + (k + s - first) * 16),
                   _mm512_loadu_ps(d1 + (k + s - first) * 16), MT);
      for (; k < end; k++)
        fma_rows(a0[0], a1[0], x, K, k, _mm512_loadu_ps(d0 + (k - first) * 16), _mm512_loadu_ps(d1 + (k - first) * 16),
                 MT);
    } else {  // K % CHUNK == 0: steps go in pairs, k and k + 1 to partial sums s and s + 1 (KS 1: both to 0)
      const char *g0 = w0 + c / CHUNK * GROUP_BYTES(F), *g1 = w1 + c / CHUNK * GROUP_BYTES(F);
      prefetch_ahead(g0, F);
      prefetch_ahead(g1, F);
      __m512 s0, s1, m0, m1;
      const char* q0 = group_f32(w0, c / CHUNK, F, &s0, &m0);
      const char* q1 = group_f32(w1, c / CHUNK, F, &s1, &m1);
      for (int p = 0; p < CHUNK / 2; p += KS > 1 ? KS / 2 : 1)
        for (int s = 0; s < KS; s += 2) {
          int pp = p + s / 2;
          __m512 lo0, hi0, lo1, hi1;
          widen_pair_f32(q0, pp, F, s0, m0, &lo0, &hi0);
          widen_pair_f32(q1, pp, F, s1, m1, &lo1, &hi1);
          fma_rows(a0[s], a1[s], x, K, c + 2 * pp, lo0, lo1, MT);
          fma_rows(a0[(s + 1) % KS], a1[(s + 1) % KS], x, K, c + 2 * pp + 1, hi0, hi1, MT);
        }
    }
    for (int m = 0; m < MT; m++) {
      __m512 s0 = totals ? _mm512_loadu_ps(totals + 32 * m) : t0[m];
      __m512 s1 = totals ? _mm512_loadu_ps(totals + 32 * m + 16) : t1[m];
      for (int s = 0; s < KS; s++) {
        s0 = _mm512_add_ps(s0, a0[s][m]);
        s1 = _mm512_add_ps(s1, a1[s][m]);
      }
      if (totals) {
        _mm512_storeu_ps(totals + 32 * m, s0);
        _mm512_storeu_ps(totals + 32 * m + 16, s1);
      } else {
        t0[m] = s0, t1[m] = s1;
      }
    }
  }
  for (int m = 0; finish && m < MT; m++) {
    store_row_f32(y + m * N, totals ? _mm512_loadu_ps(totals + 32 * m) : t0[m], bias, n, N);
    store_row_f32(y + m * N, totals ? _mm512_loadu_ps(totals + 32 * m + 16) : t1[m], bias, n + 16, N);
  }
}

// One tile of MT rows (1-8), all of K or the chunk [k0, k1): the partial sums per row count and
// where the totals live (registers up to 4 rows; `spill` for 5-8, or `totals` where given).
ALWAYS_INLINE void tile_f32(const float* x, int64_t K, const void* w, float* y, int64_t N, int64_t n,
                            const float* bias, int MT, int F, int64_t k0, int64_t k1, float* totals, float* spill,
                            int chunk, int finish) {
  switch (MT) {
    case 1: micro_f32(x, K, w, y, N, n, bias, 1, 4, F, k0, k1, totals, chunk, finish); break;
    case 2: micro_f32(x, K, w, y, N, n, bias, 2, 4, F, k0, k1, totals, chunk, finish); break;
    case 3: micro_f32(x, K, w, y, N, n, bias, 3, 2, F, k0, k1, totals, chunk, finish); break;
    case 4: micro_f32(x, K, w, y, N, n, bias, 4, 2, F, k0, k1, totals, chunk, finish); break;
    case 5: micro_f32(x, K, w, y, N, n, bias, 5, 1, F, k0, k1, spill, chunk, finish); break;
    case 6: micro_f32(x, K, w, y, N, n, bias, 6, 1, F, k0, k1, spill, chunk, finish); break;
    case 7: micro_f32(x, K, w, y, N, n, bias, 7, 1, F, k0, k1, spill, chunk, finish); break;
    default: micro_f32(x, K, w, y, N, n, bias, 8, 1, F, k0, k1, spill, chunk, finish); break;
  }
}

// A tile per format, so that each micro-kernel is compiled for a constant format.
ALWAYS_INLINE void tile_any_f32(const float* x, int64_t K, const void* w, float* y, int64_t N, int64_t n,
                                const float* bias, int MT, int F, float* spill) {
  if (F == FORMAT_DENSE) tile_f32(x, K, w, y, N, n, bias, MT, FORMAT_DENSE, 0, K, NULL, spill, 0, 1);
  else if (F == FORMAT_Q4) tile_f32(x, K, w, y, N, n, bias, MT, FORMAT_Q4, 0, K, NULL, spill, 0, 1);
  else tile_f32(x, K, w, y, N, n, bias, MT, FORMAT_Q8, 0, K, NULL, spill, 0, 1);
}

// Group g of one column block in a block format widened to float32, dst[k * 16 + j] for its 32 k.
static void widen_group_f32(const char* w, int64_t g, int F, float* dst) {
  __m512 scale, min, lo, hi;
  const char* q = group_f32(w, g, F, &scale, &min);
  for (int p = 0; p < CHUNK / 2; p++) {
    widen_pair_f32(q, p, F, scale, min, &lo, &hi);
    _mm512_storeu_ps(dst + 32 * p, lo);
    _mm512_storeu_ps(dst + 32 * p + 16, hi);
  }
}

// The rows of the next tile: a product of up to 8 rows is one tile (5-8: one partial sum each, the
// totals in memory); larger ones go 4 rows at a time with the totals in registers, which keeps a
// long prefill compute-bound on the FMAs. Every path tiles M the same way, so a block-format
// product adds in the same order as the dense one.
ALWAYS_INLINE int tile_rows_f32(int64_t M, int64_t left) {
  return M <= MAX_MT_F32 ? (int)left : left > MAX_MT ? MAX_MT : (int)left;
}

// Columns n..n+31 of all M rows from one pair of column blocks.
static void pair_f32(const float* x, const char* w, int F, const float* bias, float* y, int64_t M, int64_t K,
                     int64_t N, int64_t n, float* scratch) {
  float* spill = scratch;                    // the totals of a 5-8 row tile
  float* chunk = scratch + 32 * MAX_MT_F32;  // one widened chunk, both blocks
  float* totals = chunk + 2 * CHUNK * 16;    // M x 32: every row's totals, chunk by chunk
  if (F == FORMAT_DENSE || M <= MAX_MT_F32) {  // one pass over the weights per tile (one tile for a block format)
    for (int64_t m0 = 0; m0 < M;) {
      int MT = tile_rows_f32(M, M - m0);
      if (MT > 4) memset(spill, 0, sizeof(float) * 32 * MT);
      tile_any_f32(x + m0 * K, K, w, y + m0 * N, N, n, bias, MT, F, spill);
      m0 += MT;
    }
    return;
  }
  // A block format and more rows than one tile: widen each chunk once for all the tiles.
  int64_t stride = block_stride_f32(K, F);
  memset(totals, 0, sizeof(float) * 32 * M);
  for (int64_t c = 0; c < K; c += CHUNK) {
    widen_group_f32(w, c / CHUNK, F, chunk);
    widen_group_f32(w + stride, c / CHUNK, F, chunk + CHUNK * 16);
    for (int64_t m0 = 0; m0 < M;) {
      int MT = tile_rows_f32(M, M - m0);
      tile_f32(x + m0 * K, K, chunk, y + m0 * N, N, n, bias, MT, FORMAT_DENSE, c, c + CHUNK, totals + 32 * m0,
               totals + 32 * m0, 1, 0);
      m0 += MT;
    }
  }
  for (int64_t m = 0; m < M; m++) {
    store_row_f32(y + m * N, _mm512_loadu_ps(totals + 32 * m), bias, n, N);
    store_row_f32(y + m * N, _mm512_loadu_ps(totals + 32 * m + 16), bias, n + 16, N);
  }
}

int linear_f32(const float* x, const void* packed, int format, const float* bias, float* y, int64_t M, int64_t K,
               int64_t N, int threads) {
  if (format != FORMAT_DENSE && format != FORMAT_Q4 && format != FORMAT_Q8) return NEXTOK_EINVAL;
  if (format != FORMAT_DENSE && K % CHUNK) return NEXTOK_EINVAL;
  int64_t pairs = (N + 31) / 32, stride = block_stride_f32(K, format);
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    float* scratch = alloc_aligned(sizeof(float) * (32 * MAX_MT_F32 + 2 * CHUNK * 16 + 32 * M));
    failed = scratch == NULL;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < pairs; t++)
      if (scratch) pair_f32(x, (const char*)packed + t * 2 * stride, format, bias, y, M, K, N, t * 32, scratch);
    free(scratch);
  }
  return failed ? NEXTOK_ENOMEM : NEXTOK_OK;
}
