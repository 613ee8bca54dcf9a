// Hand-written AVX-512 kernels for the decode step on the CPU.
//
// A decode step multiplies a few activation rows (one per running sequence) by every weight
// matrix: the work is bound by streaming the weights from memory, and by the number of small
// operations between the products. These kernels stream each weight row once for up to 4
// activation rows at a time, and fuse what PyTorch runs as chains of small ops: RMSNorm with the
// residual add, rotary embedding with the KV-cache write, SwiGLU, and attention that reads the
// paged KV cache through the block table instead of gathering it.
//
// Conventions: matrices are row-major and contiguous unless a leading dimension is passed;
// "bf16" is stored as uint16_t; float32 accumulates everywhere; bf16 results are rounded to
// nearest even, as PyTorch rounds. Work is split over `threads` OpenMP threads (the same libgomp
// PyTorch uses, so the two share one thread pool).
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef uint16_t bf16;

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE __mmask16 tail_mask16(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }
ALWAYS_INLINE __mmask32 tail_mask32(int64_t n) { return n >= 32 ? (__mmask32)0xFFFFFFFF : (__mmask32)((1u << n) - 1); }

// 16 bf16 -> 16 float32 (exact).
ALWAYS_INLINE __m512 load_bf16x16(const bf16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
// 16 float32 -> 16 bf16, round to nearest even.
ALWAYS_INLINE void store_bf16x16(bf16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}
// Round 16 floats to bf16 precision and back (nearest even).
ALWAYS_INLINE __m512 round_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

// ---------------------------------------------------------------------------------------- linear
// y (M, N) = x (M, K) @ W^T (+ bias), W packed by pack_*: output columns in blocks of 16, each
// block's weights contiguous and k-major, so one vector load feeds 16 outputs and no horizontal
// sums are needed. A micro-kernel keeps 2 column blocks x MT rows of accumulators in registers;
// threads take whole pairs of column blocks, so each streams its own contiguous part of W.
//   float32: block b holds W[16b + j, k] at packed[(b * K + k) * 16 + j]
//   bf16 / int8: k in pairs, W[16b + j, 2p + i] at packed[((b * K2 + p) * 16 + j) * 2 + i], K2 = K / 2
// N is padded with zero rows to a multiple of 32. Column tails are masked on store.

#define MAX_MT 4
// float32 takes up to 8 rows in one pass (5-8 with one partial sum each and the totals in memory),
// so that a block-format matrix is widened once for a beam search's or a small batch's rows.
#define MAX_MT_F32 8

ALWAYS_INLINE void store_row_f32(float* y, __m512 v, const float* bias, int64_t n, int64_t N) {
  __mmask16 m = n >= N ? 0 : tail_mask16(N - n);
  if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + n));
  _mm512_mask_storeu_ps(y + n, m, v);
}

// KS independent partial sums hide the FMA latency when MT is small. The partial sums restart
// every CHUNK steps of k and are added into a total: float32 rounding then grows with
// CHUNK + K / CHUNK additions instead of K, about what a blocked BLAS product gives.
#define CHUNK 32

// float32 weights may also be kept in a block format, where every group of 32 weights along k in
// one column shares a scale (and a minimum): the float32 values of a checkpoint stored as GGUF
// Q4_1 or Q8_0 blocks, recognised exactly (pack_blocks in ops.py). The micro-kernel widens them
// in registers to the very float32 values the dense matrix holds, w = q * scale + min (q * scale
// is exact in float32, so the one rounding of the FMA is the dense value's), and then runs the
// same FMAs in the same order: the products equal the dense ones bit for bit, from a fifth (Q4)
// or a quarter (Q8) of the memory traffic.
//   F32_Q4: per column block and group: scale[16] f32, min[16] f32, then 16 pairs of k x 16 bytes,
//           byte j of pair p = q[2p][j] | q[2p + 1][j] << 4 (q unsigned, 0..15)
//   F32_Q8: per column block and group: scale[16] f32, then 32 k x 16 int8 q
enum { F32_DENSE = 0, F32_Q4 = 1, F32_Q8 = 2 };
#define GROUP_BYTES(F) ((F) == F32_Q4 ? 384 : 576)
#ifndef PREFETCH_GROUPS
#define PREFETCH_GROUPS 4
#endif
#ifndef PREFETCH_FAR
#define PREFETCH_FAR 24
#endif

// Bytes between two column blocks of a packed float32 matrix.
ALWAYS_INLINE int64_t block_stride_f32(int64_t K, int F) {
  return F == F32_DENSE ? K * 16 * 4 : K / CHUNK * GROUP_BYTES(F);
}

// Prefetches for the group at `group`: the one PREFETCH_GROUPS ahead into L1 (the widening leaves the
// hardware prefetcher behind) and the one PREFETCH_FAR ahead into L2 (the prefetcher stops at page ends).
ALWAYS_INLINE void prefetch_ahead(const char* group, int F) {
  for (int line = 0; line < GROUP_BYTES(F); line += 64) {
    _mm_prefetch(group + PREFETCH_GROUPS * GROUP_BYTES(F) + line, _MM_HINT_T0);
    if (PREFETCH_FAR) _mm_prefetch(group + PREFETCH_FAR * GROUP_BYTES(F) + line, _MM_HINT_T1);
  }
}

// Group g of a column block in a block format: its scale and minimum (0 for Q8); returns its q bytes.
ALWAYS_INLINE const char* group_f32(const char* block, int64_t g, int F, __m512* scale, __m512* min) {
  const char* h = block + g * GROUP_BYTES(F);
  *scale = _mm512_loadu_ps(h);
  *min = F == F32_Q4 ? _mm512_loadu_ps(h + 64) : _mm512_setzero_ps();
  return h + (F == F32_Q4 ? 128 : 64);
}

// Pair p of a group's q bytes widened to two vectors of float32 values: lo from the low nibbles
// (Q8: the first 16 bytes) with scale_lo and min_lo, hi from the high nibbles (the next 16 bytes).
// In the float32 layout lo is step k = 2p and hi step 2p + 1 of the 16 columns, and both take the
// group's scale and minimum; the bfloat16 layout (widen_group_bf16) orders the bytes otherwise.
ALWAYS_INLINE void widen_pair(const char* q, int p, int F, __m512 scale_lo, __m512 min_lo, __m512 scale_hi,
                              __m512 min_hi, __m512* lo, __m512* hi) {
  if (F == F32_Q4) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(q + p * 16)));
    *lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0F))), scale_lo, min_lo);
    *hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), scale_hi, min_hi);
  } else {
    const __m128i* b = (const __m128i*)(q + p * 32);
    *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b))), scale_lo);
    *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b + 1))), scale_hi);
  }
}
ALWAYS_INLINE void widen_pair_f32(const char* q, int p, int F, __m512 scale, __m512 min, __m512* lo, __m512* hi) {
  widen_pair(q, p, F, scale, min, scale, min, lo, hi);
}

