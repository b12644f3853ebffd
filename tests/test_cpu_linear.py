"""The native CPU matmul (tinymoe/kernels/cpu_linear.*) against float64, and its torch fallback
(int8 / int4 weights: tests/test_cpu_quant.py)."""
import ctypes

import pytest
import torch

from tinymoe import Settings, settings
from tinymoe.kernels import cpu_linear, native
from tinymoe.kernels.cpu_linear import linear
from tinymoe.kernels.quant import dequantize, quantize

needs_native = pytest.mark.skipif(cpu_linear.native() is None, reason="no C++ compiler or no AVX2 here")

# (M, N, K): one row (the GEMV path), 2-3 rows, 4+ rows in tiles of 3 weight rows x 4 activation
# rows with ragged edges, K with and without a scalar tail after the 16-value chunks, and more
# activation rows than one pass takes (64)
SHAPES = [(1, 7, 13), (1, 300, 1024), (2, 64, 1000), (3, 5, 32), (4, 9, 48), (6, 37, 77), (13, 130, 64),
          (70, 33, 160)]


@pytest.fixture(params=[True, False], ids=["batch-invariant", "gemm-allowed"])
def invariant(request):
    """Settings.batch_invariant both ways: on (the default), every row count in the native kernels."""
    with settings.override(batch_invariant=request.param):
        yield request.param


def native_takes(rows, bf16_cpu, invariant):
    """The path the decision promises: the native kernel, unless not batch-invariant, bf16
    instructions and > 16 rows."""
    return invariant or not bf16_cpu or rows <= cpu_linear.NATIVE_MAX_ROWS_WITH_BF16


@needs_native
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_bf16_weights_match_float64(M, N, K, bf16_cpu, invariant):
    torch.manual_seed(M * N + K)
    x, w = torch.randn(M, K), torch.randn(N, K).bfloat16()
    assert cpu_linear.supports(x, w) == native_takes(M, bf16_cpu, invariant)
    y = linear(x, w)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    torch.testing.assert_close(y.double(), x.double() @ w.double().t(), rtol=1e-5, atol=1e-4)


def _dot_path(isa: str) -> str:
    """The products a build's bf16 kernels take for bf16 activations (cpu_kernels.h bf16_dot_isa)."""
    if isa == "native" and "avx512_bf16" in native.cpu_flags().split():
        return "avx512-bf16"
    return "fma"


@needs_native
@pytest.mark.parametrize("isa", settings.NATIVE_ISAS)
def test_bf16_activations_on_every_build_match_float64_and_one_row_alone(isa):
    """bf16 x takes vdpbf16ps where the CPU has AVX512-BF16 and the FMA tiles elsewhere: each
    build forced, against float64, and every row alone equal to its row in the batch."""
    with settings.override(native_isa=isa):
        assert ctypes.string_at(cpu_linear.native().bf16_dot_isa()).decode() == _dot_path(isa)
        for M, N, K in SHAPES + [(9, 40, 4096)]:
            torch.manual_seed(M * N + K)
            x, w = torch.randn(M, K).bfloat16(), torch.randn(N, K).bfloat16()
            y = linear(x, w, out_dtype=torch.float32)
            torch.testing.assert_close(y.double(), x.double() @ w.double().t(), rtol=1e-5, atol=1e-4)
            alone = torch.cat([linear(x[i:i + 1], w, out_dtype=torch.float32) for i in range(M)])
            assert torch.equal(alone, y), (M, N, K)


@needs_native
def test_bf16_output_is_the_rounded_fp32_result():
    x, w = torch.randn(5, 3, 96).bfloat16(), torch.randn(40, 96).bfloat16()
    y = linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (5, 3, 40)
    assert torch.equal(y, linear(x, w, out_dtype=torch.float32).bfloat16())  # round to nearest even, like torch


@needs_native
def test_result_does_not_depend_on_the_thread_count():
    # big enough (M*N*K >= 2^20) that the kernel really splits the rows over threads
    x, w = torch.randn(6, 1024), torch.randn(299, 1024).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear(x, w)
        torch.set_num_threads(2)
        assert torch.equal(one, linear(x, w))
    finally:
        torch.set_num_threads(threads)


