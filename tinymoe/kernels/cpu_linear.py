"""`linear(x, w, scale=None)`: x [..., K] times w [N, K] transposed (times scale [N] for int8 w).

On a CPU with bf16 or int8 weights it runs the small native kernel in `cpu_linear.cpp` (built
and loaded by `native.py`): without bf16 instructions torch's bf16 GEMV streams weights at about
half the memory bandwidth and its GEMM emulates bf16 at a quarter of what the kernel reaches
(bench/linear.py). With AMX or AVX512-BF16, torch's GEMM wins from a few dozen rows on and takes
them. Elsewhere (GPU, fp32 weights, no compiler) it is `F.linear`.

Whether the CPU counts as having bf16 instructions is decided in one place, `native_bf16()`:
`Settings.cpu_bf16` (`TINYMOE_CPU_BF16=0|1`; in tests `bf16_instructions(True | False | None)`,
also a context manager), None leaving it to the /proc/cpuinfo flags.
"""
import ctypes
import functools

import torch
import torch.nn.functional as F

from .. import settings
from .native import cpu_flags, native


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


NATIVE_MAX_ROWS_WITH_BF16 = 16  # with bf16 instructions, torch's GEMM beyond this many rows
ACTIVATIONS = (torch.float32, torch.bfloat16)


def supports(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> bool:
    """Can the native kernel take this matmul? CPU; bf16 weights, or int8 with bf16 scales;
    row-major weights."""
    kind_ok = w.dtype == torch.bfloat16 if scale is None else (w.dtype == torch.int8 and scale.dtype == torch.bfloat16)
    rows_ok = not native_bf16() or x.numel() <= NATIVE_MAX_ROWS_WITH_BF16 * x.shape[-1]
    return (x.device.type == "cpu" and kind_ok and rows_ok and w.dim() == 2 and w.is_contiguous()
            and native() is not None)


def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ w[N, K].T (times scale [N] for int8 w) -> [..., N] in out_dtype (default
    x's dtype), accumulated in fp32."""
    out_dtype = out_dtype or x.dtype
    if not supports(x, w, scale):
        if x.device.type == "cpu" and x.numel() == x.shape[-1] and w.dtype == x.dtype:
            y = torch.mv(w, x.reshape(-1)).view(*x.shape[:-1], -1)  # torch's GEMV beats its GEMM
        else:
            y = F.linear(x, w.to(x.dtype))  # int8 codes are exact in any float dtype
        return (y if scale is None else y * scale).to(out_dtype)
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
    if scale is None:
        native().linear_bf16(xc.data_ptr(), x_bf16, xc.shape[0], K, w.data_ptr(), N, y.data_ptr(), int(as_bf16),
                             threads)
    else:
        scale = scale.contiguous()  # held: a temporary's pointer would dangle
        native().linear_int8(xc.data_ptr(), x_bf16, xc.shape[0], K, w.data_ptr(), scale.data_ptr(), N,
                             y.data_ptr(), int(as_bf16), threads)
    y = y.view(*lead, N)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
        rows: list[int] | None = None) -> torch.Tensor | None:
    """SwiGLU experts for tokens x [T, D] (bf16): token t gets the sum over its slots s of
    weights[t, s] * w2[c] . swiglu(w13[c] . x_t), c = rows[ids[t, s]] (identity without `rows`),
    rounded exactly where the per-copy torch path rounds (bit-identical to it while its matmuls
    run natively: with bf16 instructions, a copy's matmuls over 16 rows run torch's GEMM, which
    sums in its own order; this call stays native at any size). w13 [C, 2I, D] (gate rows, then up
    rows) and w2 [C, D, I] bf16; ids int64 [T, k]; weights [T, k], rounded to bf16 here. One
    native call (one parallel region up to 64 tokens); None when the library cannot take it
    (the caller then runs its torch path)."""
    T, D = x.shape
    if (native() is None or x.device.type != "cpu" or
            any(t.dtype != torch.bfloat16 or not t.is_contiguous() for t in (x, w13, w2))):
        return None
    I = w2.shape[2]
    if w13.shape[1:] != (2 * I, D) or w2.shape[1] != D:
        raise ValueError(f"moe: experts {tuple(w13.shape)} / {tuple(w2.shape)} do not fit D={D}")
    base13, base2 = w13.data_ptr(), w2.data_ptr()
    step13, step2 = w13[0].numel() * 2, w2[0].numel() * 2
    rows = rows if rows is not None else range(w13.shape[0])
    p13 = [base13 + r * step13 for r in rows]
    p2 = [base2 + r * step2 for r in rows]
    ids, w = ids.to(torch.int64).contiguous(), weights.to(torch.bfloat16).float().contiguous()
    low, high = ids.aminmax()
    if low < 0 or high >= len(p13):  # the native code indexes with them unchecked
        raise ValueError(f"moe: expert ids in {int(low)}..{int(high)}, outside 0..{len(p13) - 1}")
    out = torch.empty_like(x)
    ptrs = ctypes.c_void_p * len(p13)
    native().moe_tokens_bf16(x.data_ptr(), T, D, I, ids.shape[1], ids.data_ptr(), w.data_ptr(), len(p13), ptrs(*p13),
                             ptrs(*p2), out.data_ptr(), torch.get_num_threads())
    return out