// Columns n..n+31 of MT rows over k in [k0, k1). The running totals stay in registers where
// totals == NULL (at most 4 rows), else in memory (MT x 32 floats), updated once a chunk: the
// same additions in the same order either way. finish: add the bias and store the rows in y.
// chunk: the weights are one chunk widened to the dense layout (32 k x 16 floats a block), the
// chunk at k0, which linear_f32 widens once for all the rows of a block-format product.
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
#define FMA_ROWS(S, KK, B0, B1)                                                                  \
  for (int m = 0; m < MT; m++) {                                                                 \
    __m512 xv = _mm512_set1_ps(x[m * K + (KK)]);                                                 \
    a0[S][m] = _mm512_fmadd_ps(B0, xv, a0[S][m]);                                                \
    a1[S][m] = _mm512_fmadd_ps(B1, xv, a1[S][m]);                                                \
  }
    if (F == F32_DENSE) {
      const float *d0 = (const float*)w0, *d1 = (const float*)w1;
      int64_t first = chunk ? k0 : 0;  // the k of the weights' first row
#define STEP(S, KK) FMA_ROWS(S, KK, _mm512_loadu_ps(d0 + ((KK) - first) * 16), _mm512_loadu_ps(d1 + ((KK) - first) * 16))
      for (; k + KS <= end; k += KS)
        for (int s = 0; s < KS; s++) STEP(s, k + s)
      for (; k < end; k++) STEP(0, k)
#undef STEP
    } else {  // K % CHUNK == 0: steps go in pairs, k and k + 1 to partial sums s and s + 1 (KS 1: both to 0)
      const char *g0 = w0 + c / CHUNK * GROUP_BYTES(F), *g1 = w1 + c / CHUNK * GROUP_BYTES(F);
      prefetch_ahead(g0, F);
      prefetch_ahead(g1, F);
      __m512 s0, s1, m0, m1;
      const char* q0 = group_f32(w0, c / CHUNK, F, &s0, &m0);
      const char* q1 = group_f32(w1, c / CHUNK, F, &s1, &m1);
#define STEP_PAIR(S, P)                                                                          \
  {                                                                                              \
    __m512 lo0, hi0, lo1, hi1;                                                                   \
    widen_pair_f32(q0, P, F, s0, m0, &lo0, &hi0);                                                \
    widen_pair_f32(q1, P, F, s1, m1, &lo1, &hi1);                                                \
    FMA_ROWS(S, c + 2 * (P), lo0, lo1)                                                           \
    FMA_ROWS(((S) + 1) % KS, c + 2 * (P) + 1, hi0, hi1)                                          \
  }
      for (int p = 0; p < CHUNK / 2; p += KS > 1 ? KS / 2 : 1)
        for (int s = 0; s < KS; s += 2) STEP_PAIR(s, p + s / 2)
#undef STEP_PAIR
    }
#undef FMA_ROWS
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

ALWAYS_INLINE void store_row_bf16(bf16* y, __m512 v, const float* scale, const bf16* bias, int64_t n, int64_t N) {
  __mmask16 m = n >= N ? 0 : tail_mask16(N - n);
  if (scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, scale + n));
  if (bias) v = _mm512_add_ps(round_bf16(v), load_bf16x16(bias + n, m));
  store_bf16x16(y + n, v, m);
}

// w0: two adjacent column blocks of bf16 pairs (the int8 path widens into this layout first).
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
#define STEP(S, P)                                                                               \
  {                                                                                              \
    __m512bh b0 = (__m512bh)_mm512_loadu_si512(w0 + (P) * 32);                                   \
    __m512bh b1 = (__m512bh)_mm512_loadu_si512(w1 + (P) * 32);                                   \
    for (int m = 0; m < MT; m++) {                                                               \
      int32_t pair;                                                                              \
      memcpy(&pair, x + m * K + 2 * (P), 4);                                                     \
      __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);                                           \
      a0[S][m] = _mm512_dpbf16_ps(a0[S][m], b0, xv);                                             \
      a1[S][m] = _mm512_dpbf16_ps(a1[S][m], b1, xv);                                             \
    }                                                                                            \
  }
    for (; p + KS <= end; p += KS)
      for (int s = 0; s < KS; s++) STEP(s, p + s)
    for (; p < end; p++) STEP(0, p)
#undef STEP
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

