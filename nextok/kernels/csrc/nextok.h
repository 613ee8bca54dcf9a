// nextok's CPU kernels: every function Python calls, in one place.
//
// This header is the single source of the Python signatures: nextok/kernels/build.py reads the
// prototypes below (one per line group, ending in ");") and gives ctypes their argument and return
// types from them. Keep to the types it knows: pointers, int, int64_t, float.
//
// Conventions: matrices are row-major and contiguous unless a stride is passed; "bf16" is stored as
// uint16_t; float32 accumulates everywhere; bf16 results round to nearest even, as PyTorch rounds.
// Work is split over `threads` OpenMP threads (the libgomp PyTorch uses, so they share one pool).
// Functions that can fail return int: 0, or NEXTOK_ENOMEM (an allocation failed) or NEXTOK_EINVAL
// (an argument the kernel cannot take); Python raises MemoryError / ValueError for them.
//
// Two builds: the "avx512" tier (AVX-512 F/BW/CD/DQ/VL) has the float32 functions; the "avx512_bf16"
// tier (adds BF16, VNNI and the AMX instructions) has every function. Functions marked [bf16] exist
// only in that tier.
#ifndef NEXTOK_H
#define NEXTOK_H

#include <stdint.h>

typedef uint16_t bf16;

enum { NEXTOK_OK = 0, NEXTOK_ENOMEM = -1, NEXTOK_EINVAL = -2 };

// Weight formats of a packed matrix (packing.py): dense, or groups of 32 weights along k that share a
// scale and a minimum (Q8X: one of each per 16 weights), as GGUF checkpoints store them (blocks.h);
// Q4K and Q8K keep a K-quant's scales as its small integers under a float16 factor per 256 k.
enum { FORMAT_DENSE = 0, FORMAT_Q4 = 1, FORMAT_Q8 = 2, FORMAT_Q8X = 3, FORMAT_Q4K = 4, FORMAT_Q8K = 5 };

#define MAX_HEAD_DIM 256  // attention keeps a head's query and output in registers

// ---------------------------------------------------------------------------------- products
// y (M, N) = x (M, K) @ W^T (+ bias), W packed (see linear_f32.c for the layouts).
int linear_f32(const float* x, const void* packed, int format, const float* bias, float* y, int64_t M,
               int64_t K, int64_t N, int threads);
// [bf16] bfloat16 weights, dense or in a block format of bfloat16 values.
int linear_bf16(const bf16* x, const void* packed, int format, const bf16* bias, bf16* y, int64_t M,
                int64_t K, int64_t N, int threads);
// [bf16] int8 weights with one float32 scale per output, bfloat16 activations.
int linear_int8(const bf16* x, const int8_t* packed, const float* scale, const bf16* bias, bf16* y, int64_t M,
                int64_t K, int64_t N, int threads);
// [bf16] 1 where bfloat16 products may use the AMX tile unit (Linux granted the tile state).
int amx_init(void);
// [bf16] Runs one tile product and returns 1; a CPU or VM that refuses AMX kills the process with an
// illegal instruction instead, so Python calls it in a child process first.
int amx_probe(void);

// -------------------------------------------------------------------------------- element-wise
// out = rms_norm(x (+ residual)) * weight, row by row; with residual, residual += x first.
int rms_norm_f32(const float* x, float* residual, const float* weight, float* out, int64_t rows, int64_t K,
                 float eps);
int rms_norm_bf16(const bf16* x, bf16* residual, const bf16* weight, bf16* out, int64_t rows, int64_t K,
                  float eps);  // [bf16]
// gate_up (rows, 2 inner) -> out (rows, inner) = silu(gate) * up.
int silu_mul_f32(const float* gate_up, float* out, int64_t rows, int64_t inner);
int silu_mul_bf16(const bf16* gate_up, bf16* out, int64_t rows, int64_t inner);  // [bf16]
// Rotary embedding on the H + Hkv query and key heads of qkv (N, H + 2 Hkv, D), in place; with a
// cache, k and v of token t are written to its flat slot slots[t].
int rotary_store_f32(float* qkv, const float* cos, const float* sin, float* k_cache, float* v_cache,
                     const int64_t* slots, int64_t N, int64_t H, int64_t Hkv, int64_t D);
int rotary_store_bf16(bf16* qkv, const float* cos, const float* sin, bf16* k_cache, bf16* v_cache,
                      const int64_t* slots, int64_t N, int64_t H, int64_t Hkv, int64_t D);  // [bf16]
// bf16 -> float32 (exact), on all threads.
int bf16_to_f32(const bf16* x, float* y, int64_t n, int threads);

// ----------------------------------------------------------------------------------- attention
// The new tokens of B sequences over their paged caches (their keys and values written already):
// sequence b's tokens are rows query_start[b] .. query_start[b + 1] of q (N, H, D), rows q_stride
// elements apart, and are its last positions of context_lens[b]; the token at position p attends to
// keys 0..p. Caches (blocks, block_size, Hkv, D); block_tables (B, max_blocks); out (N, H * D).
int paged_attention_f32(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                        const int64_t* block_tables, int64_t max_blocks, const int64_t* query_start,
                        const int64_t* context_lens, float* out, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                        int64_t block_size, float scale, int threads);
int paged_attention_bf16(const bf16* q, int64_t q_stride, const bf16* k_cache, const bf16* v_cache,
                         const int64_t* block_tables, int64_t max_blocks, const int64_t* query_start,
                         const int64_t* context_lens, bf16* out, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                         int64_t block_size, float scale, int threads);  // [bf16]

// ------------------------------------------------------------------------------ rows of logits
// values, columns (B, k): each row's k largest, descending (ties in any order). Returns the number
// of rows with fewer than k non-NaN values, which the caller redoes, or NEXTOK_ENOMEM.
int64_t top_k_f32(const float* x, int64_t B, int64_t V, int64_t k, float* values, int64_t* columns, int threads);
// out (B,): log(sum(exp(row))).
int logsumexp_f32(const float* x, int64_t B, int64_t V, float* out, int threads);
// The sum of n floats read with every thread: how fast this machine streams memory.
float read_sum_f32(const float* a, int64_t n, int threads);

// ---------------------------------------------------------------------------- a whole decode step
// One linear layer of the fused step: packed weights in a format, bias, and (int8) the scales.
typedef struct {
  const void* packed;
  const void* bias;
  const float* scale;
  int64_t n;
  int64_t format;
} Linear;

// One Llama-family decoder layer: its norms, its four products, and its KV cache.
typedef struct {
  const void* input_norm;
  const void* post_norm;
  Linear qkv, o, gate_up, down;
  void* k_cache;
  void* v_cache;
} DecoderLayer;

// Every decoder layer for the N new tokens of B sequences (one each when decoding, prompt chunks when
// prefilling; query_start, context_lens and the tables as paged_attention's): x (N, hidden) holds the
// token embeddings in and the final normalised hidden states out. use_bf16: bf16 activations [bf16].
int forward_layers(const DecoderLayer* layers, int64_t n_layers, const void* final_norm, void* x, const float* cos,
                   const float* sin, const int64_t* slots, const int64_t* block_tables, int64_t max_blocks,
                   const int64_t* query_start, const int64_t* context_lens, int64_t N, int64_t B, int64_t hidden,
                   int64_t inner, int64_t H, int64_t Hkv, int64_t D, int64_t block_size, float eps, float scale,
                   int use_bf16, int threads);

#endif
