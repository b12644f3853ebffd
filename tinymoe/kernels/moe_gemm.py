"""Grouped GEMM for the expert MLP over assignments sorted and padded by `moe_align`: the
Triton implementation of `moe_experts` (moe_op.py, whose torch twin is its reference).

`fused_moe(x, topk_weights, sorted_ids, tile_copy, copy_row, w, out, block_m)` runs one precision
pool: tile i of `sorted_ids` belongs to copy `tile_copy[i]`, which this pool serves from weight
row `copy_row[copy]` (-1: another pool's copy, skipped). Two launches: gate and up fused with
SiLU gating into an fp32 intermediate `[L, I]` in sorted order, then the down projection scaled
by the routing weight, written to `out[t * k + slot]` (fp32 `[T * k, D]`). Each pool writes only
the rows of its own copies; the caller sums `out` over the k slots.

Weights: a `MoEWeights` (full bf16/fp16/fp32; int8 and int4 `QWeight` stacks in the formats of
`kernels/quant.py`: int4 input k of a row is nibble k % 2 of its byte k // 2, with a (scale, zero)
per group of inputs). Under the interpreter every operand is upcast to fp32 (its bf16
arithmetic is wrong); on a GPU the dot runs in the activation dtype with fp32 accumulation.
"""
import torch
import triton
import triton.language as tl

from .backend import interpreting
from .moe_op import PRECISIONS, MoEWeights
from .quant import INT4_GROUPS, QWeight

PRECISION_CODE = {name: code for code, name in enumerate(PRECISIONS)}


