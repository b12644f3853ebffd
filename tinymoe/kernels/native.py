"""The native CPU library: `cpu_linear.cpp` (bf16 matmul and the matmul interface),
`cpu_quant.cpp` (int8 / int4 matmul), `cpu_moe.cpp` (the experts of a MoE layer), `cpu_ops.cpp`
(the small per-layer ops), `cpu_decode.cpp` (the one-call decode step) and `cpu_shm.cpp` (the
ordering steps of expert parallelism's shared-memory all-gather), with their shared
helpers in `cpu_simd.h`, built into one shared object on first use and loaded with ctypes.

Its ABI has one source, `cpu_kernels.h`: the ctypes bindings of every entry point are generated
from the header's prototypes at load (`prototypes`), and the decode step's structs and enums,
mirrored below for ctypes, are checked at load against the layout the compiler exports
(`decode_step_abi`, `check_abi`); a difference is one error naming the field.

It is compiled with the host's C++ compiler for this CPU (-march=native, ~10 s) on first use
and cached under `Settings.cache_dir` (`$TINYMOE_CACHE`, default `~/.cache/tinymoe`), keyed by
the sources, flags and CPU. `Settings.native_isa` "avx512" (`TINYMOE_NATIVE_ISA=avx512`) builds
without AVX512-BF16, so bf16 matmuls take the FMA kernels (`bf16_dot_isa()` names which), and
"avx2" (`TINYMOE_NATIVE_ISA=avx2`) adds `ISA_FLAGS["avx2"]` (no AVX-512, no AVX-VNNI), a build of its own whose int8/int4 kernels take
their AVX2 path (`maddubs`) on any CPU; the library's `quant_isa()` names the path it was built
with. Without a compiler or AVX2 every op takes its torch path, after one
warning; `Settings.native` False (`TINYMOE_NATIVE=0`) chooses that path silently. The process
has one OpenMP runtime (torch's libgomp.so.1), so the library's threads are torch's.
"""
import ctypes
import functools
import hashlib
import os
import platform
import re
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from .. import settings

SOURCES = [Path(__file__).with_name(name)
           for name in ("cpu_linear.cpp", "cpu_quant.cpp", "cpu_moe.cpp", "cpu_ops.cpp", "cpu_decode.cpp",
                        "cpu_shm.cpp")]
HEADER = Path(__file__).with_name("cpu_kernels.h")
HEADERS = [Path(__file__).with_name("cpu_simd.h"), HEADER]
# no FMA contraction of plain C arithmetic: a*b - c*d rounds as torch computes it (the kernels
# that want FMAs call them explicitly); an entry point not declared in cpu_kernels.h would get
# no bindings, so a non-static function without a declaration is an error
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
         "-Werror=missing-declarations"]
ISA_FLAGS = {"native": [], "avx512": ["-mno-avx512bf16"], "avx2": ["-mno-avx512f", "-mno-avxvnni"]}  # Settings.native_isa

_SCALARS = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float}
_PROTOTYPE = re.compile(r"(?P<result>[\w\s*]+?)\s*\b(?P<name>\w+)\s*\((?P<params>[^()]*)\)")
_PARAMETER = re.compile(r"(?P<type>[\w\s*]*?[\s*])(?P<name>\w+)")


def _ctype(c_type: str, what: str, result: bool = False):
    tokens = c_type.replace("*", " * ").split()
    if "*" in tokens:
        return ctypes.c_void_p
    base = " ".join(t for t in tokens if t != "const")
    if base in _SCALARS:
        return _SCALARS[base]
    if result and base == "void":
        return None
    known = "int, int64_t, float, void or a pointer" if result else "int, int64_t, float or a pointer"
    raise ValueError(f"{HEADER.name}: {what} has type {' '.join(tokens)!r}, which native.py cannot bind ({known})")


