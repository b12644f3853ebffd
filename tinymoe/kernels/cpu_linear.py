"""`linear(x, w, scale=None)`: x [..., K] times w [N, K] transposed (times scale [N] for int8 w).

On a CPU with bf16 or int8 weights it runs the small native kernel in `cpu_linear.cpp` (built
and loaded by `native.py`): without bf16 instructions torch's bf16 GEMV streams weights at about
half the memory bandwidth and its GEMM emulates bf16 at a quarter of what the kernel reaches
(bench/linear.py). With AMX or AVX512-BF16, torch's GEMM wins from a few dozen rows on and takes
them. Elsewhere (GPU, fp32 weights, no compiler) it is `F.linear`.
"""
import ctypes
import functools

import torch
import torch.nn.functional as F

from .native import cpu_flags, native


@functools.cache
def native_bf16() -> bool:
    """Does this CPU have bf16 matmul instructions (AVX512-BF16 or AMX)?"""
    flags = cpu_flags().split()
    return "amx_bf16" in flags or "avx512_bf16" in flags


NATIVE_MAX_ROWS_WITH_BF16 = 16  # with bf16 instructions, torch's GEMM beyond this many rows
ACTIVATIONS = (torch.float32, torch.bfloat16)


def supports(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> bool:
    """Can the native kernel take this matmul? CPU; bf16 weights, or int8 with bf16 scales;
    row-major weights."""
    kind_ok = w.dtype == torch.bfloat16 if scale is None else (w.dtype == torch.int8 and scale.dtype == torch.bfloat16)
    rows_ok = x.numel() <= NATIVE_MAX_ROWS_WITH_BF16 * x.shape[-1] or not native_bf16()
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


def moe_token(x: torch.Tensor, w13: list[torch.Tensor], w2: list[torch.Tensor], weights: list[float]):
    """One token x [1, D] (bf16) through SwiGLU experts (w13 [2I, D] gate then up rows, w2 [D, I],
    bf16) weighted by `weights` (values exact in bf16): sum_e weights[e] * w2_e(swiglu(w13_e x)),
    rounded as the per-expert torch path rounds, in one native call. None when the native
    library cannot take it (the caller then runs the experts one by one)."""
    D = x.shape[-1]
    tensors = (x, *w13, *w2)
    if (x.numel() != D or native() is None or any(t.dtype != torch.bfloat16 or t.device.type != "cpu" for t in tensors)
            or not all(t.is_contiguous() for t in tensors)):
        return None
    I = w2[0].shape[1]
    if any(w.shape != (2 * I, D) for w in w13) or any(w.shape != (D, I) for w in w2):
        raise ValueError(f"moe_token: expert shapes {[tuple(w.shape) for w in w13 + w2]} do not fit D={D}, I={I}")
    k = len(w13)
    out = torch.empty_like(x)
    pointers = ctypes.c_void_p * k
    native().moe_token_bf16(x.contiguous().data_ptr(), D, I, k, pointers(*[w.data_ptr() for w in w13]),
                            pointers(*[w.data_ptr() for w in w2]), (ctypes.c_float * k)(*weights), out.data_ptr(),
                            torch.get_num_threads())
    return out
