"""Weight-only quantisers for expert matrices [..., N, K] (N output channels, K inputs).

int8: per output channel, symmetric: w ~= q * scale, q in [-127, 127].
int4: per (channel, group of K), asymmetric: w ~= (q - 8) * scale + zero, q in [0, 15],
      scale and zero in bf16. This is the rule of torch's `_weight_int4pack_mm_for_cpu`, so the
      same numbers feed the CPU kernel and the Triton kernel.
The dequantisation of each layout lives with the op that reads it (kernels/moe_op.py).
"""
import functools

import torch

from ..kernels import moe_op
from ..kernels.moe_op import dequantize_int4, dequantize_int8  # noqa: F401 (re-exported)

INT4_GROUP = 128
# The CPU int4 kernel's packing takes output channels in multiples of 64 and inputs in multiples
# of 32: the int4 pool zero-pads to these (only tiny test models need it).
INT4_ROW_PAD, INT4_COL_PAD = 64, 32
SCALE_BYTES = 2  # int8 scales, int4 scales and zeros: bf16


def _round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    # bf16 rounding to nearest is within 2^-9 relative; nudging up first makes the stored scale
    # never smaller than needed, so the extreme values do not clip.
    return (x * (1 + 2 ** -8)).to(torch.bfloat16)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (q int8 [..., N, K], scale bf16 [..., N])."""
    wf = w.float()
    scale = _round_up_bf16(wf.abs().amax(-1).clamp_min(1e-12) / 127)
    q = torch.round(wf / scale.float()[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int4_group_size(k: int, group: int = INT4_GROUP) -> int:
    """The default group, or the largest power of two >= 32 dividing K when K is small
    (32 is the smallest group torch's CPU int4 kernel takes)."""
    g = group
    while g > 32 and (k % g or g > k):
        g //= 2
    if k % g:
        raise ValueError(f"int4 quantisation needs K divisible by a group size >= 32, got K={k}")
    return g


def int4_padded(rows: int, cols: int) -> tuple[int, int]:
    """[N, K] as the int4 pool stores it: N up to a multiple of 64, K of 32."""
    return -(-rows // INT4_ROW_PAD) * INT4_ROW_PAD, -(-cols // INT4_COL_PAD) * INT4_COL_PAD


def matrix_bytes(rows: int, cols: int, precision: str, full_itemsize: int) -> int:
    """Bytes one [rows, cols] matrix (rows = output channels) takes in a pool of `precision`,
    scales and zero points included; `full_itemsize` is the unquantised dtype's."""
    if precision == "full":
        return rows * cols * full_itemsize
    if precision == "int8":
        return rows * cols + rows * SCALE_BYTES
    if precision == "int4":
        rows, cols = int4_padded(rows, cols)
        return rows * cols // 2 + (cols // int4_group_size(cols)) * rows * 2 * SCALE_BYTES
    raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(moe_op.PRECISIONS)}")


def expert_bytes(hidden: int, inter: int, precision: str, full_itemsize: int) -> int:
    """Bytes of one SwiGLU expert copy as the pools store it: gate and up as one [2I, D] matrix,
    down as [D, I]. The pools' `copy_bytes` and R&Q's budget both count with this."""
    return matrix_bytes(2 * inter, hidden, precision, full_itemsize) + \
        matrix_bytes(hidden, inter, precision, full_itemsize)


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (q uint8 [..., N, K] in 0..15, scales_zeros bf16 [..., K/group, N, 2]).

    The scale/zero layout [K/group, N, (scale, zero)] is the one the CPU int4 kernel takes.
    """
    *lead, n, k = w.shape
    if k % group:
        raise ValueError(f"K={k} is not a multiple of the int4 group size {group}")
    wg = w.float().reshape(*lead, n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = _round_up_bf16((hi - lo).clamp_min(1e-12) / 15)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)  # the value of q = 8, mid-range
    q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None]) + 8
    q = q.clamp_(0, 15).to(torch.uint8).reshape(*lead, n, k)
    scales_zeros = torch.stack((scale, zero), -1).transpose(-2, -3).contiguous()
    return q, scales_zeros


@functools.cache
def int4_pack_block() -> int:
    """Channels per block in the layout of torch's `_convert_weight_to_int4pack_for_cpu`. It is
    four SIMD vectors of floats, so it depends on the CPU torch runs on (64 with AVX-512, 32 with
    AVX2) and is not exposed: pack a probe and see which block reproduces it."""
    q = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    for block in (64, 32, 16, 128):
        if torch.equal(pack_int4(q.to(torch.uint8), block), packed):
            return block
    raise RuntimeError("this torch build packs int4 weights in a layout tinymoe does not know")


def pack_int4(q: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """q uint8 [..., N, K] (N a multiple of 64) -> packed uint8 [..., N, K/2] in the layout of
    torch's CPU int4 kernel: for each block of `block` channels (default: this CPU's) and each k,
    block/2 bytes whose low nibbles are the block's first half of channels and high nibbles its
    second half. The Triton kernel reads the same layout, so one copy of the weights serves both."""
    block = block or int4_pack_block()
    *lead, n, k = q.shape
    if n % 64:
        raise ValueError(f"int4 packing needs N divisible by 64, got N={n}")
    half = block // 2
    blocks = q.reshape(*lead, n // block, 2, half, k).transpose(-1, -2)  # [..., N/B, 2, K, B/2]
    packed = blocks[..., 0, :, :] | (blocks[..., 1, :, :] << 4)           # [..., N/B, K, B/2]
    return packed.reshape(*lead, n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Inverse of `pack_int4` (default block: this CPU's)."""
    return moe_op.unpack_int4(packed, block or int4_pack_block())
