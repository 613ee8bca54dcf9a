// Block formats: float32 weights kept in the groups of a quantized checkpoint (GGUF Q4_0 ... Q6_K).
//
// Every group of 32 weights along k in one column shares a scale and a minimum (Q8X: one of each per 16
// weights): the float32 values of a GGUF checkpoint, recognised from its values (packing.pack_blocks) or
// read from its blocks (models/gguf_blocks.py). The kernels widen them in registers to the very float32
// values the dense matrix holds, w = fma(q, scale, min) (Q8: q * scale), which is exactly how GGUF's
// dequantization rounds them: products equal the dense ones bit for bit from a fraction of the bytes.
//   FORMAT_Q4:  per column block and group: scale[16] f32, min[16] f32, then 16 pairs of k x 16 bytes,
//               byte j of pair p = q[2p][j] | q[2p + 1][j] << 4 (q unsigned, 0..15)      0.75 bytes a weight
//   FORMAT_Q8:  per column block and group: scale[16] f32, then 32 k x 16 int8 q          1.125 bytes a weight
//   FORMAT_Q8X: per column block and group: scale[2][16] f32, min[2][16] f32 (steps 0-15 take the first,
//               16-31 the second), then 32 k x 16 int8 q                                  1.5 bytes a weight
#ifndef NEXTOK_BLOCKS_H
#define NEXTOK_BLOCKS_H

#include "common.h"

// The partial sums of a product restart every CHUNK steps of k (one group of a block format).
#define CHUNK 32
#ifndef PREFETCH_GROUPS
#define PREFETCH_GROUPS 4
#endif
#ifndef PREFETCH_FAR
#define PREFETCH_FAR 24
#endif

// Bytes of one group (32 k x 16 columns) of a block format.
ALWAYS_INLINE int group_bytes(int F) { return F == FORMAT_Q4 ? 384 : F == FORMAT_Q8 ? 576 : 768; }

// Whether `F` names a weight format (FORMAT_DENSE or a block format).
ALWAYS_INLINE int known_format(int F) {
  return F == FORMAT_DENSE || F == FORMAT_Q4 || F == FORMAT_Q8 || F == FORMAT_Q8X;
}

// Bytes between two column blocks of a packed float32 matrix.
ALWAYS_INLINE int64_t block_stride_f32(int64_t K, int F) {
  return F == FORMAT_DENSE ? K * 16 * 4 : K / CHUNK * group_bytes(F);
}

// Prefetches for the group at `group`: the one PREFETCH_GROUPS ahead into L1 (the widening leaves the
// hardware prefetcher behind) and the one PREFETCH_FAR ahead into L2 (the prefetcher stops at page ends).
ALWAYS_INLINE void prefetch_ahead(const char* group, int F) {
  for (int line = 0; line < group_bytes(F); line += 64) {
    _mm_prefetch(group + PREFETCH_GROUPS * group_bytes(F) + line, _MM_HINT_T0);
    if (PREFETCH_FAR) _mm_prefetch(group + PREFETCH_FAR * group_bytes(F) + line, _MM_HINT_T1);
  }
}

// Group g of a column block in a block format: the scale and minimum (0 for Q8) of its steps
// 16h .. 16h + 15 (only Q8X has one per half; the others give the group's for h = 0 and 1); returns its q bytes.
ALWAYS_INLINE const char* group_f32(const char* block, int64_t g, int h, int F, __m512* scale, __m512* min) {
  const char* head = block + g * group_bytes(F);
  if (F == FORMAT_Q8X) {
    *scale = _mm512_loadu_ps(head + 64 * h);
    *min = _mm512_loadu_ps(head + 128 + 64 * h);
    return head + 256;
  }
  *scale = _mm512_loadu_ps(head);
  *min = F == FORMAT_Q4 ? _mm512_loadu_ps(head + 64) : _mm512_setzero_ps();
  return head + (F == FORMAT_Q4 ? 128 : 64);
}

// Pair p of a group's q bytes widened to two vectors of float32 values: lo from the low nibbles
// (Q8, Q8X: the first 16 bytes) with scale_lo and min_lo, hi from the high nibbles (the next 16 bytes).
// In the float32 layout lo is step k = 2p and hi step 2p + 1 of the 16 columns, and both take the
// scale and minimum of their half of the group; the bfloat16 layout (widen_group_bf16) orders the bytes otherwise.
ALWAYS_INLINE void widen_pair(const char* q, int p, int F, __m512 scale_lo, __m512 min_lo, __m512 scale_hi,
                              __m512 min_hi, __m512* lo, __m512* hi) {
  if (F == FORMAT_Q4) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(q + p * 16)));
    *lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0F))), scale_lo, min_lo);
    *hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), scale_hi, min_hi);
  } else if (F == FORMAT_Q8) {
    const __m128i* b = (const __m128i*)(q + p * 32);
    *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b))), scale_lo);
    *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b + 1))), scale_hi);
  } else {  // Q8X: q * scale + min with the one rounding GGUF's dequantization makes
    const __m128i* b = (const __m128i*)(q + p * 32);
    *lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b))), scale_lo, min_lo);
    *hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b + 1))), scale_hi, min_hi);
  }
}

ALWAYS_INLINE void widen_pair_f32(const char* q, int p, int F, __m512 scale, __m512 min, __m512* lo, __m512* hi) {
  widen_pair(q, p, F, scale, min, scale, min, lo, hi);
}

#endif
