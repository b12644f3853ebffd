"""Expert pools on the torch (CPU) path against float64 references; quantisers; replicas and the
least-loaded copy dispatch; weight bytes; quantised experts' logit error on a tiny model."""
import pytest
import torch
import torch.nn.functional as F

import tinymoe
from tinymoe import kernels
from tinymoe.experts import Copy, ExpertPlan, Experts
from tinymoe.kernels import moe_op
from tinymoe.experts.dispatch import copy_loads, copy_table
from tinymoe.experts.pools import POOLS
from tinymoe.experts.quant import (dequantize_int4, dequantize_int8, expert_bytes, int4_group_size, pack_int4,
                                   quantize_int4, quantize_int8, unpack_int4)


@pytest.fixture(autouse=True)
def torch_backend():
    with kernels.use_backend("torch"):
        yield


def random_experts(E=4, I=40, D=48, dtype=torch.float32):
    return Experts((torch.randn(E, I, D) / D ** 0.5).to(dtype), (torch.randn(E, I, D) / D ** 0.5).to(dtype),
                   (torch.randn(E, D, I) / I ** 0.5).to(dtype))


def random_routing(T, k, E):
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    return ids, torch.rand(T, k)


def reference(x, ids, weights, dense):
    """float64, one token and slot at a time; `dense(e)` = float64 (gate, up, down) of expert e."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            wg, wu, wd = dense(int(ids[t, s]))
            xt = x[t].double()
            out[t] += weights[t, s].double() * (wd @ (F.silu(wg @ xt) * (wu @ xt)))
    return out


def dense_full(ex):
    return lambda e: (ex.w_gate[e].double(), ex.w_up[e].double(), ex.w_down[e].double())


def dense_quantised(ex, precision):
    def dense(e):
        ws = []
        for w in (ex.w_gate[e], ex.w_up[e], ex.w_down[e]):
            if precision == "int8":
                ws.append(dequantize_int8(*quantize_int8(w)).double())
            else:
                k = -(-w.shape[1] // 32) * 32
                wp = F.pad(w, (0, k - w.shape[1]))
                ws.append(dequantize_int4(*quantize_int4(wp, int4_group_size(k)))[:, :w.shape[1]].double())
        return ws
    return dense


@pytest.mark.parametrize("precision", ["full", "int8", "int4"])
@pytest.mark.parametrize("T", [1, 3, 40])
def test_pool_matches_float64(precision, T, bf16_cpu, monkeypatch):
    # with bf16 instructions (forced here both ways), copies over 16 rows take the int pools'
    # dequantise-then-matmul path; without, their CPU kernels at any row count
    packed, use_packed = [], moe_op.use_packed
    monkeypatch.setattr(moe_op, "use_packed", lambda x: packed.append(use_packed(x)) or packed[-1])
    E, k = 5, 2
    ex = random_experts(E, I=64, D=96)
    ids, w = random_routing(T, k, E - 1)  # the last expert gets no tokens
    x = torch.randn(T, 96)
    if precision == "full":
        dense, tol = dense_full(ex), 1e-5
    else:
        # quantised pools compute in bf16 (the CPU kernels' activation dtype): bf16-level error
        ex.apply_plan(ExpertPlan([Copy(e, precision) for e in range(E)]))
        dense, tol = dense_quantised(ex, precision), 2e-2
    ref = reference(x, ids, w, dense)
    out = ex(x, ids, w)
    assert out.dtype == x.dtype
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err < tol, f"{precision}: relative error {err:.2e}"
    if precision != "full":
        assert (False in packed) == (bf16_cpu and int(torch.bincount(ids.flatten()).max()) > 16)


@pytest.mark.parametrize("T", [1, 6, 40])  # mv, bf16 GEMM, fp32 GEMM on widened weights
def test_bf16_model_dtype(T):
    ex = random_experts(dtype=torch.bfloat16)
    ids, w = random_routing(T, 2, 4)
    x = torch.randn(T, 48).bfloat16()
    ref = reference(x, ids, w, dense_full(ex))
    out = ex(x, ids, w.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() / ref.abs().max() < 2e-2


def test_int8_round_trip():
    w = torch.randn(3, 64, 80) * torch.rand(3, 64, 1) * 4
    w[0, 0] = 0  # an all-zero channel must not divide by zero
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (3, 64)
    err = (dequantize_int8(q, scale) - w).abs()
    assert (err <= 0.5 * scale.float()[..., None] * (1 + 1e-3) + 1e-30).all()
    assert err.max() / w.abs().max() < 1 / 200


@pytest.mark.parametrize("group", [32, 128])
def test_int4_round_trip_and_packing(group):
    w = torch.randn(2, 128, 256) + torch.randn(2, 128, 1)  # offset channels: asymmetric matters
    q, sz = quantize_int4(w, group)
    assert q.max() <= 15 and sz.dtype == torch.bfloat16 and sz.shape == (2, 256 // group, 128, 2)
    scale = sz[..., 0].float().transpose(-1, -2).repeat_interleave(group, -1)
    err = (dequantize_int4(q, sz) - w).abs()
    assert (err <= 0.5 * scale * 1.01 + 1e-6).all()
    # our packing is the CPU kernel's layout, and its matmul follows (q - 8) * scale + zero
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[0].int(), 1)
    assert torch.equal(pack_int4(q[0]), packed) and torch.equal(unpack_int4(packed), q[0])
    for block in (32, 64):  # AVX2 and AVX-512 layouts both round-trip
        assert torch.equal(unpack_int4(pack_int4(q[0], block), block), q[0])
    x = torch.randn(3, 256).bfloat16()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz[0])
    torch.testing.assert_close(y.float(), x.float() @ dequantize_int4(q[0], sz[0]).t(), rtol=2e-2, atol=5e-2)


def test_int4_group_size():
    assert int4_group_size(4096) == 128 and int4_group_size(64) == 64 and int4_group_size(96) == 32
    with pytest.raises(ValueError, match="group"):
        int4_group_size(48)


def greedy_copies(ids, plan):
    """The rule, literally: each assignment in token order to its expert's copy with the fewest
    tokens so far in this pass, ties to the full-precision copy, then the lower index."""
    load = [0] * len(plan.copies)
    out = torch.empty_like(ids)
    for t in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            cands = plan.copies_of(int(ids[t, s]))
            c = min(cands, key=lambda c: (load[c], plan.copies[c].precision != "full", c))
            load[c] += 1
            out[t, s] = c
    return out


def test_replicas_least_loaded_and_same_output():
    E, T, k = 4, 13, 2
    ex = random_experts(E)
    ids, w = random_routing(T, k, E)
    x = torch.randn(T, 48)
    base = ex(x, ids, w)
    assert torch.equal(ex.last_physical_ids, ids)
    plan = ExpertPlan([Copy(e) for e in range(E)] + [Copy(1), Copy(1), Copy(3)])
    ex.apply_plan(plan)
    torch.testing.assert_close(ex(x, ids, w), base, rtol=1e-6, atol=1e-6)
    assert torch.equal(ex.last_physical_ids, greedy_copies(ids, plan))
    # quantised replicas listed before the full copy: ties still go to the full one first
    plan = ExpertPlan([Copy(0, "int8"), Copy(0), Copy(1), Copy(2, "int4"), Copy(3), Copy(2), Copy(1, "int8")])
    ex.apply_plan(plan)
    ex(x, ids, w)
    phys = ex.last_physical_ids
    assert torch.equal(phys, greedy_copies(ids, plan))
    assert all(plan.copies[c].expert == e for c, e in zip(phys.view(-1).tolist(), ids.view(-1).tolist()))
    counts = torch.bincount(phys.view(-1), minlength=len(plan.copies))
    assert counts[1] >= counts[0] and counts[2] >= counts[6]  # a full copy is never behind its replica


def test_weight_bytes_and_plan_errors():
    E, I, D = 4, 64, 96
    ex = random_experts(E, I, D)
    assert ex.weight_bytes() == E * 3 * I * D * 4
    ex.apply_plan(ExpertPlan([Copy(e, "int8") for e in range(E)]))
    assert ex.weight_bytes() == E * (3 * I * D + (2 * I + D) * 2)  # int8 weights + bf16 scales
    ex.apply_plan(ExpertPlan([Copy(e, "int4") for e in range(E)]))
    # int4: half a byte per weight, a bf16 scale and zero per group (64 inputs for the down proj.)
    # (2I = 128 and D = 96 output channels are padded to multiples of 64)
    assert ex.weight_bytes() == E * ((128 * D + 128 * I) // 2 + (D // 32 * 128 + I // 64 * 128) * 4)
    ex.apply_plan(ExpertPlan([Copy(e) for e in range(E)] + [Copy(0, "int8")]))
    assert ex.weight_bytes() == E * 3 * I * D * 4 + 3 * I * D + (2 * I + D) * 2
    with pytest.raises(ValueError, match="no copy of experts \\[3\\]"):
        ex.apply_plan(ExpertPlan([Copy(0), Copy(1), Copy(2)]))
    with pytest.raises(ValueError, match="invalid copies"):
        ex.apply_plan(ExpertPlan([Copy(e, "int3") for e in range(E)]))


# (hidden D, intermediate I): tiny-mixtral's and tiny-deepseek's experts, then shapes the int4
# pool pads (rows to 64, inputs to 32) or groups by 64 or 32 instead of 128
STORED_SHAPES = [(256, 384), (256, 96), (48, 40), (96, 64), (100, 20), (64, 33)]


@pytest.mark.parametrize("hidden,inter", STORED_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_budgeted_bytes_are_the_bytes_the_pools_store(hidden, inter, dtype):
    """`expert_bytes` (R&Q's budget, the pools' `copy_bytes`) against what each pool holds."""
    E = 3
    w13, w2 = torch.randn(E, 2 * inter, hidden).to(dtype), torch.randn(E, hidden, inter).to(dtype)
    itemsize = w13.element_size()
    for precision in ("full", "int8", "int4"):
        pool = POOLS[precision](w13, w2) if precision == "full" else POOLS[precision](w13, w2, list(range(E)))
        held = pool.kernel_weights()
        stored = sum(t.numel() * t.element_size() for t in (held.w13, held.w2, held.s13, held.s2)
                     if t is not None)
        assert stored % E == 0 and stored // E == expert_bytes(hidden, inter, precision, itemsize), precision
        assert pool.copy_bytes() == stored // E
    ex = Experts(w13[:, :inter].clone(), w13[:, inter:].clone(), w2.clone())
    for precision in ("full", "int8", "int4"):
        ex.apply_plan(ExpertPlan([Copy(e, precision) for e in range(E)] + [Copy(0, precision)]))
        assert ex.weight_bytes() == (E + 1) * expert_bytes(hidden, inter, precision, itemsize)


def test_expert_bytes_refuses_an_unknown_precision():
    with pytest.raises(ValueError) as e:
        expert_bytes(64, 32, "int3", 2)
    assert str(e.value) == "unknown precision 'int3'; valid: full, int8, int4"


@pytest.mark.parametrize("seed", range(6))
def test_copy_loads_are_what_physical_ids_assigns(seed):
    """The per-copy loads the balance metrics use come from dispatch itself: equal to counting
    the copies `Experts.physical_ids` picks, whatever the order of the ids."""
    g = torch.Generator().manual_seed(seed)
    E, k = 5, 2
    ex = random_experts(E)
    extra = [Copy(int(e), ("full", "int8", "int4")[int(p)])
             for e, p in zip(torch.randint(0, E, (4,), generator=g), torch.randint(0, 3, (4,), generator=g))]
    originals = [Copy(e, ("full", "int8")[e % 2]) for e in range(E)]
    plan = ExpertPlan(extra[:2] + originals + extra[2:])  # replicas before and after the originals
    ex.apply_plan(plan)
    T = [1, 7, 40, 3, 16, 100][seed]
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[: T // 2] = ids[: T // 2].clamp(max=1)  # crowd experts 0 and 1 so every replica is used
    assigned = torch.bincount(ex.physical_ids(ids).reshape(-1), minlength=len(plan.copies))
    load = torch.bincount(ids.reshape(-1), minlength=E)
    assert torch.equal(copy_loads(load, *copy_table(plan, E), len(plan.copies)), assigned)
    assert torch.equal(assigned, torch.bincount(greedy_copies(ids, plan).reshape(-1), minlength=len(plan.copies)))


def test_reloaded_parameters_are_seen():
    """The loader writes the parameters in place after construction; .to() replaces them."""
    ex = random_experts()
    ids, w = random_routing(5, 2, 4)
    x = torch.randn(5, 48)
    ex(x, ids, w)
    with torch.no_grad():
        ex.w_up.data[2].mul_(-1)
        ex.w_down.data[1].mul_(2)
    torch.testing.assert_close(ex(x, ids, w).double(), reference(x, ids, w, dense_full(ex)),
                               rtol=1e-5, atol=1e-5)
    ex.to(torch.float64)
    torch.testing.assert_close(ex(x.double(), ids, w.double()), reference(x, ids, w, dense_full(ex)))


@pytest.mark.parametrize("precision,rms_bound,max_bound", [("int8", 0.005, 0.03), ("int4", 0.08, 0.5)])
def test_quantised_experts_logit_error(tiny_mixtral, precision, rms_bound, max_bound):
    model = tinymoe.load_model(tiny_mixtral)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        for block in model.moe_blocks():
            block.experts.apply_plan(ExpertPlan([Copy(e, precision) for e in range(block.experts.num_experts)]))
        out = model(ids)
    rms = ((out - ref).pow(2).mean().sqrt() / ref.std()).item()
    worst = ((out - ref).abs().max() / ref.std()).item()
    print(f"\n{precision} experts: logit error rms {rms:.4f}, max {worst:.4f} (in logit std units)")
    assert rms < rms_bound and worst < max_bound


def test_empty_batch_and_bad_shapes():
    ex = random_experts()
    out = ex(torch.randn(0, 48), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert out.shape == (0, 48)
    with pytest.raises(ValueError, match="do not fit"):
        Experts(torch.randn(4, 40, 48), torch.randn(4, 40, 48), torch.randn(4, 40, 48))
