"""nextok's packed matrix products against PyTorch's, on the default model's shapes, and the memory ceiling.

    .venv/bin/python benchmarks/kernels.py [--rows 1,5,16,64,256]

One "step" is one product with every weight matrix of SmolLM2-135M as nextok fuses them (30 layers
of q/k/v, o, gate/up and down, and the 49152 x 576 head), on `rows` activation rows, random
weights. PyTorch's side: MKL on the (in, out) float32 layout, oneDNN bfloat16 F.linear, and
aten's int8 weight-only product. "f32 blocks" is nextok's float32 product from the weights' GGUF
blocks (ops.pack_blocks), on float32 matrices that hold Q4_1 values (the head: Q8_0), as the
default model's do; its ratio is against the same torch float32 product. "bf16 blocks" is the
bfloat16 product from the same blocks (bit-identical to the cast matrices), against torch bfloat16. The last table: how
fast 2 threads stream 1 GiB, and what that allows for a batch-1 step of each weight layout.
"""

from __future__ import annotations

import argparse
import ctypes
import time

import torch
import torch.nn.functional as F

from nextok.kernels import library
from nextok.kernels.ops import packed_linear
from nextok.kernels.packing import pack_blocks, pack_weight

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def best_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def gguf_valued(n: int, k: int, bits: int) -> torch.Tensor:
    """A random (n, k) float32 matrix of GGUF block values: Q4_1 (bits 4) or Q8_0 (bits 8), groups of 32."""
    shape = (n, k // 32, 32)
    scale = (torch.rand(n, k // 32, 1) * 0.01 + 1e-3).half().float()
    if bits == 8:
        q = torch.randint(-127, 128, shape).float()
        q[..., 0] = 127  # ggml's scale is the group's largest magnitude / 127
        return (q * scale).view(n, k)
    q = torch.randint(0, 16, shape).float()
    q[..., 0], q[..., 1] = 0, 15  # ggml's scale spans the group's minimum to its maximum
    return (q * scale - (torch.rand(n, k // 32, 1) * 0.05).half().float()).view(n, k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,5,16,64,256", help="activation rows per product, comma-separated")
    args = parser.parse_args()
    lib = library()
    if lib is None:
        raise SystemExit("nextok's CPU kernels are not available here (they need AVX-512 BF16/VNNI and a C compiler)")
    torch.manual_seed(0)
    f32 = [torch.randn(n, k) / k**0.5 for n, k in SHAPES]
    f32_t = [w.t().contiguous() for w in f32]
    bf16 = [w.bfloat16() for w in f32]
    int8 = [torch.randint(-127, 128, w.shape, dtype=torch.int8) for w in f32]
    scales = [torch.rand(w.shape[0]) / 100 for w in f32]
    packed = {"f32": [pack_weight(w) for w in f32], "bf16": [pack_weight(w) for w in bf16],
              "int8": [pack_weight(w) for w in int8],
              "blocks": [], "bf16 blocks": []}
    for n, k in SHAPES:
        values = gguf_valued(n, k, 8 if n == 49152 else 4)
        packed["blocks"].append(pack_blocks(values))
        packed["bf16 blocks"].append(pack_blocks(values, torch.bfloat16))
    del f32
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per step (best of 5), ratio = torch / nextok\n")
    print("| rows | f32 torch | f32 nextok | ratio | f32 blocks | ratio | bf16 torch | bf16 nextok | ratio "
          "| bf16 blocks | ratio | int8 torch | int8 nextok | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for rows in [int(r) for r in args.rows.split(",")]:
        x = {k: torch.randn(rows, k) for k in (576, 1536)}
        xb = {k: v.bfloat16() for k, v in x.items()}
        cells = [
            best_ms(lambda: [x[w.shape[0]] @ w for w in f32_t]),
            best_ms(lambda: [packed_linear(x[w.shape[0]], p, w.shape[1]) for w, p in zip(f32_t, packed["f32"])]),
            best_ms(lambda: [F.linear(xb[w.shape[1]], w) for w in bf16]),
            best_ms(lambda: [packed_linear(xb[w.shape[1]], p, w.shape[0]) for w, p in zip(bf16, packed["bf16"])]),
            best_ms(lambda: [torch.ops.aten._weight_int8pack_mm(xb[w.shape[1]], w, s.bfloat16())
                             for w, s in zip(int8, scales)]),
            best_ms(lambda: [packed_linear(xb[w.shape[1]], p, w.shape[0], scale=s)
                             for w, p, s in zip(int8, packed["int8"], scales)]),
        ]
        blocks_ms = {  # after the dense cell of the same dtype, against the same torch cell
            4: best_ms(lambda: [packed_linear(x[w.shape[0]], p, w.shape[1]) for w, p in zip(f32_t, packed["blocks"])]),
            9: best_ms(lambda: [packed_linear(xb[w.shape[1]], p, w.shape[0])
                                for w, p in zip(bf16, packed["bf16 blocks"])]),
        }
        row = [f"{rows}"]
        for torch_ms, ours_ms in zip(cells[::2], cells[1::2]):
            row += [f"{torch_ms:.2f}", f"{ours_ms:.2f}", f"{torch_ms / ours_ms:.2f}x"]
            if len(row) in blocks_ms:
                row += [f"{blocks_ms[len(row)]:.2f}", f"{torch_ms / blocks_ms[len(row)]:.2f}x"]
        print("| " + " | ".join(row) + " |", flush=True)

    big = torch.ones(1 << 28)  # 1 GiB of float32
    seconds = best_ms(lambda: lib.read_sum_f32(big.data_ptr(), big.numel(), torch.get_num_threads())) / 1e3
    bandwidth = big.numel() * 4 / seconds
    weights = sum(n * k for n, k in SHAPES)
    print(f"\nmemory read: {bandwidth / 1e9:.1f} GB/s; a batch-1 step reads {weights / 1e6:.0f}M weights:")
    print("| weights | MB per step | ceiling tok/s |")
    print("|---|---|---|")
    block_bytes = sum(p.numel() for p in packed["blocks"])
    for name, size in (("float32", 4 * weights), ("float32 in Q4_1/Q8_0 blocks", block_bytes),
                       ("bfloat16", 2 * weights), ("int8", weights)):
        print(f"| {name} | {size / 1e6:.0f} | {bandwidth / size:.0f} |")


if __name__ == "__main__":
    main()
