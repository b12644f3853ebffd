"""`linear(x, w)`: x [..., K] times w [N, K] transposed, w a bf16/fp32 Tensor or a 2-D
`kernels.quant.QWeight` (int8, int4).

On a CPU with bf16 weights or a QWeight it runs the native kernels (`cpu_linear.cpp`, and
`cpu_quant.cpp` for int8/int4, built and loaded by `native.py`): without bf16 instructions
torch's bf16 GEMV streams weights at about half the memory bandwidth and its GEMM emulates bf16
at a quarter of what the kernel reaches (bench/linear.py). The native kernels sum each row's dot
products in one order whatever the number of rows, so a row's result never depends on the rows
beside it; torch's GEMM does not promise that (its result for a row changes with M). So with
`Settings.batch_invariant` (the default) every row count stays native, and a request's numbers
are the same alone and in any batch; `native_rows` is that rule. Without it, with AMX or
AVX512-BF16, torch's GEMM wins from a few dozen rows on and takes them (a QWeight dequantised to
bf16 first). Elsewhere (GPU, fp32 weights, no compiler) it is `F.linear` (a QWeight dequantised
to x's dtype).

Whether the CPU counts as having bf16 instructions is decided in one place, `native_bf16()`:
`Settings.cpu_bf16` (`TINYMOE_CPU_BF16=0|1`; in tests `bf16_instructions(True | False | None)`,
also a context manager), None leaving it to the /proc/cpuinfo flags.

`matrix(w)` is the native `Matrix` (cpu_kernels.h) of a bf16 Tensor or QWeight, for every
Python caller of a native entry point that takes one.
"""
import ctypes
import functools

import torch
import torch.nn.functional as F

from .. import settings
# Matrix: cpu_kernels.h's struct, mirrored (and checked at load) in native.py
from .native import BF16, INT4, INT8, Matrix, cpu_flags, native
from .quant import INT4_GROUPS, QUANT_PRECISIONS, QWeight, dequantize, qweight_shapes


@functools.cache
def _detected_bf16() -> bool:
    flags = cpu_flags().split()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def native_bf16() -> bool:
    """Take the paths of a CPU with bf16 matmul instructions (AVX512-BF16 or AMX)? The installed
    `Settings.cpu_bf16`, or what the CPU reports when that is None."""
    forced = settings.current().cpu_bf16
    return _detected_bf16() if forced is None else forced


class bf16_instructions(settings.override):
    """Set `Settings.cpu_bf16` of the installed settings: True/False, or None (the CPU's flags);
    as a context manager, restore it on exit."""

    def __init__(self, value: bool | None):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"bf16_instructions takes True, False or None, not {value!r}")
        super().__init__(cpu_bf16=value)


NATIVE_MAX_ROWS_WITH_BF16 = 16  # with bf16 instructions and not batch-invariant, torch's GEMM beyond
ACTIVATIONS = (torch.float32, torch.bfloat16)


def matrix(w: torch.Tensor | QWeight) -> Matrix:
    """The native Matrix of a 2-D bf16 Tensor or QWeight [N, K] on the CPU (contiguous copies made
    if needed, held by the result: keep it alive while the native call runs). A QWeight whose
    tensors do not have its format's dtypes and shapes is a ValueError naming the difference."""
    if isinstance(w, torch.Tensor):
        if w.dtype != torch.bfloat16 or w.dim() != 2 or w.device.type != "cpu":
            raise ValueError(f"matrix: a weight Tensor must be 2-D bf16 on the CPU, not {w.dim()}-D {w.dtype} on "
                             f"{w.device.type}")
        w = w.contiguous()
        m = Matrix(BF16, w.data_ptr(), None, 0)
        m.tensors = (w,)
        return m
    _check_qweight(w)
    q, scales = w.q.contiguous(), w.scales.contiguous()
    m = Matrix(INT8 if w.precision == "int8" else INT4, q.data_ptr(), scales.data_ptr(), w.group)
    m.tensors = (q, scales)
    return m


