"""nextok/kernels/packing.py: quantized groups in the kernels' block formats, and back.

The GGUF types themselves (their scales and q, bit for bit against gguf's dequantizer, and their
products) are tested in tests/models/test_gguf_blocks.py; here the formats take any groups.
"""

import pytest
import torch

from nextok.kernels import packing
from nextok.kernels.packing import FORMAT_Q4, FORMAT_Q8, FORMAT_Q8X, Groups


def random_groups(n: int, k: int, fmt: int, seed: int, size: int = 32) -> Groups:
    """Random groups of a format: float16-valued scales and minimums (so q * scale is exact, as in GGUF)
    of every magnitude float16 has, zeros, negatives and the largest float16 among them."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, k // size)

    def values() -> torch.Tensor:
        v = torch.randn(shape, generator=g) * 10.0 ** torch.randint(-7, 4, shape, generator=g)
        v.view(-1)[::7] = 0.0
        v.view(-1)[3::11] = 65504.0
        return v.half().float()

    if fmt == FORMAT_Q4:
        q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int8)
    else:
        q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    return Groups(q, values(), None if fmt == FORMAT_Q8 else values(), size, fmt)


def dense(groups: Groups) -> torch.Tensor:
    """The float32 matrix the groups hold: q * scale + minimum (q * scale exact: the kernels' FMA)."""
    scale = groups.scale.repeat_interleave(groups.size, dim=1)
    w = groups.q.float() * scale
    return w if groups.minimum is None else w + groups.minimum.repeat_interleave(groups.size, dim=1)


FORMATS = [(FORMAT_Q4, 32), (FORMAT_Q8, 32), (FORMAT_Q8X, 16), (FORMAT_Q8X, 32)]


@pytest.mark.parametrize("fmt,size", FORMATS, ids=["q4", "q8", "q8x", "q8x-per-32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(1, 32), (31, 96), (32, 64), (77, 160)])
def test_groups_pack_and_unpack(fmt, size, dtype, n, k):
    groups = random_groups(n, k, fmt, seed=n + k, size=size)
    packed = packing.pack_groups(groups, dtype)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 31) // 32 * 2, k // 32, packing.GROUP_BYTES[fmt])
    assert packing.block_format(packed) == fmt
    assert torch.equal(packing.unpack_blocks(packed, n, dtype), dense(groups).to(dtype))
    assert torch.equal(packing.unpack_weight(packed, n, dtype), dense(groups).to(dtype))
    if n % 32:  # the padded columns are zero weights
        assert torch.equal(packing.unpack_blocks(packed, packed.shape[0] * 16, dtype)[n:],
                           torch.zeros(packed.shape[0] * 16 - n, k, dtype=dtype))


def test_pack_groups_writes_into_out():
    groups = random_groups(40, 64, FORMAT_Q4, seed=1)
    out = torch.full((4, 2, packing.Q4_GROUP_BYTES), 7, dtype=torch.uint8)
    assert packing.pack_groups(groups, out=out) is out
    assert torch.equal(out, packing.pack_groups(groups))
    with pytest.raises(ValueError, match="does not fit"):
        packing.pack_groups(groups, out=torch.empty(2, 2, packing.Q4_GROUP_BYTES, dtype=torch.uint8))
    with pytest.raises(ValueError, match="float16"):
        packing.pack_groups(groups, torch.float16)


def test_groups_of_several_formats_cat_into_q8x():
    parts = [random_groups(16, 64, FORMAT_Q4, 1), random_groups(8, 64, FORMAT_Q8, 2),
             random_groups(24, 64, FORMAT_Q8X, 3, size=16)]
    fused = Groups.cat(parts)
    assert fused.format == FORMAT_Q8X and fused.size == 16 and fused.q.shape == (48, 64)
    assert torch.equal(dense(fused), torch.cat([dense(part) for part in parts]))
    same = Groups.cat(parts[:1] * 2)
    assert same.format == FORMAT_Q4 and torch.equal(dense(same), torch.cat([dense(parts[0])] * 2))
    with pytest.raises(ValueError, match="do not fit"):
        Groups.cat(parts[:2], FORMAT_Q4)


def test_common_format_is_the_smallest_that_holds_every_part():
    f = packing
    assert f.common_format({f.FORMAT_Q4K}) == f.FORMAT_Q4K
    assert f.common_format({f.FORMAT_Q4K, f.FORMAT_Q8K}) == f.FORMAT_Q8K  # Q4_K_M's q/k with v
    assert f.common_format({f.FORMAT_Q4K, f.FORMAT_Q4}) == f.FORMAT_Q4  # float32 scales hold both
    assert f.common_format({f.FORMAT_Q4K, f.FORMAT_Q8}) == f.FORMAT_Q8X
    assert f.common_format({f.FORMAT_Q8, f.FORMAT_Q4}) == f.FORMAT_Q8X