#define DISPATCH_MT(CALL)                                                                        \
  switch (MT) {                                                                                  \
    case 1: CALL(1, 4); break;                                                                   \
    case 2: CALL(2, 4); break;                                                                   \
    case 3: CALL(3, 2); break;                                                                   \
    default: CALL(4, 2); break;                                                                  \
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

// The rows of the next float32 tile: a product of up to 8 rows is one tile (5-8: one partial sum
// each, the totals in memory); larger ones go 4 rows at a time with the totals in registers,
// which keeps a long prefill compute-bound on the FMAs. Every path tiles M the same way, so a
// block-format product adds in the same order as the dense one.
ALWAYS_INLINE int tile_rows_f32(int64_t M, int64_t left) {
  return M <= MAX_MT_F32 ? (int)left : left > MAX_MT ? MAX_MT : (int)left;
}

// One tile of MT rows, all of K or the chunk [k0, k0 + CHUNK) (totals in memory).
#define TILE_F32(MT, F, W, K0, K1, TOTALS, CHUNK_W, FINISH)                                       \
  switch (MT) {                                                                                  \
    case 1: micro_f32(X, K, W, Y, N, n, bias, 1, 4, F, K0, K1, TOTALS, CHUNK_W, FINISH); break; \
    case 2: micro_f32(X, K, W, Y, N, n, bias, 2, 4, F, K0, K1, TOTALS, CHUNK_W, FINISH); break; \
    case 3: micro_f32(X, K, W, Y, N, n, bias, 3, 2, F, K0, K1, TOTALS, CHUNK_W, FINISH); break; \
    case 4: micro_f32(X, K, W, Y, N, n, bias, 4, 2, F, K0, K1, TOTALS, CHUNK_W, FINISH); break; \
    case 5: micro_f32(X, K, W, Y, N, n, bias, 5, 1, F, K0, K1, SPILL, CHUNK_W, FINISH); break;  \
    case 6: micro_f32(X, K, W, Y, N, n, bias, 6, 1, F, K0, K1, SPILL, CHUNK_W, FINISH); break;  \
    case 7: micro_f32(X, K, W, Y, N, n, bias, 7, 1, F, K0, K1, SPILL, CHUNK_W, FINISH); break;  \
    default: micro_f32(X, K, W, Y, N, n, bias, 8, 1, F, K0, K1, SPILL, CHUNK_W, FINISH); break; \
  }

// Columns n..n+31 of all M rows from one pair of column blocks.
static void pair_f32(const float* x, const char* w, int F, const float* bias, float* y, int64_t M, int64_t K,
                     int64_t N, int64_t n, float* scratch) {
  float* spill = scratch;                                // the totals of a 5-8 row tile
  float* chunk = scratch + 32 * MAX_MT_F32;              // one widened chunk, both blocks
  float* totals = chunk + 2 * CHUNK * 16;                // M x 32: every row's totals, chunk by chunk
  if (F == F32_DENSE || M <= MAX_MT_F32) {  // one pass over the weights per tile (one tile for a block format)
    for (int64_t m0 = 0; m0 < M;) {
      int MT = tile_rows_f32(M, M - m0);
      if (MT > 4) memset(spill, 0, sizeof(float) * 32 * MT);
#define X (x + m0 * K)
#define Y (y + m0 * N)
#define SPILL spill
      if (F == F32_DENSE) TILE_F32(MT, F32_DENSE, w, 0, K, NULL, 0, 1)
      else if (F == F32_Q4) TILE_F32(MT, F32_Q4, w, 0, K, NULL, 0, 1)
      else TILE_F32(MT, F32_Q8, w, 0, K, NULL, 0, 1)
#undef SPILL
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
#define SPILL (totals + 32 * m0)
      TILE_F32(MT, F32_DENSE, chunk, c, c + CHUNK, totals + 32 * m0, 1, 0)
#undef SPILL
      m0 += MT;
    }
  }
#undef X
#undef Y
  for (int64_t m = 0; m < M; m++) {
    store_row_f32(y + m * N, _mm512_loadu_ps(totals + 32 * m), bias, n, N);
    store_row_f32(y + m * N, _mm512_loadu_ps(totals + 32 * m + 16), bias, n + 16, N);
  }
}

// format: F32_DENSE, or a block format (K a multiple of 32).
void linear_f32(const float* x, const void* packed, int format, const float* bias, float* y,
                int64_t M, int64_t K, int64_t N, int threads) {
  int64_t pairs = (N + 31) / 32, stride = block_stride_f32(K, format);
#pragma omp parallel num_threads(threads)
  {
    float* scratch = malloc(sizeof(float) * (32 * MAX_MT_F32 + 2 * CHUNK * 16 + 32 * M));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < pairs; t++)
      pair_f32(x, (const char*)packed + t * 2 * stride, format, bias, y, M, K, N, t * 32, scratch);
    free(scratch);
  }
}

// ------------------------------------------------------------------------------ AMX products
// Where the CPU has AMX and Linux grants the tile state (amx_init), bfloat16 products of more
// than a few rows (int8: a dozen, as the weights must be widened first) run on the tile unit: tdpbf16ps multiplies a (rows x 32) tile of x by a
// (32 x 16) tile of W. The packed pair layout is AMX's B-tile layout already: 16 consecutive
// pairs of one column block are one 1 KiB tile with rows 64 bytes apart.
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_ready = 0;

int amx_init(void) {
  amx_ready = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return amx_ready;
}

typedef struct {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} TileConfig;

