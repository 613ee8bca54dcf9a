// Paged attention: the new tokens of each sequence (one when decoding, a chunk of a prompt when
// prefilling) attend to their sequence's keys and values, read straight from the cache blocks through
// the block table (no gather). Their own keys and values are in the cache already.
//
// Every query token is computed alone, the same way whether it is decoded or prefilled, alone or in
// any batch, in one chunk or another: a prompt prefilled in chunks, a request recomputed after
// preemption and a request in a batch all give the keys, values and logits of the same request alone.
//
// A query at position p attends to keys 0..p. Each thread takes whole query tokens (or, with fewer
// tokens than twice the threads, (token, kv head) pairs), and reads each key and value once for up to
// ATTN_HEADS query heads of the group (their q and outputs stay in registers). A key's dot product
// with a head is one vector of partial sums; the vectors of 16 keys are summed across lanes together
// (sum_lanes16), in the same order _mm512_reduce_add_ps adds.
#include "common.h"

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

// Walks a sequence's keys (values) in order through its block table, without a division per key.
typedef struct {
  const int64_t* table;
  int64_t block, offset, block_size, row, head;  // row: elements per cache slot; head: kv head g's offset
} CacheCursor;

ALWAYS_INLINE CacheCursor cache_cursor(const int64_t* table, int64_t g, int64_t Hkv, int64_t D, int64_t block_size) {
  return (CacheCursor){table, 0, 0, block_size, Hkv * D, g * D};
}

// The element offset of the cursor's key, then the cursor moves to the next one.
ALWAYS_INLINE int64_t cache_next(CacheCursor* c) {
  int64_t at = (c->table[c->block] * c->block_size + c->offset) * c->row + c->head;
  if (++c->offset == c->block_size) c->block++, c->offset = 0;
  return at;
}

// Scores of query heads h0 .. h0 + GS against keys l0 .. l0 + 15 (those below L), scaled, into
// sc[l0 .. l0 + 16). One vector of partial sums per (key, head), summed across lanes 16 keys at a time.
ALWAYS_INLINE void score_tile(const __m512* qv, const void* k_cache, const int64_t* rows, int64_t l0, int64_t L,
                              float* scores, int64_t padded, float scale, const int GS, const int nd, int64_t D,
                              int bf16_act) {
  __m512 dots[ATTN_HEADS][16];
  for (int i = 0; i < 16; i++) {  // key l0 + i to vector 4 (i % 4) + i / 4
    int slot = (i % 4) * 4 + i / 4;
    __m512 acc[ATTN_HEADS];
    for (int hq = 0; hq < GS; hq++) acc[hq] = _mm512_setzero_ps();
    if (l0 + i < L)
      for (int j = 0; j < nd; j++) {
        __m512 kv = load_act(k_cache, rows[i] + j * 16, tail_mask16(D - j * 16), bf16_act);
        for (int hq = 0; hq < GS; hq++) acc[hq] = _mm512_fmadd_ps(qv[hq * nd + j], kv, acc[hq]);
      }
    for (int hq = 0; hq < GS; hq++) dots[hq][slot] = acc[hq];
  }
  for (int hq = 0; hq < GS; hq++)
    _mm512_storeu_ps(scores + hq * padded + l0, _mm512_mul_ps(sum_lanes16(dots[hq]), _mm512_set1_ps(scale)));
}

