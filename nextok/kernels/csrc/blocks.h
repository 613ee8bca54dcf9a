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
// The K-quant formats keep what Q4_K / Q5_K / Q6_K store: per 256 k (a super-block of 8 groups) one
// float16 d and dmin per column, per group small integers sc and m, and scale = d * sc, min = -dmin * m,
// both exact float32 products (11-bit d times 6- or 8-bit integers), as GGUF's dequantization forms them.
//   FORMAT_Q4K: per column block and super-block: d[16] f16, -dmin[16] f16, then per group sc[16] u8,
//               m[16] u8 and the q bytes of FORMAT_Q4 (Q4_K)                            0.578 bytes a weight
//   FORMAT_Q8K: the same with sc[2][16] i8 and m[2][16] u8 (one per 16 k) and the q bytes of FORMAT_Q8X
//               (Q6_K, Q5_K, and a Q4_K matrix fused with them)                          1.14 bytes a weight
// Their group_bytes is a super-block's bytes over 8, so a column block still spans K / 32 * group_bytes.
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

// Bytes of one group (32 k x 16 columns) of a block format (Q4K, Q8K: on average over a super-block).
ALWAYS_INLINE int group_bytes(int F) {
  return F == FORMAT_Q4 ? 384 : F == FORMAT_Q8 ? 576 : F == FORMAT_Q8X ? 768 : F == FORMAT_Q4K ? 296 : 584;
}

// Whether `F` names a weight format (FORMAT_DENSE or a block format).
ALWAYS_INLINE int known_format(int F) { return F >= FORMAT_DENSE && F <= FORMAT_Q8K; }

// Whether the K-quant format F keeps its groups in super-blocks of 256 k.
ALWAYS_INLINE int super_blocks(int F) { return F == FORMAT_Q4K || F == FORMAT_Q8K; }

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
  if (super_blocks(F)) {  // d and -dmin of the super-block, then the group's sc and m (Q8K: of half h)
    const char* super = block + (g & ~(int64_t)7) * group_bytes(F);
    const char* head = super + 64 + (g & 7) * (group_bytes(F) * 8 - 64) / 8;
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)super));
    __m512 neg_dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(super + 32)));
    int at = F == FORMAT_Q8K ? 16 * h : 0, m_at = F == FORMAT_Q8K ? 32 : 16;
    __m128i sc = _mm_loadu_si128((const __m128i*)(head + at)), m = _mm_loadu_si128((const __m128i*)(head + m_at + at));
    *scale = _mm512_mul_ps(d, _mm512_cvtepi32_ps(F == FORMAT_Q8K ? _mm512_cvtepi8_epi32(sc) : _mm512_cvtepu8_epi32(sc)));
    *min = _mm512_mul_ps(neg_dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(m)));
    return head + 2 * m_at;
  }
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
  if (F == FORMAT_Q4 || F == FORMAT_Q4K) {
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
