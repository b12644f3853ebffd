"""`moe_align` as two Triton kernels (count, then scatter); the op and its torch twin are in
moe_align.py."""
import torch
import triton
import triton.language as tl

from .moe_align import _outputs


@triton.jit
def _count_kernel(copy_ids_ptr, counts_ptr, num_assign, BLOCK: tl.constexpr):
    copy = tl.program_id(0)
    total = 0
    for start in range(0, num_assign, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(copy_ids_ptr + offs, mask=offs < num_assign, other=-1)
        total += tl.sum((ids == copy).to(tl.int32), axis=0)
    tl.store(counts_ptr + copy, total)


@triton.jit
def _scatter_kernel(copy_ids_ptr, counts_ptr, sorted_ptr, tile_copy_ptr, num_assign, num_copies,
                    length, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, COPIES_P2: tl.constexpr):
    # Program c < num_copies writes copy c's run, padding and tiles; program num_copies the tail.
    copy = tl.program_id(0)
    cs = tl.arange(0, COPIES_P2)
    counts = tl.load(counts_ptr + cs, mask=cs < num_copies, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.sum(tl.where(cs < copy, padded, 0), axis=0)
    run = tl.sum(tl.where(cs == copy, padded, 0), axis=0)
    count = tl.sum(tl.where(cs == copy, counts, 0), axis=0)
    if copy == num_copies:  # the tail after the last run
        run = length - start
        count = 0
    seen = 0
    if copy < num_copies:
        for chunk in range(0, num_assign, BLOCK):
            offs = chunk + tl.arange(0, BLOCK)
            mine = tl.load(copy_ids_ptr + offs, mask=offs < num_assign, other=-1) == copy
            pos = start + seen + tl.cumsum(mine.to(tl.int32), axis=0) - 1
            tl.store(sorted_ptr + pos, offs.to(tl.int32), mask=mine)
            seen += tl.sum(mine.to(tl.int32), axis=0)
    tag = tl.where(copy < num_copies, copy, -1)
    for pad in range(count, run, BLOCK):
        offs = pad + tl.arange(0, BLOCK)
        tl.store(sorted_ptr + start + offs, tl.zeros([BLOCK], tl.int32) + num_assign, mask=offs < run)
    for tile in range(0, run // BLOCK_M, BLOCK):
        offs = tile + tl.arange(0, BLOCK)
        tl.store(tile_copy_ptr + start // BLOCK_M + offs, tl.zeros([BLOCK], tl.int32) + tag,
                 mask=offs < run // BLOCK_M)


def moe_align_triton(copy_ids: torch.Tensor, num_copies: int, block_m: int, out=None):
    sorted_ids, tile_copy = _outputs(copy_ids, num_copies, block_m, out)
    flat = copy_ids.reshape(-1).to(torch.int32)
    counts = torch.empty(num_copies, dtype=torch.int32, device=flat.device)
    _count_kernel[(num_copies,)](flat, counts, flat.numel(), BLOCK=256)
    _scatter_kernel[(num_copies + 1,)](flat, counts, sorted_ids, tile_copy, flat.numel(), num_copies,
                                       sorted_ids.numel(), BLOCK_M=block_m, BLOCK=256,
                                       COPIES_P2=triton.next_power_of_2(num_copies))
    return sorted_ids, tile_copy


def aot_kernels(block_m: int = 16):
    sig_count = {"copy_ids_ptr": "*i32", "counts_ptr": "*i32", "num_assign": "i32", "BLOCK": "constexpr"}
    sig_scatter = {"copy_ids_ptr": "*i32", "counts_ptr": "*i32", "sorted_ptr": "*i32",
                   "tile_copy_ptr": "*i32", "num_assign": "i32", "num_copies": "i32", "length": "i32",
                   "BLOCK_M": "constexpr", "BLOCK": "constexpr", "COPIES_P2": "constexpr"}
    return [
        ("moe_align_count", _count_kernel, sig_count, {"BLOCK": 256}),
        ("moe_align_scatter", _scatter_kernel, sig_scatter,
         {"BLOCK_M": block_m, "BLOCK": 256, "COPIES_P2": 64}),
    ]


AOT_KERNELS = aot_kernels()