// Tiles 0, 1: C for two column blocks (rows x 16 float32); 2: A (rows x 32 bf16); 3, 4: B.
static void amx_configure(int rows) {
  TileConfig cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int t = 0; t < 5; t++) {
    cfg.rows[t] = t >= 3 ? 16 : rows;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

static int use_amx(int64_t M, int64_t K, int64_t min_rows) { return amx_ready && M >= min_rows && K % 32 == 0; }

// bfloat16 weights may be kept in the block formats too (F32_Q4 / F32_Q8 groups, pack_blocks with
// dtype bfloat16): their values are the float32 block values rounded to bf16, as casting the
// dense float32 matrix rounds them (cvtne2ps rounds to nearest even; block values are never
// denormal). Each group's q bytes are ordered so that the widened vectors fall straight into the
// pair layout: lo holds columns 0-7 and hi columns 8-15, lane i being column i / 2 at step
// 2p + i % 2, so one cvtne2ps gives pair p of the block.
ALWAYS_INLINE void widen_group_bf16(const char* w, int64_t g, int F, bf16* dst) {
  const __m512i first = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  prefetch_ahead(w + g * GROUP_BYTES(F), F);
  __m512 scale, min, lo, hi;
  const char* q = group_f32(w, g, F, &scale, &min);
  __m512 scale_lo = _mm512_permutexvar_ps(first, scale), min_lo = _mm512_permutexvar_ps(first, min);
  __m512 scale_hi = _mm512_permutexvar_ps(second, scale), min_hi = _mm512_permutexvar_ps(second, min);
  for (int p = 0; p < CHUNK / 2; p++) {
    widen_pair(q, p, F, scale_lo, min_lo, scale_hi, min_hi, &lo, &hi);
    _mm512_store_si512(dst + p * 32, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// Weights of a bf16-activation product: BF16_DENSE (the pair layout), a block format (F32_Q4,
// F32_Q8, bfloat16 values) or int8 (the pair layout, one scale per output applied after).
enum { BF16_DENSE = 0, BF16_INT8 = 3 };

// A thread's buffer for widened weights: a whole pair (2 x K x 16 values), or two pairs of tiles
// (amx_pair); NULL where the weights are bf16 already.
static bf16* wide_buffer(int format, int64_t K) {
  return format == BF16_DENSE ? NULL : (bf16*)aligned_alloc(64, (32 * K > 2048 ? 32 * K : 2048) * sizeof(bf16));
}

// Column-block pair t in the bf16 pair layout (2 x K x 16 values): in place where the weights
// are bf16 already, else widened into `wide`.
static const bf16* pair_weights_bf16(const void* packed, int format, int64_t t, int64_t K, bf16* wide) {
  if (format == BF16_DENSE) return (const bf16*)packed + t * 32 * K;
  if (format == BF16_INT8) {
    const int8_t* q = (const int8_t*)packed + t * 32 * K;
    for (int64_t i = 0; i < 32 * K; i += 32) {
      __m256i v = _mm256_loadu_si256((const __m256i*)(q + i));
      __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
      __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
      _mm512_store_si512(wide + i, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    return wide;
  }
  const char* w = (const char*)packed + t * 2 * block_stride_f32(K, format);
  for (int64_t g = 0; g < K / CHUNK; g++) {
    widen_group_bf16(w, g, format, wide + g * 512);
    widen_group_bf16(w + block_stride_f32(K, format), g, format, wide + 16 * K + g * 512);
  }
  return wide;
}

// A pair of column blocks times rows [m0, m0 + MT). w: the pair layout (2 x K x 16 values; format
// BF16_DENSE), or a pair in a block format, whose groups are widened one at a time into `tiles`
// (two buffers in turn) just before their tile products: the widening overlaps the products and
// the weights are never written out whole.
static void amx_pair(const bf16* x, int64_t K, const void* w, int format, bf16* y, int64_t N, int64_t n,
                     const float* scale, const bf16* bias, int MT, float* cbuf, bf16* tiles) {
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t k = 0; k < K; k += 32) {
    const bf16* b0 = (const bf16*)w + k * 16;
    const bf16* b1 = b0 + K * 16;
    if (format != BF16_DENSE) {
      bf16* b = tiles + (k / 32 & 1) * 1024;
      widen_group_bf16((const char*)w, k / 32, format, b);
      widen_group_bf16((const char*)w + block_stride_f32(K, format), k / 32, format, b + 512);
      b0 = b, b1 = b + 512;
    }
    _tile_loadd(2, x + k, K * 2);
    _tile_loadd(3, b0, 64);
    _tile_loadd(4, b1, 64);
    _tile_dpbf16ps(0, 2, 3);
    _tile_dpbf16ps(1, 2, 4);
  }
  _tile_stored(0, cbuf, 64);
  _tile_stored(1, cbuf + 256, 64);
  for (int m = 0; m < MT; m++) {
    store_row_bf16(y + m * N, _mm512_load_ps(cbuf + m * 16), scale, bias, n, N);
    store_row_bf16(y + m * N, _mm512_load_ps(cbuf + 256 + m * 16), scale, bias, n + 16, N);
  }
}

// The AMX product over all column-block pairs (format: as pair_weights_bf16).
static void linear_amx(const bf16* x, const void* packed, int format, const float* scale, const bf16* bias,
                       bf16* y, int64_t M, int64_t K, int64_t N, int threads) {
  int64_t pairs = (N + 31) / 32;
#pragma omp parallel num_threads(threads)
  {
    float* cbuf = (float*)aligned_alloc(64, 2 * 256 * sizeof(float));
    bf16* wide = wide_buffer(format, K);
    int configured = 0;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < pairs; t++) {
      // One tile of rows: each group is widened as it is used; more: the pair is widened once for all.
      int in_tiles = format != BF16_DENSE && format != BF16_INT8 && M <= 16;
      const void* w = in_tiles ? (const char*)packed + t * 2 * block_stride_f32(K, format)
                               : (const void*)pair_weights_bf16(packed, format, t, K, wide);
      for (int64_t m0 = 0; m0 < M; m0 += 16) {
        int MT = M - m0 >= 16 ? 16 : (int)(M - m0);
        if (MT != configured) {
          amx_configure(MT);
          configured = MT;
        }
        amx_pair(x + m0 * K, K, w, in_tiles ? format : BF16_DENSE, y + m0 * N, N, t * 32, scale, bias, MT, cbuf,
                 wide);
      }
    }
    if (configured) _tile_release();
    free(cbuf);
    free(wide);
  }
}

// format: BF16_DENSE, or a block format of bfloat16 values (K a multiple of 32).
void linear_bf16(const bf16* x, const void* packed, int format, const bf16* bias, bf16* y,
                 int64_t M, int64_t K, int64_t N, int threads) {
  if (use_amx(M, K, 5)) {
    linear_amx(x, packed, format, NULL, bias, y, M, K, N, threads);
    return;
  }
  int64_t pairs = (N + 31) / 32;
#pragma omp parallel num_threads(threads)
  {
    bf16* wide = wide_buffer(format, K);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < pairs; t++) {
      const bf16* w = pair_weights_bf16(packed, format, t, K, wide);
      for (int64_t m0 = 0; m0 < M; m0 += MAX_MT) {
        int MT = M - m0 >= MAX_MT ? MAX_MT : (int)(M - m0);
#define CALL(mt, ks) micro_bf16(x + m0 * K, K, w, y + m0 * N, N, t * 32, NULL, bias, mt, ks)
        DISPATCH_MT(CALL)
#undef CALL
      }
    }
    free(wide);
  }
}

// int8 weights (the bf16 pair layout, one float32 scale per output) times activations quantized
// per row to int16 (15 bits, finer than bf16's 8): vpdpwssd adds two int16 products into each
// int32 lane. A chunk of 32 k stays far below int32 overflow (32 * 127 * 32767 < 2^31); each
// chunk's sum goes to a float32 total, as in the float kernels.
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
#define STEP(S, P)                                                                               \
  {                                                                                              \
    __m512i b0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w0 + (P) * 32)));       \
    __m512i b1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w1 + (P) * 32)));       \
    for (int m = 0; m < MT; m++) {                                                               \
      int32_t pair;                                                                              \
      memcpy(&pair, xq + m * K + 2 * (P), 4);                                                    \
      __m512i xv = _mm512_set1_epi32(pair);                                                      \
      a0[S][m] = _mm512_dpwssd_epi32(a0[S][m], b0, xv);                                          \
      a1[S][m] = _mm512_dpwssd_epi32(a1[S][m], b1, xv);                                          \
    }                                                                                            \
  }
    for (; p + KS <= end; p += KS)
      for (int s = 0; s < KS; s++) STEP(s, p + s)
    for (; p < end; p++) STEP(0, p)
#undef STEP
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

void linear_int8(const bf16* x, const int8_t* packed, const float* scale, const bf16* bias, bf16* y,
                 int64_t M, int64_t K, int64_t N, int threads) {
  if (use_amx(M, K, 12)) {  // bf16 activations on the tile unit: faster from a dozen rows on
    linear_amx(x, packed, BF16_INT8, scale, bias, y, M, K, N, threads);
    return;
  }
  int16_t* xq = (int16_t*)malloc(sizeof(int16_t) * M * K);
  float* xscale = (float*)malloc(sizeof(float) * M);
  for (int64_t m = 0; m < M; m++) {  // symmetric per-row quantization of the activations
    __m512 mx = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(load_bf16x16(x + m * K + k, tail_mask16(K - k))));
    float amax = _mm512_reduce_max_ps(mx);
    xscale[m] = amax > 0 ? amax / 32767.0f : 1.0f;
    __m512 inv = _mm512_set1_ps(1.0f / xscale[m]);
    for (int64_t k = 0; k < K; k += 16) {
      __mmask16 mask = tail_mask16(K - k);
      __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load_bf16x16(x + m * K + k, mask), inv));
      _mm256_mask_storeu_epi16(xq + m * K + k, mask, _mm512_cvtsepi32_epi16(q));
    }
  }
  int64_t pairs = (N + 31) / 32;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < pairs; t++) {
    const int8_t* w = packed + t * 32 * K;
    for (int64_t m0 = 0; m0 < M; m0 += MAX_MT) {
      int MT = M - m0 >= MAX_MT ? MAX_MT : (int)(M - m0);
#define CALL(mt, ks) micro_int8(xq + m0 * K, xscale + m0, K, w, y + m0 * N, N, t * 32, scale, bias, mt, ks)
      DISPATCH_MT(CALL)
#undef CALL
    }
  }
  free(xq);
  free(xscale);
}

