"""kernels/moe_cpu.py, the expert op's CPU implementation: the one native call (`moe_tokens`, any
plan and precision) against the per-copy path (two `cpu_linear.linear` per copy) and both against
float64, on ragged token counts, at 1 and 2 threads, with the "bf16 instructions" decision forced
both ways and Settings.batch_invariant on and off."""
import gc

import pytest
import torch
import torch.nn.functional as F

from tinymoe import settings
from tinymoe.experts import Copy, ExpertPlan, Experts
from tinymoe.kernels import cpu_linear, moe_cpu, moe_experts, quant
from tinymoe.kernels.native import BF16, INT4, INT8, native

pytestmark = pytest.mark.skipif(native() is None, reason="the native library is unavailable here")

E = 4
PLANS = {  # name -> copies of E experts
    "full": [Copy(e) for e in range(E)],
    "int8": [Copy(e, "int8") for e in range(E)],
    "int4": [Copy(e, "int4") for e in range(E)],
    "mixed": [Copy(0), Copy(1, "int8"), Copy(2, "int4"), Copy(3, "int8")],
    # R&Q-like: every expert once, the busy ones replicated quantised
    "rnq": [Copy(e) for e in range(E)] + [Copy(0, "int4"), Copy(2, "int4"), Copy(1, "int8")],
}


@pytest.fixture(params=[True, False], ids=["batch-invariant", "gemm-allowed"])
def invariant(request):
    """Settings.batch_invariant both ways: on (the default), the one call at any token count."""
    with settings.override(batch_invariant=request.param):
        yield request.param


def layer(plan, I=80, D=64, dtype=torch.bfloat16, seed=0):
    # I = 80: the down projection's inputs are not a whole number of int8 blocks (32) nor of
    # int4 groups (padded)
    g = torch.Generator().manual_seed(seed)
    ex = Experts(*((torch.randn(E, I, D, generator=g) / D ** 0.5).to(dtype) for _ in range(2)),
                 (torch.randn(E, D, I, generator=g) / I ** 0.5).to(dtype))
    ex.apply_plan(ExpertPlan(PLANS[plan]))
    return ex


def routed(ex, T, k=2, seed=1):
    """x [T, D], the plan's copies of random distinct experts per token, softmax weights [T, k]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, ex.hidden, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return x, ex.physical_ids(ids), torch.rand(T, k, generator=g).softmax(-1)


def float64(copies, x, copy_ids, weights):
    """Token by token, slot by slot, on the weights the copies stand for (kernels.quant's
    dequantisation of their QWeights), weights rounded to bf16 as the op takes them."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(copy_ids.shape[0]):
        for s in range(copy_ids.shape[1]):
            name, row = copies.where[int(copy_ids[t, s])]
            pool = copies.pools[name]
            w13, w2 = (w[row].double() if name == "full" else quant.dequantize(w.row(row), torch.float64)
                       for w in (pool.w13, pool.w2))
            h = w13 @ x[t].double()
            out[t] += weights[t, s].bfloat16().double() * (w2 @ (F.silu(h[:pool.inter]) * h[pool.inter:]))
    return out


def rel_err(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("T", [1, 2, 7, 64, 65])  # one token; one parallel region up to 64; one copy after another
def test_one_call_equals_the_per_copy_path_and_float64(plan, T, bf16_cpu, invariant):
    ex = layer(plan)
    copies = ex.copies()
    x, copy_ids, w = routed(ex, T, k=3)  # three terms a token: the order of the rounded sums shows
    one = moe_cpu.one_call(x, copy_ids, w, copies)
    taken = []
    supports = cpu_linear.supports

    def spied(*args):
        taken.append(supports(*args))
        return taken[-1]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cpu_linear, "supports", spied)
        per_copy = moe_cpu.per_copy(x, copy_ids, w, copies)
    assert one.dtype == per_copy.dtype == torch.bfloat16
    gemm = not invariant and bf16_cpu  # the rule that lets torch's GEMM take more than 16 rows
    if all(taken):  # every per-copy matmul native: the same arithmetic, bit for bit
        assert torch.equal(one, per_copy)
    else:  # a copy over 16 rows ran torch's GEMM, summing in its own order
        assert gemm and int(torch.bincount(copy_ids.flatten()).max()) > 16
    assert all(taken) == (not gemm or int(torch.bincount(copy_ids.flatten()).max()) <= 16)
    ref = float64(copies, x, copy_ids, w)
    # bf16 roundings (hidden, output, weighted sum): 0.75% of the max measured; quantised copies
    # also quantise their activations to int8 per block of 32 (the heavy-tailed SwiGLU outputs
    # lose most): up to 2.2% measured, 0.63% for the same weights with bf16 activations
    bound = 1e-2 if plan == "full" else 3e-2
    for out in (one, per_copy):
        assert rel_err(out, ref) < bound, plan
    # the op: the one call, except where torch's GEMM may take over 16 tokens (then per copy)
    op = moe_experts.native(x, copy_ids, w, copies)
    assert torch.equal(op, per_copy if gemm and T > 16 else one)