def _check_qweight(w: QWeight) -> None:
    if w.q.dim() != 2:
        raise ValueError(f"a QWeight for linear must be one matrix, not a stack of shape {tuple(w.q.shape)} "
                         "(take w.row(i))")
    if w.q.device.type != "cpu" or w.scales.device.type != "cpu":
        raise ValueError(f"matrix: the QWeight is on {w.q.device.type}, not the CPU")
    if w.precision not in QUANT_PRECISIONS:
        raise ValueError(f"QWeight precision {w.precision!r} is not int8 or int4")
    if w.precision == "int4" and w.group not in INT4_GROUPS:
        raise ValueError(f"int4 QWeight: group {w.group} is not one of {', '.join(map(str, INT4_GROUPS))}")
    K = w.cols
    q_shape, s_shape, _ = qweight_shapes(w.rows, K, w.precision, w.group)
    dtype = torch.int8 if w.precision == "int8" else torch.uint8
    if w.q.dtype != dtype or tuple(w.q.shape) != q_shape:
        raise ValueError(f"{w.precision} QWeight of {K} inputs: codes are {w.q.dtype} {tuple(w.q.shape)}, "
                         f"expected {dtype} {q_shape}")
    if w.scales.dtype != torch.bfloat16 or tuple(w.scales.shape) != s_shape:
        raise ValueError(f"{w.precision} QWeight of {K} inputs: scales are {w.scales.dtype} "
                         f"{tuple(w.scales.shape)}, expected torch.bfloat16 {s_shape}")


def dequantize_bf16(w: QWeight) -> torch.Tensor:
    """dequantize(w, torch.bfloat16), bit for bit, in one native pass (the torch ops take several
    passes over fp32 copies, which cost more than the GEMM they feed)."""
    m = matrix(w)
    out = torch.empty(w.rows, w.cols, dtype=torch.bfloat16)
    native().dequantize_matrix(ctypes.byref(m), w.rows, w.cols, out.data_ptr(), torch.get_num_threads())
    return out


def isa() -> str | None:
    """Which integer dot products the loaded library's int8/int4 kernels use ("avx512-vnni",
    "avx-vnni" or "avx2"; see Settings.native_isa), or None without the library."""
    lib = native()
    return None if lib is None else ctypes.string_at(lib.quant_isa()).decode()


@functools.cache
def _detected_amx() -> bool:
    return "amx_bf16" in cpu_flags().split()


# With bf16 instructions, the most rows a QWeight matmul takes natively; beyond them it is
# dequantised to bf16 for torch's GEMM. AVX512-BF16: bench/linear.py --routes on mixtral-mini's
# shapes (AMD EPYC Zen 4, 2 threads): the native kernel 1.2-1.4x faster at 24 rows, the GEMM
# route from 40 (int4) or 48 (int8) rows on the large matrices (sooner on the small), 2x at 512.
# AMX: torch's GEMM is ~4x AVX512-BF16's there, so more than 16 rows keep the dequantising route:
# a guess, unmeasured (no AMX machine here).
QUANT_NATIVE_MAX_ROWS = {"avx512_bf16": {"int8": 40, "int4": 32}, "amx": {"int8": 16, "int4": 16}}


def quant_native(rows: int, precision: str) -> bool:
    """Does a QWeight matmul of `rows` activation rows run in the native kernel (else: the weight
    dequantised to bf16, torch's GEMM)? Native without bf16 instructions; with them, up to
    QUANT_NATIVE_MAX_ROWS of the CPU's kind and the precision. The one rule: tests and
    bench/linear.py --routes replace it to force either route."""
    if not native_bf16():
        return True
    return rows <= QUANT_NATIVE_MAX_ROWS["amx" if _detected_amx() else "avx512_bf16"][precision]