// ------------------------------------------------------------------------------------- RMSNorm
// out = x / sqrt(mean(x^2) + eps) * weight, row by row; with `residual`, first residual += x and
// the sum is normalised (the residual stream of a pre-norm transformer).
#define RMS_NORM_BODY(LOAD, STORE, LOADW)                                                       \
  for (int64_t i = 0; i < rows; i++) {                                                          \
    __m512 ss = _mm512_setzero_ps();                                                            \
    for (int64_t k = 0; k < K; k += 16) {                                                       \
      __mmask16 m = tail_mask16(K - k);                                                         \
      __m512 v = LOAD(x + i * K + k, m);                                                        \
      if (residual) {                                                                           \
        v = _mm512_add_ps(v, LOAD(residual + i * K + k, m));                                    \
        STORE(residual + i * K + k, v, m);                                                      \
      }                                                                                         \
      ss = _mm512_fmadd_ps(v, v, ss);                                                           \
    }                                                                                           \
    float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)K + eps);                        \
    __m512 scale = _mm512_set1_ps(inv);                                                         \
    for (int64_t k = 0; k < K; k += 16) {                                                       \
      __mmask16 m = tail_mask16(K - k);                                                         \
      __m512 v = residual ? LOAD(residual + i * K + k, m) : LOAD(x + i * K + k, m);             \
      STORE(out + i * K + k, _mm512_mul_ps(_mm512_mul_ps(v, scale), LOADW(weight + k, m)), m);  \
    }                                                                                           \
  }

#define LOAD_F32(p, m) _mm512_maskz_loadu_ps(m, p)
#define STORE_F32(p, v, m) _mm512_mask_storeu_ps(p, m, v)

void rms_norm_f32(const float* x, float* residual, const float* weight, float* out,
                  int64_t rows, int64_t K, float eps) {
  RMS_NORM_BODY(LOAD_F32, STORE_F32, LOAD_F32)
}

void rms_norm_bf16(const bf16* x, bf16* residual, const bf16* weight, bf16* out,
                   int64_t rows, int64_t K, float eps) {
  RMS_NORM_BODY(load_bf16x16, store_bf16x16, load_bf16x16)
}

// -------------------------------------------------------------------------------------- SwiGLU
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

ALWAYS_INLINE __m512 silu512(__m512 a) {
  return _mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), a))));
}

// gate_up (rows, 2I) -> out (rows, I) = silu(gate) * up.
void silu_mul_f32(const float* gate_up, float* out, int64_t rows, int64_t inner) {
  for (int64_t i = 0; i < rows; i++) {
    const float* g = gate_up + i * 2 * inner;
    for (int64_t k = 0; k < inner; k += 16) {
      __mmask16 m = tail_mask16(inner - k);
      __m512 act = silu512(_mm512_maskz_loadu_ps(m, g + k));
      _mm512_mask_storeu_ps(out + i * inner + k, m, _mm512_mul_ps(act, _mm512_maskz_loadu_ps(m, g + inner + k)));
    }
  }
}

// As PyTorch computes it in bfloat16: silu rounded to bf16, then the product rounded.
void silu_mul_bf16(const bf16* gate_up, bf16* out, int64_t rows, int64_t inner) {
  for (int64_t i = 0; i < rows; i++) {
    const bf16* g = gate_up + i * 2 * inner;
    for (int64_t k = 0; k < inner; k += 16) {
      __mmask16 m = tail_mask16(inner - k);
      __m512 act = silu512(load_bf16x16(g + k, m));
      act = round_bf16(act);
      store_bf16x16(out + i * inner + k, _mm512_mul_ps(act, load_bf16x16(g + inner + k, m)), m);
    }
  }
}

// ------------------------------------------------------------------ rotary + KV-cache write
// qkv (N, H + 2 Hkv, D): rotates q and k in place (rotate-half convention, cos/sin (N, D) in
// float32) and writes k and v into the paged cache at the flat slot of each token.
#define ROTARY_BODY(T, LOAD, STORE)                                                             \
  int64_t heads = H + 2 * Hkv, half = D / 2;                                                    \
  for (int64_t t = 0; t < N; t++) {                                                             \
    const float* c = cos + t * D;                                                               \
    const float* s = sin + t * D;                                                               \
    T* row = qkv + t * heads * D;                                                               \
    for (int64_t h = 0; h < H + Hkv; h++) {                                                     \
      T* v = row + h * D;                                                                       \
      for (int64_t i = 0; i < half; i += 16) { /* as PyTorch: x * cos + rotate_half(x) * sin */  \
        __mmask16 m = tail_mask16(half - i);                                                    \
        __m512 a = LOAD(v + i, m), b = LOAD(v + i + half, m);                                   \
        __m512 c0 = LOAD_F32(c + i, m), s0 = LOAD_F32(s + i, m);                                \
        __m512 c1 = LOAD_F32(c + i + half, m), s1 = LOAD_F32(s + i + half, m);                  \
        STORE(v + i, _mm512_sub_ps(_mm512_mul_ps(a, c0), _mm512_mul_ps(b, s0)), m);             \
        STORE(v + i + half, _mm512_add_ps(_mm512_mul_ps(b, c1), _mm512_mul_ps(a, s1)), m);      \
      }                                                                                         \
    }                                                                                           \
    if (k_cache) {                                                                              \
      int64_t slot = slots[t];                                                                  \
      memcpy(k_cache + slot * Hkv * D, row + H * D, Hkv * D * sizeof(T));                       \
      memcpy(v_cache + slot * Hkv * D, row + (H + Hkv) * D, Hkv * D * sizeof(T));               \
    }                                                                                           \
  }

void rotary_store_f32(float* qkv, const float* cos, const float* sin, float* k_cache, float* v_cache,
                      const int64_t* slots, int64_t N, int64_t H, int64_t Hkv, int64_t D) {
  ROTARY_BODY(float, LOAD_F32, STORE_F32)
}

void rotary_store_bf16(bf16* qkv, const float* cos, const float* sin, bf16* k_cache, bf16* v_cache,
                       const int64_t* slots, int64_t N, int64_t H, int64_t Hkv, int64_t D) {
  ROTARY_BODY(bf16, load_bf16x16, store_bf16x16)
}

// ------------------------------------------------------------------------ paged decode attention
// One new query token per sequence. q: (B, H, D) rows `q_stride` elements apart; caches
// (blocks, block_size, Hkv, D); block_tables (B, max_blocks); out (B, H * D). Each thread takes
// whole sequences (or, with fewer sequences than twice the threads, (sequence, kv head) pairs) and
// reads keys and values straight from their blocks, each key
// and value once for up to ATTN_HEADS query heads of the group (their q and outputs stay in
// registers). A key's dot product with a head is one vector of partial sums; the vectors of 16
// keys are summed across lanes together (sum_lanes16), in the same order _mm512_reduce_add_ps adds.
#define ATTN_HEADS 4