// exp(score - max) over a row of L scores, in place; returns their sum.
ALWAYS_INLINE float softmax_row(float* sc, int64_t L) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t l = 0; l < L; l += 16) top = _mm512_mask_max_ps(top, tail_mask16(L - l), top, _mm512_loadu_ps(sc + l));
  __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(top)), sum = _mm512_setzero_ps();
  for (int64_t l = 0; l < L; l += 16) {
    __m512 e = _mm512_maskz_mov_ps(tail_mask16(L - l), exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + l), best)));
    _mm512_storeu_ps(sc + l, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

#define KEY_TILE 16
#define VALUE_TILE 64
#define QUERY_BLOCK 8  // consecutive tokens of one sequence computed together, sharing their key and value reads

// Query tokens t0 .. t0 + QB of one sequence (positions L[b] - 1: token b attends to keys 0 .. L[b] - 1), heads
// h0 .. h0 + GS of kv head g. Each token is computed exactly as if alone: the same operations in the same order
// for any QB; only the loops interleave so that a tile of keys (values), once read, serves every token.
// q: the first token's heads, rows q_stride elements apart; out likewise (out_stride). nd = vectors per head row.
// scratch: QUERY_BLOCK x ATTN_HEADS x padded(L) scores, then QUERY_BLOCK x 16 vectors of outputs.
ALWAYS_INLINE void attend_block(const void* q, int64_t q_stride, const void* k_cache, const void* v_cache,
                                const int64_t* table, const int64_t* L, int QB, int64_t g, int64_t Hkv, int64_t D,
                                int64_t block_size, float scale, float* scratch, void* out, int64_t out_stride,
                                const int GS, const int nd, int bf16_act) {
  int64_t Lmax = L[QB - 1], padded = (Lmax + 15) / 16 * 16, el = bf16_act ? 2 : 4;
  float* scores = scratch;  // [b][hq][padded]
  __m512* acc_out = (__m512*)(scratch + QUERY_BLOCK * ATTN_HEADS * padded);  // [b][16]
  int64_t rows[VALUE_TILE];
  CacheCursor keys = cache_cursor(table, g, Hkv, D, block_size);
  for (int64_t l0 = 0; l0 < Lmax; l0 += KEY_TILE) {
    for (int i = 0; i < KEY_TILE; i++) rows[i] = l0 + i < Lmax ? cache_next(&keys) : 0;
    for (int b = 0; b < QB; b++) {
      if (l0 >= L[b]) continue;
      __m512 qv[16];
      const char* qb = (const char*)q + b * q_stride * el;
      for (int hq = 0; hq < GS; hq++)
        for (int j = 0; j < nd; j++) qv[hq * nd + j] = load_act(qb, hq * D + j * 16, tail_mask16(D - j * 16), bf16_act);
      score_tile(qv, k_cache, rows, l0, L[b], scores + b * ATTN_HEADS * padded, padded, scale, GS, nd, D, bf16_act);
    }
  }
  float total[QUERY_BLOCK][ATTN_HEADS];
  for (int b = 0; b < QB; b++)
    for (int hq = 0; hq < GS; hq++) total[b][hq] = softmax_row(scores + (b * ATTN_HEADS + hq) * padded, L[b]);
  CacheCursor values = cache_cursor(table, g, Hkv, D, block_size);
  for (int64_t l0 = 0; l0 < Lmax; l0 += VALUE_TILE) {
    int64_t l1 = l0 + VALUE_TILE < Lmax ? l0 + VALUE_TILE : Lmax;
    for (int64_t l = l0; l < l1; l++) rows[l - l0] = cache_next(&values);
    for (int b = 0; b < QB; b++) {
      if (l0 >= L[b]) continue;
      __m512 o[16];
      for (int j = 0; j < GS * nd; j++) o[j] = l0 ? acc_out[b * 16 + j] : _mm512_setzero_ps();
      int64_t end = l1 < L[b] ? l1 : L[b];
      for (int64_t l = l0; l < end; l++) {
        __m512 p[ATTN_HEADS];
        for (int hq = 0; hq < GS; hq++) p[hq] = _mm512_set1_ps(scores[(b * ATTN_HEADS + hq) * padded + l]);
        for (int j = 0; j < nd; j++) {
          __m512 vv = load_act(v_cache, rows[l - l0] + j * 16, tail_mask16(D - j * 16), bf16_act);
          for (int hq = 0; hq < GS; hq++) o[hq * nd + j] = _mm512_fmadd_ps(p[hq], vv, o[hq * nd + j]);
        }
      }
      for (int j = 0; j < GS * nd; j++) acc_out[b * 16 + j] = o[j];
    }
  }
  for (int b = 0; b < QB; b++)
    for (int hq = 0; hq < GS; hq++) {
      __m512 inv = _mm512_set1_ps(1.0f / total[b][hq]);
      for (int j = 0; j < nd; j++)
        store_act((char*)out + b * out_stride * el, hq * D + j * 16, _mm512_mul_ps(acc_out[b * 16 + hq * nd + j], inv),
                  tail_mask16(D - j * 16), bf16_act);
    }
}

// Head sizes 64 and 128 with constant loop counts; any other D up to MAX_HEAD_DIM in general form.
ALWAYS_INLINE void attend_group(const void* q, int64_t q_stride, const void* k_cache, const void* v_cache,
                                const int64_t* table, const int64_t* L, int QB, int64_t g, int64_t Hkv, int64_t D,
                                int64_t block_size, float scale, float* scratch, void* out, int64_t out_stride,
                                int GS, int nd, int bf16_act) {
#define ATTEND(DD, GG, NN) attend_block(q, q_stride, k_cache, v_cache, table, L, QB, g, Hkv, DD, block_size, scale, \
                                        scratch, out, out_stride, GG, NN, bf16_act)
  switch (D == nd * 16 ? nd * 8 + GS : 0) {
    case 4 * 8 + 1: ATTEND(64, 1, 4); break;
    case 4 * 8 + 2: ATTEND(64, 2, 4); break;
    case 4 * 8 + 3: ATTEND(64, 3, 4); break;
    case 4 * 8 + 4: ATTEND(64, 4, 4); break;
    case 8 * 8 + 1: ATTEND(128, 1, 8); break;
    case 8 * 8 + 2: ATTEND(128, 2, 8); break;
    default: ATTEND(D, GS, nd);
  }
#undef ATTEND
}

