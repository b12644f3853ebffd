"""`moe_experts(x [T, D], copy_ids [T, k], weights [T, k], copies, observer=None) -> [T, D]`: a
MoE layer's routed experts, the one place they are computed. Token t gets the sum over its slots
s of weights[t, s] * down(silu(gate x_t) * up x_t) with the weights of physical copy
copy_ids[t, s]; `weights` are taken rounded to x's dtype. `copies` (`ExpertCopies`) describes
the layer's physical copies: per precision pool its weights (`MoEWeights`), and each copy's
(pool, row). Behind the backend switch:

- torch twin (the reference): per active copy, its rows, fp32 matmuls on dequantised weights,
  rounded to x's dtype once at the end;
- native (the CPU): every copy full precision and bf16: one native call for all tokens
  (`cpu_linear.moe`, the `moe_tokens_bf16` entry the one-call decode step calls too); otherwise
  one gate+up and one down matmul per active copy over its rows (`cpu_linear.linear` for bf16
  and int8 weights, torch's CPU int4/int8 kernels), rounding where those kernels round;
- Triton: `moe_align`, then one fused grouped GEMM launch pair per pool (`moe_gemm.fused_moe`).

`observer(copy, x_rows [n, D] fp32, h [n, I] fp32)`, if given, is called for every active copy
with its input rows and their SwiGLU activations (what the down projection reads); only the
torch twin can report them, so an observer runs it on every backend (calibration uses it).

Also the one list of expert precisions and the one dequantisation of each quantised layout.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import cpu_linear
from .activation import swiglu
from .backend import dispatch
from .cpu_linear import linear, moe

PRECISIONS = ("full", "int8", "int4")  # an expert copy's precision; the Triton kernels' PREC is the index
BLOCK_M = 16  # rows per tile of the Triton grouped GEMM


class MoEWeights(NamedTuple):
    """One precision pool's stacked weights: gate and up as `w13 [n, 2I, D]`, down `w2 [n, D, I]`.
    full: the model's dtype, no scales. int8: int8 codes, bf16 scales `s13 [n, 2I]`, `s2 [n, D]`,
    w = q * s. int4: packed uint8 `[n, pad64(N), KW/2]` (KW: K zero-padded to a multiple of 32) in
    the layout of torch's CPU int4 kernel with `pack_block` channels a block (`unpack_int4`),
    `s13`/`s2` scales and zeros `[n, KW/group, pad64(N), 2]`, w = (q - 8) * scale + zero."""
    precision: str
    w13: torch.Tensor
    w2: torch.Tensor
    s13: torch.Tensor | None
    s2: torch.Tensor | None
    group13: int  # int4 group along D (gate/up) and along I (down); 0 otherwise
    group2: int
    inter: int
    hidden: int
    pack_block: int = 64  # int4 only: channels per block of the packed layout


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
            if not 0 <= row < pools[name].w13.shape[0]:
                raise ValueError(f"expert copy {copy}: row {row} outside pool {name!r} of "
                                 f"{pools[name].w13.shape[0]} rows")
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


def unpack_int4(packed: torch.Tensor, block: int) -> torch.Tensor:
    """Packed uint8 [..., N, K/2] -> codes uint8 [..., N, K] in 0..15. The layout (torch's CPU int4
    kernel's): per block of `block` channels and per k, block/2 bytes whose low nibbles are the
    block's first half of channels and high nibbles its second half."""
    *lead, n, half_k = packed.shape
    k, half = half_k * 2, block // 2
    blocks = packed.reshape(*lead, n // block, k, half)
    q = torch.stack((blocks & 15, blocks >> 4), -3)  # [..., N/B, 2, K, B/2]
    return q.transpose(-1, -2).reshape(*lead, n, k)


def dequantize_int4(q: torch.Tensor, scales_zeros: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Codes [..., N, K] and scales/zeros [..., K/group, N, 2] -> (q - 8) * scale + zero."""
    *lead, n, k = q.shape
    group = k // scales_zeros.shape[-3]
    sz = scales_zeros.float().transpose(-2, -3)  # [..., N, K/group, 2]
    qg = q.float().reshape(*lead, n, k // group, group)
    return ((qg - 8) * sz[..., :1] + sz[..., 1:]).reshape(*lead, n, k).to(dtype)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[..., None]).to(dtype)


def dequantize(w: MoEWeights, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (w13 [2I, D], w2 [D, I]) of one row of a pool."""
    if w.precision == "full":
        return w.w13[row].float(), w.w2[row].float()
    if w.precision == "int8":
        return dequantize_int8(w.w13[row], w.s13[row]), dequantize_int8(w.w2[row], w.s2[row])
    w13 = dequantize_int4(unpack_int4(w.w13[row], w.pack_block), w.s13[row])
    w2 = dequantize_int4(unpack_int4(w.w2[row], w.pack_block), w.s2[row])
    return w13[:2 * w.inter, :w.hidden], w2[:w.hidden, :w.inter]  # without the zero padding


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


# --- the CPU implementation ---------------------------------------------------------------


def use_packed(x: torch.Tensor) -> bool:
    """Weight-only quantised CPU kernel, or dequantise and run a bf16 matmul? The kernels win at
    few rows; with many rows a bf16 GEMM on AMX wins, but without bf16 instructions torch's bf16
    GEMM is emulated and slower than the kernels at any row count (bench/experts.py)."""
    return x.device.type == "cpu" and (x.shape[0] <= cpu_linear.NATIVE_MAX_ROWS_WITH_BF16 or
                                     not cpu_linear.native_bf16())


def _full_mlp(w: MoEWeights, row: int, x: torch.Tensor) -> torch.Tensor:
    h = linear(x.to(w.w13.dtype), w.w13[row])
    return linear(swiglu(h, w.inter), w.w2[row])


def _int8_linear(x, q, s):
    if cpu_linear.supports(x, q, s):  # 1.6x torch's int8 kernel for one row, as fast for more
        return linear(x, q, s)
    # torch's CPU kernel silently computes garbage unless K is a multiple of 16
    if use_packed(x) and x.shape[1] % 16 == 0:
        return torch.ops.aten._weight_int8pack_mm(x, q, s)
    return F.linear(x, q.to(x.dtype)) * s  # int8 codes are exact in bf16; scale the outputs


def _int8_mlp(w: MoEWeights, row: int, x: torch.Tensor) -> torch.Tensor:
    xb = x.to(torch.bfloat16)  # the CPU kernels want bf16 activations
    h = _int8_linear(xb, w.w13[row], w.s13[row])
    return _int8_linear(swiglu(h, w.inter), w.w2[row], w.s2[row]).to(x.dtype)


def _int4_linear(x, packed, sz, group, block):
    if x.shape[1] != packed.shape[1] * 2:
        x = F.pad(x, (0, packed.shape[1] * 2 - x.shape[1]))
    if use_packed(x):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)
    return F.linear(x, dequantize_int4(unpack_int4(packed, block), sz, x.dtype))


def _int4_mlp(w: MoEWeights, row: int, x: torch.Tensor) -> torch.Tensor:
    xb = x.to(torch.bfloat16)
    h = _int4_linear(xb, w.w13[row], w.s13[row], w.group13, w.pack_block)
    y = _int4_linear(swiglu(h, w.inter), w.w2[row], w.s2[row], w.group2, w.pack_block)
    return y[:, :w.hidden].to(x.dtype)


_MLP = {"full": _full_mlp, "int8": _int8_mlp, "int4": _int4_mlp}


def _copy_mlp(copies: ExpertCopies, copy: int, x: torch.Tensor) -> torch.Tensor:
    name, row = copies.where[copy]
    return _MLP[name](copies.pools[name], row, x)


def moe_experts_native(x, copy_ids, weights, copies: ExpertCopies, observer=None):
    if observer is not None or x.device.type != "cpu":
        return NotImplemented
    _check(x, copy_ids, weights, copies)
    T, k = copy_ids.shape
    if copy_ids.numel() == 0:
        return torch.zeros_like(x)
    # every copy full precision: one native call for all of them; but with bf16 instructions
    # torch's GEMM beats its fp32 FMAs from a few dozen rows on (128-token prefill of a
    # mixtral-mini layer, AVX512-BF16: 28 against 108 ms), and the per-copy loop below sends
    # each copy's rows to whichever `linear` picks
    many_rows = cpu_linear.native_bf16() and T > cpu_linear.NATIVE_MAX_ROWS_WITH_BF16
    if copies.full_rows is not None and not many_rows:
        full = copies.pools["full"]
        out = moe(x, copy_ids, weights, full.w13, full.w2, copies.full_rows)
        if out is not None:
            return out
    if T == 1:  # decode at batch 1: nothing to sort or scatter; same sums, same order as the native call
        out = torch.zeros_like(x)
        pairs = sorted(zip(copy_ids[0].tolist(), weights[0].to(x.dtype).tolist()))
        _out_of_range(pairs[0][0], pairs[-1][0], copies)
        # rounded to x's dtype first, a Python float multiplies exactly as the tensor would
        for copy, weight in pairs:
            out += _copy_mlp(copies, copy, x).to(x.dtype) * weight
        return out
    flat = copy_ids.reshape(-1)
    low, high = flat.aminmax()
    _out_of_range(int(low), int(high), copies)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=copies.num_copies).tolist()
    token = order // k
    xs = x.index_select(0, token)
    ys = torch.empty_like(xs)
    start = 0
    for copy, n in enumerate(counts):
        if n:
            ys[start:start + n] = _copy_mlp(copies, copy, xs[start:start + n])
            start += n
    ys.mul_(weights.reshape(-1).index_select(0, order).to(ys.dtype)[:, None])
    return torch.zeros_like(x).index_add_(0, token, ys)


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