def prototypes(header: str) -> dict[str, tuple]:
    """The entry points that the extern "C" block of `header` (cpu_kernels.h's text) declares:
    name -> (restype, argtypes) for ctypes."""
    text = re.sub(r"//[^\n]*|/\*.*?\*/", " ", header, flags=re.S)
    blocks = re.findall(r'extern\s+"C"\s*\{([^{}]*)\}', text)
    if not blocks or len(blocks) != len(re.findall(r'extern\s+"C"', text)):
        raise ValueError(f'{HEADER.name}: the entry points must be prototypes inside extern "C" {{ ... }} blocks')
    found = {}
    for declaration in ";".join(blocks).split(";"):
        declaration = " ".join(declaration.split())
        if not declaration:
            continue
        m = _PROTOTYPE.fullmatch(declaration)
        if m is None:
            raise ValueError(f"{HEADER.name}: cannot read {declaration!r} as a prototype `type name(type name, ...)`")
        name, params = m["name"], [p.strip() for p in m["params"].split(",")]
        if name in found:
            raise ValueError(f"{HEADER.name}: {name} is declared twice")
        argtypes = []
        for i, param in enumerate([] if params in ([""], ["void"]) else params, 1):
            p = _PARAMETER.fullmatch(param)
            if p is None:
                raise ValueError(f"{HEADER.name}: parameter {i} of {name}, {param!r}, is not `type name`")
            argtypes.append(_ctype(p["type"], f"parameter {p['name']!r} of {name}"))
        found[name] = (_ctype(m["result"], f"the result of {name}", result=True), argtypes)
    return found


# The decode step's structs and enums (cpu_kernels.h), for ctypes; check_abi holds them to it.
BF16, INT8, INT4 = 0, 1, 2  # Precision
DENSE, ROUTE_TOPK, ROUTE_CALLBACK = 0, 1, 2  # Routing
ROUTE_FAILED, COPY_OUT_OF_RANGE, TOKEN_OUT_OF_RANGE = 1, 2, 3  # Status (OK is 0)
ROUTE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64)
_ptr, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class Matrix(ctypes.Structure):
    """One weight matrix as the native kernels read it (`cpu_linear.matrix` builds one)."""
    _fields_ = [("precision", _i64), ("data", _ptr), ("scales", _ptr), ("group", _i64)]


class DecodeLayer(ctypes.Structure):
    _fields_ = [("attn_norm", _ptr), ("qkv", Matrix), ("q_norm", _ptr), ("k_norm", _ptr), ("o", Matrix),
                ("mlp_norm", _ptr), ("k_cache", _ptr), ("v_cache", _ptr), ("routing", _i64), ("gate", _ptr),
                ("w13", _ptr), ("w2", _ptr), ("copies", _i64), ("mlp_gate", Matrix), ("mlp_up", Matrix),
                ("mlp_down", Matrix), ("mlp_I", _i64)]


class DecodeModel(ctypes.Structure):
    _fields_ = [("num_layers", _i64), ("D", _i64), ("H", _i64), ("KV", _i64), ("hd", _i64), ("E", _i64),
                ("top_k", _i64), ("I", _i64), ("renormalize", _i64), ("block_size", _i64), ("eps", _f32),
                ("scale", _f32), ("layers", ctypes.POINTER(DecodeLayer)), ("embed", _ptr), ("final_norm", _ptr),
                ("route", ROUTE_FN), ("head", Matrix), ("V", _i64)]


class RouteBuffers(ctypes.Structure):
    _fields_ = [("hidden", _ptr), ("ids", _ptr), ("weights", _ptr)]


STRUCTS = (Matrix, DecodeLayer, DecodeModel, RouteBuffers)
ENUMS = {"Precision.BF16": BF16, "Precision.INT8": INT8, "Precision.INT4": INT4,
         "Routing.DENSE": DENSE, "Routing.ROUTE_TOPK": ROUTE_TOPK, "Routing.ROUTE_CALLBACK": ROUTE_CALLBACK,
         "Status.OK": 0, "Status.ROUTE_FAILED": ROUTE_FAILED, "Status.COPY_OUT_OF_RANGE": COPY_OUT_OF_RANGE,
         "Status.TOKEN_OUT_OF_RANGE": TOKEN_OUT_OF_RANGE}


