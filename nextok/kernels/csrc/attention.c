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

// Heads h0 .. h0 + GS of one (sequence, kv head g) pair over L keys; nd = vectors per head row. The
// callers pass GS and nd as constants where they can, so that q, the partial sums and the outputs
// stay in registers. scores: ATTN_HEADS x L (rounded up to 16) floats of scratch.
ALWAYS_INLINE void attend_heads(const void* q, const void* k_cache, const void* v_cache, const int64_t* table,
                                int64_t L, int64_t g, int64_t Hkv, int64_t D, int64_t block_size, float scale,
                                float* scores, void* out, const int GS, const int nd, int bf16_act) {
  int64_t padded = (L + 15) / 16 * 16;
  __m512 qv[16], dots[ATTN_HEADS][16], o[16];
  for (int hq = 0; hq < GS; hq++)
    for (int j = 0; j < nd; j++) qv[hq * nd + j] = load_act(q, hq * D + j * 16, tail_mask16(D - j * 16), bf16_act);
  int64_t row = Hkv * D, block = 0, offset = 0;  // key l: block table[block], row offset
  for (int64_t l0 = 0; l0 < L; l0 += 16) {
    for (int i = 0; i < 16; i++) {  // key l0 + i to vector 4 (i % 4) + i / 4
      int slot = (i % 4) * 4 + i / 4;
      __m512 acc[ATTN_HEADS];
      for (int hq = 0; hq < GS; hq++) acc[hq] = _mm512_setzero_ps();
      if (l0 + i < L) {
        int64_t kp = (table[block] * block_size + offset) * row + g * D;
        if (++offset == block_size) block++, offset = 0;
        for (int j = 0; j < nd; j++) {
          __m512 kv = load_act(k_cache, kp + j * 16, tail_mask16(D - j * 16), bf16_act);
          for (int hq = 0; hq < GS; hq++) acc[hq] = _mm512_fmadd_ps(qv[hq * nd + j], kv, acc[hq]);
        }
      }
      for (int hq = 0; hq < GS; hq++) dots[hq][slot] = acc[hq];
    }
    for (int hq = 0; hq < GS; hq++)
      _mm512_storeu_ps(scores + hq * padded + l0, _mm512_mul_ps(sum_lanes16(dots[hq]), _mm512_set1_ps(scale)));
  }
  float total[ATTN_HEADS];
  for (int hq = 0; hq < GS; hq++) {
    float* sc = scores + hq * padded;
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t l = 0; l < L; l += 16) top = _mm512_mask_max_ps(top, tail_mask16(L - l), top, _mm512_loadu_ps(sc + l));
    __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(top)), sum = _mm512_setzero_ps();
    for (int64_t l = 0; l < L; l += 16) {
      __m512 e = _mm512_maskz_mov_ps(tail_mask16(L - l), exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + l), best)));
      _mm512_storeu_ps(sc + l, e);
      sum = _mm512_add_ps(sum, e);
    }
    total[hq] = _mm512_reduce_add_ps(sum);
  }
  for (int j = 0; j < GS * nd; j++) o[j] = _mm512_setzero_ps();
  block = offset = 0;
  for (int64_t l = 0; l < L; l++) {
    int64_t vp = (table[block] * block_size + offset) * row + g * D;
    if (++offset == block_size) block++, offset = 0;
    __m512 p[ATTN_HEADS];
    for (int hq = 0; hq < GS; hq++) p[hq] = _mm512_set1_ps(scores[hq * padded + l]);
    for (int j = 0; j < nd; j++) {
      __m512 vv = load_act(v_cache, vp + j * 16, tail_mask16(D - j * 16), bf16_act);
      for (int hq = 0; hq < GS; hq++) o[hq * nd + j] = _mm512_fmadd_ps(p[hq], vv, o[hq * nd + j]);
    }
  }
  for (int hq = 0; hq < GS; hq++) {
    __m512 inv = _mm512_set1_ps(1.0f / total[hq]);
    for (int j = 0; j < nd; j++)
      store_act(out, hq * D + j * 16, _mm512_mul_ps(o[hq * nd + j], inv), tail_mask16(D - j * 16), bf16_act);
  }
}

