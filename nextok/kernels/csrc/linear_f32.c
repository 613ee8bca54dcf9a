// float32 products: y (M, N) = x (M, K) @ W^T (+ bias), W dense or in a block format (blocks.h).
//
// A decode step multiplies a few activation rows by every weight matrix: the work is bound by
// streaming the weights. W is packed with its output columns in blocks of 16, each block's weights
// contiguous and k-major (block b holds W[16b + j, k] at packed[(b * K + k) * 16 + j]), so one vector
// load feeds 16 outputs and no horizontal sums are needed. A micro-kernel keeps 2 column blocks x MT
// rows of accumulators in registers; threads take whole pairs of column blocks, so each streams its
// own contiguous part of W. N is padded with zero rows to a multiple of 32; column tails are masked.
#include "blocks.h"

// Every row of a product adds in the same order whatever the number of rows: a request's output
// never depends on what else is in its batch. Per 32-step chunk of k, the even steps go to one
// partial sum and the odd steps to another (hiding the FMA latency), and the chunk adds them to the
// row's total, in that order. Only the tiling changes with the rows: up to 4 rows take both column
// blocks of a pair at once; more rows take one column block at a time, in tiles of up to 8 rows, from
// the block's weights widened once (a block format) where there are more than 8.
#define MAX_MT 8
#define KS 2

ALWAYS_INLINE void store_row_f32(float* y, __m512 v, const float* bias, int64_t n, int64_t N) {
  __mmask16 m = n >= N ? 0 : tail_mask16(N - n);
  if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + n));
  _mm512_mask_storeu_ps(y + n, m, v);
}

// One step of k for MT rows: a0[m] += b0 * x[m, kk], a1[m] += b1 * x[m, kk].
ALWAYS_INLINE void fma_rows(__m512* a0, __m512* a1, const float* x, int64_t K, int64_t kk, __m512 b0, __m512 b1,
                            int MT) {
  UNROLL for (int m = 0; m < MT; m++) {
    __m512 xv = _mm512_set1_ps(x[m * K + kk]);
    a0[m] = _mm512_fmadd_ps(b0, xv, a0[m]);
    a1[m] = _mm512_fmadd_ps(b1, xv, a1[m]);
  }
}

// Steps [c, end) of one chunk for MT rows into the partial sums: W's two column blocks are dense
// (d0, d1: the weights of step k at d + (k - first) * 16) or a group of a block format (w0, w1).
ALWAYS_INLINE void chunk_f32(__m512 (*a0)[MAX_MT], __m512 (*a1)[MAX_MT], const float* x, int64_t K, int64_t c,
                             int64_t end, const float* d0, const float* d1, int64_t first, const char* w0,
                             const char* w1, int F, int MT) {
  UNROLL for (int s = 0; s < KS; s++)
    UNROLL for (int m = 0; m < MT; m++) a0[s][m] = a1[s][m] = _mm512_setzero_ps();
  if (F == FORMAT_DENSE) {
    int64_t k = c;
    for (; k + KS <= end; k += KS)
      UNROLL for (int s = 0; s < KS; s++)
        fma_rows(a0[s], a1[s], x, K, k + s, _mm512_loadu_ps(d0 + (k + s - first) * 16),
                 _mm512_loadu_ps(d1 + (k + s - first) * 16), MT);
    for (; k < end; k++)  // an odd tail: step `end - 1` to the first partial sum
      fma_rows(a0[0], a1[0], x, K, k, _mm512_loadu_ps(d0 + (k - first) * 16), _mm512_loadu_ps(d1 + (k - first) * 16),
               MT);
    return;
  }
  prefetch_ahead(w0 + c / CHUNK * group_bytes(F), F);
  prefetch_ahead(w1 + c / CHUNK * group_bytes(F), F);
  for (int h = 0; h < 2; h++) {  // the group's halves: their own scales and minimums in Q8X
    __m512 s0, s1, m0, m1;
    const char* q0 = group_f32(w0, c / CHUNK, h, F, &s0, &m0);
    const char* q1 = group_f32(w1, c / CHUNK, h, F, &s1, &m1);
    // pair p: step c + 2p to partial sum 0, c + 2p + 1 to 1
    for (int p = h * CHUNK / 4; p < (h + 1) * CHUNK / 4; p++) {
      __m512 lo0, hi0, lo1, hi1;
      widen_pair_f32(q0, p, F, s0, m0, &lo0, &hi0);
      widen_pair_f32(q1, p, F, s1, m1, &lo1, &hi1);
      fma_rows(a0[0], a1[0], x, K, c + 2 * p, lo0, lo1, MT);
      fma_rows(a0[1], a1[1], x, K, c + 2 * p + 1, hi0, hi1, MT);
    }
  }
}

