"""The native int8 / int4 matmul (tinymoe/kernels/cpu_quant.cpp, through cpu_linear.linear with a
QWeight) against float64: a reference that quantises the activations as the kernel does (int8 per
block of 32 inputs, `block_order`, d = max|x| / 127 in fp32, round to nearest even), held to a bound from fp32
summation, and plain dequantize(), held to the bound the activation rounding allows. Also the
Python routes (the native kernel, or dequantised to bf16 and torch's GEMM: each forced, and the
rule `cpu_linear.quant_native` that picks one), bad inputs, and the same file again in a
subprocess on the AVX2 build (TINYMOE_NATIVE_ISA=avx2)."""
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinymoe import settings
from tinymoe.kernels import cpu_linear, native
from tinymoe.kernels.cpu_linear import linear, matrix
from tinymoe.kernels.quant import QWeight, dequantize, quantize, unpack_int4

needs_native = pytest.mark.skipif(cpu_linear.native() is None, reason="no C++ compiler or no AVX2 here")
ROOT = Path(__file__).resolve().parents[1]
EPS = 2.0 ** -24

# (M, N, K): 1-3 rows (one weight row at a time), 4-20 (tiles of 4 rows, ragged), 64+ (more than
# one pass of 64 rows); N not a multiple of the 2-3 weight rows of a unit; K 32, 96, 100 (int4
# pads it to the group), 256, 384, 1000 (int8: a tail shorter than one vector) and 4500 (int4 with
# one row: more than one batch of block products, cpu_quant.cpp's SEG)
SHAPES = [(1, 7, 32), (1, 300, 100), (1, 9, 4500), (2, 64, 96), (3, 5, 256), (4, 11, 384), (5, 37, 100), (8, 130, 64),
          (13, 11, 1000), (16, 9, 96), (17, 20, 256), (20, 33, 384), (70, 13, 100)]
FORMATS = [("int8", 64), ("int4", 32), ("int4", 64), ("int4", 128)]