// Head sizes 64 and 128 with constant loop counts; any other D up to MAX_HEAD_DIM in general form.
ALWAYS_INLINE void attend_group(const void* q, const void* k_cache, const void* v_cache, const int64_t* table,
                                int64_t L, int64_t g, int64_t Hkv, int64_t D, int64_t block_size, float scale,
                                float* scores, void* out, int GS, int nd, int bf16_act) {
  switch (D == nd * 16 ? nd * 8 + GS : 0) {
    case 4 * 8 + 1: attend_heads(q, k_cache, v_cache, table, L, g, Hkv, 64, block_size, scale, scores, out, 1, 4, bf16_act); break;
    case 4 * 8 + 2: attend_heads(q, k_cache, v_cache, table, L, g, Hkv, 64, block_size, scale, scores, out, 2, 4, bf16_act); break;
    case 4 * 8 + 3: attend_heads(q, k_cache, v_cache, table, L, g, Hkv, 64, block_size, scale, scores, out, 3, 4, bf16_act); break;
    case 4 * 8 + 4: attend_heads(q, k_cache, v_cache, table, L, g, Hkv, 64, block_size, scale, scores, out, 4, 4, bf16_act); break;
    case 8 * 8 + 1: attend_heads(q, k_cache, v_cache, table, L, g, Hkv, 128, block_size, scale, scores, out, 1, 8, bf16_act); break;
    case 8 * 8 + 2: attend_heads(q, k_cache, v_cache, table, L, g, Hkv, 128, block_size, scale, scores, out, 2, 8, bf16_act); break;
    default: attend_heads(q, k_cache, v_cache, table, L, g, Hkv, D, block_size, scale, scores, out, GS, nd, bf16_act);
  }
}

// attend_group for one activation dtype: the OpenMP region below is outlined once for both dtypes,
// so it calls the dtype's compiled body through a pointer, once per (sequence, kv head, heads) job.
typedef void (*AttendFn)(const void* q, const void* k_cache, const void* v_cache, const int64_t* table, int64_t L,
                         int64_t g, int64_t Hkv, int64_t D, int64_t block_size, float scale, float* scores, void* out,
                         int GS, int nd);

static void attend_group_f32(const void* q, const void* k_cache, const void* v_cache, const int64_t* table,
                             int64_t L, int64_t g, int64_t Hkv, int64_t D, int64_t block_size, float scale,
                             float* scores, void* out, int GS, int nd) {
  attend_group(q, k_cache, v_cache, table, L, g, Hkv, D, block_size, scale, scores, out, GS, nd, 0);
}

#ifdef NEXTOK_BF16
static void attend_group_bf16(const void* q, const void* k_cache, const void* v_cache, const int64_t* table,
                              int64_t L, int64_t g, int64_t Hkv, int64_t D, int64_t block_size, float scale,
                              float* scores, void* out, int GS, int nd) {
  attend_group(q, k_cache, v_cache, table, L, g, Hkv, D, block_size, scale, scores, out, GS, nd, 1);
}
#endif

static int paged_attention(const void* q, int64_t q_stride, const void* k_cache, const void* v_cache,
                           const int64_t* block_tables, int64_t max_blocks, const int64_t* query_start,
                           const int64_t* context_lens, void* out, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                           int64_t block_size, float scale, int threads, AttendFn attend, int64_t el) {
  if (D < 1 || D > MAX_HEAD_DIM || Hkv < 1 || H % Hkv || B < 0) return NEXTOK_EINVAL;
  int64_t N = query_start[B], group = H / Hkv;
  int nd = (int)((D + 15) / 16), heads = nd <= 4 ? ATTN_HEADS : nd <= 8 ? 2 : 1;  // q, o: <= 16 vectors
  int64_t* seq_of = malloc(sizeof(int64_t) * (N > 0 ? N : 1));  // token -> its sequence
  if (!seq_of) return NEXTOK_ENOMEM;
  for (int64_t b = 0; b < B; b++) {
    int64_t n_q = query_start[b + 1] - query_start[b];
    if (n_q < 0 || n_q > context_lens[b] || context_lens[b] > max_blocks * block_size) {
      free(seq_of);
      return NEXTOK_EINVAL;
    }
    for (int64_t t = query_start[b]; t < query_start[b + 1]; t++) seq_of[t] = b;
  }
  // a job: a whole token, whose cache rows are read in full, where that keeps the threads busy
  int64_t jobs_per_token = N >= 2 * threads ? 1 : Hkv;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    float* scores = NULL;
    int64_t capacity = 0;
#pragma omp for schedule(dynamic, 1)
    for (int64_t job = 0; job < N * jobs_per_token; job++) {
      int64_t t = job / jobs_per_token, b = seq_of[t];
      int64_t L = context_lens[b] - (query_start[b + 1] - t) + 1, padded = (L + 15) / 16 * 16;  // keys 0..pos
      if (failed) continue;
      if (padded > capacity) {
        free(scores);
        capacity = padded;
        scores = malloc(sizeof(float) * ATTN_HEADS * padded);
        if (!scores) {
          failed = 1;
          capacity = 0;
          continue;
        }
      }
      int64_t g0 = jobs_per_token == 1 ? 0 : job % Hkv, g1 = jobs_per_token == 1 ? Hkv : g0 + 1;
      for (int64_t g = g0; g < g1; g++)
        for (int64_t h0 = 0; h0 < group; h0 += heads) {
          int GS = group - h0 < heads ? (int)(group - h0) : heads;
          int64_t h = g * group + h0;
          attend((const char*)q + (t * q_stride + h * D) * el, k_cache, v_cache, block_tables + b * max_blocks, L, g,
                 Hkv, D, block_size, scale, scores, (char*)out + (t * H + h) * D * el, GS, nd);
        }
    }
    free(scores);
  }
  free(seq_of);
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
