// AMX tile products for bfloat16 weights (dense or block formats); the [bf16] tier only.
//
// Where the CPU has AMX and Linux grants the tile state (amx_init), tdpbf16ps multiplies a
// (rows x 32) tile of x by a (32 x 16) tile of W. The packed pair layout is AMX's B-tile layout.
// Python asks for the tile state only after a child process showed that AMX instructions run here
// (a VM may advertise AMX and still refuse it with an illegal instruction).
#ifdef NEXTOK_BF16
#include <sys/syscall.h>
#include <unistd.h>

#include "products_bf16.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_ready = 0;

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

int amx_init(void) {
  amx_ready = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return amx_ready;
}

int amx_probe(void) {
  if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return 0;
  static bf16 a[16 * 32], b[16 * 32];
  static float c[16 * 16];
  amx_configure(16);
  _tile_loadd(2, a, 64);
  _tile_loadd(3, b, 64);
  _tile_zero(0);
  _tile_dpbf16ps(0, 2, 3);
  _tile_stored(0, c, 64);
  _tile_release();
  return 1;
}

int use_amx(int64_t M, int64_t K, int64_t min_rows) { return amx_ready && M >= min_rows && K % 32 == 0; }

// A pair of column blocks times MT rows. w: the pair layout (2 x K x 16 values; format FORMAT_DENSE),
// or a pair in a block format, whose groups are widened one at a time into `tiles` (two buffers in
// turn) just before their tile products: the widening overlaps the products and the weights are
// never written out whole.
static void amx_pair(const bf16* x, int64_t K, const void* w, int format, bf16* y, int64_t N, int64_t n,
                     const float* scale, const bf16* bias, int MT, float* cbuf, bf16* tiles) {
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t k = 0; k < K; k += 32) {
    const bf16* b0 = (const bf16*)w + k * 16;
    const bf16* b1 = b0 + K * 16;
    if (format != FORMAT_DENSE) {
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

int linear_amx(const bf16* x, const void* packed, int format, const float* scale, const bf16* bias, bf16* y,
               int64_t M, int64_t K, int64_t N, int threads) {
  int64_t pairs = (N + 31) / 32;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    float* cbuf = alloc_aligned(2 * 256 * sizeof(float));
    bf16* wide = wide_buffer(format, K, &failed);
    failed |= cbuf == NULL;
    int configured = 0;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < pairs; t++) {
      if (failed) continue;
      // One tile of rows: each group is widened as it is used; more: the pair is widened once for all.
      int in_tiles = format != FORMAT_DENSE && M <= 16;
      const void* w = in_tiles ? (const char*)packed + t * 2 * block_stride_f32(K, format)
                               : (const void*)pair_weights_bf16(packed, format, t, K, wide);
      for (int64_t m0 = 0; m0 < M; m0 += 16) {
        int MT = M - m0 >= 16 ? 16 : (int)(M - m0);
        if (MT != configured) {
          amx_configure(MT);
          configured = MT;
        }
        amx_pair(x + m0 * K, K, w, in_tiles ? format : FORMAT_DENSE, y + m0 * N, N, t * 32, scale, bias, MT, cbuf,
                 wide);
      }
    }
    if (configured) _tile_release();
    free(cbuf);
    free(wide);
  }
  return failed ? NEXTOK_ENOMEM : NEXTOK_OK;
}
#endif