def abi_table(lib) -> dict[str, tuple[int, int]]:
    """The library's decode_step_abi: "Struct" -> (0, size), "Struct.field" -> (offset, size),
    "Enum.VALUE" -> (value, 0)."""
    n = lib.decode_step_abi(None, None, 0)
    names, values = (ctypes.c_char_p * n)(), (ctypes.c_int64 * (2 * n))()
    lib.decode_step_abi(names, values, n)
    return {names[i].decode(): (values[2 * i], values[2 * i + 1]) for i in range(n)}


def check_abi(table: dict[str, tuple[int, int]], structs, enums: dict[str, int]) -> None:
    """Raise a ValueError naming the first field, struct or enum value where the ctypes mirror
    (`structs`, `enums`: STRUCTS, ENUMS) differs from the library's `table` (abi_table)."""
    mirror = {}
    for struct in structs:
        mirror[struct.__name__] = (0, ctypes.sizeof(struct))
        for field, *_ in struct._fields_:
            mirror[f"{struct.__name__}.{field}"] = (getattr(struct, field).offset, getattr(struct, field).size)
    mirror.update({name: (value, 0) for name, value in enums.items()})
    for key in table:
        if key not in mirror:
            raise ValueError(f"native ABI: {key} is in {HEADER.name} but not in native.py's ctypes mirror")
    for key in mirror:
        if key not in table:
            raise ValueError(f"native ABI: {key} is in native.py's ctypes mirror but not in {HEADER.name}")
    for key in sorted(table, key=lambda k: "." not in k):  # fields before whole structs: name the field
        (a, b), (mine_a, mine_b) = table[key], mirror[key]
        if (a, b) == (mine_a, mine_b):
            continue
        if key in enums:
            raise ValueError(f"native ABI: {key} is {a} in {HEADER.name} but {mine_a} in native.py")
        if "." in key:
            raise ValueError(f"native ABI: {key} is at offset {a} ({b} bytes) in {HEADER.name} but at offset "
                             f"{mine_a} ({mine_b} bytes) in ctypes")
        raise ValueError(f"native ABI: {key} is {b} bytes in {HEADER.name} but {mine_b} in ctypes")


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(cache_dir: Path, isa: str = "native") -> Path:
    flags = FLAGS + ISA_FLAGS[isa]
    source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(source + " ".join(flags).encode() + cpu_flags().encode()).hexdigest()[:16]
    lib = cache_dir / f"tinymoe_cpu-{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        # build beside the target and rename: a concurrent process never loads half a file
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            cxx = os.environ.get("CXX", "g++")
            subprocess.run([cxx, *flags, *map(str, SOURCES), "-o", str(out)], check=True, capture_output=True,
                           text=True)
            os.replace(out, lib)
    return lib


def native():
    """The loaded library, or None (torch paths): the installed settings turn it off, or it
    cannot be built (one warning saying why)."""
    config = settings.current()
    return _load(config.cache_dir, config.native_isa) if config.native else None


@functools.cache
def _load(cache_dir: Path, isa: str = "native"):
    bindings = prototypes(HEADER.read_text())  # before the build: a header it cannot bind is a bug
    try:
        lib = ctypes.CDLL(str(_build(cache_dir, isa)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"tinymoe: native CPU kernels unavailable, using torch ops ({detail.strip()[:200]})")
        return None
    for name, (restype, argtypes) in bindings.items():
        if not hasattr(lib, name):
            raise ValueError(f"{HEADER.name} declares {name}, which the native library does not define")
        getattr(lib, name).restype, getattr(lib, name).argtypes = restype, argtypes
    check_abi(abi_table(lib), STRUCTS, ENUMS)
    return lib


native.cache_info, native.cache_clear = _load.cache_info, _load.cache_clear  # the loads so far


def takes(*tensors: torch.Tensor) -> bool:
    """Can the native bf16 ops take these tensors: all bf16 on the CPU, library loaded?"""
    for t in tensors:
        if t.dtype != torch.bfloat16 or t.device.type != "cpu":
            return False
    return native() is not None