def native_rows(rows: int) -> bool:
    """Do bf16 matmuls of `rows` activation rows (a MoE layer's `rows` tokens, a decode step's
    `rows` sequences) run in the native kernels, else torch's GEMM? Always with
    `Settings.batch_invariant` or without bf16 instructions; else up to NATIVE_MAX_ROWS_WITH_BF16."""
    return settings.current().batch_invariant or not native_bf16() or rows <= NATIVE_MAX_ROWS_WITH_BF16


def _rows_ok(x: torch.Tensor, w: torch.Tensor | QWeight) -> bool:
    rows = x.numel() // max(x.shape[-1], 1)
    if isinstance(w, QWeight):
        return settings.current().batch_invariant or quant_native(rows, w.precision)
    return native_rows(rows)


def supports(x: torch.Tensor, w: torch.Tensor | QWeight) -> bool:
    """Does `linear` run this matmul in the native kernel? CPU; bf16 weights (row-major) or a
    2-D QWeight; and the rows: any number with `Settings.batch_invariant`, else bf16 weights as
    `native_rows` decides, a QWeight as `quant_native` does."""
    if isinstance(w, QWeight):
        kind_ok = w.q.dim() == 2 and w.q.device.type == "cpu"
    else:
        kind_ok = w.dtype == torch.bfloat16 and w.dim() == 2 and w.is_contiguous()
    return x.device.type == "cpu" and kind_ok and _rows_ok(x, w) and native() is not None


def linear(x: torch.Tensor, w: torch.Tensor | QWeight, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ w[N, K].T -> [..., N] in out_dtype (default x's dtype). Native kernels: fp32
    accumulation; a QWeight's activations quantised to int8 per block of 32 inputs (cpu_quant.cpp)."""
    out_dtype = out_dtype or x.dtype
    quantised = isinstance(w, QWeight)
    if quantised:
        if w.q.dim() != 2:
            _check_qweight(w)
        if x.shape[-1] != w.cols:
            raise ValueError(f"linear: x has {x.shape[-1]} features, weight {tuple(w.shape)}")
    if not supports(x, w):
        if quantised:
            if x.device.type == "cpu" and native() is not None and not _rows_ok(x, w):  # torch's bf16 GEMM
                return F.linear(x.to(torch.bfloat16), dequantize_bf16(w)).to(out_dtype)
            return F.linear(x, dequantize(w, x.dtype)).to(out_dtype)
        if x.device.type == "cpu" and x.numel() == x.shape[-1] and w.dtype == x.dtype:
            y = torch.mv(w, x.reshape(-1)).view(*x.shape[:-1], -1)  # torch's GEMV beats its GEMM
        else:
            y = F.linear(x, w.to(x.dtype))
        return y.to(out_dtype)
    lead, K = x.shape[:-1], x.shape[-1]
    N = w.shape[0]
    if K != w.shape[1]:
        raise ValueError(f"linear: x has {K} features, weight {tuple(w.shape)}")
    xc = x.reshape(-1, K)
    if xc.dtype not in ACTIVATIONS:
        xc = xc.float()
    xc = xc.contiguous()
    as_bf16 = out_dtype == torch.bfloat16
    y = torch.empty(xc.shape[0], N, dtype=torch.bfloat16 if as_bf16 else torch.float32)
    x_bf16, threads = int(xc.dtype == torch.bfloat16), torch.get_num_threads()
    if quantised:
        m = matrix(w)  # held until the call returns: its tensors are what the pointers point into
        native().linear_matrix(xc.data_ptr(), x_bf16, xc.shape[0], K, ctypes.byref(m), N, y.data_ptr(),
                               int(as_bf16), threads)
    else:
        native().linear_bf16(xc.data_ptr(), x_bf16, xc.shape[0], K, w.data_ptr(), N, y.data_ptr(), int(as_bf16),
                             threads)
    y = y.view(*lead, N)
    return y if y.dtype == out_dtype else y.to(out_dtype)