// attend_group for one activation dtype: the OpenMP region below is outlined once for both dtypes,
// so it calls the dtype's compiled body through a pointer, once per job.
typedef void (*AttendFn)(const void* q, int64_t q_stride, const void* k_cache, const void* v_cache,
                         const int64_t* table, const int64_t* L, int QB, int64_t g, int64_t Hkv, int64_t D,
                         int64_t block_size, float scale, float* scratch, void* out, int64_t out_stride, int GS,
                         int nd);

static void attend_group_f32(const void* q, int64_t q_stride, const void* k_cache, const void* v_cache,
                             const int64_t* table, const int64_t* L, int QB, int64_t g, int64_t Hkv, int64_t D,
                             int64_t block_size, float scale, float* scratch, void* out, int64_t out_stride, int GS,
                             int nd) {
  attend_group(q, q_stride, k_cache, v_cache, table, L, QB, g, Hkv, D, block_size, scale, scratch, out, out_stride,
               GS, nd, 0);
}

#ifdef NEXTOK_BF16
static void attend_group_bf16(const void* q, int64_t q_stride, const void* k_cache, const void* v_cache,
                              const int64_t* table, const int64_t* L, int QB, int64_t g, int64_t Hkv, int64_t D,
                              int64_t block_size, float scale, float* scratch, void* out, int64_t out_stride, int GS,
                              int nd) {
  attend_group(q, q_stride, k_cache, v_cache, table, L, QB, g, Hkv, D, block_size, scale, scratch, out, out_stride,
               GS, nd, 1);
}
#endif

// A job: up to QUERY_BLOCK consecutive tokens of one sequence, for one kv head or all of them.
typedef struct {
  int64_t seq, first, count;
} Job;