def test_torch_fallback_without_the_native_kernel(monkeypatch):
    monkeypatch.setattr(cpu_linear, "native", lambda: None)
    x, w = torch.randn(3, 64), torch.randn(10, 64).bfloat16()
    assert not cpu_linear.supports(x, w)
    torch.testing.assert_close(linear(x.bfloat16(), w).double(), x.bfloat16().double() @ w.double().t(),
                               rtol=2e-2, atol=2e-2)
    for precision in ("int8", "int4"):  # a QWeight: dequantised to x's dtype, then F.linear
        qw = quantize(torch.randn(10, 64), precision)
        assert not cpu_linear.supports(x, qw)
        assert torch.equal(linear(x, qw), torch.nn.functional.linear(x, dequantize(qw)))


def test_fp32_weights_are_plain_torch():
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    assert not cpu_linear.supports(x, w)
    torch.testing.assert_close(linear(x, w), x @ w.t())


@needs_native
def test_the_decision_splits_at_16_rows_unless_batch_invariant(bf16_cpu, invariant):
    w = torch.randn(8, 32).bfloat16()
    assert cpu_linear.supports(torch.randn(16, 32), w)
    assert cpu_linear.supports(torch.randn(2, 8, 32), w)  # rows are all leading dimensions
    assert cpu_linear.supports(torch.randn(17, 32), w) == (invariant or not bf16_cpu)
    assert cpu_linear.supports(torch.randn(3, 6, 32), w) == (invariant or not bf16_cpu)
    assert cpu_linear.native_rows(4096) == (invariant or not bf16_cpu)
    for precision in ("int8", "int4"):  # a QWeight: quant_native's rule, unless batch-invariant
        qw = quantize(torch.randn(8, 32), precision)
        assert cpu_linear.supports(torch.randn(4096, 32), qw) == (invariant or not bf16_cpu)


def test_bf16_decision_from_the_cpu_the_settings_and_the_override():
    with open("/proc/cpuinfo") as f:
        flags = next((line for line in f if line.startswith("flags")), "").split()
    detected = "avx512_bf16" in flags or "amx_bf16" in flags
    with settings.override(cpu_bf16=None):  # TINYMOE_CPU_BF16 unset
        assert cpu_linear.native_bf16() is detected
    for value in (False, True):  # TINYMOE_CPU_BF16=0|1
        with settings.override(cpu_bf16=value):
            assert cpu_linear.native_bf16() is value
            for forced in (False, True):  # the override wins, both ways, and is undone
                with cpu_linear.bf16_instructions(forced):
                    assert cpu_linear.native_bf16() is forced
                    with cpu_linear.bf16_instructions(None):  # None: the CPU's flags
                        assert cpu_linear.native_bf16() is detected
                    assert cpu_linear.native_bf16() is forced
                assert cpu_linear.native_bf16() is value
    before = settings.current().cpu_bf16
    cpu_linear.bf16_instructions(not detected)  # the plain setter
    try:
        assert cpu_linear.native_bf16() is (not detected)
    finally:
        cpu_linear.bf16_instructions(before)
    assert settings.current().cpu_bf16 is before


def test_bf16_env_value():
    assert Settings.from_env({"TINYMOE_CPU_BF16": "1"}).cpu_bf16 is True
    assert Settings.from_env({"TINYMOE_CPU_BF16": "0"}).cpu_bf16 is False
    assert Settings.from_env({"TINYMOE_CPU_BF16": ""}).cpu_bf16 is None
    assert Settings.from_env({}).cpu_bf16 is None
    with pytest.raises(ValueError) as e:
        Settings.from_env({"TINYMOE_CPU_BF16": "yes"})
    assert str(e.value) == ("TINYMOE_CPU_BF16='yes': use 0 (no bf16 instructions), 1 (bf16 instructions) or "
                            "leave it unset (detect)")
    with pytest.raises(TypeError) as e:
        cpu_linear.bf16_instructions("1")
    assert str(e.value) == "bf16_instructions takes True, False or None, not '1'"


@needs_native
def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="features"):
        linear(torch.randn(2, 8), torch.randn(3, 9).bfloat16())
