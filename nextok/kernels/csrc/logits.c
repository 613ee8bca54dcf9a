// Rows of logits: sampling reads each row of the (B, V) logits for its k largest values and its
// logsumexp. torch runs both on one thread here; these split the rows over the threads and read
// each row once or twice with AVX-512. Also the memory-read probe benchmarks/kernels.py reports.
#include "common.h"

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

// One row's k largest, descending, into values/columns; 0, or 1 where it has fewer than k candidates.
// Candidates at or above a running threshold are compress-stored into buf, which select_largest cuts
// back to the k largest whenever it fills. NaN is never a candidate.
static int top_k_row(const float* row, int64_t V, int64_t k, float* buf, int32_t* col, int64_t capacity,
                     float* values, int64_t* columns) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
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
  if (n < k) return 1;
  select_largest(buf, col, n, k);
  for (int64_t i = 1; i < k; i++) {  // insertion sort, descending: k is small next to V
    float v = buf[i];
    int32_t c = col[i];
    int64_t j = i - 1;
    for (; j >= 0 && buf[j] < v; j--) buf[j + 1] = buf[j], col[j + 1] = col[j];
    buf[j + 1] = v, col[j + 1] = c;
  }
  for (int64_t i = 0; i < k; i++) values[i] = buf[i], columns[i] = col[i];
  return 0;
}

int64_t top_k_f32(const float* x, int64_t B, int64_t V, int64_t k, float* values, int64_t* columns, int threads) {
  if (k < 1 || k > V) return NEXTOK_EINVAL;
  int64_t capacity = 4 * k + 1024, short_rows = 0;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(+ : short_rows) reduction(| : failed)
  {
    float* buf = malloc(sizeof(float) * (capacity + 16));
    int32_t* col = malloc(sizeof(int32_t) * (capacity + 16));
    failed = !buf || !col;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B; r++)
      if (!failed) short_rows += top_k_row(x + r * V, V, k, buf, col, capacity, values + r * k, columns + r * k);
    free(buf);
    free(col);
  }
  return failed ? NEXTOK_ENOMEM : short_rows;
}

int logsumexp_f32(const float* x, int64_t B, int64_t V, float* out, int threads) {
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
  return NEXTOK_OK;
}

// Sums n floats with 8 independent accumulators per thread: the rate at which this machine streams
// memory, the ceiling of a batch-1 decode step.
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