// t += a[0] + a[1], the chunk's partial sums into the running totals, in that order.
ALWAYS_INLINE __m512 add_partials(__m512 t, const __m512 (*a)[MAX_MT], int m) {
  UNROLL for (int s = 0; s < KS; s++) t = _mm512_add_ps(t, a[s][m]);
  return t;
}

// Columns n..n+31 of MT (<= 6) rows over all of K: W streamed once. The totals stay in registers
// where totals == NULL (up to 4 rows), else in memory (MT x 32 floats), updated once a chunk: the
// same additions in the same order either way.
ALWAYS_INLINE void tile_f32(const float* x, int64_t K, const char* w0, const char* w1, float* y, int64_t N, int64_t n,
                            const float* bias, int MT, int F, float* totals) {
  __m512 a0[KS][MAX_MT], a1[KS][MAX_MT], t0[MAX_MT], t1[MAX_MT];
  UNROLL for (int m = 0; m < MT; m++) {
    t0[m] = t1[m] = _mm512_setzero_ps();
    if (totals) _mm512_storeu_ps(totals + 32 * m, t0[m]), _mm512_storeu_ps(totals + 32 * m + 16, t1[m]);
  }
  for (int64_t c = 0; c < K; c += CHUNK) {
    int64_t end = c + CHUNK < K ? c + CHUNK : K;
    chunk_f32(a0, a1, x, K, c, end, (const float*)w0, (const float*)w1, 0, w0, w1, F, MT);
    UNROLL for (int m = 0; m < MT; m++) {
      __m512 s0 = totals ? _mm512_loadu_ps(totals + 32 * m) : t0[m];
      __m512 s1 = totals ? _mm512_loadu_ps(totals + 32 * m + 16) : t1[m];
      s0 = add_partials(s0, (const __m512(*)[MAX_MT])a0, m);
      s1 = add_partials(s1, (const __m512(*)[MAX_MT])a1, m);
      if (totals) _mm512_storeu_ps(totals + 32 * m, s0), _mm512_storeu_ps(totals + 32 * m + 16, s1);
      else t0[m] = s0, t1[m] = s1;
    }
  }
  UNROLL for (int m = 0; m < MT; m++) {
    store_row_f32(y + m * N, totals ? _mm512_loadu_ps(totals + 32 * m) : t0[m], bias, n, N);
    store_row_f32(y + m * N, totals ? _mm512_loadu_ps(totals + 32 * m + 16) : t1[m], bias, n + 16, N);
  }
}

