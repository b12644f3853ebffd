"""`linear(x, w, scale=None)`: x [..., K] times w [N, K] transposed (times scale [N] for int8 w).

On a CPU with bf16 or int8 weights it runs the small native kernel in `cpu_linear.cpp`: without
bf16 instructions torch's bf16 GEMV streams weights at about half the memory bandwidth and its
GEMM emulates bf16 at a quarter of what the kernel reaches (bench/linear.py). With AMX or
AVX512-BF16, torch's GEMM wins from a few dozen rows on and takes them. Elsewhere (GPU, fp32
weights) it is `F.linear`.

The kernel is compiled on first use with the host's C++ compiler for this CPU (-march=native)
and cached under `$TINYMOE_CACHE` (default `~/.cache/tinymoe`). Without a compiler or AVX2 every
call takes the torch path, after one warning; `TINYMOE_NATIVE=0` chooses that path silently.
The process has one OpenMP runtime (torch's libgomp.so.1), so the kernel's threads are torch's.
"""
import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("cpu_linear.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def _cache_dir() -> Path:
    return Path(os.environ.get("TINYMOE_CACHE", Path.home() / ".cache" / "tinymoe"))


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build() -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_id().encode()).hexdigest()[:16]
    lib = _cache_dir() / f"cpu_linear-{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        # build beside the target and rename: a concurrent process never loads half a file
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            cxx = os.environ.get("CXX", "g++")
            subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(out)], check=True, capture_output=True, text=True)
            os.replace(out, lib)
    return lib


@functools.cache
def native():
    """The loaded kernel library, or None (torch fallback) with one warning saying why."""
    if os.environ.get("TINYMOE_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"tinymoe: native CPU kernel unavailable, using torch matmuls ({detail.strip()[:200]})")
        return None
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.linear_bf16.argtypes = [ptr, i64, i64, ptr, i64, ptr, i32, i32]
    lib.linear_int8.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, i32, i32]
    return lib


@functools.cache
def native_bf16() -> bool:
    """Does this CPU have bf16 matmul instructions (AVX512-BF16 or AMX)?"""
    flags = _cpu_id().split()
    return "amx_bf16" in flags or "avx512_bf16" in flags


NATIVE_MAX_ROWS_WITH_BF16 = 16  # with bf16 instructions, torch's GEMM beyond this many rows


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
    xf = x.reshape(-1, K).to(torch.float32).contiguous()
    as_bf16 = out_dtype == torch.bfloat16
    y = torch.empty(xf.shape[0], N, dtype=torch.bfloat16 if as_bf16 else torch.float32)
    threads = torch.get_num_threads()
    if w.dtype == torch.int8:
        native().linear_int8(xf.data_ptr(), xf.shape[0], K, w.data_ptr(), scale.contiguous().data_ptr(), N,
                             y.data_ptr(), int(as_bf16), threads)
    else:
        native().linear_bf16(xf.data_ptr(), xf.shape[0], K, w.data_ptr(), N, y.data_ptr(), int(as_bf16), threads)
    return y.view(*lead, N).to(out_dtype)