// v[0..16) -> one vector whose lane 4j + i is the lane sum of v[4i + j].
ALWAYS_INLINE __m512 sum_lanes16(const __m512* v) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; i++)  // 128-bit lanes 0, 1: v[2i] lanes k + (k + 8); 2, 3: v[2i + 1]'s
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; i++)  // 128-bit lane j: v[4i + j] lanes k + (k + 4) (+ 8, + 12)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(b[0], b[1]), _mm512_unpackhi_ps(b[0], b[1]));
  __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(b[2], b[3]), _mm512_unpackhi_ps(b[2], b[3]));
  return _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44), _mm512_shuffle_ps(s01, s23, 0xEE));
}

// Heads h0 .. h0 + GS of one (sequence, kv head) pair; nd = vectors per head row. The callers pass
// GS and nd as constants where they can, so that q, the partial sums and the outputs stay in registers.
#define DEFINE_ATTEND_HEADS(NAME, T, LOADK, STORE_OUT)                                              \
  ALWAYS_INLINE void NAME(const T* q, const T* k_cache, const T* v_cache, const int64_t* table, int64_t L,  \
                          int64_t g, int64_t Hkv, int64_t D, int64_t block_size, float scale, float* scores,  \
                          T* out, const int GS, const int nd) {                                      \
    int64_t padded = (L + 15) / 16 * 16;                                                             \
    __m512 qv[16], dots[ATTN_HEADS][16], o[16];                                                      \
    for (int hq = 0; hq < GS; hq++)                                                                  \
      for (int j = 0; j < nd; j++) qv[hq * nd + j] = LOADK(q + hq * D + j * 16, tail_mask16(D - j * 16)); \
    int64_t row = Hkv * D, block = 0, offset = 0; /* key l: block table[block], row offset */       \
    for (int64_t l0 = 0; l0 < L; l0 += 16) {                                                         \
      for (int i = 0; i < 16; i++) { /* key l0 + i to vector 4 (i % 4) + i / 4 */                   \
        int slot = (i % 4) * 4 + i / 4;                                                              \
        __m512 acc[ATTN_HEADS];                                                                      \
        for (int hq = 0; hq < GS; hq++) acc[hq] = _mm512_setzero_ps();                               \
        if (l0 + i < L) {                                                                            \
          const T* kp = k_cache + (table[block] * block_size + offset) * row + g * D;               \
          if (++offset == block_size) block++, offset = 0;                                           \
          for (int j = 0; j < nd; j++) {                                                             \
            __m512 kv = LOADK(kp + j * 16, tail_mask16(D - j * 16));                                 \
            for (int hq = 0; hq < GS; hq++) acc[hq] = _mm512_fmadd_ps(qv[hq * nd + j], kv, acc[hq]); \
          }                                                                                          \
        }                                                                                            \
        for (int hq = 0; hq < GS; hq++) dots[hq][slot] = acc[hq];                                    \
      }                                                                                              \
      for (int hq = 0; hq < GS; hq++)                                                                \
        _mm512_storeu_ps(scores + hq * padded + l0, _mm512_mul_ps(sum_lanes16(dots[hq]), _mm512_set1_ps(scale))); \
    }                                                                                                \
    float total[ATTN_HEADS];                                                                         \
    for (int hq = 0; hq < GS; hq++) {                                                                \
      float* sc = scores + hq * padded;                                                              \
      __m512 top = _mm512_set1_ps(-INFINITY);                                                        \
      for (int64_t l = 0; l < L; l += 16)                                                            \
        top = _mm512_mask_max_ps(top, tail_mask16(L - l), top, _mm512_loadu_ps(sc + l));             \
      __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(top)), sum = _mm512_setzero_ps();            \
      for (int64_t l = 0; l < L; l += 16) {                                                          \
        __m512 e = _mm512_maskz_mov_ps(tail_mask16(L - l), exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + l), best))); \
        _mm512_storeu_ps(sc + l, e);                                                                 \
        sum = _mm512_add_ps(sum, e);                                                                 \
      }                                                                                              \
      total[hq] = _mm512_reduce_add_ps(sum);                                                         \
    }                                                                                                \
    for (int j = 0; j < GS * nd; j++) o[j] = _mm512_setzero_ps();                                    \
    block = offset = 0;                                                                              \
    for (int64_t l = 0; l < L; l++) {                                                                \
      const T* vp = v_cache + (table[block] * block_size + offset) * row + g * D;                   \
      if (++offset == block_size) block++, offset = 0;                                               \
      __m512 p[ATTN_HEADS];                                                                          \
      for (int hq = 0; hq < GS; hq++) p[hq] = _mm512_set1_ps(scores[hq * padded + l]);               \
      for (int j = 0; j < nd; j++) {                                                                 \
        __m512 vv = LOADK(vp + j * 16, tail_mask16(D - j * 16));                                     \
        for (int hq = 0; hq < GS; hq++) o[hq * nd + j] = _mm512_fmadd_ps(p[hq], vv, o[hq * nd + j]); \
      }                                                                                              \
    }                                                                                                \
    for (int hq = 0; hq < GS; hq++) {                                                                \
      __m512 inv = _mm512_set1_ps(1.0f / total[hq]);                                                 \
      for (int j = 0; j < nd; j++)                                                                   \
        STORE_OUT(out + hq * D + j * 16, _mm512_mul_ps(o[hq * nd + j], inv), tail_mask16(D - j * 16)); \
    }                                                                                                \
  }