@pytest.mark.parametrize("plan", ["full", "mixed", "rnq"])
@pytest.mark.parametrize("T", [1, 7, 65])
def test_one_call_is_the_same_at_two_threads(plan, T, restored):
    ex = layer(plan, I=256, D=128)  # enough work to split
    x, copy_ids, w = routed(ex, T, k=3)
    torch.set_num_threads(1)
    one_thread = moe_cpu.one_call(x, copy_ids, w, ex.copies())
    torch.set_num_threads(2)
    two = moe_cpu.one_call(x, copy_ids, w, ex.copies())
    with cpu_linear.bf16_instructions(False):
        per_copy = moe_cpu.per_copy(x, copy_ids, w, ex.copies())
    assert torch.equal(one_thread, two) and torch.equal(two, per_copy)


def test_copy_matrices_point_at_each_copys_weights():
    ex = layer("rnq")
    copies = ex.copies()
    m = moe_cpu.copy_matrices(copies)
    assert moe_cpu.copy_matrices(copies) is m  # built once per ExpertCopies
    assert len(m.w13) == len(m.w2) == copies.num_copies == 7
    for c, (name, row) in enumerate(copies.where):
        pool = copies.pools[name]
        for matrix, w in ((m.w13[c], pool.w13), (m.w2[c], pool.w2)):
            if name == "full":
                assert (matrix.precision, matrix.data, matrix.scales) == (BF16, w[row].data_ptr(), None)
            else:
                qw = w.row(row)
                assert matrix.precision == {"int8": INT8, "int4": INT4}[name]
                assert (matrix.data, matrix.scales, matrix.group) == (qw.q.data_ptr(), qw.scales.data_ptr(), qw.group)
    ex.apply_plan(ExpertPlan(PLANS["int8"]))
    assert moe_cpu.copy_matrices(ex.copies()) is not m
    del copies, m
    gc.collect()
    assert len(moe_cpu._matrices) <= 1  # entries go with their ExpertCopies


def test_what_the_native_entry_cannot_read_takes_the_per_copy_path():
    ex = layer("mixed", dtype=torch.float32)  # fp32 full-precision copies
    x, copy_ids, w = routed(ex, 5)
    assert moe_cpu.copy_matrices(ex.copies()) is None
    assert moe_cpu.one_call(x, copy_ids, w, ex.copies()) is None  # bf16 x, but fp32 weights
    assert moe_cpu.one_call(x.float(), copy_ids, w, ex.copies()) is None
    out = moe_experts.native(x.float(), copy_ids, w, ex.copies())
    assert torch.equal(out, moe_cpu.per_copy(x.float(), copy_ids, w, ex.copies()))


@pytest.mark.parametrize("T", [1, 3])
def test_copy_ids_out_of_range_are_one_line_errors(T):
    ex = layer("rnq")
    x, copy_ids, w = routed(ex, T)
    for bad in (7, -1):
        ids = copy_ids.clone()
        ids[0, 1] = bad
        low, high = int(ids.min()), int(ids.max())
        with pytest.raises(ValueError, match=rf"^moe_experts: copy ids in {low}\.\.{high}, outside 0\.\.6$"):
            moe_cpu.one_call(x, ids, w, ex.copies())