def block_order(qw: QWeight) -> np.ndarray:
    """The inputs of each activation block the kernel quantises, [blocks, 32] indices into the
    zero-padded row: int4 32 consecutive inputs; int8 the 4 inputs each lane of a vector covers in
    each of 8 consecutive weight vectors (64 bytes with AVX-512, 32 on the AVX2 / AVX-VNNI paths)."""
    if qw.precision == "int4":
        return np.arange(-(-qw.padded_cols // 32) * 32).reshape(-1, 32)
    vector = 64 if cpu_linear.isa() == "avx512-vnni" else 32
    groups = -(-qw.cols // (8 * vector))
    return np.arange(groups * 8 * vector).reshape(groups, 8, vector // 4, 4).transpose(0, 2, 1, 3).reshape(-1, 32)


def activations(x: torch.Tensor, qw: QWeight) -> tuple[np.ndarray, np.ndarray]:
    """x [M, K] as the kernel quantises it: (x_q float64 [M, K], d per input float64 [M, K])."""
    xf = x.float().numpy()
    M, K = xf.shape
    order = block_order(qw)
    padded = np.zeros((M, order.size), np.float32)
    padded[:, :K] = xf
    blocks = padded[:, order]  # [M, blocks, 32]
    d = np.abs(blocks).max(-1) / np.float32(127)  # fp32 division, as the kernel
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d[..., None] > 0, np.rint(blocks / d[..., None]), 0)  # rint: to nearest even
    assert np.abs(q).max() <= 127
    xq, dq = np.empty((M, order.size)), np.empty((M, order.size))
    xq[:, order] = q * d[..., None].astype(np.float64)
    dq[:, order] = np.broadcast_to(d[..., None], blocks.shape)
    return xq[:, :K], dq[:, :K]


def references(x: torch.Tensor, qw: QWeight):
    """(y of x_q . w, the sum of |terms| that y's fp32 rounding errors scale with, and x . w)."""
    K = qw.cols
    xq, _ = activations(x, qw)
    w = dequantize(qw, torch.float64).numpy()
    if qw.precision == "int4":  # the kernel sums (q scale) and (zero - 8 scale) terms apart
        codes = unpack_int4(qw.q).double().numpy()[:, :K]
        s = qw.scales.double().numpy()
        group = np.arange(K) // qw.group
        terms = np.abs(codes * s[:, group, 0]) + np.abs(s[:, group, 1] - 8 * s[:, group, 0])
    else:
        terms = np.abs(w)
    return xq @ w.T, np.abs(xq) @ terms.T, x.double().numpy() @ w.T


def activation_bound(x: torch.Tensor, qw: QWeight) -> np.ndarray:
    """|x . w - x_q . w| <= sum_i |x_i - x_q,i| |w_i|, |x_i - x_q,i| <= d / 2 (plus the fp32 x / d)."""
    _, d = activations(x, qw)
    return (d * (0.5 + 1e-5)) @ np.abs(dequantize(qw, torch.float64).numpy()).T


def inputs(M, N, K, seed):
    torch.manual_seed(seed)
    x = torch.randn(M, K) * torch.logspace(-2, 1, M)[:, None]  # rows of different sizes
    if M > 2:
        x[1] = 0  # a zero row: d = 0
        x[2, : K // 2] = 0  # zero blocks beside full ones
    return x, torch.randn(N, K) / 8


@pytest.fixture(params=[True, False], ids=["native", "dequantise-gemm"])
def native_route(request, monkeypatch):
    """Each route of a QWeight matmul, forced whatever the rows and the CPU (batch invariance off:
    it keeps every row count native)."""
    monkeypatch.setattr(cpu_linear, "quant_native", lambda rows, precision: request.param)
    with settings.override(batch_invariant=False):
        yield request.param


@needs_native
@pytest.mark.parametrize("precision,group", FORMATS, ids=[f"{p}-g{g}" for p, g in FORMATS])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_matches_float64_references(M, N, K, precision, group, native_route):
    x, w = inputs(M, N, K, M * N + K + group)
    qw = quantize(w, precision, group)
    assert cpu_linear.supports(x, qw) == native_route
    for x_dtype, out_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                               (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)):
        xd = x.to(x_dtype)
        y = linear(xd, qw, out_dtype=out_dtype)
        assert y.dtype == out_dtype and y.shape == (M, N)
        y = y.double().numpy()
        ref_q, terms, ref = references(xd, qw)
        out_rounding = 2.0 ** -8 * np.abs(ref_q if native_route else ref) if out_dtype == torch.bfloat16 else 0
        if native_route:
            # fp32: one rounding per block product and accumulation step, the lanes' sum, the scale
            tight = (K / 32 + 24) * EPS * terms
            assert (np.abs(y - ref_q) <= tight + out_rounding).all()
            assert (np.abs(y - ref) <= activation_bound(xd, qw) + tight + out_rounding).all()
        else:  # dequantised to bf16 (weights and activations rounded: 2^-9 each), torch's GEMM
            assert np.array_equal(y, F.linear(xd.bfloat16(), dequantize(qw, torch.bfloat16)).to(out_dtype).double())
            bound = 2.0 ** -7 * (np.abs(xd.double().numpy()) @ np.abs(dequantize(qw, torch.float64).numpy()).T)
            assert (np.abs(y - ref) <= bound + out_rounding).all()


@needs_native
@pytest.mark.parametrize("precision,group", FORMATS, ids=[f"{p}-g{g}" for p, g in FORMATS])
@pytest.mark.parametrize("K", [32, 100, 1000])
def test_native_dequantisation_is_dequantize_bit_for_bit(precision, group, K):
    torch.manual_seed(K + group)
    qw = quantize(torch.randn(37, K), precision, group)
    assert torch.equal(cpu_linear.dequantize_bf16(qw), dequantize(qw, torch.bfloat16))


@needs_native
@pytest.mark.parametrize("precision,group", FORMATS, ids=[f"{p}-g{g}" for p, g in FORMATS])
@pytest.mark.parametrize("K", [384, 4500])
def test_a_row_does_not_depend_on_the_others_or_on_M(precision, group, K):
    x, w = inputs(70, 29, K, 3)
    qw = quantize(w, precision, group)
    with cpu_linear.bf16_instructions(False):  # the native kernel at every row count
        full = linear(x, qw)
        for M in (1, 2, 3, 4, 5, 13, 20):
            assert torch.equal(linear(x[:M], qw), full[:M])
        assert torch.equal(linear(x[41:42], qw), full[41:42])
        assert torch.equal(linear(x.flip(0), qw), full.flip(0))


@needs_native
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_result_does_not_depend_on_the_thread_count(precision):
    x, w = inputs(6, 300, 1024, 4)  # M N K >= 2^20: the rows are split over threads
    qw = quantize(w, precision)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear(x, qw)
        torch.set_num_threads(2)
        assert torch.equal(one, linear(x, qw))
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_leading_dimensions_and_the_default_out_dtype():
    x, w = torch.randn(2, 3, 64).bfloat16(), torch.randn(10, 64)
    qw = quantize(w, "int4", 32)
    y = linear(x, qw)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 10)
    assert torch.equal(y, linear(x.reshape(6, 64), qw).reshape(2, 3, 10))


@needs_native
def test_matrix_of_a_bf16_tensor_is_the_bf16_kernel():
    x, w = torch.randn(5, 100), torch.randn(21, 100).bfloat16()
    m = matrix(w)
    assert (m.precision, m.scales, m.group) == (cpu_linear.BF16, None, 0) and m.tensors[0] is w
    y = torch.empty(5, 21)
    native.native().linear_matrix(x.data_ptr(), 0, 5, 100, ctypes.byref(m), 21, y.data_ptr(), 0, 1)
    assert torch.equal(y, linear(x, w))  # bit-identical to linear_bf16


def test_matrix_holds_contiguous_copies():
    qw = quantize(torch.randn(8, 64), "int8")
    strided = QWeight("int8", qw.q.t().contiguous().t(), qw.scales, 0, 64)
    m = matrix(strided)
    assert m.precision == cpu_linear.INT8 and all(t.is_contiguous() for t in m.tensors)
    assert m.data == m.tensors[0].data_ptr() and m.scales == m.tensors[1].data_ptr()
    q4 = quantize(torch.randn(8, 100), "int4", 64)
    m4 = matrix(q4)
    assert (m4.precision, m4.group, m4.data) == (cpu_linear.INT4, 64, q4.q.data_ptr())


def test_fallback_without_the_library(monkeypatch):
    monkeypatch.setattr(cpu_linear, "native", lambda: None)
    x, qw = torch.randn(20, 96), quantize(torch.randn(7, 96), "int4", 32)
    for forced in (False, True):
        with cpu_linear.bf16_instructions(forced):
            assert not cpu_linear.supports(x, qw)
            assert torch.equal(linear(x, qw), F.linear(x, dequantize(qw)))


@pytest.mark.parametrize("amx", [False, True], ids=["avx512-bf16", "amx"])
def test_the_rule_picks_the_route_by_rows_precision_and_cpu(amx, monkeypatch):
    monkeypatch.setattr(cpu_linear, "_detected_amx", lambda: amx)
    limits = cpu_linear.QUANT_NATIVE_MAX_ROWS["amx" if amx else "avx512_bf16"]
    weights = {p: quantize(torch.randn(8, 64), p) for p in ("int8", "int4")}
    with cpu_linear.bf16_instructions(False):  # no bf16 matmul instructions: the native kernel, always
        assert all(cpu_linear.quant_native(4096, p) for p in weights)
    with cpu_linear.bf16_instructions(True), settings.override(batch_invariant=False):
        for p, w in weights.items():
            n = limits[p]
            assert cpu_linear.quant_native(n, p) and not cpu_linear.quant_native(n + 1, p)
            if cpu_linear.native() is not None:  # supports() asks the rule, counting leading dimensions as rows
                assert cpu_linear.supports(torch.randn(1, n, 64), w)
                assert not cpu_linear.supports(torch.randn(n + 1, 64), w)


def _int4(N=4, K=100, group=64):
    return quantize(torch.randn(N, K), "int4", group)


@pytest.mark.parametrize("make, message", [
    (lambda: quantize(torch.randn(2, 4, 32), "int8"),
     "a QWeight for linear must be one matrix, not a stack of shape (2, 4, 32) (take w.row(i))"),
    (lambda: _int4()._replace(group=16), "int4 QWeight: group 16 is not one of 32, 64, 128"),
    (lambda: _int4()._replace(cols=130),
     "int4 QWeight of 130 inputs: codes are torch.uint8 (4, 64), expected torch.uint8 (4, 96)"),
    (lambda: _int4()._replace(scales=_int4().scales.float()),
     "int4 QWeight of 100 inputs: scales are torch.float32 (4, 2, 2), expected torch.bfloat16 (4, 2, 2)"),
    (lambda: quantize(torch.randn(4, 32), "int8")._replace(q=torch.zeros(4, 32, dtype=torch.uint8)),
     "int8 QWeight of 32 inputs: codes are torch.uint8 (4, 32), expected torch.int8 (4, 32)"),
    (lambda: quantize(torch.randn(4, 32), "int8")._replace(precision="int2"),
     "QWeight precision 'int2' is not int8 or int4"),
])
def test_a_malformed_qweight_is_one_line(make, message):
    with pytest.raises(ValueError) as e:
        matrix(make())
    assert str(e.value) == message


def test_matrix_refuses_other_tensors():
    with pytest.raises(ValueError) as e:
        matrix(torch.randn(3, 4))
    assert str(e.value) == "matrix: a weight Tensor must be 2-D bf16 on the CPU, not 2-D torch.float32 on cpu"


def test_linear_refuses_a_stack_and_a_size_mismatch():
    with pytest.raises(ValueError) as e:
        linear(torch.randn(1, 32), quantize(torch.randn(2, 4, 32), "int4", 32))
    assert str(e.value) == "a QWeight for linear must be one matrix, not a stack of shape (2, 4, 16) (take w.row(i))"
    with pytest.raises(ValueError) as e:
        linear(torch.randn(1, 33), quantize(torch.randn(4, 32), "int8"))
    assert str(e.value) == "linear: x has 33 features, weight (4, 32)"


def _expected_isa() -> str:
    if settings.current().native_isa == "avx2":
        return "avx2"
    flags = native.cpu_flags().split()
    if "avx512_vnni" in flags and "avx512bw" in flags:
        return "avx512-vnni"
    return "avx-vnni" if "avx_vnni" in flags else "avx2"


@needs_native
def test_the_library_is_built_for_the_requested_isa():
    assert cpu_linear.isa() == _expected_isa()


@pytest.mark.skipif(os.environ.get("TINYMOE_NATIVE_ISA") == "avx2", reason="this is the AVX2 run")
@needs_native
def test_the_avx2_build_passes_this_file():
    """The whole file again in a process whose library is the AVX2 build (maddubs instead of
    VNNI), sharing this process's build cache."""
    env = {**os.environ, "TINYMOE_NATIVE_ISA": "avx2", "TINYMOE_CACHE": str(settings.current().cache_dir)}
    done = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-rA", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "PASSED tests/test_cpu_quant.py::test_the_library_is_built_for_the_requested_isa" in done.stdout
    assert " failed" not in done.stdout.splitlines()[-1]
    # and the AVX2 build is a library of its own, whose kernels say so
    avx2 = native._load(settings.current().cache_dir, "avx2")
    assert avx2._name != native.native()._name and ctypes.string_at(avx2.quant_isa()) == b"avx2"


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler here")
def test_the_avx_vnni_path_compiles():
    """No CPU here has AVX-VNNI without AVX-512: at least the compiler and assembler check that path."""
    source = Path(native.__file__).with_name("cpu_quant.cpp")
    flags = [f for f in native.FLAGS if f not in ("-shared", "-fPIC")] + ["-mno-avx512f", "-mavxvnni"]
    done = subprocess.run([os.environ.get("CXX", "g++"), *flags, "-fsyntax-only", "-dM", "-E", str(source)],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "#define QUANT_ISA \"avx-vnni\"" in done.stdout, done.stderr[-2000:]
    with tempfile.TemporaryDirectory() as tmp:  # assembled too: the kernel's inline asm is VEX-encoded there
        done = subprocess.run([os.environ.get("CXX", "g++"), *flags, "-c", str(source), "-o", f"{tmp}/q.o"],
                              capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
