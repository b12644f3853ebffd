"""Sort (token, slot) assignments by physical expert copy and pad each copy's run to the tile.

`moe_align(copy_ids [T, k], num_copies, block_m) -> (sorted_ids, tile_copy)`:
- `sorted_ids [L]` int32: flat assignment indices `t * k + slot`, grouped by copy (stable within
  a copy), each copy's run padded with the sentinel `T * k` to a multiple of `block_m`; the
  unused tail is the sentinel too. `L = T*k + min(T*k, C) * (block_m - 1)` bounds the padded
  length without reading anything back from the device.
- `tile_copy [L / block_m]` int32: the copy id of each tile of `block_m` entries, -1 past the end.
The Triton version and the torch twin give identical results.
"""
import torch

from .backend import dispatch  # first: it decides whether triton interprets
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def padded_length(num_assign: int, num_copies: int, block_m: int) -> int:
    return num_assign + min(num_assign, num_copies) * (block_m - 1)


def _outputs(copy_ids, num_copies, block_m, out):
    n = copy_ids.numel()
    length = padded_length(n, num_copies, block_m)
    if out is not None:
        return out
    dev = copy_ids.device
    return (torch.empty(length, dtype=torch.int32, device=dev),
            torch.empty(length // block_m, dtype=torch.int32, device=dev))


def moe_align_torch(copy_ids: torch.Tensor, num_copies: int, block_m: int, out=None):
    sorted_ids, tile_copy = _outputs(copy_ids, num_copies, block_m, out)
    flat = copy_ids.reshape(-1).long()
    n = flat.numel()
    counts = torch.bincount(flat, minlength=num_copies)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    rank = torch.arange(n, device=flat.device) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    sorted_ids.fill_(n)
    sorted_ids[(ends - padded)[flat[order]] + rank] = order.to(torch.int32)
    tile_start = torch.arange(tile_copy.numel(), device=flat.device) * block_m
    copy = torch.searchsorted(ends, tile_start, right=True)
    tile_copy.copy_(torch.where(copy < num_copies, copy, -1))
    return sorted_ids, tile_copy


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


moe_align = dispatch(moe_align_torch, moe_align_triton)


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