static int paged_attention(const void* q, int64_t q_stride, const void* k_cache, const void* v_cache,
                           const int64_t* block_tables, int64_t max_blocks, const int64_t* query_start,
                           const int64_t* context_lens, void* out, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                           int64_t block_size, float scale, int threads, AttendFn attend, int64_t el) {
  if (D < 1 || D > MAX_HEAD_DIM || Hkv < 1 || H % Hkv || B < 0) return NEXTOK_EINVAL;
  int64_t group = H / Hkv, n_blocks = 0;
  int nd = (int)((D + 15) / 16), heads = nd <= 4 ? ATTN_HEADS : nd <= 8 ? 2 : 1;  // q, o: <= 16 vectors
  for (int64_t b = 0; b < B; b++) {
    int64_t n_q = query_start[b + 1] - query_start[b];
    if (n_q < 0 || n_q > context_lens[b] || context_lens[b] > max_blocks * block_size) return NEXTOK_EINVAL;
    n_blocks += (n_q + QUERY_BLOCK - 1) / QUERY_BLOCK;
  }
  Job* jobs = malloc(sizeof(Job) * (n_blocks > 0 ? n_blocks : 1));
  if (!jobs) return NEXTOK_ENOMEM;
  int64_t n_jobs = 0;
  for (int64_t b = 0; b < B; b++)
    for (int64_t t = query_start[b]; t < query_start[b + 1]; t += QUERY_BLOCK)
      jobs[n_jobs++] = (Job){b, t, query_start[b + 1] - t < QUERY_BLOCK ? query_start[b + 1] - t : QUERY_BLOCK};
  // a job takes every kv head of its tokens where that keeps the threads busy, else one each
  int64_t per_job = n_jobs >= 2 * threads ? 1 : Hkv;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    float* scratch = NULL;
    int64_t capacity = 0;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_jobs * per_job; task++) {
      Job job = jobs[task / per_job];
      int64_t L[QUERY_BLOCK], b = job.seq, ctx = context_lens[b], last = query_start[b + 1];
      for (int i = 0; i < job.count; i++) L[i] = ctx - (last - job.first - i) + 1;  // keys 0..position
      int64_t padded = (L[job.count - 1] + 15) / 16 * 16;
      int64_t need = QUERY_BLOCK * ATTN_HEADS * padded + QUERY_BLOCK * 16 * 16;
      if (failed) continue;
      if (need > capacity) {
        free(scratch);
        capacity = need;
        scratch = alloc_aligned(sizeof(float) * need);
        if (!scratch) {
          failed = 1;
          capacity = 0;
          continue;
        }
      }
      int64_t g0 = per_job == 1 ? 0 : task % Hkv, g1 = per_job == 1 ? Hkv : g0 + 1;
      for (int64_t g = g0; g < g1; g++)
        for (int64_t h0 = 0; h0 < group; h0 += heads) {
          int GS = group - h0 < heads ? (int)(group - h0) : heads;
          int64_t h = g * group + h0;
          attend((const char*)q + (job.first * q_stride + h * D) * el, q_stride, k_cache, v_cache,
                 block_tables + b * max_blocks, L, (int)job.count, g, Hkv, D, block_size, scale, scratch,
                 (char*)out + (job.first * H + h) * D * el, H * D, GS, nd);
        }
    }
    free(scratch);
  }
  free(jobs);
  return failed ? NEXTOK_ENOMEM : NEXTOK_OK;
}

int paged_attention_f32(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                        const int64_t* block_tables, int64_t max_blocks, const int64_t* query_start,
                        const int64_t* context_lens, float* out, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                        int64_t block_size, float scale, int threads) {
  return paged_attention(q, q_stride, k_cache, v_cache, block_tables, max_blocks, query_start, context_lens, out, B,
                         H, Hkv, D, block_size, scale, threads, attend_group_f32, 4);
}

#ifdef NEXTOK_BF16
int paged_attention_bf16(const bf16* q, int64_t q_stride, const bf16* k_cache, const bf16* v_cache,
                         const int64_t* block_tables, int64_t max_blocks, const int64_t* query_start,
                         const int64_t* context_lens, bf16* out, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                         int64_t block_size, float scale, int threads) {
  return paged_attention(q, q_stride, k_cache, v_cache, block_tables, max_blocks, query_start, context_lens, out, B,
                         H, Hkv, D, block_size, scale, threads, attend_group_bf16, 2);
}
#endif
