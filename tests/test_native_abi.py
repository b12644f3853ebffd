"""The native library's ABI has one source, cpu_kernels.h: the ctypes bindings are generated from
its prototypes, the compiler holds the definitions to them, and the decode step's ctypes mirror
is checked against the layout the compiler exports."""
import ctypes
import os
import shutil
import subprocess

import pytest

from tinymoe.kernels import native

needs_native = pytest.mark.skipif(native.native() is None, reason="no C++ compiler or no AVX2 here")
CXX = os.environ.get("CXX", "g++")
needs_compiler = pytest.mark.skipif(shutil.which(CXX) is None, reason="no C++ compiler here")
_p, _i32, _i64, _f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float


def test_prototypes_map_each_c_type():
    header = """#pragma once
    struct S { int64_t a; };  // outside extern "C": not an entry point
    extern "C" {
    // a comment; with a ; in it
    void f(const uint16_t* const* w, int64_t n,
           float eps, int threads, const S* s);  /* spans lines */
    int64_t g(void);
    int h(void* out);
    }"""
    assert native.prototypes(header) == {"f": (None, [_p, _i64, _f32, _i32, _p]), "g": (_i64, []),
                                         "h": (_i32, [_p])}


@pytest.mark.parametrize("header, message", [
    ('extern "C" { void f(size_t n); }',
     "cpu_kernels.h: parameter 'n' of f has type 'size_t', which native.py cannot bind (int, int64_t, float or a "
     "pointer)"),
    ('extern "C" { double g(int x); }',
     "cpu_kernels.h: the result of g has type 'double', which native.py cannot bind (int, int64_t, float, void or "
     "a pointer)"),
    ('extern "C" { void h(RouteFn route); }',
     "cpu_kernels.h: parameter 'route' of h has type 'RouteFn', which native.py cannot bind (int, int64_t, float or "
     "a pointer)"),
    ('extern "C" { void k(int (*cb)(int64_t)); }',
     "cpu_kernels.h: cannot read 'void k(int (*cb)(int64_t))' as a prototype `type name(type name, ...)`"),
    ('extern "C" { void m(int64_t); }', "cpu_kernels.h: parameter 1 of m, 'int64_t', is not `type name`"),
    ('extern "C" { void n(int x); void n(int y); }', "cpu_kernels.h: n is declared twice"),
    ('extern "C" void p(int x);',
     'cpu_kernels.h: the entry points must be prototypes inside extern "C" { ... } blocks'),
])
def test_a_prototype_it_cannot_bind_is_refused(header, message):
    with pytest.raises(ValueError) as e:
        native.prototypes(header)
    assert str(e.value) == message


@needs_native
def test_every_declared_entry_point_is_bound_from_the_header():
    lib, declared = native.native(), native.prototypes(native.HEADER.read_text())
    assert {"linear_bf16", "linear_matrix", "quant_isa", "moe_tokens", "decode_step_bf16",
            "decode_step_abi"} <= set(declared)
    for name, (restype, argtypes) in declared.items():
        assert getattr(lib, name).argtypes == argtypes, name
        assert getattr(lib, name).restype == restype, name
    assert declared["rms_norm_bf16"] == (None, [_p, _p, _p, _p, _p, _i64, _i64, _f32])  # spelled out once
    assert not hasattr(native, "SIGNATURES")  # no hand-kept table beside the header


@needs_native
@pytest.mark.skipif(shutil.which("nm") is None, reason="no nm here")
def test_the_library_exports_exactly_the_declared_entry_points():
    listing = subprocess.run(["nm", "-D", "--defined-only", native.native()._name], capture_output=True, text=True,
                             check=True).stdout
    symbols = [line.split() for line in listing.splitlines()]
    # extern "C" functions are the unmangled text symbols (C++ ones start with _Z)
    exported = {s[2] for s in symbols if len(s) == 3 and s[1] == "T" and not s[2].startswith("_Z")}
    assert exported - {"_init", "_fini"} == set(native.prototypes(native.HEADER.read_text()))