// Steps [c, end) of one chunk for MT rows and one column block (dense d, or a group of a block format w).
ALWAYS_INLINE void chunk1_f32(__m512* a, const float* x, int64_t K, int64_t c, int64_t end, const float* d,
                              const char* w, int F, int MT) {
  UNROLL for (int s = 0; s < KS; s++)
    UNROLL for (int m = 0; m < MT; m++) a[s * MAX_MT + m] = _mm512_setzero_ps();
  if (F == FORMAT_DENSE) {
    int64_t k = c;
    for (; k + KS <= end; k += KS)
      UNROLL for (int s = 0; s < KS; s++) {
        __m512 b = _mm512_loadu_ps(d + (k + s) * 16);
        UNROLL for (int m = 0; m < MT; m++) a[s * MAX_MT + m] = _mm512_fmadd_ps(b, _mm512_set1_ps(x[m * K + k + s]), a[s * MAX_MT + m]);
      }
    for (; k < end; k++) {
      __m512 b = _mm512_loadu_ps(d + k * 16);
      UNROLL for (int m = 0; m < MT; m++) a[m] = _mm512_fmadd_ps(b, _mm512_set1_ps(x[m * K + k]), a[m]);
    }
    return;
  }
  prefetch_ahead(w + c / CHUNK * group_bytes(F), F);
  for (int h = 0; h < 2; h++) {
    __m512 scale, min;
    const char* q = group_f32(w, c / CHUNK, h, F, &scale, &min);
    for (int p = h * CHUNK / 4; p < (h + 1) * CHUNK / 4; p++) {
      __m512 lo, hi;
      widen_pair_f32(q, p, F, scale, min, &lo, &hi);
      UNROLL for (int m = 0; m < MT; m++) {
        a[m] = _mm512_fmadd_ps(lo, _mm512_set1_ps(x[m * K + c + 2 * p]), a[m]);
        a[MAX_MT + m] = _mm512_fmadd_ps(hi, _mm512_set1_ps(x[m * K + c + 2 * p + 1]), a[MAX_MT + m]);
      }
    }
  }
}

// Columns n..n+15 (one column block) of MT (<= 8) rows over all of K, the totals in registers.
ALWAYS_INLINE void tile1_f32(const float* x, int64_t K, const float* d, const char* w, float* y, int64_t N, int64_t n,
                             const float* bias, int MT, int F) {
  __m512 a[KS * MAX_MT], t[MAX_MT];
  UNROLL for (int m = 0; m < MT; m++) t[m] = _mm512_setzero_ps();
  for (int64_t c = 0; c < K; c += CHUNK) {
    chunk1_f32(a, x, K, c, c + CHUNK < K ? c + CHUNK : K, d, w, F, MT);
    UNROLL for (int m = 0; m < MT; m++)
      UNROLL for (int s = 0; s < KS; s++) t[m] = _mm512_add_ps(t[m], a[s * MAX_MT + m]);
  }
  UNROLL for (int m = 0; m < MT; m++) store_row_f32(y + m * N, t[m], bias, n, N);
}

// tile1_f32 with constant rows, so the accumulators stay in registers.
ALWAYS_INLINE void tile1_any_f32(const float* x, int64_t K, const float* d, const char* w, float* y, int64_t N,
                                 int64_t n, const float* bias, int MT, int F) {
  switch (MT) {
    case 1: tile1_f32(x, K, d, w, y, N, n, bias, 1, F); break;
    case 2: tile1_f32(x, K, d, w, y, N, n, bias, 2, F); break;
    case 3: tile1_f32(x, K, d, w, y, N, n, bias, 3, F); break;
    case 4: tile1_f32(x, K, d, w, y, N, n, bias, 4, F); break;
    case 5: tile1_f32(x, K, d, w, y, N, n, bias, 5, F); break;
    case 6: tile1_f32(x, K, d, w, y, N, n, bias, 6, F); break;
    case 7: tile1_f32(x, K, d, w, y, N, n, bias, 7, F); break;
    default: tile1_f32(x, K, d, w, y, N, n, bias, 8, F); break;
  }
}

