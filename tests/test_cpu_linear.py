"""The native CPU matmul (tinymoe/kernels/cpu_linear.*) against float64, and its torch fallback."""
import pytest
import torch

from tinymoe import Settings, settings
from tinymoe.kernels import cpu_linear
from tinymoe.kernels.cpu_linear import linear

needs_native = pytest.mark.skipif(cpu_linear.native() is None, reason="no C++ compiler or no AVX2 here")

# (M, N, K): one row (the GEMV path), 2-3 rows, 4+ rows in tiles of 3 weight rows x 4 activation
# rows with ragged edges, K with and without a scalar tail after the 16-value chunks, and more
# activation rows than one pass takes (64)
SHAPES = [(1, 7, 13), (1, 300, 1024), (2, 64, 1000), (3, 5, 32), (4, 9, 48), (6, 37, 77), (13, 130, 64),
          (70, 33, 160)]


def native_takes(rows, bf16_cpu):
    """The path the decision promises: the native kernel, unless bf16 instructions and > 16 rows."""
    return not bf16_cpu or rows <= cpu_linear.NATIVE_MAX_ROWS_WITH_BF16


@needs_native
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_bf16_weights_match_float64(M, N, K, bf16_cpu):
    torch.manual_seed(M * N + K)
    x, w = torch.randn(M, K), torch.randn(N, K).bfloat16()
    assert cpu_linear.supports(x, w) == native_takes(M, bf16_cpu)
    y = linear(x, w)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    torch.testing.assert_close(y.double(), x.double() @ w.double().t(), rtol=1e-5, atol=1e-4)


@needs_native
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_int8_weights_with_scales_match_float64(M, N, K, bf16_cpu):
    torch.manual_seed(M + N * K)
    x = torch.randn(M, K)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    s = (torch.rand(N) / 100).bfloat16()
    assert cpu_linear.supports(x, q, s) == native_takes(M, bf16_cpu)
    y = linear(x, q, s)
    ref = (x.double() @ q.double().t()) * s.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


@needs_native
def test_bf16_output_is_the_rounded_fp32_result():
    x, w = torch.randn(5, 3, 96).bfloat16(), torch.randn(40, 96).bfloat16()
    y = linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (5, 3, 40)
    assert torch.equal(y, linear(x.float(), w).bfloat16())  # round to nearest even, like torch


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
    q, s = torch.randint(-127, 128, (10, 64), dtype=torch.int8), torch.rand(10).bfloat16()
    torch.testing.assert_close(linear(x, q, s).double(), (x.double() @ q.double().t()) * s.double(),
                               rtol=1e-4, atol=1e-3)


def test_fp32_weights_are_plain_torch():
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    assert not cpu_linear.supports(x, w)
    torch.testing.assert_close(linear(x, w), x @ w.t())


@needs_native
def test_the_decision_splits_at_16_rows(bf16_cpu):
    w = torch.randn(8, 32).bfloat16()
    assert cpu_linear.supports(torch.randn(16, 32), w)
    assert cpu_linear.supports(torch.randn(2, 8, 32), w)  # rows are all leading dimensions
    assert cpu_linear.supports(torch.randn(17, 32), w) == (not bf16_cpu)
    assert cpu_linear.supports(torch.randn(3, 6, 32), w) == (not bf16_cpu)


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


@needs_native
# up to 64 tokens the copies share one parallel region, beyond it they run one after another
@pytest.mark.parametrize("T,I,D,threads", [(1, 40, 48, 1), (1, 256, 64, 1), (7, 40, 48, 1), (20, 256, 64, 1),
                                           (20, 256, 64, 2), (80, 40, 48, 1)])
def test_native_moe_equals_the_per_copy_torch_path(monkeypatch, T, I, D, threads, bf16_cpu):
    """Bit for bit while the per-copy path's matmuls run the native kernel (no bf16 instructions,
    or no copy over 16 rows); beyond that they run torch's GEMM, which sums in its own order (on
    AMX it differs in the last bits), so both are held to a float64 reference instead."""
    import tinymoe.kernels.moe_op as experts_module
    from tinymoe.experts import Experts
    from tinymoe.experts.plan import Copy, ExpertPlan
    torch.manual_seed(T + I + D)
    E, k = 4, 2
    experts = Experts(*(torch.randn(E, I, D).bfloat16() / 4 for _ in range(2)), torch.randn(E, D, I).bfloat16() / 4)
    if T > 7:  # replicas: physical copies map to expert rows through the plan
        experts.apply_plan(ExpertPlan([Copy(e, "full") for e in range(E)] + [Copy(1, "full"), Copy(3, "full")]))
    x = torch.randn(T, D).bfloat16()
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])  # expert 0 may get no token
    weights = torch.rand(T, k).softmax(-1)
    calls = []
    native_call = experts_module.moe
    monkeypatch.setattr(experts_module, "moe", lambda *a: calls.append(1) or native_call(*a))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused = experts(x, ids, weights)
    finally:
        torch.set_num_threads(threads_before)
    # with bf16 instructions a layer of over 16 tokens takes the per-copy path (torch's GEMM)
    one_call = not (cpu_linear.native_bf16() and T > cpu_linear.NATIVE_MAX_ROWS_WITH_BF16)
    assert bool(calls) == one_call
    phys = experts.last_physical_ids
    monkeypatch.setattr(experts_module, "moe", lambda *a: None)  # the per-copy torch path
    monkeypatch.setattr(experts, "physical_ids", lambda _: phys)  # replicas: the same copies again
    taken, supports = [], cpu_linear.supports

    def spied(x, *rest):
        taken.append(supports(x, *rest))
        return taken[-1]
    monkeypatch.setattr(cpu_linear, "supports", spied)
    per_copy = experts(x, ids, weights)
    exact = native_takes(int(torch.bincount(phys.flatten()).max()), bf16_cpu)
    assert taken and all(taken) == exact  # every per-copy matmul native, or some on torch's GEMM
    if exact or not one_call:
        assert torch.equal(fused, per_copy)
    else:
        w = weights.bfloat16().double()
        ref = torch.zeros(T, D, dtype=torch.float64)
        for t in range(T):
            for s in range(k):
                w13, w2 = experts.full_pool().w13[ids[t, s]].double(), experts.w_down[ids[t, s]].double()
                h = w13 @ x[t].double()
                ref[t] += w[t, s] * (w2 @ (torch.nn.functional.silu(h[:I]) * h[I:]))
        for out in (fused, per_copy):  # a few bf16 roundings (hidden, output, sum): ~8e-3 measured
            assert (out.double() - ref).abs().max() / ref.abs().max() < 2e-2


@needs_native
@pytest.mark.parametrize("T", [1, 3])
def test_native_moe_rejects_expert_ids_out_of_range(T):
    from tinymoe.kernels.cpu_linear import moe
    w13, w2 = torch.zeros(4, 32, 16).bfloat16(), torch.zeros(4, 16, 16).bfloat16()
    ids = torch.tensor([[0, 4]] * T)
    with pytest.raises(ValueError, match="outside 0..3"):
        moe(torch.zeros(T, 16).bfloat16(), ids, torch.ones(T, 2), w13, w2)
