"""The CPU implementation of `kernels.moe_experts` (moe_op.py's native function).

One native call for every plan and precision: the `moe_tokens` entry (cpu_moe.cpp) takes each
copy's gate/up and down matrices as native `Matrix`es (bf16, int8, int4, any mix), the arrays
built once per `ExpertCopies` (`copy_matrices`); the one-call decode step passes the same
arrays. Its matmuls sum each row in one order whatever the tokens, and each token's terms are
added in copy order, so a token's output does not depend on the other tokens of the call (batch
invariance, `Settings.batch_invariant`). Only when `cpu_linear.native_rows` sends the layer's
tokens to torch's GEMM (not batch-invariant, bf16 instructions, more than
NATIVE_MAX_ROWS_WITH_BF16 tokens) does it run per copy instead, each copy's matmuls through
`cpu_linear.linear`, which sends many rows to torch's bf16 GEMM (oneDNN: AVX512-BF16 / AMX), a
quantised copy dequantised to bf16 first: a 128-token prefill of a mixtral-mini layer on
AVX512-BF16 took 28 ms that way against 108 ms in the native fp32 FMAs. The per-copy path also
serves what the native entry cannot take (fp32 models, no library). Both round where the other
rounds: bit for bit equal while the per-copy matmuls are native (tests/test_moe_cpu.py).
"""
import weakref

import torch

from . import cpu_linear
from .activation import swiglu
from .cpu_linear import linear
from .moe_op import ExpertCopies, _check, _out_of_range
from .native import Matrix, native

_matrices = weakref.WeakKeyDictionary()  # ExpertCopies -> CopyMatrices | None


class CopyMatrices:
    """Per physical copy its gate/up (`w13`) and down (`w2`) matrices as ctypes arrays of
    `Matrix`; `tensors` holds what their pointers point into."""

    def __init__(self, copies: ExpertCopies):
        m13, m2 = [], []
        for name, row in copies.where:
            pool = copies.pools[name]
            m13.append(cpu_linear.matrix(_row(pool.w13, row)))
            m2.append(cpu_linear.matrix(_row(pool.w2, row)))
        self.w13, self.w2 = (Matrix * len(m13))(*m13), (Matrix * len(m2))(*m2)
        self.tensors = [m.tensors for m in m13 + m2]


def _row(w, row: int):
    return w[row] if isinstance(w, torch.Tensor) else w.row(row)


def _native_takes(copies: ExpertCopies) -> bool:
    """bf16 full-precision pools, every pool on the CPU."""
    for pool in copies.pools.values():
        tensors = (pool.w13, pool.w2) if pool.precision == "full" else (pool.w13.q, pool.w2.q)
        if any(t.device.type != "cpu" for t in tensors):
            return False
        if pool.precision == "full" and pool.w13.dtype != torch.bfloat16:
            return False
    return True


def copy_matrices(copies: ExpertCopies) -> CopyMatrices | None:
    """The copies' native matrices (built once per ExpertCopies), or None when the native entry
    cannot read a pool (fp32 weights, another device)."""
    if copies not in _matrices:
        _matrices[copies] = CopyMatrices(copies) if _native_takes(copies) else None
    return _matrices[copies]


def one_call(x, copy_ids, weights, copies: ExpertCopies) -> torch.Tensor | None:
    """All tokens x [T, D] (bf16) through their copies in one native call; None when the library
    or the weights' format does not allow it."""
    lib = native()
    if lib is None or x.dtype != torch.bfloat16:
        return None
    matrices = copy_matrices(copies)
    if matrices is None:
        return None
    ids = copy_ids.to(torch.int64).contiguous()
    low, high = ids.aminmax()
    _out_of_range(int(low), int(high), copies)  # the native code indexes with them unchecked
    w = weights.to(torch.bfloat16).float().contiguous()
    x = x.contiguous()
    out = torch.empty_like(x)
    (T, D), k = x.shape, ids.shape[1]
    lib.moe_tokens(x.data_ptr(), T, D, copies.inter, k, ids.data_ptr(), w.data_ptr(), copies.num_copies,
                   matrices.w13, matrices.w2, out.data_ptr(), torch.get_num_threads())
    return out


def _copy_mlp(copies: ExpertCopies, copy: int, x: torch.Tensor) -> torch.Tensor:
    name, row = copies.where[copy]
    pool = copies.pools[name]
    w13, w2 = _row(pool.w13, row), _row(pool.w2, row)
    if name == "full":
        x = x.to(w13.dtype)
    return linear(swiglu(linear(x, w13), pool.inter), w2)


def per_copy(x, copy_ids, weights, copies: ExpertCopies) -> torch.Tensor:
    """Each active copy's rows through two `linear` calls; the sums in the native call's order."""
    T, k = copy_ids.shape
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
    w = weights.reshape(-1).index_select(0, order).to(x.dtype)[:, None]
    out, start = torch.zeros_like(x), 0
    # one index_add_ a copy, in copy order: each token's sum rounded after each copy's term, as
    # the native call rounds (one index_add_ of every row would sum a token's terms unrounded)
    for copy, n in enumerate(counts):
        if n:
            rows = token[start:start + n]
            out.index_add_(0, rows, _copy_mlp(copies, copy, x.index_select(0, rows)).to(x.dtype) * w[start:start + n])
            start += n
    return out


def moe_experts_native(x, copy_ids, weights, copies: ExpertCopies, observer=None):
    if observer is not None or x.device.type != "cpu":
        return NotImplemented
    _check(x, copy_ids, weights, copies)
    if copy_ids.numel() == 0:
        return torch.zeros_like(x)
    if cpu_linear.native_rows(x.shape[0]):
        out = one_call(x, copy_ids, weights, copies)
        if out is not None:
            return out
    return per_copy(x, copy_ids, weights, copies)