@needs_compiler
@pytest.mark.parametrize("source, error", [
    ('extern "C" void undeclared_entry(int64_t n) {}', "no previous declaration for 'void undeclared_entry(int64_t)'"),
    ('extern "C" void swiglu_bf16(const uint16_t* h, uint16_t* out, int64_t rows, int I) {}',
     "conflicting declaration of C function"),
])
def test_the_compiler_holds_the_sources_to_the_header(tmp_path, source, error):
    (tmp_path / "entry.cpp").write_text(f'#include "cpu_kernels.h"\n{source}\n')
    flags = [f for f in native.FLAGS if f != "-shared"]
    done = subprocess.run([CXX, *flags, "-fsyntax-only", f"-I{native.HEADER.parent}", str(tmp_path / "entry.cpp")],
                          capture_output=True, text=True)
    assert done.returncode != 0 and error in done.stderr.replace("‘", "'").replace("’", "'")


@pytest.mark.skipif(shutil.which(CXX) is None or "avx2" not in native.cpu_flags().split()
                    or os.environ.get("TINYMOE_NATIVE", "1") == "0", reason="no compiler or no AVX2 here")
def test_the_library_loads_where_it_can():
    assert native.native() is not None  # a build failure here would otherwise only skip the native tests


@needs_native
def test_the_mirror_matches_the_library():
    table = native.abi_table(native.native())
    assert table["DecodeLayer"] == (0, ctypes.sizeof(native.DecodeLayer))
    assert table["DecodeModel.eps"] == (native.DecodeModel.eps.offset, 4)
    assert table["Status.COPY_OUT_OF_RANGE"] == (native.COPY_OUT_OF_RANGE, 0)
    native.check_abi(table, native.STRUCTS, native.ENUMS)  # raises on any difference


def _layer(change):
    fields = [(name, kind) for name, kind in native.DecodeLayer._fields_]
    return type("DecodeLayer", (ctypes.Structure,), {"_fields_": change(fields)})


@needs_native
@pytest.mark.parametrize("change, message", [
    (lambda f: [(n, _i32 if n == "routing" else k) for n, k in f],
     "native ABI: DecodeLayer.routing is at offset 112 (8 bytes) in cpu_kernels.h but at offset 112 (4 bytes) in "
     "ctypes"),
    (lambda f: [x for x in f if x[0] != "q_norm"],
     "native ABI: DecodeLayer.q_norm is in cpu_kernels.h but not in native.py's ctypes mirror"),
    (lambda f: f[:3] + [("extra", _p)] + f[3:],
     "native ABI: DecodeLayer.extra is in native.py's ctypes mirror but not in cpu_kernels.h"),
    (lambda f: [f[1], f[0]] + f[2:],
     "native ABI: DecodeLayer.attn_norm is at offset 0 (8 bytes) in cpu_kernels.h but at offset 32 (8 bytes) in "
     "ctypes"),
])
def test_the_struct_check_names_the_mismatched_field(change, message):
    wrong = (native.Matrix, _layer(change), native.DecodeModel, native.RouteBuffers)
    with pytest.raises(ValueError) as e:
        native.check_abi(native.abi_table(native.native()), wrong, native.ENUMS)
    assert str(e.value) == message


@needs_native
def test_the_check_catches_a_struct_size_and_an_enum_value():
    table = native.abi_table(native.native())
    with pytest.raises(ValueError) as e:
        native.check_abi({**table, "RouteBuffers": (0, 32)}, native.STRUCTS, native.ENUMS)
    assert str(e.value) == "native ABI: RouteBuffers is 32 bytes in cpu_kernels.h but 24 in ctypes"
    with pytest.raises(ValueError) as e:
        native.check_abi(table, native.STRUCTS, {**native.ENUMS, "Routing.ROUTE_TOPK": 3})
    assert str(e.value) == "native ABI: Routing.ROUTE_TOPK is 1 in cpu_kernels.h but 3 in native.py"


@needs_native
def test_loading_checks_the_mirror(monkeypatch):
    monkeypatch.setattr(native, "ENUMS", {**native.ENUMS, "Status.ROUTE_FAILED": 5})
    native.native.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"^native ABI: Status.ROUTE_FAILED is 1 in cpu_kernels.h but 5 in "):
            native.native()
    finally:
        monkeypatch.undo()
        native.native.cache_clear()
    assert native.native() is not None