#define DECODE_ATTENTION_BODY(T, ATTEND)                                                             \
  int64_t group = H / Hkv;                                                                           \
  int nd = (int)((D + 15) / 16), heads = nd <= 4 ? ATTN_HEADS : nd <= 8 ? 2 : 1; /* q, o: <= 16 vectors */ \
  /* a job: a whole sequence, whose cache rows are read in full, where that keeps the threads busy */ \
  int64_t jobs_per_row = B >= 2 * threads ? 1 : Hkv;                                                \
  _Pragma("omp parallel num_threads(threads)") {                                                     \
    float* scores = NULL;                                                                            \
    int64_t capacity = 0;                                                                            \
    _Pragma("omp for schedule(dynamic, 1)") for (int64_t job = 0; job < B * jobs_per_row; job++) {  \
      int64_t b = job / jobs_per_row, L = context_lens[b], padded = (L + 15) / 16 * 16;              \
      if (padded > capacity) {                                                                       \
        free(scores);                                                                                \
        capacity = padded;                                                                           \
        scores = (float*)malloc(sizeof(float) * ATTN_HEADS * padded);                                \
      }                                                                                              \
      int64_t g0 = jobs_per_row == 1 ? 0 : job % Hkv, g1 = jobs_per_row == 1 ? Hkv : g0 + 1;         \
      for (int64_t g = g0; g < g1; g++)                                                              \
      for (int64_t h0 = 0; h0 < group; h0 += heads) {                                                \
        int GS = group - h0 < heads ? (int)(group - h0) : heads;                                     \
        int64_t h = g * group + h0;                                                                  \
        const T* qh = q + b * q_stride + h * D;                                                      \
        T* oh = out + (b * H + h) * D;                                                               \
        const int64_t* table = block_tables + b * max_blocks;                                        \
        switch (D == nd * 16 ? nd * 8 + GS : 0) { /* head sizes 64 and 128: constant loop counts */   \
          case 4 * 8 + 1: ATTEND(qh, k_cache, v_cache, table, L, g, Hkv, 64, block_size, scale, scores, oh, 1, 4); break; \
          case 4 * 8 + 2: ATTEND(qh, k_cache, v_cache, table, L, g, Hkv, 64, block_size, scale, scores, oh, 2, 4); break; \
          case 4 * 8 + 3: ATTEND(qh, k_cache, v_cache, table, L, g, Hkv, 64, block_size, scale, scores, oh, 3, 4); break; \
          case 4 * 8 + 4: ATTEND(qh, k_cache, v_cache, table, L, g, Hkv, 64, block_size, scale, scores, oh, 4, 4); break; \
          case 8 * 8 + 1: ATTEND(qh, k_cache, v_cache, table, L, g, Hkv, 128, block_size, scale, scores, oh, 1, 8); break; \
          case 8 * 8 + 2: ATTEND(qh, k_cache, v_cache, table, L, g, Hkv, 128, block_size, scale, scores, oh, 2, 8); break; \
          default: ATTEND(qh, k_cache, v_cache, table, L, g, Hkv, D, block_size, scale, scores, oh, GS, nd); \
        }                                                                                            \
      }                                                                                              \
    }                                                                                                \
    free(scores);                                                                                    \
  }

DEFINE_ATTEND_HEADS(attend_heads_f32, float, LOAD_F32, STORE_F32)
DEFINE_ATTEND_HEADS(attend_heads_bf16, bf16, load_bf16x16, store_bf16x16)

void decode_attention_f32(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                          const int64_t* block_tables, int64_t max_blocks, const int64_t* context_lens,
                          float* out, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t block_size,
                          float scale, int threads) {
  DECODE_ATTENTION_BODY(float, attend_heads_f32)
}

void decode_attention_bf16(const bf16* q, int64_t q_stride, const bf16* k_cache, const bf16* v_cache,
                           const int64_t* block_tables, int64_t max_blocks, const int64_t* context_lens,
                           bf16* out, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t block_size,
                           float scale, int threads) {
  DECODE_ATTENTION_BODY(bf16, attend_heads_bf16)
}

// ------------------------------------------------------------------------------- conversions
// bf16 -> float32 (exact), split over the threads: a bfloat16 model's logits, which sampling
// reads as float32 (PyTorch converts them on one thread here).
void bf16_to_f32(const bf16* x, float* y, int64_t n, int threads) {
  int64_t chunks = (n + 4095) / 4096;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t c = 0; c < chunks; c++)
    for (int64_t i = c * 4096; i < n && i < (c + 1) * 4096; i += 16) {
      __mmask16 m = tail_mask16(n - i);
      _mm512_mask_storeu_ps(y + i, m, load_bf16x16(x + i, m));
    }
}

// ------------------------------------------------------------------------------- measurement
// Sums n floats with 8 independent accumulators per thread: the rate at which this machine
// streams memory, the ceiling of a batch-1 decode step (benchmarks/kernels.py reports it).
float read_sum_f32(const float* a, int64_t n, int threads) {
  float total = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    __m512 s[8];
    for (int j = 0; j < 8; j++) s[j] = _mm512_setzero_ps();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n / 128; i++)
      for (int j = 0; j < 8; j++) s[j] = _mm512_add_ps(s[j], _mm512_loadu_ps(a + i * 128 + j * 16));
    for (int j = 1; j < 8; j++) s[0] = _mm512_add_ps(s[0], s[j]);
    total += _mm512_reduce_add_ps(s[0]);
  }
  return total;
}

// ------------------------------------------------------------------------------- rows of logits
// Sampling reads each row of the (B, V) logits twice: its k largest values and its logsumexp.
// torch runs both on one thread here; these split the rows over the threads and read each row
// once or twice with AVX-512.

// Reorder v[0..n) (with their columns) so that v[0..k) are the k largest (quickselect, k <= n).
static void select_largest(float* v, int32_t* col, int64_t n, int64_t k) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    float pivot = v[lo + (hi - lo) / 2];
    int64_t i = lo, j = hi;
    while (i <= j) {
      while (v[i] > pivot) i++;
      while (v[j] < pivot) j--;
      if (i <= j) {
        float tv = v[i];
        int32_t tc = col[i];
        v[i] = v[j], col[i] = col[j], v[j] = tv, col[j] = tc;
        i++, j--;
      }
    }
    if (k - 1 <= j) hi = j;       // the k-th largest lies left of the split
    else if (k - 1 >= i) lo = i;  // right of it
    else break;                   // between: equal to the pivot, in place
  }
}

// values, columns (B, k): each row's k largest values in descending order (ties in any order).
// Candidates at or above a running threshold are compress-stored into a buffer, which
// select_largest cuts back to the k largest whenever it fills. NaN is never a candidate. Returns
// the number of rows with fewer than k candidates (rows of NaN), which the caller must redo.
int64_t top_k_f32(const float* x, int64_t B, int64_t V, int64_t k, float* values, int64_t* columns, int threads) {
  int64_t capacity = 4 * k + 1024, short_rows = 0;
#pragma omp parallel num_threads(threads) reduction(+ : short_rows)
  {
    float* buf = malloc(sizeof(float) * (capacity + 16));
    int32_t* col = malloc(sizeof(int32_t) * (capacity + 16));
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B; r++) {
      const float* row = x + r * V;
      int64_t n = 0;
      __m512 threshold = _mm512_set1_ps(-INFINITY);
      for (int64_t c = 0; c < V; c += 16) {
        __mmask16 m = tail_mask16(V - c);
        __m512 v = _mm512_maskz_loadu_ps(m, row + c);
        __mmask16 keep = m & _mm512_cmp_ps_mask(v, threshold, _CMP_GE_OQ);
        if (!keep) continue;
        _mm512_mask_compressstoreu_ps(buf + n, keep, v);
        _mm512_mask_compressstoreu_epi32(col + n, keep, _mm512_add_epi32(_mm512_set1_epi32((int32_t)c), lanes));
        n += __builtin_popcount(keep);
        if (n > capacity - 16) {
          select_largest(buf, col, n, k);
          n = k;
          float low = buf[0];
          for (int64_t i = 1; i < k; i++) low = buf[i] < low ? buf[i] : low;
          threshold = _mm512_set1_ps(low);
        }
      }
      if (n < k) {
        short_rows++;
        continue;
      }
      select_largest(buf, col, n, k);
      for (int64_t i = 1; i < k; i++) {  // insertion sort, descending: k is small next to V
        float v = buf[i];
        int32_t c = col[i];
        int64_t j = i - 1;
        for (; j >= 0 && buf[j] < v; j--) buf[j + 1] = buf[j], col[j + 1] = col[j];
        buf[j + 1] = v, col[j + 1] = c;
      }
      for (int64_t i = 0; i < k; i++) values[r * k + i] = buf[i], columns[r * k + i] = col[i];
    }
    free(buf);
    free(col);
  }
  return short_rows;
}