// Group g of one column block in a block format widened to float32, dst[k * 16 + j] for its 32 k.
static void widen_group_f32(const char* w, int64_t g, int F, float* dst) {
  for (int h = 0; h < 2; h++) {
    __m512 scale, min, lo, hi;
    const char* q = group_f32(w, g, h, F, &scale, &min);
    for (int p = h * CHUNK / 4; p < (h + 1) * CHUNK / 4; p++) {
      widen_pair_f32(q, p, F, scale, min, &lo, &hi);
      _mm512_storeu_ps(dst + 32 * p, lo);
      _mm512_storeu_ps(dst + 32 * p + 16, hi);
    }
  }
}

// Tiles of up to 4 rows over both blocks of a pair, the whole of K each: W (dense, or widened into
// the dense layout) is read from L2 once per tile.
ALWAYS_INLINE void pair_tiles_f32(const float* x, int64_t K, const char* w0, const char* w1, float* y, int64_t N,
                                  int64_t n, const float* bias, int64_t M, int F) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const float* xm = x + m0 * K;
    float* ym = y + m0 * N;
    switch (F * 8 + (M - m0 >= 4 ? 4 : (int)(M - m0))) {  // constant rows and format: accumulators in registers
      case FORMAT_DENSE * 8 + 1: tile_f32(xm, K, w0, w1, ym, N, n, bias, 1, FORMAT_DENSE, NULL); break;
      case FORMAT_DENSE * 8 + 2: tile_f32(xm, K, w0, w1, ym, N, n, bias, 2, FORMAT_DENSE, NULL); break;
      case FORMAT_DENSE * 8 + 3: tile_f32(xm, K, w0, w1, ym, N, n, bias, 3, FORMAT_DENSE, NULL); break;
      case FORMAT_DENSE * 8 + 4: tile_f32(xm, K, w0, w1, ym, N, n, bias, 4, FORMAT_DENSE, NULL); break;
      case FORMAT_Q4 * 8 + 1: tile_f32(xm, K, w0, w1, ym, N, n, bias, 1, FORMAT_Q4, NULL); break;
      case FORMAT_Q4 * 8 + 2: tile_f32(xm, K, w0, w1, ym, N, n, bias, 2, FORMAT_Q4, NULL); break;
      case FORMAT_Q4 * 8 + 3: tile_f32(xm, K, w0, w1, ym, N, n, bias, 3, FORMAT_Q4, NULL); break;
      case FORMAT_Q4 * 8 + 4: tile_f32(xm, K, w0, w1, ym, N, n, bias, 4, FORMAT_Q4, NULL); break;
      case FORMAT_Q8 * 8 + 1: tile_f32(xm, K, w0, w1, ym, N, n, bias, 1, FORMAT_Q8, NULL); break;
      case FORMAT_Q8 * 8 + 2: tile_f32(xm, K, w0, w1, ym, N, n, bias, 2, FORMAT_Q8, NULL); break;
      case FORMAT_Q8 * 8 + 3: tile_f32(xm, K, w0, w1, ym, N, n, bias, 3, FORMAT_Q8, NULL); break;
      case FORMAT_Q8 * 8 + 4: tile_f32(xm, K, w0, w1, ym, N, n, bias, 4, FORMAT_Q8, NULL); break;
      case FORMAT_Q8X * 8 + 1: tile_f32(xm, K, w0, w1, ym, N, n, bias, 1, FORMAT_Q8X, NULL); break;
      case FORMAT_Q8X * 8 + 2: tile_f32(xm, K, w0, w1, ym, N, n, bias, 2, FORMAT_Q8X, NULL); break;
      case FORMAT_Q8X * 8 + 3: tile_f32(xm, K, w0, w1, ym, N, n, bias, 3, FORMAT_Q8X, NULL); break;
      case FORMAT_Q8X * 8 + 4: tile_f32(xm, K, w0, w1, ym, N, n, bias, 4, FORMAT_Q8X, NULL); break;
      case FORMAT_Q4K * 8 + 1: tile_f32(xm, K, w0, w1, ym, N, n, bias, 1, FORMAT_Q4K, NULL); break;
      case FORMAT_Q4K * 8 + 2: tile_f32(xm, K, w0, w1, ym, N, n, bias, 2, FORMAT_Q4K, NULL); break;
      case FORMAT_Q4K * 8 + 3: tile_f32(xm, K, w0, w1, ym, N, n, bias, 3, FORMAT_Q4K, NULL); break;
      case FORMAT_Q4K * 8 + 4: tile_f32(xm, K, w0, w1, ym, N, n, bias, 4, FORMAT_Q4K, NULL); break;
      case FORMAT_Q8K * 8 + 1: tile_f32(xm, K, w0, w1, ym, N, n, bias, 1, FORMAT_Q8K, NULL); break;
      case FORMAT_Q8K * 8 + 2: tile_f32(xm, K, w0, w1, ym, N, n, bias, 2, FORMAT_Q8K, NULL); break;
      case FORMAT_Q8K * 8 + 3: tile_f32(xm, K, w0, w1, ym, N, n, bias, 3, FORMAT_Q8K, NULL); break;
      default: tile_f32(xm, K, w0, w1, ym, N, n, bias, 4, FORMAT_Q8K, NULL); break;
    }
  }
}

