"""The native CPU library: `cpu_linear.cpp` (matmul) and `cpu_ops.cpp` (the small per-layer ops),
with their shared helpers in `cpu_simd.h`, built into one shared object on first use and loaded
with ctypes.

It is compiled with the host's C++ compiler for this CPU (-march=native, ~10 s) and cached under
`$TINYMOE_CACHE` (default `~/.cache/tinymoe`), keyed by the sources, flags and CPU. Without a
compiler or AVX2 every op takes its torch path, after one warning; `TINYMOE_NATIVE=0` chooses
that path silently. The process has one OpenMP runtime (torch's libgomp.so.1), so the library's
threads are torch's.
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

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_linear.cpp", "cpu_ops.cpp", "cpu_decode.cpp")]
HEADERS = [Path(__file__).with_name(name) for name in ("cpu_simd.h", "cpu_kernels.h")]
# no FMA contraction of plain C arithmetic: a*b - c*d rounds as torch computes it (the kernels
# that want FMAs call them explicitly)
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]

_i64, _ptr, _i32, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "linear_bf16": [_ptr, _i32, _i64, _i64, _ptr, _i64, _ptr, _i32, _i32],
    "linear_int8": [_ptr, _i32, _i64, _i64, _ptr, _ptr, _i64, _ptr, _i32, _i32],
    "moe_tokens_bf16": [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i32],
    "rms_norm_bf16": [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32],
    "rotary_bf16": [_ptr, _i64, _ptr, _i64, _i64, _i64, _ptr, _ptr, _i64],
    "swiglu_bf16": [_ptr, _ptr, _i64, _i64],
    "store_kv_bf16": [_ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64],
    "paged_decode_bf16": [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _f32, _ptr, _i32],
    "decode_step_bf16": [_ptr, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i32],
}


def _cache_dir() -> Path:
    return Path(os.environ.get("TINYMOE_CACHE", Path.home() / ".cache" / "tinymoe"))


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build() -> Path:
    source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + cpu_flags().encode()).hexdigest()[:16]
    lib = _cache_dir() / f"tinymoe_cpu-{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        # build beside the target and rename: a concurrent process never loads half a file
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            cxx = os.environ.get("CXX", "g++")
            subprocess.run([cxx, *FLAGS, *map(str, SOURCES), "-o", str(out)], check=True, capture_output=True,
                           text=True)
            os.replace(out, lib)
    return lib


@functools.cache
def native():
    """The loaded library, or None (torch paths) with one warning saying why."""
    if os.environ.get("TINYMOE_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"tinymoe: native CPU kernels unavailable, using torch ops ({detail.strip()[:200]})")
        return None
    for name, args in SIGNATURES.items():
        getattr(lib, name).argtypes = args
    return lib


def takes(*tensors: torch.Tensor) -> bool:
    """Can the native bf16 ops take these tensors: all bf16 on the CPU, library loaded?"""
    for t in tensors:
        if t.dtype != torch.bfloat16 or t.device.type != "cpu":
            return False
    return native() is not None
