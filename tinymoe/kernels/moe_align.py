"""Sort (token, slot) assignments by physical expert copy and pad each copy's run to the tile.

`moe_align(copy_ids [T, k], num_copies, block_m) -> (sorted_ids, tile_copy)`:
- `sorted_ids [L]` int32: flat assignment indices `t * k + slot`, grouped by copy (stable within
  a copy), each copy's run padded with the sentinel `T * k` to a multiple of `block_m`; the
  unused tail is the sentinel too. `L = T*k + min(T*k, C) * (block_m - 1)` bounds the padded
  length without reading anything back from the device.
- `tile_copy [L / block_m]` int32: the copy id of each tile of `block_m` entries, -1 past the end.
The Triton version (moe_align_triton.py) and the torch twin give identical results.
"""
import torch

from .backend import dispatch


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


moe_align = dispatch(moe_align_torch, "moe_align_triton:moe_align_triton")