// A pair of blocks times 5 or 6 rows in one tile, the totals in `spill` (beam search's rows).
ALWAYS_INLINE void tile56_f32(const float* x, int64_t K, const char* w0, const char* w1, float* y, int64_t N,
                              int64_t n, const float* bias, int MT, int F, float* spill) {
  switch (F * 8 + MT) {
    case FORMAT_DENSE * 8 + 5: tile_f32(x, K, w0, w1, y, N, n, bias, 5, FORMAT_DENSE, spill); break;
    case FORMAT_DENSE * 8 + 6: tile_f32(x, K, w0, w1, y, N, n, bias, 6, FORMAT_DENSE, spill); break;
    case FORMAT_Q4 * 8 + 5: tile_f32(x, K, w0, w1, y, N, n, bias, 5, FORMAT_Q4, spill); break;
    case FORMAT_Q4 * 8 + 6: tile_f32(x, K, w0, w1, y, N, n, bias, 6, FORMAT_Q4, spill); break;
    case FORMAT_Q8 * 8 + 5: tile_f32(x, K, w0, w1, y, N, n, bias, 5, FORMAT_Q8, spill); break;
    case FORMAT_Q8 * 8 + 6: tile_f32(x, K, w0, w1, y, N, n, bias, 6, FORMAT_Q8, spill); break;
    case FORMAT_Q8X * 8 + 5: tile_f32(x, K, w0, w1, y, N, n, bias, 5, FORMAT_Q8X, spill); break;
    case FORMAT_Q8X * 8 + 6: tile_f32(x, K, w0, w1, y, N, n, bias, 6, FORMAT_Q8X, spill); break;
    case FORMAT_Q4K * 8 + 5: tile_f32(x, K, w0, w1, y, N, n, bias, 5, FORMAT_Q4K, spill); break;
    case FORMAT_Q4K * 8 + 6: tile_f32(x, K, w0, w1, y, N, n, bias, 6, FORMAT_Q4K, spill); break;
    case FORMAT_Q8K * 8 + 5: tile_f32(x, K, w0, w1, y, N, n, bias, 5, FORMAT_Q8K, spill); break;
    default: tile_f32(x, K, w0, w1, y, N, n, bias, 6, FORMAT_Q8K, spill); break;
  }
}

