"""`moe_experts(x [T, D], copy_ids [T, k], weights [T, k], copies, observer=None) -> [T, D]`: a
MoE layer's routed experts, the one place they are computed. Token t gets the sum over its slots
s of weights[t, s] * down(silu(gate x_t) * up x_t) with the weights of physical copy
copy_ids[t, s]; `weights` are taken rounded to x's dtype. `copies` (`ExpertCopies`) describes
the layer's physical copies: per precision pool its weights (`MoEWeights`), and each copy's
(pool, row). Behind the backend switch:

- torch twin (the reference): per active copy, its rows, fp32 matmuls on dequantised weights,
  rounded to x's dtype once at the end;
- native (the CPU, `kernels/moe_cpu.py`): one native call for all tokens and every plan and
  precision (the `moe_tokens` entry the one-call decode step calls too); with bf16 instructions
  and over 16 tokens, one gate+up and one down `cpu_linear.linear` per active copy over its
  rows (torch's bf16 GEMM), rounding where those kernels round;
- Triton: `moe_align`, then one fused grouped GEMM launch pair per pool (`moe_gemm.fused_moe`).

`observer(copy, x_rows [n, D] fp32, h [n, I] fp32)`, if given, is called for every active copy
with its input rows and their SwiGLU activations (what the down projection reads); only the
torch twin can report them, so an observer runs it on every backend (calibration uses it).

Also the one list of expert precisions. The quantised formats and their dequantisation are
`kernels/quant.py`'s.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import quant
from .backend import dispatch
from .quant import QWeight

PRECISIONS = ("full", "int8", "int4")  # an expert copy's precision; the Triton kernels' PREC is the index
BLOCK_M = 16  # rows per tile of the Triton grouped GEMM


class MoEWeights(NamedTuple):
    """One precision pool's stacked weights: gate and up as `w13 [n, 2I, D]` (rows 0..I gate,
    I..2I up), down as `w2 [n, D, I]`. full: Tensors in the model's dtype; int8 / int4: stacked
    `kernels.quant.QWeight`s in the formats defined there (`w13.row(i)` is one expert's)."""
    precision: str
    w13: torch.Tensor | QWeight
    w2: torch.Tensor | QWeight
    inter: int
    hidden: int

    @property
    def rows(self) -> int:
        return self.w13.shape[0]


class ExpertCopies:
    """A layer's physical expert copies as the op reads them: `pools` {precision: MoEWeights}
    and `where[copy] = (precision, row)`. Built once per plan and storage (`Experts.copies`)."""

    def __init__(self, pools: dict[str, MoEWeights], where: list[tuple[str, int]]):
        for name, w in pools.items():
            if name not in PRECISIONS or w.precision != name:
                raise ValueError(f"expert pool {name!r} holds {w.precision!r} weights; valid pools: "
                                 f"{', '.join(PRECISIONS)}")
        sizes = {(w.hidden, w.inter) for w in pools.values()}
        if len(sizes) != 1:
            raise ValueError(f"expert pools disagree on (hidden, intermediate) sizes: {sorted(sizes)}")
        for copy, (name, row) in enumerate(where):
            if name not in pools:
                raise ValueError(f"expert copy {copy} is in pool {name!r}, which is not given")
            if not 0 <= row < pools[name].rows:
                raise ValueError(f"expert copy {copy}: row {row} outside pool {name!r} of {pools[name].rows} rows")
        self.pools, self.where = dict(pools), tuple(where)
        (self.hidden, self.inter), = sizes
        # every copy full precision: each copy's row in the full pool (the one native call's case)
        self.full_rows = [row for _, row in where] if all(name == "full" for name, _ in where) else None
        self._rows: dict[torch.device, dict[str, torch.Tensor]] = {}

    @property
    def num_copies(self) -> int:
        return len(self.where)

    def copy_rows(self, device) -> dict[str, torch.Tensor]:
        """Per pool that serves copies: int32 [C], each copy's row in it or -1 (the Triton tables)."""
        if device not in self._rows:
            self._rows[device] = {
                name: torch.tensor([row if pool == name else -1 for pool, row in self.where], dtype=torch.int32,
                                   device=device)
                for name in dict.fromkeys(pool for pool, _ in self.where)}
        return self._rows[device]


def dequantize(w: MoEWeights, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (w13 [2I, D], w2 [D, I]) of one row of a pool."""
    if w.precision == "full":
        return w.w13[row].float(), w.w2[row].float()
    return quant.dequantize(w.w13.row(row)), quant.dequantize(w.w2.row(row))


def _check(x, copy_ids, weights, copies: ExpertCopies) -> None:
    if not isinstance(copies, ExpertCopies):
        raise TypeError(f"moe_experts: copies must be an ExpertCopies, not {type(copies).__name__}")
    if x.dim() != 2 or x.shape[1] != copies.hidden:
        raise ValueError(f"moe_experts: x is {tuple(x.shape)}, want [T, {copies.hidden}]")
    if copy_ids.dim() != 2 or copy_ids.shape[0] != x.shape[0] or weights.shape != copy_ids.shape:
        raise ValueError(f"moe_experts: copy_ids {tuple(copy_ids.shape)} and weights {tuple(weights.shape)} "
                         f"must both be [T, k] with T = {x.shape[0]}")
    if copy_ids.dtype.is_floating_point or copy_ids.dtype == torch.bool:
        raise TypeError(f"moe_experts: copy_ids must be integers, not {copy_ids.dtype}")


def _out_of_range(low: int, high: int, copies: ExpertCopies) -> None:
    if low < 0 or high >= copies.num_copies:
        raise ValueError(f"moe_experts: copy ids in {low}..{high}, outside 0..{copies.num_copies - 1}")


def moe_experts_torch(x, copy_ids, weights, copies: ExpertCopies, observer=None):
    _check(x, copy_ids, weights, copies)
    T, k = copy_ids.shape
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    if copy_ids.numel() == 0:
        return out.to(x.dtype)
    flat = copy_ids.reshape(-1).long()
    active = flat.unique()
    _out_of_range(int(active[0]), int(active[-1]), copies)
    order = torch.argsort(flat, stable=True)
    w = weights.to(x.dtype).float().reshape(-1)
    I, start = copies.inter, 0
    for copy, n in zip(active.tolist(), torch.bincount(flat)[active].tolist()):
        slots = order[start:start + n]
        start += n
        name, row = copies.where[copy]
        w13, w2 = dequantize(copies.pools[name], row)
        xs = x[slots // k].float()
        h = F.linear(xs, w13)
        h = F.silu(h[:, :I]) * h[:, I:]
        if observer is not None:
            observer(copy, xs, h)
        out.index_add_(0, slots // k, F.linear(h, w2) * w[slots, None])
    return out.to(x.dtype)


# --- the CPU implementation: kernels/moe_cpu.py (it imports this module's types) -----------


def moe_experts_native(x, copy_ids, weights, copies: ExpertCopies, observer=None):
    from .moe_cpu import moe_experts_native as native
    return native(x, copy_ids, weights, copies, observer)


# --- the Triton implementation ------------------------------------------------------------


def moe_experts_triton(x, copy_ids, weights, copies: ExpertCopies, observer=None):
    if observer is not None:  # only the twin reports the activations
        return moe_experts_torch(x, copy_ids, weights, copies, observer)
    from .moe_align import moe_align  # the Triton kernels are defined on first use
    from .moe_gemm import fused_moe
    _check(x, copy_ids, weights, copies)
    T, k = copy_ids.shape
    if copy_ids.numel() == 0:
        return torch.zeros_like(x)
    sorted_ids, tile_copy = moe_align(copy_ids.to(torch.int32), copies.num_copies, BLOCK_M)
    out = torch.empty(T * k, x.shape[1], dtype=torch.float32, device=x.device)
    for name, copy_row in copies.copy_rows(x.device).items():
        fused_moe(x, weights, sorted_ids, tile_copy, copy_row, copies.pools[name], out, BLOCK_M)
    return out.view(T, k, -1).sum(1).to(x.dtype)


moe_experts = dispatch(moe_experts_torch, moe_experts_triton, moe_experts_native)