@triton.jit
def _weight_tile(w_ptr, s_ptr, row, offs_n, offs_k, mask, K, NP, PREC: tl.constexpr, GROUP: tl.constexpr):
    """fp32 [BLOCK_K, BLOCK_N] tile of weight rows offs_n, inputs offs_k (int8: unscaled) of matrix
    `row` of a stack of [NP, K] matrices (int4: K is the padded input count, two inputs a byte)."""
    n = offs_n[None, :]
    k = offs_k[:, None]
    if PREC == 2:
        byte = tl.load(w_ptr + (row * NP + n) * (K // 2) + k // 2, mask=mask, other=0).to(tl.int32)
        q = (byte >> (k % 2 * 4)) & 15
        sz = s_ptr + ((row * NP + n) * (K // GROUP) + k // GROUP) * 2
        scale = tl.load(sz, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(sz + 1, mask=mask, other=0.0).to(tl.float32)
        w = (q.to(tl.float32) - 8.0) * scale + zero
    else:
        w = tl.load(w_ptr + (row * NP + n) * K + k, mask=mask, other=0).to(tl.float32)
    return w


@triton.jit
def _tile_row(tile_copy_ptr, copy_row_ptr):
    copy = tl.load(tile_copy_ptr + tl.program_id(0))
    return tl.where(copy >= 0, tl.load(copy_row_ptr + tl.maximum(copy, 0)), -1)


@triton.jit
def _gate_up_kernel(x_ptr, sorted_ptr, tile_copy_ptr, copy_row_ptr, w_ptr, s_ptr, h_ptr,
                    num_assign, top_k, D, I, NP, KW,
                    PREC: tl.constexpr, GROUP: tl.constexpr, DOT_IN_INPUT_DTYPE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = _tile_row(tile_copy_ptr, copy_row_ptr)
    if row < 0:  # padding tile, or a copy served by another pool
        return
    row = row.to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    aid = tl.load(sorted_ptr + offs_m)
    valid = aid < num_assign
    tok = (aid // top_k).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < D
        a = tl.load(x_ptr + tok[:, None] * D + offs_k[None, :],
                    mask=valid[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        w_mask = k_mask[:, None] & n_mask[None, :]
        wg = _weight_tile(w_ptr, s_ptr, row, offs_n, offs_k, w_mask, KW, NP, PREC, GROUP)
        wu = _weight_tile(w_ptr, s_ptr, row, offs_n + I, offs_k, w_mask, KW, NP, PREC, GROUP)
        if DOT_IN_INPUT_DTYPE:
            dt = x_ptr.dtype.element_ty
            acc_g = tl.dot(a.to(dt), wg.to(dt), acc_g)
            acc_u = tl.dot(a.to(dt), wu.to(dt), acc_u)
        else:
            acc_g = tl.dot(a, wg, acc_g)
            acc_u = tl.dot(a, wu, acc_u)
    if PREC == 1:
        acc_g *= tl.load(s_ptr + row * NP + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        acc_u *= tl.load(s_ptr + row * NP + I + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(h_ptr + offs_m[:, None].to(tl.int64) * I + offs_n[None, :], h,
             mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(h_ptr, sorted_ptr, tile_copy_ptr, copy_row_ptr, w_ptr, s_ptr, topk_w_ptr, out_ptr,
                 num_assign, D, I, NP, KW,
                 PREC: tl.constexpr, GROUP: tl.constexpr, DOT_IN_INPUT_DTYPE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = _tile_row(tile_copy_ptr, copy_row_ptr)
    if row < 0:
        return
    row = row.to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    aid = tl.load(sorted_ptr + offs_m)
    valid = aid < num_assign
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < I
        a = tl.load(h_ptr + offs_m[:, None].to(tl.int64) * I + offs_k[None, :],
                    mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = _weight_tile(w_ptr, s_ptr, row, offs_n, offs_k, k_mask[:, None] & n_mask[None, :],
                         KW, NP, PREC, GROUP)
        if DOT_IN_INPUT_DTYPE:
            dt = topk_w_ptr.dtype.element_ty
            acc = tl.dot(a.to(dt), w.to(dt), acc)
        else:
            acc = tl.dot(a, w, acc)
    if PREC == 1:
        acc *= tl.load(s_ptr + row * NP + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    acc *= tl.load(topk_w_ptr + aid, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + aid[:, None].to(tl.int64) * D + offs_n[None, :], acc,
             mask=valid[:, None] & n_mask[None, :])


def _block(dim: int, cap: int = 64) -> int:
    return max(16, min(cap, triton.next_power_of_2(dim)))


def _check(x, topk_weights, w: MoEWeights, out):
    T, D = x.shape
    if D != w.hidden or out.shape != (topk_weights.numel(), D) or out.dtype != torch.float32:
        raise ValueError(f"fused_moe: x {tuple(x.shape)}, out {tuple(out.shape)} {out.dtype} do not fit "
                         f"experts of hidden {w.hidden} (out must be fp32 [T*k, D])")
    if w.precision not in PRECISION_CODE:
        raise ValueError(f"unknown expert precision {w.precision!r}")


def _operands(w: torch.Tensor | QWeight):
    """(codes or weights, scales (the weights again when there are none), output channels per
    matrix, stored inputs per row (int4: padded), int4 group or 0)."""
    if isinstance(w, QWeight):
        return w.q.contiguous(), w.scales.contiguous(), w.rows, w.padded_cols, w.group
    w = w.contiguous()
    return w, w, w.shape[1], w.shape[2], 0


def fused_moe(x, topk_weights, sorted_ids, tile_copy, copy_row, w: MoEWeights, out, block_m):
    _check(x, topk_weights, w, out)
    x, topk_weights = x.contiguous(), topk_weights.contiguous()
    D, I, k = w.hidden, w.inter, topk_weights.shape[-1]
    prec = PRECISION_CODE[w.precision]
    dot_in_input = not interpreting() and x.dtype != torch.float32
    h = torch.empty(sorted_ids.numel(), I, dtype=torch.float32, device=x.device)
    tiles = tile_copy.numel()
    w13, s13, n13, k13, g13 = _operands(w.w13)
    bn, bk = _block(I), _block(D)
    _gate_up_kernel[(tiles, triton.cdiv(I, bn))](
        x, sorted_ids, tile_copy, copy_row, w13, s13, h, topk_weights.numel(), k, D, I, n13, k13,
        PREC=prec, GROUP=g13, DOT_IN_INPUT_DTYPE=dot_in_input, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk)
    w2, s2, n2, k2, g2 = _operands(w.w2)
    bn, bk = _block(D), _block(I)
    _down_kernel[(tiles, triton.cdiv(D, bn))](
        h, sorted_ids, tile_copy, copy_row, w2, s2, topk_weights.to(x.dtype), out, topk_weights.numel(), D, I,
        n2, k2, PREC=prec, GROUP=g2, DOT_IN_INPUT_DTYPE=dot_in_input, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk)
    return out


def aot_kernels(block_m: int = 16, block_n: int = 64, block_k: int = 64):
    """(name, kernel, signature, constexprs) for every variant the GPU path launches (int4: each
    group of `kernels.quant.INT4_GROUPS`)."""
    common = {"sorted_ptr": "*i32", "tile_copy_ptr": "*i32", "copy_row_ptr": "*i32"}
    shapes = {"PREC": None, "GROUP": None, "DOT_IN_INPUT_DTYPE": True,
              "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
    weight_types = {"full": ("*{dt}", "*{dt}"), "int8": ("*i8", "*bf16"), "int4": ("*u8", "*bf16")}
    variants = [("full", 0, ""), ("int8", 0, "")] + [("int4", g, f"_g{g}") for g in INT4_GROUPS]
    out = []
    for dt in ("bf16", "fp16"):
        for prec, group, tag in variants:
            wt, st = (t.format(dt=dt) for t in weight_types[prec])
            consts = dict(shapes, PREC=PRECISION_CODE[prec], GROUP=group)
            gate_up = {"x_ptr": f"*{dt}", **common, "w_ptr": wt, "s_ptr": st, "h_ptr": "*fp32",
                       "num_assign": "i32", "top_k": "i32", "D": "i32", "I": "i32", "NP": "i32", "KW": "i32",
                       **{c: "constexpr" for c in consts}}
            down = {"h_ptr": "*fp32", **common, "w_ptr": wt, "s_ptr": st, "topk_w_ptr": f"*{dt}",
                    "out_ptr": "*fp32", "num_assign": "i32", "D": "i32", "I": "i32", "NP": "i32", "KW": "i32",
                    **{c: "constexpr" for c in consts}}
            out.append((f"moe_gate_up_{prec}{tag}_{dt}", _gate_up_kernel, gate_up, consts))
            out.append((f"moe_down_{prec}{tag}_{dt}", _down_kernel, down, consts))
    return out


AOT_KERNELS = aot_kernels()