// Columns n..n+31 of all M rows from one pair of column blocks (w0: the first block). scratch: 6 x 32
// floats of totals, then room for the pair widened (2 x K x 16 floats) where a block format has many rows.
static void pair_f32(const float* x, const char* w0, int F, const float* bias, float* y, int64_t M, int64_t K,
                     int64_t N, int64_t n, float* scratch) {
  const char* w1 = w0 + block_stride_f32(K, F);
  if (M <= 4 || (F == FORMAT_DENSE && M > 8)) {
    pair_tiles_f32(x, K, w0, w1, y, N, n, bias, M, F);
    return;
  }
  if (M <= 6) {  // one tile: W streamed (or widened in registers) once
    tile56_f32(x, K, w0, w1, y, N, n, bias, (int)M, F, scratch);
    return;
  }
  if (M <= MAX_MT) {  // 7-8 rows: one tile per column block, streaming or widening it in registers, once
    const float* d0 = F == FORMAT_DENSE ? (const float*)w0 : NULL;
    const float* d1 = F == FORMAT_DENSE ? (const float*)w1 : NULL;
    if (F == FORMAT_DENSE) {
      tile1_any_f32(x, K, d0, NULL, y, N, n, bias, (int)M, FORMAT_DENSE);
      tile1_any_f32(x, K, d1, NULL, y, N, n + 16, bias, (int)M, FORMAT_DENSE);
    } else if (F == FORMAT_Q4) {
      tile1_any_f32(x, K, NULL, w0, y, N, n, bias, (int)M, FORMAT_Q4);
      tile1_any_f32(x, K, NULL, w1, y, N, n + 16, bias, (int)M, FORMAT_Q4);
    } else if (F == FORMAT_Q8) {
      tile1_any_f32(x, K, NULL, w0, y, N, n, bias, (int)M, FORMAT_Q8);
      tile1_any_f32(x, K, NULL, w1, y, N, n + 16, bias, (int)M, FORMAT_Q8);
    } else if (F == FORMAT_Q8X) {
      tile1_any_f32(x, K, NULL, w0, y, N, n, bias, (int)M, FORMAT_Q8X);
      tile1_any_f32(x, K, NULL, w1, y, N, n + 16, bias, (int)M, FORMAT_Q8X);
    } else if (F == FORMAT_Q4K) {
      tile1_any_f32(x, K, NULL, w0, y, N, n, bias, (int)M, FORMAT_Q4K);
      tile1_any_f32(x, K, NULL, w1, y, N, n + 16, bias, (int)M, FORMAT_Q4K);
    } else {
      tile1_any_f32(x, K, NULL, w0, y, N, n, bias, (int)M, FORMAT_Q8K);
      tile1_any_f32(x, K, NULL, w1, y, N, n + 16, bias, (int)M, FORMAT_Q8K);
    }
    return;
  }
  // A block format and many rows: both blocks widened once into the dense layout, then 4-row tiles.
  float* d0 = scratch + 6 * 32;
  float* d1 = d0 + K * 16;
  for (int64_t g = 0; g < K / CHUNK; g++) {
    widen_group_f32(w0, g, F, d0 + g * CHUNK * 16);
    widen_group_f32(w1, g, F, d1 + g * CHUNK * 16);
  }
  pair_tiles_f32(x, K, (const char*)d0, (const char*)d1, y, N, n, bias, M, FORMAT_DENSE);
}

int linear_f32(const float* x, const void* packed, int format, const float* bias, float* y, int64_t M, int64_t K,
               int64_t N, int threads) {
  if (!known_format(format) || (format != FORMAT_DENSE && K % (super_blocks(format) ? 8 * CHUNK : CHUNK)))
    return NEXTOK_EINVAL;
  int64_t pairs = (N + 31) / 32, stride = block_stride_f32(K, format);
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    int widens = format != FORMAT_DENSE && M > MAX_MT;  // a pair widened whole, 2 x K x 16 floats
    float* scratch = alloc_aligned(sizeof(float) * (6 * 32 + (widens ? 2 * K * 16 : 0)));
    failed = scratch == NULL;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < pairs; t++)
      if (!failed) pair_f32(x, (const char*)packed + t * 2 * stride, format, bias, y, M, K, N, t * 32, scratch);
    free(scratch);
  }
  return failed ? NEXTOK_ENOMEM : NEXTOK_OK;
}