// out (B,): log(sum(exp(row))) of each row, the maximum taken out first.
void logsumexp_f32(const float* x, int64_t B, int64_t V, float* out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < B; r++) {
    const float* row = x + r * V;
    __m512 best = _mm512_set1_ps(-INFINITY);
    for (int64_t c = 0; c < V; c += 16)
      best = _mm512_mask_max_ps(best, tail_mask16(V - c), best, _mm512_maskz_loadu_ps(tail_mask16(V - c), row + c));
    float top = _mm512_reduce_max_ps(best);
    if (isinf(top)) {  // all -inf, or an inf: what the formula gives without the NaN of inf - inf
      out[r] = top;
      continue;
    }
    __m512 sum = _mm512_setzero_ps(), shift = _mm512_set1_ps(top);
    for (int64_t c = 0; c < V; c += 16) {
      __mmask16 m = tail_mask16(V - c);
      sum = _mm512_mask_add_ps(sum, m, sum, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + c), shift)));
    }
    out[r] = top + logf(_mm512_reduce_add_ps(sum));
  }
}

// ---------------------------------------------------------------------------- a whole decode step
// The decoder layers of a Llama-family model for B sequences that each add one token, in one
// call: the same kernels in the same order as the per-op path (nextok/models/llama.py), without
// returning to Python between them. Activations are float32 (float32 weights) or bf16 (bf16 or
// int8 weights); a linear with a scale is int8.
typedef struct {
  const void* packed;
  const void* bias;
  const float* scale;
  int64_t n;
  int64_t format;  // float32 and bf16 weights: dense (0) or a block format
} Linear;

typedef struct {
  const void* input_norm;
  const void* post_norm;
  Linear qkv, o, gate_up, down;
  void* k_cache;
  void* v_cache;
} DecoderLayer;

static void run_linear(const Linear* L, const void* x, void* y, int64_t M, int64_t K, int use_bf16, int threads) {
  if (L->scale)
    linear_int8((const bf16*)x, (const int8_t*)L->packed, L->scale, (const bf16*)L->bias, (bf16*)y, M, K, L->n, threads);
  else if (use_bf16)
    linear_bf16((const bf16*)x, L->packed, (int)L->format, (const bf16*)L->bias, (bf16*)y, M, K, L->n, threads);
  else
    linear_f32((const float*)x, L->packed, (int)L->format, (const float*)L->bias, (float*)y, M, K, L->n, threads);
}

static void run_norm(const void* x, void* residual, const void* w, void* out, int64_t B, int64_t K, float eps, int use_bf16) {
  if (use_bf16)
    rms_norm_bf16((const bf16*)x, (bf16*)residual, (const bf16*)w, (bf16*)out, B, K, eps);
  else
    rms_norm_f32((const float*)x, (float*)residual, (const float*)w, (float*)out, B, K, eps);
}

// x (B, hidden): the token embeddings in, the final normalised hidden states out.
void decode_layers(const DecoderLayer* layers, int64_t n_layers, const void* final_norm, void* x,
                   const float* cos, const float* sin, const int64_t* slots, const int64_t* block_tables,
                   int64_t max_blocks, const int64_t* context_lens, int64_t B, int64_t hidden, int64_t inner,
                   int64_t H, int64_t Hkv, int64_t D, int64_t block_size, float eps, float scale, int use_bf16,
                   int threads) {
  size_t el = use_bf16 ? 2 : 4;
  int64_t heads = H + 2 * Hkv;
  char* h = malloc(el * B * hidden);
  char* delta = malloc(el * B * hidden);
  char* qkv = malloc(el * B * heads * D);
  char* attn = malloc(el * B * H * D);
  char* gate_up = malloc(el * B * 2 * inner);
  char* act = malloc(el * B * inner);
  for (int64_t l = 0; l < n_layers; l++) {
    const DecoderLayer* L = layers + l;
    run_norm(l == 0 ? x : delta, l == 0 ? NULL : x, L->input_norm, h, B, hidden, eps, use_bf16);
    run_linear(&L->qkv, h, qkv, B, hidden, use_bf16, threads);
    if (use_bf16) {
      rotary_store_bf16((bf16*)qkv, cos, sin, (bf16*)L->k_cache, (bf16*)L->v_cache, slots, B, H, Hkv, D);
      decode_attention_bf16((const bf16*)qkv, heads * D, (const bf16*)L->k_cache, (const bf16*)L->v_cache,
                            block_tables, max_blocks, context_lens, (bf16*)attn, B, H, Hkv, D, block_size, scale,
                            threads);
    } else {
      rotary_store_f32((float*)qkv, cos, sin, (float*)L->k_cache, (float*)L->v_cache, slots, B, H, Hkv, D);
      decode_attention_f32((const float*)qkv, heads * D, (const float*)L->k_cache, (const float*)L->v_cache,
                           block_tables, max_blocks, context_lens, (float*)attn, B, H, Hkv, D, block_size, scale,
                           threads);
    }
    run_linear(&L->o, attn, delta, B, H * D, use_bf16, threads);
    run_norm(delta, x, L->post_norm, h, B, hidden, eps, use_bf16);
    run_linear(&L->gate_up, h, gate_up, B, hidden, use_bf16, threads);
    if (use_bf16)
      silu_mul_bf16((const bf16*)gate_up, (bf16*)act, B, inner);
    else
      silu_mul_f32((const float*)gate_up, (float*)act, B, inner);
    run_linear(&L->down, act, delta, B, inner, use_bf16, threads);
  }
  run_norm(delta, x, final_norm, h, B, hidden, eps, use_bf16);
  memcpy(x, h, el * B * hidden);
  free(h);
  free(delta);
  free(qkv);
  free(attn);
  free(gate_up);
  free(act);
}
